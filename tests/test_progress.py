"""Progress: drawn on a terminal (stages, towers, calibration batches, gate), silent off one or with
--quiet, quiet for API users by default; --verbose logs clipdeploy's steps, not other libraries' INFO.

The CLI runs in a subprocess whose stderr is a pseudo-terminal, as a user's shell gives it.
"""

from __future__ import annotations

import io
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy import progress

from tests.support.testdata import MICRO_CONFIG

SRC = Path(clipdeploy.__file__).resolve().parents[1]
EXPORT_STAGES = (
    "building micro-vit",
    "PyTorch reference outputs",
    "tracing the image tower to ONNX",
    "tracing the text tower to ONNX",
    "checking the ONNX towers against PyTorch",
)
QUANTIZE_STAGES = ("reading calibration images", "int8 image tower", "calibration batches", "int8 gate on held-out data")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_progress():
    before = progress._wanted
    yield
    progress.configure(before)


# ---- the module ---------------------------------------------------------------------------------


def test_library_use_is_silent_by_default_even_on_a_terminal():
    # A fresh interpreter: in this one, CLI tests have already switched progress on.
    code = (
        "import io, sys\n"
        "class Terminal(io.StringIO):\n"
        "    def isatty(self): return True\n"
        "sys.stderr = Terminal()\n"
        "from clipdeploy import progress\n"
        "items = [1, 2, 3]\n"
        "with progress.stage('a stage'):\n"
        "    assert progress.bar(items, 'items') is items\n"
        "    progress.counter(3, 'count').update(1)\n"
        "print(repr(sys.stderr.getvalue()), progress.active())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["''", "False"], r.stdout


def test_stages_and_bars_drawn_on_a_terminal(monkeypatch, restore_progress):
    pytest.importorskip("tqdm")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress.configure(True)
    with progress.stage("outer"):
        with progress.stage("inner") as step:
            assert list(progress.bar(range(4), "batches", unit="batch")) == [0, 1, 2, 3]
            step.note("pass")
    text = term.getvalue()
    assert "batches" in text and "/4 [" in text, text
    lines = [ln.strip("\r") for ln in text.replace("\r", "\n").splitlines()]
    done = [ln for ln in lines if ln.endswith("s  pass") or (ln.startswith("outer  ") and ln.endswith("s"))]
    assert any(ln.startswith("  inner  ") and ln.endswith("s  pass") for ln in done), text  # nested: indented
    assert any(ln.startswith("outer  ") for ln in done), text


def test_a_failing_stage_says_so_and_raises(monkeypatch, restore_progress):
    pytest.importorskip("tqdm")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress.configure(True)
    with pytest.raises(ValueError, match="boom"):
        with progress.stage("doomed"):
            raise ValueError("boom")
    assert "failed" in [ln for ln in term.getvalue().splitlines() if "doomed  " in ln][-1]
    assert progress._depth == 0


def test_plain_lines_on_a_terminal_without_tqdm(monkeypatch, restore_progress):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress, "_tqdm", lambda: None)  # tqdm is not installed
    progress.configure(True)
    items = [1, 2]
    with progress.stage("tracing") as step:
        assert progress.bar(items, "items") is items
        step.note("pass")
    lines = term.getvalue().splitlines()
    assert lines[0] == "tracing ..." and lines[1].startswith("tracing  ") and lines[1].endswith("s  pass"), lines


def test_nothing_drawn_off_a_terminal(monkeypatch, restore_progress):
    pipe = io.StringIO()  # isatty() is False
    monkeypatch.setattr(sys, "stderr", pipe)
    progress.configure(True)
    assert not progress.active()
    items = [1, 2]
    with progress.stage("a stage"):
        assert progress.bar(items, "items") is items
    assert pipe.getvalue() == ""


def test_muted_stdout_keeps_third_party_prints_off_stdout(capsys):
    clipdeploy_log = logging.getLogger("clipdeploy")
    level = clipdeploy_log.level
    try:
        clipdeploy_log.setLevel(logging.WARNING)
        with progress.muted_stdout():
            print("Collecting tensor data and making histogram ...")
        out, err = capsys.readouterr()
        assert out == "" and err == ""
        clipdeploy_log.setLevel(logging.INFO)  # --verbose: shown, on stderr
        with progress.muted_stdout():
            print("Collecting tensor data and making histogram ...")
        out, err = capsys.readouterr()
        assert out == "" and "histogram" in err
    finally:
        clipdeploy_log.setLevel(level)


def test_verbose_logging_keeps_third_party_info_out(capsys, restore_progress):
    from clipdeploy.cli import _setup_output

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("clipdeploy").level)
    try:
        _setup_output(verbose=True, quiet=False)
        logging.getLogger("onnxscript.optimizer").info("Skipping constant folding")
        logging.getLogger().info("Parsing model identifier")  # open_clip logs on the root logger
        logging.getLogger("clipdeploy.export.onnx_export").info("exported image tower")
        logging.getLogger("onnx_ir.passes").warning("a real warning")
        err = capsys.readouterr().err
        assert "constant folding" not in err and "Parsing model" not in err, err
        assert "INFO clipdeploy.export.onnx_export: exported image tower" in err, err
        assert "a real warning" in err, err
        _setup_output(verbose=True, quiet=False)  # main() twice in one process: still one handler
        assert sum(isinstance(h, progress.LogHandler) for h in root.handlers) == 1
    finally:
        logging.captureWarnings(False)
        for h in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:
            root.removeHandler(h)
        root.setLevel(saved[0])
        logging.getLogger("clipdeploy").setLevel(saved[2])


