"""Flag types and flags that several commands share.

A type given to ``add_argument`` raises ``argparse.ArgumentTypeError``, so argparse
prints the usage and one error line (exit 2); a check run inside a command raises
``UsageError``, which ``slidr.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from events.errors import UsageError

if TYPE_CHECKING:
    from models.pipeline import TrainOptions

REGISTRY_HELP = "model registry directory (default: $SLIDR_REGISTRY or var/registry)"


def registry_flag(parser: argparse.ArgumentParser, help: str = REGISTRY_HELP) -> None:
    """``--registry DIR``; None when absent, so the settings decide (``registry_path``)."""
    parser.add_argument("--registry", type=Path, default=None, help=help)


def registry_path(args: argparse.Namespace) -> Path:
    """``--registry``, else ``SLIDR_REGISTRY``, else the default."""
    from events.settings import Settings

    return args.registry or Settings.from_env().registry


def comma_separated(text: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``; an empty text is an empty tuple."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_min_coverage(text: str) -> float | dict[str, float]:
    """``0.5`` (every slice) or ``desktop/logged_out=0.8,mobile/logged_out=0.7``."""
    try:
        if "=" not in text:
            value = float(text)
            if not 0 <= value <= 1:
                raise ValueError
            return value
        out = {}
        for part in text.split(","):
            name, _, share = part.partition("=")
            out[name.strip()] = float(share)
            if not 0 <= out[name.strip()] <= 1:
                raise ValueError
        return out
    except ValueError:
        raise UsageError(
            f"--min-coverage: expected a share in [0, 1] or SLICE=SHARE pairs, got {text!r}"
        ) from None


def parse_when(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch seconds or an ISO 8601 time, got {text!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_limit(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` for a field of ``models.guardrails.ModelGuardrailConfig``."""
    from models.guardrails import ModelGuardrailConfig

    name, _, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(ModelGuardrailConfig)}
    name = name.strip().replace("-", "_")
    if name not in known:
        raise argparse.ArgumentTypeError(
            f"unknown guardrail limit {name!r} (known: {', '.join(sorted(known))})"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a number, got {value!r}") from None


def archive_kinds(text: str) -> tuple[str, ...]:
    """Some of ``clicks,purchases,decisions`` (``slidr archive --kinds``)."""
    from stream.archive import KINDS

    kinds = comma_separated(text)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(KINDS)}, got {text!r}")
    return kinds


def model_flags(parser: argparse.ArgumentParser) -> None:
    """``--epochs``, ``--members-per-fold`` and ``--no-target-encoding`` of ``train`` and
    ``retrain``."""
    parser.add_argument("--epochs", type=int, default=12, help="most training epochs (default 12)")
    parser.add_argument(
        "--members-per-fold",
        type=int,
        default=3,
        metavar="N",
        help="networks of the shipped variant per fold, all averaged (default 3)",
    )
    parser.add_argument(
        "--no-target-encoding",
        dest="target_encoding",
        action="store_false",
        help="leave out the target-encoded id buckets (see models/encoding.py)",
    )


def train_options(args: argparse.Namespace, **changes: object) -> TrainOptions:
    """The ``TrainOptions`` of the flags ``train`` and ``retrain`` share, with ``changes``;
    a value ``TrainOptions`` refuses is a ``UsageError`` naming it."""
    from models.pipeline import TrainOptions

    if args.min_coverage is not None:
        changes["min_coverage"] = parse_min_coverage(args.min_coverage)
    try:
        return TrainOptions(
            fpr_budget=args.fpr_budget,
            seed=args.seed,
            max_epochs=args.epochs,
            calibration_method=args.calibration,
            members_per_fold=args.members_per_fold,
            target_encoding=args.target_encoding,
            **changes,  # type: ignore[arg-type]
        )
    except ValueError as exc:  # TrainOptions checks its fields with ValueError
        raise UsageError(str(exc)) from exc
