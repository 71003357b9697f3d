"""The query side of retrieval quality: how a shopper photo becomes the vector that is
searched. Chosen by measurement (benchmarks/bench_quality.py, the table in
docs/quality.md), with no labels. The catalog side is the encoder's own (`prepare` +
`embed`); nothing here changes catalog vectors, so nothing here needs a re-index.

`QueryPipeline` wraps any encoder (bundled, `onnx:` or tuned) and turns decoded photos
into L2-normalised query vectors; `Engine.embed_queries` uses it through
`query_pipeline(home, encoder)`, so `lookalike search`, `eval` and the API all get it.

- views (`query_views`): each photo is embedded as one or more views (`full`, `flip`,
  `centreNN` = the central square of NN % of the shorter side, NN 50..95 in steps of 5).
  Each view costs a forward pass; one by default, to keep single-query latency:
  `centre70` for a base model, `full` for a tuned one unless its model.json names its
  own (`centre60` for a `tune --photos` head; `default_views`). A query whose
  bytes are a catalog image's gets that image's stored vector (`embed_sources`), so the
  catalog's own images still find themselves first.
- product framing (`frame_products`, on by default for a tuned model): a product shot on a plain
  background that the encoder's centre crop would cut (a stiletto in a portrait frame)
  is padded to a square with its background colour first (lookalike.framing), and its
  centre-crop views use the whole framed image; the square is the smallest the views
  keep, so a `centre60` model sees a square product shot whole too. Shopper photos and
  products that fit the square are untouched.
- query-domain centring (`centre`, on by default once calibrated): shop photos share a
  strong "shelf photo" component that studio catalog shots lack. `calibrate` averages
  the view vectors of unlabelled photos like the ones shoppers will send (no labels are
  read) and stores that mean in the home folder (`query_centre.npz`); every later query
  view has it subtracted and is L2-normalised again before the views are summed and the
  sum is normalised. With no calibration stored, queries are embedded as before.
- hubness correction (`hub_correction`, beta 0.5, base models only, once calibrated):
  `calibrate` also stores r(c) for every catalog image, the mean cosine of its 10
  nearest calibration photos (centred as queries are), and a photo search ranks images
  by cos - beta r(c) (lookalike.hubness; the shown score stays the cosine).

Settings come from `QualitySettings()` defaults, overridden by `<home>/quality.json`
(same keys), e.g. `{"query_views": ["full", "centre80"], "centre": true}`. Both files are
re-read when they change, so a running server picks up a new calibration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .encoders.runtime import l2_normalise
from .errors import InputPathError, MetadataError, UsageError
from .framing import letterbox_product
from .fsutil import sha256_of
from .hubness import HUB_BETA, HUB_K, HubCorrection
from .images import DEFAULT_MAX_BYTES, load_image
from .models import is_tuned, query_encoder
from .models.views import check_power, check_views

log = logging.getLogger(__name__)

SETTINGS_FILE = "quality.json"
CENTRE_FILE = "query_centre.npz"
SHA_INFO = "lookalike.sha256"
"""The key of `Image.info` under which `tag_content` keeps the hash of the source bytes."""
PAD_COLOUR = (255, 255, 255)
EMBED_BATCH = 16
"""Most images per forward pass: memory grows with the batch, speed barely does."""
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic"}
IMAGE_SUFFIXES |= {".heif", ".avif"}


def _full(img: Image.Image) -> Image.Image:
    return img


def _flip(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(img)


def centre_square(img: Image.Image, fraction: float) -> Image.Image:
    """The central square whose side is `fraction` of the image's shorter side."""
    w, h = img.size
    side = max(1, round(min(w, h) * fraction))
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def _centre_view(percent: int) -> Callable[[Image.Image], Image.Image]:
    return lambda img: centre_square(img, percent / 100)


QUERY_VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "full": _full,
    "flip": _flip,
    **{f"centre{p}": _centre_view(p) for p in range(95, 45, -5)},
}


