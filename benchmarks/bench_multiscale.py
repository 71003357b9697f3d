"""Multi-scale input for the plain pipeline: efficientnet-lite2-int8 run at other input
sides than its 260 px, on one side or both, and several sides summed, against a new
home's default, on the burst split of grocery train.csv (val.csv is never read) and
fashion-footwear leave-one-out precision@10 (docs/quality.md, "Encoder ensembles and
multi-scale input (measured)").

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_multiscale.py
        --workdir DIR [--limit N] [--json FILE]

The shipped graphs have a static 260 px input (only the batch axis is dynamic), and
EfficientNet-Lite's TF "same" padding is fixed from the input side when the module is
built. So each side S here is its own export, made in this script (nothing in src/
changes): `lookalike.encoders.efficientnet.build_torch_model` with the weights module's
`EfficientNet.from_name(..., image_size=S)`, so each stride-2 conv pads as TensorFlow
would at S; exported like `export_onnx` (opset, outputs, dynamic batch), then quantised
by `lookalike.encoders.quantize.quantize_int8` with the shipped recipe (dead-leaves
calibration drawn at S). The 260 px export is checked against the shipped INT8 file
(sha256 and vectors); the baseline is the shipped encoder itself.

Every side goes through a new home's plain pipeline (bench_ensemble.pipelines: queries
the `centre70` view, power 0.5; the catalog the L2 mean of the image's and its rot-20
view's vectors, power 0.5), only the encoder's side changes. A variant names the sides
of its queries and of its catalog; several sides are summed (each side's vector is unit
length) and normalised. Grocery: every train.csv photo (2,640, 296 bursts) against the
81 catalog images, Recall@1 / @5 per burst on each burst split's held-out bursts
(bench_tune_sources.burst_split, salt "" and "b2") and on all of train.csv, with the
paired bootstrap of the change against the baseline (bench_ensemble.burst_scores).
Fashion: each image's query-side vector against the other images' catalog-side vectors
(leave-one-out; for a variant with the same sides on both, the usual leave-one-out of
the catalog vectors), category and colour P@10. The red stiletto
(footwear300/search_image_01.jpg): Heels / Red in its top 10 of fashion-footwear. Cost:
the query side's forward passes at batch 1 on one ORT thread and its whole query path
(bench_ensemble.encoder_costs), each side timed interleaved in this process.

The rule, fixed before the first run: against the baseline in the same run, Recall@1
per burst at least +1.5 points on both splits' held-out bursts, Recall@5 per burst at
most 0.5 points lower on either, fashion category and colour P@10 each at most 0.005
lower, and a query forward cost at most twice the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ensemble import (  # noqa: E402
    LITE2,
    bench_data,
    burst_groups,
    burst_scores,
    cached_vectors,
    encoder_costs,
    fashion_scores,
    model_vectors,
    passes,
    print_tables,
)
from bench_pooling import QUERY_VIEW, burst_hits  # noqa: E402
from bench_query_views import GROCERY, l2  # noqa: E402

from lookalike.encoders import efficientnet as eff  # noqa: E402
from lookalike.encoders import load_encoder  # noqa: E402
from lookalike.encoders.quantize import quantize_int8  # noqa: E402
from lookalike.encoders.runtime import DEFAULT_FIT, InputSpec, file_sha256  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import DEFAULT_CATALOG_VIEWS, DEFAULT_POWER  # noqa: E402

BASE_SIDE = 260
SIDES = (260, 300, 320, 380)
VARIANTS = (  # label, query sides, catalog sides; the first is the baseline
    ("260 (baseline, a new home's default)", (260,), (260,)),
    ("query 300 / catalog 260", (300,), (260,)),
    ("query 320 / catalog 260", (320,), (260,)),
    ("query 260 / catalog 320", (260,), (320,)),
    ("300 both", (300,), (300,)),
    ("320 both", (320,), (320,)),
    ("380 both", (380,), (380,)),
    ("query 260+320 / catalog 260", (260, 320), (260,)),
    ("260+320 both", (260, 320), (260, 320)),
    ("260+320+380 both", (260, 320, 380), (260, 320, 380)),
)


def export_at(side: int, folder: Path) -> Path:
    """The INT8 lite2 graph for a `side` px input (cached in `folder`)."""
    int8 = folder / f"lite2-{side}-int8.onnx"
    if int8.is_file():
        return int8
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    real = EfficientNet.from_name
    with mock.patch.object(EfficientNet, "from_name",
                           lambda arch, **kw: real(arch, image_size=side, **kw)):  # fmt: skip
        module = eff.build_torch_model("efficientnet-lite2")
    f32 = folder / f"lite2-{side}.onnx"
    axes = {k: {0: "batch"} for k in ("pixels", *eff.OUTPUTS)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros((2, side, side, 3), dtype=torch.uint8),),
                          str(f32), input_names=["pixels"], output_names=list(eff.OUTPUTS),
                          opset_version=eff.OPSET, dynamo=False, do_constant_folding=True,
                          dynamic_axes=axes)  # fmt: skip
    quantize_int8(f32, int8, "pixels", side)
    return int8


def encoder_at(path: Path, side: int, threads: int | None = None):
    return eff.EfficientNetLiteEncoder(
        name=f"lite2-int8@{side}", stamp=f"lite2-int8@{side}:{file_sha256(path, None)[:16]}",
        model_path=path, input_spec=InputSpec(size=side, raw_uint8=True), fit=DEFAULT_FIT,
        output="embedding", threads=threads)  # fmt: skip


def combine(vec: dict, q_sides, c_sides) -> dict:
    """The variant's vectors: queries (and the stiletto) from its query sides, catalog
    vectors from its catalog sides; fq is the fashion images on the query side."""

    def add(sides, key):
        return l2(sum(vec[s][key] for s in sides))

    return {"q": add(q_sides, "q"), "s": add(q_sides, "s"), "c": add(c_sides, "c"),
            "f": add(c_sides, "f"), "fq": add(q_sides, "f")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="exports and vectors")
    parser.add_argument("--limit", type=int, help="first N photos / fashion images (smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    cache = Path(models or Path(tempfile.gettempdir()) / "lk-models")
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.limit}" if args.limit else ""

    shipped = load_encoder(LITE2, cache)
    files = {}
    for side in SIDES:
        started = time.time()
        files[side] = export_at(side, w)
        print(f"lite2 at {side} px: {files[side].name}, {time.time() - started:.0f} s",
              file=sys.stderr)  # fmt: skip
    same_file = file_sha256(files[BASE_SIDE], None) == file_sha256(shipped.model_path, None)
    bases = {s: shipped if s == BASE_SIDE else encoder_at(files[s], s) for s in SIDES}

    train, cat_ids, frows, paths = bench_data(args.limit)
    n = tuple(len(p) for p in paths)
    vec = {}
    for side, base in bases.items():
        stamp = f"{base.stamp}|{QUERY_VIEW}|{','.join(DEFAULT_CATALOG_VIEWS)}|{DEFAULT_POWER}"
        vec[side] = cached_vectors(w / f"lite2-{side}{tag}.npz", stamp, n,
                                   lambda b=base: model_vectors(b, *paths))  # fmt: skip
    own = encoder_at(files[BASE_SIDE], BASE_SIDE)
    probe = np.stack([own.prepare(load_image(p, draft_size=own.draft_size)) for p in paths[0][:8]])
    own_gap = float(np.abs(own.embed(probe) - shipped.embed(probe)).max())

    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    groups, bidx = burst_groups(train)

    img = load_image(GROCERY / train[0]["image"], draft_size=shipped.draft_size)
    timed = {s: (load_encoder(LITE2, cache, threads=1) if s == BASE_SIDE
                 else encoder_at(files[s], s, threads=1)) for s in SIDES}  # fmt: skip
    cost = encoder_costs(timed, img)
    base = combine(vec, *VARIANTS[0][1:])
    base_sims = base["q"] @ base["c"].T
    base_hits = {g: {k: burst_hits(base_sims, truth, ix, k) for k in (1, 5)}
                 for g, ix in bidx.items()}  # fmt: skip
    rows = []
    for label, q_sides, c_sides in VARIANTS:
        v = combine(vec, q_sides, c_sides)
        sims = v["q"] @ v["c"].T
        row = {"variant": label, "query_sides": list(q_sides), "catalog_sides": list(c_sides)}
        for g, ix in bidx.items():
            row[g] = burst_scores(sims, truth, ix, base_hits[g] if rows else None,
                                  np.random.default_rng(1))  # fmt: skip
        row.update(fashion_scores(frows, v["f"], v["s"], queries=v["fq"]))
        row["pass_ms"] = round(sum(cost[s]["pass"] for s in q_sides), 2)
        row["path_ms"] = round(sum(cost[s]["path"] for s in q_sides), 2)
        rows.append(row)
    for r in rows[1:]:
        r["passes"] = passes(r, rows[0])
    report(rows, groups, cost, same_file, own_gap)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cost_ms": {str(k): c for k, c in
                                                                   cost.items()},
                                         "own_260_is_shipped_file": same_file,
                                         "own_260_max_abs_diff": own_gap,
                                         "bursts": {g: len(b) for g, b in groups.items()}},
                                        indent=1))  # fmt: skip
    return 0


def report(rows, groups, cost, same_file, own_gap) -> None:
    counts = ", ".join(f"{g} {len(v)}" for g, v in groups.items())
    views = "+".join(DEFAULT_CATALOG_VIEWS)
    print(f"queries {QUERY_VIEW}, catalog image + {views}, power {DEFAULT_POWER}; bursts: {counts}")
    print(f"own 260 px export: {'the same file as' if same_file else 'NOT the same file as'}"
          f" the shipped {LITE2}; largest vector difference on 8 photos {own_gap:.2e}")  # fmt: skip
    print_tables(rows)
    each = "; ".join(f"{s} px: pass {c['pass']}, path {c['path']}" for s, c in cost.items())
    print(f"\ncost, ms, batch 1, one ORT thread (median of 9 interleaved rounds of 10): {each}")


if __name__ == "__main__":
    sys.exit(main())
