"""Read YAML while keeping line numbers, so model errors can point at the line."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import yaml

from cprfsm.exceptions import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterator


class Node:
    """A YAML node with its file and line; every accessor raises ModelError on bad shape."""

    __slots__ = ("_node", "path")

    def __init__(self, node: yaml.Node, path: str) -> None:
        """Wrap a composed PyYAML node read from ``path``."""
        self._node = node
        self.path = path

    @classmethod
    def parse(cls, text: str, path: str) -> Node:
        """Compose ``text`` into a node tree, turning YAML syntax errors into ModelError."""
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark is not None else None
            raise ModelError(path, line, f"not valid YAML: {exc.problem}") from None
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
                key.fail(f"{what} repeats the key {name!r}")
            if allowed is not None and name not in allowed:
                known = ", ".join(sorted(allowed))
                key.fail(f"{what} has an unknown key {name!r}; allowed keys: {known}")
            result[name] = Node(value_node, self.path)
        return result

    def elements(self, what: str) -> Iterator[Node]:
        """The node as a sequence."""
        if not isinstance(self._node, yaml.SequenceNode):
            self.fail(f"{what} must be a list")
        for child in self._node.value:
            yield Node(child, self.path)

    def text(self, what: str) -> str:
        """The node as a non-empty string scalar."""
        if not isinstance(self._node, yaml.ScalarNode) or self._node.tag != _STR_TAG:
            self.fail(f"{what} must be a string")
        value = str(self._node.value)
        if not value:
            self.fail(f"{what} must not be empty")
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


_STR_TAG = "tag:yaml.org,2002:str"
_BOOL_TAG = "tag:yaml.org,2002:bool"
