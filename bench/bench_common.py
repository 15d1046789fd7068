"""Checks the bench scripts share: bad input is one `error:` line and exit 2, found before any compile or
measurement (a typo must not cost a GPU's minutes, nor lose the results at the end)."""

from __future__ import annotations

import os
import pathlib
import sys

INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C (128 + SIGINT), after writing what it measured


class UsageError(Exception):
    """A bad argument: one `error:` line, exit 2."""


def usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def out_file_problem(path: str) -> str | None:
    """Why the file `path` cannot be written, or None: its folder must exist and be writable (no folder is
    made for it: a mistyped path should fail, not scatter folders), and it must not be a folder itself."""
    p = pathlib.Path(path)
    if p.is_dir():
        return "is a folder"
    folder = p.parent
    if not folder.is_dir():
        return f"no such folder {folder}"
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"{p if p.exists() else folder} is not writable"
    return None


def check_out(flag: str, path: str | None) -> None:
    """UsageError when the output file given with `flag` cannot be written (nothing given: fine)."""
    why = out_file_problem(path) if path else None
    if why:
        raise UsageError(f"{flag} {path}: {why}")


def check_at_least(**values) -> None:
    """UsageError for the first `--name=(value, minimum)` below its minimum (names with _ as on the command line)."""
    for name, (value, least) in values.items():
        if not value >= least:  # (also refuses NaN)
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {least}")
