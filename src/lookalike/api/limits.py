"""What one request may ask of the server (`Limits`), and the middleware that checks a
request before any work is done on it (`RequestGate`: the key of a write before its
body is read; body size and body speed)."""

import os
import time
from dataclasses import dataclass, fields
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import UsageError
from .auth import is_write, key_problem
from .errors import AuthError, error_body


def env_whole_number(name: str, environ: Any = None) -> int | None:
    """The whole number in environment variable `name` (of `environ`, default os.environ),
    None when it is unset or blank; UsageError when it is not a whole number."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Every field can be set from the
    environment as LOOKALIKE_<FIELD NAME IN CAPITALS> (see `Limits.from_env`)."""

    max_image_bytes: int = 20 * 1024 * 1024
    """One uploaded image (query or product image)."""
    max_image_pixels: int = 50_000_000
    """Width x height of one uploaded image, checked before decoding (bombs)."""
    max_images_per_product: int = 10
    max_k: int = 100
    max_page_size: int = 500
    thumbnail_size: int = 256
    """Longest side of the thumbnails result grids get (image_url in results)."""
    max_json_bytes: int = 64 * 1024
    """A JSON request body (PATCH /products/{id})."""
    max_connections: int = 256
    """Open connections plus running requests; beyond it the server answers 503."""
    header_timeout: int = 10
    """Seconds a client may take to send a request's headers; then the connection closes."""
    body_timeout: int = 30
    """Seconds a request body may take on top of its size at `min_body_rate`; then 408."""
    min_body_rate: int = 64 * 1024
    """Bytes per second a slow upload must keep up (20 MB: 30 s + 320 s at most)."""
    keep_alive_timeout: int = 5
    """Seconds an idle keep-alive connection stays open."""
    thumbnail_cache_bytes: int = 64 * 1024 * 1024
    """Memory the cache of encoded thumbnails may use."""
    max_concurrent_searches: int = 0
    """CPU-heavy calls (decode + encode + search) running at once; 0 = number of cores."""
    encoder_threads: int = 0
    """ONNX Runtime intra-op threads per search: 0 = cores / max_concurrent_searches, so
    the concurrent searches together use every core once (without spin-waiting);
    -1 = keep the engine's own session settings."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Limits":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = env_whole_number(f"LOOKALIKE_{f.name.upper()}", env)
            if value is not None:
                values[f.name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def search_concurrency(self) -> int:
        return self.max_concurrent_searches or _cores()

    @property
    def threads_per_search(self) -> int | None:
        if self.encoder_threads < 0:
            return None
        return self.encoder_threads or max(1, _cores() // self.search_concurrency)

    def __post_init__(self) -> None:
        if self.thumbnail_size not in THUMBNAIL_SIZES:
            sizes = ", ".join(map(str, THUMBNAIL_SIZES))
            raise UsageError(f"thumbnail_size must be one of {sizes}, not {self.thumbnail_size}")
        for f in fields(self):
            if getattr(self, f.name) < (-1 if f.name == "encoder_threads" else 0):
                raise UsageError(f"LOOKALIKE_{f.name.upper()} must not be negative")

    def request_bytes(self, path: str, method: str) -> int:
        """The most body bytes a request to `path` may send (multipart overhead included)."""
        slack = 256 * 1024
        if method == "POST" and path.rstrip("/") == "/products":
            return self.max_image_bytes * self.max_images_per_product + slack
        if method == "POST" and path.rstrip("/") == "/search":
            return self.max_image_bytes + slack
        if method in ("POST", "PUT", "PATCH"):
            return self.max_json_bytes
        return slack


THUMBNAIL_SIZES = (64, 128, 256, 512)
"""The thumbnail sizes GET /images/{id}?size=N makes (a fixed set keeps the cache small)."""


class _BodyRefused(Exception):
    """Raised into the app from `receive` when the body is over its limit or too slow."""


class RequestGate:
    """ASGI middleware: the checks that must come before any work on a request.

    - a catalog write without the right API key is refused (401/403) before one byte
      of its body is read;
    - a body over the endpoint's limit is refused with 413: at once when Content-Length
      says so, else as soon as the streamed (chunked) bytes pass it;
    - a body that arrives slower than `Limits.min_body_rate` after `Limits.body_timeout`
      seconds is refused with 408.
    Whatever the app answers after a refused body (FastAPI turns a failed body read into
    a 400) is replaced by that 413/408, and the connection is closed."""

    def __init__(self, app: ASGIApp, limits: Limits, api_key: bytes | None):
        self.app = app
        self.limits = limits
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = _route_path(scope), scope["method"]
        headers = {name: value for name, value in scope.get("headers", ())}
        if is_write(method, path):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            problem = key_problem(self.api_key, auth)
            if problem is not None:
                extra = [(b"www-authenticate", b"Bearer")] if isinstance(problem, AuthError) else []
                body = error_body(type(problem).__name__, str(problem))
                await _send_json(send, problem.http_status, body, extra)
                return
        limit = self.limits.request_bytes(path, method)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await _send_json(send, 413, _too_large(limit))
            return
        await self._pass_on(scope, receive, send, limit)

    async def _pass_on(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        started = complete = False
        refusal: tuple[int, dict[str, Any]] | None = None
        began = time.monotonic()
        grace, rate = self.limits.body_timeout, max(1, self.limits.min_body_rate)

        async def guarded_receive() -> Message:
            nonlocal received, refusal, complete
            if complete:  # e.g. a streaming response waiting for the client to leave
                return await receive()
            left = began + grace + received / rate - time.monotonic()
            try:
                with anyio.fail_after(max(left, 0.001)):
                    message = await receive()
            except TimeoutError:
                refusal = (408, _too_slow(grace, rate))
                raise _BodyRefused() from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = (413, _too_large(limit))
                    raise _BodyRefused()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the app's answer to a refused body; ours goes instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await _send_json(send, *refusal)


def _route_path(scope: Scope) -> str:
    """The request path without the app's root path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _too_slow(grace: int, rate: int) -> dict[str, Any]:
    return error_body(
        "RequestTimeout",
        f"the request body arrived too slowly (allowed: {grace} s plus 1 s per {rate:,} bytes)",
    )


def _too_large(limit: int) -> dict[str, Any]:
    return error_body(
        "RequestTooLarge",
        f"request body is larger than this endpoint's limit of {limit:,} bytes",
    )


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = JSONResponse(body).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
