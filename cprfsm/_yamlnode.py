"""Read YAML while keeping line numbers, so model errors can point at the line.

A model file is a user's own input, so it is composed under limits: its size
(:data:`MAX_BYTES`), its nesting (:data:`MAX_DEPTH`) and the number of nodes it
holds once every alias is expanded (:data:`MAX_NODES`).  The composer is
iterative and counts aliases as it meets them, so a billion-laughs file or a
recursive alias is refused before anything walks the tree, and no Python
recursion depends on the file.
"""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from cprfsm.exceptions import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_BYTES = 2 * 2**20
"""The largest model file read (the shipped model is about 30 KB)."""

MAX_DEPTH = 64
"""The deepest nesting of lists and mappings, aliases expanded (the shipped model nests 9)."""

MAX_NODES = 100_000
"""The most nodes a model may hold with every alias expanded (the shipped one has ~2,000)."""

MAX_NAME = 128
"""The longest name (of a runstate, capability, rule, ...) a model may use."""

# libyaml's parser when PyYAML has it (about ten times faster); events are the same.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# YAML's printable set (what PyYAML's reader accepts), so the offending line can be named.
_NOT_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*", re.ASCII)
_STR_TAG = "tag:yaml.org,2002:str"
_BOOL_TAG = "tag:yaml.org,2002:bool"
# The explicit tags a model may write (``!!str 10``); any other (``!!python/object``) is refused.
_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")
)


