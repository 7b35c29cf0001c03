"""Safe YAML loading that remembers where every key was written, and `--set` overrides.

Three things PyYAML does not do for us:

* report lines: the composed node tree has them, so we walk it once and keep a map from
  key path (``("optim", "lr")``) to line number, for error messages;
* refuse a key written twice in one mapping (PyYAML keeps the last one silently);
* read ``1e-3`` as a number: PyYAML follows YAML 1.1, where a float needs a dot, so
  ``lr: 3e-4`` would arrive as the *string* "3e-4". The float resolver below is the
  YAML 1.2 core-schema one, which every ML config in the wild assumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.errors import UsageError

KeyPath = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-3``, ``-2E+5``)."""


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


def load_yaml(text: str, filename: str = "<recipe>") -> tuple[Any, SourceMap]:
    """Parse ``text`` safely; return the data and the line of every key."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise UsageError(f"YAML syntax error: {problem}", key=filename, line=line) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises marked errors in practice
        raise UsageError(f"YAML error: {exc}", key=filename) from None
    source = SourceMap(filename=filename)
    if node is not None:
        _record_lines(node, (), source.lines)
    return data, source


def parse_scalar(text: str) -> Any:
    """Type an override value the way YAML would type it in a recipe."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
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
