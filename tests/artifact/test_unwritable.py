"""A directory the command cannot write is one line naming that directory, exit 2, before any work.

Two real cases, run as the CLI in a fresh process: a read-only bind mount (which root cannot write
either), and a directory of another user as a non-root user. tests/quantize/test_quantize_concurrency.py
covers the same errors simulated in-process (EROFS, EACCES), which needs neither root nor mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")

import clipdeploy  # noqa: E402

from tests.support import synthetic  # noqa: E402
from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact  # noqa: E402

if bpe_vocab() is None:
    pytest.skip("the tiny artifact needs open_clip's BPE vocabulary file", allow_module_level=True)

SRC = Path(clipdeploy.__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture(scope="module")
def root():
    """A folder any user may enter (pytest's tmp folders are 0700), with a tiny artifact and data."""
    top = Path(tempfile.mkdtemp(prefix="clipdeploy-unwritable-"))
    top.chmod(0o755)
    old = os.umask(0o022)
    try:
        make_tiny_artifact(top / "art", ("fp32",))
        synthetic.write_dataset(top / "images", 80, seed=11)
        (top / "out").mkdir()
    finally:
        os.umask(old)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _quantize(top: Path) -> list[str]:
    return ["quantize", str(top / "art"), "--precision", "int8", "--calib-images", str(top / "images"),
            "--samples", "32", "--holdout", "32", "--threads", "1"]


def _embed(top: Path) -> list[str]:
    return ["embed", str(top / "art"), "--text", "a cat", "-o", str(top / "out" / "emb")]


def _run(prefix: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([*prefix, sys.executable, "-m", "clipdeploy.cli", *args, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "onnxruntime" not in ln]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && mount -o remount,bind,ro /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs root and unshare to make a read-only bind mount")
@pytest.mark.parametrize("command, folder", [(_quantize, "art"), (_embed, "out")])
def test_a_read_only_mount_is_one_line_exit_2(root, command, folder):
    target = root / folder
    # A private mount namespace: the read-only mount is seen by this command only, and goes with it.
    mount = f"mount --bind {target} {target} && mount -o remount,bind,ro {target} && exec \"$0\" \"$@\""
    proc = _run(["unshare", "-m", "sh", "-c", mount], command(root))
    line = _one_line(proc)
    assert "read-only file system" in line and repr(str(target)) in line, line
    assert ".lock" not in line, line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to act as another user")
@pytest.mark.parametrize("command, folder", [(_quantize, "art"), (_embed, "out")])
def test_another_users_directory_is_named_not_a_lock_file(root, command, folder):
    proc = _run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"], command(root))
    line = _one_line(proc)
    assert "permission denied" in line and repr(str(root / folder)) in line, line
    assert ".lock" not in line and ".tmp" not in line, line
