"""A small writer for protobuf text format, enough for Triton's ``config.pbtxt``.

A config is a dict: scalars become ``key: value``, dicts become ``key { ... }``, lists of scalars
``key: [a, b]``, lists of dicts ``key [ { ... }, { ... } ]``. Map fields (``input_map``, ...) are
lists of ``{"key": ..., "value": ...}`` written as repeated entries. Enum values are :class:`Enum`
so they print bare (``TYPE_FP32``). The tests parse every generated file with Triton's own
``model_config.proto`` (tritonclient), so the writer never needs protobuf itself.
"""

from __future__ import annotations

from typing import Any

# Map fields of model_config.proto that configs here use: written as repeated `key { key: .. value: .. }`.
MAP_FIELDS = frozenset({"input_map", "output_map", "cc_model_filenames", "parameters", "metric_tags"})


class Enum(str):
    """An enum value, printed without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) in a config.pbtxt")


def _message(fields: dict[str, Any], depth: int, out: list[str]) -> None:
    pad = "  " * depth
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out.append(f"{pad}{key} {{")
            _message(value, depth + 1, out)
            out.append(f"{pad}}}")
        elif isinstance(value, list) and key in MAP_FIELDS:
            for entry in value:
                out.append(f"{pad}{key} {{")
                _message(entry, depth + 1, out)
                out.append(f"{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(f"{pad}{key} [")
            for i, entry in enumerate(value):
                out.append(f"{pad}  {{")
                _message(entry, depth + 2, out)
                out.append(f"{pad}  }}{',' if i < len(value) - 1 else ''}")
            out.append(f"{pad}]")
        elif isinstance(value, list):
            out.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")


def dumps(config: dict[str, Any]) -> str:
    """``config`` as protobuf text format."""
    out: list[str] = []
    _message(config, 0, out)
    return "\n".join(out) + "\n"
