"""Scheduling policies: what the LM step runs first, what it may skip, whom it admits and whom it preempts.

The scheduler applies one policy through the same few questions, so features are policies, not branches:
- `streaming`: every request has a playback deadline (DESIGN.md §5). Rows run earliest-slack first; rows with
  plenty of slack ride along only while the step stays short enough for the most urgent ones; a new request is
  admitted only while the predicted step time keeps every stream faster than real time and KV blocks for its
  prompt plus expected audio are free; under memory pressure the request with the most slack is paused.
- `offline`: throughput. Every row runs, admission reserves KV for prompt plus expected audio, no deadlines.
- `fcfs`: plain first-come first-served continuous batching, kept to compare against.
"""

from __future__ import annotations

import math

from streamvox.config import SchedulerConfig
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.request import Request
from streamvox.sched.timing import StepTimer


class Policy:
    """First-come first-served: rows in admission order, no step-time cap, no reservation."""

    name = "fcfs"

    def __init__(self, config: SchedulerConfig, playback: PlaybackTracker, timer: StepTimer) -> None:
        self.config = config
        self.playback = playback
        self.timer = timer

    def rank(self, running: list[Request], now: float) -> list[Request]:
        """LM rows in the order they get the step's batch slots and token budget."""
        return list(running)

    def step_cap_s(self, running: list[Request], now: float) -> float:
        """The longest step that keeps the urgent requests on time (inf: no limit)."""
        return math.inf

    def is_optional(self, request: Request, now: float) -> bool:
        """True when the row may be left out of this step if the step would get too long."""
        return False

    def can_admit(self, num_running: int, now: float) -> bool:
        """Whether one more running request keeps the policy's promises (KV is checked separately)."""
        return True

    def reserved_tokens(self, request: Request) -> int:
        """KV positions set aside for a request when it is admitted."""
        return 0

    def victim(self, running: list[Request], now: float) -> Request:
        """The running request to pause when the KV pool runs out."""
        return running[-1]

    def codec_order(self, request_ids: list[str], now: float) -> list[str]:
        """Which requests' ready chunks the codec decodes first."""
        return request_ids


class OfflinePolicy(Policy):
    """Throughput: everything runs, admission reserves each request's expected length so nobody is preempted."""

    name = "offline"

    def reserved_tokens(self, request: Request) -> int:
        return len(request.prompt_token_ids) + request.expected_tokens


class StreamingPolicy(OfflinePolicy):
    name = "streaming"

    def slack_s(self, request: Request, now: float) -> float:
        """Seconds to spare before the request's next chunk is late, at the measured step and codec times."""
        covered, steps = self.playback.plan.next_chunk(request.num_output_tokens)
        if request.num_pending_tokens > 1:  # prefill still to run: count it as one step
            steps += 1
        deadline = self.playback.deadline_s(request.request_id, covered)
        return deadline - now - steps * self.timer.step_s(1) - 2 * self.timer.codec_s

    def _tolerance_s(self, request: Request, now: float) -> float:
        """The longest step time that still gets the request's next chunk out on time."""
        covered, steps = self.playback.plan.next_chunk(request.num_output_tokens)
        deadline = self.playback.deadline_s(request.request_id, covered)
        return (deadline - now - 2 * self.timer.codec_s) / (steps + (request.num_pending_tokens > 1))

    def rank(self, running: list[Request], now: float) -> list[Request]:
        return sorted(running, key=lambda r: self.slack_s(r, now))

    def step_cap_s(self, running: list[Request], now: float) -> float:
        urgent = [r for r in running if not self.is_optional(r, now)]
        if not urgent or not self.timer.has_steps:
            return math.inf
        floor = self.timer.step_s(sum(min(r.num_pending_tokens, 1) for r in urgent))
        return max(floor, min(self._tolerance_s(r, now) for r in urgent))

    def is_optional(self, request: Request, now: float) -> bool:
        return self.slack_s(request, now) >= self.config.urgent_slack_s

    def can_admit(self, num_running: int, now: float) -> bool:
        if num_running == 0 or not self.timer.has_steps:
            return True
        budget = self.playback.plan.realtime_step_s * self.config.realtime_headroom
        return self.timer.step_s(num_running + 1) <= budget

    def victim(self, running: list[Request], now: float) -> Request:
        return max(running, key=lambda r: self.slack_s(r, now))

    def codec_order(self, request_ids: list[str], now: float) -> list[str]:
        return sorted(request_ids, key=self.playback.deadline_s)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Policy, OfflinePolicy, StreamingPolicy)}
