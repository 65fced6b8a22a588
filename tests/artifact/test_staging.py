"""Temporaries beside an output: umask modes, and what a dead run leaves is removed, a live run's is not."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipdeploy.errors import UsageError
from clipdeploy.artifact.manifest import atomic_write_text, swap_directory
from clipdeploy.artifact.staging import LOCK_SUFFIX, clean_beside, clean_stale, ensure_parent, reserved


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def _leftover(parent: Path, name: str, *, lock: bool = True) -> Path:
    """What a killed run leaves: its temporary (with a big-ish file) and, if it made one, its lock."""
    d = parent / name
    d.mkdir()
    (d / "image.fp32.onnx").write_bytes(b"\0" * 4096)
    if lock:
        (parent / (name + LOCK_SUFFIX)).write_text("pid 999999 host gone\n")
    return d


@pytest.mark.parametrize("mask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_temporaries_and_atomic_writes_get_the_umask_modes(tmp_path, umask, mask, dirs, files):
    umask(mask)
    with reserved(tmp_path, ".out.tmp-") as work:
        assert _mode(work) == dirs  # tempfile.mkdtemp would make it 0700
        lock = work.with_name(work.name + LOCK_SUFFIX)
        assert f"pid {os.getpid()}" in lock.read_text()
    assert not work.exists() and not lock.exists()
    atomic_write_text(tmp_path / "manifest.json", "{}\n")
    assert _mode(tmp_path / "manifest.json") == files  # tempfile.mkstemp would make it 0600


def test_dead_runs_leftovers_go_a_live_runs_stay(tmp_path):
    dead = _leftover(tmp_path, ".art.tmp-deadbeef")
    legacy = _leftover(tmp_path, ".art.tmp-ab_c1234", lock=False)  # a clipdeploy that made no lock
    live = _leftover(tmp_path, ".art.tmp-cafef00d")
    live_lock = tmp_path / (live.name + LOCK_SUFFIX)
    # The live run: another process holding the lock, as a running export does.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(live_lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # Names that are not ours, or not this artifact's, are never touched.
        names = (".art.tmp-x", ".art.tmp-deadbeef.keep", ".art2.tmp-deadbeef", "art", "notes.txt")
        keep = [tmp_path / n for n in names]
        for p in keep:
            p.mkdir() if p.suffix != ".txt" else p.write_text("mine")
        removed = clean_beside(tmp_path / "art")
        assert sorted(removed) == sorted([dead, legacy])
        assert not dead.exists() and not (tmp_path / (dead.name + LOCK_SUFFIX)).exists() and not legacy.exists()
        assert live.is_dir() and live_lock.is_file() and (live / "image.fp32.onnx").is_file()
        assert all(p.exists() for p in keep)
    finally:
        holder.kill()
        holder.wait()
    # Once its holder is dead, the same leftover goes.
    assert clean_beside(tmp_path / "art") == [live]
    assert not live_lock.exists()


def test_a_lock_held_in_this_process_counts_as_live(tmp_path):
    live = _leftover(tmp_path, ".quantize-0123abcd")
    with open(tmp_path / (live.name + LOCK_SUFFIX)) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert clean_stale(tmp_path, (".quantize-",)) == []
        assert live.is_dir()
    assert clean_stale(tmp_path, (".quantize-",)) == [live]


def test_a_swap_killed_half_way_puts_the_previous_output_back(tmp_path):
    # Killed after moving the old artifact aside, before moving the new one in: no `art` at all.
    old = _leftover(tmp_path, ".art.old-0badf00d")
    (old / "manifest.json").write_text('{"previous": true}')
    work = _leftover(tmp_path, ".art.tmp-12345678")
    clean_beside(tmp_path / "art")
    assert (tmp_path / "art" / "manifest.json").read_text() == '{"previous": true}'
    assert sorted(os.listdir(tmp_path)) == ["art"]
    assert not work.exists()


def test_swap_replaces_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with reserved(tmp_path, ".art.tmp-") as work:
        (work / "new.txt").write_text("new")
        swap_directory(work, out)
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_ensure_parent_makes_missing_parents_and_says_when_a_file_is_in_the_way(tmp_path):
    ensure_parent(tmp_path / "a" / "b" / "c" / "out")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="a file is in the way"):
        ensure_parent(tmp_path / "f" / "out")


def test_atomic_write_temporaries_of_dead_writers_go_live_ones_stay(tmp_path):
    from clipdeploy.artifact.staging import clean_stale_writes, lock_new_file

    engines = tmp_path / "engines"
    engines.mkdir()
    dead = engines / ".image.fp16.h100.plan.1a2b3c4d.tmp"  # a build killed while writing its plan
    dead.write_bytes(b"\0" * 4096)
    live = engines / ".text.fp16.h100.plan.5e6f7a8b.tmp"
    fd = lock_new_file(live)  # what atomic_write_bytes holds while it writes
    assert fd is not None
    mine = [engines / "notes.tmp", engines / "image.fp16.h100.plan"]
    for p in mine:
        p.write_text("keep")
    try:
        assert clean_stale_writes(engines) == [dead]
        assert live.is_file() and all(p.is_file() for p in mine)
    finally:
        os.close(fd)
    assert clean_stale_writes(engines) == [live]
    atomic_write_text(engines / "x.json", "{}")
    assert sorted(os.listdir(engines)) == ["image.fp16.h100.plan", "notes.tmp", "x.json"]


def test_without_flock_writers_go_on_and_cleaners_touch_nothing(tmp_path, monkeypatch):
    # Some network filesystems refuse flock: exporting must still work, and nothing may be removed
    # on a guess.
    leftover = _leftover(tmp_path, ".art.tmp-deadbeef")

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert clean_beside(tmp_path / "art") == [] and leftover.is_dir()
    with reserved(tmp_path, ".art.tmp-") as work:
        assert work.is_dir()
    atomic_write_text(tmp_path / "m.json", "{}")
    assert (tmp_path / "m.json").read_text() == "{}"


# ---- an artifact's own locks ------------------------------------------------------------------------------

_COUNT = """
import sys, time
from pathlib import Path
from clipdeploy.artifact.staging import artifact_lock
root, n = Path(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    with artifact_lock(root):  # a read-modify-write with a pause between the read and the write
        value = int((root / "count").read_text())
        time.sleep(0.02)
        (root / "count").write_text(str(value + 1))
"""


def test_artifact_lock_orders_read_modify_writes_of_two_processes(tmp_path):
    (tmp_path / "count").write_text("0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _COUNT, str(tmp_path), "15"], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert (tmp_path / "count").read_text() == "30"  # unordered, the two lose each other's increments
    assert sorted(os.listdir(tmp_path)) == ["count"]  # the lock file goes with its last holder


def test_updating_manifest_waits_for_a_holder_and_reads_after_its_write(tmp_path):
    import json
    import threading

    from clipdeploy.artifact.manifest import updating_manifest
    from clipdeploy.artifact.staging import artifact_lock

    pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")
    from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact

    if bpe_vocab() is None:
        pytest.skip("the tiny artifact needs open_clip's BPE vocabulary file")
    art = make_tiny_artifact(tmp_path / "art", ("fp32",))
    seen = []

    def second():
        with updating_manifest(art) as manifest:
            seen.append(manifest.get("first"))
            manifest["second"] = True

    with artifact_lock(art):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert t.is_alive(), "a second writer did not wait for the lock"
        m = json.loads((art / "manifest.json").read_text())
        m["first"] = True
        (art / "manifest.json").write_text(json.dumps(m))
    t.join(10)
    assert seen == [True]
    m = json.loads((art / "manifest.json").read_text())
    assert m["first"] and m["second"]


def test_a_waiter_locks_the_new_directory_after_a_swap(tmp_path):
    """export --force swaps the artifact while holding the old one's lock: a waiter must then lock the
    new directory, not the old one on its way out."""
    import threading

    from clipdeploy.artifact.staging import ARTIFACT_LOCK, artifact_lock

    out = tmp_path / "art"
    out.mkdir()
    held_on = []

    def waiter():
        with artifact_lock(out):
            lock = out / ARTIFACT_LOCK
            held_on.append(lock.is_file() and (out / "new.txt").is_file())

    with artifact_lock(out):
        t = threading.Thread(target=waiter)
        t.start()
        t.join(0.3)
        assert t.is_alive()
        with reserved(tmp_path, ".art.tmp-") as work:
            (work / "new.txt").write_text("new")
            swap_directory(work, out)
    t.join(10)
    assert held_on == [True]
    assert sorted(os.listdir(out)) == ["new.txt"]


def test_job_lock_refuses_a_second_run_naming_the_first_and_a_dead_holder_does_not_count(tmp_path):
    from clipdeploy.artifact.staging import job_lock, job_lock_path, running_jobs

    with job_lock(tmp_path, "quantize-int8", "quantize --precision int8"):
        assert running_jobs(tmp_path) and running_jobs(tmp_path)[0].startswith(f"quantize-int8 (pid {os.getpid()} ")
        with pytest.raises(UsageError, match=rf"quantize --precision int8 is already running on .*pid {os.getpid()}"):
            with job_lock(tmp_path, "quantize-int8", "quantize --precision int8"):
                pass
        with job_lock(tmp_path, "quantize-fp16", "quantize --precision fp16"):  # another job runs beside it
            assert len(running_jobs(tmp_path)) == 2
    assert os.listdir(tmp_path) == [] and running_jobs(tmp_path) == []
    # A holder killed with SIGKILL leaves its file, but not its lock.
    job_lock_path(tmp_path, "quantize-int8").write_text("pid 999999 host gone\n")
    assert running_jobs(tmp_path) == []
    with job_lock(tmp_path, "quantize-int8", "quantize --precision int8"):
        assert f"pid {os.getpid()}" in job_lock_path(tmp_path, "quantize-int8").read_text()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_directory_that_cannot_be_written_is_named_in_one_line(tmp_path, monkeypatch, code, words):
    from clipdeploy.artifact.staging import artifact_lock, job_lock

    real = os.open

    def refuse(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    for attempt in (lambda: reserved(tmp_path, ".out.tmp-").__enter__(),
                    lambda: atomic_write_text(tmp_path / "manifest.json", "{}"),
                    lambda: artifact_lock(tmp_path).__enter__(),
                    lambda: job_lock(tmp_path, "quantize-int8", "quantize").__enter__()):
        with pytest.raises(UsageError) as e:
            attempt()
        msg = str(e.value)
        assert words in msg and repr(str(tmp_path)) in msg and ".lock" not in msg and ".tmp" not in msg, msg


def test_every_manifest_writer_goes_through_the_lock():
    """``write_manifest`` is called only by ``updating_manifest`` (which holds the artifact's lock from
    the read to the write) and by the exporter, which writes into its own fresh temporary directory."""
    import ast

    import clipdeploy

    src = Path(clipdeploy.__file__).resolve().parent
    callers = set()
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "write_manifest":
                    callers.add(f"{path.relative_to(src).as_posix()}:{fn.name}")
    assert callers == {"artifact/manifest.py:updating_manifest", "export/exporter.py:_build", "export/exporter.py:export_model"}
