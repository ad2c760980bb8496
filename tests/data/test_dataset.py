"""Reading data set directories: Parquet and JSON Lines agree; bad rows are counted, bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.dataset import DatasetError, LoadReport, load_clicks, load_dataset
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
    b'{"click_id": "c7", "ts": 1793577606, "user_id": "u1", "ip": "1.1.1.1", "logged_in": "yes"}',  # 7
    b"[1, 2, 3]",  # 8: not an object
    b'{"click_id": "c9", "ts": 1793577608, "user_id": "u2", "ip": "1.1.1.2", "context": {"app": "x"}}',
]


def test_malformed_jsonl_rows_are_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "clicks.jsonl").write_bytes(b"\n".join(MALFORMED_CLICKS) + b"\n")
    (tmp_path / "purchases.jsonl").write_bytes(
        b'{"purchase_id": "p1", "ts": 1793577700, "user_id": "u1", "click_id": "c1", "amount": 12.5}\n'
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
