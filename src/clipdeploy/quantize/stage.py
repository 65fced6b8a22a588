"""The `quantize` stage: fp32 ONNX towers → a variant of each registered precision, gated on held-out data.

The stage reads the data, calls the precision's make step (``PrecisionSpec.make``, a
``quantize.make.MakeStep``) for each tower, gates the result on the precision's gate backend and
records it. A variant that misses its gate is refused: no accepted variant is written, the figures are
printed and recorded, and the command fails. Calibrated precisions first try to recover by themselves,
within a bound.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions, progress
from clipdeploy.calibration import dataset, sources
from clipdeploy.deps import require
from clipdeploy.errors import AccuracyError, ArtifactError, CalibrationError, UsageError
from clipdeploy.artifact.manifest import Variant, file_sha256, read_manifest, updating_manifest, variants
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.quantize import gate, graph, int8, recovery
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.quantize.gate import Reference
from clipdeploy.quantize.make import CALIB_BATCH, MakeRequest
from clipdeploy.runtime.backends import registry
from clipdeploy.runtime.backends.base import Runner
from clipdeploy.runtime.padding import trim_to_pooled
from clipdeploy.runtime.session import load
from clipdeploy.artifact.staging import clean_stale, clean_stale_writes, job_lock, reserved
from clipdeploy.validation import cosine_rows

log = logging.getLogger(__name__)

__all__ = ["QuantizeConfig", "QuantizeRun", "quantize", "check_environment"]

QUANTIZE_PREFIX = ".quantize-"  # the stage's temporary directory inside the artifact
RANK_TYPICAL = 16  # recovery ranks nodes on the first calibration samples ...
RANK_WORST = 8  # ... and on those the plain int8 variant gets most wrong, so worst cases count


class QuantizeRun:
    """One run of the stage; holds the data so that recovery rounds reuse it."""

    def __init__(self, cfg: QuantizeConfig) -> None:
        self.cfg = cfg
        self.spec = precisions.get(cfg.precision)
        self.keep_by_tower: dict[str, list[str]] = {}  # --keep-node names found in each tower's graph
        self.root = Path(cfg.artifact)
        self.manifest = read_manifest(self.root)
        self.view = ArtifactView.of(self.root, self.manifest)
        existing = [v for v in self.view.variants if v.precision == cfg.precision and v.format == "onnx"]
        if existing and not cfg.force:
            raise UsageError(
                f"{self.root} already has a {cfg.precision} variant ({existing[0].file}); pass --force to replace it"
            )
        self.session = load(
            self.root, backend="onnxruntime", precision=precisions.REFERENCE, intra_op_num_threads=cfg.threads
        )
        self.towers = list(self.session.variants)
        self.fp32 = self.session.variants
        # What each tower's variant is made from: the fp32 file, or the file of the precision it runs.
        self.sources: dict[str, Variant] = self.fp32
        if self.spec.runs_file_of not in (None, precisions.REFERENCE):
            self.sources = {t: registry.select_variant(self.manifest, t, "onnx", self.spec.runs_file_of, ())
                            for t in self.towers}
        self.qdq: dict[str, Path] = {}  # tower -> its plain (unrecovered) QDQ graph, which recovery ranks nodes on

    # ---- data ------------------------------------------------------------------------------

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.calib_images:
            raise CalibrationError(
                "quantize needs real images to calibrate and gate on: pass --calib-images FOLDER or SHARD.tar "
                "(a few hundred photos of the kind you will embed)"
            )
        self.images = dataset.image_set(
            sources.list_images(cfg.calib_images), self.session.preprocess,
            calibration=cfg.samples, held_out=cfg.holdout, seed=cfg.seed, min_calibration=cfg.min_samples,
        )
        texts = sources.read_texts(cfg.calib_texts) if cfg.calib_texts else sources.builtin_texts()
        self.texts = dataset.text_set(
            texts, self.session.tokenize,
            calibration=cfg.samples, held_out=cfg.holdout, seed=cfg.seed, min_calibration=cfg.min_samples,
        )
        prompts = sources.read_texts(cfg.gate_prompts) if cfg.gate_prompts else sources.imagenet_prompts()
        if len(prompts) < 2:
            raise CalibrationError(f"--gate-prompts has {len(prompts)} prompt; top-1 needs at least 2 classes")
        # The gate runs text as the runtime does: a dynamic-length tower gets ids padded only to the
        # longest text, which gives the same embeddings (proven at export) at a fraction of the cost
        # (1000 ImageNet prompts need about 20 of the 77 positions).
        text = self.view.tower("text")
        padding = "longest" if text.dynamic_length else "max_length"
        self.prompt_ids = self.session.tokenize(prompts, padding=padding)
        self.prompt_source = str(cfg.gate_prompts) if cfg.gate_prompts else "imagenet-1k 'a photo of a {}.'"
        self.sets = {"image": self.images, "text": self.texts}
        self.held_out = {t: self.sets[t].held_out for t in self.towers}
        if padding == "longest":
            self.held_out["text"] = trim_to_pooled(self.texts.held_out, text.pooling, text.eos_token_id)
        runners = self.session.runners
        self.reference = Reference(
            image=gate.run(runners["image"], self.held_out["image"]),
            text=gate.run(runners["text"], self.held_out["text"]),
            prompts=gate.run(runners["text"], self.prompt_ids),
        )
        self.enforce_top1 = self.view.model.random_init_seed is None

    # ---- building ----------------------------------------------------------------------------

    def request(self, tower: str, work: Path, exclude: list[str] | tuple[str, ...] = (), suffix: str = "") -> MakeRequest:
        """What the make step gets for ``tower`` (calibration data only: the held-out set stays unseen)."""
        source = self.sources[tower]
        return MakeRequest(
            tower=tower, source=self.root / source.file, source_sha256=source.sha256,
            out=work / f"{tower}.{self.cfg.precision}{suffix}.onnx", work=work, artifact=self.root,
            cfg=self.cfg, calibration=self.sets[tower].calibration,
            input_name=self.session.runners[tower].inputs[0].name, fingerprint=self.sets[tower].fingerprint,
            exclude=tuple(exclude), suffix=suffix,
        )

    def prepared(self, tower: str, work: Path) -> Path:
        return int8.prepared(self.request(tower, work))

    def requested_keep(self, tower: str, work: Path) -> list[str]:
        """The --keep-node names that are quantizable nodes of ``tower`` (read once per tower)."""
        if tower not in self.keep_by_tower:
            wanted = self.cfg.keep_node_names()
            present = set(int8.quantizable_nodes(graph.load(self.prepared(tower, work)))) if wanted else set()
            self.keep_by_tower[tower] = [n for n in wanted if n in present]
        return self.keep_by_tower[tower]

    def check_keep_nodes(self, work: Path) -> dict[str, list[str]]:
        """Every --keep-node name must be a quantizable node of some tower: a typo must not pass silently."""
        kept = {t: self.requested_keep(t, work) for t in self.towers}
        unknown = [n for n in self.cfg.keep_node_names() if not any(n in k for k in kept.values())]
        if unknown:
            raise UsageError(
                f"--keep-node {unknown[0]!r} is not a MatMul/Gemm/Conv node of the "
                f"{' or '.join(self.towers)} tower; take names from `clipdeploy manifest` "
                "(recovery.kept_in_higher_precision) or Polygraphy's report"
            )
        return {t: k for t, k in kept.items() if k}

    def build(self, tower: str, work: Path, exclude: list[str], suffix: str = "") -> tuple[Path, dict[str, Any]]:
        """Make ``tower``'s variant through the precision's make step; returns the file the gate runs."""
        exclude = list(dict.fromkeys([*self.requested_keep(tower, work), *exclude]))
        req = self.request(tower, work, exclude, suffix)
        for stale in work.glob(req.out.name + "*"):
            stale.unlink()
        made = self.spec.make_step()(req)
        if made.qdq is not None and not suffix:
            self.qdq[tower] = made.qdq
        if self.spec.runs_file_of is not None:  # nothing written: the gate runs that file on its backend
            return req.source, made.info
        graph.check(req.out)
        return req.out, made.info

    def runner(self, path: Path) -> Runner:
        """``path`` as the precision's gate backend runs it (its settings for the precision included)."""
        settings = registry.LoadSettings(intra_op_num_threads=self.cfg.threads)
        return registry.open_file(self.spec.gate_backend, path, self.spec.name, settings)

    def evaluate(self, paths: dict[str, Path]) -> dict[str, Any]:
        runners = {t: self.runner(p) for t, p in paths.items()}
        return gate.evaluate(
            self.reference, runners, self.held_out, self.prompt_ids, self.cfg.thresholds(),
            enforce_top1=self.enforce_top1, sample_ids={t: self.sets[t].held_out_ids for t in self.towers},
        )

    def latency(self, path: Path, tower: str, iters: int = 5) -> float:
        """Median seconds of one held-out batch of 8, for the recovery's speed report."""
        runner = self.runner(path)
        x = self.held_out[tower][:CALIB_BATCH]
        feed = {runner.inputs[0].name: x}
        runner.infer(feed)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    # ---- recovery ----------------------------------------------------------------------------

    def ranking_feeds(self, tower: str, plain: Path) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
        """One-sample feeds for ranking nodes: typical calibration samples plus the worst ones end to end.

        Calibration data only: the held-out set stays unseen by every choice it then judges."""
        x = self.sets[tower].calibration
        fp32 = self.session.runners[tower]
        cos = cosine_rows(gate.run(self.runner(plain), x), gate.run(fp32, x))
        worst = [int(i) for i in np.argsort(cos, kind="stable")[:RANK_WORST]]
        picked = list(dict.fromkeys([*range(min(RANK_TYPICAL, len(x))), *worst]))
        name = fp32.inputs[0].name
        info = {"feeds": len(picked), "worst_calibration_cosines": [round(float(cos[i]), 6) for i in worst]}
        return [{name: x[i : i + 1]} for i in picked], info

    def recover(self, work: Path, paths: dict[str, Path], report: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
        cfg = self.cfg
        failing = [t for t in self.towers if any(f.startswith(t) for f in report["failures"])]
        if not failing or any(f.startswith("top-1") for f in report["failures"]):
            failing = sorted(set(failing) | set(self.towers))
        ranked: dict[str, list[tuple[str, float]]] = {}
        bounds: dict[str, int] = {}
        ranking: dict[str, Any] = {}
        for tower in failing:
            qdq = self.qdq[tower]
            feeds, ranking[tower] = self.ranking_feeds(tower, paths[tower])
            with progress.stage(f"recovery: ranking the {tower} tower's nodes by their error"):
                ranked[tower] = recovery.rank_nodes(qdq, self.prepared(tower, work), feeds)
            bounds[tower] = recovery.bound_for(len(int8.quantizable_nodes(graph.load(self.prepared(tower, work)))),
                                               cfg.max_fp32_fraction)
        rounds: list[dict[str, Any]] = []
        steps = recovery.schedule(max(bounds.values(), default=0), cfg.max_rounds)
        for k in progress.bar(steps, "recovery rounds", unit="round"):
            current = dict(paths)
            for tower in failing:
                keep = [name for name, _ in ranked[tower][: min(k, bounds[tower])]]
                current[tower], _ = self.build(tower, work, keep, suffix=f".r{k}")
            result = self.evaluate(current)
            rounds.append({
                "kept_per_tower": {t: min(k, bounds[t]) for t in failing},
                "passed": result["passed"],
                "failures": result["failures"],
                **{t: result[t] for t in self.towers},
                **({"top1_agreement": result["top1_agreement"]} if "top1_agreement" in result else {}),
            })
            log.info("recovery round keeping %d nodes: %s", k, "pass" if result["passed"] else result["failures"])
            if result["passed"]:
                kept = {
                    t: recovery.describe(ranked[t], min(k, bounds[t]), recovery.module_scopes(self.root / self.fp32[t].file))
                    for t in failing
                }
                speed = {
                    t: {"plain_int8_s": self.latency(paths[t], t), "recovered_s": self.latency(current[t], t)}
                    for t in failing
                }
                for s in speed.values():
                    s["slowdown"] = s["recovered_s"] / s["plain_int8_s"]
                info = {"rounds": rounds, "kept_in_higher_precision": kept, "ranking": ranking,
                        "quantizable_nodes_bound": bounds, "speed_cost_batch8": speed}
                return current, {**result, "recovery": info}
        info = {"rounds": rounds, "quantizable_nodes_bound": bounds, "ranking": ranking,
                "exhausted": f"the gate still fails with up to {max(bounds.values(), default=0)} nodes "
                f"({cfg.max_fp32_fraction:.0%} of quantizable) kept in higher precision"}
        return paths, {**report, "recovery": info}

    # ---- the whole stage ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        with progress.stage("reading calibration and held-out data"):
            self.load_data()
        # A killed quantize leaves its ~model-sized temporary inside the artifact: the next one removes it.
        clean_stale(self.root, (QUANTIZE_PREFIX,))
        clean_stale_writes(self.root)
        with reserved(self.root, QUANTIZE_PREFIX) as work:
            paths, infos = {}, {}
            requested = self.check_keep_nodes(work) if cfg.keep_nodes else {}
            for tower in self.towers:
                with progress.stage(f"{cfg.precision} {tower} tower"):
                    paths[tower], infos[tower] = self.build(tower, work, [])
            with progress.stage(f"{cfg.precision} gate on held-out data") as step:
                report = self.evaluate(paths)
                step.note("pass" if report["passed"] else "; ".join(report["failures"]))
            calibrated = self.spec.calibrated
            if not report["passed"] and calibrated and cfg.recover:
                log.warning("%s misses its gate (%s); trying recovery", cfg.precision, "; ".join(report["failures"]))
                paths, report = self.recover(work, paths, report)
            report.update({
                "reference": f"{precisions.REFERENCE} onnx on onnxruntime CPU",
                "variant_backend": self.spec.gate_backend,
                "method": cfg.method if calibrated else None,
                "data": {"image": self.images.report(), "text": self.texts.report(), "seed": cfg.seed,
                         "gate_prompts": self.prompt_source,
                         "gate_text_length": int(self.prompt_ids.shape[1])},
                "build": infos,
                **({"kept_by_request": requested} if requested else {}),
                "seconds": round(time.perf_counter() - start, 1),
            })
            self.record(work, paths, report)
        if not report["passed"]:
            raise AccuracyError(f"{cfg.precision} gate failed: " + "; ".join(report["failures"]), report=report)
        return report

    def record(self, work: Path, paths: dict[str, Path], report: dict[str, Any]) -> None:
        """Move accepted files into the artifact and update the manifest; a failed gate records figures only.

        The files are hashed where they were made; the manifest is then read, the files renamed into
        place and the manifest written under the artifact's lock, so that a stage running beside this
        one (another precision, a build) neither loses its entries nor sees a sum of another file."""
        cfg = self.cfg
        spec = self.spec
        staged: list[tuple[list[tuple[Path, Path]], dict[str, Any]]] = []  # (made, final) pairs, and the entry
        if report["passed"] and spec.runs_file_of is None:
            for tower, path in paths.items():
                final = self.root / f"{tower}.{cfg.precision}.onnx"
                side = sorted(p for p in path.parent.glob(path.name + ".data"))
                if side and path.name != final.name:
                    # The ONNX file names its side file (a recovery round's `.rK.onnx.data`): write it
                    # again under its final name, so the location inside matches the file beside it.
                    renamed = path.with_name(final.name)
                    side = graph.save(graph.load(path), renamed)
                    path = renamed
                final_side = self.root / (final.name + ".data")
                staged.append(([(path, final), *((p, final_side) for p in side)], {
                    "tower": tower,
                    "precision": cfg.precision,
                    "format": "onnx",
                    "file": final.name,
                    "sha256": file_sha256(path),
                    "bytes": path.stat().st_size + sum(p.stat().st_size for p in side),
                    "external_data": [{"file": final_side.name, "sha256": file_sha256(p)} for p in side],
                    "opset": _opset(path),
                    **_weights_layout(path),
                    "source": self.sources[tower].file,
                    "validation": self.variant_validation(tower, report),
                }))
        with updating_manifest(self.root) as manifest:
            manifest.setdefault("validation", {}).setdefault("quantize", {})[cfg.precision] = report
            if not report["passed"]:
                return
            self.check_sources_unchanged(manifest)
            if spec.runs_file_of is not None:
                entries = [self.reuse_entry(manifest, tower, report) for tower in paths]
            else:
                entries = []
                for moves, entry in staged:
                    for made, final in moves:
                        os.replace(made, final)
                    entries.append(entry)
            # a writer under the artifact's lock: it edits the dict it writes
            manifest["variants"] = [
                v for v in manifest["variants"] if not (v["precision"] == cfg.precision and v["format"] == "onnx")
            ] + entries

    def check_sources_unchanged(self, manifest: dict[str, Any]) -> None:
        """The fp32 files this run was gated against, and the files its variant was made from or runs, must
        still be the artifact's: an `export --force` (or a quantize --force of the precision it runs)
        meanwhile replaced them, and a variant of the old files must not be recorded beside the new ones."""
        watched = {precisions.REFERENCE: self.fp32, self.spec.runs_file_of or precisions.REFERENCE: self.sources}
        for precision, used in watched.items():
            now = {v.tower: v.sha256 for v in variants(manifest) if v.precision == precision and v.format == "onnx"}
            changed = [t for t in self.towers if now.get(t) != used[t].sha256]
            if changed:
                how = "re-exported" if precision == precisions.REFERENCE else f"{precision} re-made"
                raise ArtifactError(
                    f"the {precision} {' and '.join(changed)} tower of {str(self.root)!r} changed while "
                    f"{self.cfg.precision} was being made ({how} meanwhile?); nothing was recorded: run quantize again"
                )

    def variant_validation(self, tower: str, report: dict[str, Any]) -> dict[str, Any]:
        return {
            "reference": precisions.REFERENCE,
            "passed": True,
            **report[tower],
            **({"top1_agreement": report["top1_agreement"]} if "top1_agreement" in report else {}),
        }

    def reuse_entry(self, manifest: dict[str, Any], tower: str, report: dict[str, Any]) -> dict[str, Any]:
        """The manifest entry of a variant that runs another precision's file (``runs_file_of``): that
        file, its sums, sizes and layout, the CPU features either needs, and its own gate."""
        spec = self.spec
        # The raw entry, under the manifest's lock: its keys are copied as they stand (write side, not a read).
        runs = next(v for v in manifest["variants"]
                    if v["tower"] == tower and v["format"] == "onnx" and v["precision"] == spec.runs_file_of)
        keep = ("file", "sha256", "bytes", "external_data", "opset", "weights")
        return {
            "tower": tower, "precision": spec.name, "format": "onnx",
            **{k: runs[k] for k in keep if k in runs},
            "source": runs["file"],
            "requires_cpu": list(dict.fromkeys([*spec.cpu_features, *(runs.get("requires_cpu") or ())])),
            "validation": self.variant_validation(tower, report),
        }


def _weights_layout(path: Path) -> dict[str, str]:
    """``{"weights": "int8"|"fp32"}`` for a Q/DQ file (how its quantized weights are stored), else nothing."""
    onnx = require("onnx", "export")

    model = onnx.load(str(path), load_external_data=False)  # types and names only: the bytes are not needed
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return {}
    return {"weights": int8.weight_layout(model)}


def _opset(path: Path) -> int:
    onnx = require("onnx", "export")

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Make and gate the ``cfg.precision`` variant of both towers; returns the gate report.

    Everything that does not need the data is checked before any of it is read: the options and the
    CPU (``cfg.check``), the artifact, the packages the precision and its gate need, and that the
    artifact directory can be written (taking the precision's job lock is the first write). A second
    quantize of the same precision on the same artifact refuses at once, naming the first; other
    precisions run beside it.
    """
    cfg.check()
    read_manifest(cfg.artifact)  # an artifact at all: one line if not, before anything is made in it
    check_environment(cfg.precision)
    with job_lock(Path(cfg.artifact), f"quantize-{precisions.get(cfg.precision).name}",
                  f"clipdeploy quantize --precision {cfg.precision}"):
        return QuantizeRun(cfg).run()


def check_environment(precision: str) -> None:
    """Import what making and gating ``precision`` needs (PrecisionSpec.needs): a missing package is one
    line naming its extra, at once, not after minutes of reading data."""
    for module, extra in precisions.get(precision).needs:
        require(module, extra)
