"""Which FAISS index a catalog gets, how it is built, tuned and searched.

The choice follows the catalog's size and a memory budget (`--memory-budget`):

1. `flat` (exact inner product, 4*dim bytes a vector) while exact search is fast
   enough: n*dim <= EXACT_WORK multiply-adds a query (12,500 vectors at 1280-d, a few
   ms on one core) and the vectors fit the budget.
2. `ivf-pq-sq8`: an inverted file (nlist ~ 2*sqrt(n) lists) over 4-bit fast-scan
   product-quantised codes (dim/8 bytes), re-ranked exactly enough by an 8-bit
   scalar-quantised copy (dim bytes): about dim + dim/16 + 8 bytes a vector (1.37 KB at
   1280-d). The best recall/speed per byte measured here (docs/scale.md).
   Used while it stays within MAX_BYTES_PER_VECTOR (1280-d and below).
3. `ivf-pq-sq6`: the same with a 6-bit re-rank copy (about 0.75*dim + dim/16 + 8 bytes),
   its best 4k re-scored exactly from the on-disk log: for wider embeddings, where the
   8-bit copy would pass MAX_BYTES_PER_VECTOR (1,334 B at the default model's 1,632-d
   against 1,742 B with 8 bits).
4. `ivf-pq-sq4`: the same with a 4-bit re-rank copy (about dim/2 + dim/16 + 8 bytes).
5. `opq-ivf-pq`: OPQ rotation to 4m dims + m 8-bit PQ codes only (m = dim/20, at most
   64 bytes, + 8), its candidates re-scored exactly from the on-disk log; for budgets
   where nothing else fits (the 10M-on-one-machine case). Lower recall, said so.

The first that fits the budget (and, unless the budget leaves room for nothing else, the
per-vector ceiling) wins. Approximate indexes are trained on a sample, then
`nprobe` is tuned on the catalog itself: the smallest number of probed lists whose
Recall@10 against exact search, for sampled catalog vectors as queries, reaches
TARGET_RECALL. `info` shows the plan, the reason, and the measured recall.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

EXACT_WORK = 16_000_000  # n*dim: exact search stays below a few ms a query on one core
TARGET_RECALL = 0.97  # tuned Recall@10 on catalog samples (the target is 0.95)
NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K_FACTOR = 16  # candidates re-ranked by the refine codes: k_factor * k
K_FACTORS = (16, 64, 160)  # tried in this order for each nprobe
DISK_RERANKED = ("opq-ivf-pq",)  # no re-rank copy in RAM: re-scored from the on-disk log
DISK_K_FACTORS = (4, 10, 25)
LOG_RESCORED = {"ivf-pq-sq6": 4}
"""Kinds whose re-ranked top (k x this) is re-scored exactly from the on-disk log: a
6-bit copy orders near neighbours too coarsely for Recall@10 0.95 on its own (0.947 at
1M, 1,632-d), and a few exact reads a query settle the final order."""
DEFAULT_BUDGET_FRACTION = 0.5  # default memory budget: half the machine's RAM
MAX_BYTES_PER_VECTOR = 1536  # approximate indexes stay under 1.5 KB a vector (the 1M target)
REFINED = ("ivf-pq-sq8", "ivf-pq-sq6", "ivf-pq-sq4")  # re-ranked by an in-RAM SQ copy


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index to build and why (what `info` shows)."""

    kind: str  # flat | ivf-pq-sq8 | ivf-pq-sq6 | ivf-pq-sq4 | opq-ivf-pq
    reason: str
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "params": dict(self.params)}

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def with_params(self, **changes: object) -> IndexPlan:
        params = dict(self.params)
        params.update(changes)
        return IndexPlan(self.kind, self.reason, params)


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_budget() -> int:
    """The memory budget used when none is given: half the machine's RAM."""
    return int(physical_memory_bytes() * DEFAULT_BUDGET_FRACTION)


