"""Shared pieces of the importers: error policy, CLI error lines, parquet row iteration, JSON-safe
metadata."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Any, Callable, Iterator

from echo4o_jax.data.records import (DatasetExistsError, RecordError, RecordWriter, incomplete_reason,
                                     load_manifest, probe_image)
from echo4o_jax.interrupts import EXIT_INTERRUPTED

# what a Ctrl-C leaves of a dataset a RecordWriter was writing (RecordWriter.close via its `with` block)
WRITER_INTERRUPTED = ("a dataset that was being written into a new folder keeps the records written so far, marked "
                      "incomplete in its manifest (rerun with --overwrite to write it again); a dataset that was "
                      "being replaced (--overwrite) is left as it was")


class ImportFailure(RuntimeError):
    """An input item is corrupt and --on-error=fail (the message names the file and row / member), or
    the inputs cannot be imported together (the message names the files)."""


class ArgumentError(ValueError):
    """An argument is invalid: `name` (the keyword argument; its CLI flag is `--name` with `-` for `_`, `-n` for
    a one-letter name), its `value` and why. Raised before anything is written."""

    def __init__(self, name: str, value: Any, why: str):
        self.name, self.value, self.why = name, value, why
        super().__init__(f"{name}={value!r}: {why}")

    def cli(self) -> str:
        """The message naming the CLI flag and the value as typed."""
        flag = f"-{self.name}" if len(self.name) == 1 else "--" + self.name.replace("_", "-")
        v = ",".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else self.value
        return f"{flag}={v}: {self.why}"


def check_writer_args(*, shard_bytes: int, limit: int | None, on_error: str, image_check: str) -> None:
    """ArgumentError for the importers' common arguments (before anything is written)."""
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ArgumentError("shard_bytes", shard_bytes, "must be a positive number of bytes")
    if limit is not None and limit < 1:
        raise ArgumentError("limit", limit, "must be >= 1 (records per dataset; leave it out for all)")
    if on_error not in ("fail", "skip"):
        raise ArgumentError("on_error", on_error, "expected fail or skip")
    if image_check not in ("decode", "header"):
        raise ArgumentError("image_check", image_check, "expected decode or header")


def cli_error(prog: str, e: Exception) -> int:
    """Prints a data CLI's one-line error (`PROG: error: ...`, naming the CLI flag where the library message
    names a keyword argument); returns the exit status 2 (bad input or a full disk, as every CLI here)."""
    if isinstance(e, DatasetExistsError):
        msg = f"{e.path} already holds a dataset; pass --overwrite to replace it"
        try:
            why = incomplete_reason(e.path, load_manifest(e.path))
        except (RecordError, OSError, ValueError):
            why = None  # no readable manifest (not UTF-8, say): the plain message
        if why is not None:  # e.g. an interrupted import
            msg = f"{why}; pass --overwrite to write it again"
    elif isinstance(e, ArgumentError):
        msg = e.cli()
    else:
        msg = str(e)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def cli_interrupted(prog: str, kept: str) -> int:
    """Prints a data CLI's one line for a Ctrl-C (`PROG: interrupted (Ctrl-C): <what is kept>`); returns 130."""
    print(f"{prog}: interrupted (Ctrl-C): {kept}", file=sys.stderr)
    return EXIT_INTERRUPTED


