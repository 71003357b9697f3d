"""`lookalike eval` (retrieval quality on labelled photos or leave-one-out) and
`lookalike calibrate` (the label-free query centre)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..calibration import calibrate_home, remove_centre
from ..errors import UsageError
from ..evaluate import (
    draw_failures,
    format_report,
    parse_ks,
    report_json,
    run_eval,
    run_leave_one_out,
)
from .common import open_engine, show_progress


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `lookalike eval`: prints the report, returns the exit code."""
    with open_engine(args) as engine:
        if args.leave_one_out:
            if args.failures:
                raise UsageError("--failures needs --queries (labelled photos)")
            ks = parse_ks(args.ks or "10")
            if len(ks) != 1:
                raise UsageError("leave-one-out takes a single K, e.g. -k 10")
            report = run_leave_one_out(engine, args.field, ks[0])
        else:
            report = run_eval(
                engine,
                args.queries,
                parse_ks(args.ks or "1,5,10"),
                progress=show_progress(args),
                text_weight=args.text_weight,
            )
        if args.json:
            print(report_json(report, per_query=args.per_query))
        else:
            print(format_report(report))
        if args.failures:
            path = draw_failures(report, args.failures, engine, limit=args.failures_count)
            if not args.json:
                print(f"worst misses drawn to {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        if args.off:
            if args.photos:
                raise UsageError("--off takes no photos")
            removed = remove_centre(engine.home)
            summary: dict[str, Any] = {"removed": removed}
            text = "query centre removed" if removed else "no query centre was stored"
        else:
            summary = calibrate_home(
                engine.home,
                engine.encoder,
                args.photos,
                limit=args.limit,
                progress=show_progress(args),
                catalog=engine.catalog,
            )
            failed = summary["failed"]
            hub = summary["hub_correction"]
            text = (
                f"query centre from {summary['photos']} photos ({summary['found']} found"
                + (f", {len(failed)} unreadable" if failed else "")
                + (f"; hub scores of {hub['images']} catalog images" if hub else "")
                + f") saved to {summary['path']}"
            )
        print(json.dumps(summary, indent=2) if args.json else text)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="measure retrieval quality (Recall@K, mAP@K, leave-one-out precision@K)",
        description=(
            "Evaluate the catalog in the home folder. Either --queries LABELS.csv (columns"
            " image,product_id and an optional text column: the words searched with the"
            " photo, or alone on a row without image; paths relative to the CSV): Recall@K"
            " and mAP@K of the"
            " labelled product, or --leave-one-out --field FIELD: each catalog image queries"
            " the other products; precision@K = share of the top K sharing its FIELD value."
        ),
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--queries", metavar="LABELS.csv", help="labelled query photos")
    mode.add_argument(
        "--leave-one-out", action="store_true", help="each catalog image queries the rest"
    )
    p.add_argument("--field", default="category", help="leave-one-out: field to match on")
    p.add_argument(
        "-k",
        dest="ks",
        default=None,
        help="K values, comma-separated (default 1,5,10; leave-one-out: 10)",
    )
    p.add_argument(
        "--text-weight",
        type=float,
        default=None,
        metavar="W",
        help="rows with a photo and words: the words' share, 0..1 (default as search)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--per-query", action="store_true", help="with --json: include every query's ranking"
    )
    p.add_argument("--failures", metavar="FILE.png", help="draw the worst misses to this PNG")
    p.add_argument("--failures-count", type=int, default=12, help="rows in --failures")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate",
        help="learn the query-photo centre from unlabelled shopper photos",
        description=(
            "Average the query vectors of unlabelled photos like the ones shoppers will send"
            " (folders, image files, or CSV files with an image column; labels are never"
            " read) and store that centre in the home folder. Every later search subtracts"
            " it from the query vector, which removes what all shop photos share. For a"
            " base model it also stores how near each catalog image is to the photos"
            " (hubness), which photo searches then discount. No re-index is needed. See"
            " docs/quality.md."
        ),
    )
    p.add_argument("photos", nargs="*", help="folders, image files or CSVs with an image column")
    p.add_argument("--limit", type=int, default=1000, help="at most this many photos (sampled)")
    p.add_argument("--off", action="store_true", help="remove the stored centre (and hub scores)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_calibrate)
