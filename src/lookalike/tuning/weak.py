"""`lookalike tune --field NAME`: the catalog's own metadata as weak labels.

A catalog with no shopper photos still says which products are heels and which are
flats. `--field category` (or any attribute) adds a loss that pulls each catalog image
towards one learned proxy per value of the field, beside the loss every run has that
keeps each product its own (the catalog image and its augmented views against the
product's proxy): products of one category come together without collapsing into one
point. What the base embedding sees and the field does not name (colour, pattern) is
kept by appending the base embedding, scaled by `TuneSettings.keep_base`, to the tuned
vector (docs/quality.md has the measurements behind both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

COLUMNS = ("category", "title", "price", "in_stock")


@dataclass
class FieldLabels:
    """The field's value of each catalog image, as class indices (-1: no value)."""

    name: str
    classes: list[str]
    y: np.ndarray  # (catalog images,) int64

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.y[self.y >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, found, strict=True)}


def field_labels(catalog: Any, product_ids: list[str], name: str) -> FieldLabels:
    """The value of field `name` (category, title, price, in_stock or an attribute) of
    the product of each catalog image (`product_ids`, one per image)."""
    products = catalog.products(sorted(set(product_ids)))
    values: list[str | None] = []
    for pid in product_ids:
        prod = products.get(pid)
        value = None
        if prod is not None:
            value = getattr(prod, name) if name in COLUMNS else prod.attributes.get(name)
        values.append(None if value is None or value == "" else str(value))
    classes = sorted({v for v in values if v is not None})
    if len(classes) < 2:
        raise UsageError(
            f"--field {name}: the catalog needs at least two values of it to learn from"
            f" (found {len(classes)}; try category, or an attribute from the metadata)"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] if v is not None else -1 for v in values], dtype=np.int64)
    return FieldLabels(name, classes, y)


class FieldTerm:
    """The field's loss in a trainer: normalised softmax of catalog images' tuned vectors
    against one proxy per class, started at the class's mean vector. Inactive (no
    parameters, zero loss) without field labels."""

    def __init__(self, y: Any = None, proxies: Any = None):
        self.y = y
        self.proxies = proxies

    @classmethod
    def make(cls, cat_field: np.ndarray | None, cat_vectors: Any) -> FieldTerm:
        """`cat_vectors`: the tuned vectors of every catalog image before training."""
        if cat_field is None:
            return cls()
        import torch
        import torch.nn.functional as F

        y = torch.from_numpy(np.asarray(cat_field, dtype=np.int64))
        keep = y >= 0
        n = int(y.max()) + 1
        start = torch.zeros(n, cat_vectors.shape[1]).index_add_(
            0, y[keep], cat_vectors.detach()[keep]
        )
        return cls(y, torch.nn.Parameter(F.normalize(start, dim=1)))

    def parameters(self) -> list[Any]:
        return [] if self.proxies is None else [self.proxies]

    def loss(self, vectors: Any, idx: Any, temperature: float) -> Any:
        """The loss of catalog images `idx` (None: all) whose tuned vectors are given."""
        if self.proxies is None:
            return 0.0
        import torch.nn.functional as F

        y = self.y if idx is None else self.y[idx]
        keep = y >= 0
        if not bool(keep.any()):
            return 0.0
        p = F.normalize(self.proxies, dim=1)
        return F.cross_entropy(vectors[keep] @ p.T / temperature, y[keep])
