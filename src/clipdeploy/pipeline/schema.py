"""YAML with locations, and values checked against the stages' own config dataclasses.

The document is composed (not loaded) so that every value keeps the line it came from. Mappings
become :class:`YMap` and sequences :class:`YList`, which carry, for each key or item, the line and
the key path (``models[2].quantize.samples``) an error should name. Values are then checked and
converted by the type hints of the dataclass field they feed (``QuantizeConfig.samples: int``), so
the dataclasses stay the one source of names, types and defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipdeploy.errors import UsageError


class ConfigError(UsageError):
    """A pipeline config that does not fit the schema; lists every problem, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in the pipeline config:\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(text)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a value was written: its line (1-based) and its key path."""

    line: int
    path: str


class YMap(dict):  # type: ignore[type-arg]
    """A mapping that remembers where each key was written."""

    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self.origin = origin
        self.origins: dict[str, Origin] = {}

    def at(self, key: str) -> Origin:
        return self.origins.get(key, self.origin)


class YList(list):  # type: ignore[type-arg]
    """A sequence that remembers where each item was written."""

    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self.origin = origin
        self.origins: list[Origin] = []

    def at(self, index: int) -> Origin:
        return self.origins[index] if index < len(self.origins) else self.origin


class Problems:
    """Collects schema problems for one file, each as ``FILE:LINE: key.path: message``."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.items: list[str] = []

    def add(self, origin: Origin, message: str) -> None:
        where = f"{origin.path}: " if origin.path else ""
        self.items.append(f"{self.file}:{origin.line}: {where}{message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def load_yaml(file: Path) -> YMap:
    """Compose ``file`` into YMap/YList/scalars with origins; syntax errors name the line."""
    import yaml

    file = Path(file)
    if not file.is_file():
        raise UsageError(
            f"pipeline config {str(file)!r} does not exist; pass a YAML file such as configs/quickstart.yaml"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read pipeline config {str(file)!r} ({e}); save it as UTF-8 text") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{file}:{line}: invalid YAML: {e.problem or e.context}; fix the syntax"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{file}:1: invalid YAML: {e}; fix the syntax"]) from e
    problems = Problems(file)
    if node is None:
        problems.add(Origin(1, ""), "the file is empty; it needs at least `models:` with one entry")
        problems.raise_if_any()
    constructor = yaml.SafeLoader("")
    root = _convert(node, "", constructor, problems)
    if not isinstance(root, YMap):
        problems.add(Origin(node.start_mark.line + 1, ""), "the top level must be a mapping with `models:`")
    problems.raise_if_any()
    return root  # type: ignore[return-value]


def _convert(node: Any, path: str, constructor: Any, problems: Problems) -> Any:
    import yaml

    origin = Origin(node.start_mark.line + 1, path)
    if isinstance(node, yaml.MappingNode):
        out = YMap(origin)
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            key_origin = Origin(key_node.start_mark.line + 1, path)
            if not isinstance(key, str):
                problems.add(key_origin, f"key {key!r} is not a string; write keys as plain words")
                continue
            if key in out:
                problems.add(
                    Origin(key_node.start_mark.line + 1, _child(path, key)),
                    f"duplicate key (first at line {out.at(key).line}); keep one",
                )
                continue
            out[key] = _convert(value_node, _child(path, key), constructor, problems)
            out.origins[key] = Origin(key_node.start_mark.line + 1, _child(path, key))  # the line that names it
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = YList(origin)
        for i, item in enumerate(node.value):
            seq.append(_convert(item, _child(path, i), constructor, problems))
            seq.origins.append(Origin(item.start_mark.line + 1, _child(path, i)))
        return seq
    return constructor.construct_object(node, deep=True)


def merged(base: YMap | None, over: YMap | None, origin: Origin) -> YMap:
    """``over`` on top of ``base``: mappings merge key by key (recursively), anything else replaces."""
    out = YMap(over.origin if over is not None else base.origin if base is not None else origin)
    for source in (base, over):
        if source is None:
            continue
        for key, value in source.items():
            if isinstance(value, YMap) and isinstance(out.get(key), YMap):
                out[key] = merged(out[key], value, value.origin)
            else:
                out[key] = value
            out.origins[key] = source.at(key)
    return out


# ---- values checked against dataclass type hints ---------------------------------------------------


class Invalid(Exception):
    """A value that does not fit; the message says what was expected."""


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "Path": "a path",
        }.get(hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "").replace("pathlib.", "")


def _describe(value: Any) -> str:
    if isinstance(value, YMap):
        return "a mapping"
    if isinstance(value, YList):
        return "a list"
    return f"{value!r}"


Converter = Callable[[Any], Any]


def coerce(value: Any, hint: Any, base_dir: Path, special: Converter | None = None) -> Any:
    """``value`` as ``hint`` says, or Invalid. Paths are resolved against ``base_dir``."""
    if special is not None and isinstance(value, str):
        try:
            return special(value)
        except UsageError as e:
            raise Invalid(str(e)) from None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, base_dir, special)
            except Invalid as e:
                errors.append(str(e))
        raise Invalid(
            errors[0] if len(errors) == 1 else f"got {_describe(value)}, expected {' or '.join(map(_type_name, args))}"
        )
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise Invalid(f"got {_describe(value)}, expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"got {_describe(value)}, expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"got {_describe(value)}, expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise Invalid(f"got {_describe(value)}, expected a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise Invalid(f"got {_describe(value)}, expected a path (relative paths start at the config file)")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, list):
                raise Invalid(f"got {_describe(value)}, expected a list such as [a, b]")
            return tuple(_items(value, args[0], base_dir))
        if isinstance(value, str) and all(a is int for a in args):
            parts = value.split(":")
            if len(parts) == len(args) and all(p.strip().lstrip("-").isdigit() for p in parts):
                value = [int(p) for p in parts]
        if not isinstance(value, list) or len(value) != len(args):
            shape = ", ".join(_type_name(a) for a in args)
            extra = f" or '{':'.join(['N'] * len(args))}'" if all(a is int for a in args) else ""
            raise Invalid(f"got {_describe(value)}, expected [{shape}]{extra}")
        return tuple(coerce(v, a, base_dir) for v, a in zip(value, args, strict=True))
    if origin is list:
        if isinstance(value, str):  # one path or name stands for a list of one
            value = [value]
        if not isinstance(value, list):
            raise Invalid(f"got {_describe(value)}, expected a list")
        return _items(value, args[0], base_dir)
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid(f"got {_describe(value)}, expected a mapping")
        return {coerce(k, args[0], base_dir): _nested(value, k, args[1], base_dir) for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise Invalid(f"got {_describe(value)}, expected a mapping of {', '.join(field_names(hint))}")
        unknown = [k for k in value if k not in field_names(hint)]
        if unknown:
            raise Invalid(unknown_key_message(unknown[0], field_names(hint)))
        hints = typing.get_type_hints(hint)
        try:
            return hint(**{k: _nested(value, k, hints[k], base_dir) for k in value})
        except UsageError as e:
            raise Invalid(str(e)) from None
    raise Invalid(f"cannot read a value of type {_type_name(hint)}")  # a hint this schema does not know


def _items(values: list[Any], hint: Any, base_dir: Path) -> list[Any]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(coerce(v, hint, base_dir))
        except Invalid as e:
            raise Invalid(f"item {i}: {e}") from None
    return out


def _nested(mapping: dict[str, Any], key: str, hint: Any, base_dir: Path) -> Any:
    try:
        return coerce(mapping[key], hint, base_dir)
    except Invalid as e:
        raise Invalid(f"{key}: {e}") from None


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_message(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(sorted(allowed))}"
    return f"unknown key {key!r}; {hint}"


def section_kwargs(
    cls: type,
    section: YMap | None,
    allowed: list[str],
    base_dir: Path,
    problems: Problems,
    special: dict[str, Converter] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The keys of ``section`` as keyword arguments of ``cls``; every bad key or value goes to ``problems``.

    ``skip`` names keys the caller reads itself (they are neither checked nor returned).
    """
    if section is None:
        return {}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key in skip:
            continue
        origin = section.at(key)
        if key not in allowed:
            problems.add(origin, unknown_key_message(key, [*allowed, *skip]))
            continue
        try:
            kwargs[key] = coerce(value, hints[key], base_dir, (special or {}).get(key))
        except Invalid as e:
            problems.add(origin, str(e))
    return kwargs
