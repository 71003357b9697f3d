"""The product ranking API and the search page: what `lookalike serve` runs.

`create_app(engine=None, *, home=None, api_key=None, limits=Limits())` builds the FastAPI
app; `serve(home, host, port, ...)` runs it under uvicorn. OpenAPI lives at /docs.

- POST /search                      query photo (+ crop box, filters, k) -> ranked products
- GET  /products/{id}/similar        "more like this" from the product's own image(s)
- GET  /products, /products/{id}     browse the catalog
- POST /products, PATCH/DELETE /products/{id}
                                     catalog writes; need `Authorization: Bearer KEY`
                                     (KEY from LOOKALIKE_API_KEY); refused when no key is set
- GET  /images/{image_id}[?size=N]   catalog images by id (never by a path), thumbnails
- GET  /categories                   category names and counts (the page's filter)
- GET  /healthz, /readyz             process up / model loaded and catalog open
- GET  /                             the search page (src/lookalike/web/)

Every error a client can cause is a 4xx with {"error": <type>, "detail": <message>}.
Engine calls that burn CPU (decode, encode, search, thumbnails) run on worker threads,
never on the event loop; at most `Limits.max_concurrent_searches` of them run at once,
each with its share of the cores, and the rest queue on the event loop, so a burst of
clients waits in line instead of oversubscribing the cores.
"""

import argparse
import functools
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .catalog import Filters
from .errors import ImageTooLargeError, LookalikeError, UnknownImageError, UsageError
from .images import load_image

log = logging.getLogger("lookalike.api")

WEB_DIR = Path(__file__).parent / "web"
API_KEY_ENV = "LOOKALIKE_API_KEY"
CORS_ENV = "LOOKALIKE_CORS_ORIGINS"
ATTR_PREFIX = "attr."
"""Attribute equality filters are fields/query parameters named `attr.<name>`."""


# --------------------------------------------------------------------------- limits


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


# --------------------------------------------------------------------------- errors


class NotReadyError(LookalikeError):
    """The engine is still loading (or failed to load); retry later."""

    http_status = 503


class AuthError(LookalikeError):
    """Missing or wrong API key."""

    http_status = 401


class WritesDisabledError(LookalikeError):
    """No API key is configured, so catalog writes are refused."""

    http_status = 403


class RequestTooLargeError(ImageTooLargeError):
    """The request body is larger than the limit for this endpoint."""


def error_body(error: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, **extra}


