"""Errors a request can cause, answered with OpenAI's error object and an HTTP status."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A 4xx answer: ``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API sends it."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class QueueFull(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the server is busy: {limit} requests are already running or waiting (--max-batch plus "
                         "--max-queue); retry later", status=429, code="queue_full", type="rate_limit_exceeded")


class ShuttingDown(RequestError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down", status=503, code="shutting_down", type="server_error")
