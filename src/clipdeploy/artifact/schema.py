"""What a manifest may hold: the types of the keys clipdeploy reads, and paths that stay inside the artifact.

``read_manifest`` runs both checks before it returns, so every reader (``load()``, ``inspect``,
``embed``, ``validate``, ``build``, ``bench``, ``triton``) gets a manifest whose keys have the types
the code expects and whose every path names a file inside the artifact directory, checked before any
listed file is opened. A bad value is one ``ArtifactError`` line naming the key path.

The schema is a small declarative table (no jsonschema: the runtime stays light). It checks the keys
clipdeploy reads; other keys pass untouched, since minor schema versions only add fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from clipdeploy import precisions
from clipdeploy.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
TOWERS = ("image", "text")
FORMATS = ("onnx", "tensorrt")


__all__ = ["SchemaError", "check_schema", "manifest_paths", "check_paths", "resolve_member"]


def __getattr__(name: str) -> Any:
    # PRECISIONS is the registry's current list, so a precision registered later is in it too.
    if name == "PRECISIONS":
        return precisions.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SchemaError(ValueError):
    """A value that does not fit the schema, at ``key`` (a dotted path such as ``towers.image.embed_dim``)."""

    def __init__(self, key: str, expected: str, value: Any = None, *, missing: bool = False) -> None:
        what = f"missing, expected {expected}" if missing else f"expected {expected}, got {_show(value)}"
        super().__init__(f"{key}: {what}")
        self.key = key


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Check = Callable[[Any, str], None]


def _key(parent: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{parent}[{name}]"
    return f"{parent}.{name}" if parent else name


# ---- the building blocks: each returns a check(value, key) that raises SchemaError -------------------


def string(*, nonempty: bool = False) -> Check:
    def check(v: Any, key: str) -> None:
        if not isinstance(v, str) or (nonempty and not v):
            raise SchemaError(key, "a non-empty string" if nonempty else "a string", v)

    return check


def integer(minimum: int | None = None) -> Check:
    def check(v: Any, key: str) -> None:
        # bool is an int in Python, never in a manifest.
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(key, "an integer", v)
        if minimum is not None and v < minimum:
            raise SchemaError(key, f"an integer of {minimum} or more", v)

    return check


def number(minimum: float | None = None, maximum: float | None = None, *, finite: bool = True) -> Check:
    def check(v: Any, key: str) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(key, "a number", v)
        if not math.isfinite(v):
            if finite:
                raise SchemaError(key, "a finite number", v)
            return  # a failed gate may record NaN figures; they must not make the artifact unreadable
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise SchemaError(key, f"a number in [{minimum}, {maximum}]", v)

    return check


def boolean() -> Check:
    def check(v: Any, key: str) -> None:
        if not isinstance(v, bool):
            raise SchemaError(key, "true or false", v)

    return check


def one_of(*values: Any, live: Callable[[], tuple[Any, ...]] | None = None) -> Check:
    """A value from ``values``, or from ``live()`` read at check time (a registry that may grow)."""

    def check(v: Any, key: str) -> None:
        allowed = live() if live is not None else values
        if not isinstance(v, (str, int, float, bool)) or v not in allowed:
            raise SchemaError(key, "one of " + ", ".join(map(repr, allowed)), v)

    return check


def sha256() -> Check:
    # A string is all readers need (they compare it with the file's sum); its form is not checked.
    return string(nonempty=True)


def nullable(inner: Check) -> Check:
    def check(v: Any, key: str) -> None:
        if v is not None:
            inner(v, key)

    return check


def either(first: Check, second: Check, expected: str) -> Check:
    def check(v: Any, key: str) -> None:
        try:
            first(v, key)
        except SchemaError:
            try:
                second(v, key)
            except SchemaError:
                raise SchemaError(key, expected, v) from None

    return check


def array(item: Check, *, min_len: int = 0, max_len: int | None = None) -> Check:
    def check(v: Any, key: str) -> None:
        if not isinstance(v, list):
            raise SchemaError(key, "a list", v)
        if len(v) < min_len or (max_len is not None and len(v) > max_len):
            size = f"{min_len}" if max_len == min_len else f"{min_len} or more" if max_len is None else f"{min_len} to {max_len}"
            raise SchemaError(key, f"a list of {size} items", v)
        for i, x in enumerate(v):
            item(x, _key(key, i))

    return check


def mapping(value: Check, *, keys: Check | None = None) -> Check:
    """A JSON object whose every value fits ``value`` (and every key ``keys``)."""

    def check(v: Any, key: str) -> None:
        if not isinstance(v, dict):
            raise SchemaError(key, "an object", v)
        for k, x in v.items():
            if keys is not None:
                keys(k, _key(key, k))
            value(x, _key(key, k))

    return check


def obj(required: dict[str, Check] | None = None, optional: dict[str, Check] | None = None) -> Check:
    """A JSON object with these keys; keys not named here are left alone (later minor versions add some)."""
    required, optional = required or {}, optional or {}

    def check(v: Any, key: str) -> None:
        if not isinstance(v, dict):
            raise SchemaError(key, "an object", v)
        for name, inner in required.items():
            if name not in v:
                raise SchemaError(_key(key, name), "this required key", missing=True)
            inner(v[name], _key(key, name))
        for name, inner in optional.items():
            if name in v:
                inner(v[name], _key(key, name))

    return check


# ---- the manifest -------------------------------------------------------------------------------------

_dim = either(integer(0), string(nonempty=True), "a size of 0 or more or an axis name")
_tensor = obj({"name": string(nonempty=True), "dtype": string(nonempty=True), "shape": array(_dim)})
_validation = obj(
    optional={
        "passed": boolean(),
        "min_cosine": number(-1.0 - 1e-6, 1.0 + 1e-6, finite=False),
        "mean_cosine": number(-1.0 - 1e-6, 1.0 + 1e-6, finite=False),
        "max_abs_err": number(0.0, finite=False),
        "top1_agreement": number(0.0, 1.0, finite=False),
    }
)
_side_file = obj({"file": string(nonempty=True), "sha256": sha256()})
_batch_axis = obj({"min": array(integer(0)), "opt": array(integer(0)), "max": array(integer(0))})

VARIANT = obj(
    {
        "tower": one_of(*TOWERS),
        "precision": one_of(live=precisions.names),
        "format": one_of(*FORMATS),
        "file": string(nonempty=True),
        "sha256": sha256(),
    },
    {
        "bytes": integer(0),
        "external_data": nullable(array(_side_file)),
        "validation": nullable(_validation),
        "source": string(nonempty=True),
        "opset": integer(1),
        "weights": one_of("int8", "fp32"),  # a Q/DQ variant: int8 initializers → DequantizeLinear, or fp32 + Q/DQ
        "profile": nullable(mapping(_batch_axis)),
        "tensorrt_version": string(),
        "compute_capability": nullable(string()),
        "hardware_compatibility": nullable(string()),
        "version_compatible": boolean(),
        "requires_cpu": array(string(nonempty=True)),  # CPU flags of which it needs one (bf16: avx512_bf16, amx_bf16)
    },
)

TOWER = obj(
    {"inputs": array(_tensor, min_len=1), "outputs": array(_tensor, min_len=1)},
    {
        "embed_dim": integer(1),
        "padding": one_of("longest", "max_length"),
        "pooling": string(nonempty=True),
        "eos_token_id": nullable(integer(0)),
        "causal": boolean(),
        "context_length": integer(1),
        "sequence": obj({"min": integer(1), "max": integer(1)}),
    },
)

MANIFEST = obj(
    {
        "schema_version": string(nonempty=True),
        "model": obj(
            {"name": string(nonempty=True), "embed_dim": integer(1), "logit_scale": number()},
            {
                "logit_bias": nullable(number()),
                "pretrained": nullable(string()),
                "checkpoint": nullable(string()),
                "checkpoint_sha256": nullable(sha256()),
                "random_init_seed": nullable(integer()),
                "family": nullable(string()),
                "model_config": nullable(mapping(lambda v, k: None)),
                "parameters": nullable(integer(0)),
            },
        ),
        "towers": mapping(TOWER, keys=one_of(*TOWERS)),
        "preprocess": obj(
            {
                "size": either(integer(1), array(integer(1), min_len=2, max_len=2), "[height, width] of positive integers"),
                "mean": array(number(), min_len=3, max_len=3),
                "std": array(number(), min_len=3, max_len=3),
                "interpolation": string(nonempty=True),
                "resize_mode": string(nonempty=True),
                "fill_color": integer(0),
            }
        ),
        "tokenizer": obj(
            {"kind": string(nonempty=True)},
            {
                "context_length": nullable(integer(1)),
                "files": mapping(string(nonempty=True)),
                "clean": nullable(string()),
                "additional_special_tokens": nullable(array(string())),
                "sot_token_id": nullable(integer(0)),
                "eot_token_id": nullable(integer(0)),
                "pad_token_id": nullable(integer(0)),
                "sep_token_id": nullable(integer(0)),
                "missing": nullable(mapping(lambda v, k: None)),
            },
        ),
        "variants": array(VARIANT),
    },
    {
        "created": string(),
        "files": mapping(sha256()),
        "tools": mapping(nullable(string())),
        "validation": obj(
            optional={
                "export": obj(
                    optional={
                        "reference": string(),
                        "images": array(string()),
                        "prompts": integer(0),
                        "batches": array(integer(1)),
                        "preprocess": obj(optional={"max_abs_diff": number(0.0)}),
                        "tokenizer": obj(optional={"mismatched": integer(0), "texts": integer(0)}),
                    }
                ),
                "quantize": mapping(lambda v, k: None),
            }
        ),
    },
)


def check_schema(manifest: Any) -> None:
    """Raise SchemaError at the first key whose value does not fit."""
    MANIFEST(manifest, "")


# ---- paths ------------------------------------------------------------------------------------------


def manifest_paths(manifest: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every (key path, path) in a manifest that names a file of the artifact, of every kind."""
    for i, v in enumerate(manifest.get("variants") or []):
        if not isinstance(v, dict):
            continue
        yield f"variants[{i}].file", v.get("file")
        if "source" in v:  # the ONNX file an engine or a quantized variant was made from
            yield f"variants[{i}].source", v.get("source")
        for j, e in enumerate(v.get("external_data") or []):
            yield f"variants[{i}].external_data[{j}].file", e.get("file") if isinstance(e, dict) else e
    for rel in manifest.get("files") or {}:
        yield f"files[{rel!r}]", rel
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict):
        for name, rel in (tokenizer.get("files") or {}).items():
            yield f"tokenizer.files.{name}", rel
    # Calibration caches the quantize stage records (it finds them by name, but a path is a path).
    quantize = (manifest.get("validation") or {}).get("quantize") or {}
    for precision, report in quantize.items() if isinstance(quantize, dict) else ():
        build = report.get("build") if isinstance(report, dict) else None
        for tower, info in build.items() if isinstance(build, dict) else ():
            cache = info.get("calibration_cache") if isinstance(info, dict) else None
            if isinstance(cache, dict) and "file" in cache:
                yield f"validation.quantize.{precision}.build.{tower}.calibration_cache.file", cache["file"]


