"""Precomputed VAE latents: the frozen VAE encoder run once over a training config's record datasets, so
that training neither decodes the VAE images nor runs the encoder in the step.

    python -m echo4o_jax.data.latents --config configs/X.py --out DIR [--dtype float32|bfloat16] [--batch N]
        [--shard_mb 1024] [--config.key=value ...]

then train with `--config.data.vae_latents=DIR`. The CLI walks every record of the config's records
datasets (`data.records.datasets`, or the demo dataset), applies the data pipeline's own VAE transform
to every VAE image (`pipeline.decode_image` / `transform_pixels`, with the sample's `img_num`), encodes
batches of equal-sized images with the VAE the trainer would use (`trainer.init_vae_state`: `model.ckpt`
or random) and stores the posterior moments. Sampling (or the mean) and scale / shift happen in the
train step (`model.vae_posterior`, `vae.latent_from_moments`), so a fresh posterior sample is drawn every
step, as in the official training.

Each image is encoded on its own canvas. The official code (and the in-step path, which reproduces it,
`AutoEncoder.encode_moments(valid_hw=...)`) encodes the images of a pack zero-padded to the pack's max
height / width, and the encoder's GroupNorm statistics and mid-block attention see that padding
(bagel_architecture.md §5, note 17). So a precomputed latent equals the official one when its image is the
largest of its pack in both dimensions (e.g. packs of same-size images) and otherwise differs everywhere,
not only at the borders (the tiny test VAE: mean abs difference 0.15 for a latent std of 0.32, a 48 x 64
image on a 64 x 64 canvas). Which images share a pack is only known when packing, so this cannot be
precomputed; use in-step encoding where exactness against the official code matters.

Layout of DIR
-------------
`latents.json`, the manifest (rewritten atomically after every finished shard):

    {"format": "echo4o-vae-latents", "format_version": 1,
     "vae_fingerprint": sha256 of the VAE encoder's parameters (`vae_fingerprint`),
     "z_channels", "downsample" (of that VAE), "dtype": "float32" | "bfloat16",
     "datasets": {label: {"path": [record shard files], "transform": repr of the VAE ImageTransform,
                          "records_sha256": [sha256 of each file of "path", from its records folder's
                                             manifest.json, else hashed from the file],
                          "complete": bool, "records": int, "images": int,
                          "failed": {key: reason} (images / records that could not be read; the pipeline
                                    skips their samples as it would with in-step encoding),
                          "shards": [{"file", "images", "bytes", "header_crc32"}]}},
     "created_utc", "updated_utc"}

`<label>-00000.safetensors`, ...: one tensor per VAE image, key `<record id>#<image index>` (the index
into the record's images) -> the moments [h, w, 2z] = [H/8, W/8, mean | logvar] (the encoder output
before sampling / scale / shift), in `dtype`. Cost per image: h * w * 2z * 4 bytes in float32 (2 MiB for
a 1024x1024 image with z = 16), half in bfloat16. The shard's safetensors `__metadata__` holds "dataset",
"format" and "crc32": a JSON object key -> the crc32 of that tensor's bytes (8 hex digits).

Checksums. A shard's bytes can change without its size changing (a bad disk or copy, a stray write), and
latents read from it would be garbage (NaNs) that training consumes silently, so every tensor carries a zlib
crc32 of its bytes and the manifest's shard entry the crc32 of the shard's header ("header_crc32": the 8-byte
length and the JSON header, i.e. keys, dtypes, shapes, offsets and those per-tensor checksums). crc32, not
sha256: it is verified on every read in the input pipeline and runs at GB/s (measured on one core: 2.7 GB/s,
under 1 ms per 2 MiB latent; sha256 1.2 GB/s), and the threat is accidental damage, which it catches (every
burst of up to 32 bits; anything else but for a 2^-32 chance), not forgery. The per-tensor checksums live in
the shard: written with it under the `.tmp` name and renamed with it (no shard without its checksums), and the
manifest, rewritten after every shard and loaded by every data worker, stays small at millions of images; the
manifest's header checksum binds each shard to them (a rewritten header, or another shard of the same size
copied over it, is caught where the size check is not). `--merge` copies the parts' shard entries as they are,
so both survive it. Verified: the header checksum whenever a shard is opened (`check`, the first read in a
data worker, a precompute rerun; the header is read to open the shard anyway); a tensor's checksum whenever
`LatentStore.moments` reads it (a mismatch is a fatal LatentStoreError naming the shard file and the key, and
the rerun command that repairs it); every tensor of every listed shard on a precompute rerun with `--verify`
(it reads the whole folder once, at disk speed: hundreds of GB for the Echo-4o data, so a plain rerun, which
resumes a killed run, checks the headers only). `check` reads no tensor data, so training starts as fast as
before; a damaged tensor stops training when it is read. Folders written before checksums existed (shards
without "crc32" metadata, entries without "header_crc32") are read unverified, as before: a rerun cannot tell
whether such a shard is still intact, so it does not add checksums after the fact; it says how many shards are
unverified, and the shards it writes on resuming carry checksums (precompute into another --out to have a
whole folder verified). The format_version stays 1: the fields are additions that older readers ignore and
that this code looks for per shard.

Resume: a shard is written under a `.tmp` name, renamed, then listed in the manifest; a rerun with the
same --out skips every image already listed (a killed run loses at most the shard it was filling) and
refuses to mix latents of another VAE, dtype or transform.

Which records. Latents are keyed by record id, so they belong to the record files they were made from,
not to a dataset label or a folder path (two folders with the same name and ids may hold other images;
folders move between machines). A dataset's "records_sha256" is compared, as a multiset, with the sha256s
of the record files being read: training (`LatentStore.check`) needs them equal and names the shards that
differ; a precompute rerun accepts added shards (records appended with `RecordWriter(append=True)`: it
encodes their images, the dataset is incomplete until it ends) and refuses changed or removed ones (use
another --out). A folder written before "records_sha256" existed is refused by training with the command
that fixes it: a precompute rerun records the sha256s, encoding nothing new, when the record files are
the ones listed in "path" (it trusts those paths once and says so); other record files are refused.

Broken shards. A listed shard that is missing, of another size than listed, unreadable, or corrupt (a
checksum mismatch, "Checksums") is a fatal LatentStoreError naming the file, at `check` and when read (never
a skipped sample; a tensor's checksum is only read with the tensor). A precompute rerun repairs the folder in
place: such a shard is dropped from the manifest (a present file is renamed to `<file>.broken`, kept for
inspection) and the images it held are encoded again.

Parallel runs. One process encodes on all its local devices (each batch split over them; `--batch` is
rounded up to a multiple of the device count). Several processes split the records: part I of N takes
the records whose index in their dataset is I mod N, and writes `latents.part-0000I-of-0000N.json` and
`<label>-part0000I-of-0000N-00000.safetensors`, ... into the same DIR (resumable like a single run);
`--merge` then checks that all N parts are complete and consistent (VAE, dtype, transforms, record files)
and writes `latents.json` listing every part's shards (`"parts": N`), which training reads. Under
`jax.distributed` (a multi-host launch: the same command on every host) `--parts` / `--part` default to
the process count / index and process 0 merges after all have finished; otherwise pass `--parts N
--part I` to N separate jobs and run `--merge` once they are done. A single-run folder and a parts
folder are never mixed.

Exit status 0, or 2 for bad input, reported as by the train command in one `error:` line: an unknown flag or
config key, a bad value, a model / data mismatch, missing, unreadable or incomplete records (an incomplete
dataset is refused as training refuses it, unless --config.data.records.allow_incomplete=True), an
unreadable `model.ckpt`, a latent folder this run cannot write into.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import re
import struct
import sys
import zlib
from typing import Callable

import numpy as np

from echo4o_jax.data.records import listed_sha256, resolve_shards
from echo4o_jax.paths import file_sha256, write_json
from echo4o_jax.paths import folder_problem
from echo4o_jax.packing import MOMENT_DTYPES, moments_dtype
from echo4o_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "LatentStore", "LatentStoreError", "latent_key",
           "merge_parts", "precompute", "vae_fingerprint"]

FORMAT = "echo4o-vae-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "latents.json"
_SHARD_SUFFIX = ".safetensors"
_PART_MANIFEST = re.compile(r"^latents\.part-(\d{5})-of-(\d{5})\.json$")
_PART_SHARD = re.compile(r"-part\d{5}-of-\d{5}-\d{5}\.safetensors(\.tmp)?$")


def _part_tag(part: int, parts: int) -> str:
    """"" for a single run, else "-part0000I-of-0000N" (in shard names; the manifest is latents.part-...)."""
    return "" if parts == 1 else f"-part{part:05d}-of-{parts:05d}"


def _part_manifests(out: str) -> dict[tuple[int, int], str]:
    """{(part, parts): file name} of the part manifests in `out`."""
    found = {}
    for name in (os.listdir(out) if os.path.isdir(out) else []):
        m = _PART_MANIFEST.match(name)
        if m:
            found[int(m.group(1)), int(m.group(2))] = name
    return found


class LatentStoreError(ValueError):
    """A precomputed-latent folder is missing, incomplete, lacks a latent, or does not match the config."""


class _BrokenShard(LatentStoreError):
    """A listed latent shard that is missing, of another size than listed, unreadable or corrupt
    (repairable)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _crc32(a: np.ndarray) -> str:
    """The crc32 of an array's bytes in C order, as a shard stores them (8 hex digits)."""
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def _header_crc32(path: str) -> str:
    """The crc32 of a safetensors file's header (its 8-byte length and JSON header), of a file whose header
    `SafetensorsFile` has read."""
    with open(path, "rb") as f:
        head = f.read(8)
        return f"{zlib.crc32(f.read(struct.unpack('<Q', head)[0]), zlib.crc32(head)):08x}"


