"""Weight conversion both ways, streaming: official PyTorch BAGEL / Echo-4o folder <-> Orbax.

    convert_to_orbax("BAGEL-7B-MoT", "bagel_jax", dtype="bfloat16")
    convert_to_official("bagel_jax", "bagel_torch")                       # a converted folder
    convert_to_official("workdir", "out", weights="ema", step=None)      # a training workdir

Both directions are driven by the one key table (`bagel_key_rules`, `vae_key_rules`); the inverse is
the table's own `Transform.to_official`. Everything is validated before anything is written (one
`CheckpointMismatchError` listing missing / unexpected / mis-shaped / wrongly-typed keys, first 20
of each with counts; `SafetensorsError` naming a truncated or corrupt file; `ConfigError` for a
missing config); the output is written into a temporary sibling folder and renamed at the end, so
`out` is untouched on any error. An existing non-empty `out` is refused unless `overwrite=True`, and then
unless it is an earlier output of the same direction (a converted / an official folder: the whole folder is
replaced, so a mistyped `out` never deletes other files); an
`out` that is the source, contains it or lies inside it (real paths: symlinks and bind mounts seen
through, the files read included) is always refused (`SourceOverlapError`), before anything is written.
An `out` that is a symlink to a folder is written through: the export lands in the link's target.

Memory: a few official tensors at a time (measured: about 2x the largest one above the baseline, the tensor
being written and the next, read ahead; for the 7B model a few GB). Safetensors are read with plain file
reads (`read`), and a
stacked Flax array ([num_layers, ...]) is never assembled: it is written to Orbax through a
TypeHandler that fills the tensorstore array block by block (zarr chunks of ~CHUNK_BYTES rows that
never span two layers), so the result is an ordinary Orbax PyTree checkpoint (OCDBT, zarr) that
`restore_bagel` reads onto any mesh. A background thread reads and transposes the next tensor while
tensorstore compresses and writes the current one. The way back reads one layer at a time (or the
layer group of a chunk, for checkpoints chunked otherwise) and streams the safetensors out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import logging
import os
import pathlib
import queue
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx

from . import __version__
from . import checkpoint as ck
from .interrupts import Terminated
from .paths import write_json
from .config import BagelConfig
from .model import keymap
from .model.bagel import Bagel, bagel_key_rules
from .model.loading import LOADABLE_DTYPES, flax_shapes
from .model.vae import AutoEncoder, vae_key_rules
from .paths import pid_running
from .safetensors_io import (open_checkpoint_file, write_safetensors_sharded,
                             write_safetensors_stream)

__all__ = [
    "OutputExistsError",
    "SourceOverlapError",
    "StreamedArray",
    "save_streamed",
    "convert_to_orbax",
    "convert_to_official",
    "CHUNK_BYTES",
]

CHUNK_BYTES = 32 * 2**20  # zarr chunk size target (rows of one layer); several chunks compress in parallel
INFLIGHT_BYTES = 2 * CHUNK_BYTES  # block writes in flight in tensorstore
SAFETENSORS_METADATA = {"format": "pt"}  # what torch / accelerate loaders expect


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty (pass overwrite=True / --overwrite)."""


class OutputError(ValueError):
    """The output folder cannot be made or written (a file on its path, no permission)."""


class SourceOverlapError(ValueError):
    """The output folder is the source, contains it or lies inside it (replacing it would delete the source)."""


# ------------------------------------------------------------------------------------------ helpers


def _all_or_mismatch(*builders) -> list:
    """Run every builder; raise one CheckpointMismatchError holding all their mismatches."""
    errors: list[str] = []
    out = []
    for build in builders:
        try:
            out.append(build())
        except keymap.CheckpointMismatchError as e:
            errors.append(str(e))
    if errors:
        raise keymap.CheckpointMismatchError("\n".join(errors))
    return out


def _row_blocks(t: keymap.Transform, x: np.ndarray, rows: int, official: bool) -> Iterator[np.ndarray]:
    """Row blocks (axis 0) of `t.to_flax(x)` (or `t.to_official(x)`), `rows` at a time. A matrix
    transpose is done block by block from `x` (the whole transposed copy never exists); any other
    transform is applied whole first."""
    if t is keymap.LINEAR and x.ndim == 2:
        for r0 in range(0, x.shape[1], rows):
            yield keymap.swap_last2(x[:, r0: r0 + rows])
        return
    y = t.to_official(x) if official else t.to_flax(x)
    if y.ndim == 0:
        yield y
        return
    for r0 in range(0, y.shape[0], rows):
        yield y[r0: r0 + rows]


