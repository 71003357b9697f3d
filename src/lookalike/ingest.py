"""Catalog ingest: walk -> hash -> skip unchanged -> decode in parallel -> batch encode ->
write catalog + vectors.

Each batch is written to the catalog in one SQLite transaction together with its
vectors, then added to the vector store. The catalog is the source of truth, so a run
killed at any point leaves a catalog that the next run (or the next `Engine.open`, which
re-syncs the vector store from the catalog) repairs: images committed before the kill
are unchanged and skipped, the rest are encoded again.

`writing()` (the engine's: the home's writer lock) is held around the writes — the plan's
transaction, the batches, the pruning — and let go at a batch boundary at least every
WRITE_SLICE seconds, so another process's writes (the server's) get their turn.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .catalog import Catalog, Product
from .errors import InputPathError, LookalikeError
from .fsutil import sha256_of
from .images import load_image
from .metadata import MetadataFile, read_metadata
from .models import catalog_vectors
from .vectors.base import VectorStore

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".heic", ".heif", ".avif",
}  # fmt: skip
BATCH_SIZE = 16
WRITE_SLICE = 1.0  # seconds of batches written under one hold of the writer lock
Writing = Callable[[], AbstractContextManager]


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    reused: int = 0  # identical bytes already embedded elsewhere: vector copied, not encoded
    products_updated: int = 0
    changed_products: list[str] = field(default_factory=list)  # fields changed, image moved in
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    metadata_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    encoded: int = 0
    seconds: float = 0.0
    # new images that are the same photo as another product's image (lookalike.duplicates):
    # {"score", "images": [new, other]} each; `rejected`: how many were taken out again
    duplicates: list[dict] = field(default_factory=list)
    rejected: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.metadata_errors

    def to_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "reused": self.reused,
            "products_updated": self.products_updated,
            "encoded": self.encoded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.encoded / self.seconds, 1) if self.seconds else None,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "metadata_errors": list(self.metadata_errors),
            "notes": list(self.notes),
            "duplicates": list(self.duplicates),
            "rejected_duplicates": self.rejected,
        }

    def summary(self) -> str:
        rate = (
            f" ({self.encoded / self.seconds:.1f} images/s)"
            if self.seconds and self.encoded
            else ""
        )
        lines = [
            f"indexed in {self.seconds:.1f}s{rate}: {self.added} added, {self.updated} updated,"
            f" {self.unchanged} unchanged, {self.removed} removed, {len(self.failed)} failed"
            + (
                f", {self.products_updated} products' metadata updated"
                if self.products_updated
                else ""
            )
        ]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        lines += [f"  skipped row: {err}" for err in self.metadata_errors]
        lines += [f"  note: {note}" for note in self.notes]
        if self.duplicates:
            verb = "rejected (not indexed)" if self.rejected else "kept"
            new = len({pair["images"][0]["image_id"] for pair in self.duplicates})
            lines.append(
                f"  duplicates: {new} new image(s) are the same photo as an"
                f" image of another product ({verb}; `lookalike duplicates` lists them all)"
            )
            for pair in self.duplicates[:10]:
                new, other = pair["images"]
                lines.append(
                    f"    {new['product_id']} {new['image']} = {other['product_id']}"
                    f" {other['image']} (score {pair['score']:.3f})"
                )
            if len(self.duplicates) > 10:
                lines.append(f"    ... {len(self.duplicates) - 10} more (--json lists them)")
        return "\n".join(lines)


@dataclass
class _Item:
    product_id: str
    path: Path
    origin: str
    sha256: str = ""
    image_id: int | None = None  # existing row for this source


def iter_image_files(root: Path) -> Iterator[Path]:
    """Image files below a folder, recursively, in a stable order (hidden entries skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def plan_items(
    paths: Iterable[str | Path], metadata: MetadataFile | None
) -> tuple[list[_Item], list[str]]:
    """What to index, and the walked folders. Every named path must exist (checked
    before anything is touched). Files named in the metadata take its product ids;
    others found by walking become products named after the file stem."""
    items: list[_Item] = []
    roots: list[str] = []
    seen: set[str] = set()
    if metadata is not None:
        for product_id, path in metadata.images:
            key = str(path)
            if key not in seen:
                seen.add(key)
                items.append(_Item(product_id, path, str(metadata.path)))
    resolved: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputPathError(f"no such file or folder: {raw}")
        if not os.access(path, os.R_OK):
            raise InputPathError(f"cannot read: {raw}")
        resolved.append(path.resolve())
    for path in resolved:
        files = [path] if path.is_file() else list(iter_image_files(path))
        origin = str(path)
        if path.is_dir():
            roots.append(origin)
        for file in files:
            key = str(file)
            if key not in seen:
                seen.add(key)
                items.append(_Item(file.stem, file, origin))
    return items, roots


def ingest(
    catalog: Catalog,
    store: VectorStore,
    encoder,
    paths: Iterable[str | Path] = (),
    metadata: str | Path | None = None,
    *,
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    workers: int = 2,
    prune: bool = True,
    on_batch: Callable[[int], None] | None = None,
    writing: Writing = contextlib.nullcontext,
    reencode: bool = False,
) -> IngestReport:
    """Bring the catalog in line with the given folders/files and metadata file.
    Unchanged images are not re-encoded, unless `reencode` (every given image is encoded
    again, for vectors made by a runtime that computed them wrongly: docs/models.md,
    "INT8 on CPUs without VNNI"); images gone from a folder or metadata file that
    was indexed before are removed (`prune`), unless that source had errors this run."""
    started = time.perf_counter()
    report = IngestReport()
    meta = read_metadata(metadata) if metadata is not None else None
    if meta is not None:
        report.metadata_errors = list(meta.errors)
    items, roots = plan_items(paths, meta)
    if not items and not roots and meta is None:
        raise InputPathError("nothing to index: give folders/files or --metadata FILE")

    # hash everything (I/O bound: threads)
    def hash_item(item: _Item) -> tuple[_Item, str | None]:
        try:
            if not item.path.is_file():
                return item, "file not found"
            if item.path.stat().st_size == 0:
                return item, "empty file"
            item.sha256 = sha256_of(item.path)
            return item, None
        except OSError as exc:
            return item, exc.strerror or str(exc)

    to_encode: list[_Item] = []
    failed_sources: set[str] = set()
    stamp = encoder.stamp
    with ThreadPoolExecutor(max_workers=4) as pool:
        hashed = list(pool.map(hash_item, items))
    meta_products = meta.products if meta is not None else {}
    with writing(), catalog.transaction():
        for item, error in hashed:
            if error is not None:
                report.failed.append((str(item.path), error))
                failed_sources.add(str(item.path))
                continue
            row = catalog.image_by_source(str(item.path))
            unchanged = row is not None and row.sha256 == item.sha256 and row.stamp == stamp
            if unchanged and not reencode:
                report.unchanged += 1
                _ensure_product(catalog, item.product_id, meta_products, meta, report)
                if row.product_id != item.product_id:
                    catalog.set_image_product(row.image_id, item.product_id)
                    report.changed_products.append(item.product_id)
                continue
            item.image_id = None if row is None else row.image_id
            reused = None if reencode else catalog.vector_by_sha(item.sha256, stamp)
            if reused is not None:
                _ensure_product(catalog, item.product_id, meta_products, meta, report)
                image_id, created = catalog.put_image(
                    item.product_id, str(item.path), item.sha256, reused, stamp, item.origin
                )
                store.add(np.array([image_id], dtype=np.int64), reused[None, :])
                report.reused += 1
                report.added += created
                report.updated += not created
                continue
            to_encode.append(item)
        # metadata for products whose images did not change still updates
        if meta is not None:
            for product in meta.products.values():
                if catalog.find_product(product.product_id) is not None:
                    if catalog.upsert_product(product, replace_fields=meta.fields):
                        report.changed_products.append(product.product_id)
                    report.products_updated += 1

    _encode_items(
        catalog, store, encoder, to_encode, report, meta_products, meta,
        progress=progress, batch_size=batch_size, workers=workers, on_batch=on_batch,
        writing=writing,
    )  # fmt: skip
    failed_sources.update(path for path, _ in report.failed)

    if prune:
        origins = list(roots)
        if meta is not None:
            if meta.errors:
                report.notes.append(
                    f"{meta.path} has malformed rows: images it no longer lists were kept"
                )
            else:
                origins.append(str(meta.path))
        planned = {str(item.path) for item in items}
        gone: list[int] = []
        for origin in origins:
            gone += [
                row.image_id
                for row in catalog.images_from(origin)
                if row.source not in planned and row.source not in failed_sources
            ]
        if gone:
            with writing():
                catalog.remove_images(gone)
                store.remove(np.array(gone, dtype=np.int64))
            report.removed = len(gone)
    store.save()
    report.seconds = time.perf_counter() - started
    return report


def _ensure_product(
    catalog: Catalog,
    product_id: str,
    meta_products: dict[str, Product],
    meta: MetadataFile | None,
    report: IngestReport,
) -> None:
    """Create or update the product an image belongs to; a product whose fields changed
    is recorded in `report.changed_products` (its other images' filter payload is
    re-sent)."""
    product = meta_products.get(product_id)
    if product is not None:
        existed = catalog.find_product(product_id) is not None
        changed = catalog.upsert_product(product, replace_fields=meta.fields if meta else None)
        if existed and changed:  # a new product's images all go in with their payload
            report.changed_products.append(product_id)
    elif catalog.find_product(product_id) is None:
        catalog.upsert_product(Product(product_id=product_id))


def _encode_items(
    catalog: Catalog,
    store: VectorStore,
    encoder,
    items: list[_Item],
    report: IngestReport,
    meta_products: dict[str, Product],
    meta: MetadataFile | None,
    *,
    progress: bool,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None] | None,
    writing: Writing = contextlib.nullcontext,
) -> None:
    """Decode in a thread pool (Pillow releases the GIL while decoding and resizing)
    while the encoder works on the previous batch; write each batch in one transaction."""
    if not items:
        return
    draft = encoder.draft_size

    def decode(item: _Item) -> tuple[_Item, np.ndarray | None, str | None]:
        try:
            return item, encoder.prepare(load_image(item.path, draft_size=draft)), None
        except LookalikeError as exc:
            return item, None, str(exc)
        except Exception as exc:  # a decoder bug on a hostile file must not stop the run
            return item, None, f"{type(exc).__name__}: {exc}"

    bar = tqdm(
        total=len(items), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, _Slices(writing) as slices:
        # bounded look-ahead: at most a few batches decoded ahead of the encoder
        pending = _bounded_map(pool, decode, items, ahead=batch_size * 3)
        batch: list[tuple[_Item, np.ndarray]] = []
        for item, array, error in pending:
            if error is not None:
                report.failed.append((str(item.path), error))
                bar.update(1)
            else:
                batch.append((item, array))
            if len(batch) >= batch_size:
                _write_batch(catalog, store, encoder, batch, report, meta_products, meta, slices)
                bar.update(len(batch))
                batch = []
                if on_batch is not None:
                    on_batch(report.encoded)
        if batch:
            _write_batch(catalog, store, encoder, batch, report, meta_products, meta, slices)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(report.encoded)
    bar.close()


def _write_batch(
    catalog: Catalog,
    store: VectorStore,
    encoder,
    batch: list[tuple[_Item, np.ndarray]],
    report: IngestReport,
    meta_products: dict[str, Product],
    meta: MetadataFile | None,
    slices: _Slices,
) -> None:
    vectors = encoder.embed(np.stack([array for _, array in batch]))
    vectors = catalog_vectors(encoder, vectors, [item.sha256 for item, _ in batch])
    ids: list[int] = []
    slices.hold()
    with catalog.transaction():
        for (item, _), vector in zip(batch, vectors, strict=True):
            _ensure_product(catalog, item.product_id, meta_products, meta, report)
            image_id, created = catalog.put_image(
                item.product_id, str(item.path), item.sha256, vector, encoder.stamp,
                item.origin or None,
            )  # fmt: skip
            ids.append(image_id)
            report.added += created
            report.updated += not created
    store.add(np.array(ids, dtype=np.int64), vectors)
    report.encoded += len(batch)
    slices.turn()


class _Slices:
    """`writing()` held over consecutive batches for up to WRITE_SLICE seconds, then let
    go at a batch boundary (and at the end), so that other processes' writes get their
    turn while the next batch is encoded. An error inside leaves it without a save."""

    def __init__(self, writing: Writing, seconds: float = WRITE_SLICE) -> None:
        self._writing, self._seconds = writing, seconds
        self._stack = contextlib.ExitStack()
        self._until: float | None = None

    def hold(self) -> None:
        if self._until is None:
            self._stack.enter_context(self._writing())
            self._until = time.monotonic() + self._seconds

    def turn(self) -> None:
        if self._until is not None and time.monotonic() >= self._until:
            self._until = None
            self._stack.close()

    def __enter__(self) -> _Slices:
        return self

    def __exit__(self, *exc: object) -> bool | None:
        self._until = None
        return self._stack.__exit__(*exc)


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list, ahead: int):
    """Like pool.map, in order, but never more than `ahead` tasks in flight."""
    futures = []
    iterator = iter(items)
    for item in iterator:
        futures.append(pool.submit(fn, item))
        if len(futures) >= ahead:
            break
    while futures:
        result = futures.pop(0).result()
        nxt = next(iterator, None)
        if nxt is not None:
            futures.append(pool.submit(fn, nxt))
        yield result


def reembed(
    catalog: Catalog,
    store: VectorStore,
    encoder,
    report: IngestReport,
    *,
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    workers: int = 2,
    writing: Writing = contextlib.nullcontext,
) -> None:
    """Re-encode every catalog image whose vector was made by another model (after a
    model switch or tuning), from its source file. An image whose file is gone is
    reported and keeps no vector until it can be read again."""
    stale: list[_Item] = []
    for rows in catalog.iter_images():
        for row in rows:
            if row.stamp != encoder.stamp:
                stale.append(_Item(row.product_id, Path(row.source), "", row.sha256, row.image_id))
    if not stale:
        return
    started = time.perf_counter()
    # every stale image already has its row, so _write_batch counts them as updated
    _encode_items(
        catalog, store, encoder, stale, report, {}, None,
        progress=progress, batch_size=batch_size, workers=workers, on_batch=None,
        writing=writing,
    )  # fmt: skip
    report.seconds += time.perf_counter() - started
