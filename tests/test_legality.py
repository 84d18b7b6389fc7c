"""The legality engine: each rule fires where QEMU refuses, not in its closest legal neighbour."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprfsm import (
    Configuration,
    MemoryBackend,
    UnknownNameError,
    UsageError,
    check,
    load_model,
    modelled_releases,
)
from cprfsm.legality import stall

SHARED_MEMFD = MemoryBackend.parse("memfd,share=on")
CPR_TRANSFER_OK = Configuration(
    mode="cpr-transfer",
    uri="unix:/run/main.sock",
    cpr_channel="unix:/run/cpr.sock",
    memory=SHARED_MEMFD,
    aux_ram_share=True,
)
INCOMING = {"runstate": "inmigrate", "incoming": "deferred"}


def caps(*names: str, **fields: object) -> Configuration:
    """A configuration with these capabilities (and any other fields)."""
    return Configuration(capabilities=frozenset(names), **fields)  # type: ignore[arg-type]


# rule id -> (command, configuration QEMU refuses, closest configuration it accepts).
# Every rule of every modelled release must appear here (see test_every_rule_is_covered).
CASES: dict[str, tuple[str, Configuration, Configuration]] = {
    "qemu-not-running": (
        "migrate",
        Configuration(process="absent"),
        Configuration(process="running"),
    ),
    "qemu-running": (
        "start",
        Configuration(process="running"),
        Configuration(process="absent"),
    ),
    "guest-not-running": (
        "guest-suspend",
        Configuration(runstate="paused"),
        Configuration(runstate="running"),
    ),
    "debug-stop-aborts-suspended": (
        "debug-stop",
        Configuration(runstate="suspended"),
        Configuration(runstate="running"),
    ),
    "continue-needs-pre-switchover": (
        "migrate-continue",
        caps("pause-before-switchover", migration="active"),
        caps("pause-before-switchover", migration="pre-switchover"),
    ),
    "caps-while-migrating": (
        "migrate-set-capabilities",
        caps("events", migration="active"),
        caps("events", migration="completed"),
    ),
    "colo-needs-replication": (
        "migrate-set-capabilities",
        caps("x-colo", host={"replication": False}),
        caps("x-colo", host={"replication": True}),
    ),
    "postcopy-needs-userfaultfd": (
        "migrate-set-capabilities",
        caps("postcopy-ram", host={"userfaultfd": False}, **INCOMING),
        caps("postcopy-ram", host={"userfaultfd": True}, **INCOMING),
    ),
    "postcopy-needs-tmpfs-backend": (
        "migrate-set-capabilities",
        caps("postcopy-ram", memory=MemoryBackend.parse("file,share=on"), **INCOMING),
        caps("postcopy-ram", memory=MemoryBackend.parse("memfd,share=on"), **INCOMING),
    ),
    "background-snapshot-needs-wp-memory": (
        "migrate-set-capabilities",
        caps("background-snapshot", memory=MemoryBackend.parse("file,share=on")),
        caps("background-snapshot", memory=MemoryBackend.parse("memfd,share=on")),
    ),
    "postcopy-vs-ignore-shared": (
        "migrate-set-capabilities",
        caps("postcopy-ram", "x-ignore-shared"),
        caps("postcopy-ram"),
    ),
    "postcopy-vs-multifd": (
        "migrate-set-capabilities",
        caps("postcopy-ram", "multifd"),
        caps("multifd"),
    ),
    "background-snapshot-needs-uffd-wp": (
        "migrate-set-capabilities",
        caps("background-snapshot", host={"uffd-wp": False}),
        caps("background-snapshot"),
    ),
    "background-snapshot-conflict": (
        "migrate-set-capabilities",
        caps("background-snapshot", "return-path"),
        caps("background-snapshot"),
    ),
    "zero-copy-needs-plain-multifd": (
        "migrate-set-capabilities",
        caps("zero-copy-send"),
        caps("zero-copy-send", "multifd"),
    ),
    "preempt-needs-postcopy": (
        "migrate-set-capabilities",
        caps("postcopy-preempt"),
        caps("postcopy-preempt", "postcopy-ram"),
    ),
    "preempt-vs-compress": (
        "migrate-set-capabilities",
        caps("postcopy-preempt", "postcopy-ram", "compress"),
        caps("postcopy-preempt", "postcopy-ram"),
    ),
    "preempt-after-incoming": (
        "migrate-set-capabilities",
        caps("postcopy-preempt", "postcopy-ram", runstate="inmigrate", incoming="started"),
        caps("postcopy-preempt", "postcopy-ram", **INCOMING),
    ),
    "multifd-after-incoming": (
        "migrate-set-capabilities",
        caps("multifd", runstate="inmigrate", incoming="started"),
        caps("multifd", runstate="running", incoming="completed"),
    ),
    "multifd-vs-compress": (
        "migrate-set-capabilities",
        caps("multifd", "compress"),
        caps("multifd"),
    ),
    "switchover-ack-needs-return-path": (
        "migrate-set-capabilities",
        caps("switchover-ack"),
        caps("switchover-ack", "return-path"),
    ),
    "dirty-limit-vs-auto-converge": (
        "migrate-set-capabilities",
        caps("dirty-limit", "auto-converge", host={"kvm-dirty-ring": True}),
        caps("dirty-limit", host={"kvm-dirty-ring": True}),
    ),
    "dirty-limit-needs-dirty-ring": (
        "migrate-set-capabilities",
        caps("dirty-limit"),
        caps("dirty-limit", host={"kvm-dirty-ring": True}),
    ),
    "multifd-vs-xbzrle": ("migrate-set-capabilities", caps("multifd", "xbzrle"), caps("xbzrle")),
    "compress-vs-xbzrle": ("migrate-set-capabilities", caps("compress", "xbzrle"), caps("xbzrle")),
    "mapped-ram-vs-xbzrle": (
        "migrate-set-capabilities",
        caps("mapped-ram", "xbzrle"),
        caps("mapped-ram"),
    ),
    "mapped-ram-vs-postcopy": (
        "migrate-set-capabilities",
        caps("mapped-ram", "postcopy-ram"),
        caps("mapped-ram"),
    ),
    "mapped-ram-vs-compress": (
        "migrate-set-capabilities",
        caps("mapped-ram", "compress"),
        caps("mapped-ram"),
    ),
    "mapped-ram-needs-seekable": (
        "migrate",
        caps("mapped-ram", uri="exec:cat > /tmp/state"),
        caps("mapped-ram", uri="file:/tmp/state"),
    ),
    "multifd-needs-multi-channel": (
        "migrate",
        caps("multifd", uri="file:/tmp/state"),
        caps("multifd", uri="tcp:127.0.0.1:4444"),
    ),
    "cpr-transfer-needs-streamable": (
        "migrate",
        attrs.evolve(CPR_TRANSFER_OK, uri="file:/tmp/state"),
        CPR_TRANSFER_OK,
    ),
    "cpr-transfer-needs-cpr-channel": (
        "migrate",
        attrs.evolve(CPR_TRANSFER_OK, cpr_channel=None),
        CPR_TRANSFER_OK,
    ),
    "migrate-while-migrating": (
        "migrate",
        Configuration(migration="active"),
        Configuration(migration="failed"),
    ),
    "migrate-while-incoming": (
        "migrate",
        Configuration(runstate="inmigrate", incoming="deferred"),
        Configuration(runstate="paused"),
    ),
    "migrate-after-migrate": (
        "migrate",
        Configuration(runstate="postmigrate", migration="completed"),
        Configuration(runstate="paused", migration="completed"),
    ),
    "cpr-transfer-aux-ram": (
        "migrate",
        attrs.evolve(CPR_TRANSFER_OK, aux_ram_share=False),
        CPR_TRANSFER_OK,
    ),
    "cpr-transfer-memory": (
        "migrate",
        attrs.evolve(CPR_TRANSFER_OK, memory=MemoryBackend.parse("ram")),
        CPR_TRANSFER_OK,
    ),
    "background-snapshot-aborts": (
        "migrate",
        caps("background-snapshot", runstate="prelaunch"),
        caps("background-snapshot", runstate="running"),
    ),
    "return-path-on-file": (
        "migrate",
        caps("return-path", uri="file:/tmp/state"),
        caps("return-path", uri="tcp:127.0.0.1:4444"),
    ),
    "migration-blocker": (
        "migrate",
        Configuration(devices=("vdi",)),
        Configuration(devices=("qcow2",)),
    ),
    "mapped-ram-vs-tls": (
        "migrate",
        caps("mapped-ram", parameters={"tls-creds": "tls0"}),
        caps("mapped-ram"),
    ),
    "mapped-ram-vs-compression": (
        "migrate",
        caps("mapped-ram", parameters={"multifd-compression": "zstd"}),
        caps("mapped-ram", parameters={"multifd-compression": "none"}),
    ),
    "cpr-vs-postcopy": (
        "migrate",
        caps("dirty-bitmaps", mode="cpr-reboot"),
        caps("dirty-bitmaps"),
    ),
    "cpr-vs-background-snapshot": (
        "migrate",
        caps("background-snapshot", mode="cpr-reboot"),
        caps("background-snapshot"),
    ),
    "cpr-vs-colo": ("migrate", caps("x-colo", mode="cpr-reboot"), caps("x-colo")),
    "vfio-cpr-reboot-needs-suspended": (
        "migrate",
        Configuration(mode="cpr-reboot", devices=("vfio",)),
        Configuration(mode="cpr-reboot", devices=("vfio",), runstate="suspended"),
    ),
    "cont-needs-reset": (
        "cont",
        Configuration(runstate="shutdown"),
        Configuration(runstate="paused"),
    ),
    "cont-aborts-resuming-suspended": (
        "cont",
        Configuration(runstate="postmigrate", was_suspended=True),
        Configuration(runstate="paused", was_suspended=True),
    ),
    "cont-during-finish-migrate": (
        "cont",
        Configuration(runstate="finish-migrate"),
        Configuration(runstate="postmigrate"),
    ),
    "wakeup-needs-suspended": (
        "system_wakeup",
        Configuration(runstate="paused", was_suspended=True),
        Configuration(runstate="suspended"),
    ),
    "incoming-needs-defer": (
        "migrate-incoming",
        Configuration(runstate="running"),
        Configuration(**INCOMING),  # type: ignore[arg-type]
    ),
    "incoming-wedged": (
        "migrate-incoming",
        Configuration(runstate="inmigrate", incoming="wedged"),
        Configuration(**INCOMING),  # type: ignore[arg-type]
    ),
    "incoming-already-started": (
        "migrate-incoming",
        Configuration(runstate="inmigrate", incoming="started"),
        Configuration(**INCOMING),  # type: ignore[arg-type]
    ),
}

# rule id -> (configuration whose migration stalls, closest one whose migration ends).
STALLS: dict[str, tuple[Configuration, Configuration]] = {
    "return-path-on-exec-stalls": (
        caps("return-path", mode="cpr-reboot", uri="exec:cat > /dev/null"),
        caps("return-path", "pause-before-switchover", mode="cpr-reboot", uri="exec:cat"),
    ),
}

RULES = sorted(
    {
        (version, rule.id)
        for version in modelled_releases()
        for rule in load_model(version).rules
        if rule.fails_at != "never"
    }
)
STALL_RULES = sorted(
    {
        (version, rule.id)
        for version in modelled_releases()
        for rule in load_model(version).rules
        if rule.fails_at == "never"
    }
)


def test_every_rule_is_covered() -> None:
    """No rule of any release lacks a triggering case and a legal neighbour here."""
    assert {rule for _, rule in RULES} == set(CASES)
    assert {rule for _, rule in STALL_RULES} == set(STALLS)


@pytest.mark.parametrize(("version", "rule"), STALL_RULES)
def test_stall_is_allowed_but_predicted(version: str, rule: str) -> None:
    """A stall is no refusal: check() allows it, stall() names it, and not for the neighbour."""
    stalled, ends = STALLS[rule]
    model = load_model(version)
    assert check(stalled, qemu=version).allowed
    found = stall(stalled, "migrate", model)
    assert found is not None
    assert found.rule == rule
    assert stall(ends, "migrate", model) is None


@pytest.mark.parametrize(("version", "rule"), RULES)
def test_rule_fires_first(version: str, rule: str) -> None:
    """The triggering configuration is refused, and this rule is what QEMU reports."""
    command, refused, _ = CASES[rule]
    verdict = check(refused, command, qemu=version)
    assert not verdict.allowed
    assert verdict.reasons[0].rule == rule


@pytest.mark.parametrize(("version", "rule"), RULES)
def test_closest_neighbour_is_allowed(version: str, rule: str) -> None:
    """Changing the one thing the rule is about makes QEMU accept the request."""
    command, _, accepted = CASES[rule]
    verdict = check(accepted, command, qemu=version)
    assert verdict.allowed, verdict.summary()


class TestIssueExamples:
    """The answers the project promises in its README and issues."""

    def test_background_snapshot_memory_comes_before_its_conflicts(self) -> None:
        """Shared file RAM with background-snapshot and return-path: QEMU names the memory."""
        config = caps(
            "background-snapshot", "return-path", memory=MemoryBackend.parse("file,share=on")
        )
        verdict = check(config, "migrate-set-capabilities", qemu="10.0")
        assert (
            verdict.error
            == "Background-snapshot is not compatible with guest memory configuration"
        )
        assert [r.rule for r in verdict.reasons] == [
            "background-snapshot-needs-wp-memory",
            "background-snapshot-conflict",
        ]

    @pytest.mark.parametrize(
        ("cap", "error"),
        [
            ("postcopy-ram", "Cannot use postcopy with CPR"),
            ("x-colo", "Cannot use COLO with CPR"),
            ("background-snapshot", "Cannot use background snapshot with CPR"),
        ],
    )
    def test_cpr_reboot_conflicts(self, cap: str, error: str) -> None:
        """cpr-reboot refuses postcopy, COLO and background-snapshot at migrate."""
        verdict = check(caps(cap, mode="cpr-reboot"), qemu="10.0")
        assert (verdict.failed_at, verdict.error, verdict.asynchronous) == (
            "migrate",
            error,
            False,
        )

    def test_cpr_reboot_conflicts_do_not_exist_in_8_2(self) -> None:
        """The CPR conflict checks arrived in 9.0; 8.2 accepts cpr-reboot with postcopy."""
        plan = caps("postcopy-ram", mode="cpr-reboot", uri="tcp:127.0.0.1:4444")
        assert check(plan, qemu="8.2").allowed
        assert check(plan, qemu="9.0").error == "Cannot use postcopy with CPR"

    def test_vfio_needs_suspended_guest(self) -> None:
        """VFIO with cpr-reboot fails asynchronously on a running guest, not a suspended one."""
        running = check(Configuration(mode="cpr-reboot", devices=("vfio",)), qemu="10.0")
        assert running.asynchronous
        assert running.error == "VFIO device only supports cpr-reboot for runstate suspended"
        suspended = Configuration(mode="cpr-reboot", devices=("vfio",), runstate="suspended")
        assert check(suspended, qemu="10.0").allowed
        hidden = Configuration(
            mode="cpr-reboot", devices=("vfio",), runstate="paused", was_suspended=True
        )
        assert check(hidden, qemu="10.0").allowed

    def test_compress_exists_only_before_9_1(self) -> None:
        """compress is an unknown capability in 10.0 but accepted by 9.0."""
        with pytest.raises(UnknownNameError) as caught:
            check(caps("compress"), qemu="10.0")
        assert caught.value.kind == "capability"
        assert check(caps("compress"), qemu="9.0").allowed

    def test_local_block_formats_do_not_block_cpr_reboot(self) -> None:
        """A vdi disk blocks a normal migration but not cpr-reboot."""
        assert not check(Configuration(devices=("vdi",)), qemu="10.0").allowed
        assert check(Configuration(mode="cpr-reboot", devices=("vdi",)), qemu="10.0").allowed

    def test_background_snapshot_abort_follows_the_table(self) -> None:
        """The abort is derived from the runstate table: shutdown -> paused is allowed."""
        verdict = check(caps("background-snapshot", runstate="io-error"), qemu="10.0")
        assert verdict.error == "invalid runstate transition: 'io-error' -> 'paused'"
        assert verdict.asynchronous
        assert check(caps("background-snapshot", runstate="shutdown"), qemu="10.0").allowed
        in_8_2 = check(caps("background-snapshot", runstate="suspended"), qemu="8.2")
        assert in_8_2.error == "invalid runstate transition: 'suspended' -> 'paused'"

    def test_waiting_migrations_do_not_notice_the_return_path(self) -> None:
        """Waiting in pre-switchover or for a normal switchover-ack masks the return-path error."""
        base = {"uri": "file:/tmp/state"}
        assert check(caps("return-path", "pause-before-switchover", **base)).allowed
        assert check(caps("return-path", "switchover-ack", **base)).allowed
        cpr = caps("return-path", "switchover-ack", mode="cpr-reboot", **base)
        assert check(cpr).error == "Unable to read from file: Bad file descriptor"

    def test_newest_blocker_is_reported(self) -> None:
        """With two blocking devices QEMU reports the one attached last."""
        verdict = check(Configuration(devices=("vdi,node=a", "vmdk,node=b")), qemu="10.0")
        assert verdict.error == "The vmdk format used by node 'b' does not support live migration"


class TestUsageErrors:
    """Unknown names are usage errors that list valid values and suggest the closest."""

    def test_misspelt_mode_suggests(self) -> None:
        """A misspelt mode suggests the real one."""
        with pytest.raises(UnknownNameError) as caught:
            check(Configuration(mode="cpr-rebot"))
        assert caught.value.suggestion == "cpr-reboot"
        assert "normal" in str(caught.value)

    def test_mode_from_a_later_release(self) -> None:
        """cpr-transfer does not exist in 9.0."""
        with pytest.raises(UnknownNameError, match="cpr-transfer"):
            check(Configuration(mode="cpr-transfer"), qemu="9.0")

    @pytest.mark.parametrize(
        "config",
        [
            Configuration(runstate="runing"),
            Configuration(devices=("floppy",)),
            Configuration(parameters={"multifd-compression": "lz4"}),
            Configuration(parameters={"no-such": "x"}),
            Configuration(host={"quantum": True}),
            Configuration(uri="ftp://x"),
            Configuration(uri="no-scheme"),
            Configuration(memory=MemoryBackend(kind="hugepages")),
            Configuration(memory=MemoryBackend(kind="ram", share=True)),
            Configuration(cpr_channel="tcp:1.2.3.4:5"),
            Configuration(devices=("vdi,size=3",)),
        ],
    )
    def test_bad_configuration(self, config: Configuration) -> None:
        """Every malformed field is a UsageError, never another exception."""
        with pytest.raises(UsageError):
            check(config)

    def test_unknown_command(self) -> None:
        """An unknown command is a usage error listing the commands."""
        with pytest.raises(UnknownNameError, match="migrate-incoming"):
            check(Configuration(), "migrate-now")

    @pytest.mark.parametrize("spec", ["memfd,share", "memfd,share=maybe", "ram,size=1G"])
    def test_bad_memory_spec(self, spec: str) -> None:
        """A malformed --memory value is a usage error."""
        with pytest.raises(UsageError):
            MemoryBackend.parse(spec)


MODEL = load_model("10.0")
configurations = st.builds(
    Configuration,
    mode=st.sampled_from([m.name for m in MODEL.modes]),
    capabilities=st.frozensets(st.sampled_from(MODEL.capabilities), max_size=4),
    runstate=st.sampled_from(MODEL.runstates),
    was_suspended=st.booleans(),
    migration=st.sampled_from(MODEL.migration_statuses),
    uri=st.sampled_from(["file:/s", "exec:cat > /s", "unix:/m", "tcp:h:1"]),
    cpr_channel=st.sampled_from([None, "unix:/c"]),
    devices=st.lists(st.sampled_from([d.name for d in MODEL.devices]), max_size=2),
    memory=st.sampled_from(
        [MemoryBackend.parse(s) for s in ("ram", "memfd,share=on", "file,share=on")]
    ),
    aux_ram_share=st.booleans(),
)
commands = st.sampled_from(["migrate", "migrate-set-capabilities", "migrate-incoming", "cont"])


class TestProperties:
    """Properties that hold for every configuration."""

    @given(configurations, commands, st.sampled_from(MODEL.capabilities))
    def test_adding_a_capability_keeps_unrelated_refusals(
        self, config: Configuration, command: str, extra: str
    ) -> None:
        """A reason that does not mention a capability survives adding that capability."""
        before = check(config, command, model=MODEL)
        after = check(
            attrs.evolve(config, capabilities=config.capabilities | {extra}), command, model=MODEL
        )
        rules = {rule.id: rule for rule in MODEL.rules}
        for reason in before.reasons:
            if extra not in rules[reason.rule].capabilities:
                assert reason in after.reasons

    @given(configurations, commands)
    def test_reasons_follow_qemu_order(self, config: Configuration, command: str) -> None:
        """Reasons come step by step, and within a step in the model's rule order."""
        verdict = check(config, command, model=MODEL)
        order = {rule.id: index for index, rule in enumerate(MODEL.rules)}
        keys = [(verdict.steps.index(r.command), order[r.rule]) for r in verdict.reasons]
        assert keys == sorted(keys)
        assert verdict.error == (verdict.reasons[0].error if verdict.reasons else None)

    @given(configurations)
    def test_check_is_pure(self, config: Configuration) -> None:
        """Checking twice gives equal verdicts."""
        assert check(config, model=MODEL) == check(config, model=MODEL)


