"""The dependencies routes declare: the engine, the URL maker, the CPU slots for heavy
work, and the API key check of the catalog writes. Each reads what `create_app` stored
on `app.state`, so the routers hold no state of their own."""

import functools
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import key_problem
from .limits import Limits


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
    """Catalog writes need `Authorization: Bearer <key>`; with no key configured, 403.
    (`RequestGate` has checked the same before the body was read; this keeps the rule
    on the route, and in OpenAPI, too.)"""
    problem = key_problem(request.app.state.api_key, request.headers.get("authorization"))
    if problem is not None:
        raise problem


EngineDep = Annotated[Any, Depends(get_engine)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
Urls = Annotated[UrlMaker, Depends(urls_for)]
Cpu = Annotated[CpuSlots, Depends(cpu_slots)]
