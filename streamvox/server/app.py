"""The HTTP API server (FastAPI, no torch): OpenAI and VoxServe routes in front of the engine process.

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and a client's mistake is
always a 4xx that says what to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from streamvox.config import EngineConfig, ServerConfig
from streamvox.engine.client import EngineClient, EngineUnavailableError
from streamvox.server import openai, realtime, voxserve
from streamvox.server.errors import ApiError, error_body

logger = logging.getLogger("streamvox.server")


def create_app(engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    client = EngineClient(engine_config, server_config.engine_hang_timeout_s, server_config.max_unread_s,
                          server_config.reader_timeout_s)

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
    app.include_router(openai.router)
    app.include_router(voxserve.router)
    app.include_router(realtime.router)

    app.add_middleware(BodySizeLimit, limit_bytes=int(server_config.max_upload_mb * 2**20) + 64 * 1024)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(EngineUnavailableError)
    async def unavailable(request: Request, error: EngineUnavailableError):
        return _error(ApiError(503, str(error), retry_after_s=error.retry_after_s))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()
        )
        return _error(ApiError(422, f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(ApiError(error.status_code, str(error.detail), headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(ApiError(500, f"internal error: {type(error).__name__}; the server logged the details"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": client.is_ready, "status": client.status, "restarts": client.num_restarts,
                "engine_pid": client.engine_pid, "open_streams": client.num_open_streams,
                "policy": client.info.policy if client.info is not None else None,
                "engine": msgspec.structs.asdict(client.stats) if client.stats is not None else None}
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
            await _error(ApiError(413, message))(scope, receive, send)
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
            await _error(ApiError(413, message))(scope, receive, send)


SEND_BUFFER_BYTES = 64 * 1024  # about 1.4 s of 24 kHz int16 audio: a fast link still moves megabytes a second


def small_send_buffer_protocol() -> type:
    """uvicorn's HTTP protocol with a small kernel send buffer on each connection, so that a client that stops
    reading blocks the server's writes within a second or two of audio (the pacing in EngineClient measures
    those writes) instead of after megabytes of an auto-tuned buffer."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SmallSendBuffer(H11Protocol):
        def connection_made(self, transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            super().connection_made(transport)

    return SmallSendBuffer


def _error(error: ApiError) -> JSONResponse:
    retry = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else {}
    headers = {**error.headers, **retry}
    return JSONResponse(error_body(error), status_code=error.status, headers=headers or None)
