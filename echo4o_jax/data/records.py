"""The training-sample record format (version 1), its writer (size-bounded ArrayRecord shards + manifest)
and reader.

Record format, version 1
========================
One ArrayRecord record = one training sample = one byte string:

    b"E4OR" | uint16 LE format_version | uint32 LE header_length | header (UTF-8 JSON) | image blobs

The header is a JSON object:

    format_version  1
    id              str, unique within a dataset (the writer refuses duplicates)
    source          str, where the sample comes from ("echo4o", "bagel_parquet", "demo", "gpt4o", ...)
    subset          str, e.g. "surreal", "instruction", "multiref", "t2i", "edit"
    task            "t2i" | "multiref" | "edit" | "understanding"
    plan            the ordered sequence plan in the official BAGEL vocabulary: a list of items
                      {"type": "text" | "vit_image" | "vae_image", "loss": 0|1, "enable_cfg": 0|1,
                       "special_token_loss": 0|1, "special_token_label": int | null}
                    image items also carry "image": index into `images` (the same image may be used
                    by several items, e.g. an edit source as clean VAE and as ViT input); text items
                    take `texts` in order.
    texts           one entry per text item: a str, or a non-empty list of str = alternatives (one is
                    picked per draw by the pipeline, seeded, like the official random caption choice).
                    Texts are strings: tokenisation happens in the pipeline.
    images          one entry per blob, in blob order: {"format": "jpeg"|"png"|"webp"|..., "width": int,
                    "height": int, "length": int (bytes)}. The blobs are the encoded bytes as received
                    (never re-encoded) and follow the header back to back.
    meta            free JSON object: category / type, "prompt_original" (the prompt before rewriting,
                    when there is one), ground truth (demo), provenance (file, row, tar member), ...

Readers reject another magic or a format_version they do not know; new optional header keys may be
added within version 1 (readers ignore unknown keys), anything else bumps the version.

Shards and manifest
===================
`RecordWriter(out_dir, shard_bytes=..., name=...)` writes `<name>-00000.array_record`, ... (ArrayRecord,
group_size 1, uncompressed: the payload is mostly JPEG/PNG). A shard is written under a `.tmp` name and
renamed when full or at `close()`, and `manifest.json` is rewritten (atomically) after every finished
shard, so a crash leaves every finished shard readable and listed (`"complete": false`). `close()` writes
the final manifest. `overwrite=True` over an existing dataset writes the new one into the hidden
subfolder `.overwrite-new` and swaps its files in (renames, same file system) only at a successful
`close()`: until then, and when the writer fails, the old dataset stays as it was (other files of the
folder are never touched):

    {"format": "echo4o-records", "format_version": 1, "name", "complete": true, "created_utc",
     "shard_bytes", "records", "bytes" (shard file bytes), "image_bytes", "images",
     "shards": [{"file", "records", "bytes", "sha256"}],
     "counts": {"task": {...}, "subset": {...}, "source": {...}},
     "skipped": {"count", "by_reason": {...}, "examples": [{"where", "reason"}, ... (first 100)]},
     "info": {...}}   # free, e.g. importer arguments

`RecordReader(path)` takes a dataset folder (manifest or `*.array_record`), a shard file, a manifest
path, a glob, or a list of these; `len`, indexing, iteration, `header(i)` (no image copies), `verify()`.
Every shard is opened (record count) when the reader is made; `verify=True` first checks the shard sizes
and sha256 against the manifests, before any shard is opened. Unreadable shards (truncated, corrupt) and
records raise RecordError naming the shard file (and the record's index in it).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import datetime
import glob
import io
import itertools
import json
import os
import shutil
import struct
from typing import Iterable, Iterator, Sequence

from echo4o_jax.paths import file_sha256, write_json

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "TASKS",
    "MANIFEST_NAME",
    "RecordError",
    "DatasetExistsError",
    "RecordWriteError",
    "shard_record_counts",
    "whole_shards",
    "ShardSource",
    "ImageInfo",
    "Record",
    "probe_image",
    "text_item",
    "vae_item",
    "vit_item",
    "t2i_record",
    "edit_record",
    "multiref_record",
    "understanding_record",
    "encode_record",
    "decode_record",
    "decode_header",
    "RecordWriter",
    "check_writable",
    "RecordReader",
    "resolve_shards",
    "load_manifest",
    "dataset_manifests",
    "incomplete_reason",
]

FORMAT_VERSION = 1
MAGIC = b"E4OR"
_PREFIX = struct.Struct("<4sHI")
TASKS = ("t2i", "multiref", "edit", "understanding")
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
_PLAN_KEYS = {"type", "loss", "enable_cfg", "special_token_loss", "special_token_label", "image"}
_ITEM_TYPES = ("text", "vit_image", "vae_image")
_HEADER_KEYS = ("format_version", "id", "task", "plan", "texts", "images")
_SHARD_KEYS = {"file": str, "records": int, "bytes": int, "sha256": str}
_ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"


class RecordError(ValueError):
    """A record is malformed, cannot be encoded/decoded, or a dataset folder is inconsistent."""


class DatasetExistsError(RecordError):
    """`RecordWriter` was given a folder that already holds a dataset, without append / overwrite."""

    def __init__(self, path: str, files: list[str]):
        self.path = path
        super().__init__(f"{path} already holds a dataset ({sorted(files)[:3]} ...); pass append=True or "
                         f"overwrite=True")


class RecordWriteError(OSError):
    """A shard could not be written (disk full, quota, I/O error): the message names the file. The records
    of the unfinished shard are not in the dataset; the writer takes no more records."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str  # PIL format name, lower case ("jpeg", "png", ...)
    width: int
    height: int


