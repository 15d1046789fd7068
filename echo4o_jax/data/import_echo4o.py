"""Import the released Echo-4o-Image dataset (HF `Yejy53/Echo-4o-Image`) into record datasets.

    python -m echo4o_jax.data.import_echo4o --root Echo-4o-Image --out DIR
        [--subsets surreal,instruction,multiref] [--on-error fail|skip] [--image-check decode|header]
        [--shard-bytes N] [--limit N] [--overwrite]

Layout read (docs/echo4o.md §1):

    ROOT/Surrel-Fantasy-Image/conflict.jsonl             -> DIR/surreal       (t2i)
    ROOT/Surrel-Fantasy-Image/images/*.tar.gz            (members NNNNN.jpg)
    ROOT/Instruction-Following-Image/*.jsonl             -> DIR/instruction   (t2i)
    ROOT/Instruction-Following-Image/images/*.tar.gz
    ROOT/Multi-Reference-Image/**/*.parquet              -> DIR/multiref      (multiref)

The multi-reference rows are read as Echo-4o's training code reads them (BAGEL-style parquet, echo4o.md §1.5);
how the released `Multi-Reference-Image/multi_refer_images_output/<category>/` folders store them is not
documented (§1.1), so a release without parquet files needs converting to such rows first (or leave the subset
out: `--subsets surreal,instruction`).

T2I rows: {"task_type": "t2i", "instruction", "output_image": ".../images/00000.jpg", "type", ...}; the
image is the tar member with the basename of `output_image` (archives are read in numeric order, streaming).
Rows with another `task_type` are counted as skipped. Multi-reference rows: `image_list` = encoded
[ref_1 .. ref_K, target], `instruction_list` = [[instruction]] (or alternatives); the category is the
parquet file's folder. Image bytes are stored as received.

Records: t2i = caption (CFG-droppable) -> noisy VAE target; multiref = per reference clean VAE + ViT
(CFG-droppable) -> instruction (CFG-droppable) -> noisy VAE target. Meta keeps `type` / `category`,
`prompt_original` when the row has a pre-rewrite prompt, the provenance (file, line / row, archive, member)
and the row's other fields.

Errors (unreadable JSON line, missing field or one of another type, an `output_image` naming another subset's
folder or `..`, corrupt, missing or 16-bit greyscale image, unreadable archive / parquet, a multi-reference row
with more than one instruction step, no record at all):
`--on-error=fail` (default) stops with a message naming the file and row / member; `skip` counts them in
each dataset's manifest (`skipped.by_reason`, first 100 examples). Every argument (`--subsets` names,
`--shard-bytes` and `--limit` >= 1) and every chosen subset's input folder is checked before anything is
written, as is every output folder (an existing dataset without `--overwrite`). Exit status 2 on failure,
with one line `import_echo4o: error: ...` naming the file and row / member, or the argument. `--overwrite` replaces existing datasets: each is written aside and swapped in
only when its import succeeds (a failed import leaves the old dataset as it was; the subsets imported
before it stay imported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tarfile
import zlib

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
    first_text,
    iter_parquet_rows,
    jsonable,
    require_records,
    scalar_extras,
    type_error,
)
from echo4o_jax.jsonl import jsonl_lines
from echo4o_jax.interrupts import exit_process, keep_ctrl_c
from echo4o_jax.data.records import RecordError, RecordWriter, check_writable, multiref_record, t2i_record

__all__ = ["import_t2i_subset", "import_multiref", "import_echo4o", "main", "ImportFailure"]

SURREAL_DIRS = ("Surrel-Fantasy-Image", "Surreal-Fantasy-Image")
INSTRUCTION_DIR = "Instruction-Following-Image"
MULTIREF_DIR = "Multi-Reference-Image"
_ORIGINAL_KEYS = ("prompt_original", "original_prompt", "instruction_original", "original_instruction",
                  "raw_instruction", "raw_prompt", "prompt_before_rewrite")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


def _archive_key(path: str):
    m = re.match(r"(\d+)", os.path.basename(path))
    return (int(m.group(1)) if m else float("inf"), os.path.basename(path))


class _ArchiveError(Exception):
    pass


def _iter_archive(path: str):
    """(member name, bytes) of the image files of a tar / tar.gz, streaming; read failures raise
    _ArchiveError naming the last member read."""
    last = None
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                last = printable(m.name)
                if not m.isfile():
                    continue
                yield last, tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _ArchiveError(f"{type(e).__name__}: {e}; last member {last!r}") from None


def _read_jsonl_rows(paths: list[str], root: str, on_error: OnError, writer: RecordWriter, subset_dirs=()):
    """basename -> (row, file, line); rows of another task_type are counted as skipped. An `output_image`
    whose folders name another subset (`subset_dirs`: this subset's folder names) or hold `..` is an error:
    the image is found by its file name alone, so such a row would be paired with this subset's image of
    that name."""
    others = {d for d in (*SURREAL_DIRS, INSTRUCTION_DIR, MULTIREF_DIR) if d not in subset_dirs}
    rows: dict[str, tuple[dict, str, int]] = {}
    for path in paths:
        rel = printable(os.path.relpath(path, root))
        with open(path, "rb") as f:
            for line_no, row, why in jsonl_lines(f):
                where = f"{rel}:{line_no}"
                if why:
                    on_error(where, "invalid JSON line", why)
                    continue
                task = row.get("task_type", "t2i")
                if not isinstance(task, str):
                    on_error(where, "task_type is not a string", type_error(task))
                    continue
                if task != "t2i":
                    writer.skip(f"task_type {task!r} not imported", where=where)
                    continue
                instr = row.get("instruction")
                out = row.get("output_image")
                if instr is None or out is None:
                    on_error(where, f"missing {'instruction' if instr is None else 'output_image'}")
                    continue
                if not isinstance(instr, str) or not instr.strip():
                    on_error(where, "instruction is not a non-empty string", type_error(instr))
                    continue
                if not isinstance(out, str) or not out.strip():
                    on_error(where, "output_image is not a non-empty string", type_error(out))
                    continue
                folders = out.replace("\\", "/").split("/")[:-1]
                if ".." in folders or others & set(folders):
                    on_error(where, "output_image outside this subset's images",
                             f"{out!r}: the image is found by its file name in this subset's archives")
                    continue
                key = os.path.basename(out)
                if key in rows:
                    on_error(where, "duplicate output_image", f"{key} also at {rows[key][1]}:{rows[key][2]}")
                    continue
                rows[key] = (row, rel, line_no)
    return rows


def import_t2i_subset(subset_dir: str, jsonl_paths: list[str], out_dir: str, *, subset: str,
                      on_error: str = "fail", image_check: str = "decode", shard_bytes: int = 256 << 20,
                      limit: int | None = None, overwrite: bool = False, root: str | None = None) -> dict:
    """One T2I subset (jsonl rows + images/*.tar.gz) -> a record dataset; returns its manifest."""
    root = root or os.path.dirname(subset_dir)
    archives = _archives(subset_dir)
    info = {"importer": "echo4o_jax.data.import_echo4o", "subset": subset,
            "jsonl": [printable(os.path.relpath(p, root)) for p in jsonl_paths],
            "archives": [printable(os.path.relpath(p, root)) for p in archives], "on_error": on_error,
            "image_check": image_check, "limit": limit}
    with RecordWriter(out_dir, shard_bytes=shard_bytes, name=subset, overwrite=overwrite, info=info) as w:
        err = OnError(on_error, w)
        rows = _read_jsonl_rows(jsonl_paths, root, err, w, subset_dirs=(os.path.basename(subset_dir),
                                                                  *(SURREAL_DIRS if subset == "surreal" else ())))
        done: set[str] = set()
        stems: dict[str, str] = {}  # record id stem -> the member that gave it
        for arc in archives:
            if limit is not None and w.num_records >= limit:
                break
            rel_arc = printable(os.path.relpath(arc, root))
            members = _iter_archive(arc)
            while True:
                if limit is not None and w.num_records >= limit:
                    break
                try:
                    name, data = next(members)
                except StopIteration:
                    break
                except _ArchiveError as e:
                    err(rel_arc, "unreadable archive", str(e))
                    break
                key = os.path.basename(name)
                where = f"{rel_arc}:{name}"
                if key not in rows:
                    if key.lower().endswith(_IMAGE_EXT):
                        w.skip("image without a jsonl row", where=where)
                    continue  # (other files of the archive)
                row, jf, line = rows[key]
                if not key.lower().endswith(_IMAGE_EXT):
                    err(f"{where} (row {jf}:{line})", "image file type not imported",
                        f"{os.path.splitext(key)[1] or 'no extension'}; expected {', '.join(_IMAGE_EXT)}")
                    done.add(key)
                    continue
                if key in done:
                    err(where, "duplicate image member")
                    continue
                done.add(key)
                stem = os.path.splitext(key)[0]
                if stem in stems:  # 00001.jpg and 00001.png: one record id (it stopped the import, naming neither)
                    err(f"{where} (row {jf}:{line})", "another image of the same name",
                        f"{stems[stem]} gives the same record id echo4o/{subset}/{stem}")
                    continue
                stems[stem] = f"{where} (row {jf}:{line})"
                try:
                    data = check_image(data, image_check)
                except RecordError as e:
                    err(f"{where} (row {jf}:{line})", "corrupt image", str(e))
                    continue
                err.write(f"{where} (row {jf}:{line})", lambda: _t2i_from_row(
                    row, data, subset=subset, key=key, prov={"jsonl": jf, "line": line, "archive": rel_arc,
                                                             "member": name}))
            members.close()
        if limit is None:
            for key in sorted(set(rows) - done):
                row, jf, line = rows[key]
                err(f"{jf}:{line}", "image not found in any archive", key)
        require_records(w, f"{subset} ({', '.join(info['jsonl'])})")
        return w.close()


def _archives(subset_dir: str) -> list[str]:
    """The image archives of a T2I subset, in numeric order; FileNotFoundError when there is none (before any
    subset is imported: every row would have failed as "image not found in any archive"), saying so when the
    folder holds loose images instead."""
    images = os.path.join(subset_dir, "images")
    names = os.listdir(images) if os.path.isdir(images) else []
    archives = sorted((os.path.join(images, f) for f in names if f.endswith((".tar.gz", ".tgz", ".tar"))),
                      key=_archive_key)
    if not archives:
        loose = [f for f in names if f.lower().endswith(_IMAGE_EXT)]
        raise FileNotFoundError(f"{images}: no image archives (*.tar.gz, *.tgz, *.tar)" + (
            f"; its {len(loose)} loose image file(s) are not read: the release ships the images as archives "
            f"(pack loose ones, e.g. tar -czf {os.path.join(images, '000.tar.gz')} -C {images} .)" if loose else ""))
    return archives


def _t2i_from_row(row: dict, data: bytes, *, subset: str, key: str, prov: dict):
    stem = os.path.splitext(key)[0]
    meta = {"type": jsonable(row.get("type")), "category": jsonable(row.get("category", row.get("type"))),
            "output_image": row.get("output_image"), **prov}
    for k in _ORIGINAL_KEYS:
        if isinstance(row.get(k), str):
            meta["prompt_original"] = row[k]
            break
    extra = {k: jsonable(v) for k, v in row.items()
             if k not in {"instruction", "output_image", "type", "category", "task_type", *_ORIGINAL_KEYS}}
    if extra:
        meta["extra"] = extra
    return t2i_record(f"echo4o/{subset}/{stem}", row["instruction"], data, source="echo4o", subset=subset,
                      meta=meta)


def import_multiref(mr_dir: str, out_dir: str, *, on_error: str = "fail", image_check: str = "decode",
                    shard_bytes: int = 256 << 20, limit: int | None = None, overwrite: bool = False,
                    root: str | None = None) -> dict:
    root = root or os.path.dirname(mr_dir)
    files = [f for f, _ in find_parquet([mr_dir])]
    info = {"importer": "echo4o_jax.data.import_echo4o", "subset": "multiref",
            "parquet": [printable(os.path.relpath(f, root)) for f in files], "on_error": on_error,
            "image_check": image_check, "limit": limit}
    with RecordWriter(out_dir, shard_bytes=shard_bytes, name="multiref", overwrite=overwrite, info=info) as w:
        err = OnError(on_error, w)
        for f in files:
            rel = printable(os.path.relpath(f, root))
            category = os.path.basename(os.path.dirname(f))
            stem = os.path.relpath(os.path.splitext(f)[0], mr_dir).replace(os.sep, "/")
            try:
                for i, row in iter_parquet_rows(f):
                    if limit is not None and w.num_records >= limit:
                        break
                    where = f"{rel} row {i}"
                    missing = [c for c in ("image_list", "instruction_list") if c not in row]
                    if missing:
                        err(where, f"missing columns {missing}", f"multi-reference rows read the columns "
                            f"['image_list', 'instruction_list']; the file has {sorted(row)}")
                        continue
                    imgs = row.get("image_list")
                    if not isinstance(imgs, list) or len(imgs) < 2:
                        err(where, "image_list needs >= 2 images (refs + target)")
                        continue
                    steps = row.get("instruction_list")
                    steps = steps.tolist() if hasattr(steps, "tolist") else steps
                    if isinstance(steps, list) and len(steps) > 1 and any(isinstance(x, list) for x in steps):
                        err(where, "instruction_list has more than one step", f"{len(steps)} steps; a "
                            "multi-reference sample has one instruction (alternatives: one list of strings)")
                        continue
                    instr = first_text(steps)
                    if instr is None:
                        err(where, "missing instruction_list" if steps is None else "no instruction text in "
                            "instruction_list", "" if steps is None else type_error(steps))
                        continue
                    try:
                        data = [check_image(b, image_check) for b in imgs]
                    except RecordError as e:
                        err(where, "corrupt image", str(e))
                        continue
                    meta = {"category": category, "parquet": rel, "row": i,
                            **({"extra": ex} if (ex := scalar_extras(row, {"image_list", "instruction_list"}))
                               else {})}
                    err.write(where, lambda: multiref_record(f"echo4o/multiref/{stem}/{i}", data[:-1], instr,
                                                             data[-1], source="echo4o", subset="multiref", meta=meta))
            except ParquetReadError as e:
                err(rel, "unreadable parquet", str(e))
            if limit is not None and w.num_records >= limit:
                break
        require_records(w, f"multiref ({len(files)} parquet files under {os.path.relpath(mr_dir, root)})")
        return w.close()


SUBSETS = ("surreal", "instruction", "multiref")


def _subset_inputs(root: str, subsets) -> list[tuple[str, str, list[str] | None]]:
    """(subset, its folder, its jsonl files (None for multiref)) of every chosen subset; an unknown or repeated
    subset is an ArgumentError, a missing folder / jsonl a FileNotFoundError (all before anything is written)."""
    subsets = list(subsets)
    if not subsets:
        raise ArgumentError("subsets", subsets, f"no subset chosen (from {', '.join(SUBSETS)})")
    for s in subsets:
        if s not in SUBSETS:
            raise ArgumentError("subsets", subsets, f"unknown subset {s!r} (expected {', '.join(SUBSETS)})")
        if subsets.count(s) > 1:
            raise ArgumentError("subsets", subsets, f"subset {s!r} is given twice")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder (the downloaded Echo-4o-Image)")
    out = []
    for s in subsets:
        if s == "surreal":
            d = next((os.path.join(root, n) for n in SURREAL_DIRS if os.path.isdir(os.path.join(root, n))), None)
            if d is None:
                raise FileNotFoundError(f"{root}: no {SURREAL_DIRS[0]}/")
            jl = os.path.join(d, "conflict.jsonl")
            if not os.path.exists(jl):
                raise FileNotFoundError(f"{jl} not found")
            _archives(d)
            out.append((s, d, [jl]))
        elif s == "instruction":
            d = os.path.join(root, INSTRUCTION_DIR)
            jls = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jsonl")) if os.path.isdir(d) else []
            if not jls:
                raise FileNotFoundError(f"{d}: no *.jsonl")
            _archives(d)
            out.append((s, d, jls))
        else:
            d = os.path.join(root, MULTIREF_DIR)
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{d} not found")
            if not find_parquet([d]):  # (found after the other subsets' hours of import, leaving an empty dataset)
                raise FileNotFoundError(f"{d}: no *.parquet (multi-reference rows are read as Echo-4o's training "
                                        "code reads them: parquet with image_list / instruction_list; convert the "
                                        "folder to such rows, or leave it out with --subsets surreal,instruction)")
            out.append((s, d, None))
    return out


def import_echo4o(root: str, out: str, *, subsets=SUBSETS, on_error: str = "fail", image_check: str = "decode",
                  shard_bytes: int = 256 << 20, limit: int | None = None, overwrite: bool = False) -> dict:
    """Imports the chosen subsets into `out/<subset>`; returns {subset: manifest}. Every argument, every subset's
    input folder and output folder is checked before anything is written: an unknown subset or a bad value
    raises ArgumentError, a missing subset folder FileNotFoundError, an existing dataset without `overwrite`
    DatasetExistsError."""
    check_writer_args(shard_bytes=shard_bytes, limit=limit, on_error=on_error, image_check=image_check)
    kw = dict(on_error=on_error, image_check=image_check, shard_bytes=shard_bytes, limit=limit, overwrite=overwrite,
              root=root)
    plan = _subset_inputs(root, subsets)
    for s, _, _ in plan:  # an existing dataset without --overwrite: refused before any subset is imported
        check_writable(os.path.join(out, s), overwrite=overwrite)
    res = {}
    for s, d, jsonl in plan:
        if jsonl is None:
            res[s] = import_multiref(d, os.path.join(out, s), **kw)
        else:
            res[s] = import_t2i_subset(d, jsonl, os.path.join(out, s), subset=s, **kw)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.data.import_echo4o",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the downloaded Echo-4o-Image folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--subsets", default=",".join(SUBSETS))
    ap.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    ap.add_argument("--image-check", choices=("decode", "header"), default="decode")
    ap.add_argument("--shard-bytes", type=int, default=256 << 20)
    ap.add_argument("--limit", type=int, default=None, help="records per subset (for trials)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing datasets (swapped in only when a subset's import succeeds)")
    a = ap.parse_args(argv)
    keep_ctrl_c()
    try:
        res = import_echo4o(a.root, a.out, subsets=[s for s in a.subsets.split(",") if s], on_error=a.on_error,
                            image_check=a.image_check, shard_bytes=a.shard_bytes, limit=a.limit,
                            overwrite=a.overwrite)
    except (ImportFailure, ArgumentError, RecordError, OSError) as e:
        return cli_error("import_echo4o", e)
    except KeyboardInterrupt:
        return cli_interrupted("import_echo4o", "subsets imported before it are complete; " + WRITER_INTERRUPTED)
    for s, m in res.items():
        print(json.dumps({"subset": s, "records": m["records"], "shards": len(m["shards"]), "bytes": m["bytes"],
                          "skipped": m["skipped"]["count"], "skipped_by_reason": m["skipped"]["by_reason"]}))
    return 0


if __name__ == "__main__":
    exit_process(main())
