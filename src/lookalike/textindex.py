"""The words index: SQLite FTS5 over each product's title, category and attribute values.

It lives in the catalog file and is kept by SQLite triggers on the `products` table, so
every write to a product (from any code path, in any process) changes its words in the
same transaction: a crash can never leave the two apart, and a write that changes no
field does not touch the index. Words are stemmed (porter: "heel" finds "Heels") and
folded (case, diacritics); a word that is not a whole word of the catalog matches as a
prefix ("stilet" finds "Stilettos"). Ranking is BM25 (`bm25()`), title and category
weighing more than attribute values.

Queries: every product that has all the words comes first, ranked by BM25; when fewer
than k do, products that have some of the words follow, most words first. A query that
matches a very large share of the catalog (more than `RANK_WINDOW` products) is ranked
by BM25 within the first `RANK_WINDOW` of its matches (SQLite computes BM25 for every
row it ranks): every result still has all the words; `TextResults.total` says how many
matched.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UsageError

TEXT_INDEX_VERSION = "1"  # bump when what is indexed or how changes: the index is rebuilt
TOKENIZE = "porter unicode61 remove_diacritics 2"
COLUMNS = ("title", "category", "attrs")
WEIGHTS = (2.0, 4.0, 1.0)  # weight of a match in title, category, attribute values
RANK_WINDOW = 5_000
COLUMN_LIST_LIMIT = 20_000  # a word with more matches is looked up per doc, not per column
COLUMN_LIST_FACTOR = 20  # ... and so is one with 20 times more matches than docs asked about
MAX_WORDS = 32
MAX_QUERY_CHARS = 1000

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

# attribute values (strings and numbers, nested lists too) as one text
_ATTR_TEXT = (
    "(SELECT group_concat(atom, ' ') FROM json_tree({row}.attributes)"
    " WHERE type IN ('text', 'integer', 'real'))"
)
_DOC = "(SELECT doc FROM text_docs WHERE product_id = {row}.product_id)"
_INSERT = (
    "INSERT INTO products_text(rowid, title, category, attrs) VALUES ("
    + _DOC.format(row="NEW")
    + ", NEW.title, NEW.category, "
    + _ATTR_TEXT.format(row="NEW")
    + ");"
)
_DELETE = "DELETE FROM products_text WHERE rowid = " + _DOC.format(row="OLD") + ";"

SCHEMA = [
    # a stable doc number per product (products' own rowid may change on VACUUM)
    "CREATE TABLE IF NOT EXISTS text_docs ("
    " doc INTEGER PRIMARY KEY, product_id TEXT NOT NULL UNIQUE)",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS products_text USING fts5("
    f"{', '.join(COLUMNS)}, tokenize='{TOKENIZE}')",
    "CREATE TRIGGER IF NOT EXISTS products_text_insert AFTER INSERT ON products BEGIN"
    " INSERT INTO text_docs(product_id) VALUES (NEW.product_id); " + _INSERT + " END",
    "CREATE TRIGGER IF NOT EXISTS products_text_update"
    " AFTER UPDATE OF product_id, title, category, attributes ON products"
    " WHEN OLD.product_id IS NOT NEW.product_id OR OLD.title IS NOT NEW.title"
    " OR OLD.category IS NOT NEW.category OR OLD.attributes IS NOT NEW.attributes BEGIN "
    + _DELETE
    + " UPDATE text_docs SET product_id = NEW.product_id WHERE product_id = OLD.product_id; "
    + _INSERT
    + " END",
    "CREATE TRIGGER IF NOT EXISTS products_text_delete AFTER DELETE ON products BEGIN "
    + _DELETE
    + " DELETE FROM text_docs WHERE product_id = OLD.product_id; END",
]


def install(db: sqlite3.Connection) -> None:
    """Create the words index and its triggers (inside the caller's transaction)."""
    for statement in SCHEMA:
        db.execute(statement)


def drop(db: sqlite3.Connection) -> None:
    for name in ("products_text_insert", "products_text_update", "products_text_delete"):
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    db.execute("DROP TABLE IF EXISTS products_text")
    db.execute("DROP TABLE IF EXISTS text_docs")


def build(db: sqlite3.Connection) -> int:
    """(Re)fill the words index from the products table, inside the caller's
    transaction. Returns how many products it holds."""
    db.execute("DELETE FROM text_docs")
    db.execute("DELETE FROM products_text")
    db.execute("INSERT INTO text_docs(product_id) SELECT product_id FROM products")
    db.execute(
        "INSERT INTO products_text(rowid, title, category, attrs)"
        " SELECT d.doc, p.title, p.category, " + _ATTR_TEXT.format(row="p") + " FROM products p"
        " JOIN text_docs d ON d.product_id = p.product_id ORDER BY d.doc"
    )
    optimize(db)
    return db.execute("SELECT COUNT(*) FROM text_docs").fetchone()[0]


def optimize(db: sqlite3.Connection) -> None:
    """Merge the index's segments into one (faster queries after a bulk load)."""
    db.execute("INSERT INTO products_text(products_text) VALUES('optimize')")


def check(db: sqlite3.Connection) -> dict[str, Any]:
    """Does the words index hold exactly the catalog's products (and is FTS5 itself
    sound)? Returns counts and the ids that disagree."""
    db.execute("INSERT INTO products_text(products_text) VALUES('integrity-check')")
    missing = [
        r[0]
        for r in db.execute(
            "SELECT p.product_id FROM products p LEFT JOIN text_docs d USING(product_id)"
            " LEFT JOIN products_text t ON t.rowid = d.doc WHERE t.rowid IS NULL LIMIT 100"
        )
    ]
    extra = [
        r[0]
        for r in db.execute(
            "SELECT d.product_id FROM text_docs d LEFT JOIN products p USING(product_id)"
            " WHERE p.product_id IS NULL LIMIT 100"
        )
    ]
    return {
        "products": db.execute("SELECT COUNT(*) FROM products").fetchone()[0],
        "indexed": db.execute("SELECT COUNT(*) FROM products_text").fetchone()[0],
        "missing": missing,
        "extra": extra,
    }


# ------------------------------------------------------------------------------ queries


@dataclass
class TextHit:
    product_id: str
    score: float  # calibrated, 0..1: see `text_score`
    bm25: float  # positive: higher is better
    matched: list[str]  # the query's words this product has


@dataclass
class TextResults:
    words: list[str]  # the query's words, as parsed
    hits: list[TextHit] = field(default_factory=list)
    total: int = 0  # products that have every word (at least this many if ranked_window)
    ranked_window: bool = False  # True when BM25 ranked a window of the matches only

    @property
    def unmatched(self) -> list[str]:
        """Words that no returned product has."""
        seen = {word for hit in self.hits for word in hit.matched}
        return [word for word in self.words if word not in seen]


def text_score(columns: dict[str, set[int]], words: Sequence[str]) -> float:
    """How well a product's text matches the words, from 0 (no word) to 1 (every word
    in its title, its category and its attribute values): the mean over the words of
    the BM25 column weights of the columns holding that word, over their sum."""
    if not words:
        return 0.0
    full = sum(WEIGHTS)
    per_word = [sum(WEIGHTS[col] for col in columns.get(word, ())) / full for word in words]
    return sum(per_word) / len(words)


def parse_words(text: str) -> list[str]:
    """The words of a query, lower-cased, in order, without repeats. Raises UsageError
    for a query with no words or too long a one."""
    if not isinstance(text, str):
        raise UsageError("the words to search for must be text")
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"the words to search for are longer than {MAX_QUERY_CHARS} characters")
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(text)))
    if not words:
        raise UsageError(f"no words to search for in {text!r}")
    if len(words) > MAX_WORDS:
        raise UsageError(f"at most {MAX_WORDS} words can be searched for at once")
    return words