PLAIN_VIEWS = ("centre70",)
"""The default query view of a base (untuned) model: the central 70 % square, chosen on
the burst split of grocery train.csv (benchmarks/bench_query_views.py; docs/quality.md):
shoppers frame the product near the middle, with shelf and hands around it."""
TUNED_VIEWS = ("full",)
"""The default of a tuned model whose model.json names no `query_views`: the whole photo,
what its training and its measured figures used. A head trained by `tune --photos` on
the photos' central crops too names its own (`centre60`, lookalike.tuning.pseudo)."""


def default_views(encoder: Any) -> tuple[str, ...]:
    """The query views used when `quality.json` names none: the tuned model's own
    (its model.json's `query_views`), else TUNED_VIEWS, or PLAIN_VIEWS for a base model."""
    if not is_tuned(encoder):
        return PLAIN_VIEWS
    own = tuple((getattr(encoder, "info", None) or {}).get("query_views") or ())
    return own if own and all(v in QUERY_VIEWS for v in own) else TUNED_VIEWS


@dataclass(frozen=True)
class QualitySettings:
    """What the query pipeline does; see the module docstring and docs/quality.md."""

    query_views: tuple[str, ...] | None = None
    """Views of each query photo, summed after centring; each costs a forward pass. None:
    `default_views` of the encoder."""
    centre: bool = True
    """Subtract the calibrated query-domain centre (when `calibrate` has stored one)."""
    frame_products: bool | None = None
    """Letterbox a product shot on a plain background that the centre crop would cut
    (lookalike.framing); such a photo's centre-crop views use the whole framed image.
    None: on for a tuned model (the red stiletto: 0 -> 10 heels with `tune --field`),
    off for a base model (the same query: 2 -> 0 heels, 7 -> 4 red); docs/quality.md."""
    catalog_views: tuple[str, ...] | None = None
    """Catalog side (lookalike.models.views): views each catalog image of a base model is
    embedded as, averaged (`flip`, `rot20`, ...; [] for the image alone). None: what the
    catalog was indexed with, else `["rot-20"]` (two passes an image; `["flip", "rot20",
    "rot-20"]` is the measured set of four). A change needs `lookalike index`."""
    power_normalise: float | bool | None = None
    """Power normalisation (sign(x) |x|^p, then L2) of a base model's catalog and query
    vectors: p between 0 and 1, or false for none. None: what the catalog was indexed
    with, else 0.5 (lookalike.models.views). A change needs `lookalike index`."""
    hub_correction: float | bool = HUB_BETA
    """beta of the hubness correction of a calibrated base model's photo searches
    (lookalike.hubness): images ranked by cos - beta r(c); false (or 0) for none."""

    def __post_init__(self) -> None:
        hub = self.hub_correction
        if hub is True:
            object.__setattr__(self, "hub_correction", HUB_BETA)
        elif hub is not False and (
            not isinstance(hub, int | float) or not 0.0 <= float(hub) <= 10.0
        ):
            raise UsageError(f"hub_correction must be false or a number from 0 to 10, not {hub!r}")
        if not isinstance(self.centre, bool):
            raise UsageError(f"centre must be true or false, not {self.centre!r}")
        if self.frame_products is not None and not isinstance(self.frame_products, bool):
            raise UsageError(f"frame_products must be true or false, not {self.frame_products!r}")
        if self.catalog_views is not None:
            if isinstance(self.catalog_views, str) or not isinstance(self.catalog_views, Sequence):
                raise UsageError(f"catalog_views must be a list, not {self.catalog_views!r}")
            try:
                object.__setattr__(self, "catalog_views", check_views(self.catalog_views))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if self.power_normalise is not None:
            try:
                check_power(self.power_normalise)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if self.query_views is None:
            return
        views = tuple(self.query_views)
        if not views or any(v not in QUERY_VIEWS for v in views):
            raise UsageError(
                f"query_views must be a non-empty list of {', '.join(QUERY_VIEWS)},"
                f" not {list(views)!r}"
            )
        object.__setattr__(self, "query_views", views)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> QualitySettings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(
                f"{source}: unknown quality setting(s) {', '.join(unknown)}"
                f" (known: {', '.join(sorted(known))})"
            )
        kwargs = dict(data)
        if "query_views" in kwargs:
            if isinstance(kwargs["query_views"], str):
                kwargs["query_views"] = [v for v in kwargs["query_views"].split(",") if v]
            kwargs["query_views"] = tuple(kwargs["query_views"])
        return cls(**kwargs)


