"""The app factory: `create_app` builds the FastAPI app, stores what the routes share on
`app.state`, installs the middleware and error handlers, and includes the routers."""

import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..keptphotos import KeptPhotos
from .auth import API_KEY_ENV
from .autolearn import AutoLearn
from .deps import CpuSlots
from .errors import install_error_handlers
from .holder import EngineHolder, default_home
from .limits import Limits, RequestGate, env_whole_number
from .routes import catalog, catalog_writes, duplicates, images, meta, search
from .thumbnails import ThumbnailCache

CORS_ENV = "LOOKALIKE_CORS_ORIGINS"
KEEP_PHOTOS_ENV = "LOOKALIKE_KEEP_PHOTOS"
CALIBRATE_EVERY_ENV = "LOOKALIKE_CALIBRATE_EVERY"
TUNE_EVERY_ENV = "LOOKALIKE_TUNE_EVERY"


def create_app(
    engine: Any | None = None,
    *,
    home: str | Path | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    model: str | None = None,
    vector_store: str | None = None,
    opener: Callable[..., Any] | None = None,
    cors_origins: Iterable[str] | None = None,
    keep_photos: int | None = None,
    calibrate_every: int | None = None,
    tune_every: int | None = None,
) -> FastAPI:
    """The FastAPI app over `engine`, or over the catalog at `home` (opened in the
    background at startup; /readyz says when it is open). `api_key` defaults to
    $LOOKALIKE_API_KEY; with none, the write endpoints answer 403. `limits` defaults to
    `Limits.from_env()`. `model`/`vector_store` go to `Engine.open`;
    `opener(home) -> engine` replaces `Engine.open` altogether. `cors_origins` (default
    $LOOKALIKE_CORS_ORIGINS, comma-separated; none by default) lets storefront pages on
    those origins call the API from the browser. `keep_photos` (default
    $LOOKALIKE_KEEP_PHOTOS, else 0) keeps up to that many searched photos in
    `<home>/query-photos` for `tune --photos` (`lookalike.keptphotos`); `calibrate_every`
    (default $LOOKALIKE_CALIBRATE_EVERY, else 0) calibrates the home on them again every
    that many new ones, and `tune_every` (default $LOOKALIKE_TUNE_EVERY, else 0) tunes it on
    them (`tune --photos`) every that many (`api.autolearn`)."""
    limits = limits or Limits.from_env()
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if opener is None and (model or vector_store):
        opener = _engine_opener(model, vector_store)
    home_path = Path(home) if home else getattr(engine, "home", None) or default_home()
    holder = EngineHolder(engine, home_path, opener, limits.threads_per_search)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            app.state.auto_learn.close()
            holder.close()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        summary="Visual product search: find the catalog products that look like a photo.",
        description=(
            "Upload a photo to `POST /search`; get the most visually similar catalog products. "
            "Catalog writes need `Authorization: Bearer <LOOKALIKE_API_KEY>`. Errors are JSON "
            '`{"error": <type>, "detail": <message>}`.'
        ),
        lifespan=lifespan,
    )
    app.state.engine_holder = holder
    app.state.limits = limits
    app.state.api_key = api_key.encode("utf-8") if api_key else None
    app.state.cpu = CpuSlots(limits.search_concurrency)
    app.state.thumbnails = ThumbnailCache(limits.thumbnail_cache_bytes)
    kept = KeptPhotos.of_home(home_path, _whole_number(keep_photos, KEEP_PHOTOS_ENV))
    app.state.kept_photos = kept
    app.state.auto_learn = AutoLearn(
        home_path,
        kept,
        calibrate_every=_whole_number(calibrate_every, CALIBRATE_EVERY_ENV),
        tune_every=_whole_number(tune_every, TUNE_EVERY_ENV),
        model=model,
    )
    app.add_middleware(RequestGate, limits=limits, api_key=app.state.api_key)
    _add_cors(app, cors_origins)
    install_error_handlers(app)

    app.include_router(search.make_router(limits))
    app.include_router(catalog.make_router(limits))
    app.include_router(duplicates.make_router(limits))
    app.include_router(images.router)
    app.include_router(catalog_writes.router)
    app.include_router(meta.router)
    app.mount("/static", StaticFiles(directory=meta.WEB_DIR), name="static")
    return app


def _engine_opener(model: str | None, vector_store: str | None) -> Callable[[Path], Any]:
    def opener(path: Path) -> Any:
        from ..engine import Engine

        return Engine.open(path, model=model, vector_store=vector_store)

    return opener


def _whole_number(value: int | None, env: str) -> int:
    """`value`, else the whole number in $`env`, else 0."""
    if value is not None:
        return value
    from_env = env_whole_number(env)
    return 0 if from_env is None else from_env


def _add_cors(app: FastAPI, cors_origins: Iterable[str] | None) -> None:
    """Let pages on `cors_origins` (default $LOOKALIKE_CORS_ORIGINS) call the API."""
    if cors_origins is None:
        cors_origins = os.environ.get(CORS_ENV, "").split(",")
    origins = [o.strip().rstrip("/") for o in cors_origins if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
