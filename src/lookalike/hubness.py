"""Hubness correction of the catalog side (CSLS, Conneau et al. 2018), for a base model
calibrated on unlabelled shopper photos (`lookalike calibrate`; docs/quality.md).

Some catalog images lie near many shop photos ("hubs") and take queries that belong to
others. r(c), the mean cosine of catalog vector c to its `HUB_K` nearest calibration
photos (embedded as queries are, centred; no labels), says how much of a hub c is;
a photo search then ranks images by cos(q, c) - beta r(c) (CSLS's per-query term is the
same for every image of one query, so it is left out). `calibrate` stores r with the
query centre; `HubCorrection` is what the search uses: an image with no r (added after
`calibrate`) gets the median r, a removed image simply is no longer found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .catalog import Catalog

HUB_K = 10
"""Nearest calibration photos averaged into r(c) (k 10 and 50 measured: bench_csls.py)."""
HUB_BETA = 0.5
"""Weight of r(c) in the ranking score (beta 0.5 and 1.0 measured); `quality.json`
`"hub_correction"` overrides it (`false`: off)."""
_BLOCK = 4096  # catalog vectors scored against the photos at a time (memory stays small)


def hub_scores(catalog: np.ndarray, pool: np.ndarray, k: int = HUB_K) -> np.ndarray:
    """r(c): the mean cosine of each catalog vector (rows) to its k nearest pool vectors
    (all of them when there are fewer than k)."""
    catalog = np.asarray(catalog, dtype=np.float32)
    pool = np.asarray(pool, dtype=np.float32)
    k = min(k, len(pool))
    out = np.zeros(len(catalog), dtype=np.float32)
    if k < 1:
        return out
    for start in range(0, len(catalog), _BLOCK):
        sims = catalog[start : start + _BLOCK] @ pool.T
        top = np.partition(sims, len(pool) - k, axis=1)[:, -k:] if k < len(pool) else sims
        out[start : start + len(sims)] = top.mean(axis=1)
    return out


def catalog_hub_scores(
    catalog: Catalog, stamp: str, photos: np.ndarray, k: int = HUB_K
) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, r) of every catalog image embedded under `stamp`, against these
    centred photo query vectors; the stored vectors are read a block at a time."""
    ids = catalog.embedded_ids(stamp)
    step = 20_000
    parts = [hub_scores(catalog.vectors(ids[i : i + step].tolist()), photos, k)
             for i in range(0, len(ids), step)]  # fmt: skip
    return ids, (np.concatenate(parts) if parts else np.zeros(0, np.float32))


@dataclass(frozen=True)
class HubCorrection:
    """beta and r(c) by image id, as a search applies them."""

    ids: np.ndarray  # int64, sorted
    r: np.ndarray  # float32, r of ids[i]
    beta: float
    median: float  # the r of an image that was not there at `calibrate`
    least: float  # the smallest penalty any image gets: beta * min r (<= beta * median)

    @classmethod
    def of(cls, ids: np.ndarray, r: np.ndarray, beta: float) -> HubCorrection | None:
        """The correction for these stored scores, or None when there is nothing to do."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        r = np.asarray(r, dtype=np.float32).reshape(-1)
        if beta <= 0 or ids.size == 0 or ids.shape != r.shape:
            return None
        order = np.argsort(ids, kind="stable")
        beta = float(beta)
        return cls(ids[order], r[order], beta, float(np.median(r)), beta * float(r.min()))

    def penalty(self, image_ids: np.ndarray) -> np.ndarray:
        """beta * r(c) for these image ids; the median r for ids it has none for."""
        image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        at = np.minimum(np.searchsorted(self.ids, image_ids), len(self.ids) - 1)
        known = self.ids[at] == image_ids
        r = np.where(known, self.r[at], np.float32(self.median))
        return (self.beta * r).astype(np.float32)
