"""OpenVINO's compiled-model cache for a user who cannot write the default one (a HOME that is another
user's, as in containers and service accounts): a quiet per-user fallback, said once at INFO, never a
warning on every load; and an explicit cache folder that cannot be written, warned about once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="the openvino backend needs pip install 'clipdeploy[openvino]'")
pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")

import clipdeploy  # noqa: E402
from clipdeploy.runtime.backends import openvino as ov_backend  # noqa: E402

from tests.support.models import MODELS  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    try:
        return MODELS["tiny-onnx"].make(tmp_path_factory.mktemp("ov-cache") / "artifact", precisions=("fp32",))
    except FileNotFoundError as e:
        pytest.skip(f"the tiny artifact needs {e}")


@pytest.fixture
def unwritable_home(tmp_path, monkeypatch) -> Path:
    """The default cache sits under a file, so it cannot be made (as under another user's HOME); the temp
    folder is private to the test; nothing has been reported yet in this process."""
    blocker = tmp_path / "home-cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(ov_backend.tempfile, "gettempdir", lambda: str(temp))
    monkeypatch.setattr(ov_backend, "_REPORTED", set())
    return temp


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and "OpenVINO cache" in r.getMessage()]


def test_an_unwritable_default_cache_falls_back_quietly_and_says_so_once(tiny, unwritable_home, caplog):
    caplog.set_level(logging.INFO, logger="clipdeploy")
    sessions = [clipdeploy.load(tiny, backend="openvino") for _ in range(3)]
    assert _records(caplog, logging.WARNING) == [], "a routine fallback must not warn on every load"
    infos = _records(caplog, logging.INFO)
    assert len(infos) == 1, infos  # once per process, not per load or per tower
    own = unwritable_home / f"clipdeploy-{os.getuid()}"
    assert str(own / "openvino") in infos[0] and "not writable" in infos[0]
    for session in sessions:
        for runner in session.runners.values():
            assert runner.cache_dir is not None and runner.cache_dir.parent == own / "openvino"
    assert any(runner.cache_dir.iterdir() for runner in sessions[0].runners.values()), "nothing was cached"
    assert own.stat().st_mode & 0o777 == 0o700


def test_a_fallback_folder_that_is_not_ours_alone_is_not_used(tiny, unwritable_home, caplog):
    own = unwritable_home / f"clipdeploy-{os.getuid()}"
    own.mkdir()
    own.chmod(0o777)  # anyone could have planted blobs in it
    caplog.set_level(logging.INFO, logger="clipdeploy")
    session = clipdeploy.load(tiny, backend="openvino")
    assert all(r.cache_dir is None for r in session.runners.values())
    assert not (own / "openvino").exists()
    infos = _records(caplog, logging.INFO)
    assert len(infos) == 1 and "compiling without a cache" in infos[0], infos
    assert _records(caplog, logging.WARNING) == []


def test_an_unwritable_explicit_cache_is_warned_about_once(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ov_backend, "_REPORTED", set())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    caplog.set_level(logging.INFO, logger="clipdeploy")
    for _ in range(2):
        session = clipdeploy.load(tiny, backend="openvino", backend_options={"openvino_cache_dir": str(blocker)})
        assert all(r.cache_dir is None for r in session.runners.values())
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1 and str(blocker) in warnings[0] and "compiling without it" in warnings[0], warnings


def test_a_compile_waits_for_another_process_compiling_into_the_same_cache(tiny, tmp_path):
    """OpenVINO writes cache blobs without a lock (two Ray Serve replicas compiling one model failed with
    "cannot set permissions"): a compile holds the cache folder's lock, so a second one waits for it."""
    import fcntl
    import subprocess
    import sys
    import threading
    import time

    cache = tmp_path / "ov-cache"
    opts = {"openvino_cache_dir": str(cache)}
    clipdeploy.load(tiny, backend="openvino", backend_options=opts)  # creates the key folders
    locks = sorted(cache.rglob(".compile.lock"))
    assert locks, "a cached compile takes a lock file in its cache folder"
    # Another process holds every compile lock for 1.5 s; a load here must wait for it.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fds = [os.open(p, os.O_RDWR) for p in sys.argv[1:]]\n"
        "[fcntl.flock(fd, fcntl.LOCK_EX) for fd in fds]\n"
        "print('held', flush=True); time.sleep(1.5)\n"
    ), *map(str, locks)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    done = threading.Event()
    threading.Thread(target=lambda: (clipdeploy.load(tiny, backend="openvino", backend_options=opts), done.set()),
                     daemon=True).start()  # fmt: skip
    assert done.wait(60)
    waited = time.perf_counter() - start
    holder.wait(timeout=30)
    assert waited >= 1.0, f"the load took {waited:.2f} s: it did not wait for the lock the other process held"
    assert fcntl  # the lock is an flock, as the holder takes it
