"""Connection-level guards below the ASGI app: a deadline for request headers and a cap on open connections.

uvicorn's h11 protocol waits forever for the rest of a request's headers (a slow-loris client holds its
connection, and a file descriptor, as long as it likes) and accepts every connection. `guarded_protocol`
returns a subclass that closes a connection whose headers are not complete `header_timeout_s` after it
connected or after the first byte of its next request, and answers 503 and closes a connection beyond
`max_connections`. Request bodies have their own deadline in the app (`GuardMiddleware`).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from hyperowl.serve.errors import ApiError

_BUSY_BODY = json.dumps(ApiError(503, "too many open connections", type="server_overloaded", code="max_connections").body()).encode()

#: What a connection beyond the limit is told before it is closed.
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\n"
    + f"content-length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An `H11Protocol` subclass with a header deadline and a connection cap (pass it as uvicorn's `http`)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still reading a request's headers
                if self._header_timer is None:
                    self._arm_header_timer()
            else:
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # idle between requests: uvicorn's keep-alive timeout applies until the next request's first byte
            self._disarm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
