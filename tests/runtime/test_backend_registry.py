"""The backend registry's mechanism: each backend declares itself in its own module, a backend's CPU rule
for a precision is data on its ``runs`` entry, and the bench and schedulers ask the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipdeploy import cpu_features, precisions
from clipdeploy.errors import UsageError
from clipdeploy.runtime.backends import onnxruntime, openvino, registry, tensorrt
from clipdeploy.runtime.backends.registry import BackendSpec, BenchSettings, LoadSettings, Runs
from tests.support.cpus import VNNI_CPUS, use_cpu


def test_each_builtin_backend_is_declared_in_its_own_module():
    assert [registry.get(n) for n in registry.names()] == [onnxruntime.SPEC, tensorrt.SPEC, openvino.SPEC]
    assert registry.choices() == ("auto", "onnxruntime", "tensorrt", "openvino")


def test_importing_the_registry_registers_them_without_a_heavy_import():
    code = (
        "import sys\n"
        "from clipdeploy.runtime.backends import registry\n"
        "print(','.join(registry.names()))\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('onnxruntime', 'openvino', 'tensorrt', 'torch', 'onnx', 'cuda'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["onnxruntime,tensorrt,openvino", ""], out


def test_gpu_only_backends_come_from_the_registry():
    assert registry.needs_gpu() == ("tensorrt",)
    registry.register(BackendSpec("toy-gpu", "onnx", ("cuda",), lambda *a: ({}, {}), lambda device: None,
                                  target=lambda settings: "toy-gpu"))
    try:
        assert registry.needs_gpu() == ("tensorrt", "toy-gpu")
    finally:
        registry.unregister("toy-gpu")


def test_bench_settings_hooks():
    cpu = onnxruntime.SPEC.bench_settings(BenchSettings("cpu", 3, "basic"))
    assert cpu == {"intra_op_num_threads": 3, "inter_op_num_threads": 1, "graph_optimization_level": "basic",
                   "providers": ["CPUExecutionProvider"]}
    assert onnxruntime.SPEC.bench_settings(BenchSettings("cuda", 3))["providers"] == ["CUDAExecutionProvider"]
    # The others open with load()'s defaults, as before the hook existed.
    assert tensorrt.SPEC.bench_settings is None and openvino.SPEC.bench_settings is None
    LoadSettings(**{**cpu, "providers": tuple(cpu["providers"])})  # the hook speaks LoadSettings' field names


@pytest.mark.parametrize("kind", ["avx2", *VNNI_CPUS])
def test_openvino_int8_rule_is_data_on_its_runs_entry(kind, monkeypatch, tmp_path):
    use_cpu(monkeypatch, tmp_path, kind)
    entry = openvino.SPEC.runs_entry(precisions.INT8)
    assert set(entry.cpu_features) == cpu_features.VNNI_FLAGS and entry.anyway_option in openvino.SPEC.options
    plain, anyway = LoadSettings(), LoadSettings(extra={openvino.INT8_WITHOUT_VNNI: True})
    assert openvino.SPEC.preference(anyway) == ("int8", "bf16", "fp32")
    assert openvino.SPEC.refusal("int8", anyway) is None and openvino.SPEC.refusal("fp32", plain) is None
    if cpu_features.has_vnni():
        assert openvino.SPEC.preference(plain) == ("int8", "bf16", "fp32")
        assert openvino.SPEC.refusal("int8", plain) is None
    else:
        assert openvino.SPEC.preference(plain) == ("bf16", "fp32")
        assert "cosine 0.969" in openvino.SPEC.refusal("int8", plain)
        with pytest.raises(UsageError, match=openvino.INT8_WITHOUT_VNNI):
            openvino.SPEC.load(None, "int8", plain, verify=False)  # refused before anything is opened


@pytest.mark.parametrize("kind", ["avx2", "amx"])
def test_any_backend_can_declare_a_cpu_rule(kind, monkeypatch, tmp_path):
    """The rule is mechanism, not OpenVINO's: a toy backend declares one for fp32 and gets the same treatment."""
    use_cpu(monkeypatch, tmp_path, kind)
    spec = registry.register(BackendSpec(
        "toy-rule", "onnx", ("cpu",), lambda *a: ({}, {}), lambda device: None, target=lambda settings: "toy-rule",
        runs={"fp32": Runs(0, cpu_features=("amx_int8",), refusal="toy fp32 needs AMX")}, targets=("toy-rule",),
    ))
    try:
        assert spec.preference(LoadSettings()) == (("fp32",) if kind == "amx" else ())
        assert spec.refusal("fp32", LoadSettings()) == (None if kind == "amx" else "toy fp32 needs AMX")
    finally:
        registry.unregister("toy-rule")
