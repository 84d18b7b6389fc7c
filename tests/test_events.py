"""Domain events: registration, the JSON codec, its refusals and upcasting."""

from __future__ import annotations

import enum
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprfsm import events
from cprfsm.events import Event, EventRegistry, RecordedEvent, Snapshot, new_event_id
from cprfsm.exceptions import (
    EventDecodeError,
    MalformedEventError,
    NewerEventVersionError,
    StoreError,
    UnknownEventTypeError,
    UsageError,
)

_registry = EventRegistry()


class Mode(enum.StrEnum):
    """A str-valued enum, spelled as QEMU spells its values."""

    NORMAL = "normal"
    CPR_REBOOT = "cpr-reboot"


class Capability(enum.StrEnum):
    """Another str-valued enum, used in a frozenset."""

    EVENTS = "events"
    X_IGNORE_SHARED = "x-ignore-shared"


@attrs.frozen(kw_only=True)
class Block:
    """A nested record."""

    name: str
    size: int
    shared: bool


@attrs.frozen(kw_only=True)
class Ram:
    """A record nesting records."""

    blocks: tuple[Block, ...]
    largest: Block | None


@_registry.event("tests.everything", version=1)
@attrs.frozen(kw_only=True)
class Everything(Event):
    """An event with a field of every supported kind."""

    vm: str
    incarnation: int
    ratio: float
    paused: bool
    nothing: None
    reason: str | None
    mode: Mode
    previous_mode: Mode | None
    capabilities: frozenset[Capability]
    tags: frozenset[str]
    history: tuple[int, ...]
    pair: tuple[str, int]
    notes: list[str]
    ram: Ram
    comment: str = ""


@_registry.event("tests.plain")
@attrs.frozen(kw_only=True)
class Plain(Event):
    """A small event."""

    vm: str


@_registry.event("tests.empty")
@attrs.frozen(kw_only=True)
class Empty(Event):
    """An event that is all in its type."""


@_registry.event("tests.checked")
@attrs.frozen(kw_only=True)
class Checked(Event):
    """An event whose class validates a field."""

    size: int = attrs.field(validator=attrs.validators.ge(0))


def _everything(**changes: Any) -> Everything:
    block = Block(name="pc.ram", size=4096, shared=True)
    fields: dict[str, Any] = {
        "vm": "vm-1",
        "incarnation": 3,
        "ratio": 0.25,
        "paused": False,
        "nothing": None,
        "reason": None,
        "mode": Mode.CPR_REBOOT,
        "previous_mode": Mode.NORMAL,
        "capabilities": frozenset({Capability.X_IGNORE_SHARED, Capability.EVENTS}),
        "tags": frozenset({"b", "a"}),
        "history": (1, 2, 3),
        "pair": ("x", 1),
        "notes": ["first"],
        "ram": Ram(blocks=(block,), largest=block),
        "comment": "hello",
    }
    fields.update(changes)
    return Everything(**fields)


def _round_trip(event: Event, registry: EventRegistry = _registry) -> Event:
    return registry.decode(*registry.encode(event))


def _decode_payload(payload: Any, tag: str = "tests.everything", version: int = 1) -> Event:
    return _registry.decode(tag, version, json.dumps(payload))


def _payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(_registry.encode(_everything())[2])
    payload.update(changes)
    return payload


