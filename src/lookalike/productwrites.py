"""Product writes through the API and `Engine.add_product`: adding a product with its
uploaded images (decoded and embedded before anything is written, same-photo copies
reported or refused), updating its fields, removing products (a mixin of
`lookalike.engine.Engine`; every write holds the home's writer lock, `SharedHome.writing`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import duplicates
from .catalog import Catalog, Product
from .errors import DuplicateImageError, ImageInUseError, ProductExistsError, UsageError
from .images import load_image, probe_image
from .metadata import parse_bool, parse_price, product_from_fields
from .models import catalog_vectors


class ProductWrites:
    """The product writes of an Engine. Expects from it: home, catalog, encoder, store,
    _store, vector_store_uri, writing(), _switch_model_if_needed(), _payload_changing(),
    _refresh_payload()."""

    home: Path
    catalog: Catalog
    _store: Any

    def add_product(self, fields: dict[str, Any], images: Sequence[bytes | os.PathLike]) -> Product:
        """Add one product with one or more images (bytes of uploads, or paths). Every
        image is decoded before anything is written: a bad one adds nothing."""
        return self.add_product_checked(fields, images)[0]

    def add_product_checked(
        self,
        fields: dict[str, Any],
        images: Sequence[bytes | os.PathLike],
        reject_duplicates: bool = False,
    ) -> tuple[Product, list[duplicates.DuplicateGroup]]:
        """`add_product`, and the new images that are the same photo as an image of
        another product ([new, other] groups). With `reject_duplicates` such a product is
        refused (DuplicateImageError) and nothing is written."""
        product = product_from_fields(fields)
        if not images:
            raise UsageError("a product needs at least one image")
        decoded, seen = [], set()
        for index, image in enumerate(images):
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            try:
                pil = load_image(data)
                suffix = probe_image(data).suffix  # stored under its real type
            except Exception as exc:
                exc.args = (f"image {index + 1}: {exc}",)
                raise
            path = self.home / "uploads" / f"{hashlib.sha256(data).hexdigest()}{suffix}"
            if path not in seen:  # the same photo twice in one request is one image
                seen.add(path)
                decoded.append((data, pil, path))
        self._refuse_existing(product.product_id)
        self._refuse_shared(decoded)
        # encode outside the lock, so searches go on meanwhile
        encoder = self.encoder
        vectors = _catalog_side(encoder, decoded)
        with self.writing():
            self._switch_model_if_needed()
            self._refuse_existing(product.product_id)
            self._refuse_shared(decoded)
            if self.encoder.stamp != encoder.stamp:  # the model changed meanwhile (tune)
                encoder = self.encoder
                vectors = _catalog_side(encoder, decoded)
            thumbs = [duplicates.make_thumb(pil) for _, pil, _ in decoded]
            matches = duplicates.match_new(
                self.catalog, self._store, vectors, thumbs, [product.product_id] * len(thumbs)
            )
            if reject_duplicates and matches:
                raise DuplicateImageError(_refusal(matches, self.catalog))
            (self.home / "uploads").mkdir(exist_ok=True)
            ids = []
            with self.catalog.transaction():
                self.catalog.upsert_product(product)
                for (data, _, path), vector in zip(decoded, vectors, strict=True):
                    sha = path.stem
                    if not path.exists():
                        tmp = path.with_suffix(".tmp")
                        tmp.write_bytes(data)
                        os.replace(tmp, path)
                    image_id, _ = self.catalog.put_image(
                        product.product_id, str(path), sha, vector, encoder.stamp, origin="api"
                    )
                    ids.append(image_id)
            self._store.add(np.array(ids, dtype=np.int64), vectors)
        return product, duplicates.pairs_to_groups(self.catalog, ids, matches)

    def _refuse_existing(self, product_id: str) -> None:
        if self.catalog.find_product(product_id) is not None:
            raise ProductExistsError(
                f"product {product_id} already exists (PATCH it, or DELETE it first)"
            )

    def _refuse_shared(self, decoded: list[tuple[bytes, Any, Path]]) -> None:
        """An uploaded photo is the image of one product: the same photo for a second
        product is refused (409) rather than moved from the first."""
        for number, (_, _, path) in enumerate(decoded, start=1):
            row = self.catalog.image_by_source(str(path))
            if row is not None:
                raise ImageInUseError(
                    f"image {number} is already the photo of product {row.product_id}"
                    f" (image {row.image_id}); one uploaded photo belongs to one product"
                )

    def _remove_unused_uploads(self, sources: Iterable[str]) -> None:
        """Delete the upload files of `sources` that no catalog image uses any more."""
        uploads = (self.home / "uploads").resolve()
        for source in dict.fromkeys(sources):
            path = Path(source)
            if path.resolve().parent == uploads and self.catalog.image_by_source(source) is None:
                path.unlink(missing_ok=True)

    def update_product(self, product_id: str, fields: dict[str, Any]) -> Product:
        changes = dict(fields)
        if "price" in changes and changes["price"] is not None:
            try:
                changes["price"] = parse_price(changes["price"])
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if "in_stock" in changes:
            try:
                changes["in_stock"] = parse_bool(changes["in_stock"])
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        with self.writing():
            if self._store is None and (self.vector_store_uri or "faiss") != "faiss":
                # not opened here: the next opening re-sends all the filter payload
                self.catalog.set_meta("payload_dirty", "1")
            payload = self._payload_changing()
            product = self.catalog.update_product(product_id, changes)
            if payload:
                self._refresh_payload([product_id])
            return product

    def remove(self, product_ids: Sequence[str]) -> int:
        """Remove products (all or nothing): gone from results at once. Returns how many
        images were removed."""
        with self.writing():
            store = self.store
            sources = [r.source for pid in product_ids for r in self.catalog.images_of(pid)]
            image_ids = self.catalog.remove_products(list(product_ids))
            if image_ids:
                store.remove(np.array(image_ids, dtype=np.int64))
            self._remove_unused_uploads(sources)
            return len(image_ids)


def _catalog_side(encoder: Any, decoded: list[tuple[bytes, Any, Path]]) -> np.ndarray:
    """The vectors to store for the decoded (bytes, image, path) uploads; a path's stem
    is the sha256 of its bytes."""
    vectors = encoder.embed(np.stack([encoder.prepare(pil) for _, pil, _ in decoded]))
    return catalog_vectors(encoder, vectors, [path.stem for _, _, path in decoded])


def _refusal(matches: list[tuple[int, int, float]], catalog: Catalog) -> str:
    owners = catalog.image_products(sorted({other for _, other, _ in matches}))
    row, other, score = max(matches, key=lambda m: m[2])
    return (
        f"image {row + 1} is the same photo as image {other} of product"
        f" {owners[other][0]} (score {score:.3f}); not added (duplicates were refused)"
    )
