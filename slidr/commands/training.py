"""``slidr train``, ``evaluate``, ``score`` and ``models``: the offline model commands."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from events.errors import EXIT_GUARDRAIL, SlidrError, UsageError
from slidr.commands.console import stage_printer
from slidr.commands.flags import (
    comma_separated,
    model_flags,
    registry_flag,
    registry_path,
    train_options,
)


def cmd_train(args: argparse.Namespace) -> int:
    from models.guardrails import GuardrailFailure
    from models.pipeline import run_training
    from models.registry import ModelRegistry

    changes: dict = {
        "robotic_k": args.robotic_k,
        "weighting": args.weighting,
        "peers": not args.no_peers,
    }
    if args.architectures is not None:
        changes["architectures"] = comma_separated(args.architectures)
    if args.propensity_features is not None:
        changes["propensity_features"] = comma_separated(args.propensity_features)
    options = train_options(args, **changes)
    registry = ModelRegistry(registry_path(args))
    try:
        result = run_training(args.data, registry, options, progress=stage_printer())
    except GuardrailFailure as exc:
        raise SlidrError(
            f"{exc}; nothing registered, active version unchanged", EXIT_GUARDRAIL
        ) from exc
    print_training_summary(result, registry)
    return 0


def print_training_summary(result: dict, registry) -> None:
    """What ``slidr train`` prints: the version, the baselines and the slice thresholds."""
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
            f"label-poor slice {row['slice']} ({row['clicks']:,} clicks): "
            f"threshold {row['threshold']:.4f}, {row['why']}"
        )
    for warning in result["proxy_vs_truth"]["warnings"]:
        print(f"warning: proxy and true FPR disagree: {warning}")
    print(f"total training time {result['timings_s']['total']:.1f} s")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from data.dataset import load_dataset
    from models.batch_scoring import evaluate
    from models.registry import ModelRegistry

    model = ModelRegistry(registry_path(args)).load(args.model)
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
        raise UsageError(f"--out must end in .jsonl or .parquet, got {args.out}")
    progress = stage_printer()
    model = ModelRegistry(registry_path(args)).load(args.model)
    data = load_dataset(args.data)
    progress(f"loaded {data.report.to_text()}")
    scored = score_clicks(model, data.clicks)
    n = write_scores(scored, args.out)
    progress(
        f"{n:,} clicks scored with {model.version} ({scored.invalid.sum():,} invalid, "
        f"IVR {scored.invalid.mean() if n else 0:.4f}) -> {args.out}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    registry = ModelRegistry(registry_path(args))
    active = registry.active_version()
    stable = set(registry.stable_versions())
    versions = registry.versions()
    if not versions:
        print(f"no versions in {registry.root} (train one with `slidr train`)")
        return 0
    print(
        f"{'':2}{'version':8} {'registered':20} {'test IVR':>9} {'test FPR':>9} "
        f"{'data':>16}  status"
    )
    for m in versions:
        # A manifest written by hand (not by `slidr train`) may lack metrics or data.
        overall = m.get("metrics", {}).get("test", {}).get("overall", {})
        fingerprint = (m.get("data") or {}).get("fingerprint") or "-"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["registered_at"]))
        status = (
            "active" if m["version"] == active else ("stable" if m["version"] in stable else "")
        )
        mark = "* " if m["version"] == active else "  "
        print(
            f"{mark}{m['version']:8} {when:20} {overall.get('ivr') or 0:9.4f} "
            f"{overall.get('fpr') or 0:9.4f} {fingerprint[:16]:>16}  {status}"
        )
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--seed", type=int, default=7, help="training seed (default 7)")
    p.add_argument(
        "--architectures",
        default=None,
        metavar="NAME,...",
        help="model variants compared out of fold; the best ships, the first unless another "
        "is clearly better (default dcn_embeddings,mlp_embeddings,mlp_hashed)",
    )
    model_flags(p)
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


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics JSON of a model version on a data set")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    registry_flag(p)
    p.add_argument("--model", default=None, help="version to evaluate (default: the active one)")
    p.add_argument(
        "--robotic-k", type=int, default=10, help="robotic-session threshold k (default 10)"
    )
    p.set_defaults(func=cmd_evaluate)


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score every click of a data set with a model version")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    registry_flag(p)
    p.add_argument("--model", default=None, help="version to score with (default: the active one)")
    p.add_argument("--out", type=Path, required=True, help="output file, .jsonl or .parquet")
    p.set_defaults(func=cmd_score)


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model versions")
    registry_flag(p)
    p.set_defaults(func=cmd_models)


COMMANDS = {
    "train": add_train,
    "evaluate": add_evaluate,
    "score": add_score,
    "models": add_models,
}
