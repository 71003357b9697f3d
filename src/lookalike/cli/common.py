"""What every command shares: opening the home's engine from the global options, the
filter options, and the exit codes that are the CLI's own."""

from __future__ import annotations

import argparse
import sys

from ..catalog import Filters
from ..errors import UsageError

EXIT_PARTIAL = 8
"""`index` finished but skipped some files or metadata rows (listed in its summary)."""


def open_engine(args: argparse.Namespace, create: bool = False):
    """The engine for the global options (--home, --model, --vector-store, --memory-budget).
    Only `create` (index, serve) makes a home that does not exist yet: for the others a
    mistyped --home is an error, not a new empty catalog."""
    from ..engine import Engine
    from ..vectors import parse_memory_budget

    return Engine(
        args.home,
        create=create,
        model=args.model,
        vector_store=args.vector_store,
        memory_budget=parse_memory_budget(args.memory_budget),
        on_wait=lambda message: print(f"lookalike: {message}", file=sys.stderr, flush=True),
    )


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: when it is a terminal and --quiet was not given."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def add_filter_options(parser: argparse.ArgumentParser) -> None:
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
