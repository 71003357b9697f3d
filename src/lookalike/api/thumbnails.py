"""Thumbnails of catalog images for result grids, and a small cache of them."""

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from ..images import load_image
from .limits import Limits


class ThumbnailCache:
    """LRU of encoded thumbnails keyed by (image_id, size, file mtime, file size),
    bounded by the bytes it holds (`capacity_bytes`), not by the number of entries."""

    def __init__(self, capacity_bytes: int = 64 * 1024 * 1024):
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.capacity_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.capacity_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


def make_thumbnail(path: Path, size: int, limits: Limits) -> bytes:
    img = load_image(path, max_pixels=limits.max_image_pixels, draft_size=size)
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
