"""Benchmark on worlds where the purchase proxy lies: slidr against gradient-boosted trees.

``python -m models.bench_proxy_lies [--seeds 1-8] [--days 5] [--clicks-per-day 40000]
[--out JSON]`` (``make bench-proxy-lies``) simulates one ``--world proxy_lies`` data set
per seed (``data.simulator``: purchasers are not a representative sample of humans),
trains on it with the default ``TrainOptions`` and reads, on the held-out last day:

- bot recall at 1% true human FPR of slidr's shipped model, of LightGBM on the same
  inputs, weak labels and weights (``lightgbm_same_inputs``) and on every input;
- the true human FPR of slidr's calibrated verdicts, overall and in the worst slice with
  at least ``MIN_SLICE_HUMANS`` humans;
- recall per robot kind (``recall_by_kind`` of the training result).

Issue 11's target per seed: the human FPR within twice the budget overall and in every
such slice, and recall above LightGBM on the same inputs. One seed cannot settle it: the
figure is the tail of a few hundred humans, and on 5 days of 40k clicks it moves by up to
0.09 from a network's initial weights alone, so the summary gives means and the seeds on
which each part holds. Needs the ``train`` and ``dev`` extras (torch, lightgbm).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data.simulator import simulate
from models.bench_cli import parse_seeds, progress_to_stderr, write_figures
from models.pipeline import TrainOptions, run_training
from models.registry import ModelRegistry

Progress = Callable[[str], None]

DEFAULT_SEEDS = [1, 2, 3, 4, 5, 6, 7, 8]
DEFAULT_DAYS = 5
DEFAULT_CLICKS_PER_DAY = 40_000
# A slice's human FPR is judged where the held-out day has at least this many humans (the
# nearly-all-robot slice has about 20): below it one click is not a rate.
MIN_SLICE_HUMANS = 10
PEER = "lightgbm_same_inputs"
MODELS = ("mlp", PEER, "lightgbm_all_inputs", "logistic_regression", "velocity_heuristic")


def _tagged(progress: Progress, seed: int) -> Progress:
    """``progress`` with each training message marked with its seed."""
    return lambda message: progress(f"  [{seed}] {message}")


def seed_row(seed: int, result: Mapping[str, Any], budget: float) -> dict[str, Any]:
    """The figures of one seed's training ``result`` (``run_training``'s summary)."""
    recall = {row["model"]: row.get("bot_recall_at_1pct_human_fpr") for row in result["baselines"]}
    test = result["metrics"]["test"]
    judged = {
        name: figures
        for name, figures in test["slices"].items()
        if figures["clicks"] - figures["bot_clicks"] >= MIN_SLICE_HUMANS
    }
    worst = max(judged, key=lambda name: judged[name]["human_fpr"] or 0.0, default=None)
    overall_fpr = test["overall"]["human_fpr"]
    worst_fpr = None if worst is None else judged[worst]["human_fpr"]
    ours, peer = recall.get("mlp"), recall.get(PEER)
    return {
        "seed": seed,
        "architecture": result["architecture"],
        "recall": {name: recall.get(name) for name in MODELS},
        "human_fpr": overall_fpr,
        "worst_slice": worst,
        "worst_slice_humans": None
        if worst is None
        else judged[worst]["clicks"] - judged[worst]["bot_clicks"],
        "worst_slice_human_fpr": worst_fpr,
        "fpr_target_met": overall_fpr is not None
        and overall_fpr <= 2 * budget
        and all((f["human_fpr"] or 0.0) <= 2 * budget for f in judged.values()),
        "recall_target_met": ours is not None and peer is not None and ours > peer,
        "recall_by_kind": {
            row["kind"]: {"bots": row["bots"], "mlp": row.get("mlp"), PEER: row.get(PEER)}
            for row in result.get("recall_by_kind", [])
        },
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the seeds, the seeds meeting each target, and recall by kind."""
    seeds = [row["seed"] for row in rows]

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    kinds = sorted({k for row in rows for k in row["recall_by_kind"]})
    by_kind = {}
    for kind in kinds:
        pairs = [
            (row["seed"], row["recall_by_kind"][kind]["mlp"], row["recall_by_kind"][kind][PEER])
            for row in rows
            if kind in row["recall_by_kind"]
        ]
        by_kind[kind] = {
            "mlp": mean([a for _, a, _ in pairs]),
            PEER: mean([b for _, _, b in pairs]),
            "mlp_ahead_on_seeds": [
                s for s, a, b in pairs if a is not None and b is not None and a > b
            ],
        }
    return {
        "seeds": seeds,
        "mean_recall": {name: mean([row["recall"][name] for row in rows]) for name in MODELS},
        "recall_target_met_on_seeds": [row["seed"] for row in rows if row["recall_target_met"]],
        "fpr_target_met_on_seeds": [row["seed"] for row in rows if row["fpr_target_met"]],
        "both_met_on_seeds": [
            row["seed"] for row in rows if row["recall_target_met"] and row["fpr_target_met"]
        ],
        "recall_by_kind": by_kind,
    }


