"""Domain events: frozen attrs classes with a type tag and a schema version, stored as JSON.

Declare an event by subclassing :class:`Event` and registering the class::

    @event("migration.started", version=1)
    @attrs.frozen(kw_only=True)
    class MigrationStarted(Event):
        vm: str
        mode: MigrationMode

Fields may be ``str``, ``int``, ``float``, ``bool``, ``None``, str-valued enums,
``X | None``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``list[X]``, ``frozenset`` of
strings or str-valued enums, and nested frozen attrs records built from the same.  When
an event's schema grows, raise its ``version`` and register an :func:`upcaster` that
turns the stored dict of the previous version into the next one.

Stores encode events through an :class:`EventRegistry` (:data:`default_registry`
unless given another) and hand them back wrapped in a :class:`RecordedEvent`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import re
import time
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple, TypeVar

import attrs

from cprfsm.exceptions import (
    DamagedStreamError,
    DuplicateEventIdError,
    EventDecodeError,
    MalformedEventError,
    NewerEventVersionError,
    StoreError,
    UnknownEventTypeError,
    UsageError,
)

if typing.TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

__all__ = [
    "Event",
    "EventRegistry",
    "RecordedEvent",
    "Snapshot",
    "Upcaster",
    "default_registry",
    "event",
    "new_event_id",
    "upcaster",
]

_E = TypeVar("_E", bound="Event")

#: Turns the payload dict of one schema version of an event into the next version's.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@attrs.frozen(kw_only=True)
class Event:
    """Base of every domain event; subclasses are frozen attrs classes registered by tag."""

    type_tag: ClassVar[str]
    schema_version: ClassVar[int]


@attrs.frozen(kw_only=True)
class RecordedEvent:
    """An event as a store holds it: where it sits in its stream, its id and when it was stored."""

    stream_id: str
    version: int
    event_id: str
    recorded_at: datetime
    event: Event


@attrs.frozen(kw_only=True)
class Snapshot:
    """A folded state of a stream saved as a JSON object, valid at ``version``."""

    stream_id: str
    version: int
    state: dict[str, Any]


def new_event_id() -> str:
    """A fresh event id, as stores make when none is given: a UUIDv7 in hex.

    UUIDv7 (RFC 9562) starts with the time in milliseconds and ends in 74 random bits.
    Time-ordered ids land at the end of the store's event-id index; random uuid4 ids
    scattered each batch over the whole index and cut durable appends to a third.
    """
    return _new_event_ids(1)[0]


# The 80 bits below the timestamp: version 7 and variant 0b10 over random bits.
_UUID7_KEEP = ((1 << 80) - 1) & ~((0xF << 76) | (0x3 << 62))
_UUID7_SET = (0x7 << 76) | (0x2 << 62)


def _new_event_ids(count: int) -> list[str]:
    # One urandom call per batch: uuid.uuid4() alone costs a third of an append's budget.
    milliseconds = (time.time_ns() // 1_000_000) << 80
    raw = os.urandom(10 * count)
    return [
        f"{milliseconds | int.from_bytes(raw[i : i + 10]) & _UUID7_KEEP | _UUID7_SET:032x}"
        for i in range(0, 10 * count, 10)
    ]


class _InvalidValueError(Exception):
    """A value does not fit its declared field type; ``path`` locates it inside the event."""

    def __init__(self, expected: str, value: Any) -> None:
        self.expected = expected
        self.value = value
        self.path: list[str] = []
        super().__init__(expected)

    def describe(self) -> str:
        where = "".join(reversed(self.path)).lstrip(".") or "payload"
        return f"{where}: expected {self.expected}, got {self.value!r}"


_Convert = Callable[[Any], Any]


class _Codec(NamedTuple):
    """How one declared type is checked and turned into JSON values and back.

    Values whose exact type is in ``encodes_as_is`` (``decodes_as_is``) are already right
    and skip the call: most fields of most events are plain strings and integers.
    """

    encode: _Convert
    decode: _Convert
    encodes_as_is: tuple[type, ...] = ()
    decodes_as_is: tuple[type, ...] = ()
    #: Every valid JSON value mapped to its decoded value, where there are few (enums).
    decodes_by_lookup: Mapping[Any, Any] | None = None


def _located(exc: _InvalidValueError, step: str) -> _InvalidValueError:
    exc.path.append(step)
    return exc


def _encode_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    raise _InvalidValueError("a string", value)


def _decode_str(value: Any) -> Any:
    if type(value) is str:
        return value
    raise _InvalidValueError("a string", value)


def _encode_int(value: Any) -> Any:
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise _InvalidValueError("an integer", value)


def _decode_int(value: Any) -> Any:
    if type(value) is int:
        return value
    raise _InvalidValueError("an integer", value)


def _encode_float(value: Any) -> Any:
    if isinstance(value, float | int) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    raise _InvalidValueError("a finite number (JSON has no NaN or infinity)", value)


def _decode_float(value: Any) -> Any:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _InvalidValueError("a number", value)


def _check_bool(value: Any) -> Any:
    if type(value) is bool:
        return value
    raise _InvalidValueError("true or false", value)


def _check_none(value: Any) -> Any:
    if value is None:
        return value
    raise _InvalidValueError("null", value)


def _enum_codec(cls: type[enum.Enum]) -> _Codec:
    members = {member.value: member for member in cls}
    expected = f"one of {', '.join(map(repr, members))}"

    def encode(value: Any) -> Any:
        if type(value) is cls:
            return value
        if isinstance(value, str) and value in members:
            return str(value)
        raise _InvalidValueError(expected, value)

    def decode(value: Any) -> Any:
        if type(value) is str:
            member = members.get(value)
            if member is not None:
                return member
        raise _InvalidValueError(expected, value)

    # json writes a str-valued enum member as its value.
    return _Codec(encode, decode, encodes_as_is=(cls,), decodes_by_lookup=members)


def _optional_codec(inner: _Codec) -> _Codec:
    def encode(value: Any) -> Any:
        return None if value is None else inner.encode(value)

    def decode(value: Any) -> Any:
        return None if value is None else inner.decode(value)

    none = (type(None),)
    return _Codec(encode, decode, inner.encodes_as_is + none, inner.decodes_as_is + none)


def _convert_items(
    items: Collection[Any], convert: _Convert, as_is: tuple[type, ...]
) -> Collection[Any]:
    for item in items:
        if type(item) not in as_is:
            break
    else:
        return items
    try:
        return [item if type(item) in as_is else convert(item) for item in items]
    except _InvalidValueError:
        # Only on failure: walk again to say which item was wrong.
        for index, item in enumerate(items):
            try:
                convert(item)
            except _InvalidValueError as exc:
                raise _located(exc, f"[{index}]") from None
        raise


def _sequence_codec(container: type[tuple[Any, ...] | list[Any]], item: _Codec) -> _Codec:
    kind = "a tuple" if container is tuple else "a list"

    def encode(value: Any) -> Any:
        if not isinstance(value, container):
            raise _InvalidValueError(kind, value)
        return _convert_items(value, item.encode, item.encodes_as_is)

    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _InvalidValueError("a JSON array", value)
        return container(_convert_items(value, item.decode, item.decodes_as_is))

    return _Codec(encode, decode)


def _fixed_tuple_codec(items: tuple[_Codec, ...]) -> _Codec:
    expected = f"an array of {len(items)} items"

    def convert(value: Any, *, decoding: bool) -> tuple[Any, ...]:
        converted = []
        for index, (codec, part) in enumerate(zip(items, value, strict=True)):
            try:
                converted.append(codec.decode(part) if decoding else codec.encode(part))
            except _InvalidValueError as exc:
                raise _located(exc, f"[{index}]") from None
        return tuple(converted)

    def encode(value: Any) -> Any:
        if not isinstance(value, tuple) or len(value) != len(items):
            raise _InvalidValueError(f"a tuple of {len(items)} items", value)
        return list(convert(value, decoding=False))

    def decode(value: Any) -> Any:
        if type(value) is not list or len(value) != len(items):
            raise _InvalidValueError(expected, value)
        return convert(value, decoding=True)

    return _Codec(encode, decode)


def _frozenset_codec(item: _Codec) -> _Codec:
    def encode(value: Any) -> Any:
        if not isinstance(value, frozenset):
            raise _InvalidValueError("a frozenset", value)
        # Sorted, so equal sets always encode to equal text (idempotent retries compare it).
        return sorted(_convert_items(value, item.encode, item.encodes_as_is))

    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _InvalidValueError("a JSON array", value)
        return frozenset(_convert_items(value, item.decode, item.decodes_as_is))

    return _Codec(encode, decode)


class _Field(NamedTuple):
    key: str  # the JSON key and init argument (the attrs alias)
    name: str  # the attribute
    codec: _Codec
    required: bool


class _RecordCodec:
    """Checks and converts one frozen attrs class.

    ``encode`` and ``decode`` are straight-line functions generated for the class, as attrs
    generates ``__init__``: replay decodes every event, and a loop over the fields doubled
    the cost.  They handle the usual case, every field present with a value of its declared
    type, and hand anything else to :meth:`explain_encode` / :meth:`explain_decode`, which
    convert field by field and say which value is wrong.
    """

    def __init__(self, cls: type[Any], fields: list[_Field]) -> None:
        self.cls = cls
        self.fields = fields
        self.keys = frozenset(field.key for field in fields)
        self.required = frozenset(field.key for field in fields if field.required)
        self.encode, self.decode = self._compile()

    def explain_encode(self, obj: Any) -> dict[str, Any]:
        if type(obj) is not self.cls:
            raise _InvalidValueError(f"a {self.cls.__qualname__}", obj)
        encoded = {}
        for field in self.fields:
            try:
                encoded[field.key] = field.codec.encode(getattr(obj, field.name))
            except _InvalidValueError as exc:
                raise _located(exc, f".{field.key}") from None
        return encoded

    def explain_decode(self, raw: Any) -> Any:
        if type(raw) is not dict:
            raise _InvalidValueError("a JSON object", raw)
        unknown = raw.keys() - self.keys
        if unknown:
            raise _InvalidValueError(f"only the fields {sorted(self.keys)}", sorted(unknown))
        missing = self.required - raw.keys()
        if missing:
            raise _InvalidValueError(f"the fields {sorted(missing)}", "an object without them")
        kwargs = {}
        for field in self.fields:
            if field.key in raw:
                try:
                    kwargs[field.key] = field.codec.decode(raw[field.key])
                except _InvalidValueError as exc:
                    raise _located(exc, f".{field.key}") from None
        return self.cls(**kwargs)

    def _compile(self) -> tuple[_Convert, _Convert]:
        namespace: dict[str, Any] = {
            "cls": self.cls,
            "Invalid": _InvalidValueError,
            "explain_encode": self.explain_encode,
            "explain_decode": self.explain_decode,
        }
        encode = ["def encode(obj):", "  if type(obj) is not cls: return explain_encode(obj)"]
        decode = [
            "def decode(raw):",
            f"  if type(raw) is not dict or len(raw) != {len(self.fields)}:",
            "    return explain_decode(raw)",
        ]
        encode.append("  try:")
        decode.append("  try:")
        for index, field in enumerate(self.fields):
            # Only identifiers reach the generated source; values go through the namespace.
            if not (field.key.isidentifier() and field.name.isidentifier()):
                raise UsageError(f"{field.name!r} is not an identifier")
            namespace.update(
                {
                    f"e{index}": field.codec.encode,
                    f"d{index}": field.codec.decode,
                    f"ea{index}": field.codec.encodes_as_is,
                    f"da{index}": field.codec.decodes_as_is,
                    f"dl{index}": field.codec.decodes_by_lookup,
                }
            )
            encode.append(f"    v{index} = obj.{field.name}")
            encode.append(_converted(index, "e", field.codec.encodes_as_is))
            decode.append(f"    v{index} = raw[{field.key!r}]")
            if field.codec.decodes_by_lookup is None:
                decode.append(_converted(index, "d", field.codec.decodes_as_is))
            else:
                decode.append(f"    v{index} = dl{index}[v{index}]")
        if not self.fields:
            encode.append("    pass")
            decode.append("    pass")
        keys = [field.key for field in self.fields]
        encode += [
            "  except Invalid: return explain_encode(obj)",
            "  return {" + ", ".join(f"{key!r}: v{i}" for i, key in enumerate(keys)) + "}",
        ]
        decode += [
            # KeyError: a missing key or a value not in a lookup; TypeError: an unhashable one.
            "  except (KeyError, TypeError, Invalid): return explain_decode(raw)",
            "  return cls(" + ", ".join(f"{key}=v{i}" for i, key in enumerate(keys)) + ")",
        ]
        exec("\n".join([*encode, *decode]), namespace)  # noqa: S102 - see the class docstring
        return namespace["encode"], namespace["decode"]


def _converted(index: int, direction: str, as_is: tuple[type, ...]) -> str:
    convert = f"v{index} = {direction}{index}(v{index})"
    if not as_is:
        return f"    {convert}"
    return f"    if type(v{index}) not in {direction}a{index}: {convert}"


def _is_frozen_attrs(cls: type[Any]) -> bool:
    return "__attrs_attrs__" in cls.__dict__ and cls.__setattr__ is _FROZEN_SETATTR


# attrs has no public "is frozen" query; every frozen attrs class shares this __setattr__.
_FROZEN_SETATTR: object = Event.__setattr__


class _EventType(NamedTuple):
    cls: type[Event]
    type_tag: str
    version: int
    codec: _RecordCodec


class EventRegistry:
    """Event classes by type tag, their upcasters, and the JSON codec stores use."""

    def __init__(self) -> None:
        """Start an empty registry."""
        self._by_tag: dict[str, _EventType] = {}
        self._by_class: dict[type[Event], _EventType] = {}
        self._records: dict[type[Any], _RecordCodec] = {}
        self._building: set[type[Any]] = set()
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def event(self, type_tag: str, *, version: int = 1) -> Callable[[type[_E]], type[_E]]:
        """Class decorator: register a frozen attrs :class:`Event` subclass under a type tag."""
        if not type_tag or not isinstance(type_tag, str):
            raise UsageError(f"an event type tag must be a non-empty string, not {type_tag!r}")
        if type(version) is not int or version < 1:
            raise UsageError(f"an event schema version must be an integer >= 1, not {version!r}")

        def register(cls: type[_E]) -> type[_E]:
            self._register(cls, type_tag, version)
            return cls

        return register

    def upcaster(self, type_tag: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register a function turning ``from_version``'s payload dict into the next."""
        key = (type_tag, from_version)
        if key in self._upcasters:
            raise UsageError(
                f"an upcaster for {type_tag!r} from version {from_version} is already "
                "registered; register one function per version step"
            )

        def register(function: Upcaster) -> Upcaster:
            self._upcasters[key] = function
            return function

        return register

    def type_tags(self) -> tuple[str, ...]:
        """The registered type tags, sorted."""
        return tuple(sorted(self._by_tag))

    def encode(self, event: Event) -> tuple[str, int, str]:
        """The ``(type tag, schema version, JSON text)`` a store keeps for ``event``."""
        spec = self._by_class.get(type(event))
        if spec is None:
            raise UsageError(
                f"{type(event).__qualname__} is not an event registered here; decorate it "
                "with @event(...) on the registry the store uses"
            )
        try:
            data = spec.codec.encode(event)
        except _InvalidValueError as exc:
            raise UsageError(
                f"cannot encode {type(event).__qualname__} ({spec.type_tag!r}): "
                f"{exc.describe()}; give the field a value of its declared type"
            ) from None
        return spec.type_tag, spec.version, _to_json(data)

    def decode(self, type_tag: str, schema_version: int, data: str) -> Event:
        """The event stored as ``data`` under a type tag and schema version, upcast if older."""
        spec = self._by_tag.get(type_tag)
        if spec is None:
            raise UnknownEventTypeError(
                type_tag,
                schema_version,
                "no event class is registered under this type tag",
                "import the module that declares it, or upgrade to the cprfsm or application "
                "version that wrote it",
            )
        problem = _json_problem(data)
        if problem is not None:
            raise MalformedEventError(type_tag, schema_version, problem, _RESTORE)
        try:
            raw = json.loads(data)
        except (TypeError, ValueError) as exc:
            raise MalformedEventError(
                type_tag, schema_version, f"the payload is not JSON ({exc})", _RESTORE
            ) from None
        if schema_version != spec.version:
            raw = self._upcast(spec, schema_version, raw)
        try:
            decoded: Event = spec.codec.decode(raw)
        except _InvalidValueError as exc:
            raise MalformedEventError(type_tag, schema_version, exc.describe(), _RESTORE) from None
        except (TypeError, ValueError) as exc:
            # Raised by validators the event class declares.
            raise MalformedEventError(
                type_tag, schema_version, f"the event class refused it: {exc}", _RESTORE
            ) from exc
        return decoded

    def _upcast(self, spec: _EventType, schema_version: int, raw: Any) -> Any:
        if type(schema_version) is not int or schema_version < 1:
            raise MalformedEventError(
                spec.type_tag,
                schema_version,
                "the schema version is not an integer >= 1",
                _RESTORE,
            )
        if schema_version > spec.version:
            raise NewerEventVersionError(
                spec.type_tag,
                schema_version,
                f"{spec.cls.__qualname__} only knows versions up to {spec.version}",
                "upgrade to the cprfsm or application version that wrote it",
            )
        for version in range(schema_version, spec.version):
            function = self._upcasters.get((spec.type_tag, version))
            if function is None:
                raise EventDecodeError(
                    spec.type_tag,
                    schema_version,
                    f"no upcaster turns version {version} into {version + 1}",
                    f"register one with @upcaster({spec.type_tag!r}, {version})",
                )
            if type(raw) is not dict:
                raise MalformedEventError(
                    spec.type_tag, schema_version, "the payload is not a JSON object", _RESTORE
                )
            try:
                raw = function(raw)
            except (LookupError, TypeError, ValueError) as exc:
                raise MalformedEventError(
                    spec.type_tag,
                    schema_version,
                    f"the upcaster from version {version} failed: {exc!r}",
                    _RESTORE,
                ) from exc
        return raw

    def _register(self, cls: type[Event], type_tag: str, version: int) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Event) and _is_frozen_attrs(cls)):
            raise UsageError(
                f"@event({type_tag!r}) needs an Event subclass decorated with "
                f"@attrs.frozen(kw_only=True) under it; {cls!r} is not"
            )
        if type_tag in self._by_tag:
            raise UsageError(
                f"the event type tag {type_tag!r} is already used by "
                f"{self._by_tag[type_tag].cls.__qualname__}; choose another tag"
            )
        if "type_tag" in cls.__dict__:
            raise UsageError(f"{cls.__qualname__} is already registered as {cls.type_tag!r}")
        codec = self._record_codec(cls)
        cls.type_tag = type_tag
        cls.schema_version = version
        spec = _EventType(cls, type_tag, version, codec)
        self._by_tag[type_tag] = spec
        self._by_class[cls] = spec

    def _record_codec(self, cls: type[Any]) -> _RecordCodec:
        known = self._records.get(cls)
        if known is not None:
            return known
        if cls in self._building:
            raise UsageError(f"{cls.__qualname__} contains itself; records must be finite trees")
        self._building.add(cls)
        try:
            codec = _RecordCodec(cls, self._fields(cls))
        finally:
            self._building.discard(cls)
        self._records[cls] = codec
        return codec

    def _fields(self, cls: type[Any]) -> list[_Field]:
        try:
            hints = typing.get_type_hints(cls)
        except NameError as exc:
            raise UsageError(
                f"cannot resolve the field types of {cls.__qualname__}: {exc}; "
                "declare the types it uses at module level"
            ) from None
        fields = []
        for field in attrs.fields(cls):
            if not field.init:
                raise UsageError(
                    f"{cls.__qualname__}.{field.name} has init=False; events and their records "
                    "are stored as their init arguments, so every field must be one"
                )
            try:
                codec = self._codec_for(hints[field.name])
            except UsageError as exc:
                raise UsageError(f"{cls.__qualname__}.{field.name}: {exc}") from None
            required = field.default is attrs.NOTHING
            fields.append(_Field(field.alias, field.name, codec, required))
        return fields

    def _codec_for(self, annotation: Any) -> _Codec:
        if annotation in _SCALARS:
            return _SCALARS[annotation]
        if isinstance(annotation, type):
            return self._class_codec(annotation)
        return self._generic_codec(annotation)

    def _generic_codec(self, annotation: Any) -> _Codec:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in {typing.Union, types.UnionType} and type(None) in args and len(args) == 2:
            (inner,) = (arg for arg in args if arg is not type(None))
            return _optional_codec(self._codec_for(inner))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return _sequence_codec(tuple, self._codec_for(args[0]))
        if origin is tuple and args:
            return _fixed_tuple_codec(tuple(self._codec_for(arg) for arg in args))
        if origin is list and len(args) == 1:
            return _sequence_codec(list, self._codec_for(args[0]))
        if origin is frozenset and args and (args[0] is str or _is_str_enum(args[0])):
            return _frozenset_codec(self._codec_for(args[0]))
        raise _unsupported(annotation)

    def _class_codec(self, cls: type[Any]) -> _Codec:
        if issubclass(cls, enum.Enum):
            if not issubclass(cls, str):
                raise UsageError(f"the enum {cls.__qualname__} must be a StrEnum")
            return _enum_codec(cls)
        if _is_frozen_attrs(cls):
            record = self._record_codec(cls)
            return _Codec(record.encode, record.decode)
        raise _unsupported(cls)


