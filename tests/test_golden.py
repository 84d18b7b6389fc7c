"""The model against the golden matrix recorded from a live QEMU 10.0.2: every cell must agree."""

from __future__ import annotations

import csv
from pathlib import Path

from cprfsm import Configuration, MemoryBackend, check, load_model

GOLDEN = Path(__file__).parent / "golden" / "qemu-10.0.2.csv"
URIS = {
    "file": "file:{dir}/state",
    "exec": "exec:cat > {dir}/state",
    "unix": "unix:{dir}/main.sock",
}


def configuration(row: dict[str, str]) -> Configuration:
    """The configuration a golden row describes, as the harness set it up."""
    device = row["device"]
    return Configuration(
        mode=row["mode"],
        capabilities=frozenset(filter(None, row["caps"].split("+"))),
        runstate=row["runstate"],
        incoming="deferred" if row["runstate"] == "inmigrate" else "none",
        migration="completed" if row["runstate"] == "postmigrate" else "none",
        uri=URIS[row["transport"]],
        cpr_channel="unix:{dir}/cpr.sock" if row["cpr_channel"] else None,
        memory=MemoryBackend.parse(row["memory"]),
        aux_ram_share=row["aux_ram_share"] == "true",
        devices=(f"{device},node=extra",) if device else (),
    )


def rows() -> list[dict[str, str]]:
    """The golden matrix."""
    with GOLDEN.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_model_agrees_with_live_qemu_on_every_cell() -> None:
    """For each recorded cell the model gives QEMU's verdict, failing command and exact text."""
    model = load_model("10.0.2")
    mismatches = []
    for row in rows():
        verdict = check(configuration(row), model=model)
        got = (
            str(verdict.allowed).lower(),
            verdict.failed_at or "",
            str(verdict.asynchronous).lower(),
            verdict.error or "",
        )
        want = (row["allowed"], row["failed_at"], row["asynchronous"], row["error"])
        if got != want:
            cell = {
                k: v
                for k, v in row.items()
                if k
                in {
                    "runstate",
                    "mode",
                    "caps",
                    "transport",
                    "cpr_channel",
                    "memory",
                    "aux_ram_share",
                    "device",
                }
                and v not in {"", "false"}
            }
            mismatches.append(f"{cell}\n    qemu:  {want}\n    model: {got}")
    assert not mismatches, f"{len(mismatches)} cells differ:\n" + "\n".join(mismatches[:40])


def test_golden_matrix_covers_what_it_promises() -> None:
    """Every pair of 10.0 capabilities under each mode with file: and exec: is recorded."""
    model = load_model("10.0")
    recorded = {
        (r["mode"], r["caps"], r["transport"])
        for r in rows()
        if r["runstate"] == "running"
        and r["memory"] == "ram"
        and not r["device"]
        and not r["cpr_channel"]
    }
    caps = sorted(model.capabilities)
    pairs = {f"{a}+{b}" for i, a in enumerate(caps) for b in caps[i + 1 :]}
    for mode in ("normal", "cpr-reboot", "cpr-transfer"):
        for transport in ("file", "exec"):
            missing = {p for p in pairs if (mode, p, transport) not in recorded}
            assert not missing, (mode, transport, sorted(missing)[:5])
