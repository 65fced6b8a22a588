"""Contract harness: runs clipdeploy's real build, validate and runtime code against recording fakes.

Run by test_trt_contract.py in a subprocess whose PYTHONPATH holds one TensorRT version's real
(stubbed) bindings:  python contract_harness.py TEMPLATE_ARTIFACT WORKDIR OUT.json

Each scenario gets fresh fakes and its own record of names, calls and violations. The JSON it writes
is what the tests assert on. This proves how the TensorRT and CUDA APIs are used, not that an engine
works: the fakes emulate just enough for the code to run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import re
import shutil
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from tests.support.tiny_artifact import expected
from tests.support.trt_fakes import CudaWorld, FakeObject, HarnessError, Recorder, TrtWorld

REAL_TRT = importlib.import_module("tensorrt")
REAL_CUDART = importlib.import_module("cuda.bindings.runtime")
SRC = Path(importlib.import_module("clipdeploy").__file__).resolve().parent


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def install(world: TrtWorld) -> None:
    """Make ``import tensorrt`` and ``from cuda.bindings import runtime`` give the fakes."""
    import cuda.bindings

    from clipdeploy.runtime.tensorrt_compat import clear_loggers

    sys.modules["tensorrt"] = world.module
    sys.modules["cuda.bindings.runtime"] = world.cuda.module
    cuda.bindings.runtime = world.cuda.module
    # The fallback these scenarios check is TensorRT -> ONNX Runtime; whether OpenVINO ranks between them
    # depends on the CPU (tests/runtime/test_openvino.py checks that), so it is hidden here.
    sys.modules["openvino"] = None  # type: ignore[assignment]
    clear_loggers()


def fresh(template: Path, work: Path, name: str) -> Path:
    dst = work / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(template, dst)
    return dst


def error_of(fn: Any) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def manifest_of(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


# ---- scenarios ----------------------------------------------------------------------------------


def saved_results(art: Path, results: Path) -> dict:
    """What validate --save-results wrote: its runners, how far the saved outputs are from what the emulated
    engine computes on the saved inputs, and the comparison of the file with ONNX Runtime (--load-results)."""
    from clipdeploy.engines import polygraphy_results
    from clipdeploy.engines.validate import compare_saved

    runs = polygraphy_results.load(results)
    return {
        "runners": sorted(r.key for r in runs),
        "iterations": {r.file: len(r.outputs) for r in runs},
        "err_vs_engine": max(
            float(np.abs(next(iter(o.values())) - expected(next(iter(i.values())))).max())
            for r in runs
            for i, o in zip(r.inputs, r.outputs, strict=True)
        ),
        "compare": compare_saved(art, results),
    }


def scenario_pipeline(world: TrtWorld, template: Path, work: Path) -> dict:
    """build (every option) -> validate -> load (tensorrt, auto, graphs, threads, torch) -> encode."""
    import clipdeploy
    from clipdeploy.engines import BuildConfig, build_engines, validate_engines

    art = fresh(template, work, "pipeline")
    cache = work / "timing.cache"
    fig: dict[str, Any] = {}
    fp32 = build_engines(
        BuildConfig(
            art, precision="fp32", batch=(1, 4, 8), workspace=1 << 28, opt_level=4, timing_cache=cache, tf32=False
        )
    )
    fig["cache_after_first"] = json.loads(cache.read_bytes())
    fp16 = build_engines(
        BuildConfig(
            art,
            precision="fp16",
            batch=(1, 2, 4),
            shapes={"sequence": (2, 8, 16)},
            timing_cache=cache,
            hardware_compat="ampere-plus",
            version_compat=True,
        )
    )
    fig["cache_after_second"] = json.loads(cache.read_bytes())
    fig["entries"] = fp32 + fp16
    fig["plans"] = {e["file"]: json.loads((art / e["file"]).read_bytes()) for e in fp32 + fp16}
    results = work / "pipeline-results.json"
    fig["validate"] = validate_engines(art, engine_host_code_allowed=True, save_results=results)
    fig["saved"] = saved_results(art, results)
    fig["validate_without_host_code"] = error_of(lambda: validate_engines(art, precision="fp16"))

    rng = np.random.default_rng(0)
    pixels = rng.random((19, 3, 32, 32), dtype=np.float32)
    s = clipdeploy.load(art, backend="tensorrt", precision="fp32")
    fig["describe"] = s.describe()
    fig["max_batch"] = {t: r.max_batch for t, r in s.runners.items()}
    fig["split_err"] = float(np.abs(s.encode_pixels(pixels, normalize=False) - expected(pixels)).max())
    fig["batch_size_err"] = float(
        np.abs(s.encode_pixels(pixels, normalize=False, batch_size=3) - expected(pixels)).max()
    )
    tokens = s.tokenize(["a cat", "a photo of a dog on a mat", ""])
    fig["text_err"] = float(np.abs(s.encode_tokens(tokens, normalize=False) - expected(tokens)).max())
    ort = clipdeploy.load(art, backend="onnxruntime")
    fig["text_vs_ort"] = float(
        np.abs(s.encode_text(["a cat", "two dogs"]) - ort.encode_text(["a cat", "two dogs"])).max()
    )

    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            for n in (1 + k, 9 + k, 3):
                x = pixels[:n] + k
                got = s.encode_pixels(x, normalize=False)
                if not np.allclose(got, expected(x), rtol=1e-5):
                    errors.append(f"thread {k} batch {n} differs")
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fig["thread_errors"] = errors
    fig["thread_states"] = len(s.runners["image"]._states)

    g = clipdeploy.load(art, backend="tensorrt", precision="fp32", cuda_graphs=True)
    graph_errs = []
    for n in (1, 3, 5, 8, 11, 3, 5):  # the repeats replay captured graphs
        x = pixels[:n]
        graph_errs.append(float(np.abs(g.encode_pixels(x, normalize=False) - expected(x)).max()))
    fig["graph_errs"] = graph_errs
    fig["graph_keys"] = sorted(str(k) for k in g.runners["image"]._local.state.graphs)

    fig["auto_backend"] = clipdeploy.load(art).backend
    fig["auto_precision"] = clipdeploy.load(art).precision
    fig["auto_host_code_precision"] = clipdeploy.load(art, engine_host_code_allowed=True).precision
    fp16_session = clipdeploy.load(art, backend="tensorrt", precision="fp16", engine_host_code_allowed=True)
    fig["seq_out_of_profile"] = error_of(lambda: fp16_session.encode_tokens(tokens))
    fig["seq_in_profile_err"] = float(
        np.abs(fp16_session.encode_tokens(tokens[:, :16], normalize=False) - expected(tokens[:, :16])).max()
    )
    fig["fp16_host_code_refused"] = error_of(lambda: clipdeploy.load(art, backend="tensorrt", precision="fp16"))

    fig["torch"] = torch_figures(world, s.runners["image"], s, pixels[:4])
    for session in (s, g, fp16_session):
        for r in session.runners.values():
            r.close()
    return fig


def torch_figures(world: TrtWorld, runner: Any, session: Any, pixels: np.ndarray) -> dict:
    """The zero-copy entry point, fed torch tensors (on the CPU here: the fake engine reads host memory)."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    import clipdeploy.runtime.cuda as cuda

    world.cuda.allow_foreign = True
    current_stream, cuda.torch_current_stream = cuda.torch_current_stream, lambda t: 0x77  # any handle does here
    try:
        want = torch.from_numpy(expected(pixels))
        out = runner.infer_torch({"pixel_values": torch.from_numpy(pixels)})["image_embeds"]
        back = session.encode_pixels(torch.from_numpy(pixels), normalize=False, return_torch=True)
        return {
            "err": float((out - want).abs().max()),
            "host_path": [type(back).__name__, float((back - want).abs().max())],
        }
    finally:
        cuda.torch_current_stream = current_stream
        world.cuda.allow_foreign = False


