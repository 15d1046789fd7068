"""The paid-call journal: an append-only, fsync'd JSONL file plus a content-addressed blob store.

Layout (``<journal_dir>``, by default ``<out>/journal``)::

    journal.jsonl            one JSON object per finished paid call (see below), appended + fsync'd
    blobs/<aa>/<sha256>.<ext> the image bytes a call returned, exactly as received
    lock                     flock'd while a run uses the journal (two runs on one journal: refused);
                             holds the pid of the run

An entry is ``{"v": 1, "key", "kind": "chat"|"image"|"edit", "model", "label", "status": "ok"|"refused",
"text" (chat answer), "blobs": [{"sha256", "bytes", "ext"}] (images), "usage", "cost", "attempts",
"error" (refusals), "endpoint" (the base URL called, without credentials; None: OpenAI's)}``; an entry is
replayed only to a run calling the same endpoint (:func:`answered_here`). ``key`` is the sha256 of the canonical request (kind, model, parameters, messages
with images replaced by their digests, and a scope: the sample id for per-sample calls, ``shared`` for
calls whose answer several samples may reuse). The blobs of an entry are written (and fsync'd) before
the entry, so an entry never points at a missing blob. A run killed while appending leaves at most a
torn last line, which the next run drops (truncating the file) before appending.

Nothing in the journal is secret: no request headers, no API key; error texts are redacted by the
caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ..jsonl import jsonl_lines
from ..paths import atomic_write
from ..paths import hold_lock as _hold_lock

log = logging.getLogger(__name__)

__all__ = ["Journal", "JournalError", "BlobError", "JOURNAL_NAME", "hold_lock", "answered_here"]

JOURNAL_NAME = "journal.jsonl"
JOURNAL_VERSION = 1


class JournalError(RuntimeError):
    pass


def answered_here(entry: dict | None, endpoint: str | None) -> bool:
    """Whether journaled `entry` answers a call to `endpoint` (another server's answers are asked again, not
    replayed as this one's). Entries of journals written before endpoints were recorded have none: replayed
    (their endpoint is unknown)."""
    return entry is not None and ("endpoint" not in entry or entry["endpoint"] == endpoint)


class BlobError(JournalError):
    """A blob of an entry is missing or corrupt (its bytes do not match its sha256): its call is asked again."""


def hold_lock(path: Path, what: str):
    """`echo4o_jax.paths.hold_lock` raising JournalError."""
    return _hold_lock(path, what, JournalError)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """Thread-safe; one process at a time (an exclusive ``flock`` on ``<root>/lock``)."""

    def __init__(self, root: str | os.PathLike, *, lock: bool = True, read_only: bool = False):
        self.root = Path(root)
        self.path = self.root / JOURNAL_NAME
        self.blob_dir = self.root / "blobs"
        self.read_only = read_only
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._lockfile = None
        self._f = None
        self.bad_lines = 0
        if read_only:
            if self.path.exists():
                self._load(truncate=False)
            return
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JournalError(f"cannot create the journal folder {self.root}: {e.strerror or e}") from None
        if lock:
            self._acquire_lock()
        self._load(truncate=True)
        self._f = open(self.path, "ab")

    # ---------------------------------------------------------------------------------- lifecycle
    def _acquire_lock(self) -> None:
        self._lockfile = hold_lock(self.root / "lock", f"the journal {self.root}")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._lockfile is not None:
            self._lockfile.close()  # releases the flock
            self._lockfile = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self, *, truncate: bool) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a torn append
        if end < len(data):
            log.warning("journal %s: dropping a torn last line (%d bytes)", self.path, len(data) - end)
            if truncate:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        for n, e, why in jsonl_lines(data[:end].splitlines(), strict_unicode=False):
            key = e.get("key") if e else None
            if not isinstance(key, str):
                self.bad_lines += 1
                log.warning("journal %s: line %d is not a journal entry (%s); ignored", self.path, n,
                            why or "no string `key`")
                continue
            self._entries[key] = e  # a later line for a key (a lost blob re-fetched) wins

    # ---------------------------------------------------------------------------------- entries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[dict]:
        with self._lock:
            return list(self._entries.values())

    def append(self, entry: dict[str, Any]) -> None:
        if self._f is None:
            raise JournalError("journal is closed or read-only")
        entry = {"v": JOURNAL_VERSION, **entry}
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._entries[entry["key"]] = entry

    # ---------------------------------------------------------------------------------- blobs
    def _blob_path(self, sha: str, ext: str) -> Path:
        return self.blob_dir / sha[:2] / f"{sha}.{ext}"

    def put_blob(self, data: bytes, ext: str = "bin") -> dict:
        """Store bytes (durably) under their sha256; returns the reference kept in an entry. A blob file
        already there is kept when its content matches, else (corrupt) replaced."""
        sha = hashlib.sha256(data).hexdigest()
        ext = "".join(c for c in (ext or "bin").lower() if c.isalnum())[:8] or "bin"
        ref = {"sha256": sha, "bytes": len(data), "ext": ext}
        try:
            self.read_blob(ref)  # stored already (the same answer again)
        except BlobError:  # missing, or corrupt: (re)written
            p = atomic_write(self._blob_path(sha, ext), data)
            _fsync_dir(p.parent)
        return ref

    def read_blob(self, ref: dict) -> bytes:
        """The bytes of a blob; BlobError when it is missing or corrupt (checked against its sha256)."""
        p = self._blob_path(ref["sha256"], ref.get("ext", "bin"))
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BlobError(f"blob {p} is missing ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise BlobError(f"blob {p} is corrupt (sha256 mismatch)")
        return data
