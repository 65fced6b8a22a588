"""The pipeline YAML: resolved through the stages' own dataclasses; every problem names file, key path and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.pipeline_fakes import write_config

from clipdeploy import precisions
from clipdeploy.benchmarks.bench import BenchConfig
from clipdeploy.engines.config import BuildConfig
from clipdeploy.export.config import ExportConfig
from clipdeploy.pipeline.config import load_config
from clipdeploy.pipeline.schema import ConfigError
from clipdeploy.quantize.config import QuantizeConfig

REPO = Path(__file__).resolve().parents[2]


def _problems(tmp_path: Path, body: str) -> list[str]:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_example_configs_load():
    quick = load_config(REPO / "configs" / "quickstart.yaml")
    (plan,) = quick.models
    assert plan.precisions == ("fp16", "int8")
    assert plan.export.model_config == REPO / "configs" / "models" / "tiny-vit.json"
    assert plan.quantize["int8"].calib_images == [
        REPO / "src" / "clipdeploy" / "data" / "images", REPO / "configs" / "data" / "photo-crops.tar"
    ]
    assert plan.quantize["int8"].holdout >= 32  # the gate's floor: the quickstart meets it
    assert quick.output == REPO / "artifacts" / "quickstart"
    gpu = load_config(REPO / "configs" / "gpu-engines.yaml")
    assert [m.name for m in gpu.models] == ["vit-b-32-openai", "vit-b-16-laion2b", "vit-l-14-openai", "rn50-openai"]
    large = gpu.models[2]
    assert large.build["fp16"].batch == (1, 16, 64) and large.bench.batches == (1, 8, 32)
    assert gpu.models[0].build["int8-fp16"].timing_cache == REPO / "artifacts" / "engines" / "timing.cache"


def test_gpu_config_names_real_open_clip_weights():
    open_clip = pytest.importorskip("open_clip")
    for plan in load_config(REPO / "configs" / "gpu-engines.yaml").models:
        assert plan.export.pretrained in open_clip.list_pretrained_tags_by_model(plan.export.model), plan.name


def test_defaults_come_from_the_stage_dataclasses(tmp_path):
    path = write_config(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [int8]
          quantize: {calib_images: [photos]}
        models:
          - model: ViT-B-32
    """,
    )
    (plan,) = load_config(path).models
    q, b, bench = plan.quantize["int8"], plan.build["int8"], plan.bench
    assert (q.samples, q.holdout, q.method, q.recover) == (
        QuantizeConfig.samples,
        QuantizeConfig.holdout,
        QuantizeConfig.method,
        QuantizeConfig.recover,
    )
    assert b.batch == BuildConfig(artifact=Path("x")).batch and b.opt_level == BuildConfig.opt_level
    assert bench.batches == BenchConfig(artifact=Path("x")).batches
    assert plan.export.opset == ExportConfig.opset and plan.export.seed == ExportConfig.seed
    assert plan.name == "vit-b-32"
    assert plan.stages == ("export", "quantize", "build", "validate", "bench")
    assert q.calib_images == [tmp_path / "photos"]  # relative to the file
    assert plan.artifact == tmp_path / "out" / "vit-b-32" / "artifact"


