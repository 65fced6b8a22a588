"""The precision and backend registries: a toy precision and a toy backend, registered here and nowhere
else, flow through `quantize` (make step and gate), `load`, the manifest schema and the bench; and a toy
precision that runs the int8 file on OpenVINO with a setting of its own (the shape an "int8 with bf16
elsewhere" variant would take) reaches quantize's gate, `load`, the bench, and Triton's exclusion."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy import precisions
from clipdeploy.artifact import schema as manifest_schema
from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.artifact.manifest import read_manifest
from clipdeploy.artifact.schema import SchemaError
from clipdeploy.quantize.make import MadeVariant, MakeRequest
from clipdeploy.runtime.backends import registry as backends

TOY_PRECISION = "fp32-copy"
TOY_BACKEND = "toy"
TOY_GATE = {"min_cosine": 0.99999, "min_mean_cosine": None, "min_top1": 0.99}


def make_copy(req: MakeRequest) -> MadeVariant:
    """The toy precision's make step (a quantize.make.MakeStep): the fp32 graph, unchanged."""
    shutil.copyfile(req.source, req.out)
    return MadeVariant({"copied_from": req.source.name})


def _opener(name: str):
    """A toy backend's runners: ONNX Runtime on CPU, under another backend's name and preference."""

    def open_runners(view, precision, settings, verify):
        from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner

        options = OrtOptions(providers=("CPUExecutionProvider",), intra_op_num_threads=settings.intra_op_num_threads)
        preference = backends.get(name).preference(settings)
        return backends.open_onnx_files(view, precision, preference, verify, lambda p, v: OrtRunner(p, options))

    return open_runners


TOY_BENCH_SETTINGS: list = []  # what the bench asked the toy backend for, per contender opened


def _toy_bench_settings(bench):
    """The toy's bench hook: the bench's threads, as ONNX Runtime's intra-op threads."""
    TOY_BENCH_SETTINGS.append(bench)
    return {"intra_op_num_threads": bench.threads}


@pytest.fixture
def toys():
    """Register the toy precision and backend for one test, and take them away after it."""
    TOY_BENCH_SETTINGS.clear()
    precisions.register(precisions.PrecisionSpec(
        TOY_PRECISION, f"{__name__}:make_copy", gate=TOY_GATE,
        engine_tolerance={"min_cosine": 0.9999, "max_abs_rel": 1e-3},
        backends=("onnxruntime", TOY_BACKEND), preference={TOY_BACKEND: 0},
    ))
    backends.register(backends.BackendSpec(
        TOY_BACKEND, "onnx", ("cpu",), _opener(TOY_BACKEND),
        unavailable=lambda device: None if device == "cpu" else "the toy backend runs on CPU only",
        target=lambda settings: TOY_BACKEND, bench_target=lambda device: TOY_BACKEND,
        bench_settings=_toy_bench_settings,
    ))
    yield
    precisions.unregister(TOY_PRECISION)
    backends.unregister(TOY_BACKEND)


def _images(folder: Path, n: int = 80) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_builtin_tables_come_from_the_registry():
    assert precisions.names() == ("fp32", "fp16", "int8", "int8-fp16", "fp8", "bf16")
    assert precisions.quantized() == ("fp16", "int8", "int8-fp16", "fp8", "bf16")
    # DESIGN: ONNX Runtime CPU int8 then fp32; TensorRT int8-fp16 then fp16 then fp32.
    assert precisions.preference("onnxruntime-cpu") == ("int8", "fp32")
    assert precisions.preference("onnxruntime-cuda") == ("fp16", "fp32")
    assert precisions.preference("tensorrt") == ("int8-fp16", "fp16", "fp32")
    # int8 only with VNNI: the Runs entry in runtime/backends/openvino.py
    assert precisions.preference("openvino-cpu") == ("int8", "bf16", "fp32")
    assert backends.choices() == ("auto", "onnxruntime", "tensorrt", "openvino")
    assert backends.auto_order() == ("tensorrt", "openvino", "onnxruntime")
    from clipdeploy.benchmarks.contenders import default_precisions
    from clipdeploy.engines.validate import TOLERANCES
    from clipdeploy.quantize.gate import DEFAULT_THRESHOLDS

    assert default_precisions("cpu") == ("fp32", "int8")
    assert default_precisions("cuda") == tuple(n for n in precisions.names() if n != "bf16")  # bf16: OpenVINO only
    assert DEFAULT_THRESHOLDS["fp16"].min_cosine == 0.999 and DEFAULT_THRESHOLDS["int8"].min_top1 == 0.95
    assert "fp32" not in DEFAULT_THRESHOLDS  # the reference has no gate
    assert TOLERANCES["fp32"].max_abs_rel == 1e-2 and TOLERANCES["int8-fp16"].max_abs_rel is None


