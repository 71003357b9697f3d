"""GET /images/{image_id}: catalog images by id (never by a path), whole or as
thumbnails (?size=N) made on demand and cached."""

from enum import IntEnum
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response

from ...errors import LookalikeError
from ...images import probe_image
from ..adapters import locate_image
from ..deps import Cpu, EngineDep, LimitsDep
from ..limits import THUMBNAIL_SIZES
from ..schemas import ERRORS
from ..thumbnails import make_thumbnail

router = APIRouter(tags=["catalog"])

# a small, fixed set of sizes (limits.THUMBNAIL_SIZES), so the cache stays small
ThumbnailSize = IntEnum("ThumbnailSize", {f"px{n}": n for n in THUMBNAIL_SIZES})  # type: ignore[misc]

MEDIA_TYPES = {
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
    ".ppm": "image/x-portable-pixmap",
    ".jp2": "image/jp2",
}


@router.get(
    "/images/{image_id}",
    responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()}}, **ERRORS},
    response_class=Response,
    summary="A catalog image by id; ?size=N (64, 128, 256, 512) for a JPEG thumbnail",
)
async def get_image(
    request: Request,
    engine: EngineDep,
    cpu: Cpu,
    limits: LimitsDep,
    image_id: Annotated[int, PathParam(ge=0, le=2**63 - 1)],
    size: Annotated[
        ThumbnailSize | None,
        Query(description="Longest side of a JPEG thumbnail: 64, 128, 256 or 512"),
    ] = None,
) -> Response:
    path, stat = await run_in_threadpool(locate_image, engine, image_id)
    headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if size is None:
        media = MEDIA_TYPES.get(path.suffix.lower())
        if media is None:  # e.g. an upload stored as <sha>.img by an older lookalike
            media = await run_in_threadpool(sniffed_media_type, path)
        return FileResponse(path, media_type=media, headers=headers)
    thumbs = request.app.state.thumbnails
    key = (image_id, int(size), stat.st_mtime_ns, stat.st_size)
    data = thumbs.get(key)
    if data is None:
        data = await cpu.run(make_thumbnail, path, int(size), limits)
        thumbs.put(key, data)
    return Response(data, media_type="image/jpeg", headers=headers)


def sniffed_media_type(path: Path) -> str:
    """The content type of an image file whose name does not say it, from its header."""
    try:
        suffix = probe_image(path).suffix
    except LookalikeError:
        return "application/octet-stream"
    return MEDIA_TYPES.get(suffix, "application/octet-stream")
