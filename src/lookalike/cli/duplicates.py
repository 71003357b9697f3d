"""`lookalike duplicates`: groups of catalog images that are the same photo (a copy under
another product: re-encoded, resized, cropped, padded, watermarked, mirrored or lightly
recoloured), as text, JSON lines or a contact sheet."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import open_engine, show_progress

SHEET_GROUPS = 60  # groups drawn on a sheet at most
SHEET_WIDTH = 8  # images a row


class _Bars:
    """One tqdm bar a stage on stderr (read, search, verify)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            names = {"read": "reading vectors", "search": "neighbours", "verify": "verifying"}
            bar = self._tqdm(total=total, desc=names.get(stage, stage), unit="img", file=sys.stderr)
            if stage == "verify":
                bar.unit = "pair"
            self._bars[stage] = bar
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def cmd_duplicates(args: argparse.Namespace) -> int:
    progress = _Bars() if show_progress(args) else None
    with open_engine(args) as engine:
        report = engine.duplicates(
            threshold=args.threshold, within_products=args.within_products, progress=progress
        )
    if args.json:
        for group in report.groups:
            print(json.dumps(group.to_dict()))
    else:
        for number, group in enumerate(report.groups, start=1):
            products = group.product_ids
            print(
                f"group {number}: {len(group.images)} images, {len(products)} products,"
                f" score {group.score:.3f}"
            )
            for image in group.images:
                print(f"   {image.product_id}  {image.image}  (image {image.image_id})")
    where = "" if args.within_products else " across products"
    print(
        f"{len(report.groups)} group(s) of duplicates{where} among {report.images:,} images"
        f" ({report.candidates:,} candidate pairs verified, threshold {report.threshold:.3f})",
        file=sys.stderr,
    )
    if args.sheet:
        if report.groups:
            path = _draw_sheet(report.groups[:SHEET_GROUPS], args.sheet)
            print(f"contact sheet: {path}", file=sys.stderr)
        else:
            print("no groups: no contact sheet written", file=sys.stderr)
    return 0


def _draw_sheet(groups, path):
    from pathlib import Path

    from ..sheet import draw_rows

    rows = []
    for number, group in enumerate(groups, start=1):
        first, *rest = group.images[:SHEET_WIDTH]
        label = f"{number}. {first.product_id}"
        items = [(f"{i.product_id}\nimage {i.image_id}", i.image, "black") for i in rest]
        rows.append((f"{label} ({group.score:.3f})", first.image, items))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_rows(rows).save(path)
    return path


def add_commands(sub: Any) -> None:
    from ..duplicates import DEFAULT_THRESHOLD

    p = sub.add_parser(
        "duplicates",
        help="find catalog images that are the same photo under different products",
        description="Groups of catalog images that are the same photo, or a near-identical"
        " copy (re-encoded, resized, cropped, padded, watermarked, mirrored, lightly"
        " recoloured). Candidates come from the stored vectors; each is verified on pixels.",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"verified score a pair needs, -1..1 (default {DEFAULT_THRESHOLD}; higher:"
        " fewer, surer pairs)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line per group")
    p.add_argument("--sheet", help="write the groups side by side to this PNG")
    p.add_argument(
        "--within-products",
        action="store_true",
        help="also report copies among the images of one product",
    )
    p.set_defaults(func=cmd_duplicates)