def _rows_for(shape: tuple, dtype) -> int:
    """Rows of a [rows, ...] block of about CHUNK_BYTES."""
    if len(shape) == 0:
        return 1
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(shape[0], CHUNK_BYTES // max(row, 1))))


_END = object()


def _prefetched(items: Callable[[], Iterator], depth: int = 1) -> Iterator:
    """Iterate `items()` in a background thread, `depth` items ahead (reading and transposing the
    next tensor overlaps compressing / writing the current one; numpy and tensorstore release the
    GIL). Exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run():
        try:
            for it in items():
                while not stop.is_set():
                    try:
                        q.put((it, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                del it  # do not keep the item alive while producing the next one
                if stop.is_set():
                    return
            q.put((_END, None))
        except BaseException as e:  # handed to the consumer
            q.put((_END, e))

    th = threading.Thread(target=run, daemon=True, name="convert-prefetch")
    th.start()
    try:
        while True:
            it, err = q.get()
            if it is _END:
                if err is not None:
                    raise err
                return
            yield it
            del it
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)


class _PrefetchProducer:
    """`produce(key)` for the safetensors writer, computed one key ahead in a background thread, with
    at most `budget` bytes of finished tensors alive at once (a big tensor is never produced while
    another big one is still being written: peak memory stays at one big tensor's working set)."""

    def __init__(self, specs: list[tuple[str, tuple, np.dtype]], produce: Callable[[str], np.ndarray]):
        sizes = {k: int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for k, s, d in specs}
        self._budget = max(sizes.values(), default=0)
        self._sizes, self._held, self._prev = sizes, 0, None
        self._cond = threading.Condition()
        keys = [k for k, _, _ in specs]

        def items():
            for k in keys:
                with self._cond:
                    self._cond.wait_for(lambda: self._held == 0 or self._held + sizes[k] <= self._budget)
                    self._held += sizes[k]
                yield k, produce(k)

        self._it = _prefetched(items)

    def _release(self, key) -> None:
        with self._cond:
            self._held -= self._sizes[key]
            self._cond.notify_all()

    def __call__(self, key: str) -> np.ndarray:
        if self._prev is not None:  # the writer asks for the next tensor: the previous one is written
            self._release(self._prev)
            self._prev = None
        k, arr = next(self._it)
        if k != key:
            raise RuntimeError(f"prefetch out of order: {k} != {key}")
        self._prev = k
        return arr

    def close(self) -> None:
        if self._prev is not None:
            self._release(self._prev)
            self._prev = None
        with self._cond:
            self._held = 0
            self._cond.notify_all()
        self._it.close()


# ------------------------------------------------------------------------------------------ Orbax side


@dataclasses.dataclass
class StreamedArray:
    """An Orbax leaf written block by block: `blocks()` yields (index, array) covering whole chunks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    blocks: Callable[[], Iterator[tuple[tuple, np.ndarray]]]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def _streamed_handler_cls():
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
        """Orbax's NumpyHandler, but the array is filled block by block with the chunk shape given by
        the leaf (the on-disk result is the one of a numpy / sharded array: a zarr array per leaf)."""

        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)
            self.stop = threading.Event()  # set: write no further block (a deferred Ctrl-C, `save_streamed`)

        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            stores = []
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                use_ocdbt = bool(info.is_ocdbt_checkpoint)
                spec = ocp.type_handlers.get_json_tspec_write(
                    info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.chunks,
                    dtype=value.dtype, process_index=jax.process_index() if use_ocdbt else None,
                    metadata_key=self._metadata_key, arg=arg)
                stores.append(await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context))

            def blocks():
                for i, value in enumerate(values):
                    for index, block in value.blocks():
                        yield i, index, block

            it = _prefetched(blocks)
            pending: collections.deque = collections.deque()  # (future, nbytes): writes in flight
            inflight = 0
            try:
                while not self.stop.is_set():
                    item = await asyncio.to_thread(next, it, None)
                    if item is None:
                        break
                    i, index, block = item
                    t = stores[i]
                    pending.append(((t[index] if index != () else t).write(block), block.nbytes))
                    inflight += block.nbytes
                    del item, block
                    # small blocks: many writes in flight (one OCDBT commit for many); big: one at a time
                    while pending and (inflight > INFLIGHT_BYTES or len(pending) > 64):
                        fut, n = pending.popleft()
                        await fut
                        inflight -= n
                while pending:
                    await pending.popleft()[0]
            finally:
                it.close()

    return StreamedArrayHandler


def save_streamed(item_dir, tree, *, compress: bool = True) -> None:
    """Save a pytree whose leaves are `StreamedArray`s as an Orbax PyTree item, one block at a time.
    compress: zstd-1 chunks, Orbax's default (Gaussian-like bf16 weights shrink ~20 %, bf16 values
    widened to fp32 ~50 %; costs CPU time). Restoring reads either."""
    import orbax.checkpoint as ocp
    from etils import epath

    defaults = [(t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types()]
    handler = _streamed_handler_cls()()
    registry = ocp.type_handlers.create_type_handler_registry((StreamedArray, handler), *defaults)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress))
    with _ctrl_c_deferred(handler.stop):
        ckptr.save(epath.Path(os.fspath(item_dir)), args=ocp.args.PyTreeSave(tree))


@contextlib.contextmanager
def _ctrl_c_deferred(stop: threading.Event):
    """Inside: a Ctrl-C sets `stop` (the writer then writes no further block and Orbax's save ends in order),
    and the KeyboardInterrupt is raised on leaving. A KeyboardInterrupt in the middle of an Orbax save left its
    background threads writing, and logging tracebacks, after the caller had removed the folder (which they
    recreated). A second Ctrl-C interrupts at once. A SIGTERM does the same (raising `Terminated`) when the
    command handles it (a Python handler is installed: the conversion commands). Off the main thread (no
    signal handler): nothing changes. Orbax's own log of the error that ends the save (an ERROR with a
    traceback per background thread) is dropped: the save raises that error, which the command reports."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def interruption() -> BaseException:
        return Terminated() if got and got[0] == signal.SIGTERM else KeyboardInterrupt()

    def on_signal(signum, frame):
        if stop.is_set():
            raise interruption()
        got.append(signum)
        stop.set()

    sigs = [signal.SIGINT] + ([signal.SIGTERM] if callable(signal.getsignal(signal.SIGTERM)) else [])
    previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(ck.drop_orbax_thread_errors)
    try:
        yield
    except Exception:
        if stop.is_set():  # Orbax's check of the incomplete save ("params are missing"): the signal is the cause
            raise interruption() from None
        raise
    finally:
        absl_log.removeFilter(ck.drop_orbax_thread_errors)
        for sig, h in previous.items():
            signal.signal(sig, h)
    if stop.is_set():
        raise interruption()


# ------------------------------------------------------------------------------------------ plans


@dataclasses.dataclass
class _Plan:
    """One module (Bagel or AutoEncoder) from one official safetensors source, validated."""

    name: str
    source: Any  # SafetensorsFile | ShardedSafetensors
    entries: list[keymap.KeyEntry]
    shapes: dict[tuple, tuple]
    dtype: np.dtype
    source_dtypes: dict[str, int]

    @property
    def source_bytes(self) -> int:
        return sum(self.source.nbytes(e.key) for e in self.entries)

    @property
    def out_bytes(self) -> int:
        """The converted arrays' bytes (uncompressed): `dtype` may be wider than the source's."""
        return self.num_params * self.dtype.itemsize

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes.values()))

    def tree(self, tick: Callable[[int], None]) -> dict:
        by_path: dict[tuple, list[keymap.KeyEntry]] = {}
        for e in self.entries:
            by_path.setdefault(e.path, []).append(e)
        flat = {}
        for path, shape in self.shapes.items():
            ents = sorted(by_path[path], key=lambda e: -1 if e.layer is None else e.layer)
            flat[path] = self._leaf(shape, ents, tick)
        return ck.unflatten_dict(flat)

    def _leaf(self, shape, ents, tick) -> StreamedArray:
        src, dt = self.source, self.dtype
        shape = tuple(shape)
        if len(shape) == 0:
            (e,) = ents

            def blocks0():
                yield (), np.asarray(e.transform.to_flax(src.read(e.key))).astype(dt)
                tick(src.nbytes(e.key))
            return StreamedArray((), dt, (), blocks0)
        stacked = ents[0].layer is not None
        chunks = _chunk_shape(shape, dt, stacked)
        rows = chunks[int(stacked)] if len(chunks) > int(stacked) else 1

        def blocks():
            for e in ents:  # one official tensor: one layer, or the whole array
                lead = (slice(e.layer, e.layer + 1),) if stacked else ()
                r0 = 0
                for blk in _row_blocks(e.transform, src.read(e.key), rows, official=False):
                    blk = blk.astype(dt, copy=False)
                    if blk.ndim == 0:
                        yield lead, blk[None]
                    else:
                        yield lead + (slice(r0, r0 + blk.shape[0]),), (blk[None] if stacked else blk)
                        r0 += blk.shape[0]
                    del blk
                tick(src.nbytes(e.key))
        return StreamedArray(shape, dt, chunks, blocks)


