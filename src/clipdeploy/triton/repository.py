"""`clipdeploy triton`: artifact directories -> a Triton Inference Server model repository.

Per artifact (prefix P, the model's name):

- ``P_<tower>_<precision>_<trt|onnx>``: one model per tower variant: ``tensorrt_plan`` for engines
  (one plan per GPU compute capability, through ``cc_model_filenames``), ``onnxruntime_onnx`` for
  ONNX. Inputs and outputs come from the manifest, ``max_batch_size`` from the engine's profile;
  dynamic batching and instance groups are set.
- ``P_preprocess`` (image bytes -> pixels) and ``P_tokenize`` (strings -> ids): Python-backend
  models running clipdeploy's own torch-free preprocessing and tokenizer, vendored with the
  artifact's config and tokenizer files; ``P_normalize_<tower>``: L2 normalization.
- ``P_embed_<tower>_<precision>_<trt|onnx>``: ensembles, raw image bytes or strings in, embeddings
  out; ``P_embed_<tower>``: the same for the variant the runtime would pick.

The repository is written to a temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import clipdeploy
from clipdeploy import __version__, precisions
from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.artifact.manifest import (
    FORMATS,
    Variant,
    read_manifest,
    swap_directory,
    variant_files,
    variants,
    verify_files,
)
from clipdeploy.artifact.external_data import check_variant_external_data
from clipdeploy.options import opt
from clipdeploy.runtime.backends import registry as backends
from clipdeploy.runtime.backends.onnxruntime import INT8_QDQ
from clipdeploy.artifact.staging import clean_beside, ensure_parent, output_temporaries, reserved
from clipdeploy.triton import releases
from clipdeploy.triton.pbtxt import Enum, dumps
from clipdeploy.triton.readme import readme

log = logging.getLogger(__name__)

MARKER = "clipdeploy-triton.json"  # at the repository root: what was generated, from what (Triton ignores files there)
MARKER_SCHEMA = "clipdeploy-triton/1"
VERSION = "1"  # every model is written as version 1
ONNX_DEVICES = ("cpu", "gpu")
DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}  # fmt: skip
# The clipdeploy modules the Python-backend models run; the clipdeploy modules they import (at any depth,
# inside functions too) are vendored with them.
VENDOR_ROOTS = ("runtime/preprocess.py", "runtime/text/__init__.py")
_MODELS_DIR = Path(__file__).resolve().parent / "python_models"
_FMT_SUFFIX = {"tensorrt": "trt", "onnx": "onnx"}
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class TritonConfig:
    """Everything `clipdeploy triton` takes. CLI and API both resolve through this."""

    artifacts: list[Path]  # artifact directories (made by export/quantize/build, or `clipdeploy run`)
    output: Path  # the model repository to write
    formats: tuple[str, ...] = field(  # which variant formats to serve: onnx and/or tensorrt
        default=FORMATS,
        metadata=opt("serve only this format (repeatable)", flag="--format", action="append",
                     choices=("onnx", "tensorrt"), default_text="every format present"),
    )  # fmt: skip
    precisions: tuple[str, ...] = field(  # empty: every accepted one
        default=(),
        metadata=opt("serve only this precision (repeatable)", flag="--precision", action="append",
                     choices=precisions.names, default_text="every accepted one"),
    )  # fmt: skip
    names: tuple[str, ...] = field(  # default: from the directory
        default=(),
        metadata=opt("model-name prefix, once per artifact in order", flag="--name", action="append",
                     metavar="NAME", default_text="the directory name"),
    )  # fmt: skip
    onnx_max_batch_size: int = field(  # ONNX models' batch axis has no profile
        default=64, metadata=opt("max_batch_size of ONNX models (engines take theirs from the profile)")
    )
    onnx_device: str = field(  # not --device: this is the kind of Triton instance, on the server
        default="cpu",
        metadata=opt("Triton instance kind of ONNX models: cpu (validated here) or gpu (CUDA EP)", choices=ONNX_DEVICES),
    )
    server_has_vnni: bool = field(  # whether CPU instances may serve int8 ONNX (see _CPU_INT8)
        default=False,
        metadata=opt("the Triton server's CPU has VNNI (avx512_vnni, avx_vnni or amx_int8): serve int8 ONNX "
                     "models on CPU instances too"),
    )  # fmt: skip
    instances: int = field(default=1, metadata=opt("instances of each tower model, per GPU (or in all, on CPU)"))
    python_instances: int = field(default=2, metadata=opt("CPU instances of each preprocess/tokenize/normalize model"))
    max_queue_delay_us: int = field(
        default=100, metadata=opt("dynamic batching queue delay in microseconds", metavar="US")
    )
    tensorrt_version: str | None = field(
        default=None, metadata=opt("serve engines of this TensorRT version when several exist", metavar="V")
    )
    triton_release: str | None = field(
        default=None, metadata=opt("the Triton release you will run; warns on a TensorRT mismatch", metavar="YY.MM")
    )
    triton_tensorrt: str | None = field(  # for releases not in the table
        default=None, metadata=opt("that release's TensorRT version, if clipdeploy does not know it", metavar="V")
    )
    force: bool = field(default=False, metadata=opt("replace an existing repository written by this command"))

    def check(self) -> None:
        if not self.artifacts:
            raise UsageError("no artifact directories given; pass at least one DIR")
        if self.names and len(self.names) != len(self.artifacts):
            raise UsageError(
                f"--name was given {len(self.names)} times for {len(self.artifacts)} artifacts; "
                "give one per artifact, in order"
            )
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise UsageError(f"--format {bad[0] if bad else '(none)'!r} is not one of {', '.join(FORMATS)}")
        for p in self.precisions:
            precisions.get(p)  # an unknown name: one line with a suggestion
        if self.onnx_device not in ONNX_DEVICES:
            raise UsageError(f"--onnx-device {self.onnx_device!r} is not one of {', '.join(ONNX_DEVICES)}")
        for name in ("onnx_max_batch_size", "instances", "python_instances"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be 1 or more")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us {self.max_queue_delay_us} must be 0 or more")
        if self.triton_release is not None and not re.fullmatch(r"\d\d\.\d\d", self.triton_release):
            raise UsageError(f"--triton-release {self.triton_release!r} is not a release name like 25.08")
        for flag, v in (("--triton-tensorrt", self.triton_tensorrt), ("--tensorrt-version", self.tensorrt_version)):
            if v is not None and releases.base(v) is None:
                raise UsageError(f"{flag} {v!r} is not a version like 10.13.3")


@dataclass
class TowerModel:
    """One generated tower model."""

    name: str
    tower: str
    precision: str
    format: str
    max_batch_size: int
    inputs: list[dict[str, Any]]  # [{name, data_type, dims}] without the batch axis
    outputs: list[dict[str, Any]]


@dataclass
class Plan:
    """What one artifact contributes."""

    prefix: str
    root: Path
    manifest: dict[str, Any]
    onnx: list[Variant] = field(default_factory=list)
    engines: dict[tuple[str, str], list[Variant]] = field(default_factory=dict)  # (tower, precision) -> plans


def prefix_for(path: Path, explicit: str | None) -> str:
    """The model-name prefix: explicit, else the directory name (its parent's for `clipdeploy run`'s artifact/)."""
    if explicit:
        name = explicit
    else:
        path = path.resolve()
        name = path.parent.name if path.name == "artifact" else path.name
    clean = _NAME.sub("-", name).strip("-.")
    if not clean:
        raise UsageError(f"cannot make a Triton model name from {name!r}; pass --name NAME")
    return clean


def _io(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A manifest tensor spec as a Triton input/output, and whether its first axis is a dynamic batch."""
    dtype = DTYPES.get(str(spec["dtype"]))
    if dtype is None:
        raise ArtifactError(
            f"tensor {spec['name']!r} has dtype {spec['dtype']!r}, which Triton configs here do not map"
        )
    shape = list(spec["shape"])
    batched = bool(shape) and isinstance(shape[0], str)
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in (shape[1:] if batched else shape)]
    return {"name": spec["name"], "data_type": Enum(dtype), "dims": dims}, batched


