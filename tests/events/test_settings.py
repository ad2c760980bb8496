"""Settings from ``SLIDR_*`` variables and flags: types, precedence, and a bad value that
names the setting it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from events.settings import Settings, SettingsError


def test_values_from_the_environment_get_their_field_s_type(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "SLIDR_PARTITIONS": " 8 ",
            "SLIDR_LOG_FEATURES": "yes",
            "SLIDR_PRODUCER_IDEMPOTENCE": "0",
            "SLIDR_REGISTRY": str(tmp_path / "reg" / ".." / "registry"),
            "SLIDR_TOPIC_PREFIX": "t1-",
            "SLIDR_REDIS_URL": "unix:///tmp/valkey.sock",
            "OTHER_PARTITIONS": "99",  # not ours
        }
    )
    assert settings.partitions == 8
    assert settings.log_features is True and settings.producer_idempotence is False
    assert settings.registry == (tmp_path / "registry").resolve()
    assert settings.topic("clicks") == "t1-clicks"
    assert settings.redis_url == "unix:///tmp/valkey.sock"
    assert Settings.from_env({}) == Settings()  # nothing set: the defaults


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("TRUE", True), ("on", True), ("false", False), ("No", False), ("", False)],
)
def test_booleans_read_the_usual_spellings(text: str, value: bool) -> None:
    assert Settings.from_env({"SLIDR_LOG_FEATURES": text}).log_features is value


def test_flags_override_the_environment_and_none_means_not_given() -> None:
    env = {"SLIDR_BATCH_SIZE": "100", "SLIDR_GROUP_ID": "from-env"}
    settings = Settings.from_env(env, batch_size=250, group_id=None)
    assert settings.batch_size == 250 and settings.group_id == "from-env"
    assert Settings.from_env(env, log_features=True).log_features is True


def test_every_setting_can_be_set_from_its_variable(tmp_path: Path) -> None:
    valid = {int: "4321", float: "12.5", bool: "true", Path: str(tmp_path), str: "SSL"}
    for field in dataclasses.fields(Settings):
        if field.name.startswith("_"):
            continue
        kinds = {"int": int, "float": float, "bool": bool, "Path": Path, "str": str}
        kind = kinds[str(field.type)]
        text = valid[kind]
        if field.name == "faust_transport":
            text = "confluent"
        if field.name == "redis_mode":
            text = "cluster"
        if field.name == "redis_slot_groups":
            text = "64"  # at most 1024
        if field.name == "redis_url":
            text = "rediss://cache:6380/0"
        if field.name == "group_membership":
            text = "static"
        if kind is bool and getattr(Settings(), field.name) is True:
            text = "false"  # on by default: switching it off is the change
        settings = Settings.from_env({f"SLIDR_{field.name.upper()}": text})
        assert getattr(settings, field.name) != getattr(Settings(), field.name), field.name


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("SLIDR_PARTITIONS", "four"),
        ("SLIDR_BATCH_SIZE", "5e2"),
        ("SLIDR_LOG_FEATURES", "maybe"),
        ("SLIDR_METRICS_PORT", "9090.5"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_variable(variable: str, text: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable} has an invalid value '{text}'"):
        Settings.from_env({variable: text})


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="^--batch-wait-ms has an invalid value 'soon'"):
        Settings.from_env({"SLIDR_BATCH_WAIT_MS": "5"}, batch_wait_ms="soon")


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("SLIDR_PARTITIONS", "0", "SLIDR_PARTITIONS must be at least 1"),
        ("SLIDR_BATCH_SIZE", "-3", "SLIDR_BATCH_SIZE must be at least 1"),
        ("SLIDR_BATCH_RETRIES", "-1", "SLIDR_BATCH_RETRIES must not be negative"),
        ("SLIDR_LINGER_MS", "-1", "SLIDR_LINGER_MS must not be negative"),
        ("SLIDR_DECISION_LINGER_MS", "-5", "SLIDR_DECISION_LINGER_MS must not be negative"),
        ("SLIDR_SESSION_TIMEOUT_MS", "999", "SLIDR_SESSION_TIMEOUT_MS must be at least 1000"),
        ("SLIDR_REDIS_URL", "localhost:6379", "SLIDR_REDIS_URL must start with redis://"),
        ("SLIDR_FAUST_TRANSPORT", "kafka", "SLIDR_FAUST_TRANSPORT must be aiokafka or"),
        ("SLIDR_KAFKA_SECURITY_PROTOCOL", "sasl_ssl", "SLIDR_KAFKA_SECURITY_PROTOCOL must be"),
    ],
)
def test_a_value_out_of_range_names_its_variable(variable: str, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{message}"):
        Settings.from_env({variable: text})


def test_settings_errors_are_value_errors() -> None:
    # Callers that predate SettingsError catch ValueError.
    assert issubclass(SettingsError, ValueError)


def test_the_description_lists_every_setting_and_masks_secrets() -> None:
    settings = Settings(kafka_sasl_password="hunter2", redis_password="s3cret", group_id="g1")
    text = settings.describe()
    assert "hunter2" not in text and "s3cret" not in text
    assert "  kafka_sasl_password = ***" in text and "  group_id = g1" in text
    assert "  redis_password = ***" in text
    names = [line.split(" = ")[0].strip() for line in text.splitlines()]
    assert names == [f.name for f in dataclasses.fields(Settings) if not f.name.startswith("_")]
    assert "redis_password = \n" in Settings().describe() + "\n"  # an empty secret shows empty


def test_settings_are_frozen_and_replace_makes_a_new_one() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.partitions = 2  # type: ignore[misc]
    changed = settings.replace(partitions=2)
    assert changed.partitions == 2 and settings.partitions == 4


def test_home_defaults_to_slidr_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLIDR_HOME", str(tmp_path))
    assert Settings().home == tmp_path.resolve()
    monkeypatch.delenv("SLIDR_HOME")
    monkeypatch.chdir(tmp_path)
    assert Settings().home == tmp_path.resolve() / "var"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://app:hunter2@cache.example:6380/0", "rediss://app:***@cache.example:6380/0"),
        ("redis://:hunter2@cache.example/1", "redis://:***@cache.example/1"),
        (
            "redis://cache.example:6379/0?password=hunter2",
            "redis://cache.example:6379/0?password=***",
        ),
        ("unix://:hunter2@/run/valkey.sock?db=2", "unix://:***@/run/valkey.sock?db=2"),
        ("redis://cache.example:6379/0", "redis://cache.example:6379/0"),
    ],
)
def test_passwords_in_a_redis_url_never_show(url: str, shown: str) -> None:
    settings = Settings.from_env({"SLIDR_REDIS_URL": url, "SLIDR_KAFKA_SASL_PASSWORD": "pw-9f3"})
    for text in (settings.describe(), repr(settings), str(settings)):
        assert "hunter2" not in text and "pw-9f3" not in text
    assert f"  redis_url = {shown}" in settings.describe()
    assert settings.redis_url == url  # only what is shown is masked


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(SettingsError, match="SLIDR_REDIS_URL must start with") as caught:
        Settings.from_env({"SLIDR_REDIS_URL": "http://app:hunter2@cache.example:6379"})
    assert "hunter2" not in str(caught.value) and "app:***@cache.example" in str(caught.value)


def test_the_metrics_endpoint_is_local_unless_opened() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    assert Settings.from_env({"SLIDR_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"
    with pytest.raises(SettingsError, match="^SLIDR_METRICS_HOST must not be empty"):
        Settings.from_env({"SLIDR_METRICS_HOST": " "})


def test_the_rfm_cache_size_is_positive() -> None:
    assert Settings.from_env({"SLIDR_RFM_CACHE_SIZE": "5000"}).rfm_cache_size == 5000
    with pytest.raises(SettingsError, match="^SLIDR_RFM_CACHE_SIZE must be at least 1"):
        Settings.from_env({"SLIDR_RFM_CACHE_SIZE": "0"})


def test_the_future_skew_bound_is_read_from_the_environment_and_validated() -> None:
    assert Settings().max_future_skew_s == 300.0
    settings = Settings.from_env({"SLIDR_MAX_FUTURE_SKEW_S": "30.5"})
    assert settings.max_future_skew_s == 30.5
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SettingsError, match="SLIDR_MAX_FUTURE_SKEW_S"):
            Settings.from_env({"SLIDR_MAX_FUTURE_SKEW_S": bad})