class OnError:
    """`fail`: raise ImportFailure naming the item; `skip`: count it in the writer's manifest."""

    def __init__(self, mode: str, writer: RecordWriter):
        if mode not in ("fail", "skip"):
            raise ValueError(f"--on-error={mode!r}: expected fail or skip")
        self.mode = mode
        self.writer = writer

    def __call__(self, where: str, reason: str, detail: str = "") -> None:
        if self.mode == "fail":
            raise ImportFailure(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.writer.skip(reason, where=where + (f": {detail}" if detail else ""))

    def write(self, where: str, make: Callable[[], Any]) -> None:
        """Write the record `make()` builds; one that cannot be stored (text that is not valid Unicode: a
        JSON "\\ud800" escape) is this item's error, named by `where` (it stopped the whole import, also with
        --on-error skip, naming a record id). A write that fails (RecordWriteError, an OSError) still stops."""
        try:
            self.writer.write(make())
        except RecordError as e:
            self(where, "record not storable", str(e))


def printable(name: str) -> str:
    """A file or member name as text a record can hold: bytes that are not UTF-8 (a latin-1 archive's
    `imágenes/`, decoded with surrogates) as backslash escapes. They made the record's header unencodable, which
    stopped the whole import even with --on-error skip."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_records(writer: RecordWriter, what: str) -> None:
    """An ImportFailure when `writer` holds no record: an import of nothing (an empty jsonl / parquet, no row
    of the task imported, every row skipped) is a mistake, not a complete dataset of 0 records."""
    if writer.num_records:
        return
    sk = writer._skipped
    skipped = (f"; skipped: {', '.join(f'{n} x {r}' for r, n in sk.most_common(5))}" if sk else "")
    raise ImportFailure(f"{what}: no records to import{skipped}")


def type_error(value: Any) -> str:
    """A short description of a cell of the wrong type, for messages: `got 5`, `got a list ['a']`."""
    text = json.dumps(value, default=str)
    text = text if len(text) <= 80 else text[:77] + "..."
    kind = {list: "a list ", dict: "an object ", str: "the string "}.get(type(value), "")
    return f"got {kind}{text}"


def check_image(data: Any, check: str) -> bytes:
    """Raw image bytes as received (an HF image struct {'bytes': ...} is unwrapped), probed; raises
    RecordError when unreadable."""
    if isinstance(data, dict):
        data = data.get("bytes")
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RecordError(f"not image bytes ({type(data).__name__})")
    probe_image(bytes(data), check=check)
    return bytes(data)


def jsonable(v: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a metadata value (bytes dropped, NaN -> None, dates -> ISO strings)."""
    if depth > 8:
        return str(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (datetime.date, datetime.datetime, datetime.time)):
        return v.isoformat()
    if isinstance(v, dict):
        return {str(k): jsonable(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x, depth + 1) for x in v]
    if hasattr(v, "tolist"):
        return jsonable(v.tolist(), depth + 1)
    if hasattr(v, "item"):
        return jsonable(v.item(), depth + 1)
    return str(v)


def scalar_extras(row: dict, used: set[str]) -> dict:
    """Columns not consumed by the importer, without binary payloads."""
    out = {}
    for k, v in row.items():
        if k in used or isinstance(v, (bytes, bytearray, memoryview)):
            continue
        if isinstance(v, list) and v and isinstance(v[0], (bytes, bytearray, dict)):
            continue
        out[k] = jsonable(v)
    return out


def find_parquet(inputs: list[str]) -> list[tuple[str, str]]:
    """(file, root) pairs for parquet files / folders (recursive, sorted). Symlinked folders are followed, each
    real folder once: a link back up the tree (`loop -> ..`) made the recursive glob import every file again
    under ever longer paths, and a link to a folder already searched imported its files twice."""
    out = []
    for p in inputs:
        if os.path.isdir(p):
            files, seen = [], set()
            for folder, subfolders, names in os.walk(p, followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:
                    subfolders[:] = []
                    continue
                seen.add(real)
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # hidden: skipped, as glob did
                files += [os.path.join(folder, n) for n in names if n.endswith(".parquet") and not n.startswith(".")]
            out += [(f, p) for f in sorted(files)]
        elif os.path.isfile(p):
            out.append((p, os.path.dirname(p) or "."))
        else:
            raise FileNotFoundError(f"{p}: no such parquet file or folder")
    return out


class ParquetReadError(Exception):
    """A parquet file cannot be opened or decoded."""


def iter_parquet_rows(path: str, batch_size: int = 64) -> Iterator[tuple[int, dict]]:
    """(row index, row as a dict of Python values); ParquetReadError when the file is unreadable."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading parquet needs pyarrow (pip install pyarrow==26.0.1)") from e
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=batch_size)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ParquetReadError(f"{type(e).__name__}: {e}") from None
    i = 0
    while True:
        try:
            batch = next(batches)
            rows = batch.to_pylist()
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise ParquetReadError(f"{type(e).__name__}: {e} (after row {i})") from None
        for row in rows:
            yield i, row
            i += 1


def first_text(v: Any) -> str | list[str] | None:
    """An instruction cell -> str, or list of alternatives: "s", ["s"], [["s"]], [["a", "b"]] ..."""
    if isinstance(v, str):
        return v if v.strip() else None
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if not v:
            return None
        if all(isinstance(x, str) for x in v):
            alts = [x for x in v if x.strip()]
            return None if not alts else (alts[0] if len(alts) == 1 else alts)
        return first_text(v[0])
    return None


def text_alternatives(v: Any) -> str | list[str] | None:
    """A cell holding one instruction or a list of alternative instructions."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, str):
        return v if v.strip() else None
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        alts = [x for x in v if x.strip()]
        return None if not alts else (alts[0] if len(alts) == 1 else alts)
    return None
