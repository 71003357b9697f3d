"""Fine-tuning the last blocks of a bundled EfficientNet-Lite: `lookalike tune`'s
"finetune" method (the default for the bundled models; lookalike.tuning.train runs it).

A head on frozen final features plateaus near Recall@1 0.77 on grocery (docs/quality.md);
letting the network's last two MBConv blocks and its 1x1 head conv adapt reaches 0.80.
It stays cheap on 2 CPU cores because everything below those blocks stays frozen:

- the *trunk* (the base ONNX graph up to the input of the first tuned block, INT8 for the
  default model) is run once per image, and its output map (208 x 9 x 9 for Lite2) is
  cached by file content (`<home>/models/features/*-trunk.npz`);
- training runs the *tail* (the last two blocks, head conv, the same two-stage pooled
  embedding as the base, then a small MLP head) in torch on cached maps, with cheap
  map-level augmentation (mirror, random crops resized back) and a normalised-softmax
  loss against one learned proxy per product;
- the tuned model is the base trunk graph, unchanged, followed by the tuned tail exported
  to ONNX (`model.onnx`), so a query costs one ONNX Runtime pass as before. The tail
  alone is saved too (`tail.onnx`): re-embedding the catalog runs it on the cached trunk
  maps instead of the whole network.

Loading the result for search is lookalike.models.FinetunedEncoder's job (no torch there).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.runtime import make_session
from ..errors import ModelError
from ..fsutil import atomic_write
from ..models import TRUNK_INPUT
from .weak import FieldTerm

TUNED_BLOCKS = 2
"""How many of the network's last MBConv blocks are fine-tuned (plus the head conv)."""
VIEW_RECIPE = "v1"
"""Bump when random_view changes (cached views are keyed by it)."""


def supports(base: Any) -> bool:
    """Whether `base` is a bundled EfficientNet-Lite (whose graph can be cut and whose
    torch weights are installed)."""
    from ..encoders.efficientnet import BUNDLED, EfficientNetLiteEncoder

    return isinstance(base, EfficientNetLiteEncoder) and base.name in BUNDLED


@dataclass(frozen=True)
class Cut:
    """Where the base graph is cut: the first tuned block and the tensor feeding it."""

    first_block: int
    tensor: str


def find_cut(model: Any) -> Cut:
    """The cut of an exported (float32 or QDQ INT8) EfficientNet-Lite graph."""
    import re

    blocks = set()
    for node in model.graph.node:
        m = re.match(r"/_blocks\.(\d+)/", node.name)
        if m:
            blocks.add(int(m.group(1)))
    if not blocks:
        raise ModelError("not an exported EfficientNet-Lite graph (no /_blocks.N/ nodes)")
    first = max(blocks) + 1 - TUNED_BLOCKS
    want = f"/_blocks.{first}/_expand_conv/Conv"
    for node in model.graph.node:
        if node.name == want:
            return Cut(first, node.input[0])
    raise ModelError(f"cannot find {want} in the exported graph")


def _save(model: Any, dest: Path) -> None:
    atomic_write(dest, lambda fh: fh.write(model.SerializeToString()))


