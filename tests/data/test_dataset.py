"""Reading data sets: Parquet and JSON Lines, files and directories (hive partitions too)
agree; bad rows are counted, bad files named."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data.dataset import (
    DatasetError,
    LoadReport,
    find_source,
    load_clicks,
    load_dataset,
    read_parquet,
    read_rows,
    source_format,
)
from data.simulator import simulate
from features.columns import ClickColumns


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("wb") as handle:
        for row in rows:
            handle.write(orjson.dumps(row) + b"\n")


def event_rows(table: pa.Table) -> list[dict]:
    """Table rows as events: absent fields left out, as a producer would write them."""
    rows = []
    for row in table.to_pylist():
        event = {k: v for k, v in row.items() if v is not None}
        if isinstance(event.get("context"), dict):
            event["context"] = {k: v for k, v in event["context"].items() if v is not None}
        rows.append(event)
    return rows


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parquet")
    simulate(out, days=2, seed=4, clicks_per_day=3_000)
    return out


@pytest.fixture(scope="module")
def jsonl_dir(parquet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data as JSON Lines, clicks shuffled (the loader sorts by event time)."""
    out = tmp_path_factory.mktemp("jsonl")
    clicks = event_rows(pq.read_table(parquet_dir / "clicks.parquet"))
    order = np.random.default_rng(0).permutation(len(clicks))
    # A stable sort by time keeps ties in file order: shuffle only distinct times.
    ts = np.array([c["ts"] for c in clicks])
    if len(np.unique(ts)) != len(ts):
        order = np.arange(len(clicks))
    write_jsonl(out / "clicks.jsonl", [clicks[i] for i in order])
    write_jsonl(
        out / "purchases.jsonl", event_rows(pq.read_table(parquet_dir / "purchases.parquet"))
    )
    return out


def assert_same_clicks(a: ClickColumns, b: ClickColumns) -> None:
    assert len(a) == len(b)
    for name in ("click_id", "user_id", "ip", "session_id", "user_agent", "logged_in"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert a.optional.keys() == b.optional.keys()
    for name in a.optional:
        np.testing.assert_array_equal(a.optional[name], b.optional[name], err_msg=name)
    none = np.full(len(a), None, dtype=object)
    for key in a.context.keys() | b.context.keys():
        np.testing.assert_array_equal(
            a.context.get(key, none), b.context.get(key, none), err_msg=key
        )
    assert a.extra.keys() == b.extra.keys()
    for name in a.extra:
        np.testing.assert_array_equal(a.extra[name], b.extra[name], err_msg=name)


def test_parquet_and_jsonl_give_the_same_data(parquet_dir: Path, jsonl_dir: Path) -> None:
    from_parquet = load_dataset(parquet_dir)
    from_jsonl = load_dataset(jsonl_dir)
    assert len(from_parquet.clicks) > 5_000
    assert_same_clicks(from_parquet.clicks, from_jsonl.clicks)
    assert np.all(np.diff(from_jsonl.clicks.ts) >= 0), "sorted by event time"
    assert from_parquet.clicks.context, "the simulator writes a context"
    p, j = from_parquet.purchases, from_jsonl.purchases
    for name in ("purchase_id", "ts", "user_id", "customer_id", "click_id", "amount"):
        np.testing.assert_array_equal(getattr(p, name), getattr(j, name), err_msg=name)
    assert not from_parquet.report.malformed and not from_jsonl.report.malformed
    assert from_jsonl.report.rows["clicks.jsonl"] == len(from_jsonl.clicks)


def test_jsonl_accepts_rfc3339_times(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "clicks.jsonl",
        [
            {"click_id": "b", "ts": "2026-11-02T10:00:01Z", "user_id": "u", "ip": "1.2.3.4"},
            {"click_id": "a", "ts": 1_793_613_600.0, "user_id": "u", "ip": "1.2.3.4"},
        ],
    )
    clicks = load_clicks(tmp_path / "clicks.jsonl")
    assert list(clicks.click_id) == ["a", "b"]
    np.testing.assert_array_equal(clicks.ts, [1_793_613_600.0, 1_793_613_601.0])
    assert list(clicks.session_id) == ["u", "u"], "session_id defaults to user_id"


MALFORMED_CLICKS = [
    b'{"click_id": "c1", "ts": 1793577600, "user_id": "u1", "ip": "1.1.1.1"}',
    b'{"click_id": "c2", "ts": 1793577601, "user_id": ',  # 2: not JSON
    b'{"click_id": "c3", "ts": 1793577602, "ip": "1.1.1.1"}',  # 3: no user_id
    b'{"click_id": "c4", "ts": 1793577603, "user_id": "u1", "ip": 17}',  # 4: ip not a string
    b'{"click_id": "c5", "ts": "yesterday", "user_id": "u1", "ip": "1.1.1.1"}',  # 5: bad time
    b"",  # 6: blank lines are skipped, not errors
    # 7: logged_in not a boolean
    b'{"click_id": "c7", "ts": 1793577606, "user_id": "u1", "ip": "1.1.1.1", "logged_in": "yes"}',
    b"[1, 2, 3]",  # 8: not an object
    b'{"click_id": "c9", "ts": 1793577608, "user_id": "u2", "ip": "1.1.1.2", '
    b'"context": {"app": "x"}}',
]


def test_malformed_jsonl_rows_are_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "clicks.jsonl").write_bytes(b"\n".join(MALFORMED_CLICKS) + b"\n")
    (tmp_path / "purchases.jsonl").write_bytes(
        b'{"purchase_id": "p1", "ts": 1793577700, "user_id": "u1", "click_id": "c1", '
        b'"amount": 12.5}\n'
        b'{"purchase_id": "p2", "ts": 1793577701, "user_id": "u1", "amount": "ten"}\n'
        b'{"purchase_id": "p3", "ts": 1793577702}\n'
    )
    data = load_dataset(tmp_path)
    assert list(data.clicks.click_id) == ["c1", "c9"]
    assert list(data.purchases.purchase_id) == ["p1"]
    report = data.report
    assert report.malformed == {"clicks.jsonl": 6, "purchases.jsonl": 2}
    assert report.rows == {"clicks.jsonl": 2, "purchases.jsonl": 1}
    assert len(report.examples) == 5, "only the first few reasons are kept"
    assert report.examples[0].startswith("clicks.jsonl:2: not valid JSON")
    assert report.examples[1] == "clicks.jsonl:3: missing required field 'user_id'"
    assert report.examples[2] == "clicks.jsonl:4: field 'ip' must be a string, got int"
    assert report.examples[3].startswith("clicks.jsonl:5: ts is not an RFC 3339 time")
    assert report.examples[4] == "clicks.jsonl:7: field 'logged_in' must be a boolean, got str"
    text = report.to_text()
    assert "clicks.jsonl: 6 malformed rows skipped" in text
    assert "purchases.jsonl: 2 malformed rows skipped" in text
    assert "clicks.jsonl:2: not valid JSON" in text


