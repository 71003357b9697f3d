"""The `lookalike` command.

Exit status: 0 success; 1 other error; 2 bad usage or filter; 3 a path that does not
exist or cannot be read; 4 an image that cannot be decoded (or is too large); 5 a
metadata file that cannot be used; 6 unknown product or image id; 7 model error;
8 `index` finished but skipped some files or metadata rows (listed in its summary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .catalog import Filters
from .errors import LookalikeError, UsageError

EXIT_PARTIAL = 8


def _engine(args: argparse.Namespace):
    from .engine import Engine
    from .vectors import parse_memory_budget

    return Engine(
        args.home,
        model=args.model,
        vector_store=args.vector_store,
        memory_budget=parse_memory_budget(args.memory_budget),
    )


def _add_filter_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters")
    group.add_argument("--category", action="append", help="only this category (repeatable)")
    group.add_argument("--price-min", type=float, help="lowest price")
    group.add_argument("--price-max", type=float, help="highest price")
    stock = group.add_mutually_exclusive_group()
    stock.add_argument("--in-stock", dest="in_stock", action="store_const", const=True)
    stock.add_argument("--out-of-stock", dest="in_stock", action="store_const", const=False)
    group.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="attribute equality, e.g. --where colour=Black (repeatable)",
    )


def filters_from_args(args: argparse.Namespace) -> Filters:
    attrs = {}
    for item in args.where:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--where takes NAME=VALUE, got {item!r}")
        attrs[name.strip()] = value.strip()
    filters = Filters(
        category=args.category,
        price_min=args.price_min,
        price_max=args.price_max,
        in_stock=args.in_stock,
        attrs=attrs,
    )
    filters.validate()
    return filters


def cmd_index(args: argparse.Namespace) -> int:
    if not args.paths and not args.metadata:
        raise UsageError("give folders/files to index, --metadata FILE, or both")
    with _engine(args) as engine:
        report = engine.index(
            args.paths,
            metadata=args.metadata,
            progress=not args.quiet and sys.stderr.isatty() or args.progress,
            prune=not args.no_prune,
            workers=args.workers,
        )
        if args.json:
            print(json.dumps(report.to_dict()))
        else:
            print(report.summary())
    return 0 if report.ok else EXIT_PARTIAL


def cmd_search(args: argparse.Namespace) -> int:
    from .errors import ImageError

    filters = filters_from_args(args)
    status = 0
    sheet_rows = []
    with _engine(args) as engine:
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
            from .sheet import draw_results_sheet

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


def cmd_remove(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        removed = engine.remove(args.product_ids)
    print(f"removed {len(args.product_ids)} product(s), {removed} image(s)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        info = engine.info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            print(f"{key:>13}: {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .api import serve

    if args.catalog or args.metadata:
        with _engine(args) as engine:
            report = engine.index(
                [args.catalog] if args.catalog else [], metadata=args.metadata, progress=True
            )
            print(report.summary(), file=sys.stderr)
    serve(
        home=args.home,
        host=args.host,
        port=args.port,
        model=args.model,
        vector_store=args.vector_store,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Visual product search: find the catalog products that look like a photo.",
        epilog="Exit status: 0 ok, 2 usage, 3 path, 4 image, 5 metadata, 6 unknown id, "
        "7 model, 8 index finished with skipped files/rows.",
    )
    parser.add_argument(
        "--home",
        default=os.environ.get("LOOKALIKE_HOME") or "lookalike-home",
        help="folder for the catalog, vectors and models "
        "(default: $LOOKALIKE_HOME, else ./lookalike-home)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="encoder: efficientnet-lite2-int8 (default), efficientnet-lite2 (float32),"
        " efficientnet-lite0[-int8], or onnx:PATH[?size=...&mean=...&std=...];"
        " the catalog remembers it",
    )
    parser.add_argument(
        "--vector-store",
        default=None,
        help="faiss (default), milvus://HOST:PORT, or a Milvus Lite FILE.db",
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="RAM for the FAISS index, e.g. 2G (default: see docs/scale.md)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("index", help="add or update catalog images and metadata")
    p.add_argument("paths", nargs="*", help="image folders (walked recursively) or files")
    p.add_argument("--metadata", help="CSV or JSONL: product_id,image[,title,category,price,...]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-prune", action="store_true", help="keep images gone from their source")
    p.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find products that look like the given images")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=int, default=10, help="products per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON line per query")
    p.add_argument("--sheet", help="write query + results with scores to this PNG")
    p.add_argument("--min-score", type=float, default=None, help="drop results below this cosine")
    _add_filter_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("remove", help="remove products (out of stock for good, discontinued)")
    p.add_argument("product_ids", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", help="what the catalog holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="run the HTTP API and search page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--catalog", help="index this folder first")
    p.add_argument("--metadata", help="index this metadata file first")
    p.set_defaults(func=cmd_serve)

    for module, hook in (("evaluate", "add_eval_command"), ("tune", "add_tune_command")):
        try:
            mod = __import__(f"lookalike.{module}", fromlist=[hook])
        except ImportError:
            continue
        if hasattr(mod, hook):
            getattr(mod, hook)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LookalikeError as exc:
        print(f"lookalike: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lookalike: interrupted (the next `index` run resumes)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
