"""The built wheel carries the models, and ``import cprfsm`` stays light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_finds_its_models(tmp_path: Path) -> None:
    """Installed from a wheel (not editable), cprfsm loads its shipped model."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cprfsm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert "cprfsm/models/qemu.yaml" in names
    assert "cprfsm/py.typed" in names
    probe = (
        "import sys, cprfsm; "
        "assert cprfsm.__file__.startswith(sys.argv[1]), cprfsm.__file__; "
        "print(cprfsm.load_model('10.0').path)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path[:0] = [{str(tmp_path / 'site')!r}]; {probe}",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(tmp_path / "site" / "cprfsm" / "models"))


def test_import_does_not_pull_optional_packages() -> None:
    """``import cprfsm`` loads neither transitions' diagrams, notebooks nor the test kit."""
    code = (
        "import sys, cprfsm; "
        "bad = [m for m in ('IPython', 'ipykernel', 'nbformat', 'hypothesis', 'pytest', "
        "'graphviz', 'pygraphviz', 'cprfsm.testing', 'cprfsm.matrix') if m in sys.modules]; "
        "print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_import_does_not_pull_the_qmp_extra() -> None:
    """``import cprfsm`` loads neither ``cprfsm.qmp`` nor the ``qemu.qmp`` library it needs."""
    code = (
        "import sys, cprfsm, cprfsm.executor; "
        "print([m for m in ('cprfsm.qmp', 'qemu', 'qemu.qmp', 'asyncio') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
