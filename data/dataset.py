"""Reading data sets: clicks and purchases as Parquet or JSON Lines.

A *source* is a file (``clicks.parquet``, ``clicks.jsonl``) or a directory of such
files, also one partitioned hive-style (``clicks/date=2026-11-02/part-0.parquet``: for
Parquet, the ``key=value`` folder names become columns). ``load_dataset`` reads a data
set directory with one source of clicks and one of purchases; ``read_parquet``,
``read_jsonl`` and ``read_rows`` are the readers the rest of slidr uses (the archive,
the retrain job), so every source is read the same way.

Rows that break the event schema (SPEC §1) are counted and skipped, with the first few
reasons kept for the report; a missing file or a file that cannot be read at all is a
``DatasetError`` naming the path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from events.arrow import arrow_schema
from events.declarations import PURCHASE
from events.errors import SlidrError
from events.schemas import (
    CLICK_REQUIRED,
    PURCHASE_REQUIRED,
    InvalidEvent,
    parse_click,
    parse_purchase,
    parse_ts,
)
from features.columns import OPTIONAL_STRINGS, ClickColumns

GROUND_TRUTH = ("is_bot", "bot_kind")
# Files whose name starts with these are not data (pyarrow.dataset skips them too):
# temporary files being written, ``_SUCCESS`` markers.
HIDDEN_PREFIXES = (".", "_")


class DatasetError(SlidrError, RuntimeError):
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


# -- sources --------------------------------------------------------------------------


def find_source(directory: Path | str, stem: str) -> Path:
    """``DIR/<stem>.parquet``, ``DIR/<stem>.jsonl`` or the directory ``DIR/<stem>/``, in
    that order of preference; a ``DatasetError`` when there is none."""
    directory = Path(directory)
    for suffix in (".parquet", ".jsonl"):
        path = directory / f"{stem}{suffix}"
        if path.exists():
            return path
    if (directory / stem).is_dir():
        return directory / stem
    raise DatasetError(
        f"{directory}: no {stem}.parquet or {stem}.jsonl, nor a directory {stem}/ of them "
        f"(create one with `slidr simulate --out {directory}`)"
    )


def _data_files(directory: Path, suffix: str) -> list[Path]:
    """Files ending in ``suffix`` anywhere under ``directory``, hidden ones left out, in
    path order (which is time order for ``date=``/``hour=`` partitions)."""
    return sorted(
        path
        for path in directory.rglob(f"*{suffix}")
        if path.is_file()
        and not any(part.startswith(HIDDEN_PREFIXES) for part in path.relative_to(directory).parts)
    )


def source_format(path: Path | str) -> str:
    """``"jsonl"`` or ``"parquet"``: a file's by its suffix (anything but ``.jsonl`` is
    read as Parquet), a directory's by the files in it."""
    path = Path(path)
    if not path.is_dir():
        return "jsonl" if path.suffix == ".jsonl" else "parquet"
    jsonl, parquet = _data_files(path, ".jsonl"), _data_files(path, ".parquet")
    if jsonl and parquet:
        raise DatasetError(f"{path}: holds both .jsonl and .parquet files; keep one format")
    if not jsonl and not parquet:
        raise DatasetError(f"{path}: no .parquet or .jsonl files in this directory")
    return "jsonl" if jsonl else "parquet"


def load_dataset(directory: Path | str) -> Dataset:
    """Load the clicks and purchases of a data set directory (``find_source``); clicks
    sorted by event time."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    report = LoadReport()
    clicks = load_clicks(find_source(directory, "clicks"), report)
    purchases = load_purchases(find_source(directory, "purchases"), report)
    return Dataset(clicks, purchases, report, directory)


# -- readers ----------------------------------------------------------------------------


def _source_name(source: Path, file: Path) -> str:
    """How the report names a file: by its name, or under its source directory's name."""
    return file.name if file == source else f"{source.name}/{file.relative_to(source)}"


def read_jsonl(path: Path | str, parse: Callable[[bytes], dict], report: LoadReport) -> list[dict]:
    """Rows of a JSON Lines file, or of every ``*.jsonl`` file under a directory (in path
    order), each through ``parse``; rows it rejects (``InvalidEvent``) go to ``report``."""
    path = Path(path)
    files = _data_files(path, ".jsonl") if path.is_dir() else [path]
    rows: list[dict] = []
    for file in files:
        name = _source_name(path, file)
        try:
            handle = file.open("rb")
        except OSError as exc:
            raise DatasetError(f"{file}: cannot open ({exc.strerror})") from None
        before = len(rows)
        with handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(parse(line))
                except InvalidEvent as exc:
                    report.reject(name, number, str(exc))
        report.rows[name] = len(rows) - before
    return rows


def read_parquet(
    path: Path | str,
    columns: list[str] | None = None,
    where: ds.Expression | None = None,
    schema: pa.Schema | None = None,
    partitioning: ds.Partitioning | str | None = "hive",
) -> pa.Table:
    """A Parquet file, or every Parquet file under a directory as one table.

    A directory is read through ``pyarrow.dataset``: hive-style folder names
    (``date=2026-11-02``) are columns, and a ``where`` filter on them skips whole folders.
    Without ``schema`` the schemas of the files read are unified (a column some files
    lack is null there). Raises ``DatasetError`` naming the path when it cannot be read.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            return pq.read_table(path, columns=columns, filters=where, schema=schema)
        dataset = ds.dataset(
            path,
            format="parquet",
            partitioning=partitioning,
            schema=schema,
            ignore_prefixes=list(HIDDEN_PREFIXES),
        )
        if schema is None:
            dataset = dataset.replace_schema(
                pa.unify_schemas(
                    [dataset.schema]
                    + [f.physical_schema for f in dataset.get_fragments(filter=where)],
                    promote_options="permissive",
                )
            )
        return dataset.to_table(columns=columns, filter=where)
    except (OSError, pa.ArrowException) as exc:  # also columns of clashing types
        what = "Parquet data set" if path.is_dir() else "Parquet file"
        raise DatasetError(f"{path}: not a readable {what} ({exc})") from None


def string_column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as Python strings (object array); all None when the table lacks it."""
    if name not in table.column_names:
        return np.full(table.num_rows, None, dtype=object)
    column = table.column(name)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return np.array(column.to_pylist(), dtype=object)


