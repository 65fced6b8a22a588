"""CLI options derived from the config dataclasses, so that each default lives in one place.

A config field carries its command-line help in ``field(metadata=opt(...))``. ``add_dataclass_options``
turns the chosen fields into argparse options whose parsed default is ``None`` ("not given"), and
``config_from_args`` builds the dataclass from only the options that were given: the dataclass's own
default (the one the YAML pipeline and the API use too) applies to the rest, and the help shows it.

Shared option groups (threads, device, output) keep one meaning and one wording in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from clipdeploy.errors import UsageError

Parse = Callable[[str, str], Any]  # (flag, text) -> value; raises UsageError naming the flag
_META = "cli"


def opt(
    help: str | Callable[[], str],
    *,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    choices: Iterable[Any] | None = None,
    parse: Parse | None = None,
    show: Callable[[Any], str] | None = None,
    negate: str | None = None,
    nargs: str | None = None,
    action: str | None = None,
    default_text: str | None = None,
) -> dict[str, Any]:
    """Field metadata for one CLI option.

    flag: the long option (default ``--field-name``); negate: for a bool that defaults to True, the
    flag that turns it off (``--no-recover``); parse: turns the given text into the field's value,
    raising a one-line UsageError (so a bad value is reported like every other input error);
    show: how the default is written in the help; default_text: the help's default when it is not
    a plain value (e.g. "the precision's"). ``help`` may be a function (text from a registry), read,
    as ``choices`` is, when the parser is built.
    """
    meta = {k: v for k, v in locals().items() if v is not None}
    return {_META: meta}


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``list[Path]`` -> Path (with the container)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return _base_type(typing.get_args(hint)[0])
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default_help(f: dataclasses.Field, meta: Mapping[str, Any], base: Any = None) -> str:
    if "default_text" in meta and base is None:
        return f" (default: {meta['default_text']})"
    value = _default(f) if base is None else getattr(base, f.name)
    if value is dataclasses.MISSING or value is None or value is False or value == () or value == []:
        return ""
    if value is True:
        return ""
    shown = meta["show"](value) if "show" in meta else str(value)
    return f" (default: {shown})"


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    fields: Iterable[str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    base: Any = None,
) -> None:
    """Add an option for each named field of ``cls``, from its ``opt(...)`` metadata (plus ``overrides``).

    ``base``: an instance whose values are this command's defaults instead of the class's (the help
    shows them; pass the same instance to ``config_from_args``).
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    fields = list(fields)
    # Which fields of cls this parser has options for: config_from_args reads only those, so another
    # option with the same dest (e.g. a tool's own -o) never lands in the config.
    key = _registry_key(cls)
    parser.set_defaults(**{key: (*parser._defaults.get(key, ()), *fields)})
    for name in fields:
        f = by_name[name]
        meta = {**f.metadata.get(_META, {}), **((overrides or {}).get(name, {}))}
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{name} has no CLI help; give it field(metadata=opt(...))")
        flags = [meta.get("flag") or "--" + name.replace("_", "-")]
        if "short" in meta:
            flags.insert(0, meta["short"])
        text = meta["help"]() if callable(meta["help"]) else meta["help"]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text + _default_help(f, meta, base)}
        if _default(f) is dataclasses.MISSING and base is None:
            kwargs["required"] = True
        kind = _base_type(hints[name])
        if kind is bool:
            if "negate" in meta:
                flags = [meta["negate"]]
                kwargs["action"] = "store_const"
                kwargs["const"] = False
            else:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
        else:
            for key in ("metavar", "nargs", "action"):
                if key in meta:
                    kwargs[key] = meta[key]
            if "choices" in meta:  # a function (a registry's names) is read now, when the parser is built
                choices = meta["choices"]
                kwargs["choices"] = tuple(choices() if callable(choices) else choices)
            if kind in (int, float) and "metavar" not in meta and "choices" not in meta:
                kwargs["metavar"] = "N" if kind is int else "X"
            if "parse" not in meta:  # parsed later, into a one-line UsageError, when it has its own parser
                kwargs["type"] = kind if kind in (int, float, Path) else str
        parser.add_argument(*flags, **kwargs)


def _registry_key(cls: type) -> str:
    return f"_options_of_{cls.__module__}.{cls.__qualname__}"


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None, **fixed: Any) -> Any:
    """``cls(**fixed, **given)``: only the options given on the command line, each through its ``parse``.

    With ``base`` (an instance of ``cls``), ``replace(base, **fixed, **given)``.
    """
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    registered = getattr(args, _registry_key(cls), None)  # None: a namespace made by hand, every field
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.name in fixed or value is None or (registered is not None and f.name not in registered):
            continue
        parse = f.metadata.get(_META, {}).get("parse")
        flag = f.metadata.get(_META, {}).get("flag") or "--" + f.name.replace("_", "-")
        if parse is not None:
            value = [parse(flag, v) for v in value] if isinstance(value, list) else parse(flag, value)
        if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
            value = tuple(dict.fromkeys(value))  # a repeated option: each value once, in order
        kwargs[f.name] = value
    return cls(**fixed, **kwargs) if base is None else dataclasses.replace(base, **fixed, **kwargs)


