"""The SQLite catalog: products, their images, content hashes, vectors, the model stamp,
and the words index over the products' text (`lookalike.textindex`, kept by triggers in
the same transactions as the product rows).

The catalog is the source of truth. Every catalog image row holds the vector it was
embedded to (with the encoder stamp that made it), so the vector store is a derived
index that can always be repaired or rebuilt from here (see `Engine.sync_vectors`).
A product may have several images; an image belongs to one product.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import textindex
from .errors import BusyError, InputPathError, StorageError, UnknownProductError, UsageError

# 1: products, images, meta.  2: + the words index (text_docs, products_text, triggers)
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY,
    title      TEXT,
    category   TEXT,
    price      REAL,
    in_stock   INTEGER NOT NULL DEFAULT 1,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS products_category ON products(category);
CREATE TABLE IF NOT EXISTS images (
    image_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id TEXT NOT NULL REFERENCES products(product_id) ON DELETE CASCADE,
    source     TEXT NOT NULL UNIQUE,
    sha256     TEXT NOT NULL,
    origin     TEXT,
    stamp      TEXT,
    vector     BLOB
);
CREATE INDEX IF NOT EXISTS images_product ON images(product_id);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
"""

PRODUCT_FIELDS = ("title", "category", "price", "in_stock")

MAX_PRODUCT_ID = 200
"""Characters in a product id."""


def check_product_id(product_id: str) -> str:
    """A product id, stripped, or ValueError: 1..200 characters, no `/` or `\\`, no
    control, format or line-separator characters. Any other Unicode is allowed (ids go
    into URLs percent-encoded, e.g. `%E9%9D%B4-1` for `靴-1`)."""
    text = str(product_id).strip()
    if not text:
        raise ValueError("empty product_id")
    if text in (".", ".."):
        raise ValueError(f"product_id may not be {text!r} (URLs drop it as a path segment)")
    if len(text) > MAX_PRODUCT_ID:
        raise ValueError(f"product_id is {len(text)} characters; at most {MAX_PRODUCT_ID}")
    for char in text:
        if char in "/\\" or unicodedata.category(char) in _BAD_ID_CATEGORIES:
            raise ValueError(
                f"product_id {text!r} contains {char!r}: ids may not contain / or \\,"
                " control or invisible format characters"
            )
    return text


_BAD_ID_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def attributes_json(attributes: dict[str, Any]) -> str:
    """Attributes as the catalog stores them; a non-finite number (NaN, Infinity) is a
    UsageError, since SQLite's JSON functions cannot read it back."""
    try:
        return json.dumps(attributes, sort_keys=True, allow_nan=False)
    except ValueError:
        bad = [k for k, v in attributes.items() if isinstance(v, float) and not math.isfinite(v)]
        raise UsageError(
            f"attribute {', '.join(map(repr, bad)) or 'value'}: numbers must be finite"
            " (not NaN or Infinity)"
        ) from None


@dataclass
class Product:
    product_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool = True
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "product_id": self.product_id,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "in_stock": self.in_stock,
            "attributes": dict(self.attributes),
        }


@dataclass
class ImageRow:
    image_id: int
    product_id: str
    source: str
    sha256: str
    stamp: str | None


@dataclass
class Filters:
    """Metadata filters; every given condition must hold. `attrs` compares attribute
    values as text (so `year=2012` matches the number 2012 too)."""

    category: str | Sequence[str] | None = None
    price_min: float | None = None
    price_max: float | None = None
    in_stock: bool | None = None
    attrs: dict[str, str] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return (
            self.category is None
            and self.price_min is None
            and self.price_max is None
            and self.in_stock is None
            and not self.attrs
        )

    def validate(self) -> None:
        if self.price_min is not None and self.price_max is not None:
            if self.price_min > self.price_max:
                raise UsageError(
                    f"price_min ({self.price_min}) is greater than price_max ({self.price_max})"
                )
        for key in self.attrs:
            if not key or not all(c.isalnum() or c in "_-. " for c in key):
                raise UsageError(f"bad attribute name in filter: {key!r}")

    def where(self) -> tuple[str, list[Any]]:
        """An SQL condition on the products table (alias p) and its parameters."""
        self.validate()
        clauses: list[str] = []
        params: list[Any] = []
        if self.category is not None:
            cats = [self.category] if isinstance(self.category, str) else list(self.category)
            clauses.append(f"p.category IN ({','.join('?' * len(cats))})")
            params.extend(cats)
        if self.price_min is not None:
            clauses.append("p.price >= ?")
            params.append(float(self.price_min))
        if self.price_max is not None:
            clauses.append("p.price <= ?")
            params.append(float(self.price_max))
        if self.in_stock is not None:
            clauses.append("p.in_stock = ?")
            params.append(1 if self.in_stock else 0)
        for key, value in self.attrs.items():
            clauses.append("CAST(json_extract(p.attributes, ?) AS TEXT) = ?")
            params.extend([f'$."{key}"', str(value)])
        return (" AND ".join(clauses) or "1"), params


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