def scenario_cli(world: TrtWorld, template: Path, work: Path) -> dict:
    """The CLI wiring: build and validate through `clipdeploy.cli.main`."""
    from clipdeploy.cli import main

    art = fresh(template, work, "cli")
    fig: dict[str, Any] = {}
    for name, argv in {
        "build": [
            "build",
            str(art),
            "--precision",
            "fp32",
            "--batch",
            "1:2:4",
            "--workspace",
            "256MiB",
            "--opt-level",
            "2",
            "--timing-cache",
            str(work / "cli.cache"),
            "--tower",
            "image",
            "--no-validate",
        ],
        "build_text": [
            "build",
            str(art),
            "--tower",
            "text",
            "--seq-len",
            "1:16:77",
            "--hardware-compat",
            "same-compute-capability",
            "--device",
            "0",
        ],
        "validate": ["validate", str(art)],
    }.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        fig[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
    fig["manifest"] = manifest_of(art)
    return fig


def scenario_errors(world: TrtWorld, template: Path, work: Path) -> dict:
    """Each failure gives a one-line error that says what to do."""
    import clipdeploy
    import clipdeploy.cli
    from clipdeploy.engines import BuildConfig, build_engines

    fig: dict[str, Any] = {}
    art = fresh(template, work, "errors")
    world.parse_fails = True
    fig["parser"] = error_of(lambda: build_engines(BuildConfig(art, validate=False)))
    world.parse_fails, world.build_fails = False, True
    fig["build_none"] = error_of(lambda: build_engines(BuildConfig(art, validate=False)))
    world.build_fails = False
    fig["no_variant"] = error_of(lambda: build_engines(BuildConfig(art, precision="int8")))
    fig["bad_axis"] = error_of(lambda: build_engines(BuildConfig(art, shapes={"sequence": (1, 8, 100)})))
    build_engines(BuildConfig(art, batch=(1, 2, 4)))
    fig["too_big_for_profile"] = error_of(
        lambda: (
            clipdeploy.load(art, backend="tensorrt")
            .runners["image"]
            .infer({"pixel_values": np.zeros((5, 3, 32, 32), np.float32)})
        )
    )

    # An engine from another GPU and TensorRT version.
    m = manifest_of(art)
    for v in m["variants"]:
        if v["format"] == "tensorrt":
            v.update(tensorrt_version="10.0.1.6", compute_capability="8.6", gpu="NVIDIA GeForce RTX 3090")
    (art / "manifest.json").write_text(json.dumps(m))
    fig["mismatch"] = error_of(lambda: clipdeploy.load(art, backend="tensorrt"))
    capture = LogCapture()
    logging.getLogger("clipdeploy").addHandler(capture)
    logging.getLogger("clipdeploy").setLevel(logging.INFO)
    fig["mismatch_auto"] = clipdeploy.load(art).backend
    fig["mismatch_auto_log"] = [line for line in capture.lines if "auto" in line]
    logging.getLogger("clipdeploy").removeHandler(capture)

    world.cuda.no_gpu = True
    fig["no_gpu_build"] = error_of(lambda: build_engines(BuildConfig(art)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = clipdeploy.cli.main(["validate", str(art)])
    fig["no_gpu_validate_cli"] = {"rc": rc, "stderr": err.getvalue()}
    world.cuda.no_gpu = False

    sys.modules["tensorrt"] = None  # type: ignore[assignment]  # as if TensorRT were not installed
    from clipdeploy.runtime import cuda

    cuda.gpu_present = lambda: True  # on a machine with a GPU: the error names TensorRT (no GPU: test_no_gpu.py)
    fig["no_tensorrt"] = error_of(lambda: build_engines(BuildConfig(art)))
    fig["no_tensorrt_auto"] = clipdeploy.load(art).backend
    return fig


def scenario_negative(world: TrtWorld, template: Path, work: Path) -> dict:
    """The checker itself: uses that a version lacks, or that break a signature, must be violations."""
    trt, cudart = world.module, world.cuda.module
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    network = builder.create_network(0)
    engine = FakeObject(world, REAL_TRT.ICudaEngine, _io=[], _inputs=set(), _plan={})
    ctx = FakeObject(world, REAL_TRT.IExecutionContext)
    probes = {
        "BuilderFlag.FP16": lambda: config.set_flag(trt.BuilderFlag.FP16),
        "EXPLICIT_BATCH": lambda: builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)),
        "set_memory_pool_limit(size=)": lambda: config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, size=1 << 30
        ),
        "set_memory_pool_limit(swapped)": lambda: config.set_memory_pool_limit(1 << 30, trt.MemoryPoolType.WORKSPACE),
        "set_memory_pool_limit(3 args)": lambda: config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1, 2),
        "set_memory_pool_limit(ok)": lambda: config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30),
        "set_memory_pool_limit(pool=, pool_size=)": lambda: config.set_memory_pool_limit(
            pool=trt.MemoryPoolType.WORKSPACE, pool_size=1 << 30
        ),
        "int8_calibrator": lambda: setattr(config, "int8_calibrator", None),
        "build_serialized_network(network)": lambda: builder.build_serialized_network(network),
        "execute_async_v2": lambda: ctx.execute_async_v2([0, 0], 0),
        "device_memory_size": lambda: engine.device_memory_size,
        "num_io_tensors = 3": lambda: setattr(engine, "num_io_tensors", 3),
        "platform_has_fast_fp16": lambda: builder.platform_has_fast_fp16,
        "cudaMemcpyAsync(no stream)": lambda: cudart.cudaMemcpyAsync(
            0, 0, 0, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        ),
        "cudaMemcpyAsync(int kind)": lambda: cudart.cudaMemcpyAsync(0, 0, 0, 1, 0),
    }
    results = {}
    for name, probe in probes.items():
        before = len(world.rec.violations)
        try:
            probe()
        except (AttributeError, HarnessError, KeyError, TypeError):
            pass  # the violation is what counts; the fake may not emulate the call
        results[name] = world.rec.violations[before:]
    world.rec.violations.clear()  # these were planted
    return results


