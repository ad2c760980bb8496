"""Reading a data set directory: ``clicks`` and ``purchases`` as Parquet or JSON Lines.

Rows that break the event schema (SPEC §1) are counted and skipped, with the first few
reasons kept for the report; a missing file or a file that cannot be read at all is a
``DatasetError`` naming the path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.columns import OPTIONAL_STRINGS, ClickColumns
from events.schemas import CLICK_REQUIRED, InvalidEvent, parse_click, parse_purchase, parse_ts

GROUND_TRUTH = ("is_bot", "bot_kind")


class DatasetError(RuntimeError):
    """A data set that cannot be read; the message names the file and the problem."""


@dataclass
class LoadReport:
    """What loading skipped, per file."""

    rows: Counter = field(default_factory=Counter)
    malformed: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def reject(self, source: str, line: int, reason: str) -> None:
        self.malformed[source] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{source}:{line}: {reason}")

    def to_text(self) -> str:
        parts = [f"{name}: {self.rows[name]:,} rows" for name in self.rows]
        for name, n in self.malformed.items():
            parts.append(f"{name}: {n:,} malformed rows skipped")
        text = "; ".join(parts)
        if self.examples:
            text += "\n  first problems:\n    " + "\n    ".join(self.examples)
        return text


@dataclass
class Purchases:
    """Purchases sorted by event time."""

    purchase_id: np.ndarray
    ts: np.ndarray
    user_id: np.ndarray
    customer_id: np.ndarray  # object, None where absent
    click_id: np.ndarray  # object, None where absent
    amount: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.ts)


@dataclass
class Dataset:
    clicks: ClickColumns
    purchases: Purchases
    report: LoadReport
    directory: Path


def _find(directory: Path, stem: str) -> Path:
    for suffix in (".parquet", ".jsonl"):
        path = directory / f"{stem}{suffix}"
        if path.exists():
            return path
    raise DatasetError(
        f"{directory}: no {stem}.parquet or {stem}.jsonl "
        f"(create one with `slidr simulate --out {directory}`)"
    )


def load_dataset(directory: Path | str) -> Dataset:
    """Load ``DIR/clicks.*`` and ``DIR/purchases.*``; clicks sorted by event time."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    report = LoadReport()
    clicks = load_clicks(_find(directory, "clicks"), report)
    purchases = load_purchases(_find(directory, "purchases"), report)
    return Dataset(clicks, purchases, report, directory)


def _read_jsonl(path: Path, parse, report: LoadReport) -> list[dict]:
    rows = []
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse(line))
            except InvalidEvent as exc:
                report.reject(path.name, number, str(exc))
    report.rows[path.name] = len(rows)
    return rows


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


def _strings(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, None, dtype=object)
    column = table.column(name)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return np.array(column.to_pylist(), dtype=object)


