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
   each candidate pair is compared on pixels (`compare_images`): uniform borders
   trimmed, one image searched inside the other over a grid of scales and every offset
   (normalised cross-correlation of small greyscale thumbnails, mirror-aware), then the
   colours compared where they are aligned. A pair is a duplicate when its `score`
   (structure minus colour difference) reaches `threshold`.

Pairs that pass are joined into groups (union-find). By default only groups spanning
more than one product are reported; `within_products` also reports copies inside one
product. Nothing here prints: functions return report objects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
from PIL import Image

from .catalog import Catalog
from .errors import UsageError
from .images import load_image
from .vectors.base import VectorStore

MIN_SIMILARITY = 0.75
"""Embedding cosine a candidate pair needs (stage 1); measured in docs/duplicates.md."""
DEFAULT_THRESHOLD = 0.80
"""Verified `score` a pair needs to count as the same photo (stage 2)."""
NEIGHBOURS = 32  # nearest neighbours looked at per image
PROJECTED_DIM = 128
BATCH = 8192
EXACT_LIMIT = 60_000  # up to this many images the projected search is exact (flat)
THUMB = 40  # long side of the comparison thumbnails
SCALES = (1.0, 0.93, 0.86, 0.79, 0.72, 0.65, 0.58, 0.5)  # widths one is searched at in the other
TRIM = 0.15  # share of the worst-matching aligned pixels ignored (overlays, watermarks)
LIGHTNESS_WEIGHT = 0.5  # lightness counts half in the colour difference
CONTENT_L = 6.0  # lightness (0..100) that tells content from a plain background
COLOUR_WEIGHT = 0.02  # score = structure - COLOUR_WEIGHT * colour difference (Lab units)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as each batch finishes."""


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


# ------------------------------------------------------------------ stage 1: candidates


class VectorSource(Protocol):
    """Where stored vectors come from: the catalog, a FaissStore (`get`), or a file."""

    def ids(self) -> np.ndarray: ...

    def get(self, ids: np.ndarray) -> np.ndarray: ...