def static_names() -> dict:
    """Every ``trt.X.Y`` and ``cudart.X`` written anywhere in clipdeploy, resolved on the real modules."""
    missing, seen = [], set()
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for module, real, pattern in (
            ("tensorrt", REAL_TRT, r"\btrt\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Z][A-Za-z0-9_]*)*)"),
            ("cudart", REAL_CUDART, r"\bcudart\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*)"),
        ):
            for dotted in re.findall(pattern, text):
                seen.add(f"{module}.{dotted}")
                obj = real
                for part in dotted.split("."):
                    if not hasattr(obj, part):
                        missing.append(f"{path.relative_to(SRC.parent)}: {module}.{dotted}")
                        break
                    obj = getattr(obj, part)
    return {"seen": sorted(seen), "missing": sorted(set(missing))}


# Source edits that break the contract: each must surface as a violation when the edited code runs.
BUILDER, BACKEND = "clipdeploy.engines.builder", "clipdeploy.runtime.backends.tensorrt"
MUTANTS = {
    "set_memory_pool_limit(size=)": (
        BUILDER,
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace)",
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, size=cfg.workspace)",
    ),
    "EXPLICIT_BATCH": (
        BUILDER,
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    ),
    "BuilderFlag.FP16": (
        BUILDER,
        "    config = builder.create_builder_config()\n",
        "    config = builder.create_builder_config()\n    config.set_flag(trt.BuilderFlag.FP16)\n",
    ),
    "misspelt property": (
        BUILDER,
        "config.builder_optimization_level = cfg.opt_level",
        "config.builder_optimisation_level = cfg.opt_level",
    ),
    "execute_async_v2": (
        BACKEND,
        "ctx.execute_async_v3(self.stream.handle)",
        "ctx.execute_async_v2([], self.stream.handle)",
    ),
    "set_input_shape(shape=Dims keyword typo)": (
        BACKEND,
        "ctx.set_input_shape(name, tuple(int(d) for d in shape))",
        "ctx.set_input_shape(name, dims=tuple(int(d) for d in shape))",
    ),
    "cudaMemcpyAsync without stream": (
        "clipdeploy.runtime.cuda",
        "cudart.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], stream.handle)",
        "cudart.cudaMemcpyAsync(dst, src, nbytes, kinds[kind])",
    ),
}


