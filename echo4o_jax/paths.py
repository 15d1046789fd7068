"""Output folders: whether a path is, or can become, a folder this process writes into; one run at a time
in a folder (`hold_lock`)."""

from __future__ import annotations

import os
import pathlib

__all__ = ["folder_problem", "hold_lock"]


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
    """An exclusive ``flock`` on the file `path` (created), which then holds this process's pid; returns the
    open file (closing it releases the lock; so does the process's end, however it ends). Raises `error` naming
    `what` and the holder's pid when another run holds it."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f"pid {holder}" if holder.isdigit() else "pid unknown"
        raise error(f"{what} is in use by another run ({who}; lock file {path}): one run at a time") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