def event_times(table: pa.Table, name: str, report: LoadReport) -> np.ndarray:
    """Column ``ts`` as epoch seconds (timestamps, numbers or RFC 3339 strings); NaN where
    a string is not a time, reported under the source ``name``."""
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
            report.reject(name, i + 1, str(exc))
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


def load_clicks(path: Path | str, report: LoadReport | None = None) -> ClickColumns:
    """Clicks from a Parquet or JSON Lines source (a file or a directory), validated and
    sorted by event time."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    if source_format(path) == "jsonl":
        return clicks_from_rows(read_jsonl(path, parse_click, report))
    table = read_parquet(path)
    missing = [name for name in CLICK_REQUIRED if name not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing required columns {missing}")
    ts = event_times(table, path.name, report)
    required = {name: string_column(table, name) for name in ("click_id", "user_id", "ip")}
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
    session = string_column(table, "session_id")
    session = np.where(session == None, required["user_id"], session)  # noqa: E711
    agent = string_column(table, "user_agent")
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
        optional={name: string_column(table, name) for name in OPTIONAL_STRINGS},
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

    def col(name: str, default: object = None) -> np.ndarray:
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


def load_purchases(path: Path | str, report: LoadReport | None = None) -> Purchases:
    """Purchases from a Parquet or JSON Lines source (a file or a directory), sorted by
    event time."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    if source_format(path) == "jsonl":
        rows = read_jsonl(path, parse_purchase, report)
        table = pa.Table.from_pylist(rows, schema=arrow_schema(PURCHASE))
    else:
        table = read_parquet(path)
        missing = [n for n in PURCHASE_REQUIRED if n not in table.column_names]
        if missing:
            raise DatasetError(f"{path}: missing required columns {missing}")
        report.rows[path.name] = table.num_rows
    ts = event_times(table, path.name, report)
    amount = (
        table.column("amount").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        if "amount" in table.column_names
        else np.zeros(table.num_rows)
    )
    purchases = Purchases(
        purchase_id=string_column(table, "purchase_id"),
        ts=ts,
        user_id=string_column(table, "user_id"),
        customer_id=string_column(table, "customer_id"),
        click_id=string_column(table, "click_id"),
        amount=amount,
    )
    keep = np.isfinite(ts) & np.array([u is not None for u in purchases.user_id], dtype=bool)
    order = np.nonzero(keep)[0]
    order = order[np.argsort(ts[order], kind="stable")]
    return Purchases(*(getattr(purchases, f)[order] for f in Purchases.__dataclass_fields__))


# -- rows as stored ---------------------------------------------------------------------


@dataclass
class EventRows:
    """A source's rows as stored (an Arrow table, or the JSON lines), with the fields that
    place each row: for cutting a part out of a data set and writing it back unchanged.

    Unlike ``load_clicks``, nothing is validated or dropped: a row without a readable
    ``ts`` has NaN there, so it falls outside every time window.
    """

    source: Path
    stored: pa.Table | list[bytes]
    ts: np.ndarray  # float64 epoch seconds, NaN where missing or unreadable
    user_id: np.ndarray  # object, None where absent
    click_id: np.ndarray  # object, None where absent (purchases: the attributed click)

    @property
    def file_name(self) -> str:
        """The name ``write`` gives: the source's file name, or ``<dir>.<format>``."""
        if not self.source.is_dir():
            return self.source.name
        return f"{self.source.name}.{'parquet' if isinstance(self.stored, pa.Table) else 'jsonl'}"

    def write(self, out_dir: Path, mask: np.ndarray) -> int:
        """The rows under ``mask`` to ``out_dir/<file_name>`` in the source's format;
        returns how many."""
        out = Path(out_dir) / self.file_name
        if isinstance(self.stored, pa.Table):
            pq.write_table(self.stored.filter(pa.array(mask)), out, compression="zstd")
        else:
            with out.open("wb") as handle:
                handle.writelines(line for line, k in zip(self.stored, mask, strict=True) if k)
        return int(mask.sum())


def read_rows(path: Path | str) -> EventRows:
    """Every row of a Parquet or JSON Lines source as stored (see ``EventRows``)."""
    path = Path(path)
    if source_format(path) == "parquet":
        table = read_parquet(path)
        return EventRows(
            path,
            table,
            event_times(table, path.name, LoadReport()),
            string_column(table, "user_id"),
            string_column(table, "click_id"),
        )
    lines, ts, users, named = [], [], [], []
    for file in _data_files(path, ".jsonl") if path.is_dir() else [path]:
        try:
            handle = file.open("rb")
        except OSError as exc:
            raise DatasetError(f"{file}: cannot open ({exc.strerror})") from None
        with handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                    value = parse_ts(row.get("ts"))
                except (orjson.JSONDecodeError, InvalidEvent, AttributeError):
                    row, value = {}, np.nan  # kept as written, outside every window
                lines.append(line if line.endswith(b"\n") else line + b"\n")
                ts.append(value)
                users.append(row.get("user_id"))
                named.append(row.get("click_id"))
    return EventRows(
        path,
        lines,
        np.asarray(ts, dtype=np.float64),
        np.asarray(users, dtype=object),
        np.asarray(named, dtype=object),
    )
