"""Caps on what a click's strings cost the features (``features.limits``): what is read of
a long user agent and of a long or wide ad context, the same on both feature paths, and
caches that hold a bounded prefix of each string, not the string."""

from __future__ import annotations

import gc
import random
import string
import tracemalloc

import numpy as np
import orjson

from data.dataset import clicks_from_rows
from events.schemas import parse_click
from features.batch import compute_features
from features.definitions import FEATURE_NAMES, ID_COLUMN, ClickFeaturizer
from features.limits import (
    MAX_CONTEXT_KEY_CHARS,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_CHARS,
    MAX_USER_AGENT_CHARS,
    bounded_click,
)
from features.store import MemoryStore
from features.useragent import parse_user_agent

START = 1_762_041_600.0
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0 Safari/537.36"
)


def _padding(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ;/") for _ in range(n))


def _features(click: dict) -> np.ndarray:
    """The click's features on fresh state (the counters are the same for every click)."""
    featurizer = ClickFeaturizer(MemoryStore(), MemoryStore())
    return featurizer.featurize([parse_click(click)]).matrix[0]


def _click(**fields: object) -> dict:
    click = {"click_id": "c1", "ts": START, "user_id": "u1", "ip": "10.0.0.1"}
    click.update(fields)
    return click


def test_a_user_agent_is_read_on_its_first_characters_only() -> None:
    # A crawler's name beyond the cap is not seen: what is read of an agent is bounded.
    head = CHROME + " " + _padding(MAX_USER_AGENT_CHARS, random.Random(1))
    agent = head[:MAX_USER_AGENT_CHARS] + " Googlebot/2.1 (+http://www.google.com/bot.html)"
    assert len(agent) <= 4096  # the longest agent a click may carry (events.schemas)
    assert parse_user_agent(agent) == parse_user_agent(agent[:MAX_USER_AGENT_CHARS])
    assert not parse_user_agent(agent).is_crawler
    got = _features(_click(user_agent=agent))
    assert got[FEATURE_NAMES.index("ua_crawler")] == 0.0
    np.testing.assert_array_equal(got, _features(_click(user_agent=agent[:MAX_USER_AGENT_CHARS])))


def test_ad_context_values_keys_and_their_number_are_capped() -> None:
    rng = random.Random(2)
    long_value = "v" + _padding(MAX_CONTEXT_VALUE_CHARS + 300, rng)
    long_key = "k" * (MAX_CONTEXT_KEY_CHARS + 1)
    wide = {f"key{i:03d}": f"value{i}" for i in range(MAX_CONTEXT_KEYS + 8)}
    click = _click(
        ad_id=long_value,
        query=long_value,
        context={**wide, "app": long_value, long_key: "ignored"},
    )
    bounded = bounded_click(parse_click(click))
    kept = sorted([*wide, "app"])[:MAX_CONTEXT_KEYS]
    assert sorted(bounded["context"]) == kept
    assert bounded["context"]["app"] == long_value[:MAX_CONTEXT_VALUE_CHARS]
    assert bounded["ad_id"] == bounded["query"] == long_value[:MAX_CONTEXT_VALUE_CHARS]
    # The features read exactly that.
    cut = _click(
        ad_id=long_value[:MAX_CONTEXT_VALUE_CHARS],
        query=long_value[:MAX_CONTEXT_VALUE_CHARS],
        context={k: bounded["context"][k] for k in kept},
    )
    np.testing.assert_array_equal(_features(click), _features(cut))


def test_a_click_within_the_caps_is_read_as_it_is() -> None:
    click = parse_click(
        _click(user_agent=CHROME, ad_id="ad-1", query="running shoes", context={"app": "3"})
    )
    assert bounded_click(click) is click


def _hostile_rows(n: int) -> list[dict]:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        kind = i % 4
        click = _click(click_id=f"c{i}", ts=START + 7.0 * i, user_id=f"u{i % 5}")
        click["context"] = {"app": str(i % 3)}
        if kind == 0:
            click["user_agent"] = CHROME + _padding(rng.randrange(400, 900), rng)
        elif kind == 1:
            click["context"].update({f"k{j:02d}": f"v{rng.randrange(3)}" for j in range(40)})
            click["context"]["x" * 70] = "long key"
        elif kind == 2:
            click["query"] = "shoes " + _padding(rng.randrange(200, 400), rng)
            click["context"]["site"] = "s" + _padding(rng.randrange(240, 300), rng)
        else:
            click["user_agent"] = CHROME
            click["ad_id"] = f"ad{i % 7}"
        rows.append(parse_click(click))
    return rows


def test_both_feature_paths_apply_the_same_caps() -> None:
    rows = _hostile_rows(120)
    cols = clicks_from_rows(rows)
    expected, expected_slices = compute_features(cols)
    out = ClickFeaturizer(MemoryStore(), MemoryStore()).featurize(
        [cols.row(i) for i in range(len(cols))]
    )
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(out.matrix[:, j], expected[:, j], atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(out.matrix[:, ID_COLUMN:], expected[:, ID_COLUMN:])
    assert out.slices == list(expected_slices)


def test_unique_long_strings_leave_a_bounded_prefix_in_the_caches() -> None:
    """What the feature caches keep of clicks with a 4 KB agent and a long, wide ad
    context is bounded by the caps, not by the strings' lengths."""
    rng = random.Random(4)
    featurizer = ClickFeaturizer(MemoryStore(), MemoryStore())
    n = 60
    messages = []  # as they come off the topic: the strings are made when parsed
    for i in range(n):
        context = {f"{_padding(100, rng)}": "x"}  # a key over the cap: not read
        context.update({f"k{j}": _padding(1000, rng) for j in range(3)})
        click = _click(
            click_id=f"c{i}",
            user_agent=CHROME + " " + _padding(3900, rng),
            ad_id=_padding(4000, rng),
            query=_padding(4000, rng),
            context=context,
        )
        messages.append(orjson.dumps(click))
    featurizer.featurize([parse_click(messages[0])])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        featurizer.featurize([parse_click(m) for m in messages[1:]])
        gc.collect()  # the clicks are gone: what is left is what the caches hold
        kept = (tracemalloc.get_traced_memory()[0] - before) / (n - 1)
    finally:
        tracemalloc.stop()
    # A click brings ~15,000 characters to these caches (21 KB were kept before the caps),
    # of which they may keep the first 512 of the agent and 128 of each ad-context value,
    # plus their own entries (~20 of them): 6.6 KB when this was written.
    assert kept < 9_000, f"{kept:.0f} bytes kept a click"
