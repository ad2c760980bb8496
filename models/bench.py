"""Offline benchmark: feature throughput and the whole training job on simulated traffic.

``run_offline_bench`` simulates about ``clicks`` clicks over 4 days, times the vectorised
feature computation (median of 3 runs of ``compute_features``, in clicks per second) and
one full ``run_training`` into a fresh registry, and returns the figures with the machine
they were measured on. Times are wall-clock seconds. ``slidr bench`` reports it beside the
stream benchmark; ``python -m models.bench --clicks N`` runs it alone.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str], None]

BENCH_DAYS = 4
FEATURE_RUNS = 3


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores, and the versions the figures depend on."""
    import numpy
    import onnxruntime
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_offline_bench(
    clicks: int = 1_000_000,
    workdir: Path | str | None = None,
    progress: Progress = print,
    seed: int = 7,
) -> dict:
    """Simulate ~``clicks`` clicks (4 days), time features and training; return the figures.

    ``workdir`` keeps the simulated data and the registry (with the report) for a look
    afterwards; without it everything goes to a temporary directory that is removed.
    The registry is always a fresh one inside it, so no existing registry is touched.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="slidr-bench-") as tmp:
            figures = run_offline_bench(clicks, Path(tmp), progress, seed)
        figures["training"].pop("report", None)  # removed with the directory
        return figures

    from data.dataset import load_dataset
    from data.simulator import simulate
    from features.batch import compute_features
    from models.pipeline import run_training
    from models.registry import ModelRegistry

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / f"data-{clicks}-s{seed}"
    machine = machine_info()
    progress(f"machine: {machine['cpu']}, {machine['usable_cores']} of {machine['cores']} cores")

    clicks_per_day = max(100, math.ceil(clicks / BENCH_DAYS))
    progress(f"simulating {BENCH_DAYS} days at {clicks_per_day:,} clicks a day into {data_dir}")
    started = time.perf_counter()
    summary = simulate(data_dir, days=BENCH_DAYS, seed=seed, clicks_per_day=clicks_per_day)
    simulate_s = time.perf_counter() - started

    started = time.perf_counter()
    data = load_dataset(data_dir)
    load_s = time.perf_counter() - started
    n = len(data.clicks)
    progress(f"loaded {n:,} clicks in {load_s:.2f} s")

    runs = []
    for i in range(FEATURE_RUNS):
        started = time.perf_counter()
        compute_features(data.clicks)
        runs.append(time.perf_counter() - started)
        progress(
            f"features run {i + 1}/{FEATURE_RUNS}: {runs[-1]:.2f} s ({n / runs[-1]:,.0f} clicks/s)"
        )
    features_s = statistics.median(runs)
    del data

    registry = ModelRegistry(tempfile.mkdtemp(prefix="registry-", dir=workdir))
    progress(f"training into {registry.root}")
    started = time.perf_counter()
    training: dict = {}
    try:
        result = run_training(data_dir, registry, progress=lambda m: progress(f"  train: {m}"))
    except Exception as exc:  # noqa: BLE001 - a refused data set is a figure too
        training["error"] = f"{type(exc).__name__}: {exc}"
    else:
        training.update(
            version=result["version"],
            stages_s={k: round(v, 3) for k, v in result["timings_s"].items()},
            architecture=result["architecture"],
            fold_epochs=result["fit"][result["architecture"]]["best_epochs"],
            members_per_fold=result["fit"][result["architecture"]]["members_per_fold"],
            fit_s={name: round(fit["seconds"], 3) for name, fit in result["fit"].items()},
            report=str(registry.path_of(result["version"]) / "report.html"),
        )
    training["total_s"] = round(time.perf_counter() - started, 3)

    return {
        "clicks": n,
        "days": BENCH_DAYS,
        "seed": seed,
        "simulate_s": round(simulate_s, 3),
        "simulated_clicks": summary.n_clicks,
        "load_s": round(load_s, 3),
        "features": {
            "runs_s": [round(r, 3) for r in runs],
            "median_s": round(features_s, 3),
            "clicks_per_s": round(n / features_s) if features_s > 0 else None,
        },
        "training": training,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "machine": machine,
    }


def to_text(figures: dict) -> str:
    """The figures as a few readable lines."""
    m = figures["machine"]
    f = figures["features"]
    t = figures["training"]
    lines = [
        f"offline bench: {figures['clicks']:,} clicks over {figures['days']} days "
        f"(seed {figures['seed']})",
        f"  machine     {m['cpu']}; {m['usable_cores']} of {m['cores']} cores; "
        f"Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}",
        f"  simulate    {figures['simulate_s']:.1f} s",
        f"  load        {figures['load_s']:.2f} s",
        f"  features    {f['median_s']:.2f} s median of {len(f['runs_s'])} "
        f"({f['clicks_per_s']:,} clicks/s; runs {', '.join(f'{r:.2f}' for r in f['runs_s'])} s)",
    ]
    if "error" in t:
        lines.append(f"  training    failed after {t['total_s']:.1f} s: {t['error']}")
    else:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in t["stages_s"].items() if k != "total")
        fits = ", ".join(f"{k} {v:.1f}" for k, v in t["fit_s"].items())
        lines.append(
            f"  training    {t['total_s']:.1f} s total (shipped {t['architecture']}, "
            f"{len(t['fold_epochs'])} networks stopped at epochs {t['fold_epochs']}; "
            f"cross-fits {fits} s; {stages} s)"
        )
    lines.append(f"  peak memory {figures['peak_rss_mib']:,.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--clicks", type=int, default=1_000_000, help="clicks to simulate (default 1000000)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and registry here")
    parser.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = run_offline_bench(args.clicks, args.workdir, progress, seed=args.seed)
    if args.json:
        import orjson

        print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    else:
        print(to_text(figures))
    return 1 if "error" in figures["training"] else 0


if __name__ == "__main__":
    sys.exit(main())
