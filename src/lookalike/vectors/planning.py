"""Which FAISS index a catalog gets, with which parameters, and why: plain arithmetic on
the catalog's size, the vectors' width and a memory budget. Nothing here builds an index
or touches a file (building, training and searching FAISS indexes: faiss_index.py; the
store that keeps them on disk: faiss_store.py).

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
per-vector ceiling) wins. Approximate indexes are trained on a sample, then `nprobe` is
tuned on the catalog itself (faiss_index.tune_nprobe). `info` shows the plan, the
reason, and the measured recall.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from lookalike.errors import UsageError

EXACT_WORK = 16_000_000  # n*dim: exact search stays below a few ms a query on one core
DEFAULT_BUDGET_FRACTION = 0.5  # default memory budget: half the machine's RAM
MAX_BYTES_PER_VECTOR = 1536  # approximate indexes stay under 1.5 KB a vector (the 1M target)

# How each kind re-ranks its candidates (used when it is searched and tuned):
REFINED = ("ivf-pq-sq8", "ivf-pq-sq6", "ivf-pq-sq4")  # re-ranked by an in-RAM SQ copy
DISK_RERANKED = ("opq-ivf-pq",)  # no re-rank copy in RAM: re-scored from the on-disk log
LOG_RESCORED = {"ivf-pq-sq6": 4}
"""Kinds whose re-ranked top (k x this) is re-scored exactly from the on-disk log: a
6-bit copy orders near neighbours too coarsely for Recall@10 0.95 on its own (0.947 at
1M, 1,632-d), and a few exact reads a query settle the final order."""


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


# --------------------------------------------------------------------------- budget


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_budget() -> int:
    """The memory budget used when none is given: half the machine's RAM."""
    return int(physical_memory_bytes() * DEFAULT_BUDGET_FRACTION)


def parse_memory_budget(text: str | int | None) -> int | None:
    """'4G', '512M', '1.5GiB', '2000000000' -> bytes; None/''/'auto' -> None (the default)."""
    if text is None:
        return None
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace("ib", "").replace("b", "")
    if s in ("", "auto"):
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    mult = 1
    if s[-1] in units:
        mult = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise UsageError(f"bad memory budget {text!r}: use e.g. 512M, 4G") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"memory budget must be a positive number, got {text!r}")
    return int(value * mult)


def _mb(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


# --------------------------------------------------------------------------- the choice


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


def training_size(plan: IndexPlan) -> int:
    """How many vectors to train on (a sample, so 1M builds take minutes)."""
    if plan.exact:
        return 0
    return int(max(plan.params["nlist"] * 40, 10_000))
