"""The runtime session API on a small exported model: shapes, batching, scores, threads, refusals."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.errors import ArtifactError, InputError, UsageError
from clipdeploy.artifact.manifest import MANIFEST_NAME, SCHEMA_VERSION

from tests.support.cpus import auto_cpu_backend, use_cpu
from tests.support.models import MODELS

pytest.importorskip("onnxruntime")

SAMPLES = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def session(micro_artifact):
    return clipdeploy.load(micro_artifact.path, backend="onnxruntime", intra_op_num_threads=1)


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_encoders_return_normalized_float32(session):
    img = session.encode_image(SAMPLES[:3])
    txt = session.encode_text(["a cat", "a dog"])
    assert img.shape == (3, session.embed_dim) and img.dtype == np.float32
    assert txt.shape == (2, session.embed_dim) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
    raw = session.encode_text(["a cat", "a dog"], normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), txt, rtol=1e-5, atol=1e-6)


def test_inputs_of_every_kind_give_the_same_embedding(session):
    from PIL import Image

    path = SAMPLES[0]
    by_path = session.encode_image(path)
    by_str = session.encode_image(str(path))
    by_bytes = session.encode_image(path.read_bytes())
    by_pil = session.encode_image(Image.open(path))
    by_pixels = session.encode_pixels(session.preprocess([path]))
    for other in (by_str, by_bytes, by_pil, by_pixels):
        np.testing.assert_array_equal(by_path, other)
    by_tokens = session.encode_tokens(session.tokenize(["a cat"]).astype(np.int32))
    np.testing.assert_array_equal(by_tokens, session.encode_text("a cat"))


def test_any_batch_size_and_chunking_agree(session):
    many = SAMPLES * 3  # 24 images
    whole = session.encode_image(many)
    chunked = session.encode_image(many, batch_size=5)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    one = session.encode_image(many[:1])
    np.testing.assert_allclose(one[0], whole[0], rtol=1e-5, atol=1e-6)
    pixels = session.preprocess(many)
    np.testing.assert_allclose(session.encode_pixels(pixels, batch_size=7), whole, rtol=1e-5, atol=1e-6)


def test_similarity_uses_the_models_logit_scale(session):
    img = session.encode_image(SAMPLES[:2])
    txt = session.encode_text(["a cat", "a dog", "a car"])
    logits = session.similarity(img, txt, output="logits")
    np.testing.assert_allclose(logits, session.logit_scale * img @ txt.T, rtol=1e-5)
    probs = session.similarity(img, txt)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5)


def test_similarity_with_logit_bias_is_sigmoid(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)
    _edit_manifest(root, lambda m: m["model"].update(logit_bias=-10.0))
    s = clipdeploy.load(root, backend="onnxruntime")
    img, txt = s.encode_image(SAMPLES[:2]), s.encode_text(["a", "b", "c"])
    logits = s.logit_scale * img @ txt.T - 10.0
    np.testing.assert_allclose(s.similarity(img, txt), 1 / (1 + np.exp(-logits)), rtol=1e-5)


def test_session_is_safe_to_share_between_threads(session):
    texts = [f"photo number {i}" for i in range(12)]
    expected_txt = session.encode_text(texts)
    expected_img = session.encode_image(SAMPLES)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                np.testing.assert_allclose(session.encode_text(texts[i:] + texts[:i])[: 12 - i], expected_txt[i:], atol=1e-5)
                np.testing.assert_allclose(session.encode_image(SAMPLES), expected_img, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_describe_says_which_variant_runs(session):
    assert session.precision == {"image": "fp32", "text": "fp32"}
    assert "fp32 onnx on onnxruntime (CPUExecutionProvider)" in session.describe()


# ---- refusals -------------------------------------------------------------------------------------


def test_bad_inputs(session, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="broken.jpg"):
        session.encode_image([SAMPLES[0], bad])
    with pytest.raises(InputError, match="no texts given"):
        session.encode_text([])
    with pytest.raises(InputError, match="no images given"):
        session.encode_image([])
    with pytest.raises(InputError, match=r"shape \[2, 3, 32, 32\].*\[batch, 3, 64, 64\]"):
        session.encode_pixels(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="dtype"):
        session.encode_pixels(np.zeros((1, 3, 64, 64), np.int64))
    with pytest.raises(InputError, match="dtype"):
        session.encode_tokens(np.zeros((1, 77), np.float32))
    # The causal text tower takes any length up to the context length (dynamic "sequence" axis).
    too_long = np.zeros((1, 80), np.int64)
    too_long[0, 79] = 49407
    with pytest.raises(InputError, match=r"position 80, past the context length 77"):
        session.encode_tokens(too_long)
    with pytest.raises(InputError, match=r"shape \[10\]"):
        session.encode_tokens(np.zeros(10, np.int64))
    with pytest.raises(UsageError, match="output="):
        session.similarity(np.ones((1, 64)), np.ones((1, 64)), output="nope")


def test_unknown_backend_precision_and_options(micro_artifact):
    with pytest.raises(UsageError, match="backend 'onnx'"):
        clipdeploy.load(micro_artifact.path, backend="onnx")
    with pytest.raises(ArtifactError, match="no TensorRT engine of the image tower"):
        clipdeploy.load(micro_artifact.path, backend="tensorrt")
    with pytest.raises(ArtifactError, match=r"no int8 onnx variant of the image tower \(have: fp32\)"):
        clipdeploy.load(micro_artifact.path, precision="int8")
    with pytest.raises(UsageError, match="precision 'fp4'"):
        clipdeploy.load(micro_artifact.path, precision="fp4")
    with pytest.raises(UsageError, match="graph_optimization_level"):
        clipdeploy.load(micro_artifact.path, graph_optimization_level="max")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A torch-free two-tower artifact with fp32 and int8 variants (tests/support/tiny_artifact.py)."""
    pytest.importorskip("onnx")
    try:
        return MODELS["tiny-onnx"].make(tmp_path_factory.mktemp("tiny") / "artifact", precisions=("fp32", "int8"))
    except FileNotFoundError as e:
        pytest.skip(f"the tiny artifact needs {e}")


