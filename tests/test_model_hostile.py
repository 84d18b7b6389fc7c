"""Hostile model files: every malformed or oversized model is a ModelError with file:line, fast."""

from __future__ import annotations

import copy
import itertools
import os
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import yaml
from hostile import within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprfsm import ModelError, load_model, modelled_releases
from cprfsm._yamlnode import MAX_BYTES, MAX_DEPTH, MAX_NODES
from cprfsm.model import QemuModel, Rule, default_model_path

if TYPE_CHECKING:
    from pathlib import Path

SHIPPED = default_model_path().read_text(encoding="utf-8")
CAPABILITY = "    - {name: xbzrle}\n"
SECOND_DEVICE = [d.name for d in load_model().devices][1]
_names = itertools.count()


def write(folder: Path, text: str) -> Path:
    """Write ``text`` to a fresh model file in ``folder`` (a new path: loads are cached)."""
    path = folder / f"model-{next(_names)}.yaml"
    path.write_text(text, encoding="utf-8", newline="")
    return path


def refuse(folder: Path, text: str, problem: str, seconds: float = 5) -> ModelError:
    """Load ``text`` as a model; assert a ModelError with a line saying ``problem``."""
    path = write(folder, text)
    with within(seconds), pytest.raises(ModelError) as caught:
        load_model(path=path)
    assert problem in caught.value.problem, caught.value
    assert caught.value.path == str(path)
    return caught.value


def with_extra(text: str) -> str:
    """The shipped model with a top-level ``extra:`` entry after the schema line."""
    return SHIPPED.replace("schema: 1\n", f"schema: 1\nextra: {text}\n", 1)


class TestLimits:
    """Size, nesting and alias expansion are bounded; each failure names its line."""

    def test_1000_deep_flow_nesting(self, tmp_path: Path) -> None:
        """1,000 nested lists are refused at their line, not a RecursionError."""
        error = refuse(tmp_path, with_extra("[" * 1000 + "]" * 1000), f"deeper than {MAX_DEPTH}")
        assert error.line == 12

    def test_1000_deep_block_nesting(self, tmp_path: Path) -> None:
        """1,000 nested block lists are refused, with the line where the limit is passed."""
        nested = "".join("  " * depth + "-\n" for depth in range(1, 1000))
        error = refuse(tmp_path, SHIPPED + "\nextra:\n" + nested, f"deeper than {MAX_DEPTH}")
        assert error.line is not None

    def test_recursive_alias(self, tmp_path: Path) -> None:
        """An alias inside the node it names is refused, not walked forever."""
        error = refuse(tmp_path, with_extra("&a [x, *a]"), "*a refers to a node that contains it")
        assert error.line == 12

    def test_billion_laughs_through_any(self, tmp_path: Path) -> None:
        """Nine levels of nine aliases in a rule's any: is refused at once by the node count."""
        laughs = "&l0 {mode: normal}"
        for level in range(1, 10):
            aliases = ", ".join([f"*l{level - 1}"] * 9)
            laughs = f"&l{level} {{any: [{laughs}, {aliases}]}}"
        rule = (
            f"  - id: laughs\n    command: migrate\n    when: {laughs}\n"
            "    error: e\n    source: s\n    hint: h\n"
        )
        assert len(rule) < 30_000
        refuse(tmp_path, SHIPPED + rule, f"more than {MAX_NODES} nodes", seconds=2)

    def test_alias_expansion_deeper_than_the_limit(self, tmp_path: Path) -> None:
        """An alias to a deep node counts its depth where it is used."""
        deep, around = "[" * 40 + "]" * 40, 30
        text = with_extra(f"[&d {deep}, {'[' * around}*d{']' * around}]")
        refuse(tmp_path, text, f"deeper than {MAX_DEPTH}")

    def test_file_size(self, tmp_path: Path) -> None:
        """A model larger than MAX_BYTES is refused before it is parsed."""
        error = refuse(
            tmp_path, SHIPPED + "#" + "x" * MAX_BYTES + "\n", f"larger than {MAX_BYTES}"
        )
        assert error.line is None

    def test_not_a_regular_file(self, tmp_path: Path) -> None:
        """A FIFO (or /dev/zero) is refused instead of blocking or reading forever."""
        fifo = tmp_path / "model.fifo"
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero", tmp_path):
            with within(2), pytest.raises(ModelError, match="must be a regular file"):
                load_model(path=path)

    def test_many_capabilities_load(self, tmp_path: Path) -> None:
        """30,000 capabilities (90,000 nodes) load whole (the guard only catches a hang)."""
        many = "".join(f"    - {{name: c{i}}}\n" for i in range(30_000))
        path = write(tmp_path, SHIPPED.replace(CAPABILITY, CAPABILITY + many, 1))
        with within(120):
            assert len(load_model("10.0", path=path).capabilities) == 22 + 30_000

    def test_one_name_in_many_disjoint_spans(self, tmp_path: Path) -> None:
        """Many spans of one name are checked by their neighbours only, and overlaps found."""
        spans = "".join(
            f'    - {{name: c, since: "{i}.0", until: "{i}.5"}}\n' for i in range(1, 900)
        )
        path = write(tmp_path, SHIPPED.replace(CAPABILITY, CAPABILITY + spans, 1))
        assert "c" in load_model("10.0", path=path).capabilities
        clash = spans + '    - {name: c, since: "450.4", until: "450.6"}\n'
        refuse(tmp_path, SHIPPED.replace(CAPABILITY, CAPABILITY + clash, 1), "listed twice")