def scenario_mutants(world: TrtWorld, template: Path, work: Path) -> dict:
    """The real code, edited to misuse the API: the checker must flag each edit when the edited code runs."""
    import types

    from clipdeploy.engines import BuildConfig
    from clipdeploy.runtime.backends import registry as backend_registry

    results = {}
    for name, (module_name, old, new) in MUTANTS.items():
        original = importlib.import_module(module_name)
        source = Path(original.__file__).read_text(encoding="utf-8")
        if old not in source:
            results[name] = {"error": f"{module_name} no longer contains {old!r}", "violations": []}
            continue
        mutant = types.ModuleType(module_name)
        mutant.__file__ = original.__file__
        # A backend module registers its own spec when it runs: the edited copy's registration replaces
        # the real one only while this mutant runs (the registry is restored below).
        saved_backends = dict(backend_registry._REGISTRY)
        real_register = backend_registry.register
        backend_registry.register = lambda spec, replace=False: real_register(spec, replace=True)
        try:
            exec(compile(source.replace(old, new, 1), original.__file__, "exec"), mutant.__dict__)
        finally:
            backend_registry.register = real_register
        art = fresh(template, work, "mutant")
        before = len(world.rec.violations)
        if module_name == BUILDER:
            error = error_of(lambda m=mutant, a=art: m.build_engines(BuildConfig(a, workspace=1 << 28, validate=False)))
        else:
            from clipdeploy.engines.builder import build_engines

            build_engines(BuildConfig(art, batch=(1, 2, 4), validate=False))
            before = len(world.rec.violations)
            # Every clipdeploy module that holds the original (as `cuda`, say) sees the edited one meanwhile.
            holders = [
                (m, attr)
                for m in list(sys.modules.values())
                if getattr(m, "__name__", "").startswith("clipdeploy")
                for attr, value in list(vars(m).items())
                if value is original
            ]
            sys.modules[module_name] = mutant
            for m, attr in holders:
                setattr(m, attr, mutant)
            try:
                from clipdeploy.runtime.backends.tensorrt import TrtOptions, TrtRunner

                plan = art / f"engines/image.fp32.sm90.trt{_base(world)}.plan"
                feed = {"pixel_values": np.zeros((2, 3, 32, 32), np.float32)}
                error = error_of(lambda p=plan, f=feed: TrtRunner(p, TrtOptions()).infer(f))
            finally:
                sys.modules[module_name] = original
                for m, attr in holders:
                    setattr(m, attr, original)
        results[name] = {"error": error, "violations": world.rec.violations[before:]}
        backend_registry._REGISTRY.clear()
        backend_registry._REGISTRY.update(saved_backends)
    world.rec.violations.clear()  # these were planted
    return results


