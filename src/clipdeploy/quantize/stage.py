"""The `quantize` stage: fp32 ONNX towers → fp16 / int8 / int8-fp16 variants, each gated on held-out data.

A variant that misses its gate is refused: no accepted variant is written, the figures are printed
and recorded, and the command fails. int8 first tries to recover by itself, within a bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions, progress
from clipdeploy.calibration import dataset, sources
from clipdeploy.deps import require
from clipdeploy.errors import AccuracyError, ArtifactError, CalibrationError, UsageError
from clipdeploy.artifact.manifest import atomic_write_bytes, file_sha256, read_manifest, updating_manifest, variants
from clipdeploy.options import THREADS, opt
from clipdeploy.quantize import fp16, gate, graph, int8, recovery
from clipdeploy.quantize.gate import DEFAULT_THRESHOLDS, GateThresholds, Reference
from clipdeploy.runtime.backends.onnxruntime import OrtRunner
from clipdeploy.runtime.backends.openvino import OvOptions, OvRunner
from clipdeploy.runtime.padding import trim_to_pooled
from clipdeploy.runtime.session import load
from clipdeploy.artifact.staging import clean_stale, clean_stale_writes, job_lock, reserved
from clipdeploy.artifact.tool_versions import installed
from clipdeploy.validation import cosine_rows

log = logging.getLogger(__name__)

QUANTIZE_PREFIX = ".quantize-"  # the stage's temporary directory inside the artifact
CALIB_BATCH = 8
RANGE_SAMPLES = 64  # calibration samples the fp16 pass observes for value ranges
RANK_TYPICAL = 16  # recovery ranks nodes on the first calibration samples ...
RANK_WORST = 8  # ... and on those the plain int8 variant gets most wrong, so worst cases count


@dataclass
class QuantizeConfig:
    """Everything `clipdeploy quantize` takes. CLI, YAML and API all resolve through this."""

    artifact: Path  # the artifact directory, made by `clipdeploy export`
    precision: str = field(
        metadata=opt(
            "int8: Q/DQ with fp32 elsewhere (best on ONNX Runtime CPU); int8-fp16: Q/DQ with fp16 elsewhere "
            "(best on TensorRT); bf16: OpenVINO runs the fp32 file in bf16 (CPUs with AVX512_BF16 or AMX only)",
            choices=precisions.quantized,
        )
    )
    calib_images: list[Path] = field(
        default_factory=list, metadata=opt("image folders (recursive) or .tar shards", nargs="+", metavar="PATH")
    )
    calib_texts: Path | None = field(
        default=None,
        metadata=opt("captions, one per line", metavar="FILE", default_text="ImageNet classes x open_clip's templates"),
    )
    method: str = field(
        default="minmax", metadata=opt("int8 activation calibration", choices=("minmax", "entropy", "percentile"))
    )
    samples: int = field(default=300, metadata=opt("calibration samples per tower"))
    holdout: int = field(
        default=256,
        metadata=opt(
            "held-out samples per tower for the gate, disjoint from calibration, at least 32 (data too short for "
            "--samples plus --holdout is shared evenly between the two)"
        ),
    )
    min_samples: int = field(default=32, metadata=opt("fewest calibration samples accepted"))
    seed: int = field(default=0, metadata=opt("seed that picks the samples"))
    gate_prompts: Path | None = field(
        default=None,
        metadata=opt(
            "class prompts, one per line, for top-1 agreement", metavar="FILE",
            default_text="ImageNet 'a photo of a {}.'",
        ),
    )  # fmt: skip
    # Gate thresholds; None takes the precision's default (DEFAULT_THRESHOLDS).
    min_cosine: float | None = field(
        default=None,
        metadata=opt(
            "lowest cosine of any held-out sample, in (-1, 1]", default_text=precisions.gate_defaults("min_cosine")
        ),
    )
    min_mean_cosine: float | None = field(
        default=None, metadata=opt("lowest mean cosine", default_text=precisions.gate_defaults("min_mean_cosine")),
    )
    min_top1: float | None = field(
        default=None,
        metadata=opt("lowest top-1 agreement, in [0, 1]", default_text=precisions.gate_defaults("min_top1")),
    )
    recover: bool = field(
        default=True,
        metadata=opt("fail at once when int8 misses its gate (no recovery by keeping nodes in higher precision)",
                     negate="--no-recover"),
    )  # fmt: skip
    max_fp32_fraction: float = field(
        default=0.10, metadata=opt("most quantizable nodes recovery may keep unquantized")
    )
    max_rounds: int = field(default=5, metadata=opt("recovery rounds at most"))
    # Nodes a finding from elsewhere (Polygraphy's `debug precision`, an earlier run's manifest) says to leave
    # unquantized: kept from the first build on, before any node recovery picks itself.
    keep_nodes: list[str] = field(
        default_factory=list,
        metadata=opt("calibrated precisions: keep this MatMul/Gemm/Conv node unquantized (repeatable, or "
                     "comma-separated; names as in the manifest's recovery.kept_in_higher_precision)",
                     flag="--keep-node", action="append", metavar="NODE", default_text="none"),
    )  # fmt: skip
    fp8_patch_embedding: str = field(
        default="fp16",
        metadata=opt("fp8 only: keep the patch embedding (the Conv that reads the pixels) in fp16, NVIDIA's "
                     "recipe for accuracy, or quantize it to fp8 too", choices=("fp16", "fp8")),
    )  # fmt: skip
    threads: int | None = field(default=None, metadata=THREADS)  # for calibration and the gate
    force: bool = field(default=False, metadata=opt("replace an existing variant of this precision"))

    def keep_node_names(self) -> list[str]:
        """--keep-node's names, each given alone or comma-separated."""
        return [n.strip() for item in self.keep_nodes for n in item.split(",") if n.strip()]

    def thresholds(self) -> GateThresholds:
        base = DEFAULT_THRESHOLDS[self.precision]
        return GateThresholds(
            min_cosine=self.min_cosine if self.min_cosine is not None else base.min_cosine,
            min_mean_cosine=self.min_mean_cosine if self.min_mean_cosine is not None else base.min_mean_cosine,
            min_top1=self.min_top1 if self.min_top1 is not None else base.min_top1,
        )

    def check(self) -> None:
        """Refuse settings that would make the gate meaningless. The CLI, YAML pipeline and API all call it."""
        made = precisions.quantized()
        if precisions.get(self.precision).name not in made:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(made)}")
        refusal = precisions.cpu_refusal(self.precision)  # its gate must run here, on the CPU that serves it
        if refusal:
            raise UsageError(refusal)
        if self.method not in int8.METHODS:
            raise UsageError(f"--method {self.method!r} is not one of {', '.join(int8.METHODS)}")
        for name in ("samples", "min_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be 1 or more")
        if self.holdout < dataset.MIN_HELD_OUT:
            raise UsageError(
                f"--holdout {self.holdout} is below the {dataset.MIN_HELD_OUT} held-out samples per tower a gate "
                f"needs to mean anything; pass --holdout {dataset.MIN_HELD_OUT} or more "
                f"(default {QuantizeConfig.holdout})"
            )
        if self.samples < self.min_samples:
            raise UsageError(f"--samples {self.samples} is below --min-samples {self.min_samples}")
        if self.keep_nodes and not precisions.get(self.precision).calibrated:
            calibrated = [n for n in precisions.names() if precisions.get(n).calibrated]
            raise UsageError(f"--keep-node applies to calibrated precisions ({', '.join(calibrated)}), "
                             f"not {self.precision}")
        for name in ("min_cosine", "min_mean_cosine"):
            value = getattr(self, name)
            if value is not None and not -1 < value <= 1:  # `not` also refuses NaN
                raise UsageError(f"--{name.replace('_', '-')} {value} is out of range: a cosine lies in (-1, 1]; "
                                 "pass e.g. 0.95 (a value above 1 no variant can reach, -1 or below accepts any)")
        for name in ("min_top1", "max_fp32_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} {value} must be between 0 and 1 (a fraction)")
        if self.max_rounds < 0:
            raise UsageError(f"--max-rounds {self.max_rounds} must be 0 or more")
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed} must be 0 or more")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be 1 or more")


