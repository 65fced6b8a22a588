"""Trial: ONNX Runtime int8 with and without ``session.x64quantprecision=1`` (the exact U8U8 path), against fp32.

    python tools/ort_int8_flag_trial.py ARTIFACT --tower image --batch 8 --threads 2 --rounds 20

Opens three sessions of one tower at once: the fp32 file, the int8 file with the flag, and the int8 file
with ONNX Runtime's defaults. Feeds the bundled photographs (the artifact's own preprocessing), repeated
to the batch, or the bundled prompts for the text tower. Prints the CPU and its int8 dot-product flags, each
session's median and p90 over round-robin timed calls (all three open, alternating, graph optimizations
"all"), the ratio to the flagged int8, and the minimum cosine of each against fp32.
A measurement tool, not part of clipdeploy: clipdeploy sets the flag only on CPUs without VNNI.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--tower", choices=("image", "text"), default="image")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    import onnxruntime as ort  # here, not at the top: a tool run by hand

    import clipdeploy
    from clipdeploy import cpu_features
    from clipdeploy.calibration.bundled import sample_images, sample_prompts

    session = clipdeploy.load(args.artifact, backend="onnxruntime", precision="fp32")
    if args.tower == "image":
        x = session.preprocess(sample_images())
    else:
        x = session.tokenize(sample_prompts())
    x = np.concatenate([x] * (args.batch // len(x) + 1))[: args.batch]
    files = {v.precision: args.artifact / v.file for v in _variants(args.artifact, args.tower)}

    def make(path: Path, flag: bool) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if flag:
            so.add_session_config_entry("session.x64quantprecision", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {
        "fp32": make(files["fp32"], False),
        "int8, x64quantprecision=1": make(files["int8"], True),
        "int8, ONNX Runtime default": make(files["int8"], False),
    }
    name = sessions["fp32"].get_inputs()[0].name
    outs = {k: s.run(None, {name: x})[0] for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(args.warmup + args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {name: x})
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t)

    vnni = sorted(cpu_features.VNNI_FLAGS & cpu_features.flags())
    print(f"{_cpu()}; int8 dot-product flags: {', '.join(vnni) or 'none (no VNNI)'}; ONNX Runtime {ort.__version__}")
    print(f"{args.tower} tower, batch {args.batch}, {args.threads} threads, {args.rounds} round-robin rounds "
          f"after {args.warmup} warm-up")
    ref = outs["fp32"]
    flagged = statistics.median(times["int8, x64quantprecision=1"])
    print(f"| session | p50 ms | p90 ms | flagged int8 / this | cosine min vs fp32 |\n|---|---:|---:|---:|---:|")
    for k, ts in times.items():
        a = outs[k]
        cos = (a * ref).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)
        p50, p90 = statistics.median(ts) * 1e3, float(np.percentile(ts, 90)) * 1e3
        print(f"| {k} | {p50:.1f} | {p90:.1f} | {flagged * 1e3 / p50:.2f}x | {cos.min():.5f} |")
    a, b = outs["int8, x64quantprecision=1"], outs["int8, ONNX Runtime default"]
    print(f"int8 default vs int8 flagged: max abs diff {np.abs(a - b).max():.2e}")


def _variants(root: Path, tower: str) -> list:
    from clipdeploy.artifact.manifest import read_manifest, variants

    return [v for v in variants(read_manifest(root)) if v.tower == tower and v.format == "onnx" and v.accepted]


if __name__ == "__main__":
    main()
