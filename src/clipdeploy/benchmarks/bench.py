"""Run a benchmark: discover contenders, make the inputs once, measure each contender, compare.

The figures of every contender are compared with PyTorch eager fp32 at the full context length on
the same rows: the cosine of each embedding, and the speed-up of the median latency.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import clipdeploy
from clipdeploy.benchmarks import environment
# BenchConfig and DEFAULT_BATCHES live in config.py; re-exported here for callers that import them from bench.
from clipdeploy.benchmarks.config import DEFAULT_BATCHES, BenchConfig  # noqa: F401
from clipdeploy.benchmarks.contenders import ContenderSpec, OpenOptions, Skipped, discover
from clipdeploy.benchmarks.end_to_end import run_end_to_end
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.benchmarks.inputs import BenchInputs, make_inputs, text_is_dynamic
from clipdeploy.benchmarks.report import write_reports
from clipdeploy.benchmarks.torch_reference import check_reference_weights, weights_source
from clipdeploy.benchmarks.worker import EVENT_PREFIX, Case, WorkerJob, WorkerResult, load_result, run_job
from clipdeploy.errors import ClipDeployError, UsageError
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.precisions import REFERENCE
from clipdeploy.progress import active as progress_active
from clipdeploy.progress import write as progress_write
from clipdeploy.validation import cosine_rows

REPORT_SCHEMA = "clipdeploy-bench/1"
# Below this cosine against PyTorch fp32, the fp32 variant and the reference cannot share weights.
_SAME_WEIGHTS_COSINE = 0.999
# A case whose p90 exceeds its p50 by this factor was disturbed while it was timed.
_NOISY_SPREAD = 1.5


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if environment.gpus() else "cpu"


def text_lengths(view: ArtifactView, inputs: BenchInputs, prompt_length: int | None) -> tuple[int, ...]:
    """Full context length, then the short length where the text input's sequence axis is dynamic."""
    full = inputs.context_length
    short = min(prompt_length or inputs.prompt_length, full)
    return (full, short) if text_is_dynamic(view) and short < full else (full,)


