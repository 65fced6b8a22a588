"""The coverage sweep: export every open_clip architecture, and write ``docs/coverage.md``.

    python tools/coverage.py                       # every architecture not yet in the cache
    python tools/coverage.py --models 'ViT-B-*' RN50 --rerun
    python tools/coverage.py --reduced-depth        # the giants at reduced depth too
    python tools/coverage.py --report-only          # rewrite the Markdown from the cache

A developer tool of the repository (not in the wheel): run it from the repository root, with
clipdeploy installed or ``PYTHONPATH=src``.

Each architecture is exported with random (seeded) weights in its own subprocess, through the same
``export_model`` and parity gate users run, into a temporary directory that is deleted afterwards.
Its figures go into a JSON cache (``docs/coverage.json``) as soon as it finishes, so a long sweep can
be stopped and resumed; the Markdown is regenerated from the cache after every model.

The hub is never reached (``HF_HUB_OFFLINE=1``): Hugging Face tokenizers that open_clip would fetch
are recorded as missing, and their text towers are checked on synthetic ids. Only the giants that
cannot fit in memory at full size (``GIANTS``) may run at reduced depth, and the report says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy.errors import ClipDeployError

# Relative to the working directory: run from the repository root.
DEFAULT_CACHE = Path("docs") / "coverage.json"
DEFAULT_REPORT = Path("docs") / "coverage.md"
# Architectures too large for a 24 GB machine at full size: the only ones proven at reduced depth.
GIANTS = ("EVA02-E-14", "EVA02-E-14-plus", "ViT-e-14")
REDUCED_DEPTH = 2  # transformer blocks per tower in a reduced-depth proof
DEFAULT_TIMEOUT = 3600  # seconds per architecture


def list_architectures() -> list[str]:
    from clipdeploy.export.loading import import_open_clip

    return list(import_open_clip().list_models())


def select(models: list[str], patterns: Sequence[str] | None) -> list[str]:
    """Architectures matching any pattern: an exact name, an fnmatch pattern, else a case-insensitive substring."""
    if not patterns:
        return models

    def hits(p: str) -> set[str]:
        if p in models:
            return {p}
        if any(c in p for c in "*?["):
            return {m for m in models if fnmatch.fnmatchcase(m, p)}
        return {m for m in models if p.lower() in m.lower()}

    chosen = set().union(*(hits(p) for p in patterns))
    return [m for m in models if m in chosen]


# Size words in open_clip names, smallest first: `--order size` runs the quick ones before the giants.
_SIZES = ("tiny", "-T-", "-S", "small", "-M-", "medium", "-B", "base", "-L", "large", "-H", "xlarge", "-g-",
          "SO400M", "gopt", "bigG", "xxlarge", "-E-", "-e-")


def size_order(models: list[str]) -> list[str]:
    """Architectures ordered by a rough size read from their names (unknown sizes go in the middle)."""

    def key(name: str) -> tuple[int, str]:
        ranks = [i for i, word in enumerate(_SIZES) if word in name]
        rank = max(ranks) if ranks else len(_SIZES) // 2
        return rank + (1 if any(r in name for r in ("-336", "-378", "-384", "-448", "-512", "_320")) else 0), name

    return sorted(models, key=key)


# ---- one architecture (runs in a subprocess) ----------------------------------------------------------


def run_one(model: str, *, reduced_depth: bool, workdir: Path) -> dict[str, Any]:
    """Export one architecture and return its coverage row; never raises for an export failure."""
    import resource

    from clipdeploy.errors import AccuracyError, ClipDeployError
    from clipdeploy.export.config import ExportConfig
    from clipdeploy.export.exporter import export_model
    depth = REDUCED_DEPTH if (reduced_depth and model in GIANTS) else None
    row: dict[str, Any] = {
        "model": model,
        "size": f"reduced depth ({depth} blocks)" if depth else "full size",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = workdir / "artifact"
    start = time.perf_counter()
    try:
        manifest = export_model(ExportConfig(model=model, output=out, seed=0, depth=depth))
        row.update(summarize(manifest))
        row["status"] = "passed"
    except AccuracyError as e:
        row.update(summarize({"validation": {"export": e.report}}))
        row["status"] = "failed"
        row["error"] = str(e)[:500]
    except ClipDeployError as e:
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    except Exception as e:  # a crash in torch.export or open_clip: recorded, the sweep goes on
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    shutil.rmtree(out, ignore_errors=True)
    return row


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """The figures of one export the report shows."""
    export = manifest.get("validation", {}).get("export", {}) or {}
    towers: dict[str, Any] = {}
    for tower in ("image", "text"):
        r = export.get(tower)
        if not isinstance(r, dict):
            continue
        towers[tower] = {
            "passed": bool(r.get("passed")),
            "min_cosine": r.get("min_cosine"),
            "max_abs_err": r.get("max_abs_err"),
            "abs_err_rel": r.get("abs_err_rel"),
        }
        if "original" in r:
            towers[tower]["vs_original_min_cosine"] = r["original"].get("min_cosine")
    row: dict[str, Any] = {"towers": towers}
    if "model" in manifest:
        tok = manifest.get("tokenizer", {})
        text = manifest.get("towers", {}).get("text", {})
        variants = manifest.get("variants", [])
        row.update(
            {
                "family": manifest["model"].get("family"),
                "parameters": manifest["model"].get("parameters"),
                "export_seconds": manifest.get("export_seconds"),
                "onnx_bytes": {v["tower"]: v.get("bytes") for v in variants},
                "external_data": any(v.get("external_data") for v in variants),
                "tokenizer": {
                    "kind": tok.get("kind"),
                    "name": tok.get("hf_tokenizer_name"),
                    "missing": bool(tok.get("missing")),
                    "mismatched": (export.get("tokenizer") or {}).get("mismatched"),
                },
                "pooling": text.get("pooling"),
                "padding": text.get("padding"),
                "text_input": (text.get("inputs") or [{}])[0].get("shape"),
                "logit_bias": manifest["model"].get("logit_bias") is not None,
            }
        )
    return row


# ---- the sweep ---------------------------------------------------------------------------------------


def load_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"rows": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def save_cache(path: Path, cache: dict[str, Any]) -> None:
    from clipdeploy.artifact.manifest import atomic_write_text

    atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")


def record_row(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Add one row to the cache on disk and return the whole cache. Reads, merges and writes under a
    file lock, so parallel workers, and several sweeps at once, never drop each other's rows."""
    import fcntl
    from importlib import metadata

    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        cache = load_cache(path)
        cache.setdefault("rows", {})[row["model"]] = row
        cache["open_clip"] = metadata.version("open_clip_torch")
        cache["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
        save_cache(path, cache)
    return cache


def _clipdeploy_path() -> str:
    """PYTHONPATH for the worker, which runs in a temporary directory: the clipdeploy this process uses."""
    import clipdeploy

    src = str(Path(clipdeploy.__file__).resolve().parent.parent)
    return os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])


