"""Helpers for hostile-input tests: a time guard, and state files crafted with valid checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import struct
import zlib
from typing import TYPE_CHECKING

from cprfsm.statefile import MAGIC

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType


class Hang(AssertionError):
    """The code under test ran past its time budget."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail with Hang if the block runs longer than ``seconds`` (main thread only)."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def crc(data: bytes) -> bytes:
    """The CRC-32 the format stores, big-endian."""
    return struct.pack(">I", zlib.crc32(data))


def header_json(**fields: object) -> bytes:
    """A well-formed header with ``fields`` replaced (a value of ... drops the field)."""
    base: dict[str, object] = {
        "qemu_version": "10.0",
        "machine": "pc",
        "mode": "cpr-reboot",
        "validated": ["x-ignore-shared"],
        "runstate": "suspended",
        "was_suspended": True,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def craft(
    header: bytes,
    sections: Sequence[tuple[bytes, bytes, int | None]] = (),
    *,
    header_length: int | None = None,
    count: int | None = None,
) -> bytes:
    """A state file whose checksums and digest all match what it says, however absurd.

    ``sections`` are (name, payload, declared length or None for the real one).
    """
    length = len(header) if header_length is None else header_length
    preamble = MAGIC + struct.pack(">HI", 1, length) + header + crc(header)
    digest = hashlib.blake2b(preamble, digest_size=16)
    parts = [preamble]
    for name, payload, declared in sections:
        head = b"S" + struct.pack(">H", len(name)) + name
        head += struct.pack(">Q", len(payload) if declared is None else declared)
        record = head + crc(head)
        trailer = crc(payload)
        digest.update(record + trailer)
        parts += [record, payload, trailer]
    end = b"E" + struct.pack(">I", len(sections) if count is None else count)
    digest.update(end)
    return b"".join([*parts, end, digest.digest()])
