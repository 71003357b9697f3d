"""The Engine ties one home folder's catalog, encoder and vector store together. The CLI
and the API both talk to it; it is safe to call from several threads.

Home folder layout: `catalog.sqlite` (the truth: products, images, vectors, model
stamp), `vectors/` (the FAISS index, derived from the catalog and repaired from it on
open), `models/` (exported ONNX models, tuned heads), `uploads/` (images added through
the API).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import duplicates
from .catalog import Catalog, Filters, Product
from .encoders import DEFAULT_MODEL
from .errors import (
    CatalogMismatchError,
    DuplicateImageError,
    ProductExistsError,
    UnknownImageError,
    UsageError,
)
from .images import load_image
from .ingest import IngestReport, ingest, reembed
from .metadata import parse_bool, parse_price
from .search import Result, check_k, rank_products
from .vectors import open_store
from .vectors.base import VectorStore

QuerySource = str | os.PathLike | bytes | Image.Image


def default_home() -> Path:
    return Path(os.environ.get("LOOKALIKE_HOME") or "lookalike-home")


class Engine:
    def __init__(
        self,
        home: str | os.PathLike | None = None,
        model: str | None = None,
        vector_store: str | None = None,
        memory_budget: int | None = None,
    ):
        self.home = Path(home) if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.home / "catalog.sqlite")
        self.requested_model = model
        self.vector_store_uri = vector_store or self.catalog.get_meta("vector_store") or None
        self.memory_budget = memory_budget
        self._encoder = None
        self._store: VectorStore | None = None
        self._lock = threading.RLock()  # guards the vector store and model switches
        self._followed: str | None = None
        self._duplicates_cache: tuple[tuple, duplicates.DuplicatesReport] | None = None

    @classmethod
    def open(cls, home=None, model: str | None = None, vector_store: str | None = None, **kw):
        return cls(home, model=model, vector_store=vector_store, **kw)

    # -- model and store ------------------------------------------------------------
    @property
    def model(self) -> str:
        """The base model spec this catalog uses (or will use)."""
        return self.requested_model or self.catalog.get_meta("model") or DEFAULT_MODEL

    @property
    def models_dir(self) -> Path:
        """Exported and tuned models; $LOOKALIKE_MODELS lets several homes share exports."""
        return Path(os.environ.get("LOOKALIKE_MODELS") or self.home / "models")

    @property
    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from .encoders import load_encoder

                encoder = load_encoder(self.model, self.models_dir)
                self._encoder = _active_encoder(self.home, encoder)
            return self._encoder

    def _check_model_matches(self) -> None:
        """Searching with one model against vectors from another must never happen."""
        stored = self.catalog.get_meta("stamp")
        if stored is not None and stored != self.encoder.stamp and self.catalog.count_images():
            raise CatalogMismatchError(
                f"the catalog in {self.home} was indexed with {self.catalog.get_meta('model')}"
                f" ({stored}); this search uses {self.encoder.stamp}. Re-run `lookalike index`"
                " with the model you want to re-embed the catalog."
            )

    def _follow_catalog_model(self) -> None:
        """A long-running engine (`lookalike serve`) picks up a model switch that another
        process made (`tune`, `tune --reset`, re-indexing with another model): when the
        catalog's stamp is no longer the loaded encoder's, drop the encoder and the
        in-memory index (not saved: it is stale) and load the live ones."""
        if self._encoder is None or self.requested_model is not None:
            return
        stored = self.catalog.get_meta("stamp")
        if stored is None or stored == self._encoder.stamp or stored == self._followed:
            return
        with self._lock:
            self._followed = stored
            if self._store is not None and hasattr(self._store, "wait_for_rebuild"):
                self._store.wait_for_rebuild()
            self._encoder = None
            self._store = None

    def _open_store(self, reset: bool = False) -> VectorStore:
        encoder = self.encoder
        store = open_store(
            self.vector_store_uri,
            self.home,
            encoder.dim,
            encoder.stamp,
            reset=reset,
            memory_budget_bytes=self.memory_budget,
        )
        if getattr(store, "backend", None) == "milvus":
            store = PayloadStore(store, self.catalog)
        return store

    @property
    def store(self) -> VectorStore:
        with self._lock:
            if self._store is None:
                self._check_model_matches()
                try:
                    self._store = self._open_store()
                except CatalogMismatchError:
                    # the store lags behind the catalog (e.g. killed during a model switch):
                    # the catalog is the truth, rebuild the store from it
                    self._store = self._open_store(reset=True)
                self.sync_vectors()
                if self.catalog.get_meta("payload_dirty"):
                    self._refresh_payload()
            return self._store

    def sync_vectors(self) -> dict[str, int]:
        """Make the vector store hold exactly the catalog's vectors for the live model:
        add what it misses (a run killed before the store was saved), drop what the
        catalog no longer has."""
        with self._lock:
            store = self._store if self._store is not None else self.store
            stamp = self.encoder.stamp
            want = self.catalog.embedded_ids(stamp)
            have = store.ids()
            missing = np.setdiff1d(want, have, assume_unique=True)
            extra = np.setdiff1d(have, want, assume_unique=True)
            if extra.size:
                store.remove(extra)
            for start in range(0, missing.size, 4096):
                chunk = missing[start : start + 4096]
                store.add(chunk, self.catalog.vectors(chunk.tolist()))
            if missing.size or extra.size:
                store.save()
            return {"added": int(missing.size), "removed": int(extra.size)}

    def _payload_changing(self) -> bool:
        """Before product fields change: if the store keeps them as filter payload, mark
        it stale until `_refresh_payload` has run (a crash in between is repaired on the
        next open)."""
        if isinstance(self._store, PayloadStore):
            self.catalog.set_meta("payload_dirty", "1")
            return True
        return False

    def _refresh_payload(self, product_ids: Iterable[str] | None = None) -> None:
        """Re-send the filter payload (product fields) of these products' images, or of
        every image, to a store that keeps it."""
        store = self._store
        if isinstance(store, PayloadStore):
            if product_ids is None:
                batches = ([row.image_id for row in rows] for rows in self.catalog.iter_images())
            else:
                ids = [row.image_id for pid in product_ids for row in self.catalog.images_of(pid)]
                batches = (ids[i : i + 1000] for i in range(0, len(ids), 1000))
            stamp = self.encoder.stamp
            live = set(self.catalog.embedded_ids(stamp).tolist())
            for batch in batches:
                batch = [i for i in batch if i in live]
                if batch:
                    store.add(np.array(batch, dtype=np.int64), self.catalog.vectors(batch))
        self.catalog.set_meta("payload_dirty", "")

    @property
    def lock(self) -> threading.RLock:
        """Held around anything that swaps the model or the vector store."""
        return self._lock

    def reload_model(self) -> tuple[Any, VectorStore]:
        """Resolve the live model again (after `models.set_active` changed it) and open the
        vector store for its stamp: a fresh, empty one when the stamp changed. Hold `lock`
        around this and the re-embedding that follows. Returns (encoder, store)."""
        with self._lock:
            self._encoder = None
            self._switch_model_if_needed()
            return self.encoder, self._store

    def _switch_model_if_needed(self) -> None:
        stored_stamp = self.catalog.get_meta("stamp")
        encoder = self.encoder
        if stored_stamp != encoder.stamp:
            # a new model: a fresh store; every image gets re-embedded below
            if self._store is not None and hasattr(self._store, "close"):
                self._store.close()
            self._store = self._open_store(reset=True)
        else:
            _ = self.store
        self.catalog.set_meta("model", self.model)
        self.catalog.set_meta("stamp", encoder.stamp)
        self.catalog.set_meta("dim", str(encoder.dim))
        self.catalog.set_meta("tuned", getattr(encoder, "version", "") or "")
        if self.vector_store_uri:
            self.catalog.set_meta("vector_store", self.vector_store_uri)

    # -- ingest and updates ---------------------------------------------------------
    def index(
        self,
        paths: Iterable[str | os.PathLike] = (),
        metadata: str | os.PathLike | None = None,
        progress: bool = True,
        reject_duplicates: bool = False,
        **kw: Any,
    ) -> IngestReport:
        """Index folders/files and/or a metadata file (see lookalike.ingest). New images
        that are the same photo as another product's image are reported
        (`report.duplicates`), and with `reject_duplicates` taken out again."""
        with self._lock:
            self._switch_model_if_needed()
            before = self.catalog.max_image_id()
            payload = metadata is not None and self._payload_changing()
            report = ingest(
                self.catalog, self._store, self.encoder, paths, metadata, progress=progress, **kw
            )
            reembed(self.catalog, self._store, self.encoder, report, progress=progress)
            if payload:
                # new and re-encoded images went in with their payload; the products
                # whose fields changed need theirs re-sent for their other images
                self._refresh_payload(dict.fromkeys(report.changed_products))
            self._check_new_images(before, report, reject_duplicates)
            self._store.save()
            return report

    def _check_new_images(self, before: int, report: IngestReport, reject: bool) -> None:
        """Report (or reject) images above id `before` that copy another product's image."""
        new = self.catalog.embedded_ids(self.encoder.stamp)
        new = np.sort(new[new > before])
        if new.size > duplicates.INGEST_CHECK_LIMIT:
            report.notes.append(
                f"{new.size:,} new images: not checked for duplicates one by one; run"
                " `lookalike duplicates` for the whole catalog"
            )
            return
        groups = duplicates.new_image_duplicates(self.catalog, self._store, new.tolist())
        report.duplicates = [group.to_dict() for group in groups]
        if reject and groups:
            refused = sorted({group.images[0].image_id for group in groups})
            self.catalog.remove_images(refused)
            self._store.remove(np.array(refused, dtype=np.int64))
            report.rejected = len(refused)
            report.added -= len(refused)

    def duplicates(
        self,
        threshold: float | None = None,
        within_products: bool = False,
        progress: duplicates.Progress | None = None,
    ) -> duplicates.DuplicatesReport:
        """Groups of catalog images that are the same photo (lookalike.duplicates). The
        last report is kept until the catalog changes, so pages of it come cheap."""
        threshold = duplicates.DEFAULT_THRESHOLD if threshold is None else threshold
        self._follow_catalog_model()
        store = self.store
        key = (
            self.encoder.stamp,
            self.catalog.count_images(),
            self.catalog.max_image_id(),
            float(threshold),
            bool(within_products),
        )
        cached = self._duplicates_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        with self._lock:
            source = store if hasattr(store, "get") else None  # FAISS: its vector log
            report = duplicates.find_duplicates(
                self.catalog,
                self.encoder.stamp,
                threshold=threshold,
                within_products=within_products,
                source=source,
                progress=progress,
            )
        self._duplicates_cache = (key, report)
        return report

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
        product = _product_from_fields(fields)
        if not images:
            raise UsageError("a product needs at least one image")
        decoded = []
        for index, image in enumerate(images):
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            try:
                pil = load_image(data)
            except Exception as exc:
                exc.args = (f"image {index + 1}: {exc}",)
                raise
            decoded.append((data, pil))
        self._refuse_existing(product.product_id)
        # encode outside the lock, so searches go on meanwhile
        encoder = self.encoder
        vectors = encoder.embed(np.stack([encoder.prepare(pil) for _, pil in decoded]))
        with self._lock:
            self._switch_model_if_needed()
            self._refuse_existing(product.product_id)
            if self.encoder.stamp != encoder.stamp:  # the model changed meanwhile (tune)
                encoder = self.encoder
                vectors = encoder.embed(np.stack([encoder.prepare(pil) for _, pil in decoded]))
            thumbs = [duplicates.make_thumb(pil) for _, pil in decoded]
            matches = duplicates.match_new(
                self.catalog, self._store, vectors, thumbs, [product.product_id] * len(thumbs)
            )
            if reject_duplicates and matches:
                raise DuplicateImageError(_refusal(matches, self.catalog))
            uploads = self.home / "uploads"
            uploads.mkdir(exist_ok=True)
            ids = []
            with self.catalog.transaction():
                self.catalog.upsert_product(product)
                for (data, pil), vector in zip(decoded, vectors, strict=True):
                    sha = hashlib.sha256(data).hexdigest()
                    path = uploads / f"{sha}.{(pil.format or 'img').lower()}"
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
        with self._lock:
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
        with self._lock:
            image_ids = self.catalog.remove_products(list(product_ids))
            if image_ids:
                # no save here: the catalog is the truth, the store is saved on close()
                # and re-synced from the catalog on open if the process dies first
                self.store.remove(np.array(image_ids, dtype=np.int64))
            return len(image_ids)

    # -- reading ----------------------------------------------------------------------
    def embed_queries(self, queries: Sequence[QuerySource]) -> np.ndarray:
        """Decode and embed query images with the catalog's encoder and preprocessing."""
        encoder = self.encoder
        draft = encoder.draft_size
        images = [
            (q if isinstance(q, Image.Image) else load_image(q, draft_size=draft)).convert("RGB")
            for q in queries
        ]
        from .query import query_pipeline  # views + calibrated centring (docs/quality.md)

        return query_pipeline(self.home, encoder).embed_queries(images)

    def search(
        self,
        queries: Sequence[QuerySource] | QuerySource,
        k: int = 10,
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> list[list[Result]]:
        """Top-k products for each query image."""
        if isinstance(queries, str | os.PathLike | bytes | Image.Image):
            queries = [queries]
        check_k(k)
        if filters is not None:
            filters.validate()
        if not queries:
            return []
        self._follow_catalog_model()
        store = self.store
        vectors = self.embed_queries(queries)
        with self._lock:
            return rank_products(self.catalog, store, vectors, k, filters, min_score)

    def similar(self, product_id: str, k: int = 10, filters: Filters | None = None) -> list[Result]:
        """More like this: products closest to any of this product's images."""
        check_k(k)
        rows = self.catalog.images_of(self.catalog.get_product(product_id).product_id)
        self._follow_catalog_model()
        store = self.store
        if not rows:
            return []
        vectors = self.catalog.vectors([row.image_id for row in rows])
        with self._lock:
            ranked = rank_products(
                self.catalog, store, vectors, k, filters, exclude_products={product_id}
            )
        best: dict[str, Result] = {}
        for results in ranked:
            for result in results:
                if result.product_id not in best or result.score > best[result.product_id].score:
                    best[result.product_id] = result
        return sorted(best.values(), key=lambda r: -r.score)[:k]

    def get_product(self, product_id: str) -> dict[str, Any]:
        product = self.catalog.get_product(product_id).to_dict()
        product["images"] = [row.image_id for row in self.catalog.images_of(product_id)]
        return product

    def list_products(
        self,
        category: str | None = None,
        in_stock: bool | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Product], int]:
        if limit < 1 or limit > 1000 or offset < 0:
            raise UsageError("limit must be 1..1000 and offset >= 0")
        return self.catalog.list_products(
            Filters(category=category, in_stock=in_stock), limit=limit, offset=offset
        )

    def image_path(self, image_id: int) -> Path:
        row = self.catalog.image(image_id)
        if row is None:
            raise UnknownImageError(f"unknown image id: {image_id}")
        return Path(row.source)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "home": str(self.home.resolve()),
            "products": self.catalog.count_products(),
            "images": self.catalog.count_images(),
            "model": self.catalog.get_meta("model") or self.model,
            "stamp": self.catalog.get_meta("stamp"),
            "dim": int(self.catalog.get_meta("dim") or 0) or None,
            "categories": dict(self.catalog.categories()),
        }
        tuned = self.catalog.get_meta("tuned")
        if tuned:
            out["tuned"] = tuned
        if out["stamp"] is not None:
            try:
                out["vector_store"] = self.store.describe()
            except CatalogMismatchError as exc:
                out["vector_store"] = {"error": str(exc)}
        else:
            out["vector_store"] = {"backend": self.vector_store_uri or "faiss", "vectors": 0}
        return out

    def ready(self) -> bool:
        return self._encoder is not None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.save()
                if hasattr(self._store, "close"):
                    self._store.close()
                self._store = None
            self.catalog.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PayloadStore:
    """A vector store that can filter on per-vector payload (Milvus), fed by the catalog:
    every vector it is given goes in with its product's category, price, stock and
    attributes, so search filters go down to it as expressions (`filter_expression`)
    instead of as lists of allowed image ids. Everything else is the wrapped store's."""

    def __init__(self, store: VectorStore, catalog: Catalog):
        self._inner = store
        self._catalog = catalog
        self._fractions: dict[str, float] = {}  # expression -> share of images passing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        from .vectors.milvus_store import payload_from_products

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        owners = self._catalog.image_products(ids.tolist())
        products = self._catalog.products(sorted({pid for pid, _ in owners.values()}))
        rows = []
        for image_id in ids.tolist():
            product = products.get(owners.get(image_id, ("", ""))[0])
            rows.append(payload_from_products([product.to_dict()])[0] if product else {})
        self._inner.add(ids, vectors, payload=rows)

    def filter_expression(self, filters: Filters) -> str | None:
        """The Milvus expression for these filters; None when they cannot be expressed
        (an attribute name Milvus cannot address): the caller then sends allowed ids."""
        from .vectors.milvus_store import filters_to_expr

        try:
            expr = filters_to_expr(filters)
        except UsageError:
            return None
        if expr and getattr(self._inner, "approximate", False):
            # an approximate server index searches wider for selective filters
            if len(self._fractions) > 256:
                self._fractions.clear()
            total = max(1, self._catalog.count_images())
            self._fractions[expr] = self._catalog.count_images_matching(filters) / total
        return expr

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        expr: str | None = None,
        **kw: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        if expr is not None and expr in self._fractions:
            kw.setdefault("filter_fraction", self._fractions[expr])
        return self._inner.search(queries, k, allowed_ids=allowed_ids, expr=expr, **kw)


def _refusal(matches: list[tuple[int, int, float]], catalog: Catalog) -> str:
    owners = catalog.image_products(sorted({other for _, other, _ in matches}))
    row, other, score = max(matches, key=lambda m: m[2])
    return (
        f"image {row + 1} is the same photo as image {other} of product"
        f" {owners[other][0]} (score {score:.3f}); not added (duplicates were refused)"
    )


def _active_encoder(home: Path, base):
    """The tuned encoder when `lookalike tune` made one for this base model, else the base."""
    try:
        from .models import active_encoder
    except ImportError:
        return base
    return active_encoder(home, base)


def _product_from_fields(fields: dict[str, Any]) -> Product:
    product_id = str(fields.get("product_id") or "").strip()
    if not product_id:
        raise UsageError("product_id is required")
    try:
        price = parse_price(fields.get("price"))
        in_stock = True if fields.get("in_stock") in (None, "") else parse_bool(fields["in_stock"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    attributes = fields.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise UsageError("attributes must be an object of name: value")
    return Product(
        product_id=product_id,
        title=fields.get("title") or None,
        category=fields.get("category") or None,
        price=price,
        in_stock=in_stock,
        attributes=dict(attributes),
    )