def _batching(cfg: TritonConfig) -> dict[str, Any]:
    return {"max_queue_delay_microseconds": cfg.max_queue_delay_us}


# ---- collecting -----------------------------------------------------------------------------------


def collect(cfg: TritonConfig, warnings: list[str], notes: set[str]) -> list[Plan]:
    """Read each artifact and pick the variants to serve; warns about (or notes) those left out and why."""
    onnx_default = precisions.preference(_onnx_target(cfg))
    plans = []
    for i, path in enumerate(cfg.artifacts):
        root = Path(path)
        manifest = read_manifest(root)
        plan = Plan(prefix_for(root, cfg.names[i] if cfg.names else None), root, manifest)
        for v in variants(manifest):
            if cfg.precisions and v.precision not in cfg.precisions:
                continue
            if v.format not in cfg.formats or v.tower not in manifest["towers"]:
                continue
            if not v.accepted:
                state = "did not pass" if v.validation else "has not been through"
                fix = (
                    "run `clipdeploy validate` on the GPU it was built for"
                    if v.format == "tensorrt"
                    else "re-run quantize"
                )
                warnings.append(f"{root}: {v.file} {state} its accuracy check, so it is not served; {fix}")
                continue
            if v.format == "onnx":
                if precisions.get(v.precision).reuses_reference:  # the fp32 file under an OpenVINO setting
                    notes.add(f"{v.precision} ONNX variants are left out: they run on "
                              f"{' or '.join(precisions.get(v.precision).backends)} only, not ONNX Runtime")
                    continue
                if cfg.onnx_device == "cpu" and v.precision in INT8_QDQ and not cfg.server_has_vnni:
                    if v.precision in cfg.precisions:
                        raise UsageError(f"--precision {v.precision} on --onnx-device cpu: {_CPU_INT8}; pass "
                                         "--server-has-vnni if it has, or serve fp32")
                    notes.add(f"int8 ONNX variants are left out on CPU instances, and fp32 is served instead: "
                              f"{_CPU_INT8}; pass --server-has-vnni if it has")
                    continue
                if not cfg.precisions and v.precision not in onnx_default:
                    notes.add(
                        f"{v.precision} ONNX variants are left out: ONNX Runtime on {cfg.onnx_device} does not pick "
                        f"them (pass --precision {v.precision} to serve them anyway)"
                    )
                    continue
                plan.onnx.append(v)
            else:
                plan.engines.setdefault((v.tower, v.precision), []).append(v)
        plans.append(plan)
    seen: dict[str, Path] = {}
    for plan in plans:
        if plan.prefix in seen:
            raise UsageError(
                f"{plan.root} and {seen[plan.prefix]} would both be served as {plan.prefix!r}; "
                "pass --name once per artifact"
            )
        seen[plan.prefix] = plan.root
    _pick_tensorrt_version(cfg, plans, warnings)
    return plans


