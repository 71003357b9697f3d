"""`serve`: the API and the search page under uvicorn, as `lookalike serve` runs them,
with the connection limits a server facing the internet needs (`uvicorn_options`): a
bounded number of connections, a keep-alive timeout, and a deadline for the request
headers (`HeaderTimeoutProtocol`; the body's deadline is `RequestGate`'s)."""

import asyncio
import json
from pathlib import Path
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .errors import error_body
from .limits import Limits

_TIMEOUT_BODY = json.dumps(
    error_body("RequestTimeout", "the request headers did not arrive in time")
).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers: a client that
    opens a connection (or starts a new request on a kept-alive one) and does not finish
    its headers within `header_timeout` seconds gets a 408 and the connection is closed.
    uvicorn alone waits for such a client forever."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # nothing of ours half-sent: say why
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """The uvicorn settings that bound what slow or many clients can hold."""
    return {
        "http": protocol_with_header_timeout(limits.header_timeout),
        "limit_concurrency": limits.max_connections or None,
        "timeout_keep_alive": limits.keep_alive_timeout,
        "server_header": False,
        "timeout_graceful_shutdown": 5,
    }


def serve(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model: str | None = None,
    vector_store: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
    access_log: bool = True,
    keep_photos: int | None = None,
    calibrate_every: int | None = None,
    tune_every: int | None = None,
) -> None:
    """Run the API and page under uvicorn until interrupted. `api_key` defaults to
    $LOOKALIKE_API_KEY (writes are refused without one); limits default to the
    LOOKALIKE_* environment (see `Limits`)."""
    import uvicorn

    limits = limits or Limits.from_env()
    app = create_app(
        home=home,
        api_key=api_key,
        limits=limits,
        model=model,
        vector_store=vector_store,
        keep_photos=keep_photos,
        calibrate_every=calibrate_every,
        tune_every=tune_every,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        log_config=log_config(),
        **uvicorn_options(limits),
    )


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with lookalike's own messages (`lookalike.*` loggers: the
    engine opening, automatic calibrations) at INFO on the same stream and format."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["lookalike"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
