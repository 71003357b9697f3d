"""Photo and words together: the visual ranking refined by the words, or the words alone.

How a photo and words are fused (chosen by measurement on fashion-footwear, see
docs/search.md and benchmarks/bench_text.py):

1. Candidates: the photo's `POOL` nearest products, and its 2 x `POOL` nearest among
   the products that have some of the words (the words index says which), so a product
   that has the words is never lost because others look closer.
2. Each candidate's words score (`textindex.text_score`, 0..1: how many of the words
   it has, and in which fields) and its visual score (cosine of its best image).
3. The photo's own words: the attribute values that its `NEIGHBOURS` nearest products
   share far more often than the catalog does (`neighbourhood_profile`) count for the
   candidates that have them, beside the typed words (`NEIGHBOUR_WEIGHT`). A photo of
   a red shoe has red shoes around it, so when the typed words narrow the kind of
   shoe, red ones of that kind still come first (within a kind, the embedding alone
   ranks shape above colour).
4. combined = (1 - text_weight) * visual
             + text_weight * (text + NEIGHBOUR_WEIGHT * neighbourhood)
   so text_weight 0 is the photo alone, and 1 the words (typed, and the photo's own).

Words that match nothing never empty a photo search: the photo's results come back,
with a note that says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import Catalog, Filters, Product
from .errors import UsageError
from .search import Result, best_images, check_k, results_for, search_scope
from .textindex import parse_words, text_score
from .vectors.base import VectorStore

TEXT_WEIGHT = 0.4  # default share of the words in the combined score (measured)
NEIGHBOUR_WEIGHT = 0.6  # the photo's neighbourhood words, beside the typed ones
NEIGHBOURS = 50  # the photo's nearest products whose attribute words make its profile
PROFILE_Z = 3.0  # a neighbourhood word counts when this far above its catalog share
POOL = 50  # candidates from the photo alone, and twice as many among the word matches

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class SearchReport:
    """One query's results, and what the words did."""

    results: list[Result]
    mode: str  # "photo", "words" or "both"
    words: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # words no result has
    note: str | None = None  # e.g. words that matched nothing: photo results only
    text_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "results": [r.to_dict() for r in self.results],
        }
        if self.words:
            out["words"] = list(self.words)
            out["unmatched"] = list(self.unmatched)
        if self.text_weight is not None:
            out["text_weight"] = self.text_weight
        if self.note:
            out["note"] = self.note
        return out


def check_text_weight(text_weight: float | None) -> float:
    if text_weight is None:
        return TEXT_WEIGHT
    if isinstance(text_weight, bool) or not isinstance(text_weight, int | float):
        raise UsageError(f"text_weight must be a number from 0 to 1, got {text_weight!r}")
    if not 0.0 <= float(text_weight) <= 1.0 or math.isnan(float(text_weight)):
        raise UsageError(f"text_weight must be from 0 to 1, got {text_weight}")
    return float(text_weight)


def attribute_words(product: Product) -> set[str]:
    """The lower-cased words of a product's attribute values (colour, material, ...)."""
    values = product.attributes.values()
    if any(isinstance(v, dict | list | tuple) for v in values):
        values = list(_leaves(product.attributes))
    text = " ".join(str(v) for v in values if v is not None and not isinstance(v, bool))
    return set(_TOKEN.findall(text.lower()))


