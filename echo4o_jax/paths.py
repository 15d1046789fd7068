"""Output folders: whether a path is, or can become, a folder this process writes into."""

from __future__ import annotations

import os
import pathlib

__all__ = ["folder_problem"]


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
