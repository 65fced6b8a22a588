"""Trial: onnxscript's ONNX Runtime fusions on an exported fp32 tower, for parity and speed on ONNX Runtime.

    python tools/ort_fusion_trial.py ARTIFACT/image.fp32.onnx --batch 8 --threads 2 --rounds 10

Writes the fused file beside a temporary copy, prints what was fused (onnxscript's counts and the fused
graph's contrib ops), the cosine of fused against unfused on one random batch, and the median of
round-robin timed calls of each (both sessions open at once, alternating, ORT graph optimizations "all").
A measurement tool, not part of clipdeploy: the export does not apply these fusions (see the report).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    import onnx_ir as ir  # here, not at the top: a tool run by hand, heavy imports only when it runs
    import onnxruntime as ort
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with tempfile.TemporaryDirectory(prefix="ort-fusion-") as tmp:
        fused_path = Path(tmp) / "fused.onnx"
        start = time.perf_counter()
        model = ir.load(str(args.model))
        model, counts = optimize_for_ort(model)
        ir.save(model, str(fused_path))
        print(f"optimize_for_ort: {time.perf_counter() - start:.1f} s; fusions applied: "
              f"{ {k: v for k, v in counts.items() if v} or 'none'}")
        ops = collections.Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
        print(f"com.microsoft ops in the fused graph: {dict(ops) or 'none'}")

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = {
            "unfused": ort.InferenceSession(str(args.model), so, providers=["CPUExecutionProvider"]),
            "fused": ort.InferenceSession(str(fused_path), so, providers=["CPUExecutionProvider"]),
        }
        inp = sessions["unfused"].get_inputs()[0]
        shape = [args.batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        outs = {k: s.run(None, {inp.name: x})[0] for k, s in sessions.items()}
        a, b = outs["unfused"], outs["fused"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"cosine fused vs unfused: min {cos.min():.7f}, max abs diff {np.abs(a - b).max():.2e}")

        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(args.warmup + args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {inp.name: x})
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"batch {args.batch}, {args.threads} threads, median of {args.rounds} round-robin calls: "
              f"unfused {med['unfused']:.1f} ms, fused {med['fused']:.1f} ms, "
              f"unfused/fused {med['unfused'] / med['fused']:.3f}x")


if __name__ == "__main__":
    main()
