"""A tuned "head" model's share of a query: ways of applying its head to one query's base
embedding, each timed right after a base ONNX pass (as in a query), side by side in one
process, on real photos and a real tuned head.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_head_apply.py \\
        --home TUNED_HOME [--queries 150] [--json FILE]

TUNED_HOME: a home with an active head model (e.g. `grocery-tuned` of
bench_tune_sources.py --workdir DIR). The queries are grocery val.csv photos, cut to the
model's first query view (centre60 for a --photos head). Ways, in a rotating order for
each photo, each after its own base pass:

- `einsum`: `Head.apply` in numpy, the few rows multiplied by an einsum loop;
- `blas`: numpy's `@` (OpenBLAS, its default threads);
- `blas1`: `@` under threadpoolctl's one-thread limit for the call (only when
  threadpoolctl imports; it is not a dependency of lookalike);
- `onnx`: the head as a float32 ONNX graph (lookalike.models.head_graph: what Head.apply
  computes, the MLP, the kept base part, the posterior, the colour part, the
  normalisations) run by ONNX Runtime, one intra-op thread, no spinning;
- `onnx2`: the same with two intra-op threads;
- `onnx-int8`: the graph with its products quantised to INT8 (what a model tuned since
  head.onnx runs: `TunedEncoder` with a graph), one thread.

A head with a colour part (`--photos --field`) is given each photo's colour descriptor,
computed inside the timed call as in a query.

Then, with threadpoolctl, BLAS held at one thread for the rest of the process (a limit a
tuned model could set once when loaded): `einsum` and `blas` again. Also: the largest
difference of each way's vectors from `einsum`'s, and what that held limit costs
tuning's big products (2,640 x 1,632 @ 1,632 x 1,024). threadpoolctl, if wanted, from a
scratch folder: `pip install --target DIR threadpoolctl`, PYTHONPATH=DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lookalike.encoders.colour import colour_descriptor  # noqa: E402
from lookalike.encoders.runtime import make_session  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.head_graph import (  # noqa: E402
    COLOUR_INPUT,
    INPUT,
    OUTPUT,
    write_head_graph,
)
from lookalike.models.tuned import Head, TunedEncoder  # noqa: E402
from lookalike.query import QUERY_VIEWS, default_views  # noqa: E402

GROCERY = ROOT / "../shared/data/grocery"

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # not a dependency: the way is left out
    threadpool_limits = None


def _numpy(head: Head, few: bool, limit: bool):
    def run(x: np.ndarray, colour: np.ndarray | None) -> np.ndarray:
        ctx = threadpool_limits(1, user_api="blas") if limit else nullcontext()
        with ctx:
            return head.apply(x, colour, few=few)

    return run


def _onnx(head: Head, folder: Path, threads: int, int8: bool = False):
    path = folder / f"head{'-int8' if int8 else ''}.onnx"
    if not path.exists():
        write_head_graph(head, path, int8=int8)
    session = make_session(path, threads=threads)

    def run(x: np.ndarray, colour: np.ndarray | None) -> np.ndarray:
        feeds = {INPUT: x} if colour is None else {INPUT: x, COLOUR_INPUT: colour}
        return session.run([OUTPUT], feeds)[0]

    return run


def _big_products(limit: bool) -> float:
    """ms of a tuning-sized product (2,640 x 1,632 @ 1,632 x 1,024), median of 5."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2640, 1632), dtype=np.float32)
    b = rng.standard_normal((1632, 1024), dtype=np.float32)
    ts = []
    for _ in range(5):
        with threadpool_limits(1, user_api="blas") if limit else nullcontext():
            t0 = time.perf_counter()
            a @ b
            ts.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(ts), 2)


def _time_ways(ways: dict, base, head: Head, batches: list[np.ndarray]) -> tuple[dict, dict]:
    """ms of each way per photo, each right after its own base pass, in a rotating order;
    and the largest difference of each way's vectors from the first way's."""
    names = list(ways)
    times: dict[str, list[float]] = {n: [] for n in names}
    diff = dict.fromkeys(names, 0.0)
    for i, batch in enumerate([batches[0]] + batches):  # the first: warm-up
        x = base.embed(batch)
        colour = colour_descriptor(batch) if head.needs_colour else None
        want = ways["einsum"](x, colour)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            x = base.embed(batch)  # each way right after a base pass, as in a query
            t0 = time.perf_counter()
            if head.needs_colour:  # as TunedEncoder.embed: the descriptor is the head's
                colour = colour_descriptor(batch)
            got = ways[name](x, colour)
            if i:
                times[name].append(1000 * (time.perf_counter() - t0))
            diff[name] = max(diff[name], float(np.abs(got - want).max()))
    return times, diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="a home whose active model is a head")
    ap.add_argument("--queries", type=int, default=150)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with Engine(args.home) as engine:
        encoder = engine.encoder
    if not isinstance(encoder, TunedEncoder):
        print(f"{args.home}: the active model is not a head model", file=sys.stderr)
        return 1
    base, head = encoder.base, encoder.head
    view = QUERY_VIEWS[default_views(encoder)[0]]
    with (GROCERY / "val.csv").open(newline="") as fh:
        paths = [GROCERY / r["image"] for r in csv.DictReader(fh)][: args.queries]
    batches = [base.prepare(view(load_image(p)))[None] for p in paths]
    tmp = tempfile.TemporaryDirectory(prefix="bench-head-")
    ways = {"einsum": _numpy(head, True, False), "blas": _numpy(head, False, False)}
    if threadpool_limits is not None:
        ways["blas1"] = _numpy(head, False, True)
    ways["onnx"] = _onnx(head, Path(tmp.name), 1)
    ways["onnx2"] = _onnx(head, Path(tmp.name), 2)
    ways["onnx-int8"] = _onnx(head, Path(tmp.name), 1, int8=True)
    times, diff = _time_ways(ways, base, head, batches)
    if threadpool_limits is not None:  # BLAS held to one thread for the rest of the process
        held = threadpool_limits(1, user_api="blas")
        kept = {"einsum": ways["einsum"], "blas": ways["blas"]}
        t1, d1 = _time_ways(kept, base, head, batches)
        held.restore_original_limits()
        for name in t1:
            times[f"{name}, BLAS held at 1 thread"] = t1[name]
            diff[f"{name}, BLAS held at 1 thread"] = d1[name]
    out: dict = {"home": str(args.home), "head": encoder.info.get("head"),
                 "queries": len(batches), "ways": {}}  # fmt: skip
    for name in times:
        ts = sorted(times[name])
        out["ways"][name] = {
            "median_ms": round(statistics.median(ts), 3),
            "p90_ms": round(ts[int(0.9 * (len(ts) - 1))], 3),
            "max_abs_diff": diff[name],
        }
    if threadpool_limits is not None:
        out["tuning_product_ms"] = {
            "default": _big_products(False),
            "one_thread": _big_products(True),
        }
    tmp.cleanup()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
