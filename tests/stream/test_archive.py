"""The Parquet archive: each event once in the files, also when re-consumed; an exported
day range is a data set with the same features and metrics as the original."""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from events.schemas import InvalidEvent
from events.settings import Settings
from stream.archive import (
    CLICK_SCHEMA,
    ArchiveError,
    ArchiveOptions,
    ArchiveWriter,
    day_bounds,
    export_days,
    hour_partition,
    load_archive_dataset,
    parse_decision,
    read_archive,
    rows_of,
    run_archive,
)
from stream.kafka import CLICKS, DECISIONS, PURCHASES, producer_config

T0 = 1_793_577_600.0  # 2026-11-02T00:00:00Z


def click(i: int, ts: float, **extra) -> dict:
    return {"click_id": f"c{i}", "ts": ts, "user_id": f"u{i % 7}", "ip": f"10.0.0.{i % 5}", **extra}


def decision(click_id: str, ts: float, decided_at: float, **extra) -> dict:
    return {
        "click_id": click_id,
        "ts": ts,
        "verdict": "valid",
        "score": 0.1,
        "threshold": 0.5,
        "slice": "desktop/logged_out",
        "model_version": "v0001",
        "reasons": [],
        "decided_at": decided_at,
        "degraded": False,
        "replay": False,
        **extra,
    }


