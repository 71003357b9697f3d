"""`lookalike serve`: index a catalog first when asked, then run the API and page."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import open_engine


def cmd_serve(args: argparse.Namespace) -> int:
    from ..api import serve

    if args.catalog or args.metadata:
        with open_engine(args) as engine:
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


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP API and search page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--catalog", help="index this folder first")
    p.add_argument("--metadata", help="index this metadata file first")
    p.set_defaults(func=cmd_serve)