def plan_cases(spec: ContenderSpec, batches: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[Case, ...]:
    cases = []
    for tower in spec.towers:
        if tower == "image":
            cases += [Case("image", b) for b in batches]
        else:
            cases += [Case("text", b, n) for n in lengths for b in batches]
    return tuple(cases)


# ---- the default path and the estimate -------------------------------------------------------------

# Rough allowances for opening a contender, in seconds (not measured per run): a compiled variant loads in
# seconds; PyTorch imports torch and builds the open_clip model; peers also compile (torch.compile's first
# calls) or export (the plain-export peers) before their first timed call.
OPEN_ALLOWANCE_S = {"clipdeploy": 5.0, "reference": 15.0, "peer": 45.0}


@dataclass
class DefaultPath:
    """What ``clipdeploy.load(dir)`` with no arguments picks on this machine, and how long its calls take."""

    backend: str | None = None
    precision: dict[str, str] = field(default_factory=dict)  # tower -> precision
    describe: str = ""
    error: str | None = None  # why it could not be opened here
    # tower -> seconds of one call at the largest batch: of the default path, and of fp32 on its backend
    call_s: dict[str, float] = field(default_factory=dict)
    fp32_call_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {"backend": self.backend, "precision": self.precision, "describe": self.describe}


def _time_calls(session: Any, towers: tuple[str, ...], inputs: BenchInputs, batch: int) -> dict[str, float]:
    out = {}
    for tower in towers:
        if tower not in session.runners:
            continue
        encode = session.encode_pixels if tower == "image" else session.encode_tokens
        encode(inputs.batch(tower, 1, None))  # first-call allocation, untimed
        start = time.perf_counter()
        encode(inputs.batch(tower, batch, None))
        out[tower] = time.perf_counter() - start
    return out


def probe_default_path(root: Path, towers: tuple[str, ...], inputs: BenchInputs, batch: int) -> DefaultPath:
    """Open ``clipdeploy.load(root)`` as a user would (no arguments), note what it picked, and time one call per
    tower at ``batch`` (and of fp32 on the same backend, for the estimate); closed before anything is measured."""
    try:
        session = clipdeploy.load(root, verify=False)  # verify does not change the pick; the contenders verify
    except ClipDeployError as e:
        return DefaultPath(error=f"clipdeploy.load() cannot open the artifact here: {' '.join(str(e).split())}")
    found = DefaultPath(session.backend, dict(session.precision), session.describe())
    found.call_s = _time_calls(session, towers, inputs, batch)
    del session
    found.fp32_call_s = found.call_s
    if set(found.precision.values()) != {REFERENCE}:
        try:
            fp32 = clipdeploy.load(root, backend=found.backend, precision=REFERENCE, verify=False)
            found.fp32_call_s = _time_calls(fp32, towers, inputs, batch)
            del fp32
        except ClipDeployError:
            pass  # the estimate then takes every contender to run as fast as the default path
    gc.collect()
    return found


def estimate_seconds(
    plans: list[tuple[ContenderSpec, tuple[Case, ...]]], timing: TimingConfig, default: DefaultPath, batch: int
) -> float | None:
    """Seconds the measurements should take: an allowance to open each contender, and its calls timed as the
    default path's (quantized contenders) or its fp32 (the rest), scaled to each batch. None: nothing timed."""
    if not default.call_s:
        return None
    total = 0.0
    for spec, cases in plans:
        total += OPEN_ALLOWANCE_S.get(spec.role, OPEN_ALLOWANCE_S["clipdeploy"])
        quantized = spec.precision in set(default.precision.values()) - {REFERENCE}
        calls = default.call_s if quantized else default.fp32_call_s
        for case in cases:
            per_call = calls.get(case.tower, max(calls.values(), default=0.0)) * case.batch / batch
            timed = timing.iters * per_call
            if timing.max_seconds is not None:
                timed = min(timed, max(timing.max_seconds, timing.min_iters * per_call))
            total += timing.warmup * per_call + timed
    return total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ---- running contenders ---------------------------------------------------------------------------


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(clipdeploy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)  # torch's OpenMP pool, before torch reads it
    return env


def _run_isolated(job: WorkerJob, work: Path, name: str, on_event: Callable[[dict[str, Any]], None]) -> WorkerResult:
    job_path = work / f"{name}.job.json"
    job_path.write_text(job.to_json(), encoding="utf-8")
    prefix = work / f"{name}.result"
    stderr_path = work / f"{name}.stderr.txt"
    with open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipdeploy.benchmarks.worker", str(job_path), str(prefix)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_worker_env(job.options.threads),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(EVENT_PREFIX):
                on_event(json.loads(line[len(EVENT_PREFIX) :]))
        code = proc.wait()
    if code != 0 or not Path(f"{prefix}.json").is_file():
        lines = [ln for ln in stderr_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        tail = lines[-1].strip() if lines else "no output"
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return WorkerResult("", [], {}, error=f"the measuring process failed ({how}): {tail[:300]}")
    return load_result(prefix)


class _Progress:
    """A tqdm bar over all cases when tqdm is installed and wanted; otherwise a line per contender."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        enabled = enabled and progress_active()  # a terminal, and not --quiet (nor a library caller)
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass
        self.enabled = enabled
        self.label = ""

    def contender(self, label: str, left_s: float | None = None) -> None:
        """A contender starts; ``left_s``: the estimate of what is left, this contender included."""
        self.label = label
        left = f" (about {_duration(left_s)} left)" if left_s is not None else ""
        if self.bar is not None:
            self.bar.set_description(label + left)
        elif self.enabled:
            progress_write(f"measuring {label}{left} ...")

    def event(self, event: dict[str, Any]) -> None:
        case = event["case"]
        where = f"{case['tower']} b{case['batch']}" + (f" L{case['seq_len']}" if case.get("seq_len") else "")
        if self.bar is not None:
            if event["event"] == "start":
                self.bar.set_postfix_str(where)
            else:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- assembling the report ------------------------------------------------------------------------


_STAT_KEYS = ("iters", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "items_per_s")


def _record(
    spec: ContenderSpec,
    r: dict[str, Any],
    emb: np.ndarray,
    ref: tuple[dict[str, Any], np.ndarray] | None,
) -> dict[str, Any]:
    """One report record: a case's figures, with cosine and speed-up against PyTorch fp32 at full length."""
    cos = cosine_rows(emb, ref[1]) if ref is not None and ref[1].shape == emb.shape else None
    return {
        "tower": r["tower"],
        "backend": spec.backend,
        "precision": spec.precision,
        "device": spec.device,
        "role": spec.role,
        "batch": r["batch"],
        "seq_len": r["seq_len"],
        **{k: r[k] for k in _STAT_KEYS},
        "cos_min": float(cos.min()) if cos is not None else None,
        "cos_mean": float(cos.mean()) if cos is not None else None,
        "speedup_vs_torch_fp32": ref[0]["p50_ms"] / r["p50_ms"] if ref is not None else None,
        "peak_rss_mb": r["peak_rss_mb"],
        "gpu_mem_mb": r["gpu_mem_mb"],
        "input_sha256": r["input_sha256"],
    }


def _records(
    results: list[tuple[ContenderSpec, WorkerResult]], context_length: int
) -> tuple[list[dict[str, Any]], list[Skipped], list[str]]:
    reference: dict[tuple[str, int], tuple[dict[str, Any], np.ndarray]] = {}
    for spec, res in results:
        if spec.role == "reference":
            for r in res.results:
                if "skipped" not in r and r["seq_len"] in (None, context_length):
                    reference[(r["tower"], r["batch"])] = (
                        r,
                        res.embeddings[Case(r["tower"], r["batch"], r["seq_len"]).key],
                    )
    records, skipped, notes = [], [], []
    for spec, res in results:
        if res.error:
            skipped.append(Skipped(spec.backend, spec.precision, res.error))
            continue
        for r in res.results:
            if "skipped" in r:
                skipped.append(
                    Skipped(spec.backend, spec.precision, r["skipped"], r["tower"], r["batch"], r["seq_len"])
                )
                continue
            ref = reference.get((r["tower"], r["batch"]))
            emb = res.embeddings[Case(r["tower"], r["batch"], r["seq_len"]).key]
            records.append(_record(spec, r, emb, ref))
    for rec in records:
        if rec["backend"] == "onnxruntime" and rec["precision"] == REFERENCE and rec["cos_min"] is not None:
            if rec["cos_min"] < _SAME_WEIGHTS_COSINE:
                notes.append(
                    f"the fp32 {rec['tower']} variant agrees with the PyTorch reference only to cosine "
                    f"{rec['cos_min']:.4f}: the reference was not rebuilt with the artifact's weights, so the "
                    "cosine figures compare different models (speeds are still valid)"
                )
                break
    if not reference and records:
        notes.append(
            "PyTorch fp32 was not measured, so there is no cosine or speed-up to report; add torch to --backends"
        )
    add_best_peer(records)
    return records, skipped, notes


def add_best_peer(records: list[dict[str, Any]]) -> None:
    """Give each record the fastest peer of its case (PyTorch eager or any other peer) and the ratio to it.

    A peer is what a user runs without clipdeploy (role "reference" or "peer"); the case is the tower,
    batch and text length. Records with no peer measured for their case get None.
    """
    best: dict[tuple[str, int, int | None], dict[str, Any]] = {}
    for rec in records:
        if rec["role"] in ("reference", "peer"):
            key = (rec["tower"], rec["batch"], rec["seq_len"])
            if key not in best or rec["p50_ms"] < best[key]["p50_ms"]:
                best[key] = rec
    for rec in records:
        peer = best.get((rec["tower"], rec["batch"], rec["seq_len"]))
        rec["best_peer"] = f"{peer['backend']} {peer['precision']}" if peer is not None else None
        rec["speedup_vs_best_peer"] = peer["p50_ms"] / rec["p50_ms"] if peer is not None else None


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every contender for ``cfg`` and return the report; write it when ``cfg.output`` is set."""
    cfg.check()
    root = Path(cfg.artifact)
    view = ArtifactView.read(root)
    threads = cfg.threads or environment.available_cores()
    device = resolve_device(cfg.device)
    missing = [t for t in cfg.towers if t not in view.towers]
    if len(missing) == len(cfg.towers):
        raise UsageError(
            f"the artifact has no {' or '.join(missing)} tower (it has {', '.join(view.towers) or 'none'}); "
            "pass --towers with one of those"
        )
    env = environment.collect(threads, device)
    specs, skipped = discover(
        view, backends=cfg.backends, towers=cfg.towers, device=device, precisions=cfg.precisions
    )
    for s in skipped:
        progress_write(f"skipping {s.describe()}")
    if not specs:
        raise UsageError(
            f"nothing to measure in {str(root)!r} with --backends {','.join(cfg.backends)}"
            + (f" and --precisions {','.join(cfg.precisions)}" if cfg.precisions else "")
            + "; see the reasons above, or add torch to --backends"
        )
    if any(s.role != "clipdeploy" for s in specs):  # every peer rebuilds the open_clip model
        check_reference_weights(view.model, cfg.checkpoint)

    inputs = make_inputs(view, max(cfg.batches))
    lengths = text_lengths(view, inputs, cfg.prompt_length)
    options = OpenOptions(threads, cfg.graph_optimization_level, Path(cfg.checkpoint) if cfg.checkpoint else None)
    plans = [(spec, plan_cases(spec, cfg.batches, lengths)) for spec in specs]
    towers = tuple(t for t in cfg.towers if t in view.towers)
    default = probe_default_path(root, towers, inputs, max(cfg.batches))
    estimates = [estimate_seconds([plan], cfg.timing, default, max(cfg.batches)) for plan in plans]
    n_cases = sum(len(c) for _, c in plans)
    calls = f"{n_cases} cases of {cfg.timing.warmup} warm-up + up to {cfg.timing.iters} timed calls"
    if None in estimates:
        progress_write(f"measuring {len(plans)} contenders, {calls}; no estimate of the time: "
                       f"{default.error or 'the default path could not be timed'}")
    else:
        progress_write(
            f"measuring {len(plans)} contenders, {calls}: about {_duration(sum(estimates))} (estimated from one "
            f"call of the default path, {default.backend} {'/'.join(sorted(set(default.precision.values())))}, "
            f"at batch {max(cfg.batches)}, and an allowance to open each contender)"
        )
    progress = _Progress(n_cases, cfg.progress)
    results: list[tuple[ContenderSpec, WorkerResult]] = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="clipdeploy-bench-") as tmp:
            work = Path(tmp)
            inputs_path = work / "inputs.npz"
            inputs.save(inputs_path)
            for i, (spec, cases) in enumerate(plans):
                progress.contender(spec.label, _time_left(estimates, i, time.perf_counter() - started))
                job = WorkerJob(root, spec, inputs_path, cases, cfg.timing, options)
                if cfg.isolate:
                    res = _run_isolated(job, work, f"c{i}", progress.event)
                else:
                    res = run_job(job, progress.event)
                    gc.collect()
                if res.error:
                    progress_write(f"skipping {spec.label}: {res.error}")
                results.append((spec, res))
    finally:
        progress.close()

    records, more_skipped, notes = _records(results, inputs.context_length)
    skipped += more_skipped
    env["load_average_end"] = environment.load_average()
    noisy = [r for r in records if r["iters"] >= 5 and r["p90_ms"] > _NOISY_SPREAD * r["p50_ms"]]
    if noisy:
        notes.append(
            f"{len(noisy)} of {len(records)} cases have p90 more than {_NOISY_SPREAD:g}x their p50: the timings were "
            "disturbed (other processes, CPU frequency); rerun on a quiet machine before trusting them"
        )
    notes = _general_notes(cfg, view, env, lengths, inputs, results) + notes
    report = {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": cfg.machine or environment.describe_machine(env),
        "artifact": {
            "path": str(root),
            "model": view.model.name,
            "weights": weights_source(view.model),
            "text_input_shape": _text_input_shape(view),
        },
        "config": {
            "backends": list(cfg.backends),
            "precisions": list(cfg.precisions) if cfg.precisions else None,
            "batches": list(cfg.batches),
            "towers": list(cfg.towers),
            "text_lengths": list(lengths) if "text" in cfg.towers else [],
            **asdict(cfg.timing),
            "threads": threads,
            "device": device,
            "graph_optimization_level": cfg.graph_optimization_level,
            "isolated": cfg.isolate,
        },
        "environment": env,
        "inputs": {
            "images": list(inputs.images),
            "prompts": len(inputs.prompts),
            "context_length": inputs.context_length,
            "prompt_length": inputs.prompt_length,
        },
        "default_path": default.to_dict(),
        "contenders": [{**spec.to_dict(), "label": spec.label, "describe": res.describe} for spec, res in results],
        "records": records,
        "skipped": [s.to_dict() for s in skipped],
        "notes": notes,
    }
    if cfg.end_to_end:
        # After the tower cases, so its decode threads do not disturb their timings.
        report["end_to_end"] = run_end_to_end(
            root, images=cfg.end_to_end, batch=max(cfg.batches), threads=threads, rounds=cfg.timing.min_iters
        )
    if cfg.output is not None:
        report["files"] = write_reports(report, Path(cfg.output))
    return report


def _time_left(estimates: list[float | None], done: int, elapsed: float) -> float | None:
    """What is left of the estimate once ``done`` contenders took ``elapsed`` seconds: the rest, scaled by how
    far off the estimate was for those done."""
    if None in estimates:
        return None
    spent = sum(e for e in estimates[:done] if e is not None)
    scale = elapsed / spent if done and spent > 0 else 1.0
    return scale * sum(e for e in estimates[done:] if e is not None)


def _text_input_shape(view: ArtifactView) -> list[int | str] | None:
    """The text input's shape as the manifest records it (named axes as strings); None without a text tower."""
    text = view.towers.get("text")
    return list(text.inputs[0].shape) if text is not None and text.inputs else None


def _general_notes(
    cfg: BenchConfig,
    view: ArtifactView,
    env: dict[str, Any],
    lengths: tuple[int, ...],
    inputs: BenchInputs,
    results: list[tuple[ContenderSpec, WorkerResult]],
) -> list[str]:
    notes = []
    cores = env.get("logical_cores") or 1  # the load average counts the whole machine
    load = env.get("load_average_start")
    if load is not None and load > 0.5 * cores:
        notes.append(
            f"the machine was busy when the run started (1-minute load {load} on {cores} cores): "
            "figures may be slower and noisier than on a quiet machine; do not publish them"
        )
    if "text" in cfg.towers and "text" in view.towers:
        if len(lengths) > 1:
            notes.append(
                f"text is measured at the full context length ({lengths[0]} tokens: the prompts padded as open_clip "
                f"pads them, what its users run; for the runtime, the cost of a batch whose longest text fills the "
                f"context) and at {lengths[1]} tokens, the longest bundled prompt, as the runtime pads a batch of "
                "these prompts; PyTorch at the short length runs open_clip's encode_text with the positional "
                "embedding and causal mask cut to that length (stock encode_text takes only full length)"
            )
        else:
            notes.append(
                f"text is measured at the full context length ({lengths[0]} tokens) only: the artifact's text "
                f"input has a fixed length ({_text_input_shape(view)})"
            )
    if cfg.timing.iters < 100:
        notes.append(f"p99 from {cfg.timing.iters} or fewer timed calls is close to the slowest call")
    if cfg.timing.max_seconds is not None:
        notes.append(
            f"each case was timed for at most {cfg.timing.max_seconds:g} s (at least {cfg.timing.min_iters} calls); "
            "the iters column gives the calls actually timed"
        )
    return notes
