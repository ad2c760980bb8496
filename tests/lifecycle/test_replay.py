"""Replay: ranges of the clicks topic (by offsets or event time) or of the archive,
re-decided with a chosen version and published as replay decisions that billing prefers."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer

from events.declarations import DECISION
from events.settings import Settings
from lifecycle.replay import (
    DEFAULT_MAX_DISORDER_S,
    ReplayError,
    ReplayOptions,
    click_scanner,
    clicks_between,
    history_start,
    parse_offsets,
    parse_time,
    read_clicks,
    run_replay,
)
from slidr.cli import build_parser
from slidr.commands.lifecycle import replay_options
from stream.kafka import CLICKS, DECISIONS, FEATURES_SERVED, producer_config
from stream.topics import offset_ranges, resolve_time_range, scan_topic

DAY = 86_400.0
DECISION_FIELDS = DECISION.spec_names  # every decision has them (SPEC §1)


# -- without a broker -----------------------------------------------------------------------


def test_arguments_and_options_are_checked() -> None:
    assert (
        parse_time("1793577600") == parse_time("2026-11-02") == parse_time("2026-11-02T00:00:00Z")
    )
    assert parse_time("2026-11-02T01:00:00+01:00") == 1793577600.0
    assert parse_offsets("12") == 12 and parse_offsets("0:5,3:9") == {0: 5, 3: 9}
    for bad in ("yesterday", "2026-11-02T00:00:00", "nan"):
        with pytest.raises(ReplayError):
            parse_time(bad)
    with pytest.raises(ReplayError):
        parse_offsets("0:x")
    for options in (
        ReplayOptions(),
        ReplayOptions(since=10.0, until=5.0),
        ReplayOptions(archive=Path("a"), from_offset=3, since=1.0),
        ReplayOptions(since=1.0, warmup_s=-1),
    ):
        with pytest.raises(ReplayError):
            options.check()


def test_the_default_warm_up_reaches_back_as_far_as_any_feature_looks() -> None:
    from features.windows import COMBOS, COUNTS, DISTINCTS

    evening = parse_time("2026-11-03T22:30:00Z")
    assert ReplayOptions().warmup_s is None  # automatic
    # The gap since a user's previous click looks back to the start of the day before;
    # no counter looks further (the previous 1 h bucket, today's 1 d bucket).
    assert history_start(evening) == parse_time("2026-11-02")
    assert history_start(parse_time("2026-11-03")) == parse_time("2026-11-02")
    windows = [s.window.seconds for s in (*COUNTS, *DISTINCTS)]
    windows += [w.seconds for c in COMBOS for w in c.windows]
    assert max(windows) <= DAY  # were a window longer, the warm-up would have to grow
    assert ReplayOptions().warmup_start(evening) == parse_time("2026-11-02")
    assert ReplayOptions(warmup_s=0).warmup_start(evening) == evening
    assert ReplayOptions(warmup_s=3600).warmup_start(evening) == evening - 3600

    parser = build_parser()
    default = parser.parse_args(["replay", "--since", "2026-11-03"])
    assert replay_options(default).warmup_s is None
    assert (
        replay_options(parser.parse_args(["replay", "--since", "1", "--warmup", "0"])).warmup_s == 0
    )
    with pytest.raises(ReplayError, match="--warmup"):
        replay_options(parser.parse_args(["replay", "--since", "1", "--warmup", "soon"]))


# -- fixtures -------------------------------------------------------------------------------


@dataclass
class Trained:
    data: Path
    registry: Path
    earlier: str  # v0001: trained
    live: str  # v0002: the same network, lower thresholds; active
    clicks: object  # ClickColumns of the whole simulation
    features: np.ndarray  # compute_features over the whole simulation (= live features)
    day0: float  # UTC midnight of the first day


def _derived_version(registry, version: str, scale: float, **manifest_changes) -> str:
    """Register a copy of ``version`` whose thresholds are scaled by ``scale`` (and whose
    manifest has ``manifest_changes``)."""
    source = registry.path_of(version)
    staging = registry.staging_dir()
    for name in ("model.onnx", "rfm_snapshot.parquet"):
        if (source / name).exists():
            shutil.copyfile(source / name, staging / name)
    thresholds = orjson.loads((source / "thresholds.json").read_bytes())
    thresholds["slices"] = {k: v * scale for k, v in thresholds["slices"].items()}
    thresholds["default"] *= scale
    (staging / "thresholds.json").write_bytes(orjson.dumps(thresholds))
    manifest = {
        k: v for k, v in registry.manifest(version).items() if k not in ("version", "registered_at")
    }
    return registry.register(staging, {**manifest, **manifest_changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny simulation (3 days, ~4k clicks a day), a model trained on it, and a second
    version of it that invalidates more (the one "live" decisions come from)."""
    from data.dataset import load_dataset
    from data.simulator import simulate
    from features.batch import compute_features
    from models.pipeline import TrainOptions, run_training
    from models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("replay-model")
    failures = []
    for seed in (3, 11, 5):  # a tiny simulation can trip a guardrail: try another seed
        data, path = root / f"data-{seed}", root / f"registry-{seed}"
        simulate(data, days=3, clicks_per_day=4000, seed=seed)
        registry = ModelRegistry(path)
        try:
            earlier = run_training(
                data,
                registry,
                TrainOptions(
                    max_epochs=2, min_coverage=0.0, architectures=("mlp_embeddings",), peers=False
                ),
                progress=lambda _m: None,
            )["version"]
        except Exception as exc:
            failures.append(f"seed {seed}: {exc}")
            continue
        live = _derived_version(registry, earlier, 0.6)
        registry.activate(live, "test: the live version")
        clicks = load_dataset(data).clicks
        features, _ = compute_features(clicks)
        day0 = float(np.floor(clicks.ts[0] / DAY) * DAY)
        return Trained(data, path, earlier, live, clicks, features, day0)
    pytest.fail("could not train a model: " + "; ".join(failures))


