"""Importers on small replicas of the released layouts (with corrupt members) and the offline demo data."""

from __future__ import annotations

import io
import re
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from echo4o_jax.data import demo as demo_mod
from echo4o_jax.data import import_bagel_parquet as ibp
from echo4o_jax.data import import_echo4o as ie
from echo4o_jax.data.records import RecordReader, load_manifest


def _jpeg(seed, w=24, h=16):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="JPEG", quality=90)
    return b.getvalue()


def _tar_gz(path, members: dict[str, bytes], truncate: int = 0):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - truncate)


def _row(i, subset_dir, **kw):
    r = {"task_type": "t2i", "instruction": f"prompt {i}", "output_image": f"/Echo-4o-Image/{subset_dir}/images/{i:05d}.jpg",
         "type": f"T{i % 5 + 1}"}
    r.update(kw)
    return r


def _write_jsonl(path, rows, bad_lines=()):
    with open(path, "w") as f:
        for k, r in enumerate(rows):
            f.write(("{not json" if k in bad_lines else json.dumps(r)) + "\n")


def _multiref_parquet(path, rows):
    pq.write_table(pa.table({"image_list": [r[0] for r in rows], "instruction_list": [r[1] for r in rows],
                             "source": [f"src{i}" for i in range(len(rows))]}), path)


@pytest.fixture
def echo_root(tmp_path):
    """A replica of Echo-4o-Image: clean apart from what a test adds."""
    root = tmp_path / "Echo-4o-Image"
    sur = root / "Surrel-Fantasy-Image"
    (sur / "images").mkdir(parents=True)
    imgs = {i: _jpeg(i) for i in range(5)}
    _write_jsonl(sur / "conflict.jsonl", [_row(i, "Surrel-Fantasy-Image") for i in range(5)])
    _tar_gz(sur / "images" / "0-3.tar.gz", {f"{i:05d}.jpg": imgs[i] for i in range(3)})
    _tar_gz(sur / "images" / "3-5.tar.gz", {f"images/{i:05d}.jpg": imgs[i] for i in range(3, 5)})
    ins = root / "Instruction-Following-Image"
    (ins / "images").mkdir(parents=True)
    _write_jsonl(ins / "Instruction-Following-Image.jsonl",
                 [_row(i, "Instruction-Following-Image", type="easy", original_prompt=f"four watches {i}")
                  for i in range(3)] + [{"task_type": "edit", "instruction": "x", "output_image": "y.jpg"}])
    _tar_gz(ins / "images" / "0-5000.tar.gz", {f"{i:05d}.jpg": _jpeg(100 + i) for i in range(3)})
    mr = root / "Multi-Reference-Image" / "multi_refer_images_output" / "hum_sce"
    mr.mkdir(parents=True)
    _multiref_parquet(mr / "part-0.parquet", [
        ([_jpeg(200), _jpeg(201), _jpeg(202)], [["put the man from image 1 in the scene of image 2"]]),
        ([_jpeg(203), _jpeg(204), _jpeg(205), _jpeg(206)], [["three refs"]]),
    ])
    return root, imgs


def test_echo4o_import_clean(echo_root, tmp_path):
    root, imgs = echo_root
    out = tmp_path / "out"
    assert ie.main(["--root", str(root), "--out", str(out)]) == 0
    r = RecordReader(out / "surreal", verify=True)
    assert [x.id for x in r] == [f"echo4o/surreal/{i:05d}" for i in range(5)]
    for i, x in enumerate(r):
        assert x.task == "t2i" and x.texts == [f"prompt {i}"] and x.images == [imgs[i]]  # bytes as received
        assert x.meta["type"] == f"T{i % 5 + 1}" and x.meta["jsonl"].endswith("conflict.jsonl")
        assert x.meta["line"] == i + 1 and x.meta["member"].endswith(f"{i:05d}.jpg")
        assert x.image_info[0].format == "jpeg" and (x.image_info[0].width, x.image_info[0].height) == (24, 16)
    r = RecordReader(out / "instruction")
    assert len(r) == 3 and r[1].meta["prompt_original"] == "four watches 1" and r[1].meta["type"] == "easy"
    m = load_manifest(out / "instruction")
    assert m["skipped"]["by_reason"] == {"task_type 'edit' not imported": 1}
    r = RecordReader(out / "multiref")
    assert len(r) == 2 and r[0].task == "multiref" and r[0].meta["category"] == "hum_sce"
    assert r[0].texts == ["put the man from image 1 in the scene of image 2"] and r[0].meta["extra"] == {"source": "src0"}
    assert r[1].images[-1] == _jpeg(206) and len(r[1].images) == 4
    types = [(it["type"], it["loss"], it.get("image")) for it in r[1].plan]
    assert types == [("vae_image", 0, 0), ("vit_image", 0, 0), ("vae_image", 0, 1), ("vit_image", 0, 1),
                     ("vae_image", 0, 2), ("vit_image", 0, 2), ("text", 0, None), ("vae_image", 1, 3)]


