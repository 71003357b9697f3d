"""`lookalike tune --photos`: learning from unlabelled shopper photos by self-training.

No label is read (lookalike.tuning.sources). Each photo is given the catalog product it
most likely shows, and the run then trains exactly as if a person had labelled it:

1. **Scores.** Photos and catalog images are described by the normalised sum of the
   embeddings of the full image and of its central squares (LABEL_CROPS, label_views:
   the product usually fills the middle of a shop photo), centred on their own means
   (shop photos share shelves, hands and light that studio shots lack), and each photo
   scores each product by cosine with the product's best catalog image. A catalog
   image's vector there also holds SHOPPER_WEIGHT x the mean of its synthetic shopper
   views (lookalike.tuning.shopper, mix_shopper_views): the studio shot pasted on the
   run's own photos, so it looks a little more like them (label accuracy +2 points on
   both of grocery's burst splits).
2. **Propagation over the photos.** Shop photos come in bursts of near-identical shots
   of one product, so a photo's nearest photos almost always show the same product
   (96 % of first neighbours on grocery): the scores, turned into soft assignments, are
   spread over the photos' k-nearest-neighbour graph (label propagation), so a burst
   votes together.
3. **Balancing.** Some catalog images attract every photo (hubs); Sinkhorn scaling makes
   every product receive about the same share of the photos' assignment mass. On
   grocery this lifts the share of correct assignments from 0.39 (nearest product) to
   0.57, 0.62 with the crops of step 1.
4. **Rounds** (`pseudo_rounds`, default 0). A quick head (lookalike.tuning.head) can be
   trained on the pseudo-labels and the photos labelled again in its space. Measured on
   grocery's burst split, it changes nothing: the head learns every label it is given,
   near-identical burst-mates included, so labelling again returns the same labels (the
   classic fixed point of self-training); the option stays for catalogs where it may.
5. **Soft targets.** The head trains on each photo's assignment shares, sharpened
   (soft_targets, SHARPEN), not on the argmax alone: when the first choice is wrong the
   right product is usually among the next few, and the head keeps it near (Recall@5
   0.82 -> 0.88 on grocery's burst split). The finetune method trains on the argmax.
6. **Crops as samples.** The head also trains on the central crops (LABEL_CROPS) of
   every photo, each with its photo's target, and the model records its query view
   (PHOTOS_QUERY_VIEWS): queried with the central 60 % square, as it was trained. Two
   session views of each photo (another light, white balance, camera and framing;
   lookalike.tuning.augment, settings.session_views) are samples with its target too.

Photos with true labels (`--labels` in the same run) take part as fixed labels.
The measurements behind each step and setting are in docs/quality.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

NEIGHBOURS = 5  # k of the photos' nearest-neighbour graph
ALPHA = 0.9  # how much of a photo's assignment comes from its neighbours
TEMPERATURE = 0.05  # softmax temperature of the cosine scores
PROPAGATION_STEPS = 20
SINKHORN_STEPS = 20
LABEL_CROPS = (0.8, 0.6)  # central squares embedded beside the full image for labelling
SHOPPER_WEIGHT = 0.5  # the catalog images' synthetic shopper views in their label view
SHARPEN = 3.0  # the head's soft targets: assignment shares raised to this power
CHUNK_ELEMENTS = 1 << 24  # the largest photos x catalog (or edges x products) block built at once
PHOTOS_QUERY_VIEWS = ("centre60",)
"""The query view recorded in model.json (`query_views`) of a head trained with the
photos' central crops as samples (train.crop_samples): one pass, like `full`, and on
grocery's burst split Recall@1/@5 0.590/0.915 against 0.579/0.894 for `full` (three seeds;
centre70 0.605/0.907; docs/quality.md)."""


@dataclass
class PseudoLabels:
    """The product each unlabelled photo was given, with the assignment's margin (best
    minus second-best share) as its confidence."""

    labels: np.ndarray  # (N,) product index
    confidence: np.ndarray  # (N,) float32 in [0, 1]
    rounds: list[dict[str, float]]
    targets: np.ndarray | None = None  # (N, P) soft targets for the head (soft_targets)

    def summary(self) -> dict[str, Any]:
        return {
            "photos": int(len(self.labels)),
            "products_assigned": int(len(np.unique(self.labels))),
            "mean_confidence": round(float(self.confidence.mean()), 4) if len(self.labels) else 0.0,
            "rounds": self.rounds,
        }


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def label_views(views: list[np.ndarray]) -> np.ndarray:
    """The embedding photos are labelled with: the normalised sum of the L2-normalised
    embeddings of the full image and its central crops (LABEL_CROPS)."""
    return _l2n(np.sum([_l2n(np.asarray(v, dtype=np.float32)) for v in views], axis=0))


def mix_shopper_views(catalog: np.ndarray, views: np.ndarray, have: np.ndarray,
                      weight: float = SHOPPER_WEIGHT) -> np.ndarray:  # fmt: skip
    """The catalog images' label views (N, D) with `weight` x the mean of each image's
    L2-normalised synthetic shopper views (N, V, D; lookalike.tuning.shopper) added, and
    normalised again (`have` (N, V): which views exist; an image with none is itself)."""
    v = _l2n(views.reshape(-1, views.shape[-1])).reshape(views.shape) * have[..., None]
    mean = v.sum(1) / np.maximum(have.sum(1, keepdims=True), 1)
    return _l2n(np.asarray(catalog, dtype=np.float32) + weight * mean)


def soft_targets(shares: np.ndarray, power: float = SHARPEN) -> np.ndarray:
    """(N, P) training targets from assignment shares: each row raised to `power` and
    renormalised (sharper than the shares, softer than the argmax)."""
    t = np.maximum(shares, 0.0).astype(np.float64) ** power
    t /= np.maximum(t.sum(1, keepdims=True), 1e-300)
    return t.astype(np.float32)


def product_scores(photos: np.ndarray, catalog: np.ndarray, cat_y: np.ndarray,
                   n_products: int) -> np.ndarray:  # fmt: skip
    """(N, P) cosine of each centred photo with each product's best centred catalog image."""
    q = _l2n(photos - photos.mean(0))
    c = _l2n(catalog - catalog.mean(0)) if len(catalog) > 1 else _l2n(catalog)
    order = np.argsort(cat_y, kind="stable")  # the catalog's columns grouped by product
    c, products = c[order], np.asarray(cat_y)[order]
    starts = np.flatnonzero(np.r_[True, products[1:] != products[:-1]])
    out = np.full((len(q), n_products), -1.0, dtype=np.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, len(c)))  # one photos x catalog block at a time
    for s in range(0, len(q), rows):
        out[s : s + rows, products[starts]] = np.maximum.reduceat(q[s : s + rows] @ c.T, starts,
                                                                  axis=1)  # fmt: skip
    return out


