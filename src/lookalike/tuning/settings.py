"""The training settings of `lookalike tune` and each method's defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import UsageError
from ..models.prototypes import TEMPERATURE as PROTOTYPE_TEMPERATURE
from ..models.prototypes import WEIGHT as PROTOTYPE_WEIGHT
from .augment import SESSION_VIEWS
from .finetune import supports

METHOD_DEFAULTS: dict[str, dict[str, int]] = {
    "finetune": {"epochs": 8, "batch_size": 96},
    "head": {"epochs": 12, "batch_size": 128},
}
PHOTOS_KEEP_BASE = 1.25
"""`keep_base` of a `--photos` run without labelled photos or a field (docs/quality.md)."""


@dataclass
class TuneSettings:
    """Training hyper-parameters (defaults chosen on grocery; docs/quality.md says how).
    `None` fields take the method's default (METHOD_DEFAULTS)."""

    # "finetune", "head", or "auto": finetune where the base allows and labelled photos are
    # given; head for --photos / --field alone (as good there, measured, and 4-5x faster)
    method: str = "auto"
    dim: int = 512
    hidden: int = 1024  # 0: a linear projection (head method only)
    dropout: float = 0.5
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    block_lr: float = 3e-4  # finetune: the network's own layers learn at 0.3x the head's rate
    weight_decay: float = 1e-4
    temperature: float = 0.1
    crop_probability: float = 0.5
    catalog_weight: float = 1.0
    catalog_per_step: int = 24  # finetune: catalog images beside each batch of photos
    # head: catalog images beside each batch of photos, drawn at random when the catalog
    # has more (a smaller catalog is taken whole, every step); 0: always the whole one
    head_catalog_per_step: int = 256
    views: int = 2  # finetune: augmented views of each labelled photo (finetune.random_view)
    catalog_augment_views: int = 8  # finetune: ... and of each catalog image
    seed: int = 0
    field_weight: float = 1.0  # --field: weight of the field's loss beside the product loss
    # base embedding appended, scaled; None: 1.0 with --field, PHOTOS_KEEP_BASE with
    # --photos alone
    keep_base: float | None = None
    # --field, head method: the field classifier's posterior; None: 1.0, or 0.0 with
    # unlabelled --photos in the run (their head separates the products; the posterior
    # pulled a category's products together and cost grocery 9-12 points of Recall@1)
    class_weight: float | None = None
    colour_weight: float = 0.7  # --field, head method: the colour descriptor
    pseudo_rounds: int = 0  # --photos: rounds of a head trained on the labels, then relabel
    # --photos, head method: session views of each photo as more samples (augment.py)
    session_views: int = SESSION_VIEWS
    # head method with an MLP: search runs the head as an INT8 ONNX graph (head.onnx), a
    # third of the float head's time a query; False: the float32 head in numpy
    head_int8: bool = True
    # --photos, head method: each catalog image's stored vector moved towards the photos
    # the new model gives it (lookalike.models.prototypes), by this weight; None:
    # PROTOTYPE_WEIGHT for unlabelled photos alone (no --labels, no --field), else 0 (none)
    photo_prototypes: float | None = None
    prototype_temperature: float = PROTOTYPE_TEMPERATURE

    def resolved(
        self, base: Any, field: bool = False, labelled: bool = True, photos: bool = False
    ) -> TuneSettings:
        """These settings with the method and its defaults filled in for `base` (`field`:
        the run uses --field; `labelled`: it has labelled photos; `photos`: unlabelled ones)."""
        method = self.method
        if method == "auto":
            method = "finetune" if supports(base) and labelled else "head"
        if method not in METHOD_DEFAULTS:
            raise UsageError(f"unknown tuning method {method!r}: use finetune or head")
        if method == "finetune" and not supports(base):
            raise UsageError(
                f"--method finetune needs a bundled EfficientNet-Lite base model, not"
                f" {base.name}; use --method head"
            )
        if method == "finetune" and not self.hidden:
            raise UsageError("--method finetune needs an MLP head (hidden > 0)")
        defaults = METHOD_DEFAULTS[method]
        out = replace(self, method=method)
        if out.epochs is None:
            out.epochs = defaults["epochs"]
        if out.batch_size is None:
            out.batch_size = defaults["batch_size"]
        if out.class_weight is None:
            out.class_weight = 0.0 if photos else 1.0
        if out.photo_prototypes is None:
            # measured on --photos alone; beside a field it cost grocery Recall@5
            alone = photos and not field and not labelled and method == "head"
            out.photo_prototypes = PROTOTYPE_WEIGHT if alone else 0.0
        if out.keep_base is None:
            out.keep_base = (1.0 if field else PHOTOS_KEEP_BASE if photos and not labelled
                             else 0.0)  # fmt: skip
        return out
