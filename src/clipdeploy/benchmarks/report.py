"""Benchmark reports: JSON (the schema below), a Markdown table, a PNG plot and a terminal table.

JSON schema ``clipdeploy-bench/1`` (``bench.json``)::

    schema        "clipdeploy-bench/1"
    created       ISO 8601 time, UTC
    machine       one-line name of the machine (CPU model, cores, memory, GPU), or --machine
    artifact      {path, model, weights, text_input_shape}
    config        {backends, precisions, batches, towers, text_lengths, iters, warmup, max_seconds,
                   min_iters, threads, device, graph_optimization_level, isolated}
    environment   {cpu, cpu_flags, logical_cores, physical_cores, available_cores, threads, memory_gb, device,
                   gpus: [{name, driver, memory}], os, load_average_start, load_average_end,
                   versions: {python, numpy, onnxruntime, torch, open_clip_torch, tensorrt, ...}}
    inputs        {images, prompts, context_length, prompt_length}
    default_path  what clipdeploy.load(ARTIFACT), no arguments, picked on this machine: {backend, precision:
                   {tower: precision}, describe}, or {error}; the goal line judges that backend and precision
    contenders    [{backend, precision, device, towers, role, label, describe}]
    records       one per measured (tower, backend, precision, batch, seq_len):
        tower                  "image" | "text"
        backend                "torch" | "torch.compile" | "onnxruntime.plain" | "openvino.plain" (peers: a plain
                               torch.onnx.export(dynamo=True) on that runtime) | "onnxruntime" | "openvino" | "tensorrt"
        precision              variant precision (fp32, fp16, int8, int8-fp16); PyTorch: fp32 | fp16-autocast
        device                 "cpu" | "cuda"
        role                   "reference" (PyTorch eager fp32) | "peer" (other PyTorch modes, plain exports) | "clipdeploy"
        batch                  items per call
        seq_len                text: token columns fed (the context length, or the short length); image: null
        iters                  timed calls (warm-up excluded)
        p50_ms p90_ms p99_ms   latency percentiles of one call, milliseconds (linear interpolation)
        mean_ms std_ms min_ms max_ms
        items_per_s            batch / mean latency: sustained rate of back-to-back calls
        cos_min cos_mean       cosine of each embedding with PyTorch eager fp32 at full length, same rows;
                               null when PyTorch fp32 was not measured
        speedup_vs_torch_fp32  p50 of PyTorch eager fp32 at full length, same tower and batch, / this p50
        best_peer              the fastest peer (role reference or peer) of the same tower, batch and length
        speedup_vs_best_peer   that peer's p50 / this p50; null when no peer was measured for the case
        peak_rss_mb            peak resident memory of the measuring process during this case, MiB
                               (the whole process: interpreter, libraries, model and buffers)
        gpu_mem_mb             GPU memory the measuring process held (nvidia-smi), MiB; null on CPU
        input_sha256           digest of the exact array fed: equal for every contender of a case
    skipped       [{backend, precision, reason, tower?, batch?, seq_len?}]: what was not measured, and why
    notes         [str]: caveats that apply to the figures
    end_to_end    (with --end-to-end N) {images, image_size, megapixels, batch, threads, rounds, session,
                   images_per_s: {exact, fast_decode}, fast_decode_cos_min, fast_decode_cos_mean}
    files         {json, markdown, png}: where the reports were written

Timing: ``time.perf_counter`` around each call for CPU contenders and for runtime calls that return
host arrays (synchronous); CUDA events with a synchronize for PyTorch on a GPU. Every contender takes
host (numpy) inputs and returns host outputs, so all pay for the same copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdeploy.benchmarks.contenders import precision_rank, report_order
from clipdeploy.benchmarks.end_to_end import describe as end_to_end_lines
from clipdeploy.artifact.manifest import atomic_write_text

REPORT_DOC_HINT = "Each model's `bench.json` follows the schema `clipdeploy-bench/1`, given at the end of this page."


def schema_doc() -> str:
    """The JSON schema and timing notes of this module's docstring, for generated pages."""
    doc = __doc__ or ""
    return doc[doc.index("JSON schema") :].strip()


# Issue #14's goal for the default CPU path (what ``clipdeploy.load(dir)`` picks on the machine), ViT-B-32 image
# tower at batch 8, against the best peer and PyTorch eager fp32 in the same run.
GOAL_MODEL, GOAL_BATCH = "ViT-B-32", 8
GOAL_PEER, GOAL_EAGER, GOAL_COSINE = 1.8, 4.5, 0.999

_TOWER_ORDER = {"image": 0, "text": 1}


def _backend_rank(backend: str) -> int:
    # The registry's order, read at each call: a backend registered later sorts in too; unknown ones last.
    order = report_order()
    return order.index(backend) if backend in order else len(order)


def contender_label(rec: dict[str, Any]) -> str:
    label = f"{rec['backend']} {rec['precision']}"
    return label + " (peer)" if rec.get("role") == "peer" else label


