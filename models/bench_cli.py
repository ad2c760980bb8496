"""What the model benchmarks' command lines share (``models.bench_real``,
``models.bench_proxy_lies``): seed lists, progress on stderr, figures written as JSON."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson


def progress_to_stderr(message: str) -> None:
    """Progress lines go to stderr, so that stdout holds only the figures."""
    print(message, file=sys.stderr, flush=True)


def parse_seeds(text: str) -> list[int]:
    """``"1-7"``, ``"3"`` or ``"1,4,9"`` as a list of distinct seeds, in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            span = range(int(first), int(last or first) + 1)
            if not span:
                raise ValueError(part)
            seeds.extend(s for s in span if s not in seeds)
    except ValueError:
        raise ValueError(f"--seeds: expected e.g. 1-7 or 1,3,5; got {text!r}") from None
    return seeds


def write_figures(path: Path, result: Any) -> None:
    """``result`` as indented JSON at ``path`` (its folder made); integer keys, such as
    seeds, become strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"figures: {path}")