# Triton's ONNX Runtime backend takes a fixed list of `parameters` (execution_mode, intra/inter_op_thread_count,
# enable_mem_arena, enable_mem_pattern, session.use_device_allocator_for_initializers, CUDA and TensorRT EP
# keys; triton-inference-server/onnxruntime_backend, src/onnxruntime.cc) and ignores any other key, so a
# config cannot set session.x64quantprecision. Without VNNI, ONNX Runtime's default int8 kernels saturate
# (U8S8 with VPMADDUBSW): the int8 gate failed there until clipdeploy set that flag (runtime/backends/onnxruntime.py).
_CPU_INT8 = (
    "Triton's ONNX Runtime backend cannot set session.x64quantprecision, so on a server CPU without VNNI "
    "(avx512_vnni, avx_vnni or amx_int8) its int8 runs the saturating kernels that fail clipdeploy's int8 gate"
)


def _served_towers(plan: Plan) -> set[tuple[str, str]]:
    """(precision, format) pairs a plan serves, counting only towers with one input (as _write_plan does)."""
    one_input = {t for t, spec in plan.manifest["towers"].items() if len(spec["inputs"]) == 1}
    pairs = {(v.precision, "onnx") for v in plan.onnx if v.tower in one_input}
    return pairs | {(p, "tensorrt") for (t, p) in plan.engines if t in one_input}


