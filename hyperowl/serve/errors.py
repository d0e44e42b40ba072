"""Errors the API answers with, in OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP error answer. `code` is a short machine-readable name (for limits: the limit's name)."""

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
        """The JSON body of the answer."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def limit_error(message: str, limit: str, param: str | None = None, status: int = 400) -> ApiError:
    """A request that exceeds the configured limit `limit` (its settings name, also used as `code`)."""
    return ApiError(status, f"{message} (limit {limit})", param=param, code=limit)


def overloaded(message: str, code: str) -> ApiError:
    """503: the server cannot take the request now; clients may retry after a second."""
    return ApiError(503, message, type="server_overloaded", code=code, headers={"Retry-After": "1"})
