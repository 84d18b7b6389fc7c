"""A test kit for code built on cprfsm: log capture, a recording executor, strategies.

It needs hypothesis (``pip install 'cprfsm[testing]'``), not pytest, so it works in a
notebook or a script as well as in a test suite:

* :func:`capture_transitions` collects cprfsm's ``transition.*`` log events;
* :class:`RecordingPorts` is an in-memory QEMU whose ``executor()`` drives a
  :class:`~cprfsm.VirtualMachine` and records every operation it performs;
* :func:`configurations`, :func:`commands` and :func:`command_sequences` are
  hypothesis strategies drawn from a release's model.

The contract every event store passes runs under pytest: it is
:class:`cprfsm.testing.contract.EventStoreContract`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import structlog.testing
from hypothesis import strategies as st

from cprfsm.legality import INCOMING_STATES, Configuration, MemoryBackend
from cprfsm.model import COMMANDS, load_model, modelled_releases
from cprfsm.ports import RecordingPorts

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from cprfsm.model import MemoryBackendKind, QemuModel

__all__ = [
    "DEFAULT_URIS",
    "RecordingPorts",
    "capture_transitions",
    "command_sequences",
    "commands",
    "configurations",
]

#: The state-file URIs :func:`commands` migrates to by default: one on disk, one on tmpfs.
DEFAULT_URIS = ("file:/var/lib/cprfsm/vm.state", "file:/dev/shm/cprfsm-vm.state")
# An address for each transport scheme of the model, for configurations.
_ADDRESSES = {"exec": "cat > /dev/null", "fd": "migration", "tcp": "127.0.0.1:4444"}
# Commands whose VirtualMachine method is not the command with '-' spelled '_'.
_METHODS = {
    "migrate-set-parameters": "set_parameters",
    "migrate-set-capabilities": "set_capabilities",
}


@contextlib.contextmanager
def capture_transitions() -> Iterator[list[dict[str, Any]]]:
    """Collect cprfsm's ``transition.*`` log events (as dicts) logged in the block.

    The list is filled when the block ends.  A thin filter over
    :func:`structlog.testing.capture_logs`, for tests and notebooks: the
    library itself never configures logging.
    """
    collected: list[dict[str, Any]] = []
    with structlog.testing.capture_logs() as logs:
        yield collected
    collected.extend(
        dict(entry) for entry in logs if str(entry.get("event", "")).startswith("transition.")
    )


def configurations(
    qemu: str | None = None, *, model: QemuModel | None = None
) -> st.SearchStrategy[Configuration]:
    """Configurations using only names release ``qemu``'s model (or ``model``) knows.

    Every one is well-formed, so :func:`cprfsm.check` answers it with a verdict, allowed
    or refused, and raises nothing.
    """
    model = model or load_model(qemu)
    parameters = {
        parameter.name: st.sampled_from(parameter.values or (parameter.default,))
        for parameter in model.parameters
    }
    return st.builds(
        Configuration,
        mode=st.sampled_from([mode.name for mode in model.modes]),
        capabilities=st.frozensets(st.sampled_from(model.capabilities), max_size=3),
        parameters=st.fixed_dictionaries({}, optional=parameters),
        runstate=st.sampled_from(model.runstates),
        process=st.sampled_from(("running", "absent")),
        was_suspended=st.booleans(),
        migration=st.sampled_from(model.migration_statuses),
        incoming=st.sampled_from(INCOMING_STATES),
        uri=st.sampled_from(
            [f"{t.name}:{_ADDRESSES.get(t.name, '/run/cprfsm/vm')}" for t in model.transports]
        ),
        cpr_channel=st.none() | st.just("unix:/run/cprfsm/cpr.sock"),
        devices=st.lists(st.sampled_from([d.name for d in model.devices]), max_size=3).map(tuple),
        memory=st.one_of([_backends(kind) for kind in model.memory_backends]),
        aux_ram_share=st.booleans(),
        host=st.fixed_dictionaries({}, optional={f.name: st.booleans() for f in model.host_facts}),
    )


def _backends(kind: MemoryBackendKind) -> st.SearchStrategy[MemoryBackend]:
    return st.builds(
        MemoryBackend,
        kind=st.just(kind.name),
        object=st.just(kind.object is not None),
        share=st.booleans() if kind.shareable else st.just(False),  # noqa: FBT003
        # A RAM file on tmpfs (lost at a host reboot) and one on disk; named, never opened.
        path=st.sampled_from(("/dev/shm/ram0", "/var/lib/cprfsm/ram0"))  # noqa: S108
        if kind.named_file
        else st.none(),
    )


def commands(
    qemu: str | None = None,
    *,
    model: QemuModel | None = None,
    uris: Sequence[str] = DEFAULT_URIS,
) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """One command of release ``qemu``'s model as ``(method, arguments)`` of a VirtualMachine.

    Run it with ``getattr(vm, method)(**arguments)``.  Modes, capabilities and
    releases come from the model; ``migrate`` and ``migrate-incoming`` use ``uris``.
    Many are refused where they land, as a user's would be: IllegalTransition, or
    UnknownNameError for a name the release after an ``upgrade_qemu`` does not know.
    """
    return st.one_of(list(_steps(model or load_model(qemu), uris).values()))


def command_sequences(
    qemu: str | None = None,
    *,
    model: QemuModel | None = None,
    uris: Sequence[str] = DEFAULT_URIS,
    max_size: int = 20,
) -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    """A ``start`` then up to ``max_size - 1`` :func:`commands`: one VM's life from its start."""
    steps = _steps(model or load_model(qemu), uris)
    rest = st.lists(st.one_of(list(steps.values())), max_size=max(max_size - 1, 0))
    return st.tuples(steps["start"], rest).map(lambda drawn: [drawn[0], *drawn[1]])


def _steps(
    model: QemuModel, uris: Sequence[str]
) -> dict[str, st.SearchStrategy[tuple[str, dict[str, Any]]]]:
    """Each command of the model and a strategy for it as ``(method, arguments)``."""
    arguments: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "start": st.fixed_dictionaries(
            {}, optional={"paused": st.booleans(), "incoming": st.booleans()}
        ),
        "upgrade-qemu": st.fixed_dictionaries(
            {"version": st.sampled_from(modelled_releases(model.path))}
        ),
        "migrate-set-parameters": st.fixed_dictionaries(
            {"mode": st.sampled_from([mode.name for mode in model.modes])}
        ),
        "migrate-set-capabilities": st.fixed_dictionaries(
            {
                "changes": st.dictionaries(
                    st.sampled_from(model.capabilities), st.booleans(), min_size=1, max_size=2
                )
            }
        ),
        "migrate": st.fixed_dictionaries({"uri": st.sampled_from(uris)}),
        "migrate-incoming": st.fixed_dictionaries({"uri": st.sampled_from(uris)}),
    }
    return {
        command: st.tuples(
            st.just(_METHODS.get(command, command.replace("-", "_"))),
            arguments.get(command, st.just({})),
        )
        for command in COMMANDS
    }
