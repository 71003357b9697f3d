"""The Engine ties one home folder's catalog, encoder and vector store together. The CLI
and the API both talk to it; it is safe to call from several threads.

Home folder layout: `catalog.sqlite` (the truth: products, images, vectors, model
stamp), `vectors/` (the FAISS index, derived from the catalog and repaired from it on
open), `models/` (exported ONNX models, tuned heads), `uploads/` (images added through
the API), `writer.lock` (the writer lock).

Several processes on one home: writes hold the home's writer lock and readers follow
other processes' writes (lookalike.sharing, a mixin of Engine). Product adds, updates and
removals are lookalike.productwrites, another mixin.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import duplicates
from .catalog import Catalog, Filters, Product
from .encoders import DEFAULT_MODEL
from .encoders.runtime import cpu_count, int8_kernels
from .errors import (
    CatalogMismatchError,
    InputPathError,
    UnknownImageError,
    UsageError,
)
from .fusion import SearchReport, check_text_weight, photo_and_words, words_alone
from .ingest import IngestReport, ingest, reembed
from .keptphotos import KeptPhotos
from .locks import HomeLock
from .models import (
    BASE_STAMP_META,
    active_encoder,
    catalog_power_for,
    catalog_views_for,
    is_tuned,
    parse_stamp,
    with_catalog_views,
)
from .payload import PayloadStore
from .productwrites import ProductWrites
from .query import load_settings
from .repair import sync_store
from .search import Result, check_k, rank_products
from .sharing import SharedHome
from .vectors import check_store_uri, open_store
from .vectors.base import VectorStore

QuerySource = str | os.PathLike | bytes | Image.Image


def default_home() -> Path:
    return Path(os.environ.get("LOOKALIKE_HOME") or "lookalike-home")


class Engine(ProductWrites, SharedHome):
    def __init__(
        self,
        home: str | os.PathLike | None = None,
        model: str | None = None,
        vector_store: str | None = None,
        memory_budget: int | None = None,
        on_wait: Callable[[str], None] | None = None,
        create: bool = True,
    ):
        """`on_wait(message)` is told when a write waits for another process's. Without
        `create`, a home that holds no catalog yet is an InputPathError."""
        self.home = Path(home) if home is not None else default_home()
        _check_home(self.home, create)
        if vector_store:
            check_store_uri(vector_store)
        self.catalog = Catalog(self.home / "catalog.sqlite")
        self.requested_model = model
        self.vector_store_uri = vector_store or self.catalog.get_meta("vector_store") or None
        self.memory_budget = memory_budget
        self._encoder = None
        self._store: VectorStore | None = None
        self._lock = threading.RLock()  # guards the vector store and model switches
        self._followed: str | None = None
        # lock order: home_lock, then _lock, then the store's and the catalog's own
        self.home_lock = HomeLock(self.home, on_wait=on_wait)
        self._write_depth = 0
        self._entry_mark: str | None = None  # the clean mark as the current write found it
        self._next_follow = 0.0
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

                encoder = active_encoder(self.home, load_encoder(self.model, self.models_dir))
                if not is_tuned(encoder):  # a base model: catalog views, power normalisation
                    settings = load_settings(self.home)
                    stored = self.catalog.get_meta("stamp") if self.catalog.count_images() else None
                    if stored is not None and parse_stamp(stored, encoder.stamp) is None:
                        # back from a tuned model: the base's catalog side before tuning
                        stored = self.catalog.get_meta(BASE_STAMP_META) or stored
                    views = catalog_views_for(settings.catalog_views, stored, encoder.stamp)
                    power = catalog_power_for(settings.power_normalise, stored, encoder.stamp)
                    encoder = with_catalog_views(encoder, views, power)
                self._encoder = encoder
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
        store = self._store
        if store is not None and hasattr(store, "wait_for_rebuild"):
            store.wait_for_rebuild()  # outside the lock: its swap takes the home lock
        with self._lock:
            self._followed = stored
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
            guard=self.home_lock.hold,
        )
        if getattr(store, "backend", None) == "milvus":
            store = PayloadStore(store, self.catalog)
        return store

    @property
    def store(self) -> VectorStore:
        """The vector store, opened on first use and checked against the catalog: the
        same ids, and when the last writer did not finish, the same vectors."""
        if self._store is None:
            self._open_checked()
        return self._store

    def sync_vectors(self, verify: bool = True) -> dict[str, int]:
        """Make the vector store hold exactly the catalog's vectors for the live model:
        add what it misses (a run killed before the store was saved), drop what the
        catalog no longer has, and (`verify`) replace stored vectors that are not the
        catalog's. Returns {"added", "removed", "replaced"}."""
        with self.writing():
            return sync_store(self.catalog, self.store, self.encoder.stamp, verify=verify)

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
        """Held around anything that swaps the model or the vector store (in this
        process; `writing()` also holds the home's lock against other processes)."""
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
        """Index folders/files and/or a metadata file (see lookalike.ingest). The home's
        lock is held one batch at a time, so the server's writes go on meanwhile. New
        images that are the same photo as another product's image are reported
        (`report.duplicates`), and with `reject_duplicates` taken out again."""
        with self.writing():
            self._switch_model_if_needed()
            before = self.catalog.max_image_id()
            payload = metadata is not None and self._payload_changing()
            store, encoder = self._store, self.encoder
        report = ingest(
            self.catalog, store, encoder, paths, metadata, progress=progress,
            writing=self.writing, **kw,
        )  # fmt: skip
        reembed(self.catalog, store, encoder, report, progress=progress, writing=self.writing)
        with self.writing():
            if payload:
                # new and re-encoded images went in with their payload; the products
                # whose fields changed need theirs re-sent for their other images
                self._refresh_payload(dict.fromkeys(report.changed_products))
            self._check_new_images(before, report, reject_duplicates)
        return report

    def _check_new_images(self, before: int, report: IngestReport, reject: bool) -> None:
        """Report (or reject) images above id `before` that copy another product's image."""
        new = self.catalog.embedded_ids(self.encoder.stamp)
        new = np.sort(new[new > before])
        if new.size == 0:
            return
        if before == 0 or new.size > duplicates.INGEST_CHECK_LIMIT:
            what = "a first import" if before == 0 else f"{new.size:,} new images"
            report.notes.append(
                f"{what}: not checked for duplicates one by one; `lookalike duplicates`"
                " checks the whole catalog"
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
        # not under the engine's lock: a scan takes minutes, and the store and the catalog
        # are safe to read from several threads (searches go on meanwhile)
        report = duplicates.find_duplicates(
            self.catalog,
            self.encoder.stamp,
            threshold=threshold,
            within_products=within_products,
            source=store if hasattr(store, "get") else None,  # FAISS: its vector log
            progress=progress,
        )
        self._duplicates_cache = (key, report)
        return report

    # -- reading ----------------------------------------------------------------------
    def embed_queries(self, queries: Sequence[QuerySource]) -> np.ndarray:
        """Decode and embed query images with the catalog's encoder and preprocessing; a
        query with a catalog image's bytes gets that image's stored vector."""
        return self._embed_photos(queries)[0]

    def _embed_photos(self, queries: Sequence[QuerySource]) -> tuple[np.ndarray, list | None]:
        """`embed_queries`, and each query's hubness correction (lookalike.hubness; None
        for all when the pipeline has none). A query that took a catalog image's stored
        vector gets none: it is that image, and finds itself first."""
        from .query import embed_sources, query_pipeline  # views, centring (docs/quality.md)

        encoder = self.encoder
        stamp = encoder.stamp
        pipeline = query_pipeline(self.home, encoder)
        shortcut: set[int] = set()
        vectors = embed_sources(
            pipeline, queries, lambda sha: self.catalog.vector_by_sha(sha, stamp), shortcut
        )
        if pipeline.hub is None:
            return vectors, None
        return vectors, [None if i in shortcut else pipeline.hub for i in range(len(queries))]

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
        self._follow_other_writers()
        vectors, hubs = self._embed_photos(queries)
        with self._lock:
            return rank_products(self.catalog, store, vectors, k, filters, min_score, hubs=hubs)

    def find(
        self,
        images: Sequence[QuerySource] | QuerySource = (),
        text: str | None = None,
        k: int = 10,
        filters: Filters | None = None,
        min_score: float | None = None,
        text_weight: float | None = None,
    ) -> list[SearchReport]:
        """Photo, words, or both (lookalike.fusion): one report per query image, or one
        for words alone. With words, `min_score` applies to the combined score."""
        if isinstance(images, str | os.PathLike | bytes | Image.Image):
            images = [images]
        images = list(images)
        text = text if text is not None and text.strip() else None
        check_k(k)
        weight = check_text_weight(text_weight)
        if filters is not None:
            filters.validate()
        if not images and text is None:
            raise UsageError("give a query photo, words to search for, or both")
        if text is None:
            return [
                SearchReport(results, "photo")
                for results in self.search(images, k, filters, min_score)
            ]
        if not images:
            return [words_alone(self.catalog, text, k, filters, min_score)]
        self._follow_catalog_model()
        store = self.store
        vectors = self.embed_queries(images)
        with self._lock:
            return photo_and_words(
                self.catalog, store, vectors, text, k, filters, min_score, weight
            )

    def similar(self, product_id: str, k: int = 10, filters: Filters | None = None) -> list[Result]:
        """More like this: products closest to any of this product's images."""
        check_k(k)
        rows = self.catalog.images_of(self.catalog.get_product(product_id).product_id)
        self._follow_catalog_model()
        store = self.store
        self._follow_other_writers()
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
            # an INT8 model's speed depends on it (docs/models.md, "INT8 on CPUs without VNNI")
            "cpu": {"cores": cpu_count(), "int8": int8_kernels()},
        }
        tuned = self.catalog.get_meta("tuned")
        if tuned:
            out["tuned"] = tuned
        kept = KeptPhotos.of_home(self.home, 0)
        if count := kept.count():  # `serve --keep-photos`: shopper photos to tune on
            out["kept_photos"] = {"folder": str(kept.folder.resolve()), "photos": count}
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
        store = self._store
        if store is not None and hasattr(store, "wait_for_rebuild"):
            store.wait_for_rebuild()  # outside the lock: its swap takes the home lock
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


def _check_home(home: Path, create: bool) -> None:
    if home.exists() and not home.is_dir():
        raise InputPathError(f"the home {home} is a file, not a folder (check --home)")
    if not (home / "catalog.sqlite").exists() and not create:
        raise InputPathError(
            f"no lookalike home at {home} (no catalog.sqlite): check --home, or create one "
            "with `lookalike index`"
        )
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputPathError(f"cannot create the home {home}: {exc.strerror}") from None
