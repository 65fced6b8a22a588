"""What the commands write, as a user sees it: missing parents are made, files get the umask's modes
(readable by another user under 022), a killed export is cleaned up by the next, `embed -o` writes one
consistent set, and an unreadable file is a one-line error that names it. Plus the README quick start
command that CI runs verbatim."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.testdata import MICRO_CONFIG

import clipdeploy
from clipdeploy.cli import main
from clipdeploy.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
SRC = Path(clipdeploy.__file__).resolve().parents[1]
IMAGE = Path(clipdeploy.__file__).parent / "data" / "images" / "chelsea.jpg"
EXPORT = ["export", "micro-vit", "--model-config", str(MICRO_CONFIG)]


def _cli(*args: str, user: int | None = None, **kw) -> subprocess.CompletedProcess:
    """`clipdeploy ARGS` in a fresh process (as another uid if given), this worktree's code."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "clipdeploy.cli", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def open_root():
    """A folder any user may enter: pytest's own tmp folders are 0700, which would hide the point."""
    root = Path(tempfile.mkdtemp(prefix="clipdeploy-outputs-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _export_under(mask: int, output: Path) -> int:
    old = os.umask(mask)
    try:
        return main([*EXPORT, "-o", str(output)])
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def exported_022(open_root) -> Path:
    out = open_root / "a" / "b" / "c" / "art"  # a, b and c do not exist yet
    assert _export_under(0o022, out) == 0
    return out


def test_export_makes_missing_parents_and_files_get_umask_022_modes(exported_022):
    modes = _modes(exported_022)
    assert modes["."] == 0o755 and modes["manifest.json"] == 0o644  # were 0700 and 0600
    for rel, mode in modes.items():
        assert mode == (0o755 if (exported_022 / rel).is_dir() else 0o644), rel
    assert [p.stat().st_mode & 0o777 for p in exported_022.parents[:3]] == [0o755] * 3
    assert sorted(os.listdir(exported_022.parent)) == ["art"], "nothing left beside the artifact"


def test_export_under_umask_027(tmp_path):
    out = tmp_path / "art"  # the parent exists: this checks the modes alone
    assert _export_under(0o027, out) == 0
    for rel, mode in _modes(out).items():
        assert mode == (0o750 if (out / rel).is_dir() else 0o640), rel


needs_other_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as another user"
)


@needs_other_user
def test_another_user_can_inspect_and_embed_and_an_unreadable_file_is_one_line(exported_022, open_root):
    nobody = 65534
    ok = _cli("inspect", str(exported_022), user=nobody)
    assert ok.returncode == 0, ok.stderr
    emb = _cli("embed", str(exported_022), "--text", "a cat", user=nobody)
    assert emb.returncode == 0, emb.stderr
    assert len(json.loads(emb.stdout)["text"]["embeddings"]) == 1
    # Now make files private to root, as the old modes did: one line naming the file, exit 2.
    for name, args in (("manifest.json", ("inspect",)), ("text.fp32.onnx", ("embed", "--text", "a cat"))):
        path = exported_022 / name
        path.chmod(0o600)
        try:
            bad = _cli(args[0], str(exported_022), *args[1:], user=nobody)
        finally:
            path.chmod(0o644)
        # onnxruntime may add its own telemetry warning for a user without a home; ours is one line.
        lines = [line for line in bad.stderr.strip().splitlines() if "telemetry" not in line]
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("clipdeploy: error: "), bad.stderr
        assert str(path) in lines[0] and "cannot be read" in lines[0]


def _deny(monkeypatch, name: str) -> None:
    """Reads of files called ``name`` raise PermissionError, as for a file of another user (tests run as root)."""
    real = builtins.open

    def guarded(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == name:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # pathlib reads through io.open


@pytest.mark.parametrize("name", ["manifest.json", "image.fp32.onnx"])
def test_unreadable_file_is_one_line_naming_it(micro_artifact, monkeypatch, capsys, name):
    from clipdeploy.runtime.session import load

    _deny(monkeypatch, name)
    with pytest.raises(ArtifactError, match=f"{name}' cannot be read"):
        load(micro_artifact.path)
    with pytest.raises(ArtifactError, match=f"{name}' cannot be read"):
        load(micro_artifact.path, verify=False)  # ONNX Runtime's own read: not "corrupt"
    for args in (["inspect", str(micro_artifact.path)], ["embed", str(micro_artifact.path), "--image", str(IMAGE)]):
        if name != "manifest.json" and args[0] == "inspect":
            continue  # inspect reads only the manifest
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "cannot be read" in err[0], err


def test_a_killed_export_is_cleaned_up_by_the_next(tmp_path):
    base = tmp_path / "out"
    base.mkdir()
    out = base / "art"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "clipdeploy.cli", *EXPORT, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Mid-way: the temporary exists and already holds an exported tower.
        deadline = time.monotonic() + 300
        while not list(base.glob(".art.tmp-*/*.onnx")):
            assert proc.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "no temporary appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert list(base.glob(".art.tmp-*")), "the killed export left its temporary (the case being tested)"
    assert not out.exists()
    done = _cli(*EXPORT, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(base)) == ["art"], "the dead run's temporary and lock are gone"
    assert _cli("inspect", str(out)).returncode == 0


# ---- embed -o --------------------------------------------------------------------------------------


def test_embed_output_is_one_consistent_set(micro_artifact, tmp_path, capsys):
    out = tmp_path / "new" / "parents" / "emb"
    art = str(micro_artifact.path)
    assert main(["embed", art, "--image", str(IMAGE), "--text", "a cat", "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["embed.json", "image.npy", "text.npy"]
    # An image-only run: the earlier run's text.npy must not survive beside the new image.npy.
    assert main(["embed", art, "--image", str(IMAGE), str(IMAGE), "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["embed.json", "image.npy"]
    assert json.loads((out / "embed.json").read_text())["image"]["shape"][0] == 2
    assert sorted(os.listdir(out.parent)) == ["emb"], "nothing left beside it"


def test_embed_output_refuses_a_file_and_a_folder_of_other_files(micro_artifact, tmp_path, capsys, monkeypatch):
    art = str(micro_artifact.path)
    existing = tmp_path / "emb.npy"
    existing.write_bytes(b"mine")
    capsys.readouterr()
    assert main(["embed", art, "--text", "a cat", "-o", str(existing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an existing file" in err[0] and str(existing) in err[0]
    assert existing.read_bytes() == b"mine"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    (folder / "text.npy").write_bytes(b"old")
    assert main(["embed", art, "--text", "a cat", "-o", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0] and "did not write" in err[0]
    assert (folder / "notes.txt").read_text() == "keep" and (folder / "text.npy").read_bytes() == b"old"
    # The directory a shell is in is never swapped away from under it.
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["embed", art, "--text", "a cat", "-o", "."]) == 2
    assert "current directory" in capsys.readouterr().err and empty.is_dir() and Path.cwd() == empty


# ---- triton -o -------------------------------------------------------------------------------------


def test_triton_makes_missing_parents(micro_artifact, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from clipdeploy.triton.repository import MARKER, TritonConfig, build_repository

    out = tmp_path / "p" / "q" / "models"
    build_repository(TritonConfig(artifacts=[micro_artifact.path], output=out))
    assert (out / MARKER).is_file()
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(os.listdir(out.parent)) == ["models"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- README quick start ----------------------------------------------------------------------------


def _readme_command_1() -> str:
    """The README's quick start command 1, found independently of .ci/quickstart."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    return next(line for line in block[block.index(next(x for x in block if x.startswith("# 1."))) + 1 :] if line)


def test_ci_quickstart_extracts_command_1_verbatim():
    got = subprocess.run([str(REPO / ".ci" / "quickstart"), "--print"], capture_output=True, text=True, check=True)
    assert got.stdout.rstrip("\n") == _readme_command_1()
    assert got.stdout.startswith("python3 -m venv ") and "clipdeploy export" in got.stdout


def test_ci_quickstart_fails_loudly_without_command_1(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "quickstart", tmp_path / ".ci" / "quickstart")
    (tmp_path / "README.md").write_text("# x\n\n## Quick start\n\n```bash\n# 2. other\necho hi\n```\n")
    got = subprocess.run([str(tmp_path / ".ci" / "quickstart")], capture_output=True, text=True)
    assert got.returncode == 1 and "no command after '# 1.'" in got.stderr
    assert not (tmp_path / ".venv").exists()
