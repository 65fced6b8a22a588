"""Contract tests: clipdeploy's TensorRT and CUDA code against the real TensorRT 10.13 and 11.4 bindings.

These prove how the APIs are used (every name exists in both versions, every call fits a published
signature), not that an engine builds or runs: that is what the GPU tests (``-m tensorrt``) are for.

How: the real bindings import here with stub native libraries (see tests/support/trt_bindings.py). One process can
import one TensorRT only, so contract_harness.py runs per version in a subprocess. It executes the
real build, validate, CLI and runtime code against recording fakes (tests/support/trt_fakes.py) that check every
attribute against the real classes and bind every call to the signature parsed from the real
docstring, and records what it saw; the tests below assert on that record.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.trt_bindings import require
from tests.support.trt_fakes import Recorder, check_call, parse_signature, signatures

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]  # on the harness's PYTHONPATH: it imports tests.support
MAJORS = (10, 11)


@pytest.fixture(scope="session", params=MAJORS, ids=lambda m: f"trt{m}")
def contract(request: pytest.FixtureRequest, tiny_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The harness's record for one TensorRT major version (run once per test session)."""
    pytest.importorskip("onnxruntime")
    site = require(request.param)
    work = tmp_path_factory.mktemp(f"contract{request.param}")
    out = work / "record.json"
    result = subprocess.run(
        [sys.executable, str(HERE / "contract_harness.py"), str(tiny_template), str(work), str(out)],
        env=site.env([REPO]),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0 and out.is_file(), f"the contract harness crashed:\n{result.stdout}\n{result.stderr}"
    record = json.loads(out.read_text())
    assert record["tensorrt"].startswith({10: "10.13.", 11: "11.4."}[request.param]), record["tensorrt"]
    return record


def scenario(contract: dict, name: str) -> dict:
    s = contract["scenarios"][name]
    assert s["error"] is None, f"TensorRT {contract['tensorrt']}, scenario {name}: {s['error']}"
    assert s["violations"] == [], f"TensorRT {contract['tensorrt']}, scenario {name}: " + "\n".join(s["violations"])
    return s


def called(s: dict) -> set[str]:
    return {re.sub(r"[ (].*", "", c) for c in s["calls"]}


# ---- the code uses the published API ------------------------------------------------------------


def test_contract_every_trt_and_cudart_name_in_the_source_exists(contract):
    """Static: every `trt.X.Y` and `cudart.X` written in src/clipdeploy resolves on the real modules."""
    static = contract["static"]
    assert static["missing"] == [], f"TensorRT {contract['tensorrt']}: {static['missing']}"
    assert "tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED" in static["seen"]
    assert "cudart.cudaMemcpyAsync" in static["seen"]
    # fp8 too is expressed only by the ONNX graph's types (FLOAT8E4M3FN Q/DQ): no BuilderFlag.FP8
    # (gone in 11), no DataType.FP8 the code must spell; its compute-capability refusal needs no TensorRT name.
    flags = ("tensorrt.BuilderFlag.FP16", "tensorrt.BuilderFlag.INT8", "tensorrt.BuilderFlag.FP8")
    assert not any(n.startswith(flags) for n in static["seen"])


def test_contract_build_validate_and_run_use_only_published_calls(contract):
    """Dynamic: the whole pipeline ran against the real signatures, through every call that matters, unflagged."""
    s = scenario(contract, "pipeline")
    need = {
        "Builder.__init__",
        "Builder.create_network",
        "OnnxParser.__init__",
        "OnnxParser.parse_from_file",
        "Builder.create_builder_config",
        "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.clear_flag",
        "IBuilderConfig.set_flag",
        "IBuilderConfig.builder_optimization_level",
        "IBuilderConfig.hardware_compatibility_level",
        "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache",
        "ITimingCache.combine",
        "ITimingCache.serialize",
        "Builder.create_optimization_profile",
        "IOptimizationProfile.set_shape",
        "IBuilderConfig.add_optimization_profile",
        "Builder.build_serialized_network",
        "Runtime.__init__",
        "Runtime.engine_host_code_allowed",
        "Runtime.deserialize_cuda_engine",
        "ICudaEngine.get_tensor_name",
        "ICudaEngine.get_tensor_mode",
        "ICudaEngine.get_tensor_dtype",
        "ICudaEngine.get_tensor_shape",
        "ICudaEngine.get_tensor_profile_shape",
        "ICudaEngine.create_execution_context",
        "IExecutionContext.set_device_memory",
        "IExecutionContext.set_input_shape",
        "IExecutionContext.get_tensor_shape",
        "IExecutionContext.set_tensor_address",
        "IExecutionContext.execute_async_v3",
        "cudart.cudaMalloc",
        "cudart.cudaMallocHost",
        "cudart.cudaMemcpyAsync",
        "cudart.cudaStreamCreateWithFlags",
        "cudart.cudaStreamSynchronize",
        "cudart.cudaStreamBeginCapture",
        "cudart.cudaStreamEndCapture",
        "cudart.cudaGraphInstantiate",
        "cudart.cudaGraphLaunch",
        "cudart.cudaEventRecord",
        "cudart.cudaStreamWaitEvent",
        "cudart.cudaFree",
        "cudart.cudaFreeHost",
        "cudart.cudaGetDeviceProperties",
    }
    assert need <= called(s), f"not exercised: {sorted(need - called(s))}"
    # The name-based tensor API only; no binding indices, no weak typing.
    assert not {c for c in called(s) if "binding" in c.lower() or "execute_async_v2" in c or "execute_v2" in c}


def test_contract_networks_are_strongly_typed_without_precision_flags(contract):
    s = scenario(contract, "pipeline")
    f = s["figures"]
    for name, plan in f["plans"].items():
        assert plan["strongly_typed"], name
        assert not set(plan["flags"]) & {"FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS"}, (
            name,
            plan["flags"],
        )
    flags = {e["file"]: f["plans"][e["file"]]["flags"] for e in f["entries"]}
    assert all(("VERSION_COMPATIBLE" in fl) == ("-vc" in file) for file, fl in flags.items()), flags
    assert any("clear_flag(<BuilderFlag.TF32" in c for c in s["calls"])  # tf32=False


def test_contract_cli_build_and_validate(contract):
    s = scenario(contract, "cli")
    f = s["figures"]
    assert f["build"]["rc"] == 0 and "built image fp32 -> engines/image.fp32.sm90.trt" in f["build"]["stdout"]
    assert f["build_text"]["rc"] == 0 and ": pass" in f["build_text"]["stdout"]
    assert f["validate"]["rc"] == 0 and f["validate"]["stdout"].count(": pass") == 2
    entries = {v["file"]: v for v in f["manifest"]["variants"] if v["format"] == "tensorrt"}
    image = next(v for k, v in entries.items() if k.startswith("engines/image"))
    assert image["workspace_bytes"] == 256 * 2**20 and image["builder_optimization_level"] == 2
    assert image["profile"]["pixel_values"] == {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]}
    text = next(v for k, v in entries.items() if k.startswith("engines/text"))
    assert text["hardware_compatibility"] == "same-compute-capability"
    assert text["profile"]["input_ids"] == {"min": [1, 1], "opt": [8, 16], "max": [64, 77]}


