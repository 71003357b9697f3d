"""What one request may ask of the server (`Limits`), and the middleware that refuses
request bodies over the endpoint's limit before they are parsed."""

import os
from dataclasses import dataclass, fields
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import UsageError
from .errors import RequestTooLargeError, error_body


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
            raw = env.get(f"LOOKALIKE_{f.name.upper()}")
            if raw is None or not raw.strip():
                continue
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise UsageError(
                    f"LOOKALIKE_{f.name.upper()} must be a whole number, not {raw!r}"
                ) from None
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

    def request_bytes(self, path: str, method: str) -> int:
        """The most body bytes a request to `path` may send (multipart overhead included)."""
        slack = 256 * 1024
        if method == "POST" and path.rstrip("/").endswith("/products"):
            return self.max_image_bytes * self.max_images_per_product + slack
        if method in ("POST", "PUT", "PATCH"):
            return self.max_image_bytes + slack
        return slack


class BodyLimitMiddleware:
    """Refuse request bodies over the endpoint's limit with 413, before they are parsed:
    at once when Content-Length says so, else as soon as the streamed bytes pass it."""

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.request_bytes(scope["path"], scope["method"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _send_json(send, 413, _too_large(limit))
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLargeError(_too_large(limit)["detail"])
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLargeError:
            if not started:
                await _send_json(send, 413, _too_large(limit))


def _too_large(limit: int) -> dict[str, Any]:
    return error_body(
        "RequestTooLarge",
        f"request body is larger than this endpoint's limit of {limit:,} bytes",
    )


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = JSONResponse(body).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
