"""Instance ids, member records and the membership settings (``stream.membership``);
no broker. The fencing itself is tested on the embedded stack (test_fast_restart.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from events.settings import Settings, SettingsError
from stream.membership import (
    InstanceInUse,
    claim_instance,
    instance_id,
    member_record,
    read_member,
    static_instance_id,
    write_member,
)


def test_the_instance_id_is_the_setting_or_the_hostname_and_slot() -> None:
    assert instance_id(Settings(instance_id="pod-7")) == "pod-7"
    derived = instance_id(Settings(), slot=3)
    assert derived.endswith("-3")
    assert derived.startswith(socket.gethostname().split(".")[0][:5])
    assert instance_id(Settings(), slot=0) != derived


def test_only_static_membership_sends_a_group_instance_id() -> None:
    assert static_instance_id(Settings(group_membership="static", instance_id="a")) == "a"
    assert static_instance_id(Settings(group_membership="fenced", instance_id="a")) is None
    assert static_instance_id(Settings(group_membership="dynamic", instance_id="a")) is None


def test_the_member_record_is_per_group_and_instance(tmp_path: Path) -> None:
    a = member_record(Settings(home=tmp_path, group_id="g1", instance_id="a"))
    b = member_record(Settings(home=tmp_path, group_id="g1", instance_id="b"))
    other_group = member_record(Settings(home=tmp_path, group_id="g2", instance_id="a"))
    assert len({a, b, other_group}) == 3
    assert read_member(a) is None
    write_member(a, "a-1234")
    assert read_member(a) == "a-1234"
    write_member(a, "a-5678")  # replaced whole
    assert read_member(a) == "a-5678"
    assert read_member(b) is None
    assert [p.name for p in a.parent.iterdir()] == ["a"]  # no partial file left behind


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SLIDR_GROUP_MEMBERSHIP", "sticky", "SLIDR_GROUP_MEMBERSHIP must be one of"),
        ("SLIDR_INSTANCE_ID", "a b", "SLIDR_INSTANCE_ID may hold only"),
        ("SLIDR_INSTANCE_ID", "../x", "SLIDR_INSTANCE_ID may hold only"),
        ("SLIDR_WORKER_PROCESSES", "-1", "SLIDR_WORKER_PROCESSES must not be negative"),
    ],
)
def test_bad_membership_settings_fail_naming_the_setting(variable, value, words) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env({variable: value})


def test_membership_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SLIDR_GROUP_MEMBERSHIP": "static",
            "SLIDR_INSTANCE_ID": "host.example-1",
            "SLIDR_WORKER_PROCESSES": "3",
        }
    )
    assert (settings.group_membership, settings.instance_id, settings.worker_processes) == (
        "static",
        "host.example-1",
        3,
    )


def test_a_live_instance_id_cannot_be_claimed_twice_on_one_host(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, group_id="g", instance_id="a", group_membership="fenced")
    held = claim_instance(settings)
    assert held is not None
    with pytest.raises(InstanceInUse, match="SLIDR_INSTANCE_ID"):
        claim_instance(settings)
    other = claim_instance(settings.replace(instance_id="b"))  # another id is free
    assert other is not None
    other.close()
    held.close()  # as when the process ends (the kernel drops the lock, kill -9 too)
    again = claim_instance(settings)
    assert again is not None
    again.close()
    assert claim_instance(settings.replace(group_membership="dynamic")) is None