def probe_image(data: bytes, *, check: str = "header") -> ImageInfo:
    """Format and size of encoded image bytes. `check="decode"` also decodes the pixels (catches
    truncated / corrupt files, which the header alone does not). Raises RecordError."""
    from PIL import Image

    from echo4o_jax.image_transform import unsupported_mode

    if check not in ("header", "decode"):
        raise ValueError(f"check={check!r}: expected 'header' or 'decode'")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise RecordError("image is empty or not bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            w, h = im.size
            bad_mode = unsupported_mode(im)
            if check == "decode":
                im.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise RecordError(f"cannot read image: {type(e).__name__}: {e}") from None
    if bad_mode:
        raise RecordError(bad_mode)
    if w <= 0 or h <= 0:
        raise RecordError(f"image has size {w}x{h}")
    return ImageInfo(fmt or "unknown", int(w), int(h))


# ---------------------------------------------------------------------------------------------- plans


def text_item(*, loss: int = 0, enable_cfg: int = 0, special_token_loss: int = 0,
              special_token_label: int | None = None) -> dict:
    return {"type": "text", "enable_cfg": int(enable_cfg), "loss": int(loss),
            "special_token_loss": int(special_token_loss), "special_token_label": special_token_label}


def vae_item(image: int, *, loss: int = 0, enable_cfg: int = 0) -> dict:
    """A VAE image: loss=1 is a noisy generation target, loss=0 a clean condition."""
    return {"type": "vae_image", "enable_cfg": int(enable_cfg), "loss": int(loss), "special_token_loss": 0,
            "special_token_label": None, "image": int(image)}


def vit_item(image: int, *, enable_cfg: int = 0) -> dict:
    return {"type": "vit_image", "enable_cfg": int(enable_cfg), "loss": 0, "special_token_loss": 0,
            "special_token_label": None, "image": int(image)}


Text = str | list[str]


@dataclasses.dataclass
class Record:
    """One training sample. `images` hold encoded bytes; `image_info` is filled by the writer / reader."""

    id: str
    task: str
    plan: list[dict]
    texts: list[Text]
    images: list[bytes] = dataclasses.field(default_factory=list)
    source: str = ""
    subset: str = ""
    meta: dict = dataclasses.field(default_factory=dict)
    image_info: list[ImageInfo] | None = None
    format_version: int = FORMAT_VERSION

    # ---------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises RecordError naming the record and the offending field."""
        name = f"record {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise RecordError(f"{name}: id must be a non-empty str")
        if self.task not in TASKS:
            raise RecordError(f"{name}: task={self.task!r}, expected one of {TASKS}")
        for f in ("source", "subset"):
            if not isinstance(getattr(self, f), str):
                raise RecordError(f"{name}: {f} must be a str")
        if not isinstance(self.meta, dict):
            raise RecordError(f"{name}: meta must be a dict")
        if not isinstance(self.plan, list) or not self.plan:
            raise RecordError(f"{name}: plan must be a non-empty list")
        n_text = 0
        used = set()
        for k, item in enumerate(self.plan):
            where = f"{name}: plan item {k}"
            if not isinstance(item, dict):
                raise RecordError(f"{where} is not a dict")
            extra = set(item) - _PLAN_KEYS
            if extra:
                raise RecordError(f"{where}: unknown keys {sorted(extra)}")
            typ = item.get("type")
            if typ not in _ITEM_TYPES:
                raise RecordError(f"{where}: type={typ!r}, expected one of {_ITEM_TYPES}")
            for f in ("loss", "enable_cfg", "special_token_loss"):
                if item.get(f) not in (0, 1) or isinstance(item.get(f), bool):
                    raise RecordError(f"{where}: {f}={item.get(f)!r} must be 0 or 1")
            lab = item.get("special_token_label", "missing")
            if lab == "missing":
                raise RecordError(f"{where}: missing special_token_label (use null)")
            if item["special_token_loss"] == 1 and not (isinstance(lab, int) and lab >= 0):
                raise RecordError(f"{where}: special_token_loss=1 needs an int special_token_label")
            if lab is not None and not isinstance(lab, int):
                raise RecordError(f"{where}: special_token_label={lab!r} must be an int or null")
            if typ == "text":
                if "image" in item:
                    raise RecordError(f"{where}: a text item has no 'image'")
                n_text += 1
            else:
                idx = item.get("image")
                if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(self.images):
                    raise RecordError(f"{where}: image={idx!r} is not an index into {len(self.images)} images")
                if typ == "vit_image" and item["loss"] == 1:
                    raise RecordError(f"{where}: a vit_image cannot carry a loss")
                used.add(idx)
        if not isinstance(self.texts, list) or len(self.texts) != n_text:
            raise RecordError(f"{name}: plan has {n_text} text items but texts has "
                              f"{len(self.texts) if isinstance(self.texts, list) else type(self.texts).__name__}")
        for i, t in enumerate(self.texts):
            if isinstance(t, str):
                continue
            if not isinstance(t, list) or not t or not all(isinstance(s, str) for s in t):
                raise RecordError(f"{name}: texts[{i}] must be a str or a non-empty list of str")
        unused = sorted(set(range(len(self.images))) - used)
        if unused:
            raise RecordError(f"{name}: images {unused} are not referenced by the plan")
        for i, b in enumerate(self.images):
            if not isinstance(b, (bytes, bytearray)) or not b:
                raise RecordError(f"{name}: images[{i}] must be non-empty bytes")

    def official_plan(self) -> list[dict]:
        """The plan without the `image` references (the official `sequence_plan` items)."""
        return [{k: v for k, v in it.items() if k != "image"} for it in self.plan]

    @property
    def n_loss_images(self) -> int:
        return sum(1 for it in self.plan if it["type"] == "vae_image" and it["loss"] == 1)


def _image_args(images: Sequence[bytes]) -> list[bytes]:
    return [bytes(b) for b in images]


def t2i_record(id: str, prompt: Text, image: bytes, *, source: str = "", subset: str = "",
               meta: dict | None = None) -> Record:
    """Official T2I: caption (CFG-droppable, no loss) -> noisy VAE target."""
    return Record(id=id, task="t2i", plan=[text_item(enable_cfg=1), vae_item(0, loss=1)], texts=[prompt],
                  images=_image_args([image]), source=source, subset=subset, meta=dict(meta or {}))


def edit_record(id: str, images: Sequence[bytes], instructions: Sequence[Text], *, source: str = "",
                subset: str = "", meta: dict | None = None) -> Record:
    """Official unified edit, whole chain `images[0] -(instr 0)-> images[1] -> ... -> images[-1]`:
    source as clean VAE + ViT (both CFG-droppable); per step the instruction (CFG-droppable) and the
    noisy VAE of the next image; an intermediate image is then also given as clean VAE + ViT."""
    n = len(images)
    if n < 2 or len(instructions) != n - 1:
        raise RecordError(f"record {id!r}: an edit needs >= 2 images and len(images) - 1 instructions "
                          f"(got {n} images, {len(instructions)} instructions)")
    plan = [vae_item(0, enable_cfg=1), vit_item(0, enable_cfg=1)]
    for i in range(1, n):
        plan.append(text_item(enable_cfg=1))
        plan.append(vae_item(i, loss=1))
        if i != n - 1:
            plan += [vae_item(i, enable_cfg=1), vit_item(i, enable_cfg=1)]
    return Record(id=id, task="edit", plan=plan, texts=list(instructions), images=_image_args(images),
                  source=source, subset=subset, meta=dict(meta or {}))


def multiref_record(id: str, references: Sequence[bytes], instruction: Text, target: bytes, *,
                    source: str = "", subset: str = "", meta: dict | None = None) -> Record:
    """Echo-4o multi-reference: each reference as clean VAE + ViT (CFG-droppable), the instruction
    (CFG-droppable), then the noisy VAE target. Images: [ref_1 .. ref_K, target]."""
    if not references:
        raise RecordError(f"record {id!r}: a multiref sample needs at least one reference")
    plan = []
    for i in range(len(references)):
        plan += [vae_item(i, enable_cfg=1), vit_item(i, enable_cfg=1)]
    plan += [text_item(enable_cfg=1), vae_item(len(references), loss=1)]
    return Record(id=id, task="multiref", plan=plan, texts=[instruction],
                  images=_image_args([*references, target]), source=source, subset=subset,
                  meta=dict(meta or {}))


def understanding_record(id: str, images: Sequence[bytes] | bytes, question: Text | None, answer: Text, *,
                         source: str = "", subset: str = "", meta: dict | None = None) -> Record:
    """Official VLM SFT: ViT image(s) -> question text (no loss) -> answer text (loss); no CFG."""
    if isinstance(images, (bytes, bytearray)):
        images = [images]
    plan = [vit_item(i) for i in range(len(images))]
    texts: list[Text] = []
    if question is not None:
        plan.append(text_item())
        texts.append(question)
    plan.append(text_item(loss=1))
    texts.append(answer)
    return Record(id=id, task="understanding", plan=plan, texts=texts, images=_image_args(images),
                  source=source, subset=subset, meta=dict(meta or {}))


# ---------------------------------------------------------------------------------------------- codec


def encode_record(record: Record, *, check_images: str = "header") -> bytes:
    """Validate and serialise. Fills `record.image_info` (probing the bytes) when missing."""
    record.validate()
    if record.image_info is None or len(record.image_info) != len(record.images):
        try:
            record.image_info = [probe_image(b, check=check_images) for b in record.images]
        except RecordError as e:
            raise RecordError(f"record {record.id!r}: {e}") from None
    header = {
        "format_version": FORMAT_VERSION,
        "id": record.id,
        "source": record.source,
        "subset": record.subset,
        "task": record.task,
        "plan": record.plan,
        "texts": record.texts,
        "images": [{"format": i.format, "width": i.width, "height": i.height, "length": len(b)}
                   for i, b in zip(record.image_info, record.images)],
        "meta": record.meta,
    }
    try:
        hb = json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise RecordError(f"record {record.id!r}: header is not JSON-serialisable ({e})") from None
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb)), hb, *record.images])


