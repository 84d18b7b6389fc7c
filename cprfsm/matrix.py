"""Legality matrices: many verdicts at once, for notebooks (HTML) and terminals (text)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import attrs

from cprfsm.legality import Configuration, Verdict, check
from cprfsm.model import load_model

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["LegalityMatrix", "legality_matrix"]

_ALLOWED = "ok"


@attrs.frozen(kw_only=True)
class LegalityMatrix:
    """Verdicts on a grid: ``cells[r][c]`` is the verdict for ``rows[r]`` with ``columns[c]``."""

    qemu: str
    title: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: tuple[tuple[Verdict, ...], ...]

    def verdict(self, row: str, column: str) -> Verdict:
        """The verdict of one cell, by row and column name."""
        return self.cells[self.rows.index(row)][self.columns.index(column)]

    def refusals(self) -> Iterator[tuple[str, str, Verdict]]:
        """Every refused cell as (row, column, verdict), row by row."""
        for row, verdicts in zip(self.rows, self.cells, strict=True):
            for column, verdict in zip(self.columns, verdicts, strict=True):
                if not verdict.allowed:
                    yield row, column, verdict

    def legend(self) -> dict[str, str]:
        """Each rule id shown in the matrix with QEMU's error text."""
        return {v.first.rule: v.first.error for _, _, v in self.refusals() if v.first}

    def __str__(self) -> str:
        """A plain-text grid: ``ok`` or the id of the rule QEMU reports."""
        width = max(len(row) for row in self.rows)
        lines = [f"{self.title} (QEMU {self.qemu})"]
        for index, column in enumerate(self.columns):
            lines.append(f"  [{index}] {column}")
        header = " ".join(f"[{index}]" for index in range(len(self.columns)))
        lines.append(f"{'':{width}}  {header}")
        for row, verdicts in zip(self.rows, self.cells, strict=True):
            marks = " ".join(
                f"{_ALLOWED if v.allowed else 'NO':^{len(str(i)) + 2}}"
                for i, v in enumerate(verdicts)
            )
            lines.append(f"{row:{width}}  {marks}")
        lines.extend(f"  {rule}: {error}" for rule, error in self.legend().items())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """An HTML table for Jupyter; refused cells show the rule and QEMU's text on hover."""
        head = "".join(
            f'<th style="writing-mode:vertical-rl">{html.escape(c)}</th>' for c in self.columns
        )
        body = []
        for row, verdicts in zip(self.rows, self.cells, strict=True):
            cells = "".join(_html_cell(v) for v in verdicts)
            body.append(f"<tr><th>{html.escape(row)}</th>{cells}</tr>")
        caption = html.escape(f"{self.title} (QEMU {self.qemu})")
        return (
            f'<table class="cprfsm-matrix"><caption>{caption}</caption>'
            f"<tr><th></th>{head}</tr>{''.join(body)}</table>"
        )


def _html_cell(verdict: Verdict) -> str:
    if verdict.first is None:
        return '<td style="background:#d9f2d9" title="allowed">ok</td>'
    reason = verdict.first
    tip = html.escape(f"{reason.command}: {reason.error} [{reason.rule}] - {reason.hint}")
    mark = "abort" if reason.aborts else "async" if reason.asynchronous else "no"
    return f'<td style="background:#f8d0d0" title="{tip}">{mark}</td>'


def legality_matrix(
    qemu: str | None = None,
    *,
    base: Configuration | None = None,
    pairs: bool = False,
    command: str = "migrate",
) -> LegalityMatrix:
    """Check every mode against every capability (or, with ``pairs``, capability pairs).

    Each cell adds the row's and column's setting to ``base``.  Without
    ``pairs`` rows are modes and columns capabilities; with ``pairs`` both are
    capabilities and the mode is ``base``'s.
    """
    base = base or Configuration()
    model = load_model(qemu)
    columns = model.capabilities

    if pairs:
        rows = columns
        title = f"{command} in mode {base.mode} with capability pairs"

        def configure(row: str, column: str) -> Configuration:
            return attrs.evolve(base, capabilities=base.capabilities | {row, column})

    else:
        rows = tuple(mode.name for mode in model.modes)
        title = f"{command} by mode and capability"

        def configure(row: str, column: str) -> Configuration:
            return attrs.evolve(base, mode=row, capabilities=base.capabilities | {column})

    cells = tuple(
        tuple(check(configure(row, column), command, model=model) for column in columns)
        for row in rows
    )
    return LegalityMatrix(qemu=model.version, title=title, rows=rows, columns=columns, cells=cells)
