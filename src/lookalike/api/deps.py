"""The dependencies routes declare: the engine, the URL maker, the CPU slots for heavy
work, and the API key check of the catalog writes. Each reads what `create_app` stored
on `app.state`, so the routers hold no state of their own."""

import functools
import hmac
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import AuthError, WritesDisabledError
from .limits import Limits

API_KEY_ENV = "LOOKALIKE_API_KEY"


async def get_engine(request: Request) -> Any:
    return request.app.state.engine_holder.get()


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


class UrlMaker:
    def __init__(self, root_path: str, thumbnail_size: int):
        self.root = root_path.rstrip("/")
        self.size = thumbnail_size

    def thumb(self, image_id: int) -> str:
        return f"{self.root}/images/{int(image_id)}?size={self.size}"

    def full(self, image_id: int) -> str:
        return f"{self.root}/images/{int(image_id)}"


async def urls_for(request: Request) -> UrlMaker:
    return UrlMaker(request.scope.get("root_path", ""), request.app.state.limits.thumbnail_size)


class CpuSlots:
    """Runs CPU-heavy work on a worker thread, at most `size` at once; the rest wait on
    the event loop, holding no thread (so cheap endpoints such as /healthz keep
    answering under a burst)."""

    def __init__(self, size: int):
        self.size = size
        self._limiter: anyio.CapacityLimiter | None = None  # made inside the event loop

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.size)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)


async def cpu_slots(request: Request) -> CpuSlots:
    return request.app.state.cpu


bearer = HTTPBearer(auto_error=False)


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Catalog writes need `Authorization: Bearer <key>`; with no key configured, 403."""
    key_bytes: bytes | None = request.app.state.api_key
    if key_bytes is None:
        raise WritesDisabledError(
            "catalog writes are disabled because no API key is configured: start the"
            f" server with {API_KEY_ENV}=<secret> in its environment and send"
            " 'Authorization: Bearer <secret>'"
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    given = credentials.credentials.encode("utf-8")
    if not hmac.compare_digest(given, key_bytes):
        raise AuthError("wrong API key")


EngineDep = Annotated[Any, Depends(get_engine)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
Urls = Annotated[UrlMaker, Depends(urls_for)]
Cpu = Annotated[CpuSlots, Depends(cpu_slots)]
