"""Shared fixtures: the gate for tests that drive a real QEMU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import structlog

if TYPE_CHECKING:
    from collections.abc import Iterator

from live.launcher import EXPECTED_VERSION, qemu_missing_reason, qemu_version


def _unavailable(reason: str) -> None:
    """Skip, or fail when CPRFSM_REQUIRE_QEMU=1 says QEMU must be there."""
    if os.environ.get("CPRFSM_REQUIRE_QEMU") == "1":
        pytest.fail(f"CPRFSM_REQUIRE_QEMU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_available() -> str:
    """Return QEMU's version line; skip (or fail, if required) where QEMU is not installed."""
    reason = qemu_missing_reason()
    if reason is not None:
        _unavailable(reason)
    return qemu_version()


@pytest.fixture(scope="session")
def qemu_golden_version(qemu_available: str) -> str:
    """Like `qemu_available`, but also require the QEMU release the golden matrix records."""
    if f"version {EXPECTED_VERSION} " not in f"{qemu_available} ":
        _unavailable(f"the golden matrix is for QEMU {EXPECTED_VERSION}, found {qemu_available!r}")
    return qemu_available


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """The command line configures structlog as an application would; undo it after each test."""
    yield
    structlog.reset_defaults()