def _base(world: TrtWorld) -> str:
    from clipdeploy.runtime.tensorrt_compat import base_version

    return base_version(world.version)


def scenario_timing_cache(world: TrtWorld, template: Path, work: Path) -> dict:
    """A timing cache saved by another build meanwhile is merged with ours (ITimingCache.combine), not lost."""
    from clipdeploy.engines.builder import TimingCache

    path = work / "shared.cache"
    path.write_text(json.dumps(["from-first-run"]))
    builder = world.module.Builder(world.module.Logger(world.module.Logger.WARNING))
    config = builder.create_builder_config()
    cache = TimingCache(path)
    cache.install(config)
    cache.cache._state["_entries"].add("ours")
    path.write_text(json.dumps(["from-first-run", "from-a-parallel-build"]))
    cache.save()
    return {"saved": json.loads(path.read_text()), "tmp_left": sorted(p.name for p in work.glob(".shared.cache*"))}


SCENARIOS = {
    "pipeline": scenario_pipeline,
    "cli": scenario_cli,
    "errors": scenario_errors,
    "negative": scenario_negative,
    "mutants": scenario_mutants,
    "timing_cache": scenario_timing_cache,
}


def main() -> None:
    template, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import cuda.bindings

    results: dict[str, Any] = {
        "tensorrt": REAL_TRT.__version__,
        "cuda_bindings": cuda.bindings.__version__,
        "static": static_names(),
        "scenarios": {},
    }
    only = sys.argv[4:] or list(SCENARIOS)
    for name in only:
        rec = Recorder()
        world = TrtWorld(REAL_TRT, CudaWorld(REAL_CUDART, rec), rec)
        install(world)
        entry: dict[str, Any] = {"error": None, "figures": None}
        try:
            entry["figures"] = SCENARIOS[name](world, template, work)
        except Exception as e:  # noqa: BLE001 - reported to the test with its traceback
            entry["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        entry.update(violations=rec.violations, calls=rec.calls, names=sorted(rec.names))
        results["scenarios"][name] = entry
    out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