def _leaves(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif value is not None and not isinstance(value, bool):
        yield value


def neighbourhood_profile(
    neighbours: Sequence[set[str]], document_counts: dict[str, int], total: int
) -> dict[str, float]:
    """The words that set the photo's neighbourhood apart: each word's share among
    the neighbours against its share in the whole catalog (a binomial z-score); only
    words far above their catalog share (z > `PROFILE_Z`) count, by how far."""
    if not neighbours or total <= 0:
        return {}
    m = len(neighbours)
    share: dict[str, float] = {}
    for words in neighbours:
        for word in words:
            share[word] = share.get(word, 0.0) + 1.0 / m
    profile = {}
    for word, s in share.items():
        p = min(max(document_counts.get(word, 0) / total, 1.0 / total), 1.0 - 1.0 / total)
        z = (s - p) / math.sqrt(p * (1.0 - p) / m)
        if z > PROFILE_Z:
            profile[word] = z - PROFILE_Z
    return profile


def neighbourhood_scores(
    profile: dict[str, float], candidates: dict[str, set[str]]
) -> dict[str, float]:
    """0..1 per candidate: the weight of the profile's words it has, over the best
    candidate's."""
    raw = {pid: sum(profile.get(w, 0.0) for w in words) for pid, words in candidates.items()}
    top = max(raw.values(), default=0.0)
    return {pid: (value / top if top > 0 else 0.0) for pid, value in raw.items()}


@dataclass
class Candidate:
    result: Result  # visual score in result.score
    text: float = 0.0
    matched: list[str] = field(default_factory=list)
    neighbourhood: float = 0.0


def fuse(
    candidates: Sequence[Candidate],
    text_weight: float,
    neighbour_weight: float = NEIGHBOUR_WEIGHT,
) -> list[tuple[float, Candidate]]:
    """(combined score, candidate), best first."""
    w = float(text_weight)
    scored = [
        ((1 - w) * c.result.score + w * (c.text + neighbour_weight * c.neighbourhood), c)
        for c in candidates
    ]
    scored.sort(key=lambda item: (-item[0], item[1].result.product_id))
    return scored


def gather(
    catalog: Catalog,
    store: VectorStore,
    query: np.ndarray,
    words: Sequence[str],
    filters: Filters | None = None,
    pool: int = POOL,
    neighbours: int = NEIGHBOURS,
    exclude: Collection[str] = (),
) -> tuple[list[Candidate], bool]:
    """The candidates of one photo + words query, scored on each side; and whether any
    product (passing the filters) has any of the words. `exclude`: products left out
    (leave-one-out evaluation)."""
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    scope = search_scope(catalog, store, filters)
    if scope.total == 0:
        return [], catalog.text_count(words, filters) > 0
    # the photo's nearest products, widely: the word matches among them are often the
    # nearest word matches of all, found without a second search
    wide = best_images(catalog, store, query, max(pool, neighbours), scope, None, exclude)
    nearest = list(wide)
    matches = _word_matches(catalog, words, wide, nearest)
    worded = [pid for pid in nearest if pid in matches][: 2 * pool]
    best = dict(list(wide.items())[:pool])
    if len(worded) < pool:
        having = catalog.text_count(words, filters)
        if having == 0:
            return [Candidate(r) for r in results_for(catalog, list(best.items()))], False
        if having > len(worded):
            # fewer word matches near the photo than wanted: search among the matches
            ids = catalog.text_image_ids(words, filters, any_word=True)
            inside = search_scope(catalog, store, None, ids)
            more = best_images(catalog, store, query, 2 * pool, inside, None, exclude)
            matches.update(
                _word_matches(catalog, words, more, [p for p in more if p not in matches])
            )
            wide = {**more, **wide}
            worded = sorted(set(worded) | set(more), key=lambda pid: -wide[pid][0])[: 2 * pool]
    for pid in worded:
        best.setdefault(pid, wide[pid])
    around = nearest[:neighbours]
    products = catalog.products(list(dict.fromkeys([*best, *around])))
    attrs = {pid: attribute_words(product) for pid, product in products.items()}
    around_words = [attrs[pid] for pid in around if pid in attrs]
    counts = catalog.word_counts(sorted(set().union(*around_words)))
    profile = neighbourhood_profile(around_words, counts, catalog.count_products())
    near = neighbourhood_scores(profile, {pid: attrs[pid] for pid in best if pid in attrs})
    out = []
    for r in results_for(catalog, list(best.items()), products):
        cols = matches.get(r.product_id, {})
        out.append(
            Candidate(
                r, text_score(cols, words), [w for w in words if w in cols], near[r.product_id]
            )
        )
    return out, True


def _word_matches(
    catalog: Catalog,
    words: Sequence[str],
    best: dict[str, tuple[float, int, str]],
    product_ids: Sequence[str],
) -> dict[str, dict[str, set[int]]]:
    """product_id -> word -> columns, for these products that have some of the words:
    from the cached per-column image lists of the words when every word has them (any
    image of a product stands for the product), else from the words index."""
    lists = catalog.text_image_columns(words)
    if any(found is None for found in lists.values()):
        return catalog.text_matches(words, product_ids)
    image_ids = np.array([best[pid][1] for pid in product_ids], dtype=np.int64)
    out: dict[str, dict[str, set[int]]] = {}
    for word, per_column in lists.items():
        for col, found in enumerate(per_column or ()):
            for i in np.flatnonzero(np.isin(image_ids, found)).tolist():
                out.setdefault(product_ids[i], {}).setdefault(word, set()).add(col)
    return out


def photo_and_words(
    catalog: Catalog,
    store: VectorStore,
    queries: np.ndarray,
    text: str,
    k: int = 10,
    filters: Filters | None = None,
    min_score: float | None = None,
    text_weight: float | None = None,
) -> list[SearchReport]:
    """Each query vector's products, refined by the words (see the module's notes).
    `min_score` applies to the combined score."""
    check_k(k)
    weight = check_text_weight(text_weight)
    words = parse_words(text)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    reports = []
    for query in queries:
        candidates, any_match = gather(catalog, store, query, words, filters)
        if not any_match:
            results = [
                c.result for c in candidates if min_score is None or c.result.score >= min_score
            ][:k]
            for r in results:
                r.visual, r.text, r.matched = r.score, 0.0, []
            reports.append(
                SearchReport(
                    results,
                    "both",
                    words,
                    list(words),
                    note=f"no product has any of the words {' '.join(words)!r}:"
                    " results from the photo alone",
                    text_weight=weight,
                )
            )
            continue
        results = []
        for combined, c in fuse(candidates, weight):
            if min_score is not None and combined < min_score:
                break
            r = c.result
            r.visual, r.text, r.matched, r.score = r.score, c.text, c.matched, combined
            results.append(r)
            if len(results) == k:
                break
        seen = {w for r in results for w in (r.matched or [])}
        reports.append(
            SearchReport(
                results, "both", words, [w for w in words if w not in seen], text_weight=weight
            )
        )
    return reports


def words_alone(
    catalog: Catalog,
    text: str,
    k: int = 10,
    filters: Filters | None = None,
    min_score: float | None = None,
) -> SearchReport:
    """The products that best match the words (no photo): `score` is the words score."""
    check_k(k)
    words = parse_words(text)
    found = catalog.text_search(words, k, filters)
    hits = [h for h in found.hits if min_score is None or h.score >= min_score]
    products = catalog.products([h.product_id for h in hits])
    results = []
    for hit in hits:
        product = products.get(hit.product_id)
        images = catalog.images_of(hit.product_id) if product is not None else []
        if product is None or not images:
            continue
        results.append(
            Result(
                product_id=product.product_id,
                score=hit.score,
                image_id=images[0].image_id,
                image=images[0].source,
                title=product.title,
                category=product.category,
                price=product.price,
                in_stock=product.in_stock,
                attributes=product.attributes,
                visual=None,
                text=hit.score,
                matched=list(hit.matched),
            )
        )
    seen = {w for r in results for w in (r.matched or [])}
    note = None
    if not results:
        note = f"no product has the words {' '.join(words)!r}"
    return SearchReport(results, "words", words, [w for w in words if w not in seen], note=note)
