"""`lookalike tune --field NAME`: the catalog's own metadata as weak labels.

A catalog with no shopper photos still says which products are heels and which are
flats. With the head method, `--field category` (or any attribute) trains a linear
classifier of the field's values on the catalog images' base embeddings (softmax
regression), and the tuned vector is the base embedding (scaled by
`TuneSettings.keep_base`), the classifier's posterior (scaled by `class_weight`: products
it places in one category come together) and the image's colour descriptor
(lookalike.encoders.colour, scaled by `colour_weight`: two heels of different colours
stay apart), normalised together. With photos in the same run, the MLP head they train
comes first, and it also learns the field through a loss that pulls each catalog image
towards one learned proxy per value (FieldTerm; the finetune method uses only this);
beside unlabelled photos the posterior is left out by default (`class_weight` 0: it
pulled a category's products together and cost grocery 9-12 points of Recall@1 for no
category precision). docs/quality.md has the measurements behind each part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import UsageError
from ..models import Head

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


CLASSIFIER_STEPS = 300  # full-batch AdamW steps of the field's softmax regression
CLASSIFIER_SCALE = 10.0  # unit-norm embeddings scaled so the regression starts well posed


def fit_classifier(
    emb: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    seed: int,
    weight_decay: float = 1e-3,
    on_step: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression of the classes `y` (-1: none, not used) on embeddings `emb`:
    returns (W (D, C), b (C,)) with logits = emb @ W + b."""
    import torch
    import torch.nn.functional as F

    keep = y >= 0
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(emb[keep], dtype=np.float32)) * CLASSIFIER_SCALE
    t = torch.from_numpy(y[keep].astype(np.int64))
    layer = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(CLASSIFIER_STEPS):
        opt.zero_grad()
        F.cross_entropy(layer(x), t).backward()
        opt.step()
        if on_step is not None:
            on_step()
    w = layer.weight.detach().numpy().T * CLASSIFIER_SCALE
    return w.astype(np.float32).copy(), layer.bias.detach().numpy().astype(np.float32).copy()


def field_head(
    settings: Any,
    cat_emb: np.ndarray,
    cat_field: np.ndarray,
    head: Head | None = None,
    on_step: Callable[[], None] | None = None,
) -> Head:
    """`head` (None: no MLP part) with the field's classifier and the colour part added
    (settings: keep_base, class_weight, colour_weight, seed)."""
    n_classes = int(cat_field.max()) + 1
    w = b = None  # class_weight 0 (the default beside --photos): no posterior to fit
    if settings.class_weight:
        w, b = fit_classifier(cat_emb, cat_field, n_classes, settings.seed, on_step=on_step)
    if head is None:
        dim = int(cat_emb.shape[1])
        head = Head(mean=np.zeros(dim, dtype=np.float32), weights=[], biases=[])
    return replace(head, keep_base=float(settings.keep_base or 0.0), classifier=w,
                   classifier_bias=b, class_weight=float(settings.class_weight),
                   colour_weight=float(settings.colour_weight))  # fmt: skip


def describe_head(head: Head, hidden: int) -> str:
    """model.json's "head": what the head adds to the base embedding, in words."""
    parts = []
    if head.weights:
        out = int(head.weights[-1].shape[1])
        parts.append(f"MLP {head.in_dim}-{hidden}-{out} (ReLU)" if hidden
                     else f"linear {head.in_dim}-{out}")  # fmt: skip
        parts[-1] += " on the centred base embedding"
    if head.keep_base:
        parts.append(f"the base embedding x {head.keep_base:g}")
    if head.class_weight and head.classifier is not None:
        parts.append(f"the field's {head.classifier.shape[1]}-value posterior (softmax"
                     f" regression) x {head.class_weight:g}")  # fmt: skip
    if head.colour_weight:
        parts.append(f"the colour descriptor x {head.colour_weight:g}")
    return " + ".join(parts) + ", L2-normalised"
