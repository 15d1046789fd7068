"""Inspect a record dataset.

    python -m echo4o_jax.data.inspect PATH [-n N] [--contact-sheet out.png] [--verify] [--start I]

PATH: a dataset folder, shard file, manifest, glob, or several of them. Prints the counts (records,
shards, bytes, tasks / subsets / sources from the manifests, or by reading every record with `--scan` or
when a manifest is incomplete or has no counts; skipped items from the manifest) and N samples (id,
task, plan, texts, image formats and sizes, meta); `--contact-sheet` writes a PNG with one row per
shown sample (its images as thumbnails, then its texts); `--verify` checks shard sizes and sha256
against the manifest (before opening any shard), then the record counts. A dataset whose manifest says it
is incomplete (a failed or interrupted import / synthesis run; training refuses it unless
`data.records.allow_incomplete`) is shown with a line `inspect: warning: ...` on stderr naming the manifest
and its recorded error. Errors (bad manifest, missing / truncated / corrupt shard, undecodable record,
`--start` past the last record, `-n` < 0) print one line `inspect: error: ...` naming the file (and record)
and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import textwrap

from echo4o_jax.data._import_common import ArgumentError, cli_error, cli_interrupted
from echo4o_jax.interrupts import exit_process, keep_ctrl_c
from echo4o_jax.paths import atomic_write
from echo4o_jax.data.records import Record, RecordError, RecordReader, incomplete_reason

__all__ = ["summarize", "describe", "contact_sheet", "main"]


def _has_counts(m: dict) -> bool:
    """Whether a manifest is complete and carries the counts (`counts`, `images`) of its records."""
    c = m.get("counts")
    return (bool(m.get("complete")) and isinstance(m.get("images"), int) and isinstance(c, dict)
            and all(isinstance(c.get(k), dict) for k in ("task", "subset", "source")))


def summarize(reader: RecordReader, *, scan: bool = False) -> dict:
    """Counts by task / subset / source: from complete manifests (with counts) covering every shard,
    else (or with `scan`) by reading every record header; `counts_from` says which."""
    counts = {k: collections.Counter() for k in ("task", "subset", "source")}
    images = 0
    listed = {os.path.normpath(os.path.join(d, s["file"])) for d, m in reader.manifests.items() for s in m["shards"]}
    from_manifest = (not scan and reader.manifests and all(_has_counts(m) for m in reader.manifests.values())
                     and {os.path.normpath(f) for f in reader.shards} == listed)  # (some shards: not the whole's)
    if from_manifest:
        for m in reader.manifests.values():
            for k in counts:
                counts[k].update(m["counts"][k])
            images += int(m["images"])
    else:
        for i in range(len(reader)):
            h = reader.header(i)
            for k in counts:
                counts[k][h.get(k, "")] += 1
            images += len(h.get("images", []))
    out = {"records": len(reader), "shards": len(reader.shards), "images": images,
           "counts_from": "manifest" if from_manifest else "scan",
           "counts": {k: dict(sorted(v.items())) for k, v in counts.items()}}
    for d, m in reader.manifests.items():
        out.setdefault("manifests", {})[d] = {
            "complete": m.get("complete"), "records": m.get("records"), "bytes": m.get("bytes"),
            "skipped": (m.get("skipped") or {}).get("count", 0),
            "skipped_by_reason": (m.get("skipped") or {}).get("by_reason", {}),
        }
    return out


def _short(s, n=160) -> str:
    s = json.dumps(s, ensure_ascii=False) if not isinstance(s, str) else s
    return s if len(s) <= n else s[: n - 3] + "..."


def describe(rec: Record) -> str:
    lines = [f"id={rec.id} task={rec.task} source={rec.source} subset={rec.subset}"]
    ti = 0
    for k, it in enumerate(rec.plan):
        flags = f"loss={it['loss']} cfg={it['enable_cfg']}"
        if it.get("special_token_loss"):
            flags += f" special_token_label={it['special_token_label']}"
        if it["type"] == "text":
            lines.append(f"  [{k}] text      {flags}: {_short(rec.texts[ti])}")
            ti += 1
        else:
            info = rec.image_info[it["image"]]
            lines.append(f"  [{k}] {it['type']:<9} {flags}: image {it['image']} ({info.format} "
                         f"{info.width}x{info.height}, {len(rec.images[it['image']])} B)")
    if rec.meta:
        lines.append(f"  meta: {_short(rec.meta, 400)}")
    return "\n".join(lines)


def contact_sheet(records: list[Record], path: str, *, thumb: int = 128, text_width: int = 360) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for rec in records:
        thumbs = []
        for b in rec.images:
            try:
                with Image.open(io.BytesIO(b)) as im:
                    im = im.convert("RGB")
                    im.thumbnail((thumb, thumb))
                    thumbs.append(im.copy())
            except Exception:  # noqa: BLE001 - show a placeholder for a broken image
                thumbs.append(Image.new("RGB", (thumb, thumb), (255, 0, 255)))
        texts = [t if isinstance(t, str) else " | ".join(t) for t in rec.texts]
        caption = f"{rec.id} [{rec.task}]\n" + "\n".join(textwrap.fill(t, 56) for t in texts)
        rows.append((thumbs, caption))
    pad = 4
    W = max([len(t) for t, _ in rows] + [1]) * (thumb + pad) + text_width + pad
    H = len(rows) * (thumb + pad) + pad
    sheet = Image.new("RGB", (W, max(H, 1)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = pad
    for thumbs, caption in rows:
        x = pad
        for t in thumbs:
            sheet.paste(t, (x, y))
            x += thumb + pad
        tx = W - text_width
        d.multiline_text((tx, y), caption, fill=(0, 0, 0), spacing=2)
        y += thumb + pad
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)  # (main checks it before reading anything)
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {ext or '(none)'!r}")
    # written whole, then renamed: a Ctrl-C or a failed write leaves no cut-short file
    atomic_write(path, lambda f: sheet.save(f, format=fmt), fsync=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.data.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="+")
    ap.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    ap.add_argument("--start", type=int, default=0, help="index of the first sample shown")
    ap.add_argument("--contact-sheet", metavar="PNG")
    ap.add_argument("--verify", action="store_true", help="check sizes / sha256 / counts against the manifest")
    ap.add_argument("--scan", action="store_true", help="count by reading every record (not the manifest)")
    a = ap.parse_args(argv)
    keep_ctrl_c()
    try:
        if a.n < 0:
            raise ArgumentError("n", a.n, "the number of samples to show must be >= 0")
        if a.contact_sheet:  # (before anything is read: an unknown extension failed when saving, as a traceback)
            from PIL import Image

            Image.init()
            ext = os.path.splitext(a.contact_sheet)[1].lower()
            if ext not in Image.registered_extensions():
                raise ArgumentError("contact_sheet", a.contact_sheet, f"unknown image file extension {ext or '(none)'!r}"
                                    " (e.g. .png, .jpg)")
            parent = os.path.dirname(os.path.abspath(a.contact_sheet))
            if not os.path.isdir(parent):  # (created by contact_sheet: said, so that a typo'd folder is seen)
                print(f"inspect: note: the folder {parent} does not exist: it is created for the contact sheet",
                      file=sys.stderr)
        reader = RecordReader(a.path if len(a.path) > 1 else a.path[0], verify=a.verify)
        if not 0 <= a.start < len(reader):
            raise ArgumentError("start", a.start, f"{' '.join(a.path)} holds {len(reader)} records (indices 0 .. "
                                f"{len(reader) - 1})")
        for d, m in reader.manifests.items():
            why = incomplete_reason(d, m)
            if why is not None:
                print(f"inspect: warning: {why}", file=sys.stderr)
            limit = (m.get("info") or {}).get("limit")
            if limit is not None:
                print(f"inspect: note: {d} was imported with --limit {limit} (a trial import: not the whole source)",
                      file=sys.stderr)
        if a.verify:
            print("verify:", json.dumps(reader.verification))
        print(json.dumps(summarize(reader, scan=a.scan), indent=1))
        shown = [reader[i] for i in range(a.start, min(len(reader), a.start + max(a.n, 0)))]
        for rec in shown:
            print(describe(rec))
        if a.contact_sheet:
            contact_sheet(shown, a.contact_sheet)
            print(f"contact sheet: {a.contact_sheet} ({len(shown)} samples)")
    except (RecordError, ArgumentError, OSError) as e:
        return cli_error("inspect", e)
    except KeyboardInterrupt:
        return cli_interrupted("inspect", "nothing was written")
    return 0


if __name__ == "__main__":
    exit_process(main())
