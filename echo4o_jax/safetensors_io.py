"""Memory-mapped safetensors reading (one tensor at a time, bfloat16 included) and writing.

Reading goes through the file header and `numpy.memmap`, so a 27 GB checkpoint is never loaded
whole. A truncated or corrupt file raises `SafetensorsError` naming the file: the header is checked on
opening as the `safetensors` library checks it (well-formed entries, byte ranges tiling the data without
gaps or overlaps, lengths matching dtype x shape). A folder may hold one file or several shards with a
`*.safetensors.index.json` (`weight_map`: key -> shard file); each key is read from the shard it names.

`get` returns a memory-mapped view (pages stay resident while mapped); `read` copies one tensor into
a fresh array with plain file reads, so a converter that reads a whole file tensor by tensor keeps
its resident memory at one tensor. Writing streams too: `write_safetensors_stream` takes the key /
shape / dtype list first and asks for one tensor at a time; `write_safetensors_sharded` splits by a
maximum shard size and writes the HF index (`metadata.total_size`, `weight_map`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from .paths import atomic_write

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


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _show(value, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters (a corrupt header may hold anything, of any size)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    """A JSON integer (not a bool, a float or a numeric string: the format stores plain integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(path: str, text: bytes, what: str) -> dict:
    """`text` parsed as a JSON object, or a SafetensorsError naming `path` and `what` (header, index). A key
    given twice is refused: `json` would keep the last one silently, hiding which of two tensors is meant."""
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise SafetensorsError(f"{path}: corrupt {what}: key {k!r} appears twice")
            out[k] = v
        return out
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: corrupt {what} ({e})") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{path}: corrupt {what}: a JSON {_JSON_KINDS.get(type(obj), '?')}, "
                               f"expected an object")
    return obj


def _metadata(path: str, meta) -> dict[str, str]:
    """The header's `__metadata__`: absent / null, or an object of strings (as the format defines it)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SafetensorsError(f"{path}: corrupt header: __metadata__ is a JSON {_JSON_KINDS.get(type(meta), '?')}, "
                               f"expected an object of strings")
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise SafetensorsError(f"{path}: corrupt header: __metadata__ entry {bad[0]!r} is {_show(meta[bad[0]])}, "
                               f"expected a string")
    return meta


def _entry(path: str, key: str, info) -> tuple[np.dtype, tuple, int, int]:
    """One tensor's header entry checked: (dtype, shape, begin, end), where end - begin is the byte length
    that dtype x shape needs. Anything else is a SafetensorsError naming the file and the key."""
    where = f"{path}: corrupt header entry for {key!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: a JSON {_JSON_KINDS.get(type(info), '?')}, expected an object with "
                               f"dtype, shape and data_offsets")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
    if missing:
        raise SafetensorsError(f"{where}: no {' / '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SafetensorsError(f"{where}: dtype {_show(dtype)} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape {_show(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets {_show(offsets)} is not [begin, end] (two integers)")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: invalid offset: data_offsets {offsets} (needs 0 <= begin <= end)")
    dt, shape = _DTYPES[dtype], tuple(shape)
    if end - begin != math.prod(shape) * dt.itemsize:
        raise SafetensorsError(f"{path}: tensor {key!r} has {end - begin} bytes, expected {shape} x {dt} "
                               f"({math.prod(shape) * dt.itemsize} bytes)")
    return dt, shape, begin, end


def _check_layout(path: str, spans: list[tuple[int, int, str]], base: int, size: int) -> None:
    """The tensors' byte ranges (begin, end, key), sorted by begin, must tile the data buffer (file bytes
    `base`..`size`) from 0 without gaps or overlaps, as the format requires and the `safetensors` library
    checks ("invalid offset"): two keys sharing bytes would both read the same values, a gap or trailing
    bytes mean the header and the data disagree. A last end beyond the file is a truncated file."""
    pos, prev = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise SafetensorsError(f"{path}: invalid offset: tensor {key!r} (data bytes {begin}..{end}) overlaps "
                                   f"{prev!r} (which ends at {pos})")
        if begin > pos:
            after = f"after {prev!r} (which ends at {pos})" if prev is not None else "at the start of the data"
            raise SafetensorsError(f"{path}: invalid offset: tensor {key!r} starts at data byte {begin}, leaving a "
                                   f"gap of {begin - pos} bytes {after}")
        pos, prev = end, key
    if base + pos > size:
        raise SafetensorsError(f"{path}: truncated (tensor {prev!r} ends at byte {base + pos}, file has {size})")
    if base + pos < size:
        last = f"tensor {prev!r} ends at byte {base + pos}" if prev is not None else f"the header ends at byte {base}"
        raise SafetensorsError(f"{path}: corrupt: {size - base - pos} bytes after the last tensor's data ({last}, "
                               f"file has {size}); the header does not describe them")


class SafetensorsFile:
    """One safetensors file. The header is checked when the file is opened (entries well formed, byte
    ranges tiling the data, lengths matching dtype x shape, file not truncated), so reading a tensor later
    cannot return another tensor's bytes or run past the end."""

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
                text = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        header = _json_object(self.path, text, "header")
        self.metadata = _metadata(self.path, header.pop("__metadata__", None))
        self._base = 8 + n
        self._entries = {}
        spans = []
        for key, info in header.items():
            dt, shape, begin, end = _entry(self.path, key, info)
            self._entries[key] = (dt, shape, begin)
            spans.append((begin, end, key))
        _check_layout(self.path, spans, self._base, size)
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