def _chunk_shape(shape: tuple, dtype: np.dtype, stacked: bool) -> tuple:
    """One layer per chunk for stacked arrays, split in row blocks of about CHUNK_BYTES."""
    body = shape[1:] if stacked else shape
    if len(body) == 0:
        return (1,) if stacked else ()
    return ((1,) if stacked else ()) + (_rows_for(body, dtype),) + tuple(body[1:])


def _default_dtype(info: dict[str, tuple[tuple, str]]) -> np.dtype:
    names = {dt for _, dt in info.values()}
    return np.dtype(names.pop()) if len(names) == 1 else np.dtype("float32")


def _plan(name: str, ctor: Callable[[], nnx.Module], rules: list[keymap.Rule], source, dtype) -> _Plan:
    abstract = nnx.eval_shape(ctor)
    shapes = flax_shapes(abstract)
    entries = keymap.expand_rules(rules)
    uncovered = sorted(set(shapes) - {e.path for e in entries})
    if uncovered:
        raise RuntimeError(f"key table does not cover model variables: {uncovered[:10]}")
    info = source.info()
    keymap.check_tensors(entries, shapes, info, source=source.path, allowed_dtypes=LOADABLE_DTYPES)
    counts: dict[str, int] = {}
    for _, dt in info.values():
        counts[dt] = counts.get(dt, 0) + 1
    out_dt = np.dtype(dtype) if dtype is not None else _default_dtype(info)
    return _Plan(name, source, entries, shapes, out_dt, counts)


