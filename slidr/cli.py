"""The ``slidr`` command line (SPEC §2).

Every subcommand is a small function taking parsed arguments; errors slidr expects
(bad input files, bad settings, failed guardrails) print one clear line and exit
non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

EXIT_ERROR = 2
EXIT_GUARDRAIL = 3


class CliError(RuntimeError):
    """An error to print as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _stage_printer() -> Callable[[str], None]:
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def _registry_path(args: argparse.Namespace) -> Path:
    from events.settings import Settings

    return args.registry or Settings.from_env().registry


# --- offline ---------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from data.simulator import simulate

    try:
        summary = simulate(
            args.out,
            days=args.days,
            seed=args.seed,
            clicks_per_day=args.clicks_per_day,
            new_bot_day=args.new_bot_day,
            start=args.start,
            progress=_stage_printer(),
            world=args.world,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(summary.to_text())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.guardrails import GuardrailFailure
    from models.pipeline import TrainOptions, run_training
    from models.registry import ModelRegistry

    options = TrainOptions(
        fpr_budget=args.fpr_budget,
        robotic_k=args.robotic_k,
        calibration_method=args.calibration,
        seed=args.seed,
        max_epochs=args.epochs,
    )
    if args.min_coverage is not None:
        options = dataclasses.replace(options, min_coverage=parse_min_coverage(args.min_coverage))
    changes: dict = {"weighting": args.weighting, "peers": not args.no_peers}
    if args.architectures is not None:
        changes["architectures"] = tuple(
            a.strip() for a in args.architectures.split(",") if a.strip()
        )
    if args.propensity_features is not None:
        changes["propensity_features"] = tuple(
            f.strip() for f in args.propensity_features.split(",") if f.strip()
        )
    try:
        options = dataclasses.replace(options, **changes)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    registry = ModelRegistry(_registry_path(args))
    try:
        result = run_training(args.data, registry, options, progress=_stage_printer())
    except GuardrailFailure as exc:
        raise CliError(
            f"{exc}; nothing registered, active version unchanged", EXIT_GUARDRAIL
        ) from None
    _print_training_summary(result, registry)
    return 0


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
            name, _, value = part.partition("=")
            out[name.strip()] = float(value)
            if not 0 <= out[name.strip()] <= 1:
                raise ValueError
        return out
    except ValueError:
        raise CliError(
            f"--min-coverage: expected a share in [0, 1] or SLICE=SHARE pairs, got {text!r}"
        ) from None


def _print_training_summary(result: dict, registry) -> None:
    print(f"registered {result['version']} (active: {result['active']})")
    print(f"report: {registry.path_of(result['version']) / 'report.html'}")
    cols = [
        "model",
        "ivr_at_equal_fpr",
        "ivr",
        "fpr",
        "coverage",
        "bot_recall",
        "human_fpr",
        "bot_recall_at_1pct_human_fpr",
    ]
    print("held-out day, equal overall FPR:")
    print("  " + " ".join(f"{c:>14.14}" for c in cols))
    for row in result["baselines"]:
        cells = [row.get(c) for c in cols]
        print(
            "  "
            + " ".join(f"{v:>14.4f}" if isinstance(v, float) else f"{v!s:>14.14}" for v in cells)
        )
    comp = result["global_comparison"]
    print(
        "slice thresholds vs one global threshold: "
        + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in comp.items()
            if not isinstance(v, dict | list)
        )
    )
    print(
        f"architecture shipped: {result['architecture']} (out-of-fold IVR at the budget: "
        + ", ".join(f"{r['model']} {r['oof_ivr_at_budget']:.4f}" for r in result["representations"])
        + ")"
    )
    for row in result["label_poor_slices"]:
        print(
            f"label-poor slice {row['slice']} ({row['clicks']:,} clicks): threshold {row['threshold']:.4f}, {row['why']}"
        )
    for warning in result["proxy_vs_truth"]["warnings"]:
        print(f"warning: proxy and true FPR disagree: {warning}")
    print(f"total training time {result['timings_s']['total']:.1f} s")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from data.dataset import load_dataset
    from models.batch_scoring import evaluate
    from models.registry import ModelRegistry

    model = ModelRegistry(_registry_path(args)).load(args.model)
    data = load_dataset(args.data)
    result = evaluate(model, data, robotic_k=args.robotic_k)
    if data.report.malformed:
        result["malformed_rows"] = dict(data.report.malformed)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from data.dataset import load_dataset
    from models.batch_scoring import score_clicks, write_scores
    from models.registry import ModelRegistry

    if args.out.suffix not in (".jsonl", ".parquet"):
        raise CliError(f"--out must end in .jsonl or .parquet, got {args.out}")
    progress = _stage_printer()
    model = ModelRegistry(_registry_path(args)).load(args.model)
    data = load_dataset(args.data)
    progress(f"loaded {data.report.to_text()}")
    scored = score_clicks(model, data.clicks)
    n = write_scores(scored, args.out)
    progress(
        f"{n:,} clicks scored with {model.version} ({scored.invalid.sum():,} invalid, "
        f"IVR {scored.invalid.mean() if n else 0:.4f}) -> {args.out}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from data.importer import (
        ColumnMapping,
        ImportFailure,
        import_events,
        load_mapping,
        preset_mapping,
    )

    try:
        mapping = preset_mapping(args.preset) if args.preset else ColumnMapping()
        if args.mapping is not None:
            mapping = load_mapping(args.mapping, base=mapping)
        mapping = mapping.merged({key: getattr(args, key) for key in IMPORT_FLAGS}, "flags")
        report = import_events(args.src, args.out, mapping, progress=_stage_printer())
    except ImportFailure as exc:
        raise CliError(str(exc)) from None
    print(report.to_text())
    print(f"report: {Path(args.out) / 'import_report.json'}")
    return 0


