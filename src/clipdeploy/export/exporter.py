"""The export stage: open_clip model → validated fp32 ONNX towers + tokenizer + preprocessing + manifest.

All work happens in a temporary directory beside the output. Only when every check passes is it
moved into place, so a failed export (or a failed ``--force`` re-export) leaves any previous good
artifact untouched.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import __version__, precisions, progress
from clipdeploy.calibration.bundled import sample_images, sample_prompts
from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.export.config import MIN_OPSET, ExportConfig
from clipdeploy.export.geometry import TowerGeometry
from clipdeploy.export.loading import LoadedModel, load_model
from clipdeploy.export.onnx_export import ExportedTower, export_tower
from clipdeploy.export.preprocess_assets import describe_preprocess
from clipdeploy.export.specs import SEQUENCE, FamilySpec, TowerSpec, detect_family
from clipdeploy.export.text_towers import TextLayout
from clipdeploy.export.tokenizer_assets import describe_tokenizer
from clipdeploy.artifact.manifest import MANIFEST_NAME, SCHEMA_VERSION, file_sha256, swap_directory, write_manifest
from clipdeploy.runtime.padding import trim_to_pooled
from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor
from clipdeploy.runtime.text import load_tokenizer
from clipdeploy.artifact.staging import artifact_lock, clean_beside, ensure_parent, output_temporaries, reserved, running_jobs
from clipdeploy.artifact.tool_versions import found_versions
from clipdeploy.validation import compare, gate_failures, merge, raise_if_failed

log = logging.getLogger(__name__)

# Batch sizes the parity check runs: 1, and a batch of several so batched kernels are covered too.
PARITY_BATCHES = (1, 8)


def _check_output(output: Path, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise UsageError(f"output {str(output)!r} already exists; pass --force to replace it, or choose another -o")
    is_artifact = (output / MANIFEST_NAME).is_file()
    if not output.is_dir() or not (is_artifact or not any(output.iterdir())):
        raise UsageError(
            f"--force replaces only a clipdeploy artifact, and {str(output)!r} is not one (no {MANIFEST_NAME}); "
            "choose another -o"
        )
    _refuse_if_busy(output)
    lost = replaced_work(output)
    if lost:
        log.warning("clipdeploy: --force replaces %r once the new export passes its checks, and with it %s",
                    str(output), lost)


def _refuse_if_busy(output: Path) -> None:
    """--force must not swap an artifact out from under a quantize that is writing into it."""
    jobs = running_jobs(output)
    if jobs:
        raise UsageError(
            f"--force would replace {str(output)!r} while {'; '.join(jobs)} runs on it; wait for it to finish, "
            "or choose another -o"
        )


def replaced_work(artifact: Path) -> str | None:
    """In words, what ``artifact`` holds that a new export does not write (variants other than the
    reference, TensorRT engines, calibration caches): what ``export --force`` throws away. None if nothing."""
    try:
        manifest = json.loads((artifact / MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = [v for v in manifest.get("variants") or [] if isinstance(v, dict)]
    except (OSError, ValueError, AttributeError):  # unreadable or corrupt: nothing to list
        listed = []
    onnx = sorted({str(v.get("precision")) for v in listed if v.get("format") == "onnx"} - {precisions.REFERENCE},
                  key=precisions.rank)
    engines = sorted(str(v.get("file")) for v in listed if v.get("format") == "tensorrt")
    calibration = sorted(p.name for p in (artifact / "calibration").glob("*")) if (artifact / "calibration").is_dir() else []
    parts = []
    if onnx:
        parts.append(f"its {', '.join(onnx)} variant{'s' if len(onnx) > 1 else ''}")
    if engines:
        parts.append(f"{len(engines)} TensorRT engine{'s' if len(engines) > 1 else ''} ({', '.join(engines)})")
    if calibration:
        parts.append(f"{len(calibration)} calibration file{'s' if len(calibration) > 1 else ''} (calibration/)")
    return ", ".join(parts) if parts else None


# The distributions an artifact records in its manifest's "tools".
_TOOLS = ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy")
# Extra texts for the text tower's length sweep: the shortest text (SOT, EOT) and one that fills the
# whole context, so a dynamic axis is checked at its two ends as well as at every prompt's length.
LENGTH_PROBES = ("", "a photo of " + "a very large and very fluffy orange cat, " * 20)


def _reference_inputs(loaded: LoadedModel) -> tuple[Any, Any, list[Path], list[str]]:
    """Pixels and token ids made by open_clip itself: the reference path users run today.

    Without a tokenizer (hub-only, not supplied), the ids are synthetic ones: valid ids of the
    tower's vocabulary, SOT/EOT-shaped, so the tower is still checked.
    """
    torch = require("torch", "export")
    require("open_clip.transform", "export")
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(PreprocessCfg(**loaded.model.visual.preprocess_cfg), is_train=False)
    images = sample_images()
    prompts = sample_prompts()
    pixels = torch.stack([transform(Image.open(p)) for p in images])
    texts = prompts + list(LENGTH_PROBES)
    if loaded.tokenizer is not None:
        tokens = loaded.tokenizer(texts)
    else:
        tokens = _synthetic_ids(loaded.geometry, len(texts))
    return pixels, tokens, images, prompts


def _synthetic_ids(geometry: TowerGeometry, rows: int) -> Any:
    """Token ids of varied lengths, valid for the tower's vocabulary, padded as the tokenizer would."""
    torch = require("torch", "export")

    layout, length, vocab = geometry.text, geometry.context_length, geometry.vocab_size or 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.full((rows, length), layout.pad_id or 0, dtype=torch.int64)
    for i in range(rows):
        n = 2 + (i * 5) % (length - 1)
        ids[i, :n] = torch.randint(3, max(vocab - 1, 4), (n,), generator=g)
        if layout.eos_id is not None:
            ids[i, n - 1] = layout.eos_id  # "eos" pooling reads the first eos: put it where a tokenizer would
    return ids


