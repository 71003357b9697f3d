"""End-to-end ingest throughput of lookalike beside the original write-up's pipeline shape.

    .venv/bin/python benchmarks/bench_ingest.py [--vgg-images 60] [--catalog-views V,...]
        [--power-normalise P|off]

lookalike: `Engine.index` on a fresh home (walk, hash, decode in threads, batch encode on
ONNX Runtime, SQLite + FAISS writes), the ONNX export done beforehand (it happens once per
machine). Then the same catalog again, unchanged, to show what a re-run costs.
Baseline: the write-up's shape — VGG16 convolutional base + global average pooling at
224 px, one image per forward pass, torch eager (random weights: they do not change the
speed). Both run in this one process, one after the other, so the ratio is fair on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
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

from lookalike.engine import Engine  # noqa: E402
from lookalike.images import load_image  # noqa: E402


def vgg16_gap():
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    channels = 3
    for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.set_num_threads(os.cpu_count() or 1)
    return model


def vgg_images_per_second(files: list[Path]) -> float:
    import torch

    model = vgg16_gap()
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def one(path: Path) -> np.ndarray:
        image = load_image(path).resize((224, 224))
        x = (np.asarray(image, dtype=np.float32) / 255 - mean) / std
        with torch.inference_mode():
            out = model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
        return out.numpy()

    one(files[0])  # warm-up
    started = time.perf_counter()
    for path in files:
        one(path)
    return len(files) / (time.perf_counter() - started)


def lookalike_run(
    paths, metadata, models: Path, settings: dict | None = None
) -> tuple[float, int, float]:
    os.environ["LOOKALIKE_MODELS"] = str(models)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        if settings:  # else the defaults (lookalike.models.views)
            home.mkdir()
            (home / "quality.json").write_text(json.dumps(settings))
        engine = Engine(home)
        _ = engine.encoder  # export/load outside the timing
        started = time.perf_counter()
        report = engine.index(paths, metadata=metadata, progress=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        again = engine.index(paths, metadata=metadata, progress=False)
        second = time.perf_counter() - started
        engine.close()
    assert report.ok and again.encoded == 0, (report.summary(), again.summary())
    return report.added / first, report.added, second / first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-images", type=int, default=60)
    parser.add_argument("--models", default=str(Path.home() / ".cache/lookalike/models"))
    parser.add_argument(
        "--catalog-views",
        help="comma-separated catalog views of each image ('' for the image alone);"
        " default: the shipped default",
    )
    parser.add_argument(
        "--power-normalise", help="power p of the vectors, or 'off'; default: the shipped default"
    )
    args = parser.parse_args()
    settings: dict = {}
    if args.catalog_views is not None:
        settings["catalog_views"] = [v for v in args.catalog_views.split(",") if v]
    if args.power_normalise is not None:
        off = args.power_normalise == "off"
        settings["power_normalise"] = False if off else float(args.power_normalise)
    models = Path(args.models)
    footwear = DATA / "footwear300" / "data"
    fashion = DATA / "fashion-footwear" / "catalog.csv"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    rows = []
    for name, paths, metadata in (
        ("footwear300", [footwear], None),
        ("fashion-footwear", [], fashion),
    ):
        rate, count, rerun = lookalike_run(paths, metadata, models, settings)
        rows.append((name, count, rate, rerun))
    vgg_files = sorted(footwear.glob("*.jpg"))[: args.vgg_images]
    vgg = vgg_images_per_second(vgg_files)
    print()
    print(
        "| catalog | images | lookalike images/s | unchanged re-run / first run | "
        "VGG16-GAP 224px torch eager, batch 1 | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, rate, rerun in rows:
        print(f"| {name} | {count} | {rate:.1f} | {rerun:.1%} | {vgg:.1f} | {rate / vgg:.1f}x |")
    print(f"\n(VGG16 baseline timed on the first {len(vgg_files)} footwear300 images)")


if __name__ == "__main__":
    main()