def refuse_empty(cfg: TritonConfig, plans: list[Plan]) -> None:
    """An artifact with nothing to serve, or a --precision nothing serves, is an error: an empty
    repository that exits 0 looks like success and serves nothing."""
    flags = " ".join(
        [*(f"--format {f}" for f in cfg.formats if len(cfg.formats) < len(FORMATS))]
        + [f"--precision {p}" for p in cfg.precisions]
    )
    for plan in plans:
        if _served_towers(plan):
            continue
        all_variants = [v for v in variants(plan.manifest) if v.tower in plan.manifest["towers"]]
        have = sorted({f"{v.precision} {v.format}" + ("" if v.accepted else " (not accepted)") for v in all_variants})
        engines = [v for v in all_variants if v.format == "tensorrt"]
        if cfg.precisions and not any(v.precision in cfg.precisions for v in all_variants):
            fix = f"make one with `clipdeploy quantize {plan.root} --precision {cfg.precisions[0]}`, or drop --precision"
        elif "tensorrt" in cfg.formats and not engines:
            fix = f"run `clipdeploy build {plan.root}` first to make TensorRT engines"
            if "onnx" not in cfg.formats:
                fix += ", or serve its ONNX variants with --format onnx"
        else:
            fix = "serve another --precision/--format, or re-run the stage whose check failed"
        raise UsageError(
            f"{plan.root}: nothing to serve{' with ' + flags if flags else ''}: it has "
            f"{', '.join(have) or 'no variants'}; {fix}"
        )
    served = {p for plan in plans for p, _ in _served_towers(plan)}
    missing = [p for p in cfg.precisions if p not in served]
    if missing:
        raise UsageError(
            f"--precision {missing[0]} matches no accepted variant in {', '.join(str(p.root) for p in plans)} "
            f"(they serve {', '.join(sorted(served))}); make it with `clipdeploy quantize --precision {missing[0]}`"
            " (or `clipdeploy build` for engines), or drop that --precision"
        )


def _pick_tensorrt_version(cfg: TritonConfig, plans: list[Plan], warnings: list[str]) -> None:
    """One Triton release serves one TensorRT version: keep the engines of one version."""
    found = sorted(
        {str(releases.base(v.extra.get("tensorrt_version", ""))) for p in plans for g in p.engines.values() for v in g}
    )
    if not found:
        return
    if cfg.tensorrt_version is not None:
        want = str(releases.base(cfg.tensorrt_version))
        if want not in found:
            raise UsageError(f"no engines of TensorRT {want} in these artifacts (they have {', '.join(found)})")
    elif len(found) > 1:
        raise UsageError(
            f"these artifacts hold engines of TensorRT {', '.join(found)}; one Triton release runs one of them: "
            "pass --tensorrt-version to choose"
        )
    else:
        want = found[0]
    for p in plans:
        for key in list(p.engines):
            kept = [v for v in p.engines[key] if str(releases.base(v.extra.get("tensorrt_version", ""))) == want]
            dropped = len(p.engines[key]) - len(kept)
            if dropped:
                warnings.append(f"{p.root}: {dropped} {key[0]} {key[1]} engine(s) of another TensorRT version left out")
            if kept:
                p.engines[key] = kept
            else:
                del p.engines[key]


def tensorrt_check(cfg: TritonConfig, plans: list[Plan], warnings: list[str]) -> dict[str, Any]:
    """Which Triton releases load these engines; a warning when the target release's TensorRT differs."""
    engines = [v for p in plans for g in p.engines.values() for v in g]
    if not engines:
        return {}
    version = str(releases.base(engines[0].extra.get("tensorrt_version", "")))
    compat = all(bool(v.extra.get("version_compatible")) for v in engines)
    matching = releases.matching(version, compat)
    info: dict[str, Any] = {
        "engines_tensorrt": version,
        "version_compatible": compat,
        "matching_releases": [{"release": r.name, "tensorrt": r.tensorrt, "verified": r.verified} for r in matching],
    }
    target_version = cfg.triton_tensorrt
    if cfg.triton_release is not None:
        info["target_release"] = cfg.triton_release
        known = releases.find(cfg.triton_release)
        if known is None and target_version is None:
            warnings.append(
                f"Triton {cfg.triton_release} is not in clipdeploy's table, so its TensorRT cannot be checked; pass "
                "--triton-tensorrt VERSION (inside the container: ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.*)"
            )
        elif known is not None and target_version is None:
            target_version = known.tensorrt
            if not known.verified:
                warnings.append(
                    f"Triton {known.name} is listed with TensorRT {known.tensorrt}, not verified here; check it in the "
                    "container (ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.*) before relying on it"
                )
    if target_version is not None:
        info["target_tensorrt"] = str(releases.base(target_version))
        if not releases.loads_in(version, target_version, compat):
            where = (
                f"Triton {cfg.triton_release} (TensorRT {target_version})"
                if cfg.triton_release
                else f"TensorRT {target_version}"
            )
            use = ", ".join(r.name for r in matching) or "none that clipdeploy knows"
            warnings.append(
                f"the engines were built with TensorRT {version} and will not load in {where}: "
                "use a Triton release with "
                f"TensorRT {version} ({use}), or rebuild the engines with that server's TensorRT "
                "(or with --version-compat, for later releases of the same major)"
            )
    elif not matching:
        warnings.append(
            f"no Triton release in clipdeploy's table ships TensorRT {version}: find one in NVIDIA's support matrix "
            "and pass --triton-release/--triton-tensorrt to check it, or rebuild the engines with that "
            "release's TensorRT"
        )
    if compat:
        warnings.append(
            "the engines are version-compatible (they embed host code): start Triton with "
            "--backend-config=tensorrt,version-compatible=true"
        )
    return info


