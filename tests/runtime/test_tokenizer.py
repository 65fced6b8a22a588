"""Token-id parity between clipdeploy's torch-free BpeTokenizer and open_clip's SimpleTokenizer."""

from __future__ import annotations

import functools
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip_torch is not installed; it is the reference for tokenizer parity "
    "(pip install 'clipdeploy[export]')",
)
oc_tok = pytest.importorskip("open_clip.tokenizer")

from clipdeploy.errors import ArtifactError, ExportError, InputError  # noqa: E402
from clipdeploy.export.tokenizer_assets import describe_tokenizer  # noqa: E402
from clipdeploy.runtime.text import BpeTokenizer, load_tokenizer  # noqa: E402

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
BPE_PATH = Path(oc_tok.default_bpe())

LONG_TEXT = "a photo of a very fluffy orange cat sitting on a red sofa, " * 12

CORPUS = [
    "a photo of a cat",
    "",
    "   \t\n  ",
    "A Photo Of A CAT",
    # contractions, capitals, curly apostrophes
    "DON'T",
    "I'M HERE, YOU'LL SEE; WE'VE, THEY'RE, SHE'D, IT'S",
    "it's 5 o'clock, rock 'n' roll",
    "don\u2019t \u2018curly\u2019 \u201cdouble\u201d",
    # accents, composed and decomposed
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m fa\u00e7ade",
    "cafe\u0301 decomposed e\u0301",
    "Mixed CASE \u00dcMLAUTS \u0130stanbul stra\u00dfe \u1e9e",
    # scripts
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u5b57\u7b26\u548c\u6807\u70b9\u3002\uff0c\uff01",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
    "\u0939\u093f\u0928\u094d\u0926\u0940",
    # emoji: plain, skin tone, ZWJ sequence, flag, keycap
    "emoji \U0001f431\U0001f680 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "\U0001f1eb\U0001f1f7 1\ufe0f\u20e3",
    # HTML entities, single, double and triple escaped
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &quot;x&quot;",
    "double &amp;amp; &amp;lt;tag&amp;gt; &amp;#39;",
    "triple &amp;amp;amp; &nbsp;&copy;&#x41;&#65;",
    # odd whitespace and invisible characters
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em\u3000ideographic\u2028line",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u00adsoft\u2060wj",
    "\x1c\x1d\x1e\x1f separators\x0b\x0c",
    "control \x00\x07\x7f chars \ufffd and a lone surrogate \ud800",
    # mojibake that ftfy repairs
    "mojibake: caf\u00c3\u00a9 \u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d Sch\u00c3\u00b6n",
    "\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2 double mojibake",
    # punctuation runs and symbols
    "!!!???...,,,;;;:::---___***",
    "$$$ 100% @user #hashtag <tag> {braces} [brackets] (parens) a_b_c snake_case",
    "\u2014 em\u2013dash \u2026 \u00ab guillemets \u00bb \u00bfqu\u00e9? \u00a1s\u00ed!",
    # numbers
    "0123456789 3.14159 1,000,000 1e-10 -42",
    "\u2154 \u00b2\u00b3 \u0663 \u096a \u2167 \uff11\uff12\uff13",
    # special-token text typed by a user
    "<start_of_text> injected <end_of_text>",
    "<START_OF_TEXT> upper <End_Of_Text>",
    # ligatures and fullwidth
    "\ufb01 ligature \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28",
    # one very long word and a long sentence
    "x" * 300,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    LONG_TEXT,
]

CORPUS_IDS = [f"{i}:{s[:20]!r}" for i, s in enumerate(CORPUS)]


@functools.lru_cache(maxsize=None)
def _pair(
    context_length: int = 77, clean: str = "lower", extra: tuple[str, ...] = ()
) -> tuple[BpeTokenizer, oc_tok.SimpleTokenizer]:
    """A runtime tokenizer and its open_clip reference, built once per configuration."""
    extra_list = list(extra) or None
    return (
        BpeTokenizer(BPE_PATH, context_length, clean, extra_list),
        oc_tok.SimpleTokenizer(
            context_length=context_length, clean=clean, additional_special_tokens=extra_list
        ),
    )


