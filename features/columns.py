"""Clicks as columns (numpy arrays): the offline representation of a data set.

``ClickColumns.row(i)`` gives the same dict the stream worker parses from Kafka, so the
per-event and vectorised feature paths can be compared click by click.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from events.declarations import CLICK, Kind

# A click's optional string fields without a default (events.declarations): absent stays
# absent, so they are columns with None. The others are columns of their own below.
OPTIONAL_STRINGS = CLICK.select_names(kind=Kind.STRING, required=False, defaulted=False)
# Every top-level string field of a click (``ClickColumns.strings`` reads them).
STRING_FIELDS = CLICK.select_names(kind=Kind.STRING)


@dataclass
class ClickColumns:
    """A data set of clicks, sorted by event time (ties keep input order)."""

    click_id: np.ndarray  # object (str)
    ts: np.ndarray  # float64, epoch seconds
    user_id: np.ndarray  # object (str)
    ip: np.ndarray  # object (str)
    session_id: np.ndarray  # object (str); the user_id where the click had none
    user_agent: np.ndarray  # object (str); "" where the click had none
    logged_in: np.ndarray  # bool
    optional: dict[str, np.ndarray]  # OPTIONAL_STRINGS -> object arrays with None
    context: dict[str, np.ndarray]  # context key -> object array with None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. is_bot, bot_kind

    def __len__(self) -> int:
        return len(self.ts)

    def row(self, i: int) -> dict:
        """Click ``i`` as the dict the stream worker would parse from the topic."""
        click = {
            "click_id": self.click_id[i],
            "ts": float(self.ts[i]),
            "user_id": self.user_id[i],
            "ip": self.ip[i],
            "session_id": self.session_id[i],
            "user_agent": self.user_agent[i],
            "logged_in": bool(self.logged_in[i]),
        }
        for name, values in self.optional.items():
            if values[i] is not None:
                click[name] = values[i]
        context = {k: v[i] for k, v in self.context.items() if v[i] is not None}
        if context:
            click["context"] = context
        return click

    def strings(self, field: str) -> np.ndarray:
        """A string field of every click as an object array, "" where a click lacks it:
        a top-level field (``ip``, ``ad_id``, ...) or ``context.<key>``."""
        if field.startswith("context."):
            values = self.context.get(field[len("context.") :])
        elif field in OPTIONAL_STRINGS:
            values = self.optional.get(field)
        elif field in STRING_FIELDS:
            values = getattr(self, field)
        else:
            raise ValueError(f"not a string field of a click: {field!r}")
        if values is None:
            return np.full(len(self), "", dtype=object)
        return np.where(values == None, "", values).astype(object)  # noqa: E711

    def take(self, index: np.ndarray) -> ClickColumns:
        """The clicks at ``index`` (a sorted integer array or boolean mask)."""
        return ClickColumns(
            click_id=self.click_id[index],
            ts=self.ts[index],
            user_id=self.user_id[index],
            ip=self.ip[index],
            session_id=self.session_id[index],
            user_agent=self.user_agent[index],
            logged_in=self.logged_in[index],
            optional={k: v[index] for k, v in self.optional.items()},
            context={k: v[index] for k, v in self.context.items()},
            extra={k: v[index] for k, v in self.extra.items()},
        )
