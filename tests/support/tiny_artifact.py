"""A tiny artifact made without torch: two ONNX towers of a few nodes, and a real manifest.

Each tower computes ``out[i, j] = mean(x[i]) * (j + 1)``: the same function the contract fakes'
emulated engine computes, so a build -> validate -> load -> encode round trip can be checked on CPU.
The text tower's sequence axis is dynamic and named, as the exporter will make it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from clipdeploy.artifact.manifest import SCHEMA_VERSION, file_sha256

EMBED_DIM = 16
IMAGE_SIZE = 32
CONTEXT_LENGTH = 77


def expected(x: np.ndarray) -> np.ndarray:
    """What both towers compute, un-normalized."""
    row = x.reshape(len(x), -1).astype(np.float64).mean(axis=1)
    return (row[:, None] * np.arange(1, EMBED_DIM + 1)).astype(np.float32)


def _tower_model(input_name: str, dtype: int, shape: list, output_name: str) -> object:
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    x = input_name
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    axes = list(range(1, len(shape)))
    nodes += [
        helper.make_node("ReduceMean", [x, "axes"], ["m"], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),
        helper.make_node("Mul", ["m1", "w"], [output_name]),
    ]
    init = [
        numpy_helper.from_array(np.array(axes, np.int64), "axes"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.arange(1, EMBED_DIM + 1, dtype=np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        f"tiny-{input_name}",
        [helper.make_tensor_value_info(input_name, dtype, shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", EMBED_DIM])],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def bpe_vocab() -> Path | None:
    """open_clip's BPE vocabulary file, found without importing open_clip (and so torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def make_tiny_artifact(root: Path, precisions: tuple[str, ...] = ("fp32", "fp16")) -> Path:
    """Write the artifact at ``root``; each precision's ONNX is the same graph (the builder cannot tell)."""
    import onnx
    from onnx import TensorProto

    vocab = bpe_vocab()
    if vocab is None:
        raise FileNotFoundError("open_clip's bpe_simple_vocab_16e6.txt.gz (pip install 'clipdeploy[export]')")
    root.mkdir(parents=True)
    (root / "tokenizer").mkdir()
    shutil.copyfile(vocab, root / "tokenizer" / vocab.name)
    towers = {
        "image": ("pixel_values", TensorProto.FLOAT, "float32", ["batch", 3, IMAGE_SIZE, IMAGE_SIZE], "image_embeds"),
        "text": ("input_ids", TensorProto.INT64, "int64", ["batch", "sequence"], "text_embeds"),
    }
    variants = []
    for precision in precisions:
        for tower, (name, dtype, _, shape, out) in towers.items():
            path = root / f"{tower}.{precision}.onnx"
            onnx.save(_tower_model(name, dtype, shape, out), path)
            variants.append(
                {
                    "tower": tower,
                    "precision": precision,
                    "format": "onnx",
                    "file": path.name,
                    "sha256": file_sha256(path),
                    "bytes": path.stat().st_size,
                    "external_data": [],
                    "opset": 18,
                    "validation": {"passed": True},
                }
            )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": "tiny", "family": "test", "embed_dim": EMBED_DIM, "logit_scale": 100.0, "logit_bias": None},
        "towers": {
            tower: {
                "inputs": [{"name": name, "dtype": dtype_name, "shape": shape}],
                "outputs": [{"name": out, "dtype": "float32", "shape": ["batch", EMBED_DIM]}],
                "embed_dim": EMBED_DIM,
            }
            for tower, (name, _, dtype_name, shape, out) in towers.items()
        },
        "preprocess": {
            "size": [IMAGE_SIZE, IMAGE_SIZE],
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
        "tokenizer": {
            "kind": "openclip-bpe",
            "context_length": CONTEXT_LENGTH,
            "clean": "lower",
            "additional_special_tokens": None,
            "files": {"bpe_vocab": f"tokenizer/{vocab.name}"},
            "sot_token_id": 49406,
            "eot_token_id": 49407,
        },
        "variants": variants,
        "validation": {},
        "files": {f"tokenizer/{vocab.name}": file_sha256(root / "tokenizer" / vocab.name)},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def tiny_artifact_or_skip(folder: Path, precisions: tuple[str, ...] = ("fp32",)) -> Path:
    """``make_tiny_artifact(folder)`` for a fixture, or a skip that says what is missing."""
    import pytest

    pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")
    if bpe_vocab() is None:
        pytest.skip("open_clip's BPE vocabulary (the tiny artifact's tokenizer) is not installed")
    return make_tiny_artifact(folder, precisions=precisions)