def _is_str_enum(annotation: Any) -> bool:
    return (
        isinstance(annotation, type)
        and issubclass(annotation, enum.Enum)
        and issubclass(annotation, str)
    )


def _unsupported(annotation: Any) -> UsageError:
    return UsageError(
        f"the type {annotation!r} cannot be stored as JSON; use str, int, float, bool, None, "
        "a StrEnum, X | None, tuple, list, frozenset[str] or a frozen attrs record"
    )


_NONE = (type(None),)
_SCALARS: dict[Any, _Codec] = {
    str: _Codec(_encode_str, _decode_str, (str,), (str,)),
    int: _Codec(_encode_int, _decode_int, (int,), (int,)),
    float: _Codec(_encode_float, _decode_float, (), (float,)),
    bool: _Codec(_check_bool, _check_bool, (bool,), (bool,)),
    type(None): _Codec(_check_none, _check_none, _NONE, _NONE),
    None: _Codec(_check_none, _check_none, _NONE, _NONE),
}

# Built once: json.dumps with any option builds a new encoder per call.  Codecs have already
# refused NaN, infinities and cycles.
_to_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_RESTORE = "the stored event is damaged: restore the store from a backup"

#: The registry stores use unless they are given another.
default_registry = EventRegistry()
#: Register an event class in :data:`default_registry`; see :meth:`EventRegistry.event`.
event = default_registry.event
#: Register an upcaster in :data:`default_registry`; see :meth:`EventRegistry.upcaster`.
upcaster = default_registry.upcaster


