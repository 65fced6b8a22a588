"""CLI options come from the config dataclasses: one default, one help, one meaning of --device."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clipdeploy.benchmarks.bench import BenchConfig
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.bulk.config import EmbedDatasetConfig
from clipdeploy.cli import build_parser, main
from clipdeploy.engines.command import config_from_args as build_config_from_args
from clipdeploy.engines.config import BuildConfig
from clipdeploy.errors import UsageError
from clipdeploy.export.config import ExportConfig
from clipdeploy.options import add_dataclass_options, config_from_args, integer, opt, parse_device
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.triton.repository import TritonConfig


@dataclass
class Toy:
    name: str = field(metadata=opt("the name"))
    count: int = field(default=3, metadata=opt("how many", parse=integer(1)))
    ratio: float = field(default=0.5, metadata=opt("a fraction"))
    paths: list[Path] = field(default_factory=list, metadata=opt("some paths", nargs="+", metavar="PATH"))
    keep: bool = field(default=True, metadata=opt("drop it", negate="--no-keep"))
    loud: bool = field(default=False, metadata=opt("be loud"))
    note: str | None = None  # no metadata: not an option


def _toy_parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_dataclass_options(p, Toy, ["name", "count", "ratio", "paths", "keep", "loud"], **kw)
    return p


def test_options_follow_the_fields_and_leave_defaults_to_the_dataclass():
    p = _toy_parser()
    assert config_from_args(Toy, p.parse_args(["--name", "a"])) == Toy(name="a")
    args = p.parse_args(["--name", "a", "--count", "7", "--ratio", "0.25", "--paths", "x", "y", "--no-keep", "--loud"])
    assert config_from_args(Toy, args) == Toy("a", 7, 0.25, [Path("x"), Path("y")], False, True)
    text = p.format_help()
    assert "how many (default: 3)" in text and "a fraction (default: 0.5)" in text
    assert "--no-keep" in text and "--keep" not in text.replace("--no-keep", "")
    with pytest.raises(SystemExit):
        p.parse_args([])  # a field without a default is a required option


def test_a_parse_function_makes_a_one_line_error_naming_the_option():
    with pytest.raises(UsageError, match=r"^--count 0 must be 1 or more$"):
        config_from_args(Toy, _toy_parser().parse_args(["--name", "a", "--count", "0"]))
    with pytest.raises(UsageError, match=r"--count 'x' is not an integer"):
        config_from_args(Toy, _toy_parser().parse_args(["--name", "a", "--count", "x"]))


def test_a_base_instance_gives_a_command_its_own_defaults():
    base = Toy(name="b", count=9)
    p = _toy_parser(base=base)
    assert "how many (default: 9)" in p.format_help()
    assert config_from_args(Toy, p.parse_args([]), base=base) == base
    assert config_from_args(Toy, p.parse_args(["--ratio", "1"]), base=base) == dataclasses.replace(base, ratio=1.0)


def test_a_field_without_help_cannot_become_an_option():
    with pytest.raises(TypeError, match="Toy.note has no CLI help"):
        add_dataclass_options(argparse.ArgumentParser(), Toy, ["note"])


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(sub.choices)


def test_no_command_option_carries_a_default_of_its_own():
    """Defaults live in the config dataclasses: an option not given parses to None (or False for a flag)."""
    own = {("embed", "--backend")}  # load()'s backend, not a config field (the backend registry owns it)
    found = [
        (name, a.option_strings[-1], a.default)
        for name, p in _commands().items()
        for a in p._actions
        if a.option_strings and a.default not in (None, argparse.SUPPRESS, False)
        and (name, a.option_strings[-1]) not in own
    ]  # fmt: skip
    assert found == []


@pytest.mark.parametrize(
    "argv, cls, fixed",
    [
        (["quantize", "A", "--precision", "int8"], QuantizeConfig, {"artifact": Path("A"), "precision": "int8"}),
        (["build", "A"], BuildConfig, {"artifact": Path("A")}),
        (["export", "RN50", "-o", "O"], ExportConfig, {"model": "RN50", "output": Path("O")}),
        (["triton", "A", "-o", "R"], TritonConfig, {"artifacts": [Path("A")], "output": Path("R")}),
        (["embed-dataset", "A", "S", "-o", "O"], EmbedDatasetConfig,
         {"artifact": Path("A"), "sources": ["S"], "output": Path("O")}),
    ],
)
def test_a_bare_command_makes_the_dataclass_defaults(argv, cls, fixed):
    args = build_parser().parse_args(argv)
    keys = {k: v for k, v in fixed.items() if k not in ("precision",)}
    assert config_from_args(cls, args, **keys) == cls(**fixed)


def test_bench_timing_and_batches_default_from_their_dataclasses(tmp_path):
    from clipdeploy.benchmarks.command import config_from_args as bench_config_from_args

    (tmp_path / "art").mkdir()
    cfg = bench_config_from_args(build_parser().parse_args(["bench", str(tmp_path / "art")]))
    assert cfg.timing == TimingConfig() and cfg.batches == BenchConfig(artifact=tmp_path).batches
    assert cfg.device == "auto" and cfg.isolate and cfg.progress
    cfg = bench_config_from_args(build_parser().parse_args(["bench", str(tmp_path / "art"), "--iters", "1"]))
    assert cfg.timing.iters == 1 and cfg.timing.min_iters == 1  # at most as many as are timed


@pytest.mark.parametrize(
    "text, expected",
    [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", 0)), ("CUDA:2", ("cuda", 2)),
     ("1", ("cuda", 1))],
)  # fmt: skip
def test_device_has_one_meaning(text, expected):
    assert parse_device(text) == expected


def test_build_and_validate_take_the_same_device_spellings():
    for spelling, index in (("3", 3), ("cuda:3", 3), ("cuda", 0), ("auto", 0)):
        args = build_parser().parse_args(["build", "A", "--device", spelling])
        assert build_config_from_args(args).device == index
    assert build_config_from_args(build_parser().parse_args(["build", "A"])).device == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["build", "A", "--device", "cpu"], "--device cpu: TensorRT engines need an NVIDIA GPU"),
        (["validate", "A", "--device", "gpu0"], "--device 'gpu0' is not auto, cpu, cuda, cuda:N"),
        (["bench", ".", "--device", "cuda:1"], "CUDA_VISIBLE_DEVICES=1"),
    ],
)
def test_a_device_a_command_cannot_use_is_a_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipdeploy: error: ") and needle in err and "\n" not in err


def test_only_the_fields_given_as_options_are_read():
    """Another option with a field's dest (a tool's own -o OUTPUT) does not land in the config."""
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", default="not a ratio")  # the parser's own option, not Toy.ratio
    add_dataclass_options(p, Toy, ["count"])
    assert config_from_args(Toy, p.parse_args(["--count", "4"]), name="n") == Toy(name="n", count=4)


def test_embed_dataset_options_parse_into_its_config():
    args = build_parser().parse_args(
        ["embed-dataset", "A", "S1", "S2", "-o", "O", "--batch-size", "8", "--workers", "2", "--max-errors", "5",
         "--fast-decode", "--threads", "1", "--ray", "auto"]
    )  # fmt: skip
    cfg = config_from_args(
        EmbedDatasetConfig, args, artifact=Path("A"), sources=args.sources, output=Path("O"), ray=args.ray
    )
    assert cfg == EmbedDatasetConfig(
        Path("A"), ["S1", "S2"], Path("O"), batch_size=8, workers=2, max_errors=5, fast_decode=True, threads=1,
        ray="auto",
    )  # fmt: skip
    assert build_parser().parse_args(["embed-dataset", "A", "S", "-o", "O", "--ray"]).ray == "local"
    with pytest.raises(UsageError, match=r"^--max-errors -1 must be 0 or more$"):
        config_from_args(EmbedDatasetConfig, build_parser().parse_args(["embed-dataset", "A", "S", "-o", "O",
                                                                        "--max-errors", "-1"]))  # fmt: skip
