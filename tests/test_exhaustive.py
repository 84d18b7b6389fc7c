"""Every release x mode x capability pair x runstate x transport, checked for QEMU's invariants."""

from __future__ import annotations

import itertools

import pytest

from cprfsm import Configuration, check, load_model, modelled_releases

TRANSPORTS = ("file:/s", "exec:cat > /s", "unix:/m", "tcp:127.0.0.1:4444")
CPR_CONFLICTS = {"postcopy-ram", "dirty-bitmaps", "background-snapshot", "x-colo"}


def capability_sets(capabilities: tuple[str, ...]) -> list[frozenset[str]]:
    """No capability, each one, and every unordered pair."""
    return [
        frozenset(),
        *(frozenset({c}) for c in capabilities),
        *(frozenset(p) for p in itertools.combinations(capabilities, 2)),
    ]


@pytest.mark.parametrize("version", modelled_releases())
def test_every_combination(version: str) -> None:
    """For every combination the verdict obeys the invariants QEMU's code guarantees."""
    model = load_model(version)
    cpr_checks = version != "8.2"
    checked = 0
    for caps in capability_sets(model.capabilities):
        set_caps_reasons: set[tuple[object, ...]] = set()
        for mode, runstate, uri in itertools.product(
            (m.name for m in model.modes), model.runstates, TRANSPORTS
        ):
            config = Configuration(
                mode=mode,
                capabilities=caps,
                runstate=runstate,
                uri=uri,
                incoming="deferred" if runstate == "inmigrate" else "none",
            )
            verdict = check(config, model=model)
            checked += 1
            assert verdict.allowed == (not verdict.reasons)
            assert all(reason.command in verdict.steps for reason in verdict.reasons)
            if runstate in {"inmigrate", "postmigrate"}:
                assert not verdict.allowed, config
            if cpr_checks and model.mode(mode).cpr and caps & CPR_CONFLICTS:
                assert any(r.rule.startswith("cpr-vs-") for r in verdict.reasons), config
            # migrate_caps_check looks only at the capabilities (and, on a
            # destination, at the incoming state), never at mode or transport.
            if runstate != "inmigrate" and caps:
                set_caps_reasons.add(
                    tuple(r for r in verdict.reasons if r.command == "migrate-set-capabilities")
                )
        assert len(set_caps_reasons) <= 1, (caps, set_caps_reasons)
    assert checked == len(capability_sets(model.capabilities)) * len(model.modes) * 16 * 4