def _batches(x: np.ndarray, name: str, size: int = CALIB_BATCH) -> list[dict[str, np.ndarray]]:
    return [{name: x[i : i + size]} for i in range(0, len(x), size)]


def _cache_path(root: Path, tower: str, fp32_sha: str, method: str, fingerprint: str) -> Path:
    key = hashlib.sha256(f"{fp32_sha}|{method}|{fingerprint}|{installed('onnxruntime')}".encode()).hexdigest()[:20]
    return root / "calibration" / f"{tower}.{method}.{key}.json"


class _Stage:
    """One run of the stage; holds the data so that recovery rounds reuse it."""

    def __init__(self, cfg: QuantizeConfig) -> None:
        self.cfg = cfg
        self.keep_by_tower: dict[str, list[str]] = {}  # --keep-node names found in each tower's graph
        self.root = Path(cfg.artifact)
        self.manifest = read_manifest(self.root)
        existing = [v for v in variants(self.manifest) if v.precision == cfg.precision and v.format == "onnx"]
        if existing and not cfg.force:
            raise UsageError(
                f"{self.root} already has a {cfg.precision} variant ({existing[0].file}); pass --force to replace it"
            )
        self.session = load(
            self.root, backend="onnxruntime", precision=precisions.REFERENCE, intra_op_num_threads=cfg.threads
        )
        self.towers = list(self.session.variants)
        self.fp32 = self.session.variants
        self.options = self.session.runners[self.towers[0]].options  # same settings for every model we run
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
        padding = "longest" if self.manifest["towers"]["text"].get("padding") == "longest" else "max_length"
        self.prompt_ids = self.session.tokenize(prompts, padding=padding)
        self.prompt_source = str(cfg.gate_prompts) if cfg.gate_prompts else "imagenet-1k 'a photo of a {}.'"
        self.sets = {"image": self.images, "text": self.texts}
        self.held_out = {t: self.sets[t].held_out for t in self.towers}
        if padding == "longest":
            text = self.manifest["towers"]["text"]
            self.held_out["text"] = trim_to_pooled(self.texts.held_out, text["pooling"], text.get("eos_token_id"))
        runners = self.session.runners
        self.reference = Reference(
            image=gate.run(runners["image"], self.held_out["image"]),
            text=gate.run(runners["text"], self.held_out["text"]),
            prompts=gate.run(runners["text"], self.prompt_ids),
        )
        self.enforce_top1 = self.manifest["model"].get("random_init_seed") is None

    def feeds(self, tower: str, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        runner = self.session.runners[tower]
        x = self.sets[tower].calibration[:limit]
        return _batches(x, runner.inputs[0].name)

    # ---- building ----------------------------------------------------------------------------

    def prepared(self, tower: str, work: Path) -> Path:
        path = work / f"{tower}.prepared.onnx"
        if not path.exists():
            int8.prepare(self.root / self.fp32[tower].file, path)
        return path

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
        cfg = self.cfg
        src = self.root / self.fp32[tower].file
        out = work / f"{tower}.{cfg.precision}{suffix}.onnx"
        for stale in work.glob(out.name + "*"):
            stale.unlink()
        # The precision's own make step (PrecisionSpec.make) writes `out`; see make_fp16 and friends below.
        spec = precisions.get(cfg.precision)
        exclude = list(dict.fromkeys([*self.requested_keep(tower, work), *exclude]))
        info: dict[str, Any] = spec.make_step()(self, tower, src, out, work, exclude, suffix)
        if spec.reuses_reference:  # nothing written: the gate runs the fp32 file on its backend
            return src, info
        graph.check(out)
        return out, info

    def quantize_int8(self, tower: str, qdq: Path, work: Path, exclude: list[str], suffix: str) -> dict[str, Any]:
        """Calibrate and write the int8 QDQ graph of ``tower`` to ``qdq``, keeping ``exclude`` unquantized."""
        cfg = self.cfg
        prepared = self.prepared(tower, work)
        cache = _cache_path(self.root, tower, self.fp32[tower].sha256, cfg.method, self.sets[tower].fingerprint)
        reused = cache.exists()
        info: dict[str, Any] = {
            "calibration_cache": {"file": cache.relative_to(self.root).as_posix(), "reused": reused}
        }
        # A new cache is written by ONNX Runtime in the work directory (it makes it 0600, through
        # mkstemp), then copied into the artifact with the umask's mode, whole or not at all.
        scratch = cache if reused else work / cache.name
        with progress.muted_stdout():  # ONNX Runtime's entropy/percentile calibrators print to stdout
            layernorms = int8.quantize(prepared, qdq, self.feeds(tower), method=cfg.method, cache=scratch,
                                       exclude=exclude)
        if not reused:
            atomic_write_bytes(cache, scratch.read_bytes())
        info["layernorm_after_conv_quantized"] = len(layernorms)
        if not suffix:
            self.qdq[tower] = qdq
        return info

    def runner(self, path: Path) -> Any:
        spec = precisions.get(self.cfg.precision)
        if spec.gate_backend == "openvino":
            # The variant as the openvino backend serves it (its precision hint); uncached, made once per gate.
            sha = next(v.sha256 for v in self.fp32.values() if self.root / v.file == path)
            return OvRunner(path, spec.name, sha, OvOptions(num_threads=self.cfg.threads, cache_dir=""))
        return OrtRunner(path, self.options)

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
            calibrated = precisions.get(cfg.precision).calibrated
            if not report["passed"] and calibrated and cfg.recover:
                log.warning("%s misses its gate (%s); trying recovery", cfg.precision, "; ".join(report["failures"]))
                paths, report = self.recover(work, paths, report)
            report.update({
                "reference": f"{precisions.REFERENCE} onnx on onnxruntime CPU",
                "variant_backend": precisions.get(cfg.precision).gate_backend,
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
        spec = precisions.get(cfg.precision)
        staged: list[tuple[list[tuple[Path, Path]], dict[str, Any]]] = []  # (made, final) pairs, and the entry
        if report["passed"] and not spec.reuses_reference:
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
                    "source": self.fp32[tower].file,
                    "validation": self.variant_validation(tower, report),
                }))
        with updating_manifest(self.root) as manifest:
            manifest.setdefault("validation", {}).setdefault("quantize", {})[cfg.precision] = report
            if not report["passed"]:
                return
            self.check_reference_unchanged(manifest)
            if spec.reuses_reference:
                entries = [self.reuse_entry(manifest, tower, report) for tower in paths]
            else:
                entries = []
                for moves, entry in staged:
                    for made, final in moves:
                        os.replace(made, final)
                    entries.append(entry)
            manifest["variants"] = [
                v for v in manifest["variants"] if not (v["precision"] == cfg.precision and v["format"] == "onnx")
            ] + entries

    def check_reference_unchanged(self, manifest: dict[str, Any]) -> None:
        """The fp32 files this run quantized must still be the artifact's: an `export --force` meanwhile
        replaced them, and a variant of the old model must not be recorded beside the new one."""
        now = {v.tower: v.sha256 for v in variants(manifest) if v.precision == precisions.REFERENCE and v.format == "onnx"}
        changed = [t for t in self.towers if now.get(t) != self.fp32[t].sha256]
        if changed:
            raise ArtifactError(
                f"the {precisions.REFERENCE} {' and '.join(changed)} tower of {str(self.root)!r} changed while "
                f"{self.cfg.precision} was being made (re-exported meanwhile?); nothing was recorded: run quantize again"
            )

    def variant_validation(self, tower: str, report: dict[str, Any]) -> dict[str, Any]:
        return {
            "reference": precisions.REFERENCE,
            "passed": True,
            **report[tower],
            **({"top1_agreement": report["top1_agreement"]} if "top1_agreement" in report else {}),
        }

    def reuse_entry(self, manifest: dict[str, Any], tower: str, report: dict[str, Any]) -> dict[str, Any]:
        """The manifest entry of a variant that runs the fp32 file: its file, sums and sizes, its own gate."""
        spec = precisions.get(self.cfg.precision)
        fp32 = next(v for v in manifest["variants"]
                    if v["tower"] == tower and v["format"] == "onnx" and v["precision"] == precisions.REFERENCE)
        keep = ("file", "sha256", "bytes", "external_data", "opset")
        return {
            "tower": tower, "precision": spec.name, "format": "onnx",
            **{k: fp32[k] for k in keep if k in fp32},
            "source": fp32["file"],
            "requires_cpu": list(spec.cpu_features),
            "validation": self.variant_validation(tower, report),
        }


