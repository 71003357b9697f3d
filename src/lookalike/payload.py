"""A vector store that filters on per-vector payload (Milvus), fed from the catalog: the
bridge between product fields and a store that knows only ids, vectors and payload."""

from __future__ import annotations

from typing import Any

import numpy as np

from .catalog import Catalog, Filters
from .errors import UsageError
from .vectors.base import VectorStore
from .vectors.milvus_store import filters_to_expr, payload_from_products


class PayloadStore:
    """A vector store that can filter on per-vector payload (Milvus), fed by the catalog:
    every vector it is given goes in with its product's category, price, stock and
    attributes, so search filters go down to it as expressions (`filter_expression`)
    instead of as lists of allowed image ids. Everything else is the wrapped store's."""

    def __init__(self, store: VectorStore, catalog: Catalog):
        self._inner = store
        self._catalog = catalog
        self._fractions: dict[str, float] = {}  # expression -> share of images passing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        owners = self._catalog.image_products(ids.tolist())
        products = self._catalog.products(sorted({pid for pid, _ in owners.values()}))
        rows = []
        for image_id in ids.tolist():
            product = products.get(owners.get(image_id, ("", ""))[0])
            rows.append(payload_from_products([product.to_dict()])[0] if product else {})
        self._inner.add(ids, vectors, payload=rows)

    def filter_expression(self, filters: Filters) -> str | None:
        """The Milvus expression for these filters; None when they cannot be expressed
        (an attribute name Milvus cannot address): the caller then sends allowed ids."""
        try:
            expr = filters_to_expr(filters)
        except UsageError:
            return None
        if expr and getattr(self._inner, "approximate", False):
            # an approximate server index searches wider for selective filters
            if len(self._fractions) > 256:
                self._fractions.clear()
            total = max(1, self._catalog.count_images())
            self._fractions[expr] = self._catalog.count_images_matching(filters) / total
        return expr

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        expr: str | None = None,
        **kw: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        if expr is not None and expr in self._fractions:
            kw.setdefault("filter_fraction", self._fractions[expr])
        return self._inner.search(queries, k, allowed_ids=allowed_ids, expr=expr, **kw)
