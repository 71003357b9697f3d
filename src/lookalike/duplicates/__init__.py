"""Duplicate products: catalog images that are the same photo, or a near-identical copy of
it (re-encoded, resized, cropped, padded, watermarked, mirrored, lightly recoloured).

Two stages (docs/duplicates.md has the measurements behind every default):

1. Candidates from the stored vectors, never an n x n matrix. The whole catalog:
   the vectors are streamed in batches into a small in-memory FAISS index over their
   first PROJECTED_DIM principal components (an orthonormal projection can only shrink
   distances, so a pair within cosine `min_similarity` in full space is within the same
   radius there), k nearest neighbours per image, and the pairs inside that radius are
   re-scored exactly with the full vectors. Memory: PROJECTED_DIM floats an image plus
   one batch. New images at ingest: k-nearest-neighbour search of the live vector store
   through the VectorStore interface (FAISS or Milvus).
2. Verification, which tells "the same photo" from "two photos of similar products":
   each candidate pair is compared on pixels (`verify.compare_thumbs`): uniform borders
   trimmed, one image searched inside the other over a grid of scales and every offset
   (normalised cross-correlation of small greyscale thumbnails, mirror-aware), then the
   colours compared where they are aligned. A pair is a duplicate when its `score`
   (structure minus colour difference) reaches `threshold`.

Pairs that pass are joined into groups (union-find). By default only groups spanning
more than one product are reported; `within_products` also reports copies inside one
product. Nothing here prints: functions return report objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import UsageError
from ..vectors.base import VectorStore
from .candidates import (
    MIN_SIMILARITY,
    NEIGHBOURS,
    Candidates,
    CatalogVectors,
    Progress,
    VectorSource,
    _batches,
    near_pairs,
)
from .verify import Thumb, ThumbCache, compare_thumbs, make_thumb

__all__ = [
    "DEFAULT_THRESHOLD",
    "MIN_SIMILARITY",
    "Candidates",
    "CatalogVectors",
    "DuplicateGroup",
    "DuplicateImage",
    "DuplicatePair",
    "DuplicatesReport",
    "Progress",
    "Thumb",
    "ThumbCache",
    "VectorSource",
    "compare_thumbs",
    "find_duplicates",
    "group_pairs",
    "make_thumb",
    "match_new",
    "near_pairs",
    "new_image_duplicates",
    "verify_pairs",
]

DEFAULT_THRESHOLD = 0.977
"""Verified `score` a pair needs to count as the same photo (stage 2)."""
INGEST_CHECK_LIMIT = 1_000  # `index` checks at most this many new images (about 70 ms each)

# ----------------------------------------------------------------------- reports


@dataclass
class DuplicateImage:
    image_id: int
    product_id: str
    image: str  # the image's source path

    def to_dict(self) -> dict[str, Any]:
        return {"product_id": self.product_id, "image": self.image, "image_id": self.image_id}


@dataclass
class DuplicateGroup:
    score: float  # the lowest verified score that joined the group
    images: list[DuplicateImage]

    @property
    def product_ids(self) -> list[str]:
        return sorted({image.product_id for image in self.images})

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "images": [i.to_dict() for i in self.images]}


@dataclass
class DuplicatePair:
    a: int  # image ids, a < b
    b: int
    similarity: float  # embedding cosine
    score: float  # verified score (higher: more surely the same photo)
    mirrored: bool = False


@dataclass
class DuplicatesReport:
    groups: list[DuplicateGroup]
    pairs: list[DuplicatePair]  # every verified pair that passed the threshold
    images: int  # images scanned
    candidates: int  # pairs verified on pixels
    threshold: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.to_dict() for g in self.groups],
            "images": self.images,
            "candidates": self.candidates,
            "threshold": self.threshold,
        }


def verify_pairs(
    candidates: Candidates,
    thumbs: ThumbCache,
    same_bytes: Callable[[int, int], bool] | None = None,
    progress: Progress | None = None,
) -> list[DuplicatePair]:
    """Every candidate pair with its verified score (not yet thresholded)."""
    out: list[DuplicatePair] = []
    n = len(candidates)
    order = np.lexsort((candidates.b, candidates.a))  # neighbouring pairs share thumbnails
    for done, row in enumerate(order.tolist(), 1):
        a, b = int(candidates.a[row]), int(candidates.b[row])
        similarity = float(candidates.similarity[row])
        if same_bytes is not None and same_bytes(a, b):
            out.append(DuplicatePair(a, b, similarity, 1.0))
        else:
            ta, tb = thumbs.get(a), thumbs.get(b)
            if ta is not None and tb is not None:
                c = compare_thumbs(ta, tb)
                out.append(DuplicatePair(a, b, similarity, c.score, c.mirrored))
        if progress and (done % 256 == 0 or done == n):
            progress("verify", done, n)
    return out


def group_pairs(
    pairs: Iterable[DuplicatePair], owner: Callable[[int], tuple[str, str]]
) -> list[DuplicateGroup]:
    """Union-find over the pairs; groups sorted by size then score, images by product."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    weakest: dict[int, float] = {}
    pairs = list(pairs)
    for p in pairs:
        ra, rb = find(p.a), find(p.b)
        if ra != rb:
            parent[rb] = ra
    for p in pairs:
        root = find(p.a)
        weakest[root] = min(weakest.get(root, 1.0), p.score)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    groups = []
    for root, ids in members.items():
        images = [DuplicateImage(i, *owner(i)) for i in sorted(ids)]
        images.sort(key=lambda im: (im.product_id, im.image_id))
        groups.append(DuplicateGroup(min(1.0, weakest.get(root, 1.0)), images))
    groups.sort(key=lambda g: (-len(g.images), -g.score, g.images[0].product_id))
    return groups


