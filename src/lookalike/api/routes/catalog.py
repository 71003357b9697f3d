"""Reading the catalog: GET /products (a page of them), GET /products/{id} and
GET /categories (names and counts, the page's filter). Images are in `images`, the
writes in `catalog_writes`."""

from typing import Annotated

from fastapi import APIRouter, Query

from ..adapters import categories_of, image_ids_of, product_out, product_payload
from ..deps import EngineDep, Urls
from ..limits import Limits
from ..schemas import ERRORS, Category, CategoryList, ProductOut, ProductPage


def make_router(limits: Limits) -> APIRouter:
    """The catalog read routes; `limits` bounds the page size (and shows in OpenAPI)."""
    router = APIRouter(tags=["catalog"])

    @router.get("/products", response_model=ProductPage, responses=ERRORS)
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
        out = [product_out(p, image_ids_of(engine, p.product_id), urls) for p in products]
        return ProductPage(
            products=out,
            total=total if total is not None else offset + len(out),
            limit=limit,
            offset=offset,
        )

    @router.get("/products/{product_id}", response_model=ProductOut, responses=ERRORS)
    def get_product(engine: EngineDep, urls: Urls, product_id: str) -> ProductOut:
        return product_payload(engine, product_id, urls)

    @router.get("/categories", response_model=CategoryList)
    def categories(engine: EngineDep) -> CategoryList:
        pairs = categories_of(engine)
        return CategoryList(categories=[Category(name=n, count=c) for n, c in pairs])

    return router
