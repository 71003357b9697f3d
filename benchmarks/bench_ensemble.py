"""Encoder ensembles and multi-scale input for the plain pipeline, against a new home's
default, on the burst split of grocery train.csv (val.csv is never read) and
fashion-footwear leave-one-out precision@10 (docs/quality.md, "Encoder ensembles and
multi-scale input (measured)").

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_ensemble.py
        --workdir DIR [--limit N] [--json FILE]

Each bundled INT8 encoder goes through its own plain pipeline, the code a new home runs:
queries `QueryPipeline(CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS, DEFAULT_POWER))`
(the `centre70` view, power 0.5, no centre), catalog images that encoder's
`CatalogViewEncoder` (the L2 mean of the image's and its rot-20 view's vectors, power
0.5). Variants:

- `lite2-int8` (baseline): efficientnet-lite2-int8 alone, a new home's default;
- `lite2 + w lite0`: [v2, w v0] / norm of the two models' vectors, catalog and queries
  alike, w = 0.3, 0.5, 0.7 (the cosine is (cos2 + w^2 cos0) / (1 + w^2));
- `lite0-int8` alone, for the record (not a candidate).

Multi-scale input is not measured here: the shipped graphs have static spatial input
dims (`pixels` is (batch, 260, 260, 3) for lite2; ONNX Runtime refuses another size),
which `check_input_dims` prints. benchmarks/bench_multiscale.py measures it with
exports of its own.

One decode of each photo serves both models (grocery photos are 348 px, below either
model's draft size, so neither decodes them reduced). Grocery: every train.csv photo
(2,640, 296 bursts) queries the 81 catalog vectors; Recall@1 / @5 per burst on each burst
split's held-out bursts (bench_tune_sources.burst_split, salt "" and "b2") and on all of
train.csv, with the paired bootstrap (2,000 draws over bursts) of the change against the
baseline. Fashion: each image's catalog vector against all the others' (category and
colour P@10). The red stiletto (footwear300/search_image_01.jpg) against the fashion
catalog: Heels / Red in its top 10. Cost: one forward pass per query at batch 1 on one
ORT thread, each model, interleaved in the same process (an ensemble runs both), and the
whole query path (view, prepare, pass(es), power, concatenation) of a decoded photo.
Vectors are cached in DIR (float32 .npz, a stamp per model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_catalog_views import FASHION, leave_one_out_p10  # noqa: E402
from bench_pooling import QUERY_VIEW, burst_hits  # noqa: E402
from bench_query_views import GROCERY, STILETTO, _rows, burst_of, l2  # noqa: E402
from bench_tune_sources import burst_split  # noqa: E402

from lookalike.encoders import load_encoder  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import (  # noqa: E402
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    CatalogViewEncoder,
)
from lookalike.query import QualitySettings, QueryPipeline  # noqa: E402

LITE2, LITE0 = "efficientnet-lite2-int8", "efficientnet-lite0-int8"
WEIGHTS = (0.3, 0.5, 0.7)
SPLITS = (("split 1", ""), ("b2", "b2"))
SCALES = (320, 380)
CHUNK = 48
EXPECTED_BASELINE = {"all": (0.4342, 0.7824), "split 1": (0.4443, 0.8143), "b2": (0.4538, 0.7704),
                     "p10_category": 0.6271, "p10_colour": 0.3002, "stiletto": (5, 4)}  # fmt: skip
"""The baseline's figures with the INT8 export of ONNX Runtime 1.32 (stamp digest
1b90cec19ca60b67) and exact INT8 arithmetic (runtime.X64_QUANT_PRECISION), the same on a
CPU with VNNI or without (benchmarks/bench_int8_precision.py gives them too). This
script's first run, on a CPU whose INT8 kernels saturated, had 0.434 / 0.7814, 0.4365 /
0.8128, 0.4472 / 0.7704 and fashion 0.6284 / 0.3008 (docs/quality.md)."""


def pipelines(base) -> tuple[QueryPipeline, CatalogViewEncoder]:
    """A new home's plain query pipeline and catalog encoder for this base model."""
    cat = CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS, DEFAULT_POWER)
    return QueryPipeline(cat, QualitySettings(query_views=(QUERY_VIEW,), centre=False)), cat