def _torch_references(
    model: Any, specs: tuple[TowerSpec, ...], inputs: dict[str, Any], *, original: Any = None
) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch outputs for every parity check, per tower: the whole sample set ("full"), each parity
    batch smaller than it ("batch N"), and the whole set through ``original`` when there is one.

    Computed before export, so the PyTorch weights can be released once their tower is traced: a
    3.6B-parameter model (bigG-worldwide, 14.5 GB) and a 7 GB ONNX Runtime session do not fit in 24 GB
    together.
    """
    torch = require("torch", "export")

    refs: dict[str, dict[str, np.ndarray]] = {}
    with torch.inference_mode():
        for spec in specs:
            full = inputs[spec.tower]
            encode = getattr(model, spec.method)
            tower = {"full": encode(full).float().numpy()}
            for batch in PARITY_BATCHES:
                if len(full) < batch:
                    raise UsageError(f"parity data has {len(full)} {spec.tower} samples, fewer than the batch {batch}")
                if batch < len(full):
                    tower[f"batch {batch}"] = encode(full[:batch]).float().numpy()
            if original is not None:
                tower["original"] = getattr(original, spec.method)(full).float().numpy()
            refs[spec.tower] = tower
    return refs


def _release_weights(module: Any) -> None:
    """Free a module's parameters and buffers; its structure and attributes stay readable."""
    import gc

    module.to("meta")
    gc.collect()


