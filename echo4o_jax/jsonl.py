"""JSON-lines reading shared by every reader of a JSONL file (benchmark prompt files, generation requests and
metadata, Echo-4o captions, the synthesis journal): one rule for what a line is, each reader mapping a bad
line to its own error (raise naming FILE:LINE, count and skip, ...)."""

from __future__ import annotations

import json
from typing import Iterable, Iterator


def jsonl_lines(lines: Iterable[bytes | str]) -> Iterator[tuple[int, dict | None, str | None]]:
    """(1-based line number, object, None) per JSON-object line, or (line number, None, why) for a line
    that is not UTF-8 text, not JSON, or not a JSON object. Blank lines are skipped (still counted)."""
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not UTF-8 text ({e.reason})"
                continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:  # (RecursionError: nested too deeply)
            yield n, None, f"not JSON: {type(e).__name__ if isinstance(e, RecursionError) else e}"
            continue
        if not isinstance(obj, dict):
            yield n, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        yield n, obj, None
