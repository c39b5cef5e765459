"""The HTTP API server (FastAPI, no torch): OpenAI and VoxServe routes in front of the engine process.

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and a client's mistake is
always a 4xx that says what to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from streamvox.config import EngineConfig, ServerConfig
from streamvox.engine.client import EngineUnavailableError
from streamvox.engine.pool import EnginePool
from streamvox.server import openai, realtime, voices, voxserve
from streamvox.server.auth import ApiKeyAuth, configured_keys
from streamvox.server.errors import ApiError, error_response
from streamvox.server.metrics import CONTENT_TYPE, Metrics, RequestCounter
from streamvox.server.voice_store import VoiceStore, data_dir

logger = logging.getLogger("streamvox.server")
PLAYGROUND = Path(__file__).with_name("playground.html")  # a static page, no build step, nothing from a CDN


def create_app(engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    client = EnginePool(engine_config, server_config.data_parallel, server_config.data_parallel_routing,
                        hang_timeout_s=server_config.engine_hang_timeout_s, max_unread_s=server_config.max_unread_s,
                        reader_timeout_s=server_config.reader_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        yield
        await client.stop()

    app = FastAPI(title="streamvox", lifespan=lifespan)
    app.state.engine = client
    app.state.config = server_config
    app.state.model_name = server_config.served_model_name or os.path.basename(engine_config.model.rstrip("/"))
    app.state.model_aliases = {app.state.model_name, engine_config.model}
    app.state.voice_aliases = voices.parse_aliases(server_config.voice_aliases)
    store_name = re.sub(r"[^A-Za-z0-9_.-]", "_", app.state.model_name)
    app.state.voice_store = VoiceStore(data_dir(server_config.data_dir) / "voices" / store_name)
    app.state.metrics = metrics = Metrics(app.state.model_name, engine_config.scheduler.client_prebuffer_s)
    client.on_report = lambda report: metrics.observe_report(report, client.info.sample_rate if client.info else 1,
                                                             client.stats)
    app.include_router(openai.router)
    app.include_router(voxserve.router)
    app.include_router(realtime.router)

    # outermost last: the counter sees every answer; CORS answers preflights, which bear no key
    app.add_middleware(BodySizeLimit, limit_bytes=int(server_config.max_upload_mb * 2**20) + 64 * 1024)
    app.add_middleware(ApiKeyAuth, keys=configured_keys(server_config.api_keys))
    if server_config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After", "X-Finish-Reason"])
    routes = [*openai.router.routes, *voxserve.router.routes, *realtime.router.routes, *app.router.routes]
    app.add_middleware(RequestCounter, metrics=metrics, routes=routes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(EngineUnavailableError)
    async def unavailable(request: Request, error: EngineUnavailableError):
        return error_response(ApiError(503, str(error), retry_after_s=error.retry_after_s))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()
        )
        return error_response(ApiError(422, f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(ApiError(error.status_code, str(error.detail), headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(error).__name__}; the server logged the details"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/ready")
    async def ready():
        body = {"ready": client.is_ready, "status": client.status, "restarts": client.num_restarts,
                "engine_pid": client.engine_pid, "open_streams": client.num_open_streams,
                "policy": client.info.policy if client.info is not None else None,
                "engine": msgspec.structs.asdict(client.stats) if client.stats is not None else None,
                "engines": client.describe()}
        if client.is_ready:
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    return app


class BodySizeLimit:
    """Refuses a request whose declared body is over the limit with 413, before reading it. Plain ASGI (not
    BaseHTTPMiddleware, which would end a failing stream cleanly and hide the error from the client)."""

    def __init__(self, app, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit_bytes:
            message = f"request body is {int(length)} bytes; the limit is {self.limit_bytes}"
            await error_response(ApiError(413, message))(scope, receive, send)
            return
        received, is_over, is_started = 0, False, False

        async def counting_receive():  # a body sent without a length (chunked) is counted as it arrives
            nonlocal received, is_over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit_bytes:
                is_over = True
                return {"type": "http.disconnect"}  # the app stops reading; the 413 is sent below
            return message

        async def tracking_send(message):
            nonlocal is_started
            if not is_over:  # once over the limit, whatever the app answers is replaced by the 413
                is_started |= message["type"] == "http.response.start"
                await send(message)

        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, counting_receive, tracking_send)
        if is_over and not is_started:
            message = f"request body is over the limit of {self.limit_bytes} bytes"
            await error_response(ApiError(413, message))(scope, receive, send)