# ---- what the code records and how the runtime plumbing behaves (on an emulated engine) ---------


def test_contract_manifest_entries_and_plan_names(contract):
    f = scenario(contract, "pipeline")["figures"]
    version = ".".join(contract["tensorrt"].split(".")[:3])
    files = sorted(e["file"] for e in f["entries"])
    assert files == sorted(
        [f"engines/{t}.fp32.sm90.trt{version}.plan" for t in ("image", "text")]
        + [f"engines/{t}.fp16.ampere-plus.trt{version}-vc.plan" for t in ("image", "text")]
    )
    keys = {
        "file",
        "sha256",
        "bytes",
        "precision",
        "tower",
        "source",
        "tensorrt_version",
        "gpu",
        "compute_capability",
        "profile",
        "build_seconds",
        "hardware_compatibility",
        "version_compatible",
        "validation",
    }
    for e in f["entries"]:
        assert keys <= set(e), sorted(keys - set(e))
        assert e["tensorrt_version"] == contract["tensorrt"] and e["compute_capability"] == "9.0"
    text16 = next(e for e in f["entries"] if e["tower"] == "text" and e["precision"] == "fp16")
    assert text16["profile"]["input_ids"] == {"min": [1, 2], "opt": [2, 8], "max": [4, 16]}
    for file, record in f["validate"].items():
        assert record["passed"] and record["min_cosine"] > 0.9999, (file, record)
        (out,) = record["polygraphy"].values()  # Polygraphy's comparator ran, gated (fp32/fp16) and passed
        assert out["passed"] is True and out["atol"] > 0 and out["max_abs_err"] <= out["atol"], (file, out)


