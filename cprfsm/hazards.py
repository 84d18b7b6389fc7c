"""Data-loss hazards: every way the next step of a plan can lose guest data, before it happens.

These are cprfsm's rules, not QEMU's: QEMU accepts each of these steps and the
guest's data is silently gone (or silently costs time) later.  The lifecycle
machine records each hazard as an event before the step, or refuses the step
in strict mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable

    from cprfsm.executor import RamBlock
    from cprfsm.lifecycle import VmState

__all__ = ["Hazard", "hazards_of"]


@attrs.frozen(kw_only=True)
class Hazard:
    """One hazard: its rule id, what is at stake, and what to change.

    ``loses_data`` is False for a hazard that only costs (time, space).
    """

    rule: str
    detail: str
    hint: str
    loses_data: bool = True


def hazards_of(  # noqa: PLR0913 - each input is one fact a rule reads
    step: str,
    state: VmState,
    *,
    blocks: tuple[RamBlock, ...],
    volatile: Callable[[str], bool],
    uri: str | None = None,
    skipped: frozenset[str] = frozenset(),
) -> tuple[Hazard, ...]:
    """The hazards of ``step`` (migrate, quit, reboot_host, start) from ``state``.

    ``blocks`` are the guest's RAM blocks, ``skipped`` the ones a save would
    leave in place (x-ignore-shared), ``volatile`` tells whether a path is on a
    filesystem a reboot wipes.
    """
    found: list[Hazard] = []
    if step == "migrate" and uri is not None:
        path = _file_path(uri)
        if path is not None and volatile(path):
            found.append(_volatile_state_file(uri))
        in_place = [b.path for b in blocks if b.name in skipped and b.path]
        found.extend(_volatile_ram(p) for p in in_place if volatile(p))
        if "x-ignore-shared" in state.capabilities:
            copied = [b.name for b in blocks if b.shared and not b.named_file]
            if copied:
                found.append(
                    Hazard(
                        rule="ignore-shared-not-skipped",
                        detail=f"x-ignore-shared does not skip {', '.join(copied)}: only a shared "
                        "memory-backend-file is left in place, so this RAM is written anyway",
                        hint="back guest RAM with memory-backend-file,share=on to skip it",
                        loses_data=False,
                    )
                )
        disks = [d for d in state.devices if d != "vfio"]
        if disks and state.mode == "cpr-reboot":
            found.append(
                Hazard(
                    rule="disks-must-not-change",
                    detail=f"the guest's disks ({', '.join(disks)}) must stay unmodified until "
                    "the restore: cpr-reboot does not copy them",
                    hint="do not write to the disk images until the new QEMU has loaded the state",
                    loses_data=False,
                )
            )
    saved = state.state_file(state.current_save) if state.current_save else None
    if step == "reboot_host" and saved is not None:
        path = _file_path(saved.uri)
        if path is not None and volatile(path):
            found.append(_volatile_state_file(saved.uri))
        found.extend(_volatile_ram(p) for p in saved.ram_in_place if volatile(p))
    if step == "start" and saved is not None and saved.ram_in_place:
        found.append(
            Hazard(
                rule="saved-ram-reused",
                detail=f"a fresh boot writes into {', '.join(saved.ram_in_place)}, "
                f"which holds the RAM of the save at {saved.uri}",
                hint="start QEMU with -incoming to restore the save first",
            )
        )
    return tuple(found)


def _volatile_state_file(uri: str) -> Hazard:
    return Hazard(
        rule="state-file-volatile",
        detail=f"the state file {uri} is on a filesystem a host reboot wipes",
        hint="write the state file to a persistent filesystem",
    )


def _volatile_ram(path: str) -> Hazard:
    return Hazard(
        rule="ignore-shared-volatile-ram",
        detail=f"with x-ignore-shared the guest's RAM stays in {path}, on a filesystem a "
        "host reboot wipes",
        hint="keep the RAM file on a persistent filesystem (DAX, pmem), or drop x-ignore-shared",
    )


def _file_path(uri: str) -> str | None:
    scheme, _, rest = uri.partition(":")
    return rest.split(",")[0] if scheme == "file" else None
