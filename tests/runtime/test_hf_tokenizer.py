"""Token-id parity between clipdeploy's torch-free HfTokenizer and open_clip's own HFTokenizer path.

No hub here: each tokenizer kind open_clip uses (CLIPA's BERT WordPiece with strip_sep_token,
roberta's byte-level BPE, xlm-roberta / xlm-v and nllb Unigram, mT5 and SigLIP's T5 Unigram, SigLIP2's
Gemma) is trained locally on a tiny corpus with the ``tokenizers`` package, wrapped in the same
transformers class the real one uses, saved with ``save_pretrained`` and loaded by open_clip's
``HFTokenizer`` exactly as ``open_clip.get_tokenizer`` would load it from the hub. The exporter then
writes it into an artifact and the runtime must give the same ids on the hard-string corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers", reason="open_clip's HFTokenizer needs transformers")
tokenizers = pytest.importorskip("tokenizers")
oc_tok = pytest.importorskip("open_clip.tokenizer")

from clipdeploy.errors import ArtifactError  # noqa: E402
from clipdeploy.export.tokenizer_assets import describe_tokenizer  # noqa: E402
from clipdeploy.runtime.text.hf import HfTokenizer  # noqa: E402
from clipdeploy.runtime.text import load_tokenizer  # noqa: E402

from tests.runtime.test_tokenizer import CORPUS  # noqa: E402  (the hard-string corpus, shared with the BPE tests)

from tests.support import hf_tokenizers  # noqa: E402
from tests.support.hf_tokenizers import Kind  # noqa: E402

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
hf_tokenizers.EXTRA_TRAIN[:] = CORPUS
KINDS = hf_tokenizers.KINDS


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {k.name: hf_tokenizers.hf_folder(k, root) for k in KINDS}


def _open_clip_tokenizer(kind: Kind, folder: Path) -> oc_tok.HFTokenizer:
    # What open_clip.get_tokenizer builds for a model config with hf_tokenizer_name and tokenizer_kwargs.
    kwargs = {"clean": kind.clean}
    if kind.strip_sep_token:
        kwargs["strip_sep_token"] = True
    return oc_tok.HFTokenizer(str(folder), context_length=kind.context_length, **kwargs)


def _exported(kind: Kind, folder: Path, root: Path) -> tuple[dict, HfTokenizer, oc_tok.HFTokenizer]:
    ref = _open_clip_tokenizer(kind, folder)
    entry = describe_tokenizer(ref, root)
    return entry, load_tokenizer(json.loads(json.dumps(entry)), root), ref


def _ref_ids(ref, texts, context_length=None):
    try:
        return ref(texts, context_length=context_length).numpy()
    except Exception as e:  # a text open_clip itself cannot tokenize: ours must refuse it too
        return e


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_parity_on_hard_corpus(kind, folders, tmp_path):
    entry, ours, ref = _exported(kind, folders[kind.name], tmp_path)
    assert entry["kind"] == "hf-tokenizers" and entry["clean"] == kind.clean
    assert entry["strip_sep_token"] is kind.strip_sep_token
    same = refused = 0
    for text in CORPUS:
        want = _ref_ids(ref, [text])
        if isinstance(want, Exception):
            with pytest.raises(Exception):
                ours([text])
            same += 1
            refused += 1
            continue
        got = ours([text])
        assert got.dtype == np.int64 and got.shape == want.shape == (1, kind.context_length)
        np.testing.assert_array_equal(got, want, err_msg=f"{kind.name}: {text!r}")
        same += 1
    printable = [t for t in CORPUS if not isinstance(_ref_ids(ref, [t]), Exception)]
    np.testing.assert_array_equal(ours(printable), _ref_ids(ref, printable))
    print(f"{kind.name} ({kind.used_by}): {same}/{len(CORPUS)} texts identical ({refused} refused by both)")


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize("context_length", [4, 16])
def test_parity_call_time_context_length(kind, context_length, folders, tmp_path):
    _, ours, ref = _exported(kind, folders[kind.name], tmp_path)
    texts = [t for t in CORPUS if not isinstance(_ref_ids(ref, [t]), Exception)]
    np.testing.assert_array_equal(ours(texts, context_length=context_length), _ref_ids(ref, texts, context_length))


def test_strip_sep_token_really_strips(folders, tmp_path):
    kind = KINDS[0]
    entry, ours, _ = _exported(kind, folders[kind.name], tmp_path)
    ids = ours(["a photo of a cat"])
    assert entry["sep_token_id"] not in ids
    assert ids[0, 0] == json.loads((folders[kind.name] / "tokenizer.json").read_text())["post_processor"][
        "special_tokens"]["[CLS]"]["ids"][0]


def test_siglip_tokenizer_class_path(folders, tmp_path):
    """open_clip's SigLipTokenizer (name-based fallback): canonicalize + basic_clean, then the HF tokenizer."""
    kind = next(k for k in KINDS if k.name == "siglip-t5")
    ref = object.__new__(oc_tok.SigLipTokenizer)  # its __init__ downloads a sentencepiece file
    ref.tokenizer = _open_clip_tokenizer(kind, folders[kind.name]).tokenizer
    ref.context_length = 64
    entry = describe_tokenizer(ref, tmp_path)
    assert entry["clean"] == "canonicalize"
    ours = load_tokenizer(entry, tmp_path)
    texts = [t for t in CORPUS if not isinstance(_ref_ids(ref, [t]), Exception)]
    np.testing.assert_array_equal(ours(texts), ref(texts).numpy())