def _mb(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def choose_nlist(n: int) -> int:
    """Inverted lists for n vectors: a power of two near 2*sqrt(n), 16..8192."""
    target = min(2.0 * np.sqrt(max(n, 1)), max(n, 1) / 39)  # k-means wants 39 points a list
    return int(min(8192, max(16, 2 ** int(np.floor(np.log2(max(target, 1)) + 0.5)))))


def _pq_m(dim: int, bytes_per_dim: float) -> int:
    """PQ sub-quantisers: dim*bytes_per_dim*2 4-bit codes, even, dividing dim."""
    m = max(2, int(dim * bytes_per_dim * 2))
    m -= m % 2
    while m > 2 and dim % m:
        m -= 2
    return m


def candidate_plans(n: int, dim: int) -> list[tuple[str, str, float, dict]]:
    """(kind, factory, bytes a vector, params) for the approximate indexes, best first."""
    nlist = choose_nlist(n)
    m16 = _pq_m(dim, 1 / 16)  # dim/8 4-bit codes = dim/16 bytes
    opq_m = max(8, min(64, dim // 20))
    opq_m -= opq_m % 4
    return [
        (
            "ivf-pq-sq8",
            f"IVF{nlist},PQ{m16}x4fs,Refine(SQ8)",
            dim + m16 / 2 + 8,
            {"nlist": nlist, "pq_m": m16, "refine": "SQ8"},
        ),
        (
            "ivf-pq-sq6",
            f"IVF{nlist},PQ{m16}x4fs,Refine(SQ6)",
            dim * 0.75 + m16 / 2 + 8,
            {"nlist": nlist, "pq_m": m16, "refine": "SQ6"},
        ),
        (
            "ivf-pq-sq4",
            f"IVF{nlist},PQ{m16}x4fs,Refine(SQ4)",
            dim / 2 + m16 / 2 + 8,
            {"nlist": nlist, "pq_m": m16, "refine": "SQ4"},
        ),
        (
            "opq-ivf-pq",
            f"OPQ{opq_m}_{min(dim, 4 * opq_m)},IVF{nlist},PQ{opq_m}",
            opq_m + 8 + dim * min(dim, 4 * opq_m) * 4 / max(n, 1),
            {"nlist": nlist, "pq_m": opq_m},
        ),
    ]


def choose_index(
    n: int,
    dim: int,
    memory_budget_bytes: int | None = None,
    current: IndexPlan | None = None,
    exact_limit: int | None = None,
) -> IndexPlan:
    """The index for n vectors of dim dims under a memory budget (None: the default).
    `current` adds hysteresis so a catalog hovering at a threshold is not rebuilt back
    and forth; `exact_limit` overrides the exact-search size limit (EXACT_WORK // dim)."""
    budget = memory_budget_bytes or default_memory_budget()
    if exact_limit is None:
        exact_limit = EXACT_WORK // dim
    back_to_exact = exact_limit
    if current is not None and not current.exact:
        back_to_exact //= 2  # go back to exact only well below the threshold
    flat_bytes = n * dim * 4
    if n <= back_to_exact and flat_bytes <= budget:
        return IndexPlan(
            "flat",
            f"exact search: {n:,} vectors <= {exact_limit:,} (exact stays fast up to "
            f"{EXACT_WORK:,} multiply-adds a query) and {_mb(flat_bytes)} fits the "
            f"{_mb(budget)} budget",
            {"bytes_per_vector": dim * 4},
        )
    if n > exact_limit:
        why = f"{n:,} vectors > {exact_limit:,} for exact search"
    elif n > back_to_exact:
        why = f"{n:,} vectors: approximate until the catalog shrinks below {back_to_exact:,}"
    else:
        why = f"exact search needs {_mb(flat_bytes)} > the {_mb(budget)} budget"
    plans = candidate_plans(n, dim)
    # the per-vector ceiling drops plans over it, unless it would drop them all
    within = [p for p in plans if p[2] <= MAX_BYTES_PER_VECTOR] or plans
    for kind, factory, bpv, params in within:
        need = n * bpv * 1.1 + (8 << 20)
        if need <= budget:
            return IndexPlan(
                kind,
                f"{why}; {factory} needs ~{bpv:,.0f} B a vector, {_mb(need)} for {n:,} "
                f"vectors, within the {_mb(budget)} budget",
                {**params, "factory": factory, "bytes_per_vector": round(bpv, 1)},
            )
    kind, factory, bpv, params = plans[-1]
    return IndexPlan(
        kind,
        f"{why}; even the smallest index ({factory}, ~{bpv:,.0f} B a vector, "
        f"{_mb(n * bpv)}) exceeds the {_mb(budget)} budget: raise --memory-budget",
        {**params, "factory": factory, "bytes_per_vector": round(bpv, 1)},
    )


def new_index(plan: IndexPlan, dim: int) -> faiss.Index:
    """An empty (untrained for approximate kinds) index for the plan."""
    if plan.exact:
        return faiss.IndexFlatIP(dim)
    index = faiss.index_factory(dim, plan.params["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 12  # k-means iterations: enough for routing, keeps 1M builds in minutes
    ivf.cp.max_points_per_centroid = 64
    return index


def training_size(plan: IndexPlan) -> int:
    """How many vectors to train on (a sample, so 1M builds take minutes)."""
    if plan.exact:
        return 0
    return int(max(plan.params["nlist"] * 40, 10_000))


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