def test_parquet_rows_without_required_values_are_counted(tmp_path: Path) -> None:
    table = pa.table(
        {
            "click_id": ["a", "b", "c", None],
            "ts": [3.0, 1.0, 2.0, 4.0],
            "user_id": ["u", None, "u", "u"],
            "ip": ["1.1.1.1", "1.1.1.1", "", "1.1.1.1"],
        }
    )
    pq.write_table(table, tmp_path / "clicks.parquet")
    report = LoadReport()
    clicks = load_clicks(tmp_path / "clicks.parquet", report)
    assert list(clicks.click_id) == ["a"]
    assert report.malformed["clicks.parquet"] == 3
    assert report.rows["clicks.parquet"] == 1


def test_missing_directory_is_a_dataset_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        load_dataset(missing)


def test_missing_files_are_a_dataset_error_naming_the_path(
    tmp_path: Path, parquet_dir: Path
) -> None:
    with pytest.raises(DatasetError, match=rf"{tmp_path}: no clicks\.parquet or clicks\.jsonl"):
        load_dataset(tmp_path)
    (tmp_path / "clicks.parquet").write_bytes((parquet_dir / "clicks.parquet").read_bytes())
    with pytest.raises(
        DatasetError, match=rf"{tmp_path}: no purchases\.parquet or purchases\.jsonl"
    ):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="cannot open"):
        load_clicks(tmp_path / "clicks.jsonl")


def test_unreadable_parquet_is_a_dataset_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "clicks.parquet"
    path.write_bytes(b"this is not parquet at all")
    (tmp_path / "purchases.jsonl").write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"{path}: not a readable Parquet file"):
        load_dataset(tmp_path)


def test_parquet_without_a_required_column_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.table({"click_id": ["a"], "ts": [1.0], "user_id": ["u"]}), path)
    with pytest.raises(DatasetError, match=rf"{path}: missing required columns \['ip'\]"):
        load_clicks(path)


