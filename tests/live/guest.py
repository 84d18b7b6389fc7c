"""Hand-assembled 16-bit boot sectors used as guests by the QEMU harness."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"

# cli; hlt; jmp back to the hlt.  The vCPU idles, QEMU's runstate stays `running`.
_LOOP = bytes([0xFA, 0xF4, 0xEB, 0xFD])

# Enters ACPI S3 once.  CMOS byte 0x7E (unused by SeaBIOS) remembers that it did: on
# `system_wakeup` QEMU resets the machine, SeaBIOS finds no resume vector and reboots,
# and without the flag this sector would suspend the guest again.
_SUSPEND_ONCE = bytes(
    [
        0xFA,  # 00: cli
        0xB0, 0x7E,  # 01: mov al, 0x7e           ; CMOS index
        0xE6, 0x70,  # 03: out 0x70, al
        0xE4, 0x71,  # 05: in al, 0x71
        0x3C, 0xA5,  # 07: cmp al, 0xa5           ; already suspended once?
        0x74, 0x0B,  # 09: je 0x16
        0xB0, 0xA5,  # 0b: mov al, 0xa5
        0xE6, 0x71,  # 0d: out 0x71, al
        0xBA, 0x04, 0x06,  # 0f: mov dx, 0x0604   ; PM1a_CNT (PM base 0x600 set by SeaBIOS)
        0xB8, 0x00, 0x24,  # 12: mov ax, 0x2400   ; SLP_EN | SLP_TYP=1 (S3)
        0xEF,  # 15: out dx, ax
        0xF4,  # 16: hlt
        0xEB, 0xFD,  # 17: jmp 0x16
    ]
)  # fmt: skip


class Guest(enum.Enum):
    """Which boot sector the VM boots."""

    LOOP = "loop"
    SUSPEND = "suspend"


def boot_sector(guest: Guest) -> bytes:
    """Return the 512-byte boot sector (code, zero padding, 0x55AA) of `guest`."""
    code = _LOOP if guest is Guest.LOOP else _SUSPEND_ONCE
    padding = bytes(SECTOR_SIZE - len(BOOT_SIGNATURE) - len(code))
    return code + padding + BOOT_SIGNATURE


def write_boot_image(guest: Guest, path: Path) -> Path:
    """Write `guest` as a one-sector raw disk image at `path` and return the path."""
    path.write_bytes(boot_sector(guest))
    return path
