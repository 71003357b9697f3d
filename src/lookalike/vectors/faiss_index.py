"""Building, training, tuning and searching the FAISS index an `IndexPlan` names
(planning.py decides which one). Indexes here are labelled by row number (the store's
slots) and re-score candidates exactly from a `RawVectors` log; nothing here knows
image ids, tombstones or the files of the store (faiss_store.py).

`nprobe` is tuned on the catalog itself: the smallest number of probed lists whose
Recall@10 against exact search, for sampled catalog vectors as queries, reaches
TARGET_RECALL (and for re-ranked kinds the re-rank depth with it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import faiss
import numpy as np

from lookalike.vectors.planning import (
    DISK_RERANKED,
    LOG_RESCORED,
    REFINED,
    IndexPlan,
    training_size,
)
from lookalike.vectors.store_files import RawVectors

TARGET_RECALL = 0.97  # tuned Recall@10 on catalog samples (the target is 0.95)
NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K_FACTOR = 16  # candidates re-ranked by the refine codes: k_factor * k
K_FACTORS = (16, 64, 160)  # tried in this order for each nprobe
DISK_K_FACTORS = (4, 10, 25)
TUNE_QUERIES = 200
ROW_CHUNK = 50_000  # rows read from the log at a time when adding or scanning


# --------------------------------------------------------------------------- threads


def build_threads() -> int:
    """OpenMP threads for batch work: LOOKALIKE_THREADS, else the idle cores (at least 1).
    FAISS's OpenMP loops spin-wait: on a machine already busy, 2 threads on 2 cores
    measured 6-10x slower than 1 (docs/scale.md)."""
    env = os.environ.get("LOOKALIKE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def set_threads(nq: int) -> None:
    """One OpenMP thread for a few queries, the idle cores for batches. OpenMP keeps
    this setting per calling thread."""
    faiss.omp_set_num_threads(1 if nq < 8 else build_threads())


# --------------------------------------------------------------------------- exact search


def empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def exact_topk(
    queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over `vectors` (rows labelled `labels`),
    padded with -inf / -1. FAISS's own kernels (not NumPy's BLAS, whose thread pool
    spin-waits badly on a busy machine)."""
    nq = queries.shape[0]
    scores, out = empty_result(nq, k)
    n = vectors.shape[0]
    if n == 0 or k <= 0:
        return scores, out
    kk = min(k, n)
    d, i = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        kk,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    ok = i >= 0
    scores[:, :kk] = np.where(ok, d, -np.inf)
    out[:, :kk] = np.where(ok, np.asarray(labels, dtype=np.int64)[np.maximum(i, 0)], -1)
    return scores, out