def decode_header(buf: bytes) -> dict:
    """The JSON header of an encoded record (no image bytes copied)."""
    if len(buf) < _PREFIX.size:
        raise RecordError(f"record too short ({len(buf)} bytes)")
    magic, version, n = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RecordError(f"not an echo4o record (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise RecordError(f"record format_version {version} is not supported (this reader: {FORMAT_VERSION})")
    end = _PREFIX.size + n
    if end > len(buf):
        raise RecordError("record truncated inside its header")
    try:
        header = json.loads(bytes(buf[_PREFIX.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"record header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise RecordError(f"record header is a JSON {type(header).__name__}, not an object")
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing:
        raise RecordError(f"record {header.get('id')!r}: header lacks {missing}")
    header["_blob_start"] = end
    return header


def decode_record(buf: bytes, *, images: bool = True, validate: bool = False) -> Record:
    """Parse an encoded record. `images=False` skips copying the image bytes (images = [])."""
    h = decode_header(buf)
    pos = h.pop("_blob_start")
    blobs, infos = [], []
    for i, im in enumerate(h.get("images", [])):
        n = int(im["length"])
        if pos + n > len(buf):
            raise RecordError(f"record {h.get('id')!r}: image {i} truncated")
        if images:
            blobs.append(bytes(buf[pos:pos + n]))
        infos.append(ImageInfo(im["format"], int(im["width"]), int(im["height"])))
        pos += n
    if pos != len(buf):
        raise RecordError(f"record {h.get('id')!r}: {len(buf) - pos} trailing bytes")
    rec = Record(id=h["id"], task=h["task"], plan=h["plan"], texts=h["texts"], images=blobs,
                 source=h.get("source", ""), subset=h.get("subset", ""), meta=h.get("meta", {}),
                 image_info=infos, format_version=h["format_version"])
    if validate and images:
        rec.validate()
    return rec


# ---------------------------------------------------------------------------------------------- writer


def _dataset_files(folder: str) -> list[str]:
    """The names of the files of `folder` that make up a dataset (shards and manifest)."""
    return [p for p in os.listdir(folder) if p.endswith(SHARD_SUFFIX) or p == MANIFEST_NAME]


def _aside(out_dir: str, which: str) -> str:
    """The hidden subfolder of an overwrite: "new" (the new dataset until close), "old" (the old dataset's files
    while they are swapped)."""
    return os.path.join(out_dir, f".overwrite-{which}")


def check_writable(out_dir: str | os.PathLike, *, append: bool = False, overwrite: bool = False) -> None:
    """The refusals of `RecordWriter(out_dir, append=..., overwrite=...)`, without writing anything (a tool that
    writes several datasets checks them all first): DatasetExistsError when the folder holds a dataset and
    neither `append` (onto its manifest) nor `overwrite` is given; RecordError when an interrupted overwrite left
    the previous dataset's files aside."""
    out_dir = os.fspath(out_dir)
    backup = _aside(out_dir, "old")
    if os.path.exists(backup):
        raise RecordError(f"{backup} exists: an overwrite of {out_dir} was interrupted while swapping "
                          f"datasets and it holds the previous dataset's files; move them back into "
                          f"{out_dir} (or delete them) and remove the folder")
    existing = _dataset_files(out_dir) if os.path.isdir(out_dir) else []
    if existing and not overwrite and not (append and os.path.exists(os.path.join(out_dir, MANIFEST_NAME))):
        raise DatasetExistsError(out_dir, existing)


class RecordWriter:
    """Writes records into size-bounded ArrayRecord shards plus `manifest.json`.

        with RecordWriter(out_dir, shard_bytes=256 << 20, name="surreal") as w:
            w.write(t2i_record("surreal/00000", prompt, jpeg_bytes, source="echo4o", subset="surreal"))
            w.skip("corrupt image", where="images/0-5000.tar.gz:00017.jpg")

    A shard is closed once adding a record would pass `shard_bytes` (a record larger than
    `shard_bytes` gets a shard of its own). `append=True` continues an existing dataset (new shards,
    same manifest, ids checked against the existing ones); otherwise the folder must not hold a
    dataset yet (DatasetExistsError) unless `overwrite=True`, which writes the new dataset into a hidden
    subfolder and swaps it in at a successful `close()` (on failure the old dataset is kept and the new
    one dropped). `check_images="decode"` decodes every image (slow, catches truncated files); the
    default only reads the image header.
    """

    def __init__(self, out_dir: str | os.PathLike, *, shard_bytes: int = 256 << 20, name: str = "records",
                 append: bool = False, overwrite: bool = False, check_images: str = "header",
                 info: dict | None = None):
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes={shard_bytes} must be positive")
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"name={name!r} must be a plain file-name prefix")
        self.out_dir = os.fspath(out_dir)
        self.shard_bytes = int(shard_bytes)
        self.name = name
        self.check_images = check_images
        self.info = dict(info or {})
        os.makedirs(self.out_dir, exist_ok=True)
        self._staging: str | None = None  # overwrite: where the new dataset is written until close()
        self._write_dir = self.out_dir
        self._shards: list[dict] = []
        self._counts = {k: collections.Counter() for k in ("task", "subset", "source")}
        self._records = 0
        self._images = 0
        self._image_bytes = 0
        self._skipped = collections.Counter()
        self._skip_examples: list[dict] = []
        self._ids: set[str] = set()
        self._cur = None  # (ArrayRecordWriter, tmp path, final name)
        self._cur_records = 0
        self._cur_bytes = 0
        self._closed = False
        self._broken: str | None = None  # why a shard could not be written (no more records are taken)
        self._created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        check_writable(self.out_dir, append=append, overwrite=overwrite)
        if append and os.path.exists(os.path.join(self.out_dir, MANIFEST_NAME)):
            self._manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
            self._load_existing()
        elif _dataset_files(self.out_dir):  # overwrite (check_writable)
            self._staging = self._write_dir = self._aside("new")
            if os.path.exists(self._staging):  # the partial output of a crashed overwrite
                shutil.rmtree(self._staging)
            os.makedirs(self._staging)
        self._manifest_path = os.path.join(self._write_dir, MANIFEST_NAME)
        for p in os.listdir(self.out_dir):  # leftovers of a crashed writer
            if p.endswith(SHARD_SUFFIX + ".tmp"):
                os.remove(os.path.join(self.out_dir, p))
        if not os.path.exists(self._manifest_path):
            # at once, before any shard: a writer killed after its first shard's rename (before a manifest
            # listed it) left shards and no manifest, which readers took as a complete dataset
            write_json(self._manifest_path, self._manifest(complete=False))

    def _aside(self, which: str) -> str:
        return _aside(self.out_dir, which)

    def _load_existing(self) -> None:
        m = load_manifest(self._manifest_path)
        self._shards = list(m["shards"])
        sk = m.get("skipped") or {}
        self._skipped.update(sk.get("by_reason", {}))
        self._skip_examples = list(sk.get("examples", []))
        self._created = m.get("created_utc", self._created)
        self.info = {**(m.get("info") or {}), **self.info}
        if not self._shards:
            return
        reader = RecordReader(self.out_dir)
        for i in range(len(reader)):
            h = reader.header(i)
            self._ids.add(h["id"])
            self._records += 1
            self._images += len(h["images"])
            self._image_bytes += sum(int(im["length"]) for im in h["images"])
            for k in self._counts:
                self._counts[k][h.get(k, "")] += 1

    # ------------------------------------------------------------------------------------------ API
    @property
    def ids(self) -> set[str]:
        """Ids written so far (including those of an appended-to dataset)."""
        return self._ids

    @property
    def num_records(self) -> int:
        return self._records

    def write(self, record: Record) -> None:
        if self._closed:
            raise RecordError("RecordWriter is closed")
        if self._broken is not None:
            raise RecordWriteError(f"the writer of {self.out_dir} failed earlier: {self._broken}")
        if record.id in self._ids:
            raise RecordError(f"duplicate record id {record.id!r} in {self.out_dir}")
        buf = encode_record(record, check_images=self.check_images)
        if self._cur is not None and self._cur_records and self._cur_bytes + len(buf) > self.shard_bytes:
            self._finish_shard()
        if self._cur is None:
            self._open_shard()
        try:
            self._cur[0].write(buf)
        except RuntimeError as e:  # array_record reports I/O errors (disk full, ...) as RuntimeError
            raise self._abandon_shard(e) from None
        self._cur_records += 1
        self._cur_bytes += len(buf)
        self._ids.add(record.id)
        self._records += 1
        self._images += len(record.images)
        self._image_bytes += sum(len(b) for b in record.images)
        self._counts["task"][record.task] += 1
        self._counts["subset"][record.subset] += 1
        self._counts["source"][record.source] += 1

    def skip(self, reason: str, where: str = "") -> None:
        """Count an input item that was not written (listed in the manifest)."""
        self._skipped[reason] += 1
        if len(self._skip_examples) < 100:
            self._skip_examples.append({"where": where, "reason": reason})

    @property
    def num_skipped(self) -> int:
        return sum(self._skipped.values())

    def close(self, *, error: str | None = None, keep_partial: bool = False) -> dict:
        """Finish the open shard and write the final manifest; returns it. An overwrite that ends with an
        `error` keeps the old dataset and drops the new one, unless `keep_partial` (then the partial new
        dataset, `"complete": false`, replaces the old one: what a resumable writer continues)."""
        if self._closed:
            return load_manifest(self._manifest_path)
        failure = None
        if self._cur is not None:
            try:
                self._finish_shard()
            except RecordWriteError as e:  # the finished shards stay listed, in a manifest marked incomplete
                failure = e
        given = error
        if self._broken is not None and self._broken not in (error or ""):
            error = f"{error}; {self._broken}" if error else self._broken
        self._closed = True
        m = self._manifest(complete=error is None)
        if error is not None:
            m["error"] = error
        write_json(self._manifest_path, m)
        if self._staging is not None:
            if error is None or keep_partial:
                self._swap_in()
            else:  # an overwrite that failed: the old dataset stays as it was
                shutil.rmtree(self._staging)
            self._manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
        if failure is not None and given is None:  # a close() that was to succeed: say why it did not
            raise failure
        return m

    def _swap_in(self) -> None:
        """Replaces the dataset files of `out_dir` by the staged ones. The old files are moved to a backup
        subfolder first (manifest first) and the new manifest comes last, so an interruption loses
        neither dataset (the next writer refuses to start while the backup folder exists)."""
        backup = self._aside("old")
        os.makedirs(backup)
        for p in sorted(_dataset_files(self.out_dir), key=lambda p: p != MANIFEST_NAME):
            os.replace(os.path.join(self.out_dir, p), os.path.join(backup, p))
        for p in sorted(_dataset_files(self._staging), key=lambda p: p == MANIFEST_NAME):
            os.replace(os.path.join(self._staging, p), os.path.join(self.out_dir, p))
        shutil.rmtree(backup)
        shutil.rmtree(self._staging)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.close(error="interrupted (Ctrl-C)" if interrupted else f"{exc_type.__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ shards
    def _next_shard_name(self) -> str:
        taken = {s["file"] for s in self._shards}
        i = len(self._shards)
        while True:
            f = f"{self.name}-{i:05d}{SHARD_SUFFIX}"
            if f not in taken and not os.path.exists(os.path.join(self._write_dir, f)):
                return f
            i += 1

    def _open_shard(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        final = self._next_shard_name()
        tmp = os.path.join(self._write_dir, final + ".tmp")
        self._cur = (ArrayRecordWriter(tmp, _ARRAY_RECORD_OPTIONS), tmp, final)
        self._cur_records = 0
        self._cur_bytes = 0

    def _finish_shard(self) -> None:
        writer, tmp, final = self._cur
        try:
            writer.close()
        except RuntimeError as e:  # (as in write)
            raise self._abandon_shard(e) from None
        self._cur = None
        path = os.path.join(self._write_dir, final)
        os.replace(tmp, path)
        self._shards.append({"file": final, "records": self._cur_records, "bytes": os.path.getsize(path),
                             "sha256": file_sha256(path)})
        write_json(self._manifest_path, self._manifest(complete=False))

    def _abandon_shard(self, e: RuntimeError) -> RecordWriteError:
        """The open shard failed to write (`e`): drop its file, take no more records; -> the error to raise."""
        writer, tmp, final = self._cur
        self._cur = None
        try:
            writer.close()
        except RuntimeError:
            pass
        try:
            os.remove(tmp)
        except OSError:
            pass
        self._broken = (f"cannot write the shard {os.path.join(self._write_dir, final)} ({e}): its "
                        f"{self._cur_records} records are not in the dataset")
        return RecordWriteError(self._broken)

    def _manifest(self, *, complete: bool) -> dict:
        return {
            "format": "echo4o-records",
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "complete": complete,
            "created_utc": self._created,
            "shard_bytes": self.shard_bytes,
            "records": sum(s["records"] for s in self._shards),
            "bytes": sum(s["bytes"] for s in self._shards),
            "images": self._images if complete else None,
            "image_bytes": self._image_bytes if complete else None,
            "shards": self._shards,
            "counts": {k: dict(sorted(v.items())) for k, v in self._counts.items()} if complete else None,
            "skipped": {"count": sum(self._skipped.values()), "by_reason": dict(self._skipped),
                        "examples": self._skip_examples},
            "info": self.info,
        }


# ---------------------------------------------------------------------------------------------- reader


def load_manifest(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise RecordError(f"no manifest at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a manifest that is not UTF-8: a traceback)
        raise RecordError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(m, dict) or m.get("format") != "echo4o-records":
        raise RecordError(f"{path}: not an echo4o-records manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise RecordError(f"{path}: format_version {m.get('format_version')} is not supported")
    if not isinstance(m.get("shards"), list):
        raise RecordError(f"{path}: 'shards' must be a list")
    for k, s in enumerate(m["shards"]):
        bad = [key for key, typ in _SHARD_KEYS.items() if not isinstance(s, dict) or not isinstance(s.get(key), typ)]
        if bad:
            raise RecordError(f"{path}: shards[{k}] lacks {bad} (expected {{'file': str, 'records': int, "
                              f"'bytes': int, 'sha256': str}})")
    return m


def listed_sha256(files: Sequence[str]) -> list[str | None]:
    """The sha256 that each record shard file's folder manifest lists for it (None: no manifest there, or it
    does not list the file). Nothing is hashed: a read of the manifests only."""
    listed: dict[str, dict[str, str]] = {}
    out = []
    for f in files:
        d = os.path.dirname(f)
        if d not in listed:
            has = os.path.exists(os.path.join(d, MANIFEST_NAME))
            listed[d] = {s["file"]: s["sha256"] for s in load_manifest(d)["shards"]} if has else {}
        out.append(listed[d].get(os.path.basename(f)))
    return out


def resolve_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard files of a dataset folder (from its manifest, else its sorted `*.array_record`), a manifest
    path, a shard file, a glob, or a list of any of these."""
    if isinstance(path, (list, tuple)):
        out: list[str] = []
        for p in path:
            out += resolve_shards(p)
        return out
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, MANIFEST_NAME)):
            m = load_manifest(p)
            files = [os.path.join(p, s["file"]) for s in m["shards"]]
        else:
            files = sorted(glob.glob(os.path.join(p, "*" + SHARD_SUFFIX)))
        if not files:
            inner = sorted(d for d in os.listdir(p) if os.path.isfile(os.path.join(p, d, MANIFEST_NAME)))
            if inner:  # a root of datasets (an import's --out), not a dataset
                raise RecordError(f"{p}: no shards; it holds the datasets {', '.join(inner[:8])}"
                                  f"{' ...' if len(inner) > 8 else ''}: give one of them (or several)")
            if os.path.exists(os.path.join(p, MANIFEST_NAME)):
                why = incomplete_reason(p, m)  # (a failed import or synthesis: what its manifest says)
                raise RecordError(f"{p}: no shards (its manifest lists none" + (f"; {why})" if why else ")"))
            raise RecordError(f"{p}: no shards (no manifest.json, no *.array_record file)")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise RecordError(f"{p}: manifest lists missing shards {missing[:3]}")
        return files
    if os.path.basename(p) == MANIFEST_NAME:
        return resolve_shards(os.path.dirname(p) or ".")
    if os.path.isfile(p):
        return [p]
    files = sorted(glob.glob(p))
    if not files:
        raise RecordError(f"{p}: no such dataset, shard or glob match")
    return [f for g in files for f in (resolve_shards(g) if os.path.isdir(g) else [g])]


def dataset_manifests(path: str | os.PathLike | Sequence[str | os.PathLike], *,
                      of_shards: bool = False) -> dict[str, dict]:
    """{folder: manifest} of the dataset folders `path` names (as `resolve_shards` takes it): a folder holding a
    manifest, a manifest path, or a list of these (shard files and globs name no manifest). `of_shards`: also
    the manifests of the folders holding the shard files and glob matches it names (whether their dataset is
    complete: a glob into an incomplete dataset was read as complete)."""
    out = {}
    for p in ([path] if isinstance(path, (str, os.PathLike)) else path):
        p = os.fspath(p)
        if os.path.isdir(p) or os.path.basename(p) == MANIFEST_NAME:
            folders = [p if os.path.isdir(p) else os.path.dirname(p)]
        elif of_shards:
            folders = sorted({os.path.dirname(f) or "." for f in resolve_shards(p)})
        else:
            folders = []
        for d in folders:
            if d not in out and os.path.exists(os.path.join(d, MANIFEST_NAME)):
                out[d] = load_manifest(d)
    return out


def incomplete_reason(folder: str, manifest: dict) -> str | None:
    """None for a complete dataset; else what its manifest says (naming the manifest): a writer that failed
    (its recorded error) or was interrupted (no error recorded: killed) leaves `"complete": false`."""
    if manifest.get("complete") is True and not manifest.get("error"):
        return None
    err = manifest.get("error")
    why = f"error: {err}" if err else "no error recorded: its writer was interrupted"
    return (f"{os.path.join(folder, MANIFEST_NAME)} says the dataset is incomplete ({why}); it holds "
            f"{manifest.get('records')} records in {len(manifest.get('shards') or [])} shards")


def _shard_num_records(path: str) -> int:
    """The record count of one ArrayRecord shard; RecordError naming the file when it cannot be opened
    (truncated, corrupt, not an ArrayRecord file)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        r = ArrayRecordReader(path)
        n = r.num_records() if r.ok() else None
    except (RuntimeError, OSError, ValueError) as e:
        raise RecordError(f"{path}: cannot open the shard ({type(e).__name__}: {e})") from None
    try:
        r.close()  # a reader that is not ok raises here (with an empty message)
    except RuntimeError as e:
        if n is not None:
            raise RecordError(f"{path}: cannot read the shard ({type(e).__name__}: {e})") from None
    if n is None:
        raise RecordError(f"{path}: not a readable ArrayRecord shard (truncated or corrupt)")
    return n


def shard_record_counts(files: Sequence[str]) -> list[int]:
    """The record count of every shard (opened in threads); RecordError naming the first shard that cannot
    be opened (truncated, corrupt)."""
    if not files:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(16, len(files))) as ex:
        return list(ex.map(_shard_num_records, files))


@dataclasses.dataclass(frozen=True)
class _ShardSlice:
    """The `FileInstruction` protocol of ArrayRecordDataSource (so that it does not reopen the shard)."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def whole_shards(files: Sequence[str], counts: Sequence[int] | None = None) -> list[_ShardSlice]:
    """The paths argument of an ArrayRecordDataSource (array_record's or grain's) reading every record of
    `files`, given their record `counts` (default `shard_record_counts(files)`: RecordError naming a shard
    that cannot be opened): the source then opens no shard when it is made (only lazily, to read), where
    plain paths would be opened once more to count their records."""
    if counts is None:
        counts = shard_record_counts(files)
    return [_ShardSlice(f, 0, n, n) for f, n in zip(files, counts)]


class ShardSource:
    """Random access over the records of whole shards (the data-source protocol of Grain and array_record:
    `len`, indexing), given their record `counts` (default `shard_record_counts(files)`): no shard is opened
    when it is made, each only lazily to read it. A record that cannot be read (a corrupt chunk, a shard
    truncated or removed since) raises RecordError naming the shard file and the record's index in it (and
    the dataset `name`, when given). Picklable (Grain worker processes)."""

    def __init__(self, files: Sequence[str], counts: Sequence[int] | None = None, *, name: str = ""):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.files = [os.fspath(f) for f in files]
        if counts is None:
            counts = shard_record_counts(self.files)
        self.name = name
        self._ends = list(itertools.accumulate(counts))
        self._src = ArrayRecordDataSource(whole_shards(self.files, counts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def where(self, i: int) -> str:
        """`"<shard file>: record <index in the shard>"` of record `i` (0 <= i < len; for messages)."""
        k = bisect.bisect_right(self._ends, i)
        return f"{self.files[k]}: record {i - (self._ends[k - 1] if k else 0)}"

    def __getitem__(self, i) -> bytes:
        i = i.__index__()
        try:
            return self._src[i]
        except (RuntimeError, OSError, ValueError) as e:  # riegeli / array_record: corrupt chunk, ...
            of = f" (dataset {self.name})" if self.name else ""
            raise RecordError(f"{self.where(i)}: cannot read ({type(e).__name__}: {e}){of}") from None

    def close(self) -> None:
        self._src.__exit__(None, None, None)  # closes the shards opened so far


class RecordReader:
    """Random access over the records of one or more datasets / shards (in shard order).

    Every shard is opened when the reader is made (record counts); `verify=True` checks the shard files
    against their manifests first (`verify()`). Read and decode errors raise RecordError naming the shard
    file and the record's index in it."""

    def __init__(self, path, *, verify: bool = False):
        self.paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.shards = resolve_shards(self.paths)
        if not self.shards:
            raise RecordError(f"{self.paths}: no shards")
        # (also of the folders of shard files and globs: verify() checked none of those, and exited 0)
        self.manifests = dataset_manifests(self.paths, of_shards=True)
        self.verification: dict | None = None  # verify()'s summary when verify=True
        if verify:
            checked = self._verify_files()  # before any shard is opened
        counts = shard_record_counts(self.shards)
        self._shard_records = {os.path.normpath(f): n for f, n in zip(self.shards, counts)}
        self._src = ShardSource(self.shards, counts)
        if verify:
            self._verify_counts()
            self.verification = {"shards_checked": checked, "records": len(self)}

    @property
    def manifest(self) -> dict | None:
        """The manifest when exactly one dataset folder was given."""
        return next(iter(self.manifests.values())) if len(self.manifests) == 1 else None

    def __len__(self) -> int:
        return len(self._src)

    def where(self, i: int) -> str:
        """`"<shard file>: record <index in the shard>"` of record `i` (for messages)."""
        return self._src.where(self._index(i))

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record index {i} out of range ({len(self)} records)")
        return i % len(self)

    def raw(self, i: int) -> bytes:
        return self._src[self._index(i)]

    def _decode(self, i: int, decode, **kw):
        i = self._index(i)
        buf = self.raw(i)
        try:
            return decode(buf, **kw)
        except RecordError as e:
            raise RecordError(f"{self.where(i)}: {e}") from None

    def header(self, i: int) -> dict:
        h = self._decode(i, decode_header)
        h.pop("_blob_start", None)
        return h

    def __getitem__(self, i: int) -> Record:
        return self._decode(i, decode_record)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def _listed_shards(self) -> Iterator[tuple[str, dict]]:
        """(file, manifest entry) of each shard read that its folder's manifest lists; a shard read from such a
        folder that the manifest does not list (one an interrupted writer renamed but never listed, picked up by
        a glob) is a RecordError."""
        read = {os.path.normpath(f) for f in self.shards}
        listed = set()
        for d, m in self.manifests.items():
            for s in m["shards"]:
                f = os.path.join(d, s["file"])
                listed.add(os.path.normpath(f))
                if os.path.normpath(f) in read:
                    yield f, s
        folders = {os.path.normpath(d) for d in self.manifests}
        unlisted = sorted(f for f in read - listed if os.path.dirname(f) in folders)
        if unlisted:
            mf = os.path.join(os.path.dirname(unlisted[0]), MANIFEST_NAME)
            raise RecordError(f"{unlisted[0]}: not listed by {mf} ({len(unlisted)} such shard(s): left by an "
                              "interrupted writer?)")

    def _verify_files(self) -> int:
        """Shard sizes and sha256 against the manifests (no shard opened); returns the shards checked."""
        checked = 0
        for f, s in self._listed_shards():
            if os.path.getsize(f) != s["bytes"]:
                raise RecordError(f"{f}: size {os.path.getsize(f)} != manifest {s['bytes']} (truncated or "
                                  f"rewritten)")
            if file_sha256(f) != s["sha256"]:
                raise RecordError(f"{f}: sha256 mismatch with the manifest (corrupt or rewritten)")
            checked += 1
        return checked

    def _verify_counts(self) -> None:
        for f, s in self._listed_shards():
            n = self._shard_records[os.path.normpath(f)]
            if n != s["records"]:
                raise RecordError(f"{f}: {n} records, manifest says {s['records']}")

    def verify(self) -> dict:
        """Checks shard sizes, sha256 and record counts against the manifests; returns a summary."""
        checked = self._verify_files()
        self._verify_counts()
        return {"shards_checked": checked, "records": len(self)}

    def close(self) -> None:
        self._src.close()


def iter_headers(reader: RecordReader, indices: Iterable[int] | None = None) -> Iterator[dict]:
    for i in (range(len(reader)) if indices is None else indices):
        yield reader.header(i)