def check_input_dims(base) -> dict:
    """The graph's declared input shape, and whether ORT runs it at each of SCALES."""
    shape = [d.dim_param or d.dim_value for d in _graph_input(base).type.tensor_type.shape.dim]
    runs = {}
    for s in SCALES:
        try:
            base.session.run(None, {base.session.get_inputs()[0].name:
                                    np.zeros((1, s, s, 3), np.uint8)})  # fmt: skip
            runs[s] = "runs"
        except Exception as exc:  # ORT's InvalidArgument: the static dims
            runs[s] = f"refused ({str(exc).splitlines()[0][:90]})"
    return {"input": shape, **{f"at {s} px": v for s, v in runs.items()}}


def _graph_input(base):
    import onnx

    return onnx.load(str(base.model_path), load_external_data=False).graph.input[0]


def model_vectors(base, qpaths, cpaths, fpaths) -> dict[str, np.ndarray]:
    """This model's plain vectors: queries (train photos), grocery catalog, fashion
    catalog, the stiletto's query."""
    pipe, cat = pipelines(base)
    q, t0 = [], time.time()
    for i in range(0, len(qpaths), CHUNK):
        q.append(pipe.embed_queries([load_image(p, draft_size=base.draft_size)
                                     for p in qpaths[i : i + CHUNK]]))  # fmt: skip
        print(f"  {base.name}: {min(i + CHUNK, len(qpaths))}/{len(qpaths)} photos,"
              f" {time.time() - t0:.0f} s", file=sys.stderr)  # fmt: skip

    def catalog(paths):
        out = []
        for i in range(0, len(paths), 32):
            imgs = [load_image(p, draft_size=base.draft_size) for p in paths[i : i + 32]]
            out.append(cat.embed(np.stack([cat.prepare(m) for m in imgs])))
        return np.concatenate(out)

    stiletto = pipe.embed_queries([load_image(STILETTO, draft_size=base.draft_size)])[0]
    return {"q": np.concatenate(q), "c": catalog(cpaths), "f": catalog(fpaths), "s": stiletto}


def cached_vectors(path: Path, stamp: str, n: tuple[int, int, int], make) -> dict:
    if path.is_file():
        with np.load(path) as data:
            if str(data["stamp"]) == stamp and (len(data["q"]), len(data["c"]),
                                                len(data["f"])) == n:  # fmt: skip
                return {k: data[k] for k in ("q", "c", "f", "s")}
    started = time.time()
    out = make()
    np.savez(path, stamp=np.array(stamp), **out)
    print(f"{path.name}: {time.time() - started:.0f} s", file=sys.stderr)
    return out


def ensemble(v2: dict, v0: dict, w: float) -> dict:
    """[v2, w v0] / norm of every vector kind."""
    return {k: l2(np.concatenate([v2[k], w * v0[k]], axis=-1)) for k in v2}


# -- scoring ----------------------------------------------------------------------------


def burst_scores(sims, truth, bidx, base_hits, rng) -> dict:
    """Recall@1 / @5 per burst over these bursts, with the paired bootstrap of the change
    against the baseline's per-burst hits (and each figure's own 95 % interval)."""
    boot = rng.integers(0, len(bidx), (2000, len(bidx)))
    out = {}
    for k in (1, 5):
        hits = burst_hits(sims, truth, bidx, k)
        out[f"r{k}"] = round(float(hits.mean()), 4)
        out[f"r{k}_ci"] = [round(float(np.quantile(hits[boot].mean(axis=1), c)), 3)
                           for c in (0.025, 0.975)]  # fmt: skip
        if base_hits is not None:
            diff = hits - base_hits[k]
            out[f"d_r{k}"] = round(float(diff.mean()), 4)
            out[f"d_r{k}_ci"] = [round(float(np.quantile(diff[boot].mean(axis=1), c)), 4)
                                 for c in (0.025, 0.975)]  # fmt: skip
    return out


def passes(r: dict, b: dict) -> bool:
    """The rule, fixed before the run: against the baseline in the same run."""
    eps = 1e-9
    ok = all(r[s]["r1"] - b[s]["r1"] >= 0.015 - eps for s, _ in SPLITS)
    ok = ok and all(r[s]["r5"] >= b[s]["r5"] - 0.005 - eps for s, _ in SPLITS)
    ok = ok and r["p10_category"] >= b["p10_category"] - 0.005 - eps
    ok = ok and r["p10_colour"] >= b["p10_colour"] - 0.005 - eps
    return bool(ok and r["pass_ms"] <= 2 * b["pass_ms"] + eps)


# -- cost -------------------------------------------------------------------------------


def costs(names: list[str], img) -> dict[str, dict[str, float]]:
    """ms per query, medians of interleaved rounds, one ORT thread: each model's forward
    pass at batch 1, and its whole query path on a decoded photo."""
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    cache = Path(models or Path(tempfile.gettempdir()) / "lk-models")
    return encoder_costs({n: load_encoder(n, cache, threads=1) for n in names}, img)


