"""Importing a foreign click log: TalkingData layout from CSV and Parquet, bad rows counted
by reason, purchases derived from the attribution column, clear errors for a bad mapping."""

from __future__ import annotations

import calendar
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.dataset import load_dataset
from data.importer import (
    TALKINGDATA,
    ColumnMapping,
    ImportFailure,
    import_events,
    load_mapping,
)
from slidr.cli import main as slidr_main

HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed"
REAL_SAMPLE = Path(__file__).parents[3] / "shared" / "data" / "talkingdata_sample_nov6-8.csv"


def epoch(text: str) -> float:
    return float(calendar.timegm(tuple(map(int, text.replace("-", " ").replace(":", " ").split()))))


def good_rows(n: int = 180) -> list[dict]:
    """Clean clicks over three days; every 20th one downloads (its time 5 minutes later),
    and row 7 downloads without an attribution time."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        day, hour, minute = 6 + i % 3, int(rng.integers(0, 24)), int(rng.integers(0, 60))
        click = f"2017-11-{day:02d} {hour:02d}:{minute:02d}:{i % 60:02d}"
        bought = i % 20 == 0 or i == 7
        later = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch(click) + 300))
        attributed = later if i % 20 == 0 else ""
        rows.append(
            {
                "ip": str(1000 + i % 37),
                "app": str(i % 9),
                "device": str(1 + i % 2),
                "os": str(10 + i % 5),
                "channel": str(100 + i % 13),
                "click_time": click,
                "attributed_time": attributed,
                "is_attributed": "1" if bought else "0",
            }
        )
    return rows


# (row, reason it must be rejected for)
BAD_ROWS = [
    ("1,2,1,13,497,2017-11-07 25:99:00,,0", "bad_ts"),
    ("1,2,1,13,497,yesterday,,0", "bad_ts"),
    ("1,2,1,13,497,2017/11/07 10:00:00,,0", "bad_ts"),
    ("1,2,1,13,497,,,0", "missing_ts"),
    ("1,2,1,13,497,   ,,0", "missing_ts"),
    ("1,2,1,13,497,1970-01-01 00:00:05,,0", "ts_out_of_bounds"),
    ("1,2,1,13,497,2150-01-01 00:00:00,,0", "ts_out_of_bounds"),
    ("1,2,1,,497,2017-11-07 10:00:00,,0", "missing_user_id"),
    (",2,1,13,497,2017-11-07 10:00:00,,0", "missing_user_id"),
    ("1,2,1,13,497,2017-11-07 10:00:00,,maybe", "bad_purchase_flag"),
    ("1,2,1,13,497,2017-11-07 10:00:00,soon,1", "bad_purchase_time"),
    ("1,2,1,13,497,2017-11-07 10:00:00,2217-11-07 10:00:00,1", "bad_purchase_time"),
    ("1,2,1,13,497,2017-11-07 10:00:00,2017-11-07 09:00:00,1", "purchase_before_click"),
    ("1,2,1,13,497", "malformed_row"),
]
EXPECTED = dict(Counter(reason for _, reason in BAD_ROWS))


def click_ids_of_good_rows(n_good: int) -> list[str]:
    """The generated click id (``r`` + source row) of each good row in ``write_csv``'s file:
    bad row k sits at source row 13k, and the malformed line is no row at all."""
    bad_at = {13 * k for k in range(len(BAD_ROWS) - 1)}
    rows = [i for i in range(n_good + len(BAD_ROWS) - 1) if i not in bad_at]
    return [f"r{i}" for i in rows]


def write_csv(path: Path, rows: list[dict], bad: list[tuple[str, str]] = ()) -> Path:
    lines = [HEADER] + [",".join(r[k] for k in HEADER.split(",")) for r in rows]
    # Bad rows spread through the file, so they fall between good ones.
    for k, (line, _) in enumerate(bad):
        lines.insert(1 + 13 * k, line)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[dict]]:
    tmp = tmp_path_factory.mktemp("import")
    rows = good_rows()
    source = write_csv(tmp / "train.csv", rows, BAD_ROWS)
    messages: list[str] = []
    report = import_events(
        source, tmp / "data", TALKINGDATA, progress=messages.append, progress_every=50
    )
    assert messages and "rows read" in messages[0]  # progress lines
    return tmp / "data", report, rows


def test_counts_every_bad_row_by_reason(imported) -> None:
    out, report, rows = imported
    assert dict(report.rejected) == EXPECTED
    assert report.rows_read == len(rows) + len(BAD_ROWS)
    assert report.clicks == len(rows)
    written = orjson.loads((out / "import_report.json").read_bytes())
    assert written["rejected"] == EXPECTED
    assert written["rejected_total"] == len(BAD_ROWS)
    assert written["clicks"] == len(rows) and written["purchases"] == report.purchases
    assert written["mapping"]["user_id"] == ["ip", "device", "os"]
    assert len(written["examples"]) == 10
    assert "row 0: bad_ts (click_time='2017-11-07 25:99:00')" in written["examples"]
    # Each example is the row's own reason: bad row k is source row 13k.
    for example in written["examples"]:
        found = re.match(r"row (\d+): (\w+)", example)
        if found:
            assert BAD_ROWS[int(found[1]) // 13][1] == found[2]
    text = report.to_text()
    assert "rejected 14 rows" in text and "purchase_before_click" in text


def test_dataset_reads_clicks_with_combined_users_and_context(imported) -> None:
    out, _, rows = imported
    data = load_dataset(out)
    assert not data.report.malformed
    clicks = data.clicks
    assert len(clicks) == len(rows)
    assert len(set(clicks.click_id)) == len(rows)
    # The id names the source row: compare each click with the row it came from.
    row_of = dict(zip(click_ids_of_good_rows(len(rows)), rows, strict=True))
    assert set(clicks.click_id) == set(row_of)
    for i in range(len(clicks)):
        row = row_of[clicks.click_id[i]]
        assert clicks.user_id[i] == f"{row['ip']}-{row['device']}-{row['os']}"
        assert clicks.ip[i] == row["ip"]
        assert clicks.ts[i] == epoch(row["click_time"])
        assert clicks.row(i)["context"] == {k: row[k] for k in ("app", "channel", "os", "device")}
        assert clicks.optional["device"][i] is None  # TalkingData's device is no device class
    assert np.all(np.diff(clicks.ts) >= 0)


def test_purchases_name_their_clicks(imported) -> None:
    out, report, rows = imported
    data = load_dataset(out)
    buyers = [r for r in rows if r["is_attributed"] == "1"]
    assert report.purchases == len(buyers) == len(data.purchases) == 10
    by_id = {cid: i for i, cid in enumerate(data.clicks.click_id)}
    for k in range(len(data.purchases)):
        click_id = data.purchases.click_id[k]
        assert data.purchases.purchase_id[k] == f"p-{click_id}"
        i = by_id[click_id]
        assert data.purchases.user_id[k] == data.clicks.user_id[i]
    # Attributed 5 minutes after the click; row 7's download, without a time, 1 s after.
    delays = {
        data.purchases.click_id[k]: data.purchases.ts[k]
        - data.clicks.ts[by_id[data.purchases.click_id[k]]]
        for k in range(len(data.purchases))
    }
    ids = click_ids_of_good_rows(len(rows))
    assert delays == {ids[i]: 300.0 for i in range(0, len(rows), 20)} | {ids[7]: 1.0}


def test_parquet_source_gives_the_same_data(imported, tmp_path: Path) -> None:
    out, _, rows = imported
    table = pa.table(
        {
            "ip": pa.array([int(r["ip"]) for r in rows], pa.int64()),
            "app": pa.array([int(r["app"]) for r in rows], pa.int32()),
            "device": pa.array([int(r["device"]) for r in rows], pa.int32()),
            "os": pa.array([int(r["os"]) for r in rows], pa.int32()),
            "channel": pa.array([int(r["channel"]) for r in rows], pa.int32()),
            "click_time": pa.array([int(epoch(r["click_time"])) for r in rows], pa.timestamp("s")),
            "attributed_time": pa.array(
                [int(epoch(r["attributed_time"])) if r["attributed_time"] else None for r in rows],
                pa.timestamp("s"),
            ),
            "is_attributed": pa.array([int(r["is_attributed"]) for r in rows], pa.int8()),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    report = import_events(tmp_path / "train.parquet", tmp_path / "data", TALKINGDATA)
    assert not report.rejected and report.clicks == len(rows) and report.purchases == 10
    a, b = load_dataset(out), load_dataset(tmp_path / "data")
    key = lambda d: sorted(zip(d.clicks.ts, d.clicks.user_id, d.clicks.ip, strict=True))  # noqa: E731
    assert key(a) == key(b)
    assert sorted(a.purchases.ts) == sorted(b.purchases.ts)
    assert sorted(a.purchases.user_id) == sorted(b.purchases.user_id)


def test_missing_column_is_one_clear_error(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "train.csv", good_rows(10))
    mapping = ColumnMapping.from_dict({**TALKINGDATA.to_dict(), "ts": "click_timestamp"})
    with pytest.raises(ImportFailure, match=r"'click_timestamp' \(mapping key 'ts'\)"):
        import_events(source, tmp_path / "data", mapping)
    assert not (tmp_path / "data").exists()
    with pytest.raises(ImportFailure, match="mapping key 'ip' is not set"):
        import_events(source, tmp_path / "data", ColumnMapping(ts="click_time", user_id=("ip",)))
    with pytest.raises(ImportFailure, match="unknown mapping key"):
        ColumnMapping.from_dict({"timestamp": "click_time"})


def test_mapping_from_flags_file_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_csv(tmp_path / "train.csv", good_rows(40))
    (tmp_path / "map.toml").write_text(
        'ts = "click_time"\nts_format = "%Y-%m-%d %H:%M:%S"\nuser_id = "ip+os"\n'
        'user_separator = "/"\nip = "ip"\ncontext = ["app", "channel"]\n'
        'purchase_flag = "is_attributed"\n'
    )
    mapping = load_mapping(tmp_path / "map.toml")
    assert mapping.user_id == ("ip", "os") and mapping.context == ("app", "channel")
    (tmp_path / "map.json").write_bytes(orjson.dumps({"preset": "talkingdata", "user_id": "ip"}))
    assert load_mapping(tmp_path / "map.json") == ColumnMapping.from_dict(
        {**TALKINGDATA.to_dict(), "user_id": ["ip"]}
    )
    code = slidr_main(
        [
            "import",
            str(source),
            "--out",
            str(tmp_path / "d1"),
            "--mapping",
            str(tmp_path / "map.toml"),
            "--click-id",
            "channel",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    # --click-id channel repeats ids: every repeat is a rejected duplicate, none is dropped
    # silently.
    assert "duplicate_click_id" in out
    data = load_dataset(tmp_path / "d1")
    assert len(data.clicks) == 13 and len(set(data.clicks.click_id)) == 13
    assert all(u.count("/") == 1 for u in data.clicks.user_id)
    # No attribution time mapped: each purchase is one second after its click.
    by_id = dict(zip(data.clicks.click_id, data.clicks.ts, strict=True))
    assert len(data.purchases) > 0
    assert all(
        t == by_id[c] + 1 for c, t in zip(data.purchases.click_id, data.purchases.ts, strict=True)
    )
    code = slidr_main(
        [
            "import",
            str(source),
            "--out",
            str(tmp_path / "d2"),
            "--preset",
            "talkingdata",
            "--ts",
            "no_such_column",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'no_such_column' (mapping key 'ts')" in err


def test_epoch_times_and_logged_in(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text(
        "id,when,who,addr,signed,ua\n"
        "a,1700000000,u1,10.0.0.1,true,Mozilla/5.0\n"
        "b,1700000001.5,u2,10.0.0.2,no,\n"
        "c,17e7,u3,10.0.0.3,0,\n"
        "d,1700000002,u4,,1,\n"
        "e,1700000003,u5,10.0.0.5,perhaps,\n"
        "a,1700000004,u6,10.0.0.6,1,\n"
    )
    mapping = ColumnMapping(
        click_id="id", ts="when", user_id=("who",), ip="addr", logged_in="signed", user_agent="ua"
    )
    report = import_events(tmp_path / "log.csv", tmp_path / "data", mapping)
    assert dict(report.rejected) == {
        "ts_out_of_bounds": 1,
        "missing_ip": 1,
        "bad_logged_in": 1,
        "duplicate_click_id": 1,
    }
    data = load_dataset(tmp_path / "data")
    assert list(data.clicks.click_id) == ["a", "b"]
    assert list(data.clicks.ts) == [1700000000.0, 1700000001.5]
    assert list(data.clicks.logged_in) == [True, False]
    assert list(data.clicks.user_agent) == ["Mozilla/5.0", ""]
    assert len(data.purchases) == 0


def test_real_talkingdata_sample_imports(tmp_path: Path) -> None:
    if not REAL_SAMPLE.is_file():
        pytest.skip(
            f"real TalkingData sample not found at {REAL_SAMPLE} (see shared/data/README.md)"
        )
    report = import_events(REAL_SAMPLE, tmp_path, TALKINGDATA)
    assert not report.rejected
    data = load_dataset(tmp_path)
    assert len(data.clicks) == 71_439
    assert len(data.purchases) == 168
    assert set(data.purchases.click_id) <= set(data.clicks.click_id)