# ------------------------------------------------------------------------ entry points


def _owner_lookup(catalog: Catalog) -> Callable[[int], tuple[str, str]]:
    cache: dict[int, tuple[str, str]] = {}

    def owner(image_id: int) -> tuple[str, str]:
        if image_id not in cache:
            cache.update(catalog.image_products([image_id]))
        return cache.get(image_id, ("", ""))

    return owner


def _sha_lookup(catalog: Catalog) -> Callable[[int, int], bool]:
    def same(a: int, b: int) -> bool:
        ra, rb = catalog.image(a), catalog.image(b)
        return ra is not None and rb is not None and ra.sha256 == rb.sha256

    return same


def check_threshold(threshold: float) -> float:
    if not -1.0 <= float(threshold) <= 1.0:
        raise UsageError(f"threshold must be between -1 and 1, got {threshold}")
    return float(threshold)


def find_duplicates(
    catalog: Catalog,
    stamp: str,
    threshold: float = DEFAULT_THRESHOLD,
    within_products: bool = False,
    source: VectorSource | None = None,
    progress: Progress | None = None,
    min_similarity: float = MIN_SIMILARITY,
) -> DuplicatesReport:
    """Groups of catalog images that are the same photo (see the module docstring).
    `source` gives the stored vectors (default: the catalog's, for model `stamp`)."""
    import time

    threshold = check_threshold(threshold)
    source = source or CatalogVectors(catalog, stamp)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    candidates = near_pairs(source, min_similarity=min_similarity, progress=progress)
    seconds["candidates"] = time.perf_counter() - started
    owner = _owner_lookup(catalog)
    catalog_owners = catalog.image_products(
        sorted(set(candidates.a.tolist()) | set(candidates.b.tolist()))
    )
    if not within_products:  # pairs inside one product cannot make a cross-product group
        keep = np.array(
            [catalog_owners[a][0] != catalog_owners[b][0]
             for a, b in zip(candidates.a.tolist(), candidates.b.tolist(), strict=True)],
            dtype=bool,
        )  # fmt: skip
        if keep.size:
            candidates = Candidates(
                candidates.a[keep], candidates.b[keep], candidates.similarity[keep]
            )
    started = time.perf_counter()
    thumbs = ThumbCache(lambda i: catalog_owners[i][1])
    scored = verify_pairs(candidates, thumbs, _sha_lookup(catalog), progress)
    seconds["verify"] = time.perf_counter() - started
    passed = [p for p in scored if p.score >= threshold]
    groups = group_pairs(passed, owner)
    if not within_products:
        groups = [g for g in groups if len(g.product_ids) > 1]
    return DuplicatesReport(
        groups=groups,
        pairs=passed,
        images=int(np.asarray(source.ids()).size),
        candidates=len(candidates),
        threshold=threshold,
        seconds=seconds,
    )