def encoder_costs(encs: dict, img) -> dict[str, dict[str, float]]:
    """`costs` for encoders already loaded (each on one ORT thread)."""
    names = list(encs)
    pipes = {n: pipelines(e)[0] for n, e in encs.items()}
    arrays = {n: e.prepare(pipes[n]._views(img)[0])[None] for n, e in encs.items()}
    times = {n: {"pass": [], "path": []} for n in names}
    for n in names:  # warm up
        for _ in range(5):
            encs[n].embed(arrays[n])
            pipes[n].embed_queries([img])
    for _ in range(9):
        for n in names:
            t0 = time.perf_counter()
            for _ in range(10):
                encs[n].embed(arrays[n])
            times[n]["pass"].append((time.perf_counter() - t0) / 10)
            t0 = time.perf_counter()
            for _ in range(10):
                pipes[n].embed_queries([img])
            times[n]["path"].append((time.perf_counter() - t0) / 10)
    return {n: {k: round(1e3 * float(np.median(v)), 2) for k, v in t.items()}
            for n, t in times.items()}  # fmt: skip


def bench_data(limit: int | None):
    """train.csv rows (labels only to score and find bursts), the grocery catalog's ids,
    the fashion rows, and the paths of (train photos, grocery catalog, fashion catalog);
    with `limit` (a smoke run) the first photos, their products and a few others."""
    train = _rows(GROCERY / "train.csv")[:limit]
    cat_rows = _rows(GROCERY / "catalog.csv")
    if limit:
        wanted = {r["product_id"] for r in train}
        cat_rows = [r for i, r in enumerate(cat_rows) if i < 4 or r["product_id"] in wanted]
    frows = _rows(FASHION / "catalog.csv")[:limit]
    paths = ([GROCERY / r["image"] for r in train], [GROCERY / r["image"] for r in cat_rows],
             [FASHION / r["image"] for r in frows])  # fmt: skip
    return train, [r["product_id"] for r in cat_rows], frows, paths


def fashion_scores(frows, catalog, stiletto, queries=None) -> dict:
    """Fashion leave-one-out category / colour P@10 (each image's `queries` vector, by
    default its catalog vector, against the other images' catalog vectors) and the red
    stiletto's Heels / Red among its 10 nearest catalog images."""
    fields = {f: np.array([r[f] for r in frows]) for f in ("category", "colour")}
    if queries is None:
        out = leave_one_out_p10(catalog, fields)
    else:
        out = leave_one_out_p10(queries, fields, against=catalog)
    top = np.argsort(-(catalog @ stiletto))[:10]
    out["stiletto"] = [int(sum(frows[i]["category"] == "Heels" for i in top)),
                       int(sum(frows[i]["colour"] == "Red" for i in top))]  # fmt: skip
    return out


def burst_groups(train) -> tuple[dict, dict]:
    """The bursts of all of train.csv and of each split's held-out side, and each
    burst's row indices."""
    bursts = np.array([burst_of(r) for r in train])
    groups = {"all": sorted(set(bursts))}
    for label, salt in SPLITS:
        groups[label] = sorted({burst_of(r) for r in burst_split(train, salt)[1]})
    bidx = {g: [np.flatnonzero(bursts == b) for b in ids] for g, ids in groups.items()}
    return groups, bidx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="vector cache")
    parser.add_argument("--limit", type=int, help="first N photos / fashion images (smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    cache = Path(models or Path(tempfile.gettempdir()) / "lk-models")
    bases = {n: load_encoder(n, cache) for n in (LITE2, LITE0)}
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.limit}" if args.limit else ""

    train, cat_ids, frows, paths = bench_data(args.limit)
    n = tuple(len(p) for p in paths)
    vec = {}
    for name, base in bases.items():
        stamp = f"{base.stamp}|{QUERY_VIEW}|{','.join(DEFAULT_CATALOG_VIEWS)}|{DEFAULT_POWER}"
        vec[name] = cached_vectors(w / f"{name}{tag}.npz", stamp, n,
                                   lambda b=base: model_vectors(b, *paths))  # fmt: skip
    dims = check_input_dims(bases[LITE2])

    variants = {"lite2-int8 (baseline)": vec[LITE2]}
    variants |= {f"lite2 + {x:g} lite0": ensemble(vec[LITE2], vec[LITE0], x) for x in WEIGHTS}
    variants["lite0-int8 alone (record)"] = vec[LITE0]

    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    groups, bidx = burst_groups(train)

    img = load_image(GROCERY / train[0]["image"], draft_size=bases[LITE2].draft_size)
    cost = costs([LITE2, LITE0], img)
    base_sims = vec[LITE2]["q"] @ vec[LITE2]["c"].T
    base_hits = {g: {k: burst_hits(base_sims, truth, ix, k) for k in (1, 5)}
                 for g, ix in bidx.items()}  # fmt: skip
    rows = []
    for label, v in variants.items():
        sims = v["q"] @ v["c"].T
        row = {"variant": label}
        for g, ix in bidx.items():
            rng = np.random.default_rng(1)
            row[g] = burst_scores(sims, truth, ix, None if not rows else base_hits[g], rng)
        row.update(fashion_scores(frows, v["f"], v["s"]))
        uses = [LITE0] if label.startswith("lite0") else [LITE2] + ([LITE0] if "+" in label else [])
        row["pass_ms"] = round(sum(cost[m]["pass"] for m in uses), 2)
        row["path_ms"] = round(sum(cost[m]["path"] for m in uses), 2)
        rows.append(row)
    for r in rows[1:-1]:
        r["passes"] = passes(r, rows[0])
    report(args, rows, groups, dims, cost)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "input_dims": dims, "cost_ms": cost,
                                         "bursts": {g: len(b) for g, b in groups.items()}},
                                        indent=1))  # fmt: skip
    return 0


