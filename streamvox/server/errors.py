"""The one error type of the HTTP API, rendered in OpenAI's error shape, and the engine's failures as statuses."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from streamvox import protocol

STATUS = {protocol.Failure.BAD_REQUEST: 400, protocol.Failure.CLIENT_TOO_SLOW: 408,
          protocol.Failure.AT_CAPACITY: 429, protocol.Failure.ENGINE_ERROR: 500, protocol.Failure.UNAVAILABLE: 503}

_TYPES = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}  # others: by class


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}  # more response headers (a 405's Allow)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s if retry_after_s is not None else (5 if status in (429, 503) else None)


def from_failure(failed: protocol.Failed) -> ApiError:
    """The HTTP error for a request the engine failed; a 429 says when to retry (whole seconds, at least 1)."""
    retry_after_s = max(1, math.ceil(min(failed.retry_after_s, 3600.0))) if failed.retry_after_s > 0 else None
    return ApiError(STATUS[failed.failure], failed.message, retry_after_s=retry_after_s)


class ErrorDetail(BaseModel):
    message: str  # what went wrong and what to change
    type: str
    param: str | None = None  # the request field at fault, if one is
    code: int  # the HTTP status


class ErrorBody(BaseModel):
    """Every error the API answers with, in OpenAI's shape."""

    error: ErrorDetail


_DESCRIPTIONS = {400: "a field is out of range or does not fit the served model; the message says what to change",
                 401: "no valid API key", 404: "no such stored voice", 409: "the name is taken",
                 413: "the body or its reference audio is too large", 422: "the body does not parse: wrong types",
                 429: "at capacity: retry after Retry-After seconds", 500: "the request failed in the engine",
                 503: "the engine is starting or restarting: retry after Retry-After seconds"}


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` declaring the error statuses a route answers with."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


ROUTE_ERRORS = error_responses(400, 413, 422, 429, 500, 503)  # of a route that takes a request to speak


def error_body(error: ApiError) -> dict:
    kind = _TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.status}}


def error_response(error: ApiError) -> JSONResponse:
    retry = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else {}
    headers = {**error.headers, **retry}
    return JSONResponse(error_body(error), status_code=error.status, headers=headers or None)