def test_missing_tokenizer_entry_refuses_with_the_fix(tmp_path):
    missing = {"hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "reason": "OSError: offline",
               "fix": "re-export with --tokenizer-dir DIR"}
    entry = describe_tokenizer(None, tmp_path, missing=missing, context_length=64)
    assert entry["missing"] == missing and entry["context_length"] == 64
    with pytest.raises(ArtifactError, match=r"timm/ViT-B-16-SigLIP.*--tokenizer-dir") as info:
        load_tokenizer(entry, tmp_path)
    assert "\n" not in str(info.value)


def test_tokenizer_mode_clips_is_refused(folders, tmp_path):
    from clipdeploy.errors import ExportError

    ref = _open_clip_tokenizer(KINDS[0], folders[KINDS[0].name])
    ref.tokenizer_mode = "clips"
    with pytest.raises(ExportError, match="tokenizer_mode 'clips'"):
        describe_tokenizer(ref, tmp_path)


def test_runtime_hf_tokenizer_does_not_import_torch(folders, tmp_path):
    kind = KINDS[1]
    entry, _, _ = _exported(kind, folders[kind.name], tmp_path)
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from clipdeploy.runtime.text import load_tokenizer
        tok = load_tokenizer(json.loads({json.dumps(json.dumps(entry))}), Path({str(tmp_path)!r}))
        assert tok(["a photo of a cat"]).shape == (1, 77)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "transformers"))
        print("LOADED", bad)
        sys.exit(1 if bad else 0)
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pickle_round_trip(folders, tmp_path):
    import pickle

    kind = KINDS[2]
    _, ours, _ = _exported(kind, folders[kind.name], tmp_path)
    clone = pickle.loads(pickle.dumps(ours))
    np.testing.assert_array_equal(clone(CORPUS), ours(CORPUS))
    assert clone.encode("a cat") == ours.encode("a cat")


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_truncated_names_the_texts_the_tokenizer_cuts(kind, folders, tmp_path):
    # The reference: the tokenizers library's own overflow record, on texts that cleaning leaves alone.
    _, ours, _ = _exported(kind, folders[kind.name], tmp_path)
    length = 16
    texts = ["a cat " * n for n in range(1, 24)]
    plain = tokenizers.Tokenizer.from_file(str(ours.path))
    plain.enable_truncation(length, direction=ours.truncation_side)
    expected = [i for i, t in enumerate(texts) if plain.encode(t.strip()).overflowing]
    assert 0 < len(expected) < len(texts), expected  # both kinds of text are present
    assert ours.truncated(texts, context_length=length) == expected
