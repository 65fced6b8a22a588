"""Temporary directories beside an output, made with the user's umask, that a dead run cannot strand.

A stage builds its output in a temporary directory next to the final one and renames it into place.
Each temporary ``NAME`` has a sibling lock file ``NAME.lock``, created before the directory and held
with ``flock`` for the life of the run (the kernel drops it when the process dies, ``kill -9``
included). The next run on the same output calls :func:`clean_stale`: a temporary whose lock it can
take belongs to a dead run and is removed; one whose lock is held is a live run's and is left alone.

An artifact's own writers (quantize, build, validate, export --force) serialize through two locks
kept in the artifact directory, held with ``flock`` the same way: :func:`artifact_lock`, short-held
and waited for, around every read-modify-write of ``manifest.json`` and the renames of the files its
entries name; and :func:`job_lock`, held for a whole long job (``quantize --precision int8``), which
a second run of the same job refuses at once instead of waiting minutes.

Modes: everything is created with ``os.mkdir(path, 0o777)`` / ``os.open(path, ..., 0o666)``, so the
kernel applies the umask (0755/0644 under 022, 0750/0640 under 027), as any build tool does.
``tempfile.mkdtemp``/``mkstemp`` would make them 0700/0600, private to whoever exported.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipdeploy.errors import UsageError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# What follows a temporary's prefix: 8 random characters (ours are hex; tempfile's, from older
# versions, are [a-z0-9_]), then the lock suffix or nothing. Anything else is not ours.
_TAIL = re.compile(r"[A-Za-z0-9_]{8}(\.lock)?")


def _random_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{secrets.token_hex(4)}{suffix}"


def ensure_parent(output: Path, option: str = "-o") -> None:
    """Create ``output``'s missing parent directories, as ``mkdir -p`` would; one line if a file is in the way."""
    parent = Path(output).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(
            f"{option} {str(output)!r}: cannot create its parent directory {str(parent)!r}, a file is in the way; "
            "choose another path"
        ) from None
    except PermissionError as e:
        raise UsageError(
            f"{option} {str(output)!r}: cannot create {str(e.filename or parent)!r} (permission denied); "
            "choose a path you can write to"
        ) from None


# errno values that mean "this directory cannot be written", as a user can fix it.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def not_writable(folder: Path, e: OSError, option: str = "") -> UsageError:
    """The one-line error for a directory this process cannot write: it names the directory (not the
    lock or temporary file it was about to make) and says why and what to do."""
    where = f"{option} {str(folder)!r}" if option else repr(str(folder))
    if e.errno == errno.EROFS:
        return UsageError(
            f"cannot write in {where}: it is on a read-only file system; copy it somewhere writable "
            "(cp -r) and run there, or choose a writable path"
        )
    return UsageError(
        f"cannot write in {where} (permission denied): it belongs to another user or its mode forbids writing; "
        "copy it somewhere you can write (cp -r), or run as its owner"
    )


def check_writable(folder: Path, option: str = "") -> None:
    """Refuse at once, in one line, a ``folder`` (or, if it does not exist yet, the nearest existing
    directory above it) that this process cannot write: before the work, not after it."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        code = errno.EROFS if read_only else errno.EACCES
        raise not_writable(existing, OSError(code, os.strerror(code)), option)


def open_new_file(path: Path) -> int:
    """``os.open`` a file that must not exist yet, write-only, with the umask's mode; a directory this
    process cannot write is a one-line UsageError naming it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in _NOT_WRITABLE:
            raise not_writable(Path(path).parent, e) from None
        raise


def lock_new_file(path: Path) -> int | None:
    """Create ``path`` (umask mode) and ``flock`` it, for an atomic write's temporary file, so that
    :func:`clean_stale_writes` can tell a dead writer's file from a live one's. None if the name is
    taken (or a cleaner unlinked it first): pick another name."""
    try:
        fd = open_new_file(path)
    except FileExistsError:
        return None
    if _try_lock(fd, unsupported=True) and _same_file(fd, path):
        return fd
    os.close(fd)
    return None