@pytest.fixture
def settings(stream_settings: Settings, trained: Trained) -> Settings:
    return stream_settings.replace(registry=trained.registry, session_timeout_ms=2000)


def load(trained: Trained, version: str):
    from models.registry import ModelRegistry

    return ModelRegistry(trained.registry).load(version)


def full_scores(trained: Trained, version: str) -> np.ndarray:
    """What ``version`` scores on the live (full-history) features of every click."""
    return load(trained, version).scorer.score(trained.features)


def produce(
    settings: Settings, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Produce in order; (partition, offset) of each record."""
    producer = Producer(producer_config(settings))
    where: list[tuple[int, int] | None] = [None] * len(records)

    def delivered(i: int):
        return lambda err, msg: where.__setitem__(
            i, None if err else (msg.partition(), msg.offset())
        )

    for i, (key, value) in enumerate(records):
        while True:
            try:
                producer.produce(
                    settings.topic(topic), key=key, value=value, on_delivery=delivered(i)
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert all(w is not None for w in where)
    return where  # type: ignore[return-value]


def publish_live(
    settings: Settings, trained: Trained, index: np.ndarray, decided_at: float
) -> dict[str, dict]:
    """Decisions of the live version for the clicks at ``index``, as the worker makes them."""
    model = load(trained, trained.live)
    cols = trained.clicks
    scores = full_scores(trained, trained.live)
    from features.batch import resolve_devices
    from features.definitions import slice_of

    slices = [slice_of(d, li) for d, li in zip(resolve_devices(cols), cols.logged_in, strict=True)]
    thresholds = model.thresholds_for(slices)
    out = {}
    for i in index:
        bad = bool(scores[i] >= thresholds[i])
        out[cols.click_id[i]] = {
            "click_id": cols.click_id[i],
            "ts": float(cols.ts[i]),
            "verdict": "invalid" if bad else "valid",
            "score": float(scores[i]),
            "threshold": float(thresholds[i]),
            "slice": slices[i],
            "model_version": model.version,
            "reasons": ["model_score"] if bad else [],
            "decided_at": decided_at,
            "degraded": False,
            "replay": False,
        }
    produce(settings, DECISIONS, [(k.encode(), orjson.dumps(d)) for k, d in out.items()])
    return out


def produce_clicks(settings: Settings, trained: Trained) -> None:
    from stream.producer import produce_dataset

    assert produce_dataset(settings, trained.data, progress=False).clicks == len(trained.clicks)


def topic_decisions(settings: Settings) -> list[dict]:
    return [orjson.loads(m.value()) for m in scan_topic(settings, DECISIONS)]


def in_range(trained: Trained, since: float | None, until: float | None) -> np.ndarray:
    ts = trained.clicks.ts
    mask = np.ones(len(ts), dtype=bool)
    if since is not None:
        mask &= ts >= since
    if until is not None:
        mask &= ts < until
    return mask


# -- against the embedded broker --------------------------------------------------------------


def test_event_time_bounds_pick_exactly_the_clicks_in_range(
    settings: Settings, trained: Trained
) -> None:
    cols = trained.clicks
    # Out of event-time order by up to 2 minutes (well within the default 10 min allowance),
    # with malformed clicks in between.
    jitter = np.random.default_rng(5).uniform(0, 120, len(cols))
    order = np.argsort(cols.ts + jitter, kind="stable")
    records = [(cols.user_id[i].encode(), orjson.dumps(cols.row(i))) for i in order]
    for at in (10, 4000, 9000):
        records.insert(at, (b"junk", b'{"click_id": "broken"}'))
    where = produce(settings, CLICKS, records)

    windows = [
        (float(cols.ts[3000]), float(cols.ts[3900])),  # bounds exactly at clicks
        (None, float(cols.ts[500])),
        (float(cols.ts[11_000]), None),
        (float(cols.ts[7000]), float(cols.ts[7000]) + 1e-3),  # a single click
        (trained.day0 - DAY, trained.day0),  # before the first click: none
    ]
    for since, until in windows:
        read = clicks_between(settings, since, until)
        expected = set(cols.click_id[in_range(trained, since, until)])
        assert {c["click_id"] for c in read.clicks} == expected, (since, until)
        assert len(read.clicks) == len(expected)  # each once
    assert {
        c["click_id"] for c in clicks_between(settings, *windows[0], full_scan=True).clicks
    } == set(cols.click_id[in_range(trained, *windows[0])])

    # Bisection reads a small part of the topic, not all of it.
    scanner = click_scanner(settings)
    try:
        ranges = resolve_time_range(scanner, *windows[0], DEFAULT_MAX_DISORDER_S)
        assert sum(r.size for r in ranges) < 0.3 * len(records)
        assert scanner.probes < 40

        # By offsets: exactly the valid clicks at those offsets of partition 0.
        ranges = offset_ranges(scanner, {0: 100}, {0: 400})
        assert [(r.partition, r.start, r.end) for r in ranges] == [(0, 100, 400)]
        expected = {
            orjson.loads(value).get("click_id")
            for (key, value), (p, o) in zip(records, where, strict=True)
            if p == 0 and 100 <= o < 400 and key != b"junk"
        }
        read = read_clicks(scanner, ranges)
        assert {c["click_id"] for c in read.clicks} == expected
    finally:
        scanner.close()
    report = run_replay(
        settings,
        ReplayOptions(from_offset={0: 100}, to_offset={0: 400}, dry_run=True, compare=False),
    )
    assert report.clicks_in_range == report.decisions_published == len(expected)
    assert report.ranges == [(0, 100, 400)]
    assert not topic_decisions(settings)  # a dry run publishes nothing


def test_a_click_the_worker_would_refuse_as_ahead_of_its_time_is_not_replayed(
    settings: Settings, trained: Trained
) -> None:
    cols = trained.clicks
    now = time.time()
    rows = [cols.row(i) for i in range(3)]
    rows[1] = {**rows[1], "ts": now + 3600.0}  # an hour ahead of the record's own time
    rows[2] = {**rows[2], "ts": now + 60.0}  # ahead, but within the bound
    produce(settings, CLICKS, [(b"u", orjson.dumps(r)) for r in rows])
    scanner = click_scanner(settings)
    try:
        ranges = offset_ranges(scanner, 0, None)
        read = read_clicks(scanner, ranges, max_future_skew_s=settings.max_future_skew_s)
        unbounded = read_clicks(scanner, ranges)
    finally:
        scanner.close()
    assert [c["click_id"] for c in read.clicks] == [rows[0]["click_id"], rows[2]["click_id"]]
    assert read.ahead == 1
    assert len(unbounded.clicks) == 3 and unbounded.ahead == 0
    report = run_replay(settings, ReplayOptions(from_offset=0, dry_run=True, compare=False))
    assert report.ahead == 1 and report.decisions_published == 2


def test_replay_through_an_earlier_version_supersedes_the_live_decisions(
    settings: Settings, trained: Trained
) -> None:
    from stream.billing import BillingLedger

    cols = trained.clicks
    produce_clicks(settings, trained)
    live_at = time.time()
    live = publish_live(settings, trained, np.arange(len(cols)), live_at)
    before = BillingLedger()
    for d in live.values():
        before.apply(d)

    since, until = trained.day0 + DAY + 6 * 3600, trained.day0 + DAY + 12 * 3600
    report = run_replay(
        settings,
        ReplayOptions(model_version=trained.earlier, since=since, until=until, warmup_s=0),
    )

    mask = in_range(trained, since, until)
    wanted = set(cols.click_id[mask])
    decisions = topic_decisions(settings)
    replays = [d for d in decisions if d["replay"]]
    assert Counter(d["click_id"] for d in replays) == Counter(wanted)  # one per click in range
    for d in replays:
        assert set(DECISION_FIELDS) <= d.keys()
        assert d["model_version"] == trained.earlier and d["replay"] is True and not d["degraded"]
        assert d["decided_at"] > live_at
        assert (d["verdict"] == "invalid") == (d["score"] >= d["threshold"]) == bool(d["reasons"])
    # Without warm-up features start empty at the range start: equal to batch scoring of
    # the range alone.
    from models.batch_scoring import score_clicks

    batch = score_clicks(load(trained, trained.earlier), cols.take(mask))
    by_id = {d["click_id"]: d for d in replays}
    np.testing.assert_allclose(
        [by_id[c]["score"] for c in batch.clicks.click_id], batch.scores, atol=1e-7
    )

    after = BillingLedger()
    for d in decisions:
        after.apply(d)
    for click_id in wanted:
        assert after.latest[click_id][1] == by_id[click_id]["verdict"]
    replay_invalid = sum(d["verdict"] == "invalid" for d in replays)
    live_invalid_in_range = sum(live[c]["verdict"] == "invalid" for c in wanted)
    assert after.summary()["replayed"] == len(wanted)
    assert (
        after.summary()["invalid"] - before.summary()["invalid"]
        == replay_invalid - live_invalid_in_range
    )
    assert after.summary()["clicks"] == before.summary()["clicks"] == len(cols)

    changes = Counter(
        f"{live[c]['verdict']}->{by_id[c]['verdict']}"
        for c in wanted
        if live[c]["verdict"] != by_id[c]["verdict"]
    )
    assert changes["invalid->valid"] > 0  # the earlier version has higher thresholds
    assert report.clicks_in_range == report.decisions_published == report.compared == len(wanted)
    assert report.changes == changes and report.invalid == replay_invalid
    assert "clicks in range" in str(report)


def test_a_replay_through_the_live_version_reproduces_the_live_verdicts(
    settings: Settings, trained: Trained
) -> None:
    """Replaying the end of a stream through the version that decided it gives the same
    verdicts: the default warm-up folds in as much earlier traffic as the features read."""
    cols = trained.clicks
    produce_clicks(settings, trained)
    publish_live(settings, trained, np.arange(len(cols)), time.time())
    last_day = trained.day0 + 2 * DAY
    since, until = last_day + 20 * 3600, last_day + 23 * 3600
    in_hours = int(in_range(trained, since, until).sum())

    replayed = run_replay(
        settings, ReplayOptions(model_version=trained.live, since=since, until=until, dry_run=True)
    )
    assert replayed.compared == replayed.clicks_in_range == in_hours > 100
    assert replayed.warmup_clicks == int(in_range(trained, trained.day0 + DAY, since).sum())
    assert not replayed.changes, replayed.changes  # every verdict as the live one

    # State that starts empty at the range start does not (what the default was).
    cold = run_replay(
        settings,
        ReplayOptions(
            model_version=trained.live, since=since, until=until, dry_run=True, warmup_s=0
        ),
    )
    assert cold.warmup_clicks == 0 and sum(cold.changes.values()) > 0


def test_missing_only_publishes_only_for_clicks_without_a_decision(
    settings: Settings, trained: Trained
) -> None:
    cols = trained.clicks
    produce_clicks(settings, trained)
    day1 = trained.day0 + DAY
    outage = in_range(trained, day1 + 10 * 3600, day1 + 11 * 3600)
    lost = outage.copy()
    rng = np.random.default_rng(1)
    lost[rng.choice(np.nonzero(in_range(trained, day1, day1 + DAY))[0], 5, replace=False)] = True
    lost[np.nonzero(in_range(trained, day1 + DAY, None))[0][0]] = True  # outside the range
    publish_live(settings, trained, np.nonzero(~lost)[0], time.time())

    # Two days of warmup: the features equal the live ones.
    options = ReplayOptions(since=day1, until=day1 + DAY, missing_only=True, warmup_s=2 * DAY)
    report = run_replay(settings, options)
    missing = lost & in_range(trained, day1, day1 + DAY)
    replays = [d for d in topic_decisions(settings) if d["replay"]]
    assert sorted(d["click_id"] for d in replays) == sorted(cols.click_id[missing])
    assert {d["model_version"] for d in replays} == {trained.live}  # the active version
    scores = dict(zip(cols.click_id, full_scores(trained, trained.live), strict=True))
    np.testing.assert_allclose(
        [d["score"] for d in replays], [scores[d["click_id"]] for d in replays], atol=1e-7
    )
    assert report.decisions_published == int(missing.sum())
    assert report.already_decided == int(in_range(trained, day1, day1 + DAY).sum() - missing.sum())
    assert report.warmup_clicks == int(in_range(trained, None, day1).sum())

    assert run_replay(settings, options).decisions_published == 0  # nothing is missing now


def test_replay_from_the_archive_and_with_logged_features(
    settings: Settings, trained: Trained, tmp_path: Path
) -> None:
    from stream.archive import ArchiveOptions, run_archive

    cols = trained.clicks
    produce_clicks(settings, trained)
    publish_live(settings, trained, np.arange(len(cols)), time.time())
    # What a worker with SLIDR_LOG_FEATURES publishes: the features it scored with.
    produce(
        settings,
        FEATURES_SERVED,
        [
            (
                cols.click_id[i].encode(),
                orjson.dumps(
                    {
                        "click_id": cols.click_id[i],
                        "model_version": trained.live,
                        "features": trained.features[i].tolist(),
                    }
                ),
            )
            for i in range(len(cols))
        ],
    )
    archive = tmp_path / "archive"
    options = ArchiveOptions(
        out=archive,
        group_id=f"a-{uuid.uuid4().hex[:8]}",
        idle_s=1.5,
        kinds=("clicks", "decisions"),
        flush_interval_s=5.0,
    )
    archived = run_archive(settings, options)
    assert archived.written["clicks"] == len(cols)

    since, until = trained.day0 + DAY + 3 * 3600, trained.day0 + DAY + 5 * 3600
    mask = in_range(trained, since, until)
    expected = dict(
        zip(cols.click_id[mask], full_scores(trained, trained.earlier)[mask], strict=True)
    )

    def replayed(report) -> dict[str, float]:
        return {
            d["click_id"]: d["score"]
            for d in topic_decisions(settings)
            if d.get("replay_id") == report.replay_id
        }

    from_archive = run_replay(
        settings,
        ReplayOptions(
            model_version=trained.earlier,
            since=since,
            until=until,
            archive=archive,
            warmup_s=2 * DAY,
        ),
    )
    got = replayed(from_archive)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[c] for c in expected], list(expected.values()), atol=1e-7)
    assert from_archive.compared == len(expected)  # earlier decisions come from the archive

    logged = run_replay(
        settings,
        ReplayOptions(
            model_version=trained.earlier,
            since=since,
            until=until,
            use_logged_features=True,
            warmup_s=0,  # every click of the range has its logged features
        ),
    )
    got = replayed(logged)
    assert logged.logged_features_used == len(expected) and logged.warmup_clicks == 0
    np.testing.assert_allclose([got[c] for c in expected], list(expected.values()), atol=1e-7)


def test_replay_command_line(settings: Settings, trained: Trained, monkeypatch, capsys) -> None:
    cols = trained.clicks
    produce(
        settings,
        CLICKS,
        [(cols.user_id[i].encode(), orjson.dumps(cols.row(i))) for i in range(600)],
    )
    for name, value in {
        "SLIDR_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLIDR_TOPIC_PREFIX": settings.topic_prefix,
        "SLIDR_REGISTRY": str(trained.registry),
    }.items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    since, until = float(cols.ts[100]), float(cols.ts[400])
    args = parser.parse_args(
        [
            "replay",
            "--since",
            repr(since),
            "--until",
            repr(until),
            "--model",
            trained.earlier,
            "--dry-run",
            "--json",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["clicks_in_range"] == summary["decisions_published"] == 300
    assert summary["model_version"] == trained.earlier and summary["dry_run"] is True

    args = parser.parse_args(["replay", "--model", trained.earlier])
    with pytest.raises(ReplayError, match="give a range"):
        args.func(args)


def test_a_version_of_another_feature_spec_is_refused_before_anything_is_replayed(
    settings: Settings, trained: Trained, tmp_path: Path
) -> None:
    """The same width, other feature values: its verdicts would all be wrong, so the
    replay refuses it as the worker does, before reading or publishing anything."""
    from models.registry import InputWidthError, ModelRegistry

    shutil.copytree(trained.registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    older = _derived_version(registry, trained.earlier, 1.0, feature_spec_version="f1")
    since = trained.day0 + 2 * DAY
    with pytest.raises(InputWidthError, match=rf"{older} was trained on feature spec f1"):
        run_replay(
            settings,
            ReplayOptions(model_version=older, since=since, until=since + 3600),
            registry=registry,
        )
