"""Learn from what the shop has: `lookalike tune` (layer L7: workflows over an Engine).
Labelled photos (`--labels`), unlabelled shopper photos (`--photos`, given pseudo-labels by
self-training, pseudo.py) and the catalog's own metadata (`--field`, weak labels, weak.py),
alone or together (sources.py); the paragraphs below describe the labelled case, which
the other two reduce to.

An ImageNet network was never taught that a shelf photo of a juice carton and the
carton's catalog picture show the same product. A shop knows it: `lookalike tune
--labels photos.csv` (rows `image,product_id`) adapts the model so that labelled photos
land next to their product's catalog images, re-embeds the catalog with it, and makes
searches use it at once.

Two methods (chosen by measurement, see docs/quality.md and benchmarks/bench_tune.py):

- "finetune" (the default for the bundled EfficientNet-Lite models): the network's last
  two blocks and head conv are fine-tuned together with an MLP head, on trunk maps
  computed once per image and cached (`finetune.py`);
- "head" (any encoder, `onnx:` models included): an MLP head on the frozen base
  embedding; for encoders that expose their final feature map, each sample is pooled
  over a random rectangle of a cached 3x3 grid of cells (a cheap feature-level crop;
  `head.py`).

Both train the labelled photos and the catalog images themselves with a normalised-softmax
loss against one learned proxy per product, initialised from the product's catalog
images. Features are cached by file content in `<home>/models/features/` (`features.py`).
Training never reads anything but the labels file and the catalog; the `--validate` file
is only embedded to report Recall@1/@5 before and after (`train.py`).

A tuned model is saved as a new version under `<home>/models/tuned/` and loaded for search
by lookalike.models (which also says which version is active). A tuned encoder has its own
stamp (base stamp + hash of what was learned), so the catalog and vector store can never
mix vectors of two models: activating or resetting re-embeds the catalog, from cached
features where they exist (`switch.py`).

    settings.py   TuneSettings, each method's defaults
    sources.py    reading --labels / --photos / --field and the catalog: Inputs
    pseudo.py     pseudo-labels for unlabelled photos (crops, propagation, balancing, soft targets)
    weak.py       a catalog field as weak labels: FieldLabels, the field's loss
    features.py   FeatureCache, computing features, grid cells
    head.py       the head method
    finetune.py   the finetune method: trunk, augmented views, tail training, export
    train.py      train_tuned_model: one run, step by step; TuneReport
    switch.py     use_model / reset: switch a home's model and re-embed the catalog
"""

from __future__ import annotations

from .features import FeatureCache
from .settings import METHOD_DEFAULTS, TuneSettings
from .switch import reset, use_model
from .train import TuneReport, train_tuned_model

__all__ = [
    "METHOD_DEFAULTS",
    "FeatureCache",
    "TuneReport",
    "TuneSettings",
    "reset",
    "train_tuned_model",
    "use_model",
]