def test_model_entries_merge_over_defaults_key_by_key(tmp_path):
    path = write_config(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [fp16, int8]
          quantize:
            calib_images: [a]
            samples: 100
            int8: {min_mean_cosine: 0.98}
          build: {batch: "1:8:64", workspace: 2GiB}
          bench: {timing: {iters: 5, warmup: 1}}
        models:
          - name: m
            model: RN50
            precisions: [int8]
            quantize:
              holdout: 40
              int8: {samples: 200}
            build: {batch: [2, 4, 16], shapes: {sequence: "1:16:77"}}
            bench: {timing: {iters: 7}}
    """,
    )
    (plan,) = load_config(path).models
    q = plan.quantize["int8"]
    assert plan.precisions == ("int8",) and list(plan.quantize) == ["int8"]
    assert (q.samples, q.holdout, q.min_mean_cosine, q.calib_images) == (200, 40, 0.98, [tmp_path / "a"])
    b = plan.build["int8"]
    assert b.batch == (2, 4, 16) and b.shapes == {"sequence": (1, 16, 77)} and b.workspace == 2 * 2**30
    assert (plan.bench.timing.iters, plan.bench.timing.warmup) == (7, 1)


def test_output_option_overrides_the_file(tmp_path):
    path = write_config(tmp_path, "models: [{model: RN50, stages: [export]}]\n")
    with pytest.raises(ConfigError, match="no output root"):
        load_config(path)
    assert load_config(path, output=tmp_path / "elsewhere").output == tmp_path / "elsewhere"


def test_unknown_keys_name_file_path_line_and_a_suggestion(tmp_path):
    problems = _problems(
        tmp_path,
        """
        output: out
        defaults:
          quantise: {}
          precisions: [int8]
          quantize:
            calib_images: [a]
            samplez: 3
            int8: {min_cosin: 0.9}
          bench:
            timing: {iterations: 3}
        models:
          - model: RN50
            pretrainde: openai
    """,
    )
    path = tmp_path / "pipeline.yaml"
    assert f"{path}:3: defaults.quantise: unknown key 'quantise'; did you mean 'quantize'?" in problems
    assert f"{path}:7: defaults.quantize.samplez: unknown key 'samplez'; did you mean 'samples'?" in problems
    assert (
        f"{path}:8: defaults.quantize.int8.min_cosin: unknown key 'min_cosin'; did you mean 'min_cosine'?" in problems
    )
    assert f"{path}:13: models[0].pretrainde: unknown key 'pretrainde'; did you mean 'pretrained'?" in problems
    timing = [p for p in problems if "iterations" in p]
    assert timing and timing[0].startswith(f"{path}:10: defaults.bench.timing:"), timing


def test_bad_values_name_the_line(tmp_path):
    problems = _problems(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [fp16, int4]
          stages: [export, deploy]
        models:
          - model: RN50
            quantize: {calib_images: a, samples: many}
            build: {batch: "1:8", workspace: lots, opt_level: 9}
            export: {opset: 13}
          - model: RN50
            pretrained: openai
            checkpoint: w.pt
          - name: "bad name!"
            model: RN50
          - {pretrained: openai}
    """,
    )
    path = tmp_path / "pipeline.yaml"
    text = "\n".join(problems)
    known = ", ".join(precisions.names())  # every registered precision, fp8 included
    assert f"{path}:3: defaults.precisions: 'int4' is not one of {known}" in problems
    assert f"{path}:4: defaults.stages: 'deploy' is not one of" in text
    assert f"{path}:7: models[0].quantize.samples: got 'many', expected an integer" in problems
    assert (
        f"{path}:8: models[0].build.batch: got '1:8', expected [an integer, an integer, an integer] or 'N:N:N'"
        in problems
    )
    assert f"{path}:8: models[0].build.workspace: size 'lots' is not a byte count" in text
    assert f"{path}:9: models[0].export.opset: opset 13 is too old" in text
    assert f"{path}:12: models[1].checkpoint: both pretrained and checkpoint are set" in text
    assert f"{path}:13: models[2].name: name 'bad name!' must be" in text
    assert f"{path}:15: models[3]: missing `model:`" in text


def test_dataclass_checks_are_reported_at_their_section(tmp_path):
    problems = _problems(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [int8]
        models:
          - model: RN50
            quantize:
              calib_images: [a]
              samples: 10
              min_samples: 20
            build: {batch: [8, 4, 16]}
            bench: {timing: {iters: 0}}
    """,
    )
    text = "\n".join(problems)
    assert ":6: models[0].quantize: --samples 10 is below --min-samples 20" in text
    assert ":10: models[0].build: batch range 8:4:16 must satisfy 1 <= MIN <= OPT <= MAX" in text
    assert ":11: models[0].bench.timing: --iters 0 must be 1 or more" in text


def test_quantize_without_calibration_images_is_refused(tmp_path):
    problems = _problems(
        tmp_path,
        """
        output: out
        models:
          - {model: RN50, precisions: [fp16]}
    """,
    )
    assert len(problems) == 1 and "quantize fp16 needs real calibration images" in problems[0]
    assert problems[0].startswith(f"{tmp_path / 'pipeline.yaml'}:3: models[0]:")


def test_structure_problems(tmp_path):
    assert "the file is empty" in _problems(tmp_path, "")[0]
    assert "must be a list with at least one entry" in _problems(tmp_path, "output: out\nmodels: []\n")[0]
    assert "version 2 is not supported" in _problems(tmp_path, "version: 2\noutput: o\nmodels: [{model: RN50}]\n")[0]
    dup = _problems(tmp_path, "output: o\noutput: p\nmodels: [{model: RN50}]\n")
    assert dup == [f"{tmp_path / 'pipeline.yaml'}:2: output: duplicate key (first at line 1); keep one"]
    names = _problems(tmp_path, "output: o\nmodels:\n  - {model: RN50}\n  - {model: RN50}\n")
    assert "name 'rn50' is also used at line 3" in names[0] and ":4: models[1]" in names[0]
    syntax = _problems(tmp_path, "output: o\nmodels:\n  - model: [RN50\n")
    assert syntax[0].startswith(f"{tmp_path / 'pipeline.yaml'}:") and "invalid YAML" in syntax[0]


def test_every_problem_is_reported_at_once_by_the_cli(tmp_path, capsys):
    from clipdeploy.cli import main

    path = write_config(
        tmp_path,
        """
        output: out
        defaults: {precisions: [fp16], quantize: {calib_images: a, holdout: x}}
        models:
          - {model: RN50, colour: red}
    """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in the pipeline config" in err
    assert "defaults.quantize.holdout: got 'x', expected an integer" in err
    assert "models[0].colour: unknown key 'colour'" in err
