"""The model loader: the shipped QEMU releases, and malformed or user-written model files."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from cprfsm import ModelError, UnknownNameError, load_model, modelled_releases
from cprfsm.model import default_model_path

if TYPE_CHECKING:
    from pathlib import Path

SHIPPED = default_model_path().read_text(encoding="utf-8")

# The eight runstate pairs QEMU 9.0 added to the table (suspended series).
ADDED_IN_9_0 = {
    ("paused", "suspended"),
    ("prelaunch", "suspended"),
    ("restore-vm", "suspended"),
    ("save-vm", "suspended"),
    ("suspended", "paused"),
    ("suspended", "restore-vm"),
    ("suspended", "save-vm"),
    ("suspended", "shutdown"),
}


# Refusals of the lifecycle machine that QEMU never sees: no process, or one already.
CPRFSM_RULES = frozenset({"qemu-not-running", "qemu-running"})


class TestShippedModel:
    """The shipped model describes each modelled release as QEMU has it."""

    def test_releases(self) -> None:
        """8.2, 9.0 and 10.0 are modelled, oldest first."""
        assert modelled_releases() == ("8.2", "9.0", "10.0")

    @pytest.mark.parametrize(("version", "pairs"), [("8.2", 77), ("9.0", 85), ("10.0", 85)])
    def test_runstate_table_size(self, version: str, pairs: int) -> None:
        """The runstate table has QEMU's number of distinct pairs per release."""
        assert len(load_model(version).runstate_transitions) == pairs

    def test_9_0_adds_exactly_the_suspended_pairs(self) -> None:
        """9.0's table is 8.2's plus the eight suspended-series pairs."""
        old = load_model("8.2").runstate_transitions
        new = load_model("9.0").runstate_transitions
        assert new - old == ADDED_IN_9_0
        assert old <= new

    def test_sixteen_runstates_two_live(self) -> None:
        """There are 16 runstates and only running and suspended are live."""
        model = load_model("10.0")
        assert len(model.runstates) == 16
        assert model.live_runstates == {"running", "suspended"}

    def test_suspended_is_live_from_9_0(self) -> None:
        """Before 9.0 only running was live: stop left a suspended guest alone."""
        assert load_model("8.2").live_runstates == {"running"}
        assert len(load_model("8.2").runstates) == 16

    def test_self_change_is_allowed_and_absences_are_respected(self) -> None:
        """A change to the same runstate is a no-op; documented absences stay absent."""
        model = load_model("10.0")
        assert model.may_change_runstate("paused", "paused")
        assert not model.may_change_runstate("finish-migrate", "debug")
        assert not model.may_change_runstate("postmigrate", "paused")
        assert not model.may_change_runstate("shutdown", "running")

    @pytest.mark.parametrize(
        ("version", "count", "present", "absent"),
        [
            ("8.2", 23, {"compress", "block"}, {"mapped-ram"}),
            ("9.0", 24, {"compress", "block", "mapped-ram"}, set()),
            ("10.0", 22, {"mapped-ram"}, {"compress", "block"}),
        ],
    )
    def test_capabilities_per_release(
        self, version: str, count: int, present: set[str], absent: set[str]
    ) -> None:
        """Each release has QEMU's capability count; compress and block went away in 9.1."""
        capabilities = set(load_model(version).capabilities)
        assert len(capabilities) == count
        assert present <= capabilities
        assert not absent & capabilities

    @pytest.mark.parametrize(
        ("version", "modes"),
        [
            ("8.2", ["normal", "cpr-reboot"]),
            ("9.0", ["normal", "cpr-reboot"]),
            ("10.0", ["normal", "cpr-reboot", "cpr-transfer"]),
        ],
    )
    def test_modes_per_release(self, version: str, modes: list[str]) -> None:
        """cpr-transfer arrives in 10.0."""
        assert [mode.name for mode in load_model(version).modes] == modes

    def test_cpr_reboot_stops_at_connect_from_9_0(self) -> None:
        """8.2's cpr-reboot stopped the VM at switchover; 9.0 stops it at connect."""
        assert load_model("8.2").mode("cpr-reboot").stops_vm == "at-switchover"
        assert load_model("9.0").mode("cpr-reboot").stops_vm == "at-connect"

    def test_device_status_at_every_switchover_from_10_0(self) -> None:
        """10.0 always passes through device; before, active went straight to completed."""
        old, new = load_model("9.0"), load_model("10.0")
        assert old.may_change_status("outgoing", "active", "completed")
        assert not old.may_change_status("outgoing", "active", "device")
        assert old.may_change_status("outgoing", "pre-switchover", "device")
        assert new.may_change_status("outgoing", "active", "device")
        assert not new.may_change_status("outgoing", "active", "completed")

    def test_status_edges_only_between_statuses_of_the_release(self) -> None:
        """postcopy-recover-setup (9.1) appears in no 9.0 edge."""
        edges = load_model("9.0").outgoing_status_transitions
        assert not any("postcopy-recover-setup" in edge for edge in edges)
        assert ("postcopy-paused", "postcopy-recover") in edges

    def test_every_rule_cites_a_source(self) -> None:
        """Every QEMU rule names the QEMU file and function; cprfsm's own rules say they are."""
        for version in modelled_releases():
            for rule in load_model(version).rules:
                path = rule.source.split(":")[0]
                if rule.id in CPRFSM_RULES:
                    assert path == "cprfsm", rule.id
                else:
                    assert "/" in path or path.startswith("{"), rule.id

    def test_stable_release_resolves_to_its_series(self) -> None:
        """10.0.2 loads the 10.0 model."""
        assert load_model("10.0.2").version == "10.0"

    def test_unknown_release_lists_the_modelled_ones(self) -> None:
        """An unmodelled release is a usage error naming the releases there are."""
        with pytest.raises(UnknownNameError, match=r"8\.2, 9\.0, 10\.0"):
            load_model("7.2")


