"""Scale benchmark of the embedded FAISS store and of alternative FAISS indexes.

For N real-looking 1280-d vectors (bench_scale_data.py: real catalog embeddings plus
structured noise) and Q held-out queries, each index type reports: build time, memory
a vector (the serialized index bytes / N, which is what it holds in RAM), p50/p99
single-query latency (one thread), batch queries/s (all idle cores), Recall@10 against
exact search, and the same with a 1%-selective filter (a random 1% of the catalog, the
worst case for a filter: unrelated to the query).

    python benchmarks/bench_scale.py --n 100000                   # all index types
    python benchmarks/bench_scale.py --n 1000000 --kinds store     # the store's choice
    python benchmarks/bench_scale.py --n 10000000 --kinds opq-ivf-pq --queries 200

`store` is lookalike's FaissStore end to end (its own index choice, tuned nprobe,
exact search for selective filters); the other kinds are plain FAISS indexes with
their search knobs set for Recall@10 >= 0.95 where they can reach it. Prints one
Markdown table row per kind (and --json appends machine-readable rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale_data import CACHE, V1_SEEDS, Generator, seed_embeddings  # noqa: E402

from lookalike.vectors import parse_memory_budget  # noqa: E402
from lookalike.vectors.faiss_index import build_threads  # noqa: E402
from lookalike.vectors.faiss_store import FaissStore  # noqa: E402
from lookalike.vectors.planning import choose_nlist  # noqa: E402

K = 10


def catalog(n: int, gen: Generator) -> np.ndarray:
    """The n-vector catalog as a float32 memmap, generated once and cached."""
    suffix = "" if gen.dim == 1280 else f"-{gen.dim}d"  # 1280: the V1_SEEDS tables
    path = CACHE / f"catalog-{n}{suffix}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    for stale in CACHE.glob(f"truth-{n}{suffix}-*.npz"):  # ground truth of an older catalog
        stale.unlink()
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, gen.dim))
    lo = 0
    for chunk in gen.chunks(n, seed=7):
        out[lo : lo + len(chunk)] = chunk
        lo += len(chunk)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def ground_truth(x: np.ndarray, q: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Exact top-K ids of q over x (restricted to `allowed` rows), chunked."""
    faiss.omp_set_num_threads(build_threads())
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), K), -1, dtype=np.int64)
    rows = np.arange(len(x)) if allowed is None else np.sort(allowed)
    for lo in range(0, len(rows), 200_000):
        part = rows[lo : lo + 200_000]
        block = np.ascontiguousarray(x[part[0] : part[-1] + 1])
        if allowed is not None:
            block = block[part - part[0]]
        ix = faiss.IndexFlatIP(x.shape[1])
        ix.add(block)
        s, i = ix.search(q, K)
        i = np.where(i >= 0, part[np.maximum(i, 0)], -1)
        all_s = np.concatenate([best_s, s], 1)
        all_i = np.concatenate([best_i, i], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :K]
        best_s = np.take_along_axis(all_s, order, 1)
        best_i = np.take_along_axis(all_i, order, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [len(set(f[:K]) & set(t[:K]) - {-1}) / K for f, t in zip(found, truth, strict=True)]
        )
    )


def latencies(search, q: np.ndarray) -> tuple[float, float, float, np.ndarray, float]:
    """(p50 ms, p99 ms, batch queries/s, labels, p50 CPU ms) of `search(queries) ->
    labels`. Wall-clock p50/p99 include waiting for a core on a shared machine; the CPU
    time of the searching thread is what the query costs on an idle core."""
    faiss.omp_set_num_threads(1)
    search(q[:5])  # warm up
    times, cpu = [], []
    labels = []
    for row in q:
        t, c = time.perf_counter(), time.thread_time()
        labels.append(search(row[None, :])[0])
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    faiss.omp_set_num_threads(build_threads())
    t = time.perf_counter()
    search(q)
    qps = len(q) / (time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return (
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        qps,
        np.stack(labels),
        float(np.percentile(np.asarray(cpu) * 1000, 50)),
    )


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def plain_faiss(kind: str, x: np.ndarray, n: int, dim: int):
    """Build a plain FAISS index of one kind; returns (index, search(q, allowed)->labels,
    note)."""
    nlist = choose_nlist(n)
    factories = {
        "flat": "Flat",
        "hnsw32-sq8": "HNSW32,SQ8",
        "ivf-sq8": f"IVF{nlist},SQ8",
        "ivf-pq-sq8": f"IVF{nlist},PQ{dim // 8}x4fs,Refine(SQ8)",
        "ivf-pq-sq4": f"IVF{nlist},PQ{dim // 8}x4fs,Refine(SQ4)",
        "pca256-ivf-pq-sq8": f"PCA256,IVF{nlist},PQ64x4fs,Refine(SQ8)",
        "opq-ivf-pq": f"OPQ64_256,IVF{nlist},PQ64",
    }
    factory = factories[kind]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(build_threads())
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.niter = 12
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, min(n, max(40 * nlist, 10_000)), replace=False))
        index.train(np.ascontiguousarray(x[sample]))
    if kind.startswith("hnsw"):
        faiss.downcast_index(index).hnsw.efConstruction = 80
    for lo in range(0, n, 100_000):
        index.add(np.ascontiguousarray(x[lo : lo + 100_000]))
    return index, factory


