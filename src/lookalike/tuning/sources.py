"""What one `lookalike tune` run learns from, read and checked before anything is
computed: labelled photos (`--labels`), unlabelled shopper photos (`--photos`), the
catalog's own metadata (`--field`), alone or together, and the catalog itself.

Unlabelled photos are read with lookalike.query.photo_paths, which reads only a CSV's
`image` column: no label can reach training through `--photos`. They are taken in order
of their content hash (so neither the order nor the names of the files matter), and a
photo that is also in `--labels` keeps its label.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..fsutil import sha256_of
from .features import catalog_images
from .weak import FieldLabels, field_labels


@dataclass
class Inputs:
    """The rows a run learns from: labelled photos of catalog products, unlabelled
    photos, the catalog's images (and their field values), the validation photos."""

    labels_path: Path | None
    products: list[str]  # every catalog product id, sorted: the class index
    pindex: dict[str, int]
    cat_rows: list[tuple[int, str, str, str]]  # (image_id, product_id, source, sha256)
    known: list[tuple[Path, str]]  # labelled photos of catalog products
    skipped_unknown: list[str]
    validate_csv: str | os.PathLike | None
    val_rows: list[tuple[Path, str]]
    val_unknown: int
    unlabelled: list[tuple[Path, str]] = field(default_factory=list)  # (path, sha256)
    photo_sources: list[str] = field(default_factory=list)
    field: FieldLabels | None = None

    def sources(self) -> list[str]:
        """Which sources the run uses, in words for model.json: labels, photos, field."""
        out = []
        if self.labels_path is not None:
            out.append("labels")
        if self.unlabelled:
            out.append("photos")
        if self.field is not None:
            out.append("field")
        return out


def read_inputs(
    catalog: Any,
    labels_csv: str | os.PathLike | None,
    validate_csv: str | os.PathLike | None,
    photos: Sequence[str | os.PathLike] | None = None,
    field_name: str | None = None,
) -> Inputs:
    """Read and check every source; fails before any feature is computed."""
    if labels_csv is None and not photos and field_name is None:
        raise UsageError("tune needs something to learn from: --labels, --photos or --field")
    cat_rows = catalog_images(catalog)
    if not cat_rows:
        raise UsageError("the catalog has no images: run `lookalike index` before `tune`")
    products = sorted({pid for _, pid, _, _ in cat_rows})
    pindex = {pid: i for i, pid in enumerate(products)}

    labels_path = None if labels_csv is None else Path(labels_csv).expanduser()
    known: list[tuple[Path, str]] = []
    skipped_unknown: list[str] = []
    if labels_path is not None:
        rows = _read_label_file(labels_path)
        skipped_unknown = [
            f"{labels_path}:{line}: product {pid!r} is not in the catalog"
            for _, pid, line in rows
            if pid not in pindex
        ]
        known = [(path, pid) for path, pid, _ in rows if pid in pindex]
        if not known:
            raise UsageError(
                f"{labels_path}: none of its {len(rows)} rows names a product in the catalog"
            )
    val_rows: list[tuple[Path, str]] = []
    val_unknown = 0
    if validate_csv is not None:
        for path, pid, _ in _read_label_file(Path(validate_csv).expanduser()):
            if pid in pindex:
                val_rows.append((path, pid))
            else:
                val_unknown += 1
    inputs = Inputs(labels_path, products, pindex, cat_rows, known, skipped_unknown,
                    validate_csv, val_rows, val_unknown)  # fmt: skip
    if photos:
        inputs.photo_sources = [str(p) for p in photos]
        inputs.unlabelled = _unlabelled(photos, known)
        if not inputs.unlabelled:
            raise UsageError("--photos: no image files found (beyond those in --labels)")
    if field_name is not None:
        inputs.field = field_labels(catalog, [pid for _, pid, _, _ in cat_rows], field_name)
    return inputs


def _unlabelled(
    photos: Sequence[str | os.PathLike], known: list[tuple[Path, str]]
) -> list[tuple[Path, str]]:
    """Distinct photo files by content, in order of their sha256, minus labelled ones."""
    from ..query import photo_paths

    labelled = {sha256_of(p) for p, _ in known}
    by_sha: dict[str, Path] = {}
    for path in photo_paths([str(p) for p in photos]):
        try:
            sha = sha256_of(path)
        except OSError:
            continue  # unreadable: reported nowhere else, skipped like a broken image
        if sha not in labelled:
            by_sha.setdefault(sha, path)
    return [(by_sha[sha], sha) for sha in sorted(by_sha)]


def _read_label_file(path: Path) -> list[tuple[Path, str, int]]:
    from ..evaluate import read_labels

    return [(q.image, q.product_id, q.line) for q in read_labels(path)]