def _outside(root: Path, rel: Any) -> str | None:
    """Why ``rel`` does not name a file inside ``root``, or None when it does. Opens nothing."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return "not a relative path"
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\")):
        return "an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "a path that climbs out with '..'"
    try:
        real_root = root.resolve()
        # resolve() follows symlinks (reading links only, opening no file), so a link out is caught here.
        real = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError up to Python 3.12, OSError after
        return f"a link that cannot be resolved ({e})"
    if real == real_root:
        return "the artifact directory itself, not a file in it"
    if not real.is_relative_to(real_root):
        return f"a link that resolves to {str(real)!r}, outside the artifact"
    return None


def resolve_member(root: str | Path, rel: Any, key: str = "path") -> Path:
    """``root / rel`` when ``rel`` names a file inside the artifact root; else a one-line ArtifactError.

    Refused: anything but a non-empty relative string, absolute paths (POSIX or Windows), any ``..``
    part, and paths that a symlink (of the file or of a folder on the way) takes outside ``root``.
    """
    root = Path(root)
    why = _outside(root, rel)
    if why is not None:
        raise ArtifactError(
            f"{str(root / MANIFEST_NAME)!r}: {key} is {_show(rel)}, {why}; a manifest may name only files "
            "inside its artifact directory; re-export the model with --force"
        )
    return root / rel


def check_paths(root: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse the manifest if any path in it leaves the artifact (see ``resolve_member``)."""
    for key, rel in manifest_paths(manifest):
        resolve_member(root, rel, key)
