"""`lookalike index`, `remove` and `info`: what the catalog holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError
from .common import EXIT_PARTIAL, open_engine


def cmd_index(args: argparse.Namespace) -> int:
    if not args.paths and not args.metadata:
        raise UsageError("give folders/files to index, --metadata FILE, or both")
    with open_engine(args, create=True) as engine:
        report = engine.index(
            args.paths,
            metadata=args.metadata,
            progress=not args.quiet and sys.stderr.isatty() or args.progress,
            prune=not args.no_prune,
            workers=args.workers,
            reject_duplicates=args.reject_duplicates,
            reencode=args.reencode,
        )
        if args.json:
            print(json.dumps(report.to_dict()))
        else:
            print(report.summary())
    return 0 if report.ok else EXIT_PARTIAL


def cmd_remove(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        removed = engine.remove(args.product_ids)
    print(f"removed {len(args.product_ids)} product(s), {removed} image(s)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        info = engine.info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            print(f"{key:>13}: {value}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("index", help="add or update catalog images and metadata")
    p.add_argument("paths", nargs="*", help="image folders (walked recursively) or files")
    p.add_argument("--metadata", help="CSV or JSONL: product_id,image[,title,category,price,...]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-prune", action="store_true", help="keep images gone from their source")
    p.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    p.add_argument(
        "--reject-duplicates",
        action="store_true",
        help="take new images that are the same photo as another product's out again"
        " (they are reported either way)",
    )
    p.add_argument(
        "--reencode",
        action="store_true",
        help="encode every given image again, even unchanged ones (a home indexed on a CPU"
        " without VNNI before INT8 was made exact there: docs/models.md)",
    )
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("remove", help="remove products (out of stock for good, discontinued)")
    p.add_argument("product_ids", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", help="what the catalog holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
