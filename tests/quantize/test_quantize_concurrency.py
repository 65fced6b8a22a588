"""Quantize runs beside other writers of the same artifact, and checks what needs no data first.

- Two quantize runs of different precisions on one artifact (parallel CI jobs) both land: each
  entry present, every sha256 verifies, ``load(verify=True)`` works. A second run of the SAME
  precision refuses at once in one line naming the first.
- Everything that does not need the data (the artifact's directory is writable, the packages the
  precision and its gate import, the CPU) is checked before any data is read.
- Every file quantize writes (calibration caches included) gets the umask's mode.

The artifact is tests/support/tiny_artifact.py's (a few ONNX nodes per tower): quantize runs in
about a second on it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")
pytest.importorskip("onnxruntime")

from clipdeploy import cpu_features  # noqa: E402
from clipdeploy.artifact import staging  # noqa: E402
from clipdeploy.calibration import dataset, sources  # noqa: E402
from clipdeploy.cli import main  # noqa: E402
from clipdeploy.errors import ArtifactError, DependencyError, UsageError  # noqa: E402
from clipdeploy.artifact.manifest import read_manifest, variant_files, variants, verify_files  # noqa: E402
from clipdeploy.quantize import stage  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402
from clipdeploy.runtime.session import load  # noqa: E402

from tests.support import synthetic  # noqa: E402
from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact  # noqa: E402

if bpe_vocab() is None:
    pytest.skip("the tiny artifact needs open_clip's BPE vocabulary file", allow_module_level=True)

SRC = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concurrency-data")
    synthetic.write_dataset(root / "images", 80, seed=7)
    (root / "captions.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(80)))
    return root


@pytest.fixture
def art(tmp_path) -> Path:
    return make_tiny_artifact(tmp_path / "art", ("fp32",))


def _args(art: Path, data: Path, precision: str) -> list[str]:
    return ["quantize", str(art), "--precision", precision, "--calib-images", str(data / "images"),
            "--calib-texts", str(data / "captions.txt"), "--samples", "32", "--holdout", "32", "--threads", "1"]


# Each process, once it has read the manifest to record its variant, waits (up to BARRIER_S) until the
# other has read it too, then writes: the interleaving that loses one run's update when nothing orders
# the two writers. With the artifact's lock the second cannot read before the first has written, so
# the first waits out the barrier alone and the second then reads the first's entries.
BARRIER_S = 8
_RUN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import clipdeploy.artifact.manifest as m
    me, other = Path(sys.argv[1]), Path(sys.argv[2])
    original = m.write_manifest
    def racing_write(root, manifest):
        if Path(root).name == "art":
            me.touch()
            deadline = time.monotonic() + {barrier}
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(root, manifest)
    m.write_manifest = racing_write  # before the stage imports it
    from clipdeploy.cli import main
    sys.exit(main(sys.argv[3:]))
""").format(barrier=BARRIER_S)


