"""Product ranking: query vectors -> vector search (with metadata filters) -> group by
product -> ranked products.

Results are products, not images: a product appears once, with its best-matching image
and that image's cosine score. A filter never loses results: the vector search only
considers images whose product passes the filter, so when three products match, those
three come back, ranked.

With a hubness correction (lookalike.hubness: a calibrated base model's photo searches)
products are ranked by their best image's cos - beta r(c) instead, and `score` stays that
image's cosine (so `min_score` keeps its meaning, and scores are not always descending).
The ranking is exact: the store's candidates are fetched by cosine as always, and the
search widens until no image it has not fetched could rank among the top k.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import Catalog, Filters
from .errors import UsageError
from .hubness import HubCorrection
from .vectors.base import VectorStore

__all__ = ["Filters", "Result", "rank_products"]

HUB_FETCH = 4
"""A hub-corrected search fetches this many times more candidates in its first round:
the corrected top k then usually needs no second round trip to the store (2,836
fashion images, calibrated on footwear300 photos: 1.99 -> 1.15 searches a query at k
10, 2.57 -> 1.78 ms ranking; benchmarks/bench_hub_fetch.py)."""

MAX_K = 1000


@dataclass
class Result:
    product_id: str
    score: float
    image_id: int
    image: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool = True
    attributes: dict[str, Any] = field(default_factory=dict)
    # how it scored when words took part (lookalike.fusion); `score` is then `combined`
    visual: float | None = None  # cosine of the best image (None: words alone)
    text: float | None = None  # calibrated words score, 0..1 (None: photo alone)
    matched: list[str] | None = None  # the query's words this product has

    def to_dict(self) -> dict[str, Any]:
        out = {
            "product_id": self.product_id,
            "score": round(float(self.score), 6),
            "image": self.image,
            "image_id": self.image_id,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "in_stock": self.in_stock,
            "attributes": dict(self.attributes),
        }
        if self.text is not None or self.matched is not None:
            out["visual"] = None if self.visual is None else round(float(self.visual), 6)
            out["text"] = round(float(self.text or 0.0), 6)
            out["combined"] = out["score"]
            out["matched"] = list(self.matched or [])
        return out


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_K:
        raise UsageError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
    return k


@dataclass
class Scope:
    """Which images a search may return: all (`allowed` and `expr` None), these ids, or
    those a store-side filter expression selects; `total` is how many that is."""

    allowed: np.ndarray | None
    expr: str | None
    total: int


def search_scope(
    catalog: Catalog,
    store: VectorStore,
    filters: Filters | None = None,
    allowed_ids: np.ndarray | None = None,
) -> Scope:
    """The images a search with these filters (or exactly these image ids) may return."""
    if allowed_ids is not None:
        allowed = np.asarray(allowed_ids, dtype=np.int64).reshape(-1)
        return Scope(allowed, None, int(allowed.size))
    if filters is None or filters.is_empty():
        return Scope(None, None, len(store))
    # a store that holds the products' fields (Milvus) filters itself; otherwise the
    # catalog says which images pass and the store searches only those
    pushdown = getattr(store, "filter_expression", None)
    expr = pushdown(filters) if pushdown is not None else None
    if expr is not None:
        return Scope(None, expr, catalog.count_images_matching(filters))
    allowed = catalog.image_ids_matching(filters)
    return Scope(allowed, None, int(allowed.size))


def rank_products(
    catalog: Catalog,
    store: VectorStore,
    queries: np.ndarray,
    k: int,
    filters: Filters | None = None,
    min_score: float | None = None,
    exclude_products: Collection[str] = (),
    allowed_ids: np.ndarray | None = None,
    hubs: Sequence[HubCorrection | None] | None = None,
) -> list[list[Result]]:
    """Top-k products for each query vector (rows of `queries`). `allowed_ids` (image
    ids that already passed the filters, e.g. those of products with some words)
    replaces `filters`. `hubs`: each query's hubness correction (None: plain cosine)."""
    check_k(k)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    scope = search_scope(catalog, store, filters, allowed_ids)
    if scope.total == 0:
        return [[] for _ in range(len(queries))]
    exclude = set(exclude_products)
    out = []
    for i, query in enumerate(queries):
        hub = hubs[i] if hubs is not None else None
        best = best_images(catalog, store, query, k, scope, min_score, exclude, hub)
        out.append(results_for(catalog, list(best.items())[:k]))
    return out


def best_images(
    catalog: Catalog,
    store: VectorStore,
    query: np.ndarray,
    k: int,
    scope: Scope,
    min_score: float | None = None,
    exclude: Collection[str] = (),
    hub: HubCorrection | None = None,
) -> dict[str, tuple[float, int, str]]:
    """product_id -> (score, image_id, source) of its best image, for at least k products
    when there are that many (best first). With `hub`, best = highest cos - beta r(c)
    (`score` is still the cosine)."""
    # Ask for more images than products (a product may own several images), and widen
    # the search until k distinct products are found or every candidate has been seen.
    total = scope.total
    want = min(total, max(4 * (k + len(exclude)), 32) * (HUB_FETCH if hub is not None else 1))
    while True:
        pushed = {"expr": scope.expr} if scope.expr is not None else {}
        scores, ids = store.search(query[None, :], want, allowed_ids=scope.allowed, **pushed)
        scores, ids = scores[0], ids[0]
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        owners = catalog.image_products(ids.tolist())
        ranks = scores - hub.penalty(ids) if hub is not None else scores
        best: dict[str, tuple[float, int, str]] = {}
        rank: dict[str, float] = {}
        exhausted = len(ids) < want or want >= total
        below_floor = False
        for score, image_id, r in zip(scores.tolist(), ids.tolist(), ranks.tolist(), strict=True):
            if min_score is not None and score < min_score:
                below_floor = True
                break
            owner = owners.get(image_id)
            if owner is None or owner[0] in exclude:
                continue  # removed from the catalog while the store lagged, or excluded
            if owner[0] not in best or r > rank[owner[0]]:
                best[owner[0]], rank[owner[0]] = (score, image_id, owner[1]), r
        enough = len(best) >= k
        if enough and hub is not None and len(scores):
            # an image not fetched has cos <= the lowest fetched, so its corrected score is
            # at most that - the least penalty: the top k are final once the k-th beats it
            enough = sorted(rank.values())[-k] >= float(scores[-1]) - hub.least
        if enough or exhausted or below_floor:
            break
        want = min(total, want * 4)
    return dict(sorted(best.items(), key=lambda item: -rank[item[0]]))


def results_for(
    catalog: Catalog,
    top: list[tuple[str, tuple[float, int, str]]],
    products: dict[str, Any] | None = None,
) -> list[Result]:
    """Results for (product_id, (score, image_id, source)) pairs, in their order."""
    if products is None:
        products = catalog.products([pid for pid, _ in top])
    results = []
    for pid, (score, image_id, source) in top:
        product = products.get(pid)
        if product is None:
            continue
        results.append(
            Result(
                product_id=pid,
                score=float(score),
                image_id=int(image_id),
                image=source,
                title=product.title,
                category=product.category,
                price=product.price,
                in_stock=product.in_stock,
                attributes=product.attributes,
            )
        )
    return results
