"""The `lookalike` command: the only place that parses arguments. One module per command
group registers its subcommands (`add_commands`) and turns their report objects into text
or JSON.

Exit status: 0 success; 1 other error; 2 bad usage or filter; 3 a path that does not
exist or cannot be read; 4 an image that cannot be decoded (or is too large); 5 a
metadata file that cannot be used; 6 unknown product or image id; 7 model error;
8 `index` finished but skipped some files or metadata rows (listed in its summary);
9 another process holds the home's writer lock (past its timeout) or the Milvus Lite
file; 10 the disk cannot take the write (full, over a size limit, read-only).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence

from ..errors import LookalikeError, StorageError
from . import catalog, duplicates, evaluate, search, serve, tune
from .common import EXIT_PARTIAL

__all__ = ["EXIT_PARTIAL", "build_parser", "main"]

COMMAND_GROUPS = (catalog, search, duplicates, serve, evaluate, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Visual product search: find the catalog products that look like a photo.",
        epilog="Exit status: 0 ok, 2 usage, 3 path, 4 image, 5 metadata, 6 unknown id, "
        "7 model, 8 index finished with skipped files/rows, 9 home or store busy, "
        "10 disk full.",
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
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LookalikeError as exc:
        print(f"lookalike: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, sqlite3.OperationalError) as exc:
        storage = StorageError.from_os_error(exc)
        if storage is None:
            raise
        print(f"lookalike: {storage}", file=sys.stderr)
        return storage.exit_code
    except KeyboardInterrupt:
        print("lookalike: interrupted (the next `index` run resumes)", file=sys.stderr)
        return 130
