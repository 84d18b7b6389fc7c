"""The documented VMM script (docs/vmm.md) runs a cpr-reboot cycle of a live QEMU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cprfsm import vm_events as ev
from cprfsm.lifecycle import rebuild
from cprfsm.store import SQLiteStore

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]

DOC = Path(__file__).parent.parent / "docs" / "vmm.md"
MAX_LINES = 30


def documented_script() -> str:
    """The one Python block of docs/vmm.md."""
    (script,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    return str(script)


def test_the_script_is_under_30_lines() -> None:
    """The promise of the page: a whole cycle in at most 30 lines."""
    assert len(documented_script().splitlines()) <= MAX_LINES


def test_the_script_restores_a_live_guest(tmp_path: Path) -> None:
    """Run as written: the marker survives, and the log replays to QEMU's runstate."""
    work = tmp_path / "vmm"
    work.mkdir()
    script = tmp_path / "vmm.py"
    script.write_text(documented_script(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(work)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restored:" in done.stdout
    with SQLiteStore(work / "log.sqlite", create=False) as store:
        events = [recorded.event for recorded in store.read("vm1")]
        assert rebuild(store, "vm1").runstate == "running"
    assert not [e for e in events if isinstance(e, ev.ModelDiverged)]
    statuses = [e.status for e in events if isinstance(e, ev.MigrationStatusReported)]
    assert statuses.count("completed") == 2  # the save and the load
    assert any(isinstance(e, ev.StateFileWritten) for e in events)