_STATUS_NAMES = {
    400: "BadRequest",
    401: "AuthError",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LookalikeError)
    async def lookalike_error(request: Request, exc: LookalikeError) -> JSONResponse:
        status = int(getattr(exc, "http_status", 400))
        if status >= 500 and not isinstance(exc, NotReadyError):
            log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        headers: dict[str, str] = {}
        if isinstance(exc, AuthError):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, NotReadyError):
            headers["Retry-After"] = "2"
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [
                str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")
            ]
            problems.append({"field": ".".join(loc) or None, "message": str(err.get("msg", ""))})
        detail = "; ".join(
            f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems
        )
        return JSONResponse(
            error_body("ValidationError", detail or "invalid request", errors=problems), 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        name = _STATUS_NAMES.get(exc.status_code, "HTTPError")
        return JSONResponse(
            error_body(name, detail), exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("InternalError", "internal server error; the server log has details"), 500
        )


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


# --------------------------------------------------------------------------- models


class SearchResult(BaseModel):
    product_id: str
    score: float = Field(description="Cosine similarity of the best-matching product image")
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool | None = None
    image_id: int = Field(description="The product image that matched best")
    image_url: str = Field(description="Thumbnail of that image, sized for result grids")
    full_image_url: str
    attributes: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float = Field(description="Server time for this request, decode to ranking")


class ProductImage(BaseModel):
    image_id: int
    image_url: str
    full_image_url: str


class ProductOut(BaseModel):
    product_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool
    attributes: dict[str, Any] = Field(default_factory=dict)
    images: list[ProductImage] = Field(default_factory=list)


class ProductPage(BaseModel):
    products: list[ProductOut]
    total: int
    limit: int
    offset: int


class ProductPatch(BaseModel):
    """Fields to change; omitted fields stay. Attribute changes merge into the existing
    attributes; an attribute set to null is removed."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    category: str | None = None
    price: float | None = Field(default=None, ge=0)
    in_stock: bool | None = None
    attributes: dict[str, str | int | float | bool | None] | None = None


class Category(BaseModel):
    name: str
    count: int


class CategoryList(BaseModel):
    categories: list[Category]


class Health(BaseModel):
    status: str
    version: str = __version__


class Readiness(BaseModel):
    status: str
    products: int | None = None
    images: int | None = None
    model: str | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 413, 415, 422, 503)
}


# --------------------------------------------------------------------------- engine


class EngineHolder:
    """Owns the engine for the app: given one (tests, embedding), or opened from `home`
    on a background thread at startup so /healthz answers while the model loads."""

    def __init__(
        self,
        engine: Any | None,
        home: Path | None,
        opener: Callable[..., Any] | None,
        threads: int | None = None,
    ):
        self.threads = threads
        self.engine = engine
        self.home = home
        self.owned = engine is None
        self.error: str | None = None
        self._opener = opener
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        if engine is not None:
            self._ready.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.engine is not None:  # given: usable at once, warmed in the background
            target = self._warm_given
        else:
            target = self._open
        self._thread = threading.Thread(target=target, name="lookalike-open", daemon=True)
        self._thread.start()

    def _warm_given(self) -> None:
        try:
            warm_up(self.engine, self.threads)
        except Exception:  # the real calls will report it
            log.exception("warming up the engine failed")

    def _open(self) -> None:
        try:
            opener = self._opener
            if opener is None:
                from .engine import Engine

                opener = Engine.open
            started = time.perf_counter()
            engine = opener(self.home)
            warm_up(engine, self.threads)
            self.engine = engine
            log.info("engine ready in %.1fs (home %s)", time.perf_counter() - started, self.home)
        except Exception as exc:  # reported by /readyz and every engine call
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot open the catalog at %s", self.home)
        finally:
            self._ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the engine is open (or failed to open) and warmed up."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._ready.wait(timeout)

    def get(self) -> Any:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise NotReadyError(f"the catalog could not be opened: {self.error}")
        raise NotReadyError("the model and catalog are still loading; retry in a moment")

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=60)  # never close an engine that is still opening
        if self.owned and self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None


def warm_up(engine: Any, threads: int | None = None) -> None:
    """Load the model and the vector store, set the encoder up for serving, and run one
    query through it, so the first real search is as fast as the rest."""
    _ = engine.store
    if threads is not None:
        tune_encoder_for_serving(engine.encoder, threads)
    engine.embed_queries([Image.new("RGB", (64, 64), "white")])


def tune_encoder_for_serving(encoder: Any, threads: int) -> bool:
    """Give the encoder's ONNX Runtime session `threads` intra-op threads that do not
    spin-wait. A one-off CLI search wants every core on one image; a server runs several
    searches at once, and the spinning threads of one then steal the cores the others
    need (docs/api.md: about half the latency with searches side by side). Returns
    whether it was done (encoders without `set_threads` are left as they are)."""
    target, set_threads = encoder, None
    for _ in range(5):  # quality and tuned encoders wrap the ONNX one as `.base`
        set_threads = getattr(target, "set_threads", None)
        if set_threads is not None:
            break
        target = getattr(target, "base", None)
        if target is None:
            return False
    if set_threads is None:
        return False
    try:
        set_threads(threads, spinning=False)
    except Exception:  # keep the working session
        log.exception("could not resize the encoder's session for serving")
        return False
    log.info("encoder: %d intra-op thread(s) per search, no spin-wait", threads)
    return True


def _default_home() -> Path:
    return Path(os.environ.get("LOOKALIKE_HOME", "lookalike-home"))


# --------------------------------------------------------------------------- helpers


def parse_crop(
    crop: str | None, x: float | None, y: float | None, w: float | None, h: float | None
) -> tuple[int, int, int, int] | None:
    """The crop box (x, y, w, h) from `crop="x,y,w,h"` or the four separate fields."""
    parts = [x, y, w, h]
    if crop is not None and crop.strip():
        if any(p is not None for p in parts):
            raise UsageError("give the crop box either as crop=x,y,w,h or as x, y, w, h, not both")
        pieces = [p.strip() for p in crop.split(",")]
        if len(pieces) != 4:
            raise UsageError(f"crop must be four numbers x,y,w,h, not {crop!r}")
        try:
            parts = [float(p) for p in pieces]
        except ValueError:
            raise UsageError(f"crop must be four numbers x,y,w,h, not {crop!r}") from None
    elif all(p is None for p in parts):
        return None
    elif any(p is None for p in parts):
        raise UsageError("a crop box needs all four of x, y, w and h")
    values = [float(p) for p in parts]  # type: ignore[arg-type]
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise UsageError("crop values must be finite numbers")
    bx, by, bw, bh = values
    if bw <= 0 or bh <= 0:
        raise UsageError(f"crop width and height must be positive, not {bw:g}x{bh:g}")
    if bx < 0 or by < 0:
        raise UsageError(f"crop x and y must be >= 0, not {bx:g},{by:g}")
    return round(bx), round(by), max(1, round(bw)), max(1, round(bh))


def crop_image(
    img: Image.Image, box: tuple[int, int, int, int], full_size: tuple[int, int] | None = None
) -> Image.Image:
    """`img` cut to `box` (x, y, w, h in its pixels), clipped to the image; a box that
    leaves fewer than 2x2 pixels inside the image is an error. `full_size` names the
    photo's size in messages when `img` was decoded reduced."""
    x, y, w, h = box
    width, height = img.size
    left, top = min(x, width), min(y, height)
    right, bottom = min(x + w, width), min(y + h, height)
    if right - left < 2 or bottom - top < 2:
        fw, fh = full_size or img.size
        raise UsageError(
            f"the crop box lies outside the {fw}x{fh} image, or leaves less than 2x2 pixels"
            " of it (x,y,w,h are in the uploaded image's pixels)"
        )
    return img.crop((left, top, right, bottom))


def load_query_image(
    data: bytes, box: tuple[int, int, int, int] | None, input_size: int, limits: Limits
) -> Image.Image:
    """Decode an uploaded query photo (cut to `box`, given in the photo's own upright
    pixels) at no more resolution than the encoder can use: a JPEG is decoded at 1/2, 1/4
    or 1/8 scale while the part that is searched keeps >= 2x the model's input size."""
    want = 2 * input_size
    full = _upright_size(data)
    draft = want
    if box is not None and full is not None:
        draft = max(want, math.ceil(want * min(full) / max(1, min(box[2], box[3]))))
    img = load_image(
        data,
        max_pixels=limits.max_image_pixels,
        max_bytes=limits.max_image_bytes,
        draft_size=draft,
    )
    if box is None:
        return img
    full = full or img.size
    scale = max(img.size) / max(full)  # draft scales both sides by the same power of 2
    if scale != 1.0:
        box = (
            math.floor(box[0] * scale),
            math.floor(box[1] * scale),
            math.ceil(box[2] * scale),
            math.ceil(box[3] * scale),
        )
    return crop_image(img, box, full)


def _upright_size(data: bytes) -> tuple[int, int] | None:
    """The photo's (width, height) after EXIF rotation, from its header alone."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            orientation = probe.getexif().get(0x0112, 1)
    except Exception:  # load_image reports undecodable input properly
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _input_size(engine: Any) -> int:
    try:
        return int(engine.encoder.input_size)
    except Exception:
        return 256


def attribute_filters(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """`attr.<name>=<value>` fields -> {name: value}."""
    attrs: dict[str, str] = {}
    for key, value in items:
        if not key.startswith(ATTR_PREFIX):
            continue
        name = key[len(ATTR_PREFIX) :]
        if not isinstance(value, str):
            raise UsageError(f"filter {key} must be text, not a file")
        if not name:
            raise UsageError("attribute filter needs a name: attr.<name>=<value>")
        attrs[name] = value
    return attrs


def parse_attributes(text: str | None) -> dict[str, Any]:
    """The `attributes` form field: a JSON object of text, number or true/false values."""
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"attributes must be a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError('attributes must be a JSON object such as {"colour": "Red"}')
    for key, value in data.items():
        if not isinstance(value, str | int | float | bool) or not key:
            raise UsageError(f"attribute {key!r} must have a text, number or true/false value")
    return data


def make_filters(
    category: str | Sequence[str] | None,
    price_min: float | None,
    price_max: float | None,
    in_stock: bool | None,
    attrs: dict[str, str],
) -> Filters | None:
    if category is not None and not isinstance(category, str):
        category = [c for c in category if c] or None
        if category is not None and len(category) == 1:
            category = category[0]
    filters = Filters(
        category=category or None,
        price_min=price_min,
        price_max=price_max,
        in_stock=in_stock,
        attrs=attrs,
    )
    filters.validate()  # bad combinations are 422s, before any CPU is spent
    return None if filters.is_empty() else filters


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class UrlMaker:
    def __init__(self, root_path: str, thumbnail_size: int):
        self.root = root_path.rstrip("/")
        self.size = thumbnail_size

    def thumb(self, image_id: int) -> str:
        return f"{self.root}/images/{int(image_id)}?size={self.size}"

    def full(self, image_id: int) -> str:
        return f"{self.root}/images/{int(image_id)}"


def result_out(result: Any, urls: UrlMaker) -> SearchResult:
    image_id = int(_get(result, "image_id"))
    return SearchResult(
        product_id=str(_get(result, "product_id")),
        score=float(_get(result, "score")),
        title=_get(result, "title"),
        category=_get(result, "category"),
        price=_get(result, "price"),
        in_stock=_get(result, "in_stock"),
        image_id=image_id,
        image_url=urls.thumb(image_id),
        full_image_url=urls.full(image_id),
        attributes=dict(_get(result, "attributes") or {}),
    )


def product_out(product: Any, image_ids: list[int], urls: UrlMaker) -> ProductOut:
    data = product.to_dict() if hasattr(product, "to_dict") else dict(product)
    return ProductOut(
        product_id=str(data["product_id"]),
        title=data.get("title"),
        category=data.get("category"),
        price=data.get("price"),
        in_stock=bool(data.get("in_stock", True)),
        attributes=dict(data.get("attributes") or {}),
        images=[
            ProductImage(image_id=i, image_url=urls.thumb(i), full_image_url=urls.full(i))
            for i in image_ids
        ],
    )


class ThumbnailCache:
    """Small LRU of encoded thumbnails keyed by (image_id, size, file mtime)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def make_thumbnail(path: Path, size: int, limits: Limits) -> bytes:
    img = load_image(path, max_pixels=limits.max_image_pixels, draft_size=size)
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


_MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
    ".heif": "image/heif",
    ".avif": "image/avif",
}

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# --------------------------------------------------------------------------- the app


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
) -> FastAPI:
    """The FastAPI app over `engine`, or over the catalog at `home` (opened in the
    background at startup; /readyz says when it is open). `api_key` defaults to
    $LOOKALIKE_API_KEY; with none, the write endpoints answer 403. `limits` defaults to
    `Limits.from_env()`. `model`/`vector_store` go to `Engine.open`;
    `opener(home) -> engine` replaces `Engine.open` altogether. `cors_origins` (default
    $LOOKALIKE_CORS_ORIGINS, comma-separated; none by default) lets storefront pages on
    those origins call the API from the browser."""
    limits = limits or Limits.from_env()
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    key_bytes = api_key.encode("utf-8") if api_key else None
    if opener is None and (model or vector_store):

        def opener(path: Path) -> Any:
            from .engine import Engine

            return Engine.open(path, model=model, vector_store=vector_store)

    holder = EngineHolder(
        engine, Path(home) if home else _default_home(), opener, limits.threads_per_search
    )
    cpu: list[anyio.CapacityLimiter] = []  # made on first use, inside the event loop
    thumbs = ThumbnailCache()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start()
        try:
            yield
        finally:
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
    app.add_middleware(BodyLimitMiddleware, limits=limits)
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
    _install_error_handlers(app)

    # -- dependencies ----------------------------------------------------------------
    async def get_engine() -> Any:
        return holder.get()

    bearer = HTTPBearer(auto_error=False)

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
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

    async def urls_for(request: Request) -> UrlMaker:
        return UrlMaker(request.scope.get("root_path", ""), limits.thumbnail_size)

    EngineDep = Annotated[Any, Depends(get_engine)]
    Urls = Annotated[UrlMaker, Depends(urls_for)]

    async def run_cpu(fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-heavy work on a worker thread, at most `search_concurrency` at once;
        the rest wait on the event loop, holding no thread (so cheap endpoints such as
        /healthz keep answering under a burst)."""
        if not cpu:
            cpu.append(anyio.CapacityLimiter(limits.search_concurrency))
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=cpu[0])

    def product_payload(engine: Any, product_id: str, urls: UrlMaker) -> ProductOut:
        product = engine.get_product(product_id)
        images = _get(product, "images")
        if images is None:
            images = _image_ids_of(engine, product_id)
        return product_out(product, [_get(i, "image_id", i) for i in images], urls)

    # -- search ----------------------------------------------------------------------
    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        tags=["search"],
        summary="Products that look like the uploaded photo",
    )
    async def search(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        image: Annotated[UploadFile, File(description="The query photo")],
        k: Annotated[int, Form(ge=1, le=limits.max_k)] = 10,
        category: Annotated[
            list[str] | None, Form(description="Repeat for any of several categories")
        ] = None,
        price_min: Annotated[float | None, Form(ge=0)] = None,
        price_max: Annotated[float | None, Form(ge=0)] = None,
        in_stock: Annotated[bool | None, Form()] = None,
        min_score: Annotated[float | None, Form(ge=-1, le=1)] = None,
        crop: Annotated[
            str | None, Form(description="Crop box 'x,y,w,h' in query-image pixels")
        ] = None,
        x: Annotated[float | None, Form()] = None,
        y: Annotated[float | None, Form()] = None,
        w: Annotated[float | None, Form()] = None,
        h: Annotated[float | None, Form()] = None,
    ) -> SearchResponse:
        """Attribute equality filters: extra form fields `attr.<name>=<value>`
        (e.g. `attr.colour=Black`)."""
        started = time.perf_counter()
        form = await request.form()
        filters = make_filters(
            category, price_min, price_max, in_stock, attribute_filters(form.multi_items())
        )
        box = parse_crop(crop, x, y, w, h)
        data = await _read_upload(image, limits.max_image_bytes)

        def work() -> list[Any]:
            try:
                img = load_query_image(data, box, _input_size(engine), limits)
            except LookalikeError as exc:
                raise _named(exc, image.filename) from None
            return engine.search([img], k=k, filters=filters, min_score=min_score)[0]

        results = await run_cpu(work)
        return SearchResponse(
            results=[result_out(r, urls) for r in results],
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    @app.get(
        "/products/{product_id}/similar",
        response_model=SearchResponse,
        responses=ERRORS,
        tags=["search"],
        summary="More like this: products that look like this product",
    )
    async def similar(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        product_id: str,
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        category: Annotated[
            list[str] | None, Query(description="Repeat for any of several categories")
        ] = None,
        price_min: Annotated[float | None, Query(ge=0)] = None,
        price_max: Annotated[float | None, Query(ge=0)] = None,
        in_stock: bool | None = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
    ) -> SearchResponse:
        """Attribute equality filters: query parameters `attr.<name>=<value>`."""
        started = time.perf_counter()
        filters = make_filters(
            category,
            price_min,
            price_max,
            in_stock,
            attribute_filters(request.query_params.multi_items()),
        )
        results = await run_cpu(_similar, engine, product_id, k, filters, min_score)
        return SearchResponse(
            results=[result_out(r, urls) for r in results],
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    # -- catalog reads ----------------------------------------------------------------
    @app.get("/products", response_model=ProductPage, responses=ERRORS, tags=["catalog"])
    def list_products(
        engine: EngineDep,
        urls: Urls,
        category: str | None = None,
        in_stock: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=limits.max_page_size)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> ProductPage:
        listed = engine.list_products(
            category=category or None, in_stock=in_stock, limit=limit, offset=offset
        )
        if isinstance(listed, tuple):
            products, total = listed
        else:
            products, total = list(listed), None
        out = [product_out(p, _image_ids_of(engine, p.product_id), urls) for p in products]
        return ProductPage(
            products=out,
            total=total if total is not None else offset + len(out),
            limit=limit,
            offset=offset,
        )

    @app.get(
        "/products/{product_id}", response_model=ProductOut, responses=ERRORS, tags=["catalog"]
    )
    def get_product(engine: EngineDep, urls: Urls, product_id: str) -> ProductOut:
        return product_payload(engine, product_id, urls)

    @app.get("/categories", response_model=CategoryList, tags=["catalog"])
    def categories(engine: EngineDep) -> CategoryList:
        return CategoryList(categories=[Category(name=n, count=c) for n, c in _categories(engine)])

    @app.get(
        "/images/{image_id}",
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        response_class=Response,
        tags=["catalog"],
        summary="A catalog image by id; ?size=N for a JPEG thumbnail (longest side N)",
    )
    async def get_image(
        engine: EngineDep,
        image_id: Annotated[int, PathParam(ge=0, le=2**63 - 1)],
        size: Annotated[int | None, Query(ge=16, le=1024)] = None,
    ) -> Response:
        path, stat = await run_in_threadpool(_locate_image, engine, image_id)
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size is None:
            media = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
            return FileResponse(path, media_type=media, headers=headers)
        key = (image_id, size, stat.st_mtime_ns, stat.st_size)
        data = thumbs.get(key)
        if data is None:
            data = await run_cpu(make_thumbnail, path, size, limits)
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers=headers)

    # -- catalog writes ---------------------------------------------------------------
    @app.post(
        "/products",
        status_code=201,
        response_model=ProductOut,
        responses=ERRORS,
        tags=["catalog writes"],
        dependencies=[Depends(require_key)],
        summary="Add a product (or add images to an existing one) with its image(s)",
    )
    async def add_product(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        product_id: Annotated[str, Form(min_length=1, max_length=200)],
        images: Annotated[list[UploadFile], File(description="One or more product images")],
        title: Annotated[str | None, Form()] = None,
        category: Annotated[str | None, Form()] = None,
        price: Annotated[float | None, Form(ge=0)] = None,
        in_stock: Annotated[bool, Form()] = True,
        attributes: Annotated[
            str | None, Form(description='JSON object of attributes, e.g. {"colour": "Red"}')
        ] = None,
    ) -> JSONResponse:
        """Attributes: a JSON object in `attributes`, and/or form fields
        `attr.<name>=<value>`. The product is searchable as soon as this returns."""
        form = await request.form()
        attributes_ = parse_attributes(attributes)
        attributes_.update(attribute_filters(form.multi_items()))
        if len(images) > limits.max_images_per_product:
            raise UsageError(
                f"{len(images)} images; at most {limits.max_images_per_product} per request"
            )
        blobs = [await _read_upload(f, limits.max_image_bytes) for f in images]
        fields_ = {
            "product_id": product_id.strip(),
            "title": title,
            "category": category,
            "price": price,
            "in_stock": in_stock,
            "attributes": attributes_,
        }

        def work() -> ProductOut:
            # decode every upload first: a bad file is refused before the catalog changes
            for number, (blob, upload) in enumerate(zip(blobs, images, strict=True), start=1):
                try:
                    load_image(
                        blob, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
                    )
                except LookalikeError as exc:
                    raise _named(exc, f"image {number} ({upload.filename or 'upload'})") from None
            engine.add_product(fields_, blobs)
            return product_payload(engine, fields_["product_id"], urls)

        product = await run_cpu(work)
        return JSONResponse(
            product.model_dump(),
            status_code=201,
            headers={"Location": f"{urls.root}/products/{product.product_id}"},
        )

    @app.patch(
        "/products/{product_id}",
        response_model=ProductOut,
        responses=ERRORS,
        tags=["catalog writes"],
        dependencies=[Depends(require_key)],
    )
    def update_product(
        engine: EngineDep, urls: Urls, product_id: str, patch: ProductPatch
    ) -> ProductOut:
        changes = patch.model_dump(exclude_unset=True)
        if not changes:
            raise UsageError(
                "nothing to change: send a JSON object with title, category, price,"
                " in_stock and/or attributes"
            )
        if "in_stock" in changes and changes["in_stock"] is None:
            raise UsageError("in_stock must be true or false")
        engine.update_product(product_id, changes)
        return product_payload(engine, product_id, urls)

    @app.delete(
        "/products/{product_id}",
        status_code=204,
        response_class=Response,
        responses=ERRORS,
        tags=["catalog writes"],
        dependencies=[Depends(require_key)],
    )
    def delete_product(engine: EngineDep, product_id: str) -> Response:
        engine.get_product(product_id)  # 404 for an unknown id
        engine.remove([product_id])
        return Response(status_code=204)

    # -- health -----------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["health"]
    )
    def readyz() -> Any:
        if holder.engine is None:
            status = "failed" if holder.error else "loading"
            return JSONResponse(
                Readiness(status=status, detail=holder.error).model_dump(), status_code=503
            )
        info = _info(holder.engine)
        return Readiness(
            status="ready",
            products=info.get("products"),
            images=info.get("images"),
            model=info.get("model"),
        )

    # -- the page ---------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _named(exc: LookalikeError, name: str | None) -> LookalikeError:
    """The same error with the upload's file name instead of the word "upload"."""
    text = str(exc)
    if name and text.startswith("upload:"):
        text = f"{name}:{text[len('upload:') :]}"
    elif name:
        text = f"{name}: {text}"
    return type(exc)(text)


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise ImageTooLargeError(
            f"{name}: {upload.size:,} bytes, more than the limit of {max_bytes:,} bytes"
        )
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than the limit of {max_bytes:,} bytes")
    return data


# Thin adapters over the engine: one place to follow its API.


def _similar(
    engine: Any, product_id: str, k: int, filters: Filters | None, min_score: float | None
) -> list[Any]:
    results = engine.similar(product_id, k=k, filters=filters)
    if min_score is not None:
        results = [r for r in results if _get(r, "score") >= min_score]
    return results


def _image_ids_of(engine: Any, product_id: str) -> list[int]:
    catalog = getattr(engine, "catalog", None)
    if catalog is not None and hasattr(catalog, "images_of"):
        return [row.image_id for row in catalog.images_of(product_id)]
    return []


def _locate_image(engine: Any, image_id: int) -> tuple[Path, os.stat_result]:
    path = _image_path(engine, image_id)
    try:
        return path, path.stat()
    except OSError:
        message = f"image {image_id} is in the catalog but its file is gone"
        raise UnknownImageError(message) from None


def _image_path(engine: Any, image_id: int) -> Path:
    try:
        path = engine.image_path(image_id)
    except LookalikeError:
        path = None
    if path is None:
        raise UnknownImageError(f"unknown image id: {image_id}")
    return Path(path)


def _categories(engine: Any) -> list[tuple[str, int]]:
    catalog = getattr(engine, "catalog", None)
    if catalog is not None and hasattr(catalog, "categories"):
        return list(catalog.categories())
    return []


def _info(engine: Any) -> dict[str, Any]:
    try:
        info = engine.info()
    except Exception:  # readiness must not fail on a reporting detail
        log.exception("engine.info() failed")
        return {}
    return info if isinstance(info, dict) else {}


# --------------------------------------------------------------------------- serving


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
) -> None:
    """Run the API and page under uvicorn until interrupted. `api_key` defaults to
    $LOOKALIKE_API_KEY (writes are refused without one); limits default to the
    LOOKALIKE_* environment (see `Limits`)."""
    import uvicorn

    app = create_app(
        home=home, api_key=api_key, limits=limits, model=model, vector_store=vector_store
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=5,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m lookalike.api --home DIR --port N`: the same server as `lookalike serve`."""
    parser = argparse.ArgumentParser(prog="python -m lookalike.api", description=main.__doc__)
    parser.add_argument("--home", type=Path, default=_default_home())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(
        args.home,
        args.host,
        args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )


if __name__ == "__main__":
    main()