def run(
    seeds: list[int],
    days: int = DEFAULT_DAYS,
    clicks_per_day: int = DEFAULT_CLICKS_PER_DAY,
    workdir: Path | None = None,
    progress: Progress = progress_to_stderr,
) -> dict[str, Any]:
    """Simulate, train and read the figures of every seed (see the module docstring)."""
    options = TrainOptions()
    rows = []
    with tempfile.TemporaryDirectory(prefix="slidr-proxy-lies-") as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        for i, seed in enumerate(seeds, start=1):
            started = time.perf_counter()
            progress(f"seed {seed} ({i} of {len(seeds)}): simulating {days} days")
            data = root / f"seed-{seed}" / "data"
            simulate(data, days=days, seed=seed, clicks_per_day=clicks_per_day, world="proxy_lies")
            registry = ModelRegistry(root / f"seed-{seed}" / "registry")
            result = run_training(data, registry, options, progress=_tagged(progress, seed))
            rows.append(seed_row(seed, result, options.fpr_budget))
            progress(
                f"seed {seed}: done in {time.perf_counter() - started:.0f} s; "
                f"recall slidr {rows[-1]['recall']['mlp']:.3f}, "
                f"{PEER} {rows[-1]['recall'][PEER]:.3f}"
            )
    return {
        "world": "proxy_lies",
        "days": days,
        "clicks_per_day": clicks_per_day,
        "fpr_budget": options.fpr_budget,
        "seeds": rows,
        "summary": summarize(rows),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_text(result: Mapping[str, Any]) -> str:
    rows, summary = result["seeds"], result["summary"]
    budget = result["fpr_budget"]
    lines = [
        f"bench-proxy-lies: {result['days']} days x {result['clicks_per_day']:,} clicks, "
        f"seeds {', '.join(str(s) for s in summary['seeds'])}; held-out last day",
        f"  bot recall at 1% true human FPR; true human FPR of slidr's verdicts (budget "
        f"{budget:.0%}, target <= {2 * budget:.0%} overall and in every slice with "
        f">= {MIN_SLICE_HUMANS} humans)",
        f"  {'seed':>4} {'slidr':>6} {'lgb same':>8} {'lgb all':>7} {'LR':>6} {'velocity':>8}"
        f" {'FPR':>6} {'worst slice':>30} {'targets':>10}",
    ]
    for row in rows:
        r = row["recall"]
        worst = (
            "-"
            if row["worst_slice"] is None
            else f"{row['worst_slice']} {_fmt(row['worst_slice_human_fpr'])}"
            f" ({row['worst_slice_humans']})"
        )
        met = ("recall " if row["recall_target_met"] else "") + (
            "fpr" if row["fpr_target_met"] else ""
        )
        lines.append(
            f"  {row['seed']:>4} {_fmt(r['mlp']):>6} {_fmt(r[PEER]):>8} "
            f"{_fmt(r['lightgbm_all_inputs']):>7} {_fmt(r['logistic_regression']):>6} "
            f"{_fmt(r['velocity_heuristic']):>8} {_fmt(row['human_fpr'], 4):>6} "
            f"{worst:>30} {met or '-':>10}"
        )
    m = summary["mean_recall"]
    lines.append(
        f"  {'mean':>4} {_fmt(m['mlp']):>6} {_fmt(m[PEER]):>8} {_fmt(m['lightgbm_all_inputs']):>7} "
        f"{_fmt(m['logistic_regression']):>6} {_fmt(m['velocity_heuristic']):>8}"
    )
    n = len(rows)
    lines.append(
        f"  recall above {PEER} on {len(summary['recall_target_met_on_seeds'])} of {n} seeds "
        f"{summary['recall_target_met_on_seeds']}; human FPR target on "
        f"{len(summary['fpr_target_met_on_seeds'])} {summary['fpr_target_met_on_seeds']}; "
        f"both on {len(summary['both_met_on_seeds'])} {summary['both_met_on_seeds']}"
    )
    if summary["recall_by_kind"]:
        lines.append(f"  recall by robot kind, mean over the seeds (slidr / {PEER}):")
        for kind, k in summary["recall_by_kind"].items():
            lines.append(
                f"    {kind:16} {_fmt(k['mlp'])} / {_fmt(k[PEER])}; slidr ahead on "
                f"{len(k['mlp_ahead_on_seeds'])} of {n}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.bench_proxy_lies",
        description="slidr against LightGBM on simulated worlds where purchasers are not a "
        "representative sample of humans (2-15 min a seed on 2 cores).",
    )
    parser.add_argument(
        "--seeds",
        default=f"{DEFAULT_SEEDS[0]}-{DEFAULT_SEEDS[-1]}",
        help="simulation seeds, e.g. 1-8 or 2,5",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days per world (>= 3)")
    parser.add_argument("--clicks-per-day", type=int, default=DEFAULT_CLICKS_PER_DAY)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the data sets and registries here"
    )
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if args.days < 3:
        parser.error(f"--days: at least 3 (two fit days and the held-out one), got {args.days}")
    if args.clicks_per_day < 1_000:
        parser.error(f"--clicks-per-day: at least 1000, got {args.clicks_per_day}")
    from models import peers

    if not peers.lightgbm_available():
        print("bench-proxy-lies needs lightgbm (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    result = run(seeds, args.days, args.clicks_per_day, args.workdir)
    print(to_text(result))
    if args.out is not None:
        write_figures(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