class Catalog(textindex.WordsQueries):
    """A SQLite catalog file. Safe to share between threads: every call holds a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._text_caches = {}
        self._text_cache_version = None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # not SQLite, a damaged file, no permission
            storage = StorageError.from_os_error(exc)
            if storage is not None:
                raise storage from None
            if "locked" in str(exc):
                raise BusyError(f"{self.path} is locked by another process ({exc})") from None
            raise InputPathError(f"{self.path} is not a usable lookalike catalog: {exc}") from None

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    self._db.execute(statement)
            version = self.get_meta("schema_version")
            if version is not None and int(version) > SCHEMA_VERSION:
                raise UsageError(
                    f"{self.path} was written by a newer lookalike (schema {version}); upgrade"
                )
            self._migrate()
            if version != str(SCHEMA_VERSION):
                self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _migrate(self) -> None:
        """Bring an older catalog up to date (inside the opening transaction): a catalog
        from before the words index, or from another version of it, gets it built once."""
        textindex.install(self._db)
        if self.get_meta("text_index") != textindex.TEXT_INDEX_VERSION:
            textindex.drop(self._db)
            textindex.install(self._db)
            textindex.build(self._db)
            self.set_meta("text_index", textindex.TEXT_INDEX_VERSION)

    # -- plumbing -----------------------------------------------------------------
    def transaction(self) -> _Transaction:
        return _Transaction(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    # -- products -----------------------------------------------------------------
    def upsert_product(
        self, product: Product, *, replace_fields: Iterable[str] | None = None
    ) -> bool:
        """Insert a product, or update it. With `replace_fields`, only those of title,
        category, price, in_stock and attributes are overwritten (a metadata file without a
        price column must not erase prices set elsewhere). Returns whether anything
        changed (a new product, or a field with a new value)."""
        fields = set(replace_fields) if replace_fields is not None else None
        with self._lock:
            existing = self.find_product(product.product_id)
            if existing is None:
                self._db.execute(
                    "INSERT INTO products(product_id, title, category, price, in_stock, attributes)"
                    " VALUES(?, ?, ?, ?, ?, ?)",
                    (
                        product.product_id,
                        product.title,
                        product.category,
                        product.price,
                        1 if product.in_stock else 0,
                        attributes_json(product.attributes),
                    ),
                )
                return True
            merged = existing
            names = (*PRODUCT_FIELDS, "attributes")
            before = [getattr(merged, name) for name in names]
            before[-1] = dict(before[-1])
            for name in names:
                if fields is None or name in fields:
                    setattr(merged, name, getattr(product, name))
            if [getattr(merged, name) for name in names] == before:
                return False
            self._write_product(merged)
            return True

    def update_product(self, product_id: str, changes: dict[str, Any]) -> Product:
        """Change some fields of a product. Attribute changes merge into the existing
        attributes (a value of None deletes that attribute)."""
        with self._lock:
            product = self.get_product(product_id)
            for name, value in changes.items():
                if name == "attributes":
                    if not isinstance(value, dict):
                        raise UsageError("attributes must be an object of name: value")
                    for key, item in value.items():
                        if item is None:
                            product.attributes.pop(key, None)
                        else:
                            product.attributes[key] = item
                elif name in PRODUCT_FIELDS:
                    setattr(product, name, value)
                else:
                    raise UsageError(f"unknown product field: {name!r}")
            product.in_stock = bool(product.in_stock)
            self._write_product(product)
            return product

    def _write_product(self, product: Product) -> None:
        self._db.execute(
            "UPDATE products SET title=?, category=?, price=?, in_stock=?, attributes=?"
            " WHERE product_id=?",
            (
                product.title,
                product.category,
                product.price,
                1 if product.in_stock else 0,
                attributes_json(product.attributes),
                product.product_id,
            ),
        )

    def find_product(self, product_id: str) -> Product | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM products WHERE product_id=?", (product_id,)
            ).fetchone()
        return None if row is None else _product(row)

    def get_product(self, product_id: str) -> Product:
        product = self.find_product(product_id)
        if product is None:
            raise UnknownProductError(f"unknown product id: {product_id}")
        return product

    def products(self, ids: Sequence[str]) -> dict[str, Product]:
        out: dict[str, Product] = {}
        with self._lock:
            for chunk in _chunks(list(ids), 500):
                rows = self._db.execute(
                    f"SELECT * FROM products WHERE product_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                out.update((row["product_id"], _product(row)) for row in rows)
        return out

    def list_products(
        self, filters: Filters | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[Product], int]:
        """A page of products (ordered by id) and the total that match."""
        where, params = (filters or Filters()).where()
        with self._lock:
            total = self._db.execute(
                f"SELECT COUNT(*) FROM products p WHERE {where}", params
            ).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM products p WHERE {where} ORDER BY p.product_id LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [_product(row) for row in rows], total

    def remove_products(self, product_ids: Sequence[str]) -> list[int]:
        """Delete products and their images; returns the removed image ids.
        Raises UnknownProductError naming every unknown id, removing nothing."""
        with self._lock, self.transaction():
            unknown = [pid for pid in product_ids if self.find_product(pid) is None]
            if unknown:
                raise UnknownProductError("unknown product id(s): " + ", ".join(unknown))
            image_ids: list[int] = []
            for pid in product_ids:
                image_ids += [
                    r[0]
                    for r in self._db.execute(
                        "SELECT image_id FROM images WHERE product_id=?", (pid,)
                    )
                ]
                self._db.execute("DELETE FROM images WHERE product_id=?", (pid,))
                self._db.execute("DELETE FROM products WHERE product_id=?", (pid,))
        return image_ids

    def count_products(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM products").fetchone()[0]

    def categories(self) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT category, COUNT(*) FROM products WHERE category IS NOT NULL"
                " GROUP BY category ORDER BY category"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- images -------------------------------------------------------------------
    def image_by_source(self, source: str) -> ImageRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT image_id, product_id, source, sha256, stamp FROM images WHERE source=?",
                (source,),
            ).fetchone()
        return None if row is None else ImageRow(*row)

    def image(self, image_id: int) -> ImageRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT image_id, product_id, source, sha256, stamp FROM images WHERE image_id=?",
                (int(image_id),),
            ).fetchone()
        return None if row is None else ImageRow(*row)

    def images_of(self, product_id: str) -> list[ImageRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id, product_id, source, sha256, stamp FROM images"
                " WHERE product_id=? ORDER BY image_id",
                (product_id,),
            ).fetchall()
        return [ImageRow(*r) for r in rows]

    def has_sha(self, sha256: str) -> bool:
        """Whether some catalog image has exactly these bytes."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM images WHERE sha256=? LIMIT 1", (sha256,)
            ).fetchone()
        return row is not None

    def vector_by_sha(self, sha256: str, stamp: str) -> np.ndarray | None:
        """A vector already computed for identical bytes under the same model."""
        with self._lock:
            row = self._db.execute(
                "SELECT vector FROM images"
                " WHERE sha256=? AND stamp=? AND vector IS NOT NULL LIMIT 1",
                (sha256, stamp),
            ).fetchone()
        return None if row is None else blob_to_vector(row[0]).copy()

    def put_image(
        self,
        product_id: str,
        source: str,
        sha256: str,
        vector: np.ndarray,
        stamp: str,
        origin: str | None = None,
    ) -> tuple[int, bool]:
        """Insert or replace the image at `source` with its vector. Returns (image_id,
        created). An image that moves to another product keeps its id. `origin` is what
        brought it in (a metadata file or a walked folder), so a later run of the same
        origin can drop images that are gone from it."""
        blob = vector_to_blob(vector)
        with self._lock:
            row = self._db.execute(
                "SELECT image_id FROM images WHERE source=?", (source,)
            ).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO images(product_id, source, sha256, origin, stamp, vector)"
                    " VALUES(?, ?, ?, ?, ?, ?)",
                    (product_id, source, sha256, origin, stamp, blob),
                )
                return int(cur.lastrowid), True
            self._db.execute(
                "UPDATE images SET product_id=?, sha256=?, origin=COALESCE(?, origin), stamp=?,"
                " vector=? WHERE image_id=?",
                (product_id, sha256, origin, stamp, blob, row[0]),
            )
            return int(row[0]), False

    def images_from(self, origin: str) -> list[ImageRow]:
        """Images that `origin` (a metadata file or walked folder) brought in."""
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id, product_id, source, sha256, stamp FROM images WHERE origin=?",
                (origin,),
            ).fetchall()
        return [ImageRow(*r) for r in rows]

    def set_image_product(self, image_id: int, product_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE images SET product_id=? WHERE image_id=?", (product_id, int(image_id))
            )

    def remove_images(self, image_ids: Sequence[int]) -> list[str]:
        """Delete images; products left with no image are deleted too (returned)."""
        emptied: list[str] = []
        with self._lock, self.transaction():
            for image_id in image_ids:
                row = self._db.execute(
                    "SELECT product_id FROM images WHERE image_id=?", (int(image_id),)
                ).fetchone()
                if row is None:
                    continue
                self._db.execute("DELETE FROM images WHERE image_id=?", (int(image_id),))
                left = self._db.execute(
                    "SELECT COUNT(*) FROM images WHERE product_id=?", (row[0],)
                ).fetchone()[0]
                if left == 0:
                    self._db.execute("DELETE FROM products WHERE product_id=?", (row[0],))
                    emptied.append(row[0])
        return emptied

    def count_images(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def max_image_id(self) -> int:
        """The highest image id given so far (0 for none): ids above it are new."""
        with self._lock:
            row = self._db.execute("SELECT MAX(image_id) FROM images").fetchone()
        return int(row[0] or 0)

    def image_products(self, image_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """image_id -> (product_id, source) for the ids that exist."""
        out: dict[int, tuple[str, str]] = {}
        with self._lock:
            for chunk in _chunks([int(i) for i in image_ids], 500):
                rows = self._db.execute(
                    "SELECT image_id, product_id, source FROM images"
                    f" WHERE image_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                out.update((r[0], (r[1], r[2])) for r in rows)
        return out

    def count_images_matching(self, filters: Filters) -> int:
        where, params = filters.where()
        with self._lock:
            return self._db.execute(
                f"SELECT COUNT(*) FROM images i JOIN products p USING(product_id) WHERE {where}",
                params,
            ).fetchone()[0]

    def image_ids_matching(self, filters: Filters) -> np.ndarray:
        """Ids of the images whose product passes the filters."""
        where, params = filters.where()
        with self._lock:
            rows = self._db.execute(
                f"SELECT i.image_id FROM images i JOIN products p USING(product_id) WHERE {where}",
                params,
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def embedded_ids(self, stamp: str) -> np.ndarray:
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id FROM images WHERE stamp=? AND vector IS NOT NULL", (stamp,)
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def vectors(self, image_ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of these images, in the given order."""
        found: dict[int, np.ndarray] = {}
        with self._lock:
            for chunk in _chunks([int(i) for i in image_ids], 500):
                rows = self._db.execute(
                    "SELECT image_id, vector FROM images"
                    f" WHERE image_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                found.update((r[0], blob_to_vector(r[1])) for r in rows if r[1] is not None)
        missing = [i for i in image_ids if int(i) not in found]
        if missing:
            raise UsageError(f"no vector stored for image id(s) {missing[:5]}")
        if not image_ids:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[int(i)] for i in image_ids])

    def iter_images(self, batch: int = 1000) -> Iterator[list[ImageRow]]:
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT image_id, product_id, source, sha256, stamp FROM images"
                    " WHERE image_id > ? ORDER BY image_id LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            yield [ImageRow(*r) for r in rows]
            last = rows[-1][0]


class _Transaction:
    """BEGIN/COMMIT around a block (nests: only the outermost one commits)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def __enter__(self) -> Catalog:
        self.catalog._lock.acquire()
        db = self.catalog._db
        self.outer = not db.in_transaction
        if self.outer:
            db.execute("BEGIN IMMEDIATE")
        return self.catalog

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.outer:
                self.catalog._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.catalog._lock.release()


def _product(row: sqlite3.Row) -> Product:
    return Product(
        product_id=row["product_id"],
        title=row["title"],
        category=row["category"],
        price=row["price"],
        in_stock=bool(row["in_stock"]),
        attributes=json.loads(row["attributes"] or "{}"),
    )


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