def _corrupt(key: str, got: str, want: str) -> str:
    return f"corrupt: tensor {key!r} reads with crc32 {got}, the shard lists {want} (its bytes changed)"


def _tensor_crcs(path: str, f: SafetensorsFile) -> dict[str, str] | None:
    """key -> crc32 of every tensor of shard `f`, from its `__metadata__`; None for a shard written before
    shards carried checksums (read unverified)."""
    text = f.metadata.get("crc32")
    if text is None:
        return None
    try:
        crcs = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BrokenShard(path, f"corrupt: its crc32 metadata is not JSON ({e})") from None
    if not isinstance(crcs, dict) or set(crcs) != set(f.keys()):
        raise _BrokenShard(path, "corrupt: its crc32 metadata does not list exactly its tensors")
    return crcs


def _open_shard(folder: str, shard: dict, *,
                verify: bool = False) -> tuple[SafetensorsFile, dict[str, str] | None]:
    """The latent shard `shard` (a manifest entry) of `folder` and its tensors' checksums (`_tensor_crcs`):
    _BrokenShard when it is missing, of another size than the manifest lists, unreadable, or its header is
    not the one the manifest's "header_crc32" lists; with `verify` (a precompute rerun: every tensor is read)
    also when a tensor does not match its checksum. LatentStoreError when the file system refuses it."""
    path = os.path.join(folder, shard["file"])
    try:
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise _BrokenShard(path, f"{size} bytes, the manifest lists {shard['bytes']} (truncated or rewritten)")
        f = SafetensorsFile(path)
        want = shard.get("header_crc32")  # absent: written before checksums (module docstring, "Checksums")
        if want is not None and (got := _header_crc32(path)) != want:
            raise _BrokenShard(path, f"corrupt: its header reads with crc32 {got}, the manifest lists {want} "
                                     "(its header changed, or another file was copied over it)")
        crcs = _tensor_crcs(path, f)
        if verify and crcs is not None:
            for key in f.keys():  # plain reads, one tensor at a time: nothing stays mapped
                got = _crc32(f.read(key))
                if got != crcs[key]:
                    raise _BrokenShard(path, _corrupt(key, got, crcs[key]))
        return f, crcs
    except FileNotFoundError:
        raise _BrokenShard(path, "missing") from None
    except SafetensorsError as e:
        raise _BrokenShard(path, f"unreadable ({e})") from None
    except OSError as e:
        raise LatentStoreError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _record_files(path) -> list[str]:
    """The absolute record shard files of a dataset's path (folder, shard file, glob, or a list of them)."""
    return [os.path.abspath(f) for f in resolve_shards(path)]


