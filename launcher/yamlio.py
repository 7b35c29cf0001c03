"""Safe YAML loading that remembers where every key was written, and `--set` overrides.

What PyYAML does not do for us:

* report lines: the composed node tree has them, so we walk it once and keep a map from
  key path (``("optim", "lr")``) to line number, for error messages;
* refuse a key written twice in one mapping (PyYAML keeps the last one silently);
* read ``1e-3`` as a number: PyYAML follows YAML 1.1, where a float needs a dot, so
  ``lr: 3e-4`` would arrive as the *string* "3e-4". The float resolver below is the
  YAML 1.2 core-schema one, which every ML config in the wild assumes;
* refuse documents that are hostile rather than wrong: nested deeper than Python's
  stack, aliases that expand a few lines into billions of values ("billion laughs") or
  that contain themselves, integers too long to convert. Each is a UsageError like any
  other bad input, found before anything is built from the document.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.errors import UsageError

KeyPath = tuple[str | int, ...]


MAX_DEPTH = 64
"""Nesting a document may have (a recipe has under ten levels): PyYAML composes, and
pydantic validates, one stack frame or more per level."""
MAX_VALUES = 100_000
"""Values a document may expand to once its aliases are followed (a recipe has a few
hundred): each alias stands for a whole copy of what it refers to."""


class RefusedDocument(yaml.MarkedYAMLError):
    """A document that parses but is not built: too deep, too large once expanded, or
    containing itself."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-3``, ``-2E+5``) and the limits above."""

    _depth = 0

    def fetch_flow_collection_start(self, TokenClass):
        # The scanner keeps a possible key per open `[` or `{` and revisits them all at
        # every character: a line of `[[[[...` costs its length squared, before the
        # composer ever sees the depth.
        if self.flow_level >= MAX_DEPTH:
            raise RefusedDocument(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        # PyYAML composes recursively: `[[[[...` thousands deep would exhaust the stack.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RefusedDocument(problem=f"nested more than {MAX_DEPTH} levels deep",
                                      problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception:
            # A tag the value does not fit (`!!float x`, `!!timestamp x`), or an integer
            # past the 4300 digits int() converts: PyYAML's constructors let these out as
            # whatever Python raised (ValueError, IndexError, AttributeError, ...).
            if _INT.match(node.value if isinstance(node.value, str) else ""):
                problem = f"an integer of {len(node.value)} digits is too long"
            else:
                shown = repr(node.value) if len(repr(node.value)) <= 40 else repr(node.value)[:37] + "..."
                problem = f"cannot read {shown} as {node.tag.replace('tag:yaml.org,2002:', '!!')}"
            raise yaml.constructor.ConstructorError(problem=problem, problem_mark=node.start_mark) from None


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_INT = re.compile(r"^[-+]?[0-9]+$")

# Replace the YAML 1.1 float and bool resolvers with YAML 1.2's: "1e-3" is a float, and
# only true/false are booleans, so `name: off` or `country: no` stay strings.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _float_but_not_int(value: str) -> bool:
    return bool(_FLOAT_12.match(value)) and not _INT.match(value)


class _FloatMatcher:
    """A regex-like object: PyYAML only calls ``.match`` on resolver patterns."""

    def match(self, value: str) -> bool:
        return _float_but_not_int(value)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FloatMatcher(), list("-+0123456789.")
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes what _Loader reads as a float (`1e3`): PyYAML's YAML
    1.1 rules write it plain, and the recipe would come back with a number for a name."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FloatMatcher(), list("-+0123456789."))


def dump_yaml(data: Any) -> str:
    """``data`` as block-style YAML that load_yaml reads back as ``data`` (and that YAML
    1.1 readers do too: their booleans, `off`, `no`, stay quoted)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


@dataclass
class SourceMap:
    """Where each key of a recipe came from: a YAML line, or a ``--set`` override."""

    filename: str = "<recipe>"
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: set[KeyPath] = field(default_factory=set)

    def locate(self, path: KeyPath) -> tuple[int | None, str | None]:
        """(line, origin) of the longest known prefix of ``path``."""
        for end in range(len(path), 0, -1):
            prefix = tuple(path[:end])
            if prefix in self.overridden:
                return None, "--set"
            if prefix in self.lines:
                return self.lines[prefix], None
        return None, None


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # `? [a, b]: c`: constructing refuses a key that is a list or mapping
            key = key_node.value
            child = (*path, key)
            line = key_node.start_mark.line + 1
            # PyYAML keeps the last of two equal keys; the person who wrote both meant one.
            if child in lines:
                raise UsageError(f"duplicate key; it was already set on line {lines[child]}",
                                 key=".".join(map(str, child)), line=line)
            lines[child] = line
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)


def _check_expansion(node: yaml.Node) -> None:
    """Refuse a node graph that aliases make cyclic, deeper than MAX_DEPTH or larger
    than MAX_VALUES. Each distinct node is sized once (aliases share nodes), so a
    billion laughs costs as little to refuse as it took to write."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(current: yaml.Node, depth: int) -> int:
        if id(current) in on_path:
            raise RefusedDocument(problem="an alias refers to a node that contains it",
                                  problem_mark=current.start_mark)
        if id(current) in sizes:
            return sizes[id(current)]
        if depth > MAX_DEPTH:
            raise RefusedDocument(problem=f"nested more than {MAX_DEPTH} levels deep once its aliases "
                                          "are followed", problem_mark=current.start_mark)
        children: list[yaml.Node] = []
        if isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = current.value
        on_path.add(id(current))
        total = 1 + sum(size(child, depth + 1) for child in children)
        on_path.discard(id(current))
        if total > MAX_VALUES:
            raise RefusedDocument(problem=f"more than {MAX_VALUES} values once its aliases are followed",
                                  problem_mark=current.start_mark)
        sizes[id(current)] = total
        return total

    size(node, 0)


def _parse(text: str, lines: dict[KeyPath, int] | None = None) -> Any:
    """The data of one document, and into ``lines`` the line of each key; yaml.YAMLError
    when it is not one document."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        if lines is not None:  # before constructing, which rewrites the nodes of `<<` merges
            _record_lines(node, (), lines)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(text: str, filename: str = "<recipe>") -> tuple[Any, SourceMap]:
    """Parse ``text`` safely; return the data and the line of every key."""
    source = SourceMap(filename=filename)
    try:
        data = _parse(text, source.lines)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        kind = "YAML document refused" if isinstance(exc, RefusedDocument) else "YAML syntax error"
        raise UsageError(f"{kind}: {problem}", key=filename, line=line) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, such as NUL
        line = text.count("\n", 0, exc.position) + 1
        raise UsageError(f"YAML syntax error: character U+{exc.character:04X} is not allowed in YAML",
                         key=filename, line=line) from None
    return data, source


def parse_scalar(text: str) -> Any:
    """Type an override value the way YAML would type it in a recipe; text that is not
    one YAML value (or one refused, see load_yaml) stays text."""
    try:
        return _parse(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_override(spec: str) -> tuple[tuple[str, ...], Any]:
    """``"optim.lr=3e-4"`` -> ``(("optim", "lr"), 0.0003)``."""
    key, sep, value = spec.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise UsageError(
            f"cannot read override {spec!r}; write it as key.path=value, e.g. optim.lr=3e-4",
            key="--set",
        )
    if len(parts) > MAX_DEPTH:  # as deep as a document may nest: each part is a level
        raise UsageError(f"a key path of {len(parts)} parts; a recipe nests at most {MAX_DEPTH} levels deep",
                         key="--set")
    return parts, parse_scalar(value)


def apply_override(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``data[path]``, creating mappings on the way; unknown keys are caught later
    by the schema, with a did-you-mean, exactly as if they were in the file."""
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise UsageError(f"{where} is a value, not a section; cannot set {'.'.join(path)}",
                             key=".".join(path), origin="--set")
        node = child
    node[path[-1]] = value


def with_values(text: str, values: list[tuple[tuple[str, ...], Any]]) -> str:
    """The YAML document ``text`` with each key path of ``values`` set to its value.

    A block-style document is edited as text, so its comments and layout stay: a key's
    one-line scalar is replaced where it stands, a missing key is added at the end of
    its section (a missing section at the end of the document). Where an edit cannot be
    made that way (flow style, a value over several lines, a mapping replaced by a
    value) the document is written anew from its data, without its comments. Either way
    the result reads back as the data with the values set.
    """
    data, _ = load_yaml(text)
    expected = copy.deepcopy(data) if isinstance(data, dict) else {}
    for path, value in values:
        apply_override(expected, path, value)
    edited: str | None = text
    for path, value in values:
        edited = _edited(edited, path, _render(value))
        if edited is None:
            break
    if edited is not None and load_yaml(edited)[0] == expected:
        return edited
    return dump_yaml(expected)


def _render(value: Any) -> str:
    """``value`` as YAML on one line: a word as it is, anything else as JSON (which is
    YAML's flow style)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w./-]*", value) and parse_scalar(value) == value:
        return value
    return json.dumps(value)


def _edited(text: str, path: tuple[str, ...], rendered: str) -> str | None:
    """``text`` with ``path`` set to the YAML text ``rendered``; None where the document's
    shape there is not one a line edit handles."""
    root = yaml.compose(text, Loader=_Loader)
    lines = text.splitlines(keepends=True)
    if root is None:
        return text + _block(path, rendered, 0)
    node, depth = root, 0
    while depth < len(path):
        if not isinstance(node, yaml.MappingNode) or node.flow_style:
            return None
        child = next((value for key, value in node.value if key.value == path[depth]), None)
        if child is None:
            break
        node, depth = child, depth + 1
    if depth == len(path):  # the key is there: replace its value on its line
        start, end = node.start_mark, node.end_mark
        if not isinstance(node, yaml.ScalarNode) or node.style not in (None, "'", '"') or start.line != end.line:
            return None
        line = lines[start.line]
        lines[start.line] = line[:start.column] + rendered + line[end.column:]
        return "".join(lines)
    if not isinstance(node, yaml.MappingNode) or node.flow_style or not node.value:
        return None
    last = _last_line(node)
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    block = _block(path[depth:], rendered, node.value[0][0].start_mark.column)
    lines.insert(last + 1, block if depth else "\n" + block)  # a new section: after a blank line
    return "".join(lines)


def _last_line(node: yaml.Node) -> int:
    """The last line of a block node's text (0-based)."""
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    end = node.end_mark
    # A block scalar (| or >) ends at the start of the line after its text.
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _block(keys: tuple[str, ...], rendered: str, indent: int) -> str:
    """``a.b.c = v`` as block-style lines at ``indent``: ``a:\\n  b:\\n    c: v\\n``."""
    lines = [f"{' ' * (indent + 2 * depth)}{key}:" for depth, key in enumerate(keys)]
    return "\n".join(lines) + f" {rendered}\n"