# ------------------------------------------------------------------------------------------ output folder


def _fs_ids(p: pathlib.Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `p` and of each of its parent folders that exists, `p` first when it exists (a folder
    reached through symlinks or a bind mount has the same identity as through its real path)."""
    ids = []
    for q in (p, *p.parents):
        try:
            st = q.stat()
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids


def _check_apart(out: pathlib.Path, src: pathlib.Path, paths) -> None:
    """Raise SourceOverlapError when the output folder `out` is, contains or lies inside one of `paths` (the
    source folder `src` or what is read from it), comparing real paths and file identities."""
    o = out.resolve()
    o_ids = _fs_ids(o)
    o_id = o_ids[0] if o.exists() else None
    for p in paths:
        r = p.resolve()
        if not r.exists():
            continue
        r_ids = _fs_ids(r)
        if o_id == r_ids[0]:
            rel = "is"
        elif o_id in r_ids:
            rel = "contains"
        elif r_ids[0] in o_ids:
            rel = "lies inside"
        else:
            continue
        what = f"the source {src}" if p == src else f"{p}, read from the source {src}"
        real = f" (real paths: {o} and {r})" if (o, r) != (out, p) else ""
        raise SourceOverlapError(f"the output folder {out} {rel} {what}{real}: writing it would replace the "
                                 f"source; choose an output folder outside the source (refused with or "
                                 f"without --overwrite)")


def _check_out(out: pathlib.Path, overwrite: bool, src: pathlib.Path, paths, kind: str) -> pathlib.Path:
    """Refuse an `out` that overlaps the source folder `src` or the `paths` read from it (see `_check_apart`),
    that is not a folder, or that is not empty without `overwrite`; with `overwrite`, one that is not an
    earlier output of the same kind (`kind`: "converted" or "official"), or holds files such an output does
    not (`_written_by`): `--overwrite` replaces the whole folder, so a mistyped `--out` must not delete other
    files. Also refused: a mount point (see the message). Returns the real path to write (an `out` symlink is
    written through)."""
    _check_apart(out, src, [src, *paths])
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a folder")
        real = out.resolve()
        if os.path.ismount(real) or real.stat().st_dev != real.parent.stat().st_dev:
            # the output is written beside `out` and renamed to it at the end: a mount point cannot be replaced
            # (the rename failed after the whole conversion, which had filled the parent's disk)
            raise OutputError(f"{out} is a mount point (another file system than its parent's): the conversion "
                              f"is written beside the output folder and renamed to it, which cannot replace a "
                              f"mount point; give a folder inside it, e.g. {out / 'bagel'}")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
            # an official folder this command wrote holds meta.json, which the released BAGEL-7B-MoT download
            # lacks: a mistyped --out naming that download is refused, not replaced
            earlier = (ck.is_converted_dir(out) if kind == "converted" else
                       ck.is_official_dir(out) and (out / ck.META_FILE).is_file())
            if not earlier:
                what = ("a converted folder (llm_config.json + params/)" if kind == "converted" else
                        "an exported folder (llm_config.json + ema.safetensors + meta.json)")
                raise OutputExistsError(f"{out} is not empty and is not {what}: --overwrite replaces only an "
                                        "earlier output of this command, as the whole folder is deleted; choose "
                                        "another --out, or empty this one yourself")
            foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                             if not _written_by(kind, p.name))
            if foreign:  # e.g. an official folder that also holds other files: they would be deleted
                raise OutputExistsError(f"{out} holds {len(foreign)} file(s) that this command does not write "
                                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                                        "--overwrite replaces only an earlier output of this command, as the whole "
                                        "folder is deleted; choose another --out, or move those files away")
    return out.resolve()


_EMA_SHARD = re.compile(r"ema-\d{5}-of-\d{5}\.safetensors")


def _written_by(kind: str, name: str) -> bool:
    """Whether a conversion of `kind` ("converted": to_jax, "official": to_torch) writes the entry `name` of
    its output folder."""
    if name in ck.CONFIG_FILES + ck.TOKENIZER_FILES + (ck.META_FILE,):
        return True
    if kind == "converted":
        return name in (ck.MANIFEST_FILE, ck.PARAMS_ITEM, ck.VAE_ITEM)
    return name in ("ema.safetensors", "ema.safetensors.index.json", "ae.safetensors") or bool(
        _EMA_SHARD.fullmatch(name))


def _side_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The json configs, meta.json and tokenizer files that exist in `folder`."""
    return [folder / n for n in ck.CONFIG_FILES + ck.TOKENIZER_FILES + (ck.META_FILE,) if (folder / n).is_file()]


def _tmp_sibling(out: pathlib.Path) -> pathlib.Path:
    """A new hidden folder beside `out` to write into (renamed to `out` when complete), after the leftovers of
    killed conversions into `out` are removed (`_remove_leftovers`). An OutputError names `out` when it cannot
    be made (a file on the way, no permission, a read-only disk)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        q = out.parent
        while not q.exists() and q != q.parent:
            q = q.parent
        why = f"{q} is a file, not a folder" if q.exists() and not q.is_dir() else (
            f"cannot write in {out.parent} ({e.strerror or e})")
        raise OutputError(f"the output folder {out} cannot be made: {why}") from None
    return tmp


def _leftovers(out: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """[(folder, "tmp" | "old")]: the hidden folders beside `out` (`.OUT.tmp-PID-*`: a conversion's partial
    output; `.OUT.old-PID-*`: the output it was replacing) of conversions whose process PID no longer runs on
    this machine (a kill -9, a crash, a power cut: nothing removed them)."""
    found = []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not pid_running(int(m.group(2))):
            found.append((p, m.group(1)))
    return sorted(found)


def _remove_leftovers(out: pathlib.Path) -> None:
    """Remove the leftovers (`_leftovers`) of killed conversions into `out`, saying so on stderr. An `.old-`
    folder is kept, and reported, while `out` does not exist: the kill came between the two renames that swap
    a new output in, so it holds the last complete output."""
    for p, kind in _leftovers(out):
        if kind == "old" and not out.exists():
            print(f"note: {p} holds the output that an interrupted conversion was replacing ({out} does not exist): "
                  f"it is kept; rename it to {out.name} to use it, or delete it", file=sys.stderr)
            continue
        shutil.rmtree(p, ignore_errors=True)
        print(f"note: removed {p}, left by a conversion into {out} that was killed", file=sys.stderr)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM wait until the block ends (the main thread only; elsewhere nothing changes), and are then
    dropped: the block completes an output, so the command has succeeded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, f: got.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        if got:
            print("note: the output was complete when the signal came; it was finished, not abandoned",
                  file=sys.stderr)


def _finalize(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the complete `tmp` to `out` (replacing an earlier output), with Ctrl-C / SIGTERM deferred: one in
    the middle left `out` missing, or a `.old-` folder behind with "nothing was written" said."""
    with _signals_deferred():
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)