def read_model_text(path: str) -> str:
    """The text of the model file at ``path``: a regular file, UTF-8, at most MAX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelError(path, None, "no such model file") from None
    except OSError as exc:
        raise ModelError(path, None, f"cannot read the model file: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(path, None, "the model must be a regular file")
        with os.fdopen(os.dup(fd), "rb") as stream:
            raw = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ModelError(path, None, f"cannot read the model file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise ModelError(
            path, None, f"the model file is larger than {MAX_BYTES} bytes; split or trim it"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ModelError(path, line, "the model file is not UTF-8; save it as UTF-8") from None
    # What Path.read_text did: universal newlines.
    return text.replace("\r\n", "\n").replace("\r", "\n")


class Node:
    """A YAML node with its file and line; every accessor raises ModelError on bad shape."""

    __slots__ = ("_node", "path")

    def __init__(self, node: yaml.Node, path: str) -> None:
        """Wrap a composed PyYAML node read from ``path``."""
        self._node = node
        self.path = path

    @classmethod
    def parse(cls, text: str, path: str) -> Node:
        """Compose ``text`` under the limits, turning every YAML problem into ModelError."""
        bad = _NOT_PRINTABLE.search(text)
        if bad is not None:
            before = text[: bad.start()]
            line = len(_LINE_BREAK.findall(before)) + 1
            column = bad.start() - before.rfind("\n")
            raise ModelError(
                path,
                line,
                f"column {column} holds the control character U+{ord(bad.group()):04X}; "
                "remove it (YAML allows only printable characters, tabs and line breaks)",
            )
        try:
            node = _Composer(text, path).document()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            at = mark.line + 1 if mark is not None else None
            raise ModelError(path, at, f"not valid YAML: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ModelError(path, None, f"not valid YAML: {exc}") from None
        if node is None:
            raise ModelError(path, 1, "the model file is empty")
        return cls(node, path)

    @property
    def line(self) -> int:
        """The 1-based line the node starts on."""
        return int(self._node.start_mark.line) + 1

    def fail(self, problem: str) -> NoReturn:
        """Raise a ModelError that points at this node."""
        raise ModelError(self.path, self.line, problem)

    def is_mapping(self) -> bool:
        """Whether the node is a mapping."""
        return isinstance(self._node, yaml.MappingNode)

    def is_sequence(self) -> bool:
        """Whether the node is a sequence."""
        return isinstance(self._node, yaml.SequenceNode)

    def items(self, what: str, *, allowed: frozenset[str] | None = None) -> dict[str, Node]:
        """The node as a mapping of string keys; unknown or repeated keys are errors."""
        if not isinstance(self._node, yaml.MappingNode):
            self.fail(f"{what} must be a mapping")
        result: dict[str, Node] = {}
        for key_node, value_node in self._node.value:
            key = Node(key_node, self.path)
            name = key.text(f"a key of {what}")
            if name in result:
                key.fail(f"{what} repeats the key {_short(name)}")
            if allowed is not None and name not in allowed:
                known = ", ".join(sorted(allowed))
                key.fail(f"{what} has an unknown key {_short(name)}; allowed keys: {known}")
            result[name] = Node(value_node, self.path)
        return result

    def elements(self, what: str) -> Iterator[Node]:
        """The node as a sequence."""
        if not isinstance(self._node, yaml.SequenceNode):
            self.fail(f"{what} must be a list")
        for child in self._node.value:
            yield Node(child, self.path)

    def text(self, what: str) -> str:
        """The node as a non-empty one-line string scalar."""
        if not isinstance(self._node, yaml.ScalarNode) or self._node.tag != _STR_TAG:
            self.fail(f"{what} must be a string")
        value = str(self._node.value)
        if not value:
            self.fail(f"{what} must not be empty")
        if _CONTROL.search(value):
            self.fail(f"{what} must be one line without control characters")
        return value

    def name(self, what: str) -> str:
        """The node as a name: letters, digits and ``_ . : + -``, at most MAX_NAME long."""
        value = self.text(what)
        if len(value) > MAX_NAME or not _NAME.fullmatch(value):
            self.fail(
                f"{what} {_short(value)} is not a name: use at most {MAX_NAME} letters, "
                "digits and _ . : + -, starting with a letter or digit"
            )
        return value

    def scalar(self, what: str) -> str:
        """The node as any scalar, spelled as written (numbers and booleans included)."""
        if not isinstance(self._node, yaml.ScalarNode):
            self.fail(f"{what} must be a single value")
        return str(self._node.value)

    def flag(self, what: str) -> bool:
        """The node as a YAML boolean."""
        if not isinstance(self._node, yaml.ScalarNode) or self._node.tag != _BOOL_TAG:
            self.fail(f"{what} must be true or false")
        return str(self._node.value).lower() in {"true", "yes", "on"}

    def texts(self, what: str) -> list[tuple[str, Node]]:
        """The node as a list of strings (a single string counts as a list of one)."""
        if isinstance(self._node, yaml.ScalarNode):
            return [(self.text(what), self)]
        return [(child.text(f"an element of {what}"), child) for child in self.elements(what)]


def _short(value: str) -> str:
    """``value`` quoted for a message, cut to a readable length."""
    return repr(value) if len(value) <= 2 * MAX_NAME else repr(value[:MAX_NAME]) + "..."


class _Frame:
    """A sequence or mapping being composed."""

    __slots__ = ("anchor", "height", "key", "node", "size")

    def __init__(self, node: yaml.CollectionNode, anchor: str | None) -> None:
        self.node = node
        self.anchor = anchor
        self.size = 1
        self.height = 1
        self.key: yaml.Node | None = None


class _Composer:
    """PyYAML's composer without recursion, counting nodes with aliases expanded."""

    def __init__(self, text: str, path: str) -> None:
        self._loader: Any = _Loader(text)
        self._path = path
        self._anchors: dict[str, tuple[yaml.Node, int, int]] = {}
        self._open: set[str] = set()
        self._stack: list[_Frame] = []
        self._count = 0

    def document(self) -> yaml.Node | None:
        """The single document of the stream, or None for an empty stream."""
        try:
            loader = self._loader
            loader.get_event()  # StreamStartEvent
            if loader.check_event(yaml.StreamEndEvent):
                return None
            loader.get_event()  # DocumentStartEvent
            root = self._node()
            loader.get_event()  # DocumentEndEvent
            if not loader.check_event(yaml.StreamEndEvent):
                event = loader.get_event()
                self._fail(event, "the model file must hold one YAML document, not several")
            return root
        finally:
            self._loader.dispose()

    def _fail(self, event: yaml.Event, problem: str) -> NoReturn:
        mark: Any = event.start_mark
        raise ModelError(self._path, int(mark.line) + 1, problem)

    def _node(self) -> yaml.Node:
        loader = self._loader
        stack = self._stack
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                done = self._alias(event)
            elif isinstance(event, yaml.ScalarEvent):
                done = self._scalar(event)
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                self._start(event)
                continue
            else:  # SequenceEndEvent or MappingEndEvent: the parser guarantees the pairing
                frame = stack.pop()
                frame.node.end_mark = event.end_mark
                if frame.anchor is not None:
                    self._open.discard(frame.anchor)
                    self._anchors[frame.anchor] = (frame.node, frame.size, frame.height)
                done = (frame.node, frame.size, frame.height)
            node, size, height = done
            if not stack:
                return node
            parent = stack[-1]
            parent.size += size
            parent.height = max(parent.height, height + 1)
            if isinstance(parent.node, yaml.SequenceNode):
                parent.node.value.append(node)
            elif parent.key is None:
                parent.key = node
            else:
                parent.node.value.append((parent.key, node))
                parent.key = None

    def _grow(self, event: yaml.Event, size: int, height: int) -> None:
        """Count ``size`` more nodes reaching ``height`` levels below the open ones."""
        self._count += size
        if self._count > MAX_NODES:
            self._fail(
                event,
                f"the model holds more than {MAX_NODES} nodes with its aliases expanded; "
                "use fewer aliases or a smaller model",
            )
        if len(self._stack) + height > MAX_DEPTH:
            self._fail(
                event,
                f"the model nests deeper than {MAX_DEPTH} levels (aliases expanded); flatten it",
            )

    def _tag(self, event: yaml.ScalarEvent | yaml.CollectionStartEvent) -> str | None:
        """The explicit tag of ``event`` (None if it has none): a core schema tag."""
        tag = event.tag
        if tag is None or tag == "!":
            return None
        if tag not in _TAGS:
            self._fail(event, f"the tag {_short(tag)} has no meaning in a model; remove it")
        return tag

    def _anchor(self, event: yaml.NodeEvent) -> str | None:
        anchor = event.anchor
        if anchor is not None and (anchor in self._anchors or anchor in self._open):
            self._fail(event, f"the anchor &{anchor} is defined twice; rename one")
        return anchor

    def _alias(self, event: yaml.AliasEvent) -> tuple[yaml.Node, int, int]:
        name = event.anchor
        if name in self._open:
            self._fail(event, f"the alias *{name} refers to a node that contains it; remove it")
        if name not in self._anchors:
            self._fail(event, f"the alias *{name} has no anchor &{name} before it")
        node, size, height = self._anchors[name]
        self._grow(event, size, height)
        return node, size, height

    def _scalar(self, event: yaml.ScalarEvent) -> tuple[yaml.Node, int, int]:
        anchor = self._anchor(event)
        self._grow(event, 1, 1)
        tag = self._tag(event)
        if tag is None:
            tag = self._loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        start: Any = event.start_mark
        end: Any = event.end_mark
        node = yaml.ScalarNode(tag, event.value, start, end, event.style)
        if anchor is not None:
            self._anchors[anchor] = (node, 1, 1)
        return node, 1, 1

    def _start(self, event: yaml.SequenceStartEvent | yaml.MappingStartEvent) -> None:
        anchor = self._anchor(event)
        self._grow(event, 1, 1)
        tag = self._tag(event)
        start: Any = event.start_mark
        node: yaml.CollectionNode
        if isinstance(event, yaml.SequenceStartEvent):
            if tag is None:
                tag = self._loader.resolve(yaml.SequenceNode, None, event.implicit)
            node = yaml.SequenceNode(tag, [], start, None, event.flow_style)
        else:
            if tag is None:
                tag = self._loader.resolve(yaml.MappingNode, None, event.implicit)
            node = yaml.MappingNode(tag, [], start, None, event.flow_style)
        if anchor is not None:
            self._open.add(anchor)
        self._stack.append(_Frame(node, anchor))
