"""Record format, writer (shards, manifest, crash safety, append), reader and the inspect CLI."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image

from echo4o_jax.data import inspect as inspect_cli
from echo4o_jax.data.records import (
    FORMAT_VERSION,
    MAGIC,
    DatasetExistsError,
    ImageInfo,
    Record,
    RecordError,
    RecordReader,
    RecordWriter,
    ShardSource,
    decode_header,
    decode_record,
    edit_record,
    encode_record,
    load_manifest,
    multiref_record,
    t2i_record,
    text_item,
    understanding_record,
    vit_item,
    whole_shards,
)


def _img(w, h, seed, fmt="PNG", mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a).convert(mode)
    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


def _records():
    jpg = _img(40, 24, 1, "JPEG")
    return [
        t2i_record("t2i/0", "a photo of a red circle", jpg, source="echo4o", subset="surreal",
                   meta={"type": "T1", "prompt_original": "a red ball", "nested": {"a": [1, 2.5, None]}}),
        t2i_record("t2i/1", ["first caption", "second caption é ☃"], _img(17, 33, 2), source="bagel_parquet",
                   subset="t2i"),
        multiref_record("mr/0", [_img(20, 20, 3), _img(30, 10, 4, "WEBP")], "put image 1 left of image 2",
                        _img(32, 32, 5), source="echo4o", subset="multiref", meta={"category": "obj_obj"}),
        edit_record("ed/0", [_img(16, 16, 6), _img(16, 16, 7), _img(16, 16, 8, mode="RGBA")],
                    [["make it red", "redden it"], "add a hat"], source="bagel_parquet", subset="edit"),
        understanding_record("und/0", _img(28, 28, 9, "GIF", mode="P"), "what is it?", "a cat",
                             source="demo", subset="vqa"),
        Record(id="custom/0", task="understanding", source="x", subset="y",
               plan=[vit_item(0), text_item(loss=1, special_token_loss=1, special_token_label=7)],
               texts=["answer"], images=[_img(14, 14, 10)], meta={}),
    ]


def _same(a: Record, b: Record):
    for f in ("id", "task", "plan", "texts", "images", "source", "subset", "meta", "format_version"):
        assert getattr(a, f) == getattr(b, f), f


def test_roundtrip_every_field(tmp_path):
    recs = _records()
    with RecordWriter(tmp_path / "ds", shard_bytes=3000, name="mix") as w:
        for r in recs:
            w.write(r)
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] and m["records"] == len(recs) and m["format_version"] == FORMAT_VERSION
    assert len(m["shards"]) > 1  # size-bounded
    assert m["counts"]["task"] == {"edit": 1, "multiref": 1, "t2i": 2, "understanding": 2}
    assert m["images"] == sum(len(r.images) for r in recs)
    assert m["image_bytes"] == sum(len(b) for r in recs for b in r.images)
    reader = RecordReader(tmp_path / "ds", verify=True)
    assert len(reader) == len(recs)
    for r, back in zip(recs, reader):
        _same(r, back)
        assert back.image_info == r.image_info
        for b, info in zip(back.images, back.image_info):
            with Image.open(io.BytesIO(b)) as im:
                assert (info.width, info.height) == im.size and info.format == im.format.lower()
    assert reader[2].image_info[1] == ImageInfo("webp", 30, 10)
    # official plans: no image references
    assert all("image" not in it for it in reader[2].official_plan())
    h = reader.header(3)
    assert h["id"] == "ed/0" and h["texts"][0] == ["make it red", "redden it"]
    # a bound that each shard respects unless it holds a single record
    for s in m["shards"]:
        assert s["records"] >= 1


def test_plans_follow_official_datasets():
    p = [(it["type"], it["loss"], it["enable_cfg"], it.get("image")) for it in _records()[2].plan]
    assert p == [("vae_image", 0, 1, 0), ("vit_image", 0, 1, 0), ("vae_image", 0, 1, 1), ("vit_image", 0, 1, 1),
                 ("text", 0, 1, None), ("vae_image", 1, 0, 2)]
    p = [(it["type"], it["loss"], it["enable_cfg"], it.get("image")) for it in _records()[3].plan]
    assert p == [("vae_image", 0, 1, 0), ("vit_image", 0, 1, 0), ("text", 0, 1, None), ("vae_image", 1, 0, 1),
                 ("vae_image", 0, 1, 1), ("vit_image", 0, 1, 1), ("text", 0, 1, None), ("vae_image", 1, 0, 2)]
    p = [(it["type"], it["loss"], it["enable_cfg"]) for it in _records()[4].plan]
    assert p == [("vit_image", 0, 0), ("text", 0, 0), ("text", 1, 0)]
    p = [(it["type"], it["loss"], it["enable_cfg"]) for it in _records()[0].plan]
    assert p == [("text", 0, 1), ("vae_image", 1, 0)]


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: setattr(r, "task", "video"), "task="),
    (lambda r: setattr(r, "texts", []), "text items"),
    (lambda r: r.plan[1].__setitem__("image", 3), "not an index"),
    (lambda r: r.plan.append(text_item()) or r.texts.append(5), "texts\\[1\\]"),
    (lambda r: r.plan.__setitem__(1, vit_item(0) | {"loss": 1}), "cannot carry a loss"),
    (lambda r: r.plan[0].__setitem__("split_start", False), "unknown keys"),
    (lambda r: r.plan[0].__setitem__("loss", True), "must be 0 or 1"),
    (lambda r: r.images.append(b"x"), "not referenced"),
    (lambda r: setattr(r, "id", ""), "id must be"),
    (lambda r: r.plan[0].__setitem__("special_token_loss", 1), "special_token_label"),
    (lambda r: setattr(r, "meta", {"x": object()}), "JSON"),
])
def test_invalid_records_rejected(mutate, msg):
    r = t2i_record("a", "caption", _img(8, 8, 0))
    mutate(r)
    with pytest.raises(RecordError, match=msg):
        encode_record(r)


def test_decode_rejects_bad_bytes():
    buf = encode_record(t2i_record("a", "caption", _img(8, 8, 0)))
    assert decode_record(buf).id == "a"
    with pytest.raises(RecordError, match="magic"):
        decode_record(b"XXXX" + buf[4:])
    with pytest.raises(RecordError, match="format_version 9"):
        decode_record(MAGIC + struct.pack("<H", 9) + buf[6:])
    with pytest.raises(RecordError, match="truncated"):
        decode_record(buf[:-5])
    with pytest.raises(RecordError, match="trailing"):
        decode_record(buf + b"\0")
    with pytest.raises(RecordError, match="too short"):
        decode_header(b"E4")
    with pytest.raises(RecordError, match="cannot read image"):
        encode_record(t2i_record("a", "caption", b"not an image"))
    # header-only probing accepts a truncated PNG; decode probing does not
    trunc = _img(32, 32, 1)[:-40]
    encode_record(t2i_record("a", "c", trunc))
    with pytest.raises(RecordError, match="cannot read image"):
        encode_record(t2i_record("a", "c", trunc), check_images="decode")


def test_writer_crash_leaves_finished_shards_and_append(tmp_path):
    d = tmp_path / "ds"
    w = RecordWriter(d, shard_bytes=2500, name="syn")
    for i in range(6):
        w.write(t2i_record(f"s{i}", f"caption {i}", _img(24, 24, i)))
    with pytest.raises(RecordError, match="duplicate"):
        w.write(t2i_record("s0", "again", _img(8, 8, 0)))
    # "crash": never closed; the open shard is a .tmp file, the finished ones are listed
    m = load_manifest(d)
    assert not m["complete"] and m["records"] >= 1
    assert any(f.endswith(".tmp") for f in os.listdir(d))
    r = RecordReader(d, verify=True)
    assert len(r) == m["records"] and [x.id for x in r] == [f"s{i}" for i in range(len(r))]
    done = len(r)
    # a new writer continues the dataset
    w2 = RecordWriter(d, shard_bytes=2500, name="syn", append=True)
    assert w2.ids == {f"s{i}" for i in range(done)}
    with pytest.raises(RecordError, match="duplicate"):
        w2.write(t2i_record("s0", "again", _img(8, 8, 0)))
    for i in range(done, 8):
        w2.write(t2i_record(f"s{i}", f"caption {i}", _img(24, 24, i)))
    m2 = w2.close()
    assert m2["complete"] and m2["records"] == 8 and m2["counts"]["task"] == {"t2i": 8}
    assert not any(f.endswith(".tmp") for f in os.listdir(d))
    assert [x.id for x in RecordReader(d, verify=True)] == [f"s{i}" for i in range(8)]
    with pytest.raises(RecordError, match="already holds a dataset"):
        RecordWriter(d)


_FULL_DISK_SCRIPT = """
import io, json, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
import numpy as np
from PIL import Image
from echo4o_jax.data.records import RecordWriteError, RecordWriter, t2i_record


