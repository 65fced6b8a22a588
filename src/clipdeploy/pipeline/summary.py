"""The end-of-run table: model, stage, status, seconds, key figures (or the reason)."""

from __future__ import annotations

import shutil
from typing import Any

from clipdeploy.pipeline.stages import STAGES


def _figures(unit: dict[str, Any]) -> str:
    impl = STAGES.get(unit["stage"])
    text = ""
    if unit["figures"] and impl is not None:
        try:
            text = impl.describe(unit["figures"])
        except (KeyError, TypeError, ValueError):  # figures from an older run: show the reason instead
            text = ""
    if unit["status"] in ("skipped", "stale", "failed", "blocked"):
        reason = unit["reason"]
        if unit["status"] == "skipped" and len(reason) > 80:
            reason = reason.split("; ")[0]  # the table keeps the cause; summary.json has the whole hint
        return reason + (f" [{text}]" if text else "")
    if unit["status"] == "ran" and unit.get("changed"):
        return f"{text} (changed: {', '.join(unit['changed'])})" if text else f"changed: {', '.join(unit['changed'])}"
    return text


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def table(summary: dict[str, Any], width: int | None = None) -> str:
    """A fixed-width table of every unit of every model, then the totals and the summary file."""
    width = width or max(100, shutil.get_terminal_size((140, 20)).columns)
    rows = [
        (m["name"], u["unit"], u["status"], f"{u['seconds']:.1f}", _figures(u))
        for m in summary["models"]
        for u in m["units"]
    ]
    head = ("model", "stage", "status", "seconds", "figures / reason")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(4)]
    used = sum(widths) + 2 * 4
    lines = [
        "  ".join(h.ljust(w) if i != 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head[:4], widths, strict=True)))
        + "  "
        + head[4]
    ]
    lines.append("-" * min(width, used + 40))
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]), r[3].rjust(widths[3])]
        lines.append("  ".join(cells) + "  " + _clip(r[4], max(30, width - used)))
    counts = summary["counts"]
    totals = ", ".join(f"{counts[s]} {s}" for s in counts if counts[s])
    verdict = "ok" if summary["ok"] else "FAILED"
    lines.append("")
    lines.append(f"{verdict}: {totals} in {summary['seconds']:.1f}s; summary: {summary.get('file', '')}")
    return "\n".join(lines)