def valid_or_garbage(valid: list[str]) -> st.SearchStrategy[str]:
    """Mostly valid names (so checks go deep), sometimes any text."""
    return st.one_of(st.sampled_from(valid), st.text(max_size=16))


@given(
    mode=valid_or_garbage([m.name for m in MODEL.modes]),
    cap=valid_or_garbage(list(MODEL.capabilities)),
    runstate=valid_or_garbage(list(MODEL.runstates)),
    uri=valid_or_garbage(["file:/s", "exec:cat", "unix:/m", "tcp:h:1", "file:"]),
    device=valid_or_garbage([d.name for d in MODEL.devices] + ["vdi,node=x"]),
    memory=valid_or_garbage(["ram", "memfd,share=on", "file,share=on,path=/p", "ram,share=on"]),
    command=valid_or_garbage(["migrate", "cont", "migrate-incoming", "system_wakeup"]),
)
def test_garbage_is_a_usage_error_or_a_verdict(  # noqa: PLR0913, PLR0917 - one per field
    mode: str, cap: str, runstate: str, uri: str, device: str, memory: str, command: str
) -> None:
    """Any strings in any field give a Verdict or a UsageError, never another exception."""
    try:
        config = Configuration(
            mode=mode,
            capabilities={cap},
            runstate=runstate,
            uri=uri,
            devices=(device,),
            memory=MemoryBackend.parse(memory),
        )
        verdict = check(config, command, qemu="10.0")
    except UsageError:
        return
    assert isinstance(verdict.allowed, bool)
