"""Compare embeddings with their reference, and report every figure.

Used by every gate: export (ONNX against PyTorch), and later precision and engine checks. A check
collects all its failures before it raises, and says for each what tolerance would have passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdeploy.errors import AccuracyError


@dataclass(frozen=True)
class Comparison:
    """Figures for one output compared with its reference."""

    max_abs_err: float
    max_ref_abs: float
    min_cosine: float
    mean_cosine: float
    rows: int

    @property
    def abs_rel(self) -> float:
        return self.max_abs_err / self.max_ref_abs if self.max_ref_abs > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_err": self.max_abs_err,
            "max_ref_abs": self.max_ref_abs,
            "abs_err_rel": self.abs_rel,
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "rows": self.rows,
        }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64 so that 0.99999 is measured, not rounded."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = num / den
    # Two all-zero rows agree; one zero row against a non-zero one does not.
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=-1.0))


def compare(actual: np.ndarray, reference: np.ndarray) -> Comparison:
    actual = np.asarray(actual)
    reference = np.asarray(reference)
    if actual.shape != reference.shape:
        raise ValueError(f"shape {actual.shape} differs from the reference shape {reference.shape}")
    if reference.size == 0:
        raise ValueError("nothing to compare: the reference is empty")
    if not np.all(np.isfinite(actual)):
        return Comparison(float("inf"), float(np.abs(reference).max()), -1.0, -1.0, len(reference))
    cos = cosine_rows(actual, reference)
    return Comparison(
        max_abs_err=float(np.abs(actual.astype(np.float64) - reference.astype(np.float64)).max()),
        max_ref_abs=float(np.abs(reference).max()),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        rows=len(reference),
    )


def merge(comparisons: list[Comparison]) -> Comparison:
    """The worst figures over several comparisons (several batch sizes, say)."""
    if not comparisons:
        raise ValueError("nothing to merge")
    rows = sum(c.rows for c in comparisons)
    return Comparison(
        max_abs_err=max(c.max_abs_err for c in comparisons),
        max_ref_abs=max(c.max_ref_abs for c in comparisons),
        min_cosine=min(c.min_cosine for c in comparisons),
        mean_cosine=sum(c.mean_cosine * c.rows for c in comparisons) / rows,
        rows=rows,
    )


def gate_failures(name: str, c: Comparison, *, min_cosine: float, max_abs_rel: float | None) -> list[str]:
    """Human-readable failures of one comparison; empty when it passes."""
    failures = []
    if not c.min_cosine >= min_cosine:
        failures.append(
            f"{name}: min cosine {c.min_cosine:.7f} < {min_cosine} (would pass at min_cosine <= {c.min_cosine:.7f})"
        )
    if max_abs_rel is not None and not c.abs_rel <= max_abs_rel:
        failures.append(
            f"{name}: max abs error {c.max_abs_err:.3e} is {c.abs_rel:.3e} of the largest reference "
            f"value {c.max_ref_abs:.3e} > {max_abs_rel:g} (would pass at {c.abs_rel:.3e})"
        )
    return failures


def raise_if_failed(what: str, failures: list[str], report: dict[str, Any]) -> None:
    if failures:
        raise AccuracyError(f"{what} failed: " + "; ".join(failures), report=report)
