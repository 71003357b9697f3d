"""Photo prototypes of a `tune --photos` model: each catalog image's stored vector moved
towards the shop photos the tuned model itself finds nearest to it.

At the end of a `tune --photos` run (lookalike.tuning.train) every unlabelled photo is
embedded as a query of the new model, and shares itself out over the catalog images by a
softmax of its cosines to them (`temperature`). Each image's prototype is the normalised,
share-weighted mean of the photos; its stored vector becomes

    normalise(v + weight * prototype)

so the catalog stands where shop photos of its products fall, not only where its studio
shots do. No label is read (the shares are the model's own), nothing changes at query
time (same vectors, same cost). An image whose shares add up to less than MIN_SHARE
photos gets none, so the file grows with the photos, not with the catalog. The
prototypes are keyed by the image's content hash: the same image bytes get the same
vector in any product. An image added after the tune takes the prototype of a
prototyped image it is a copy of (its vector within COPY_SIMILARITY of that image's
vector before the move: a re-encoded or resized copy), so copies stay as close as
`lookalike duplicates` needs them; any other new image keeps its plain vector.
Measured in docs/quality.md ("Sixth round: photo prototypes").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..encoders.runtime import l2_normalise
from ..errors import ModelError
from ..fsutil import atomic_write

PROTOTYPES_FILE = "prototypes.npz"
WEIGHT = 1.0
"""How far a catalog vector moves towards its photo prototype (docs/quality.md)."""
TEMPERATURE = 0.1
"""Softmax temperature of a photo's shares over the catalog images."""
MIN_SHARE = 1.0
"""An image needs the shares of at least this many photos to get a prototype."""
COPY_SIMILARITY = 0.977
"""A new image this near (cosine) to a prototyped image's own vector is a copy of it and
takes its prototype: lookalike.duplicates.DEFAULT_THRESHOLD, the cosine a pair needs to be
a candidate copy (checked equal by the tests)."""


@dataclass
class PhotoPrototypes:
    """Prototypes (unit rows of `vectors`) of the catalog images whose content hashes are
    `sha256` and whose own vectors (before the move) are `own`, and the `weight` they are
    added with."""

    sha256: list[str]
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    own: np.ndarray  # (n, dim) float32: each image's vector before the move
    weight: float = WEIGHT
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.own = np.asarray(self.own, dtype=np.float32)
        n = len(self.sha256)
        if self.vectors.ndim != 2 or len(self.vectors) != n or self.own.shape != self.vectors.shape:
            raise ModelError("photo prototypes: one vector and one own vector per image hash")
        self._rows = {sha: i for i, sha in enumerate(self.sha256)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def build(
        cls,
        catalog: np.ndarray,
        catalog_sha256: Sequence[str],
        photos: np.ndarray,
        weight: float = WEIGHT,
        temperature: float = TEMPERATURE,
    ) -> PhotoPrototypes:
        """From the catalog images' vectors (unit rows, one per image; an image's bytes
        twice in the catalog count once) and the photos' query vectors, both of one model."""
        if temperature <= 0:
            raise ModelError("photo prototypes: the temperature must be above 0")
        catalog = l2_normalise(catalog)
        photos = l2_normalise(photos)
        if len(photos) == 0 or len(catalog) == 0:
            raise ModelError("photo prototypes need photos and catalog images")
        first: dict[str, int] = {}
        for i, sha in enumerate(catalog_sha256):
            first.setdefault(sha, i)
        shas = list(first)
        catalog = catalog[list(first.values())]
        totals = np.zeros(len(catalog))
        means = np.zeros(catalog.shape)
        for start in range(0, len(photos), 1024):  # in chunks of photos
            chunk = photos[start : start + 1024].astype(np.float64)
            scores = chunk @ catalog.T / temperature
            scores -= scores.max(axis=1, keepdims=True)
            shares = np.exp(scores)
            shares /= shares.sum(axis=1, keepdims=True)
            totals += shares.sum(axis=0)
            means += shares.T @ chunk
        keep = np.flatnonzero(totals >= MIN_SHARE)
        return cls([shas[i] for i in keep], l2_normalise(means[keep]), catalog[keep],
                   float(weight))  # fmt: skip

    def apply(self, vectors: np.ndarray, sha256: Sequence[str | None]) -> np.ndarray:
        """The stored vectors of catalog images: each row of `vectors` (unit, this
        model's) whose image hash has a prototype moved towards it, the others as they are."""
        out = np.array(vectors, dtype=np.float32, copy=True)
        if len(out) != len(sha256):
            raise ModelError("photo prototypes: one image hash per vector")
        if not self.weight or not len(self.sha256):
            return out
        rows = [(i, self._rows[s]) for i, s in enumerate(sha256) if s in self._rows]
        others = [i for i, s in enumerate(sha256) if s not in self._rows]
        if others:  # a copy of a prototyped image (re-encoded, resized) takes its prototype
            sims = out[others] @ self.own.T
            best, top = sims.argmax(axis=1), sims.max(axis=1)
            rows += [(i, int(b)) for i, b, t in zip(others, best, top, strict=True)
                     if t >= COPY_SIMILARITY]  # fmt: skip
        if rows:
            at, proto = (np.array(r) for r in zip(*rows, strict=True))
            out[at] = l2_normalise(out[at] + self.weight * self.vectors[proto])
        return out

    def digest(self) -> str:
        h = hashlib.sha256(b"photo-prototypes-v1")
        h.update(np.float32(self.weight).tobytes())
        for sha in self.sha256:
            h.update(sha.encode())
        h.update(np.ascontiguousarray(self.vectors, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.own, dtype=np.float32).tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        arrays = {"sha256": np.array(self.sha256, dtype="U64"), "vectors": self.vectors,
                  "own": self.own,
                  "weight": np.array([self.weight], dtype=np.float32)}  # fmt: skip
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: Path) -> PhotoPrototypes:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls([str(s) for s in z["sha256"]], z["vectors"], z["own"],
                           float(z["weight"][0]))  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"{path}: not a photo prototypes file ({exc})") from exc
