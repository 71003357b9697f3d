"""GET /duplicates: groups of catalog images that are the same photo under different
products (lookalike.duplicates), a page of groups at a time. The same path is the review
page for a browser: a request that accepts HTML (a browser navigating there) gets the
page, which fetches the JSON from the same path."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ..deps import Cpu, EngineDep, UrlMaker, Urls
from ..limits import Limits
from ..schemas import ERRORS, DuplicateGroupOut, DuplicateImageOut, DuplicatePage
from .meta import PAGE_HEADERS, WEB_DIR


def group_out(group: Any, urls: UrlMaker) -> DuplicateGroupOut:
    """A duplicates group for the API: the image's URL where the CLI prints its path."""
    return DuplicateGroupOut(
        score=round(float(group.score), 4),
        images=[
            DuplicateImageOut(
                product_id=image.product_id,
                image=urls.full(image.image_id),
                image_id=image.image_id,
            )
            for image in group.images
        ],
    )


def make_router(limits: Limits) -> APIRouter:
    router = APIRouter(tags=["catalog"])

    @router.get(
        "/duplicates",
        response_model=DuplicatePage,
        responses=ERRORS,
        summary="Groups of catalog images that are the same photo under different products",
    )
    async def duplicates(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        threshold: Annotated[float | None, Query(ge=-1, le=1)] = None,
        within_products: bool = False,
        limit: Annotated[int, Query(ge=1, le=limits.max_page_size)] = 20,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> Any:
        """The first request scans the catalog (candidates from the stored vectors, each
        verified on pixels); the report is kept until the catalog changes, so the next
        pages come at once. `threshold`: the verified score a pair needs (default: the
        measured one, docs/duplicates.md)."""
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(WEB_DIR / "duplicates.html", headers=PAGE_HEADERS)
        report = await cpu.run(engine.duplicates, threshold, within_products)
        page = report.groups[offset : offset + limit]
        return DuplicatePage(
            groups=[group_out(g, urls) for g in page],
            total=len(report.groups),
            limit=limit,
            offset=offset,
            threshold=report.threshold,
            images=report.images,
        )

    return router