def _term(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'


def resolve_terms(db: sqlite3.Connection, words: Sequence[str]) -> list[str]:
    """The FTS5 term for each word: the (stemmed) word itself when some product has it,
    else the word as a prefix."""
    terms = []
    for word in words:
        exact = _term(word)
        hit = db.execute(
            "SELECT 1 FROM products_text WHERE products_text MATCH ? LIMIT 1", (exact,)
        ).fetchone()
        terms.append(exact if hit is not None else exact + "*")
    return terms


def search(
    db: sqlite3.Connection,
    words: Sequence[str],
    k: int,
    where: str = "1",
    params: Sequence[Any] = (),
    *,
    any_words: bool = True,
) -> TextResults:
    """The k best products for these words among those passing `where` (an SQL
    condition on products aliased p): the BM25 leaders among the products with every
    word (with `any_words`, then among those with some of them, when there are fewer
    than k), ordered by `text_score`, then BM25."""
    words = list(words)
    terms = resolve_terms(db, words)
    out = TextResults(words=words)
    want = max(4 * k, 50)
    ranked, out.total, out.ranked_window = _ranked(db, " ".join(terms), want, where, params)
    if any_words and len(words) > 1 and len(ranked) < want:
        have = {doc for doc, _, _ in ranked}
        more, _, _ = _ranked(db, " OR ".join(terms), want + len(have), where, params)
        ranked += [row for row in more if row[0] not in have]
    columns = column_matches(db, words, terms, [doc for doc, _, _ in ranked])
    for doc, pid, bm25 in ranked:
        cols = columns.get(doc, {})
        out.hits.append(
            TextHit(pid, text_score(cols, words), bm25, [w for w in words if w in cols])
        )
    out.hits.sort(key=lambda hit: (-hit.score, -hit.bm25))
    del out.hits[k:]
    return out


def _ranked(
    db: sqlite3.Connection, match: str, k: int, where: str, params: Sequence[Any]
) -> tuple[list[tuple[int, str, float]], int, bool]:
    """Top k (doc, product_id, bm25) for an FTS5 expression, how many matched (at
    least, when ranked in a window) and whether BM25 ranked only a window."""
    joined = where.strip() != "1"
    # without filters the FTS table alone answers (a join costs more than the ranking)
    source = (
        "products_text JOIN text_docs d ON d.doc = products_text.rowid"
        " JOIN products p ON p.product_id = d.product_id"
        if joined
        else "products_text"
    )
    cond = "products_text MATCH ?" + (f" AND ({where})" if joined else "")
    args = [match, *params]
    # the RANK_WINDOW-th match (in doc order): beyond it, rank only up to it
    edge = db.execute(
        f"SELECT products_text.rowid FROM {source} WHERE {cond}"
        " ORDER BY products_text.rowid LIMIT 1 OFFSET ?",
        [*args, RANK_WINDOW - 1],
    ).fetchone()
    window = ""
    if edge is not None:
        window = " AND products_text.rowid <= ?"
        args.append(edge[0])
    weights = ", ".join(str(w) for w in WEIGHTS)
    rows = db.execute(
        f"SELECT products_text.rowid, bm25(products_text, {weights}) AS s FROM {source}"
        f" WHERE {cond}{window} ORDER BY s LIMIT ?",
        [*args, int(k)],
    ).fetchall()
    if edge is None:
        total = db.execute(f"SELECT COUNT(*) FROM {source} WHERE {cond}", args).fetchone()[0]
    else:
        total = RANK_WINDOW
    owners = products_of(db, [r[0] for r in rows])
    ranked = [(r[0], owners[r[0]], -float(r[1])) for r in rows if r[0] in owners]
    return ranked, total, edge is not None


def _lookup(db: sqlite3.Connection, by: str, keys: Sequence[Any]) -> dict[Any, Any]:
    """text_docs rows looked up by `by` ("doc" or "product_id"): key -> the other."""
    other = "product_id" if by == "doc" else "doc"
    out: dict[Any, Any] = {}
    for start in range(0, len(keys), 500):
        chunk = list(keys[start : start + 500])
        inside = ",".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT {by}, {other} FROM text_docs WHERE {by} IN ({inside})", chunk
        ).fetchall()
        out.update((r[0], r[1]) for r in rows)
    return out


