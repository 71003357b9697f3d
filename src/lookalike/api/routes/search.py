"""POST /search (products that look like an uploaded photo) and
GET /products/{id}/similar ("more like this")."""

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile

from ...errors import LookalikeError
from ..adapters import result_out, similar_products
from ..deps import Cpu, EngineDep, UrlMaker, Urls
from ..limits import Limits
from ..params import attribute_filters, make_filters
from ..schemas import ERRORS, SearchResponse
from ..uploads import encoder_input_size, load_query_image, parse_crop, read_upload, with_file_name


def make_router(limits: Limits) -> APIRouter:
    """The search routes; `limits` bounds k (and shows in OpenAPI) and the upload."""
    router = APIRouter(tags=["search"])

    @router.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Products that look like the uploaded photo",
    )
    async def search(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        image: Annotated[UploadFile, File(description="The query photo")],
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
        """Attribute equality filters: extra form fields `attr.<name>=<value>`
        (e.g. `attr.colour=Black`)."""
        started = time.perf_counter()
        form = await request.form()
        filters = make_filters(
            category, price_min, price_max, in_stock, attribute_filters(form.multi_items())
        )
        box = parse_crop(crop, x, y, w, h)
        data = await read_upload(image, limits.max_image_bytes)

        def work() -> list[Any]:
            try:
                img = load_query_image(data, box, encoder_input_size(engine), limits)
            except LookalikeError as exc:
                raise with_file_name(exc, image.filename) from None
            return engine.search([img], k=k, filters=filters, min_score=min_score)[0]

        results = await cpu.run(work)
        return _response(results, urls, started)

    @router.get(
        "/products/{product_id}/similar",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="More like this: products that look like this product",
    )
    async def similar(
        request: Request,
        engine: EngineDep,
        urls: Urls,
        cpu: Cpu,
        product_id: str,
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        category: Annotated[
            list[str] | None, Query(description="Repeat for any of several categories")
        ] = None,
        price_min: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
        price_max: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
        in_stock: bool | None = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1, allow_inf_nan=False)] = None,
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
        results = await cpu.run(similar_products, engine, product_id, k, filters, min_score)
        return _response(results, urls, started)

    return router


def _response(results: list[Any], urls: UrlMaker, started: float) -> SearchResponse:
    """The ranked results as the API answers them, with the time since `started`."""
    return SearchResponse(
        results=[result_out(r, urls) for r in results],
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )
