"""The ``cprfsm check`` command line: answers, exit statuses and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprfsm.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in-process; return exit status, stdout and stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run ``cprfsm check --json`` and parse its one object."""
    status, out, _ = run(capsys, "check", "--json", *argv)
    return status, json.loads(out)


class TestDocumentedAnswers:
    """The answers the issue and README promise."""

    @pytest.mark.parametrize(
        ("cap", "error"),
        [
            ("postcopy-ram", "Cannot use postcopy with CPR"),
            ("x-colo", "Cannot use COLO with CPR"),
            ("background-snapshot", "Cannot use background snapshot with CPR"),
        ],
    )
    def test_cpr_reboot_conflicts(
        self, capsys: pytest.CaptureFixture[str], cap: str, error: str
    ) -> None:
        """Each CPR conflict fails at migrate with QEMU's text, exit status 1."""
        status, verdict = run_json(capsys, "--qemu", "10.0", "--mode", "cpr-reboot", "--cap", cap)
        assert status == 1
        assert verdict["allowed"] is False
        assert verdict["failed_at"] == "migrate"
        assert verdict["error"] == error
        assert verdict["asynchronous"] is False
        assert verdict["rule"]
        assert verdict["source"].startswith("migration/")
        assert verdict["hint"]
        assert verdict["reasons"][0]["error"] == error

    def test_vfio_is_asynchronous_and_allowed_when_suspended(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """VFIO under cpr-reboot fails asynchronously unless the guest is suspended."""
        status, verdict = run_json(
            capsys, "--qemu", "10.0", "--mode", "cpr-reboot", "--device", "vfio"
        )
        assert (status, verdict["asynchronous"], verdict["failed_at"]) == (1, True, "migrate")
        assert verdict["error"] == "VFIO device only supports cpr-reboot for runstate suspended"
        status, verdict = run_json(
            capsys,
            "--qemu",
            "10.0",
            "--mode",
            "cpr-reboot",
            "--device",
            "vfio",
            "--runstate",
            "suspended",
        )
        assert status == 0
        assert verdict["allowed"] is True
        assert verdict["failed_at"] is None
        assert verdict["error"] is None
        assert verdict["reasons"] == []

    def test_compress_is_a_usage_error_in_10_0_only(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """compress is unknown to 10.0 (exit 2, a readable message) and accepted by 9.0."""
        status, out, err = run(capsys, "check", "--qemu", "10.0", "--cap", "compress")
        assert status == 2
        assert out == ""
        assert "unknown capability 'compress'" in err
        assert "Traceback" not in err
        status, _, _ = run(capsys, "check", "--qemu", "9.0", "--cap", "compress")
        assert status == 0

    def test_misspelling_suggests(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A misspelt mode gets a suggestion and the list of valid ones."""
        status, _, err = run(capsys, "check", "--mode", "cpr-rebot")
        assert status == 2
        assert "Did you mean 'cpr-reboot'?" in err

    def test_human_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --json the verdict is readable text with QEMU's words and the fix."""
        status, out, _ = run(capsys, "check", "--mode", "cpr-reboot", "--cap", "postcopy-ram")
        assert status == 1
        assert "refused at migrate" in out
        assert "QEMU says: Cannot use postcopy with CPR" in out
        assert "to fix:" in out

    def test_other_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """COMMAND selects what is checked: system_wakeup on a paused guest is refused."""
        status, verdict = run_json(capsys, "--runstate", "paused", "system_wakeup")
        assert status == 1
        assert verdict["error"] == "Unable to wake up: guest is not in suspended state"

    def test_user_model(self, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
        """--model reads a model file of the user's; a malformed one is exit 2 with its line."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("schema: 1\nreleases: 3\n", encoding="utf-8")
        status, _, err = run(capsys, "check", "--model", str(bad))
        assert status == 2
        assert f"{bad}:" in err

    def test_module_entry_point(self) -> None:
        """``python -m cprfsm`` works as an installed command would."""
        proc = subprocess.run(
            [sys.executable, "-m", "cprfsm", "check", "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["allowed"] is True


words = st.sampled_from(
    [
        "check",
        "--qemu",
        "--mode",
        "--cap",
        "--param",
        "--runstate",
        "--uri",
        "--device",
        "--memory",
        "--host",
        "--json",
        "--cpr-channel",
        "--incoming",
        "--migration",
        "--model",
        "migrate",
        "cont",
        "-h",
        "10.0",
        "9.0",
        "cpr-reboot",
        "x-ignore-shared",
        "=",
        ",",
        "share=on",
    ]
)
argv = st.lists(st.one_of(words, st.text(max_size=12)), max_size=8)


@given(argv)
def test_garbage_never_raises(args: list[str]) -> None:
    """Any argument list ends in exit 0, 1 or 2 and never raises."""
    assert main(["check", *args]) in {0, 1, 2}


@given(st.permutations(["postcopy-ram", "x-ignore-shared", "multifd", "xbzrle"]))
def test_capability_order_does_not_matter(order: list[str]) -> None:
    """The verdict does not depend on the order --cap options are given in."""
    import contextlib  # noqa: PLC0415 - only this test redirects output
    import io  # noqa: PLC0415

    def verdict(caps: list[str]) -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            main(["check", "--json", *(arg for cap in caps for arg in ("--cap", cap))])
        return buffer.getvalue()

    assert verdict(order) == verdict(sorted(order))