def products_of(db: sqlite3.Connection, docs: Sequence[int]) -> dict[int, str]:
    """doc number -> product_id."""
    return _lookup(db, "doc", [int(d) for d in docs])


ColumnLists = Callable[[str, int], "list[np.ndarray] | None"]


def column_lists(
    db: sqlite3.Connection, term: str, limit: int = COLUMN_LIST_LIMIT
) -> list[np.ndarray] | None:
    """The sorted docs that have `term` in each column (title, category, attribute
    values); None when more than `limit` products have it."""
    return _per_column(
        db, term, limit, "SELECT rowid FROM products_text WHERE products_text MATCH ?"
    )


def image_column_lists(db: sqlite3.Connection, term: str) -> list[np.ndarray] | None:
    """For each column, the sorted ids of the images whose product has `term` there;
    None when more than `COLUMN_LIST_LIMIT` products have it."""
    return _per_column(
        db,
        term,
        COLUMN_LIST_LIMIT,
        "SELECT i.image_id FROM images i JOIN text_docs d ON d.product_id = i.product_id"
        " WHERE d.doc IN (SELECT rowid FROM products_text WHERE products_text MATCH ?)"
        " ORDER BY i.image_id",
    )


def _per_column(db: sqlite3.Connection, term: str, limit: int, sql: str) -> list[np.ndarray] | None:
    """`sql` (one id column, one MATCH parameter) run for `term` in each column, as sorted
    id arrays; None when more than `limit` products have the term."""
    common = db.execute(
        "SELECT rowid FROM products_text WHERE products_text MATCH ? LIMIT 1 OFFSET ?",
        (term, int(limit)),
    ).fetchone()
    if common is not None:
        return None
    out = []
    for name in COLUMNS:
        rows = db.execute(sql, (f"{{{name}}}: {term}",)).fetchall()
        out.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
    return out