def _delta(s: dict, k: int) -> str:
    if f"d_r{k}" not in s:
        return ""
    lo, hi = s[f"d_r{k}_ci"]
    return f"{100 * s[f'd_r{k}']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"


def _ci(s: dict, k: int) -> str:
    return f"{s[f'r{k}']:.3f} ({s[f'r{k}_ci'][0]:.2f}–{s[f'r{k}_ci'][1]:.2f})"


def print_tables(rows) -> None:
    """The two result tables (Recall per split; fashion, stiletto, cost, rule), rows[0]
    the baseline."""
    print("\n| variant | split | R@1 per burst (95 % CI) | ΔR@1 vs baseline, points (paired"
          " 95 % CI) | R@5 per burst (95 % CI) | ΔR@5, points (95 % CI) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        for g in ("split 1", "b2", "all"):
            s = r[g]
            print(f"| {r['variant']} | {g} | {_ci(s, 1)} | {_delta(s, 1)} | {_ci(s, 5)}"
                  f" | {_delta(s, 5)} |")  # fmt: skip
    print("\n| variant | fashion P@10 category / colour | stiletto Heels / Red | forward pass ms"
          " / query | query path ms | passes |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = "yes" if r.get("passes") else ("no" if "passes" in r else "")
        heels, red = r["stiletto"]
        ratio = "" if r is rows[0] else f" ({r['pass_ms'] / rows[0]['pass_ms']:.2f}x)"
        print(f"| {r['variant']} | {r['p10_category']:.4f} / {r['p10_colour']:.4f} | {heels}"
              f" / {red} | {r['pass_ms']:.2f}{ratio} | {r['path_ms']:.2f} | {ok} |")  # fmt: skip


def report(args, rows, groups, dims, cost) -> None:
    b = rows[0]
    counts = ", ".join(f"{g} {len(v)}" for g, v in groups.items())
    views = "+".join(DEFAULT_CATALOG_VIEWS)
    print(f"queries {QUERY_VIEW}, catalog image + {views}, power {DEFAULT_POWER}; bursts: {counts}")
    scales = "; ".join(f"{k}: {v}" for k, v in dims.items() if k != "input")
    print(f"{LITE2} input {dims['input']}; {scales}")
    if not args.limit:
        got = {g: (b[g]["r1"], b[g]["r5"]) for g in ("all", "split 1", "b2")}
        got |= {"p10_category": b["p10_category"], "p10_colour": b["p10_colour"],
                "stiletto": tuple(b["stiletto"])}  # fmt: skip
        off = {k: (got[k], e) for k, e in EXPECTED_BASELINE.items()
               if not np.allclose(got[k], e, atol=6e-4)}  # fmt: skip
        print(f"baseline DOES NOT reproduce the expected figures (got, expected): {off}"
              if off else "baseline reproduces the expected figures")  # fmt: skip
    print_tables(rows)
    each = "; ".join(f"{m}: pass {c['pass']}, path {c['path']}" for m, c in cost.items())
    print(f"\ncost, ms, batch 1, one ORT thread (median of 9 interleaved rounds of 10): {each}")


if __name__ == "__main__":
    sys.exit(main())