def test_int8_and_fp16_started_together_both_land_and_verify(art, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{SRC / 'src'}{os.pathsep}{SRC}"}
    a, b = tmp_path / "read-int8", tmp_path / "read-fp16"
    procs = [
        subprocess.Popen([sys.executable, "-c", _RUN, str(me), str(other), *_args(art, data, p), "--quiet"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p, me, other in (("int8", a, b), ("fp16", b, a))
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "gate passed" in out
    manifest = read_manifest(art)
    onnx = {(v.precision, v.tower) for v in variants(manifest) if v.format == "onnx"}
    assert onnx == {(p, t) for p in ("fp32", "int8", "fp16") for t in ("image", "text")}, onnx
    assert set(manifest["validation"]["quantize"]) == {"int8", "fp16"}  # neither gate report lost
    for v in variants(manifest):
        verify_files(art, variant_files(v))
    for precision in ("int8", "fp16"):
        session = load(art, precision=precision, verify=True)
        assert {v.precision for v in session.variants.values()} == {precision}
    assert not list(art.glob(".clipdeploy*")), "a lock file was left in the artifact"


def test_a_second_run_of_the_same_precision_refuses_at_once_naming_the_first(art, data, capsys, monkeypatch):
    read = []
    monkeypatch.setattr(sources, "list_images", lambda *a, **k: read.append("images"))
    with staging.job_lock(art, "quantize-int8", "a quantize in another process"):
        assert main(_args(art, data, "int8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "quantize --precision int8 is already running on" in err[0] and f"pid {os.getpid()}" in err[0], err
    assert not read, "the second run read data before refusing"
    # Another precision is not held up by it; once the first is done, the same precision runs.
    with staging.job_lock(art, "quantize-int8", "a quantize in another process"):
        monkeypatch.undo()
        assert main(_args(art, data, "fp16")) == 0
    assert main(_args(art, data, "int8")) == 0
    assert {v.precision for v in variants(read_manifest(art))} == {"fp32", "fp16", "int8"}


# ---- the environment is checked before the data is read -------------------------------------------------


class DataRead(Exception):
    pass


@pytest.fixture
def no_data(monkeypatch):
    """Any read of calibration or gate data raises DataRead: what fails first must fail before it."""

    def read(*a, **k):
        raise DataRead("the data was read before the environment was checked")

    for name in ("list_images", "read_texts", "builtin_texts", "imagenet_prompts"):
        monkeypatch.setattr(sources, name, read)
    monkeypatch.setattr(dataset, "image_set", read)


def _cfg(art: Path, data: Path, precision: str) -> QuantizeConfig:
    return QuantizeConfig(artifact=art, precision=precision, calib_images=[data / "images"],
                          calib_texts=data / "captions.txt", samples=32, holdout=32, threads=1)


def _read_only(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """Creating a file in ``folder`` fails as on a read-only mount (EROFS) or for another user (EACCES)."""
    real = os.open

    def fake(path, flags, *a, **k):
        if flags & os.O_CREAT and Path(path).parent == folder:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_an_unwritable_artifact_fails_before_the_data_is_read(art, data, no_data, monkeypatch, capsys, code, words):
    _read_only(monkeypatch, art, code)
    assert main(_args(art, data, "int8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert words in err[0] and repr(str(art)) in err[0], err
    assert ".lock" not in err[0], "the error names a lock file that never existed, not the directory"


@pytest.mark.parametrize("precision, module", [("int8", "onnx"), ("fp16", "onnxruntime.transformers.float16"),
                                               ("int8", "onnxruntime.quantization"), ("bf16", "openvino")])
def test_a_missing_package_fails_before_the_data_is_read(art, data, no_data, monkeypatch, precision, module):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx2", "avx512_bf16"}))  # bf16 allowed here
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    with pytest.raises(DependencyError, match=module.split(".")[0]) as e:
        quantize(_cfg(art, data, precision))
    assert "pip install" in str(e.value)


def test_a_cpu_without_bf16_and_an_unknown_precision_fail_before_the_data_is_read(art, data, no_data, monkeypatch):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx2"}))
    with pytest.raises(UsageError, match="avx512_bf16"):
        quantize(_cfg(art, data, "bf16"))
    with pytest.raises(UsageError, match="int3"):
        quantize(_cfg(art, data, "int3"))


# ---- modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_every_file_quantize_writes_gets_the_umask_mode(art, data, mask, dirs, files):
    before = {p for p in art.rglob("*")}
    old = os.umask(mask)
    try:
        quantize(_cfg(art, data, "int8"))
    finally:
        os.umask(old)
    made = sorted(p for p in art.rglob("*") if p not in before)
    calibration = [p for p in made if p.parent.name == "calibration" and p.suffix == ".json"]
    assert len(calibration) == 2, made  # one cache per tower, as `cp -r` by another user must read them
    assert {p.name for p in made if p.suffix == ".onnx"} == {"image.int8.onnx", "text.int8.onnx"}
    wrong = {p.relative_to(art).as_posix(): oct(p.stat().st_mode & 0o777) for p in made
             if p.stat().st_mode & 0o777 != (dirs if p.is_dir() else files)}
    assert not wrong, f"not the umask {oct(mask)}'s modes: {wrong}"
    assert not [p for p in made if p.name.startswith(".")], "a temporary was left in the artifact"
    report = read_manifest(art)["validation"]["quantize"]["int8"]
    assert report["build"]["image"]["calibration_cache"]["file"] in {c.relative_to(art).as_posix() for c in calibration}
    assert json.loads(calibration[0].read_text())  # the cache is whole


def test_a_reused_calibration_cache_is_read_not_rewritten(art, data):
    quantize(_cfg(art, data, "int8"))
    caches = sorted((art / "calibration").glob("*.json"))
    stamps = {p: p.stat().st_ino for p in caches}
    cfg = _cfg(art, data, "int8")
    cfg.force = True
    report = quantize(cfg)
    assert all(report["build"][t]["calibration_cache"]["reused"] for t in ("image", "text"))
    assert {p: p.stat().st_ino for p in caches} == stamps


def test_a_reexport_while_quantizing_records_nothing(art, data, monkeypatch):
    """`export --force` replaced the fp32 towers while int8 was being made from the old ones: the old
    model's int8 must not be recorded beside the new model."""
    real = stage.QuantizeRun.record

    def reexported_then_record(self, work, paths, report):
        m = json.loads((art / "manifest.json").read_text())
        for v in m["variants"]:
            v["sha256"] = "f" * 64  # what a new export's manifest would say
        (art / "manifest.json").write_text(json.dumps(m))
        return real(self, work, paths, report)

    monkeypatch.setattr(stage.QuantizeRun, "record", reexported_then_record)
    with pytest.raises(ArtifactError, match="changed while int8 was being made"):
        quantize(_cfg(art, data, "int8"))
    m = json.loads((art / "manifest.json").read_text())
    assert {v["precision"] for v in m["variants"]} == {"fp32"}
    assert not list(art.glob("*.int8.onnx")) and not list(art.glob(".*"))
