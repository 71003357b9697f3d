"""INT8 on x86 CPUs without VNNI: the bundled INT8 encoders with ONNX Runtime's
`session.x64quantprecision` off (ORT's default) and on (lookalike's,
`lookalike.encoders.runtime.X64_QUANT_PRECISION`), side by side in one process.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_int8_precision.py
        [--workdir DIR] [--limit N] [--json FILE]

Prints the CPU's vector extensions, then for each INT8 model and each setting:

- agreement with the float32 model it is quantised from: cosine of the embeddings of
  every 20th grocery train.csv photo and every 20th fashion-footwear catalog image
  (mean / min);
- one forward pass at batch 1 on one ORT thread (median of interleaved rounds), float32
  beside it;
- for efficientnet-lite2-int8 (the default) only, a new home's plain pipeline
  (bench_ensemble.model_vectors): grocery Recall@1 / @5 per burst on every train.csv
  photo and on each burst split's held-out bursts (val.csv is never read), fashion
  leave-one-out category / colour P@10, the red stiletto's Heels / Red in its top 10.

On a CPU with VNNI the two settings give the same numbers (the option only acts
without it); on AVX2 alone the default saturates (docs/models.md, "INT8 on CPUs
without VNNI").
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

from bench_catalog_views import FASHION  # noqa: E402
from bench_ensemble import (  # noqa: E402
    bench_data,
    burst_groups,
    cached_vectors,
    fashion_scores,
    model_vectors,
)
from bench_pooling import burst_hits  # noqa: E402
from bench_query_views import GROCERY, _rows  # noqa: E402

from lookalike.encoders import load_encoder, runtime  # noqa: E402
from lookalike.images import load_image  # noqa: E402

MODELS = (("efficientnet-lite2-int8", "efficientnet-lite2"),
          ("efficientnet-lite0-int8", "efficientnet-lite0"))  # fmt: skip
SETTINGS = (("ORT default", False), ("x64quantprecision", True))


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")  # fmt: skip
    wanted = [f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f]
    return f"{model}; {' '.join(wanted) or 'no AVX'}"


def load(name: str, cache: Path, precise: bool, threads: int | None = None):
    """`name`'s encoder with its sessions opened at this precision setting."""
    before, runtime.X64_QUANT_PRECISION = runtime.X64_QUANT_PRECISION, precise
    try:
        return load_encoder(name, cache, threads=threads)
    finally:
        runtime.X64_QUANT_PRECISION = before


def agreement(enc, ref, batch) -> tuple[float, float]:
    cos = (enc.embed(batch) * ref).sum(axis=1)
    return round(float(cos.mean()), 4), round(float(cos.min()), 4)


def pass_ms(encs: dict, batch) -> dict[str, float]:
    one = batch[:1]
    for e in encs.values():
        for _ in range(3):
            e.embed(one)
    times = {n: [] for n in encs}
    for _ in range(9):
        for n, e in encs.items():
            t0 = time.perf_counter()
            for _ in range(10):
                e.embed(one)
            times[n].append((time.perf_counter() - t0) / 10)
    return {n: round(1e3 * float(np.median(v)), 2) for n, v in times.items()}


def quality(base, workdir: Path, tag: str, limit: int | None) -> dict:
    """A new home's plain pipeline on grocery train.csv per burst and fashion."""
    train, cat_ids, frows, paths = bench_data(limit)
    n = tuple(len(p) for p in paths)
    v = cached_vectors(workdir / f"{base.name}-{tag}{'-' + str(limit) if limit else ''}.npz",
                       f"{base.stamp}|{tag}", n, lambda: model_vectors(base, *paths))  # fmt: skip
    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    groups, bidx = burst_groups(train)
    sims = v["q"] @ v["c"].T
    out = {}
    for g, ix in bidx.items():
        out[g] = [round(float(burst_hits(sims, truth, ix, k).mean()), 4) for k in (1, 5)]
    out.update(fashion_scores(frows, v["f"], v["s"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lk-int8")
    parser.add_argument("--limit", type=int, help="first N photos / fashion images (smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    cache = Path(models or Path(tempfile.gettempdir()) / "lk-models")
    args.workdir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_flags()
    print(f"CPU: {cpu}")
    g = [GROCERY / r["image"] for r in _rows(GROCERY / "train.csv")[::20]][: args.limit]
    f = [FASHION / r["image"] for r in _rows(FASHION / "catalog.csv")[::20]][: args.limit]
    result = {"cpu": cpu, "models": {}}
    for int8, f32 in MODELS:
        ref = load_encoder(f32, cache)
        batches = {}
        for k, paths in (("grocery", g), ("fashion", f)):
            imgs = [load_image(p, draft_size=ref.draft_size) for p in paths]
            batches[k] = np.stack([ref.prepare(img) for img in imgs])
        refs = {k: ref.embed(b) for k, b in batches.items()}
        timed = {"float32": load_encoder(f32, cache, threads=1)}
        rows = {}
        for label, precise in SETTINGS:
            enc = load(int8, cache, precise)
            rows[label] = {k: agreement(enc, refs[k], b) for k, b in batches.items()}
            timed[label] = load(int8, cache, precise, threads=1)
            if int8 == MODELS[0][0]:
                tag = "precise" if precise else "default"
                rows[label]["quality"] = quality(enc, args.workdir, tag, args.limit)
        ms = pass_ms(timed, batches["grocery"])
        result["models"][int8] = {"settings": rows, "pass_ms": ms}
        print(f"\n{int8} (float32 {f32}: {ms['float32']:.2f} ms a pass, batch 1, one thread)")
        print("| setting | cosine to float32, grocery mean / min | fashion mean / min |"
              " ms a pass | grocery R@1 / R@5 per burst: all, split 1, b2 |"
              " fashion P@10 category / colour | stiletto Heels / Red |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for label, r in rows.items():
            q = r.get("quality")
            groups = ("all", "split 1", "b2")
            groc = ", ".join(f"{q[s][0]:.3f} / {q[s][1]:.3f}" for s in groups) if q else ""
            fash = f"{q['p10_category']:.4f} / {q['p10_colour']:.4f}" if q else ""
            st = f"{q['stiletto'][0]} / {q['stiletto'][1]}" if q else ""
            print(f"| {label} | {r['grocery'][0]:.4f} / {r['grocery'][1]:.4f} |"
                  f" {r['fashion'][0]:.4f} / {r['fashion'][1]:.4f} | {ms[label]:.2f} |"
                  f" {groc} | {fash} | {st} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