class TestRegistration:
    """Declaring event classes."""

    def test_decorator_sets_tag_and_version(self) -> None:
        """The decorator records the type tag and schema version on the class."""
        assert (Everything.type_tag, Everything.schema_version) == ("tests.everything", 1)
        assert (Plain.type_tag, Plain.schema_version) == ("tests.plain", 1)
        assert {"tests.everything", "tests.plain"} <= set(_registry.type_tags())

    def test_default_registry_functions(self) -> None:
        """``event`` and ``upcaster`` register in the default registry stores use."""
        assert events.event == events.default_registry.event
        assert events.upcaster == events.default_registry.upcaster

    def test_tag_is_used_once(self) -> None:
        """A second class under a used tag is refused."""

        @attrs.frozen(kw_only=True)
        class Other(Event):
            vm: str

        with pytest.raises(UsageError, match="already used by Plain"):
            _registry.event("tests.plain")(Other)

    def test_class_is_registered_once(self) -> None:
        """The same class cannot be registered under a second tag."""
        with pytest.raises(UsageError, match="already registered"):
            _registry.event("tests.plain-again")(Plain)

    @pytest.mark.parametrize(("tag", "version"), [("", 1), ("tests.x", 0), ("tests.x", True)])
    def test_bad_tag_or_version(self, tag: str, version: int) -> None:
        """Tags are non-empty strings and versions integers from 1."""
        with pytest.raises(UsageError):
            EventRegistry().event(tag, version=version)

    def test_class_must_be_a_frozen_attrs_event(self) -> None:
        """Plain classes, mutable attrs classes and non-events are refused."""

        class NotAttrs(Event):
            pass

        @attrs.frozen(kw_only=True)
        class NotAnEvent:
            vm: str

        for cls in (NotAttrs, NotAnEvent):
            with pytest.raises(UsageError, match=r"attrs\.frozen"):
                EventRegistry().event("tests.bad")(cls)  # type: ignore[type-var]

    def test_unsupported_field_type_names_the_field(self) -> None:
        """A field type JSON cannot hold is refused at registration, naming the field."""

        @attrs.frozen(kw_only=True)
        class WithDict(Event):
            labels: dict[str, str]

        with pytest.raises(UsageError, match=r"WithDict\.labels"):
            EventRegistry().event("tests.dict")(WithDict)

    def test_unsupported_forms(self) -> None:
        """Unions, frozensets of ints, bare containers and non-str enums are refused."""

        class Number(enum.IntEnum):
            ONE = 1

        @attrs.frozen(kw_only=True)
        class Loose(Event):
            value: Any

        for annotation in (int | str, frozenset[int], tuple, Number, set[str]):
            with pytest.raises(UsageError):
                EventRegistry()._codec_for(annotation)
        with pytest.raises(UsageError):
            EventRegistry().event("tests.any")(Loose)

    def test_init_false_field_is_refused(self) -> None:
        """Every field must be an init argument, since that is what is stored."""

        @attrs.frozen(kw_only=True)
        class Derived(Event):
            vm: str
            label: str = attrs.field(init=False, default="x")

        with pytest.raises(UsageError, match="init=False"):
            EventRegistry().event("tests.derived")(Derived)

    def test_record_containing_itself_is_refused(self) -> None:
        """Records must be finite trees."""
        registry = EventRegistry()
        with pytest.raises(UsageError, match="contains itself"):
            registry.event("tests.tree")(_TreeEvent)

    def test_unresolvable_annotation_is_refused(self) -> None:
        """Field types must resolve from the class's module."""

        @attrs.frozen(kw_only=True)
        class Local(Event):
            value: LocalType  # type: ignore[name-defined]  # noqa: F821

        with pytest.raises(UsageError, match="module level"):
            EventRegistry().event("tests.local")(Local)


@attrs.frozen(kw_only=True)
class _Node:
    children: tuple[_Node, ...]


@attrs.frozen(kw_only=True)
class _TreeEvent(Event):
    root: _Node


