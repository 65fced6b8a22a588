"""Run a pipeline: every model's units in order, incrementally, each model isolated from the others.

For each unit: its dependencies settle first; then its inputs are hashed into a key. A unit whose key
and outputs match its record is *current* and skipped; otherwise it runs (its record is dropped first
and written again only when it finishes). A unit that cannot run on this machine is *skipped* with the
reason; one whose dependency failed is *blocked*. A failure stops only its own model's dependent units,
unless ``fail_fast``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy import progress
from clipdeploy.errors import AccuracyError, ClipDeployError, UsageError
from clipdeploy.artifact.manifest import atomic_write_text
from clipdeploy.options import opt
from clipdeploy.pipeline.config import STAGES, ModelPlan, PipelineConfig
from clipdeploy.pipeline.fingerprint import changed, key_of
from clipdeploy.pipeline.stages import STAGES as IMPLS
from clipdeploy.pipeline.stages import Context, Unavailable, Unit, deps, gate_figures, units
from clipdeploy.pipeline.state import STATE_NAME, StageState

log = logging.getLogger(__name__)

# ran: did its work now. current: up to date, skipped. skipped: cannot or need not run here (a reason says
# why). stale: out of date but not selected by --only. failed: raised an error. blocked: not run because
# something it needs failed (or --fail-fast stopped the run).
STATUSES = ("ran", "current", "skipped", "stale", "failed", "blocked")
SUMMARY_NAME = "summary.json"
SUMMARY_SCHEMA = "clipdeploy-pipeline-summary/1"


@dataclass
class RunOptions:
    """How `clipdeploy run` runs a pipeline. CLI and API both resolve through this."""

    force: bool = field(  # re-run every selected unit, current or not
        default=False, metadata=opt("re-run every selected stage, even if current")
    )
    only: str | None = field(  # others are reported as current or stale
        default=None, metadata=opt("run only this stage; the others are checked, not run", choices=STAGES)
    )
    fail_fast: bool = field(default=False, metadata=opt("stop everything at the first failure"))
    models: tuple[str, ...] = field(  # empty runs all
        default=(),
        metadata=opt("run only this model entry (repeatable)", flag="--model", action="append", metavar="NAME"),
    )

    def check(self) -> None:
        if self.only is not None and self.only not in STAGES:
            raise UsageError(f"--only {self.only!r} is not a stage; choose one of {', '.join(STAGES)}")


@dataclass
class UnitResult:
    """How one unit of one model went."""

    model: str
    unit: str  # e.g. "quantize:int8"
    stage: str
    precision: str | None
    status: str  # one of STATUSES
    seconds: float = 0.0
    reason: str = ""  # why skipped, stale, failed or blocked; or what changed for a re-run
    key: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # inputs that changed since the recorded run

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit, "stage": self.stage, "precision": self.precision, "status": self.status,
            "seconds": round(self.seconds, 2), "reason": self.reason, "key": self.key, "changed": self.changed,
            "figures": self.figures,
        }  # fmt: skip


class _Stop(Exception):
    """--fail-fast: the first failure ends the run."""


class ModelRun:
    """The units of one model, run in order against its stage state."""

    def __init__(self, plan: ModelPlan, options: RunOptions) -> None:
        self.plan = plan
        self.options = options
        plan.root.mkdir(parents=True, exist_ok=True)
        self.state = StageState(plan.root / STATE_NAME)
        self.ctx = Context(plan=plan, state=self.state)
        self.results: dict[str, UnitResult] = {}

    def _result(self, unit: Unit, status: str, **kw: Any) -> UnitResult:
        r = UnitResult(self.plan.name, unit.id, unit.stage, unit.precision, status, **kw)
        self.results[unit.id] = r
        label = f"[{self.plan.name}] {unit.id}: {status}"
        if status == "current":
            progress.write(f"{label} (key {(r.key or '')[:12]}), skipped")
        elif status == "ran":
            progress.write(f"{label} in {r.seconds:.1f}s")
        elif r.reason:
            progress.write(f"{label}: {r.reason}")
        else:
            progress.write(label)
        return r

    def _gate(self, unit: Unit) -> UnitResult | None:
        """A result when the unit's dependencies (or its stage list) decide it without running."""
        if unit.stage not in self.plan.stages:
            return self._result(unit, "skipped", reason=f"{unit.stage} is not in this model's stages")
        for dep in deps(unit, self.plan):
            r = self.results.get(dep.unit.id)
            if r is None or r.status in ("ran", "current"):
                continue
            if r.status in ("failed", "blocked"):
                return self._result(unit, "blocked", reason=f"{dep.unit.id} {r.status}")
            if not dep.hard:
                continue
            if r.status == "stale":
                if self._selected(unit):
                    return self._result(
                        unit,
                        "failed",
                        reason=f"needs {dep.unit.id}, which is out of date; run without --only, "
                        f"or with --only {dep.unit.stage}",
                    )
                return self._result(unit, "stale", reason=f"{dep.unit.id} is out of date")
            if r.status == "skipped":
                if unit.stage == "validate" and r.reason and not r.reason.startswith("needs"):
                    return self._result(unit, "skipped", reason=r.reason)
                return self._result(unit, "skipped", reason=f"needs {dep.unit.id}, which was skipped")
        return None

    def _selected(self, unit: Unit) -> bool:
        return self.options.only is None or self.options.only == unit.stage

    def run_unit(self, unit: Unit) -> UnitResult:
        gated = self._gate(unit)
        if gated is not None:
            return gated
        impl = IMPLS[unit.stage]
        record = self.state.get(unit.id)
        try:
            inputs = impl.inputs(unit, self.ctx)
        except Unavailable as e:
            return self._result(unit, "skipped", reason=str(e))
        except ClipDeployError as e:
            return self._result(unit, "failed", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a bug must not take the other models down
            log.info("clipdeploy: %s", traceback.format_exc())  # shown with -v
            return self._result(unit, "failed", reason=f"{type(e).__name__}: {e}")
        key = key_of(inputs)
        what_changed = changed(record.get("inputs") if record else None, inputs)
        is_current = record is not None and record.get("key") == key and impl.current(unit, self.ctx, record)
        if is_current and not (self.options.force and self._selected(unit)):
            self.ctx.keys[unit.id] = key
            return self._result(unit, "current", key=key, figures=record.get("figures") or {})
        if not self._selected(unit):
            reason = "not run: --only " + str(self.options.only)
            if what_changed:
                reason = f"changed: {', '.join(what_changed)}; {reason}"
            return self._result(unit, "stale", key=key, reason=reason, changed=what_changed)
        if is_current:
            why = "forced"
        elif record is None:
            why = "first run"
        elif record.get("key") != key:
            why = f"changed: {', '.join(what_changed)}" if what_changed else "inputs changed"
        else:
            why = "outputs missing or changed"
        progress.write(f"[{self.plan.name}] {unit.id}: running ({why})")
        self.state.forget(unit.id)
        start = time.perf_counter()
        try:
            with progress.stage(f"[{self.plan.name}] {unit.id}", keep=False):  # _result says how it ended
                result = impl.run(unit, self.ctx)
        except ClipDeployError as e:
            figures = gate_figures(e.report) if isinstance(e, AccuracyError) else {}
            return self._result(
                unit,
                "failed",
                seconds=time.perf_counter() - start,
                key=key,
                reason=str(e),
                figures=figures,
                changed=what_changed,
            )
        except Exception as e:  # noqa: BLE001 - a bug in one model's stage must not stop the others
            log.info("clipdeploy: %s", traceback.format_exc())  # shown with -v
            return self._result(
                unit,
                "failed",
                seconds=time.perf_counter() - start,
                key=key,
                reason=f"{type(e).__name__}: {e}",
                changed=what_changed,
            )
        seconds = time.perf_counter() - start
        self.state.record(unit.id, key, inputs, result.outputs, result.figures, seconds)
        self.ctx.keys[unit.id] = key
        return self._result(
            unit, "ran", seconds=seconds, key=key, figures=result.figures, reason=why, changed=what_changed
        )

    def run(self, stop: str | None) -> tuple[list[UnitResult], str | None]:
        """Run every unit; returns the results and, with fail_fast, the first failure."""
        for unit in units(self.plan):
            if stop is not None:
                self._result(unit, "blocked", reason=f"not run: --fail-fast after {stop}")
                continue
            r = self.run_unit(unit)
            if r.status == "failed" and self.options.fail_fast:
                stop = f"{self.plan.name} {unit.id} failed"
        return list(self.results.values()), stop


def run_pipeline(config: PipelineConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """Run every model of ``config``; returns the summary (also written to ``<output>/summary.json``)."""
    options = options or RunOptions()
    options.check()
    plans = config.models
    if options.models:
        names = [p.name for p in plans]
        missing = [m for m in options.models if m not in names]
        if missing:
            raise UsageError(f"--model {missing[0]!r} is not in {config.file}; its models are {', '.join(names)}")
        plans = [p for p in plans if p.name in options.models]
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    config.output.mkdir(parents=True, exist_ok=True)
    models = []
    stop: str | None = None
    for plan in plans:
        model_start = time.perf_counter()
        results, stop = ModelRun(plan, options).run(stop)
        failed = [r for r in results if r.status in ("failed", "blocked")]
        models.append(
            {
                "name": plan.name,
                "model": plan.export.model,
                "artifact": str(plan.artifact),
                "ok": not failed,
                "seconds": round(time.perf_counter() - model_start, 2),
                "units": [r.to_dict() for r in results],
            }
        )
    counts = {s: sum(1 for m in models for u in m["units"] if u["status"] == s) for s in STATUSES}
    summary = {
        "schema": SUMMARY_SCHEMA,
        "config": str(config.file),
        "output": str(config.output),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 2),
        "options": {
            "force": options.force,
            "only": options.only,
            "fail_fast": options.fail_fast,
            "models": list(options.models),
        },
        "ok": counts["failed"] == 0 and counts["blocked"] == 0,
        "counts": counts,
        "models": models,
    }
    path = Path(config.output) / SUMMARY_NAME
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    summary["file"] = str(path)
    return summary
