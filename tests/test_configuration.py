"""Configuration accepts the forms people type and refuses the rest with a UsageError."""

from __future__ import annotations

from typing import Any

import pytest

from cprfsm import Configuration, MemoryBackend, UsageError, check


def test_memory_takes_a_backend_string() -> None:
    """``memory="file,share=on"`` is the backend that string parses to."""
    config = Configuration(memory="file,share=on,path=/dev/shm/ram0")
    assert config.memory == MemoryBackend.parse("file,share=on,path=/dev/shm/ram0")
    assert Configuration(memory=config.memory).memory is config.memory


def test_one_device_name_is_a_one_item_tuple() -> None:
    """``devices="vfio"`` means one vfio device, not the devices v, f, i and o."""
    assert Configuration(devices="vfio").devices == ("vfio",)
    assert Configuration(devices="qcow2,node=disk0").devices == ("qcow2,node=disk0",)
    assert Configuration(devices=["vfio", "qcow2"]).devices == ("vfio", "qcow2")
    one = check(Configuration(mode="cpr-reboot", devices="vfio"), qemu="10.0")
    listed = check(Configuration(mode="cpr-reboot", devices=("vfio",)), qemu="10.0")
    assert one == listed
    assert not one.allowed


def test_one_capability_name_is_a_one_item_set() -> None:
    """``capabilities="x-ignore-shared"`` is the set holding that capability."""
    config = Configuration(capabilities="x-ignore-shared")
    assert config.capabilities == frozenset({"x-ignore-shared"})
    assert Configuration(capabilities=["x-ignore-shared"]).capabilities == config.capabilities


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"memory": 64}, "memory takes a backend string"),
        ({"memory": None}, "memory takes a backend string"),
        ({"devices": 3}, "devices takes a name or a collection of names"),
        ({"devices": b"vfio"}, "devices takes a name"),
        ({"devices": ["vfio", 1]}, "devices takes a name"),
        ({"devices": {"vfio": True}}, "devices takes a name"),
        ({"capabilities": True}, "capabilities takes a name"),
        ({"capabilities": {"x-ignore-shared": True}}, "capabilities takes a name"),
        ({"capabilities": frozenset({1})}, "capabilities takes a name"),
        ({"parameters": ["multifd-compression"]}, "parameters takes a dict"),
        ({"host": "userfaultfd"}, "host takes a dict"),
        ({"host": {1: True}}, "host takes a dict"),
        ({"mode": None}, "mode takes a string such as 'cpr-reboot'"),
        ({"runstate": ("paused",)}, "runstate takes a string"),
        ({"uri": 5}, "uri takes a string"),
        ({"was_suspended": "yes"}, "was_suspended takes True or False"),
        ({"aux_ram_share": 1}, "aux_ram_share takes True or False"),
        ({"cpr_channel": 5}, "cpr_channel takes a unix: URI"),
    ],
)
def test_other_types_are_usage_errors_saying_what_to_pass(
    fields: dict[str, Any], says: str
) -> None:
    """A value of the wrong type raises UsageError naming the field and a form it takes."""
    with pytest.raises(UsageError, match=says):
        Configuration(**fields)