class _Hasher(threading.Thread):
    """sha256 + size of files, in a background thread (hashlib releases the GIL)."""

    def __init__(self, files: list[pathlib.Path], root: pathlib.Path):
        super().__init__(daemon=True)
        self.files, self.root, self.result, self.error = files, root, [], None
        self.stop = threading.Event()

    def run(self):
        try:
            for f in self.files:
                h = hashlib.sha256()
                with open(f, "rb", buffering=0) as fh:
                    buf = bytearray(8 * 2**20)
                    view = memoryview(buf)
                    while (n := fh.readinto(buf)) and not self.stop.is_set():
                        h.update(view[:n])
                if self.stop.is_set():
                    return
                self.result.append({"name": os.path.relpath(f, self.root), "size": f.stat().st_size,
                                    "sha256": h.hexdigest()})
        except Exception as e:  # reported by the caller
            self.error = e


def _progress(total: int, n_tensors: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)
    state = {"n": 0}
    lock = threading.Lock()

    def tick(nbytes: int) -> None:
        with lock:
            state["n"] += 1
            bar.update(nbytes)
            bar.set_postfix_str(f"tensors {state['n']}/{n_tensors}", refresh=False)

    return bar, tick


# ------------------------------------------------------------------------------------------ to Orbax


def convert_to_orbax(src, out, *, dtype=None, vae_dtype=None, overwrite: bool = False, progress: bool = True,
                     hash_files: bool = True, compress: bool = True, weights: str = "ema") -> dict:
    """Official folder `src` -> converted Orbax folder `out` (see `echo4o_jax.checkpoint`).

    weights: "ema" (ema.safetensors, what the official inference and fine-tuning load) or "model" (the
    non-EMA model.safetensors of an official training checkpoint).

    dtype: of the Bagel weights (None: the source's dtype when uniform, else float32); vae_dtype: of
    the VAE (None: likewise from ae.safetensors); hash_files: sha256 of the source files in the
    manifest (computed in a background thread); compress: zstd chunks (see `save_streamed`).
    Returns the manifest."""
    src, out = pathlib.Path(os.fspath(src)).absolute(), pathlib.Path(os.fspath(out)).absolute()
    _check_apart(out, src, [src])  # first: before any message about the source
    if not src.is_dir():
        if src.exists():  # (the weights file given for its folder)
            raise FileNotFoundError(f"{src} is a file: --src is the folder that holds the official checkpoint "
                                    f"(here {src.parent})")
        raise FileNotFoundError(f"source folder not found: {src}")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r}: expected 'ema' or 'model'")
    _check_not_orbax_source(src)
    cfg = BagelConfig.from_checkpoint_dir(src)
    held = {n for n in ("ema", "model") if (src / f"{n}.safetensors").exists()
            or (src / f"{n}.safetensors.index.json").exists()}
    if weights == "ema" and held == {"model"}:
        raise FileNotFoundError(f"{src} has no ema.safetensors but a model.safetensors (the non-EMA weights of an "
                                "official training checkpoint): pass --weights model to convert those")
    ema = open_checkpoint_file(src, f"{weights}.safetensors")
    ae = open_checkpoint_file(src, "ae.safetensors")
    bagel_plan, vae_plan = _all_or_mismatch(
        lambda: _plan("params", lambda: Bagel(cfg, rngs=nnx.Rngs(0)), bagel_key_rules(cfg), ema, dtype),
        lambda: _plan("vae", lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)), vae_key_rules(cfg.vae), ae, vae_dtype))

    src_files = sorted({pathlib.Path(p) for s in (ema, ae) for p in s.files()})
    side_files = _side_files(src)
    dest = _check_out(out, overwrite, src, src_files + side_files, "converted")
    hasher = _Hasher(src_files + side_files, src) if hash_files else None
    n_tensors = len(bagel_plan.entries) + len(vae_plan.entries)
    total = bagel_plan.source_bytes + vae_plan.source_bytes
    tmp = _tmp_sibling(dest)
    bar = None
    try:
        if hasher:
            hasher.start()
        ck.write_model_config(tmp, cfg, src)
        bar, tick = _progress(total, n_tensors, f"to_jax {src.name}", progress)
        save_streamed(tmp / ck.PARAMS_ITEM, bagel_plan.tree(tick), compress=compress)
        save_streamed(tmp / ck.VAE_ITEM, vae_plan.tree(tick), compress=compress)
        bar.close()
        files = None
        if hasher:
            hasher.join()
            if hasher.error:
                raise hasher.error
            files = hasher.result
        manifest = _manifest_to_jax(src, files, bagel_plan, vae_plan, f"{weights}.safetensors")
        manifest["compression"] = "zstd-1" if compress else None
        write_json(tmp / ck.MANIFEST_FILE, manifest, indent=2)
        _finalize(tmp, dest)
    except BaseException as e:
        if hasher:
            hasher.stop.set()
        if bar is not None:
            bar.close()
        _remove_when_quiet(tmp)
        _raise_if_disk_full(e, dest, bagel_plan.out_bytes + vae_plan.out_bytes)  # (not the source's: --dtype)
        raise
    if not any(p.name in ("tokenizer.json", "vocab.json") for p in side_files):
        print(f"note: {src} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): the converted "
              "checkpoint takes token ids only (generate --prompt-ids; training from it needs data.tokenizer); copy "
              "the release's tokenizer files into the output to use text", file=sys.stderr)
    return manifest


