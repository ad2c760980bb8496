"""Importing clicks from someone else's CSV or Parquet file into a slidr data set.

A ``ColumnMapping`` says which source column holds each click field of SPEC §1 (the user
may be several columns joined, e.g. ``ip+device+os``), which columns become
``context.<name>``, and which column flags a click that led to a purchase (with its
time). ``import_events`` streams the source in batches and writes ``clicks.parquet``,
``purchases.parquet`` and ``import_report.json``: the layout ``data.dataset`` reads.

Rows that cannot become a click are counted by reason (``REASONS``) and reported, with
the first few as examples; none is dropped without a trace.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from events.arrow import arrow_schema
from events.declarations import CLICK, PURCHASE, Kind
from events.errors import SlidrError

Progress = Callable[[str], None]

# Event times outside these bounds (UTC, epoch seconds) are taken as corrupt:
# 2000-01-01 and 2100-01-01.
EARLIEST_TS = 946_684_800.0
LATEST_TS = 4_102_444_800.0

# ts_format values that mean a number rather than a strptime pattern, and their unit.
EPOCH_FORMATS = {"epoch": 1.0, "epoch_ms": 1e-3}

# Why a row was rejected, in the order they are checked: a row counts under the first.
REASONS = (
    "malformed_row",  # a CSV line with the wrong number of fields
    "missing_click_id",
    "missing_ts",
    "bad_ts",
    "ts_out_of_bounds",
    "missing_user_id",
    "missing_ip",
    "bad_logged_in",
    "bad_purchase_flag",
    "bad_purchase_time",
    "purchase_before_click",
    "duplicate_click_id",
)

# Optional string fields of a click copied as they are (events.declarations); the
# customer id is derived from its own mapping instead.
PLAIN_FIELDS = tuple(
    name for name in CLICK.select_names(kind=Kind.STRING, required=False) if name != "customer_id"
)

_TRUE = ("1", "1.0", "true", "t", "yes", "y")
_FALSE = ("0", "0.0", "false", "f", "no", "n")
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_EXAMPLES = 10
_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".tsv", ".txt")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class ImportFailure(SlidrError, ValueError):
    """The import cannot run (unknown format, missing column, bad mapping); says which."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column feeds which click field; ``None`` leaves an optional field out.

    ``ts_format`` is ``epoch`` (seconds), ``epoch_ms`` or a ``strptime`` pattern read as
    UTC; ``purchase_time_format`` defaults to it. Without ``click_id`` the id is ``r<N>``,
    N the 0-based data row (rejected rows included; CSV lines with the wrong number of
    fields are not rows), so importing the same file again gives the same ids.
    """

    ts: str | None = None
    ts_format: str = "epoch"
    user_id: tuple[str, ...] = ()
    user_separator: str = "-"
    ip: str | None = None
    click_id: str | None = None
    session_id: str | None = None
    user_agent: str | None = None
    logged_in: str | None = None
    device: str | None = None
    ad_id: str | None = None
    advertiser_id: str | None = None
    placement: str | None = None
    query: str | None = None
    context: tuple[str, ...] = ()
    purchase_flag: str | None = None
    purchase_time: str | None = None
    purchase_time_format: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "mapping") -> ColumnMapping:
        """A mapping from plain values: ``user_id``/``context`` as a list or ``a+b``/``a,b``."""
        return cls().merged(values, origin)

    def merged(self, values: Mapping[str, Any], origin: str = "mapping") -> ColumnMapping:
        """This mapping with the keys of ``values`` that are not ``None`` replaced."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ImportFailure(
                f"{origin}: unknown mapping key(s) {unknown}; known keys: {sorted(known)}"
            )
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key in ("user_id", "context"):
                value = _column_list(value, key, origin)
            elif not isinstance(value, str) or not value.strip():
                raise ImportFailure(f"{origin}: mapping key {key!r} must be a non-empty string")
            changes[key] = value
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise ``ImportFailure`` naming the first required key that is not set."""
        for key, flag in (("ts", "--ts"), ("user_id", "--user"), ("ip", "--ip")):
            if not getattr(self, key):
                raise ImportFailure(
                    f"mapping key {key!r} is not set (give {flag} COLUMN, a --mapping file "
                    f"with {key!r}, or a --preset)"
                )
        if self.purchase_time and not self.purchase_flag:
            raise ImportFailure(
                "mapping key 'purchase_time' needs 'purchase_flag' (--purchase-flag COLUMN)"
            )
        for key in ("ts_format", "purchase_time_format"):
            fmt = getattr(self, key)
            if fmt is not None and fmt not in EPOCH_FORMATS and "%" not in fmt:
                raise ImportFailure(
                    f"mapping key {key!r}: expected 'epoch', 'epoch_ms' or a strptime "
                    f"pattern such as '%Y-%m-%d %H:%M:%S', got {fmt!r}"
                )

    def columns_by_key(self) -> list[tuple[str, str]]:
        """(mapping key, source column) for every column the import reads."""
        pairs: list[tuple[str, str]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ts_format", "user_separator", "purchase_time_format"):
                continue
            if isinstance(value, tuple):
                pairs.extend((f.name, column) for column in value)
            elif value is not None:
                pairs.append((f.name, value))
        return pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in fields(self)
        }


def _column_list(value: Any, key: str, origin: str) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = re.split(r"[+,]", value)
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise ImportFailure(f"{origin}: mapping key {key!r} must be a list of column names")
    columns = tuple(str(p).strip() for p in parts if str(p).strip())
    if not columns:
        raise ImportFailure(f"{origin}: mapping key {key!r} names no column")
    return columns


# The TalkingData AdTracking layout (Kaggle): encoded ids, a user is ip+device+os, and a
# download is the purchase. Its ``device`` is an encoded model id, not slidr's device class,
# so it goes to the context with the other ids.
TALKINGDATA = ColumnMapping(
    ts="click_time",
    ts_format="%Y-%m-%d %H:%M:%S",
    user_id=("ip", "device", "os"),
    ip="ip",
    context=("app", "channel", "os", "device"),
    purchase_flag="is_attributed",
    purchase_time="attributed_time",
)

PRESETS: dict[str, ColumnMapping] = {"talkingdata": TALKINGDATA}


def load_mapping(path: Path | str, base: ColumnMapping | None = None) -> ColumnMapping:
    """A mapping from a JSON or TOML file; an optional ``"preset"`` key names the base."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportFailure(f"{path}: cannot read the mapping file ({exc.strerror})") from None
    try:
        values = tomllib.loads(raw.decode()) if path.suffix == ".toml" else orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportFailure(
            f"{path}: not a valid {path.suffix or 'JSON'} mapping ({exc})"
        ) from None
    if not isinstance(values, dict):
        raise ImportFailure(f"{path}: the mapping must be an object of key: column")
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is not None:
        base = preset_mapping(preset)
    return (base or ColumnMapping()).merged(values, str(path))


