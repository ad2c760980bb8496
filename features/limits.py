"""Caps on what one click's strings can cost the features, applied before any parse, hash
or cache.

A click may carry strings of up to 4096 characters (``events.schemas.MAX_FIELD_CHARS``)
and a context of any number of keys of any length within the 64 KB message. Parsing a
user agent costs time in proportion to its length (ua-parser and the crawler patterns:
17-21 ms a click for a unique 4 KB agent, ~3 ms at 512 characters, ~1 ms for a usual
one), and every encoder caches
its answers per string, so unbounded strings would make both the time per click and the
caches' memory unbounded. So the features read:

- the first ``MAX_USER_AGENT_CHARS`` (512) characters of the user agent: real agents are
  shorter, and a marker beyond them (a crawler's name, say) is not seen;
- the first ``MAX_CONTEXT_VALUE_CHARS`` (128) characters of each ad-context value
  (``ad_id``, ``advertiser_id``, ``placement``, ``query`` and ``context`` values);
- ``context`` keys of at most ``MAX_CONTEXT_KEY_CHARS`` (64) characters, longer ones are
  ignored (truncating them could merge two keys);
- at most ``MAX_CONTEXT_KEYS`` (16) of those keys, the first in key order.

No feature says that a click was cut: the feature vector keeps its width. The combination
counters (``features.definitions.combo_entity``) read the click as it came: they digest
long values already, and cache the digests of values up to 512 characters only. Both
feature paths apply the same caps (the per-event one through ``bounded_click``, the
vectorised one in ``features.batch``), tested in ``tests/features/test_limits.py``.

With every cached key capped, the encoders' caches are bounded in bytes: ~540 MiB at
most together, if every entry held strings of its own at their caps (bytes per entry
under ``tracemalloc`` times entries: the agent caches ~200 MiB, the context caches
~340 MiB), where strings of 4096 characters and contexts of any width could fill them
with several GiB before (262,144 hashed values of 4 KB alone: 1 GiB). Real traffic
repeats its strings and keeps far less.

Distinct sets (``features.windows.DISTINCTS``: IPs and sessions per user, users and
sessions per IP) hold at most ``MAX_DISTINCT_MEMBERS`` (64) members each. A set that is
full takes no new member, so a feature reads ``min(distinct members in its window, 64)``
exactly, on both paths (the offline one clips its running count), and its state is
bounded whatever one user or IP sends: a user id that rotates sessions or IPs used to
grow its record, read and rewritten every batch, with every click. Members longer than
``MAX_DISTINCT_MEMBER_CHARS`` (64) enter as a digest (``distinct_member``), which counts
them apart as exactly as the values would, so a set holds at most ~4 KB of members.
"""

from __future__ import annotations

import hashlib

from features.context import CONTEXT_FIELDS

MAX_USER_AGENT_CHARS = 512
MAX_CONTEXT_VALUE_CHARS = 128
MAX_CONTEXT_KEY_CHARS = 64
MAX_CONTEXT_KEYS = 16
# 64: far above what a person shows in a window (a handful of IPs and sessions a day; a
# household or office NAT a few dozen users an hour), so a saturated set already says
# "not one person", and log1p barely tells 64 from more. Sets of up to 128 small members
# stay in Valkey's compact listpack encoding (``set-max-listpack-entries``), and a user's
# RocksDB record, rewritten every batch that holds the user, stays a few KB.
MAX_DISTINCT_MEMBERS = 64
MAX_DISTINCT_MEMBER_CHARS = 64


def distinct_member(value: str) -> str:
    """``value`` as a member of a distinct set: itself when at most
    ``MAX_DISTINCT_MEMBER_CHARS`` long, else ``#`` and its 128-bit BLAKE2b digest, which
    tells values apart as they are (a shorter value equal to it would be a preimage)."""
    if len(value) <= MAX_DISTINCT_MEMBER_CHARS:
        return value
    # Not cached: a few us for 4 KB, and a cache of long values would need a byte bound.
    return "#" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def bounded_context(context: dict[str, str]) -> dict[str, str]:
    """``context`` as the features read it (see the module docstring): the same dict when
    it is within every cap."""
    if _context_within_caps(context):
        return context
    keys = sorted(k for k in context if len(k) <= MAX_CONTEXT_KEY_CHARS)[:MAX_CONTEXT_KEYS]
    return {k: context[k][:MAX_CONTEXT_VALUE_CHARS] for k in keys}


def bounded_click(click: dict) -> dict:
    """``click`` as the features read it (see the module docstring): the same dict when it
    is within every cap, which is the usual case, else a copy with the strings cut.

    A parsed click (``events.schemas.parse_click``): strings or absent, context values
    strings. The check runs for every click: plain comparisons, ~0.4 us a click (timeit,
    2-core host; builtins such as ``max(map(len, ...))`` took three times as long)."""
    get = click.get
    user_agent = get("user_agent")
    if user_agent is not None and len(user_agent) > MAX_USER_AGENT_CHARS:
        return _cut(click)
    for value in map(get, CONTEXT_FIELDS):
        if value is not None and len(value) > MAX_CONTEXT_VALUE_CHARS:
            return _cut(click)
    context = get("context")
    if context and not _context_within_caps(context):
        return _cut(click)
    return click


def _context_within_caps(context: dict[str, str]) -> bool:
    if len(context) > MAX_CONTEXT_KEYS:
        return False
    for key, value in context.items():
        if len(key) > MAX_CONTEXT_KEY_CHARS or len(value) > MAX_CONTEXT_VALUE_CHARS:
            return False
    return True


def _cut(click: dict) -> dict:
    """A copy of ``click`` with every string the features read cut to its cap."""
    get = click.get
    bounded = dict(click)
    user_agent = get("user_agent")
    if user_agent is not None:
        bounded["user_agent"] = user_agent[:MAX_USER_AGENT_CHARS]
    for name in CONTEXT_FIELDS:
        value = get(name)
        if value:
            bounded[name] = value[:MAX_CONTEXT_VALUE_CHARS]
    context = get("context")
    if context:
        bounded["context"] = bounded_context(context)
    return bounded