def sort_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return (
        _TOWER_ORDER.get(rec["tower"], 9),
        -(rec.get("seq_len") or 0),
        _backend_rank(rec["backend"]),
        precision_rank(rec["precision"]),
        rec["batch"],
    )


def _fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _fmt_speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_cos(x: float | None) -> str:
    return "-" if x is None else f"{x:.5f}"


def _length(rec: dict[str, Any]) -> str:
    return "-" if rec.get("seq_len") is None else str(rec["seq_len"])


_COLUMNS = (
    "tower",
    "contender",
    "tokens",
    "batch",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "items/s",
    "vs torch fp32",
    "best peer",
    "vs best peer",
    "cos min",
    "peak RSS MiB",
)
_GPU_COLUMN = "GPU MiB"


def _columns(report: dict[str, Any]) -> tuple[str, ...]:
    has_gpu = any(r.get("gpu_mem_mb") is not None for r in report["records"])
    return _COLUMNS + ((_GPU_COLUMN,) if has_gpu else ())


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row of cells per record, in the order of ``_columns(report)``."""
    gpu = _GPU_COLUMN in _columns(report)
    rows = []
    for rec in sorted(report["records"], key=sort_key):
        row = [
            rec["tower"],
            contender_label(rec),
            _length(rec),
            str(rec["batch"]),
            _fmt_ms(rec["p50_ms"]),
            _fmt_ms(rec["p90_ms"]),
            _fmt_ms(rec["p99_ms"]),
            _fmt_rate(rec["items_per_s"]),
            _fmt_speedup(rec.get("speedup_vs_torch_fp32")),
            rec.get("best_peer") or "-",
            _fmt_speedup(rec.get("speedup_vs_best_peer")),
            _fmt_cos(rec.get("cos_min")),
            _mib(rec.get("peak_rss_mb")),
        ]
        rows.append(row + [_mib(rec.get("gpu_mem_mb"))] if gpu else row)
    return rows


def terminal_table(report: dict[str, Any]) -> str:
    """An aligned plain-text table of every record, with the skipped contenders and notes below."""
    columns = _columns(report)
    rows = table_rows(report)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    cfg = report["config"]
    out = [
        f"{report['artifact']['model']} ({report['artifact']['weights']}) on {report['machine']}",
        f"{cfg['threads']} threads, {cfg['device']}, "
        f"{cfg['warmup']} warm-up + up to {cfg['iters']} timed calls per case",
        line(columns),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows]
    out += _footer(report, bullet="  ")
    return "\n".join(out)


def _footer(report: dict[str, Any], bullet: str) -> list[str]:
    lines = []
    goal = goal_section(report)
    if goal and bullet == "  ":  # the Markdown report has it as its own paragraph
        lines.append(goal.replace("**", ""))
    if report.get("end_to_end"):
        head, *rest = end_to_end_lines(report["end_to_end"])
        lines += [head] + [f"{bullet}{ln}" for ln in rest]
    skipped = report.get("skipped") or []
    if skipped:
        lines.append("not measured:")
        for s in skipped:
            where = " ".join(
                x
                for x in (
                    s.get("tower", ""),
                    f"batch {s['batch']}" if s.get("batch") else "",
                    f"length {s['seq_len']}" if s.get("seq_len") else "",
                )
                if x
            )
            lines.append(f"{bullet}{s['backend']} {s['precision']}{f' ({where})' if where else ''}: {s['reason']}")
    if report.get("notes"):
        lines.append("notes:")
        lines += [f"{bullet}{n}" for n in report["notes"]]
    return lines


def markdown_table(report: dict[str, Any]) -> str:
    """The records as one Markdown table (no heading)."""
    columns = _columns(report)
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    rows = ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    return "\n".join([head, sep, *rows])


def markdown(report: dict[str, Any], *, heading_level: int = 2, plot: str | None = None) -> str:
    """A Markdown section: what ran where, the table, the plot if given, what was not measured, notes."""
    h = "#" * heading_level
    cfg, env, art = report["config"], report["environment"], report["artifact"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [
        f"{h} {art['model']} on {report['machine']}",
        "",
        f"- weights: {art['weights']}; measured {report['created']}",
        f"- {cfg['threads']} threads per contender (intra-op; inter-op 1) on {env.get('available_cores')} available "
        f"cores; device {cfg['device']}; ONNX Runtime graph optimization `{cfg['graph_optimization_level']}`",
        f"- per case: {cfg['warmup']} warm-up calls, then up to {cfg['iters']} timed calls"
        + (f" or {cfg['max_seconds']:g} s" if cfg.get("max_seconds") else ""),
        f"- inputs: {len(report['inputs']['images'])} bundled photographs and {report['inputs']['prompts']} bundled "
        "prompts, repeated to the batch, identical for every contender; `tokens` is the text length fed",
        f"- CPU: {env.get('cpu', '?')}; instruction sets: {', '.join(env.get('cpu_flags') or []) or 'unknown'}",
        f"- versions: {versions}",
        "",
        markdown_table(report),
        "",
    ]
    if plot:
        lines += [f"![latency against batch size]({plot})", ""]
    goal = goal_section(report)
    if goal:
        lines += [goal, ""]
    for ln in _footer(report, bullet="- "):
        lines += [ln] if ln.startswith("- ") else ["", f"**{ln[:-1].capitalize()}:**", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def goal_section(report: dict[str, Any]) -> str | None:
    """Whether issue #14's goal holds in this run for the path ``clipdeploy.load(dir)`` picks on this machine
    (``report["default_path"]``), from the measured figures; None where the goal does not apply."""
    if report["artifact"]["model"] != GOAL_MODEL or report["config"]["device"] != "cpu":
        return None
    default = report.get("default_path") or {}
    backend, precision = default.get("backend"), (default.get("precision") or {}).get("image")
    path = f"{backend} {precision}" if backend and precision else "unknown"
    head = (
        f"**Goal** (issue #14: the default CPU path, here {path}, what `clipdeploy.load(dir)` picks on this machine; "
        f"{GOAL_MODEL} image tower, batch {GOAL_BATCH}, >= {GOAL_PEER:g}x the best peer, >= {GOAL_EAGER:g}x PyTorch "
        f"eager, cosine >= {GOAL_COSINE:g}):"
    )
    if path == "unknown":
        return f"{head} not measured: {default.get('error') or 'the run did not record what load() picks here'}"
    rec = next(
        (
            r
            for r in report["records"]
            if r["tower"] == "image" and r["role"] == "clipdeploy" and r["backend"] == backend
            and r["precision"] == precision and r["batch"] == GOAL_BATCH
        ),
        None,
    )
    if rec is None:
        return (f"{head} not measured: no {path} image record at batch {GOAL_BATCH}; "
                f"measure it with --backends {backend} --batch {GOAL_BATCH}")
    checks = [
        ("vs best peer", rec.get("speedup_vs_best_peer"), GOAL_PEER, "x"),
        ("vs PyTorch eager", rec.get("speedup_vs_torch_fp32"), GOAL_EAGER, "x"),
        ("cosine vs PyTorch", rec.get("cos_min"), GOAL_COSINE, ""),
    ]
    parts = []
    for name, got, need, unit in checks:
        if got is None:
            parts.append(f"{name}: not measured")
        else:
            shown = f"{got:.2f}{unit}" if unit else f"{got:.5f}"
            parts.append(f"{name} {shown} ({'met' if got >= need else 'missed'})")
    held = all(got is not None and got >= need for _, got, need, _ in checks)
    peer = f"best peer {rec.get('best_peer')}; " if rec.get("best_peer") else ""
    return f"{head} {'holds' if held else 'does not hold'}: {peer}{'; '.join(parts)}"


def summary_rows(reports: list[dict[str, Any]], batch: int) -> list[str]:
    """A Markdown table of every model's records at one batch size."""
    lines = [
        "| model | tower | contender | tokens | p50 ms | items/s | vs torch fp32 | cos min |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        for rec in sorted(report["records"], key=sort_key):
            if rec["batch"] != batch:
                continue
            lines.append(
                f"| {report['artifact']['model']} | {rec['tower']} | {contender_label(rec)} | {_length(rec)} | "
                f"{_fmt_ms(rec['p50_ms'])} | {_fmt_rate(rec['items_per_s'])} | "
                f"{_fmt_speedup(rec.get('speedup_vs_torch_fp32'))} | {_fmt_cos(rec.get('cos_min'))} |"
            )
    return lines


def plot_latency(report: dict[str, Any], path: Path) -> Path | None:
    """PNG of median latency against batch size per contender, both axes log; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    records = sorted(report["records"], key=sort_key)
    towers = [t for t in ("image", "text") if any(r["tower"] == t for r in records)]
    if not towers:
        return None
    fig, axes = plt.subplots(1, len(towers), figsize=(6.5 * len(towers), 4.8), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["tower"] == tower:
                name = contender_label(r) + (f", {r['seq_len']} tokens" if r.get("seq_len") else "")
                series.setdefault(name, []).append(r)
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["batch"])
            style = "--" if rs[0]["backend"].startswith("torch") else "-"
            ax.plot([r["batch"] for r in rs], [r["p50_ms"] for r in rs], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        batches = sorted({r["batch"] for r in records})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("median latency per call (ms)")
        ax.set_title(f"{tower} tower")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['artifact']['model']} on {report['machine']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_reports(report: dict[str, Any], out: Path) -> dict[str, str | None]:
    """Write bench.json, bench.md and bench.png into ``out``; returns their paths (png None without matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    png = plot_latency(report, out / "bench.png")
    files = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"), "png": str(png) if png else None}
    atomic_write_text(out / "bench.md", markdown(report, heading_level=1, plot="bench.png" if png else None))
    atomic_write_text(out / "bench.json", json.dumps({**report, "files": files}, indent=2) + "\n")
    return files