# ---- writing --------------------------------------------------------------------------------------


def _write_config(model_dir: Path, config: dict[str, Any]) -> None:
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(dumps(config), encoding="utf-8")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _tower_io(plan: Plan, tower: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    spec = plan.manifest["towers"][tower]
    inputs = [_io(t) for t in spec["inputs"]]
    outputs = [_io(t) for t in spec["outputs"]]
    return [i for i, _ in inputs], [o for o, _ in outputs], all(b for _, b in inputs + outputs)


def _onnx_model(cfg: TritonConfig, plan: Plan, v: Variant, repo: Path) -> TowerModel:
    name = f"{plan.prefix}_{v.tower}_{v.precision}_onnx"
    inputs, outputs, batched = _tower_io(plan, v.tower)
    verify_files(plan.root, variant_files(v))
    check_variant_external_data(plan.root, v.file, v.external_data)  # the copy must carry every file it reads
    version_dir = repo / name / VERSION
    _copy(plan.root / v.file, version_dir / Path(v.file).name)
    for ext in v.external_data:  # ONNX names external data relative to the model file
        _copy(plan.root / ext, version_dir / Path(ext).relative_to(Path(v.file).parent))
    mbs = cfg.onnx_max_batch_size if batched else 0
    kind = "KIND_GPU" if cfg.onnx_device == "gpu" else "KIND_CPU"
    _write_config(
        repo / name,
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": mbs,
            "input": inputs,
            "output": outputs,
            "dynamic_batching": _batching(cfg) if mbs else None,
            "instance_group": [{"count": cfg.instances, "kind": Enum(kind)}],
            "default_model_filename": Path(v.file).name,
        },
    )
    return TowerModel(name, v.tower, v.precision, "onnx", mbs, inputs, outputs)


def _profile_batch(v: Variant, input_name: str) -> tuple[int, int] | None:
    profile = (v.extra.get("profile") or {}).get(input_name)
    if not profile:
        return None
    return int(profile["min"][0]), int(profile["max"][0])