# -- directories ----------------------------------------------------------------------------


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def test_directories_of_files_and_of_hive_partitions_give_the_same_data(
    parquet_dir: Path, jsonl_dir: Path, tmp_path: Path
) -> None:
    # clicks/: two Parquet files; purchases/: one file per day, in date=YYYY-MM-DD folders.
    clicks = pq.read_table(parquet_dir / "clicks.parquet")
    (tmp_path / "clicks").mkdir()
    half = clicks.num_rows // 2
    pq.write_table(clicks.slice(0, half), tmp_path / "clicks/part-0.parquet")
    pq.write_table(clicks.slice(half), tmp_path / "clicks/part-1.parquet")
    (tmp_path / "clicks/_SUCCESS").write_bytes(b"")  # not data: skipped
    purchases = pq.read_table(parquet_dir / "purchases.parquet")
    days = np.array([_day(t) for t in purchases.column("ts").to_numpy()])
    for day in np.unique(days):
        folder = tmp_path / "purchases" / f"date={day}"
        folder.mkdir(parents=True)
        pq.write_table(purchases.filter(pa.array(days == day)), folder / "part-0.parquet")
    assert find_source(tmp_path, "clicks") == tmp_path / "clicks"
    assert source_format(tmp_path / "purchases") == "parquet"

    expected = load_dataset(parquet_dir)
    from_dirs = load_dataset(tmp_path)
    assert_same_clicks(expected.clicks, from_dirs.clicks)
    for name in ("purchase_id", "ts", "user_id", "customer_id", "click_id", "amount"):
        np.testing.assert_array_equal(
            getattr(expected.purchases, name), getattr(from_dirs.purchases, name), err_msg=name
        )
    assert from_dirs.report.rows == {"clicks": len(expected.clicks), "purchases": len(purchases)}
    # The folder names are a column of the rows, and a filter on them skips folders.
    table = read_parquet(tmp_path / "purchases")
    assert sorted(set(table.column("date").to_pylist())) == sorted(set(days))
    first = min(days)
    (tmp_path / "purchases" / f"date={first}" / "part-1.parquet").write_bytes(b"not parquet")
    later = read_parquet(tmp_path / "purchases", where=pc.field("date") > first)
    assert later.num_rows == int((days > first).sum())
    with pytest.raises(DatasetError, match=r"purchases: not a readable Parquet data set"):
        read_parquet(tmp_path / "purchases")

    # JSON Lines directories: files read in path order, problems named by file.
    (tmp_path / "jsonl" / "clicks").mkdir(parents=True)
    lines = (jsonl_dir / "clicks.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "jsonl/clicks/a.jsonl").write_bytes(b"".join(lines[:100]))
    (tmp_path / "jsonl/clicks/b.jsonl").write_bytes(b"".join(lines[100:]) + b"[1]\n")
    (tmp_path / "jsonl/purchases.jsonl").write_bytes((jsonl_dir / "purchases.jsonl").read_bytes())
    from_jsonl = load_dataset(tmp_path / "jsonl")
    assert_same_clicks(expected.clicks, from_jsonl.clicks)
    assert from_jsonl.report.rows["clicks/a.jsonl"] == 100
    assert from_jsonl.report.malformed == {"clicks/b.jsonl": 1}
    assert from_jsonl.report.examples[0].startswith(f"clicks/b.jsonl:{len(lines) - 99}:")


def test_files_with_different_columns_are_read_as_one_table(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"click_id": ["a"], "ts": [2.0], "user_id": ["u"], "ip": ["1.1.1.1"]}),
        tmp_path / "part-0.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "click_id": ["b"],
                "ts": [1],  # an integer time in this file
                "user_id": ["v"],
                "ip": ["2.2.2.2"],
                "device": ["mobile"],
            }
        ),
        tmp_path / "part-1.parquet",
    )
    clicks = load_clicks(tmp_path)
    assert list(clicks.click_id) == ["b", "a"]
    assert list(clicks.optional["device"]) == ["mobile", None]


def test_a_directory_of_both_formats_or_of_none_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "clicks").mkdir()
    with pytest.raises(DatasetError, match="no .parquet or .jsonl files"):
        load_clicks(tmp_path / "clicks")
    (tmp_path / "clicks/a.jsonl").write_bytes(b"")
    (tmp_path / "clicks/b.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match="both .jsonl and .parquet"):
        load_clicks(tmp_path / "clicks")


def test_rows_as_stored_keep_every_line_and_place_it_in_time(tmp_path: Path) -> None:
    lines = [
        b'{"click_id": "a", "ts": 5, "user_id": "u"}\n',
        b"not json\n",
        b'{"click_id": "b", "ts": "yesterday", "user_id": "v"}\n',
        b'{"purchase_id": "p", "ts": "2026-11-02T00:00:00Z", "click_id": "a"}',  # no newline
    ]
    (tmp_path / "events.jsonl").write_bytes(b"".join(lines) + b"\n\n")
    rows = read_rows(tmp_path / "events.jsonl")
    np.testing.assert_array_equal(rows.ts, [5.0, np.nan, np.nan, 1_793_577_600.0])
    assert list(rows.user_id) == ["u", None, None, None]
    assert list(rows.click_id) == ["a", None, None, "a"]
    out = tmp_path / "out"
    out.mkdir()
    assert rows.write(out, np.array([True, True, False, True])) == 3
    assert (out / "events.jsonl").read_bytes() == lines[0] + lines[1] + lines[3] + b"\n"

    # A Parquet directory is written back as one file named after it.
    (tmp_path / "clicks/date=2026-11-02").mkdir(parents=True)
    pq.write_table(
        pa.table({"click_id": ["a", "b"], "ts": ["2026-11-02T00:00:01Z", "soon"]}),
        tmp_path / "clicks/date=2026-11-02/part-0.parquet",
    )
    rows = read_rows(tmp_path / "clicks")
    np.testing.assert_array_equal(rows.ts, [1_793_577_601.0, np.nan])
    assert rows.file_name == "clicks.parquet"
    assert rows.write(out, np.array([True, False])) == 1
    assert pq.read_table(out / "clicks.parquet").column("click_id").to_pylist() == ["a"]