def _records_sha256(files: list[str]) -> list[str]:
    """The sha256 of each record shard file: from its folder's records manifest when that lists it, else
    hashed from the file (a read of the whole file)."""
    return [sha or file_sha256(f) for f, sha in zip(files, listed_sha256(files))]


def _folders(files: list[str]) -> str:
    return ", ".join(sorted({os.path.dirname(f) for f in files})) or "(no files)"


def _few(files: list[str], n: int = 3) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


def _records_mismatch(label: str, ds: dict, files: list[str], shas: list[str]) -> tuple[str, bool] | None:
    """None when the records `files` (sha256s `shas`) are those the latents of dataset `ds` were made from
    (as a multiset); else (what differs, naming both folders and the shards; whether shards the latents were
    made from are gone, so that the latents are not the records': False when shards were only added)."""
    def only_in(a_files, a_shas, b_shas):
        left, out = collections.Counter(b_shas), []
        for f, h in zip(a_files, a_shas):
            if left[h] > 0:
                left[h] -= 1
            else:
                out.append(f)
        return out

    gone = only_in(ds["path"], ds["records_sha256"], shas)
    new = only_in(files, shas, ds["records_sha256"])
    if not gone and not new:
        return None
    what = []
    if gone:
        what.append(f"{len(gone)} record shard(s) the latents were made from are not among the records read now "
                    f"(rewritten, replaced or removed): {_few(gone)}")
    if new:
        what.append(f"{len(new)} record shard(s) read now were not encoded (records added after the precompute "
                    f"run?): {_few(new)}")
    return (f"dataset {label!r}: the latents were made from the records in {_folders(ds['path'])}, the records "
            f"read now are in {_folders(files)}; " + "; ".join(what)), bool(gone)


def latent_key(record_id: str, image: int) -> str:
    """The store key of image `image` (index into the record's images) of record `record_id`."""
    return f"{record_id}#{int(image)}"