def _trt_model(
    cfg: TritonConfig, plan: Plan, tower: str, precision: str, plans: list[Variant], repo: Path, warnings: list[str]
) -> TowerModel:
    name = f"{plan.prefix}_{tower}_{precision}_trt"
    inputs, outputs, batched = _tower_io(plan, tower)
    version_dir = repo / name / VERSION
    # Plans tied to one GPU first (fastest), non-version-compatible before version-compatible ones.
    ordered = sorted(plans, key=lambda v: (bool(v.extra.get("version_compatible")), v.file))
    by_cc: dict[str, Variant] = {}
    portable: Variant | None = None
    for v in ordered:
        if v.extra.get("hardware_compatibility") == "ampere-plus":
            portable = portable or v
        else:
            by_cc.setdefault(str(v.extra.get("compute_capability")), v)
    chosen = [*by_cc.values(), *([portable] if portable else [])]
    for v in chosen:
        verify_files(plan.root, variant_files(v))
        _copy(plan.root / v.file, version_dir / Path(v.file).name)
    default = portable or next(iter(by_cc.values()))
    limits = []
    for v in chosen:
        for spec in inputs:
            found = _profile_batch(v, spec["name"])
            if found is None:
                warnings.append(f"{v.file} records no profile for {spec['name']!r}; max_batch_size falls back to 1")
                found = (1, 1)
            if found[0] > 1:
                warnings.append(
                    f"{v.file} takes batches of {found[0]} and up, but Triton sends batches from 1; "
                    "rebuild with --batch 1:OPT:MAX"
                )
            limits.append(found[1])
            axes = (v.extra.get("profile") or {}).get(spec["name"]) or {}
            context = int(plan.manifest.get("tokenizer", {}).get("context_length") or 0)
            if tower == "text" and context and len(axes.get("max", [])) > 1 and axes["max"][1] < context:
                warnings.append(
                    f"{v.file} takes at most {axes['max'][1]} tokens, but the tokenize model sends {context}; "
                    f"rebuild with --seq-len 1:OPT:{context}"
                )
    mbs = min(limits) if batched and limits else 0
    if by_cc and portable is None:
        ccs = ", ".join(sorted(by_cc))
        warnings.append(f"{name}: engines for compute capability {ccs} only; Triton on other GPUs cannot load it")
    _write_config(
        repo / name,
        {
            "name": name,
            "platform": "tensorrt_plan",
            "max_batch_size": mbs,
            "input": inputs,
            "output": outputs,
            "dynamic_batching": _batching(cfg) if mbs else None,
            "instance_group": [{"count": cfg.instances, "kind": Enum("KIND_GPU")}],
            "default_model_filename": Path(default.file).name,
            "cc_model_filenames": [{"key": cc, "value": Path(v.file).name} for cc, v in sorted(by_cc.items())] or None,
        },
    )
    return TowerModel(name, tower, precision, "tensorrt", mbs, inputs, outputs)


def vendored_modules(src: Path) -> list[str]:
    """The clipdeploy modules (paths relative to the package) the Python models need, found from imports."""
    import ast

    todo, found = list(VENDOR_ROOTS), set()
    while todo:
        rel = todo.pop()
        if rel in found or not (src / rel).is_file():
            continue
        found.add(rel)
        for node in ast.walk(ast.parse((src / rel).read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "clipdeploy" or len(parts) < 2:
                    continue
                for depth in range(2, len(parts) + 1):  # a module, or a package's __init__
                    path = "/".join(parts[1:depth])
                    todo += [f"{path}.py", f"{path}/__init__.py"]
    return sorted(found)


def _vendor(version_dir: Path) -> None:
    """Copy clipdeploy's torch-free preprocessing and tokenizer modules beside a Python model."""
    src = Path(clipdeploy.__file__).resolve().parent
    dest = version_dir / "clipdeploy"
    (dest / "runtime").mkdir(parents=True, exist_ok=True)
    (dest / "__init__.py").write_text(
        f'"""clipdeploy {__version__}: torch-free preprocessing and tokenizer, vendored by `clipdeploy triton`."""\n\n'
        f'__version__ = "{__version__}"\n',
        encoding="utf-8",
    )
    (dest / "runtime" / "__init__.py").write_text("", encoding="utf-8")
    for rel in vendored_modules(src):
        if rel.endswith("__init__.py") and rel.count("/") <= 1:
            continue  # the package and runtime/ get the small __init__ files above, not clipdeploy's own
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)


def _python_model(
    cfg: TritonConfig,
    repo: Path,
    name: str,
    source: str,
    mbs: int,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    assets: dict[str, Any] | None,
    plan: Plan | None,
) -> None:
    version_dir = repo / name / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MODELS_DIR / source, version_dir / "model.py")
    if assets is not None and plan is not None:
        _vendor(version_dir)
        files = dict((assets.get("tokenizer") or {}).get("files") or {})
        listed = plan.manifest.get("files") or {}
        verify_files(plan.root, [(rel, listed[rel]) for rel in files.values() if rel in listed])
        for rel in files.values():
            _copy(plan.root / rel, version_dir / "assets" / rel)
        (version_dir / "assets").mkdir(exist_ok=True)
        (version_dir / "assets" / "clipdeploy.json").write_text(json.dumps(assets, indent=2) + "\n", encoding="utf-8")
    _write_config(
        repo / name,
        {
            "name": name,
            "backend": "python",
            "max_batch_size": mbs,
            "input": inputs,
            "output": outputs,
            "dynamic_batching": _batching(cfg) if mbs else None,
            "instance_group": [{"count": cfg.python_instances, "kind": Enum("KIND_CPU")}],
        },
    )