def _check_towers(
    exported: dict[str, ExportedTower],
    inputs: dict[str, Any],
    refs: dict[str, dict[str, np.ndarray]],
    text: TextLayout,
) -> tuple[dict[str, Any], list[str]]:
    """ONNX Runtime CPU against the PyTorch references, at each parity batch size, per tower.

    A dynamic-length text tower is also run on the same ids trimmed to each batch's longest text
    and to each text's own length, all against PyTorch on the full-length ids. A reference named
    "original" is the model before ``FamilySpec.prepare`` (reparameterization); the ONNX is checked
    against it too.
    """
    ort = require("onnxruntime", "cpu")

    report: dict[str, Any] = {}
    failures: list[str] = []
    for tower, ex in exported.items():
        session = ort.InferenceSession(str(ex.path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run([ex.spec.output_name], {ex.spec.input_name: x})[0]  # noqa: E731
        full, ref = inputs[tower], refs[tower]
        sweep = _length_sweep(text, run, full.numpy(), ref["full"]) if SEQUENCE in ex.input.shape else None
        per_batch, comps = {}, []
        for batch in PARITY_BATCHES:
            c = compare(run(full[:batch].numpy()), ref.get(f"batch {batch}", ref["full"]))
            per_batch[str(batch)] = c.to_dict()
            comps.append(c)
        entry: dict[str, Any] = {"batches": per_batch}
        if sweep is not None:
            entry["lengths"], length_comps = sweep
            comps += length_comps
        tolerance = {"min_cosine": ex.spec.tolerance.min_cosine, "max_abs_rel": ex.spec.tolerance.max_abs_rel}
        worst = merge(comps)
        tower_failures = gate_failures(f"{tower} tower", worst, **tolerance)
        if "original" in ref:
            c = compare(run(full.numpy()), ref["original"])
            entry["original"] = c.to_dict()
            tower_failures += gate_failures(f"{tower} tower vs the original (unprepared) model", c, **tolerance)
        failures += tower_failures
        report[tower] = {**worst.to_dict(), **entry, "tolerance": tolerance, "passed": not tower_failures}
        # Release this tower's weights before the next session loads its own.
        del run, session
    return report, failures


def _length_sweep(layout: TextLayout, run: Any, ids: np.ndarray, ref: np.ndarray) -> tuple[dict[str, Any], list[Any]]:
    """A dynamic text tower on trimmed ids, against PyTorch on the full-length ids.

    Each text alone at its own length (from SOT+EOT up to the whole context), and batches of 8 and
    of all texts padded only to their longest text.
    """
    trim = lambda x: trim_to_pooled(x, layout.pooling, layout.eos_id)  # noqa: E731
    own = [trim(ids[i : i + 1]) for i in range(len(ids))]
    each = compare(np.concatenate([run(x) for x in own]), ref)
    batches = {}
    comps = [each]
    for rows in (8, len(ids)):
        x = trim(ids[:rows])
        c = compare(run(x), ref[:rows])
        batches[f"batch {rows} at length {x.shape[1]}"] = c.to_dict()
        comps.append(c)
    report = {
        "reference": f"PyTorch encode_text on ids padded to {ids.shape[1]}",
        "own_lengths": sorted({int(x.shape[1]) for x in own}),
        "each_text_at_its_own_length": each.to_dict(),
        **batches,
    }
    return report, comps


def _check_runtime_inputs(
    artifact_dir: Path, manifest: dict[str, Any], pixels: Any, tokens: Any, images: list[Path], prompts: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """The torch-free preprocessing and tokenizer must reproduce open_clip's on this very model."""
    # ``manifest`` is the one this export is writing (not yet on disk): its entries are read as written.
    failures = []
    ours = Preprocessor(PreprocessConfig.from_dict(manifest["preprocess"]))(images)
    pixel_diff = float(np.abs(ours - pixels.numpy()).max())
    if not pixel_diff <= 1e-5:
        failures.append(f"runtime preprocessing differs from open_clip by {pixel_diff:.3e} > 1e-5")
    report: dict[str, Any] = {
        "preprocess": {"images": len(images), "max_abs_diff": pixel_diff, "passed": pixel_diff <= 1e-5},
    }
    if manifest["tokenizer"].get("missing"):
        report["tokenizer"] = {"texts": 0, "mismatched": 0, "passed": None, "missing": True}
        return report, failures
    texts = prompts + list(LENGTH_PROBES)
    ids = load_tokenizer(manifest["tokenizer"], artifact_dir)(texts)
    ref = tokens.numpy()
    mismatched = len(texts) if ids.shape != ref.shape else int((ids != ref).any(axis=1).sum())
    if mismatched:
        failures.append(f"runtime tokenizer differs from open_clip on {mismatched} of {len(texts)} texts")
    report["tokenizer"] = {"texts": len(texts), "mismatched": mismatched, "passed": mismatched == 0}
    return report, failures


def _variant_entry(ex: ExportedTower, root: Path, opset: int, validation: dict[str, Any]) -> dict[str, Any]:
    return {
        "tower": ex.spec.tower,
        "precision": precisions.REFERENCE,
        "format": "onnx",
        "file": ex.path.name,
        "sha256": file_sha256(ex.path),
        "bytes": ex.path.stat().st_size + sum(p.stat().st_size for p in ex.external_data),
        "external_data": [{"file": p.relative_to(root).as_posix(), "sha256": file_sha256(p)} for p in ex.external_data],
        "opset": opset,
        "export_seconds": round(ex.seconds, 2),
        "validation": validation,
    }


def _logit_terms(model: Any) -> tuple[float, float | None]:
    torch = require("torch", "export")

    with torch.no_grad():
        scale = float(model.logit_scale.exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        return scale, (float(bias.reshape(-1)[0]) if bias is not None else None)


def _build(cfg: ExportConfig, work: Path) -> dict[str, Any]:
    with progress.stage(f"building {cfg.model}"):
        loaded = load_model(
            cfg.model,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            model_config=cfg.model_config,
            seed=cfg.seed,
            tokenizer_dir=cfg.tokenizer_dir,
            depth=cfg.depth,
        )
    family: FamilySpec = detect_family(loaded.model)
    model, original = loaded.model, None
    if family.prepare is not None:
        model, original = family.prepare(loaded.model), loaded.model
    geometry = loaded.geometry
    # Describe the tokenizer first: an unsupported kind should fail before minutes of tracing.
    tokenizer_entry = describe_tokenizer(
        loaded.tokenizer, work, missing=loaded.tokenizer_missing, context_length=geometry.context_length
    )
    if loaded.hf_tokenizer_name and tokenizer_entry["kind"] != "openclip-bpe":
        tokenizer_entry["hf_tokenizer_name"] = loaded.hf_tokenizer_name
    preprocess_entry = describe_preprocess(loaded.model)

    pixels, tokens, images, prompts = _reference_inputs(loaded)
    inputs = {"image": pixels, "text": tokens}
    with progress.stage("PyTorch reference outputs"):
        refs = _torch_references(model, family.towers, inputs, original=original)
    dims = {tower: int(ref["full"].shape[-1]) for tower, ref in refs.items()}
    logit_scale, logit_bias = _logit_terms(loaded.model)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    tower_entries = {spec.tower: spec.manifest_entry(geometry, dims[spec.tower]) for spec in family.towers}
    if original is not None:
        _release_weights(original)  # its outputs are in refs
    exported = {}
    for spec in family.towers:
        with progress.stage(f"tracing the {spec.tower} tower to ONNX"):
            exported[spec.tower] = export_tower(
                spec, model, geometry, work / f"{spec.tower}.fp32.onnx", opset=cfg.opset
            )
        if spec.tower == "image":
            _release_weights(model.visual)  # traced and referenced: only the text tower still needs weights
    _release_weights(model)  # from here on, ONNX Runtime holds the weights
    with progress.stage("checking the ONNX towers against PyTorch") as step:
        tower_report, failures = _check_towers(exported, inputs, refs, geometry.text)
        step.note("pass" if not failures else f"{len(failures)} failed")
    source = {k: v for k, v in loaded.source.items() if k != "model_config"}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": cfg.model,
            **source,
            "model_config": loaded.source.get("model_config"),
            "family": family.name,
            "prepared": family.prepare.__name__ if family.prepare is not None else None,
            "reduced_depth": cfg.depth,
            "embed_dim": dims["image"],
            # logit_scale is the multiplier (exp already applied); logit_bias is None except for SigLIP.
            "logit_scale": logit_scale,
            "logit_bias": logit_bias,
            "parameters": parameters,
        },
        "towers": tower_entries,
        "preprocess": preprocess_entry,
        "tokenizer": tokenizer_entry,
        "variants": [],
        "validation": {},
        "tools": {"clipdeploy": __version__, **found_versions(*_TOOLS)},
    }
    with progress.stage("checking runtime preprocessing and tokenizer") as step:
        runtime_report, runtime_failures = _check_runtime_inputs(work, manifest, pixels, tokens, images, prompts)
        step.note("pass" if not runtime_failures else f"{len(runtime_failures)} failed")
    failures += runtime_failures
    # The writer: the keys below are what this export records (readers use artifact.view.ArtifactView).
    manifest["validation"]["export"] = {
        "reference": "open_clip PyTorch fp32 on CPU",
        "backend": "onnxruntime CPUExecutionProvider",
        "images": [p.name for p in images],
        "prompts": len(prompts),
        "batches": list(PARITY_BATCHES),
        **tower_report,
        **runtime_report,
        "passed": not failures,
    }
    manifest["variants"] = [
        _variant_entry(ex, work, cfg.opset, {"reference": "pytorch-fp32", **tower_report[t]})
        for t, ex in exported.items()
    ]
    # Every other file the runtime reads (tokenizer files), with its checksum.
    listed = {v["file"] for v in manifest["variants"]} | {
        e["file"] for v in manifest["variants"] for e in v["external_data"]
    }
    manifest["files"] = {
        rel: file_sha256(p)
        for p in sorted(work.rglob("*"))
        if p.is_file() and (rel := p.relative_to(work).as_posix()) not in listed and rel != MANIFEST_NAME
    }
    raise_if_failed(f"export parity check of {cfg.model}", failures, manifest["validation"]["export"])
    write_manifest(work, manifest)
    return manifest


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Export both towers of ``cfg.model`` to validated fp32 ONNX in ``cfg.output``; returns the manifest."""
    output = Path(cfg.output)
    if cfg.opset < MIN_OPSET:
        raise UsageError(f"--opset {cfg.opset} is too old: LayerNormalization needs opset {MIN_OPSET} or higher")
    # Missing parents are made (mkdir -p); what a killed export left beside the output goes first,
    # so that a half-swapped previous artifact is back before it is checked.
    ensure_parent(output)
    clean_beside(output)
    _check_output(output, cfg.force)
    start = time.perf_counter()
    with reserved(output.parent, output_temporaries(output)[0]) as work:
        manifest = _build(cfg, work)
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        write_manifest(work, manifest)
        _swap_in(work, output)
    return manifest


def _swap_in(work: Path, output: Path) -> None:
    """Put the new artifact in place; an existing one is swapped out under its lock (a stage writing
    its manifest finishes first), and not while a quantize is running on it."""
    if not output.is_dir():
        swap_directory(work, output)
        return
    with artifact_lock(output):
        _refuse_if_busy(output)
        swap_directory(work, output)