# ---- parsers with one-line errors that name the option ------------------------------------------------


def integer(minimum: int) -> Parse:
    def parse(flag: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{flag} {text!r} is not an integer; pass a whole number of {minimum} or more") from None
        if value < minimum:
            raise UsageError(f"{flag} {value} must be {minimum} or more")
        return value

    return parse


def positive_number(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a number; pass seconds, e.g. {flag} 20") from None
    if not value > 0:
        raise UsageError(f"{flag} {value:g} must be more than 0; leave it out for no limit")
    return value


def number(least: float, most: float | None = None, *, unit: str = "", above: bool = False) -> Parse:
    """A float of at least ``least`` (more than it with ``above``), at most ``most``, in ``unit``."""

    def parse(flag: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{flag} {text!r} is not a number; pass {unit or 'a number'}, e.g. {flag} 5") from None
        low_ok = value > least if above else value >= least
        if not low_ok or (most is not None and value > most):
            bound = f"more than {least:g}" if above else f"{least:g} or more"
            raise UsageError(f"{flag} {value:g} must be {bound}{f' and at most {most:g}' if most is not None else ''}"
                             f"{f' {unit}' if unit else ''}")  # fmt: skip
        return value

    return parse


def csv(choices: Iterable[str] | Callable[[], Iterable[str]] | None = None, item: Parse | None = None) -> Parse:
    """A comma-separated list, each item once, checked against ``choices`` or parsed by ``item``.

    ``choices`` may be a function (a registry's ``names``), read at parse time, so that a precision
    or backend registered after import is accepted too."""

    def parse(flag: str, text: str) -> tuple[Any, ...]:
        allowed = tuple(choices() if callable(choices) else choices) if choices is not None else None
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        if not items:
            example = ",".join(allowed or ("1", "8"))
            raise UsageError(f"{flag} {text!r} names nothing; pass a comma-separated list, e.g. {flag} {example}")
        for x in items:
            if allowed is not None and x not in allowed:
                raise UsageError(f"{flag} has {x!r}, which is not one of {', '.join(allowed)}")
        return tuple(dict.fromkeys(item(flag, x) for x in items)) if item else items

    return parse


def show_csv(value: Iterable[Any]) -> str:
    return ",".join(str(v) for v in value)


# ---- shared option groups ------------------------------------------------------------------------------

DEVICE_HELP = (
    "where to run: auto (a GPU when nvidia-smi sees one, else the CPU), cpu, cuda (CUDA device 0), "
    "or cuda:N / N (CUDA device N)"
)


def parse_device(text: str) -> tuple[str, int | None]:
    """``--device`` in every command: ('auto'|'cpu'|'cuda', CUDA index or None)."""
    t = text.strip().lower()
    if t in ("auto", "cpu"):
        return t, None
    if t == "cuda":
        return "cuda", 0
    index = t.removeprefix("cuda:")
    if index.isdigit():
        return "cuda", int(index)
    raise UsageError(f"--device {text!r} is not auto, cpu, cuda, cuda:N or a CUDA device number N")


def cuda_index(flag: str, text: str) -> int:
    """``--device`` of a command that needs a GPU (build, validate): its CUDA index; auto and cuda mean 0."""
    kind, index = parse_device(text)
    if kind == "cpu":
        raise UsageError(f"{flag} cpu: TensorRT engines need an NVIDIA GPU; pass cuda, cuda:N or N")
    return index or 0


def device_kind(flag: str, text: str) -> str:
    """``--device`` of a command that picks a device kind (bench): auto, cpu or cuda; only CUDA device 0."""
    kind, index = parse_device(text)
    if index:
        raise UsageError(
            f"{flag} {text!r}: bench runs on CUDA device 0 only; select another GPU with CUDA_VISIBLE_DEVICES={index}"
        )
    return kind


THREADS = opt("intra-op threads", metavar="N", parse=integer(1), default_text="the cores available")


def add_threads(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "ONNX Runtime") -> None:
    """``--threads N``: intra-op threads (left to the library, the cores available, when not given)."""
    parser.add_argument(
        "--threads", metavar="N", help=f"{what} intra-op threads (default: the cores available)"
    )


def threads_from_args(args: argparse.Namespace) -> int | None:
    return None if args.threads is None else integer(1)("--threads", args.threads)


__all__ = [
    "DEVICE_HELP",
    "add_dataclass_options",
    "add_threads",
    "config_from_args",
    "csv",
    "cuda_index",
    "device_kind",
    "integer",
    "opt",
    "parse_device",
    "positive_number",
    "show_csv",
    "threads_from_args",
]