def _ensemble(repo: Path, name: str, tower: TowerModel, pre: str, norm: str, mbs: int) -> dict[str, Any]:
    (raw_in,), (raw_out,) = tower.inputs, tower.outputs
    client_in = "IMAGE" if tower.tower == "image" else "TEXT"
    pre_out = "PIXELS" if tower.tower == "image" else "TOKENS"
    config = {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": mbs,
        "input": [{"name": client_in, "data_type": Enum("TYPE_STRING"), "dims": [1]}],
        "output": [{"name": "EMBEDDING", "data_type": Enum("TYPE_FP32"), "dims": raw_out["dims"]}],
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": pre,
                    "model_version": -1,
                    "input_map": [{"key": client_in, "value": client_in}],
                    "output_map": [{"key": pre_out, "value": "model_input"}],
                },
                {
                    "model_name": tower.name,
                    "model_version": -1,
                    "input_map": [{"key": raw_in["name"], "value": "model_input"}],
                    "output_map": [{"key": raw_out["name"], "value": "raw_embedding"}],
                },
                {
                    "model_name": norm,
                    "model_version": -1,
                    "input_map": [{"key": "RAW", "value": "raw_embedding"}],
                    "output_map": [{"key": "EMBEDDING", "value": "EMBEDDING"}],
                },
            ]
        },
    }
    _write_config(repo / name, config)
    return {
        "name": name,
        "tower": tower.tower,
        "model": tower.name,
        "precision": tower.precision,
        "format": tower.format,
        "input": client_in,
    }


def _default_variant(cfg: TritonConfig, models: list[TowerModel]) -> TowerModel:
    """The variant the runtime would pick: TensorRT first when served, else ONNX Runtime's order on that device."""
    order = [("tensorrt", p) for p in precisions.preference("tensorrt")]
    order += [("onnx", p) for p in precisions.preference(_onnx_target(cfg))]
    rank = {k: i for i, k in enumerate(order)}
    return min(models, key=lambda m: rank.get((m.format, m.precision), len(rank)))


def _onnx_target(cfg: TritonConfig) -> str:
    # The ONNX Runtime preference target the served instance kind matches (see PrecisionSpec.preference).
    spec = backends.get("onnxruntime")
    device = "cuda" if cfg.onnx_device == "gpu" else "cpu"
    return spec.bench_target(device) if spec.bench_target else spec.name