def column_matches(
    db: sqlite3.Connection,
    words: Sequence[str],
    terms: Sequence[str],
    docs: Sequence[int],
    lists: ColumnLists | None = None,
) -> dict[int, dict[str, set[int]]]:
    """For each of these docs that has some of the words: word -> the columns (0 title,
    1 category, 2 attribute values) that hold it. A word that few products have is
    looked up in its whole per-column match lists (`lists`, e.g. a cache of
    `column_lists`); a common one only for these docs (FTS5 seeks each of them)."""
    out: dict[int, dict[str, set[int]]] = {}
    wanted = np.unique(np.asarray(docs, dtype=np.int64))
    if not wanted.size:
        return out
    for word, term in zip(words, terms, strict=True):
        limit = min(COLUMN_LIST_LIMIT, COLUMN_LIST_FACTOR * int(wanted.size))
        per_column = (lists or (lambda t, n: column_lists(db, t, n)))(term, limit)
        if per_column is not None:
            for col, found in enumerate(per_column):
                for doc in wanted[np.isin(wanted, found, assume_unique=True)].tolist():
                    out.setdefault(doc, {}).setdefault(word, set()).add(col)
            continue
        marks = ", ".join(f"highlight(products_text, {i}, char(1), '')" for i in range(3))
        for start in range(0, wanted.size, 500):
            chunk = wanted[start : start + 500].tolist()
            inside = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT rowid, {marks} FROM products_text"
                f" WHERE products_text MATCH ? AND rowid IN ({inside})",
                [term, *chunk],
            ).fetchall()
            for row in rows:
                cols = {i for i, text in enumerate(row[1:]) if text and "\x01" in text}
                out.setdefault(row[0], {})[word] = cols or {0}
    return out


def docs_of(db: sqlite3.Connection, product_ids: Sequence[str]) -> dict[str, int]:
    """product_id -> doc number in the words index."""
    return _lookup(db, "product_id", list(product_ids))


def product_matches(
    db: sqlite3.Connection,
    words: Sequence[str],
    product_ids: Sequence[str],
    lists: ColumnLists | None = None,
) -> dict[str, dict[str, set[int]]]:
    """product_id -> word -> columns holding it, for those of these products with some
    of the words."""
    terms = resolve_terms(db, words)
    docs = docs_of(db, product_ids)
    by_doc = column_matches(db, words, terms, list(docs.values()), lists)
    return {pid: by_doc[doc] for pid, doc in docs.items() if doc in by_doc}


def document_counts(db: sqlite3.Connection, words: Sequence[str]) -> dict[str, int]:
    """How many products have each (stemmed) word."""
    return {
        word: db.execute(
            "SELECT COUNT(*) FROM products_text WHERE products_text MATCH ?", (_term(word),)
        ).fetchone()[0]
        for word in words
    }


# ------------------------------------------------------------------ the catalog's side

# entries kept per words-index cache: word -> count; term -> its per-column doc lists
# (each at most COLUMN_LIST_LIMIT docs a column: at most ~30 MB in all);
# words + filters -> the ids of the images of the products that have them; term -> per
# column, the ids of the images of the products that have it there
TEXT_CACHE_SIZES = {"counts": 100_000, "columns": 64, "image_ids": 64, "image_columns": 64}


def _where(filters: Any) -> tuple[str, list[Any]]:
    return ("1", []) if filters is None else filters.where()