def rescore_from_log(
    q: np.ndarray, cand: np.ndarray, k: int, raw: RawVectors
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidate rows (-1 padded) re-scored exactly from the log: top-k."""
    scores, out = empty_result(q.shape[0], k)
    for qi in range(q.shape[0]):
        c = np.unique(cand[qi][cand[qi] >= 0])
        s, lab = exact_topk(q[qi : qi + 1], raw.read(c), c, k)
        scores[qi], out[qi] = s[0], lab[0]
    return scores, out


# --------------------------------------------------------------------------- building


def new_index(plan: IndexPlan, dim: int) -> faiss.Index:
    """An empty (untrained for approximate kinds) index for the plan."""
    if plan.exact:
        return faiss.IndexFlatIP(dim)
    index = faiss.index_factory(dim, plan.params["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 12  # k-means iterations: enough for routing, keeps 1M builds in minutes
    ivf.cp.max_points_per_centroid = 64
    return index


def train_index(
    plan: IndexPlan, dim: int, raw: RawVectors, n: int, rng: np.random.Generator
) -> faiss.Index:
    """A new index for the plan, trained (approximate kinds) on a sample of the first n
    log rows, still empty."""
    index = new_index(plan, dim)
    if not plan.exact:
        sample = np.sort(rng.choice(n, min(n, training_size(plan)), replace=False))
        index.train(raw.read(sample))
    return index


def add_rows(
    index: faiss.Index, raw: RawVectors, start: int, stop: int, chunk: int = ROW_CHUNK
) -> None:
    """Add log rows [start, stop) to `index` in row order (labels = slots)."""
    for lo in range(start, stop, chunk):
        index.add(raw.read_range(lo, min(stop, lo + chunk)))


def tune_on_catalog(
    index: faiss.Index, plan: IndexPlan, raw: RawVectors, n: int, rng: np.random.Generator
) -> IndexPlan:
    """nprobe from Recall@10 of TUNE_QUERIES catalog vectors (the first n log rows, all
    in `index`) against exact search over them."""
    qslots = np.sort(rng.choice(n, min(n, TUNE_QUERIES), replace=False))
    queries = raw.read(qslots)
    best_s = np.full((len(qslots), 11), -np.inf, dtype=np.float32)
    best_l = np.full((len(qslots), 11), -1, dtype=np.int64)
    for lo in range(0, n, ROW_CHUNK):
        rows = raw.read_range(lo, min(n, lo + ROW_CHUNK))
        s, lab = exact_topk(queries, rows, np.arange(lo, lo + len(rows)), 11)
        all_s = np.concatenate([best_s, s], axis=1)
        alll = np.concatenate([best_l, lab], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :11]
        best_s = np.take_along_axis(all_s, order, 1)
        best_l = np.take_along_axis(alll, order, 1)
    return tune_nprobe(
        index,
        plan,
        queries,
        best_l,
        10,
        exclude=qslots,
        rescore=lambda qs, cand, k: rescore_from_log(qs, cand, k, raw)[1],
    )


# --------------------------------------------------------------------------- searching


def search_parameters(
    plan: IndexPlan, sel: faiss.IDSelector | None, nprobe_scale: float = 1.0
) -> faiss.SearchParameters | None:
    """Per-call search parameters (selector, nprobe, re-rank depth); None for defaults."""
    if plan.exact:
        if sel is None:
            return None
        params = faiss.SearchParameters()
        params.sel = sel
        return params
    nprobe = int(plan.params.get("nprobe", 16) * nprobe_scale)
    nprobe = max(1, min(nprobe, plan.params["nlist"]))
    ivf = faiss.SearchParametersIVF()
    ivf.nprobe = nprobe
    if sel is not None:
        ivf.sel = sel
    if plan.kind in REFINED:
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = float(plan.params.get("k_factor", K_FACTOR))
        params.base_index_params = ivf
        params._keep = ivf  # keep the python object alive with the parent
        return params
    return ivf


def search_index(
    index: faiss.Index,
    plan: IndexPlan,
    raw: RawVectors,
    q: np.ndarray,
    k: int,
    params: faiss.SearchParameters | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The index's top-k rows; kinds without an in-RAM re-rank copy fetch k_factor x k
    candidates and re-score them exactly from the log, and LOG_RESCORED kinds re-score
    their re-ranked best few the same way."""
    if plan.kind in LOG_RESCORED:
        _, cand = index.search(q, k * LOG_RESCORED[plan.kind], params=params)
        return rescore_from_log(q, cand, k, raw)
    if plan.kind not in DISK_RERANKED:
        return index.search(q, k, params=params)
    depth = k * int(plan.params.get("k_factor", 10))
    _, cand = index.search(q, depth, params=params)
    return rescore_from_log(q, cand, k, raw)


def search_rows_exactly(
    index: faiss.Index,
    plan: IndexPlan,
    raw: RawVectors,
    q: np.ndarray,
    k: int,
    rows: np.ndarray,
    sel: faiss.IDSelector,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over these rows (sorted; `sel` selects the same). Exact index: its
    float32 vectors. Refined indexes: the in-RAM scalar-quantised copy scans only these
    vectors (no list routing, so nothing is missed), then the best candidates are
    re-scored exactly from the log. Otherwise: all these vectors from the log."""
    if plan.exact:
        return exact_topk(q, index.reconstruct_batch(rows), rows, k)
    if not isinstance(index, faiss.IndexRefine):
        return exact_topk(q, raw.read(rows), rows, k)
    refine = faiss.downcast_index(index.refine_index)
    depth = min(len(rows), max(4 * k, k + 32))
    params = faiss.SearchParameters()
    params.sel = sel
    _, cand = refine.search(q, depth, params=params)
    scores, out = empty_result(q.shape[0], k)
    for qi in range(q.shape[0]):
        c = cand[qi][cand[qi] >= 0]
        s, lab = exact_topk(q[qi : qi + 1], raw.read(np.sort(c)), np.sort(c), k)
        scores[qi], out[qi] = s[0], lab[0]
    return scores, out


# --------------------------------------------------------------------------- tuning


def recall_at(
    found: np.ndarray, truth: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> float:
    """Mean |found top-k & truth top-k| / k; `exclude` drops one label a row (the query's
    own id when catalog vectors are the queries) from both before cutting at k."""
    hits = 0
    for i, (f, t) in enumerate(zip(found, truth, strict=True)):
        if exclude is not None:
            f = f[f != exclude[i]]
            t = t[t != exclude[i]]
        hits += len((set(f[:k].tolist()) & set(t[:k].tolist())) - {-1})
    return hits / (k * len(truth))


def tune_nprobe(
    index: faiss.Index,
    plan: IndexPlan,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = 10,
    target: float = TARGET_RECALL,
    exclude: np.ndarray | None = None,
    rescore: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
) -> IndexPlan:
    """The smallest nprobe whose Recall@k (vs `truth`, exact top-(k+1) labels, with the
    query's own label in `exclude`) reaches the target; the plan comes back with nprobe
    and the measured recall. For kinds re-ranked from the on-disk log (`rescore(queries,
    candidate labels, k) -> labels`), the re-rank depth is tuned with nprobe."""
    nlist = plan.params["nlist"]
    refined = plan.kind in REFINED
    # re-ranking more candidates is cheap next to scanning more lists: try it first
    if refined:
        k_factors = K_FACTORS
    elif plan.kind in DISK_RERANKED and rescore is not None:
        k_factors = DISK_K_FACTORS
    else:
        k_factors = (K_FACTOR,)
    best = None
    for nprobe in sorted({p for p in NPROBES if p <= nlist} | {nlist}):
        for k_factor in k_factors:
            trial = plan.with_params(nprobe=nprobe, k_factor=k_factor)
            params = search_parameters(trial, None)
            if plan.kind in DISK_RERANKED and rescore is not None:
                _, cand = index.search(queries, (k + 1) * k_factor, params=params)
                labels = rescore(queries, cand, k + 1)
            elif plan.kind in LOG_RESCORED and rescore is not None:
                depth = (k + 1) * LOG_RESCORED[plan.kind]
                _, cand = index.search(queries, depth, params=params)
                labels = rescore(queries, cand, k + 1)
            else:
                _, labels = index.search(queries, k + 1, params=params)
            r = recall_at(labels, truth, k, exclude)
            if best is None or r > best.params["tuned_recall_at_10"] + 1e-9:
                best = trial.with_params(tuned_recall_at_10=round(r, 4), tuned_queries=len(queries))
            if r >= target:
                return best
    assert best is not None
    return best
