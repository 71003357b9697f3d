"""`lookalike search`: ranked products for query images, words (`--text`) or both, as
text, JSON or a contact sheet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from ..fusion import TEXT_WEIGHT
from .common import add_filter_options, filters_from_args, open_engine


def cmd_search(args: argparse.Namespace) -> int:
    filters = filters_from_args(args)
    text = args.text
    if not args.images and not (text and text.strip()):
        raise UsageError("give query images, words (--text WORDS), or both")
    status = 0
    sheet_rows = []
    with open_engine(args) as engine:
        queries: list[str | None] = list(args.images) or [None]
        for query in queries:
            try:
                report = engine.find(
                    [query] if query is not None else [],
                    text=text,
                    k=args.k,
                    filters=filters,
                    min_score=args.min_score,
                    text_weight=args.text_weight,
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
                print(json.dumps(_json_report(query, text, report)))
            else:
                _print_results(query, text, report)
            label = Path(query).name if query is not None else f'"{text}"'
            if query is not None and text:
                label += f' + "{text}"'
            sheet_rows.append((label, query, report.results))
        if args.sheet and sheet_rows:
            from ..sheet import draw_results_sheet

            path = draw_results_sheet(sheet_rows, args.sheet)
            print(f"contact sheet: {path}", file=sys.stderr)
    return status


def _json_report(query: str | None, text: str | None, report) -> dict:
    out: dict[str, Any] = {"query": query}
    if text is not None:
        out["text"] = text
    out["results"] = [_json_result(r) for r in report.results]
    if report.words:
        out["words"] = report.words
        out["unmatched"] = report.unmatched
    if report.text_weight is not None:
        out["text_weight"] = report.text_weight
    if report.note:
        out["note"] = report.note
    return out


def _json_result(result) -> dict:
    data = result.to_dict()
    out = {
        key: data[key]
        for key in ("product_id", "score", "image", "title", "category", "price", "in_stock")
    } | {"image_id": data["image_id"]}
    out["visual"] = data.get("visual", data["score"])
    out["text"] = data.get("text")
    out["combined"] = data.get("combined", data["score"])
    if "matched" in data:
        out["matched"] = data["matched"]
    return out


def _print_results(query: str | None, text: str | None, report) -> None:
    head = query if query is not None else ""
    if text:
        head = f'{head} + "{text}"' if head else f'"{text}"'
    print(head)
    if report.note:
        print(f"   note: {report.note}")
    elif report.unmatched:
        print(f"   no result has: {' '.join(report.unmatched)}")
    if not report.results:
        print("   (no matching products)")
    for rank, r in enumerate(report.results, start=1):
        parts = [f"{rank:>4}. {r.score:.4f}  {r.product_id}"]
        if r.title:
            parts.append(r.title)
        if r.category:
            parts.append(f"[{r.category}]")
        if r.price is not None:
            parts.append(f"{r.price:.2f}")
        if not r.in_stock:
            parts.append("(out of stock)")
        if r.matched:
            parts.append(f"(words: {' '.join(r.matched)})")
        parts.append(r.image)
        print("  ".join(parts))


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="find products that look like the given images, match words, or both",
        description="Photo, words or both: `search IMAGE...`, `search --text WORDS`,"
        " `search IMAGE... --text WORDS` (the photo's results refined by the words).",
    )
    p.add_argument("images", nargs="*", help="query image files")
    p.add_argument(
        "--text", metavar="WORDS", help="words to search the titles, categories and attributes"
    )
    p.add_argument(
        "--text-weight",
        type=float,
        default=None,
        metavar="W",
        help=f"photo and words: the words' share, 0..1 (default {TEXT_WEIGHT})",
    )
    p.add_argument("-k", type=int, default=10, help="products per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON line per query")
    p.add_argument("--sheet", help="write query + results with scores to this PNG")
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="drop results below this score (cosine; with words, the combined score)",
    )
    add_filter_options(p)
    p.set_defaults(func=cmd_search)
