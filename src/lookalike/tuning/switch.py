"""Switching a home's model: `tune --use VERSION` and `tune --reset`. The active.json
pointer is lookalike.models' (set_active); what this adds is the work over an Engine:
re-embedding the catalog with the new model, from cached features where it can."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..ingest import IngestReport, reembed
from ..models import (
    BASE_STAMP_META,
    CatalogViewEncoder,
    TunedEncoder,
    base_of,
    catalog_vectors,
    is_tuned,
    load_tuned,
    set_active,
)
from .features import FeatureCache, catalog_images


def use_model(engine: Any, version: str | None, progress: bool = True) -> dict[str, int]:
    """Make `version` (None: the base model) the engine's model and re-embed the catalog
    with it: from cached features where the feature caches have the image (trunk maps
    for a fine-tuned model, base embeddings otherwise), else from the image file.
    Returns {"from_cache": n, "from_files": m}."""
    home = Path(engine.home)
    with engine.writing():  # the home's lock: no other process writes meanwhile
        base = base_of(engine.encoder)
        if version is not None:
            load_tuned(home, version, base)  # fails before anything changes
        if not is_tuned(engine.encoder) and engine.catalog.count_images():
            # what `reset` gives back (catalog views, power normalisation)
            engine.catalog.set_meta(BASE_STAMP_META, engine.encoder.stamp)
        set_active(home, version)
        encoder, store = engine.reload_model()  # new stamp: a fresh vector store
        catalog = engine.catalog
        catalog.set_meta("tuned", version or "")
        from_cache = _reembed_from_caches(home, base, encoder, catalog, store)
        report = IngestReport()
        reembed(catalog, store, encoder, report, progress=progress)
        store.save()
        engine.sync_vectors()
        return {"from_cache": from_cache, "from_files": int(report.updated + report.added)}


def reset(engine: Any, progress: bool = True) -> dict[str, int]:
    """Back to the base model (tuned models stay on disk)."""
    return use_model(engine, None, progress=progress)


def _reembed_from_caches(home: Path, base: Any, encoder: Any, catalog: Any, store: Any) -> int:
    """Give every catalog image whose features are cached its `encoder` vector, in the
    catalog and the vector store, without running the network; returns how many."""
    from_cache = 0
    finetuned = hasattr(encoder, "from_trunk_maps")
    if isinstance(encoder, CatalogViewEncoder):
        return 0  # the base with catalog views (lookalike.models.views): not in the caches
    # a fine-tuned model needs the trunk maps; the base model and a head need only
    # the base embedding, which both caches hold
    for kind in ("trunk",) if finetuned else ("trunk", "cells"):
        cache = FeatureCache.open(home, base, kind)
        if finetuned and not cache.has_spatial():
            continue
        colour = isinstance(encoder, TunedEncoder) and encoder.needs_colour
        if colour and not cache.has_colour():
            continue  # written before colours were kept: those images are read again
        stale = [
            (image_id, pid, src, sha)
            for image_id, pid, src, sha in catalog_images(catalog, except_stamp=encoder.stamp)
            if sha in cache
        ]
        for start in range(0, len(stale), 1024):
            chunk = stale[start : start + 1024]
            rows = cache.rows([c[3] for c in chunk])
            if finetuned:
                vectors = encoder.from_trunk_maps(cache.spatial[rows])
            elif isinstance(encoder, TunedEncoder):
                vectors = encoder.from_base_vectors(
                    cache.embeddings[rows], cache.colour[rows] if colour else None
                )
            else:
                vectors = cache.embeddings[rows]
            vectors = catalog_vectors(encoder, vectors, [c[3] for c in chunk])
            with catalog.transaction():
                for (_, pid, src, sha), vector in zip(chunk, vectors, strict=True):
                    catalog.put_image(pid, src, sha, vector, encoder.stamp)
            store.add(np.array([c[0] for c in chunk], dtype=np.int64), vectors)
            from_cache += len(chunk)
    return from_cache
