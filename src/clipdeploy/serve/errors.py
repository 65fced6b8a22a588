"""The server's errors, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause is an ``APIError`` with a 4xx status and a message that names the
problem and the fix; anything else becomes one 500 in the same shape, and the server keeps serving.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client; ``status`` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="too_large")


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, type="server_overloaded", code="queue_full",
                    headers={"Retry-After": str(retry_after)})  # fmt: skip
