"""Hand-assembled 16-bit boot sectors the QMP executor boots as its guest.

Each guest first writes a boot marker into its RAM at :data:`MARKER_ADDRESS`:
the 8 ASCII bytes :data:`MARKER_MAGIC` followed by the 8-byte time-stamp
counter (``rdtsc``, little-endian), so every boot leaves a different marker.
Reading it back after a restore shows that the guest's RAM came back rather
than a fresh boot.  Then the guest idles (LOOP) or enters ACPI S3 once
(SUSPEND).
"""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "MARKER_ADDRESS",
    "MARKER_LENGTH",
    "MARKER_MAGIC",
    "Guest",
    "boot_sector",
    "write_boot_image",
]

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"

#: Guest-physical address of the boot marker (free conventional memory above the boot sector).
MARKER_ADDRESS = 0x9000
#: The marker's first 8 bytes; the next 8 are the TSC at boot.
MARKER_MAGIC = b"CPRFSMv1"
#: Length of the marker in bytes: magic plus TSC.
MARKER_LENGTH = 16


def _store_dword(address: int, value: bytes) -> bytes:
    """``mov dword [address], imm32`` in 16-bit code (DS = 0)."""
    return b"\x66\xc7\x06" + struct.pack("<H", address) + value


# cli; DS = 0; the magic in two dword stores; rdtsc; EAX then EDX after the magic.
_MARKER = (
    bytes([0xFA, 0x31, 0xC0, 0x8E, 0xD8])  # cli; xor ax, ax; mov ds, ax
    + _store_dword(MARKER_ADDRESS, MARKER_MAGIC[:4])
    + _store_dword(MARKER_ADDRESS + 4, MARKER_MAGIC[4:])
    + b"\x0f\x31"  # rdtsc
    + b"\x66\xa3"
    + struct.pack("<H", MARKER_ADDRESS + 8)  # mov [addr+8], eax
    + b"\x66\x89\x16"
    + struct.pack("<H", MARKER_ADDRESS + 12)  # mov [addr+12], edx
)

# hlt; jmp back to the hlt.  The vCPU idles, QEMU's runstate stays `running`.
_LOOP = bytes([0xF4, 0xEB, 0xFD])

# Enters ACPI S3 once.  CMOS byte 0x7E (unused by SeaBIOS) remembers that it did: on
# `system_wakeup` QEMU resets the machine, SeaBIOS finds no resume vector and reboots,
# and without the flag this sector would suspend the guest again.  Jumps are relative.
_SUSPEND_ONCE = bytes(
    [
        0xB0, 0x7E,  # 00: mov al, 0x7e           ; CMOS index
        0xE6, 0x70,  # 02: out 0x70, al
        0xE4, 0x71,  # 04: in al, 0x71
        0x3C, 0xA5,  # 06: cmp al, 0xa5           ; already suspended once?
        0x74, 0x0B,  # 08: je 0x15
        0xB0, 0xA5,  # 0a: mov al, 0xa5
        0xE6, 0x71,  # 0c: out 0x71, al
        0xBA, 0x04, 0x06,  # 0e: mov dx, 0x0604   ; PM1a_CNT (PM base 0x600 set by SeaBIOS)
        0xB8, 0x00, 0x24,  # 11: mov ax, 0x2400   ; SLP_EN | SLP_TYP=1 (S3)
        0xEF,  # 14: out dx, ax
        0xF4,  # 15: hlt
        0xEB, 0xFD,  # 16: jmp 0x15
    ]
)  # fmt: skip


class Guest(enum.Enum):
    """Which boot sector the VM boots: both write the boot marker first."""

    #: Idles in a ``hlt`` loop; the runstate stays ``running``.
    LOOP = "loop"
    #: Enters ACPI S3 once (QEMU emits SUSPEND), then idles after a wakeup.
    SUSPEND = "suspend"


def boot_sector(guest: Guest) -> bytes:
    """The 512-byte boot sector (marker code, guest code, zero padding, 0x55AA) of ``guest``."""
    code = _MARKER + (_LOOP if guest is Guest.LOOP else _SUSPEND_ONCE)
    padding = bytes(SECTOR_SIZE - len(BOOT_SIGNATURE) - len(code))
    return code + padding + BOOT_SIGNATURE


def write_boot_image(guest: Guest, path: Path) -> Path:
    """Write ``guest`` as a one-sector raw disk image at ``path`` and return the path."""
    path.write_bytes(boot_sector(guest))
    return path
