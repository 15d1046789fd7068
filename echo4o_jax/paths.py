"""Output files and folders: whether a path is, or can become, a folder this process writes into; one run at a
time in a folder (`hold_lock`); a file written whole or not at all (`atomic_write`); a file's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "write_json", "file_sha256", "folder_problem", "hold_lock", "LockUnavailable", "pid_running"]


class LockUnavailable(OSError):
    """The lock file cannot be opened or locked at all (permissions, a file system without locks): not another
    run holding it."""


def folder_problem(path) -> str | None:
    """Why `path` cannot be used as an output folder, or None: it exists and is not a folder, or its nearest
    existing ancestor is a file or not writable (checked before anything is written, so that a mistyped
    output path fails at once rather than after hours of work)."""
    path = pathlib.Path(path)
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                return "exists and is not a folder" if q == path else f"{q} is a file, not a folder"
            if not os.access(q, os.W_OK | os.X_OK):
                return f"{q} is not writable"
            return None
    return None


def hold_lock(path, what: str, error: type[Exception] = RuntimeError):
    """An exclusive ``flock`` on the file `path` (created), which then holds this process's pid, or on the folder
    `path` (nothing is written); returns the open file (closing it releases the lock; so does the process's
    end, however it ends). Raises `error` naming `what` (and the holder's pid, for a file) when another run
    holds it; LockUnavailable when it cannot be opened or locked for another reason (a file system without
    locks: the caller decides whether to go on unlocked)."""
    import errno
    import fcntl

    folder = os.path.isdir(path)  # a folder locks itself: nothing is written into it (no pid to name, then)
    try:
        f = _FolderLock(os.open(path, os.O_RDONLY)) if folder else open(path, "a+")
    except OSError as e:
        raise LockUnavailable(f"{what}: cannot open {path} to lock it ({e.strerror or e})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        if not folder:
            f.seek(0)
            holder = f.read().strip()
        f.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # e.g. no locks on this file system
            raise LockUnavailable(f"{what}: cannot lock {path} ({e.strerror or e})") from None
        who = ("it holds the folder's lock" if folder else
               f"{'pid ' + holder if holder.isdigit() else 'pid unknown'}; lock file {path}")
        raise error(f"{what} is in use by another run ({who}): one run at a time") from None
    if not folder:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    return f


class _FolderLock:
    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (this process: True). What is unknown counts as running: the
    callers remove the leftovers of processes that no longer run, and must not remove a live one's."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # not a process id
        return False
    except OSError:  # another user's process (PermissionError), or unknown
        return True
    return True


def atomic_write(path, data: bytes | str | Callable[[BinaryIO], None], *, fsync: bool = True) -> pathlib.Path:
    """Write `path` whole or not at all: `data` (bytes, str as UTF-8, or a function that writes into the open
    binary file) goes to a temporary file beside it (``.NAME.PID.THREAD.tmp``: two processes or threads never
    share one), flushed and, with `fsync`, synced to disk, then renamed over `path`. On any failure (a full
    disk, an exception in the writer, Ctrl-C) the temporary file is removed, `path` is as it was and the error
    propagates. The parent folder is created. Returns `path` as a Path."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj, *, indent: int = 1, fsync: bool = True, **dumps_kw) -> pathlib.Path:
    """`obj` as indented JSON (and a newline) into `path`, whole or not at all (`atomic_write`)."""
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps_kw) + "\n", fsync=fsync)


def file_sha256(path) -> str:
    """The hex sha256 of a file's content (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