# ---- make steps: each precision's PrecisionSpec.make names one of these ---------------------------------
# Signature: (stage, tower, fp32 source, output path, work dir, nodes to keep unquantized, file suffix) -> info.


def make_fp16(
    stage: _Stage, tower: str, src: Path, out: Path, work: Path, exclude: list[str], suffix: str
) -> dict[str, Any]:
    return {"fp16": fp16.convert(src, out, stage.feeds(tower, RANGE_SAMPLES))}


def make_int8(
    stage: _Stage, tower: str, src: Path, out: Path, work: Path, exclude: list[str], suffix: str
) -> dict[str, Any]:
    return stage.quantize_int8(tower, out, work, exclude, suffix)


def make_int8_fp16(
    stage: _Stage, tower: str, src: Path, out: Path, work: Path, exclude: list[str], suffix: str
) -> dict[str, Any]:
    qdq = work / f"{tower}.qdq{suffix}.onnx"
    info = stage.quantize_int8(tower, qdq, work, exclude, suffix)
    keep = fp16.ALWAYS_FP32_OPS + ("QuantizeLinear", "DequantizeLinear")
    tmp = work / f"{tower}.fp16pass{suffix}.onnx"
    info["fp16"] = fp16.convert(qdq, tmp, stage.feeds(tower, RANGE_SAMPLES), keep_fp32_ops=keep)
    graph.save(int8.fold_qdq_into_fp16(graph.load(tmp)), out)
    return info


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
        return _Stage(cfg).run()


def check_environment(precision: str) -> None:
    """Import what making and gating ``precision`` needs (PrecisionSpec.needs): a missing package is one
    line naming its extra, at once, not after minutes of reading data."""
    for module, extra in precisions.get(precision).needs:
        require(module, extra)


def make_bf16(
    stage: _Stage, tower: str, src: Path, out: Path, work: Path, exclude: list[str], suffix: str
) -> dict[str, Any]:
    # No file is made: OpenVINO runs the fp32 file with INFERENCE_PRECISION_HINT=bf16 (see openvino.py).
    return {"runs": stage.fp32[tower].file, "openvino_inference_precision_hint": "bf16"}
