"""The "head" method of `lookalike tune` (any encoder, `onnx:` models included): an MLP
head on the frozen base embedding, trained in torch and saved as a numpy
lookalike.models.Head. For encoders that expose their final feature map, each sample is
pooled over a random rectangle of a cached GRID x GRID grid of cells (a cheap
feature-level crop; lookalike.tuning.features)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..models import Head
from .features import GRID
from .settings import TuneSettings
from .weak import FieldTerm


def fit_head(
    settings: TuneSettings,
    photo_x: np.ndarray,
    photo_y: np.ndarray,
    cat_x: np.ndarray,
    cat_y: np.ndarray,
    n_products: int,
    *,
    cat_field: np.ndarray | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[int, float, Head], None] | None = None,
) -> Head:
    """Train the head. `*_x` are either (N, D) embeddings or (N, G, G, C) grid cells
    (then each sample is pooled over a random rectangle of cells with probability
    `crop_probability`). `cat_field` (one class index per catalog image, -1 for none;
    `tune --field`) adds a loss against one proxy per class of the catalog images.
    `extra` = (M, D) base embeddings and, for each, the row of `photo_y` that is its
    target: more photo samples, used as they are (`tune --photos`: the central crops and
    session views of each photo, with the photo's own target; by row, not a copy of the
    target, so (M, P) soft targets are never built). Each step's catalog loss takes the
    whole catalog, or a sample of `settings.head_catalog_per_step` images of a larger
    one (catalog_batch)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    px = torch.from_numpy(np.ascontiguousarray(photo_x, dtype=np.float32))
    cx = torch.from_numpy(np.ascontiguousarray(cat_x, dtype=np.float32))
    soft = photo_y.ndim == 2  # (N, P) target distributions instead of product indices
    py = torch.from_numpy(np.ascontiguousarray(photo_y, dtype=np.float32 if soft else np.int64))
    ex = erow = None
    if extra is not None and len(extra[0]):
        ex = F.normalize(torch.from_numpy(np.ascontiguousarray(extra[0], dtype=np.float32)), dim=-1)
        rows = np.asarray(extra[1])
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or len(rows) != len(ex):
            raise ValueError("extra samples need one row of photo_y each (integers)")
        if rows.min() < 0 or rows.max() >= len(py):
            raise ValueError("extra samples need one row of photo_y each: a row is outside it")
        erow = torch.from_numpy(rows.astype(np.int64))
    cy = torch.from_numpy(cat_y.astype(np.int64))
    gridded = px.ndim == 4
    rects = rect_masks(GRID) if gridded else None
    full = torch.ones(GRID, GRID)

    def pool(x: torch.Tensor, crop: bool) -> torch.Tensor:
        if not gridded:
            return x
        n = len(x)
        mask = full.expand(n, GRID, GRID)
        if crop and settings.crop_probability > 0:
            pick = rects[torch.from_numpy(rng.integers(0, len(rects), n))]
            use = torch.from_numpy(rng.random(n) < settings.crop_probability)
            mask = torch.where(use[:, None, None], pick, mask)
        pooled = (x * mask[..., None]).sum((1, 2)) / mask.sum((1, 2))[:, None]
        return F.normalize(pooled, dim=-1)

    with torch.no_grad():
        p_full = pool(px, False)
        c_full = pool(cx, False)
        mean = torch.cat([p_full, c_full, *([] if ex is None else [ex])]).mean(0)
    in_dim = p_full.shape[1]
    if settings.hidden:
        layers = [
            torch.nn.Linear(in_dim, settings.hidden),
            torch.nn.Linear(settings.hidden, settings.dim),
        ]
    else:
        layers = [torch.nn.Linear(in_dim, settings.dim)]
    net = torch.nn.ModuleList(layers)
    drop = torch.nn.Dropout(settings.dropout)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x - mean
        for i, layer in enumerate(net):
            if i:
                y = drop(torch.relu(y))
            y = layer(y)
        return F.normalize(y, dim=-1)

    drop.eval()
    with torch.no_grad():  # one proxy per product, starting at its catalog images' mean
        start = torch.zeros(n_products, settings.dim).index_add_(0, cy, forward(c_full))
        field = FieldTerm.make(cat_field, forward(c_full))
    drop.train()
    proxies = torch.nn.Parameter(F.normalize(start, dim=-1))
    params = [*net.parameters(), proxies, *field.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    n_grid = len(px)
    n = n_grid + (0 if ex is None else len(ex))
    steps_per_epoch = max(1, (n + settings.batch_size - 1) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=settings.lr,
        total_steps=settings.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    t = settings.temperature

    def current_head() -> Head:
        return Head(
            mean=mean.numpy().astype(np.float32).copy(),
            weights=[layer.weight.detach().numpy().T.astype(np.float32).copy() for layer in net],
            biases=[layer.bias.detach().numpy().astype(np.float32).copy() for layer in net],
            keep_base=float(settings.keep_base or 0.0),
        )

    for epoch in range(settings.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start_i in range(0, n, settings.batch_size):
            idx = perm[start_i : start_i + settings.batch_size]
            if ex is None:
                q, target = forward(pool(px[idx], True)), py[idx]
            else:  # photos first, then their extra samples: the same targets' order
                own, more = idx[idx < n_grid], idx[idx >= n_grid] - n_grid
                q = forward(torch.cat([pool(px[own], True), ex[more]]))
                target = py[torch.cat([own, erow[more]])]
            cidx = catalog_batch(len(cx), settings.head_catalog_per_step, rng)
            if cidx is None:
                c, c_y = forward(pool(cx, True)), cy
            else:
                c, c_y = forward(pool(cx[cidx], True)), cy[cidx]
            p = F.normalize(proxies, dim=-1)
            loss = (
                F.cross_entropy(q @ p.T / t, target)
                + settings.catalog_weight * (F.cross_entropy(c @ p.T / t, c_y))
                + settings.field_weight * field.loss(c, cidx, t)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / n, current_head())
    return current_head()


def catalog_batch(n: int, per_step: int, rng: np.random.Generator):  # -> Tensor | None
    """The catalog images one training step uses beside its photos: None (all of them)
    for a catalog of at most `per_step` images (or `per_step` 0), else `per_step` of them
    drawn at random without replacement. A step that embeds the whole catalog made a
    3,000-image catalog's `tune --photos` train for 10 to 12 minutes and a 10,000-image
    one's for 74 to 90 (benchmarks/bench_tune_scale.py, docs/quality.md)."""
    import torch

    if not per_step or n <= per_step:
        return None
    return torch.from_numpy(rng.choice(n, per_step, replace=False))


def rect_masks(grid: int):  # -> torch.Tensor (R, grid, grid)
    """Every axis-aligned rectangle of cells covering at least 4 of them (crops of about
    half the image or more)."""
    import torch

    masks = []
    for y0 in range(grid):
        for y1 in range(y0 + 1, grid + 1):
            for x0 in range(grid):
                for x1 in range(x0 + 1, grid + 1):
                    if (y1 - y0) * (x1 - x0) >= min(4, grid * grid):
                        m = torch.zeros(grid, grid)
                        m[y0:y1, x0:x1] = 1
                        masks.append(m)
    return torch.stack(masks)
