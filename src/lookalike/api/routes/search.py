"""POST /search (products that look like an uploaded photo, refined by words `q`, or
words alone), GET /search?q= (words alone) and GET /products/{id}/similar ("more like
this")."""

import hashlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError

from ...catalog import Filters
from ...errors import LookalikeError
from ...fusion import TEXT_WEIGHT, SearchReport
from ..adapters import result_out, similar_products
from ..deps import Cpu, EngineDep, UrlMaker, Urls
from ..limits import Limits
from ..params import attribute_filters, make_filters
from ..schemas import ERRORS, SearchResponse
from ..uploads import encoder_input_size, load_query_image, parse_crop, read_upload, with_file_name


def query_filters(
    request: Request,
    category: Annotated[
        list[str] | None, Query(description="Repeat for any of several categories")
    ] = None,
    price_min: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
    price_max: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
    in_stock: bool | None = None,
) -> Filters | None:
    """The filters of a GET search (`attr.<name>=<value>` parameters included)."""
    attrs = attribute_filters(request.query_params.multi_items())
    return make_filters(category, price_min, price_max, in_stock, attrs)


QueryFilters = Annotated[Filters | None, Depends(query_filters)]


def make_router(limits: Limits) -> APIRouter:
    """The search routes; `limits` bounds k (and shows in OpenAPI) and the upload."""
    router = APIRouter(tags=["search"])

    @router.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Products that look like the uploaded photo, refined by words, or words alone",
    )
    async def search(
        request: Request,
        background: BackgroundTasks,
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        image: Annotated[
            UploadFile | None, File(description="The query photo (optional with q)")
        ] = None,
        q: Annotated[
            str | None,
            Form(
                max_length=1000,
                description="Words: with the photo, they refine its results; alone, a"
                " words search of titles, categories and attribute values",
            ),
        ] = None,
        text_weight: Annotated[
            float | None,
            Form(
                ge=0, le=1, description=f"Photo and words: the words' share (default {TEXT_WEIGHT})"
            ),
        ] = None,
        k: Annotated[int, Form(ge=1, le=limits.max_k)] = 10,
        category: Annotated[
            list[str] | None, Form(description="Repeat for any of several categories")
        ] = None,
        price_min: Annotated[float | None, Form(ge=0, allow_inf_nan=False)] = None,
        price_max: Annotated[float | None, Form(ge=0, allow_inf_nan=False)] = None,
        in_stock: Annotated[bool | None, Form()] = None,
        min_score: Annotated[float | None, Form(ge=-1, le=1, allow_inf_nan=False)] = None,
        crop: Annotated[
            str | None, Form(description="Crop box 'x,y,w,h' in query-image pixels")
        ] = None,
        x: Annotated[float | None, Form(allow_inf_nan=False)] = None,
        y: Annotated[float | None, Form(allow_inf_nan=False)] = None,
        w: Annotated[float | None, Form(allow_inf_nan=False)] = None,
        h: Annotated[float | None, Form(allow_inf_nan=False)] = None,
    ) -> SearchResponse:
        """Give `image`, `q`, or both. Attribute equality filters: extra form fields
        `attr.<name>=<value>` (e.g. `attr.colour=Black`). With words, `min_score`
        applies to the combined score, and each result says which words it has."""
        started = time.perf_counter()
        form = await request.form()
        filters = make_filters(
            category, price_min, price_max, in_stock, attribute_filters(form.multi_items())
        )
        words = q if q is not None and q.strip() else None
        if image is None and words is None:
            raise RequestValidationError(
                [{"loc": ("body", "image"), "msg": "give a photo (image), words (q), or both"}]
            )
        if image is None:
            report = await cpu.run(
                lambda: engine.find([], words, k, filters, min_score, text_weight)[0]
            )
            return _response(report, urls, started)
        box = parse_crop(crop, x, y, w, h)
        upload = image
        data = await read_upload(upload, limits.max_image_bytes)

        def work() -> tuple[SearchReport, Any]:
            try:
                img = load_query_image(data, box, encoder_input_size(engine), limits)
            except LookalikeError as exc:
                raise with_file_name(exc, upload.filename) from None
            if words is None:
                report = SearchReport(
                    engine.search([img], k=k, filters=filters, min_score=min_score)[0], "photo"
                )
            else:
                report = engine.find([img], words, k, filters, min_score, text_weight)[0]
            return report, img

        report, img = await cpu.run(work)
        kept = request.app.state.kept_photos
        if kept.limit:  # after the answer is sent: keeping a photo never slows a search
            background.add_task(_keep, request.app.state, engine, img, data, box)
        return _response(report, urls, started)

    @router.get(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Words alone: products whose title, category or attributes have the words",
    )
    async def search_words(
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        q: Annotated[
            str,
            Query(
                min_length=1,
                max_length=1000,
                description="Words (stemmed: 'heel' finds 'Heels'; a non-word is a prefix)",
            ),
        ],
        filters: QueryFilters,
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        min_score: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    ) -> SearchResponse:
        """Attribute equality filters: query parameters `attr.<name>=<value>`. Results
        come ranked by how well their words match (BM25), `score` is the words score
        (0..1) and `matched` the words each has."""
        started = time.perf_counter()
        report = await cpu.run(lambda: engine.find([], q, k, filters, min_score)[0])
        return _response(report, urls, started)

    @router.get(
        "/products/{product_id}/similar",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="More like this: products that look like this product",
    )
    async def similar(
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        product_id: str,
        filters: QueryFilters,
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        min_score: Annotated[float | None, Query(ge=-1, le=1, allow_inf_nan=False)] = None,
    ) -> SearchResponse:
        """Attribute equality filters: query parameters `attr.<name>=<value>`."""
        started = time.perf_counter()
        results = await cpu.run(similar_products, engine, product_id, k, filters, min_score)
        return _response(SearchReport(results, "photo"), urls, started)

    return router


def _response(report: SearchReport, urls: UrlMaker, started: float) -> SearchResponse:
    """The ranked results as the API answers them, with the time since `started`."""
    return SearchResponse(
        results=[result_out(r, urls) for r in report.results],
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        mode=report.mode,
        words=report.words or None,
        unmatched=report.unmatched if report.words else None,
        note=report.note,
        text_weight=report.text_weight,
    )


def _keep(state: Any, engine: Any, img: Any, data: bytes, box: Any) -> None:
    """Keep a searched photo for `tune --photos` (`serve --keep-photos`), unless its bytes
    are a catalog image's own: those are the catalog, not a shopper's photo; then maybe
    calibrate or tune on the kept photos (`serve --calibrate-every`, `--tune-every`)."""
    sha = hashlib.sha256(data).hexdigest()
    if engine.catalog.has_sha(sha):
        return
    if state.kept_photos.keep(img, hashlib.sha256(f"{sha} {box}".encode()).hexdigest()):
        state.auto_learn.photo_kept()
