"""Building models offline: bundled HF text-tower configs, reduced depth for the giants, tokenizers."""

from __future__ import annotations

import pytest

from clipdeploy.errors import UsageError

pytest.importorskip("open_clip")
pytest.importorskip("torch")

from clipdeploy.export.loading import load_model  # noqa: E402


def test_reduced_depth_giant_builds_small():
    loaded = load_model("ViT-e-14", depth=1)
    assert len(loaded.model.visual.transformer.resblocks) == 1
    assert len(loaded.model.transformer.resblocks) == 1
    assert loaded.model.visual.transformer.width == 1792  # the same architecture, only shallower


def test_reduced_depth_timm_giant():
    loaded = load_model("EVA02-E-14", depth=1)
    assert len(loaded.model.visual.trunk.blocks) == 1


def test_reduced_depth_refuses_weights(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UsageError, match="reduced depth applies to random weights only"):
        load_model("ViT-e-14", depth=1, checkpoint=ckpt)


def test_hf_text_tower_builds_offline_from_the_bundled_config(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("xlm-roberta-base-ViT-B-32", depth=None)
    text = loaded.model.text
    assert type(text).__name__ == "HFTextEncoder"
    assert text.config.vocab_size == 250002 and text.config.hidden_size == 768
    assert loaded.source["hf_text_config"] == "bundled"
    assert loaded.tokenizer is None and loaded.tokenizer_missing["hf_tokenizer_name"] == "xlm-roberta-base"
    # The ids it gets are the tokenizer's (77), not its position table's length (514): a fact of the
    # loaded model, read once, and nothing written onto the torch module.
    assert text.config.max_position_embeddings == 514
    assert loaded.geometry.context_length == 77
    assert not [a for a in vars(loaded.model) if a.startswith("clipdeploy")]


# --- Checkpoints: read by clipdeploy with weights_only=True, never by a loader that may retry without it.

import collections  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from clipdeploy.errors import CheckpointError  # noqa: E402
from tests.support.testdata import MICRO_CONFIG  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt on which the weights-only unpickler raises TypeError before it reaches a code payload.

    The tensor rebuild is followed by a BUILD whose state makes ``Tensor.set_`` raise TypeError under
    weights_only (plain pickle calls ``Tensor.__setstate__`` instead, which accepts it), so a loader
    that retries without weights_only on TypeError, as open_clip's does, runs the payload next.
    """

    class BadRebuild:
        def __reduce__(self):
            storage = torch.zeros(1).untyped_storage()
            args = (torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True),
                    0, (1,), (1,), False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args, (False, None, collections.OrderedDict()))

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"bad": BadRebuild(), "payload": Payload()}, path)
    return path


def test_crafted_checkpoint_runs_no_code_even_when_torch_is_told_to_unpickle(tmp_path):
    marker = tmp_path / "code-ran"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-m", "clipdeploy.cli", "export", "micro-vit", "--model-config", str(MICRO_CONFIG),
         "--checkpoint", str(evil), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert not marker.exists(), "the checkpoint's payload ran"
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "evil.pt' is not a weights-only checkpoint: it holds Python objects (" in lines[0]
    assert "pathlib" in lines[0] and "re-save it with torch.save(model.state_dict(), f)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_weights_only_refusal_is_final_without_the_static_scan(tmp_path, monkeypatch):
    """The second layer alone: torch.load(weights_only=True) raises TypeError and nothing retries."""
    from clipdeploy.export import loading

    marker = tmp_path / "code-ran"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(loading, "_unsafe_globals", lambda torch, path: [])
    with pytest.raises(CheckpointError, match=r"not a weights-only checkpoint: the weights-only loader refused it "
                                              r"\(TypeError: set_\(\)"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=evil)
    assert not marker.exists()


@pytest.fixture(scope="module")
def micro_state():
    return load_model("micro-vit", model_config=MICRO_CONFIG, seed=3).model.state_dict()


def test_every_checkpoint_format_loads_the_same_tensors(tmp_path, micro_state):
    from safetensors.torch import save_file

    files = {
        "zip.pt": lambda p: torch.save(micro_state, p),
        "legacy.pt": lambda p: torch.save(micro_state, p, _use_new_zipfile_serialization=False),
        "weights.safetensors": lambda p: save_file({k: v.contiguous() for k, v in micro_state.items()}, p),
        # open_clip's training checkpoints, saved from DistributedDataParallel
        "train.pt": lambda p: torch.save(
            {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in micro_state.items()}}, p),
        "named.bin": lambda p: torch.save(micro_state, p),
    }
    for name, save in files.items():
        save(str(tmp_path / name))
        model = load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path / name, seed=9).model
        got = model.state_dict()
        assert all(torch.equal(got[k], micro_state[k]) for k in micro_state), name


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"bad.pt' is not a PyTorch or safetensors file"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=bad)


def test_truncated_checkpoint_says_so(tmp_path, micro_state):
    good, cut = tmp_path / "good.pt", tmp_path / "cut.pt"
    torch.save(micro_state, good)
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut.pt' is truncated or damaged"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=cut)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, micro_state):
    wrong = dict(micro_state)
    wrong["text_projection"] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"does not fit micro-vit: text_projection has shape \[3, 3\], "
                                              r"the model expects \[64, 64\]"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path / "w.pt")
    fewer = {k: v for k, v in micro_state.items() if k != "text_projection"}
    torch.save(fewer, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=r"does not fit micro-vit: it lacks 1 of the model's tensors "
                                              r"\(e.g. text_projection\)"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path / "f.pt")


def test_a_python_object_in_a_checkpoint_is_named(tmp_path, micro_state):
    import argparse

    torch.save({"state_dict": micro_state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match=r"not a weights-only checkpoint: it holds Python objects "
                                              r"\(argparse.Namespace\)"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path / "o.pt")


def test_directories_given_as_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory, not a file"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path)
    with pytest.raises(UsageError, match=r"model config .* is a directory, not a file"):
        load_model("micro-vit", model_config=tmp_path)


# --- --pretrained without network: one line at the first failure, no retries, no log flood.


def test_pretrained_without_network_fails_at_the_first_attempt(tmp_path, monkeypatch, caplog):
    http = pytest.importorskip("huggingface_hub.utils._http")
    # huggingface_hub >= 1.0 speaks httpx(2), older releases requests; both retry the same way.
    client = getattr(http, "httpx2", None) or getattr(http, "httpx", None)
    requests = getattr(http, "requests", None)
    refused = client.ConnectError if client is not None else getattr(requests, "ConnectionError", None)
    if refused is None or not hasattr(http, "get_session"):
        pytest.skip("huggingface_hub's HTTP layer is not the one this test stands in for")
    attempts, sleeps = [], []

    class NoNetwork:  # what the client raises when DNS fails (seen for real: errno -2)
        def request(self, method, url, **kw):
            attempts.append(url)
            raise refused("[Errno -2] Name or service not known")

        def stream(self, method, url, **kw):
            return self.request(method, url)

        def head(self, url, **kw):
            return self.request("HEAD", url)

        def get(self, url, **kw):
            return self.request("GET", url)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(http, "get_session", lambda: NoNetwork())
    monkeypatch.setattr(http.time, "sleep", lambda s: sleeps.append(s))
    caplog.set_level("WARNING")
    with pytest.raises(CheckpointError) as info:
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(info.value)
    assert "\n" not in message and "--checkpoint FILE" in message and "Name or service not known" in message
    assert sleeps == [], "retried with backoff"
    # No retries: per candidate file (safetensors, then .bin) the hub client makes its lookup and its
    # request once each; with the retries it made 12.
    assert len(set(attempts)) == 2 and len(attempts) <= 4, attempts
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]


def test_local_dir_weights_go_through_the_same_reader(tmp_path, micro_state, monkeypatch):
    import json

    from clipdeploy.export import loading

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(MICRO_CONFIG.read_text())}))
    torch.save(micro_state, folder / "open_clip_pytorch_model.bin")
    read = []
    real = loading.read_checkpoint
    monkeypatch.setattr(loading, "read_checkpoint", lambda path: read.append(path) or real(path))
    model = load_model(f"local-dir:{folder}").model
    assert read == [folder / "open_clip_pytorch_model.bin"]
    assert all(torch.equal(model.state_dict()[k], micro_state[k]) for k in micro_state)


def test_pretrained_weights_are_read_by_clipdeploy_with_the_tags_preprocessing(tmp_path, micro_state, monkeypatch):
    import open_clip
    import open_clip.pretrained

    from clipdeploy.export import loading

    weights = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in micro_state.items()}, str(weights))
    tag = {"hf_hub": "someone/micro/", "mean": (0.25, 0.5, 0.75), "std": (0.5, 0.5, 0.5), "quick_gelu": False}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "fake" else {})
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg: str(weights))
    read = []
    real = loading.read_checkpoint
    monkeypatch.setattr(loading, "read_checkpoint", lambda path: read.append(path) or real(path))
    model = load_model("micro-vit", model_config=MICRO_CONFIG, pretrained="fake").model
    assert read == [weights]
    assert all(torch.equal(model.state_dict()[k], micro_state[k]) for k in micro_state)
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.25, 0.5, 0.75)


def test_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    from clipdeploy.export import loading

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"PK\x03\x04")

    def denied(path):  # chmod cannot stop root, who runs CI here; the error is what an unreadable file gives
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loading, "file_sha256", denied)
    with pytest.raises(CheckpointError, match=r"w.pt' cannot be read \(Permission denied\); check its permissions"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=ckpt)


def test_torchscript_archive_is_refused_not_run(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match=r"scripted.pt' is not a weights-only checkpoint: it is a TorchScript"):
        load_model("micro-vit", model_config=MICRO_CONFIG, checkpoint=tmp_path / "scripted.pt")
