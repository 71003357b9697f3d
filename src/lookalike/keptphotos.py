"""The shopper photos a running server keeps, when asked to (`serve --keep-photos N`), so
that the stream of unlabelled photos a live shop receives can tune it later
(`tune --photos HOME/query-photos`, `calibrate HOME/query-photos`).

Each photo is kept as it was searched (cut to the crop box the shopper drew), as a JPEG
with no metadata (EXIF, GPS and all, are not written), at most `MAX_SIDE` pixels on a
side, under `<home>/query-photos/<YYYY-MM-DD>/<HHMMSS.ffffff>-<key>.jpg`: the names sort
in the order the photos came. The same upload (bytes and crop box) is kept once. Past
`limit` photos the oldest go first. Keeping a photo never fails a search: a full disk or
an unwritable folder is logged once and the search answers as before."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from .errors import UsageError
from .fsutil import atomic_write

KEPT_DIR = "query-photos"
MAX_SIDE = 1024
JPEG_QUALITY = 90
KEY_CHARS = 16
MIN_TO_CALIBRATE = 100
"""`serve --calibrate-every` calibrates on no fewer kept photos: on both burst splits of
train.csv, calibrating on 100 or more is not below uncalibrated, on 32 or 64 it is
(docs/api.md, `benchmarks/bench_calibrate_size.py`)."""
MIN_TO_TUNE = 700
"""`serve --tune-every` tunes on no fewer kept photos: on both burst splits of train.csv, a
tune on 700 or more beats the base calibrated on the same photos, on 500 and 300 it does
not on one split, on 100 on neither (docs/api.md, `benchmarks/bench_tune_size.py`)."""

log = logging.getLogger(__name__)


class KeptPhotos:
    """Keeps up to `limit` photos in `folder` (0: keeps none). Thread-safe, and shared:
    each keep and count reads the folder again, so servers on one home keep `limit`
    photos between them and the same upload once."""

    def __init__(self, folder: str | Path, limit: int):
        if limit < 0:
            raise UsageError(f"the number of photos to keep must be >= 0, not {limit}")
        self.folder = Path(folder)
        self.limit = limit
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def of_home(cls, home: str | Path, limit: int) -> KeptPhotos:
        return cls(Path(home) / KEPT_DIR, limit)

    def _scan(self) -> list[Path]:
        """The kept photos on disk now, oldest first (3-4 ms for 5,000)."""
        found: list[Path] = []
        try:
            days = [d for d in os.scandir(self.folder) if d.is_dir()]
        except OSError:
            return found
        for day in days:
            with contextlib.suppress(OSError):  # a day folder another process just emptied
                found += [Path(e.path) for e in os.scandir(day.path) if e.name.endswith(".jpg")]
        found.sort()
        return found

    def count(self) -> int:
        """How many photos are kept now (by this process and any other on the home)."""
        with self._lock:
            return len(self._scan())

    def keep(self, img: Image.Image, key: str, now: datetime | None = None) -> Path | None:
        """Keep `img` (a searched photo) under `key` (a hash of its upload and crop box).
        The path written, or None: keeping is off, the photo is kept already, or the
        write failed (logged the first time)."""
        if self.limit == 0:
            return None
        key = key[:KEY_CHARS]
        stamp = (now or datetime.now(UTC)).astimezone(UTC)
        path = self.folder / stamp.strftime("%Y-%m-%d") / f"{stamp:%H%M%S.%f}-{key}.jpg"
        small = _small_rgb(img)
        with self._lock:
            paths = self._scan()
            if any(_key_of(p) == key for p in paths):
                return None
            try:
                atomic_write(path, lambda fh: small.save(fh, "JPEG", quality=JPEG_QUALITY))
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot keep query photos in %s: %s", self.folder, exc)
                    self._failed = True
                return None
            paths.append(path)
            for old in paths[: max(0, len(paths) - self.limit)]:
                self._drop(old)
        return path

    def _drop(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError:
            pass  # another process took it, or the folder is not ours to tidy: left as is


def _key_of(path: Path) -> str:
    return path.stem.rpartition("-")[2]


def _small_rgb(img: Image.Image) -> Image.Image:
    """`img` as RGB, shrunk to at most MAX_SIDE on a side, without its metadata."""
    out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    out.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    out.info.clear()
    return out
