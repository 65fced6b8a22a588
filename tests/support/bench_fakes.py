"""Synthetic benchmark reports for report and matrix tests."""

from __future__ import annotations


def _record(tower, backend, precision, batch, seq_len, p50, role="clipdeploy", speedup=None, cos=0.99999):
    return {
        "tower": tower,
        "backend": backend,
        "precision": precision,
        "device": "cpu",
        "role": role,
        "batch": batch,
        "seq_len": seq_len,
        "iters": 10,
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p99_ms": p50 * 1.2,
        "mean_ms": p50 * 1.05,
        "std_ms": 0.1,
        "min_ms": p50 * 0.9,
        "max_ms": p50 * 1.3,
        "items_per_s": batch / (p50 * 1.05 / 1e3),
        "cos_min": cos,
        "cos_mean": cos,
        "speedup_vs_torch_fp32": speedup,
        "peak_rss_mb": 321.0,
        "gpu_mem_mb": None,
        "input_sha256": "ab" * 32,
    }


def make_report(model="ViT-T", short_speedup=12.5):
    """A synthetic report with PyTorch, ONNX Runtime fp32 and int8, both towers, text at two lengths."""
    records = []
    for b in (1, 8):
        records.append(_record("image", "torch", "fp32", b, None, 10.0 * b, role="reference", speedup=1.0, cos=1.0))
        records.append(_record("image", "onnxruntime", "fp32", b, None, 4.0 * b, speedup=2.5))
        records.append(_record("image", "onnxruntime", "int8", b, None, 2.0 * b, speedup=5.0, cos=0.995))
        records.append(_record("text", "torch", "fp32", b, 77, 5.0 * b, role="reference", speedup=1.0, cos=1.0))
        records.append(_record("text", "torch", "fp32", b, 12, 1.0 * b, role="reference", speedup=5.0, cos=1.0))
        records.append(_record("text", "onnxruntime", "fp32", b, 77, 2.0 * b, speedup=2.5))
        records.append(_record("text", "onnxruntime", "fp32", b, 12, 0.4 * b, speedup=short_speedup))
    return {
        "schema": "clipdeploy-bench/1",
        "created": "2026-01-01T00:00:00+00:00",
        "machine": "Test CPU, 2 cores, 8 GB",
        "artifact": {
            "path": "/x",
            "model": model,
            "weights": "random weights (seed 0)",
            "text_input_shape": ["batch", "sequence"],
        },
        "config": {
            "backends": ["torch", "onnxruntime"],
            "precisions": None,
            "batches": [1, 8],
            "towers": ["image", "text"],
            "text_lengths": [77, 12],
            "iters": 10,
            "warmup": 2,
            "max_seconds": None,
            "min_iters": 3,
            "threads": 2,
            "device": "cpu",
            "graph_optimization_level": "all",
            "isolated": True,
        },
        "environment": {"cpu": "Test CPU", "available_cores": 2, "versions": {"numpy": "2"}, "gpus": []},
        "inputs": {"images": ["a.jpg"], "prompts": 16, "context_length": 77, "prompt_length": 12},
        "contenders": [],
        "records": records,
        "skipped": [{"backend": "tensorrt", "precision": "fp16", "reason": "needs an NVIDIA GPU"}],
        "notes": ["a note"],
    }