def _write_plan(cfg: TritonConfig, plan: Plan, repo: Path, warnings: list[str]) -> dict[str, Any]:
    towers: list[TowerModel] = []
    for v in sorted(plan.onnx, key=lambda v: (v.tower, precisions.rank(v.precision))):
        if len(plan.manifest["towers"][v.tower]["inputs"]) != 1:
            warnings.append(f"{plan.root}: the {v.tower} tower has several inputs; not served")
            continue
        towers.append(_onnx_model(cfg, plan, v, repo))
    for (tower, precision), group in sorted(plan.engines.items()):
        if len(plan.manifest["towers"][tower]["inputs"]) != 1:
            continue
        towers.append(_trt_model(cfg, plan, tower, precision, group, repo, warnings))
    if not towers:
        warnings.append(
            f"{plan.root}: nothing to serve with --format {','.join(cfg.formats)}"
            + (f" --precision {','.join(cfg.precisions)}" if cfg.precisions else "")
        )
        return {"prefix": plan.prefix, "artifact": str(plan.root), "models": [], "ensembles": []}
    python_models, ensembles = [], []
    for tower in ("image", "text"):
        served = [t for t in towers if t.tower == tower]
        if not served:
            continue
        if tower == "text" and (plan.manifest.get("tokenizer") or {}).get("missing"):
            warnings.append(
                f"{plan.root}: the artifact has no tokenizer files, so there is no {plan.prefix}_tokenize model and "
                "no text ensemble (the text tower models take token ids); re-export with --tokenizer-dir"
            )
            continue
        spec_in = plan.manifest["towers"][tower]["inputs"][0]
        pre_in, _ = _io(spec_in)
        raw_out = served[0].outputs[0]
        py_mbs = max(t.max_batch_size for t in served)
        if tower == "image":
            pre, source = f"{plan.prefix}_preprocess", "image_model.py"
            pre_io = (
                {"name": "IMAGE", "data_type": Enum("TYPE_STRING"), "dims": [1]},
                {"name": "PIXELS", "data_type": pre_in["data_type"], "dims": pre_in["dims"]},
            )
            assets = {"input": "IMAGE", "output": "PIXELS", "preprocess": plan.manifest["preprocess"]}
        else:
            pre, source = f"{plan.prefix}_tokenize", "text_model.py"
            pre_io = (
                {"name": "TEXT", "data_type": Enum("TYPE_STRING"), "dims": [1]},
                {"name": "TOKENS", "data_type": pre_in["data_type"], "dims": pre_in["dims"]},
            )
            assets = {"input": "TEXT", "output": "TOKENS", "tokenizer": plan.manifest["tokenizer"]}
        assets["model"] = plan.manifest["model"]["name"]
        _python_model(cfg, repo, pre, source, py_mbs, [pre_io[0]], [pre_io[1]], assets, plan)
        norm = f"{plan.prefix}_normalize_{tower}"
        _python_model(
            cfg,
            repo,
            norm,
            "normalize_model.py",
            py_mbs,
            [{"name": "RAW", "data_type": raw_out["data_type"], "dims": raw_out["dims"]}],
            [{"name": "EMBEDDING", "data_type": Enum("TYPE_FP32"), "dims": raw_out["dims"]}],
            None,
            None,
        )
        python_models += [pre, norm]
        for t in served:
            if t.max_batch_size == 0:
                warnings.append(f"{t.name} has no batch axis; no ensemble is made for it")
                continue
            suffix = f"{t.precision}_{_FMT_SUFFIX[t.format]}"
            ensembles.append(_ensemble(repo, f"{plan.prefix}_embed_{tower}_{suffix}", t, pre, norm, t.max_batch_size))
        batched = [t for t in served if t.max_batch_size]
        if batched:
            best = _default_variant(cfg, batched)
            entry = _ensemble(repo, f"{plan.prefix}_embed_{tower}", best, pre, norm, best.max_batch_size)
            ensembles.append({**entry, "default": True})
    return {
        "prefix": plan.prefix,
        "artifact": str(plan.root),
        "model": plan.manifest["model"]["name"],
        "models": [t.name for t in towers] + python_models,
        "ensembles": ensembles,
    }


def _check_output(output: Path, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise UsageError(f"output {str(output)!r} already exists; pass --force to replace it, or choose another -o")
    if not output.is_dir() or not ((output / MARKER).is_file() or not any(output.iterdir())):
        raise UsageError(
            f"--force replaces only a repository made by `clipdeploy triton`, and {str(output)!r} is not one "
            f"(no {MARKER}); choose another -o"
        )


def build_repository(cfg: TritonConfig) -> dict[str, Any]:
    """Write a Triton model repository for ``cfg.artifacts``; returns what was written, with warnings."""
    cfg.check()
    output = Path(cfg.output)
    ensure_parent(output)  # mkdir -p, and a killed run's leftovers go (a half-swapped repository comes back)
    clean_beside(output)
    _check_output(output, cfg.force)
    warnings: list[str] = []
    notes: set[str] = set()
    plans = collect(cfg, warnings, notes)
    refuse_empty(cfg, plans)
    trt = tensorrt_check(cfg, plans, warnings)
    with reserved(output.parent, output_temporaries(output)[0]) as work:
        served = [_write_plan(cfg, plan, work, warnings) for plan in plans]
        summary = {
            "schema": MARKER_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "clipdeploy": __version__,
            "artifacts": served,
            "tensorrt": trt,
            "warnings": warnings,
            "notes": sorted(notes),
        }
        (work / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(readme(summary, output), encoding="utf-8")
        # `reserved` makes it with the umask's mode: the server (often another user in a container) reads it.
        swap_directory(work, output)
    for w in warnings:
        log.warning("clipdeploy: %s", w)
    summary["path"] = str(output)
    return summary