def test_contract_validate_saves_results_that_compare_anywhere(contract):
    """--save-results under real TensorRT names: one outputs and one inputs runner per engine, the outputs are
    the (emulated) engine's, and the file compares with ONNX Runtime with no TensorRT call (API use, not behaviour)."""
    f = scenario(contract, "pipeline")["figures"]
    saved = f["saved"]
    assert sorted(k.rsplit(":", 1)[1] for k in saved["runners"]) == sorted(f["validate"])
    assert all(k.split(":")[:2] in (["image", "fp32"], ["text", "fp32"], ["image", "fp16"], ["text", "fp16"])
               for k in saved["runners"])  # fmt: skip
    assert set(saved["iterations"].values()) == {3}  # batch 1, opt and max of each profile
    assert saved["err_vs_engine"] < 1e-5
    assert sorted(saved["compare"]) == sorted(f["validate"])
    assert all(r["passed"] for r in saved["compare"].values())
    assert "version-compatible" in f["validate_without_host_code"]
    # Both builds' tactics are in the cache: loaded, extended and merged back.
    assert len(f["cache_after_first"]) == 2 and len(f["cache_after_second"]) == 4


def test_contract_runtime_splits_threads_graphs_and_profiles(contract):
    """On the emulated engine: batches over the profile max are split, threads and graph replays agree."""
    f = scenario(contract, "pipeline")["figures"]
    assert f["max_batch"] == {"image": 8, "text": 8}
    assert f["split_err"] == 0 and f["batch_size_err"] == 0 and f["text_err"] == 0
    assert f["text_vs_ort"] < 1e-5
    assert f["thread_errors"] == []
    assert max(f["graph_errs"]) == 0
    assert len(f["graph_keys"]) == 3  # buckets 1, 4 and 8 for batches 1, 3, 5, 8 and 11 (8 + 3)
    assert f["auto_backend"] == "tensorrt"
    assert f["auto_precision"] == {"image": "fp32", "text": "fp32"}  # the fp16 plans hold host code
    assert f["auto_host_code_precision"] == {"image": "fp16", "text": "fp16"}
    assert "sequence 77, outside the engine's profile 2..16" in f["seq_out_of_profile"]
    assert f["seq_in_profile_err"] == 0
    assert "engine_host_code_allowed=True" in f["fp16_host_code_refused"]
    if "skipped" not in f["torch"]:
        assert f["torch"]["err"] == 0 and f["torch"]["host_path"] == ["Tensor", 0.0]


def test_contract_timing_cache_merges_a_parallel_save(contract):
    f = scenario(contract, "timing_cache")["figures"]
    assert f["saved"] == ["from-a-parallel-build", "from-first-run", "ours"]
    assert f["tmp_left"] == []


def test_contract_errors_are_one_line_and_say_what_to_do(contract):
    f = scenario(contract, "errors")["figures"]
    for key, text in f.items():
        if isinstance(text, str) and text.split(":")[0].endswith("Error"):
            assert "\n" not in text, (key, text)
    assert "node /visual/attn/Softmax_3 (Softmax): unsupported data type BF16" in f["parser"]
    assert "invalid graph: dangling output" in f["parser"]
    assert f["build_none"].startswith("EngineError") and "Out of memory" in f["build_none"]
    assert "clipdeploy quantize" in f["no_variant"]
    assert "context length 77" in f["bad_axis"]
    assert "outside the engine's profile 1..4" in f["too_big_for_profile"]
    assert "TensorRT 10.0.1" in f["mismatch"] and "compute capability 8.6" in f["mismatch"]
    assert "--hardware-compat ampere-plus" in f["mismatch"] and "rebuild" in f["mismatch"]
    assert f["mismatch_auto"] == "onnxruntime" and "chose onnxruntime" in f["mismatch_auto_log"][0]
    assert f["no_gpu_build"].startswith("DependencyError") and "GPU" in f["no_gpu_build"]
    assert f["no_gpu_validate_cli"]["rc"] == 2
    assert f["no_gpu_validate_cli"]["stderr"].count("\n") == 1
    assert "pip install 'clipdeploy[tensorrt]'" in f["no_tensorrt"]
    assert f["no_tensorrt_auto"] == "onnxruntime"