def preset_mapping(name: str) -> ColumnMapping:
    try:
        return PRESETS[name]
    except KeyError:
        raise ImportFailure(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


@dataclass
class ImportReport:
    """What an import read, wrote and rejected (by reason), and how long it took."""

    source: str
    out: str
    mapping: dict[str, Any]
    rows_read: int = 0
    clicks: int = 0
    purchases: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def reject(self, row: int | None, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < _EXAMPLES:
            where = "row ?" if row is None else f"row {row}"
            self.examples.append(f"{where}: {reason} ({detail})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": self.out,
            "rows_read": self.rows_read,
            "clicks": self.clicks,
            "purchases": self.purchases,
            "rejected": {r: self.rejected[r] for r in REASONS if self.rejected[r]},
            "rejected_total": sum(self.rejected.values()),
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "mapping": self.mapping,
        }

    def to_text(self) -> str:
        lines = [
            f"read {self.rows_read:,} rows from {self.source} in {self.seconds:.1f} s",
            f"wrote {self.clicks:,} clicks and {self.purchases:,} purchases to {self.out}",
        ]
        total = sum(self.rejected.values())
        if total:
            lines.append(f"rejected {total:,} rows:")
            lines.extend(f"  {r:22} {self.rejected[r]:>10,}" for r in REASONS if self.rejected[r])
            lines.append("  first problems (0-based source rows):")
            lines.extend(f"    {e}" for e in self.examples)
        else:
            lines.append("rejected 0 rows")
        return "\n".join(lines)


# --- reading the source ---------------------------------------------------------------


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith(_CSV_SUFFIXES)


def _source_columns(path: Path) -> list[str]:
    if _is_csv(path):
        try:
            # Only the header matters here; bad lines are counted when the rows are read.
            options = _parse_options(path)
            options.invalid_row_handler = lambda row: "skip"
            return list(pcsv.open_csv(path, parse_options=options).schema.names)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ImportFailure(f"{path}: not a readable CSV file ({exc})") from None
    if path.name.lower().endswith(_PARQUET_SUFFIXES):
        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ImportFailure(f"{path}: not a readable Parquet file ({exc})") from None
    raise ImportFailure(
        f"{path}: unknown format; expected {', '.join(_CSV_SUFFIXES + _PARQUET_SUFFIXES)}"
    )


def _parse_options(path: Path) -> pcsv.ParseOptions:
    return pcsv.ParseOptions(delimiter="\t" if path.name.lower().endswith(".tsv") else ",")


def _batches(
    path: Path, columns: list[str], batch_rows: int, report: ImportReport
) -> Iterator[pa.RecordBatch]:
    """The source's ``columns`` in order, batch by batch; CSV columns all as strings.

    CSV lines with the wrong number of fields are skipped and counted as ``malformed_row``.
    """
    if _is_csv(path):

        def malformed(row: pcsv.InvalidRow) -> str:
            report.reject(
                row.number, "malformed_row", f"{row.actual_columns} fields: {row.text[:60]!r}"
            )
            return "skip"

        delimiter = _parse_options(path).delimiter
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 22),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=malformed),
            convert_options=pcsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
            ),
        )
        try:
            yield from reader
        except pa.ArrowInvalid as exc:
            raise ImportFailure(f"{path}: CSV cannot be parsed ({exc})") from None
    else:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def _text(column: pa.Array) -> pa.Array:
    """Strings with surrounding blanks trimmed; empty strings become null."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    column = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)


def _absent(column: pa.Array) -> np.ndarray:
    return pc.is_null(column).to_numpy(zero_copy_only=False)


def _seconds(column: pa.Array, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds with NaN where unparseable, present mask) of a time column."""
    if pa.types.is_timestamp(column.type):
        unit = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[column.type.unit]
        present = ~_absent(column)
        values = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(present, values * unit, np.nan), present
    if (
        pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    ) and fmt in EPOCH_FORMATS:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        present = ~np.isnan(values)
        return values * EPOCH_FORMATS[fmt], present
    text = _text(column)
    present = ~_absent(text)
    if fmt in EPOCH_FORMATS:
        numeric = pc.if_else(
            pc.match_substring_regex(text, _NUMBER), text, pa.scalar(None, pa.string())
        )
        values = pc.cast(numeric, pa.float64()).to_numpy(zero_copy_only=False) * EPOCH_FORMATS[fmt]
    else:
        parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
        values = pc.cast(parsed, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return values, present


def _flags(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(set, unrecognised) masks of a yes/no column; an empty value is "no"."""
    if pa.types.is_boolean(column.type):
        return column.fill_null(False).to_numpy(zero_copy_only=False), np.zeros(len(column), bool)
    text = pc.utf8_lower(_text(column))
    yes = pc.is_in(text, pa.array(_TRUE)).to_numpy(zero_copy_only=False)
    no = pc.is_in(text, pa.array(_FALSE)).to_numpy(zero_copy_only=False) | _absent(text)
    return yes, ~(yes | no)


# --- the import -----------------------------------------------------------------------


def _click_schema(mapping: ColumnMapping) -> pa.Schema:
    """The declared click columns this mapping fills, in the declaration's order."""
    declared = arrow_schema(CLICK)
    cols = [declared.field(name) for name in CLICK.select_names(required=True)]
    cols += [declared.field(name) for name in PLAIN_FIELDS if getattr(mapping, name)]
    if mapping.logged_in:
        cols.append(declared.field("logged_in"))
    if mapping.context:
        cols.append(pa.field("context", pa.struct([(c, pa.string()) for c in mapping.context])))
    return pa.schema(cols)


# A purchase as the importer derives it from an attribution column: no customer, no amount.
PURCHASE_SCHEMA = pa.schema(
    [arrow_schema(PURCHASE).field(name) for name in ("purchase_id", "ts", "user_id", "click_id")]
)


class _BatchConverter:
    """Turns source batches into click and purchase tables, recording rejections."""

    def __init__(
        self, mapping: ColumnMapping, report: ImportReport, earliest: float, latest: float
    ) -> None:
        self.m = mapping
        self.report = report
        self.earliest, self.latest = earliest, latest
        self.click_schema = _click_schema(mapping)
        self.seen_ids: set[str] = set()

    def convert(self, batch: pa.RecordBatch, first_row: int) -> tuple[pa.Table, pa.Table]:
        m, n = self.m, batch.num_rows
        col = batch.column
        reason = np.full(n, None, dtype=object)
        detail = np.full(n, None, dtype=object)

        def flag(mask: np.ndarray, name: str, column: str, values: pa.Array | None = None) -> None:
            new = mask & (reason == None)  # noqa: E711
            reason[new] = name
            if values is None:
                detail[new] = f"{column} empty"
            elif new.any():
                at = np.nonzero(new)[0]
                shown = values.take(pa.array(at)).to_pylist()
                detail[at] = [f"{column}={v!r}" for v in shown]

        if m.click_id:
            click_id = _text(col(m.click_id))
            flag(_absent(click_id), "missing_click_id", m.click_id)
        else:
            rows = np.arange(first_row, first_row + n)
            click_id = pa.array([f"r{i}" for i in rows.tolist()], pa.string())
        # ``validate`` has refused a mapping without these before any batch is read.
        assert m.ts is not None and m.ip is not None
        ts, present = _seconds(col(m.ts), m.ts_format)
        flag(~present, "missing_ts", m.ts)
        flag(present & np.isnan(ts), "bad_ts", m.ts, col(m.ts))
        flag((ts < self.earliest) | (ts >= self.latest), "ts_out_of_bounds", m.ts, col(m.ts))
        parts = [_text(col(c)) for c in m.user_id]
        for name, part in zip(m.user_id, parts, strict=True):
            flag(_absent(part), "missing_user_id", name)
        user_id = pc.binary_join_element_wise(*parts, m.user_separator)
        ip = _text(col(m.ip))
        flag(_absent(ip), "missing_ip", m.ip)
        if m.logged_in:
            logged_in, bad = _flags(col(m.logged_in))
            flag(bad, "bad_logged_in", m.logged_in, col(m.logged_in))
        bought = np.zeros(n, dtype=bool)
        purchase_ts = ts + 1.0  # a purchase without its own time: one second after the click
        if m.purchase_flag:
            bought, bad = _flags(col(m.purchase_flag))
            flag(bad, "bad_purchase_flag", m.purchase_flag, col(m.purchase_flag))
            if m.purchase_time:
                fmt = m.purchase_time_format or m.ts_format
                own_ts, own = _seconds(col(m.purchase_time), fmt)
                broken = own & (
                    np.isnan(own_ts) | (own_ts < self.earliest) | (own_ts >= self.latest)
                )
                flag(bought & broken, "bad_purchase_time", m.purchase_time, col(m.purchase_time))
                early = bought & own & (own_ts < ts)
                flag(early, "purchase_before_click", m.purchase_time, col(m.purchase_time))
                purchase_ts = np.where(own, own_ts, purchase_ts)
        if m.click_id:
            ids = click_id.to_numpy(zero_copy_only=False)
            duplicate = np.zeros(n, dtype=bool)
            for i in np.nonzero(reason == None)[0]:  # noqa: E711
                if ids[i] in self.seen_ids:
                    duplicate[i] = True
                else:
                    self.seen_ids.add(ids[i])
            flag(duplicate, "duplicate_click_id", m.click_id, click_id)

        for i in np.nonzero(reason != None)[0]:  # noqa: E711
            self.report.reject(first_row + int(i), reason[i], detail[i])
        ok = reason == None  # noqa: E711
        keep = pa.array(ok)
        data: dict[str, pa.Array] = {
            "click_id": click_id,
            "ts": pa.array(ts, pa.float64()),
            "user_id": user_id,
            "ip": ip,
        }
        for name in PLAIN_FIELDS:
            if getattr(m, name):
                data[name] = _text(col(getattr(m, name)))
        if m.logged_in:
            data["logged_in"] = pa.array(logged_in)
        if m.context:
            data["context"] = pa.StructArray.from_arrays(
                [_text(col(c)) for c in m.context], names=list(m.context)
            )
        clicks = pa.Table.from_pydict(data, schema=self.click_schema).filter(keep)
        sold = pa.array(ok & bought)
        ids = pc.filter(click_id, sold)
        purchases = pa.table(
            {
                "purchase_id": pc.binary_join_element_wise("p", ids, "-"),
                "ts": pc.filter(pa.array(purchase_ts, pa.float64()), sold),
                "user_id": pc.filter(user_id, sold),
                "click_id": ids,
            },
            schema=PURCHASE_SCHEMA,
        )
        return clicks, purchases


def import_events(
    source: Path | str,
    out: Path | str,
    mapping: ColumnMapping,
    progress: Progress | None = None,
    batch_rows: int = 262_144,
    progress_every: int = 1_000_000,
    earliest: float = EARLIEST_TS,
    latest: float = LATEST_TS,
) -> ImportReport:
    """Import ``source`` (CSV or Parquet) into the data set directory ``out``.

    Writes ``clicks.parquet`` (``ts`` in epoch seconds), ``purchases.parquet`` (one per
    flagged click: id ``p-<click_id>``, at the purchase time or one second after the
    click) and ``import_report.json``, replacing earlier ones; returns the report.
    Progress lines go to ``progress`` every ``progress_every`` rows. Raises
    ``ImportFailure`` for a mapping key that is not set or names a missing column.
    """
    source, out = Path(source), Path(out)
    started = time.perf_counter()
    mapping.validate()
    if not source.is_file():
        raise ImportFailure(f"{source}: no such file")
    available = set(_source_columns(source))
    missing = [(key, c) for key, c in mapping.columns_by_key() if c not in available]
    if missing:
        named = ", ".join(f"{c!r} (mapping key {key!r})" for key, c in missing)
        raise ImportFailure(
            f"{source}: missing column(s) {named}; the file has {sorted(available)}"
        )
    columns = list(dict.fromkeys(c for _, c in mapping.columns_by_key()))
    report = ImportReport(str(source), str(out), mapping.to_dict())
    converter = _BatchConverter(mapping, report, earliest, latest)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.parquet" for name in ("clicks", "purchases")}
    tmp = {name: path.with_name(f".{path.name}.tmp") for name, path in paths.items()}
    writers = {
        "clicks": pq.ParquetWriter(tmp["clicks"], converter.click_schema, compression="zstd"),
        "purchases": pq.ParquetWriter(tmp["purchases"], PURCHASE_SCHEMA, compression="zstd"),
    }
    next_progress = progress_every
    parsed = 0  # rows in batches: numbers rows for ids and examples (malformed lines aside)
    try:
        for batch in _batches(source, columns, batch_rows, report):
            clicks, purchases = converter.convert(batch, parsed)
            writers["clicks"].write_table(clicks)
            writers["purchases"].write_table(purchases)
            parsed += batch.num_rows
            report.clicks += clicks.num_rows
            report.purchases += purchases.num_rows
            if progress is not None and parsed >= next_progress:
                elapsed = time.perf_counter() - started
                progress(
                    f"import: {parsed:,} rows read ({parsed / elapsed:,.0f} rows/s), "
                    f"{report.clicks:,} clicks, {sum(report.rejected.values()):,} rejected"
                )
                next_progress = (parsed // progress_every + 1) * progress_every
    except BaseException:
        for name, writer in writers.items():
            writer.close()
            tmp[name].unlink(missing_ok=True)
        raise
    for name, writer in writers.items():
        writer.close()
        os.replace(tmp[name], paths[name])
    report.rows_read = parsed + report.rejected["malformed_row"]
    report.seconds = time.perf_counter() - started
    (out / "import_report.json").write_bytes(
        orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2)
    )
    return report