def knob_params(kind: str, index: faiss.Index, knob: int, sel=None):
    if kind == "flat":
        p = faiss.SearchParameters()
    elif kind.startswith("hnsw"):
        p = faiss.SearchParametersHNSW()
        p.efSearch = knob
    else:
        p = faiss.SearchParametersIVF()
        p.nprobe = knob
    if sel is not None:
        p.sel = sel
    if "sq8" in kind and kind.startswith(("ivf-pq", "pca")) or kind == "ivf-pq-sq4":
        r = faiss.IndexRefineSearchParameters()
        r.k_factor = 16
        r.base_index_params = p
        r._keep = p
        return r
    return p


def tune_knob(kind, index, q, truth, target=0.95):
    if kind == "flat":
        return 0, 1.0
    knobs = (16, 32, 64, 128, 256, 512) if kind.startswith("hnsw") else (4, 8, 16, 32, 64, 128)
    best = None
    for knob in knobs:
        _, lab = index.search(q, K, params=knob_params(kind, index, knob))
        r = recall(lab, truth)
        best = (knob, r)
        if r >= target:
            break
    return best


def run_plain(kind, x, q, truth, allowed, truth_f, dim):
    n = len(x)
    t0 = time.perf_counter()
    index, factory = plain_faiss(kind, x, n, dim)
    build = time.perf_counter() - t0
    tune_q = q[: len(q) // 2]  # tune on half the queries, report on the other half
    knob, _ = tune_knob(kind, index, tune_q, truth[: len(q) // 2])
    evq, evt = q[len(q) // 2 :], truth[len(q) // 2 :]
    p50, p99, qps, lab, cpu50 = latencies(
        lambda b: index.search(b, K, params=knob_params(kind, index, knob))[1], evq
    )
    bits = np.zeros(n, dtype=bool)
    bits[allowed] = True
    packed = np.packbits(bits, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))
    f50, _, _, flab, fcpu50 = latencies(
        lambda b: index.search(b, K, params=knob_params(kind, index, knob, sel))[1], evq
    )
    return {
        "kind": kind,
        "index": factory + (f" (knob {knob})" if knob else ""),
        "build_s": build,
        "bytes_per_vector": index_bytes(index) / n,
        "p50_ms": p50,
        "p99_ms": p99,
        "cpu_p50_ms": cpu50,
        "filter_cpu_p50_ms": fcpu50,
        "qps": qps,
        "recall10": recall(lab, evt),
        "filter_p50_ms": f50,
        "filter_recall10": recall(flab, truth_f[len(q) // 2 :]),
        "filter_method": "in-index id selector",
    }


def run_store(x, q, truth, allowed, truth_f, dim, workdir: Path, batch: int, budget=None):
    n = len(x)
    t0 = time.perf_counter()
    reuse = (workdir / "vectors" / "store.json").exists()
    store = FaissStore(
        workdir / "vectors", dim, "bench", background=False, memory_budget_bytes=budget
    )
    if reuse and len(store) == n:
        build = json.loads((workdir / "build.json").read_text())["build_s"]
    else:
        for lo in range(0, n, batch):
            rows = np.ascontiguousarray(x[lo : lo + batch])
            store.add(np.arange(lo, lo + len(rows)), rows)
        store.wait_for_rebuild()
        if store.rebuild_reason():
            store.rebuild("benchmark: final index")
        store.save()
        build = time.perf_counter() - t0
        (workdir / "build.json").write_text(json.dumps({"build_s": build, "batch": batch}))
    info = store.describe()
    evq, evt = q[len(q) // 2 :], truth[len(q) // 2 :]
    p50, p99, qps, lab, cpu50 = latencies(lambda b: store.search(b, K)[1], evq)
    f50, _, _, flab, fcpu50 = latencies(lambda b: store.search(b, K, allowed_ids=allowed)[1], evq)
    index = store._index  # the live index, for its size
    row = {
        "kind": "store",
        "index": f"{info['index_type']}: {info['index_params'].get('factory', 'Flat')}"
        + (
            f" (nprobe {info['index_params']['nprobe']})"
            if "nprobe" in info["index_params"]
            else ""
        ),
        "build_s": build,
        "bytes_per_vector": index_bytes(index) / n,
        "p50_ms": p50,
        "p99_ms": p99,
        "cpu_p50_ms": cpu50,
        "filter_cpu_p50_ms": fcpu50,
        "qps": qps,
        "recall10": recall(lab, evt),
        "filter_p50_ms": f50,
        "filter_recall10": recall(flab, truth_f[len(q) // 2 :]),
        "filter_method": "exact over the allowed vectors",
        "reason": info["index_reason"],
    }
    store.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument(
        "--kinds",
        default="store,flat,hnsw32-sq8,ivf-sq8,ivf-pq-sq8,ivf-pq-sq4,opq-ivf-pq",
        help="comma-separated: store and/or plain FAISS kinds",
    )
    ap.add_argument("--json", type=Path, help="append result rows to this JSON-lines file")
    ap.add_argument(
        "--workdir", type=Path, help="where the store is built and kept (default: a temp dir)"
    )
    ap.add_argument(
        "--store-batch", type=int, default=50_000, help="vectors a store.add call (growth)"
    )
    ap.add_argument("--memory-budget", default=None, help="the store's budget, e.g. 1G")
    ap.add_argument(
        "--seeds",
        default=V1_SEEDS,
        help=f"model whose real embeddings the vectors are drawn around (default {V1_SEEDS},"
        " 1280-d; e.g. efficientnet-lite2-int8 for the default model's 1,632-d)",
    )
    args = ap.parse_args()

    seeds = seed_embeddings(model=args.seeds)
    gen = Generator(seeds)
    dim = gen.dim
    t = time.perf_counter()
    x = catalog(args.n, gen)
    q = gen.draw(args.queries, seed=99)
    rng = np.random.default_rng(5)
    allowed = np.sort(rng.choice(args.n, max(1, args.n // 100), replace=False))
    suffix = "" if dim == 1280 else f"-{dim}d"
    cached = CACHE / f"truth-{args.n}{suffix}-{args.queries}.npz"
    if cached.exists():
        saved = np.load(cached)
        truth, truth_f = saved["truth"], saved["truth_f"]
    else:
        truth = ground_truth(x, q)
        truth_f = ground_truth(x, q, allowed)
        np.savez(cached, truth=truth, truth_f=truth_f)
    print(
        f"# N={args.n:,} dim={dim} queries={args.queries} (tune on half, report on half); "
        f"data+truth {time.perf_counter() - t:.0f} s; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load {os.getloadavg()[0]:.1f}, "
        f"faiss {faiss.__version__}",
        flush=True,
    )
    print(
        "| index | build s | B/vector | p50 ms | p99 ms | CPU ms/query | q/s | R@10 | "
        "1% filter p50 ms | 1% filter CPU ms | 1% filter R@10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        if kind == "store":
            work = args.workdir or Path(tempfile.mkdtemp(prefix="lk-bench-"))
            budget = parse_memory_budget(args.memory_budget)
            row = run_store(x, q, truth, allowed, truth_f, dim, work, args.store_batch, budget)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
        else:
            if kind == "flat" and args.n > 1_000_000:
                continue
            row = run_plain(kind, x, q, truth, allowed, truth_f, dim)
        row.update(n=args.n, dim=dim, load=os.getloadavg()[0], peak_rss_mb=rss_mb())
        print(
            f"| {row['index']} | {row['build_s']:.0f} | {row['bytes_per_vector']:,.0f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_p50_ms']:.2f} | "
            f"{row['qps']:,.0f} | {row['recall10']:.3f} | {row['filter_p50_ms']:.2f} | "
            f"{row['filter_cpu_p50_ms']:.2f} | {row['filter_recall10']:.3f} |",
            flush=True,
        )
        if "reason" in row:
            print(f"#   store: {row['reason']}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
