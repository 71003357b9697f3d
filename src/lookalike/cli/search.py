"""`lookalike search`: ranked products for query images, as text, JSON or a contact sheet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .common import add_filter_options, filters_from_args, open_engine


def cmd_search(args: argparse.Namespace) -> int:
    filters = filters_from_args(args)
    status = 0
    sheet_rows = []
    with open_engine(args) as engine:
        for query in args.images:
            try:
                results = engine.search(
                    [query], k=args.k, filters=filters, min_score=args.min_score
                )[0]
            except ImageError as exc:
                print(f"lookalike: {query}: {exc}", file=sys.stderr)
                status = exc.exit_code
                continue
            except FileNotFoundError:
                print(f"lookalike: {query}: no such file", file=sys.stderr)
                status = 3
                continue
            if args.json:
                print(json.dumps({"query": query, "results": [_json_result(r) for r in results]}))
            else:
                _print_results(query, results)
            sheet_rows.append((Path(query).name, query, results))
        if args.sheet and sheet_rows:
            from ..sheet import draw_results_sheet

            path = draw_results_sheet(sheet_rows, args.sheet)
            print(f"contact sheet: {path}", file=sys.stderr)
    return status


def _json_result(result) -> dict:
    data = result.to_dict()
    return {
        key: data[key]
        for key in ("product_id", "score", "image", "title", "category", "price", "in_stock")
    } | {"image_id": data["image_id"]}


def _print_results(query: str, results) -> None:
    print(query)
    if not results:
        print("   (no matching products)")
    for rank, r in enumerate(results, start=1):
        parts = [f"{rank:>4}. {r.score:.4f}  {r.product_id}"]
        if r.title:
            parts.append(r.title)
        if r.category:
            parts.append(f"[{r.category}]")
        if r.price is not None:
            parts.append(f"{r.price:.2f}")
        if not r.in_stock:
            parts.append("(out of stock)")
        parts.append(r.image)
        print("  ".join(parts))


def add_commands(sub: Any) -> None:
    p = sub.add_parser("search", help="find products that look like the given images")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=int, default=10, help="products per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON line per query")
    p.add_argument("--sheet", help="write query + results with scores to this PNG")
    p.add_argument("--min-score", type=float, default=None, help="drop results below this cosine")
    add_filter_options(p)
    p.set_defaults(func=cmd_search)
