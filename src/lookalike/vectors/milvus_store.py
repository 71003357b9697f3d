"""The scale-out vector store: Milvus (standalone, distributed, or Milvus Lite) via pymilvus.

URIs (what `--vector-store` takes):

- `milvus://HOST:PORT` -> a Milvus standalone or cluster (its proxy) at http://HOST:PORT
  (`milvus+https://HOST:PORT` for TLS). Query options: `?collection=NAME&db=DB&index=HNSW`,
  and the index knobs `nlist=` (IVF lists), `nprobe=` (IVF lists searched), `ef=` (HNSW
  search breadth, at least k).
  Credentials come from the environment, never the command line: LOOKALIKE_MILVUS_TOKEN
  ("user:password" or an API key).
- a path ending in `.db` -> Milvus Lite, embedded, in that file.

One collection holds one row per catalog image: `id` (INT64 primary key, the image id),
`vector` (FLOAT_VECTOR, inner product) and, when the caller passes them, scalar payload
fields (`product_id`, `category`, `price`, `in_stock`, dynamic fields) so that metadata
filters run inside Milvus as boolean expressions (`filters_to_expr`). Without payload
the caller's allowed ids are pushed down as `id in [...]`. The model stamp and dim are
collection properties: vectors from another model raise CatalogMismatchError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from lookalike.errors import BusyError, CatalogMismatchError, UsageError

DEFAULT_COLLECTION = "lookalike_images"
MAX_TOPK = 16384  # Milvus's limit on k
PAYLOAD_FIELDS = ("product_id", "category", "price", "in_stock")
INDEX_BUILD_PARAMS = {  # server-side index types (?index=...); Milvus Lite uses FLAT
    "HNSW": {"M": 32, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
    "IVF_PQ": {"nlist": 1024, "m": 64, "nbits": 8},
}


# Milvus string literals (both the server's and Milvus Lite's parsers) take any Unicode
# character as is and know the escapes \\ \" \n \r \t; \uXXXX and \xNN are errors in
# Milvus Lite, and a raw line break ends the literal. So: those five escaped, the rest raw.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(value: Any) -> str:
    """`value` as a double-quoted Milvus string literal."""
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in str(value)) + '"'


def _held_elsewhere(path: str) -> bool:
    """Whether another process holds Milvus Lite's lock on `path` (a Milvus Lite 3
    database is a folder with a LOCK file that its process flocks)."""
    import fcntl

    lock = os.path.join(path, "LOCK")
    if not os.path.isfile(lock):
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_milvus_lite() -> Iterator[None]:
    """Milvus Lite logs a traceback when it cannot open a file; the error we raise says
    it in one line instead."""
    log = logging.getLogger("milvus_lite")
    old = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(old)


def _is_not_loaded(exc: BaseException) -> bool:
    """A Milvus error saying the collection is not loaded (released, e.g. after a server
    restart or when another client released it)."""
    text = str(exc).lower()
    return "released" in text or "not loaded" in text or "load()" in text


def filters_to_expr(filters: Any) -> str | None:
    """A Milvus boolean expression for a `lookalike.search.Filters`-like object (or dict)
    with category, price_min, price_max, in_stock, attrs; None when nothing filters.
    Attribute filters become JSON-path tests on the dynamic `attrs` field."""
    if filters is None:
        return None

    def get(name: str) -> Any:
        if isinstance(filters, Mapping):
            return filters.get(name)
        return getattr(filters, name, None)

    parts: list[str] = []
    category = get("category")
    if category is not None:
        if isinstance(category, list | tuple | set):
            parts.append(f"category in [{', '.join(_quote(c) for c in category)}]")
        else:
            parts.append(f"category == {_quote(category)}")
    if get("price_min") is not None:
        parts.append(f"price >= {float(get('price_min'))!r}")
    if get("price_max") is not None:
        parts.append(f"price <= {float(get('price_max'))!r}")
    if get("in_stock") is not None:
        parts.append(f"in_stock == {'true' if get('in_stock') else 'false'}")
    for key, value in (get("attrs") or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(key)):
            raise UsageError(f"attribute name {key!r} cannot be filtered in Milvus")
        parts.append(f"attrs[{_quote(key)}] == {_quote(value)}")
    return " and ".join(parts) if parts else None


def parse_uri(uri: str) -> dict:
    """Split a store URI into pymilvus connection arguments and our options."""
    if uri.endswith(".db") and "://" not in uri:
        return {"uri": uri, "collection": DEFAULT_COLLECTION, "lite": True, "index": "FLAT"}
    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    scheme = {"milvus": "http", "milvus+https": "https", "tcp": "http"}.get(
        parts.scheme, parts.scheme
    )
    if scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad Milvus URI {uri!r}: use milvus://HOST:PORT")
    port = parts.port or 19530
    knobs = {}
    for name in ("nlist", "nprobe", "ef"):
        if name in query:
            try:
                knobs[name] = int(query[name])
            except ValueError:
                raise UsageError(f"bad Milvus URI {uri!r}: {name} must be an integer") from None
            if knobs[name] <= 0:
                raise UsageError(f"bad Milvus URI {uri!r}: {name} must be positive")
    return {
        "uri": f"{scheme}://{parts.hostname}:{port}",
        "collection": query.get("collection", DEFAULT_COLLECTION),
        "db_name": query.get("db", ""),
        "index": query.get("index", "AUTOINDEX").upper(),
        "lite": False,
        "knobs": knobs,
    }


def _payload_rows(payload: Any, n: int) -> list[dict]:
    """Payload as a list of n dicts (accepts a list of dicts or a dict of columns)."""
    if payload is None:
        return [{} for _ in range(n)]
    if isinstance(payload, Mapping):
        cols = {k: list(v) for k, v in payload.items()}
        for k, v in cols.items():
            if len(v) != n:
                raise UsageError(f"payload column {k!r} has {len(v)} values for {n} vectors")
        return [{k: cols[k][i] for k in cols} for i in range(n)]
    rows = list(payload)
    if len(rows) != n:
        raise UsageError(f"{len(rows)} payload rows for {n} vectors")
    return [dict(r or {}) for r in rows]


def _clean(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


class MilvusStore:
    """VectorStore on a Milvus collection (see module doc)."""

    backend = "milvus"

    def __init__(self, uri: str, dim: int, stamp: str, *, reset: bool = False) -> None:
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError as exc:  # pragma: no cover - a dependency
            raise UsageError("the Milvus store needs pymilvus (pip install pymilvus)") from exc
        self.uri = uri
        self.dim = int(dim)
        self.stamp = str(stamp)
        opts = parse_uri(uri)
        self.collection = opts["collection"]
        self.index_type = opts["index"]
        self.lite = opts["lite"]
        self.knobs = opts.get("knobs", {})
        kwargs: dict = {"uri": opts["uri"]}
        if opts.get("db_name"):
            kwargs["db_name"] = opts["db_name"]
        token = os.environ.get("LOOKALIKE_MILVUS_TOKEN")
        if token and not self.lite:
            kwargs["token"] = token
        try:
            with _quiet_milvus_lite():
                self.client = MilvusClient(**kwargs)
        except Exception as exc:
            if self.lite and _held_elsewhere(opts["uri"]):
                raise BusyError(
                    f"the Milvus Lite file {opts['uri']} is open in another process (Milvus "
                    "Lite allows one process per file): stop that process, or point both at a "
                    "Milvus server (--vector-store milvus://HOST:PORT)"
                ) from exc
            raise UsageError(f"cannot connect to Milvus at {opts['uri']}: {exc}") from exc
        c = self.collection
        if self.client.has_collection(c):
            props = self.client.describe_collection(c).get("properties") or {}
            same = props.get("lookalike.stamp") == self.stamp and props.get("lookalike.dim") == str(
                self.dim
            )
            if not same and not reset:
                raise CatalogMismatchError(
                    f"Milvus collection {c!r} holds vectors of model stamp "
                    f"{props.get('lookalike.stamp')!r} ({props.get('lookalike.dim')}-d); this "
                    f"model is {self.stamp!r} ({self.dim}-d). Re-index with --reset."
                )
            if reset:
                self.client.drop_collection(c)
        if reset or not self.client.has_collection(c):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            index = self.client.prepare_index_params()
            params = dict(INDEX_BUILD_PARAMS.get(self.index_type, {}))
            if "nlist" in self.knobs and "nlist" in params:
                params["nlist"] = self.knobs["nlist"]
            index.add_index(
                field_name="vector",
                index_type=self.index_type,
                metric_type="IP",
                params=params,
            )
            self.client.create_collection(
                c,
                schema=schema,
                index_params=index,
                consistency_level="Strong",
                properties={"lookalike.stamp": self.stamp, "lookalike.dim": str(self.dim)},
            )
        self._load()

    def _load(self, timeout: float = 120.0) -> None:
        """Load the collection for searches and queries. A collection made by another
        process (a Milvus Lite file reopened) or on a server that restarted starts
        released; creating one loads it, reopening one does not."""
        self.client.load_collection(self.collection, timeout=timeout)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """client.<method>(collection, ...), loading the collection and trying once more
        when Milvus answers that it is not loaded (a server restarted under us)."""
        fn = getattr(self.client, method)
        try:
            return fn(self.collection, *args, **kwargs)
        except Exception as exc:
            if not _is_not_loaded(exc):
                raise
        deadline = time.monotonic() + 120.0
        while True:  # a restarted server may still be coming up: retry the load a while
            try:
                self._load()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        return fn(self.collection, *args, **kwargs)

    # ---------------------------------------------------------------- writes

    def add(self, ids: np.ndarray, vectors: np.ndarray, payload: Any = None) -> None:
        """Insert or replace. `payload`: optional per-vector scalars (product_id, category,
        price, in_stock, attrs...) as a list of dicts or a dict of columns."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise CatalogMismatchError(
                f"vectors have shape {tuple(vectors.shape)}, this store holds {self.dim}-d"
            )
        if len(ids) != len(vectors):
            raise UsageError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) and ids.min() < 0:
            raise UsageError("vector ids must be non-negative")
        # the last occurrence of a repeated id wins, as in the FAISS store
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last_rev)
        rows = _payload_rows(payload, len(ids))
        data = []
        for i in keep:
            row = {k: _clean(v) for k, v in rows[i].items() if v is not None}
            row["id"] = int(ids[i])
            row["vector"] = vectors[i].tolist()
            data.append(row)
        for lo in range(0, len(data), 1000):
            self.client.upsert(self.collection, data[lo : lo + 1000])

    def remove(self, ids: np.ndarray) -> None:
        ids = [int(i) for i in np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))]
        for lo in range(0, len(ids), 10_000):
            self.client.delete(self.collection, ids=ids[lo : lo + 10_000])

    def save(self) -> None:
        """Milvus persists on its own; flush seals the growing segments."""
        self.client.flush(self.collection)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection is fine
            pass

    # ---------------------------------------------------------------- reads

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        expr: str | None = None,
        filter_fraction: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. `allowed_ids` is pushed down as `id in [...]`, `expr`
        (a Milvus boolean expression on the payload, see filters_to_expr) as is.
        `filter_fraction` (the share of vectors that pass, when the caller knows it)
        widens an approximate index's search for selective filters: IVF probes and HNSW
        ef grow by 1/fraction, at most 8x (docs/scale.md: measured on a server)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.shape[1] != self.dim:
            raise CatalogMismatchError(f"queries are {q.shape[1]}-d, the store {self.dim}-d")
        k = int(k)
        if k <= 0:
            raise UsageError("k must be positive")
        nq = q.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        out = np.full((nq, k), -1, dtype=np.int64)
        conds = []
        if allowed_ids is not None:
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64).reshape(-1))
            if len(allowed) == 0:
                return scores, out
            conds.append(f"id in [{', '.join(str(int(i)) for i in allowed)}]")
        if expr:
            conds.append(f"({expr})")
        limit = min(k, MAX_TOPK)
        widen = 1.0
        if filter_fraction is not None and conds:
            widen = min(8.0, 1.0 / max(float(filter_fraction), 1e-9))
        results = self._call(
            "search",
            data=[row.tolist() for row in q],
            limit=limit,
            filter=" and ".join(conds),
            output_fields=[],
            search_params={"metric_type": "IP", "params": self._search_params(limit, widen)},
        )
        for qi, hits in enumerate(results):
            for j, hit in enumerate(hits[:limit]):
                out[qi, j] = int(hit["id"])
                scores[qi, j] = float(hit["distance"])
        return scores, out

    def _search_params(self, k: int, widen: float = 1.0) -> dict:
        if self.index_type == "HNSW":
            return {"ef": max(int(self.knobs.get("ef", 128) * widen), k)}
        if self.index_type.startswith("IVF"):
            nlist = self.knobs.get("nlist", INDEX_BUILD_PARAMS["IVF_FLAT"]["nlist"])
            return {"nprobe": min(nlist, int(self.knobs.get("nprobe", 32) * widen))}
        return {}

    @property
    def approximate(self) -> bool:
        """Whether searches go through an approximate server-side index (a filter's
        selectivity then matters: see `filter_fraction`)."""
        return not self.lite and self.index_type in ("HNSW", *INDEX_BUILD_PARAMS, "AUTOINDEX")

    def index_progress(self) -> dict:
        """The server's view of the vector index: index_type, total_rows, indexed_rows,
        pending_index_rows, state (Milvus builds it per sealed segment, in the
        background)."""
        return dict(self.client.describe_index(self.collection, "vector") or {})

    def wait_for_index(self, timeout: float = 300.0) -> dict:
        """Flush, then wait until the server has built the index on every row and the
        query node serves the indexed segments (until then searches go to the growing
        segments' interim index, not the configured one), or timeout. Returns
        index_progress() plus `served_indexed_rows`."""
        import time

        self.client.flush(self.collection)
        deadline = time.monotonic() + timeout
        while True:
            info = self.index_progress()
            total = int(info.get("total_rows", 0))
            served = 0
            if int(info.get("indexed_rows", 0)) >= total and not self.lite:
                segments = self.client.list_loaded_segments(self.collection)
                served = sum(int(s.num_rows) for s in segments if s.index_id)
            info["served_indexed_rows"] = served
            if self.lite or served >= total or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    def ids(self) -> np.ndarray:
        found: list[int] = []
        it = self._call("query_iterator", batch_size=4000, filter="id >= 0", output_fields=["id"])
        while True:
            batch = it.next()
            if not batch:
                it.close()
                break
            found.extend(int(r["id"]) for r in batch)
        return np.sort(np.asarray(found, dtype=np.int64))

    def __len__(self) -> int:
        res = self._call("query", filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for these ids; UsageError for unknown ids."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        rows = self._call("get", ids=ids, output_fields=["vector"])
        by_id = {int(r["id"]): r["vector"] for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise UsageError(f"unknown vector ids: {missing[:5]}")
        return np.asarray([by_id[i] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def describe(self) -> dict:
        out = {
            "backend": "milvus-lite" if self.lite else "milvus",
            "uri": self.uri,
            "collection": self.collection,
            "dim": self.dim,
            "stamp": self.stamp,
            "vectors": len(self),
            "index_type": self.index_type,
            "index_reason": (
                "Milvus Lite: exact (FLAT) inner-product search"
                if self.lite
                else f"Milvus {self.index_type} index, built and maintained by the server"
            ),
            "filter_pushdown": "payload fields (" + ", ".join(PAYLOAD_FIELDS) + ") and ids",
        }
        if not self.lite:
            try:
                progress = self.index_progress()
            except Exception:  # noqa: BLE001 - informative only
                progress = {}
            for key in ("indexed_rows", "pending_index_rows"):
                if key in progress:
                    out[key] = int(progress[key])
            if self.knobs:
                out["index_params"] = dict(self.knobs)
        return out


def payload_from_products(products: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per-vector payload rows from catalog product dicts (the scalar fields Milvus
    filters on); missing fields are left out."""
    rows = []
    for p in products:
        row = {k: p.get(k) for k in PAYLOAD_FIELDS if p.get(k) is not None}
        if p.get("attributes"):
            row["attrs"] = {str(k): str(v) for k, v in dict(p["attributes"]).items()}
        rows.append(row)
    return rows
