"""QEMU's option syntax as cprfsm reads it: comma lists, on/off switches, device specs."""

from __future__ import annotations

from cprfsm._files import NODE_NAME_LIMIT, check_name
from cprfsm.exceptions import UsageError


def split_options(spec: str) -> list[str]:
    """``spec`` split at single commas; ``,,`` stands for a comma inside a part (QEMU's rule)."""
    parts = [""]
    index = 0
    while index < len(spec):
        if spec.startswith(",,", index):
            parts[-1] += ","
            index += 2
        elif spec[index] == ",":
            parts.append("")
            index += 1
        else:
            parts[-1] += spec[index]
            index += 1
    return parts


def parse_switch(value: str, what: str) -> bool:
    """``on``/``true``/``yes`` or ``off``/``false``/``no``; anything else names ``what``."""
    if value in {"on", "true", "yes"}:
        return True
    if value in {"off", "false", "no"}:
        return False
    raise UsageError(f"{what} takes on or off, not {value!r}")


def parse_device(spec: str, index: int) -> tuple[str, str]:
    """Split ``NAME[,node=NODE]``; the node defaults to the name and its position."""
    name, *options = spec.split(",")
    node = f"{name}{index}"
    for option in options:
        key, sep, value = option.partition("=")
        if key != "node" or not sep or not value:
            raise UsageError(f"device {spec!r}: the only option is node=NAME")
        # The node names the device's image file and QEMU's block node: a name, never a path.
        node = check_name(value, "node name", context=f"device {spec!r}", limit=NODE_NAME_LIMIT)
    return name, node
