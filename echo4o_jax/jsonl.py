"""JSON-lines reading shared by every reader of a JSONL file (benchmark prompt files, generation requests and
metadata, Echo-4o captions, the synthesis journal): one rule for what a line is, each reader mapping a bad
line to its own error (raise naming FILE:LINE, count and skip, ...)."""

from __future__ import annotations

import json
from typing import Iterable, Iterator


def jsonl_lines(lines: Iterable[bytes | str], *, strict_unicode: bool = True
                ) -> Iterator[tuple[int, dict | None, str | None]]:
    """(1-based line number, object, None) per JSON-object line, or (line number, None, why) for a line
    that is not UTF-8 text, not JSON, or not a JSON object, or (`strict_unicode`) that holds text which is not
    valid Unicode: a lone surrogate escape ("\\ud800"), which no UTF-8 file, record or request can hold.
    Blank lines are skipped (still counted); a UTF-8 byte order mark before the first line is ignored."""
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not UTF-8 text ({e.reason})"
                continue
        if n == 1:
            raw = raw.removeprefix("\ufeff")  # (a file saved by an editor that writes one)
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
        if strict_unicode and "\\u" in raw and not valid_unicode(obj):  # (only an escape makes one)
            yield n, None, "not valid Unicode: a lone surrogate escape (\\ud800-\\udfff) in a string"
            continue
        yield n, obj, None


def valid_unicode(obj) -> bool:
    """Whether `obj` (a str, or JSON-able data) can be written as UTF-8 (JSON's "\\ud800" escapes give lone
    surrogates, which cannot)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
