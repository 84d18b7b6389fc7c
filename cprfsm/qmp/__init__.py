"""The QMP executor: the lifecycle machine's commands carried out on a real QEMU.

Install the ``qmp`` extra (it brings the ``qemu.qmp`` library).  ``import
cprfsm`` never imports this package.

>>> from cprfsm.executor import Command, VmDefinition
>>> with QmpExecutor() as qemu:  # doctest: +SKIP
...     qemu.execute(Command(name="start", arguments={"definition": VmDefinition()})).runstate
'running'
"""

from __future__ import annotations

from cprfsm.qmp._argv import command_line, default_qemu
from cprfsm.qmp._executor import SETTLED_STATUSES, QmpExecutor, read_marker
from cprfsm.qmp._guest import (
    MARKER_ADDRESS,
    MARKER_LENGTH,
    MARKER_MAGIC,
    Guest,
    boot_sector,
    write_boot_image,
)

__all__ = [
    "MARKER_ADDRESS",
    "MARKER_LENGTH",
    "MARKER_MAGIC",
    "SETTLED_STATUSES",
    "Guest",
    "QmpExecutor",
    "boot_sector",
    "command_line",
    "default_qemu",
    "read_marker",
    "write_boot_image",
]