def _ts_column(table: pa.Table, path: Path, report: LoadReport) -> np.ndarray:
    column = table.column("ts")
    if pa.types.is_timestamp(column.type):
        return (
            pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
            / {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[column.type.unit]
        )
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full(table.num_rows, np.nan)
    for i, value in enumerate(column.to_pylist()):
        try:
            out[i] = parse_ts(value)
        except InvalidEvent as exc:
            report.reject(path.name, i + 1, str(exc))
    return out


def _context_columns(table: pa.Table) -> dict[str, np.ndarray]:
    if "context" not in table.column_names:
        return {}
    column = table.column("context").combine_chunks()
    if pa.types.is_struct(column.type):
        return {
            column.type.field(i).name: np.array(
                pc.struct_field(column, [i]).to_pylist(), dtype=object
            )
            for i in range(column.type.num_fields)
        }
    rows = column.to_pylist()
    if pa.types.is_map(column.type):
        rows = [dict(r) if r is not None else None for r in rows]
    elif pa.types.is_string(column.type):
        rows = [orjson.loads(r) if r else None for r in rows]
    keys = sorted({k for r in rows if r for k in r})
    return {k: np.array([(r or {}).get(k) for r in rows], dtype=object) for k in keys}


def load_clicks(path: Path, report: LoadReport | None = None) -> ClickColumns:
    """Clicks from a Parquet or JSON Lines file, validated and sorted by event time."""
    report = report if report is not None else LoadReport()
    if path.suffix == ".jsonl":
        return clicks_from_rows(_read_jsonl(path, parse_click, report))
    table = _read_parquet(path)
    missing = [name for name in CLICK_REQUIRED if name not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing required columns {missing}")
    ts = _ts_column(table, path, report)
    required = {name: _strings(table, name) for name in ("click_id", "user_id", "ip")}
    ok = np.isfinite(ts)
    for name, values in required.items():
        bad = np.array([v is None or v == "" for v in values], dtype=bool) & ok
        for i in np.nonzero(bad)[0][:5]:
            report.reject(path.name, int(i) + 1, f"missing required field {name!r}")
        if bad.sum() > 5:  # += 0 would add an entry: a clean file reporting "0 malformed"
            report.malformed[path.name] += int(bad.sum()) - 5
        ok &= ~bad
    logged_in = (
        table.column("logged_in").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        if "logged_in" in table.column_names
        else np.zeros(table.num_rows, dtype=bool)
    )
    session = _strings(table, "session_id")
    session = np.where(session == None, required["user_id"], session)  # noqa: E711
    agent = _strings(table, "user_agent")
    agent = np.where(agent == None, "", agent)  # noqa: E711
    extra = {}
    for name in GROUND_TRUTH:
        if name in table.column_names:
            extra[name] = table.column(name).to_numpy(zero_copy_only=False)
    cols = ClickColumns(
        click_id=required["click_id"],
        ts=ts,
        user_id=required["user_id"],
        ip=required["ip"],
        session_id=session,
        user_agent=agent,
        logged_in=logged_in,
        optional={name: _strings(table, name) for name in OPTIONAL_STRINGS},
        context=_context_columns(table),
        extra=extra,
    )
    report.rows[path.name] = int(ok.sum())
    keep = np.nonzero(ok)[0]
    cols = cols.take(keep) if len(keep) < len(ok) else cols
    return cols.take(np.argsort(cols.ts, kind="stable"))


def clicks_from_rows(rows: list[dict]) -> ClickColumns:
    """Columns from parsed click dicts (``events.schemas.parse_click`` output)."""
    keys = sorted({k for r in rows for k in (r.get("context") or {})})

    def col(name: str, default=None) -> np.ndarray:
        return np.array([r.get(name, default) for r in rows], dtype=object)

    cols = ClickColumns(
        click_id=col("click_id"),
        ts=np.array([r["ts"] for r in rows], dtype=np.float64),
        user_id=col("user_id"),
        ip=col("ip"),
        session_id=col("session_id"),
        user_agent=col("user_agent", ""),
        logged_in=np.array([bool(r.get("logged_in")) for r in rows], dtype=bool),
        optional={name: col(name) for name in OPTIONAL_STRINGS},
        context={
            k: np.array([(r.get("context") or {}).get(k) for r in rows], dtype=object) for k in keys
        },
        extra={
            name: np.array([r.get(name) for r in rows])
            for name in GROUND_TRUTH
            if rows and name in rows[0]
        },
    )
    return cols.take(np.argsort(cols.ts, kind="stable"))


def load_purchases(path: Path, report: LoadReport | None = None) -> Purchases:
    """Purchases from a Parquet or JSON Lines file, sorted by event time."""
    report = report if report is not None else LoadReport()
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path, parse_purchase, report)
        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [
                    ("purchase_id", pa.string()),
                    ("ts", pa.float64()),
                    ("user_id", pa.string()),
                    ("customer_id", pa.string()),
                    ("click_id", pa.string()),
                    ("amount", pa.float64()),
                ]
            ),
        )
    else:
        table = _read_parquet(path)
        missing = [n for n in ("purchase_id", "ts", "user_id") if n not in table.column_names]
        if missing:
            raise DatasetError(f"{path}: missing required columns {missing}")
        report.rows[path.name] = table.num_rows
    ts = _ts_column(table, path, report)
    amount = (
        table.column("amount").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        if "amount" in table.column_names
        else np.zeros(table.num_rows)
    )
    purchases = Purchases(
        purchase_id=_strings(table, "purchase_id"),
        ts=ts,
        user_id=_strings(table, "user_id"),
        customer_id=_strings(table, "customer_id"),
        click_id=_strings(table, "click_id"),
        amount=amount,
    )
    keep = np.isfinite(ts) & np.array([u is not None for u in purchases.user_id], dtype=bool)
    order = np.nonzero(keep)[0]
    order = order[np.argsort(ts[order], kind="stable")]
    return Purchases(*(getattr(purchases, f)[order] for f in Purchases.__dataclass_fields__))
