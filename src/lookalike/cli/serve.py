"""`lookalike serve`: index a catalog first when asked, then run the API and page."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from ..errors import UsageError
from ..keptphotos import MIN_TO_CALIBRATE, MIN_TO_TUNE
from .common import open_engine


def cmd_serve(args: argparse.Namespace) -> int:
    from ..api import serve

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be 1-65535, not {args.port}")
    if args.keep_photos is not None and args.keep_photos < 0:
        raise UsageError(f"--keep-photos must be >= 0, not {args.keep_photos}")
    for flag in ("calibrate_every", "tune_every"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, not {value}")
    _check_listen(args.host, args.port)
    with open_engine(args, create=True):
        pass  # the home, its catalog and the store's URI are usable: fail here, not later
    if args.catalog or args.metadata:
        with open_engine(args, create=True) as engine:
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
        keep_photos=args.keep_photos,
        calibrate_every=args.calibrate_every,
        tune_every=args.tune_every,
    )
    return 0


def _check_listen(host: str, port: int) -> None:
    """UsageError unless this process could listen on host:port (in use, no such
    address, a privileged port): said in one line before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}") from None


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP API and search page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--catalog", help="index this folder first")
    p.add_argument("--metadata", help="index this metadata file first")
    p.add_argument(
        "--keep-photos",
        type=int,
        metavar="N",
        help="keep up to N searched photos (the newest) in HOME/query-photos, to tune on"
        " later with `tune --photos HOME/query-photos` (default $LOOKALIKE_KEEP_PHOTOS or 0)",
    )
    p.add_argument(
        "--calibrate-every",
        type=int,
        metavar="M",
        help="with --keep-photos: calibrate the home on the kept photos every M new ones, once"
        f" {MIN_TO_CALIBRATE} are kept (default $LOOKALIKE_CALIBRATE_EVERY or 0: never)",
    )
    p.add_argument(
        "--tune-every",
        type=int,
        metavar="T",
        help="with --keep-photos: tune the model on the kept photos (tune --photos) every T new"
        f" ones, once {MIN_TO_TUNE} are kept (default $LOOKALIKE_TUNE_EVERY or 0: never)",
    )
    p.set_defaults(func=cmd_serve)
