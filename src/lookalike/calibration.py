"""`lookalike calibrate`: the query centre and the hub correction of a home, learnt from
unlabelled photos like the ones shoppers will send (no labels are read). What they do to a
query is `lookalike.query`'s (centring, `QueryCentre`) and `lookalike.hubness`'s (r(c));
this module computes them from the photos and stores them in the home
(`query_centre.npz`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import Catalog
from .encoders.runtime import l2_normalise
from .errors import ImageError, UsageError
from .hubness import HUB_K, catalog_hub_scores
from .images import load_image
from .models import is_tuned
from .query import CENTRE_FILE, QueryCentre, QueryPipeline, load_settings, photo_paths


def calibrate(
    encoder: QueryPipeline, photos: Sequence[str | Path], **options: Any
) -> tuple[QueryCentre, list[str]]:
    """The mean raw query vector of unlabelled photos (at most `limit`, an even random
    sample; the options of `calibrate_queries`). Returns the centre and the photos that
    could not be read."""
    centre, failed, _ = calibrate_queries(encoder, photos, **options)
    return centre, failed


def calibrate_queries(
    encoder: QueryPipeline,
    photos: Sequence[str | Path],
    *,
    limit: int | None = 1000,
    batch: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> tuple[QueryCentre, list[str], np.ndarray]:
    """`calibrate`, and the photos' query vectors once centred by it (N, dim): what
    `embed_queries` gives them with that centre, without a second forward pass."""
    paths = list(photos)
    if limit is not None and len(paths) > limit:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    if not paths:
        raise UsageError("calibrate needs at least one photo")
    parts: list[np.ndarray] = []
    failed: list[str] = []
    draft = encoder.draft_size
    chunks = range(0, len(paths), batch)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="calibrate", unit="batch")
    for start in chunks:
        images = []
        for p in paths[start : start + batch]:
            try:
                images.append(load_image(Path(p), draft_size=draft))
            except (ImageError, OSError) as exc:
                failed.append(f"{p}: {exc}")
        if images:
            parts.append(encoder.raw_query_views(images))
    if not parts:
        raise ImageError("none of the calibration photos could be read")
    views = np.concatenate(parts)  # (N, V, dim)
    flat = views.reshape(-1, encoder.dim)
    mean = (flat.astype(np.float64).sum(axis=0) / len(flat)).astype(np.float32)
    centre = QueryCentre(mean, encoder.stamp, len(views), encoder.views)
    # centred as embed_queries centres them
    queries = l2_normalise(l2_normalise(views - mean[None, None, :]).sum(axis=1))
    return centre, failed, queries


def save_centre(home: str | Path, centre: QueryCentre) -> Path:
    path = Path(home) / CENTRE_FILE
    Path(home).mkdir(parents=True, exist_ok=True)
    centre.save(path)
    return path


def calibrate_home(
    home: str | Path,
    encoder: Any,
    photos: Sequence[str | Path],
    *,
    limit: int | None = 1000,
    progress: bool = False,
    catalog: Catalog | None = None,
) -> dict[str, Any]:
    """`lookalike calibrate`: the centre of unlabelled photos (folders, images, or CSVs with
    an image column) for this home's encoder, saved in the home. With `catalog` and a base
    model, also r(c) of every catalog image embedded by `encoder` (lookalike.hubness):
    the mean cosine of its `HUB_K` nearest photos, centred. Returns the summary."""
    if not photos:
        raise UsageError("give folders, image files or CSVs of unlabelled photos")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    pipeline = QueryPipeline(encoder, load_settings(home))
    paths = photo_paths(photos)
    centre, failed, queries = calibrate_queries(pipeline, paths, limit=limit, progress=progress)
    hub = None
    if catalog is not None and not is_tuned(pipeline.base):
        ids, r = catalog_hub_scores(catalog, encoder.stamp, queries, HUB_K)
        if ids.size:
            centre.hub_ids, centre.hub_r, centre.hub_k = ids, r, HUB_K
            hub = {"images": int(ids.size), "k": HUB_K}
    path = save_centre(home, centre)
    return {
        "photos": centre.photos,
        "found": len(paths),
        "failed": failed,
        "views": list(centre.views),
        "stamp": centre.stamp,
        "path": str(path),
        "hub_correction": hub,
    }


def remove_centre(home: str | Path) -> bool:
    path = Path(home) / CENTRE_FILE
    if path.is_file():
        path.unlink()
        return True
    return False