# An atomic write's temporary file: `.<name>.<8 random>.tmp` (tempfile's names, from older versions, too).
_WRITE_TMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def clean_stale_writes(folder: Path) -> list[Path]:
    """Remove the atomic-write temporaries in ``folder`` whose writer died (an engine plan killed
    mid-write is hundreds of MB); a file whose writer still holds its lock is left alone."""
    removed: list[Path] = []
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        path = Path(folder) / name
        if not _WRITE_TMP.fullmatch(name) or path.is_symlink() or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            continue
        try:
            if _try_lock(fd, unsupported=False) and _same_file(fd, path):
                path.unlink(missing_ok=True)
                removed.append(path)
        finally:
            os.close(fd)
    for p in removed:
        log.info("clipdeploy: removed %s, left by a write that died", p)
    return removed


def _try_lock(fd: int, *, unsupported: bool) -> bool:
    """Take ``fd``'s flock without waiting; False if another holds it. On a filesystem without flock
    (some network mounts) returns ``unsupported``: a writer goes on unlocked, a cleaner touches nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return unsupported
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a cleaner may have unlinked it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    ours = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


def _take_lock(lock: Path) -> int | None:
    """Create and lock ``lock``; None if the name is taken or a cleaner raced us to it."""
    fd = lock_new_file(lock)
    if fd is not None:  # who holds it, for a person who finds it
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {time.time():.0f}\n".encode())
    return fd


@contextmanager
def reserved(parent: Path, prefix: str, *, create: bool = True) -> Iterator[Path]:
    """A fresh ``parent/<prefix>XXXXXXXX``, locked for the duration of the ``with``, removed after.

    With ``create`` the directory is made (umask modes); without, only its name is reserved, for a
    ``rename`` onto it. Whatever is left at that name on exit (a failed run's files) is removed; a
    directory renamed away meanwhile (the finished output) is not touched.
    """
    parent = Path(parent)
    for _ in range(100):
        path = parent / _random_name(prefix)
        lock = path.with_name(path.name + LOCK_SUFFIX)
        fd = _take_lock(lock)
        if fd is not None:
            break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise OSError(errno.EEXIST, f"no free temporary name {prefix}* in {parent}")
    try:
        if create:
            os.mkdir(path, 0o777)
        yield path
    finally:
        # The directory first, then its lock: a live run's directory never exists without its lock.
        _remove(path)
        lock.unlink(missing_ok=True)
        os.close(fd)


# ---- an artifact's own locks ----------------------------------------------------------------------------

ARTIFACT_LOCK = ".clipdeploy.lock"  # the manifest lock, in the artifact directory
_JOB_LOCK = ".clipdeploy.{job}.lock"  # one long job's lock (``quantize-int8``)


def _open_locked(path: Path, *, wait: bool) -> int | None:
    """Open (creating, umask mode) and ``flock`` the lock file ``path``; None if held and not ``wait``.

    The holder unlinks the file before it lets go, so a lock taken on a file that is no longer at
    ``path`` (unlinked, or its directory swapped by ``export --force``) is dropped and taken again.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise not_writable(path.parent, e) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return None
            # A filesystem without flock (some network mounts): go on unlocked, saying so.
            log.warning("clipdeploy: %s cannot be locked (%s); concurrent runs on it are not kept apart",
                        path.parent, e.strerror or e)
            return fd
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _release(fd: int, path: Path) -> None:
    """Unlink the lock file (if it is still ours) while holding it, then let go."""
    try:
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def artifact_lock(root: Path) -> Iterator[None]:
    """Hold the exclusive manifest lock of the artifact ``root``, waiting for another holder.

    Every read-modify-write of ``manifest.json`` happens inside, with the renames of the files the
    new entries name, so that two stages never lose each other's entries nor leave an entry whose
    sha256 belongs to another run's file. Held for seconds at most: nothing slow is done inside.
    """
    path = Path(root) / ARTIFACT_LOCK
    fd = _open_locked(path, wait=True)
    assert fd is not None  # waited for
    try:
        yield
    finally:
        _release(fd, path)


def job_lock_path(root: Path, job: str) -> Path:
    return Path(root) / _JOB_LOCK.format(job=job)


@contextmanager
def job_lock(root: Path, job: str, what: str) -> Iterator[None]:
    """Hold the lock of one long ``job`` on the artifact ``root`` (e.g. ``quantize-int8``), or refuse at once.

    A second run of the same job would take minutes to overwrite the first one's work, so it is a
    one-line UsageError naming the holder (pid, host, since when) instead of a silent wait. Taking
    the lock is also the stage's first write: a directory it cannot write fails here, before any work.
    """
    path = job_lock_path(root, job)
    fd = _open_locked(path, wait=False)
    if fd is None:
        try:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        except OSError:
            holder = "another process"
        raise UsageError(
            f"{what} is already running on {str(root)!r} ({holder}; lock {path.name}); wait for it to finish, "
            "or run another precision, which may run beside it"
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        _release(fd, path)


def running_jobs(root: Path) -> list[str]:
    """The jobs (``quantize-int8``) now running on the artifact ``root``, each with its holder."""
    found = []
    prefix, suffix = _JOB_LOCK.split("{job}")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return found
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)) or name == ARTIFACT_LOCK:
            continue
        try:
            fd = os.open(Path(root) / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd, unsupported=True):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                found.append(f"{name[len(prefix):-len(suffix)]} ({holder})")
        finally:
            os.close(fd)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def clean_stale(parent: Path, prefixes: tuple[str, ...], restore: dict[str, Path] | None = None) -> list[Path]:
    """Remove the temporaries ``parent/<prefix>*`` that dead runs left; returns what was removed.

    ``restore`` maps a prefix to an output: a dead run's directory with that prefix is moved back to
    the output if the output is missing (a swap killed half-way leaves the previous output there).
    A temporary without any lock file is a dead run's too (a live run makes the lock before the
    directory, and removes the directory before the lock).
    """
    parent = Path(parent)
    restore = restore or {}
    removed: list[Path] = []
    try:
        names = sorted(os.listdir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p) and _TAIL.fullmatch(name[len(p):])), None)
        if prefix is None:
            continue
        path = parent / name
        if name.endswith(LOCK_SUFFIX):
            target = path.with_name(name[: -len(LOCK_SUFFIX)])
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                continue
            try:
                if not (_try_lock(fd, unsupported=False) and _same_file(fd, path)):
                    continue  # a live run holds it (or it was just removed)
                out = restore.get(prefix)
                if out is not None and target.is_dir() and not out.exists():
                    os.replace(target, out)
                    log.warning("clipdeploy: restored %s from %s, which a killed run left", out, target)
                elif target.exists() or target.is_symlink():
                    _remove(target)
                    removed.append(target)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif not (parent / (name + LOCK_SUFFIX)).exists() and path.is_dir() and not path.is_symlink():
            # No lock at all: left by a run of a clipdeploy that made none (or whose lock went first).
            out = restore.get(prefix)
            if out is not None and not out.exists():
                os.replace(path, out)
                log.warning("clipdeploy: restored %s from %s, which a killed run left", out, path)
            else:
                _remove(path)
                removed.append(path)
    for p in removed:
        log.info("clipdeploy: removed %s, left by a run that died", p)
    return removed


def output_temporaries(output: Path) -> tuple[str, str]:
    """The prefixes of the temporaries staged beside ``output``: its build and its swap-out."""
    return f".{output.name}.tmp-", f".{output.name}.old-"


def clean_beside(output: Path) -> list[Path]:
    """Clean what dead runs left beside ``output``, putting a half-swapped previous output back."""
    output = Path(output)
    work, old = output_temporaries(output)
    return clean_stale(output.parent, (work, old), restore={old: output})
