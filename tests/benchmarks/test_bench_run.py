"""`clipdeploy bench` end to end on the micro artifact, identical inputs, and one-line errors.

Few iterations and small batches: these tests check what is measured and reported, never how fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipdeploy.benchmarks import worker as worker_mod
from clipdeploy.benchmarks.bench import BenchConfig, run_bench
from clipdeploy.benchmarks.harness import TimingConfig, perf_counter_timer
from clipdeploy.benchmarks.inputs import array_sha256
from clipdeploy.cli import main
from clipdeploy.artifact.manifest import read_manifest, write_manifest

QUICK = TimingConfig(iters=2, warmup=1)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("skipping ")]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("clipdeploy: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bench_end_to_end(micro_artifact, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run(
        capsys,
        "bench",
        str(micro_artifact.path),
        "--checkpoint",
        str(micro_artifact.checkpoint),
        "--backends",
        "torch,onnxruntime,tensorrt",
        "--batch",
        "1,3",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "-o",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    assert "torch fp32" in stdout and "onnxruntime fp32" in stdout and "wrote" in stdout
    assert "skipping tensorrt" in err  # no engines here, said on stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == "clipdeploy-bench/1"
    assert report["environment"]["threads"] == 1 and report["environment"]["cpu"]
    records = report["records"]
    lengths = report["config"]["text_lengths"]  # [77], or [77, prompt length] for a dynamic-length artifact
    assert lengths[0] == 77 and len(lengths) == (2 if _dynamic(micro_artifact.path) else 1)
    seen = {(r["tower"], r["backend"], r["precision"], r["batch"], r["seq_len"]) for r in records}
    assert seen == {
        (t, b, "fp32", n, length)
        for t in ("image", "text")
        for b in ("torch", "onnxruntime")
        for n in (1, 3)
        for length in (lengths if t == "text" else [None])
    }
    for r in records:
        assert r["iters"] == 2
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["cos_min"] > 0.99999, r  # same weights, same inputs
        assert r["speedup_vs_torch_fp32"] > 0
        assert r["peak_rss_mb"] > 0
        if r["backend"] == "torch" and r["seq_len"] in (None, 77):
            assert r["speedup_vs_torch_fp32"] == 1.0
    # identical inputs: every contender of a case was fed the very same array
    by_case: dict[tuple, set] = {}
    for r in records:
        by_case.setdefault((r["tower"], r["batch"], r["seq_len"]), set()).add(r["input_sha256"])
    assert all(len(h) == 1 for h in by_case.values()), by_case
    assert (out / "bench.md").read_text().count("| image |") == 4
    if len(lengths) == 2:  # the short length is exact, and faster than PyTorch's full length in the same run
        short = [r for r in records if r["seq_len"] == lengths[1]]
        assert {r["backend"] for r in short} == {"torch", "onnxruntime"}
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


class _Recorder:
    """A stand-in contender that records what it is fed and answers with a fixed projection."""

    fed: dict[str, list[tuple[str, str]]] = {}
    timer = staticmethod(perf_counter_timer)

    def __init__(self, spec):
        self.spec = spec

    def unsupported(self, tower, seq_len, context_length):
        return None

    def encode(self, tower, x):
        self.fed.setdefault(self.spec.label, []).append((tower, array_sha256(x)))
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return np.stack([flat.sum(axis=1), flat[:, :5].sum(axis=1) + 1.0], axis=1).astype(np.float32)

    def describe(self):
        return "recorder"


def test_every_contender_gets_identical_inputs(micro_artifact, monkeypatch):
    _Recorder.fed = {}
    monkeypatch.setattr(worker_mod, "open_contender", lambda spec, view, options: _Recorder(spec))
    report = run_bench(
        BenchConfig(
            artifact=micro_artifact.path,
            backends=("torch", "onnxruntime"),
            batches=(2, 5),
            timing=QUICK,
            threads=1,
            isolate=False,
            progress=False,
            checkpoint=micro_artifact.checkpoint,
        )
    )
    fed = _Recorder.fed
    assert set(fed) == {"torch fp32", "onnxruntime fp32"}
    assert fed["torch fp32"] == fed["onnxruntime fp32"]  # same arrays, same order, warm-up calls included
    cases = 2 * (1 + len(report["config"]["text_lengths"]))  # 2 batches x (image + each text length)
    assert len(fed["torch fp32"]) == cases * (1 + 2)  # warm-up + 2 timed calls per case
    for r in report["records"]:
        assert r["cos_min"] == pytest.approx(1.0)
        assert r["iters"] == 2


def _dynamic(artifact: Path) -> bool:
    """Whether the text ONNX file itself takes a variable length."""
    import onnxruntime

    (text,) = [v for v in read_manifest(artifact)["variants"] if v["tower"] == "text" and v["precision"] == "fp32"]
    session = onnxruntime.InferenceSession(str(artifact / text["file"]), providers=["CPUExecutionProvider"])
    return not isinstance(session.get_inputs()[0].shape[1], int)


def _with_text_shape(src: Path, dst: Path, shape: list) -> Path:
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    manifest["towers"]["text"]["inputs"][0]["shape"] = shape
    if isinstance(shape[1], int):
        manifest["towers"]["text"]["padding"] = "max_length"
    write_manifest(dst, manifest)
    return dst


def _text_bench(artifact: Path, checkpoint: Path) -> dict:
    return run_bench(
        BenchConfig(
            artifact=artifact,
            backends=("torch", "onnxruntime"),
            towers=("text",),
            batches=(2,),
            timing=QUICK,
            threads=1,
            isolate=False,
            progress=False,
            checkpoint=checkpoint,
        )
    )


def test_a_dynamic_text_axis_adds_the_prompt_length(micro_artifact, tmp_path):
    pytest.importorskip("torch")
    art = _with_text_shape(micro_artifact.path, tmp_path / "dynamic", ["batch", "sequence"])
    report = _text_bench(art, micro_artifact.checkpoint)
    full, short = report["config"]["text_lengths"]
    assert full == 77 and short == report["inputs"]["prompt_length"] < 77
    got = {(r["backend"], r["seq_len"]): r for r in report["records"]}
    # PyTorch at the prompt length gives the full-length embedding; its speed-up is against full length.
    assert got[("torch", short)]["cos_min"] > 0.99999
    assert got[("torch", short)]["speedup_vs_torch_fp32"] > 0
    if _dynamic(micro_artifact.path):
        for length in (full, short):
            assert got[("onnxruntime", length)]["cos_min"] > 0.99999
    else:  # only the manifest was edited: the ONNX file refuses the short ids, which is said, not hidden
        assert ("onnxruntime", short) not in got
        assert any(s["backend"] == "onnxruntime" and s.get("seq_len") == short for s in report["skipped"])


def test_a_fixed_text_length_is_measured_at_full_length_only(micro_artifact, tmp_path):
    art = _with_text_shape(micro_artifact.path, tmp_path / "static", ["batch", 77])
    report = _text_bench(art, micro_artifact.checkpoint)
    assert report["config"]["text_lengths"] == [77]
    assert {r["seq_len"] for r in report["records"]} == {77}
    assert any("fixed length" in n for n in report["notes"])


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--batch", "0"], ["--batch 0", "1 or more"]),
        (["--batch", "1,x"], ["--batch 'x'"]),
        (["--batch", ","], ["--batch"]),
        (["--iters", "0"], ["--iters 0"]),
        (["--warmup", "many"], ["--warmup 'many'"]),
        (["--threads", "0"], ["--threads 0"]),
        (["--max-seconds", "-1"], ["--max-seconds"]),
        (["--backends", "torch,tvm"], ["'tvm'", "onnxruntime"]),
        (["--towers", "audio"], ["'audio'", "image"]),
        (["--precisions", "int4"], ["'int4'", "int8"]),
        (["--device", "tpu"], ["--device 'tpu'"]),
        (["--graph-optimization-level", "max"], ["'max'", "extended"]),
        (["--backends", "tensorrt"], ["nothing to measure"]),
    ],
)
def test_bad_options_are_one_line_errors(micro_artifact, capsys, argv, needles):
    code, _, err = run(capsys, "bench", str(micro_artifact.path), "--no-progress", "--device", "cpu", *argv)
    assert_one_line_error(code, err, *needles)


def test_bad_artifacts_and_checkpoints_are_one_line_errors(micro_artifact, tmp_path, capsys):
    code, _, err = run(capsys, "bench", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "does not exist", "clipdeploy export")
    code, _, err = run(capsys, "bench", str(micro_artifact.path), "--device", "cpu", "--backends", "torch")
    assert_one_line_error(code, err, "--checkpoint FILE")
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"x")
    code, _, err = run(capsys, "bench", str(micro_artifact.path), "--device", "cpu", "--checkpoint", str(wrong))
    assert_one_line_error(code, err, "wrong.pt", "sha256")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "bench", str(empty))
    assert_one_line_error(code, err, "manifest.json")


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backends", "--precisions", "--batch", "--towers", "--iters", "--warmup", "--threads", "-o"):
        assert option in out


@pytest.mark.parametrize("kind", ["avx2", "amx"])
def test_the_default_path_is_what_load_picks_and_an_estimate_comes_first(tmp_path, monkeypatch, capsys, kind):
    """The report names the backend and precision clipdeploy.load(dir) picks on this CPU (the auto rule, both
    branches through a fake cpuinfo), and the estimate line is on stderr before the first contender runs."""
    from clipdeploy.benchmarks import bench as bench_mod
    from tests.support.cpus import auto_cpu_backend, use_cpu
    from tests.support.models import MODELS

    pytest.importorskip("onnx")
    try:
        art = MODELS["tiny-onnx"].make(tmp_path / "art", precisions=("fp32", "int8"))
    except FileNotFoundError as e:
        pytest.skip(f"the tiny artifact needs {e}")
    use_cpu(monkeypatch, tmp_path, kind)
    before_first: list[str] = []
    real_run_job = bench_mod.run_job

    def spy(job, emit=None):
        if not before_first:
            before_first.append(capsys.readouterr().err)
        return real_run_job(job, emit)

    monkeypatch.setattr(bench_mod, "run_job", spy)
    cfg = BenchConfig(art, backends=("onnxruntime", "openvino"), batches=(1, 2), towers=("image",), timing=QUICK,
                      threads=1, device="cpu", isolate=False, progress=False)
    report = run_bench(cfg)
    picked = auto_cpu_backend()
    assert report["default_path"]["backend"] == picked, report["default_path"]
    assert report["default_path"]["precision"] == {"image": "int8", "text": "int8"}
    assert f"int8 onnx on {picked}" in report["default_path"]["describe"]
    (estimate,) = [line for line in before_first[0].splitlines() if line.startswith("measuring ")]
    n = len(report["contenders"])
    assert estimate.startswith(f"measuring {n} contenders, {2 * n} cases of 1 warm-up + up to 2 timed calls: about ")
    assert f"one call of the default path, {picked} int8, at batch 2" in estimate, estimate
