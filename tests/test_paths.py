"""`echo4o_jax.paths.atomic_write` / `file_sha256`, and the writers that go through them: a file is written
whole or not at all, and a failure leaves neither a cut-short file nor a temporary one behind."""

import hashlib
import os
import threading

import pytest

from echo4o_jax.eval.judge import JudgeCache
from echo4o_jax.paths import atomic_write, file_sha256, write_json
from echo4o_jax.safetensors_io import write_safetensors_stream


def test_atomic_write_bytes_str_and_writer(tmp_path):
    p = atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01")  # the parent folder is created
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, "é\n")
    assert p.read_bytes() == "é\n".encode("utf-8")
    atomic_write(p, lambda f: f.write(b"xyz"), fsync=False)
    assert p.read_bytes() == b"xyz"
    assert sorted(os.listdir(p.parent)) == ["b.bin"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, exc):
    p = tmp_path / "f.json"
    p.write_text("old")

    def writer(f):
        f.write(b"half of the new")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(p, writer)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_threads_use_their_own_temporary_files(tmp_path):
    p = tmp_path / "same.txt"
    barrier = threading.Barrier(4)
    errors = []

    def write(i):
        def writer(f):
            f.write(f"{i}-".encode())
            barrier.wait()  # all four hold their temporary file open at once
            f.write(f"{i}".encode())
        try:
            atomic_write(p, writer)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    i = p.read_text().split("-")[0]
    assert p.read_text() == f"{i}-{i}"  # one writer's whole content, not a mix
    assert os.listdir(tmp_path) == ["same.txt"]


def test_file_sha256_reads_in_chunks(tmp_path):
    data = os.urandom((1 << 22) + 17)  # more than one chunk
    p = tmp_path / "x"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_judge_cache_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = JudgeCache(tmp_path / "cache")
    cache.put("ab" + "0" * 62, {"answer": "old"})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        cache.put("ab" + "1" * 62, {"answer": "new"})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cache" / "ab").iterdir()) == ["ab" + "0" * 62 + ".json"]


def test_safetensors_stream_error_keeps_the_old_file(tmp_path):
    import numpy as np

    p = tmp_path / "m.safetensors"
    p.write_bytes(b"old")
    with pytest.raises(Exception, match="announced"):
        write_safetensors_stream(p, [("w", (2, 2), np.float32)], lambda k: np.zeros((3, 2), np.float32))
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_write_json_is_indented_with_a_newline(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": [1], "é": 2}, indent=2, ensure_ascii=False)
    assert p.read_text(encoding="utf-8") == '{\n  "a": [\n    1\n  ],\n  "é": 2\n}\n'
    write_json(p, {"b": 1}, fsync=False)
    assert p.read_text() == '{\n "b": 1\n}\n' and os.listdir(tmp_path) == ["m.json"]
