"""Embedding ids: per-field hashed bucket indices, declared once, stable everywhere."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from events.schemas import parse_click
from features.context import HASH_DIM, id_bucket
from features.definitions import (
    DENSE_COLUMNS,
    EMBEDDINGS,
    FEATURE_NAMES,
    ID_COLUMN,
    ID_CONTEXT_KEYS,
    N_FEATURES,
    ClickFeaturizer,
    EmbeddingColumn,
    id_features,
)
from features.store import MemoryStore
from features.useragent import BROWSERS, DEVICES, OPERATING_SYSTEMS
from features.windows import COMBOS, COUNTS, DISTINCTS

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36"
)


def _ids(click: dict) -> dict[str, int]:
    return {c.name: i for c, i in zip(EMBEDDINGS, id_features(parse_click(click)), strict=True)}


def _click(**fields) -> dict:
    return {"click_id": "c", "ts": 1_762_041_600.0, "user_id": "u", "ip": "1.1.1.1", **fields}


def test_a_bucket_is_one_plus_crc32_of_field_and_value_zero_when_empty() -> None:
    assert id_bucket("ad_id", "ad42", 4096) == 1 + zlib.crc32(b"ad_id=ad42") % 4095
    assert id_bucket("ad_id", "", 4096) == 0
    assert id_bucket("ad_id", None, 4096) == 0
    assert id_bucket("placement", "ad42", 4096) != id_bucket("ad_id", "ad42", 4096)
    values = [id_bucket("context.app", str(v), 64) for v in range(5000)]
    assert min(values) == 1 and max(values) == 63  # never 0 for a value; all buckets used


def test_buckets_are_the_same_in_another_process() -> None:
    # crc32, unlike hash(), does not change with PYTHONHASHSEED
    code = "from features.context import id_bucket; print(id_bucket('context.app', '12', 1024))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."},
            cwd=Path(__file__).parents[2],
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert runs == {str(id_bucket("context.app", "12", 1024))}


def test_id_columns_are_declared_once_and_close_the_vector() -> None:
    assert all(isinstance(c, EmbeddingColumn) for c in EMBEDDINGS)
    assert FEATURE_NAMES[ID_COLUMN:] == tuple(c.name for c in EMBEDDINGS)
    assert set(DENSE_COLUMNS) == set(range(N_FEATURES)) - set(range(ID_COLUMN, N_FEATURES))
    tables = {c.table for c in EMBEDDINGS}
    assert {"ad_id", "advertiser_id", "placement", "query", "context_other", "ua_family"} <= tables
    assert {"context.app", "context.channel", "context.os", "context.device"} <= tables
    assert [c.name for c in EMBEDDINGS if c.table == "query"] == [
        "id_query_0",
        "id_query_1",
        "id_query_2",
    ]
    assert all(c.buckets >= 64 for c in EMBEDDINGS)


def test_the_earlier_columns_keep_their_positions() -> None:
    """Spec f1's columns come first and in f1's order; combination counts follow them."""
    f1 = []
    for spec in COUNTS:
        f1 += [spec.name, spec.previous_name] if spec.previous else [spec.name]
    f1 += ["u_gap_s", *(s.name for s in DISTINCTS)]
    f1 += ["hour_sin", "hour_cos", "dow_sin", "dow_cos", "logged_in", "ua_crawler", "ua_missing"]
    f1 += [f"device_{d}" for d in DEVICES] + [f"os_{o}" for o in OPERATING_SYSTEMS]
    f1 += [f"browser_{b}" for b in BROWSERS] + [f"ctx_{i}" for i in range(HASH_DIM)]
    assert len(f1) == 54 and FEATURE_NAMES[:54] == tuple(f1)
    combos = [name for c in COMBOS for name in c.names]
    assert FEATURE_NAMES[54:ID_COLUMN] == tuple(combos)


def test_query_tokens_are_lower_cased_and_only_the_first_three_count() -> None:
    a = _ids(_click(query="Running  SHOES for men"))
    b = _ids(_click(query="running shoes FOR"))
    assert [a[f"id_query_{i}"] for i in range(3)] == [b[f"id_query_{i}"] for i in range(3)]
    assert a["id_query_0"] == id_bucket("query", "running", 4096)
    c = _ids(_click(query="shoes"))
    assert c["id_query_0"] == a["id_query_1"] and c["id_query_1"] == c["id_query_2"] == 0
    assert _ids(_click(query="   "))["id_query_0"] == 0


def test_context_keys_with_tables_and_the_others_in_key_order() -> None:
    ids = _ids(_click(context={"zone": "z1", "app": "3", "campaign": "k", "site": "s", "os": ""}))
    assert ids["id_context_app"] == id_bucket("context.app", "3", dict(ID_CONTEXT_KEYS)["app"])
    assert ids["id_context_os"] == 0 and ids["id_context_publisher"] == 0
    # campaign, site (zone has no column left); an unknown key still gets a bucket
    assert ids["id_context_other_0"] == id_bucket("context.campaign", "k", 4096)
    assert ids["id_context_other_1"] == id_bucket("context.site", "s", 4096)
    assert _ids(_click(context={"zz": ""}))["id_context_other_0"] == 0


def test_a_talkingdata_click_has_context_ids_and_no_agent_ids() -> None:
    ids = _ids(_click(context={"app": "3", "os": "13", "device": "1", "channel": "245"}))
    assert all(ids[f"id_context_{k}"] > 0 for k in ("app", "os", "device", "channel"))
    assert ids["id_ua_family"] == ids["id_ua_os"] == ids["id_ua_device"] == 0
    assert ids["id_ad_id"] == ids["id_query_0"] == ids["id_context_other_0"] == 0
    web = _ids(_click(user_agent=CHROME))
    assert web["id_ua_family"] == id_bucket("ua_family", "Chrome", 512)
    assert web["id_ua_os"] == id_bucket("ua_os", "Windows", 256)


def test_id_columns_hold_exact_integers_within_their_tables() -> None:
    rng = np.random.default_rng(0)
    clicks = [
        parse_click(
            _click(
                click_id=f"c{i}",
                ad_id=f"ad{rng.integers(0, 10**6)}",
                query=f"q{i} w{i % 7}",
                context={"app": str(rng.integers(0, 10**6)), f"k{i % 5}": "v"},
                user_agent=CHROME if i % 2 else "",
            )
        )
        for i in range(2000)
    ]
    ids = ClickFeaturizer(MemoryStore(), MemoryStore()).featurize(clicks).matrix[:, ID_COLUMN:]
    assert np.array_equal(ids, np.round(ids))
    for j, column in enumerate(EMBEDDINGS):
        assert ids[:, j].min() >= 0 and ids[:, j].max() < column.buckets, column.name