def png(side, seed):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


w = RecordWriter(sys.argv[1], shard_bytes=20000, name="d")
res = {}
try:
    for i, side in enumerate([32, 32, 32, 160, 32]):  # shard 0: three small images; shard 1: one too large
        w.write(t2i_record(f"r{i}", "c", png(side, i)))
    w.close()
except RecordWriteError as e:
    res["error"] = str(e)
    try:
        w.write(t2i_record("late", "c", png(8, 0)))
    except RecordWriteError as e2:
        res["later_write"] = str(e2)
    w.close(error=f"import failed: {e}")
print(json.dumps(res))
"""


def test_a_full_disk_keeps_the_finished_shards_and_names_the_failed_one(tmp_path):
    """A shard write that fails (here: the file size limit, as a full disk or a quota would) is a
    RecordWriteError (an OSError) naming the shard, not array_record's bare RuntimeError; the finished shards
    stay listed in a manifest marked incomplete (before, close() failed the same way and wrote no manifest),
    no .tmp file is left, and the writer takes no more records."""
    import subprocess
    import sys

    # bytes per file: the first shard fits (128 KiB: ArrayRecord writes 64 KiB blocks), the next one, with a
    # 160x160 noise PNG (~77 kB), does not (192 KiB)
    limit = 150_000
    p = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path / "ds"), str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    shard = str(tmp_path / "ds" / "d-00001.array_record")
    assert res["error"].startswith(f"cannot write the shard {shard} (") and "File too large" in res["error"]
    assert res["error"].endswith("its 1 records are not in the dataset")
    assert res["later_write"] == f"the writer of {tmp_path / 'ds'} failed earlier: {res['error']}"
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and m["error"] == f"import failed: {res['error']}"
    assert [s["file"] for s in m["shards"]] == ["d-00000.array_record"] and m["records"] == 3
    assert [r.id for r in RecordReader(tmp_path / "ds", verify=True)] == ["r0", "r1", "r2"]
    assert sorted(os.listdir(tmp_path / "ds")) == ["d-00000.array_record", "manifest.json"]


def _flip_byte(path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def test_writer_exception_and_skips_and_verify(tmp_path):
    d = tmp_path / "ds"
    with pytest.raises(ZeroDivisionError):
        with RecordWriter(d, name="x", info={"tool": "test"}) as w:
            w.write(t2i_record("a", "c", _img(8, 8, 0)))
            w.skip("corrupt image", where="file.tar:00001.jpg")
            w.skip("corrupt image", where="file.tar:00002.jpg")
            1 / 0
    m = load_manifest(d)
    assert not m["complete"] and "ZeroDivisionError" in m["error"] and m["records"] == 1
    assert m["skipped"]["count"] == 2 and m["skipped"]["by_reason"] == {"corrupt image": 2}
    assert m["skipped"]["examples"][0]["where"] == "file.tar:00001.jpg" and m["info"] == {"tool": "test"}
    _flip_byte(d / m["shards"][0]["file"])
    with pytest.raises(RecordError, match="sha256"):
        RecordReader(d, verify=True)


def test_reader_paths(tmp_path):
    for name in ("a", "b"):
        with RecordWriter(tmp_path / name, name=name) as w:
            for i in range(3):
                w.write(t2i_record(f"{name}{i}", "c", _img(8, 8, i)))
    assert len(RecordReader([tmp_path / "a", tmp_path / "b"])) == 6
    assert len(RecordReader(str(tmp_path / "*"))) == 6
    assert len(RecordReader(tmp_path / "a" / "manifest.json")) == 3
    assert len(RecordReader(tmp_path / "a" / "a-00000.array_record")) == 3
    with pytest.raises(RecordError):
        RecordReader(tmp_path / "nope")


def test_inspect_cli(tmp_path, capsys):
    with RecordWriter(tmp_path / "ds", name="x") as w:
        for r in _records():
            w.write(r)
    out_png = tmp_path / "sheets" / "sheet.png"  # (its folder is created)
    assert inspect_cli.main([str(tmp_path / "ds"), "-n", "4", "--contact-sheet", str(out_png), "--verify"]) == 0
    out = capsys.readouterr().out
    assert '"records": 6' in out and "id=mr/0 task=multiref" in out and "vit_image" in out
    assert "contact sheet" in out
    with Image.open(out_png) as im:
        assert im.size[0] > 128 and im.size[1] >= 4 * 128
    s = json.loads(out[out.index("\n{") + 1:out.index("\nid=")])
    assert s["counts"]["task"]["t2i"] == 2 and s["images"] == 10 and s["counts_from"] == "manifest"
    assert inspect_cli.main([str(tmp_path / "ds"), "-n", "0", "--scan"]) == 0
    s2 = json.loads(capsys.readouterr().out)
    assert s2["counts_from"] == "scan" and s2["counts"] == s["counts"] and s2["images"] == 10


def test_inspect_contact_sheet_is_never_left_cut_short(tmp_path, capsys, monkeypatch):
    """A contact sheet is written whole then renamed: a Ctrl-C (or a failed write) in the middle of the PNG
    write leaves neither a cut-short sheet nor the temporary file; the CLI says so in one line (130)."""
    with RecordWriter(tmp_path / "ds", name="x") as w:
        for r in _records():
            w.write(r)
    sheet = tmp_path / "sheet.png"

    def save_half_then_ctrl_c(self, fp, *a, **k):
        if hasattr(fp, "write"):  # (an open file, or a path)
            fp.write(b"\x89PNG half")
        else:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_ctrl_c)
    assert inspect_cli.main([str(tmp_path / "ds"), "-n", "2", "--contact-sheet", str(sheet)]) == 130
    assert capsys.readouterr().err == "inspect: interrupted (Ctrl-C): nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---------------------------------------------------------------------------------------------- bad input


def _dataset(d, n=8, name="surreal"):
    """A dataset of `n` t2i records (~2.2 kB each) in shards of 2 records; returns its manifest."""
    with RecordWriter(d, shard_bytes=5000, name=name) as w:
        for i in range(n):
            w.write(t2i_record(f"{name}/{i}", f"caption {i}", _img(24, 24, i)))
    m = load_manifest(d)
    assert [s["records"] for s in m["shards"]] == [2] * (n // 2)
    return m


def _cli_error(capsys, argv) -> str:
    """Runs the inspect CLI expecting a one-line error; returns it."""
    assert inspect_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("inspect: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_truncated_shard_named_with_and_without_verify(tmp_path, capsys):
    d = tmp_path / "ds"
    m = _dataset(d)
    shard = str(d / m["shards"][0]["file"])
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(RecordError, match=re.escape(shard) + ": not a readable ArrayRecord shard"):
        RecordReader(d)
    # verify checks the manifest's size / sha256 before opening anything
    with pytest.raises(RecordError, match=re.escape(shard) + r": size \d+ != manifest"):
        RecordReader(d, verify=True)
    assert shard in _cli_error(capsys, [str(d), "-n", "5"])
    assert re.search(re.escape(shard) + r": size \d+ != manifest", _cli_error(capsys, [str(d), "-n", "5", "--verify"]))


def test_corrupt_record_named_by_shard_and_index(tmp_path, capsys):
    d = tmp_path / "ds"
    m = _dataset(d)
    shard = str(d / m["shards"][1]["file"])
    first = m["shards"][0]["records"]
    data = bytearray(open(shard, "rb").read())
    img = _img(24, 24, first + 1)  # record 1 of the second shard (stored uncompressed)
    at = data.find(img)
    assert at > 0
    data[at + len(img) // 2] ^= 0xFF  # same size, flipped byte
    open(shard, "wb").write(bytes(data))
    r = RecordReader(d)  # opening reads no record data
    assert r[first].id == f"surreal/{first}"  # the other records of that shard stay readable
    msg = re.escape(shard) + r": record 1: cannot read \(RuntimeError: .*hash mismatch"
    for read in (r.__getitem__, r.header, r.raw):
        with pytest.raises(RecordError, match=msg):
            read(first + 1)
    with pytest.raises(RecordError, match=re.escape(shard) + ": sha256 mismatch"):
        RecordReader(d, verify=True)
    assert re.search(msg, _cli_error(capsys, [str(d), "--start", str(first), "-n", "2"]))
    assert "sha256 mismatch" in _cli_error(capsys, [str(d), "--verify"])


def test_shard_source_names_shard_index_and_dataset_after_pickling(tmp_path):
    """The data pipeline's source (in Grain worker processes: pickled) reads lazily and names an unreadable
    record's shard file, its index in the shard and the dataset."""
    import pickle

    d = tmp_path / "ds"
    m = _dataset(d, n=6)
    shards = [str(d / s["file"]) for s in m["shards"]]
    data = bytearray(open(shards[2], "rb").read())
    img = _img(24, 24, 4)  # record 0 of the third shard (stored uncompressed)
    at = data.find(img)
    assert at > 0
    data[at + 100:at + 120] = bytes(b ^ 0xFF for b in data[at + 100:at + 120])  # 20 bytes flipped
    open(shards[2], "wb").write(bytes(data))
    src = pickle.loads(pickle.dumps(ShardSource(shards, [2, 2, 2], name="surreal")))
    assert len(src) == 6 and decode_record(src[5]).id == "surreal/5"  # the other record of that shard
    with pytest.raises(RecordError, match=re.escape(shards[2]) + r": record 0: cannot read \(RuntimeError: "
                                          r".*hash mismatch.*\) \(dataset surreal\)$"):
        src[4]
    src.close()


