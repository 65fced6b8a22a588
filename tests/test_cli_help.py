"""`--help` texts come from the registries, so a precision or backend added later is listed without an edit."""

from __future__ import annotations

import argparse

from clipdeploy import precisions
from clipdeploy.cli import build_parser
from clipdeploy.runtime.backends import registry as backends


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_top_level_help_lists_every_quantize_precision():
    toy = precisions.register(precisions.PrecisionSpec("toy-int4", "tests.nowhere:make"))
    try:
        text = " ".join(build_parser().format_help().split())
        line = next(seg for seg in text.split(" quantize ")[1:] if seg.startswith("make "))
        for name in precisions.quantized():
            assert f" {name} " in f" {line.replace(' / ', ' ')} ", (name, line)
        assert "fp8" in line and "bf16" in line and "toy-int4" in line, line
    finally:
        precisions.unregister(toy.name)
    assert "toy-int4" not in build_parser().format_help()


def test_embed_backend_has_help_naming_every_backend():
    embed = _commands(build_parser())["embed"]
    (action,) = [a for a in embed._actions if "--backend" in a.option_strings]
    assert action.help, "embed --backend has no help"
    for name in backends.names():
        assert name in action.help, (name, action.help)
    assert backends.AUTO in action.help