@pytest.fixture(scope="module")
def reference() -> oc_tok.SimpleTokenizer:
    return _pair()[1]


@pytest.fixture(scope="module")
def runtime() -> BpeTokenizer:
    return _pair()[0]


def _ref(tok: oc_tok.SimpleTokenizer, texts, context_length=None) -> np.ndarray:
    return tok(texts, context_length=context_length).numpy()


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.int64
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# --- parity ---------------------------------------------------------------------------------------


def test_ids_and_vocab_match(runtime, reference):
    assert runtime.sot_token_id == reference.sot_token_id == 49406
    assert runtime.eot_token_id == reference.eot_token_id == 49407
    assert runtime.vocab_size == reference.vocab_size == 49408
    assert runtime.context_length == reference.context_length == 77
    assert runtime.encoder == reference.encoder


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_parity_each_text(runtime, reference, text):
    assert runtime.encode(text) == reference.encode(text)
    _assert_same(runtime(text), _ref(reference, text))


def test_parity_batch(runtime, reference):
    _assert_same(runtime(CORPUS), _ref(reference, CORPUS))
    _assert_same(runtime(tuple(CORPUS)), _ref(reference, CORPUS))


@pytest.mark.parametrize("context_length", [16, 32])
def test_parity_context_length(context_length):
    built, ref = _pair(context_length=context_length)
    assert built.context_length == context_length
    _assert_same(built(CORPUS), _ref(ref, CORPUS))


@pytest.mark.parametrize("context_length", [1, 2, 16, 32, 100])
def test_parity_call_time_context_length(runtime, reference, context_length):
    _assert_same(
        runtime(CORPUS, context_length=context_length), _ref(reference, CORPUS, context_length)
    )


@pytest.mark.parametrize("context_length", [77, 16])
def test_long_text_truncated_with_eot_last(runtime, reference, context_length):
    assert len(runtime.encode(LONG_TEXT)) + 2 > 77
    out = runtime([LONG_TEXT, "a cat"], context_length=context_length)
    _assert_same(out, _ref(reference, [LONG_TEXT, "a cat"], context_length))
    assert out.shape == (2, context_length)
    assert out[0, 0] == runtime.sot_token_id
    assert out[0, -1] == runtime.eot_token_id
    assert (out[0] != 0).all()
    assert list(out[0, 1:-1]) == runtime.encode(LONG_TEXT)[: context_length - 2]
    assert out[1, 3] == runtime.eot_token_id and not out[1, 4:].any()


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize", "lower"])
def test_parity_clean_modes(clean):
    built, ref = _pair(clean=clean)
    for text in CORPUS:
        assert built.encode(text) == ref.encode(text), text
    _assert_same(built(CORPUS), _ref(ref, CORPUS))


def test_clean_modes_differ():
    # Guards against the modes silently collapsing into one.
    text = "A Cat, a_DOG!"
    got = {c: _pair(clean=c)[0].encode(text) for c in ("lower", "whitespace", "canonicalize")}
    assert len({tuple(v) for v in got.values()}) == 3


def test_parity_additional_special_tokens():
    built, ref = _pair(extra=("<mask>", "<sep>"))
    assert built.encoder == ref.encoder
    assert built.vocab_size == ref.vocab_size == 49410
    texts = CORPUS + ["a <mask> on a <sep> mat", "<MASK> upper"]
    _assert_same(built(texts), _ref(ref, texts))


@pytest.mark.parametrize("text", CORPUS[:8] + CORPUS[11:18], ids=CORPUS_IDS[:8] + CORPUS_IDS[11:18])
def test_decode_parity(runtime, reference, text):
    ids = reference.encode(text)
    assert runtime.decode(ids) == reference.decode(ids)
    assert runtime.decode(np.asarray(ids, dtype=np.int64)) == reference.decode(ids)


def test_decode_partial_utf8_is_replaced(runtime, reference):
    # A rare character takes several byte-level tokens; decoding the first alone gives U+FFFD.
    ids = next(
        ids
        for ids in map(reference.encode, ["\U0001fabf", "\u2a6d6", "\U00020000", "\u0b9f"])
        if len(ids) > 1
    )
    assert runtime.decode(ids[:1]) == reference.decode(ids[:1])


