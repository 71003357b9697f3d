"""The bundled encoders side by side, float32 and INT8: speed and retrieval quality.

    .venv/bin/python benchmarks/bench_models.py [--models efficientnet-lite2,...] [--calib 500]

For each model, in one run on the same decoded images:
- CPU ms per image of one forward pass, batch 1, one ORT thread (what a search costs);
- images/s of batched encoding with the default threads (what ingest costs, decode
  excluded);
- grocery (../shared/data/grocery): the 296 val.csv shopper photos against the 81
  catalog images, Recall@1/@5, plain and with query centring calibrated on `--calib`
  unlabelled train.csv photos (the shipped `lookalike calibrate` pipeline);
- fashion-footwear: leave-one-out category precision@10 over its 2,836 images;
- for an INT8 model: the cosine between its embeddings and its float32 model's on the
  grocery val photos (min and mean).

`--calibration-study` instead compares calibration sets for the INT8 quantisation of
Lite2: the shipped synthetic images against 64 real photos from each dataset, by the
cosine of the INT8 embeddings to float32 on 48 held-out fashion and 48 grocery photos.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = (ROOT / "../shared/data").resolve()

from lookalike.calibration import calibrate  # noqa: E402
from lookalike.encoders import load_encoder  # noqa: E402
from lookalike.evaluate import leave_one_out_precision  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.query import QualitySettings, QueryPipeline  # noqa: E402

BATCH = 16
DEFAULT_MODELS = ",".join(
    f"efficientnet-{m}" for m in ("lite2", "lite2-int8", "lite0", "lite0-int8")
)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def embed_all(encoder, images: list) -> np.ndarray:
    out = []
    for i in range(0, len(images), BATCH):
        out.append(encoder.embed(np.stack([encoder.prepare(im) for im in images[i : i + BATCH]])))
    return np.concatenate(out)


def recall(queries: np.ndarray, catalog: np.ndarray, truth: np.ndarray, k: int) -> float:
    order = np.argsort(-(queries @ catalog.T), axis=1)[:, :k]
    return float(np.mean(np.any(order == truth[:, None], axis=1)))


def forward_cpu_ms(encoder, batch: np.ndarray, runs: int) -> float:
    encoder.embed(batch[:1])  # warm-up
    t0 = time.process_time()
    for i in range(runs):
        encoder.embed(batch[i % len(batch) : i % len(batch) + 1])
    return (time.process_time() - t0) / runs * 1000


def encode_rate(encoder, batch: np.ndarray) -> float:
    encoder.embed(batch[:BATCH])
    t0 = time.perf_counter()
    for i in range(0, len(batch), BATCH):
        encoder.embed(batch[i : i + BATCH])
    return len(batch) / (time.perf_counter() - t0)


def calibration_study() -> None:
    import glob

    from lookalike.encoders.quantize import calibration_batch, quantize_int8

    models_dir = Path(tempfile.mkdtemp(prefix="lk-calib-"))
    base = load_encoder("efficientnet-lite2", models_dir)
    size = base.input_size

    def prepared(paths) -> np.ndarray:
        return np.stack([base.prepare(load_image(p, draft_size=2 * size)) for p in paths])

    grocery = DATA / "grocery"
    fashion = sorted(glob.glob(str(DATA / "fashion-footwear/images/*.jpg")))
    footwear = sorted(glob.glob(str(DATA / "footwear300/data/*.jpg")))
    g_cat = [grocery / r["image"] for r in rows(grocery / "catalog.csv")]
    g_train = [grocery / r["image"] for r in rows(grocery / "train.csv")]
    g_val = [grocery / r["image"] for r in rows(grocery / "val.csv")]
    rng = np.random.default_rng(0)

    def sample(paths, n):
        return [paths[i] for i in sorted(rng.choice(len(paths), min(n, len(paths)), False))]

    held = {"fashion": prepared(sample(fashion, 48)), "grocery": prepared(sample(g_val, 48))}
    ref = {k: base.embed(v) for k, v in held.items()}
    sets = {
        "synthetic dead leaves (shipped)": None,
        "64 fashion photos": sample(fashion, 64),
        "64 footwear300 photos": sample(footwear, 64),
        "64 grocery catalog images": sample(g_cat, 64),
        "64 grocery shopper photos": sample(g_train, 64),
    }
    import lookalike.encoders.quantize as quantize

    print("| calibration set | fashion cosine min / mean | grocery cosine min / mean |")
    print("|---|---|---|")
    shipped = quantize.calibration_batch
    for i, (name, paths) in enumerate(sets.items()):
        if paths is not None:
            batch = prepared(paths)
            quantize.calibration_batch = lambda size, count=64, b=batch: b
        dest = models_dir / f"int8-{i}.onnx"
        quantize_int8(base.model_path, dest, "pixels", size)
        quantize.calibration_batch = shipped
        from lookalike.encoders.runtime import InputSpec, OnnxEncoder

        enc = OnnxEncoder(
            name="study", stamp="study", model_path=dest,
            input_spec=InputSpec(size=size, raw_uint8=True), fit=base.fit, output="embedding",
        )  # fmt: skip
        cells = []
        for k, v in held.items():
            cos = (enc.embed(v) * ref[k]).sum(axis=1)
            cells.append(f"{cos.min():.3f} / {cos.mean():.3f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)
    assert calibration_batch is shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model specs")
    parser.add_argument("--calib", type=int, default=500, help="unlabelled train photos")
    parser.add_argument("--runs", type=int, default=64, help="single forward passes timed")
    parser.add_argument("--no-fashion", action="store_true", help="skip fashion-footwear")
    parser.add_argument(
        "--calibration-study", action="store_true", help="compare INT8 calibration sets"
    )
    args = parser.parse_args()
    if args.calibration_study:
        calibration_study()
        return
    grocery = DATA / "grocery"
    if not grocery.is_dir():
        sys.exit(f"real data not found: {grocery}")
    models_dir = Path(os.environ.get("LOOKALIKE_MODELS") or tempfile.gettempdir() + "/lk-models")
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    t_start = time.time()
    load = os.getloadavg()

    cat_rows = rows(grocery / "catalog.csv")
    val_rows = rows(grocery / "val.csv")
    train_images = [r["image"] for r in rows(grocery / "train.csv")]  # labels never read
    pick = sorted(np.random.default_rng(0).choice(len(train_images), args.calib, replace=False))
    calib_paths = [grocery / train_images[i] for i in pick]
    cat_ids = [r["product_id"] for r in cat_rows]
    truth = np.array([cat_ids.index(r["product_id"]) for r in val_rows])
    draft = 520  # >= 2x every bundled input size, as ingest decodes
    cat_images = [load_image(grocery / r["image"], draft_size=draft) for r in cat_rows]
    val_images = [load_image(grocery / r["image"], draft_size=draft) for r in val_rows]
    fashion = None
    if not args.no_fashion and (DATA / "fashion-footwear" / "catalog.csv").is_file():
        frows = rows(DATA / "fashion-footwear" / "catalog.csv")
        fashion = (
            [load_image(DATA / "fashion-footwear" / r["image"], draft_size=draft) for r in frows],
            [r["product_id"] for r in frows],
            [r["category"] or None for r in frows],
        )

    results = []
    float_val: dict[str, np.ndarray] = {}
    for spec in specs:
        enc = load_encoder(spec, models_dir)
        single = load_encoder(spec, models_dir, threads=1)
        prepared = np.stack([enc.prepare(im) for im in val_images[:128]])
        row: dict = {"model": spec, "size": enc.input_size}
        row["cpu_ms"] = forward_cpu_ms(single, prepared, args.runs)
        row["rate"] = encode_rate(enc, prepared)
        cat = embed_all(enc, cat_images)
        val = embed_all(enc, val_images)
        row["r1"], row["r5"] = recall(val, cat, truth, 1), recall(val, cat, truth, 5)
        centre, _ = calibrate(QueryPipeline(enc, QualitySettings()), calib_paths, limit=None)
        pipeline = QueryPipeline(enc, QualitySettings(), centre)
        cval = pipeline.embed_queries(val_images)
        row["cr1"], row["cr5"] = recall(cval, cat, truth, 1), recall(cval, cat, truth, 5)
        if fashion is not None:
            vectors = embed_all(enc, fashion[0])
            row["p10"] = leave_one_out_precision(vectors, fashion[1], fashion[2], 10)["precision"]
        base = spec.removesuffix("-int8")
        if spec.endswith("-int8") and base in float_val:
            cos = (val * float_val[base]).sum(axis=1)
            row["cos"] = f"{cos.min():.3f} / {cos.mean():.3f}"
        float_val[spec] = val
        results.append(row)
        print(f"{spec}: done ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}, ONNX Runtime; load average at start"
        f" {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}; {time.time() - t_start:.0f} s in all."
    )
    print()
    print(
        "| model | input | CPU ms / forward (1 thread) | encode images/s (2 threads, batch 16)"
        " | grocery R@1 / R@5 plain | R@1 / R@5 centred | fashion P@10 | cosine to float32"
        " (min / mean) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        p10 = f"{r['p10']:.3f}" if "p10" in r else "—"
        print(
            f"| {r['model']} | {r['size']} | {r['cpu_ms']:.1f} | {r['rate']:.0f}"
            f" | {r['r1']:.3f} / {r['r5']:.3f} | {r['cr1']:.3f} / {r['cr5']:.3f} | {p10}"
            f" | {r.get('cos', '—')} |"
        )


if __name__ == "__main__":
    main()