class Trunk:
    """The base graph with its cut tensor as an extra output: one pass gives the base
    embedding and the trunk map of a prepared batch."""

    def __init__(self, base: Any):
        import onnx

        self.base = base
        model = onnx.load(str(base.model_path))
        self.cut = find_cut(model)
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(self.cut.tensor, onnx.TensorProto.FLOAT, None)
        )
        self.model = model  # kept in memory: the models folder may be read-only
        self.session = make_session(model.SerializeToString())

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) -> (base embeddings (N, D), trunk maps (N, C, h, w))."""
        feed = {self.base._input_name: self.base.input_spec.to_tensor(batch)}
        emb, maps = self.session.run(["embedding", self.cut.tensor], feed)
        return emb, maps


def random_view(img: Any, sha256: str, view: int) -> Any:
    """An augmented view of a PIL image, the same for the same file and view number on
    every run (so views are cached like the images themselves): a random crop of 45-100 %
    of the area at an aspect ratio of 3:4 to 4:3, a mirror half the time, and
    brightness, contrast and colour each scaled by 0.7-1.3. A shelf photo is seldom
    framed, lit or white-balanced like the catalog's picture."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([int(sha256[:15], 16), view])
    w, h = img.size
    area = rng.uniform(0.45, 1.0) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = max(1, min(w, int(round(np.sqrt(area * aspect)))))
    ch = max(1, min(h, int(round(np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img


# --------------------------------------------------------------------------- the tail


def build_tail(
    base_name: str,
    first_block: int,
    hidden: int,
    dim: int,
    dropout: float,
    keep_base: float = 0.0,
):
    """The torch tail: trunk map -> L2-normalised tuned embedding, starting from the
    bundled weights (blocks `first_block`.. and the head conv) and a fresh MLP head.
    With `keep_base` > 0 the exported embedding appends the base model's own embedding
    (frozen copies of the tuned blocks), scaled by it, to the tuned vector."""
    import copy

    import torch
    import torch.nn.functional as F

    from ..encoders.efficientnet import BLOCK_WEIGHT, build_torch_model

    net = build_torch_model(base_name).net

    class Tail(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(list(net._blocks)[first_block:])
            self.conv_head = net._conv_head
            self.bn1 = net._bn1
            self.act = net._swish  # ReLU6 in Lite
            width = self.conv_head.out_channels + self.conv_head.in_channels
            self.register_buffer("mean", torch.zeros(width))
            self.fc1 = torch.nn.Linear(width, hidden)
            self.fc2 = torch.nn.Linear(hidden, dim)
            self.drop = torch.nn.Dropout(dropout)
            self.keep_base = float(keep_base)
            # the base's own layers, frozen (not registered as trainable modules)
            self._frozen = [copy.deepcopy(m).requires_grad_(False).eval()
                            for m in (self.blocks, self.conv_head, self.bn1)] \
                if keep_base else None  # fmt: skip

        def pooled(self, x, layers=None):
            """The base model's own embedding of this trunk map (module docstring)."""
            blocks, conv_head, bn1 = layers or (self.blocks, self.conv_head, self.bn1)
            for block in blocks:
                x = block(x)
            head = self.act(bn1(conv_head(x)))
            features = torch.cat([head, BLOCK_WEIGHT * x], dim=1)
            return F.normalize(features.mean(dim=(2, 3)), dim=1)

        def tuned(self, x):
            """The tuned vector alone (what the losses see)."""
            y = self.pooled(x) - self.mean
            y = self.drop(torch.relu(self.fc1(y)))
            return F.normalize(self.fc2(y), dim=1)

        def forward(self, x):
            y = self.tuned(x)
            if self._frozen is None:
                return y
            base = self.pooled(x, self._frozen)
            return F.normalize(torch.cat([y, self.keep_base * base], dim=1), dim=1)

        def train_mode(self) -> None:
            """Batch norm keeps the ImageNet statistics; only dropout trains."""
            self.eval()
            self.drop.train()

    return Tail()


def train_tail(
    settings: Any,
    base_name: str,
    first_block: int,
    photo_maps: np.ndarray,
    photo_y: np.ndarray,
    cat_maps: np.ndarray,
    cat_y: np.ndarray,
    n_products: int,
    *,
    photo_views: np.ndarray | None = None,
    cat_views: np.ndarray | None = None,
    cat_field: np.ndarray | None = None,
    on_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int, float, Any], None] | None = None,
):
    """Fine-tune the tail on cached trunk maps; returns the torch module (eval mode).
    `settings` is the resolved TuneSettings of the run. `cat_field` (a class per catalog
    image, -1 for none; `tune --field`) adds a loss towards one proxy per class.
    `*_views` (N, V, C, h, w): trunk maps of V augmented views of each image
    (random_view); each sample then takes the image or one of its views at random."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    tail = build_tail(base_name, first_block, settings.hidden, settings.dim, settings.dropout,
                      keep_base=settings.keep_base or 0.0)  # fmt: skip
    px = torch.from_numpy(np.ascontiguousarray(photo_maps, dtype=np.float32))
    cx = torch.from_numpy(np.ascontiguousarray(cat_maps, dtype=np.float32))
    py = torch.from_numpy(photo_y.astype(np.int64))
    cy = torch.from_numpy(cat_y.astype(np.int64))
    tail.eval()
    with torch.no_grad():
        sample = px[torch.from_numpy(rng.permutation(len(px))[:512])]
        tail.mean.copy_(
            torch.cat([_batched(tail.pooled, sample), _batched(tail.pooled, cx)]).mean(0)
        )
        start_vectors = _batched(tail.tuned, cx)
        start = torch.zeros(n_products, settings.dim).index_add_(0, cy, start_vectors)
        field = FieldTerm.make(cat_field, start_vectors)
    proxies = torch.nn.Parameter(F.normalize(start, dim=1))
    head_params = [*tail.fc1.parameters(), *tail.fc2.parameters(), proxies, *field.parameters()]
    body_params = [p for n, p in tail.named_parameters() if not n.startswith("fc")]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": settings.lr},
         {"params": body_params, "lr": settings.block_lr}],
        weight_decay=settings.weight_decay,
    )  # fmt: skip
    n = len(px)
    steps = max(1, -(-n // settings.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[settings.lr, settings.block_lr],
        total_steps=settings.epochs * steps,
        pct_start=0.1,
    )
    h, w = px.shape[2:]

    def take(x, views: np.ndarray | None, idx):
        """Samples `idx`: the image's own map or one of its views', at random."""
        out = x[idx]
        if views is None or views.shape[1] == 0:
            return out
        pick = rng.integers(0, views.shape[1] + 1, len(idx))
        rows = np.flatnonzero(pick)
        if len(rows):
            out = out.clone()
            chosen = views[idx.numpy()[rows], pick[rows] - 1]
            out[torch.from_numpy(rows)] = torch.from_numpy(chosen.astype(np.float32))
        return out

    def augment(x):
        """Mirror half the maps; crop half of them to a random window resized back."""
        out = x.clone()
        flip = torch.from_numpy(rng.random(len(x)) < 0.5)
        out[flip] = out[flip].flip(-1)
        for i in np.flatnonzero(rng.random(len(x)) < settings.crop_probability):
            sh = int(rng.integers(max(2, (2 * h) // 3), h + 1))
            sw = int(rng.integers(max(2, (2 * w) // 3), w + 1))
            y0 = int(rng.integers(0, h - sh + 1))
            x0 = int(rng.integers(0, w - sw + 1))
            window = out[i : i + 1, :, y0 : y0 + sh, x0 : x0 + sw]
            out[i] = F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False)[0]
        return out

    t = settings.temperature
    for epoch in range(settings.epochs):
        tail.train_mode()
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for s in range(0, n, settings.batch_size):
            idx = perm[s : s + settings.batch_size]
            cidx = torch.from_numpy(
                rng.choice(len(cx), min(len(cx), settings.catalog_per_step), replace=False)
            )
            p = F.normalize(proxies, dim=1)
            q = tail.tuned(augment(take(px, photo_views, idx)))
            c = tail.tuned(augment(take(cx, cat_views, cidx)))
            loss = F.cross_entropy(q @ p.T / t, py[idx]) + F.cross_entropy(c @ p.T / t, cy[cidx])
            loss = loss + settings.field_weight * field.loss(c, cidx, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            if on_step is not None:
                on_step()
        tail.eval()
        if on_epoch is not None:
            on_epoch(epoch, total / n, tail)
    tail.eval()
    return tail


def _batched(fn: Callable, x, size: int = 256):
    import torch

    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def embed_maps(tail: Any, maps: np.ndarray) -> np.ndarray:
    """Tuned embeddings of trunk maps with the torch tail (training-time figures)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
        return _batched(tail, x).numpy().astype(np.float32)


# --------------------------------------------------------------------------- export


def export_tuned(
    tail: Any,
    trunk: Trunk,
    channels: int,
    hw: tuple[int, int],
    folder: Path,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write `folder/tail.onnx` (trunk map -> embedding) and `folder/model.onnx` (the base
    trunk graph followed by the tail: pixels -> embedding). Returns model.onnx.

    With `calibration` (trunk maps), the tail is quantised to INT8 with the bundled
    models' recipe (lookalike.encoders.quantize), calibrated on those maps: for an INT8
    base this keeps a query's cost where it was (a float32 tail added 10 %)."""
    import onnx
    import torch

    from ..encoders.efficientnet import OPSET

    folder.mkdir(parents=True, exist_ok=True)
    tail_path = folder / "tail.onnx"
    example = torch.zeros((2, channels, *hw), dtype=torch.float32)
    fd, tmp = tempfile.mkstemp(prefix=".tail.", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                tail.eval(),
                (example,),
                tmp,
                input_names=[TRUNK_INPUT],
                output_names=["embedding"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={TRUNK_INPUT: {0: "batch"}, "embedding": {0: "batch"}},
                do_constant_folding=True,
            )
        if calibration is not None:
            from ..encoders.quantize import quantize_int8

            quantize_int8(
                Path(tmp), tail_path, TRUNK_INPUT, calibration=calibration.astype(np.float32)
            )
            tail_model = onnx.load(str(tail_path))
        else:
            os.replace(tmp, tail_path)
            tail_model = onnx.load(str(tail_path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    # the trunk's model declares the cut tensor as an output, which the extractor needs
    trunk_model = onnx.utils.Extractor(trunk.model).extract_model(
        [i.name for i in trunk.model.graph.input], [trunk.cut.tensor]
    )
    trunk_model.ir_version = tail_model.ir_version = max(
        trunk_model.ir_version, tail_model.ir_version
    )
    merged = onnx.compose.merge_models(
        trunk_model,
        tail_model,
        io_map=[(trunk.cut.tensor, TRUNK_INPUT)],
        prefix2="tuned/",
    )
    # the output keeps its plain name: the encoder asks for "embedding"
    for node in merged.graph.node:
        node.output[:] = ["embedding" if o == "tuned/embedding" else o for o in node.output]
    for out in merged.graph.output:
        if out.name == "tuned/embedding":
            out.name = "embedding"
    onnx.checker.check_model(merged)
    model_path = folder / "model.onnx"
    _save(merged, model_path)
    return model_path


CALIBRATION_MAPS = 64


def calibration_maps(base: Any, photo_maps: np.ndarray, cat_maps: np.ndarray) -> np.ndarray | None:
    """Trunk maps to calibrate the INT8 tail on (training data only: an even spread of the
    catalog images and labelled photos), or None when the base model is float32."""
    from ..encoders.efficientnet import BUNDLED

    if not BUNDLED[base.name].int8_of:
        return None
    maps = np.concatenate([cat_maps, photo_maps])
    pick = np.linspace(0, len(maps) - 1, min(CALIBRATION_MAPS, len(maps))).round().astype(int)
    return np.ascontiguousarray(maps[np.unique(pick)], dtype=np.float32)
