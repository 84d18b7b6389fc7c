"""The built wheel carries the models and its extras, and ``import cprfsm`` stays light."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once per test module."""
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("cprfsm-*.whl")
    return built


def test_wheel_finds_its_models(wheel: Path, tmp_path: Path) -> None:
    """Installed from a wheel (not editable), cprfsm loads its shipped model."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert "cprfsm/models/qemu.yaml" in names
    assert "cprfsm/py.typed" in names
    assert "cprfsm/testing/contract.py" in names
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


# Run in a venv holding only cprfsm[testing]: the kit works and draws examples without pytest.
_KIT_PROBE = textwrap.dedent(
    """
    import contextlib, importlib.util, sys
    assert importlib.util.find_spec("pytest") is None, "pytest is installed"
    import cprfsm
    from cprfsm.testing import RecordingPorts, capture_transitions, command_sequences
    from cprfsm.testing import configurations
    from hypothesis import given, settings

    @settings(max_examples=25, database=None, deadline=None)
    @given(configurations(qemu="10.0"))
    def verdicts(config):
        cprfsm.check(config, qemu="10.0")

    @settings(max_examples=10, database=None, deadline=None)
    @given(command_sequences(qemu="10.0", max_size=8))
    def lives(steps):
        store, ports = cprfsm.InMemoryStore(), RecordingPorts()
        vm = cprfsm.VirtualMachine("vm", store=store, executor=ports.executor())
        with capture_transitions():
            for method, arguments in steps:
                with contextlib.suppress(cprfsm.CprFsmError):
                    getattr(vm, method)(**arguments)
        assert store.version("vm") >= 1

    verdicts()
    lives()
    try:
        import cprfsm.testing.contract
    except ModuleNotFoundError as missing:
        assert "pip install pytest" in str(missing), missing
    else:
        raise AssertionError("the contract module imported without pytest")
    print("kit ok")
    """
)


def test_testing_extra_gives_a_kit_that_needs_no_pytest(wheel: Path, tmp_path: Path) -> None:
    """In a clean venv, ``pip install 'cprfsm[testing]'`` is enough for ``cprfsm.testing``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"cprfsm[testing] @ {wheel.as_uri()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    proc = subprocess.run(
        [python, "-I", "-c", _KIT_PROBE], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "kit ok"


def test_notebook_extra_brings_a_front_end_that_runs_notebooks() -> None:
    """The ``notebook`` extra installs a kernel and nbclient (``jupyter execute``)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {spec.split(">")[0].split("=")[0].split("[")[0] for spec in extras["notebook"]}
    assert {"ipykernel", "nbclient"} <= names
    assert {spec.split(">")[0] for spec in extras["testing"]} == {"hypothesis"}


def test_import_is_light() -> None:
    """``import cprfsm`` loads neither the engine, logging, sqlite3 nor any optional package."""
    code = (
        "import sys, cprfsm; "
        "bad = [m for m in ('transitions', 'structlog', 'sqlite3', 'yaml', 'IPython', "
        "'ipykernel', 'nbformat', 'hypothesis', 'pytest', 'graphviz', 'pygraphviz', "
        "'cprfsm.testing', 'cprfsm.matrix') if m in sys.modules]; "
        "print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_names_load_on_first_use() -> None:
    """A public name loads its own module when first used, and only the modules it needs."""
    code = (
        "import sys, cprfsm; cprfsm.Configuration; "
        "print([m for m in ('transitions', 'structlog', 'sqlite3') if m in sys.modules]); "
        "cprfsm.VirtualMachine; print('transitions' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["[]", "True"]


def test_import_does_not_pull_the_qmp_extra() -> None:
    """``import cprfsm`` loads neither ``cprfsm.qmp`` nor the ``qemu.qmp`` library it needs."""
    code = (
        "import sys, cprfsm, cprfsm.executor; "
        "print([m for m in ('cprfsm.qmp', 'qemu', 'qemu.qmp', 'asyncio') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