class TestCodec:
    """Encoding events as JSON and decoding them back."""

    def test_round_trip_of_every_field_kind(self) -> None:
        """An event with every supported field kind decodes equal to itself."""
        event = _everything()
        decoded = _round_trip(event)
        assert decoded == event
        assert isinstance(decoded, Everything)
        assert type(decoded.mode) is Mode
        assert type(decoded.history) is tuple
        assert type(decoded.tags) is frozenset
        assert type(decoded.ram.largest) is Block

    def test_event_without_fields(self) -> None:
        """An event with no fields encodes as an empty object and decodes back."""
        assert _registry.encode(Empty()) == ("tests.empty", 1, "{}")
        assert _round_trip(Empty()) == Empty()
        with pytest.raises(MalformedEventError, match="only the fields"):
            _registry.decode("tests.empty", 1, '{"vm": "a"}')

    def test_encoding_is_compact_json_with_sorted_sets(self) -> None:
        """Sets encode sorted and enums as their QAPI values, so equal events encode equal."""
        tag, version, data = _registry.encode(_everything())
        assert (tag, version) == ("tests.everything", 1)
        payload = json.loads(data)
        assert payload["capabilities"] == ["events", "x-ignore-shared"]
        assert payload["tags"] == ["a", "b"]
        assert payload["mode"] == "cpr-reboot"
        assert payload["ram"]["blocks"] == [{"name": "pc.ram", "size": 4096, "shared": True}]
        assert " " not in data.replace("pc.ram", "")
        assert _registry.encode(_everything(tags=frozenset({"a", "b"})))[2] == data

    def test_int_for_a_float_field_decodes_as_float(self) -> None:
        """JSON written elsewhere may spell 1.0 as 1; it decodes as a float."""
        decoded = _decode_payload(_payload(ratio=1))
        assert isinstance(decoded, Everything)
        assert decoded.ratio == 1.0
        assert type(decoded.ratio) is float

    def test_plain_strings_in_enum_fields_encode(self) -> None:
        """A plain string holding an enum value encodes, and decodes as the member."""
        event = _everything(mode="normal", capabilities=frozenset({"events"}))
        decoded = _round_trip(event)
        assert isinstance(decoded, Everything)
        assert decoded.mode is Mode.NORMAL
        assert decoded.capabilities == frozenset({Capability.EVENTS})

    def test_missing_defaulted_field_takes_its_default(self) -> None:
        """A payload without a field that has a default decodes with the default."""
        payload = _payload()
        del payload["comment"]
        decoded = _decode_payload(payload)
        assert isinstance(decoded, Everything)
        assert decoded.comment == ""

    @pytest.mark.parametrize(
        ("changes", "where"),
        [
            ({"vm": 1}, "vm: expected a string"),
            ({"incarnation": True}, "incarnation: expected an integer"),
            ({"ratio": math.nan}, "ratio: expected a finite number"),
            ({"ratio": math.inf}, "ratio: expected a finite number"),
            ({"paused": 0}, "paused: expected true or false"),
            ({"nothing": 0}, "nothing: expected null"),
            ({"mode": "fast"}, "mode: expected one of 'normal', 'cpr-reboot'"),
            ({"tags": {"a"}}, "tags: expected a frozenset"),
            ({"tags": frozenset({1})}, "tags[0]: expected a string"),
            ({"history": [1]}, "history: expected a tuple"),
            ({"pair": ("x",)}, "pair: expected a tuple of 2 items"),
            ({"pair": ("x", "y")}, "pair[1]: expected an integer"),
            ({"notes": ("a",)}, "notes: expected a list"),
            (
                {"ram": Ram(blocks=(Block(name="a", size="1", shared=True),), largest=None)},  # type: ignore[arg-type]
                "ram.blocks[0].size: expected an integer",
            ),
            ({"ram": "ram"}, "ram: expected a Ram"),
        ],
    )
    def test_encoding_a_wrong_value_names_the_field(
        self, changes: dict[str, Any], where: str
    ) -> None:
        """A field holding a value of the wrong type is refused before anything is stored."""
        with pytest.raises(UsageError) as caught:
            _registry.encode(_everything(**changes))
        assert where in str(caught.value)
        assert "Everything" in str(caught.value)

    def test_encoding_an_unregistered_event_is_refused(self) -> None:
        """An event class the registry does not know cannot be encoded."""
        with pytest.raises(UsageError, match="not an event registered here"):
            EventRegistry().encode(Plain(vm="x"))