def match_new(
    catalog: Catalog,
    store: VectorStore,
    vectors: np.ndarray,
    thumbs: Sequence[Thumb | None],
    products: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    min_similarity: float = MIN_SIMILARITY,
    exclude: Iterable[int] = (),
) -> list[tuple[int, int, float]]:
    """New images (their vectors, thumbnails and product ids) against the live store:
    (new row, other image id, score) for each image of another product that is the same
    photo. `exclude`: image ids not to report (the new images themselves)."""
    threshold = check_threshold(threshold)
    skip = {int(i) for i in exclude}
    k = min(NEIGHBOURS, max(1, len(store)))
    found: list[tuple[int, int, float]] = []
    for start, stop in _batches(len(thumbs), 1024):
        scores, hits = store.search(np.asarray(vectors[start:stop], np.float32), k)
        others = sorted({int(i) for i in hits.ravel().tolist() if i >= 0} - skip)
        owners = catalog.image_products(others)
        cache = ThumbCache(lambda i, owners=owners: owners[i][1], size=len(others) + 1)
        for row in range(stop - start):
            new = thumbs[start + row]
            if new is None:
                continue
            for score, other in zip(scores[row].tolist(), hits[row].tolist(), strict=True):
                owner = owners.get(int(other))
                if other < 0 or score < min_similarity or owner is None:
                    continue
                if owner[0] == products[start + row]:
                    continue
                thumb = cache.get(int(other))
                if thumb is not None:
                    verdict = compare_thumbs(new, thumb).score
                    if verdict >= threshold:
                        found.append((start + row, int(other), verdict))
    return found


def new_image_duplicates(
    catalog: Catalog,
    store: VectorStore,
    image_ids: Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
) -> list[DuplicateGroup]:
    """Images just indexed (already in the store) that are the same photo as an image of
    another product: one two-image group [new, other] a pair, each pair once."""
    ids = [int(i) for i in image_ids]
    if not ids or len(store) < 2:
        return []
    owners = catalog.image_products(ids)
    ids = [i for i in ids if i in owners]
    cache = ThumbCache(lambda i: owners[i][1], size=len(ids) + 1)
    groups: dict[tuple[int, int], DuplicateGroup] = {}
    owner = _owner_lookup(catalog)
    for start, stop in _batches(len(ids), 1024):
        chunk = ids[start:stop]
        vectors = catalog.vectors(chunk)
        thumbs = [cache.get(i) for i in chunk]
        products = [owners[i][0] for i in chunk]
        for row, other, score in match_new(catalog, store, vectors, thumbs, products, threshold):
            new = chunk[row]
            key = (min(new, other), max(new, other))
            if key not in groups or groups[key].score < score:
                images = [DuplicateImage(new, *owner(new)), DuplicateImage(other, *owner(other))]
                groups[key] = DuplicateGroup(min(1.0, score), images)
    return sorted(groups.values(), key=lambda g: (-g.score, g.images[0].image_id))


def pairs_to_groups(
    catalog: Catalog, new_ids: Sequence[int], matches: Sequence[tuple[int, int, float]]
) -> list[DuplicateGroup]:
    """`match_new` rows turned into [new, other] groups once the new images have ids."""
    owner = _owner_lookup(catalog)
    groups = [
        DuplicateGroup(
            min(1.0, score),
            [
                DuplicateImage(new_ids[row], *owner(new_ids[row])),
                DuplicateImage(other, *owner(other)),
            ],
        )
        for row, other, score in matches
    ]
    return sorted(groups, key=lambda g: -g.score)