# Mapping keys that `slidr import` flags set (user_id by --user, the rest by their name).
IMPORT_FLAGS = (
    "ts",
    "ts_format",
    "user_id",
    "user_separator",
    "ip",
    "click_id",
    "session_id",
    "user_agent",
    "logged_in",
    "device",
    "ad_id",
    "advertiser_id",
    "placement",
    "query",
    "context",
    "purchase_flag",
    "purchase_time",
    "purchase_time_format",
)


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    registry = ModelRegistry(_registry_path(args))
    active = registry.active_version()
    stable = set(registry.stable_versions())
    versions = registry.versions()
    if not versions:
        print(f"no versions in {registry.root} (train one with `slidr train`)")
        return 0
    print(
        f"{'':2}{'version':8} {'registered':20} {'test IVR':>9} {'test FPR':>9} {'data':>16}  status"
    )
    for m in versions:
        overall = m["metrics"]["test"]["overall"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["registered_at"]))
        status = (
            "active" if m["version"] == active else ("stable" if m["version"] in stable else "")
        )
        mark = "* " if m["version"] == active else "  "
        print(
            f"{mark}{m['version']:8} {when:20} {overall['ivr'] or 0:9.4f} {overall['fpr'] or 0:9.4f} "
            f"{m['data']['fingerprint'][:16]:>16}  {status}"
        )
    return 0