class TestDecodeErrors:
    """Stored events that cannot be decoded raise StoreErrors saying what to do."""

    def test_unknown_type_tag(self) -> None:
        """An unknown tag says to import the declaring module or upgrade."""
        with pytest.raises(UnknownEventTypeError) as caught:
            _registry.decode("tests.nobody", 1, "{}")
        assert isinstance(caught.value, StoreError)
        assert caught.value.type_tag == "tests.nobody"
        assert "import the module" in str(caught.value)

    def test_newer_schema_version(self) -> None:
        """A version newer than the class knows says to upgrade."""
        with pytest.raises(NewerEventVersionError, match="upgrade"):
            _registry.decode("tests.plain", 2, '{"vm": "x"}')

    @pytest.mark.parametrize("version", [0, -1])
    def test_impossible_schema_version(self, version: int) -> None:
        """A schema version below 1 is malformed."""
        with pytest.raises(MalformedEventError):
            _registry.decode("tests.plain", version, '{"vm": "x"}')

    @pytest.mark.parametrize(
        ("data", "problem"),
        [
            ("{not json", "not JSON"),
            ("[1, 2]", "payload: expected a JSON object"),
            ('{"vm": 5}', "vm: expected a string"),
            ("{}", "expected the fields ['vm']"),
            ('{"vm": "x", "extra": 1}', "expected only the fields ['vm']"),
            ('{"v": "x"}', "expected only the fields ['vm']"),
        ],
    )
    def test_malformed_payload(self, data: str, problem: str) -> None:
        """Bad JSON, a non-object, a wrong, missing or unknown field are malformed."""
        with pytest.raises(MalformedEventError) as caught:
            _registry.decode("tests.plain", 1, data)
        assert problem in str(caught.value)

    @pytest.mark.parametrize(
        ("changes", "where"),
        [
            ({"mode": "fast"}, "mode: expected one of"),
            ({"mode": ["normal"]}, "mode: expected one of"),
            ({"capabilities": ["events", "teleport"]}, "capabilities[1]: expected one of"),
            ({"history": [1, "2"]}, "history[1]: expected an integer"),
            ({"history": "123"}, "history: expected a JSON array"),
            ({"pair": ["x"]}, "pair: expected an array of 2 items"),
            ({"ratio": "1.0"}, "ratio: expected a number"),
            (
                {"ram": {"blocks": [{"name": "a", "size": 1}], "largest": None}},
                "ram.blocks[0]: expected the fields ['shared']",
            ),
            (
                {"ram": {"blocks": [], "largest": {"name": 1, "size": 1, "shared": True}}},
                "ram.largest.name: expected a string",
            ),
        ],
    )
    def test_malformed_value_names_its_path(self, changes: dict[str, Any], where: str) -> None:
        """A wrong value deep inside the payload is located by its path."""
        with pytest.raises(MalformedEventError) as caught:
            _decode_payload(_payload(**changes))
        assert where in str(caught.value)

    def test_class_validator_refusal_is_malformed(self) -> None:
        """A value the event class's own validator refuses is reported as malformed."""
        assert _registry.decode("tests.checked", 1, '{"size": 1}') == Checked(size=1)
        with pytest.raises(MalformedEventError, match="refused"):
            _registry.decode("tests.checked", 1, '{"size": -1}')