# ---- the checker catches what it must -----------------------------------------------------------


def test_checker_rejects_removed_and_misused_api(contract):
    """The checker is not vacuous: removed names and calls that break a signature are violations."""
    probes = contract["scenarios"]["negative"]["figures"]
    major = int(contract["tensorrt"].split(".")[0])
    always = [
        "set_memory_pool_limit(size=)",
        "set_memory_pool_limit(swapped)",
        "set_memory_pool_limit(3 args)",
        "build_serialized_network(network)",
        "execute_async_v2",
        "num_io_tensors = 3",
        "cudaMemcpyAsync(no stream)",
        "cudaMemcpyAsync(int kind)",
    ]
    removed_in_11 = [
        "BuilderFlag.FP16",
        "EXPLICIT_BATCH",
        "int8_calibrator",
        "device_memory_size",
        "platform_has_fast_fp16",
    ]
    for name in always + (removed_in_11 if major >= 11 else []):
        assert probes[name], f"TensorRT {contract['tensorrt']}: the checker let {name} through"
    for name in ["set_memory_pool_limit(ok)", "set_memory_pool_limit(pool=, pool_size=)"] + (
        removed_in_11 if major == 10 else []
    ):
        assert probes[name] == [], f"TensorRT {contract['tensorrt']}: {name} is valid, yet: {probes[name]}"
    assert "pool_size" in probes["set_memory_pool_limit(size=)"][0]


def test_checker_flags_misuse_edited_into_the_real_code(contract):
    """Mutation check: each edit of the real builder/runtime source that misuses the API is caught when it runs."""
    mutants = contract["scenarios"]["mutants"]["figures"]
    major = int(contract["tensorrt"].split(".")[0])
    only_11 = {"EXPLICIT_BATCH", "BuilderFlag.FP16"}
    for name, result in mutants.items():
        assert "no longer contains" not in result["error"], result["error"]
        if name in only_11 and major == 10:
            assert result["violations"] == [], (name, result)
        else:
            assert result["violations"], (
                f"TensorRT {contract['tensorrt']}: mutant {name!r} went unnoticed ({result['error']})"
            )


# ---- the signature parser itself (no bindings needed) -------------------------------------------


def test_docstring_signatures_parse_with_defaults_and_overloads():
    class Fake:
        """set_memory_pool_limit(self: tensorrt.IBuilderConfig, pool: tensorrt.MemoryPoolType, pool_size: int) -> None"""

    sig = parse_signature(Fake.__doc__, "set_memory_pool_limit")
    assert list(sig.signature.parameters) == ["pool", "pool_size"] and sig.returns == "None"
    logger = parse_signature(
        "__init__(self: tensorrt.Logger, min_severity: tensorrt.ILogger.Severity = <Severity.WARNING: 2>) -> None",
        "__init__",
    )
    assert logger.signature.parameters["min_severity"].default == "<Severity.WARNING: 2>"
    assert logger.annotations["min_severity"] == "tensorrt.ILogger.Severity"

    def overloaded() -> None:
        pass

    overloaded.__doc__ = (
        "deserialize_cuda_engine(*args, **kwargs)\nOverloaded function.\n\n"
        "1. deserialize_cuda_engine(self: tensorrt.Runtime, serialized_engine: buffer) -> tensorrt.ICudaEngine\n\n"
        "2. deserialize_cuda_engine(self: tensorrt.Runtime, stream_reader_v2: tensorrt.IStreamReaderV2) -> tensorrt.ICudaEngine\n"
    )
    sigs = signatures(overloaded, "deserialize_cuda_engine")
    assert [list(s.signature.parameters) for s in sigs] == [["serialized_engine"], ["stream_reader_v2"]]
    rec = Recorder()
    assert check_call(None, rec, "Runtime.deserialize_cuda_engine", sigs, (b"plan",), {}) is sigs[0]
    assert check_call(None, rec, "Runtime.deserialize_cuda_engine", sigs, (), {"engine": b"plan"}) is None
    assert len(rec.violations) == 1 and "matches no published signature" in rec.violations[0]