def test_an_unknown_precision_is_one_line_with_a_suggestion():
    with pytest.raises(UsageError, match=r"precision 'int8fp16' is not one of .*did you mean 'int8-fp16'\?"):
        precisions.get("int8fp16")
    with pytest.raises(UsageError, match="already registered"):
        precisions.register(precisions.PrecisionSpec("fp16", "x:y"))
    with pytest.raises(UsageError, match="'module:function'"):
        precisions.register(precisions.PrecisionSpec("fp99", "nocolon"))
    assert "fp99" not in precisions.names()


def test_the_manifest_schema_reads_the_registry_when_it_checks(toys):
    variant = {"tower": "image", "precision": TOY_PRECISION, "format": "onnx", "file": "a.onnx", "sha256": "0"}
    from clipdeploy.artifact.schema import PRECISIONS

    assert TOY_PRECISION in PRECISIONS
    check = manifest_schema.VARIANT
    check(variant, "variants[0]")  # accepted while registered
    precisions.unregister(TOY_PRECISION)
    with pytest.raises(SchemaError, match="fp32-copy"):
        check(variant, "variants[0]")


def test_toy_precision_and_backend_flow_through_quantize_load_and_bench(toys, micro_artifact, tmp_path):
    pytest.importorskip("onnx")
    from clipdeploy.benchmarks.bench import BenchConfig, run_bench
    from clipdeploy.benchmarks.harness import TimingConfig
    from clipdeploy.quantize.config import QuantizeConfig
    from clipdeploy.quantize.stage import quantize

    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    cfg = QuantizeConfig(art, precision=TOY_PRECISION, calib_images=[_images(tmp_path / "images")],
                         samples=32, holdout=32, min_samples=8, threads=1)
    # The gate: the toy's own defaults, with nothing else told about it.
    assert cfg.thresholds().to_dict() == TOY_GATE
    report = quantize(cfg)
    assert report["passed"] and report["build"]["image"] == {"copied_from": "image.fp32.onnx"}
    assert report["image"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    manifest = read_manifest(art)  # the schema accepts the new precision
    made = {v["tower"] for v in manifest["variants"] if v["precision"] == TOY_PRECISION}
    assert made == {"image", "text"}

    # load: the toy backend picks the toy precision by its preference; ONNX Runtime still picks fp32.
    session = clipdeploy.load(art, backend=TOY_BACKEND)
    assert session.backend == TOY_BACKEND and session.precision == {"image": TOY_PRECISION, "text": TOY_PRECISION}
    reference = clipdeploy.load(art, backend="onnxruntime")
    assert set(reference.precision.values()) == {"fp32"}
    np.testing.assert_allclose(session.encode_text(["a photo of a cat"]), reference.encode_text(["a photo of a cat"]),
                               atol=1e-6)
    with pytest.raises(ArtifactError, match="no fp16 onnx variant"):
        clipdeploy.load(art, backend=TOY_BACKEND, precision="fp16")

    # bench: the toy backend is a contender beside PyTorch, measuring the toy precision.
    bench = run_bench(BenchConfig(
        artifact=art, backends=("torch", TOY_BACKEND), batches=(2,), towers=("image",),
        timing=TimingConfig(iters=2, warmup=1), threads=1, isolate=False, progress=False,
        checkpoint=micro_artifact.checkpoint, device="cpu",
    ))
    toy = [r for r in bench["records"] if r["backend"] == TOY_BACKEND]
    assert [r["precision"] for r in toy] == [TOY_PRECISION]
    assert toy[0]["cos_min"] == pytest.approx(1.0, abs=1e-4)  # same weights as the PyTorch reference
    # The bench opened it with its own settings hook (threads), as it opens ONNX Runtime with its own.
    assert [(b.device, b.threads) for b in TOY_BENCH_SETTINGS] == [("cpu", 1)]
    # The report lists it after the registered backends before it, and before the peers.
    from clipdeploy.benchmarks.report import sort_key

    order = [r["backend"] for r in sorted(
        [{**toy[0], "backend": b} for b in ("openvino.plain", TOY_BACKEND, "torch.compile", "onnxruntime", "torch")],
        key=sort_key)]  # fmt: skip
    assert order == ["torch", "onnxruntime", TOY_BACKEND, "torch.compile", "openvino.plain"]


def test_a_backend_can_declare_the_precisions_it_runs(micro_artifact):
    """A backend for existing precisions is one registration: no PrecisionSpec is edited."""
    backends.register(backends.BackendSpec(
        "toy2", "onnx", ("cpu",), _opener("toy2"), unavailable=lambda device: None,
        target=lambda settings: "toy2", runs={"fp32": 0, "fp16": None}, targets=("toy2",),
        auto=lambda manifest, precision, settings: None, auto_rank=-1,  # auto tries it before TensorRT
    ))
    try:
        assert precisions.for_backend("toy2") == ("fp32", "fp16")
        assert precisions.preference("toy2") == ("fp32",)  # fp16 runs only when asked for
        session = clipdeploy.load(micro_artifact.path)  # backend="auto"
        assert session.backend == "toy2" and set(session.precision.values()) == {"fp32"}
    finally:
        backends.unregister("toy2")
    assert "toy2" not in precisions.get("fp32").backends and precisions.preference("toy2") == ()
    assert precisions.preference("onnxruntime-cpu") == ("int8", "fp32")  # the others are untouched


def test_a_registered_backend_is_a_load_and_cli_choice(toys, micro_artifact):
    from clipdeploy.cli import build_parser

    assert TOY_BACKEND in backends.choices()
    args = build_parser().parse_args(["embed", str(micro_artifact.path), "--backend", TOY_BACKEND, "--text", "x"])
    assert args.backend == TOY_BACKEND
    from clipdeploy.benchmarks.command import config_from_args

    bench = build_parser().parse_args(["bench", str(micro_artifact.path), "--backends", f"torch,{TOY_BACKEND}"])
    assert config_from_args(bench).backends == ("torch", TOY_BACKEND)  # a --backends choice of the bench too
    backends.unregister(TOY_BACKEND)
    with pytest.raises(UsageError, match="backend 'toy' is not one of auto, onnxruntime, tensorrt, openvino$"):
        clipdeploy.load(micro_artifact.path, backend=TOY_BACKEND)


# ---- a precision that runs another precision's file with a backend setting ------------------------------

TOY_REUSE = "int8-ov-accuracy"
# A setting every CPU honours (an int8-with-bf16 variant would say INFERENCE_PRECISION_HINT=bf16, which
# only a CPU with native bf16 runs): the same int8 file, compiled by OpenVINO under a setting of its own.
TOY_REUSE_SETTINGS = {"INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY"}
# Loose on purpose: the micro ViT's weights are random (its top-1 has no retrieval structure), and OpenVINO's
# int8 without VNNI loses some accuracy; what is tested is where the variant runs, not how well.
LOOSE_GATE = {"min_cosine": 0.9, "min_mean_cosine": None, "min_top1": 0.5}


@pytest.fixture
def toy_reuse():
    """Register the toy precision for one test, and take it away after it."""
    precisions.register(precisions.PrecisionSpec(
        TOY_REUSE, "clipdeploy.quantize.make:runs_file", gate=LOOSE_GATE,
        backends=("openvino",), runs_file_of=precisions.INT8,
        backend_settings={"openvino": TOY_REUSE_SETTINGS}, gate_backend="openvino",
        needs=(("openvino", "openvino"),), summary="the int8 file on OpenVINO in its accuracy mode (a test toy)",
    ))
    yield
    precisions.unregister(TOY_REUSE)


def _execution_mode(runner) -> str:
    return str(runner.compiled.get_property("EXECUTION_MODE_HINT")).rsplit(".", 1)[-1]


def test_a_precision_that_runs_the_int8_file_inherits_the_files_cpu_rule(toy_reuse, monkeypatch, tmp_path):
    """OpenVINO runs int8 files only with VNNI: a precision that runs the int8 file is held to the same rule."""
    from tests.support.cpus import use_cpu

    settings = backends.LoadSettings()
    use_cpu(monkeypatch, tmp_path, "avx2")
    assert "VNNI" in (backends.get("openvino").refusal(TOY_REUSE, settings) or "")
    assert TOY_REUSE not in backends.get("openvino").preference(settings)
    use_cpu(monkeypatch, tmp_path, "amx")
    assert backends.get("openvino").refusal(TOY_REUSE, settings) is None


def test_a_precision_that_runs_the_int8_file_with_an_openvino_setting(toy_reuse, micro_artifact, tmp_path,
                                                                      monkeypatch, capsys):
    pytest.importorskip("onnx")
    from tests.support.cpus import use_cpu

    use_cpu(monkeypatch, tmp_path, "avx512-vnni")  # OpenVINO runs int8 files only with VNNI (tested above)
    pytest.importorskip("openvino", reason="the toy precision runs on OpenVINO: pip install 'clipdeploy[openvino]'")
    from clipdeploy.artifact.view import ArtifactView
    from clipdeploy.benchmarks.bench import BenchConfig, run_bench
    from clipdeploy.benchmarks.harness import TimingConfig
    from clipdeploy.cli import build_parser, main
    from clipdeploy.engines.builder import sources
    from clipdeploy.engines.config import BuildConfig
    from clipdeploy.quantize.config import QuantizeConfig
    from clipdeploy.quantize.stage import quantize
    from clipdeploy.triton.config import TritonConfig
    from clipdeploy.triton.plan import collect

    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    images = _images(tmp_path / "images")
    assert TOY_REUSE in build_parser().format_help()  # --precision's help and choices come from the registry

    # Its file is the int8 variant's: quantize refuses in one line, before reading data, until there is one.
    code = main(["quantize", str(art), "--precision", TOY_REUSE, "--calib-images", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no int8 onnx variant" in err, err
    assert "clipdeploy quantize --precision int8" in err and "Traceback" not in err
    quantize(QuantizeConfig(art, precision="int8", calib_images=[images], samples=32, holdout=32, min_samples=8,
                            threads=1, min_top1=0.5, recover=False))

    # The gate: the int8 file, opened through the backend registry on OpenVINO with the toy's setting.
    opened = []
    real_open_file = backends.open_file

    def spy(backend, path, precision, settings):
        runner = real_open_file(backend, path, precision, settings)
        opened.append((backend, path.name, precision, _execution_mode(runner)))
        return runner

    monkeypatch.setattr(backends, "open_file", spy)
    cfg = QuantizeConfig(art, precision=TOY_REUSE, calib_images=[images], samples=32, holdout=32, min_samples=8,
                         threads=1)
    assert cfg.thresholds().to_dict() == LOOSE_GATE
    report = quantize(cfg)
    assert report["passed"] and report["variant_backend"] == "openvino"
    assert sorted(opened) == [("openvino", f"{t}.int8.onnx", TOY_REUSE, "ACCURACY") for t in ("image", "text")]
    assert report["build"]["image"] == {"runs": "image.int8.onnx", "openvino_inference_precision_hint": "f32",
                                        "openvino_execution_mode_hint": "ACCURACY"}
    manifest = read_manifest(art)
    int8 = {v["tower"]: v for v in manifest["variants"] if v["precision"] == "int8"}
    toy = {v["tower"]: v for v in manifest["variants"] if v["precision"] == TOY_REUSE}
    assert set(toy) == {"image", "text"}
    for tower, v in toy.items():  # no file of its own: the int8 file, sum and layout, with its own gate
        assert (v["file"], v["sha256"], v["source"]) == (int8[tower]["file"], int8[tower]["sha256"], int8[tower]["file"])
        assert v["weights"] == int8[tower]["weights"] and v["validation"]["passed"]
    assert not list(art.glob(f"*{TOY_REUSE}*"))

    # load: OpenVINO opens the int8 file with the toy's setting; a backend without it is refused.
    session = clipdeploy.load(art, backend="openvino", precision=TOY_REUSE,
                              backend_options={"openvino_cache_dir": ""})
    assert session.precision == {"image": TOY_REUSE, "text": TOY_REUSE}
    assert {t: (r.path.name, _execution_mode(r)) for t, r in session.runners.items()} == {
        t: (f"{t}.int8.onnx", "ACCURACY") for t in ("image", "text")}
    with pytest.raises(UsageError, match=f"precision '{TOY_REUSE}' runs on openvino only, not on onnxruntime"):
        clipdeploy.load(art, backend="onnxruntime", precision=TOY_REUSE)

    # bench: OpenVINO measures the toy precision when asked for it.
    bench = run_bench(BenchConfig(
        artifact=art, backends=("openvino",), precisions=(TOY_REUSE,), batches=(2,), towers=("image",),
        timing=TimingConfig(iters=2, warmup=1), threads=1, isolate=False, progress=False, device="cpu",
    ))
    assert [(r["backend"], r["precision"]) for r in bench["records"]] == [("openvino", TOY_REUSE)]

    # TensorRT builds no engine of it, and Triton (ONNX Runtime) leaves it out, saying why.
    with pytest.raises(UsageError, match=f"{TOY_REUSE} runs on openvino only, not TensorRT"):
        sources(ArtifactView.read(art), BuildConfig(artifact=art, precision=TOY_REUSE))
    notes: set[str] = set()
    (plan,) = collect(TritonConfig(artifacts=[art], output=tmp_path / "repo", precisions=(TOY_REUSE, "fp32")),
                      [], notes)
    assert {v.precision for v in plan.onnx} == {"fp32"}
    assert f"{TOY_REUSE} ONNX variants are left out: they run on openvino only, not ONNX Runtime" in notes, notes


def test_runs_file_of_must_name_another_registered_precision():
    for bad in ("int9", "self-copy"):
        with pytest.raises(UsageError, match=f"runs_file_of='{bad}' must name another registered precision"):
            precisions.register(precisions.PrecisionSpec("self-copy", "x:y", runs_file_of=bad))
    assert "self-copy" not in precisions.names()
