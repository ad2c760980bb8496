"""One typed settings object per process, read from ``SLIDR_*`` environment variables.

Flags given on the command line override the environment. A bad value fails fast
with a message that names the setting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from events.errors import SlidrError

# SLIDR_GROUP_MEMBERSHIP values (README, Restarts).
GROUP_MEMBERSHIPS = ("fenced", "static", "dynamic")


class SettingsError(SlidrError, ValueError):
    """A setting has a value slidr cannot use; the message names the setting."""


def _default_home() -> Path:
    return Path(os.environ.get("SLIDR_HOME", "var")).resolve()


@dataclass(frozen=True)
class Settings:
    """Process settings. Every field maps to ``SLIDR_<FIELD>`` in upper case."""

    home: Path = field(default_factory=_default_home)  # local state: stack, tables, logs
    kafka_bootstrap: str = ""  # empty: the embedded stack's broker (from `slidr up`)
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    kafka_sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""
    redis_url: str = ""  # empty: the embedded stack's Valkey (from `slidr up`)
    redis_password: str = ""
    redis_key_prefix: str = "slidr:"  # prepended to every Redis key (isolates tests and tenants)
    redis_mode: str = "standalone"  # standalone, or cluster: SLIDR_REDIS_URL names a cluster node
    redis_slot_groups: int = 16  # cluster: hash tags a batch's keys are spread over (calls/batch)
    registry: Path = Path("var/registry")
    partitions: int = 4
    replication_factor: int = 1
    topic_prefix: str = ""  # prepended to every topic name (isolates tests and tenants)
    group_id: str = "slidr-worker"
    batch_size: int = 500  # clicks scored per micro-batch
    batch_wait_ms: int = 20  # longest wait to fill a micro-batch
    batch_retries: int = 2  # a failed micro-batch is tried again this often, then click by click
    # A click stamped more than this ahead of the worker's wall clock is dead-lettered:
    # one click from year 2999 would otherwise carry every watermark and expiry with it.
    max_future_skew_s: float = 300.0
    session_timeout_ms: int = 6000  # Tansu holds joins for half of it: keep it short
    fetch_wait_ms: int = 20  # Tansu does not wake long polls: short waits keep latency low
    # Producer lingers. Tansu's fetches slow down as a partition's stored batches pile
    # up (FINDINGS.md), so fewer, larger batches keep the end-to-end tail flat: at
    # 2,000 clicks/s for 30 s, click linger 5 / 10 / 20 / 30 ms gave p99 223 / 85-103 /
    # 83-84 / 80-85 ms, and decision linger 5 / 10 / 20 gave 106-127 / 88-96 / 77-85
    # (README).
    # On a real Kafka a few ms is the better choice for both.
    linger_ms: int = 20  # every producer but the worker's decisions (slidr produce, replay, bench)
    decision_linger_ms: int = 20  # the worker's decisions
    producer_idempotence: bool = False  # see stream/kafka.py: costly on the embedded broker
    faust_transport: str = "aiokafka"  # Faust's Kafka driver: aiokafka or confluent
    # How a restarted worker takes its place in the group (README, Restarts): "fenced"
    # removes its previous incarnation at start, "static" sends group.instance.id,
    # "dynamic" waits out the old member's session.
    group_membership: str = "fenced"
    instance_id: str = ""  # empty: <hostname>-<process slot>; unique within the group
    worker_processes: int = 0  # `slidr worker` processes on this host; 0: one per core
    metrics_port: int = 0  # 0: no Prometheus endpoint
    # The endpoint's address: loopback unless opened (it needs no credentials to read).
    metrics_host: str = "127.0.0.1"
    rfm_cache_size: int = 1_000_000  # customers the worker's RFM cache holds (LRU)
    log_features: bool = False  # publish served features for skew checks
    state_changelog: bool = True  # log user state to a topic; restore it on assignment
    model_version: str = ""  # empty: follow the registry's active version

    _SECRET = ("kafka_sasl_password", "redis_password")
    _URLS = ("redis_url",)  # may carry a password: shown through mask_url

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``SLIDR_*`` variables, then apply non-None overrides."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name.startswith("_"):
                continue
            name = f"SLIDR_{f.name.upper()}"
            if overrides.get(f.name) is not None:
                raw: Any = overrides[f.name]
                source = f"--{f.name.replace('_', '-')}"
            elif name in env:
                raw = env[name]
                source = name
            else:
                continue
            values[f.name] = _coerce(f, raw, source)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.partitions < 1:
            raise SettingsError(f"SLIDR_PARTITIONS must be at least 1, got {self.partitions}")
        if self.batch_size < 1:
            raise SettingsError(f"SLIDR_BATCH_SIZE must be at least 1, got {self.batch_size}")
        if self.batch_retries < 0:
            raise SettingsError(
                f"SLIDR_BATCH_RETRIES must not be negative, got {self.batch_retries}"
            )
        if not math.isfinite(self.max_future_skew_s) or self.max_future_skew_s < 0:
            raise SettingsError(
                "SLIDR_MAX_FUTURE_SKEW_S must be a finite number of seconds, at least 0, "
                f"got {self.max_future_skew_s}"
            )
        if self.rfm_cache_size < 1:
            raise SettingsError(
                f"SLIDR_RFM_CACHE_SIZE must be at least 1, got {self.rfm_cache_size}"
            )
        if not self.metrics_host.strip():
            raise SettingsError("SLIDR_METRICS_HOST must not be empty (127.0.0.1: local only)")
        for name in ("batch_wait_ms", "fetch_wait_ms", "linger_ms", "decision_linger_ms"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"SLIDR_{name.upper()} must not be negative, got {getattr(self, name)}"
                )
        if self.session_timeout_ms < 1000:
            raise SettingsError(
                f"SLIDR_SESSION_TIMEOUT_MS must be at least 1000, got {self.session_timeout_ms}"
            )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                "SLIDR_REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {mask_url(self.redis_url)!r}"
            )
        if self.redis_mode not in ("standalone", "cluster"):
            raise SettingsError(
                f"SLIDR_REDIS_MODE must be standalone or cluster, got {self.redis_mode!r}"
            )
        if not 1 <= self.redis_slot_groups <= 1024:
            raise SettingsError(
                f"SLIDR_REDIS_SLOT_GROUPS must be 1..1024, got {self.redis_slot_groups}"
            )
        if self.redis_mode == "cluster":
            if self.redis_url.startswith("unix://"):
                raise SettingsError(
                    "SLIDR_REDIS_MODE=cluster needs a redis:// or rediss:// SLIDR_REDIS_URL"
                )
            if any(brace in self.redis_key_prefix + self.topic_prefix for brace in "{}"):
                # The slot group's hash tag must be the first {...} in every key.
                raise SettingsError(
                    "SLIDR_REDIS_KEY_PREFIX must not contain { or } when SLIDR_REDIS_MODE=cluster"
                )
        if self.group_membership not in GROUP_MEMBERSHIPS:
            raise SettingsError(
                f"SLIDR_GROUP_MEMBERSHIP must be one of {', '.join(GROUP_MEMBERSHIPS)}, "
                f"got {self.group_membership!r}"
            )
        if self.instance_id and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.instance_id):
            raise SettingsError(
                "SLIDR_INSTANCE_ID may hold only letters, digits, '.', '_' and '-' "
                f"(at most 200), got {self.instance_id!r}"
            )
        if self.worker_processes < 0:
            raise SettingsError(
                "SLIDR_WORKER_PROCESSES must not be negative (0: one per core), "
                f"got {self.worker_processes}"
            )
        if self.faust_transport not in ("aiokafka", "confluent"):
            raise SettingsError(
                f"SLIDR_FAUST_TRANSPORT must be aiokafka or confluent, got {self.faust_transport!r}"
            )
        protocols = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        if self.kafka_security_protocol not in protocols:
            raise SettingsError(
                f"SLIDR_KAFKA_SECURITY_PROTOCOL must be one of {sorted(protocols)}, "
                f"got {self.kafka_security_protocol!r}"
            )

    def topic(self, name: str) -> str:
        """The full topic name for a logical topic (``clicks``, ``decisions``, ...)."""
        return f"{self.topic_prefix}{name}"

    def describe(self) -> str:
        """One line per setting, secrets masked: printed once when a process starts."""
        return "\n".join(f"  {name} = {value}" for name, value in self._shown())

    def __repr__(self) -> str:
        # Not the dataclass's own repr, which would print passwords wherever a Settings
        # lands in a log line or a traceback.
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self._shown())})"

    def _shown(self) -> list[tuple[str, Any]]:
        """Every setting's (name, value) with passwords masked."""
        shown = []
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name in self._SECRET and value:
                value = "***"
            elif f.name in self._URLS and value:
                value = mask_url(value)
            shown.append((f.name, value))
        return shown

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_PASSWORD_QUERY_KEYS = frozenset({"password", "pass", "pwd"})


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the one in ``user:password@`` (or
    ``:password@``) and a ``password=`` query parameter, which redis-py also reads.
    Anything that does not parse as a URL has its ``:...@`` part masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r":[^:/@]*@", ":***@", url)
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _PASSWORD_QUERY_KEYS for k, _ in pairs):
            masked = [(k, "***" if k.lower() in _PASSWORD_QUERY_KEYS else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).resolve()
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{source} has an invalid value {raw!r} (expected {kind})") from None