def _run_in_subprocess(model: str, reduced_depth: bool, timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clipdeploy-coverage-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--row", str(result)]
        if reduced_depth:
            cmd.append("--reduced-depth")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": _clipdeploy_path()}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"model": model, "status": "error", "error": f"timed out after {timeout}s", "seconds": timeout}
        if proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT):
            raise KeyboardInterrupt  # Ctrl-C reached the worker too: nothing to record, resume redoes it
        if result.is_file():
            return json.loads(result.read_text(encoding="utf-8"))
        tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"model": model, "status": "error", "error": f"worker {why}: {tail}",
                "seconds": round(time.perf_counter() - start, 1)}


# Size ranks (in _SIZES) from which an export takes most of the machine's memory: with --jobs these
# run one at a time, after the lighter ones.
HEAVY_FROM = _SIZES.index("-H")


HEAVY_PARAMETERS = 0.6e9  # an estimate from the config above this takes 10 GB or more to export


def is_heavy(model: str) -> bool:
    """Whether exporting ``model`` needs most of a 24 GB machine: by its name, else by its config."""
    if any(word in model for word in _SIZES[HEAVY_FROM:]) or model in GIANTS:
        return True
    try:
        from clipdeploy.export.loading import import_open_clip

        cfg = import_open_clip().get_model_config(model)
    except Exception:
        cfg = None
    if not cfg:
        return True  # unknown size: run it alone
    return estimated_parameters(cfg) >= HEAVY_PARAMETERS