class TestCharacters:
    """Control characters and bad encodings are reported with line (and column)."""

    @pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\ufffe"])
    def test_control_character(self, tmp_path: Path, char: str) -> None:
        """A raw control character names its line and column."""
        text = SHIPPED.replace("schema: 1", f"schema: 1 # a{char}b", 1)
        error = refuse(tmp_path, text, f"column 14 holds the control character U+{ord(char):04X}")
        assert error.line == 11

    def test_escaped_control_character_in_a_text(self, tmp_path: Path) -> None:
        """A control character written as an escape is refused where a one-line text is due."""
        old = "hint: drop either multifd or xbzrle"
        assert old in SHIPPED
        text = SHIPPED.replace(old, 'hint: "drop\\0 either multifd or xbzrle"', 1)
        refuse(tmp_path, text, "one line without control characters")

    def test_not_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 name their line."""
        path = tmp_path / "latin.yaml"
        path.write_bytes(SHIPPED.encode().replace(b"schema: 1", b"schema: 1 # caf\xe9", 1))
        with pytest.raises(ModelError, match="not UTF-8") as caught:
            load_model(path=path)
        assert caught.value.line == 11


class TestFields:
    """Wrong types, huge numbers, unknown keys and repeats in any field are ModelErrors."""

    @pytest.mark.parametrize(
        ("old", "new", "problem"),
        [
            ('until: "10.1"', 'until: "1' + "0" * 5000 + '.1"', "until must be a QEMU release"),
            ('version: "10.0"', 'version: "10.00"', 'a release must look like "10.0"'),
            ('version: "10.0"', 'version: "\u0661\u0660.0"', 'a release must look like "10.0"'),
            ("schema: 1", "schema: !!python/object:os.system 1", "has no meaning in a model"),
            ("    - {name: xbzrle}", "    - {name: [xbzrle]}", "name must be a string"),
            ("    - {name: xbzrle}", "    - {name: 'x b'}", "is not a name"),
            ("    - {name: xbzrle}", "    - {name: xbzrle, bogus: 1}", "unknown key 'bogus'"),
            (
                "  source: qapi/migration.json:MigrationCapability\n",
                "  running: [x]\n",
                "unknown key 'running'",
            ),
            (
                "- {name: file, seekable: true",
                "- {name: tcp, seekable: true",
                "'tcp' is listed twice",
            ),
            ("  - name: vfio\n", f"  - name: {SECOND_DEVICE}\n", "is listed twice"),
            ("{name: replication, default: true", "{name: userfaultfd, default: true", "twice"),
            ("    - {name: none}", "    - {name: none}\n    - {name: none}", "listed twice"),
            ("schema: 1", "schema: 1\n<<: {a: 1}", "must be a string"),
            ("schema: 1\n", "schema: 1\n---\nfoo: 1\n", "one YAML document"),
        ],
    )
    def test_bad_field(self, tmp_path: Path, old: str, new: str, problem: str) -> None:
        """Each malformed field is a ModelError at a line, never another exception."""
        assert old in SHIPPED
        error = refuse(tmp_path, SHIPPED.replace(old, new, 1), problem)
        assert error.line is not None

    def test_since_without_until_at_the_open_end(self, tmp_path: Path) -> None:
        """since: 999.9 without until is a release like any other, not a KeyError."""
        text = SHIPPED.replace(CAPABILITY, CAPABILITY + '    - {name: late, since: "999.9"}\n', 1)
        assert "late" not in load_model("10.0", path=write(tmp_path, text)).capabilities


def _mutants(value: object) -> list[tuple[object, ...]]:
    """Every path into ``value`` (keys and indexes)."""
    paths: list[tuple[object, ...]] = [()]
    stack: list[tuple[tuple[object, ...], object]] = [((), value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            children = list(node.items())
        else:
            children = list(enumerate(node)) if isinstance(node, list) else []
        for key, child in children:
            paths.append((*path, key))
            stack.append(((*path, key), child))
    return paths


def _at(data: object, path: tuple[object, ...]) -> object:
    """The value at ``path`` in ``data``, or None if a mutation removed it."""
    try:
        for key in path:
            data = data[key]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return data


DATA = yaml.safe_load(SHIPPED)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
PATHS = _mutants(DATA)
SWAPS = st.sampled_from(
    [None, True, 0, -1, 2**70, 1e308, "", "x", "running", [], {}, ["x"], {"x": 1}]
)


def _mutate(draw: st.DrawFn, data: object) -> None:
    """Apply one structural mutation to ``data`` in place."""
    path = draw(st.sampled_from(PATHS[1:]))
    parent, current = _at(data, path[:-1]), _at(data, path)
    if not isinstance(parent, dict | list) or current is None:
        return  # an earlier mutation removed it
    key: Any = path[-1]
    action = draw(st.sampled_from(["delete", "duplicate", "swap", "nest", "alias", "self"]))
    if action == "delete":
        del parent[key]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(key, current)
    elif action == "nest":
        for _ in range(draw(st.integers(1, 100))):
            current = [current]
        parent[key] = current
    elif action == "alias":  # the dumper writes a shared object as an anchor and aliases
        parent[key] = _at(data, draw(st.sampled_from(PATHS)))
    elif action == "self" and isinstance(current, list):
        current.append(current)
    elif action == "self" and isinstance(current, dict):
        current["self"] = current
    else:
        parent[key] = draw(SWAPS)


@st.composite
def mutated_models(draw: st.DrawFn) -> object:
    """The shipped model with 1-3 structural mutations: delete, duplicate, swap, nest, alias."""
    data = copy.deepcopy(DATA)
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, data)
    return data


def unlined(model: QemuModel) -> tuple[Rule, ...]:
    """The model's rules without the line each starts on."""
    return tuple(attrs.evolve(rule, line=0) for rule in model.rules)


class TestProperties:
    """Whatever is done to the shipped model, loading it is a ModelError or a model, quickly."""

    def test_round_trip_is_identical(self, tmp_path: Path) -> None:
        """The shipped model dumped and reloaded gives the same model for every release."""
        path = write(tmp_path, yaml.safe_dump(DATA, sort_keys=False, width=1000))
        for version in modelled_releases():
            shipped = load_model(version)
            again = load_model(version, path=path)
            # Rules remember their line, which the dump moves.
            assert attrs.evolve(again, rules=unlined(again)) == attrs.evolve(
                shipped, path=str(path), rules=unlined(shipped)
            )

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=mutated_models())
    def test_mutated_models(self, tmp_path: Path, data: object) -> None:
        """Deletions, duplications, type swaps, deep nesting and aliases: ModelError or a model."""
        text = yaml.dump(data, Dumper=DUMPER, sort_keys=False, width=1000)
        path = write(tmp_path, text)
        try:
            with within(5):
                for version in modelled_releases(path):
                    assert load_model(version, path=path).version == version
        except ModelError as error:
            failure = error
        else:
            return
        assert failure.path == str(path)
        assert "\n" not in str(failure)