@pytest.mark.parametrize("kind", ["avx2", "amx"])  # auto keeps ONNX Runtime on one, may pick OpenVINO on the other
@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "openvino", "tensorrt"])
def test_an_option_no_backend_takes_is_refused_whichever_backend_runs(tiny, monkeypatch, tmp_path, kind, backend):
    use_cpu(monkeypatch, tmp_path, kind)
    bad = [
        ({"graph_optimization_level": "max"}, "graph_optimization_level 'max' is not one of"),
        ({"intra_op_num_threads": -1}, "intra_op_num_threads=-1 must be a non-negative integer"),
        ({"device": -1}, "device=-1 must be a CUDA device number"),
        ({"backend_options": {"openvino_performance_hint": "FAST"}}, "must be LATENCY or THROUGHPUT"),
        ({"backend_options": {"openvino_cach_dir": ""}},
         r"backend_options key 'openvino_cach_dir' is not read by any backend \(did you mean 'openvino_cache_dir'\?\)"),
    ]
    for kwargs, message in bad:
        with pytest.raises(UsageError, match=message):
            clipdeploy.load(tiny, backend=backend, **kwargs)
    # The same options with good values open (where the backend can run here).
    if backend in ("auto", "onnxruntime"):
        ok = clipdeploy.load(tiny, backend=backend, graph_optimization_level="basic", intra_op_num_threads=1,
                             backend_options={"openvino_cache_dir": ""})
        assert ok.backend == ("onnxruntime" if backend == "onnxruntime" else auto_cpu_backend()), ok.describe()


def test_missing_and_corrupt_manifest(micro_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        clipdeploy.load(tmp_path / "nowhere")
    root = _copy(micro_artifact.path, tmp_path)
    (root / MANIFEST_NAME).write_text("{ broken")
    with pytest.raises(ArtifactError, match="corrupt"):
        clipdeploy.load(root)
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="not a clipdeploy artifact"):
        clipdeploy.load(root)


def test_newer_schema_is_refused(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)
    major = int(SCHEMA_VERSION.split(".")[0])
    _edit_manifest(root, lambda m: m.update(schema_version=f"{major + 1}.0"))
    with pytest.raises(ArtifactError, match=r"newer than this clipdeploy reads.*pip install -U clipdeploy"):
        clipdeploy.load(root)
    _edit_manifest(root, lambda m: m.update(schema_version=f"{major}.99"))
    clipdeploy.load(root)  # a newer minor version only adds fields


def test_changed_onnx_file_fails_its_checksum(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)
    with open(root / "image.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"image.fp32.onnx.*sha256.*re-export"):
        clipdeploy.load(root)
    # Opting out of the checksum still gives a clear error when the file cannot be parsed.
    with pytest.raises(ArtifactError, match=r"cannot load .*image.fp32.onnx"):
        clipdeploy.load(root, verify=False)


def test_changed_tokenizer_file_fails_its_checksum(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)
    (vocab,) = (root / "tokenizer").iterdir()
    vocab.write_bytes(vocab.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"sha256"):
        clipdeploy.load(root)


def test_variant_that_failed_its_gate_is_not_picked(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)

    def fail_image(m):
        for v in m["variants"]:
            if v["tower"] == "image":
                v["validation"]["passed"] = False

    _edit_manifest(root, fail_image)
    with pytest.raises(ArtifactError, match="no accepted onnx variant of the image tower"):
        clipdeploy.load(root)
    with pytest.raises(ArtifactError, match="did not pass its accuracy gate"):
        clipdeploy.load(root, precision="fp32")


def test_the_token_limit_is_the_views_context_length(micro_artifact, tmp_path):
    """encode_tokens limits ids to ``view.context_length``: the text tower's, else the tokenizer's (before, a
    tower without its own record had no limit here at all)."""
    from clipdeploy.artifact.manifest import read_manifest, write_manifest

    art = _copy(micro_artifact.path, tmp_path)
    manifest = read_manifest(art)
    del manifest["towers"]["text"]["context_length"]
    manifest["tokenizer"]["context_length"] = 40  # what the view falls back to
    write_manifest(art, manifest)
    s = clipdeploy.load(art, backend="onnxruntime")
    assert s.view.text_is_dynamic and s.view.context_length == 40
    ids = np.zeros((1, 45), np.int64)
    ids[0, 44] = 49407
    with pytest.raises(InputError, match=r"position 45, past the context length 40"):
        s.encode_tokens(ids)