def _corrupt(root):
    sur = root / "Surrel-Fantasy-Image"
    rows = [_row(i, "Surrel-Fantasy-Image") for i in range(6)]
    _write_jsonl(sur / "conflict.jsonl", rows, bad_lines=(1,))  # line 2 is not JSON
    good = _jpeg(0)
    _tar_gz(sur / "images" / "0-3.tar.gz", {"00000.jpg": good, "00002.jpg": good[: len(good) // 2],  # truncated
                                            "notes.txt": b"hello", "00099.jpg": _jpeg(99)})  # no row
    _tar_gz(sur / "images" / "3-5.tar.gz", {f"{i:05d}.jpg": _jpeg(i) for i in range(3, 5)}, truncate=60)
    # row 5 (00005.jpg) has no image anywhere
    mr = root / "Multi-Reference-Image" / "multi_refer_images_output" / "hum_sce"
    _multiref_parquet(mr / "part-0.parquet", [([_jpeg(1), _jpeg(2)], [["ok"]]),
                                              ([b"garbage", _jpeg(3)], [["bad image"]]),
                                              ([_jpeg(4)], [["too few"]])])
    (mr / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")


def test_echo4o_import_corrupt_fail_names_file_and_row(echo_root, tmp_path, capsys):
    root, _ = echo_root
    _corrupt(root)
    with pytest.raises(ie.ImportFailure, match=r"conflict.jsonl:2: invalid JSON line"):
        ie.import_echo4o(str(root), str(tmp_path / "o1"), subsets=["surreal"])
    _write_jsonl(root / "Surrel-Fantasy-Image" / "conflict.jsonl", [_row(i, "Surrel-Fantasy-Image") for i in range(6)])
    with pytest.raises(ie.ImportFailure, match=r"0-3.tar.gz:00002.jpg \(row .*conflict.jsonl:3\): corrupt image"):
        ie.import_echo4o(str(root), str(tmp_path / "o2"), subsets=["surreal"])
    with pytest.raises(ie.ImportFailure, match=r"part-0.parquet row 1: corrupt image"):
        ie.import_echo4o(str(root), str(tmp_path / "o3"), subsets=["multiref"])
    assert ie.main(["--root", str(root), "--out", str(tmp_path / "o4"), "--subsets", "surreal"]) == 2
    assert "corrupt image" in capsys.readouterr().err
    m = load_manifest(tmp_path / "o4" / "surreal")
    assert not m["complete"] and "ImportFailure" in m["error"]


def test_echo4o_import_corrupt_skip_counts(echo_root, tmp_path):
    root, imgs = echo_root
    _corrupt(root)
    res = ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["surreal", "multiref"], on_error="skip")
    s = res["surreal"]
    assert s["complete"] and s["records"] == 2  # 00000, and 00003 read before the archive breaks
    assert s["skipped"]["by_reason"] == {
        "invalid JSON line": 1, "corrupt image": 1, "image without a jsonl row": 1, "unreadable archive": 1,
        "image not found in any archive": 2,  # 00004 (lost with the archive tail) and 00005
    }
    assert s["skipped"]["count"] == sum(s["skipped"]["by_reason"].values())
    assert any("3-5.tar.gz" in e["where"] for e in s["skipped"]["examples"])
    m = res["multiref"]
    assert m["records"] == 1 and m["skipped"]["by_reason"] == {
        "corrupt image": 1, "image_list needs >= 2 images (refs + target)": 1, "unreadable parquet": 1}
    assert [x.id for x in RecordReader(tmp_path / "o" / "surreal")] == ["echo4o/surreal/00000", "echo4o/surreal/00003"]


def _bagel_t2i(path, n, bad=()):
    caps = [json.dumps({"short": f"cap {i}", "long": f"a long caption {i}"}) for i in range(n)]
    caps[0] = json.dumps({"only": "single caption"})
    imgs = [(_jpeg(300 + i) if i not in bad else b"\x89PNG broken") for i in range(n)]
    pq.write_table(pa.table({"image": imgs, "captions": caps, "aesthetic": [5.5] * n}), path)


def _bagel_edit(path):
    rows = {"image_list": [[_jpeg(400), _jpeg(401), _jpeg(402)], [_jpeg(403), _jpeg(404)]],
            "instruction_list": [[["make it red", "paint it red"], ["add a hat"]], [["zoom in"]]]}
    pq.write_table(pa.table(rows), path)


def test_bagel_parquet_t2i_and_edit(tmp_path):
    src = tmp_path / "bagel_t2i"
    src.mkdir()
    _bagel_t2i(src / "p0.parquet", 3)
    _bagel_t2i(src / "p1.parquet", 2)
    assert ibp.main([str(src), "--kind", "t2i", "--out", str(tmp_path / "t2i")]) == 0
    r = RecordReader(tmp_path / "t2i", verify=True)
    assert [x.id for x in r] == [f"bagel_t2i/p0/{i}" for i in range(3)] + [f"bagel_t2i/p1/{i}" for i in range(2)]
    assert r[0].texts == ["single caption"] and r[1].texts == [["cap 1", "a long caption 1"]]
    assert r[1].images == [_jpeg(301)] and r[1].meta["extra"] == {"aesthetic": 5.5}
    assert r[1].meta["caption_keys"] == ["short", "long"]

    ed = tmp_path / "edit.parquet"
    _bagel_edit(ed)
    m = ibp.import_bagel_parquet([str(ed)], str(tmp_path / "pairs"), kind="edit")
    assert m["records"] == 3
    r = RecordReader(tmp_path / "pairs")
    assert [x.id for x in r] == ["edit/edit/0/0", "edit/edit/0/1", "edit/edit/1/0"]
    assert r[0].texts == [["make it red", "paint it red"]] and r[0].images == [_jpeg(400), _jpeg(401)]
    assert r[1].texts == ["add a hat"] and r[1].images == [_jpeg(401), _jpeg(402)] and r[1].meta["step"] == 1
    m = ibp.import_bagel_parquet([str(ed)], str(tmp_path / "chain"), kind="edit", edit_mode="chain")
    r = RecordReader(tmp_path / "chain")
    assert len(r) == 2 and len(r[0].images) == 3 and r[0].task == "edit"
    assert [it["type"] for it in r[0].plan] == ["vae_image", "vit_image", "text", "vae_image", "vae_image",
                                                 "vit_image", "text", "vae_image"]


def test_bagel_parquet_errors(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _bagel_t2i(src / "a.parquet", 4, bad=(2,))
    (src / "b.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(ibp.ImportFailure, match=r"a.parquet row 2: corrupt image"):
        ibp.import_bagel_parquet([str(src)], str(tmp_path / "o1"), kind="t2i")
    assert ibp.main([str(src), "--kind", "t2i", "--out", str(tmp_path / "o2")]) == 2
    assert "a.parquet row 2" in capsys.readouterr().err
    m = ibp.import_bagel_parquet([str(src)], str(tmp_path / "o3"), kind="t2i", on_error="skip")
    assert m["records"] == 3 and m["skipped"]["by_reason"] == {"corrupt image": 1, "unreadable parquet": 1}
    bad_edit = tmp_path / "e.parquet"
    pq.write_table(pa.table({"image_list": [[_jpeg(1), _jpeg(2)]], "instruction_list": [[["a"], ["b"]]]}), bad_edit)
    with pytest.raises(ibp.ImportFailure, match=r"e.parquet row 0: instruction_list must have"):
        ibp.import_bagel_parquet([str(bad_edit)], str(tmp_path / "o4"), kind="edit")


def test_bagel_parquet_repeated_file_names_get_distinct_ids(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sub in ("a", "b"):
        os.mkdir(sub)
        _bagel_t2i(f"{sub}/part-0.parquet", 2)
    files = ["a/part-0.parquet", "b/part-0.parquet"]
    assert ibp.main([*files, "--kind", "t2i", "--out", "o1", "--on-error", "skip"]) == 0
    r = RecordReader("o1", verify=True)
    assert [x.id for x in r] == ["part-0/a/part-0/0", "part-0/a/part-0/1", "part-0/b/part-0/0", "part-0/b/part-0/1"]
    assert [x.meta["parquet"] for x in r] == ["a/part-0.parquet"] * 2 + ["b/part-0.parquet"] * 2
    assert load_manifest("o1")["complete"]
    # the same ids on a rerun (absolute paths, another working folder) and when the folders are given
    monkeypatch.chdir("/")
    m = ibp.import_bagel_parquet([str(tmp_path / f) for f in files], str(tmp_path / "o2"), kind="t2i")
    assert m["complete"] and [x.id for x in RecordReader(tmp_path / "o2")] == [x.id for x in r]
    assert ibp.main([str(tmp_path / "a"), str(tmp_path / "b"), "--kind", "t2i", "--out", str(tmp_path / "o3")]) == 0
    assert [x.id for x in RecordReader(tmp_path / "o3")] == [f"a/{s}/part-0/{i}" for s in "ab" for i in range(2)]
    # a rerun into an existing dataset names the CLI flag
    assert ibp.main([str(tmp_path / "a"), "--kind", "t2i", "--out", str(tmp_path / "o3")]) == 2
    assert f"{tmp_path / 'o3'} already holds a dataset; pass --overwrite" in capsys.readouterr().err
    # inputs that would give the same ids: an error naming both files, even with --on-error skip; nothing written
    (tmp_path / "a" / "part-0").write_bytes((tmp_path / "a" / "part-0.parquet").read_bytes())
    for inputs, second in [([tmp_path / "a" / "part-0.parquet", tmp_path / "a" / "part-0"], "a/part-0"),
                           ([tmp_path / "a" / "part-0.parquet", tmp_path / "a"], "a/part-0.parquet")]:
        with pytest.raises(ibp.ImportFailure, match=f"{tmp_path}/a/part-0.parquet and {tmp_path}/{second} would "
                                                    "get the same record ids"):
            ibp.import_bagel_parquet([str(p) for p in inputs], str(tmp_path / "o4"), kind="t2i", on_error="skip")
    assert not (tmp_path / "o4").exists()


def test_echo4o_overwrite_keeps_old_dataset_on_failure(echo_root, tmp_path, capsys):
    root, _ = echo_root
    out = tmp_path / "rec"
    args = ["--root", str(root), "--out", str(out), "--subsets", "surreal"]
    assert ie.main(args) == 0
    good = [x.id for x in RecordReader(out / "surreal", verify=True)]
    assert len(good) == 5
    capsys.readouterr()
    assert ie.main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'surreal'} already holds a dataset; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    _corrupt(root)
    assert ie.main([*args, "--overwrite"]) == 2
    assert "conflict.jsonl:2: invalid JSON line" in capsys.readouterr().err
    m = load_manifest(out / "surreal")
    assert m["complete"] and m["records"] == 5
    assert [x.id for x in RecordReader(out / "surreal", verify=True)] == good
    assert sorted(os.listdir(out / "surreal")) == ["manifest.json", "surreal-00000.array_record"]
    assert ie.main([*args, "--overwrite", "--on-error", "skip"]) == 0
    assert [x.id for x in RecordReader(out / "surreal", verify=True)] == ["echo4o/surreal/00000",
                                                                           "echo4o/surreal/00003"]
    assert sorted(os.listdir(out / "surreal")) == ["manifest.json", "surreal-00000.array_record"]


def _tree(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_echo4o_arguments_checked_before_anything_is_written(echo_root, tmp_path, capsys):
    """Bad arguments (an unknown or repeated subset, --shard-bytes / --limit < 1), a missing subset folder and an
    existing dataset without --overwrite are one `import_echo4o: error:` line, exit status 1, before any subset is
    imported: an existing dataset stays as it was even with --overwrite (surreal was imported and overwritten
    before `bogus` failed, a traceback)."""
    root, _ = echo_root
    out = tmp_path / "rec"
    assert ie.main(["--root", str(root), "--out", str(out), "--subsets", "surreal", "--limit", "2"]) == 0
    before = _tree(out)
    capsys.readouterr()

    def error(*args) -> str:
        assert ie.main(["--root", str(root), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("import_echo4o: error: ") and "Traceback" not in err, err
        assert _tree(out) == before
        return err.strip()

    assert error("--subsets", "surreal,bogus", "--overwrite") == (
        "import_echo4o: error: --subsets=surreal,bogus: unknown subset 'bogus' (expected surreal, instruction, "
        "multiref)")
    assert error("--subsets", "surreal,surreal", "--overwrite") == (
        "import_echo4o: error: --subsets=surreal,surreal: subset 'surreal' is given twice")
    assert error("--subsets", ",", "--overwrite") == (
        "import_echo4o: error: --subsets=: no subset chosen (from surreal, instruction, multiref)")
    assert error("--subsets", "surreal", "--overwrite", "--shard-bytes", "0") == (
        "import_echo4o: error: --shard-bytes=0: must be a positive number of bytes")
    assert error("--subsets", "surreal", "--overwrite", "--limit", "0") == (
        "import_echo4o: error: --limit=0: must be >= 1 (records per dataset; leave it out for all)")
    import shutil

    shutil.rmtree(root / "Multi-Reference-Image")
    assert error("--subsets", "surreal,multiref", "--overwrite") == (
        f"import_echo4o: error: {root / 'Multi-Reference-Image'} not found")
    assert error("--root", str(tmp_path / "nowhere"), "--overwrite") == (
        f"import_echo4o: error: {tmp_path / 'nowhere'}: no such folder (the downloaded Echo-4o-Image)")
    assert error("--subsets", "instruction,surreal") == (  # surreal exists: instruction not imported first
        f"import_echo4o: error: {out / 'surreal'} already holds a dataset; pass --overwrite to replace it")
    (tmp_path / "afile").write_text("x")  # an --out that cannot be a folder: one line too
    assert ie.main(["--root", str(root), "--out", str(tmp_path / "afile"), "--subsets", "surreal"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("import_echo4o: error: ") and "afile" in err, err


def test_bagel_parquet_wrong_columns_and_captions_named(tmp_path, capsys):
    """A t2i parquet without the `image` / `captions` columns is an error naming the expected columns and those
    found; a `captions` string that is not a JSON object is an error naming the row (it was stored as the
    caption); argument errors come before anything is written."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"img": [_jpeg(1)], "caption": ["a cat"]}), src / "part-0.parquet")
    assert ibp.main([str(src), "--kind", "t2i", "--out", str(tmp_path / "o1")]) == 2
    assert capsys.readouterr().err == (
        "import_bagel_parquet: error: part-0.parquet row 0: missing columns ['image', 'captions'] (--kind t2i reads "
        "the columns ['image', 'captions']; the file has ['caption', 'img'])\n")
    assert ibp.main([str(src), "--kind", "edit", "--out", str(tmp_path / "o2")]) == 2
    assert "missing columns ['image_list', 'instruction_list']" in capsys.readouterr().err

    caps = [json.dumps({"a": "a red cat"}), "a plain caption, not JSON", json.dumps(["a", "list"]), json.dumps({})]
    pq.write_table(pa.table({"image": [_jpeg(i) for i in range(4)], "captions": caps}), src / "part-0.parquet")
    with pytest.raises(ibp.ImportFailure) as e:
        ibp.import_bagel_parquet([str(src)], str(tmp_path / "o3"), kind="t2i")
    assert str(e.value) == ("part-0.parquet row 1: captions is not JSON (expected a JSON object {key: caption}, got "
                            "'a plain caption, not JSON')")
    m = ibp.import_bagel_parquet([str(src)], str(tmp_path / "o4"), kind="t2i", on_error="skip")
    assert m["records"] == 1 and m["skipped"]["by_reason"] == {
        "captions is not JSON": 1, "captions is not a JSON object": 1, "no caption": 1}
    assert [r.texts for r in RecordReader(tmp_path / "o4")] == [["a red cat"]]
    for args, msg in [(["--shard-bytes", "0"], "--shard-bytes=0: must be a positive number of bytes"),
                      (["--limit", "-1"], "--limit=-1: must be >= 1 (records per dataset; leave it out for all)"),
                      (["--name", "a/b"], "--name=a/b: must be a plain file-name prefix (no '/', not starting with '.': the "
                                         "shards would be hidden files)")]:
        assert ibp.main([str(src), "--kind", "t2i", "--out", str(tmp_path / "o5"), *args]) == 2
        assert capsys.readouterr().err == f"import_bagel_parquet: error: {msg}\n"
        assert not (tmp_path / "o5").exists()


def test_imported_multiref_through_pipeline(echo_root, tmp_path):
    """End to end: an imported multi-reference row packs with the official plan (ViT per reference,
    clean VAE refs, noisy target)."""
    from echo4o_jax.config import BagelConfig
    from echo4o_jax.data.pipeline import DataPipeline, DatasetSpec, PipelineConfig
    from echo4o_jax.image_transform import ImageTransform
    from echo4o_jax.packing import PackBudget

    from conftest import DEFAULT_GOLDEN

    root, _ = echo_root
    ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["multiref"])
    cfg = BagelConfig.from_checkpoint_dir(DEFAULT_GOLDEN)
    tok = demo_mod.build_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    special = demo_mod.special_tokens_info(tok)
    cfg = cfg.replace(special_tokens=type(cfg.special_tokens)(
        special["bos_token_id"], special["eos_token_id"], special["start_of_image"], special["end_of_image"]))
    pc = PipelineConfig(datasets=(DatasetSpec(str(tmp_path / "o" / "multiref")),), tokenizer=str(tmp_path / "tok.json"),
                        budget=PackBudget(200, 100, 100, 8, (32, 32)), expected_num_tokens=10**6, num_epochs=1,
                        shuffle=False, text_dropout=0, vit_dropout=0, vae_dropout=0,
                        vae_transform=ImageTransform(32, 16, 16), vit_transform=ImageTransform(28, 14, 14))
    b, st = next(DataPipeline(pc, cfg).iterator())
    assert st["sample_ids"] == [["echo4o/multiref/multi_refer_images_output/hum_sce/part-0/0",
                                 "echo4o/multiref/multi_refer_images_output/hum_sce/part-0/1"]]
    n_vit = len(set(b.vit_image_id[0][b.vit_image_id[0] >= 0].tolist()))
    assert n_vit == 2 + 3  # one ViT image per reference
    assert int((b.vae_image_hw[0][:, 0] > 0).sum()) == 3 + 4 and int(b.mse_mask[0].sum()) > 0


# ---------------------------------------------------------------------------------------------- demo


def test_demo_dataset(tmp_path):
    out = tmp_path / "demo"
    assert demo_mod.main(["--out", str(out), "--t2i", "40", "--multiref", "12", "--understanding", "8"]) == 0
    info = json.loads((out / "demo.json").read_text())
    assert info["counts"] == {"t2i": 40, "multiref": 12, "understanding": 8}
    tok = demo_mod.build_tokenizer()
    unk = tok.token_to_id("<unk>")
    st = json.loads((out / "tokenizer" / "special_tokens.json").read_text())
    assert st["bos_token_id"] == tok.token_to_id("<|im_start|>") and st["vocab_size"] == len(demo_mod.demo_vocabulary())
    tags = set()
    for name in ("t2i", "multiref", "understanding"):
        for rec in RecordReader(out / name, verify=True):
            for t in rec.texts:
                assert unk not in tok.encode(t, add_special_tokens=False).ids
            m = rec.meta
            tags.add(m["tag"])
            img = np.asarray(Image.open(io.BytesIO(rec.images[-1 if name == "multiref" else 0])).convert("RGB"))
            W, H = m["canvas"]
            assert img.shape == (H, W, 3)
            mask = np.zeros((H, W), bool)
            for o in m["objects"]:  # exact ground truth: the object colour at its centre, background elsewhere
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                assert tuple(img[cy, cx]) == demo_mod.COLORS[o["color"]], (rec.id, o)
                mask[y0:y1, x0:x1] = True
            assert (img[~mask] == demo_mod.BACKGROUND).all()
            by_class = {}
            for o in m["objects"]:
                by_class[o["class"]] = by_class.get(o["class"], 0) + 1
            for inc in m["include"]:
                assert by_class[inc["class"]] == inc["count"]
                objs = [o for o in m["objects"] if o["class"] == inc["class"]]
                for o in objs:
                    x0, y0, x1, y1 = o["bbox"]
                    reg = inc.get("region")
                    assert {"left": x1 <= W // 2 + 1, "right": x0 >= W // 2 - 1, "above": y1 <= H // 2 + 1,
                            "below": y0 >= H // 2 - 1, None: True, "middle": True}[reg]
                    if "color" in inc:
                        assert o["color"] == inc["color"]
            if m["tag"] == "size_spatial_attr":
                big = {i["class"]: i["size"] for i in m["include"]}
                sz = {o["class"]: o["size_px"] for o in m["objects"]}
                lg = [c for c, s in big.items() if s == "larger"][0]
                sm = [c for c, s in big.items() if s == "smaller"][0]
                assert sz[lg] > sz[sm]
            if name == "multiref":
                assert len(rec.images) == len(m["references"]) + 1
                for k, inc in enumerate(m["include"]):
                    ref = m["references"][inc["reference"] - 1][0]
                    assert (ref["class"], ref["color"]) == (inc["class"], inc["color"])
                    assert f"image {inc['reference']}" in rec.texts[0]
    assert set(demo_mod.TAGS) <= tags | {"single_object"} and "multiref" in tags
    # deterministic
    demo_mod.write_demo(str(tmp_path / "demo2"), n_t2i=40, n_multiref=12, n_understanding=8)
    for name in ("t2i", "multiref", "understanding"):
        a = load_manifest(out / name)["shards"]
        b = load_manifest(tmp_path / "demo2" / name)["shards"]
        assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_demo_pipeline_config_packs(tmp_path):
    from echo4o_jax.config import BagelConfig, SpecialTokens
    from echo4o_jax.data.pipeline import DataPipeline
    from echo4o_jax.packing import PackBudget

    from conftest import DEFAULT_GOLDEN

    out = str(tmp_path / "demo")
    info = demo_mod.write_demo(out, n_t2i=24, n_multiref=6, n_understanding=6)
    s = info["special_tokens"]
    cfg = BagelConfig.from_checkpoint_dir(DEFAULT_GOLDEN, special_tokens=SpecialTokens(
        s["bos_token_id"], s["eos_token_id"], s["start_of_image"], s["end_of_image"]))
    pc = demo_mod.demo_pipeline_config(out, PackBudget(128, 64, 96, 8, (64, 64)), num_epochs=1)
    n = 0
    for b, st in DataPipeline(pc, cfg).iterator():
        n += st["samples"]
        assert (b.text_ids[b.text_ids >= 0] < s["vocab_size"]).all()
    assert n == 36


def test_demo_data_is_written_by_process_zero_only(tmp_path, monkeypatch):
    """Multi-host: process 0 writes the demo dataset, the others wait for it (a barrier), then read it; a
    process that does not see it (a demo_dir not shared by the hosts) says so. (Every process writing the same
    files made the runs crash or hang.)"""
    import jax
    from jax.experimental import multihost_utils

    from echo4o_jax.train import records_source

    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: calls.append(name))
    real_write = demo_mod.write_demo
    monkeypatch.setattr(demo_mod, "write_demo", lambda out, **kw: calls.append("write") or real_write(
        out, n_t2i=4, n_multiref=2, n_understanding=2))
    out = str(tmp_path / "demo")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(FileNotFoundError, match="process 1 does not see .*demo_dir must be a path every host sees"):
        records_source.ensure_demo(out)
    assert calls == [f"echo4o_jax demo data {out}"]  # waited, wrote nothing
    calls.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    info = records_source.ensure_demo(out)
    assert calls == ["write", f"echo4o_jax demo data {out}"] and info["special_tokens"]
    calls.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert records_source.ensure_demo(out) == info and calls == [f"echo4o_jax demo data {out}"]


def test_interrupted_demo_write_is_written_again_but_other_data_is_not_overwritten(tmp_path, monkeypatch):
    """The README's first command interrupted while it writes the demo data (no demo.json yet): the rerun
    writes the demo again, the same as an uninterrupted write. A folder of other data is refused, untouched."""
    from echo4o_jax.data.records import DatasetExistsError, RecordWriter, t2i_record
    from echo4o_jax.train import records_source

    small = dict(n_t2i=6, n_multiref=2, n_understanding=2)
    real_write = demo_mod.write_demo
    monkeypatch.setattr(demo_mod, "write_demo", lambda out, **kw: real_write(out, **small, **kw))
    want = real_write(str(tmp_path / "whole"), **small)

    out = tmp_path / "demo"
    calls = []

    def interrupted(rid, *a, **k):
        calls.append(rid)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_t2i(rid, *a, **k)

    real_t2i = demo_mod.t2i_record
    monkeypatch.setattr(demo_mod, "t2i_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        records_source.ensure_demo(str(out))
    assert (out / "t2i").is_dir() and not (out / "demo.json").exists()
    monkeypatch.setattr(demo_mod, "t2i_record", real_t2i)
    info = records_source.ensure_demo(str(out))
    assert info["counts"] == want["counts"]
    for name in demo_mod.DEMO_DATASETS:
        a = load_manifest(tmp_path / "whole" / name)["shards"]
        assert [s["sha256"] for s in load_manifest(out / name)["shards"]] == [s["sha256"] for s in a]

    other = tmp_path / "other"
    with RecordWriter(str(other / "t2i"), name="mine") as w:
        w.write(t2i_record("mine/0", "a caption", demo_mod.make_t2i(np.random.default_rng(0), 64, 64)[1].png()))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(DatasetExistsError):
        records_source.ensure_demo(str(other))
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_echo4o_ctrl_c_keeps_the_partial_dataset_and_a_rerun_names_it(echo_root, tmp_path, capsys, monkeypatch):
    """Ctrl-C during an import: one line and status 130, not a traceback; a new dataset keeps the records written
    so far, marked incomplete (the rerun without --overwrite says so); an --overwrite leaves the dataset as it
    was; a full rerun with --overwrite completes it."""
    root, _ = echo_root
    out = tmp_path / "rec"
    args = ["--root", str(root), "--out", str(out), "--subsets", "surreal"]
    real_check = ie.check_image
    calls = []

    def ctrl_c_at_third(data, how):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_check(data, how)

    monkeypatch.setattr(ie, "check_image", ctrl_c_at_third)
    assert ie.main(args) == 130
    err = capsys.readouterr().err
    assert err.startswith("import_echo4o: interrupted (Ctrl-C): ") and err.count("\n") == 1, err
    m = load_manifest(out / "surreal")
    assert (m["complete"], m["records"], m["error"]) == (False, 2, "interrupted (Ctrl-C)")
    assert [x.id for x in RecordReader(out / "surreal", verify=True)] == ["echo4o/surreal/00000",
                                                                           "echo4o/surreal/00001"]
    assert ie.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"import_echo4o: error: {out / 'surreal' / 'manifest.json'} says the dataset is incomplete "
                   "(error: interrupted (Ctrl-C)); it holds 2 records in 1 shards; pass --overwrite to write it "
                   "again\n")
    before = _tree(out)
    calls.clear()
    assert ie.main([*args, "--overwrite"]) == 130
    assert _tree(out) == before  # the dataset being replaced is left as it was
    monkeypatch.setattr(ie, "check_image", real_check)
    assert ie.main([*args, "--overwrite"]) == 0
    m = load_manifest(out / "surreal")
    assert (m["complete"], m["records"], m.get("error")) == (True, 5, None)


def test_demo_cli_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    for argv, msg in [(["--size", "16"], f"--size=16: must be >= {demo_mod.MIN_SIZE} pixels"),
                      (["--t2i", "-1"], "--t2i=-1: must be a number of samples >= 0"),
                      (["--shard-bytes", "0"], "--shard-bytes=0: must be a positive number of bytes")]:
        assert demo_mod.main(["--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("demo: error: ") and msg in err and err.count("\n") == 1, err
        assert not out.exists()
    small = ["--out", str(out), "--t2i", "4", "--multiref", "2", "--understanding", "2"]
    assert demo_mod.main(small) == 0
    capsys.readouterr()
    assert demo_mod.main(small) == 2
    err = capsys.readouterr().err
    assert err == f"demo: error: {out / 't2i'} already holds a dataset; pass --overwrite to replace it\n"


def test_demo_scenes_fit_the_smallest_canvas():
    """Every scene kind is placed on a MIN_SIZE canvas (write_demo refuses smaller ones): its objects lie inside
    the canvas and do not overlap."""
    rng = np.random.default_rng(0)
    s = demo_mod.MIN_SIZE

    def check(scene):
        boxes = [o.bbox for o in scene.objects]
        assert boxes and all(0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s for x0, y0, x1, y1 in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)

    for _ in range(60):
        for tag in demo_mod.TAGS:
            check(demo_mod.make_t2i(rng, s, s, tag=tag)[1])
        refs, _, target, _ = demo_mod.make_multiref(rng, s, s)
        for scene in [*refs, target]:
            check(scene)
        check(demo_mod.make_understanding(rng, s, s)[0])


def test_interrupted_demo_overwrite_leaves_no_stale_demo_json(tmp_path, monkeypatch):
    """demo.json (settings and transforms; its presence says the demo is complete) is removed before an
    overwrite and written last: a rewrite cut short never leaves the old one beside new datasets."""
    out = tmp_path / "demo"
    small = dict(n_t2i=4, n_multiref=2, n_understanding=2)
    demo_mod.write_demo(str(out), **small)
    before = load_manifest(out / "t2i")["shards"]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "multiref_record", ctrl_c)  # after t2i was rewritten at the new size
    with pytest.raises(KeyboardInterrupt):
        demo_mod.write_demo(str(out), size=48, overwrite=True, **small)
    assert not (out / "demo.json").exists()
    assert load_manifest(out / "t2i")["shards"] != before  # t2i was swapped in at the new size


def test_demo_data_written_at_another_size_is_refused(tmp_path):
    """data.records.demo_image_size would be ignored by demo data already written at another size: refused."""
    from echo4o_jax.train import records_source

    out = str(tmp_path / "demo")
    small = dict(n_t2i=4, n_multiref=2, n_understanding=2)
    info = records_source.ensure_demo(out, size=32, **small)
    assert records_source.ensure_demo(out, size=32, **small) == info
    with pytest.raises(ValueError, match=r"demo_image_size=48, but the demo data in .* was written at 32 px"):
        records_source.ensure_demo(out, size=48, **small)


def _png16_grey(value=40000, size=(8, 8)):
    b = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint16)).save(b, format="PNG")
    return b.getvalue()


def test_echo4o_rows_checked_by_type_and_subset(echo_root, tmp_path):
    """Rows the importer would have paired wrongly or dropped quietly are errors naming the line: a task_type
    that is not a string (was skipped as "another task"), an instruction / output_image of another type (was
    "missing"), an output_image in another subset's folder or with '..' (images are found by file name, so it
    was paired with this subset's image of that name); a 16-bit greyscale image (its RGB conversion is white)."""
    root, _ = echo_root
    sur = root / "Surrel-Fantasy-Image"
    cases = [
        (dict(task_type=None), "conflict.jsonl:2: task_type is not a string (got null)"),
        (dict(task_type=["t2i"]), "conflict.jsonl:2: task_type is not a string (got a list [\"t2i\"])"),
        (dict(instruction=5), "conflict.jsonl:2: instruction is not a non-empty string (got 5)"),
        (dict(instruction=["p"]), "conflict.jsonl:2: instruction is not a non-empty string (got a list [\"p\"])"),
        (dict(output_image=7), "conflict.jsonl:2: output_image is not a non-empty string (got 7)"),
        (dict(output_image="/Echo-4o-Image/Instruction-Following-Image/images/00001.jpg"),
         "conflict.jsonl:2: output_image outside this subset's images ('/Echo-4o-Image/Instruction-Following-Image/"
         "images/00001.jpg': the image is found by its file name in this subset's archives)"),
        (dict(output_image="../../etc/00001.jpg"), "conflict.jsonl:2: output_image outside this subset's images"),
    ]
    for i, (change, msg) in enumerate(cases):
        _write_jsonl(sur / "conflict.jsonl", [_row(k, "Surrel-Fantasy-Image", **(change if k == 1 else {}))
                                              for k in range(5)])
        with pytest.raises(ie.ImportFailure) as e:
            ie.import_echo4o(str(root), str(tmp_path / f"o{i}"), subsets=["surreal"])
        assert str(e.value).startswith("Surrel-Fantasy-Image/" + msg), str(e.value)
    # the other spelling of the surreal folder is this subset's, and a missing key is still "missing"
    rows = [_row(k, "Surreal-Fantasy-Image") for k in range(5)]
    del rows[4]["instruction"]
    _write_jsonl(sur / "conflict.jsonl", rows)
    with pytest.raises(ie.ImportFailure, match=r"conflict.jsonl:5: missing instruction$"):
        ie.import_echo4o(str(root), str(tmp_path / "p"), subsets=["surreal"])
    _write_jsonl(sur / "conflict.jsonl", rows[:4])
    _tar_gz(sur / "images" / "3-5.tar.gz", {"00003.jpg": _png16_grey()})
    with pytest.raises(ie.ImportFailure, match=r"3-5.tar.gz:00003.jpg \(row .*:4\): corrupt image \(16-bit "
                                               r"greyscale image \(PIL mode I;16\): its conversion to RGB clips"):
        ie.import_echo4o(str(root), str(tmp_path / "q"), subsets=["surreal"])


def test_multiref_symlink_loop_and_extra_steps(echo_root, tmp_path):
    """A symlink back up the multi-reference tree imported every parquet again under ever longer paths (82
    records from 2 rows); each real folder is now searched once. An instruction_list of two steps kept the
    first silently: a multi-reference sample has one instruction."""
    root, _ = echo_root
    mr = root / "Multi-Reference-Image" / "multi_refer_images_output"
    (mr / "loop").symlink_to("..", target_is_directory=True)
    (mr / "again").symlink_to("hum_sce", target_is_directory=True)
    (mr / ".cache").mkdir()  # hidden files and folders are skipped (as the recursive glob did)
    (mr / ".cache" / "x.parquet").write_bytes(b"not parquet")
    (mr / "hum_sce" / "._part-0.parquet").write_bytes(b"macOS AppleDouble")
    m = ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["multiref"])["multiref"]
    assert m["records"] == 2 and len({r.id for r in RecordReader(tmp_path / "o" / "multiref")}) == 2
    _multiref_parquet(mr / "hum_sce" / "part-0.parquet", [([_jpeg(1), _jpeg(2)], [["step one"], ["step two"]])])
    with pytest.raises(ie.ImportFailure, match=r"part-0.parquet row 0: instruction_list has more than one step "
                                               r"\(2 steps; a multi-reference sample has one instruction"):
        ie.import_echo4o(str(root), str(tmp_path / "o2"), subsets=["multiref"])


def test_an_import_of_nothing_is_an_error(echo_root, tmp_path, capsys):
    """No record to import (an empty jsonl, rows of other tasks only, an empty parquet) was a "complete"
    dataset of 0 records; it is an error naming the input (the dataset is left marked incomplete)."""
    root, _ = echo_root
    _write_jsonl(root / "Surrel-Fantasy-Image" / "conflict.jsonl", [])
    assert ie.main(["--root", str(root), "--out", str(tmp_path / "o"), "--subsets", "surreal"]) == 2
    assert capsys.readouterr().err.startswith("import_echo4o: error: surreal (Surrel-Fantasy-Image/conflict.jsonl): "
                                              "no records to import; skipped: 5 x image without a jsonl row")
    ins = root / "Instruction-Following-Image" / "Instruction-Following-Image.jsonl"
    _write_jsonl(ins, [{"task_type": "edit", "instruction": "x", "output_image": "y.jpg"}])
    with pytest.raises(ie.ImportFailure, match=r"no records to import; skipped: 3 x image without a jsonl row, "
                                               r"1 x task_type 'edit' not imported$"):
        ie.import_echo4o(str(root), str(tmp_path / "o2"), subsets=["instruction"], on_error="skip")
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "captions": pa.array([], pa.string())}),
                   src / "part-0.parquet")
    with pytest.raises(ibp.ImportFailure, match=r"t2i \(1 parquet files\): no records to import$"):
        ibp.import_bagel_parquet([str(src)], str(tmp_path / "o3"), kind="t2i")


def test_echo4o_archive_names_and_layouts_seen_in_practice(echo_root, tmp_path, capsys):
    """What a real download may hold: a latin-1 tar (member names that are not UTF-8) imports, its names kept
    as escapes (the record's header could not hold them: the whole import stopped, even with skip); two
    images of one name in other formats (one record id) are a named error, not a 'duplicate record id'; an
    image type not imported is named with its row; loose images instead of archives, and a multi-reference
    folder without parquet files, are refused before any subset is imported; --limit is in the manifest."""
    root, imgs = echo_root
    sur = root / "Surrel-Fantasy-Image"
    for f in (sur / "images").iterdir():
        f.unlink()
    with tarfile.open(sur / "images" / "0.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in [("im\u00e1genes/00000.jpg", imgs[0]), ("im\u00e1genes/00001.jpg", imgs[1]),
                           ("im\u00e1genes/00001.png", imgs[2]), ("im\u00e1genes/00002.bmp", b"BM..")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    _write_jsonl(sur / "conflict.jsonl", [_row(0, "Surrel-Fantasy-Image"), _row(1, "Surrel-Fantasy-Image"),
                                          _row(1, "Surrel-Fantasy-Image", output_image="images/00001.png"),
                                          _row(2, "Surrel-Fantasy-Image", output_image="images/00002.bmp")])
    res = ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["surreal"], on_error="skip", limit=10)
    m = res["surreal"]
    assert m["records"] == 2 and m["info"]["limit"] == 10
    recs = list(RecordReader(tmp_path / "o" / "surreal"))
    assert recs[0].meta["member"] == "im\\xe1genes/00000.jpg"  # the latin-1 byte, escaped
    assert m["skipped"]["by_reason"] == {"another image of the same name": 1, "image file type not imported": 1}
    ex = {e["reason"]: e["where"] for e in m["skipped"]["examples"]}
    assert ex["another image of the same name"] == (
        "Surrel-Fantasy-Image/images/0.tar:im\\xe1genes/00001.png (row Surrel-Fantasy-Image/conflict.jsonl:3): "
        "Surrel-Fantasy-Image/images/0.tar:im\\xe1genes/00001.jpg (row Surrel-Fantasy-Image/conflict.jsonl:2) "
        "gives the same record id echo4o/surreal/00001")
    assert ex["image file type not imported"].startswith(
        "Surrel-Fantasy-Image/images/0.tar:im\\xe1genes/00002.bmp (row Surrel-Fantasy-Image/conflict.jsonl:4): .bmp")
    assert ie.main(["--root", str(root), "--out", str(tmp_path / "o2"), "--subsets", "surreal"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("import_echo4o: error: Surrel-Fantasy-Image/images/0.tar:im\\xe1genes/00001.png (row "
                          "Surrel-Fantasy-Image/conflict.jsonl:3): another image of the same name") and \
        err.endswith("gives the same record id echo4o/surreal/00001)\n"), err

    (sur / "images" / "0.tar").unlink()
    (sur / "images" / "00000.jpg").write_bytes(imgs[0])
    for f in (root / "Multi-Reference-Image").rglob("*.parquet"):
        f.unlink()
    out = tmp_path / "o3"
    assert ie.main(["--root", str(root), "--out", str(out), "--subsets", "instruction,surreal"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"import_echo4o: error: {sur / 'images'}: no image archives (*.tar.gz, *.tgz, *.tar); its 1 loose image "
        f"file(s) are not read: the release ships the images as archives (pack loose ones, e.g. tar -czf "
        f"{sur / 'images' / '000.tar.gz'} -C {sur / 'images'} .)")
    assert ie.main(["--root", str(root), "--out", str(out), "--subsets", "instruction,multiref"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"import_echo4o: error: {root / 'Multi-Reference-Image'}: no *.parquet (multi-reference rows are read as "
        "Echo-4o's training code reads them: parquet with image_list / instruction_list; convert the folder to such "
        "rows, or leave it out with --subsets surreal,instruction)")
    assert not out.exists()  # refused before the instruction subset was imported


def test_inspect_names_a_trial_import_and_an_unknown_sheet_extension(echo_root, tmp_path, capsys):
    """A dataset imported with --limit is complete yet not the whole source: inspect says so. A contact sheet of
    an unknown extension is one error line before anything is read (it was a traceback when saving)."""
    from echo4o_jax.data import inspect as inspect_cli

    root, _ = echo_root
    ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["surreal"], limit=2)
    assert inspect_cli.main([str(tmp_path / "o" / "surreal"), "-n", "0"]) == 0
    assert capsys.readouterr().err == (f"inspect: note: {tmp_path / 'o' / 'surreal'} was imported with --limit 2 (a "
                                       "trial import: not the whole source)\n")
    assert inspect_cli.main([str(tmp_path / "o" / "surreal"), "--contact-sheet", str(tmp_path / "s.xyz")]) == 2
    assert capsys.readouterr().err.strip().endswith("unknown image file extension '.xyz' (e.g. .png, .jpg)")
    assert not (tmp_path / "s.xyz").exists()
    # a folder that does not exist is created, and said (a typo'd one went unnoticed)
    assert inspect_cli.main([str(tmp_path / "o" / "surreal"), "--contact-sheet", str(tmp_path / "typo" / "s.png")]) == 0
    assert capsys.readouterr().err.startswith(f"inspect: note: the folder {tmp_path / 'typo'} does not exist: it is "
                                              "created for the contact sheet\n")
    assert (tmp_path / "typo" / "s.png").is_file()


def test_echo4o_multiref_parquet_without_its_columns_is_named(echo_root, tmp_path):
    root, _ = echo_root
    mr = root / "Multi-Reference-Image" / "multi_refer_images_output" / "hum_sce"
    pq.write_table(pa.table({"images": [[_jpeg(1), _jpeg(2)]], "instruction_list": [[["x"]]]}), mr / "part-0.parquet")
    with pytest.raises(ie.ImportFailure, match=re.escape(
            "hum_sce/part-0.parquet row 0: missing columns ['image_list'] (multi-reference rows read the columns "
            "['image_list', 'instruction_list']; the file has ['images', 'instruction_list'])")):
        ie.import_echo4o(str(root), str(tmp_path / "o"), subsets=["multiref"])


def test_bagel_caption_values_of_another_type_are_named(tmp_path):
    """A {key: caption} object with a value that is not a non-empty string: an error naming the row and key
    (the value was dropped while meta's caption_keys still listed its key)."""
    src = tmp_path / "src"
    src.mkdir()
    caps = [json.dumps({"short": "a red cat", "long": "a long red cat"}), json.dumps({"short": 5, "long": "x"}),
            json.dumps({"short": "", "long": "y"})]
    pq.write_table(pa.table({"image": [_jpeg(i) for i in range(3)], "captions": caps}), src / "part-0.parquet")
    with pytest.raises(ibp.ImportFailure) as e:
        ibp.import_bagel_parquet([str(src)], str(tmp_path / "o"), kind="t2i")
    assert str(e.value) == "part-0.parquet row 1: caption is not a non-empty string (key 'short': got 5)"
    m = ibp.import_bagel_parquet([str(src)], str(tmp_path / "o2"), kind="t2i", on_error="skip")
    assert m["records"] == 1 and m["skipped"]["by_reason"] == {"caption is not a non-empty string": 2}
    assert [r.texts for r in RecordReader(tmp_path / "o2")] == [[["a red cat", "a long red cat"]]]


def test_text_that_is_not_valid_unicode_is_the_rows_error_not_the_imports(echo_root, tmp_path, monkeypatch):
    """A JSON "\\ud800" escape (a lone surrogate) in a jsonl field or a BAGEL caption, or a file name that is not
    UTF-8, made a record that cannot be stored: the whole import stopped, also with --on-error skip, naming a
    record id. Now the row's error (named by its file and line) under the error policy; a byte order mark before
    the first jsonl line is ignored; a dataset named after "." gets the folder's name."""
    root, _ = echo_root
    sur = root / "Surrel-Fantasy-Image"
    rows = [_row(i, "Surrel-Fantasy-Image") for i in range(5)]
    rows[2]["instruction"] = "prompt \ud800 2"
    _write_jsonl(sur / "conflict.jsonl", rows)
    (sur / "conflict.jsonl").write_bytes(b"\xef\xbb\xbf" + (sur / "conflict.jsonl").read_bytes())  # a BOM
    with pytest.raises(ie.ImportFailure, match=r"conflict.jsonl:3: invalid JSON line \(not valid Unicode: a lone "
                                               r"surrogate escape"):
        ie.import_echo4o(str(root), str(tmp_path / "o1"), subsets=["surreal"])
    s = ie.import_echo4o(str(root), str(tmp_path / "o2"), subsets=["surreal"], on_error="skip")["surreal"]
    assert s["complete"] and s["records"] == 4 and s["skipped"]["by_reason"]["invalid JSON line"] == 1
    # a BAGEL caption (a JSON string inside a parquet cell)
    src = tmp_path / "bagel"
    src.mkdir()
    _bagel_t2i(src / "p0.parquet", 3)
    t = pq.read_table(src / "p0.parquet").to_pydict()
    t["captions"][1] = '{"c": "bad \\ud800 cap"}'
    pq.write_table(pa.table(t), src / "p0.parquet")
    with pytest.raises(ibp.ImportFailure, match=r"p0.parquet row 1: record not storable \(.*surrogates not allowed"):
        ibp.import_bagel_parquet([str(src)], str(tmp_path / "b1"), kind="t2i")
    m = ibp.import_bagel_parquet([str(src)], str(tmp_path / "b2"), kind="t2i", on_error="skip")
    assert m["complete"] and m["records"] == 2 and m["skipped"]["by_reason"] == {"record not storable": 1}
    monkeypatch.chdir(src)
    m = ibp.import_bagel_parquet(["."], str(tmp_path / "b3"), kind="t2i", on_error="skip")
    assert m["records"] == 2 and sorted(p.name for p in (tmp_path / "b3").iterdir()) == [
        "bagel-00000.array_record", "manifest.json"]
    # an archive whose name is not UTF-8 (latin-1 "é"): its path kept escaped in the records
    os.rename(sur / "images" / "0-3.tar.gz", os.fsencode(sur / "images") + b"/0-3\xe9.tar.gz")
    s = ie.import_echo4o(str(root), str(tmp_path / "o3"), subsets=["surreal"], on_error="skip")["surreal"]
    assert s["complete"] and s["records"] == 4
    assert {x.meta["archive"] for x in RecordReader(tmp_path / "o3" / "surreal")} == {
        "Surrel-Fantasy-Image/images/0-3\\xe9.tar.gz", "Surrel-Fantasy-Image/images/3-5.tar.gz"}
