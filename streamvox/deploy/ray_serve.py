"""Ray Serve: replicas that each run an engine behind the same HTTP API as `streamvox serve`.

    serve run streamvox.deploy.ray_serve:build model=DIR num_replicas=2        # the command line
    serve.run(streamvox.deploy.ray_serve.application(engine_config, server_config, num_replicas=2))  # Python

`build` takes any field of EngineConfig, SchedulerConfig, CacheConfig or ServerConfig by name (`max_queue_wait_s=5`,
`data_parallel=2`, `served_model_name=orpheus`), plus the deployment's own: `num_replicas`, or `min_replicas` and
`max_replicas` to autoscale on `target_streams` ongoing streams per replica; `max_streams` (the most a replica
holds at once: Ray's `max_ongoing_requests`); `replica_cpus`, `replica_gpus`.

Each replica is the server's FastAPI app (OpenAI route, /generate, the WebSocket, models, voices, health, ready,
metrics) with its own engine processes; it joins the router only once its engine is ready. Ray Serve's router
ranks replicas by the streams each one's engines predict they can still take (reported every second; ongoing
requests break ties), and never sends a replica more than `max_streams`. A replica whose engine is full answers
429 with Retry-After, as the server does, and is ranked last until it has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from streamvox.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from streamvox.server.app import create_app

logger = logging.getLogger("streamvox.deploy")
READY_TIMEOUT_S = 600.0
STATS_PERIOD_S = 1.0


class HeadroomRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: replicas ranked by the streams they can still take (as each last reported, less
    what this router sent it since); within a rank Ray's router picks the one with the fewest ongoing requests,
    and skips one at `max_streams`."""

    def initialize_state(self, **kwargs) -> None:
        self._sent: dict[Any, tuple[float, int]] = {}  # replica id -> (its stats' time, requests sent since)

    def _free(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats
        at, sent = self._sent.get(replica.replica_id, (None, 0))
        return int(stats.get("free_streams", 0)) - (sent if at == stats.get("at") else 0)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ranks: dict[int, list[RunningReplica]] = {}
        for replica in candidate_replicas:
            ranks.setdefault(max(0, self._free(replica)), []).append(replica)
        return [ranks[free] for free in sorted(ranks, reverse=True)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        replica = self._replicas.get(replica_id)
        at = replica.routing_stats.get("at") if replica is not None else None
        last_at, sent = self._sent.get(replica_id, (None, 0))
        self._sent[replica_id] = (at, sent + 1 if last_at == at else 1)


@serve.ingress()
class SpeechReplica:
    """One replica: the API server's app, with its engines, in a Ray actor."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        self.engine_config = engine_config
        self.server_config = server_config
        self._speech_app = None

    def __serve_build_asgi_app__(self):
        self._speech_app = create_app(self.engine_config, self.server_config)
        started = self._speech_app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def until_ready(app):  # the replica is up (and routed to) once its engine is ready
            async with started(app) as state:
                engines = app.state.engine
                for _ in range(int(READY_TIMEOUT_S / 0.1)):
                    if engines.is_ready or engines.status == "failed":
                        break
                    await asyncio.sleep(0.1)
                if not engines.is_ready:
                    raise RuntimeError(f"the engine did not become ready (it is {engines.status})")
                yield state

        self._speech_app.router.lifespan_context = until_ready
        return self._speech_app

    def record_routing_stats(self) -> dict[str, Any]:
        engines = self._speech_app.state.engine if self._speech_app is not None else None
        return {"free_streams": engines.free_streams if engines is not None else 0, "at": time.monotonic()}

    def check_health(self) -> None:
        if self._speech_app is not None and self._speech_app.state.engine.status == "failed":
            raise RuntimeError("the engine could not start")


def application(engine_config: EngineConfig, server_config: ServerConfig, num_replicas: int = 1,
                min_replicas: int | None = None, max_replicas: int | None = None, target_streams: float = 4.0,
                max_streams: int = 64, replica_cpus: float = 1.0, replica_gpus: float = 0.0):
    """The Ray Serve application (pass it to `serve.run`): `num_replicas` fixed, or autoscaled between
    `min_replicas` and `max_replicas` to keep `target_streams` ongoing streams per replica."""
    scaling: dict[str, Any] = {"num_replicas": num_replicas}
    if max_replicas is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=min_replicas if min_replicas is not None else 1, max_replicas=max_replicas,
            target_ongoing_requests=target_streams)}
    deployment = serve.deployment(SpeechReplica).options(
        name="streamvox", max_ongoing_requests=max_streams, ray_actor_options={
            "num_cpus": replica_cpus, "num_gpus": replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=HeadroomRouter,
                                                  request_routing_stats_period_s=STATS_PERIOD_S),
        health_check_period_s=5, **scaling)
    return deployment.bind(engine_config, server_config)


DEPLOYMENT_OPTIONS = {"num_replicas": int, "min_replicas": int, "max_replicas": int, "target_streams": float,
                      "max_streams": int, "replica_cpus": float, "replica_gpus": float}


def build(args: dict[str, str]):
    """`serve run streamvox.deploy.ray_serve:build key=value ...`: see the module's docstring."""
    args = dict(args)
    deployment = {name: kind(args.pop(name)) for name, kind in DEPLOYMENT_OPTIONS.items() if name in args}
    scheduler = _fields(SchedulerConfig, args)
    cache = _fields(CacheConfig, args)
    server = _fields(ServerConfig, args)
    engine = _fields(EngineConfig, args, scheduler=scheduler, cache=cache)
    if args:
        raise ValueError(f"unknown options {sorted(args)}: use fields of the engine, scheduler, cache or server "
                         f"configs, or {', '.join(DEPLOYMENT_OPTIONS)}")
    scheduler.validate()
    return application(engine, server, **deployment)


def _fields(config_type: type, args: dict[str, Any], **given):
    """`config_type` from the entries of `args` named like its fields (taken out of `args`), typed as the fields'
    defaults are."""
    values = dict(given)
    for field in dataclasses.fields(config_type):
        if field.name in args and field.name not in given:
            values[field.name] = _typed(args.pop(field.name), field.default)
    return config_type(**values)


def _typed(value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{value!r} is not true or false")
        return value.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(item for item in value.split(",") if item)
    return type(default)(value) if default is not None else value
