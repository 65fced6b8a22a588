"""Helpers for the Triton tests: artifacts with stand-in engines, Triton's own config parser, the ensemble runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from clipdeploy.artifact.manifest import file_sha256, read_manifest, write_manifest

SIM = Path(__file__).resolve().parents[1] / "triton" / "ensemble_sim.py"  # a script, run beside its stub/


def copy_artifact(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def add_engine(
    root: Path,
    tower: str,
    precision: str = "fp16",
    cc: str = "9.0",
    version: str = "10.13.3",
    batch: tuple[int, int, int] = (1, 8, 32),
    hardware: str = "none",
    version_compatible: bool = False,
    validated: bool = True,
    seq_max: int | None = None,
) -> str:
    """A manifest entry for an engine, with a stand-in plan file (Triton configs never read its bytes)."""
    manifest = read_manifest(root)
    (spec,) = manifest["towers"][tower]["inputs"]
    target = "ampere-plus" if hardware == "ampere-plus" else f"sm{cc.replace('.', '')}"
    rel = f"engines/{tower}.{precision}.{target}.trt{version}{'-vc' if version_compatible else ''}.plan"
    (root / "engines").mkdir(exist_ok=True)
    (root / rel).write_bytes(f"stand-in plan {rel}".encode())
    lo, opt, hi = batch
    dims = [d if isinstance(d, int) else (seq_max or 77) for d in spec["shape"][1:]]
    entry = {
        "tower": tower, "precision": precision, "format": "tensorrt", "file": rel, "sha256": file_sha256(root / rel),
        "bytes": (root / rel).stat().st_size, "source": f"{tower}.fp32.onnx", "tensorrt_version": version,
        "gpu": "NVIDIA H100" if cc == "9.0" else "NVIDIA A100", "compute_capability": cc,
        "profile": {spec["name"]: {"min": [lo, *[1 if isinstance(d, str) else d for d in spec["shape"][1:]]],
                                   "opt": [opt, *dims], "max": [hi, *dims]}},
        "hardware_compatibility": hardware, "version_compatible": version_compatible,
        "validation": {"passed": True, "min_cosine": 0.9999} if validated else {},
    }  # fmt: skip
    manifest["variants"].append(entry)
    write_manifest(root, manifest)
    return rel


def add_onnx_copy(root: Path, tower: str, precision: str) -> str:
    """A reduced-precision ONNX variant entry (a copy of fp32: the configs do not depend on the weights)."""
    manifest = read_manifest(root)
    rel = f"{tower}.{precision}.onnx"
    shutil.copyfile(root / f"{tower}.fp32.onnx", root / rel)
    manifest["variants"].append(
        {
            "tower": tower,
            "precision": precision,
            "format": "onnx",
            "file": rel,
            "sha256": file_sha256(root / rel),
            "external_data": [],
            "validation": {"passed": True, "min_cosine": 1.0},
        }
    )
    write_manifest(root, manifest)
    return rel


def parse_config(path: Path):
    """A config.pbtxt parsed by Triton's own model-config protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(encoding="utf-8"), config)
    return config


def all_configs(repo: Path) -> dict[str, object]:
    return {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def run_ensemble(repo: Path, ensemble: str, requests: list[list[str]], tmp: Path) -> dict[str, np.ndarray]:
    """Run an ensemble in a fresh process with ensemble_sim.py; returns its arrays and facts."""
    request = tmp / f"{ensemble}.request.json"
    request.write_text(json.dumps({"requests": [[str(x) for x in r] for r in requests]}), encoding="utf-8")
    out = tmp / f"{ensemble}.out.npz"
    proc = subprocess.run(
        [sys.executable, str(SIM), str(repo), ensemble, str(request), str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["facts"] = json.loads(str(arrays["facts"]))
    return arrays
