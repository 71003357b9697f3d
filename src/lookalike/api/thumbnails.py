"""Thumbnails of catalog images for result grids, and a small cache of them."""

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from ..images import load_image
from .limits import Limits


class ThumbnailCache:
    """Small LRU of encoded thumbnails keyed by (image_id, size, file mtime)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def make_thumbnail(path: Path, size: int, limits: Limits) -> bytes:
    img = load_image(path, max_pixels=limits.max_image_pixels, draft_size=size)
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