class TestUpcasting:
    """Old schema versions are brought up to date on decode."""

    @staticmethod
    def _registry_with_v3() -> EventRegistry:
        registry = EventRegistry()

        @registry.event("tests.migration-started", version=3)
        @attrs.frozen(kw_only=True)
        class MigrationStarted(Event):
            vm: str
            mode: str
            channels: int

        @registry.upcaster("tests.migration-started", 1)
        def add_mode(payload: dict[str, Any]) -> dict[str, Any]:
            return {**payload, "mode": "normal"}

        @registry.upcaster("tests.migration-started", 2)
        def rename_streams(payload: dict[str, Any]) -> dict[str, Any]:
            payload["channels"] = payload.pop("streams")
            return payload

        return registry

    def test_chain_of_upcasters(self) -> None:
        """A version 1 payload passes through every upcaster, in order, to version 3."""
        registry = self._registry_with_v3()
        decoded = registry.decode("tests.migration-started", 1, '{"vm": "a", "streams": 2}')
        assert attrs.asdict(decoded) == {"vm": "a", "mode": "normal", "channels": 2}
        from_two = registry.decode(
            "tests.migration-started", 2, '{"vm": "a", "mode": "cpr-reboot", "streams": 1}'
        )
        assert attrs.asdict(from_two) == {"vm": "a", "mode": "cpr-reboot", "channels": 1}

    def test_current_version_is_not_upcast(self) -> None:
        """A payload of the current version is decoded as it is."""
        registry = self._registry_with_v3()
        decoded = registry.decode(
            "tests.migration-started", 3, '{"vm": "a", "mode": "x", "channels": 4}'
        )
        assert attrs.asdict(decoded) == {"vm": "a", "mode": "x", "channels": 4}

    def test_missing_upcaster_says_which_to_register(self) -> None:
        """A gap in the chain names the upcaster to register."""
        registry = EventRegistry()
        registry.event("tests.gap", version=2)(_Gap)
        with pytest.raises(EventDecodeError, match=r"@upcaster\('tests.gap', 1\)"):
            registry.decode("tests.gap", 1, '{"vm": "a"}')

    def test_failing_upcaster_is_malformed(self) -> None:
        """An upcaster that cannot handle the old payload reports it as malformed."""
        registry = self._registry_with_v3()
        with pytest.raises(MalformedEventError, match="upcaster from version 2"):
            registry.decode("tests.migration-started", 2, '{"vm": "a", "mode": "x"}')

    def test_upcaster_needs_an_object(self) -> None:
        """An old payload that is not a JSON object is malformed, not passed on."""
        registry = self._registry_with_v3()
        with pytest.raises(MalformedEventError, match="not a JSON object"):
            registry.decode("tests.migration-started", 1, "[]")

    def test_one_upcaster_per_step(self) -> None:
        """A second upcaster for the same step is refused."""
        registry = self._registry_with_v3()
        with pytest.raises(UsageError, match="already registered"):
            registry.upcaster("tests.migration-started", 1)


@attrs.frozen(kw_only=True)
class _Gap(Event):
    vm: str


class TestRecords:
    """The envelope records and event ids."""

    def test_new_event_ids_are_unique_uuid7_hex(self) -> None:
        """Generated ids are distinct 32-digit hex UUIDv7s, ordered by time of creation."""
        ids = [new_event_id() for _ in range(1000)]
        assert len(set(ids)) == 1000
        assert {uuid.UUID(i).version for i in ids} == {7}
        assert all(len(i) == 32 and i == i.lower() for i in ids)
        assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)

    def test_records_are_frozen(self) -> None:
        """RecordedEvent and Snapshot cannot be changed in place."""
        snapshot = Snapshot(stream_id="vm", version=1, state={})
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            snapshot.version = 2  # type: ignore[misc]
        recorded = RecordedEvent(
            stream_id="vm",
            version=1,
            event_id="x",
            recorded_at=datetime.now(UTC),
            event=Plain(vm="x"),
        )
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            recorded.version = 2  # type: ignore[misc]


_text = st.text(max_size=20)
_blocks = st.builds(Block, name=_text, size=st.integers(), shared=st.booleans())
_events = st.builds(
    Everything,
    vm=_text,
    incarnation=st.integers(),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    paused=st.booleans(),
    nothing=st.none(),
    reason=st.none() | _text,
    mode=st.sampled_from(Mode),
    previous_mode=st.none() | st.sampled_from(Mode),
    capabilities=st.frozensets(st.sampled_from(Capability)),
    tags=st.frozensets(_text, max_size=5),
    history=st.lists(st.integers(), max_size=5).map(tuple),
    pair=st.tuples(_text, st.integers()),
    notes=st.lists(_text, max_size=5),
    ram=st.builds(
        Ram,
        blocks=st.lists(_blocks, max_size=3).map(tuple),
        largest=st.none() | _blocks,
    ),
    comment=_text,
)


@given(_events)
def test_encode_then_decode_is_identity(event: Everything) -> None:
    """Any event of the supported field kinds decodes to an equal event, encoding equal."""
    tag, version, data = _registry.encode(event)
    decoded = _registry.decode(tag, version, data)
    assert decoded == event
    assert _registry.encode(decoded) == (tag, version, data)