# --- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidr",
        description="Real-time detection of robotic ad clicks. Settings also come from "
        "SLIDR_* environment variables (SLIDR_KAFKA_BOOTSTRAP, SLIDR_REDIS_URL, SLIDR_REGISTRY, ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def registry_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            type=Path,
            default=None,
            help="model registry directory (default: $SLIDR_REGISTRY or var/registry)",
        )

    p = sub.add_parser("simulate", help="write synthetic click and purchase traffic")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (clicks.parquet, purchases.parquet)",
    )
    p.add_argument("--days", type=int, default=4, help="days of traffic (default 4)")
    p.add_argument(
        "--seed", type=int, default=7, help="random seed; the same seed gives the same data"
    )
    p.add_argument(
        "--clicks-per-day",
        type=int,
        default=250_000,
        help="approximate clicks per day (default 250000)",
    )
    p.add_argument(
        "--new-bot-day",
        type=int,
        default=None,
        help="introduce a new robot kind ('mimic') from this day index on (drift)",
    )
    p.add_argument(
        "--start", default="2026-11-02", help="first day, YYYY-MM-DD, UTC (default 2026-11-02)"
    )
    p.add_argument(
        "--world",
        choices=("standard", "proxy_lies"),
        default="standard",
        help="traffic model; proxy_lies: purchasers are not a representative sample "
        "of humans (default standard)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "train", help="label, featurize, train, calibrate and register a model version"
    )
    p.add_argument("--data", type=Path, required=True, help="data directory (clicks and purchases)")
    registry_flag(p)
    p.add_argument(
        "--fpr-budget",
        type=float,
        default=0.02,
        help="overall FPR budget B on purchasing clicks (default 0.02)",
    )
    p.add_argument(
        "--min-coverage",
        default=None,
        metavar="SHARE|SLICE=SHARE,...",
        help="minimum robotic coverage: one share for every slice, or per slice "
        "(default desktop/logged_out=0.8,mobile/logged_out=0.7)",
    )
    p.add_argument(
        "--robotic-k",
        type=int,
        default=10,
        help="a session with more than k clicks in an hour is robotic (default 10)",
    )
    p.add_argument(
        "--calibration",
        choices=["quadratic", "empirical"],
        default="empirical",
        help="slice calibration: SLIDR's concave quadratic fit, or exact on the empirical curves",
    )
    p.add_argument("--epochs", type=int, default=8, help="most training epochs (default 8)")
    p.add_argument("--seed", type=int, default=7, help="training seed (default 7)")
    p.add_argument(
        "--architectures",
        default=None,
        metavar="NAME,...",
        help="model variants compared out of fold, the best ships "
        "(default mlp_embeddings,mlp_hashed,dcn_embeddings)",
    )
    p.add_argument(
        "--propensity-features",
        default=None,
        metavar="NAME,...",
        help="inputs switched off because they decide who can be labelled human "
        "(default logged_in, hour and weekday, device one-hots; '' for none)",
    )
    p.add_argument(
        "--weighting",
        choices=["propensity", "slidr"],
        default="propensity",
        help="sample weights: label-balanced per (device, logged-in, hour) cell, or "
        "SLIDR's equal (hour, weekday, logged-in, label) cells",
    )
    p.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the LightGBM peers in the report (they need the dev extra)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics JSON of a model version on a data set")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    registry_flag(p)
    p.add_argument("--model", default=None, help="version to evaluate (default: the active one)")
    p.add_argument(
        "--robotic-k", type=int, default=10, help="robotic-session threshold k (default 10)"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score every click of a data set with a model version")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    registry_flag(p)
    p.add_argument("--model", default=None, help="version to score with (default: the active one)")
    p.add_argument("--out", type=Path, required=True, help="output file, .jsonl or .parquet")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("import", help="import clicks from a CSV or Parquet file as a data set")
    p.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="source file, .csv (optionally compressed) or .parquet",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (clicks.parquet, purchases.parquet)",
    )
    p.add_argument(
        "--preset",
        choices=["talkingdata"],
        default=None,
        help="a built-in mapping: talkingdata = the TalkingData AdTracking layout",
    )
    p.add_argument(
        "--mapping",
        type=Path,
        default=None,
        help="JSON or TOML file of mapping keys (ts, user_id, ip, context, ...); "
        "flags override it, it overrides --preset",
    )
    p.add_argument("--ts", default=None, metavar="COL", help="click time column")
    p.add_argument(
        "--ts-format",
        default=None,
        metavar="FMT",
        help="epoch (seconds, default), epoch_ms or a strptime pattern, read as UTC",
    )
    p.add_argument(
        "--user",
        dest="user_id",
        default=None,
        metavar="COLS",
        help="user id column, or columns joined: ip+device+os",
    )
    p.add_argument(
        "--user-separator", default=None, metavar="SEP", help="joins --user columns (default -)"
    )
    p.add_argument("--ip", default=None, metavar="COL", help="client IP column")
    p.add_argument(
        "--click-id", default=None, metavar="COL", help="click id column (default: r<row number>)"
    )
    for name in (
        "session-id",
        "user-agent",
        "logged-in",
        "device",
        "ad-id",
        "advertiser-id",
        "placement",
        "query",
    ):
        p.add_argument(
            f"--{name}", default=None, metavar="COL", help=f"{name.replace('-', '_')} column"
        )
    p.add_argument(
        "--context",
        default=None,
        metavar="COLS",
        help="columns kept as context.<name> strings: app,channel",
    )
    p.add_argument(
        "--purchase-flag",
        default=None,
        metavar="COL",
        help="column that is 1/true when the click led to a purchase",
    )
    p.add_argument(
        "--purchase-time",
        default=None,
        metavar="COL",
        help="the purchase's time (default: one second after the click)",
    )
    p.add_argument(
        "--purchase-time-format", default=None, metavar="FMT", help="default: --ts-format"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("models", help="list registered model versions")
    registry_flag(p)
    p.set_defaults(func=cmd_models)

    from slidr.commands import register  # the stream and lifecycle commands

    register(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from data.dataset import DatasetError
    from events.settings import SettingsError
    from models.calibration import CalibrationError
    from models.pipeline import TrainingError
    from models.registry import RegistryError
    from models.scoring import ModelFileError

    return (
        CalibrationError,
        DatasetError,
        TrainingError,
        RegistryError,
        ModelFileError,
        SettingsError,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"slidr {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"slidr {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _expected_errors()):
            print(f"slidr {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
