"""Several engine processes behind one API server (`--data-parallel N`), routed by load.

Each new request goes to the ready engine with the most headroom by its own admission model. Its headroom is
the streams it predicts it can keep ahead of playback (from its measured step and codec costs) less the streams
it holds. Among engines with room, the one with the largest share of its capacity free goes first (load spreads),
then the free share of the KV cache and the last step time break ties. An engine that predicts it cannot keep
even one stream gets none while another can. An engine that refuses a request for capacity
before accepting it hands it to the next engine in that order; when every engine refused, the request fails
with the soonest `retry_after_s` any of them gave. Once accepted (or once its audio started), a request stays on
its engine. Each engine is an `EngineClient`, supervised on its own: one that dies fails only its own streams and
is restarted while the others serve. `routing="round-robin"` sends each request to the next engine in turn and
takes its answer, whatever it is (the load-blind way, kept for comparison).

With several GPUs, engine i sees only the i-th (modulo their number) through CUDA_VISIBLE_DEVICES; on a CPU they
share the cores, each taking its share of threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from streamvox import protocol
from streamvox.config import EngineConfig
from streamvox.engine.client import EngineClient, EngineUnavailableError, RequestStream

logger = logging.getLogger("streamvox.server")
ROUTINGS = ("load", "round-robin")


@dataclass
class PoolStream:
    """A request as the pool routes it: which engine holds it, and what to send again if that one refuses."""

    request_id: str
    engine: EngineClient
    inner: RequestStream
    untried: list[EngineClient]
    submit: dict | None  # EngineClient.open's arguments, until an engine accepts the request
    soonest_retry_s: float | None = None  # the smallest retry_after_s of the engines that refused it


class EnginePool:
    """The server's engines, with EngineClient's interface for the routes."""

    def __init__(self, config: EngineConfig, num_engines: int = 1, routing: str = "load", **client_options) -> None:
        if num_engines < 1:
            raise ValueError(f"--data-parallel must be at least 1, not {num_engines}")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTINGS)}")
        if num_engines > 1 and not config.num_threads and config.device in ("auto", "cpu"):
            config = dataclasses.replace(config, num_threads=max(1, (os.cpu_count() or 2) // (2 * num_engines)))
        devices = _gpu_ids() if num_engines > 1 and config.device in ("auto", "cuda") else []
        warn_if_shared(num_engines, devices)
        self.engines = [
            EngineClient(config, rank=rank, env={"CUDA_VISIBLE_DEVICES": devices[rank % len(devices)]}
                         if devices else None, **client_options)
            for rank in range(num_engines)
        ]
        self.routing = routing
        self._turn = itertools.cycle(self.engines)
        self._streams: dict[str, PoolStream] = {}
        self.on_report: Callable[[protocol.StepReport], None] | None = None
        for engine in self.engines:
            engine.on_report = self._on_report

    # -- what the routes and /ready read -------------------------------------------------------------------

    @property
    def info(self) -> protocol.EngineReady | None:
        return next((engine.info for engine in self.engines if engine.info is not None), None)

    @property
    def is_ready(self) -> bool:
        """Every engine has started once, and one at least is ready now (the others may be restarting)."""
        return all(engine.info is not None for engine in self.engines) and any(e.is_ready for e in self.engines)

    @property
    def status(self) -> str:
        statuses = {engine.status for engine in self.engines}
        if len(statuses) == 1:
            return statuses.pop()
        return "degraded" if "ready" in statuses else "starting"

    @property
    def num_restarts(self) -> int:
        return sum(engine.num_restarts for engine in self.engines)

    @property
    def engine_pid(self) -> int | None:
        return self.engines[0].engine_pid

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def stats(self) -> protocol.EngineStats | None:
        """All engines' stats added up (the longest last step)."""
        known = [engine.stats for engine in self.engines if engine.stats is not None]
        if not known:
            return None
        summed = {name: sum(getattr(s, name) for s in known) for name in
                  ("num_requests", "num_waiting", "num_running", "num_held", "capacity", "num_free_blocks",
                   "num_blocks", "batch_size")}
        return protocol.EngineStats(**summed, step_s=max(s.step_s for s in known))

    @property
    def free_streams(self) -> int:
        """Streams the ready engines predict they can still take (what a replica tells Ray Serve's router)."""
        return sum(max(0, free_streams(engine)) for engine in self.engines if engine.is_ready)

    def describe(self) -> list[dict]:
        """Each engine as /ready shows it."""
        return [{"rank": engine.rank, "status": engine.status, "pid": engine.engine_pid,
                 "restarts": engine.num_restarts, "open_streams": engine.num_open_streams,
                 "headroom": free_streams(engine) if engine.stats is not None else None,
                 "engine": _stats(engine.stats)} for engine in self.engines]

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()

    async def stop(self) -> None:
        await asyncio.gather(*(engine.stop() for engine in self.engines))

    # -- requests ------------------------------------------------------------------------------------------

    def open(self, request_id: str, text: str, voice: str | None, sampling: protocol.SamplingOverrides,
             text_complete: bool = True, **extra) -> PoolStream:
        """EngineClient.open on the engine with the most headroom (or the next in turn)."""
        order = self._order()
        if not order:
            raise EngineUnavailableError(f"the engine is {self.status}; retry shortly")
        submit = dict(request_id=request_id, text=text, voice=voice, sampling=sampling, text_complete=text_complete,
                      **extra)
        engine, untried = order[0], order[1:] if self.routing == "load" else []
        stream = PoolStream(request_id, engine, engine.open(**submit), untried, submit)
        self._streams[request_id] = stream
        return stream

    def _order(self) -> list[EngineClient]:
        ready = [engine for engine in self.engines if engine.is_ready]
        if self.routing == "round-robin":
            for _ in self.engines:
                engine = next(self._turn)
                if engine.is_ready:
                    return [engine]
            return []
        # an engine whose model says it cannot keep even one stream would start one and let it stall: better
        # another, or a 429, unless every engine says so
        able = [engine for engine in ready if engine.stats is None or engine.stats.capacity > 0]
        return sorted(able or ready, key=headroom, reverse=True)

    def append_text(self, request_id: str, text: str, is_final: bool) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if stream.submit is not None:  # not yet accepted: another engine may have to start it again
            stream.submit["text"] += text
            stream.submit["text_complete"] = is_final
        stream.engine.append_text(request_id, text, is_final)

    async def take(self, stream: PoolStream) -> protocol.Accepted | protocol.Audio | protocol.Finished | \
            protocol.Failed:
        while True:
            message = await stream.engine.take(stream.inner)
            if isinstance(message, protocol.Failed) and message.failure is protocol.Failure.AT_CAPACITY and \
                    stream.submit is not None:
                stream.soonest_retry_s = min(message.retry_after_s, stream.soonest_retry_s or math.inf)
                untried = [engine for engine in stream.untried if engine.is_ready]
                if untried:
                    stream.engine, stream.untried = untried[0], untried[1:]
                    stream.inner = stream.engine.open(**stream.submit)
                    continue
                message = msgspec.structs.replace(message, retry_after_s=stream.soonest_retry_s)
            if isinstance(message, protocol.Accepted | protocol.Audio):
                stream.submit = None
            if isinstance(message, protocol.Failed) or (isinstance(message, protocol.Audio) and message.is_last):
                self._streams.pop(stream.request_id, None)  # nothing more comes for it (its engine forgot it too)
            return message

    def close(self, request_id: str, cancel: bool) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.engine.close(request_id, cancel)

    def _on_report(self, report: protocol.StepReport) -> None:
        if self.on_report is not None:
            self.on_report(report)


