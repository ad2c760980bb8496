"""The command modules without a broker: flag types, the flags that reach the domain's
config objects, the retrain history table, and the help of every command."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from events.errors import UsageError
from lifecycle.monitor import MonitorConfig, RollbackPolicy
from slidr.cli import build_parser
from slidr.commands.flags import (
    archive_kinds,
    comma_separated,
    parse_limit,
    parse_min_coverage,
    parse_when,
)
from slidr.commands.lifecycle import format_history, monitor_config, replay_options
from slidr.commands.stream import faust_transports


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_flag_parsers() -> None:
    assert parse_when("2026-11-07T06:00") == at("2026-11-07T06:00:00")
    assert parse_when("1700000000") == 1_700_000_000.0
    assert parse_limit("max-score-psi=0.3") == ("max_score_psi", 0.3)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown guardrail limit"):
        parse_limit("max_everything=1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected epoch seconds"):
        parse_when("next tuesday")


def test_list_flags() -> None:
    assert comma_separated(" a, b,,c ") == ("a", "b", "c") and comma_separated("") == ()
    assert archive_kinds("clicks, decisions") == ("clicks", "decisions")
    assert faust_transports("aiokafka,confluent") == ("aiokafka", "confluent")
    for parse, bad in (
        (archive_kinds, "clicks,views"),
        (archive_kinds, ""),
        (faust_transports, "x"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match="expected some of"):
            parse(bad)


def test_min_coverage() -> None:
    assert parse_min_coverage("0.5") == 0.5
    assert parse_min_coverage("desktop/logged_out=0.8, mobile/logged_out=0.7") == {
        "desktop/logged_out": 0.8,
        "mobile/logged_out": 0.7,
    }
    for bad in ("1.5", "desktop=2", "most"):
        with pytest.raises(UsageError, match="--min-coverage"):
            parse_min_coverage(bad)


def test_history_table() -> None:
    runs = [
        {
            "started_at": at("2026-11-07T06:00:00"),
            "outcome": "promoted",
            "version": "v0002",
            "active_after": "v0002",
            "window": {"from": "2026-11-01", "to": "2026-11-05"},
            "data": {"fingerprint": "ab" * 32, "first_day": "2026-11-02", "last_day": "2026-11-05"},
            "guardrails": [
                {"name": "min_clicks", "passed": True},
                {"name": "score_psi", "passed": True},
            ],
        },
        {
            "started_at": at("2026-11-08T06:00:00"),
            "outcome": "rejected",
            "version": None,
            "active_after": "v0002",
            "window": {"from": "2026-11-02", "to": "2026-11-06"},
            "data": {},
            "guardrails": [{"name": "purchase_label_density", "passed": False}],
        },
    ]
    lines = format_history(runs).splitlines()
    assert lines[0].startswith("when (UTC)") and len(lines) == 4
    assert (
        "promoted" in lines[2]
        and "2026-11-02..2026-11-05" in lines[2]
        and "abababababab" in lines[2]
    )
    assert "2/2 passed" in lines[2]
    assert "rejected" in lines[3] and "failed: purchase_label_density" in lines[3]


def test_command_line_flags_reach_the_detector_and_the_policy() -> None:
    args = build_parser().parse_args(
        [
            "monitor",
            "--window",
            "800",
            "--ivr-factor",
            "1.5",
            "--spike-share",
            "0.8",
            "--no-rollback",
            "--rollback-within-hours",
            "2",
        ]
    )
    config, policy = monitor_config(args)
    assert (config.window_decisions, config.ivr_factor, config.spike_share) == (800, 1.5, 0.8)
    assert config.min_decisions == MonitorConfig().min_decisions
    assert policy == RollbackPolicy(enabled=False, within_s=7200.0)
    assert callable(args.func)


def test_replay_flags_reach_the_options() -> None:
    from lifecycle.replay import ReplayError

    args = build_parser().parse_args(
        ["replay", "--since", "2026-11-02", "--to-offset", "0:5,1:7", "--partitions", "0,1"]
    )
    options = replay_options(args)
    assert options.since == at("2026-11-02T00:00:00") and options.until is None
    assert options.to_offset == {0: 5, 1: 7} and options.partitions == (0, 1)
    assert options.compare and not options.dry_run
    with pytest.raises(ReplayError, match="give a range"):
        replay_options(build_parser().parse_args(["replay"]))
    with pytest.raises(UsageError, match="--partitions"):
        replay_options(build_parser().parse_args(["replay", "--since", "1", "--partitions", "x"]))


def test_every_subcommand_has_help_and_a_hidden_debug_flag(capsys) -> None:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in action.choices.items():
        text = command.format_help()
        assert text.startswith(f"usage: slidr {name}") and "--debug" not in text, name
        assert parser.parse_args([name, "--debug", *_required(name)]).debug is True
        assert parser.parse_args(["--debug", name, *_required(name)]).debug is True
        assert parser.parse_args([name, *_required(name)]).debug is False
    assert "--debug" in parser.format_help()


def _required(command: str) -> list[str]:
    """The least each command needs to parse."""
    return {
        "simulate": ["--out", "o"],
        "train": ["--data", "d"],
        "evaluate": ["--data", "d"],
        "score": ["--data", "d", "--out", "o.jsonl"],
        "import": ["src.csv", "--out", "o"],
        "produce": ["--data", "d"],
        "promote": ["v0001"],
        "archive-export": ["--start-day", "2026-11-02", "--out", "o"],
    }.get(command, [])


def test_promote_refuses_a_version_whose_guardrails_failed_unless_forced(
    stream_settings, tmp_path, monkeypatch, capsys
) -> None:
    from events.errors import EXIT_ERROR
    from models.registry import ModelRegistry
    from models.testing import register_logistic_model
    from slidr.cli import main

    registry = ModelRegistry(tmp_path / "registry")
    register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0)
    rejected = register_logistic_model(registry, {}, bias=0.0, guardrails_passed=False)
    monkeypatch.setenv("SLIDR_KAFKA_BOOTSTRAP", stream_settings.kafka_bootstrap)
    monkeypatch.setenv("SLIDR_TOPIC_PREFIX", stream_settings.topic_prefix)
    monkeypatch.setenv("SLIDR_REGISTRY", str(registry.root))
    monkeypatch.setenv("SLIDR_HOME", str(tmp_path / "home"))

    assert main(["promote", rejected]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slidr promote: error: ")
    assert "guardrails did not pass" in err[0] and f"slidr promote {rejected} --force" in err[0]
    assert registry.active_version() == "v0001"

    assert main(["promote", rejected, "--force", "--reason", "incident 42"]) == 0
    out = capsys.readouterr().out
    assert f"active: {rejected}" in out and "incident 42 [forced: guardrails failed" in out
    record = registry.active_record()
    assert (record.version, record.forced) == (rejected, True)
    assert main(["promote", "v0001"]) == 0
    capsys.readouterr()
    assert main(["rollback", "--to", rejected]) == EXIT_ERROR
    assert "--force" in capsys.readouterr().err
