"""Helpers for the pipeline tests (used by conftest.py and the tests): configs in a temporary folder,
and fast stand-ins for stage work.

The stand-ins replace only ``run`` of each stage. Keys (hashes of the real checkpoint, calibration
images and config values), the current-or-not checks and the state file are the real ones, so the
incremental tests prove the real decisions. The stand-ins write real artifacts: a manifest whose
variants point at files whose content depends on what the real stage would depend on.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from clipdeploy.errors import AccuracyError, CheckpointError
from clipdeploy.artifact.manifest import SCHEMA_VERSION, file_sha256, read_manifest, write_manifest
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.pipeline import stages
from clipdeploy.pipeline.stages import Result, describe_files

IMAGES = Path(__file__).resolve().parents[2] / "src" / "clipdeploy" / "data" / "images"


def write_config(tmp: Path, body: str, name: str = "pipeline.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def calib_dir(tmp: Path, name: str = "calib") -> Path:
    """A private copy of the bundled photos, free to change."""
    out = tmp / name
    out.mkdir()
    for p in sorted(IMAGES.glob("*.jpg")):
        (out / p.name).write_bytes(p.read_bytes())
    return out


class FakeStages:
    """Stand-in ``run`` methods; counts the units that really ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []  # (model name, unit id)
        self.interrupt: str | None = None  # unit id whose run is killed half-way

    def _file(self, root: Path, rel: str, content: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")

    def export(self, unit, ctx):
        cfg = ctx.plan.export
        self.ran.append((ctx.plan.name, unit.id))
        weights = file_sha256(cfg.checkpoint) if cfg.checkpoint else f"seed{cfg.seed}"
        if cfg.checkpoint is not None and Path(cfg.checkpoint).read_bytes().startswith(b"garbage"):
            raise CheckpointError(f"checkpoint {str(cfg.checkpoint)!r} is corrupt or not a PyTorch checkpoint")
        root = Path(cfg.output)
        if root.exists():  # export --force replaces the whole artifact
            import shutil

            shutil.rmtree(root)
        root.mkdir(parents=True)
        entries = []
        for tower in ("image", "text"):
            rel = f"{tower}.fp32.onnx"
            self._file(root, rel, f"{cfg.model} {tower} fp32 {weights} opset{cfg.opset}")
            entries.append(
                {
                    "tower": tower,
                    "precision": "fp32",
                    "format": "onnx",
                    "file": rel,
                    "sha256": file_sha256(root / rel),
                    "validation": {"passed": True, "min_cosine": 1.0},
                }
            )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            # The keys read_manifest's schema requires, with stand-in values.
            "model": {"name": cfg.model, "embed_dim": 8, "logit_scale": 100.0},
            "towers": {
                t: {
                    "inputs": [{"name": f"{t}_in", "dtype": "float32", "shape": ["batch", 8]}],
                    "outputs": [{"name": f"{t}_embeds", "dtype": "float32", "shape": ["batch", 8]}],
                }
                for t in ("image", "text")
            },
            "preprocess": {
                "size": [8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
            },  # fmt: skip
            "tokenizer": {"kind": "openclip-bpe"},
            "variants": entries,
            "files": {},
            "validation": {"export": {t: {"min_cosine": 1.0, "max_abs_err": 1e-6} for t in ("image", "text")}},
        }
        write_manifest(root, manifest)
        rels = [f"artifact/{e['file']}" for e in entries]
        return Result(describe_files(ctx.plan.root, rels, ArtifactView.of(root, manifest)), {"vs_pytorch": manifest["validation"]["export"]})

    def _add_variant(self, ctx, unit, fmt: str, rel: str, content: str, accepted: bool = True) -> Result:
        root = ctx.plan.artifact
        if self.interrupt == unit.id:
            self._file(root, rel, "half-written")
            raise KeyboardInterrupt
        self._file(root, rel, content)
        manifest = read_manifest(root)
        manifest["variants"] = [v for v in manifest["variants"] if v["file"] != rel] + [
            {
                "tower": "image",
                "precision": unit.precision,
                "format": fmt,
                "file": rel,
                "sha256": file_sha256(root / rel),
                "validation": {"passed": accepted} if fmt == "onnx" else {},
            }
        ]
        write_manifest(root, manifest)
        return Result(describe_files(ctx.plan.root, [f"artifact/{rel}"], ArtifactView.of(root, manifest)), {})

    def quantize(self, unit, ctx):
        cfg = ctx.plan.quantize[unit.precision]
        self.ran.append((ctx.plan.name, unit.id))
        if cfg.min_mean_cosine is not None and cfg.min_mean_cosine >= 1:
            raise AccuracyError(
                f"{unit.precision} gate failed: image mean cosine 0.99 < {cfg.min_mean_cosine}",
                report={"image": {"min_cosine": 0.98, "mean_cosine": 0.99}, "failures": ["image"]},
            )
        fp32 = read_manifest(ctx.plan.artifact)["variants"][0]["sha256"]
        calib = sorted(file_sha256(p) for d in cfg.calib_images for p in Path(d).rglob("*.jpg"))
        content = json.dumps([fp32, calib, cfg.samples, cfg.holdout, cfg.method])
        result = self._add_variant(ctx, unit, "onnx", f"image.{unit.precision}.onnx", content)
        result.figures = {"image": {"min_cosine": 0.9995, "mean_cosine": 0.9998}}
        return result

    def build(self, unit, ctx):
        cfg = ctx.plan.build[unit.precision]
        self.ran.append((ctx.plan.name, unit.id))
        source = next(
            v["sha256"]
            for v in read_manifest(ctx.plan.artifact)["variants"]
            if v["precision"] == unit.precision and v["format"] == "onnx"
        )
        rel = f"engines/image.{unit.precision}.sm90.trt10.13.3.plan"
        result = self._add_variant(ctx, unit, "tensorrt", rel, json.dumps([source, list(cfg.batch)]))
        result.figures = {"engines": 1, "megabytes": 0.0, "seconds": 0.0, "gpu": "Fake GPU", "tensorrt": "10.13.3"}
        return result

    def validate(self, unit, ctx):
        self.ran.append((ctx.plan.name, unit.id))
        record = ctx.state.get(f"build:{unit.precision}")
        files = [rel.split("/", 1)[1] for rel in record["outputs"]]
        manifest = read_manifest(ctx.plan.artifact)
        for v in manifest["variants"]:
            if v["file"] in files:
                v["validation"] = {"passed": True, "min_cosine": 0.9999}
        write_manifest(ctx.plan.artifact, manifest)
        return Result(
            describe_files(ctx.plan.root, [f"artifact/{f}" for f in files], ArtifactView.of(ctx.plan.artifact, manifest)),
            {"engines": {f: {"min_cosine": 0.9999, "passed": True} for f in files}},
        )

    def bench(self, unit, ctx):
        self.ran.append((ctx.plan.name, unit.id))
        out = Path(ctx.plan.bench.output)
        variants = sorted((v["file"], v["sha256"]) for v in read_manifest(ctx.plan.artifact)["variants"])
        self._file(out, "bench.json", json.dumps({"records": [], "variants": variants}))
        return Result(
            describe_files(ctx.plan.root, [str((out / "bench.json").relative_to(ctx.plan.root))]),
            {"batch": 8, "best": {}, "records": 0},
        )

    def units(self, model: str | None = None) -> list[str]:
        return [u for m, u in self.ran if model is None or m == model]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str = "Fake H100", version: str = "10.13.3") -> None:
    """Make build and validate see a GPU and TensorRT (their work stays faked)."""
    monkeypatch.setattr(
        stages,
        "tensorrt_target",
        lambda device: {"tensorrt": version, "gpu": name, "compute_capability": "9.0", "cuda_python": "12.9"},
    )
