"""What to write: each artifact's view and the variants it serves, with the reasons others are left out.

Reads artifacts (through :class:`~clipdeploy.artifact.view.ArtifactView`) and writes nothing; the
writing is :mod:`clipdeploy.triton.write`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdeploy import precisions
from clipdeploy.artifact.manifest import FORMATS, Variant
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.errors import UsageError
from clipdeploy.runtime.backends import registry as backends
from clipdeploy.runtime.backends.onnxruntime import INT8_QDQ
from clipdeploy.triton import releases
from clipdeploy.triton.config import TritonConfig

_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Plan:
    """What one artifact contributes."""

    prefix: str
    view: ArtifactView
    onnx: list[Variant] = field(default_factory=list)
    engines: dict[tuple[str, str], list[Variant]] = field(default_factory=dict)  # (tower, precision) -> plans

    @property
    def root(self) -> Path:
        return self.view.root


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


def collect(cfg: TritonConfig, warnings: list[str], notes: set[str]) -> list[Plan]:
    """Read each artifact and pick the variants to serve; warns about (or notes) those left out and why."""
    onnx_default = precisions.preference(onnx_target(cfg))
    plans = []
    for i, path in enumerate(cfg.artifacts):
        root = Path(path)
        view = ArtifactView.read(root)
        plan = Plan(prefix_for(root, cfg.names[i] if cfg.names else None), view)
        for v in view.variants:
            if cfg.precisions and v.precision not in cfg.precisions:
                continue
            if v.format not in cfg.formats or v.tower not in view.towers:
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
                if precisions.get(v.precision).runs_file_of is not None:  # another file under a backend setting
                    notes.add(f"{v.precision} ONNX variants are left out: they run on "
                              f"{' or '.join(precisions.get(v.precision).backends)} only, not ONNX Runtime")
                    continue
                if cfg.onnx_device == "cpu" and v.precision in INT8_QDQ and not cfg.server_has_vnni:
                    if v.precision in cfg.precisions:
                        raise UsageError(f"--precision {v.precision} on --onnx-device cpu: {CPU_INT8}; pass "
                                         "--server-has-vnni if it has, or serve fp32")
                    notes.add(f"int8 ONNX variants are left out on CPU instances, and fp32 is served instead: "
                              f"{CPU_INT8}; pass --server-has-vnni if it has")
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
CPU_INT8 = (
    "Triton's ONNX Runtime backend cannot set session.x64quantprecision, so on a server CPU without VNNI "
    "(avx512_vnni, avx_vnni or amx_int8) its int8 runs the saturating kernels that fail clipdeploy's int8 gate"
)


def served_towers(plan: Plan) -> set[tuple[str, str]]:
    """(precision, format) pairs a plan serves, counting only towers with one input (as _write_plan does)."""
    one_input = {t for t, facts in plan.view.towers.items() if len(facts.inputs) == 1}
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
        if served_towers(plan):
            continue
        all_variants = [v for v in plan.view.variants if v.tower in plan.view.towers]
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
    served = {p for plan in plans for p, _ in served_towers(plan)}
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


def onnx_target(cfg: TritonConfig) -> str:
    """The ONNX Runtime preference target the served instance kind matches (see PrecisionSpec.preference)."""
    spec = backends.get("onnxruntime")
    device = "cuda" if cfg.onnx_device == "gpu" else "cpu"
    return spec.bench_target(device) if spec.bench_target else spec.name