def test_undecodable_record_named_by_shard_and_index(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    shard = str(tmp_path / "x-00000.array_record")
    w = ArrayRecordWriter(shard, "group_size:1,uncompressed")
    w.write(encode_record(t2i_record("ok", "c", _img(8, 8, 0))))
    w.write(b"XXXX not a record")
    w.close()
    r = RecordReader(shard)
    assert r[0].id == "ok"
    with pytest.raises(RecordError, match=re.escape(shard) + ": record 1: not an echo4o record"):
        r[1]
    with pytest.raises(RecordError, match=re.escape(shard) + ": record 1: not an echo4o record"):
        r.header(-1)
    with pytest.raises(IndexError):
        r[2]


def count_calls(monkeypatch, module, name: str) -> collections.Counter:
    """Counts the calls of `module.name` by their first argument as a str (a path, a dataset label)."""
    calls = collections.Counter()
    real = getattr(module, name)

    def counting(first, *args, **kw):
        calls[str(first)] += 1
        return real(first, *args, **kw)

    monkeypatch.setattr(module, name, counting)
    return calls


def count_shard_opens(monkeypatch) -> collections.Counter:
    """Counts `ArrayRecordReader` constructions per shard file (ours, array_record's and grain's sources)."""
    from array_record.python import array_record_module

    return count_calls(monkeypatch, array_record_module, "ArrayRecordReader")


def test_reader_opens_each_shard_once(tmp_path, monkeypatch):
    """A reader opens every shard once when made (record counts): its source is given them
    (`whole_shards`) and opens a shard again only to read it."""
    d = tmp_path / "ds"
    m = _dataset(d)
    shards = [str(d / s["file"]) for s in m["shards"]]
    opened = count_shard_opens(monkeypatch)
    given = whole_shards(shards, [s["records"] for s in m["shards"]])
    assert not opened and whole_shards(shards) == given and opened == collections.Counter(shards)
    opened.clear()
    r = RecordReader(d, verify=True)
    assert opened == collections.Counter(shards) and len(r) == 8
    assert r[3].id == "surreal/3" and opened[shards[1]] == 2 and opened[shards[0]] == 1  # opened to read


def test_inspect_cli_bad_manifest_and_missing_shard(tmp_path, capsys):
    d = tmp_path / "ds"
    m = _dataset(d)
    mpath = d / "manifest.json"
    # a manifest without counts (optional): counted by reading the records
    mpath.write_text(json.dumps({k: v for k, v in m.items() if k != "counts"}))
    assert inspect_cli.main([str(d), "-n", "0"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["counts_from"] == "scan" and s["counts"]["task"] == {"t2i": 8} and s["images"] == 8
    # a shard entry without its sha256
    bad = json.loads(json.dumps(m))
    del bad["shards"][1]["sha256"]
    mpath.write_text(json.dumps(bad))
    assert re.search(re.escape(str(mpath)) + r": shards\[1\] lacks \['sha256'\]", _cli_error(capsys, [str(d)]))
    mpath.write_text("{not json")
    assert re.search(re.escape(str(mpath)) + ": invalid JSON", _cli_error(capsys, [str(d)]))
    mpath.write_text(json.dumps(m))
    os.remove(d / m["shards"][2]["file"])
    assert "missing shards" in (err := _cli_error(capsys, [str(d)])) and m["shards"][2]["file"] in err
    # the folder above datasets (an import's --out) is named as such; an empty folder says what it lacks
    _dataset(tmp_path / "b", name="b")
    assert _cli_error(capsys, [str(tmp_path)]) == (f"inspect: error: {tmp_path}: no shards; it holds the datasets b, "
                                                   "ds: give one of them (or several)\n")
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, [str(tmp_path / "empty")])
    assert err.endswith("no shards (no manifest.json, no *.array_record file)\n"), err


def test_inspect_warns_about_an_incomplete_dataset(tmp_path, capsys):
    """A dataset whose writer failed (its manifest: "complete": false and the error) or was killed (no error
    recorded) is shown with a warning line naming the manifest; a complete one without."""
    d = tmp_path / "ds"
    with pytest.raises(ZeroDivisionError):
        with RecordWriter(d, name="x") as w:
            w.write(t2i_record("a", "c", _img(8, 8, 0)))
            1 / 0
    assert inspect_cli.main([str(d), "-n", "1", "--verify"]) == 0
    out, err = capsys.readouterr()
    assert err == (f"inspect: warning: {d / 'manifest.json'} says the dataset is incomplete (error: ZeroDivisionError: "
                   "division by zero); it holds 1 records in 1 shards\n")
    assert '"complete": false' in out and "id=a task=t2i" in out
    w = RecordWriter(tmp_path / "killed", shard_bytes=1000, name="k")  # never closed: killed after 2 shards
    for i in range(3):
        w.write(t2i_record(f"k{i}", "c", _img(16, 16, i)))
    assert inspect_cli.main([str(tmp_path / "killed"), "-n", "0"]) == 0
    assert capsys.readouterr().err == (f"inspect: warning: {tmp_path / 'killed' / 'manifest.json'} says the dataset "
                                       "is incomplete (no error recorded: its writer was interrupted); it holds 2 "
                                       "records in 2 shards\n")
    _dataset(tmp_path / "ok")
    assert inspect_cli.main([str(tmp_path / "ok"), "-n", "0"]) == 0
    assert capsys.readouterr().err == ""
    # a writer that failed before its first record (a synthesis whose every call failed): no shards, and why
    with pytest.raises(ZeroDivisionError):
        with RecordWriter(tmp_path / "empty", name="e"):
            1 / 0
    assert inspect_cli.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"no shards (its manifest lists none; {tmp_path / 'empty' / 'manifest.json'} says the dataset is incomplete "
        "(error: ZeroDivisionError: division by zero); it holds 0 records in 0 shards)")


def test_inspect_start_and_count_out_of_range(tmp_path, capsys):
    d = tmp_path / "ds"
    _dataset(d, n=4)
    for start in (4, 10, -1):
        assert _cli_error(capsys, [str(d), "--start", str(start)]) == (
            f"inspect: error: --start={start}: {d} holds 4 records (indices 0 .. 3)\n")
    assert _cli_error(capsys, [str(d), "-n", "-2"]) == (
        "inspect: error: -n=-2: the number of samples to show must be >= 0\n")
    assert inspect_cli.main([str(d), "--start", "3", "-n", "5"]) == 0  # from the last record: shows it
    assert capsys.readouterr().out.count("id=surreal/") == 1


def test_overwrite_keeps_the_old_dataset_until_success(tmp_path):
    d = tmp_path / "ds"
    _dataset(d, n=4, name="old")
    old = [f"old/{i}" for i in range(4)]
    (d / "journal").mkdir()  # other files of the folder (e.g. a synthesis journal) are never touched
    (d / "journal" / "journal.jsonl").write_text("kept\n")
    before = os.listdir(d)
    with pytest.raises(DatasetExistsError, match="overwrite=True") as ei:
        RecordWriter(d)
    assert ei.value.path == str(d)

    def new(w, n=5):
        for i in range(n):
            w.write(t2i_record(f"new/{i}", "c", _img(24, 24, 50 + i)))

    with pytest.raises(ZeroDivisionError):
        with RecordWriter(d, name="new", shard_bytes=5000, overwrite=True) as w:
            new(w)
            assert [x.id for x in RecordReader(d, verify=True)] == old  # untouched while writing
            1 / 0
    assert [x.id for x in RecordReader(d, verify=True)] == old and load_manifest(d)["complete"]
    assert sorted(os.listdir(d)) == sorted(before)  # the failed new dataset is dropped
    # a crashed overwrite (never closed) leaves the old dataset too; the next overwrite starts afresh
    w = RecordWriter(d, name="new", shard_bytes=5000, overwrite=True)
    new(w)
    assert [x.id for x in RecordReader(d, verify=True)] == old
    w2 = RecordWriter(d, name="new", shard_bytes=5000, overwrite=True)
    new(w2)
    m = w2.close()
    assert m["complete"] and m["records"] == 5 and m["counts"]["task"] == {"t2i": 5}
    assert [x.id for x in RecordReader(d, verify=True)] == [f"new/{i}" for i in range(5)]
    assert sorted(p for p in os.listdir(d) if p.endswith(".array_record")) == [s["file"] for s in m["shards"]]
    assert all(p.startswith("new-") for p in os.listdir(d) if p.endswith(".array_record"))
    assert (d / "journal" / "journal.jsonl").read_text() == "kept\n"
    assert not [p for p in os.listdir(d) if p.startswith(".")] and w2.close() == load_manifest(d)
    # keep_partial (a resumable writer, e.g. a synthesis rebuild): the incomplete new dataset replaces the old
    w3 = RecordWriter(d, name="part", shard_bytes=5000, overwrite=True)
    w3.write(t2i_record("part/0", "c", _img(24, 24, 7)))
    m = w3.close(error="2 samples failed", keep_partial=True)
    assert not m["complete"] and load_manifest(d)["error"] == "2 samples failed"
    assert [x.id for x in RecordReader(d, verify=True)] == ["part/0"]
    # an interrupted swap leaves the previous dataset in a backup folder: no writer starts over it
    (d / ".overwrite-old").mkdir()
    with pytest.raises(RecordError, match=r"/\.overwrite-old exists: an overwrite of .* was interrupted"):
        RecordWriter(d, overwrite=True)


def test_verify_of_a_glob_or_shard_files_checks_them(tmp_path):
    """`inspect --verify` / RecordReader(verify=True) given a glob or shard files found no manifest: it checked
    nothing and passed (shards_checked 0), and a shard an interrupted writer left unlisted was read as data."""
    import shutil

    d = tmp_path / "ds"
    with RecordWriter(d, name="x", shard_bytes=1) as w:  # one record per shard
        for i in range(3):
            w.write(t2i_record(f"r{i}", "c", _img(8, 8, i)))
    assert RecordReader(str(d / "*.array_record"), verify=True).verification == {"shards_checked": 3, "records": 3}
    one = sorted(d.glob("*.array_record"))[1]
    assert RecordReader([str(one)], verify=True).verification == {"shards_checked": 1, "records": 1}
    s = inspect_cli.summarize(RecordReader([str(one)]))  # (counted from its records, not the whole manifest's)
    assert s["counts_from"] == "scan" and s["records"] == 1 and s["counts"]["task"] == {"t2i": 1}
    shutil.copy(one, d / "x-00009.array_record")  # unlisted
    with pytest.raises(RecordError, match=r"x-00009.array_record: not listed by .*manifest.json \(1 such shard"):
        RecordReader(str(d / "*.array_record"), verify=True)
    _flip_byte(one)
    with pytest.raises(RecordError, match="sha256"):
        RecordReader([str(one)], verify=True)