def test_bpe_cache_is_bounded(runtime):
    info = runtime._bpe_cached.cache_info()
    assert info.maxsize is not None and info.maxsize > 0
    for i in range(50):
        runtime.encode(f"word{i}zz")
    assert runtime._bpe_cached.cache_info().currsize <= info.maxsize


def test_pickle_round_trip(runtime):
    clone = pickle.loads(pickle.dumps(runtime))
    _assert_same(clone(CORPUS), runtime(CORPUS))
    assert clone._bpe_cached.cache_info().maxsize == runtime._bpe_cached.cache_info().maxsize


# --- export round trip --------------------------------------------------------------------------


def test_round_trip_vit_b_32(tmp_path):
    ref = open_clip.get_tokenizer("ViT-B-32")
    entry = describe_tokenizer(ref, tmp_path)
    assert entry == {
        "kind": "openclip-bpe",
        "context_length": 77,
        "clean": "lower",
        "additional_special_tokens": None,
        "files": {"bpe_vocab": "tokenizer/bpe_simple_vocab_16e6.txt.gz"},
        "sot_token_id": 49406,
        "eot_token_id": 49407,
    }
    copied = tmp_path / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    assert copied.read_bytes() == BPE_PATH.read_bytes()
    # The entry must survive the trip through the JSON manifest.
    built = load_tokenizer(json.loads(json.dumps(entry)), tmp_path)
    _assert_same(built(CORPUS), _ref(ref, CORPUS))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clean": "canonicalize", "context_length": 64},
        {"clean": "whitespace", "additional_special_tokens": ["<mask>"]},
    ],
)
def test_round_trip_options(tmp_path, kwargs):
    ref = _pair(
        kwargs.get("context_length", 77),
        kwargs["clean"],
        tuple(kwargs.get("additional_special_tokens", ())),
    )[1]
    entry = describe_tokenizer(ref, tmp_path)
    assert entry["clean"] == kwargs["clean"]
    assert entry["additional_special_tokens"] == kwargs.get("additional_special_tokens")
    assert entry["context_length"] == kwargs.get("context_length", 77)
    built = load_tokenizer(entry, tmp_path)
    _assert_same(built(CORPUS), _ref(ref, CORPUS))


@pytest.mark.parametrize("mask", ["simple", "shuffle"])
def test_reduction_mask_recorded_then_refused(tmp_path, mask):
    entry = describe_tokenizer(oc_tok.SimpleTokenizer(reduction_mask=mask), tmp_path)
    assert entry["reduction_mask"] == mask
    with pytest.raises(ArtifactError, match="not supported at inference"):
        load_tokenizer(entry, tmp_path)


class _CustomTokenizer(oc_tok.SimpleTokenizer):
    """A subclass may override __call__: the exporter cannot vouch for its ids."""


@pytest.mark.parametrize("tok", [object(), object.__new__(_CustomTokenizer)], ids=["object", "subclass"])
def test_export_refuses_unknown_tokenizers(tmp_path, tok):
    # open_clip's HFTokenizer and SigLipTokenizer are supported: see test_hf_tokenizer.py.
    with pytest.raises(ExportError, match="is not supported by the exporter; expected open_clip's SimpleTokenizer") as info:
        describe_tokenizer(tok, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "tokenizer").exists()


def test_export_refuses_custom_vocab(tmp_path):
    ref = oc_tok.SimpleTokenizer()
    ref.encoder = dict(ref.encoder)
    ref.encoder["extra"] = len(ref.encoder)
    with pytest.raises(ExportError, match="default bpe_path"):
        describe_tokenizer(ref, tmp_path)


# --- manifest errors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("exported")
    return describe_tokenizer(reference, root), root


@pytest.fixture()
def artifact(exported, tmp_path) -> tuple[dict, Path]:
    """A fresh, writable copy of an exported artifact and its manifest entry."""
    entry, src = exported
    root = tmp_path / "artifact"
    shutil.copytree(src, root)
    return json.loads(json.dumps(entry)), root


