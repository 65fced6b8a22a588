"""Texts longer than the context length are cut as open_clip cuts them, and `embed` says how many were cut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipdeploy.cli import main
from clipdeploy.runtime.session import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_artifact import tiny_artifact_or_skip

    return tiny_artifact_or_skip(tmp_path_factory.mktemp("trunc") / "art")


def test_session_names_the_texts_it_cuts_at_the_boundary(tiny):
    session = load(tiny, backend="onnxruntime")
    assert session.context_length == 77
    # "word" is one BPE token: n words + start + end tokens. 75 words fill the context exactly.
    texts = ["a cat", "word " * 75, "word " * 76, "word " * 300]
    assert session.truncated(texts) == [2, 3]
    ids = session.tokenize(texts)
    eot = session.tokenizer.eot_token_id
    for i in (1, 2, 3):  # full rows end with the end token, cut ones included (open_clip's rule)
        assert ids[i, -1] == eot and np.count_nonzero(ids[i]) == 77, ids[i]


def test_embed_says_how_many_texts_were_cut(tiny, tmp_path, capsys):
    code = main(["embed", str(tiny), "--backend", "onnxruntime", "--text", "a cat", "word " * 80, "word " * 90,
                 "-o", str(tmp_path / "emb")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cut 2 of 3 texts (#2, #3) to the context length of 77 tokens" in err, err
    assert json.loads(out)["text"]["truncated"] == [1, 2]
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["text"]["truncated"] == [1, 2]

    code = main(["embed", str(tiny), "--backend", "onnxruntime", "--text", "a cat", "a dog"])
    out, err = capsys.readouterr()
    assert code == 0 and "cut" not in err, err
    assert json.loads(out)["text"]["truncated"] == []
