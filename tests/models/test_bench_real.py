"""The real-data benchmark: its peers on a small synthetic TalkingData-layout file, how it
reports a guardrail's refusal, and its command line (the real file only when present)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from data.dataset import load_dataset
from data.importer import TALKINGDATA, import_events
from models import bench_real
from models.guardrails import GuardrailFailure, GuardrailReport
from models.peers import lightgbm_available

REPO = Path(__file__).parents[2]


def write_synthetic(path: Path, n: int = 6_000, seed: int = 11) -> Path:
    """Three days of clicks: a few click-farm IPs that never download, and humans whose
    download rate depends on the app (apps 1 and 2 convert, the others rarely)."""
    rng = np.random.default_rng(seed)
    start = 1_509_984_000  # 2017-11-06 16:00 UTC, as the real sample
    lines = ["ip,app,device,os,channel,click_time,attributed_time,is_attributed"]
    for _ in range(n):
        farm = rng.random() < 0.4
        ip = int(rng.integers(1, 6)) if farm else int(rng.integers(100, 3_000))
        app = int(rng.integers(3, 12)) if farm else int(rng.integers(1, 12))
        rate = 0.0 if farm else (0.25 if app <= 2 else 0.01)
        t = start + int(rng.integers(0, 56 * 3600))
        bought = rng.random() < rate
        click = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
        later = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t + 600)) if bought else ""
        lines.append(
            f"{ip},{app},{1 + int(farm)},{int(rng.integers(10, 14))},"
            f"{100 + app * 3 + int(rng.integers(0, 2))},"
            f"{click},{later},{int(bought)}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench-real")
    return write_synthetic(tmp / "sample.csv")


def test_count_features_count_combinations(tmp_path: Path, synthetic: Path) -> None:
    import_events(synthetic, tmp_path, TALKINGDATA)
    clicks = load_dataset(tmp_path).clicks
    x, names = bench_real.count_features(clicks)
    assert names == [
        "hour",
        "clicks_ip",
        "clicks_ip_app",
        "clicks_ip_app_os",
        "clicks_ip_device_os_app",
    ]
    assert np.all((x[:, 0] >= 0) & (x[:, 0] < 24))
    i = 0
    same_ip = clicks.ip == clicks.ip[i]
    same_app = same_ip & (clicks.context["app"] == clicks.context["app"][i])
    assert x[i, 1] == same_ip.sum() and x[i, 2] == same_app.sum()
    # Each finer combination counts at most as many clicks as the coarser one.
    assert np.all(x[:, 1] >= x[:, 2]) and np.all(x[:, 2] >= x[:, 3]) and np.all(x[:, 3] >= x[:, 4])
    # So far: the clicks of the same ip at or before this one; the last one counts them all.
    so_far, _ = bench_real.count_features(clicks, so_far=True)
    for i in (0, 17, len(clicks) // 2, len(clicks) - 1):
        same_ip = clicks.ip == clicks.ip[i]
        earlier = (clicks.ts < clicks.ts[i]) | (
            (clicks.ts == clicks.ts[i]) & (np.arange(len(clicks)) <= i)
        )
        assert so_far[i, 1] == (same_ip & earlier).sum()
    assert np.all(so_far[:, 1:] <= x[:, 1:]) and np.all(so_far[:, 1:] >= 1)
    last = {ip: i for i, ip in enumerate(clicks.ip)}  # the last click of each ip (time-sorted)
    assert all(so_far[i, 1] == x[i, 1] for i in last.values())


def test_peers_beat_chance_on_planted_signal(tmp_path: Path, synthetic: Path) -> None:
    result = bench_real.run_bench_real(
        synthetic, tmp_path, with_slidr=False, progress=lambda m: None
    )
    split = result["split"]
    assert split["test"]["days"] == ["2017-11-08"]
    assert split["train"]["days"] == ["2017-11-06", "2017-11-07"]
    assert split["train"]["clicks"] + split["test"]["clicks"] == 6_000
    assert split["test"]["downloads"] > 10
    rows = {row["model"]: row for row in result["models"]}
    assert rows["one-hot logistic regression"]["auc"] > 0.8
    for peer in ("LightGBM + counts", "LightGBM + counts so far"):
        if lightgbm_available():
            assert rows[peer]["auc"] > 0.85
        else:
            assert "skipped" in rows[peer]
    for row in rows.values():
        assert "p_human" not in row  # the scores became intervals
        if row["auc"] is not None:
            lo, hi = row["auc_interval"]
            assert lo <= row["auc"] <= hi and hi - lo < 0.2
        assert "slidr_minus" not in row  # no slidr row to compare with
    text = bench_real.to_text(result)
    assert "one-hot logistic regression" in text and "AUC" in text and "downloads" in text
    assert "95% interval" in text and "bootstrap" in text


def test_intervals_pair_each_peer_with_slidr() -> None:
    rng = np.random.default_rng(4)
    downloaded = rng.random(5_000) < 0.02
    good = rng.normal(size=5_000) + 2.0 * downloaded
    rows = [
        {
            "model": "slidr (v0001)",
            "auc": None,
            "p_human": good,
            "seconds": 1.0,
            "version": "v0001",
        },
        {"model": "same", "auc": None, "p_human": good.copy(), "seconds": 1.0},
        {"model": "chance", "auc": None, "p_human": rng.normal(size=5_000), "seconds": 1.0},
        {"model": "skipped", "auc": None, "seconds": 0.0, "skipped": "not installed"},
    ]
    for row in rows[:3]:
        row["auc"] = bench_real.auc(row["p_human"], downloaded)
    bench_real.add_intervals(rows, downloaded)
    assert all("p_human" not in row for row in rows)
    assert "slidr_minus" not in rows[0] and "auc_interval" not in rows[3]
    assert rows[1]["slidr_minus"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    lo, hi = rows[2]["slidr_minus"]["interval"]
    assert 0.2 < lo < rows[2]["slidr_minus"]["difference"] < hi
    text = bench_real.to_text(
        {
            "data": "x.csv",
            "import": {"clicks": 5_000, "purchases": 100, "seconds": 0.1, "rejected": {}},
            "split": {
                name: {"days": ["2017-11-08"], "clicks": 1, "downloads": 1}
                for name in ("train", "test")
            },
            "models": rows,
            "metric": "AUC",
        }
    )
    assert f"{rows[2]['slidr_minus']['difference']:+.4f} ({lo:+.3f} .. {hi:+.3f})" in text
    twins = [{"model": "m", "auc": 0.5, "seconds": 0.0}, {"model": "m", "auc": 0.6, "seconds": 0.0}]
    with pytest.raises(ValueError, match="unique"):
        bench_real.add_intervals(twins, downloaded)


def test_guardrail_refusal_is_one_line_and_peers_still_run(
    tmp_path: Path, synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.pipeline

    def refuse(directory, registry, options, progress):
        report = GuardrailReport()
        report.add("min_purchases", False, 3, 50, "3 purchasing clicks, need 50")
        raise GuardrailFailure(report)

    monkeypatch.setattr(models.pipeline, "run_training", refuse)
    messages: list[str] = []
    result = bench_real.run_bench_real(synthetic, tmp_path, progress=messages.append)
    slidr = result["models"][0]
    assert slidr["auc"] is None and slidr["exit"] == bench_real.EXIT_GUARDRAIL
    assert "guardrail min_purchases refused training" in slidr["error"]
    assert any(m.startswith("slidr: guardrail min_purchases") for m in messages)
    assert [row["model"] for row in result["models"][1:]] == [
        "one-hot logistic regression",
        "LightGBM + counts",
        "LightGBM + counts so far",
    ]
    assert result["models"][1]["auc"] is not None
    assert "guardrail min_purchases refused training" in bench_real.to_text(result)


def test_cli_peers_only_writes_json(tmp_path: Path, synthetic: Path, capsys) -> None:
    out = tmp_path / "figures.json"
    code = bench_real.main(
        ["--data", str(synthetic), "--peers-only", "--seed", "7", "--out", str(out)]
    )
    assert code == 0
    figures = orjson.loads(out.read_bytes())
    assert all("auc_interval" in row for row in figures["models"] if row["auc"] is not None)
    assert [row["model"] for row in figures["models"]] == [
        "one-hot logistic regression",
        "LightGBM + counts",
        "LightGBM + counts so far",
    ]
    assert "figures:" in capsys.readouterr().out


def test_seeds_are_parsed_as_ranges_and_lists() -> None:
    assert bench_real.parse_seeds("1-3") == [1, 2, 3]
    assert bench_real.parse_seeds("4, 1-2,4") == [4, 1, 2]
    for bad in ("", "a", "5-3", "1,,2"):
        with pytest.raises(ValueError, match="--seeds"):
            bench_real.parse_seeds(bad)


def test_seed_summary_compares_slidr_with_each_peer_seed_for_seed() -> None:
    def run(slidr: float | None, peer: float) -> dict:
        return {
            "models": [
                {"model": "slidr (v0001)" if slidr is not None else "slidr", "auc": slidr},
                {"model": "LightGBM + counts", "auc": peer},
            ]
        }

    summary = bench_real.summarize_seeds(
        [run(0.95, 0.94), run(0.93, 0.96), run(None, 0.5)], [1, 2, 3]
    )
    ours, peer = summary
    assert ours["model"] == "slidr" and ours["auc_by_seed"] == {1: 0.95, 2: 0.93, 3: None}
    assert ours["mean_auc"] == pytest.approx(0.94)  # the seed where training failed left out
    assert peer["mean_auc"] == pytest.approx((0.94 + 0.96 + 0.5) / 3)
    # Paired on the seeds both have: (0.01 - 0.03) / 2.
    assert peer["slidr_minus_mean"] == pytest.approx(-0.01)
    assert peer["slidr_at_or_above_on_seeds"] == [1]


def test_cli_runs_several_seeds_and_prints_their_means(
    tmp_path: Path, synthetic: Path, capsys
) -> None:
    out = tmp_path / "seeds.json"
    code = bench_real.main(
        ["--data", str(synthetic), "--peers-only", "--seeds", "1-2", "--out", str(out)]
    )
    assert code == 0
    figures = orjson.loads(out.read_bytes())
    assert figures["seeds"] == [1, 2] and len(figures["runs"]) == 2
    logistic = next(r for r in figures["summary"] if r["model"] == "one-hot logistic regression")
    assert set(logistic["auc_by_seed"]) == {"1", "2"}  # JSON keys
    assert logistic["mean_auc"] > 0.6  # the planted app signal
    printed = capsys.readouterr().out
    assert "training seeds 1, 2" in printed and "seed 1  seed 2    mean" in printed
    with pytest.raises(SystemExit):
        bench_real.main(["--data", str(synthetic), "--seeds", "x"])


def test_missing_data_skips_cleanly(tmp_path: Path, capsys) -> None:
    assert bench_real.main(["--data", str(tmp_path / "absent.csv")]) == 0
    assert "bench-real skipped:" in capsys.readouterr().out


def test_real_sample_help_runs() -> None:
    if not bench_real.DEFAULT_DATA.is_file():
        pytest.skip(f"real TalkingData sample not found at {bench_real.DEFAULT_DATA}")
    done = subprocess.run(
        [sys.executable, "-m", "models.bench_real", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--data" in done.stdout and "--out" in done.stdout
