"""Arrow schemas of the events, derived from their declarations (``events.declarations``).

A module of its own so that importing the validators does not import pyarrow.
"""

from __future__ import annotations

import pyarrow as pa

from events.declarations import EventDeclaration, Kind

ARROW_TYPES: dict[Kind, pa.DataType] = {
    Kind.STRING: pa.string(),
    Kind.TIME: pa.float64(),  # epoch seconds
    Kind.NUMBER: pa.float64(),
    Kind.INTEGER: pa.int64(),
    Kind.BOOLEAN: pa.bool_(),
    Kind.STRINGS: pa.list_(pa.string()),
    Kind.STRING_MAP: pa.map_(pa.string(), pa.string()),
}


def arrow_schema(declaration: EventDeclaration, extra: str | None = None) -> pa.Schema:
    """One column per archived field, in wire order; ``extra`` names a last string column
    for everything else (unknown fields as JSON), when given."""
    columns = [(f.name, ARROW_TYPES[f.kind]) for f in declaration.fields if f.archived]
    if extra is not None:
        columns.append((extra, pa.string()))
    return pa.schema(columns)
