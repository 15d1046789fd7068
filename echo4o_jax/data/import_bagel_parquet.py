"""Import BAGEL's parquet training data (text-to-image or editing) into a record dataset.

    python -m echo4o_jax.data.import_bagel_parquet --kind t2i|edit INPUT [INPUT ...] --out DIR
        [--name NAME] [--edit-mode pairs|chain] [--on-error fail|skip] [--image-check decode|header]
        [--shard-bytes N] [--limit N] [--overwrite]

INPUT: parquet files or folders (searched recursively). Record ids are `NAME/PATH/ROW` (edit pairs:
`NAME/PATH/ROW/STEP`), PATH = the parquet file's path relative to the inputs' common folder, without
`.parquet` (for one folder: relative to it; for one file: its name): unique across inputs whose file names
repeat (`a/part-0.parquet b/part-0.parquet` -> `a/part-0`, `b/part-0`) and the same on every run over the
same inputs. A file given twice (or two paths that map to the same PATH) is an error naming both.

* `t2i` (`T2IIterableDataset`): columns `image` (encoded bytes) and `captions` (a JSON object string
  {key: caption}, or a struct / list column of captions); all captions are kept as text alternatives (the
  official loader picks one at random per draw; the pipeline does the same, seeded). A `captions` string
  that is not a JSON object is an error naming the row and column (never stored as the caption itself).
  Record: caption (CFG-droppable) -> noisy VAE target.
* `edit` (`UnifiedEditIterableDataset`): `image_list` (encoded images of an edit chain) and
  `instruction_list` (per step a list of alternative instructions). `--edit-mode pairs` (default) writes
  one record per step i -> i+1; `chain` one record per row over the whole chain (the official "step by
  step" branch from the first to the last image). Record per step: source clean VAE + ViT
  (CFG-droppable) -> instruction (CFG-droppable) -> noisy VAE target. (The official loader samples a
  random sub-chain per draw and sometimes concatenates instructions; records keep fixed plans.)

Other scalar columns are kept in `meta.extra`; images are stored as received. A row without the columns of
its `--kind` is an error naming them and the columns found. Errors: `--on-error=fail` (default) names the
file and row; `skip` counts them in the manifest. Arguments (`--shard-bytes`, `--limit` >= 1,
`--name`) are checked before anything is written. Exit status 2 on failure, with one line
`import_bagel_parquet: error: ...`. `--overwrite` replaces an existing
dataset only when the import succeeds (a failed import leaves it as it was).
"""

from __future__ import annotations

import argparse
import json
import os

from echo4o_jax.data._import_common import (
    printable,
    ArgumentError,
    ImportFailure,
    OnError,
    ParquetReadError,
    check_image,
    check_writer_args,
    WRITER_INTERRUPTED,
    cli_error,
    cli_interrupted,
    find_parquet,
    iter_parquet_rows,
    require_records,
    scalar_extras,
    text_alternatives,
    type_error,
)
from echo4o_jax.interrupts import exit_process, keep_ctrl_c
from echo4o_jax.data.records import RecordError, RecordWriter, edit_record, t2i_record

__all__ = ["import_bagel_parquet", "main", "ImportFailure"]


COLUMNS = {"t2i": ("image", "captions"), "edit": ("image_list", "instruction_list")}