_DISK_FULL_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                     errno.EFBIG: "File too large"}


def _raise_if_disk_full(e: BaseException, dest: pathlib.Path, total: int) -> None:
    """Raise an OutputError in one line when `e` says that the disk (or quota) of `dest` is full: a bare
    "[Errno 28] No space left on device" named no file, and Orbax's error held a 2,000-character spec."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        why = _DISK_FULL_ERRNOS[e.errno]
    elif isinstance(e, (OSError, ValueError, RuntimeError)):
        why = next((w for w in _DISK_FULL_ERRNOS.values() if w in str(e)), None)
    else:
        why = None
    if why:
        raise OutputError(f"cannot write the output folder {dest}: {why} (the partial output was removed; the "
                          f"output takes about {total / 2**20:,.1f} MiB, written beside it in {dest.parent} first)"
                          ) from None


def _remove_when_quiet(folder: pathlib.Path, quiet_s: float = 2.0, limit_s: float = 60.0) -> None:
    """Remove `folder`, again each time it reappears, until it has stayed away for `quiet_s`: after a Ctrl-C or
    an error inside an Orbax save, tensorstore's own threads go on writing the chunks in flight (the Python
    side's cancellation does not reach them) and recreate the folder after a first removal; that left a hidden
    `.OUT.tmp-*` folder beside the output, as large as the part converted (tens of GB for the 7B model)."""
    end = time.monotonic() + limit_s
    quiet_until = time.monotonic() + quiet_s
    while True:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            quiet_until = time.monotonic() + quiet_s
        now = time.monotonic()
        if now >= quiet_until or now >= end:
            return
        time.sleep(0.1)


def _check_not_orbax_source(src: pathlib.Path) -> None:
    """A training workdir or a converted Orbax folder given as the official source: say what it is and what to
    do instead (rather than a missing-file error)."""
    if ck.is_official_dir(src):
        return
    if (src / ck.MODEL_CONFIG_DIR).is_dir() or (src / ck.CHECKPOINTS_DIR).is_dir():
        raise ck.CheckpointError(
            f"{src} is a training workdir ({ck.MODEL_CONFIG_DIR}/, {ck.CHECKPOINTS_DIR}/), not an official PyTorch "
            f"folder: to_jax converts official folders. A workdir is already in the JAX format and is used "
            f"directly where a checkpoint is expected (e.g. python -m echo4o_jax.generate --ckpt {src}); to "
            f"export it to an official PyTorch folder: python -m tools.convert_weights.to_torch --ckpt {src} "
            f"--out DIR")
    if ck.is_converted_dir(src):
        raise ck.CheckpointError(
            f"{src} is a converted Orbax folder ({ck.PARAMS_ITEM}/), not an official PyTorch folder: it is "
            f"already in the JAX format and is used directly where a checkpoint is expected; to export it to an "
            f"official PyTorch folder: python -m tools.convert_weights.to_torch --ckpt {src} --out DIR")
    weights = [n for n in ("ema.safetensors", "model.safetensors") if (src / n).is_file()]
    if weights and not (src / "llm_config.json").is_file():
        raise ck.CheckpointError(
            f"{src} holds {' and '.join(weights)} but no llm_config.json: an official training checkpoint (the "
            f"numbered folders of train/pretrain_unified_navit.py) holds no configs; copy llm_config.json, "
            f"vit_config.json, ae.safetensors and the tokenizer files from the model folder it was trained from "
            f"(e.g. BAGEL-7B-MoT) into it, then run again (--weights model converts its model.safetensors)")


def _manifest_to_jax(src, files, bagel_plan: _Plan, vae_plan: _Plan, weights_file: str) -> dict:
    import orbax.checkpoint as ocp

    def item(p: _Plan, module: str, source_name: str):
        return {"module": module, "source": source_name, "dtype": p.dtype.name, "source_dtypes": p.source_dtypes,
                "official_keys": len(p.entries), "arrays": len(p.shapes), "parameters": p.num_params}

    return {
        "format": "echo4o_jax.orbax_model/1",
        "tool": "tools.convert_weights.to_jax",
        "tool_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": {"jax": jax.__version__, "orbax-checkpoint": ocp.__version__},
        "source": {"path": str(src), "files": files},
        "dtype": bagel_plan.dtype.name,
        "vae_dtype": vae_plan.dtype.name,
        "parameter_count": {"params": bagel_plan.num_params, "vae": vae_plan.num_params,
                            "total": bagel_plan.num_params + vae_plan.num_params},
        "key_counts": {weights_file: len(bagel_plan.entries), "ae.safetensors": len(vae_plan.entries)},
        "items": {ck.PARAMS_ITEM: item(bagel_plan, "Bagel", weights_file),
                  ck.VAE_ITEM: item(vae_plan, "AutoEncoder", "ae.safetensors")},
    }


# ------------------------------------------------------------------------------------------ to official


class _ItemExport:
    """Official tensors from one Orbax item, one at a time (stacked arrays read one chunk of layers)."""

    def __init__(self, item: ck.OrbaxItem, abstract: nnx.Module, rules: list[keymap.Rule], dtype, fill=None):
        self.item = item
        flat = ck._flat_abstract(abstract)
        self.to_fill = set(ck._check_item(item, flat, fillable=set(fill or ()), source=str(item.path)))
        self.fill = fill or {}
        self.shapes = {p: tuple(v.shape) for p, v in flat.items()}
        self.entries = keymap.expand_rules(rules)
        self.by_key = {e.key: e for e in self.entries}
        stored = {p: (item.dtype(ck._name(p)) if p not in self.to_fill else None) for p in flat}
        default = next((d for d in stored.values() if d is not None), np.dtype("float32"))
        self.out_dtype = {p: np.dtype(dtype) if dtype is not None else (d if d is not None else default)
                          for p, d in stored.items()}
        self._cache: tuple | None = None  # (path, lo, hi, block)

    def specs(self) -> list[tuple[str, tuple, np.dtype]]:
        return [(e.key, keymap.official_shape(e, self.shapes[e.path]), self.out_dtype[e.path]) for e in self.entries]

    def _array(self, path, layer):
        if path in self.to_fill:
            if self._cache is None or self._cache[0] != path:
                self._cache = (path, 0, 0, np.asarray(self.fill[path]()))
            x = self._cache[3]
            return x if layer is None else x[layer]
        name = ck._name(path)
        if layer is None:
            self._cache = None
            return self.item.read(name)
        c = self._cache
        if c is None or c[0] != path or not (c[1] <= layer < c[2]):
            g = max(1, self.item.chunks(name)[0])
            lo = layer // g * g
            hi = min(lo + g, self.shapes[path][0])
            self._cache = c = (path, lo, hi, self.item.read(name, (slice(lo, hi),)))
        return c[3][layer - c[1]]

    def produce(self, key: str) -> Iterator[np.ndarray]:
        """The official tensor as row blocks (read now, transposed / cast block by block when written)."""
        e = self.by_key[key]
        x = np.asarray(self._array(e.path, e.layer))
        dt = self.out_dtype[e.path]
        rows = _rows_for(keymap.official_shape(e, self.shapes[e.path]), dt)
        return (b.astype(dt, copy=False) for b in _row_blocks(e.transform, x, rows, official=True))


def _resolve_export_source(ckpt: pathlib.Path, step, weights):
    if ck.is_train_workdir(ckpt):
        if weights not in ck.TRAIN_ITEMS:
            raise ValueError(f"weights={weights!r}: expected one of {ck.TRAIN_ITEMS}")
        step, sdir = ck.train_step_dir(ckpt, step)
        return ckpt / ck.MODEL_CONFIG_DIR, sdir / weights, ckpt / ck.VAE_ITEM, {
            "kind": "training", "step": step, "weights": weights}
    if ck.is_converted_dir(ckpt):
        if step is not None:
            raise ck.CheckpointError(f"{ckpt} is a converted model folder, not a training workdir: --step does not apply")
        if weights != "ema":  # (its one set of weights is the official ema.safetensors it was converted from)
            raise ck.CheckpointError(f"{ckpt} is a converted model folder, which holds one set of weights (the "
                                     f"official ema.safetensors): --weights {weights} applies to a training workdir")
        return ckpt, ckpt / ck.PARAMS_ITEM, ckpt / ck.VAE_ITEM, {"kind": "converted"}
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    raise ck.CheckpointError(f"{ckpt}: neither a converted Orbax folder (llm_config.json + params/) nor a "
                             f"training workdir (model_config/ + checkpoints/)")


def convert_to_official(ckpt, out, *, step: int | None = None, weights: str = "ema", dtype=None, vae_dtype=None,
                        max_shard_size: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Converted folder or training workdir `ckpt` -> official folder `out`: ema.safetensors (official
    keys, PyTorch layouts, `dtype`; None: as stored), or shards + ema.safetensors.index.json with
    `max_shard_size` (bytes), ae.safetensors, llm_config.json, vit_config.json, meta.json, tokenizer
    files. Returns a summary dict."""
    ckpt, out = pathlib.Path(os.fspath(ckpt)).absolute(), pathlib.Path(os.fspath(out)).absolute()
    _check_apart(out, ckpt, [ckpt])  # first: before any message about the source
    cfg_dir, bagel_dir, vae_dir, source = _resolve_export_source(ckpt, step, weights)
    dest = _check_out(out, overwrite, ckpt, _side_files(cfg_dir) + [bagel_dir, vae_dir], "official")
    cfg = BagelConfig.from_checkpoint_dir(cfg_dir)
    bagel_item, vae_item = ck.OrbaxItem(bagel_dir), ck.OrbaxItem(vae_dir)
    bagel_x, vae_x = _all_or_mismatch(
        lambda: _ItemExport(bagel_item, ck.abstract_bagel(cfg), bagel_key_rules(cfg), dtype, ck.fixed_tables(cfg)),
        lambda: _ItemExport(vae_item, ck.abstract_vae(cfg.vae), vae_key_rules(cfg.vae), vae_dtype))
    specs_b, specs_v = bagel_x.specs(), vae_x.specs()
    nbytes = lambda specs: sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
    total = nbytes(specs_b) + nbytes(specs_v)
    tmp = _tmp_sibling(dest)
    bar = None
    try:
        bar, tick = _progress(total, len(specs_b) + len(specs_v), f"to_torch {ckpt.name}", progress)
        on_tensor = lambda key, n: tick(n)
        prod = _PrefetchProducer(specs_b, bagel_x.produce)
        try:
            files = write_safetensors_sharded(tmp, "ema.safetensors", specs_b, prod, max_shard_size=max_shard_size,
                                              metadata=SAFETENSORS_METADATA, on_tensor=on_tensor)
        finally:
            prod.close()
        prod = _PrefetchProducer(specs_v, vae_x.produce)
        try:
            write_safetensors_stream(tmp / "ae.safetensors", specs_v, prod, SAFETENSORS_METADATA, on_tensor)
        finally:
            prod.close()
        bar.close()
        ck.copy_model_files(cfg_dir, tmp)
        for name, d in (("llm_config.json", cfg.llm.to_hf()), ("vit_config.json", cfg.vit.to_hf())):
            if not (tmp / name).is_file():
                write_json(tmp / name, d, indent=2)
        write_json(tmp / ck.META_FILE, ck.meta_of(cfg, cfg_dir), indent=2)
        _finalize(tmp, dest)
    except BaseException as e:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, dest, total)
        raise
    finally:
        bagel_item.close()
        vae_item.close()
    return {"source": {"path": str(ckpt), **source}, "out": str(out), "ema_files": files,
            "ema_keys": len(specs_b), "ae_keys": len(specs_v), "bytes": total,
            "dtype": sorted({np.dtype(d).name for _, _, d in specs_b})}
