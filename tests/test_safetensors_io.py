"""The safetensors reader on bad input: a crafted header, index or folder is one SafetensorsError naming the file,
the key and what is wrong (never a traceback, never another tensor's bytes read silently)."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

from echo4o_jax.safetensors_io import (SafetensorsError, SafetensorsFile, ShardedSafetensors, open_checkpoint_file,
                                       write_safetensors)

FC1 = np.arange(4, dtype=np.float32)
FC2 = np.arange(4, 8, dtype=np.float32)


def raw_file(path, header, data: bytes = b"") -> str:
    """A file with exactly this header (any JSON value, or raw bytes) and data: what a writer could get wrong."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return str(path)


def two_tensors(changes: dict | None = None) -> dict:
    """The header of fc1.bias, fc2.bias (F32 [4] each, bytes 0..16 and 16..32); `changes`: key -> fields to
    update in its entry."""
    header = {"fc1.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "fc2.bias": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    for key, fields in (changes or {}).items():
        header[key] = {**header[key], **fields}
    return header


def fc2(**fields) -> dict:
    return two_tensors({"fc2.bias": fields})


DATA = FC1.tobytes() + FC2.tobytes()


def test_valid_files_read_back(tmp_path):
    """Positive control: the writer's files (bf16, empty tensor, metadata) and a header listing the tensors in
    another order than their bytes (allowed by the format) read back exactly."""
    t = {"a": FC1, "empty": np.zeros((0, 3), np.float32), "b": FC2.astype(ml_dtypes.bfloat16),
         "s": np.array(7, np.int64)}
    write_safetensors(tmp_path / "w.safetensors", t, metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert f.metadata == {"format": "pt"} and f.keys() == list(t)
    for k, v in t.items():
        assert f.read(k).dtype == v.dtype and f.read(k).tobytes() == v.tobytes() and f.get(k).shape == v.shape, k
    swapped = {"fc2.bias": two_tensors()["fc2.bias"], "fc1.bias": two_tensors()["fc1.bias"]}
    f = SafetensorsFile(raw_file(tmp_path / "swapped.safetensors", swapped, DATA))
    np.testing.assert_array_equal(f.read("fc2.bias"), FC2)
    np.testing.assert_array_equal(f.get("fc1.bias"), FC1)


# ------------------------------------------------------------------------------------------ offsets and lengths

@pytest.mark.parametrize("header, data, message", [
    (fc2(data_offsets=[0, 16]), DATA,  # fc2 would read fc1's bytes
     r"invalid offset: tensor 'fc2.bias' \(data bytes 0..16\) overlaps 'fc1.bias'"),
    (fc2(data_offsets=[8, 24]), DATA[:24], r"'fc2.bias' .* overlaps 'fc1.bias'"),
    (fc2(data_offsets=[20, 36]), DATA + bytes(4),
     r"'fc2.bias' starts at data byte 20, leaving a gap of 4 bytes after 'fc1.bias'"),
    (two_tensors({"fc1.bias": {"data_offsets": [16, 32]}, "fc2.bias": {"data_offsets": [32, 48]}}), DATA + bytes(16),
     r"'fc1.bias' starts at data byte 16, leaving a gap of 16 bytes at the start"),
    (fc2(data_offsets=[100, 116]), DATA, r"'fc2.bias' starts at data byte 100"),
    (fc2(data_offsets=[32, 16]), DATA, r"'fc2.bias'.*invalid offset.*\[32, 16\]"),
    (fc2(data_offsets=[-16, 0]), DATA, r"'fc2.bias'.*invalid offset"),
    (fc2(shape=[2]), DATA, r"tensor 'fc2.bias' has 16 bytes, expected \(2,\) x float32"),
    (fc2(dtype="F64"), DATA, r"tensor 'fc2.bias' has 16 bytes, expected \(4,\) x float64"),
    (two_tensors(), DATA + b"junk", r"4 bytes after the last tensor's data \(tensor 'fc2.bias' ends at byte"),
    (two_tensors(), DATA[:-4], r"truncated \(tensor 'fc2.bias' ends at byte \d+, file has \d+\)"),
], ids=["same-offsets", "overlap", "gap", "gap-at-start", "beyond-data", "end-before-begin", "negative",
        "shape-vs-bytes", "dtype-vs-bytes", "trailing-bytes", "truncated"])
def test_bad_offsets_and_lengths_refused(tmp_path, header, data, message):
    path = raw_file(tmp_path / "ema.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=re.escape(path) + ".*" + message):
        SafetensorsFile(path)


# ------------------------------------------------------------------------------------------ malformed headers

@pytest.mark.parametrize("header, message", [
    ([], r": a JSON array, expected an object"),
    ("fc1.bias", r": a JSON string, expected an object"),
    (b'{"fc1.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "fc1.bias": {}}',
     r": key 'fc1.bias' appears twice"),
    (b'{"\xff": 1}', r" \(.*utf-8"),
    (two_tensors() | {"fc2.bias": [16, 32]}, r" entry for 'fc2.bias': a JSON array, expected an object"),
    (two_tensors() | {"fc2.bias": {"shape": [4], "data_offsets": [16, 32]}}, r" entry for 'fc2.bias': no dtype$"),
    ({"fc1.bias": {"dtype": "F32"}}, r" entry for 'fc1.bias': no shape / data_offsets"),
    (fc2(dtype="F8_E4M3"), r" entry for 'fc2.bias': dtype 'F8_E4M3' is not one of F64, F32"),
    (fc2(dtype=3), r" entry for 'fc2.bias': dtype 3 is not one of"),
    (fc2(dtype=["F32"]), r" entry for 'fc2.bias': dtype \['F32'\] is not one of"),
    (fc2(shape="4"), r" entry for 'fc2.bias': shape '4' is not a list of non-negative integers"),
    (fc2(shape=[4.0]), r" entry for 'fc2.bias': shape \[4.0\] is not a list"),
    (fc2(shape=[-4]), r" entry for 'fc2.bias': shape \[-4\] is not a list"),
    (fc2(shape=[True]), r" entry for 'fc2.bias': shape \[True\] is not a list"),
    (fc2(shape=None), r" entry for 'fc2.bias': shape None is not a list"),
    (fc2(data_offsets=["16", "32"]), r" entry for 'fc2.bias': data_offsets \['16', '32'\] is not \[begin"),
    (fc2(data_offsets=[16, 32, 48]), r" entry for 'fc2.bias': data_offsets \[16, 32, 48\] is not"),
    (fc2(data_offsets=16), r" entry for 'fc2.bias': data_offsets 16 is not \[begin, end\]"),
    (two_tensors() | {"__metadata__": ["format", "pt"]}, r": __metadata__ is a JSON array, expected an object"),
    (two_tensors() | {"__metadata__": {"format": "pt", "step": 3}}, r": __metadata__ entry 'step' is 3, expected a st"),
], ids=["list", "string", "duplicate-key", "not-utf8", "entry-list", "no-dtype", "no-shape-offsets", "dtype-unknown",
        "dtype-int", "dtype-list", "shape-str", "shape-float", "shape-negative", "shape-bool", "shape-null",
        "offsets-str", "offsets-three", "offsets-int", "metadata-list", "metadata-int"])
def test_malformed_header_refused(tmp_path, header, message):
    path = raw_file(tmp_path / "ema.safetensors", header, DATA)
    with pytest.raises(SafetensorsError, match=re.escape(path) + ": corrupt header" + message):
        SafetensorsFile(path)


def test_open_checkpoint_file_refuses_a_list_header(tmp_path):
    """The case an audit found as a TypeError: an ema header that is valid JSON but a list."""
    path = raw_file(tmp_path / "ema.safetensors", [1, 2], DATA)
    with pytest.raises(SafetensorsError, match=re.escape(path) + ": corrupt header: a JSON array"):
        open_checkpoint_file(tmp_path, "ema.safetensors")


# ------------------------------------------------------------------------------------------ sharded checkpoints

def sharded(folder, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str]) -> str:
    """Shard files with these tensors and ema.safetensors.index.json with this weight_map; returns the index."""
    folder.mkdir(exist_ok=True)
    for name, tensors in shards.items():
        write_safetensors(folder / name, tensors)
    index = folder / "ema.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(index)


S1, S2 = "ema-00001-of-00002.safetensors", "ema-00002-of-00002.safetensors"


def test_sharded_reads_each_key_from_the_shard_the_index_names(tmp_path):
    sharded(tmp_path, {S1: {"fc1.bias": FC1}, S2: {"fc2.bias": FC2}}, {"fc1.bias": S1, "fc2.bias": S2})
    f = open_checkpoint_file(tmp_path, "ema.safetensors")
    assert isinstance(f, ShardedSafetensors) and f.keys() == ["fc1.bias", "fc2.bias"]
    np.testing.assert_array_equal(f.read("fc1.bias"), FC1)
    np.testing.assert_array_equal(f.get("fc2.bias"), FC2)
    assert f.nbytes("fc2.bias") == 16 and f.files()[1:] == [str(tmp_path / S1), str(tmp_path / S2)]


def test_stale_copy_in_another_shard_refused(tmp_path):
    """fc1.bias is assigned to shard 1; shard 2 (sorted last) also holds an old copy, which used to win."""
    stale = np.full(4, -1, np.float32)
    index = sharded(tmp_path, {S1: {"fc1.bias": FC1}, S2: {"fc2.bias": FC2, "fc1.bias": stale}},
                    {"fc1.bias": S1, "fc2.bias": S2})
    with pytest.raises(SafetensorsError, match=re.escape(index) + r": tensor 'fc1.bias' is in shard "
                       + re.escape(str(tmp_path / S2)) + " as well as in " + re.escape(str(tmp_path / S1))):
        open_checkpoint_file(tmp_path, "ema.safetensors")


def test_tensor_missing_from_the_weight_map_refused(tmp_path):
    index = sharded(tmp_path, {S1: {"fc1.bias": FC1}, S2: {"fc2.bias": FC2, "extra": FC2}},
                    {"fc1.bias": S1, "fc2.bias": S2})
    with pytest.raises(SafetensorsError, match=re.escape(index) + r": tensor 'extra' in shard "
                       + re.escape(str(tmp_path / S2)) + r" is not in the index's weight_map"):
        ShardedSafetensors(index)


def test_missing_shard_and_key_absent_from_its_shard(tmp_path):
    """The messages these cases had before stay."""
    sharded(tmp_path, {S1: {"fc1.bias": FC1}}, {"fc1.bias": S1, "fc2.bias": S2})
    with pytest.raises(SafetensorsError, match=re.escape(str(tmp_path / S2)) + ": file not found"):
        open_checkpoint_file(tmp_path, "ema.safetensors")
    index = sharded(tmp_path, {S1: {"fc1.bias": FC1}, S2: {"fc2.bias": FC2}}, {"fc1.bias": S1, "fc3.bias": S2})
    with pytest.raises(SafetensorsError, match=re.escape(index) + r": 1 keys listed in the index are absent from "
                       r"their shards, e.g. \['fc3.bias'\]"):
        open_checkpoint_file(tmp_path, "ema.safetensors")


@pytest.mark.parametrize("index, message", [
    (b"{not json", r" \("),
    ([], r": a JSON array, expected an object"),
    ({"metadata": {}}, r": no weight_map"),
    ({"weight_map": [["fc1.bias", S1]]}, r": weight_map is a JSON array, expected an object"),
    ({"weight_map": None}, r": weight_map is a JSON null"),
    ({"weight_map": {"fc1.bias": 1}}, r": weight_map\['fc1.bias'\] is 1, expected a shard file name"),
    ({"weight_map": {"fc1.bias": None}}, r": weight_map\['fc1.bias'\] is None, expected a shard file name"),
    ({"weight_map": {"fc1.bias": "sub/" + S1}}, r": weight_map\['fc1.bias'\] is 'sub/ema-.*', expected a file name in"),
    ({"weight_map": {"fc1.bias": "../" + S1}}, r": weight_map\['fc1.bias'\] is '\.\./ema-.*', expected a file name"),
    ({"weight_map": {"fc1.bias": ".."}}, r": weight_map\['fc1.bias'\] is '\.\.', expected a file name"),
    ({"weight_map": {"fc1.bias": "/etc/passwd"}}, r": weight_map\['fc1.bias'\] is '/etc/passwd', expected a file"),
    ({"weight_map": {"fc1.bias": "..\\" + S1}}, r": weight_map\['fc1.bias'\] is .*, expected a file name in"),
    ({"weight_map": {"fc1.bias": ""}}, r": weight_map\['fc1.bias'\] is '', expected a file name in"),
    (b'{"weight_map": {"fc1.bias": "a", "fc1.bias": "b"}}', r": key 'fc1.bias' appears twice"),
], ids=["not-json", "list", "no-weight-map", "weight-map-list", "weight-map-null", "shard-int", "shard-null",
        "subfolder", "dotdot-slash", "dotdot", "absolute", "backslash", "empty", "duplicate-key"])
def test_malformed_index_refused(tmp_path, index, message):
    sub = tmp_path / "ckpt"
    sub.mkdir()
    write_safetensors(sub / S1, {"fc1.bias": FC1})
    write_safetensors(tmp_path / S1, {"fc1.bias": FC2})  # what `../` would reach
    path = sub / "ema.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    with pytest.raises(SafetensorsError, match=re.escape(str(path)) + ": corrupt index" + message):
        open_checkpoint_file(sub, "ema.safetensors")


def test_single_file_and_index_side_by_side_refused(tmp_path):
    """Which copy is meant cannot be told: the single file used to be taken silently."""
    sharded(tmp_path, {S1: {"fc1.bias": FC1}}, {"fc1.bias": S1})
    write_safetensors(tmp_path / "ema.safetensors", {"fc1.bias": FC2})
    with pytest.raises(SafetensorsError, match=re.escape(str(tmp_path / "ema.safetensors")) + ": both this file "
                       r"and ema.safetensors.index.json \(its sharded form\) are in"):
        open_checkpoint_file(tmp_path, "ema.safetensors")