def neighbour_graph(x: np.ndarray, k: int = NEIGHBOURS, chunk: int = 2048):
    """The photos' k-nearest-neighbour lists (cosine of the centred vectors), as
    (neighbours (N, k), weights (N, k)); computed in chunks, never N x N at once."""
    q = _l2n(x - x.mean(0))
    k = max(1, min(k, len(q) - 1))
    nbrs = np.zeros((len(q), k), dtype=np.int64)
    sims = np.zeros((len(q), k), dtype=np.float32)
    for s in range(0, len(q), chunk):
        block = q[s : s + chunk] @ q.T
        block[np.arange(len(block)), np.arange(s, s + len(block))] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        nbrs[s : s + chunk] = top
        sims[s : s + chunk] = np.take_along_axis(block, top, axis=1)
    return nbrs, np.exp((sims - 1.0) / TEMPERATURE)


def propagate(scores: np.ndarray, nbrs: np.ndarray, weights: np.ndarray,
              fixed: dict[int, int] | None = None) -> np.ndarray:  # fmt: skip
    """Soft assignments (N, P): softmax of the scores spread over the symmetrised
    neighbour graph (F <- alpha W F + (1 - alpha) Y), then Sinkhorn-balanced over the
    products. `fixed` maps photo rows to their known product."""
    n = len(scores)
    y = np.exp((scores - scores.max(1, keepdims=True)) / TEMPERATURE)
    y /= y.sum(1, keepdims=True)
    for row, product in (fixed or {}).items():
        y[row] = 0.0
        y[row, product] = 1.0
    if n > 1:
        rows = np.repeat(np.arange(n), nbrs.shape[1])
        cols = nbrs.ravel()
        w = weights.ravel().astype(np.float64)
        # W + W^T as edge lists; symmetric normalisation D^-1/2 W D^-1/2
        src = np.concatenate([rows, cols])
        dst = np.concatenate([cols, rows])
        ww = np.concatenate([w, w])
        degree = np.bincount(src, weights=ww, minlength=n)
        ww = ww / np.sqrt(degree[src] * degree[dst])
        order = np.argsort(src, kind="stable")  # every photo has k edges: no empty group
        src, dst, ww = src[order], dst[order], ww[order]
        starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
        f = y.copy()
        for _ in range(PROPAGATION_STEPS):
            f = ALPHA * _spread(f, ww, dst, starts) + (1 - ALPHA) * y
    else:
        f = y
    f = np.maximum(f, 1e-12)
    for _ in range(SINKHORN_STEPS):
        f /= f.sum(0, keepdims=True)
        f /= f.sum(1, keepdims=True)
    for row, product in (fixed or {}).items():
        f[row] = 0.0
        f[row, product] = 1.0
    return f