class WordsQueries:
    """The catalog's words-index methods (a mixin of `Catalog`, which provides the
    connection `_db`, its lock `_lock`, and the cache fields). `filters` are
    `catalog.Filters`."""

    _db: sqlite3.Connection
    _lock: Any
    _text_caches: dict[str, dict[Any, Any]]
    _text_cache_version: tuple[int, int] | None

    def text_search(self, words: str | Sequence[str], k: int, filters: Any = None) -> TextResults:
        """The k products that best match the words (BM25), among those passing the
        filters (see `search`)."""
        parsed = parse_words(words) if isinstance(words, str) else list(words)
        where, params = _where(filters)
        with self._lock:
            return search(self._db, parsed, k, where, params)

    def text_matches(
        self, words: Sequence[str], product_ids: Sequence[str]
    ) -> dict[str, dict[str, set[int]]]:
        """product_id -> word -> columns holding it (0 title, 1 category, 2 attribute
        values), for those of these products that have some of the (parsed) words."""
        with self._lock:
            return product_matches(self._db, list(words), list(product_ids), self._column_lists)

    def text_image_columns(self, words: Sequence[str]) -> dict[str, list[np.ndarray] | None]:
        """word -> for each column (title, category, attribute values) the sorted ids of
        the images whose product has the word there; None for a word more than
        COLUMN_LIST_LIMIT products have. Kept until the catalog changes."""
        with self._lock:
            cache = self._text_cache("image_columns")
            out: dict[str, list[np.ndarray] | None] = {}
            for word, term in zip(words, resolve_terms(self._db, list(words)), strict=True):
                if term not in cache:
                    cache[term] = image_column_lists(self._db, term)
                out[word] = cache[term]
            return out

    def text_image_ids(
        self, words: Sequence[str], filters: Any = None, *, any_word: bool = False
    ) -> np.ndarray:
        """Ids of the images whose product has every word (`any_word`: some word) and
        passes the filters."""
        where, params = _where(filters)
        plain = filters is None or filters.is_empty()
        with self._lock:
            terms = resolve_terms(self._db, list(words))
            key = (tuple(terms), any_word, where, tuple(map(str, params)))
            cache = self._text_cache("image_ids")
            if key in cache:
                return cache[key]
            rows = self._db.execute(
                "SELECT i.image_id FROM images i JOIN text_docs d ON d.product_id = i.product_id"
                + (" JOIN products p ON p.product_id = i.product_id" if not plain else "")
                + " WHERE d.doc IN (SELECT rowid FROM products_text WHERE products_text MATCH ?)"
                + (f" AND ({where})" if not plain else ""),
                [(" OR " if any_word else " ").join(terms), *params],
            ).fetchall()
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            ids.setflags(write=False)
            if ids.size <= 100_000:
                cache[key] = ids
            return ids

    def text_count(self, words: Sequence[str], filters: Any = None) -> int:
        """How many products (passing the filters) have some of the (parsed) words."""
        where, params = _where(filters)
        plain = filters is None or filters.is_empty()
        with self._lock:
            terms = resolve_terms(self._db, list(words))
            if plain:
                sql = "SELECT COUNT(*) FROM products_text WHERE products_text MATCH ?"
            else:
                sql = (
                    "SELECT COUNT(*) FROM products_text"
                    " JOIN text_docs d ON d.doc = products_text.rowid"
                    " JOIN products p ON p.product_id = d.product_id"
                    f" WHERE products_text MATCH ? AND ({where})"
                )
            return self._db.execute(sql, [" OR ".join(terms), *params]).fetchone()[0]

    def word_counts(self, words: Sequence[str]) -> dict[str, int]:
        """How many products have each word (cached until the catalog changes)."""
        with self._lock:
            cache = self._text_cache("counts")
            todo = [w for w in words if w not in cache]
            if todo:
                cache.update(document_counts(self._db, todo))
            return {w: cache[w] for w in words}

    def _column_lists(self, term: str, limit: int) -> list[np.ndarray] | None:
        """column_lists, kept until the catalog changes."""
        with self._lock:
            cache = self._text_cache("columns")
            if term not in cache:
                lists = column_lists(self._db, term, limit)
                if lists is None:
                    return None
                cache[term] = lists
            return cache[term]

    def _text_cache(self, name: str) -> dict[str, Any]:
        """A per-connection cache of words-index answers, emptied whenever the catalog
        changed (here or in another process: SQLite's data_version) and when large."""
        version = (self._db.execute("PRAGMA data_version").fetchone()[0], self._db.total_changes)
        if self._text_cache_version != version:
            self._text_caches.clear()
            self._text_cache_version = version
        cache = self._text_caches.setdefault(name, {})
        if len(cache) > TEXT_CACHE_SIZES[name]:
            cache.clear()
        return cache

    def check_text_index(self) -> dict[str, Any]:
        """Counts and disagreements between the products and the words index."""
        with self._lock:
            return check(self._db)

    def rebuild_text_index(self) -> int:
        with self._lock, self.transaction():
            return build(self._db)
