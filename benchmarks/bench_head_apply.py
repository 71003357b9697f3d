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
- `onnx`: the head as an ONNX graph (`write_head_graph`: what Head.apply computes, the
  MLP, the kept base part, the normalisations) run by ONNX Runtime, one intra-op
  thread, no spinning;
- `onnx2`: the same with two intra-op threads.

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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lookalike.encoders.colour import DIM as COLOUR_DIM  # noqa: E402
from lookalike.encoders.runtime import make_session  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.tuned import Head, TunedEncoder  # noqa: E402
from lookalike.query import QUERY_VIEWS, default_views  # noqa: E402

GROCERY = ROOT / "../shared/data/grocery"

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # not a dependency: the way is left out
    threadpool_limits = None


def _numpy(head: Head, few: bool, limit: bool):
    def run(x: np.ndarray) -> np.ndarray:
        ctx = threadpool_limits(1, user_api="blas") if limit else nullcontext()
        with ctx:
            return head.apply(x, few=few)

    return run


def write_head_graph(head: Head, path: Path) -> None:
    """Write `head` as an ONNX graph ("x" (N, D_in) [, "colour" (N, 64)] -> "embedding"
    (N, dim)) that computes what `Head.apply` does, built node by node from its arrays
    (the same head always gives the same bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    axes = const("axes1", np.array([1], dtype=np.int64))
    eps = const("eps", np.array(1e-12, dtype=np.float32))

    def normalise(x: str, out: str) -> str:
        norm = node("ReduceL2", [x, axes], f"{out}_norm", keepdims=1)
        return node("Div", [x, node("Max", [norm, eps], f"{out}_den")], out)

    def scaled(x: str, weight: float, name: str) -> str:
        return node("Mul", [x, const(f"{name}_w", np.array(weight, dtype=np.float32))], name)

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", head.in_dim])]
    parts: list[str] = []
    if head.weights:
        y = node("Sub", ["x", const("mean", head.mean)], "centred")
        for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
            if i:
                y = node("Relu", [y], f"relu{i}")
            y = node("MatMul", [y, const(f"w{i}", w)], f"matmul{i}")
            y = node("Add", [y, const(f"b{i}", b)], f"layer{i}")
        alone = head.dim == int(head.weights[-1].shape[1])  # no other part: Head.apply
        parts.append(normalise(y, "embedding" if alone else "mlp"))
    if head.keep_base:
        parts.append(scaled("x", head.keep_base, "kept"))
    if head.class_weight and head.classifier is not None:
        logits = node("MatMul", ["x", const("classifier", head.classifier)], "logits0")
        bias = np.asarray(head.classifier_bias, dtype=np.float32)
        logits = node("Add", [logits, const("classifier_bias", bias)], "logits")
        parts.append(scaled(node("Softmax", [logits], "posterior", axis=1), head.class_weight,
                            "classes"))  # fmt: skip
    if head.colour_weight:
        inputs.append(helper.make_tensor_value_info("colour", TensorProto.FLOAT,
                                                    ["batch", COLOUR_DIM]))  # fmt: skip
        parts.append(scaled("colour", head.colour_weight, "colour_part"))
    if parts != ["embedding"]:
        normalise(node("Concat", parts, "joined", axis=1), "embedding")
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", head.dim])
    graph = helper.make_graph(nodes, "lookalike_head", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="lookalike", ir_version=8)  # fmt: skip
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    path.write_bytes(data)


def _onnx(head: Head, folder: Path, threads: int):
    path = folder / "head.onnx"
    if not path.exists():
        write_head_graph(head, path)
    session = make_session(path, threads=threads)
    return lambda x: session.run(["embedding"], {"x": x})[0]


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


def _time_ways(ways: dict, base, batches: list[np.ndarray]) -> tuple[dict, dict]:
    """ms of each way per photo, each right after its own base pass, in a rotating order;
    and the largest difference of each way's vectors from the first way's."""
    names = list(ways)
    times: dict[str, list[float]] = {n: [] for n in names}
    diff = dict.fromkeys(names, 0.0)
    for i, batch in enumerate([batches[0]] + batches):  # the first: warm-up
        x = base.embed(batch)
        want = ways["einsum"](x)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            x = base.embed(batch)  # each way right after a base pass, as in a query
            t0 = time.perf_counter()
            got = ways[name](x)
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
    times, diff = _time_ways(ways, base, batches)
    if threadpool_limits is not None:  # BLAS held to one thread for the rest of the process
        held = threadpool_limits(1, user_api="blas")
        t1, d1 = _time_ways({"einsum": ways["einsum"], "blas": ways["blas"]}, base, batches)
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
