"""Sphinx configuration; the coverage page is generated from the shipped model."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from cprfsm import __version__, load_model, modelled_releases  # noqa: E402

project = "cprfsm"
author = "The cprfsm developers"
copyright = "2026, the cprfsm developers"
release = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
suppress_warnings = ["myst.header"]


def _coverage() -> str:
    lines = [
        (
            "| release | runstates | runstate pairs | statuses | status changes (out/in) "
            "| modes | capabilities | rules |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    checked = []
    for version in modelled_releases():
        model = load_model(version)
        lines.append(
            f"| {version} | {len(model.runstates)} | {len(model.runstate_transitions)} "
            f"| {len(model.migration_statuses)} | {len(model.outgoing_status_transitions)}/"
            f"{len(model.incoming_status_transitions)} | {', '.join(m.name for m in model.modes)} "
            f"| {len(model.capabilities)} | {len(model.rules)} |"
        )
        checked.append(f"- **{version}**: {model.checked}")
    return "\n".join([*lines, "", "How each release was checked:", "", *checked, ""])


generated = HERE / "_generated"
generated.mkdir(exist_ok=True)
(generated / "coverage.md").write_text(_coverage(), encoding="utf-8")
