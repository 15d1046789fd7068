"""Memory-mapped safetensors reading (one tensor at a time, bfloat16 included) and writing.

Reading goes through the file header and `numpy.memmap`, so a 27 GB checkpoint is never loaded
whole. A truncated or corrupt file raises `SafetensorsError` naming the file. A folder may hold one
file or several shards with a `*.safetensors.index.json` (`weight_map`: key -> shard file).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "SafetensorsFile", "ShardedSafetensors", "open_checkpoint_file", "write_safetensors"]

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or corrupt (the message names the file)."""


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise SafetensorsError(f"{self.path}: corrupt or truncated header (length {n}, file size {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries = {}
        for key, info in header.items():
            try:
                dt = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt header entry for {key!r}") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has {end - start} bytes, expected {shape} x {dt}")
            if self._base + end > size:
                raise SafetensorsError(
                    f"{self.path}: truncated (tensor {key!r} ends at byte {self._base + end}, file has {size})")
            self._entries[key] = (dt, shape, start)
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self) -> dict[str, tuple[tuple, str]]:
        """key -> (shape, numpy dtype name)."""
        return {k: (s, dt.name) for k, (dt, s, _) in self._entries.items()}

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        dt, shape, start = self._entries[key]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return self._mm[self._base + start: self._base + start + n].view(dt).reshape(shape)

    def nbytes(self, key: str) -> int:
        dt, shape, _ = self._entries[key]
        return int(np.prod(shape, dtype=np.int64)) * dt.itemsize


class ShardedSafetensors:
    """Several shards behind one `*.safetensors.index.json`, presented as one file."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        try:
            with open(self.path) as f:
                weight_map = json.load(f)["weight_map"]
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt index ({e!r})") from None
        folder = os.path.dirname(self.path)
        self._files = {name: SafetensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
        self._where = {}
        for name, f in self._files.items():
            for k in f.keys():
                self._where[k] = f
        missing = [k for k, name in weight_map.items() if k not in self._files[name].info()]
        if missing:
            raise SafetensorsError(f"{self.path}: {len(missing)} keys listed in the index are absent from their shards, e.g. {missing[:5]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self) -> dict[str, tuple[tuple, str]]:
        out = {}
        for f in self._files.values():
            out.update(f.info())
        return out

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)


def open_checkpoint_file(folder: str | os.PathLike, name: str):
    """`folder/name` (e.g. ema.safetensors) or its sharded form `folder/name.index.json`."""
    folder = os.fspath(folder)
    single = os.path.join(folder, name)
    index = single + ".index.json"
    if os.path.exists(single):
        return SafetensorsFile(single)
    if os.path.exists(index):
        return ShardedSafetensors(index)
    raise SafetensorsError(f"{single}: file not found (nor {os.path.basename(index)})")


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (an iterable of (key, array), consumed twice: shapes first, then data)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for key, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"{path}: cannot write dtype {dt} for {key!r}")
        n = arr.size * dt.itemsize
        header[key] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