def all_rows(root: Path, kind: str) -> list[tuple[Path, dict]]:
    """Every row of every part file, without read_archive's safety dedupe."""
    return [
        (path, row)
        for path in sorted((root / kind).rglob("part-*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


# -- the writer, without Kafka -------------------------------------------------------------


def test_writer_files_each_event_once_across_restarts(tmp_path: Path) -> None:
    first = ArchiveWriter(tmp_path)
    events = [click(i, T0 + 1800 * i) for i in range(6)]  # three hours
    for e in events:
        assert first.add("clicks", orjson.dumps(e))
    assert not first.add("clicks", orjson.dumps(events[0]))  # a copy within the buffer
    assert not first.add("clicks", b"{not json")
    assert not first.add("clicks", orjson.dumps({"click_id": "x", "ts": T0}))  # no user_id, ip
    assert not first.add("clicks", None)
    assert first.flush() == 6
    assert first.counts.malformed["clicks"] == 3 and first.counts.duplicates["clicks"] == 1

    # A restart re-consumes the uncommitted tail: a new writer reads the ids from the files.
    second = ArchiveWriter(tmp_path)
    for e in [*events, click(6, T0 + 100)]:
        second.add("clicks", orjson.dumps(e))
    assert second.flush() == 1
    assert second.counts.duplicates["clicks"] == 6

    rows = all_rows(tmp_path, "clicks")
    assert sorted(r["click_id"] for _, r in rows) == [f"c{i}" for i in range(7)]
    for path, row in rows:
        day, hour = hour_partition(row["ts"])
        assert path.parent == tmp_path / "clicks" / f"date={day}" / f"hour={hour:02d}"
        assert path.name.startswith("part-") and path.suffix == ".parquet"
    assert (tmp_path / "clicks" / "date=2026-11-02" / "hour=00").is_dir()
    assert not list(tmp_path.rglob(".*.tmp"))


def test_decisions_are_told_apart_by_time_version_and_replay(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path)
    live = decision("c1", T0, T0 + 1)
    assert writer.add("decisions", orjson.dumps(live))
    assert not writer.add("decisions", orjson.dumps(live))  # re-emitted after a redelivery
    assert writer.add(
        "decisions",
        orjson.dumps({**live, "decided_at": T0 + 99, "replay": True, "model_version": "v0002"}),
    )
    writer.flush()
    restarted = ArchiveWriter(tmp_path)
    assert not restarted.add("decisions", orjson.dumps(live))
    table = read_archive(tmp_path, "decisions")
    assert table.num_rows == 2
    assert table.column("replay").to_pylist() == [False, True]


def test_read_archive_bounds_and_rows_round_trip(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path)
    events = [
        click(
            i,
            T0 + 600 * i,
            context={"publisher": "p"} if i % 2 else None,
            device="mobile",
            custom_field=i,
        )
        for i in range(20)
    ]
    for e in events:
        writer.add("clicks", orjson.dumps({k: v for k, v in e.items() if v is not None}))
    writer.add("purchases", orjson.dumps({"purchase_id": "p1", "ts": T0 + 5, "user_id": "u1"}))
    writer.flush()
    table = read_archive(tmp_path, "clicks", T0 + 600 * 3, T0 + 600 * 11)
    assert table.column("click_id").to_pylist() == [f"c{i}" for i in range(3, 11)]
    assert table.schema.equals(CLICK_SCHEMA)
    rows = rows_of(table)
    assert rows[0]["custom_field"] == 3 and rows[0]["context"] == {"publisher": "p"}
    assert "context" not in rows[1] and rows[1]["session_id"] == rows[1]["user_id"]
    assert read_archive(tmp_path, "purchases").column("amount").to_pylist() == [0.0]
    assert read_archive(tmp_path, "decisions").num_rows == 0
    assert day_bounds("2026-11-02", "2026-11-03") == (T0, T0 + 2 * 86_400)


def test_read_archive_opens_only_the_hours_in_its_bounds(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, fsync=False)
    for i in range(48):  # one click an hour for two days
        writer.add("clicks", orjson.dumps(click(i, T0 + 3600 * i + 1800)))
    writer.flush()
    # An unreadable file in 02:00 of the first day, and a half-written one in 05:00.
    (tmp_path / "clicks/date=2026-11-02/hour=02/part-broken.parquet").write_bytes(b"junk")
    (tmp_path / "clicks/date=2026-11-02/hour=05/.part-x.parquet.tmp").write_bytes(b"junk")
    for since, until, first, last in [
        (T0 + 3 * 3600, T0 + 30 * 3600, 3, 29),  # hour boundaries
        (T0 + 3 * 3600 + 1801, T0 + 30 * 3600 + 1800, 4, 29),  # within hours
        (T0 + 23 * 3600, T0 + 24 * 3600 + 1, 23, 23),  # across midnight
        (T0 + 40 * 3600, None, 40, 47),
    ]:
        ids = read_archive(tmp_path, "clicks", since, until).column("click_id").to_pylist()
        assert ids == [f"c{i}" for i in range(first, last + 1)], (since, until)
    with pytest.raises(ArchiveError, match="part-broken.parquet"):
        read_archive(tmp_path, "clicks", T0, T0 + 3 * 3600)
    assert read_archive(tmp_path / "nowhere", "clicks", T0).num_rows == 0


def test_parse_decision_rejects_what_breaks_the_contract() -> None:
    good = decision("c1", T0, T0 + 1)
    assert parse_decision(orjson.dumps(good))["decided_at"] == T0 + 1
    for bad in (
        {k: v for k, v in good.items() if k != "decided_at"},
        {**good, "verdict": None},
        {**good, "reasons": "model_score"},
        {**good, "score": "high"},
        [1, 2],
    ):
        with pytest.raises(InvalidEvent):
            parse_decision(orjson.dumps(bad))


# -- against the embedded broker ------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    data: Path
    registry: Path
    version: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny simulation (3 days, ~4k clicks a day) and a model trained on it."""
    from data.simulator import simulate
    from models.pipeline import TrainOptions, run_training
    from models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("archive-model")
    failures = []
    for seed in (3, 11, 5):  # a tiny simulation can trip a guardrail: try another seed
        data, registry = root / f"data-{seed}", root / f"registry-{seed}"
        simulate(data, days=3, clicks_per_day=4000, seed=seed)
        try:
            result = run_training(
                data,
                ModelRegistry(registry),
                TrainOptions(
                    max_epochs=2, min_coverage=0.0, architectures=("mlp_embeddings",), peers=False
                ),
                progress=lambda _m: None,
            )
        except Exception as exc:
            failures.append(f"seed {seed}: {exc}")
            continue
        return Trained(data, registry, result["version"])
    pytest.fail("could not train a model: " + "; ".join(failures))


def produce(
    settings: Settings, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    producer = Producer(producer_config(settings))
    for key, value in records:
        producer.produce(settings.topic(topic), key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def test_archive_writes_each_event_once_and_exports_an_equal_dataset(
    stream_settings: Settings, trained: Trained, tmp_path: Path
) -> None:
    from data.dataset import load_dataset
    from features.batch import compute_features
    from models.batch_scoring import evaluate, score_clicks
    from models.registry import ModelRegistry
    from stream.producer import produce_dataset

    settings = stream_settings.replace(session_timeout_ms=2000)  # 1 s group joins
    original = load_dataset(trained.data)
    model = ModelRegistry(trained.registry).load(trained.version)
    produced = produce_dataset(settings, trained.data, progress=False)
    cols = original.clicks
    assert produced.clicks == len(cols)

    # Live decisions for every click, replays for some, and junk on every topic.
    scored = score_clicks(model, cols)
    now = time.time()
    decisions = [
        decision(
            cols.click_id[i],
            float(cols.ts[i]),
            now,
            verdict="invalid" if scored.invalid[i] else "valid",
            score=float(scored.scores[i]),
        )
        for i in range(len(cols))
    ]
    replays = [{**d, "decided_at": now + 60, "replay": True} for d in decisions[:100]]
    produce(
        settings,
        DECISIONS,
        [(d["click_id"].encode(), orjson.dumps(d)) for d in decisions + replays],
    )
    copies = [(cols.user_id[i].encode(), orjson.dumps(cols.row(i))) for i in range(0, 500, 10)]
    produce(settings, CLICKS, [*copies, (b"k", b"{broken"), (b"k", None)])
    produce(settings, PURCHASES, [(b"k", orjson.dumps({"purchase_id": "p"}))])
    produce(settings, DECISIONS, [(b"k", b"[]")])

    out = tmp_path / "archive"
    options = ArchiveOptions(
        out=out,
        group_id=f"archive-{uuid.uuid4().hex[:8]}",
        idle_s=1.5,
        flush_interval_s=0.5,
        max_buffered=8000,
    )
    started = time.monotonic()
    first = run_archive(settings, options)
    assert time.monotonic() - started < 30
    assert first.written["clicks"] == len(cols)
    assert first.written["purchases"] == produced.purchases
    assert first.written["decisions"] == len(decisions) + len(replays)
    assert first.duplicates["clicks"] == len(copies)
    assert first.malformed == {"clicks": 2, "purchases": 1, "decisions": 1}
    assert first.files > 3  # several flushes, each committed

    # A restart that lost every commit (a fresh group) re-reads all: nothing is written twice.
    again = run_archive(settings, replace(options, group_id=f"archive-{uuid.uuid4().hex[:8]}"))
    assert sum(again.written.values()) == 0
    assert again.duplicates["clicks"] == len(cols) + len(copies)
    assert again.duplicates["decisions"] == len(decisions) + len(replays)
    # The first group committed what it wrote: resuming it consumes nothing.
    resumed = run_archive(settings, options)
    assert sum(resumed.consumed.values()) == 0

    clicks_rows = all_rows(out, "clicks")
    assert len(clicks_rows) == len(cols) == len({r["click_id"] for _, r in clicks_rows})
    for path, row in clicks_rows:
        day, hour = hour_partition(row["ts"])
        assert path.parent.parts[-2:] == (f"date={day}", f"hour={hour:02d}")
    purchase_ids = [r["purchase_id"] for _, r in all_rows(out, "purchases")]
    assert len(purchase_ids) == len(set(purchase_ids)) == produced.purchases
    assert len(all_rows(out, "decisions")) == len(decisions) + len(replays)

    # Exported days load as a data set with the same clicks, features and metrics.
    days = sorted({hour_partition(t)[0] for t in (cols.ts[0], cols.ts[-1])})
    counts = export_days(out, days[0], days[-1], tmp_path / "export", include_decisions=True)
    assert counts == {
        "clicks": len(cols),
        "purchases": produced.purchases,
        "decisions": len(decisions) + len(replays),
    }
    archived = load_dataset(tmp_path / "export")
    direct = load_archive_dataset(out, days[0], days[-1])
    assert list(direct.clicks.click_id) == list(archived.clicks.click_id)
    assert len(direct.purchases) == produced.purchases
    assert sum(archived.report.malformed.values()) == 0
    assert list(archived.clicks.click_id) == list(cols.click_id)
    for i in (0, len(cols) // 2, len(cols) - 1):
        assert archived.clicks.row(i) == cols.row(i)
    features, slices = compute_features(archived.clicks)
    expected_features, expected_slices = compute_features(cols)
    np.testing.assert_array_equal(features, expected_features)
    assert list(slices) == list(expected_slices)
    # The stream carries the purchases within the clicks' time span, never ground truth.
    span = (original.purchases.ts >= cols.ts[0]) & (original.purchases.ts <= cols.ts[-1])
    purchases = type(original.purchases)(
        *(getattr(original.purchases, f)[span] for f in original.purchases.__dataclass_fields__)
    )
    reference = replace(original, clicks=replace(cols, extra={}), purchases=purchases)
    assert evaluate(model, archived) == evaluate(model, reference)

    # Retraining on the archive reproduces the offline pipeline on the same events.
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from models.pipeline import TrainOptions, run_training

    same_events = tmp_path / "same-events"
    same_events.mkdir()
    shutil.copy(trained.data / "clicks.parquet", same_events / "clicks.parquet")
    table = pq.read_table(trained.data / "purchases.parquet")
    in_span = pc.and_(
        pc.greater_equal(table["ts"], cols.ts[0]), pc.less_equal(table["ts"], cols.ts[-1])
    )
    pq.write_table(table.filter(in_span), same_events / "purchases.parquet")
    options = TrainOptions(
        max_epochs=2, min_coverage=0.0, architectures=("mlp_embeddings",), peers=False
    )
    runs = [
        run_training(
            source,
            ModelRegistry(tmp_path / f"registry-{source.name}"),
            options,
            progress=lambda _m: None,
        )
        for source in (tmp_path / "export", same_events)
    ]

    def without_truth(m: dict) -> dict:
        keep = (
            "clicks",
            "invalid_clicks",
            "purchasing_clicks",
            "robotic_clicks",
            "ivr",
            "fpr",
            "coverage",
        )
        return {k: m[k] for k in keep}

    for split in ("test", "validation"):
        got, want = (r["metrics"][split] for r in runs)
        assert without_truth(got["overall"]) == without_truth(want["overall"])
        assert {k: without_truth(v) for k, v in got["slices"].items()} == {
            k: without_truth(v) for k, v in want["slices"].items()
        }
    assert runs[0]["labels"] == runs[1]["labels"]


def test_archive_command_line(
    stream_settings: Settings, tmp_path: Path, monkeypatch, capsys
) -> None:
    from slidr.cli import build_parser

    parser = build_parser()
    clicks = [click(i, T0 + 60 * i) for i in range(30)]
    produce(stream_settings, CLICKS, [(c["user_id"].encode(), orjson.dumps(c)) for c in clicks])
    for name, value in {
        "SLIDR_KAFKA_BOOTSTRAP": stream_settings.kafka_bootstrap,
        "SLIDR_TOPIC_PREFIX": stream_settings.topic_prefix,
        "SLIDR_SESSION_TIMEOUT_MS": "2000",
        "SLIDR_HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    args = parser.parse_args(
        [
            "archive",
            "--idle",
            "1.5",
            "--flush-interval",
            "0.5",
            "--json",
            "--kinds",
            "clicks",
            "--group-id",
            f"cli-{uuid.uuid4().hex[:8]}",
        ]
    )
    assert args.func(args) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["written"] == {"clicks": 30}
    assert report["out"] == str(tmp_path / "archive")

    args = parser.parse_args(
        ["archive-export", "--start-day", "2026-11-02", "--out", str(tmp_path / "day")]
    )
    assert args.func(args) == 0
    assert pq.read_table(tmp_path / "day" / "clicks.parquet").num_rows == 30
    with pytest.raises(SystemExit):
        parser.parse_args(["archive", "--idle", "1", "--follow"])
