"""How should an image become the encoder's square input? pad vs centre-crop vs stretch.

Measured on the real labelled data in ../shared/data:

- grocery: the 296 val.csv shopper photos searched against the 81 catalog images
  (exact cosine), Recall@1 and Recall@5, the same mode for catalog and queries (as an
  encoder applies it); every grocery image is square, so this is a control, and
  the same with each shopper photo cut to its centre 4:3 landscape part (simulated
  phone framing, the catalog images unchanged);
- fashion-footwear: leave-one-out category precision@10 over the 2,836 products
  (a neighbour is relevant when it has the query's article type).

Also printed, from the same run:
- the bare encoder throughput (images/s, batch 1 and batch 16) on ONNX Runtime and on
  torch eager, side by side (random uint8 pixels, prepare/decode not included);
- the normalisation check: how often the model's own ImageNet head puts the footwear
  catalogs into ImageNet's shoe classes with (x-127)/128 vs torchvision mean/std.

    .venv/bin/python benchmarks/bench_preprocess_fit.py [--model efficientnet-lite2]
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

from lookalike.encoders import load_encoder  # noqa: E402
from lookalike.encoders.runtime import cpu_count  # noqa: E402
from lookalike.images import FIT_MODES, fit_square, load_image  # noqa: E402

DATA = ROOT / "../shared/data"
SHOE_CLASSES = {502, 514, 630, 770, 774}  # clog, cowboy boot, Loafer, running shoe, sandal


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def embed_images(encoder, images, mode: str, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        out.append(
            encoder.embed(np.stack([fit_square(im, encoder.input_size, mode) for im in chunk]))
        )
    return np.concatenate(out)


def non_square(images) -> int:
    return sum(1 for im in images if im.width != im.height)


def to_4_3(img):
    """The centre 4:3 landscape part of a square photo: how a phone frames a shot."""
    w, h = img.size
    nh = round(w * 3 / 4)
    top = (h - nh) // 2
    return img.crop((0, top, w, top + nh))


def grocery(encoder, four_three: bool = False) -> tuple[dict[str, tuple[float, float]], int, int]:
    """mode -> (Recall@1, Recall@5); plus how many of the images are not square.
    `four_three`: cut each (square) shopper photo to 4:3 first (simulated phone framing)."""
    base = DATA / "grocery"
    cat = read_csv(base / "catalog.csv")
    val = read_csv(base / "val.csv")
    ids = [r["product_id"] for r in cat]
    cat_imgs = [load_image(base / r["image"], draft_size=encoder.draft_size) for r in cat]
    q_imgs = [load_image(base / r["image"], draft_size=encoder.draft_size) for r in val]
    if four_three:
        q_imgs = [to_4_3(im) for im in q_imgs]
    truth = np.array([ids.index(r["product_id"]) for r in val])
    result = {}
    for mode in FIT_MODES:
        sims = embed_images(encoder, q_imgs, mode) @ embed_images(encoder, cat_imgs, mode).T
        rank = np.argsort(-sims, axis=1)
        r1 = float(np.mean(rank[:, 0] == truth))
        r5 = float(np.mean((rank[:, :5] == truth[:, None]).any(axis=1)))
        result[mode] = (r1, r5)
    return result, non_square(cat_imgs) + non_square(q_imgs), len(cat_imgs) + len(q_imgs)


def fashion(encoder, k: int = 10) -> tuple[dict[str, float], int, int]:
    """mode -> leave-one-out category precision@k; plus how many images are not square."""
    base = DATA / "fashion-footwear"
    rows = read_csv(base / "catalog.csv")
    imgs = [load_image(base / r["image"]) for r in rows]
    cats = np.array([r["category"] for r in rows])
    result = {}
    for mode in FIT_MODES:
        vecs = embed_images(encoder, imgs, mode)
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -np.inf)
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        result[mode] = float(np.mean(cats[top] == cats[:, None]))
    return result, non_square(imgs), len(imgs)


def throughput(encoder, seconds: float = 5.0) -> dict[tuple[str, int], tuple[float, float]]:
    """(configuration, batch) -> (images per wall second, images per CPU second of this
    process) of the bare network on random pixels. The CPU-second rate is the one to
    compare on a busy machine: it does not count time other processes held the cores
    (it does count worker threads spin-waiting)."""
    import torch

    from lookalike.encoders.efficientnet import build_torch_model

    module = build_torch_model(encoder.name)
    s = encoder.input_size
    rng = np.random.default_rng(0)
    cores = cpu_count()
    configs = []  # (label, engine, threads, ORT spinning)
    for threads in sorted({cores, 1}, reverse=True):
        configs.append((f"onnxruntime, {threads} thr", "ort", threads, False))
        if threads > 1:
            configs.append((f"onnxruntime, {threads} thr, spinning", "ort", threads, True))
        configs.append((f"torch eager, {threads} thr", "torch", threads, False))
    result = {}
    for batch in (1, 16):
        pixels = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
        tensor = torch.from_numpy(pixels)
        for label, engine, threads, spinning in configs:
            if engine == "ort":
                encoder.set_threads(threads, spinning=spinning)

                def fn(p=pixels):
                    encoder.embed(p)
            else:
                torch.set_num_threads(threads)

                def fn(t=tensor):
                    with torch.inference_mode():
                        module(t)

            fn()  # warm-up
            n, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds:
                fn()
                n += batch
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            result[(label, batch)] = (n / wall, n / cpu)
    encoder.set_threads(None)
    return result


def normalisation_check(encoder, limit: int = 300) -> dict[tuple[str, str], float]:
    """(set, normalisation) -> share of images whose ImageNet top-1 is a shoe class."""
    import torch

    from lookalike.encoders.efficientnet import build_torch_model

    net = build_torch_model(encoder.name).net
    sets = {
        "fashion-footwear": [
            DATA / "fashion-footwear" / r["image"]
            for r in read_csv(DATA / "fashion-footwear/catalog.csv")[:limit]
        ],
        "footwear300": sorted((DATA / "footwear300/data").glob("*.jpg")),
    }
    norms = {
        "(x-127)/128": (np.full(3, 127.0), np.full(3, 128.0)),
        "torchvision mean/std": (
            np.array([0.485, 0.456, 0.406]) * 255,
            np.array([0.229, 0.224, 0.225]) * 255,
        ),
    }
    result = {}
    for set_name, paths in sets.items():
        pixels = np.stack([encoder.prepare(load_image(p)) for p in paths]).astype(np.float32)
        for norm_name, (mean, std) in norms.items():
            x = torch.from_numpy(((pixels - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
            with torch.inference_mode():
                top1 = torch.cat([net(c).argmax(1) for c in x.split(32)]).numpy()
            result[(set_name, norm_name)] = float(np.mean([t in SHOE_CLASSES for t in top1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet-lite2")
    ap.add_argument("--cache-dir", type=Path, default=None, help="ONNX cache (default: a temp dir)")
    ap.add_argument("--skip-fit", action="store_true", help="skip the fit-mode comparison")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-normalisation", action="store_true")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the shared data beside the repo")
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    encoder = load_encoder(args.model, cache)
    cpu = platform.processor() or platform.machine()
    print(f"# {args.model} ({encoder.stamp}); {cpu_count()} cores ({cpu}), {platform.system()}")
    print(f"# pixels resized with Pillow bicubic; JPEG draft >= {encoder.draft_size} px\n")

    if not args.skip_fit:
        t = time.perf_counter()
        g, g_ns, g_n = grocery(encoder)
        secs = time.perf_counter() - t
        print(f"grocery: 296 val vs 81 catalog images, {g_ns}/{g_n} not square ({secs:.0f} s)")
        t = time.perf_counter()
        g43, g43_ns, _ = grocery(encoder, four_three=True)
        secs = time.perf_counter() - t
        print(f"grocery, val photos cut to 4:3 (simulated), {g43_ns} not square ({secs:.0f} s)")
        t = time.perf_counter()
        f, f_ns, f_n = fashion(encoder)
        secs = time.perf_counter() - t
        print(f"fashion-footwear: leave-one-out, {f_ns}/{f_n} not square ({secs:.0f} s)")

        print("\n          grocery (square)    grocery, 4:3 queries   fashion-footwear")
        print("mode        R@1      R@5         R@1      R@5          P@10 (category)")
        for m in FIT_MODES:
            cells = f"{g[m][0]:>5.3f}{g[m][1]:>9.3f}{g43[m][0]:>12.3f}{g43[m][1]:>9.3f}"
            print(f"{m:<10}{cells}{f[m]:>14.3f}")
        best = max(FIT_MODES, key=lambda m: (g43[m][0] + f[m], g43[m][1]))
        print(f"best by grocery 4:3 R@1 + fashion P@10: {best}")

    if not args.skip_throughput:
        tp = throughput(encoder)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"\nbare encoder throughput (load average after the run {load})")
        print("                                     batch 1               batch 16")
        print("configuration                  img/s  img/CPU-s      img/s  img/CPU-s")
        for label in dict.fromkeys(label for label, _ in tp):
            (w1, c1), (w16, c16) = tp[(label, 1)], tp[(label, 16)]
            print(f"{label:<29}{w1:>6.1f}{c1:>11.1f}{w16:>11.1f}{c16:>11.1f}")

    if not args.skip_normalisation:
        nc = normalisation_check(encoder)
        print("\nImageNet head top-1 in a shoe class (clog/boot/loafer/running shoe/sandal)")
        print("set                 (x-127)/128   torchvision mean/std")
        for s in ("fashion-footwear", "footwear300"):
            print(f"{s:<20}{nc[(s, '(x-127)/128')]:>11.3f}{nc[(s, 'torchvision mean/std')]:>23.3f}")


if __name__ == "__main__":
    main()
