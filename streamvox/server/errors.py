"""The one error type of the HTTP API, rendered in OpenAI's error shape."""

from __future__ import annotations

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s if retry_after_s is not None else (5 if status in (429, 503) else None)


def error_body(error: ApiError) -> dict:
    kind = _TYPES.get(error.status, "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.status}}