def test_no_hub_download_bars_where_progress_is_off(monkeypatch, restore_progress):
    from clipdeploy.cli import _setup_output

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    root = logging.getLogger()
    saved = (root.level, logging.getLogger("clipdeploy").level)
    try:
        _setup_output(verbose=False, quiet=True)
        assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
    finally:
        for h in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:
            root.removeHandler(h)
        root.setLevel(saved[0])
        logging.getLogger("clipdeploy").setLevel(saved[1])


def test_quiet_and_verbose_go_before_or_after_the_command():
    from clipdeploy.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "inspect", "x"]).quiet is True
    args = parser.parse_args(["inspect", "x", "--quiet", "-v"])
    assert (args.quiet, args.verbose) == (True, True)
    args = parser.parse_args(["-v", "inspect", "x"])  # given before: not reset by the subcommand
    assert (args.quiet, args.verbose) == (False, True)


# ---- the CLI under a terminal -------------------------------------------------------------------


def _cli(argv: list[str], tty: bool, timeout: float = 600) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (``tty``) or a pipe; returns (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    cmd = [sys.executable, "-m", "clipdeploy.cli", *argv]
    if not tty:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        return r.returncode, r.stdout, r.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, on which tqdm draws nothing; a shell's terminal has a size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"clipdeploy-progress-{os.getpid()}-{time.time_ns()}.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    stdout = out_path.read_text(encoding="utf-8")
    out_path.unlink()
    return code, stdout, b"".join(chunks).decode("utf-8", errors="replace")


def _write_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, size=3)
        img = np.clip(base + rng.normal(0, 40, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def tty_export(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("tqdm")
    root = tmp_path_factory.mktemp("progress")
    out = root / "micro"
    code, stdout, stderr = _cli(["export", "micro-vit", "--model-config", str(MICRO_CONFIG), "-o", str(out)], tty=True)
    assert code == 0, stderr[-2000:]
    return out, stdout, stderr, _write_images(root / "images", 72)


def _quantize(artifact: Path, images: Path, *extra: str) -> list[str]:
    return ["quantize", str(artifact), "--precision", "int8", "--calib-images", str(images), "--samples", "36",
            "--holdout", "32", "--threads", "1", "--no-recover", "--force", *extra]  # fmt: skip


def test_export_shows_its_stages_on_a_terminal(tty_export):
    _, stdout, stderr, _ = tty_export
    for name in EXPORT_STAGES:
        assert name in stderr, f"no {name!r} on the terminal:\n{stderr[-3000:]}"
    assert "checking the ONNX towers against PyTorch" in stderr and "pass" in stderr
    # stdout keeps only the results: no bars, no stage lines.
    assert stdout.startswith("exported micro-vit"), stdout
    assert "\r" not in stdout and not any(name in stdout for name in EXPORT_STAGES), stdout


def test_quantize_shows_calibration_and_gate_on_a_terminal(tty_export):
    artifact, _, _, images = tty_export
    code, stdout, stderr = _cli(_quantize(artifact, images), tty=True)
    assert code in (0, 1), stderr[-2000:]  # random weights may miss the gate; the display is what counts
    for name in QUANTIZE_STAGES:
        assert name in stderr, f"no {name!r} on the terminal:\n{stderr[-3000:]}"
    assert "\r" not in stdout


def test_quantize_draws_nothing_off_a_terminal(tty_export):
    artifact, _, _, images = tty_export
    code, stdout, stderr = _cli(_quantize(artifact, images), tty=False)
    assert code in (0, 1), stderr
    assert "\r" not in stderr and not any(name in stderr for name in QUANTIZE_STAGES), stderr


def test_quiet_draws_nothing_on_a_terminal(tty_export):
    artifact, _, _, images = tty_export
    code, _, stderr = _cli(_quantize(artifact, images, "--quiet"), tty=True)
    assert code in (0, 1), stderr
    assert not any(name in stderr for name in QUANTIZE_STAGES), stderr


def test_verbose_export_logs_clipdeploy_steps_not_third_party_info(tmp_path):
    pytest.importorskip("open_clip")
    argv = ["-v", "export", "micro-vit", "--model-config", str(MICRO_CONFIG), "-o", str(tmp_path / "micro")]
    code, stdout, stderr = _cli(argv, tty=False)
    assert code == 0, stderr[-2000:]
    info = [ln for ln in stderr.splitlines() if ln.startswith("INFO ")]
    foreign = [ln for ln in info if not ln.startswith("INFO clipdeploy")]
    assert not foreign, f"{len(foreign)} third-party INFO lines, e.g. {foreign[:3]}"
    assert "Obtain model graph" not in stderr + stdout
    # Off a terminal, --verbose still says what ran and how long it took.
    assert any("clipdeploy.progress: tracing the image tower to ONNX" in ln for ln in info), info
