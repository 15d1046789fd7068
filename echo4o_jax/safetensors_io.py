"""Memory-mapped safetensors reading (one tensor at a time, bfloat16 included) and writing.

Reading goes through the file header and `numpy.memmap`, so a 27 GB checkpoint is never loaded
whole. A truncated or corrupt file raises `SafetensorsError` naming the file. A folder may hold one
file or several shards with a `*.safetensors.index.json` (`weight_map`: key -> shard file).

`get` returns a memory-mapped view (pages stay resident while mapped); `read` copies one tensor into
a fresh array with plain file reads, so a converter that reads a whole file tensor by tensor keeps
its resident memory at one tensor. Writing streams too: `write_safetensors_stream` takes the key /
shape / dtype list first and asks for one tensor at a time; `write_safetensors_sharded` splits by a
maximum shard size and writes the HF index (`metadata.total_size`, `weight_map`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "SafetensorsFile", "ShardedSafetensors", "open_checkpoint_file", "write_safetensors",
           "write_safetensors_stream", "write_safetensors_sharded", "parse_size", "TensorSpec"]

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

    def read(self, key: str) -> np.ndarray:
        """One tensor copied into a fresh array with plain file reads (no mapping stays resident)."""
        dt, shape, start = self._entries[key]
        out = np.empty(shape, dt)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        n = len(buf)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._base + start)
                got = 0
                while got < n:
                    k = f.readinto(buf[got:])
                    if not k:
                        raise SafetensorsError(f"{self.path}: truncated while reading tensor {key!r} "
                                               f"({got} of {n} bytes)")
                    got += k
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        return out

    def files(self) -> list[str]:
        return [self.path]


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

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def files(self) -> list[str]:
        return [self.path] + [f.path for f in self._files.values()]


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


class TensorSpec(NamedTuple):
    key: str
    shape: tuple
    dtype: np.dtype


def _header(path, specs: Sequence[TensorSpec], metadata) -> tuple[bytes, int]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for key, shape, dtype in specs:
        dt = np.dtype(dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"{path}: cannot write dtype {dt} for {key!r}")
        if key in header:
            raise SafetensorsError(f"{path}: duplicate key {key!r}")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[key] = {"dtype": _NAMES[dt], "shape": [int(d) for d in shape], "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return blob, off


def write_safetensors_stream(path: str | os.PathLike, specs: Sequence[TensorSpec | tuple],
                             produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None,
                             on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write a safetensors file one tensor at a time: the header comes from `specs` (key, shape,
    dtype), then `produce(key)` is called for each key in order and returns either the array (that
    shape and dtype) or an iterator of row blocks (that dtype, C order, concatenating to the tensor)
    so a big tensor need not exist whole. Written to `path.tmp`, renamed at the end. Returns the data
    size in bytes."""
    path = os.fspath(path)
    specs = [TensorSpec(k, tuple(int(d) for d in s), np.dtype(dt)) for k, s, dt in specs]
    blob, total = _header(path, specs, metadata)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dt in specs:
                arr = produce(key)
                want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                if isinstance(arr, np.ndarray):
                    if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dt:
                        raise SafetensorsError(f"{path}: tensor {key!r} is {arr.dtype}{list(arr.shape)}, "
                                               f"announced {dt}{list(shape)}")
                    arr = (arr,)
                n = 0
                for block in arr:
                    if np.dtype(block.dtype) != dt or (block.ndim and tuple(block.shape[1:]) != shape[1:]):
                        raise SafetensorsError(f"{path}: block of {key!r} is {block.dtype}{list(block.shape)}, "
                                               f"announced {dt}{list(shape)}")
                    data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
                    f.write(memoryview(data))
                    n += data.nbytes
                    del block, data
                if n != want:
                    raise SafetensorsError(f"{path}: tensor {key!r} has {n} bytes, announced {want}")
                if on_tensor is not None:
                    on_tensor(key, n)
                del arr
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return total


def write_safetensors_sharded(folder: str | os.PathLike, name: str, specs: Sequence[TensorSpec | tuple],
                              produce: Callable[[str], np.ndarray], *, max_shard_size: int | None = None,
                              metadata: Mapping[str, str] | None = None,
                              on_tensor: Callable[[str, int], None] | None = None) -> list[str]:
    """`folder/name` as one file, or (with `max_shard_size` in bytes, when more than one shard is
    needed) `stem-00001-of-0000N.safetensors` shards plus `name.index.json` in the Hugging Face format.
    A tensor larger than the limit gets a shard of its own. Returns the file names written."""
    folder = os.fspath(folder)
    specs = [TensorSpec(k, tuple(int(d) for d in s), np.dtype(dt)) for k, s, dt in specs]
    sizes = [int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs]
    groups: list[list[int]] = [[]]
    cur = 0
    for i, n in enumerate(sizes):
        if max_shard_size is not None and groups[-1] and cur + n > max_shard_size:
            groups.append([])
            cur = 0
        groups[-1].append(i)
        cur += n
    if len(groups) == 1:
        write_safetensors_stream(os.path.join(folder, name), specs, produce, metadata, on_tensor)
        return [name]
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    names = [f"{stem}-{j + 1:05d}-of-{len(groups):05d}.safetensors" for j in range(len(groups))]
    weight_map = {}
    for shard, idx in zip(names, groups):
        write_safetensors_stream(os.path.join(folder, shard), [specs[i] for i in idx], produce, metadata, on_tensor)
        weight_map.update({specs[i].key: shard for i in idx})
    index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
    with open(os.path.join(folder, name + ".index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return names + [name + ".index.json"]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1024' (bytes) -> bytes, as Hugging Face's max_shard_size."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MiB, 1000000)") from None
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors held in memory (a mapping or a list of (key, array))."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    lookup = dict(items)
    write_safetensors_stream(path, [(k, a.shape, a.dtype) for k, a in items], lookup.__getitem__, metadata)