def test_load_unknown_kind(artifact):
    entry, root = artifact
    entry["kind"] = "hf-tokenizer"
    with pytest.raises(ArtifactError, match="'hf-tokenizer'.*openclip-bpe"):
        load_tokenizer(entry, root)


def test_load_missing_file(artifact):
    entry, root = artifact
    (root / entry["files"]["bpe_vocab"]).unlink()
    with pytest.raises(ArtifactError, match="bpe_simple_vocab_16e6.txt.gz.*missing"):
        load_tokenizer(entry, root)


def test_load_wrong_sot_id(artifact):
    entry, root = artifact
    entry["sot_token_id"] = 0
    with pytest.raises(ArtifactError, match="sot_token_id 49406.*says 0"):
        load_tokenizer(entry, root)


def test_load_wrong_vocab_file(artifact):
    entry, root = artifact
    path = root / entry["files"]["bpe_vocab"]
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    path.write_bytes(gzip.compress("\n".join(lines[:1000]).encode("utf-8")))
    with pytest.raises(ArtifactError, match="sot_token_id"):
        load_tokenizer(entry, root)


def test_load_corrupt_file(artifact):
    entry, root = artifact
    (root / entry["files"]["bpe_vocab"]).write_bytes(b"not gzip at all")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_tokenizer(entry, root)


@pytest.mark.parametrize("rel", ["../outside.txt.gz", "/etc/passwd"])
def test_load_path_outside_artifact(artifact, rel):
    entry, root = artifact
    entry["files"]["bpe_vocab"] = rel
    with pytest.raises(ArtifactError, match="inside the artifact directory"):
        load_tokenizer(entry, root)


@pytest.mark.parametrize(
    "key, value", [("clean", "upper"), ("context_length", 0), ("context_length", "77")]
)
def test_load_bad_options(artifact, key, value):
    entry, root = artifact
    entry[key] = value
    with pytest.raises(ArtifactError, match=repr(value)):
        load_tokenizer(entry, root)


# --- input errors -------------------------------------------------------------------------------


def test_empty_list(runtime):
    with pytest.raises(InputError, match="no texts given") as info:
        runtime([])
    assert "\n" not in str(info.value)


def test_non_str_element(runtime):
    with pytest.raises(InputError, match=r"texts\[2\] is int, expected str"):
        runtime(["a", "b", 3])
    with pytest.raises(InputError, match=r"texts\[0\] is NoneType"):
        runtime([None])


@pytest.mark.parametrize("texts", [b"bytes", 42, None])
def test_not_texts(runtime, texts):
    with pytest.raises(InputError, match="expected str"):
        runtime(texts)


@pytest.mark.parametrize("context_length", [-1, 2.5, "77"])
def test_bad_context_length(runtime, context_length):
    with pytest.raises(InputError, match="context_length"):
        runtime("a cat", context_length=context_length)


def test_single_string_and_generator(runtime):
    assert runtime("a cat").shape == (1, 77)
    _assert_same(runtime(t for t in ["a", "b"]), runtime(["a", "b"]))


# --- torch-free import --------------------------------------------------------------------------


def test_runtime_does_not_import_torch(tmp_path):
    vocab = tmp_path / "tokenizer" / BPE_PATH.name
    vocab.parent.mkdir()
    vocab.write_bytes(BPE_PATH.read_bytes())
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from clipdeploy.runtime.text import BpeTokenizer, load_tokenizer
        tok = BpeTokenizer({str(vocab)!r})
        out = tok(["a photo of a cat", "caf\\u00e9 &amp; \\U0001f431"])
        assert out.shape == (2, 77), out.shape
        entry = {{"kind": "openclip-bpe", "context_length": 77, "clean": "lower",
                  "additional_special_tokens": None,
                  "files": {{"bpe_vocab": "tokenizer/{vocab.name}"}},
                  "sot_token_id": 49406, "eot_token_id": 49407}}
        load_tokenizer(entry, Path({str(tmp_path)!r}))("a dog")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip"))
        print("LOADED", bad)
        sys.exit(1 if bad else 0)
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
