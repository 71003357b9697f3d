"""Thin adapters over the engine, one place to follow its API: its answers turned into
the API's response models, and the calls the routes make through it."""

import logging
import os
from pathlib import Path
from typing import Any

from ..catalog import Filters
from ..errors import LookalikeError, UnknownImageError
from .deps import UrlMaker
from .schemas import ProductImage, ProductOut, SearchResult

log = logging.getLogger("lookalike.api")


def value_of(obj: Any, name: str, default: Any = None) -> Any:
    """`obj[name]` of a dict, else `obj.name`."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def result_out(result: Any, urls: UrlMaker) -> SearchResult:
    image_id = int(value_of(result, "image_id"))
    score = float(value_of(result, "score"))
    text = value_of(result, "text")
    return SearchResult(
        product_id=str(value_of(result, "product_id")),
        score=score,
        title=value_of(result, "title"),
        category=value_of(result, "category"),
        price=value_of(result, "price"),
        in_stock=value_of(result, "in_stock"),
        image_id=image_id,
        image_url=urls.thumb(image_id),
        full_image_url=urls.full(image_id),
        attributes=dict(value_of(result, "attributes") or {}),
        visual=score if text is None else value_of(result, "visual"),
        text=text,
        combined=score,
        matched=value_of(result, "matched"),
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


def product_payload(engine: Any, product_id: str, urls: UrlMaker) -> ProductOut:
    """One product with its images, as GET /products/{id} answers it."""
    product = engine.get_product(product_id)
    images = value_of(product, "images")
    if images is None:
        images = image_ids_of(engine, product_id)
    return product_out(product, [value_of(i, "image_id", i) for i in images], urls)


def image_ids_of(engine: Any, product_id: str) -> list[int]:
    catalog = getattr(engine, "catalog", None)
    if catalog is not None and hasattr(catalog, "images_of"):
        return [row.image_id for row in catalog.images_of(product_id)]
    return []


def similar_products(
    engine: Any, product_id: str, k: int, filters: Filters | None, min_score: float | None
) -> list[Any]:
    results = engine.similar(product_id, k=k, filters=filters)
    if min_score is not None:
        results = [r for r in results if value_of(r, "score") >= min_score]
    return results


def locate_image(engine: Any, image_id: int) -> tuple[Path, os.stat_result]:
    """The file of catalog image `image_id` and its stat; 404 when either is missing."""
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


def categories_of(engine: Any) -> list[tuple[str, int]]:
    catalog = getattr(engine, "catalog", None)
    if catalog is not None and hasattr(catalog, "categories"):
        return list(catalog.categories())
    return []


def engine_info(engine: Any) -> dict[str, Any]:
    try:
        info = engine.info()
    except Exception:  # readiness must not fail on a reporting detail
        log.exception("engine.info() failed")
        return {}
    return info if isinstance(info, dict) else {}
