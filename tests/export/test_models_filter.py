"""`clipdeploy models FILTER`: a case-sensitive name prefix, or a glob when it has * ? or [ ]."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from clipdeploy.cli import build_parser, main
from clipdeploy.export import command

NAMES = ["coca_ViT-B-32", "RN50", "RN50x4", "ViT-B-16", "ViT-B-32", "ViT-B-32-SigLIP2-256", "ViT-bigG-14", "ViT-L-14"]


@pytest.fixture
def open_clip(monkeypatch):
    fake = SimpleNamespace(list_models=lambda: NAMES, list_pretrained_tags_by_model=lambda n: [], __version__="test")
    monkeypatch.setattr(command, "import_open_clip", lambda: fake)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("ViT-B", ["ViT-B-16", "ViT-B-32", "ViT-B-32-SigLIP2-256"]),  # not ViT-bigG-14, not coca_ViT-B-32
        ("RN50", ["RN50", "RN50x4"]),
        ("*ViT-B-32*", ["coca_ViT-B-32", "ViT-B-32", "ViT-B-32-SigLIP2-256"]),
        ("ViT-?-14", ["ViT-L-14"]),
        ("RN50x[0-9]", ["RN50x4"]),
        ("vit-b", []),
        (None, NAMES),
    ],
)
def test_prefix_or_glob(pattern, expected):
    assert command.match_models(NAMES, pattern) == expected


def test_cli_lists_only_matches_and_hints_at_case(open_clip, capsys):
    assert main(["models", "ViT-B"]) == 0
    out, _ = capsys.readouterr()
    listed = [line.split()[0] for line in out.splitlines()[:-1]]
    assert listed == ["ViT-B-16", "ViT-B-32", "ViT-B-32-SigLIP2-256"]
    assert out.splitlines()[-1].startswith("3 architectures")
    assert main(["models", "vit-b"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("0 architectures") and "case-sensitive: ViT-B-16, ViT-B-32" in err, err


def test_help_says_prefix_or_glob():
    models = build_parser()._subparsers._group_actions[0].choices["models"]
    text = models.format_help()
    assert "starting with PREFIX" in text and "glob" in text