def _spread(f: np.ndarray, ww: np.ndarray, dst: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """W F for the edge lists (sorted by source; `starts`: each photo's first edge): the
    weighted sum of each photo's neighbours' rows, a block of photos at a time so that the
    (edges, P) products never exceed CHUNK_ELEMENTS by much (each photo's sum is the
    same, in the same order, as in one block)."""
    n, ends = len(starts), np.r_[starts[1:], len(dst)]
    per_photo = max(1, -(-len(dst) // n)) * f.shape[1]
    rows = max(1, CHUNK_ELEMENTS // per_photo)
    out = np.empty(f.shape, dtype=np.result_type(ww, f))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        e0, e1 = starts[a], ends[b - 1]
        out[a:b] = np.add.reduceat(ww[e0:e1, None] * f[dst[e0:e1]], starts[a:b] - e0, axis=0)
    return out


def assign(photos: np.ndarray, catalog: np.ndarray, cat_y: np.ndarray, n_products: int,
           fixed: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One labelling: (product index, confidence) of every photo row."""
    labels, confidence, _ = _assign(photos, catalog, cat_y, n_products, fixed)
    return labels, confidence


def _assign(photos: np.ndarray, catalog: np.ndarray, cat_y: np.ndarray, n_products: int,
            fixed: dict[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    scores = product_scores(photos, catalog, cat_y, n_products)
    nbrs, weights = neighbour_graph(photos)
    f = propagate(scores, nbrs, weights, fixed)
    labels = f.argmax(1)
    top2 = np.sort(f, axis=1)[:, -2:] if f.shape[1] > 1 else np.concatenate([0 * f, f], 1)
    return labels.astype(np.int64), (top2[:, 1] - top2[:, 0]).astype(np.float32), f


def self_train(
    settings: Any,
    unlabelled: np.ndarray,
    catalog: np.ndarray,
    cat_y: np.ndarray,
    n_products: int,
    *,
    labelled: np.ndarray | None = None,
    labelled_y: np.ndarray | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> PseudoLabels:
    """Pseudo-labels of the `unlabelled` photos' embeddings (N, D; label_views in a run),
    against the catalog images' (the same kind): `settings.pseudo_rounds` rounds of labelling and
    training a quick head on the labels, then a last labelling (module docstring)."""
    from .head import fit_head
    from .settings import METHOD_DEFAULTS

    head_settings = replace(
        settings, method="head", keep_base=0.0,
        epochs=METHOD_DEFAULTS["head"]["epochs"], batch_size=METHOD_DEFAULTS["head"]["batch_size"],
    )  # fmt: skip
    n_known = 0 if labelled is None else len(labelled)
    base_all = unlabelled if not n_known else np.concatenate([labelled, unlabelled])
    fixed = {} if not n_known else {i: int(p) for i, p in enumerate(labelled_y)}
    photos, cat = base_all, catalog
    rounds: list[dict[str, float]] = []
    for r in range(settings.pseudo_rounds + 1):
        labels, confidence, shares = _assign(photos, cat, cat_y, n_products, fixed)
        row = {"round": r, "mean_confidence": round(float(confidence[n_known:].mean()), 4),
               "products_assigned": int(len(np.unique(labels[n_known:])))}  # fmt: skip
        rounds.append(row)
        if on_round is not None:
            on_round(r, row)
        if r == settings.pseudo_rounds:
            break
        head = fit_head(head_settings, base_all, labels, catalog, cat_y, n_products)
        photos, cat = head.apply(base_all), head.apply(catalog)
    return PseudoLabels(labels[n_known:], confidence[n_known:], rounds,
                        soft_targets(shares[n_known:]))  # fmt: skip
