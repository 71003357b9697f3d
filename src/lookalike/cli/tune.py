"""`lookalike tune`: learn from labelled shop photos; --status, --use, --reset."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError
from ..models import describe_active
from ..tuning import METHOD_DEFAULTS, TuneSettings, train_tuned_model, use_model
from .common import open_engine


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help="learn from labelled shop photos (image,product_id CSV); --reset to undo",
        description=(
            "Adapt the model to labelled photos of catalog products (CSV with"
            " image,product_id; image paths relative to the CSV) and the catalog images:"
            " fine-tune the network's last blocks plus a head (--method finetune, the"
            " default for the bundled models) or learn a head on frozen features (--method"
            " head, any model). The catalog is then re-embedded: searches use"
            " the tuned model at once. Rows naming unknown products are reported and"
            " skipped. --validate FILE prints Recall@1/@5 before and after (never used for"
            " training). --reset goes back to the base model; --use VERSION re-activates"
            " a saved one; --status shows the active model."
        ),
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--labels", metavar="PHOTOS.csv", help="labelled photos to learn from")
    mode.add_argument("--reset", action="store_true", help="go back to the base model")
    mode.add_argument("--use", metavar="VERSION", help="activate a saved tuned model")
    mode.add_argument("--status", action="store_true", help="show the active model")
    p.add_argument("--validate", metavar="HELD.csv", help="held-out labelled photos to score")
    p.add_argument(
        "--method",
        choices=["auto", "finetune", "head"],
        default="auto",
        help="finetune: the network's last blocks and a head (bundled models; the default);"
        " head: a head on frozen features (any model, faster, less accurate)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=", ".join(f"default {v['epochs']} for {k}" for k, v in METHOD_DEFAULTS.items()),
    )
    p.add_argument("--dim", type=int, default=TuneSettings.dim, help="tuned vector length")
    p.add_argument("--seed", type=int, default=TuneSettings.seed)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False) and not args.json
    with open_engine(args) as engine:
        if args.status:
            out = describe_active(engine.home, engine.encoder)
            print(json.dumps(out) if args.json else _format_status(out))
            return 0
        if args.reset or args.use:
            if args.validate:
                raise UsageError("--validate goes with --labels")
            counts = use_model(engine, None if args.reset else args.use, progress=progress)
            out = {**describe_active(engine.home, engine.encoder), "reembedded": counts}
            if args.json:
                print(json.dumps(out))
            else:
                what = "base model" if args.reset else f"tuned model {args.use}"
                print(
                    f"now using the {what} ({engine.encoder.stamp});"
                    f" re-embedded {counts['from_cache']} catalog images from cached features"
                    f" and {counts['from_files']} from their files"
                )
            return 0
        if (args.epochs is not None and args.epochs < 1) or args.dim < 2:
            raise UsageError("--epochs must be >= 1 and --dim >= 2")
        settings = TuneSettings(method=args.method, epochs=args.epochs, dim=args.dim,
                                seed=args.seed)  # fmt: skip
        report = train_tuned_model(
            engine,
            args.labels,
            args.validate,
            progress=progress,
            settings=settings,
            log=_stderr if progress else None,
        )
        print(json.dumps(report.to_dict()) if args.json else report.summary())
        return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _format_status(out: dict[str, Any]) -> str:
    if out["model"] == "base":
        return f"base model ({out['stamp']}); {out['tuned_versions']} tuned model(s) saved"
    text = f"tuned model {out['version']}, {out.get('method', 'head')} ({out['stamp']})"
    v = out.get("validation")
    if v:
        text += (
            f"; validation Recall@1 {v['before']['recall@1']:.3f} ->"
            f" {v['after']['recall@1']:.3f}, Recall@5 {v['before']['recall@5']:.3f} ->"
            f" {v['after']['recall@5']:.3f}"
        )
    return text
