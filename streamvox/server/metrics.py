"""Prometheus metrics, served at `GET /metrics` in the text format, every series labelled by the served model.

What clients get is measured where the server hands each piece of audio to its connection, with DESIGN.md §8's
definitions (streamvox.playout): t0 is when the request reached the route. What the engine does (its queue, KV
blocks, LM steps, codec calls, audio made) comes in the step reports it already sends.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match

from streamvox import protocol
from streamvox.playout import Playout

SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
ROUTE_UNMATCHED = "unmatched"  # a path no route serves: one label, whatever the path (bounded cardinality)
PROBES = ("/health", "/ready", "/metrics")  # polled by the platform, not requests: not counted
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _outcome(status: int) -> str:
    if status == 429:
        return "refused"
    if status == 499:
        return "cancelled"
    if status >= 500:
        return "failed"
    return "rejected" if status >= 400 else "completed"


class Metrics:
    def __init__(self, model: str, prebuffer_s: float) -> None:
        self.model = model
        self.prebuffer_s = prebuffer_s
        self.registry = registry = CollectorRegistry()
        model_label = ("model",)
        self.ttfa = Histogram("streamvox_ttfa_seconds", "Time from a request reaching its route to its first audio "
                              "being sent", model_label, buckets=SECONDS_BUCKETS, registry=registry)
        self.chunk_gap = Histogram("streamvox_chunk_gap_seconds", "Time between two pieces of one stream's audio "
                                   "being sent", model_label, buckets=SECONDS_BUCKETS, registry=registry)
        self.late_chunks = Counter("streamvox_late_chunks", "Pieces of audio sent after a client playing from the "
                                   "first piece (with the engine's client prebuffer) ran dry", model_label,
                                   registry=registry)
        self.underrun = Counter("streamvox_underrun_seconds", "Seconds clients playing as audio arrived waited for "
                                "it, summed over streams", model_label, registry=registry)
        self.requests = Counter("streamvox_requests", "Requests by route, final HTTP status (a WebSocket's status "
                                "as its error says) and outcome: completed, rejected (4xx), refused (429), "
                                "cancelled (client gone), failed (5xx, or broken off after audio started)",
                                ("model", "route", "status", "outcome"), registry=registry)
        self.audio = Counter("streamvox_audio_seconds", "Seconds of audio the engine produced", model_label,
                             registry=registry)
        self.queue_depth = Gauge("streamvox_queue_depth", "Requests waiting to start (queued or being prepared)",
                                 model_label, registry=registry)
        self.running = Gauge("streamvox_running_streams", "Requests generating, paused ones included",
                             model_label, registry=registry)
        self.capacity = Gauge("streamvox_capacity_streams", "Streams the engine predicts it keeps ahead of "
                              "playback", model_label, registry=registry)
        self.kv_used = Gauge("streamvox_kv_blocks_used", "KV cache blocks in use", model_label, registry=registry)
        self.kv_free = Gauge("streamvox_kv_blocks_free", "KV cache blocks free", model_label, registry=registry)
        self.lm_batch = Histogram("streamvox_lm_batch_size", "Requests in one LM step", model_label,
                                  buckets=BATCH_BUCKETS, registry=registry)
        self.lm_step = Histogram("streamvox_lm_step_seconds", "Duration of one LM step", model_label,
                                 buckets=STEP_BUCKETS, registry=registry)
        self.codec_batch = Histogram("streamvox_codec_batch_seconds", "Duration of one codec call (a batch of "
                                     "chunks)", model_label, buckets=STEP_BUCKETS, registry=registry)
        self.codec_frames = Histogram("streamvox_codec_batch_frames", "Frames decoded in one codec call",
                                      model_label, buckets=BATCH_BUCKETS, registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_report(self, report: protocol.StepReport, sample_rate: int, stats: protocol.EngineStats) -> None:
        """One engine's report; `stats`: every engine's, added up (the gauges)."""
        model = self.model
        self.queue_depth.labels(model).set(stats.num_waiting)
        self.running.labels(model).set(stats.num_running)
        self.capacity.labels(model).set(stats.capacity)
        self.kv_used.labels(model).set(stats.num_blocks - stats.num_free_blocks)
        self.kv_free.labels(model).set(stats.num_free_blocks)
        for rows, seconds in report.stats.lm_steps:
            self.lm_batch.labels(model).observe(rows)
            self.lm_step.labels(model).observe(seconds)
        for frames, seconds in report.stats.codec_calls:
            self.codec_frames.labels(model).observe(frames)
            self.codec_batch.labels(model).observe(seconds)
        if samples := sum(len(audio.pcm) for audio in report.audio) // 2:
            self.audio.labels(model).inc(samples / sample_rate)

    def count(self, route: str, status: int) -> None:
        self.requests.labels(self.model, route, str(status), _outcome(status)).inc()

    def stream(self, scope: dict) -> StreamMetrics:
        """The metrics of the request or WebSocket session of `scope`, timed from when it reached the server."""
        return StreamMetrics(self, scope.get("state", {}).get("started_s", time.monotonic()))


class StreamMetrics:
    """One request's audio as the server sends it: TTFA, gaps, late pieces and underrun."""

    def __init__(self, metrics: Metrics, started_s: float) -> None:
        self.metrics = metrics
        self.started_s = started_s
        self.playout = Playout(metrics.prebuffer_s)
        self._last_s: float | None = None

    def sent(self, num_samples: int, sample_rate: int) -> None:
        """A piece of `num_samples` samples of audio is being sent now."""
        if not num_samples:
            return
        now, metrics, model = time.monotonic(), self.metrics, self.metrics.model
        if self._last_s is None:
            metrics.ttfa.labels(model).observe(now - self.started_s)
        else:
            metrics.chunk_gap.labels(model).observe(now - self._last_s)
        self._last_s = now
        num_late = self.playout.num_late
        if added := self.playout.add(now, num_samples / sample_rate):
            metrics.underrun.labels(model).inc(added)
        if self.playout.num_late > num_late:
            metrics.late_chunks.labels(model).inc()


class RequestCounter:
    """Counts every HTTP request and WebSocket session but the probes by route and final status (plain ASGI). A
    handler that knows better than the response status (a stream broken off after its 200, a WebSocket's error)
    says so in `scope["state"]["status"]`; `scope["state"]["started_s"]` is when the request arrived."""

    def __init__(self, app, metrics: Metrics, routes: list) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # every route, to name the route of a request answered before routing (401, 413)

    def _route(self, scope) -> str:
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if hasattr(r, "path") and r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or ROUTE_UNMATCHED

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status = 0
        scope.setdefault("state", {})["started_s"] = time.monotonic()

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "websocket.accept":
                status = status or 200
            elif message["type"] == "websocket.close":
                status = status or (200 if message.get("code", 1000) == 1000 else 400)
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except BaseException:
            status = 500
            raise
        finally:
            route = self._route(scope)
            status = scope.get("state", {}).get("status") or status or 499  # nothing sent: the client left
            if route not in PROBES:
                self.metrics.count(route, status)