# The rules every store applies.  They sit here, beside the codec they build on, so that
# cprfsm.store and cprfsm._store_sqlite share them without importing each other.


class _Pending(NamedTuple):
    """An event encoded for appending, with the id it will be stored under."""

    event_id: str
    type_tag: str
    schema_version: int
    data: str


class _Stored(NamedTuple):
    """Where and how an event id is already stored."""

    stream_id: str
    version: int
    type_tag: str
    schema_version: int
    data: str


def _check_stream_id(stream_id: str) -> None:
    if type(stream_id) is not str or not stream_id:
        raise UsageError(f"a stream id must be a non-empty string, not {stream_id!r}")
    if not stream_id.isascii():
        _check_text("a stream id", stream_id)


def _check_version(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise UsageError(f"{name} must be an integer >= 0, not {value!r}")


def _check_range(first: int, last: int | None) -> None:
    if type(first) is not int or first < 1:
        raise UsageError(f"first must be an integer >= 1, not {first!r}")
    if last is not None:
        _check_version("last", last)


def _store_closed() -> StoreError:
    return StoreError("the store is closed; open it again to use it")


def _encode_batch(
    registry: EventRegistry, events: Sequence[Event], event_ids: Sequence[str] | None
) -> list[_Pending]:
    """Encode every event before anything is written, so a bad one leaves the stream as it was."""
    if event_ids is None:
        ids = _new_event_ids(len(events))
    else:
        ids = list(event_ids)
        if len(ids) != len(events):
            raise UsageError(
                f"{len(ids)} event ids were given for {len(events)} events; give one per event"
            )
        if any(type(event_id) is not str or not event_id for event_id in ids):
            raise UsageError("event ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            raise UsageError("the event ids of one batch must differ from each other")
        if not all(event_id.isascii() for event_id in ids):
            for event_id in ids:
                _check_text("an event id", event_id)
    encode = registry.encode
    batch = [_Pending(event_id, *encode(e)) for event_id, e in zip(ids, events, strict=True)]
    for pending in batch:
        problem = _json_problem(pending.data)
        if problem is not None:
            raise UsageError(
                f"event {pending.type_tag!r} cannot be stored: {problem}; store less in one event"
            )
    return batch


def _check_text(what: str, text: str) -> None:
    """Refuse a string SQLite cannot store as UTF-8 (a lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} must be valid Unicode text, not {text!r}") from None


def _replayed_version(
    stream_id: str,
    expected_version: int,
    batch: Sequence[_Pending],
    found: Sequence[_Stored | None],
) -> int | None:
    """The version a retried batch ended at, or None when none of its ids is stored yet.

    A batch is a retry when every id is stored in this stream, at the place the batch asked
    for, with the same content; any other overlap raises :class:`DuplicateEventIdError`.
    """
    if all(stored is None for stored in found):
        return None
    for offset, (pending, stored) in enumerate(zip(batch, found, strict=True)):
        if stored is None:
            continue
        position = expected_version + 1 + offset
        if stored.stream_id != stream_id:
            problem = f"in stream {stored.stream_id!r} at version {stored.version}"
        elif stored.version != position:
            problem = f"at version {stored.version}, not {position}"
        elif (stored.type_tag, stored.schema_version, stored.data) != pending[1:]:
            problem = f"at version {position} with different content"
        else:
            continue
        raise DuplicateEventIdError(stream_id, pending.event_id, problem)
    partly = next(p for p, stored in zip(batch, found, strict=True) if stored is not None)
    if any(stored is None for stored in found):
        raise DuplicateEventIdError(stream_id, partly.event_id, "in a batch of other events")
    return expected_version + len(batch)


def _encode_state(state: dict[str, Any]) -> str:
    if not isinstance(state, dict):
        raise UsageError(f"a snapshot state must be a dict, not {type(state).__qualname__}")
    try:
        data = json.dumps(state, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"a snapshot state must be JSON-encodable: {exc}") from None
    except RecursionError:
        problem: str | None = "it nests too deep"
    else:
        problem = _json_problem(data)
        if problem is None:
            return data
    raise UsageError(f"a snapshot state cannot be stored: {problem}; store a smaller state")


# --- Bounds on stored JSON ------------------------------------------------------------------

#: The most bytes of JSON one event payload or snapshot may hold.
MAX_JSON_BYTES = 16 * 1024 * 1024
#: The deepest nesting of arrays and objects a payload or snapshot may hold.
MAX_JSON_DEPTH = 64

# A JSON string (skipped whole, escapes included) or one bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _json_problem(text: object) -> str | None:
    """Why ``text`` may not be decoded as stored JSON, or None: checked before json.loads."""
    if type(text) is not str:
        return f"the payload is {type(text).__name__}, not JSON text"
    if len(text) > MAX_JSON_BYTES:
        return f"the payload holds {len(text)} characters, more than {MAX_JSON_BYTES}"
    # Fewer brackets than the bound cannot nest deeper than it: the usual case costs two scans
    # in C.  Only payloads with many brackets are walked token by token.
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in {"[", "{"}:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"the payload nests deeper than {MAX_JSON_DEPTH} levels"
        elif token in {"]", "}"}:
            depth -= 1
    return None


def _decode_state(text: object) -> dict[str, Any] | str:
    """A stored snapshot state, or why it is not one."""
    problem = _json_problem(text)
    if problem is not None:
        return problem
    try:
        state = json.loads(typing.cast("str", text))
    except ValueError as exc:
        return f"it is not JSON ({exc})"
    if type(state) is not dict:
        return f"it is a JSON {type(state).__name__}, not an object"
    return state


# --- The chain: each event linked to the one before it --------------------------------------

_CHAIN_SIZE = 32
_blake2b = hashlib.blake2b


def _genesis(stream_id: str) -> bytes:
    """The link before a stream's first event: binds the chain to the stream's id."""
    return _blake2b(b"cprfsm stream\x00" + stream_id.encode(), digest_size=_CHAIN_SIZE).digest()


def _link(  # noqa: PLR0913, PLR0917 - the stored columns, hashed in order
    previous: bytes,
    version: int,
    event_id: str,
    type_tag: str,
    schema_version: int,
    data: str,
    recorded_at: str,
) -> bytes:
    """The chain value of one event: BLAKE2b over the previous value and everything stored.

    Every text but the last is preceded by its length, so no two rows encode alike.
    """
    body = (
        f"{version}\x00{schema_version}\x00{len(event_id)}\x00{event_id}"
        f"{len(type_tag)}\x00{type_tag}{len(recorded_at)}\x00{recorded_at}{data}"
    )
    return _blake2b(previous + body.encode(), digest_size=_CHAIN_SIZE).digest()


# --- Time stamps ----------------------------------------------------------------------------

# Exactly what datetime.isoformat() writes for a UTC time: microseconds are left out at 0.
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?\+00:00")


def _now() -> datetime:
    """The wall clock, in UTC (tests replace it to step the clock back)."""
    return datetime.now(UTC)


def _stamp(previous: datetime | None) -> datetime:
    """The time to record a batch at: now, or the stream's last time if the clock went back.

    A stream's times therefore never decrease, so a read that finds one going back has
    found damage, not a clock step.
    """
    now = _now()
    return now if previous is None or now >= previous else previous


def _parse_stamp(stamped: object) -> datetime | None:
    """The UTC time a store wrote as ``stamped``, or None if it is not one."""
    if type(stamped) is not str or _STAMP.fullmatch(stamped) is None:
        return None
    try:
        return datetime.fromisoformat(stamped)
    except ValueError:
        return None


# --- Checking a stream as it is read --------------------------------------------------------


class _Head(NamedTuple):
    """What a store remembers of a stream's end, read in the same snapshot as its rows."""

    version: int
    chain: bytes | None  # None in a store without a chain (schema 1)
    legacy: int  # the last version written without the chain; times may go back up to it


class _StreamCheck:
    """Checks one stream's rows as a store reads them, in version order.

    Versions run from ``first`` without a gap, each row's chain value is recomputed from
    the one before it, times never go back, and the stream ends where its head says.
    The first row that breaks a rule raises :class:`DamagedStreamError` naming its version.
    """

    __slots__ = (
        "_expected",
        "_last",
        "_no_anchor",
        "_previous",
        "_stamp",
        "_time",
        "head",
        "stream",
        "where",
    )

    def __init__(self, where: str | os.PathLike[str], stream: str, first: int, last: int) -> None:
        self.where = where
        self.stream = stream
        self.head: _Head | None = None
        self._expected = first
        self._last = last
        self._previous: bytes | None = _genesis(stream) if first == 1 else None
        self._time: datetime | None = None
        self._stamp: str | None = None
        self._no_anchor = False

    def damaged(self, version: int, problem: str) -> DamagedStreamError:
        """The error for the stream's first bad version."""
        return DamagedStreamError(self.where, self.stream, version, problem)

    def anchor(self, row: tuple[Any, Any] | None) -> None:
        """The ``(chain, recorded_at)`` of the row before ``first``; None if there is none."""
        if row is None:
            self._no_anchor = True
            return
        chain, stamped = row
        self._previous = chain if type(chain) is bytes else None
        self._time = _parse_stamp(stamped)

    def set_head(self, head: _Head) -> None:
        """The stream's head, as the snapshot being read holds it."""
        self.head = head
        if head.chain is None:
            self._previous = None  # a store without a chain: nothing to link

    def row(self, row: Sequence[Any]) -> datetime | None:
        """Check the next ``(version, event_id, type, schema_version, data, recorded_at, chain)``.

        Returns the row's recorded time, or None when the row lies past the head.
        """
        version, event_id, type_tag, schema_version, data, stamped, chain = row
        head = self.head
        expected = self._expected
        if type(version) is not int or version != expected:
            if type(version) is int and version > expected:
                missing = f"version {expected} is missing (the next row is version {version})"
            else:
                missing = f"a row with version {version!r} sits where version {expected} belongs"
            raise self.damaged(expected, missing)
        if head is not None and version > head.version:
            # Rows past the head: appended on this connection after the read began, or
            # added behind the store's back, which version() and verify() report.
            return None
        recorded_at = self._timed(version, stamped)
        if head is not None and head.chain is not None:
            if not (
                type(event_id) is str
                and type(type_tag) is str
                and type(data) is str
                and type(schema_version) is int
            ):
                raise self.damaged(version, "a stored field has the wrong type")
            link = self._linked(version, event_id, type_tag, schema_version, data, stamped)
            if chain != link:
                raise self.damaged(
                    version, "its content does not match the chain (edited, moved or replaced)"
                )
            if version == head.version and link != head.chain:
                raise self.damaged(version, "it is not the event the stream's head records")
            self._previous = link
        self._expected = version + 1
        return recorded_at

    def _timed(self, version: int, stamped: Any) -> datetime:
        """The row's time, parsed strictly (once per batch) and checked not to go back."""
        if stamped != self._stamp or self._time is None:
            recorded_at = _parse_stamp(stamped)
            if recorded_at is None:
                raise self.damaged(version, f"its time {stamped!r} is not a UTC time cprfsm wrote")
            self._stamp = stamped
        else:
            recorded_at = self._time
        head = self.head
        if (
            head is not None
            and version > head.legacy
            and self._time is not None
            and recorded_at < self._time
        ):
            raise self.damaged(
                version, f"it was recorded at {stamped}, before version {version - 1}"
            )
        self._time = recorded_at
        return recorded_at

    def _linked(self, version: int, *fields: Any) -> bytes:
        """The row's chain value, computed from the previous row's."""
        previous = self._previous
        if previous is None:
            lost = "it is missing" if self._no_anchor else "its chain value is missing"
            raise self.damaged(version - 1, lost)
        return _link(previous, version, *fields)

    def end(self) -> None:
        """The rows ran out: check none is missing before the head (or ``last``)."""
        head = self.head
        if head is None:
            return
        until = min(self._last, head.version)
        if self._expected <= until:
            raise self.damaged(
                self._expected,
                f"versions {self._expected} to {head.version} are missing: the stream's head "
                f"records {head.version} events",
            )
