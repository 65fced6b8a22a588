"""Writing the repository: each plan's tower models, Python-backend models and ensembles (config.pbtxt files).

What to write comes from :mod:`clipdeploy.triton.plan`; every fact about an artifact is read from its
:class:`~clipdeploy.artifact.view.ArtifactView`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clipdeploy
from clipdeploy import __version__, precisions
from clipdeploy.artifact.external_data import check_variant_external_data
from clipdeploy.artifact.manifest import Variant, variant_files, verify_files
from clipdeploy.artifact.view import TensorSpec
from clipdeploy.errors import ArtifactError
from clipdeploy.triton.config import TritonConfig
from clipdeploy.triton.pbtxt import Enum, dumps
from clipdeploy.triton.plan import Plan, onnx_target

VERSION = "1"  # every model is written as version 1
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


def _io(spec: TensorSpec) -> tuple[dict[str, Any], bool]:
    """A manifest tensor spec as a Triton input/output, and whether its first axis is a dynamic batch."""
    dtype = DTYPES.get(spec.dtype)
    if dtype is None:
        raise ArtifactError(f"tensor {spec.name!r} has dtype {spec.dtype!r}, which Triton configs here do not map")
    shape = list(spec.shape)
    batched = bool(shape) and isinstance(shape[0], str)
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in (shape[1:] if batched else shape)]
    return {"name": spec.name, "data_type": Enum(dtype), "dims": dims}, batched


def _batching(cfg: TritonConfig) -> dict[str, Any]:
    return {"max_queue_delay_microseconds": cfg.max_queue_delay_us}


def _write_config(model_dir: Path, config: dict[str, Any]) -> None:
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(dumps(config), encoding="utf-8")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _tower_io(plan: Plan, tower: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    facts = plan.view.tower(tower)
    inputs = [_io(t) for t in facts.inputs]
    outputs = [_io(t) for t in facts.outputs]
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
            context = plan.view.context_length or 0
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
        listed = plan.view.files
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
    order += [("onnx", p) for p in precisions.preference(onnx_target(cfg))]
    rank = {k: i for i, k in enumerate(order)}
    return min(models, key=lambda m: rank.get((m.format, m.precision), len(rank)))


def write_plan(cfg: TritonConfig, plan: Plan, repo: Path, warnings: list[str]) -> dict[str, Any]:
    """Write one artifact's models and ensembles into ``repo``; returns its entry of the repository's marker."""
    towers: list[TowerModel] = []
    for v in sorted(plan.onnx, key=lambda v: (v.tower, precisions.rank(v.precision))):
        if len(plan.view.tower(v.tower).inputs) != 1:
            warnings.append(f"{plan.root}: the {v.tower} tower has several inputs; not served")
            continue
        towers.append(_onnx_model(cfg, plan, v, repo))
    for (tower, precision), group in sorted(plan.engines.items()):
        if len(plan.view.tower(tower).inputs) != 1:
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
        if tower == "text" and plan.view.tokenizer_missing:
            warnings.append(
                f"{plan.root}: the artifact has no tokenizer files, so there is no {plan.prefix}_tokenize model and "
                "no text ensemble (the text tower models take token ids); re-export with --tokenizer-dir"
            )
            continue
        spec_in = plan.view.tower(tower).inputs[0]
        pre_in, _ = _io(spec_in)
        raw_out = served[0].outputs[0]
        py_mbs = max(t.max_batch_size for t in served)
        if tower == "image":
            pre, source = f"{plan.prefix}_preprocess", "image_model.py"
            pre_io = (
                {"name": "IMAGE", "data_type": Enum("TYPE_STRING"), "dims": [1]},
                {"name": "PIXELS", "data_type": pre_in["data_type"], "dims": pre_in["dims"]},
            )
            assets = {"input": "IMAGE", "output": "PIXELS", "preprocess": dict(plan.view.preprocess)}
        else:
            pre, source = f"{plan.prefix}_tokenize", "text_model.py"
            pre_io = (
                {"name": "TEXT", "data_type": Enum("TYPE_STRING"), "dims": [1]},
                {"name": "TOKENS", "data_type": pre_in["data_type"], "dims": pre_in["dims"]},
            )
            assets = {"input": "TEXT", "output": "TOKENS", "tokenizer": dict(plan.view.tokenizer)}
        assets["model"] = plan.view.model.name
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
        "model": plan.view.model.name,
        "models": [t.name for t in towers] + python_models,
        "ensembles": ensembles,
    }

