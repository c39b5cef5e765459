"""The codec beside the LM: chunks the scheduler planned are decoded on their own thread, a batch at a time.

At most BATCHES_IN_FLIGHT batches are dispatched: one decoding and one waiting behind it, so the codec thread goes
from one to the next without waiting for the step loop. A batch waits behind another only when it is full: a call
costs much the same for one frame as for several (on a CPU, 8 frames cost 4x one), so frames made while a batch
decodes are better decoded together once it is done than one call each. A batch that raises is decoded again
chunk by chunk, so only the chunks that still raise fail (their requests, not the engine). Codec time and the
thread's busy share are measured here and fed to the step timer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from streamvox.batch import AudioChunk
from streamvox.runner.codec_runner import CodecRunner, PendingChunk
from streamvox.sched.timing import StepTimer

logger = logging.getLogger(__name__)
BATCHES_IN_FLIGHT = 2
CALLS_KEPT = 1024  # recent calls kept for the metrics, which take them at every report


@dataclass
class _Batch:
    future: Future  # -> (list[np.ndarray | Exception] one per pending chunk, codec seconds)
    pending: list[PendingChunk]
    started_s: float


class CodecPipeline:
    def __init__(self, runner: CodecRunner, timer: StepTimer, max_frames: int) -> None:
        self.runner = runner
        # frames decoded in one call, at most: the budget over what the model declares a frame costs
        self.max_frames = runner.plan.frames_per_call(max_frames)
        self.timer = timer
        self.busy_s = 0.0  # total codec time since start
        self.calls: deque[tuple[int, float]] = deque(maxlen=CALLS_KEPT)  # (frames, seconds) of recent calls
        self.before_decode: Callable[[list[PendingChunk]], None] | None = None  # fault injection; may raise
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self._batches: deque[_Batch] = deque()  # dispatched, in order

    @property
    def is_busy(self) -> bool:
        return bool(self._batches)

    def in_flight_ids(self) -> set[str]:
        return {chunk.request_id for batch in self._batches for chunk in batch.pending}

    def ready(self) -> list[tuple[str, int, bool]]:
        """(request_id, frames ready, is_complete) of the requests with a chunk ready, when a batch can be
        dispatched (the codec is idle, or they fill a batch to wait behind the one decoding); else nothing."""
        if len(self._batches) >= BATCHES_IN_FLIGHT:
            return []
        ready = self.runner.ready()
        if self._batches and sum(num_frames for _, num_frames, _ in ready) < self.max_frames:
            return []
        return ready

    def dispatch(self, request_ids: tuple[str, ...]) -> None:
        """Decode the next chunk of each request, in this order, as one batch of at most `max_frames` frames."""
        if not request_ids:
            return
        pending = self.runner.take_ready(list(request_ids), self.max_frames)
        future = self._thread.submit(self._decode_isolated, pending)
        self._batches.append(_Batch(future, pending, time.perf_counter()))

    def collect(self, wait: bool) -> tuple[list[AudioChunk], list[tuple[str, str]]]:
        """Chunks of every finished batch (with `wait`, of the oldest one at least), and (request_id, message) of
        every chunk that failed; the runner has forgotten the failed requests."""
        chunks, failures = [], []
        while self._batches and (wait or self._batches[0].future.done()):
            batch = self._batches.popleft()
            results, busy_s = batch.future.result()
            self.timer.observe_codec(time.perf_counter() - batch.started_s)
            rereads = (sum(p.rereads[0] for p in batch.pending), sum(p.rereads[1] for p in batch.pending))
            num_frames = sum(p.end_frame - p.start_frame for p in batch.pending)
            self.timer.observe_codec_frames(num_frames, busy_s, rereads)
            self.calls.append((num_frames, busy_s))
            good = [(p, r) for p, r in zip(batch.pending, results, strict=True) if not isinstance(r, Exception)]
            for chunk, result in zip(batch.pending, results, strict=True):
                if isinstance(result, Exception):
                    self.runner.fail(chunk.request_id)
                    failures.append((chunk.request_id, f"audio decoding failed: {result}"))
            chunks += self.runner.complete([p for p, _ in good], [r for _, r in good])
            self.busy_s += busy_s
            wait = False
        return chunks, failures

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _decode_isolated(self, pending: list[PendingChunk]) -> tuple[list[np.ndarray | Exception], float]:
        """Codec thread: decode the batch; if it raises, decode chunk by chunk so only the bad ones fail. Returns
        the results and the seconds it took."""
        started = time.perf_counter()
        try:
            return self._decode(pending), time.perf_counter() - started
        except Exception:
            logger.exception("codec batch failed; retrying its %d chunks one by one", len(pending))
        results: list[np.ndarray | Exception] = []
        for chunk in pending:
            try:
                results.extend(self._decode([chunk]))
            except Exception as error:  # noqa: BLE001 - the request fails, the engine goes on
                results.append(error)
        return results, time.perf_counter() - started

    def _decode(self, pending: list[PendingChunk]) -> list[np.ndarray]:
        if self.before_decode is not None:
            self.before_decode(pending)
        with torch.inference_mode():
            return self.runner.decode(pending)