class _BadCell(ValueError):
    """A cell the importer cannot use: `reason` (the skip category) and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _captions(v) -> tuple[str | list[str], list[str] | None]:
    """(the caption, or its alternatives; the keys of a {key: caption} object) of a `captions` cell: a JSON
    object string {key: caption} (the official format), or a struct / list column of captions. Anything else
    (a string that is not a JSON object: never taken as the caption itself) raises _BadCell."""
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadCell("captions is not UTF-8 text", str(e)) from None
    keys = None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise _BadCell("captions is not JSON", f"expected a JSON object {{key: caption}}, got {v[:80]!r}") from None
        if not isinstance(v, dict):
            raise _BadCell("captions is not a JSON object",
                           f"expected {{key: caption}}, got a JSON {type(v).__name__}: {json.dumps(v)[:80]}")
    if isinstance(v, dict):
        keys = [str(k) for k in v]
        bad = [k for k, c in v.items() if not isinstance(c, str) or not c.strip()]
        if bad:  # (was dropped, while meta's caption_keys still named it)
            raise _BadCell("caption is not a non-empty string", f"key {bad[0]!r}: {type_error(v[bad[0]])}")
        caps = list(v.values())
        caps = None if not caps else (caps[0] if len(caps) == 1 else caps)
    else:
        caps = text_alternatives(v)
    if caps is None:
        raise _BadCell("no caption", f"captions cell {json.dumps(v, default=str)[:80]}")
    return caps, keys


def _parquet_sources(inputs: list[str]) -> list[tuple[str, str, str]]:
    """(file, path for messages and meta, id part) of the parquet files of `inputs`: paths relative to the
    inputs' common folder (id part: without `.parquet`, `/`-separated). Raises ImportFailure when two
    files get the same id part (names both), FileNotFoundError when there are no files."""
    files = find_parquet(list(inputs))
    if not files:
        raise FileNotFoundError(f"no parquet files in {inputs}")
    common = os.path.commonpath([os.path.abspath(root) for _, root in files])
    out, seen = [], {}
    for f, _ in files:
        rel = printable(os.path.relpath(os.path.abspath(f), common))
        part = os.path.splitext(rel)[0].replace(os.sep, "/")
        if part in seen:
            raise ImportFailure(f"{seen[part]} and {f} would get the same record ids ('.../{part}/<row>'): "
                                f"give each parquet file once")
        seen[part] = f
        out.append((f, rel, part))
    return out


def import_bagel_parquet(inputs: list[str], out_dir: str, *, kind: str, name: str | None = None,
                         edit_mode: str = "pairs", on_error: str = "fail", image_check: str = "decode",
                         shard_bytes: int = 256 << 20, limit: int | None = None, overwrite: bool = False) -> dict:
    """The parquet files of `inputs` -> one record dataset in `out_dir`; returns its manifest. The arguments
    (ArgumentError) and the inputs (FileNotFoundError, ImportFailure) are checked before anything is written."""
    if kind not in ("t2i", "edit"):
        raise ArgumentError("kind", kind, "expected t2i or edit")
    if edit_mode not in ("pairs", "chain"):
        raise ArgumentError("edit_mode", edit_mode, "expected pairs or chain")
    check_writer_args(shard_bytes=shard_bytes, limit=limit, on_error=on_error, image_check=image_check)
    if name is not None and (not name or "/" in name or os.sep in name or name.startswith(".")):
        raise ArgumentError("name", name, "must be a plain file-name prefix (no '/', not starting with '.': "
                            "the shards would be hidden files)")
    files = _parquet_sources(inputs)
    # (the absolute path's: "." named the dataset ".", its shards hidden files .-00000.array_record)
    name = name or printable(os.path.basename(os.path.abspath(inputs[0]))).removesuffix(".parquet") or kind
    info = {"importer": "echo4o_jax.data.import_bagel_parquet", "kind": kind, "edit_mode": edit_mode,
            "inputs": [os.path.abspath(p) for p in inputs], "on_error": on_error, "image_check": image_check,
            "limit": limit}
    with RecordWriter(out_dir, shard_bytes=shard_bytes, name=name, overwrite=overwrite, info=info) as w:
        err = OnError(on_error, w)
        for f, rel, stem in files:
            try:
                for i, row in iter_parquet_rows(f):
                    if limit is not None and w.num_records >= limit:
                        break
                    where = f"{rel} row {i}"
                    prov = {"parquet": rel, "row": i}
                    missing = [c for c in COLUMNS[kind] if c not in row]
                    if missing:
                        err(where, f"missing columns {missing}", f"--kind {kind} reads the columns "
                            f"{list(COLUMNS[kind])}; the file has {sorted(row)}")
                        continue
                    if kind == "t2i":
                        _t2i_row(w, err, row, where, prov, f"{name}/{stem}/{i}", image_check)
                    else:
                        _edit_row(w, err, row, where, prov, f"{name}/{stem}/{i}", image_check, edit_mode)
            except ParquetReadError as e:
                err(rel, "unreadable parquet", str(e))
            if limit is not None and w.num_records >= limit:
                break
        require_records(w, f"{kind} ({len(files)} parquet files)")
        return w.close()


def _t2i_row(w, err, row, where, prov, rid, image_check) -> None:
    try:
        caps, keys = _captions(row["captions"])
    except _BadCell as e:
        err(where, e.reason, e.detail)
        return
    try:
        data = check_image(row["image"], image_check)
    except RecordError as e:
        err(where, "corrupt image", str(e))
        return
    meta = dict(prov)
    if keys is not None:
        meta["caption_keys"] = keys
    ex = scalar_extras(row, set(COLUMNS["t2i"]))
    if ex:
        meta["extra"] = ex
    err.write(where, lambda: t2i_record(rid, caps, data, source="bagel_parquet", subset="t2i", meta=meta))


def _edit_row(w, err, row, where, prov, rid, image_check, edit_mode) -> None:
    imgs = row["image_list"]
    instrs = row["instruction_list"]
    if not isinstance(imgs, list) or len(imgs) < 2:
        err(where, "image_list needs >= 2 images")
        return
    if not isinstance(instrs, list) or len(instrs) != len(imgs) - 1:
        err(where, "instruction_list must have len(image_list) - 1 entries",
            f"{len(instrs) if isinstance(instrs, list) else type(instrs).__name__} for {len(imgs)} images")
        return
    texts = [text_alternatives(x) for x in instrs]
    if any(t is None for t in texts):
        err(where, "empty instruction", f"step {[i for i, t in enumerate(texts) if t is None][0]}")
        return
    try:
        data = [check_image(b, image_check) for b in imgs]
    except RecordError as e:
        err(where, "corrupt image", str(e))
        return
    meta = dict(prov)
    ex = scalar_extras(row, set(COLUMNS["edit"]))
    if ex:
        meta["extra"] = ex
    if edit_mode == "chain":
        err.write(where, lambda: edit_record(rid, data, texts, source="bagel_parquet", subset="edit", meta=meta))
        return
    for s in range(len(data) - 1):
        err.write(f"{where} step {s}", lambda: edit_record(
            f"{rid}/{s}", data[s:s + 2], [texts[s]], source="bagel_parquet", subset="edit",
            meta={**meta, "step": s, "chain_length": len(data)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.data.import_bagel_parquet",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="parquet files or folders")
    ap.add_argument("--kind", choices=("t2i", "edit"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None, help="record id prefix and shard name (default: input folder name)")
    ap.add_argument("--edit-mode", choices=("pairs", "chain"), default="pairs")
    ap.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    ap.add_argument("--image-check", choices=("decode", "header"), default="decode")
    ap.add_argument("--shard-bytes", type=int, default=256 << 20)
    ap.add_argument("--limit", type=int, default=None,
                    help="stop at the first row that brings the dataset to N records (an edit row writes one "
                         "record per step with --edit-mode pairs, so up to N + steps - 1)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing dataset (swapped in only when the import succeeds)")
    a = ap.parse_args(argv)
    keep_ctrl_c()
    try:
        m = import_bagel_parquet(a.inputs, a.out, kind=a.kind, name=a.name, edit_mode=a.edit_mode,
                                 on_error=a.on_error, image_check=a.image_check, shard_bytes=a.shard_bytes,
                                 limit=a.limit, overwrite=a.overwrite)
    except (ImportFailure, ArgumentError, RecordError, OSError) as e:
        return cli_error("import_bagel_parquet", e)
    except KeyboardInterrupt:
        return cli_interrupted("import_bagel_parquet", WRITER_INTERRUPTED)
    print(json.dumps({"records": m["records"], "shards": len(m["shards"]), "bytes": m["bytes"],
                      "skipped": m["skipped"]["count"], "skipped_by_reason": m["skipped"]["by_reason"]}))
    return 0


if __name__ == "__main__":
    exit_process(main())