def _shard_name(path: str, key: str, name) -> str:
    """A shard file named by the index: a plain file name in the index's folder. Anything else (not a
    string, a path with a separator, absolute, `.` / `..`) is refused: it could read a file elsewhere."""
    if not isinstance(name, str):
        raise SafetensorsError(f"{path}: corrupt index: weight_map[{key!r}] is {_show(name)}, expected a shard "
                               f"file name (a string)")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name)
            or (os.altsep and os.altsep in name)):
        raise SafetensorsError(f"{path}: corrupt index: weight_map[{key!r}] is {_show(name)}, expected a file name in "
                               f"the index's folder (no path)")
    return name


class ShardedSafetensors:
    """Several shards behind one `*.safetensors.index.json`, presented as one file. Each key is read from
    the shard the index's `weight_map` names; a shard holding a key the index assigns elsewhere (a stale
    copy) or does not list at all is refused, so which values are read never depends on the file order."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        index = _json_object(self.path, text, "index")
        if "weight_map" not in index:
            raise SafetensorsError(f"{self.path}: corrupt index: no weight_map (key -> shard file)")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"{self.path}: corrupt index: weight_map is a JSON "
                                   f"{_JSON_KINDS.get(type(weight_map), '?')}, expected an object (key -> shard file)")
        for key, name in weight_map.items():
            _shard_name(self.path, key, name)
        folder = os.path.dirname(self.path)
        self._files = {name: SafetensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
        missing = [k for k, name in weight_map.items() if k not in self._files[name]._entries]
        if missing:
            raise SafetensorsError(f"{self.path}: {len(missing)} keys listed in the index are absent from their "
                                   f"shards, e.g. {missing[:5]}")
        self._where = {}
        for name, f in self._files.items():
            for k in f.keys():
                if k not in weight_map:
                    raise SafetensorsError(f"{self.path}: tensor {k!r} in shard {f.path} is not in the index's "
                                           f"weight_map (a stale or foreign tensor?)")
                if weight_map[k] != name:
                    raise SafetensorsError(f"{self.path}: tensor {k!r} is in shard {f.path} as well as in "
                                           f"{self._files[weight_map[k]].path}, the shard the index assigns it to "
                                           f"(a stale copy?)")
                self._where[k] = f

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
    """`folder/name` (e.g. ema.safetensors) or its sharded form `folder/name.index.json`. A folder holding
    both is refused: which of the two copies of the weights is meant cannot be told (one may be stale)."""
    folder = os.fspath(folder)
    single = os.path.join(folder, name)
    index = single + ".index.json"
    if os.path.exists(single) and os.path.exists(index):
        raise SafetensorsError(f"{single}: both this file and {os.path.basename(index)} (its sharded form) are in "
                               f"{folder}: remove the one that is not meant")
    if os.path.exists(single):
        return SafetensorsFile(single)
    if os.path.exists(index):
        return ShardedSafetensors(index)
    for p in (single, index):  # (a copied Hugging Face cache snapshot: its relative links to ../../blobs break)
        if os.path.islink(p):
            raise SafetensorsError(f"{p}: a broken symbolic link (to {os.readlink(p)}, which does not exist)")
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
    so a big tensor need not exist whole. Written whole or not at all (`paths.atomic_write`). Returns the
    data size in bytes."""
    path = os.fspath(path)
    specs = [TensorSpec(k, tuple(int(d) for d in s), np.dtype(dt)) for k, s, dt in specs]
    blob, total = _header(path, specs, metadata)

    def write(f) -> None:
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

    atomic_write(path, write)  # whole or not at all
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