def estimated_parameters(cfg: dict[str, Any]) -> float:
    """A rough parameter count from an open_clip config: 12·layers·width² per transformer, the token
    embedding, and sizes read from the names of timm and Hugging Face towers."""
    named = {"xlarge": 0.7e9, "1.3B": 1.0e9, "-xl": 1.2e9, "large": 0.3e9, "so400m": 0.4e9}
    total = 0.0
    for tower in (cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}):
        layers, width = tower.get("layers"), tower.get("width")
        if isinstance(layers, int) and isinstance(width, int):
            total += 12 * layers * width**2
        elif isinstance(layers, list) and isinstance(width, int):  # ModifiedResNet: stages of bottlenecks
            total += sum(layers) * 17 * (width * 4) ** 2 / 4
        if isinstance(tower.get("vocab_size"), int) and isinstance(width, int):
            total += tower["vocab_size"] * width  # the worldwide models' 900k-token embedding is 0.7B alone
        name = str(tower.get("timm_model_name") or tower.get("hf_model_name") or "").lower()
        total += next((n for word, n in named.items() if word.lower() in name), 0.0)
    return total


def sweep(
    models: list[str], *, cache_path: Path, report_path: Path, reduced_depth: bool, rerun: bool, timeout: int,
    jobs: int = 1,
) -> dict[str, Any]:
    """Export each model not yet cached (or all with ``rerun``), saving the cache and report after each.

    With ``jobs`` > 1 the lighter architectures run that many at a time (tracing is mostly one
    thread, so two exports share two cores well); the heavy ones still run alone. Each row records
    how many exports ran beside it, since that stretches its wall time.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    cache = load_cache(cache_path)
    todo = [m for m in models if rerun or m not in cache.get("rows", {})]
    lock = threading.Lock()
    count = iter(range(1, len(todo) + 1))
    running: dict[str, int] = {}  # model -> the most exports seen running at once while it ran

    def one(model: str) -> None:
        nonlocal cache
        with lock:
            print(f"[{next(count)}/{len(todo)}] {model} ...", flush=True)
            running[model] = 0
            for m in running:
                running[m] = max(running[m], len(running))
        try:
            row = _run_in_subprocess(model, reduced_depth, timeout)
        except Exception as e:  # a broken worker result: recorded as an error, the sweep goes on
            row = {"model": model, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            with lock:
                concurrent = running.pop(model)
        row["concurrent_exports"] = concurrent
        with lock:
            cache = record_row(cache_path, row)
            write_report(cache, report_path)
            status = f"{row['status']} in {row.get('seconds', 0):.0f}s {row.get('error', '')[:160]}"
            print(f"    {model}: {status}", flush=True)

    light = [m for m in todo if not is_heavy(m)] if jobs > 1 else []
    if light:
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            for future in [pool.submit(one, m) for m in light]:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # queued models stay unrun, for a resume
            raise
        pool.shutdown()
    for model in todo:
        if model not in light:
            one(model)
    cache = load_cache(cache_path)
    write_report(cache, report_path)
    return cache


# ---- the report --------------------------------------------------------------------------------------


def _fmt_tower(t: dict[str, Any] | None) -> tuple[str, str, str]:
    if not t:
        return "-", "-", "-"
    status = "pass" if t.get("passed") else "FAIL"
    c = t.get("min_cosine")
    # Cosines this close to 1 read better as their distance from 1.
    cos = "-" if not isinstance(c, (int, float)) else (f"1 - {1 - c:.0e}" if 0.999999 <= c < 1 else f"{c:.7f}")
    err = f"{t['max_abs_err']:.1e}" if isinstance(t.get("max_abs_err"), (int, float)) else "-"
    return status, cos, err


def _fmt_mb(n: Any) -> str:
    return f"{n / 1e6:,.0f}" if isinstance(n, (int, float)) else "-"


def _tokenizer_cell(row: dict[str, Any]) -> str:
    tok = row.get("tokenizer") or {}
    kind = tok.get("kind") or "-"
    if kind == "openclip-bpe":
        return "openclip-bpe"
    name = tok.get("name") or ""
    if tok.get("missing"):
        return f"hf {name} (hub only: missing)"
    return f"hf {name}".strip()


def _memory_lines(passed: list[dict[str, Any]]) -> list[str]:
    """The largest full-size exports and the memory they took (peak RSS of the export process)."""
    big = sorted(
        (r for r in passed if r.get("size") == "full size" and isinstance(r.get("peak_rss_gb"), (int, float))),
        key=lambda r: -r["peak_rss_gb"],
    )[:5]
    if not big:
        return []
    parts = [
        f"{r['model']} ({(r.get('parameters') or 0) / 1e9:.2f}B parameters): {r['peak_rss_gb']:.1f} GB, "
        f"{r.get('export_seconds') or r.get('seconds')} s"
        for r in big
    ]
    return ["- largest full-size exports, peak memory and time: " + "; ".join(parts)]


def render(cache: dict[str, Any], architectures: list[str]) -> str:
    rows = cache.get("rows", {})
    done = [rows[m] for m in architectures if m in rows]
    passed = [r for r in done if r.get("status") == "passed"]
    full = [r for r in passed if r.get("size") == "full size"]
    reduced = [r for r in passed if r.get("size") != "full size"]
    tok_missing = [r for r in passed if (r.get("tokenizer") or {}).get("missing")]
    dynamic = [r for r in passed if r.get("padding") == "longest"]
    failed = [r for r in done if r.get("status") == "failed"]
    errors = [r for r in done if r.get("status") == "error"]
    lines = [
        "# Coverage: every open_clip architecture through `clipdeploy export`",
        "",
        "Regenerate with `python tools/coverage.py` (resumable: results are cached in "
        "`docs/coverage.json`; `--models PATTERN...` to pick, `--rerun` to redo, `--reduced-depth` for the giants, "
        "`--report-only` to rewrite this file, `--jobs 2` to run the lighter ones two at a time). "
        "Each row is one export with random seeded weights, checked against "
        "PyTorch on ONNX Runtime CPU by the export gate (min cosine >= 0.99999, max abs err <= 1e-4 of the largest "
        "reference value), at batch 1 and 8 and, for dynamic-length text towers, at every prompt's own length. "
        "Export seconds are wall time, including the parity check; † marks a row that shared the machine with "
        "another export (`--jobs`).",
        "",
        f"open_clip {cache.get('open_clip', '?')}, machine: {cache.get('machine', '?')}. The hub is not reachable here: "
        "Hugging Face tokenizers that open_clip fetches from it are recorded as missing, and those text towers are "
        "checked on synthetic ids (their tokenizers are proven separately, on locally built tokenizers, in "
        "`tests/runtime/test_hf_tokenizer.py`).",
        "",
        "## Totals",
        "",
        f"- architectures in open_clip: **{len(architectures)}**; run so far: **{len(done)}**; not run yet: "
        f"**{len(architectures) - len(done)}**",
        f"- both towers within tolerance: **{len(passed)}** ({len(full)} at full size, {len(reduced)} at reduced depth)",
        f"- failed the gate: **{len(failed)}**; could not export: **{len(errors)}**",
        f"- dynamic-length text (padding `longest`): {len(dynamic)}; tokenizer missing (hub only): {len(tok_missing)}",
        *_memory_lines(passed),
        "",
        "## Architectures",
        "",
        "| architecture | family | status | image | image min cos | image max err | text | text min cos | "
        "text max err | export s | ONNX MB (image / text) | tokenizer | pooling / padding | size | peak RSS GB |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for m in architectures:
        r = rows.get(m)
        if r is None:
            lines.append(f"| {m} | | not run | | | | | | | | | | | | |")
            continue
        towers = r.get("towers") or {}
        i_s, i_c, i_e = _fmt_tower(towers.get("image"))
        t_s, t_c, t_e = _fmt_tower(towers.get("text"))
        size = r.get("onnx_bytes") or {}
        onnx = f"{_fmt_mb(size.get('image'))} / {_fmt_mb(size.get('text'))}" + (" (ext. data)" if r.get("external_data") else "")
        pool = f"{r.get('pooling') or '-'} / {r.get('padding') or '-'}"
        secs = r.get("export_seconds") or r.get("seconds")
        if (r.get("concurrent_exports") or 1) > 1 and secs is not None:
            secs = f"{secs} †"
        status = r.get("status", "?")
        if status != "passed" and r.get("error"):
            status += ": " + " ".join(str(r["error"]).split())[:120].replace("|", "/")
        lines.append(
            f"| {m} | {r.get('family') or '-'} | {status} | {i_s} | {i_c} | {i_e} | {t_s} | {t_c} | {t_e} | "
            f"{secs if secs is not None else '-'} | {onnx} | {_tokenizer_cell(r)} | {pool} | {r.get('size', '-')} | "
            f"{r.get('peak_rss_gb', '-')} |"
        )
    return "\n".join(lines) + "\n"


def write_report(cache: dict[str, Any], path: Path) -> None:
    from clipdeploy.artifact.manifest import atomic_write_text

    try:
        architectures = list_architectures()
    except Exception:  # open_clip missing: report what the cache holds
        architectures = sorted(cache.get("rows", {}))
    atomic_write_text(path, render(cache, architectures))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", metavar="PATTERN", help="architectures to run (name, fnmatch or substring)")
    p.add_argument("--rerun", action="store_true", help="run again architectures already in the cache")
    p.add_argument("--reduced-depth", action="store_true", help=f"run the giants ({', '.join(GIANTS)}) at reduced depth")
    p.add_argument("--skip-giants", action="store_true", help="leave out the giants unless --reduced-depth")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="JSON results cache (default: docs/coverage.json)")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="Markdown report (default: docs/coverage.md)")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds per architecture")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the cache")
    p.add_argument("--order", choices=("name", "size"), default="name", help="run order (size: small models first)")
    p.add_argument("--jobs", type=int, default=1,
                   help="exports at a time for the lighter architectures (the heavy ones always run alone)")


def cmd_coverage(args: argparse.Namespace) -> int:
    if getattr(args, "worker", None):
        with tempfile.TemporaryDirectory(prefix="clipdeploy-coverage-") as tmp:
            row = run_one(args.worker, reduced_depth=args.reduced_depth, workdir=Path(tmp))
        from clipdeploy.artifact.manifest import atomic_write_text

        atomic_write_text(Path(args.row), json.dumps(row))
        return 0
    if args.report_only:
        write_report(load_cache(args.cache), args.report)
        print(f"wrote {args.report}")
        return 0
    models = select(list_architectures(), args.models)
    if args.order == "size":
        models = size_order(models)
    if args.skip_giants and not args.reduced_depth:
        models = [m for m in models if m not in GIANTS]
    if args.jobs < 1:
        print(f"--jobs {args.jobs} must be at least 1", file=sys.stderr)
        return 2
    if not models:
        print(f"no architecture matches {args.models}; see `clipdeploy models`", file=sys.stderr)
        return 2
    cache = sweep(
        models, cache_path=args.cache, report_path=args.report, reduced_depth=args.reduced_depth,
        rerun=args.rerun, timeout=args.timeout, jobs=args.jobs,
    )
    rows = [cache["rows"][m] for m in models if m in cache["rows"]]
    ok = sum(r.get("status") == "passed" for r in rows)
    print(f"{ok}/{len(rows)} passed; report: {args.report}")
    return 0 if ok == len(rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/coverage.py", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    try:
        return cmd_coverage(p.parse_args(argv))
    except ClipDeployError as e:
        print(f"coverage: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