def free_streams(engine: EngineClient) -> int:
    """Streams the engine predicts it can still take: its capacity less the streams it holds."""
    stats = engine.stats
    if stats is None:
        return 0
    return stats.capacity - max(engine.num_open_streams, stats.num_requests)


def headroom(engine: EngineClient) -> tuple[float, ...]:
    """The routing order's key, larger first: whether it has room at all; then the share of its capacity still
    free (so that load spreads over the engines with room, even when an idle engine's capacity is still its
    warm-up's cautious estimate and a busy one's is measured); then the free streams, the free share of its KV
    cache and minus its last step time."""
    stats = engine.stats
    if stats is None:
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    free = free_streams(engine)
    return (float(free > 0), free / max(1, stats.capacity), free, stats.num_free_blocks / max(1, stats.num_blocks),
            -stats.step_s)


def _stats(stats: protocol.EngineStats | None) -> dict | None:
    if stats is None:
        return None
    return {name: getattr(stats, name) for name in stats.__struct_fields__ if name not in ("lm_steps", "codec_calls")}


def warn_if_shared(num_engines: int, devices: list[str]) -> None:
    """Log a warning when engines would share a device (the CPU when `devices` is empty, else those GPUs)."""
    if num_engines > max(1, len(devices)):
        logger.warning("%d engines share %s: each admits streams by its own load only, so near capacity the "
                       "admitted streams may stall; run one engine per device", num_engines,
                       f"{len(devices)} GPUs" if devices else "one device")


def _gpu_ids() -> list[str]:
    """The GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]