class CatalogVectors:
    """The catalog's stored vectors for one encoder stamp (works for every store backend)."""

    def __init__(self, catalog: Catalog, stamp: str):
        self.catalog = catalog
        self.stamp = stamp

    def ids(self) -> np.ndarray:
        return np.sort(self.catalog.embedded_ids(self.stamp))

    def get(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.vectors([int(i) for i in ids])


@dataclass
class Candidates:
    a: np.ndarray  # int64 image ids, a < b
    b: np.ndarray
    similarity: np.ndarray  # float32 cosine of the full vectors

    def __len__(self) -> int:
        return int(self.a.shape[0])


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _fit_projection(source: VectorSource, ids: np.ndarray, dim: int) -> faiss.PCAMatrix | None:
    """PCA to PROJECTED_DIM on a sample of the vectors (None when that would not shrink)."""
    if ids.size <= PROJECTED_DIM * 4 or dim <= PROJECTED_DIM:
        return None
    rng = np.random.default_rng(0)
    take = np.sort(rng.choice(ids, size=min(ids.size, 50_000), replace=False))
    pca = faiss.PCAMatrix(dim, PROJECTED_DIM)
    pca.train(np.ascontiguousarray(source.get(take), dtype=np.float32))
    return pca


def near_pairs(
    source: VectorSource,
    min_similarity: float = MIN_SIMILARITY,
    k: int = NEIGHBOURS,
    batch: int = BATCH,
    progress: Progress | None = None,
    nprobe: int = 8,
) -> Candidates:
    """Pairs of stored vectors with cosine >= min_similarity, each image's k nearest
    looked at (see the module docstring: a projected index, then exact re-scoring)."""
    if not -1.0 <= min_similarity <= 1.0:
        raise UsageError("min_similarity must be between -1 and 1")
    ids = np.asarray(source.ids(), dtype=np.int64)
    n = int(ids.size)
    empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    first = np.ascontiguousarray(source.get(ids[:1]), dtype=np.float32)
    dim = first.shape[1]
    pca = _fit_projection(source, ids, dim)
    pdim = pca.d_out if pca is not None else dim
    if n <= EXACT_LIMIT:
        index: faiss.Index = faiss.IndexFlatL2(pdim)
    else:
        nlist = int(min(16384, max(64, 2 ** round(np.log2(4 * np.sqrt(n))))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(pdim), nlist)
    projected = np.zeros((n, pdim), dtype=np.float32)  # what the index holds, kept once
    for start, stop in _batches(n, batch):
        vec = np.ascontiguousarray(source.get(ids[start:stop]), dtype=np.float32)
        projected[start:stop] = pca.apply(vec) if pca is not None else vec
        if progress:
            progress("read", stop, n)
    if isinstance(index, faiss.IndexIVFFlat):
        rng = np.random.default_rng(1)
        index.train(projected[np.sort(rng.choice(n, size=min(n, index.nlist * 40), replace=False))])
        index.nprobe = nprobe
    index.add(projected)
    radius = 2.0 - 2.0 * min_similarity + 1e-4  # squared L2 of unit vectors at that cosine
    kk = min(k + 1, n)
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    for start, stop in _batches(n, batch):
        dist, rows = index.search(projected[start:stop], kk)
        me = np.arange(start, stop)[:, None]
        keep = (rows > me) & (dist <= radius)  # each pair once, from its lower row
        qi, col = np.nonzero(keep)
        found_a.append(qi + start)
        found_b.append(rows[qi, col])
        if progress:
            progress("search", stop, n)
    del projected, index
    rows_a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
    rows_b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    if rows_a.size == 0:
        return empty
    pairs = np.unique(np.stack([rows_a, rows_b], 1).astype(np.int64), axis=0)
    sims = _exact_similarities(source, ids, pairs, batch)
    keep = sims >= min_similarity
    a, b = ids[pairs[keep, 0]], ids[pairs[keep, 1]]
    return Candidates(np.minimum(a, b), np.maximum(a, b), sims[keep])


def _exact_similarities(
    source: VectorSource, ids: np.ndarray, pairs: np.ndarray, batch: int
) -> np.ndarray:
    """Full-vector cosine of row pairs, reading the vectors a block of rows at a time."""
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs = pairs[order]
    sims = np.empty(pairs.shape[0], dtype=np.float32)
    for start, stop in _batches(pairs.shape[0], batch):
        chunk = pairs[start:stop]
        rows = np.unique(chunk)
        vec = np.asarray(source.get(ids[rows]), dtype=np.float32)
        pos = np.searchsorted(rows, chunk)
        sims[start:stop] = np.einsum("ij,ij->i", vec[pos[:, 0]], vec[pos[:, 1]])
    out = np.empty_like(sims)
    out[order] = sims
    return out


def store_neighbours(
    store: VectorStore,
    ids: np.ndarray,
    vectors: np.ndarray,
    min_similarity: float = MIN_SIMILARITY,
    k: int = NEIGHBOURS,
) -> Candidates:
    """Candidates between these (new) images and everything in the live vector store."""
    ids = np.asarray(ids, dtype=np.int64)
    pairs: dict[tuple[int, int], float] = {}
    for start, stop in _batches(ids.size, 1024):
        scores, found = store.search(np.asarray(vectors[start:stop], np.float32), k + 1)
        for row, image_id in enumerate(ids[start:stop].tolist()):
            for score, other in zip(scores[row].tolist(), found[row].tolist(), strict=True):
                if other >= 0 and other != image_id and score >= min_similarity:
                    key = (min(image_id, other), max(image_id, other))
                    pairs[key] = max(score, pairs.get(key, -1.0))
    keys = sorted(pairs)
    return Candidates(
        np.array([p[0] for p in keys], np.int64),
        np.array([p[1] for p in keys], np.int64),
        np.array([pairs[p] for p in keys], np.float32),
    )


# ---------------------------------------------------------------- stage 2: verification


@dataclass
class Thumb:
    """An image reduced for comparison: borders trimmed, long side THUMB px."""

    lum: np.ndarray  # float32 (h, w) lightness 0..100
    chroma: np.ndarray  # float32 (h, w, 2) Lab a, b

    @property
    def shape(self) -> tuple[int, int]:
        return self.lum.shape  # type: ignore[return-value]


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.float32) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    )
    xyz = c @ m.T / np.array([0.9505, 1.0, 1.089], dtype=np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def trim_borders(img: Image.Image, tolerance: int = 24) -> Image.Image:
    """Cut uniform borders (letterboxing, frames, studio white) down to the content."""
    small = img if max(img.size) <= 256 else img.copy()
    scale = 1.0
    if max(img.size) > 256:
        small.thumbnail((256, 256))
        scale = img.width / small.width
    arr = np.asarray(small, dtype=np.int16)
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(ring, axis=0)
    differs = np.abs(arr - background).max(axis=2) > tolerance
    rows, cols = np.nonzero(differs.any(axis=1))[0], np.nonzero(differs.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        return img
    box = (cols[0] * scale, rows[0] * scale, (cols[-1] + 1) * scale, (rows[-1] + 1) * scale)
    box = tuple(int(round(v)) for v in box)
    if box[2] - box[0] < 4 or box[3] - box[1] < 4:
        return img
    return img.crop(box)


def make_thumb(img: Image.Image, size: int = THUMB) -> Thumb:
    img = img.convert("RGB")
    inner = trim_borders(img)
    if inner.size != img.size and min(inner.size) > 16:  # a frame came off: the white inside
        edge = max(1, min(inner.size) // 50)  # the frame's blurred edge
        inner = trim_borders(inner.crop((edge, edge, inner.width - edge, inner.height - edge)))
    img = inner
    scale = size / max(img.size)
    w, h = max(4, round(img.width * scale)), max(4, round(img.height * scale))
    small = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    lab = _srgb_to_lab(np.asarray(small))
    return Thumb(np.ascontiguousarray(lab[..., 0]), np.ascontiguousarray(lab[..., 1:]))


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    if arr.ndim == 3:
        return np.stack([_resize(arr[..., c], w, h) for c in range(arr.shape[2])], -1)
    return np.asarray(Image.fromarray(arr, mode="F").resize((w, h), Image.Resampling.BILINEAR))


class _Frame:
    """A thumbnail prepared as the frame another is searched in: its FFT and the
    integral images of its lightness and squared lightness."""

    def __init__(self, thumb: Thumb):
        self.thumb = thumb
        self.fft = np.fft.rfft2(thumb.lum)
        self.c1 = np.pad(thumb.lum, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        self.c2 = np.pad(thumb.lum * thumb.lum, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def ncc(self, t: np.ndarray) -> tuple[float, int, int]:
        """Best normalised cross-correlation of template t over every offset: (value, i, j)."""
        x = self.thumb.lum
        hx, wx = x.shape
        ht, wt = t.shape
        t0 = t - t.mean()
        tnorm = float(np.sqrt((t0 * t0).sum()))
        if tnorm < 1e-3:
            return -1.0, 0, 0
        corr = np.fft.irfft2(self.fft * np.conj(np.fft.rfft2(t0, s=x.shape)), s=x.shape)
        corr = corr[: hx - ht + 1, : wx - wt + 1]
        s1 = _window(self.c1, ht, wt)
        var = np.maximum(_window(self.c2, ht, wt) - s1 * s1 / (ht * wt), 1e-3)
        m = corr / (tnorm * np.sqrt(var))
        pos = int(np.argmax(m))
        i, j = divmod(pos, m.shape[1])
        return float(m.flat[pos]), i, j


def _window(c: np.ndarray, h: int, w: int) -> np.ndarray:
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


@dataclass
class Comparison:
    score: float  # structure - COLOUR_WEIGHT * colour
    structure: float  # robust correlation of lightness where aligned, -1..1
    colour: float  # robust mean colour difference where aligned (Lab units, L halved)
    mirrored: bool


def _placements(x: Thumb, y: Thumb, scales: Sequence[float]) -> list[tuple[int, int]]:
    """Template sizes (w, h) for y inside x: y's own aspect kept, width a share of x's."""
    hx, wx = x.shape
    hy, wy = y.shape
    out = []
    for sx in scales:
        wt = round(wx * sx)
        ht = round(wt * hy / wy)
        if 6 <= wt <= wx and 6 <= ht <= hx:
            out.append((wt, ht))
    return out


def compare_thumbs(a: Thumb, b: Thumb, scales: Sequence[float] = SCALES) -> Comparison:
    """How surely a and b are the same photo: each searched inside the other (its aspect
    kept, at `scales` of the other's width, every offset, mirrored or not), then the
    aligned pixels compared robustly (the worst TRIM share ignored: a watermark or a
    logo covers part of a copy)."""
    best: tuple[float, Any] = (-2.0, None)
    for x, y in ((a, b), (b, a)):
        sizes = _placements(x, y, scales)
        if not sizes:
            continue
        frame = _Frame(x)
        for mirrored in (False, True):
            ylum = np.ascontiguousarray(y.lum[:, ::-1]) if mirrored else y.lum
            for wt, ht in sizes:
                value, i, j = frame.ncc(_resize(ylum, wt, ht))
                if value > best[0]:
                    best = (value, (x, y, mirrored, i, j, ht, wt))
    if best[1] is None:
        return Comparison(-1.0, -1.0, 100.0, False)
    x, y, mirrored, i, j, ht, wt = best[1]
    ylum, ych = (y.lum[:, ::-1], y.chroma[:, ::-1]) if mirrored else (y.lum, y.chroma)
    ylum = _resize(np.ascontiguousarray(ylum), wt, ht)
    ych = _resize(np.ascontiguousarray(ych), wt, ht)
    xl, xc = x.lum[i : i + ht, j : j + wt], x.chroma[i : i + ht, j : j + wt]
    # compare where there is something: pixels that stand out from either background
    # (studio white would otherwise make every two silhouettes alike)
    content = np.abs(xl - np.median(xl)) > CONTENT_L
    content |= np.abs(ylum - np.median(ylum)) > CONTENT_L
    if content.sum() < 16:
        content = np.ones_like(content)
    xs, ys = xl[content], ylum[content]
    zx = (xs - xs.mean()) / (xs.std() + 1.0)
    zy = (ys - ys.mean()) / (ys.std() + 1.0)
    keep = max(1, int(round(zx.size * (1 - TRIM))))
    err = np.partition((zx - zy) ** 2, keep - 1)[:keep]
    structure = float(1.0 - err.mean() / 2)
    tone = LIGHTNESS_WEIGHT * (xl - ylum)  # brown and black differ mostly in lightness
    cdiff = np.sqrt(((xc - ych) ** 2).sum(-1) + tone * tone)[content]
    colour = float(np.partition(cdiff, keep - 1)[:keep].mean())
    return Comparison(structure - COLOUR_WEIGHT * colour, structure, colour, mirrored)


class ThumbCache:
    """Thumbnails by image id, made on first use from the catalog's image files; the
    least recently used are dropped past `size`. An unreadable file gives None."""

    def __init__(self, path_of: Callable[[int], str | Path], size: int = 4096):
        self.path_of = path_of
        self.size = size
        self._items: OrderedDict[int, Thumb | None] = OrderedDict()

    def get(self, image_id: int) -> Thumb | None:
        if image_id in self._items:
            self._items.move_to_end(image_id)
            return self._items[image_id]
        try:
            thumb: Thumb | None = make_thumb(load_image(self.path_of(image_id), draft_size=128))
        except Exception:  # a file gone or broken since indexing: not comparable
            thumb = None
        self._items[image_id] = thumb
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return thumb


def verify(
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
    scored = verify(candidates, thumbs, _sha_lookup(catalog), progress)
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