def vae_fingerprint(vae_state) -> str:
    """sha256 over the VAE encoder's parameters (paths, dtypes, shapes, bytes) of a VAE state (pure dict or
    nnx.State, as `trainer.init_vae_state` gives it): two VAEs with this fingerprint give the same moments."""
    import jax
    from flax import nnx

    if isinstance(vae_state, nnx.State):
        vae_state = nnx.to_pure_dict(vae_state)
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(vae_state["encoder"])[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_manifest(path: str, name: str = MANIFEST_NAME) -> dict:
    if not os.path.isdir(path):
        raise LatentStoreError(f"precomputed latents: {path} is not a folder (write it with "
                               f"python -m echo4o_jax.data.latents --config ... --out {path})")
    mf = os.path.join(path, name)
    try:
        with open(mf) as f:
            m = json.load(f)
    except FileNotFoundError:
        parts = _part_manifests(path) if name == MANIFEST_NAME else {}
        hint = (f"it holds {len(parts)} part manifest(s): merge them with python -m echo4o_jax.data.latents "
                f"--out {path} --merge once every part has finished" if parts else
                "not written by python -m echo4o_jax.data.latents, or that run never finished a shard")
        raise LatentStoreError(f"precomputed latents: {path} has no {name} ({hint})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (not UTF-8: a traceback)
        raise LatentStoreError(f"precomputed latents: {mf} is not valid JSON ({e})") from None
    except OSError as e:
        raise LatentStoreError(f"precomputed latents: cannot read {mf} ({e})") from None
    if not isinstance(m, dict):  # (a JSON list: an AttributeError traceback)
        raise LatentStoreError(f"precomputed latents: {mf} is not a JSON object (got a {type(m).__name__})")
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise LatentStoreError(f"precomputed latents: {mf} is not an {FORMAT} v{FORMAT_VERSION} manifest "
                               f"(format {m.get('format')!r}, version {m.get('format_version')!r})")
    if m.get("dtype") not in MOMENT_DTYPES:
        raise LatentStoreError(f"precomputed latents: {mf}: dtype {m.get('dtype')!r} not in {MOMENT_DTYPES}")
    return m


# ---------------------------------------------------------------------------------------------- reading


class LatentStore:
    """Read side of a precomputed-latent folder (the data pipeline's `vae_latents`). Picklable (Grain
    workers): the shard index is built lazily in each process."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.manifest = _load_manifest(self.path)
        self.dtype: str = self.manifest["dtype"]
        self._index: dict[str, dict[str, SafetensorsFile]] = {}
        self._crcs: dict[str, dict[str, str]] = {}  # dataset -> key -> crc32 (keys of checksummed shards)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_index"], d["_crcs"] = {}, {}
        return d

    def check(self, *, fingerprint: str, z_channels: int, downsample: int, transforms: dict, records: dict) -> None:
        """Raise LatentStoreError unless the folder holds complete latents of this VAE (fingerprint, z
        channels, downsample) for every dataset label of `transforms` (label -> VAE ImageTransform) made
        with that transform from the record files of `records` (label -> the dataset's path: folder, shard
        file, glob or a list of them; compared by sha256, module docstring "Which records"), and every
        latent shard of those datasets is readable with the header the manifest's checksum lists (the
        tensors' checksums are verified when they are read: no tensor data is read here)."""
        m, p = self.manifest, self.path
        if set(records) != set(transforms):
            raise ValueError(f"LatentStore.check: records {sorted(records)} and transforms {sorted(transforms)} "
                             "must name the same datasets")
        if m["vae_fingerprint"] != fingerprint:
            raise LatentStoreError(f"precomputed latents {p}: VAE fingerprint mismatch: the latents were computed "
                                   f"with VAE {m['vae_fingerprint']}, the current config's VAE is {fingerprint} "
                                   "(recompute them with this config's model)")
        for name, want in (("z_channels", z_channels), ("downsample", downsample)):
            if int(m[name]) != int(want):
                raise LatentStoreError(f"precomputed latents {p}: VAE {name} mismatch: stored {m[name]}, the current "
                                       f"config's VAE has {want}")
        for label, tr in transforms.items():
            ds = m["datasets"].get(label)
            if ds is None:
                raise LatentStoreError(f"precomputed latents {p}: no latents for dataset {label!r} (the folder holds "
                                       f"{sorted(m['datasets'])})")
            if ds["transform"] != repr(tr):
                raise LatentStoreError(f"precomputed latents {p}: VAE transform mismatch for dataset {label!r}: "
                                       f"stored {ds['transform']}, the pipeline uses {tr!r}")
            if not ds["complete"]:
                raise LatentStoreError(f"precomputed latents {p}: dataset {label!r} is incomplete (the precompute "
                                       "run was interrupted): run python -m echo4o_jax.data.latents again")
            files = _record_files(records[label])
            if "records_sha256" not in ds:
                raise LatentStoreError(
                    f"precomputed latents {p}: dataset {label!r} was precomputed before latent folders recorded "
                    f"the sha256 of their records, so it cannot be checked against the records in "
                    f"{_folders(files)}: run python -m echo4o_jax.data.latents --config ... --out {p} again (it "
                    f"records them, encoding nothing new, when those are the record files the latents were made "
                    f"from, {_folders(ds['path'])}; other record files are refused)")
            diff = _records_mismatch(label, ds, files, _records_sha256(files))
            if diff is not None:
                what, gone = diff
                raise LatentStoreError(
                    f"precomputed latents {p}: {what}: " + (
                        "these latents are not the records' latents (precompute them into another --out)" if gone
                        else f"run python -m echo4o_jax.data.latents --config ... --out {p} again (it encodes "
                             "the added records)"))
            self._read_index(label)  # every shard readable, before any sample is read

    def _broken(self, dataset: str, file: str, reason: str, verify: bool = False) -> LatentStoreError:
        """The fatal error for latent shard `file` of `dataset`, saying how to repair the folder (`verify`: a
        tensor's data is corrupt, which only a rerun with --verify finds; a rerun checks headers and sizes)."""
        m = re.search(r"-part(\d{5})-of-(\d{5})-\d{5}\.safetensors$", file)
        flag = " --verify" if verify else ""
        redo = (f"run its part again (python -m echo4o_jax.data.latents --config ... --out {self.path} "
                f"--parts {int(m[2])} --part {int(m[1])}{flag}), then --merge" if m else
                f"run python -m echo4o_jax.data.latents --config ... --out {self.path}{flag} again")
        return LatentStoreError(f"precomputed latents {self.path}: latent shard {file} of dataset {dataset!r} is "
                                f"{reason}: {redo} (it re-encodes the shard's images)")

    def _read_index(self, dataset: str) -> dict[str, SafetensorsFile]:
        """(Re)build the shard index of `dataset`, key -> its opened shard, and its tensors' checksums, over
        every latent shard of `dataset` (each shard header read once)."""
        idx: dict[str, SafetensorsFile] = {}
        crcs: dict[str, str] = {}
        for s in self.manifest["datasets"][dataset]["shards"]:
            try:
                f, c = _open_shard(self.path, s)
            except _BrokenShard as e:
                raise self._broken(dataset, s["file"], e.reason) from None
            idx.update(dict.fromkeys(f.keys(), f))
            crcs.update(c or {})
        self._crcs[dataset], self._index[dataset] = crcs, idx
        return idx

    def _files(self, dataset: str) -> dict[str, SafetensorsFile]:
        """The shard index of `dataset`: the one `check` built (the headers it read are not read again), else
        built now (a Grain worker: the index is not pickled)."""
        idx = self._index.get(dataset)
        return self._read_index(dataset) if idx is None else idx

    def moments(self, dataset: str, record_id: str, image: int, hw: tuple[int, int]) -> np.ndarray:
        """The stored moments [h, w, 2z] of one image, checked against the latent size `hw` the current
        transform gives it, and against its crc32 (shards written before checksums: unverified). A missing
        latent, a broken shard or a checksum mismatch raises LatentStoreError naming the shard and key (fatal);
        an image the precompute run could not read raises ValueError (the pipeline skips that sample, as it
        would in-step)."""
        key = latent_key(record_id, image)
        ds = self.manifest["datasets"].get(dataset)
        if ds is None:
            raise LatentStoreError(f"precomputed latents {self.path}: no latents for dataset {dataset!r}")
        if key in ds.get("failed", {}):
            raise ValueError(f"image {image} of record {record_id!r} could not be read when the latents were "
                             f"computed: {ds['failed'][key]}")
        f = self._files(dataset).get(key)
        if f is None:
            raise LatentStoreError(f"precomputed latents {self.path}: missing latent for dataset {dataset!r}, "
                                   f"record {record_id!r}, image {image} (records added after the precompute run? "
                                   "run python -m echo4o_jax.data.latents again)")
        try:
            a = np.array(f.get(key))
        except (OSError, ValueError):  # the shard broke after its header was read (by `check`, or an earlier read)
            self._index.pop(dataset, None)
            self._files(dataset)  # reopens every shard: the LatentStoreError naming the broken one
            raise
        crc = self._crcs[dataset].get(key)
        if crc is not None and (got := _crc32(a)) != crc:
            raise self._broken(dataset, os.path.basename(f.path), _corrupt(key, got, crc), verify=True)
        want = (int(hw[0]), int(hw[1]), 2 * int(self.manifest["z_channels"]))
        if a.shape != want or a.dtype != moments_dtype(self.dtype):
            raise LatentStoreError(f"precomputed latents {self.path}: dataset {dataset!r}, record {record_id!r}, "
                                   f"image {image}: stored moments are {a.dtype}{list(a.shape)}, the pipeline needs "
                                   f"{self.dtype}{list(want)}")
        return a


# ---------------------------------------------------------------------------------------------- writing


class _Writer:
    """Shards + manifest of one --out folder (resumable)."""

    def __init__(self, out: str, *, fingerprint: str, z_channels: int, downsample: int, dtype: str,
                 shard_bytes: int, on_shard: Callable[[str], None] | None = None, part: int = 0, parts: int = 1,
                 log: Callable[[str], None] | None = None, verify: bool = False):
        self.out, self.shard_bytes, self.on_shard, self.log = out, int(shard_bytes), on_shard, log
        self.verify = verify  # a rerun reads every listed tensor against its checksum (else headers only)
        self.tag = _part_tag(part, parts)
        self.manifest_name = MANIFEST_NAME if parts == 1 else f"latents.part-{part:05d}-of-{parts:05d}.json"
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise LatentStoreError(f"--out {out}: cannot make the folder ({e.strerror or e})") from None
        _check_layout(out, parts)
        want = {"vae_fingerprint": fingerprint, "z_channels": int(z_channels), "downsample": int(downsample),
                "dtype": dtype}
        fresh = not os.path.exists(os.path.join(out, self.manifest_name))
        if fresh:
            # a folder of other files (a mistyped --out naming a checkpoint): the leftover clean-up below
            # deleted its *.safetensors; a killed first run always leaves its manifest (written at once). Other
            # parts' files (parts started together) are latents files, not others.
            ours = lambda n: parts > 1 and (_PART_MANIFEST.match(n.removesuffix(".tmp")) or _PART_SHARD.search(n))
            others = sorted(n for n in os.listdir(out) if not ours(n))
            if others:
                raise LatentStoreError(f"{out} is not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
                                       f" and holds no latents ({self.manifest_name}): give a new or empty --out")
        if not fresh:
            self.m = _load_manifest(out, self.manifest_name)
            for k, v in want.items():
                if self.m[k] != v:
                    raise LatentStoreError(f"{out} holds latents with {k}={self.m[k]!r}, this run would write "
                                           f"{k}={v!r}: use another --out (latents of different VAEs / dtypes "
                                           "are never mixed)")
        else:
            self.m = {"format": FORMAT, "format_version": FORMAT_VERSION, **want, "datasets": {},
                      "created_utc": _now(), "updated_utc": _now()}
        listed = {s["file"] for ds in self.m["datasets"].values() for s in ds["shards"]}
        for name in os.listdir(out):  # leftovers of this run's killed predecessor: unfinished or unlisted shards
            ours = re.search(re.escape(self.tag) + r"-\d{5}\.safetensors(\.tmp)?$", name) and (
                self.tag or not _PART_SHARD.search(name))  # shard names only, never another part's files
            if ours and (name.endswith(_SHARD_SUFFIX + ".tmp") or (name.endswith(_SHARD_SUFFIX) and name not in listed)):
                os.remove(os.path.join(out, name))
        self.ds: dict = {}
        self.label = ""
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.written = 0
        if fresh:
            self.save()  # at once: the folder is known as a latents folder (a rerun after a kill continues it)

    def begin(self, label: str, files: list[str], transform) -> set[str]:
        """Start dataset `label` of the record shard files `files` (absolute); returns the keys already
        stored. Refuses latents of other records or another transform; verifies every listed shard's
        checksums and repairs broken or corrupt shards (module docstring, "Which records", "Checksums",
        "Broken shards")."""
        shas = _records_sha256(files)
        ds = self.m["datasets"].get(label)
        if ds is None:
            ds = self.m["datasets"][label] = {"path": files, "transform": repr(transform), "records_sha256": shas,
                                              "complete": False, "records": 0, "images": 0, "failed": {},
                                              "shards": []}
        elif ds["transform"] != repr(transform):
            raise LatentStoreError(f"{self.out}: dataset {label!r} was precomputed with VAE transform "
                                   f"{ds['transform']}, this config uses {transform!r}: use another --out")
        elif "records_sha256" not in ds:  # written before records_sha256: trust the very same files once
            if sorted(ds["path"]) != sorted(files):
                raise LatentStoreError(
                    f"{self.out}: dataset {label!r} was precomputed from the records {_few(ds['path'])} (before "
                    f"latent folders recorded the sha256 of their records), this config reads {_few(files)}: "
                    "use another --out (latents of other records are never mixed)")
            sha_of = dict(zip(files, shas))
            ds["records_sha256"] = [sha_of[f] for f in ds["path"]]
            self.save()
            self._note(f"{label}: the latents' records sha256 recorded from {_folders(files)} (the record files "
                       "this folder lists; written before latent folders recorded them)")
        diff = _records_mismatch(label, ds, files, shas)  # once: None, or only added shards, or shards gone
        if diff is not None and diff[1]:
            raise LatentStoreError(f"{self.out}: {diff[0]}: use another --out (latents of other records are never "
                                   "mixed)")
        if ds["path"] != files or ds["records_sha256"] != shas:  # records added (encode them) or moved
            ds.update(path=files, records_sha256=shas, complete=ds["complete"] and diff is None)
            self.save()
        self.ds, self.label = ds, label
        done: set[str] = set()
        broken = []
        unverified = 0
        if ds["shards"] and self.verify:
            self._note(f"{label}: verifying the checksums of {len(ds['shards'])} listed latent shard(s) "
                       f"({sum(s['bytes'] for s in ds['shards']) / 2**20:.1f} MiB)")
        for s in ds["shards"]:
            try:
                f, crcs = _open_shard(self.out, s, verify=self.verify)
                done.update(f.keys())
                unverified += crcs is None
            except _BrokenShard as e:
                broken.append(s)
                kept = ""
                if os.path.exists(e.path):  # kept for inspection, out of the way of new shard names
                    os.replace(e.path, e.path + ".broken")
                    kept = f" (the file is kept as {s['file']}.broken)"
                self._note(f"{label}: latent shard {s['file']} is {e.reason}: dropped from the manifest{kept}; "
                           "its images are encoded again")
        if broken:
            ds.update(shards=[s for s in ds["shards"] if s not in broken], complete=False)
            self.save()
        if unverified:
            self._note(f"{label}: {unverified} latent shard(s) were written before shards carried checksums: kept "
                       "and read unverified (precompute into another --out to have them verified)")
        return done

    def _note(self, msg: str) -> None:
        if self.log is not None:
            self.log(f"[latents] {msg}")

    def add(self, key: str, moments: np.ndarray) -> None:
        self.pending[key] = moments
        self.pending_bytes += moments.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        taken = {s["file"] for d in self.m["datasets"].values() for s in d["shards"]}
        i = len(self.ds["shards"])
        while f"{self.label}{self.tag}-{i:05d}{_SHARD_SUFFIX}" in taken:
            i += 1
        name = f"{self.label}{self.tag}-{i:05d}{_SHARD_SUFFIX}"
        path = os.path.join(self.out, name)
        crcs = json.dumps({k: _crc32(a) for k, a in self.pending.items()}, separators=(",", ":"))
        try:
            write_safetensors(path, self.pending, metadata={"dataset": self.label, "format": FORMAT, "crc32": crcs})
        except OSError as e:  # a full disk or quota: one line (it was a traceback, exit 1)
            raise LatentStoreError(f"cannot write the latents shard {path}: {e.strerror or e}; the shards finished "
                                   "so far are kept: once fixed, run the same command again to go on") from None
        self.ds["shards"].append({"file": name, "images": len(self.pending), "bytes": os.path.getsize(path),
                                  "header_crc32": _header_crc32(path)})
        self.ds["complete"] = False
        self.written += len(self.pending)
        self.pending, self.pending_bytes = {}, 0
        self.save()
        if self.on_shard is not None:
            self.on_shard(name)

    def end(self, records: int, images: int, failed: dict[str, str]) -> None:
        self.flush()
        self.ds.update(complete=True, records=int(records), images=int(images), failed=dict(failed))
        self.save()

    def save(self) -> None:
        self.m["updated_utc"] = _now()
        path = os.path.join(self.out, self.manifest_name)
        try:
            write_json(path, self.m)
        except OSError as e:
            raise LatentStoreError(f"cannot write {path}: {e.strerror or e}; once fixed, run the same command "
                                   "again to go on") from None


def _check_layout(out: str, parts: int) -> None:
    """A single-run folder and a parts folder (of one part count) are never mixed."""
    has_manifest = os.path.exists(os.path.join(out, MANIFEST_NAME))
    merged = _load_manifest(out).get("parts") if has_manifest else None  # part count of a merged folder
    counts = sorted({n for _, n in _part_manifests(out)} | ({merged} if merged else set()))
    if parts == 1 and counts:
        raise LatentStoreError(f"{out} holds latents written in {counts} parts (--parts): run with --parts "
                               f"{counts[0]} --part I, or use another --out")
    if parts > 1 and has_manifest and merged is None:
        raise LatentStoreError(f"{out} holds a single run's latents: --parts {parts} needs another --out")
    if parts > 1 and counts and counts != [parts]:
        raise LatentStoreError(f"{out} holds latents written in {counts} parts, this run would write {parts}: "
                               "use the same --parts or another --out")


def merge_parts(out: str, log: Callable[[str], None] | None = print) -> dict:
    """Write `out/latents.json` from the N complete part manifests of `out` (module docstring, "Parallel
    runs"); returns the merged manifest. Missing or incomplete parts and parts that disagree (VAE, dtype,
    z_channels, downsample, a dataset's transform or record files) are errors naming the part file."""
    found = _part_manifests(out)
    counts = sorted({n for _, n in found})
    if not counts:
        raise LatentStoreError(f"{out}: no part manifests (latents.part-I-of-N.json) to merge")
    if len(counts) > 1:
        raise LatentStoreError(f"{out}: part manifests of different part counts {counts}")
    n = counts[0]
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise LatentStoreError(f"{out}: parts {missing} of {n} have not written a manifest yet (run them with "
                               f"--parts {n} --part I)")
    merged: dict = {}
    first: set = set()
    for i in range(n):
        name = found[i, n]
        m = _load_manifest(out, name)
        if not merged:
            merged = {k: m[k] for k in ("format", "format_version", "vae_fingerprint", "z_channels", "downsample",
                                        "dtype", "created_utc")}
            merged.update(parts=n, datasets={})
        for k in ("vae_fingerprint", "z_channels", "downsample", "dtype"):
            if m[k] != merged[k]:
                raise LatentStoreError(f"{out}/{name}: {k}={m[k]!r}, part 0 has {merged[k]!r}")
        for label, ds in m["datasets"].items():
            if not ds["complete"]:
                raise LatentStoreError(f"{out}/{name}: dataset {label!r} is incomplete: run part {i} again")
            acc = merged["datasets"].setdefault(label, {"path": ds["path"], "transform": ds["transform"],
                                                        "records_sha256": ds.get("records_sha256"),
                                                        "complete": True, "records": 0, "images": 0,
                                                        "failed": {}, "shards": []})
            for k in ("path", "transform", "records_sha256"):  # in order: parts split the records by index
                if ds.get(k) != acc[k]:
                    raise LatentStoreError(f"{out}/{name}: dataset {label!r} has {k} {ds.get(k)!r}, an earlier "
                                           f"part has {acc[k]!r}")
            acc["records"] += ds["records"]
            acc["images"] += ds["images"]
            acc["failed"].update(ds["failed"])
            acc["shards"] += ds["shards"]
        first = first or set(m["datasets"])
        if set(m["datasets"]) != first:
            raise LatentStoreError(f"{out}/{name}: datasets {sorted(m['datasets'])}, part 0 has {sorted(first)}")
    for ds in merged["datasets"].values():
        if ds["records_sha256"] is None:  # parts written before records_sha256: `check` says how to add it
            del ds["records_sha256"]
    merged["updated_utc"] = _now()
    write_json(os.path.join(out, MANIFEST_NAME), merged)
    if log is not None:
        imgs = sum(d["images"] for d in merged["datasets"].values())
        log(f"[latents] merged {n} parts: {imgs} VAE images in {len(merged['datasets'])} dataset(s) -> {out}")
    return merged


def precompute(config, out: str, *, dtype: str = "float32", batch: int = 8, shard_bytes: int = 1 << 30,
               on_shard: Callable[[str], None] | None = None, log: Callable[[str], None] | None = print,
               part: int = 0, parts: int = 1, devices=None, verify: bool = False) -> dict:
    """Encode every VAE image of the config's records datasets into `out` (see the module docstring), or
    with `parts` > 1 the records of part `part` (index mod `parts`). Each batch is split over `devices`
    (default: this process's local devices). Returns {"images_written", "images_skipped" (already
    stored), "failed", "vae_fingerprint"}. `on_shard(file)` is called after each shard is listed in the
    manifest (tests stop a run there). `verify`: read every tensor of the shards already listed against its
    checksum and repair corrupt shards (module docstring, "Checksums"); else their headers only."""
    import jax
    from flax import nnx

    from echo4o_jax.data.pipeline import (check_complete, check_transforms, dataset_transforms, decode_image,
                                          record_img_num, transform_pixels)
    from echo4o_jax.data.records import RecordReader, decode_record
    from echo4o_jax.model.vae import AutoEncoder
    from echo4o_jax.packing import unit_range_lut
    from echo4o_jax.train.data_sources import budget_from_config
    from echo4o_jax.train.records_source import data_config_errors, pipeline_config_from
    from echo4o_jax.train.trainer import init_vae_state, model_config_from

    store_dt = moments_dtype(dtype)
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: need parts >= 1 and 0 <= part < parts")
    if config.data.kind != "records":
        raise LatentStoreError(f"data.kind={config.data.kind!r}: precomputed latents need a records config")
    cfg = model_config_from(config)
    with data_config_errors(config):  # the data settings training would refuse are refused before encoding
        pc = pipeline_config_from(config, budget_from_config(config.data.budget), local_packs=1)
        check_transforms(pc, cfg)
        check_complete(pc)
    labels = [d.label for d in pc.datasets]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise LatentStoreError(f"datasets {dup} share a label: latents are stored per dataset label")
    record_files = [_record_files(spec.path) for spec in pc.datasets]  # every dataset found before --out is made
    problem = folder_problem(out)  # before the VAE is loaded (a mistyped --out used to fail after it)
    if problem:
        raise LatentStoreError(f"--out {out}: {problem}")

    vae_state = init_vae_state(config, cfg)
    graphdef = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0))))[0]
    fp = vae_fingerprint(vae_state)
    # data parallel over this process's devices: the VAE replicated, each batch split over "batch"
    mesh = jax.sharding.Mesh(np.asarray(list(devices or jax.local_devices())), ("batch",))
    batch = -(-batch // mesh.size) * mesh.size
    P = jax.sharding.PartitionSpec
    vae_state = jax.device_put(vae_state, jax.sharding.NamedSharding(mesh, P()))
    x_sharding = jax.sharding.NamedSharding(mesh, P("batch"))
    if log is not None:
        log(f"[latents] encoding on {mesh.size} device(s) ({mesh.devices.flat[0].platform}), batches of {batch}"
            f"{'' if parts == 1 else f'; part {part} of {parts}'}")

    @jax.jit
    def encode(state, x):
        vae = nnx.merge(graphdef, state)
        return vae.encode_moments(x.astype(vae.dtype)).astype(store_dt)

    lut = unit_range_lut()
    w = _Writer(out, fingerprint=fp, z_channels=cfg.vae.z_channels, downsample=cfg.vae.downsample, dtype=dtype,
                shard_bytes=shard_bytes, on_shard=on_shard, part=part, parts=parts, log=log, verify=verify)
    stats = {"images_written": 0, "images_skipped": 0, "failed": 0, "vae_fingerprint": fp}

    def run(bucket: list[tuple[str, np.ndarray]]) -> None:
        x = lut[np.stack([px for _, px in bucket])]  # exactly `packing.normalize_images`' values
        if len(bucket) < batch:  # one compiled shape per image size: pad the batch (images are independent)
            x = np.concatenate([x, np.zeros((batch - len(bucket), *x.shape[1:]), x.dtype)])
        m = np.asarray(encode(vae_state, jax.device_put(x, x_sharding)))
        for i, (key, _) in enumerate(bucket):
            w.add(key, m[i])
        stats["images_written"] += len(bucket)

    for spec, (vae_t, _), files in zip(pc.datasets, dataset_transforms(pc), record_files):
        done = w.begin(spec.label, files, vae_t)
        failed = {k: v for k, v in w.ds.get("failed", {}).items()}
        reader = RecordReader(files)
        buckets: dict[tuple, list] = {}
        n_images = 0
        mine = range(part, len(reader), parts)  # this part's records
        for n_done, i in enumerate(mine, 1):
            raw = reader.raw(i)
            try:
                head = decode_record(raw, images=False)
                keys = {idx: latent_key(head.id, idx) for idx in
                        sorted({it["image"] for it in head.plan if it["type"] == "vae_image"})}
            except Exception as e:  # noqa: BLE001 - the pipeline skips such a record too
                failed[f"#record {i}"] = f"{type(e).__name__}: {e}"
                continue
            n_images += len(keys)
            todo = {idx: k for idx, k in keys.items() if k not in done and k not in failed}
            stats["images_skipped"] += len(keys) - len(todo)
            if not todo:
                continue
            try:
                rec = decode_record(raw)
                rec.validate()
            except Exception as e:  # noqa: BLE001
                failed.update(dict.fromkeys(todo.values(), f"{type(e).__name__}: {e}"))
                continue
            img_num = record_img_num(rec)
            for idx, key in todo.items():
                try:  # the pipeline's own decode + resize (its VAE transform, this sample's img_num)
                    px = transform_pixels(decode_image(rec.images[idx]), vae_t, img_num)
                except Exception as e:  # noqa: BLE001 - in-step encoding would skip this sample too
                    failed[key] = f"{type(e).__name__}: {e}"
                    continue
                b = buckets.setdefault(px.shape, [])
                b.append((key, px))
                if len(b) == batch:
                    run(b)
                    buckets[px.shape] = []
            if log is not None and n_done % 1000 == 0:
                log(f"[latents] {spec.label}: {n_done}/{len(mine)} records, {stats['images_written']} images encoded")
        for b in buckets.values():
            if b:
                run(b)
        reader.close()
        w.end(len(mine), n_images, failed)
        stats["failed"] += len(failed)
        if log is not None:
            log(f"[latents] {spec.label}: {len(mine)} records{'' if parts == 1 else f' (part {part} of {parts})'}, "
                f"{n_images} VAE images, {len(failed)} failed -> {out}")
    return stats


# ---------------------------------------------------------------------------------------------- CLI


def _cli() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from echo4o_jax.train.config_cli import bad_input, flags_parser, reporting_main

    config = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                             lock_config=True)
    out_dir = flags.DEFINE_string("out", None, "output folder (re-use to resume)")
    dtype = flags.DEFINE_enum("dtype", "float32", list(MOMENT_DTYPES), "dtype of the stored moments")
    batch = flags.DEFINE_integer("batch", 8, "images per VAE encoder call (same-size images are batched; rounded "
                                 "up to a multiple of the local device count)")
    shard_mb = flags.DEFINE_float("shard_mb", 1024.0, "shard size in MiB (a killed run loses at most one shard)")
    parts = flags.DEFINE_integer("parts", 0, "split the records into this many parts, one per process "
                                 "(0: the jax.distributed process count)")
    part = flags.DEFINE_integer("part", -1, "the part this process encodes (-1: the jax.distributed process index)")
    merge = flags.DEFINE_bool("merge", False, "only merge the finished parts of --out into latents.json")
    verify = flags.DEFINE_bool("verify", False, "read every latent already stored in --out against its checksum "
                               "and re-encode the images of corrupt shards (a rerun otherwise checks shard headers "
                               "only: reading every latent costs a read of the whole folder)")

    # the flags belong to the command (`python -m echo4o_jax.data.latents`, whose `__main__` calls this
    # importable copy): absl's --help lists the key flags of the main module, which it names by sys.argv[0]
    for holder in (config, out_dir, dtype, batch, shard_mb, parts, part, merge, verify):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])

    def main(argv) -> int:
        del argv
        import jax

        from echo4o_jax.sharding import maybe_initialize_distributed

        if merge.value:
            if not out_dir.value:
                bad_input("--merge needs --out")
            merge_parts(out_dir.value)
            return 0
        if config.value is None or not out_dir.value:
            bad_input("--config and --out are required")
        if (parts.value > 0) != (part.value >= 0):
            bad_input("pass --parts and --part together (or neither: one part per jax.distributed process)")
        if parts.value > 0 and part.value >= parts.value:
            bad_input(f"--part={part.value}: parts are numbered 0 .. {parts.value - 1} (--parts={parts.value})")
        if batch.value < 1:
            bad_input(f"--batch={batch.value}: need at least 1")
        if not shard_mb.value > 0:
            bad_input(f"--shard_mb={shard_mb.value}: must be > 0")
        maybe_initialize_distributed()
        auto = parts.value == 0
        n, i = (jax.process_count(), jax.process_index()) if auto else (parts.value, part.value)
        s = precompute(config.value, out_dir.value, dtype=dtype.value, batch=batch.value,
                       shard_bytes=int(shard_mb.value * 2**20), part=i, parts=n, verify=verify.value)
        if auto and n > 1:  # every process's part is written: process 0 merges
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("echo4o_latents_parts_done")
            failed = None
            if i == 0:
                try:
                    merge_parts(out_dir.value)
                except LatentStoreError as e:
                    failed = e
            multihost_utils.sync_global_devices("echo4o_latents_merged")  # nobody exits before the merge
            if failed is not None:
                raise failed
        if n > 1 and not auto:
            print(f"[latents] part {i} of {n}: {s['images_written']} images encoded, {s['images_skipped']} already "
                  f"stored, {s['failed']} failed; when every part has finished: python -m echo4o_jax.data.latents "
                  f"--out {out_dir.value} --merge")
            return 0
        print(f"[latents] {s['images_written']} images encoded, {s['images_skipped']} already stored, "
              f"{s['failed']} failed; VAE {s['vae_fingerprint'][:16]}; train with --config.data.vae_latents="
              f"{out_dir.value}")
        return 0

    app.run(reporting_main("latents", main, interrupted="the shards finished so far are kept (the one being written is "
                           "dropped); run the same command again to go on"), flags_parser=flags_parser(config))


if __name__ == "__main__":
    # run the importable module's CLI: its errors are the classes everyone else catches (LatentStoreError), not
    # this __main__ copy's
    from echo4o_jax.data.latents import _cli as _module_cli

    _module_cli()
