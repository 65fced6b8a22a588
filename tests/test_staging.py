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
from clipdeploy.manifest import atomic_write_text, swap_directory
from clipdeploy.staging import LOCK_SUFFIX, clean_beside, clean_stale, ensure_parent, reserved


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
    from clipdeploy.staging import clean_stale_writes, lock_new_file

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