def write(tmp_path: Path, text: str) -> Path:
    """Write a model file and return its path."""
    path = tmp_path / "model.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first occurrence of ``needle``."""
    return text[: text.index(needle)].count("\n") + 1


class TestMalformedModels:
    """A malformed model is rejected with file, line and what is wrong."""

    @pytest.mark.parametrize(
        ("old", "new", "problem"),
        [
            (
                "    paused: [postmigrate,",
                "    paused: [postmigrte,",
                "unknown runstate 'postmigrte'",
            ),
            (
                "    when: {migration: running}",
                "    when: {migraton: running}",
                "unknown key 'migraton'",
            ),
            (
                "when: {capability: [postcopy-ram], all: [x-ignore-shared]}",
                "when: {capability: [postcopy-ram], all: [x-ignore-share]}",
                "unknown capability 'x-ignore-share'",
            ),
            (
                "    command: migrate-set-capabilities\n    when: {migration",
                "    command: migrate-set-caps\n    when: {migration",
                "unknown command 'migrate-set-caps'",
            ),
            ('    until: "10.1"', '    until: "ten"', "until must be a QEMU release"),
            (
                "    cancelling: [cancelled]",
                "    cancelling: [canceled]",
                "unknown migration status 'canceled'",
            ),
            (
                "    error: Cannot use COLO with CPR",
                "    error: Cannot use {device} with CPR",
                "{device} is not bound",
            ),
            (
                "  - id: cpr-vs-colo\n    command: migrate\n",
                "  - id: cpr-vs-colo\n    command: migrate\n    asynchronous: maybe\n",
                "asynchronous must be true or false",
            ),
        ],
    )
    def test_bad_entry_points_at_its_line(
        self, tmp_path: Path, old: str, new: str, problem: str
    ) -> None:
        """A wrong name, key, command, release or placeholder is reported at its line."""
        assert old in SHIPPED
        text = SHIPPED.replace(old, new, 1)
        path = write(tmp_path, text)
        with pytest.raises(ModelError) as caught:
            load_model("10.0", path=path)
        assert problem in caught.value.problem
        assert caught.value.path == str(path)
        assert caught.value.line is not None
        first_changed = line_of(text, new)
        assert first_changed <= caught.value.line <= first_changed + new.count("\n")

    def test_yaml_syntax_error_has_a_line(self, tmp_path: Path) -> None:
        """Broken YAML is a ModelError with the line, not a yaml exception."""
        text = SHIPPED.replace("schema: 1\n", "schema: 1\n  bad: [\n", 1)
        with pytest.raises(ModelError, match="not valid YAML") as caught:
            load_model(path=write(tmp_path, text))
        assert caught.value.line is not None

    def test_duplicate_rule_for_same_releases(self, tmp_path: Path) -> None:
        """Two definitions of one rule id for overlapping releases are refused."""
        rule = SHIPPED[
            SHIPPED.index("  - id: cpr-vs-colo") : SHIPPED.index("  - id: vfio-cpr-reboot")
        ]
        text = SHIPPED.replace(rule, rule + rule, 1)
        with pytest.raises(ModelError, match="defined twice"):
            load_model(path=write(tmp_path, text))

    def test_missing_section(self, tmp_path: Path) -> None:
        """A model without a required section names the section."""
        text = SHIPPED.replace("host_facts:", "host_fact:", 1)
        with pytest.raises(ModelError, match="unknown key 'host_fact'"):
            load_model(path=write(tmp_path, text))

    def test_newer_schema(self, tmp_path: Path) -> None:
        """A model written for a newer schema says so."""
        with pytest.raises(ModelError, match="schema 2 is not supported"):
            load_model(path=write(tmp_path, SHIPPED.replace("schema: 1", "schema: 2", 1)))

    def test_missing_and_empty_files(self, tmp_path: Path) -> None:
        """A missing or empty file is a ModelError naming it."""
        with pytest.raises(ModelError, match="no such model file"):
            load_model(path=tmp_path / "absent.yaml")
        with pytest.raises(ModelError, match="empty"):
            load_model(path=write(tmp_path, ""))

    def test_not_a_mapping(self, tmp_path: Path) -> None:
        """A file that is YAML but not a model is refused at line 1."""
        with pytest.raises(ModelError) as caught:
            load_model(path=write(tmp_path, "- just\n- a list\n"))
        assert caught.value.line == 1


class TestUserModel:
    """A user's own model file is loaded by the same loader and used by check."""

    def test_user_rule_is_enforced(self, tmp_path: Path) -> None:
        """A rule added in a user's model refuses what it says, with the user's text."""
        extra = (
            "  - id: site-policy-no-xbzrle\n"
            "    command: migrate-set-capabilities\n"
            "    when: {capability: [xbzrle]}\n"
            "    error: xbzrle is banned here\n"
            "    source: site/policy.md\n"
            "    hint: drop xbzrle\n"
        )
        path = write(tmp_path, SHIPPED.rstrip("\n") + "\n\n" + extra)
        from cprfsm import Configuration, check  # noqa: PLC0415 - keeps the module's imports lean

        verdict = check(
            Configuration(capabilities={"xbzrle"}), model=load_model("10.0", path=path)
        )
        assert verdict.error == "xbzrle is banned here"
        assert check(Configuration(capabilities={"xbzrle"}), qemu="10.0").allowed
