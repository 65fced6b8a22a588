"""The accuracy gate: a variant against the fp32 reference, on held-out data.

Per tower it measures the cosine of every held-out embedding against fp32: the minimum (a per-sample
floor, so that one lost image fails the gate however good the mean is), the 1st and 5th percentiles,
the mean, and which samples are worst. Jointly it measures top-1 agreement: for each held-out image,
the top-1 class over the prompt set when both towers run the variant, against the same when both run
fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdeploy import precisions
from clipdeploy.runtime.backends.base import Runner
from clipdeploy.validation import cosine_rows

BATCH = 16  # held-out inference batch; small enough for large models on CPU
WORST_REPORTED = 5  # worst held-out samples named per tower in the report


@dataclass(frozen=True)
class GateThresholds:
    """What a variant must reach to be accepted. None skips that criterion."""

    min_cosine: float | None = None  # lowest cosine allowed for any held-out embedding, per tower
    min_mean_cosine: float | None = None  # lowest mean cosine allowed, per tower
    min_top1: float | None = None  # lowest top-1 agreement with fp32 over the prompt set

    def to_dict(self) -> dict[str, float | None]:
        return {"min_cosine": self.min_cosine, "min_mean_cosine": self.min_mean_cosine, "min_top1": self.min_top1}


# Each precision's defaults live in its spec (clipdeploy.precisions); this is a live view of them.
DEFAULT_THRESHOLDS = precisions.view(lambda spec: GateThresholds(**spec.gate), precisions.quantized)


def cosine_figures(cos: np.ndarray, ids: list[str] | None = None, worst: int = WORST_REPORTED) -> dict[str, Any]:
    """min / p1 / p5 / mean of per-sample cosines, and the ``worst`` lowest samples (by id when known)."""
    order = np.argsort(cos, kind="stable")[:worst]
    return {
        "min_cosine": float(cos.min()),
        "p1_cosine": float(np.percentile(cos, 1)),
        "p5_cosine": float(np.percentile(cos, 5)),
        "mean_cosine": float(cos.mean()),
        "worst": [
            {"sample": ids[i] if ids is not None and i < len(ids) else f"#{i}", "cosine": float(cos[i])} for i in order
        ],
    }


def run(runner: Runner, x: np.ndarray) -> np.ndarray:
    (spec,) = runner.inputs
    (out,) = runner.outputs
    parts = [runner.infer({spec.name: x[i : i + BATCH]})[out.name] for i in range(0, len(x), BATCH)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Reference:
    """fp32 outputs on the held-out data, computed once and reused for every variant and round."""

    image: np.ndarray | None
    text: np.ndarray | None
    prompts: np.ndarray | None  # fp32 text embeddings of the class prompts

    def top1(self) -> np.ndarray | None:
        if self.image is None or self.prompts is None:
            return None
        return (_normalize(self.image) @ _normalize(self.prompts).T).argmax(axis=1)


def evaluate(
    reference: Reference,
    runners: dict[str, Runner],
    held_out: dict[str, np.ndarray],
    prompt_ids: np.ndarray | None,
    thresholds: GateThresholds,
    *,
    enforce_top1: bool,
    sample_ids: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Gate figures for the variant ``runners`` (tower → runner); ``passed`` says whether it is accepted.

    ``sample_ids`` names the held-out samples per tower (file, tar member or caption), so the report
    can say which ones are worst."""
    report: dict[str, Any] = {"thresholds": thresholds.to_dict(), "failures": []}
    outputs = {}
    for tower, runner in runners.items():
        ref = getattr(reference, tower)
        out = run(runner, held_out[tower])
        outputs[tower] = out
        rows_finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
        # A non-finite embedding counts as the worst possible sample (cosine -1), not as a crash.
        cos = np.where(rows_finite, cosine_rows(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), ref), -1.0)
        figures = cosine_figures(cos, (sample_ids or {}).get(tower))
        max_abs = float(np.abs(out.astype(np.float64) - ref).max()) if rows_finite.all() else float("inf")
        report[tower] = {**figures, "max_abs_err": max_abs, "samples": int(len(ref))}
        c = report[tower]
        if thresholds.min_cosine is not None and not c["min_cosine"] >= thresholds.min_cosine:
            w = c["worst"][0]
            report["failures"].append(
                f"{tower} min cosine {c['min_cosine']:.5f} < {thresholds.min_cosine} (worst: {w['sample']})"
            )
        if thresholds.min_mean_cosine is not None and not c["mean_cosine"] >= thresholds.min_mean_cosine:
            report["failures"].append(f"{tower} mean cosine {c['mean_cosine']:.5f} < {thresholds.min_mean_cosine}")
    ref_top1 = reference.top1()
    if ref_top1 is not None and prompt_ids is not None:
        text_runner = runners.get("text")
        prompts = run(text_runner, prompt_ids) if text_runner is not None else reference.prompts
        images = outputs.get("image", reference.image)
        top1 = (_normalize(images) @ _normalize(prompts).T).argmax(axis=1)
        agreement = float((top1 == ref_top1).mean())
        report["top1_agreement"] = agreement
        report["top1_prompts"] = int(len(prompt_ids))
        report["top1_enforced"] = enforce_top1
        if not enforce_top1:
            report["top1_note"] = "recorded, not enforced: random weights have no retrieval structure"
        elif thresholds.min_top1 is not None and not agreement >= thresholds.min_top1:
            report["failures"].append(f"top-1 agreement {agreement:.4f} < {thresholds.min_top1}")
    report["passed"] = not report["failures"]
    return report