def load_settings(home: str | Path | None) -> QualitySettings:
    """Defaults, overridden by `<home>/quality.json` when it exists."""
    if home is None:
        return QualitySettings()
    path = Path(home) / SETTINGS_FILE
    if not path.is_file():
        return QualitySettings()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{path}: not a readable JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: must hold a JSON object of settings")
    return QualitySettings.from_dict(data, str(path))


def with_margin(img: Image.Image, fill: float) -> Image.Image:
    """`img` centred on a white square whose side is its longer side / `fill` (a catalog
    framing measured in docs/quality.md and not used: it costs fashion precision)."""
    if fill >= 1.0:
        return img
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = max(1, round(max(w, h) / fill))
    canvas = Image.new("RGB", (side, side), PAD_COLOUR)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass
class QueryCentre:
    """The mean query vector of unlabelled photos, for one catalog vector space."""

    mean: np.ndarray
    stamp: str
    photos: int
    views: tuple[str, ...]
    created: float = field(default_factory=time.time)
    hub_ids: np.ndarray | None = None
    """The catalog images (ids) r was computed for at `calibrate`; None in a centre file
    made before the hubness correction existed (then no correction)."""
    hub_r: np.ndarray | None = None
    """r(c) of each of `hub_ids`: the mean cosine of its `hub_k` nearest calibration photos."""
    hub_k: int | None = None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        hub = {}
        if self.hub_ids is not None and self.hub_r is not None:
            hub = {
                "hub_ids": np.asarray(self.hub_ids, dtype=np.int64),
                "hub_r": np.asarray(self.hub_r, dtype=np.float32),
                "hub_k": np.array(int(self.hub_k or HUB_K)),
            }
        np.savez(
            tmp,
            **hub,
            mean=self.mean.astype(np.float32),
            meta=np.array(
                json.dumps(
                    {
                        "stamp": self.stamp,
                        "photos": self.photos,
                        "views": list(self.views),
                        "created": self.created,
                    }
                )
            ),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> QueryCentre | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                mean = np.asarray(data["mean"], dtype=np.float32)
                hub: dict[str, Any] = {}
                if "hub_r" in data.files:  # older files have none: no correction
                    hub = {
                        "hub_ids": np.asarray(data["hub_ids"], dtype=np.int64),
                        "hub_r": np.asarray(data["hub_r"], dtype=np.float32),
                        "hub_k": int(data["hub_k"]),
                    }
        except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not fatal
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None
        return cls(mean, meta["stamp"], int(meta["photos"]), tuple(meta["views"]),
                   meta["created"], **hub)  # fmt: skip


class QueryPipeline:
    """Shopper photos -> query vectors for one encoder (see the module docstring)."""

    def __init__(
        self,
        base: Any,
        settings: QualitySettings | None = None,
        centre: QueryCentre | None = None,
    ) -> None:
        base = query_encoder(base)  # catalog views are the catalog's, not the queries'
        self.base = base
        self.settings = settings or QualitySettings()
        self.views: tuple[str, ...] = self.settings.query_views or default_views(base)
        frame = self.settings.frame_products
        self.frame: bool = is_tuned(base) if frame is None else frame
        # the smallest share of the image a view keeps: a product shot it would cut is framed
        self.keep = min((int(v[6:]) / 100 for v in self.views if v.startswith("centre")),
                        default=1.0)  # fmt: skip
        self.stamp = base.stamp  # the vector space a centre must have been calibrated in
        self.input_size = base.input_size
        self.draft_size = base.draft_size
        self.dim = base.dim
        self.centre: QueryCentre | None = None
        self.hub: HubCorrection | None = None
        """The hubness correction photo searches apply (lookalike.hubness), or None."""
        if centre is not None:
            self.set_centre(centre)

    def __repr__(self) -> str:
        centred = "centred" if self.centre is not None and self.settings.centre else "raw"
        return f"<QueryPipeline {self.stamp} views={list(self.views)} {centred}>"

    def set_centre(self, centre: QueryCentre | None) -> None:
        """Use this query-domain centre (None: none). Ignored, with a warning, when it
        was calibrated for another vector space (another model or a tuned one)."""
        if centre is not None and (centre.stamp != self.stamp or centre.mean.shape != (self.dim,)):
            log.warning(
                "query centre was calibrated for %s, this catalog uses %s: not used"
                " (run `lookalike calibrate` again)",
                centre.stamp,
                self.stamp,
            )
            centre = None
        elif centre is not None and centre.views != self.views:
            # still the query domain's offset: measured to help the other views nearly as
            # much as their own centre would (docs/quality.md), so it is kept
            log.info(
                "query centre was calibrated with views %s, queries use %s: used as it is"
                " (`lookalike calibrate` again matches them)",
                list(centre.views),
                list(self.views),
            )
        self.centre = centre
        self.hub = None
        beta = float(self.settings.hub_correction)
        if centre is not None and centre.hub_r is not None and self.settings.centre:
            # r was measured on centred photos of a base model: never for a tuned one
            if not is_tuned(self.base) and centre.hub_ids is not None:
                self.hub = HubCorrection.of(centre.hub_ids, centre.hub_r, beta)

    def raw_query_views(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, V, dim) L2-normalised view vectors, before centring."""
        views = self.views
        arrays = [self.base.prepare(view) for img in images for view in self._views(img)]
        if not arrays:
            return np.zeros((0, len(views), self.dim), dtype=np.float32)
        # bounded batches: the network's activations grow with the batch (GBs at 300)
        step = EMBED_BATCH
        vectors = np.concatenate(
            [self.base.embed(np.stack(arrays[i : i + step])) for i in range(0, len(arrays), step)]
        )
        return vectors.reshape(len(images), len(views), -1)

    def _views(self, img: Image.Image) -> list[Image.Image]:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        framed = letterbox_product(rgb, self.keep) if self.frame else None
        if framed is None:
            return [QUERY_VIEWS[v](rgb) for v in self.views]
        # the whole product is the point: no centre crop of a framed product shot
        return [QUERY_VIEWS["full" if v.startswith("centre") else v](framed)
                for v in self.views]  # fmt: skip

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Shopper photos (decoded RGB images) -> float32 (N, dim), L2-normalised."""
        views = self.raw_query_views(images)
        if self.settings.centre and self.centre is not None:
            views = l2_normalise(views - self.centre.mean[None, None, :])
        return l2_normalise(views.sum(axis=1))


def tag_content(img: Image.Image, data: bytes) -> Image.Image:
    """Mark `img` as decoded, whole and unchanged, from `data`, so that a query of it can
    take the content-hash shortcut of `embed_sources` (the API decodes uploads itself)."""
    img.info[SHA_INFO] = hashlib.sha256(data).hexdigest()
    return img


def content_sha256(source: Any) -> str | None:
    """The sha256 of a query's bytes (an upload, or a path's file content), as the catalog
    keeps it for each image; for a decoded image, the hash `tag_content` put on it; None
    otherwise, or for a file that cannot be read (the decoder then reports why)."""
    if isinstance(source, Image.Image):
        sha = source.info.get(SHA_INFO)
        return sha if isinstance(sha, str) else None
    if isinstance(source, bytes | bytearray | memoryview):
        return hashlib.sha256(source).hexdigest()
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            if not path.is_file() or path.stat().st_size > DEFAULT_MAX_BYTES:
                return None
            return sha256_of(path)
        except OSError:
            return None
    return None


def embed_sources(
    pipeline: QueryPipeline,
    queries: Sequence[Any],
    stored: Callable[[str], np.ndarray | None],
    shortcut: set[int] | None = None,
) -> np.ndarray:
    """Query sources (paths, uploaded bytes or decoded images) -> float32 (N, dim).

    A query whose bytes are those of a catalog image (`stored(sha256)` gives that
    image's vector in this vector space) is that vector, unchanged: it matches itself
    first, at score 1, whatever the views or the centre do to photos. The others are
    decoded and embedded by `pipeline`. `shortcut`, when given, gets the positions of the
    queries that took a stored vector."""
    out = np.zeros((len(queries), pipeline.dim), dtype=np.float32)
    todo: list[int] = []
    for i, query in enumerate(queries):
        sha = content_sha256(query)
        vector = stored(sha) if sha is not None else None
        if vector is not None and vector.shape == (pipeline.dim,):
            out[i] = vector  # stored normalised by the encoder: as it is
            if shortcut is not None:
                shortcut.add(i)
        else:
            todo.append(i)
    if todo:
        draft = pipeline.draft_size
        images = [
            (q if isinstance(q, Image.Image) else load_image(q, draft_size=draft)).convert("RGB")
            for q in (queries[i] for i in todo)
        ]
        out[todo] = pipeline.embed_queries(images)
    return out


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


_PIPELINES: dict[tuple[str, int], tuple[Any, tuple, QueryPipeline]] = {}
_PIPELINES_LOCK = threading.Lock()


def query_pipeline(home: str | Path | None, encoder: Any) -> QueryPipeline:
    """The query pipeline for this home and encoder: its `quality.json` settings and
    calibrated centre, rebuilt when either file changes (a stat per call)."""
    if home is None:
        return QueryPipeline(encoder)
    home = Path(home)
    files = (_mtime(home / SETTINGS_FILE), _mtime(home / CENTRE_FILE))
    key = (str(home.resolve()), id(encoder))
    with _PIPELINES_LOCK:
        cached = _PIPELINES.get(key)
        if cached is not None and cached[0] is encoder and cached[1] == files:
            return cached[2]
    pipeline = QueryPipeline(encoder, load_settings(home))
    pipeline.set_centre(QueryCentre.load(home / CENTRE_FILE))
    with _PIPELINES_LOCK:
        if len(_PIPELINES) > 64:  # engines come and go in tests and tools
            _PIPELINES.clear()
        _PIPELINES[key] = (encoder, files, pipeline)
    return pipeline


# --------------------------------------------------------------------------- calibrate


def photo_paths(sources: Iterable[str | Path]) -> list[Path]:
    """Image files from folders (walked), single files, or CSV files with an `image`
    column (paths relative to the CSV; every other column, labels included, is ignored)."""
    out: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            out.extend(p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() == ".csv" and path.is_file():
            import csv

            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if "image" not in (reader.fieldnames or []):
                    raise MetadataError(f"{path}:1: a photo list needs an image column")
                for row in reader:
                    image = (row.get("image") or "").strip()
                    if image:
                        p = Path(image).expanduser()
                        out.append(p if p.is_absolute() else path.resolve().parent / p)
        elif path.is_file():
            out.append(path)
        else:
            raise InputPathError(f"not found: {path}")
    return out


def describe(pipeline: QueryPipeline) -> dict[str, Any]:
    """The query pipeline as a dict, for reports."""
    out: dict[str, Any] = {"query_views": list(pipeline.views)}
    used = pipeline.centre is not None and pipeline.settings.centre
    out["query_centre"] = {"photos": pipeline.centre.photos} if used else None
    hub = pipeline.hub
    out["hub_correction"] = {"beta": hub.beta, "images": int(hub.ids.size)} if hub else None
    return out
