"""Grain input pipeline: record shards -> official samples -> packed, statically shaped batches.

    pipe = DataPipeline(PipelineConfig(datasets=(DatasetSpec("data/surreal", 1.0), ...), tokenizer=ckpt_dir,
                                       budget=PackBudget(...), expected_num_tokens=10240), model_cfg,
                        process_index=jax.process_index(), process_count=jax.process_count())
    it = pipe.iterator()              # or pipe.iterator(state=saved_state)
    batch, stats = next(it)           # PackedBatch stacked over packs_per_step, stats dict
    saved_state = it.get_state()      # JSON-serialisable; resumes exactly

Stages
------
1. Elements (a Grain `MapDataset`, random access, deterministic): per dataset, its shards
   (`records.ShardSource`) -> global shuffle (seeded, reshuffled every epoch) -> this process's slice
   `[process_index::process_count]` -> repeat (`num_epochs`, None = forever); the datasets are mixed by
   weight (`MapDataset.mix`: a deterministic interleave in the given proportions); element k is then
   prepared by `_Prepare`: record decode, text alternative choice (seeded by (seed, k)), tokenisation
   (`tokenizers`, no special tokens added), image decode (official `pil_img2rgb`) and the official resize
   rule (`ImageTransform`: VAE stride 16, ViT stride 14, max pixels, bicubic) into an official sample
   (`sequence_plan`, `text_ids_list`, images as [H, W, C] arrays) plus its exact no-dropout sizes
   (from the record header and the resize rule, before decoding, so over-long samples are never
   decoded; checked against `packing.sample_sizes` after). A record that fails to decode or prepare is an
   error element (counted, skipped; named by its id, its shard file and its index there); one that cannot
   be read from its shard (a corrupt chunk) is fatal: a RecordError naming the dataset, the shard file and
   the record's index in it.
   This stage runs in `worker_count` processes (`mp_prefetch`; element order does not depend on the
   worker count). Workers are started by spawning: a calling script needs an
   `if __name__ == "__main__":` guard.
2. Packing (main process): the official `PackedDataset.__iter__` policy around `packing.pack_samples`:
   a sample whose no-dropout length exceeds `max_num_tokens_per_sample`, or that cannot fit an empty pack
   (any segment of the static budget, the VAE image slots or padded size), is skipped and counted
   (`stats["skipped_too_long"]`; by task and `skip_reason` in `stats["skipped_by"]`); a
   sample is added when the pack's *actual* (post-dropout) usage plus the sample's no-dropout need fits
   every segment and `max_num_tokens`; else it goes to the overflow buffer (up to `max_buffer_size`, not
   when it came from the buffer) or the pack is emitted; the pack is emitted once it holds
   `expected_num_tokens`; while the pack holds fewer than `prefer_buffer_before` tokens, buffered samples
   are taken first. Condition dropout (text / ViT / clean VAE, per item with `enable_cfg`) is drawn by
   `pack_samples` from a per-pack rng seeded by (seed, process_index, pack number), raw timesteps from a
   second one; the packer replays the same dropout draws to know each pack's actual usage.
   Deviations from the official loop: a sample that does not fit and cannot be buffered starts the next
   pack (the official drops it: `drop_unfit=True` does too, counted in `stats["dropped_unfit"]`);
   `is_mandatory` groups are not implemented; groups are interleaved by
   weight deterministically (the official draws a group at random per sample).
3. Steps: `packs_per_step` packs (built in `pack_threads` threads) written straight into one stacked
   batch (`packing.allocate_packs` + `pack_samples(out=...)`: the arrays of `packing.stack_batches`, with
   no per-pack arrays and no padding written). Images stay uint8 pixels end to end unless
   `image_dtype="float32"` (then normalised in the packer); the train step normalises uint8 batches on
   device (`packing.normalize_images`, bit-identical). With finite `num_epochs` the last step is
   padded with empty packs (`num_samples == 0`) and `stats["end_of_data"]` is True; with several
   datasets the finite mixture ends when the first dataset runs out (Grain's `mix`).

Precomputed VAE latents (`PipelineConfig.vae_latents`, a folder written by `python -m
echo4o_jax.data.latents`): VAE images are then neither decoded nor resized; stage 1 loads each VAE image's
stored posterior moments [h, w, 2z] (after checking the folder's manifest against this pipeline's
transforms, the model's z_channels and `vae_fingerprint`) and the batches carry `vae_moments` canvases
instead of `vae_images` (`packing`'s module docstring); sizes, packing and dropout are unchanged. A
missing latent is an error, never a skipped sample nor an in-step encoding.

Incomplete datasets: a dataset whose manifest says it is incomplete (an import or synthesis run that failed
or was interrupted: `"complete": false`, its `"error"`) is refused when the pipeline is built (RecordError
naming the manifest and the error, `check_complete`) unless `allow_incomplete` (then a warning line on stderr).

Exact resume: the iterator state is (next element index, element indices in the overflow buffer and the
carried-over sample, pack / step counters, skip counters, records read per dataset, each dataset's start);
on restore buffered elements are recomputed by random access and the element stream restarts at the saved
index, so a resumed run yields exactly the batches of an uninterrupted one, with any worker count.

Resume on another process count or `packs_per_step` (`DataPipeline.resharded_state`, the trainer's
`train.data_resume="reshard"`): per dataset, each process starts at its first record past those all old
processes had read together, in the same shuffled order of the same epoch; the mixed stream restarts
from there; the samples the old processes held in their overflow buffers are handed over. Exact but for
the old processes' uneven reads (counted: read twice / not read); the method's docstring.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from echo4o_jax.config import BagelConfig
from echo4o_jax.image_transform import ImageTransform, pil_img2rgb, resize_shape, unsupported_mode
from echo4o_jax.data.latents import LatentStore, LatentStoreError
from echo4o_jax.data.records import RecordError
from echo4o_jax.packing import (IMAGE_DTYPES, PackBudget, PackedBatch, allocate_packs, pack_samples, sample_sizes,
                                vae_pixel_size)

__all__ = [
    "DatasetSpec",
    "PipelineConfig",
    "DataPipeline",
    "PackIterator",
    "check_complete",
    "check_transforms",
    "dataset_transforms",
    "decode_image",
    "load_tokenizer",
    "pil_img2rgb",
    "DataContentsError",
    "record_img_num",
    "resized_hw",
    "skip_reason",
    "stack_packs",
    "transform_pixels",
]

_STATE_VERSION = 1
_SPECIAL_TOKEN_NAMES = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}
# Qwen2's pre-tokenizer split pattern (HF `Qwen2TokenizerFast`), for folders without tokenizer.json.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def _own_arrays(x):
    """`x` with each array a worker process sent through shared memory (grain's `SharedMemoryArray`) copied
    into an ordinary one, so that the shared block is freed now rather than when the sample leaves the pack
    buffers: blocks still held at exit are what Python's resource tracker reports as leaked."""
    if isinstance(x, dict):
        return {k: _own_arrays(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_own_arrays(v) for v in x)
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        return np.array(x)
    return x


def _worker_ignores_ctrl_c(worker_index: int, worker_count: int) -> None:
    """grain worker start-up: ignore SIGINT. A terminal's Ctrl-C reaches the whole process group: the workers
    died with tracebacks, and the trainer, which finishes its step and saves on a Ctrl-C, then failed on its
    next batch ("Worker process was terminated unexpectedly"), losing the steps since its last checkpoint. The
    trainer stops them (SIGTERM, which they keep, is how multiprocessing ends daemon processes at exit).
    And end when the process that started them is gone: a trainer killed outright (SIGKILL, the out-of-memory
    killer) cannot stop them, and they kept running (~200 MB each) for good. A thread watches the parent process
    id (not PR_SET_PDEATHSIG, which fires when the starting *thread* ends)."""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # (reparented: the parent died without stopping this worker)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _mark_absl_flags_parsed() -> None:
    # Grain worker processes read absl flags; unparsed flags crash them (grain issue 1355).
    try:
        import absl.flags

        if not absl.flags.FLAGS.is_parsed():
            absl.flags.FLAGS.mark_as_parsed()
    except Exception:  # pragma: no cover - absl missing or odd state: grain will complain itself
        pass


_mark_absl_flags_parsed()


# ---------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One record dataset (folder, shard file, glob or list of them) and its mixing weight."""

    path: str | tuple[str, ...]
    weight: float = 1.0
    name: str | None = None
    vae_transform: ImageTransform | None = None  # overrides PipelineConfig.vae_transform
    vit_transform: ImageTransform | None = None  # overrides PipelineConfig.vit_transform

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        p = self.path if isinstance(self.path, str) else self.path[0]
        return os.path.basename(os.path.normpath(p))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    datasets: tuple[DatasetSpec, ...]
    tokenizer: str  # tokenizer.json, or a checkpoint folder holding it (or vocab.json + merges.txt)
    budget: PackBudget
    expected_num_tokens: int
    max_num_tokens: int | None = None  # hard cap of real tokens per pack; None = budget.total_tokens
    max_num_tokens_per_sample: int | None = None  # longer samples are skipped; None = max_num_tokens
    prefer_buffer_before: int = 16384  # official default
    max_buffer_size: int = 50
    # a sample that does not fit the pack and cannot be buffered (it came from the buffer, or the buffer is full):
    # True drops it, as the official loop does (it yields the pack and reads on); False starts the next pack with
    # it. The official drop discards a sizeable share of large samples (long multi-reference samples more often
    # than short ones), so it changes the data mix the run trains on: True reproduces the official mix.
    drop_unfit: bool = False
    packs_per_step: int = 1  # packs per process per step (the leading batch axis)
    pack_threads: int = 4  # threads building the packs of a step (numpy copies release the GIL)
    vae_transform: ImageTransform = ImageTransform(1024, 512, 16)
    vit_transform: ImageTransform = ImageTransform(980, 224, 14)
    text_dropout: float = 0.1
    vit_dropout: float = 0.3
    vae_dropout: float = 0.3
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    worker_count: int = 0  # 0: prepare samples in the main process (threads only)
    worker_buffer_size: int = 4  # prepared samples buffered per worker
    read_threads: int = 2  # threads per worker (decode / resize release the GIL)
    read_buffer_size: int = 4
    max_consecutive_errors: int = 100
    # dtype of the batches' `vae_images` / `vit_patches`: "uint8" (decoded pixels; the train step
    # normalises them on device with `packing.normalize_images`, bit-identical to "float32") or
    # "float32" ([-1, 1], normalised here). Not part of the resume fingerprint (same data either way).
    image_dtype: str = "uint8"
    # folder of precomputed VAE posterior moments (`echo4o_jax.data.latents`); "" = VAE images are decoded
    # and encoded in the train step. `vae_fingerprint` (`latents.vae_fingerprint` of the VAE the trainer
    # uses) must match the folder's. Neither is part of the resume fingerprint (same samples either way).
    vae_latents: str = ""
    vae_fingerprint: str = ""
    # read a dataset whose manifest says it is incomplete (a failed / interrupted import or synthesis run;
    # `check_complete`): False refuses it (RecordError naming the manifest), True warns (stderr). Not part of the
    # resume fingerprint (the record files are).
    allow_incomplete: bool = False

    def __post_init__(self):
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"image_dtype={self.image_dtype!r}: expected one of {IMAGE_DTYPES}")
        if isinstance(self.datasets, DatasetSpec):
            object.__setattr__(self, "datasets", (self.datasets,))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if not self.datasets:
            raise ValueError("PipelineConfig.datasets is empty")
        for d in self.datasets:
            if not (d.weight > 0 and math.isfinite(d.weight)):
                raise ValueError(f"dataset {d.label}: weight={d.weight} must be a finite number > 0")
        for name in ("text_dropout", "vit_dropout", "vae_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1]")
        if self.packs_per_step < 1 or self.expected_num_tokens < 1:
            raise ValueError("packs_per_step and expected_num_tokens must be >= 1")
        if self.max_buffer_size < 0 or self.worker_count < 0:
            raise ValueError("max_buffer_size and worker_count must be >= 0")

    @property
    def max_tokens(self) -> int:
        return self.budget.total_tokens if self.max_num_tokens is None else int(self.max_num_tokens)

    @property
    def max_tokens_per_sample(self) -> int:
        return self.max_tokens if self.max_num_tokens_per_sample is None else int(self.max_num_tokens_per_sample)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from tokenizer.json (file or folder), or from a folder's Qwen2
    vocab.json + merges.txt (+ added tokens of tokenizer_config.json)."""
    from tokenizers import Tokenizer

    p = os.fspath(path)
    if os.path.isfile(p):
        return Tokenizer.from_file(p)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"tokenizer: {p} is neither tokenizer.json nor a folder")
    tj = os.path.join(p, "tokenizer.json")
    if os.path.exists(tj):
        return Tokenizer.from_file(tj)
    vocab, merges = os.path.join(p, "vocab.json"), os.path.join(p, "merges.txt")
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise FileNotFoundError(f"tokenizer: {p} has no tokenizer.json nor vocab.json + merges.txt")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    cfg_path = os.path.join(p, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            added = json.load(f).get("added_tokens_decoder", {})
        specials = []
        for tid, d in sorted(added.items(), key=lambda kv: int(kv[0])):
            specials.append((int(tid), AddedToken(d["content"], special=bool(d.get("special", True)),
                                                  normalized=False)))
        n0 = tok.get_vocab_size(with_added_tokens=False)
        for tid, at in specials:
            if tid < n0:
                continue
            tok.add_special_tokens([at])
            got = tok.token_to_id(at.content)
            if got != tid:
                raise ValueError(f"tokenizer: added token {at.content!r} got id {got}, expected {tid}")
    return tok


# ---------------------------------------------------------------------------------------------- elements


def dataset_transforms(cfg: PipelineConfig) -> list[tuple[ImageTransform, ImageTransform]]:
    """(VAE transform, ViT transform) of every dataset: its own, else the config's."""
    return [(d.vae_transform or cfg.vae_transform, d.vit_transform or cfg.vit_transform) for d in cfg.datasets]


def record_img_num(rec) -> int:
    """The image count the resize rule divides `max_pixels` by (official: all images of an understanding
    sample, 1 otherwise)."""
    return len(rec.images) if rec.task == "understanding" else 1


def resized_hw(info, tr: ImageTransform, img_num: int) -> tuple[int, int]:
    """(H, W) of a record image (`ImageInfo`) after the resize rule, from its header size alone."""
    w, h = resize_shape(info.width, info.height, tr.max_size, tr.min_size, tr.stride, tr.max_pixels, img_num)
    return h, w


def decode_image(blob: bytes):
    """Encoded image bytes -> RGB PIL image (official `pil_img2rgb`)."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        bad = unsupported_mode(im)  # (records written before imports refused such images)
        if bad:
            raise ValueError(bad)
        im.load()
        return pil_img2rgb(im)


def transform_pixels(image, tr: ImageTransform, img_num: int) -> np.ndarray:
    """The official resize of a decoded image: [H, W, 3] uint8 pixels, C-contiguous (ToTensor + Normalize is
    applied exactly, later: by the packer for float32 batches, on device for uint8 ones)."""
    return np.ascontiguousarray(np.asarray(tr.resize(image, img_num=img_num), np.uint8))


class _TagDataset:
    """(record index in its dataset, raw record bytes) -> (dataset index, record index, bytes): applied before
    the shuffle, so that a record that does not decode (no id) can still be told by its shard and index."""

    def __init__(self, index: int, size: int):
        self.index, self.size = index, size

    def __call__(self, record: int, raw):  # (Grain's index runs on past the size in later epochs)
        return self.index, int(record) % self.size, raw


class _Prepare:
    """(k, (dataset index, record bytes)) -> prepared element (official sample + sizes) or error element."""

    def __init__(self, cfg: PipelineConfig, model_cfg: BagelConfig, latents: LatentStore | None = None):
        self.config = cfg
        self.tokenizer_path = cfg.tokenizer
        self.seed = cfg.seed
        self.transforms = dataset_transforms(cfg)
        self.labels = [d.label for d in cfg.datasets]
        self.model_cfg = model_cfg
        self.latents = latents  # precomputed VAE moments, or None (decode the VAE images)
        self.vae_moments = None if latents is None else latents.dtype
        self._tok = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tok"] = None
        return d

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def __call__(self, k: int, tagged) -> dict:
        ds, record, raw = tagged
        el: dict[str, Any] = {"k": int(k), "dataset": int(ds), "record": record, "id": None, "task": None,
                              "error": None}
        try:
            self._prepare(el, raw)
        except LatentStoreError:  # a missing / wrong precomputed latent is fatal, never a skipped sample
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one record is counted, not fatal
            el["error"] = f"{type(e).__name__}: {e}"
            for key in ("sequence_plan", "text_ids_list", "images_hwc", "sizes"):
                el.pop(key, None)
        return el

    def _prepare(self, el: dict, raw: bytes) -> None:
        from echo4o_jax.data.records import decode_record

        rec = decode_record(raw)
        el["id"], el["task"] = rec.id, rec.task
        rec.validate()
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, el["k"], 7])
        texts = []
        for t in rec.texts:
            if not isinstance(t, str):
                t = t[int(rng.integers(len(t)))]
            texts.append(list(self.tokenizer.encode(t, add_special_tokens=False).ids))
        vae_t, vit_t = self.transforms[el["dataset"]]
        img_num = record_img_num(rec)
        # exact sizes from the header (the resize rule only needs the source size): over-long samples
        # are not decoded at all
        el["sizes"] = predicted = self._predict_sizes(rec, texts, vae_t, vit_t, img_num)
        if skip_reason(predicted, self.config) is not None:
            return
        pil: dict[int, Any] = {}
        tensors: dict[tuple[int, str], np.ndarray] = {}
        image_list = []
        for item in rec.plan:
            if item["type"] == "text":
                continue
            idx = item["image"]
            kind = "vit" if item["type"] == "vit_image" else "vae"
            key = (idx, kind)
            if key in tensors:
                pass
            elif kind == "vae" and self.latents is not None:
                # the stored posterior moments [h, w, 2z] of this image (no decode, no resize)
                h, w = resized_hw(rec.image_info[idx], vae_t, img_num)
                f = self.model_cfg.vae.downsample
                tensors[key] = self.latents.moments(self.labels[el["dataset"]], rec.id, idx, (h // f, w // f))
            else:
                if idx not in pil:
                    pil[idx] = decode_image(rec.images[idx])
                tensors[key] = transform_pixels(pil[idx], vit_t if kind == "vit" else vae_t, img_num)
            image_list.append(tensors[key])
        sample = {"sequence_plan": rec.official_plan(), "text_ids_list": texts, "images_hwc": image_list}
        s = sample_sizes(_official_sample(sample), self.model_cfg, vae_moments=self.vae_moments)
        sizes = (s.text_tokens, s.vit_tokens, s.vae_tokens, s.vae_images, *s.vae_image_size)
        if sizes != predicted:
            raise ValueError(f"decoded image sizes differ from the record header (sizes {sizes} != {predicted})")
        el.update(sample)

    def _predict_sizes(self, rec, texts, vae_t: ImageTransform, vit_t: ImageTransform, img_num: int) -> tuple:
        text = sum(len(t) + 2 for t in texts)
        vit = vae = n_vae = hmax = wmax = 0
        for item in rec.plan:
            if item["type"] == "text":
                continue
            tr = vit_t if item["type"] == "vit_image" else vae_t
            h, w = resized_hw(rec.image_info[item["image"]], tr, img_num)
            text += 2
            n = (w // tr.stride) * (h // tr.stride)
            if item["type"] == "vit_image":
                vit += n
            else:
                vae += n
                n_vae += 1
                hmax, wmax = max(hmax, h), max(wmax, w)
        return (text, vit, vae, n_vae, hmax, wmax)


def _official_sample(el: dict) -> dict:
    """The official sample of an element. Images travel as [H, W, C] arrays and are handed to the packer
    as [C, H, W] views, so that its CHW -> HWC copy is a plain contiguous copy."""
    return {"sequence_plan": el["sequence_plan"], "text_ids_list": el["text_ids_list"],
            "image_tensor_list": [a.transpose(2, 0, 1) for a in el["images_hwc"]], "id": el.get("id")}


def skip_reason(sizes, c: PipelineConfig) -> str | None:
    """Why a sample (its no-dropout `sizes`) is skipped, or None: "max_tokens_per_sample" (the official rule)
    or "max_tokens", or the budget segment it cannot fit even in an empty pack ("text_tokens", "vit_tokens",
    "vae_tokens", "vae_images", "vae_image_size": a budget too small for the data)."""
    b = c.budget
    text, vit, vae, n_vae, h, w = sizes
    total = text + vit + vae
    for reason, over in (("max_tokens_per_sample", total > c.max_tokens_per_sample),
                         ("max_tokens", total > c.max_tokens), ("text_tokens", text > b.text_tokens),
                         ("vit_tokens", vit > b.vit_tokens), ("vae_tokens", vae > b.vae_tokens),
                         ("vae_images", n_vae > b.vae_images),
                         ("vae_image_size", h > b.vae_image_size[0] or w > b.vae_image_size[1])):
        if over:
            return reason
    return None


def check_transforms(c: PipelineConfig, m: BagelConfig) -> None:
    """ValueError naming the dataset when its image transforms do not suit the model `m` (strides, sizes past
    the model's position tables)."""
    for spec, (vae_t, vit_t) in zip(c.datasets, dataset_transforms(c)):
        if vae_t.stride != m.latent_downsample:
            raise ValueError(f"dataset {spec.label}: VAE transform stride {vae_t.stride} != model "
                             f"latent downsample {m.latent_downsample}")
        if vit_t.stride != m.vit.patch_size:
            raise ValueError(f"dataset {spec.label}: ViT transform stride {vit_t.stride} != patch size "
                             f"{m.vit.patch_size}")
        if -(-vae_t.max_size // vae_t.stride) > m.max_latent_size:
            raise ValueError(f"dataset {spec.label}: VAE max_size {vae_t.max_size} exceeds the model's "
                             f"{m.max_latent_size} latent positions per side")
        if -(-vit_t.max_size // vit_t.stride) > m.vit_max_num_patch_per_side:
            raise ValueError(f"dataset {spec.label}: ViT max_size {vit_t.max_size} exceeds the model's "
                             f"{m.vit_max_num_patch_per_side} patches per side")


_warned_incomplete: set[str] = set()  # the warnings `check_complete` printed (once per process each)


def check_complete(c: PipelineConfig) -> None:
    """A dataset whose manifest says it is incomplete (`records.incomplete_reason`: an import or synthesis run
    that failed or was interrupted) is a RecordError naming the manifest and saying how to go on, unless
    `c.allow_incomplete`: then a warning line on stderr (once per process: pack_stats builds two pipelines)."""
    from echo4o_jax.data.records import RecordError, dataset_manifests, incomplete_reason

    for spec in c.datasets:
        for folder, m in dataset_manifests(spec.path, of_shards=True).items():
            why = incomplete_reason(folder, m)
            if why is None:
                continue
            if not c.allow_incomplete:
                raise RecordError(f"dataset {spec.label}: {why}: run the command that wrote it again to complete it "
                                  "(an import with --overwrite; a synthesis run as it was: it goes on where it "
                                  "stopped), or set data.records.allow_incomplete=True "
                                  "(PipelineConfig.allow_incomplete) to use the records it holds")
            warning = f"warning: dataset {spec.label}: {why}; using these records (allow_incomplete)"
            if warning not in _warned_incomplete:
                _warned_incomplete.add(warning)
                print(warning, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- stacking

_STACK_FIELDS = tuple(f.name for f in dataclasses.fields(PackedBatch) if f.name not in ("num_tokens", "num_samples"))


def stack_packs(batches: Sequence[PackedBatch]) -> PackedBatch:
    """`packing.stack_batches` without copying padding: one pack becomes views with a leading axis; for
    several, the padded VAE canvas (`vae_images`, or `vae_moments`) is allocated zeroed (lazily, by the OS)
    and only the real pixels / moments are copied. Same arrays as `stack_batches`."""
    if not batches:
        raise ValueError("stack_packs needs at least one PackedBatch")
    canvas = "vae_images" if batches[0].vae_images is not None else "vae_moments"
    present = [k for k in _STACK_FIELDS if getattr(batches[0], k) is not None]
    if len(batches) == 1:
        b = batches[0]
        fields = {k: getattr(b, k)[None] for k in present}
    else:
        fields = {k: np.stack([getattr(b, k) for b in batches]) for k in present if k != canvas}
        shapes = {getattr(getattr(b, canvas), "shape", None) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"stack_packs: {canvas} shapes differ {sorted(map(str, shapes))} (different budgets?)")
        first = getattr(batches[0], canvas)
        vi = np.zeros((len(batches), *first.shape), first.dtype)
        for i, b in enumerate(batches):
            for j, (h, w) in enumerate(b.vae_image_hw):
                if h and w:
                    vi[i, j, :h, :w] = getattr(b, canvas)[j, :h, :w]
        fields[canvas] = vi
    fields["num_tokens"] = np.asarray([b.num_tokens for b in batches], np.int32)
    fields["num_samples"] = np.asarray([b.num_samples for b in batches], np.int32)
    return PackedBatch(**fields)


# ---------------------------------------------------------------------------------------------- pipeline


def _seed32(*parts) -> int:
    h = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(h[:4], "little")


class DataPipeline:
    """Builds the element dataset of one process; `iterator()` gives the packed-batch iterator."""

    def __init__(self, config: PipelineConfig, model_cfg: BagelConfig, *, process_index: int = 0,
                 process_count: int = 1):
        from echo4o_jax.data.records import ShardSource, resolve_shards

        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.config = config
        self.model_cfg = model_cfg
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        check_transforms(config, model_cfg)
        check_complete(config)
        self._check_tokenizer()
        b = config.budget
        if b.vae_image_size[0] % model_cfg.latent_downsample or b.vae_image_size[1] % model_cfg.latent_downsample:
            raise ValueError(f"budget.vae_image_size={b.vae_image_size} must be multiples of "
                             f"{model_cfg.latent_downsample}")
        self.latents = self._open_latents()
        self.vae_moments = None if self.latents is None else self.latents.dtype  # canvases' dtype name

        self.shards: list[list[str]] = []
        self.dataset_sizes: list[int] = []  # records per dataset
        self._sources = []
        for i, spec in enumerate(config.datasets):
            files = resolve_shards(spec.path)
            self.shards.append(files)
            # every shard opened once, here, for its record count (a truncated / corrupt shard: RecordError naming
            # it; grain's is bare); the source is given the counts and opens shards only to read them (a record it
            # cannot read: RecordError naming the shard, the record's index in it and the dataset)
            src = ShardSource(files, name=spec.label)
            n = len(src)
            if n < process_count:
                raise ValueError(f"dataset {spec.label} has {n} records, fewer than {process_count} processes")
            self._sources.append(src)
            self.dataset_sizes.append(n)
        self.contents = [_records_digest(files, n) for files, n in zip(self.shards, self.dataset_sizes)]
        self._prepare = _Prepare(config, model_cfg, self.latents)
        self._streams: dict[tuple, Any] = {}
        self._parts = self._process_parts(self.process_index, self.process_count)
        self.elements = self.elements_from(None)
        self.fingerprint = self._fingerprint()
        self.stream_fingerprint = self._fingerprint(stream_only=True)
        # states saved before the fingerprint left the shard paths out (their records were told by the paths,
        # or by "contents" as well) resume where those paths are the same
        self.accepted_fingerprints = (self.fingerprint, self._fingerprint(paths=True))
        self.accepted_stream_fingerprints = (self.stream_fingerprint, self._fingerprint(stream_only=True, paths=True))

    # -------------------------------------------------------------------------------------- checks
    def _open_latents(self) -> LatentStore | None:
        """The precomputed-latent folder, checked against this pipeline (config.vae_latents set)."""
        c = self.config
        if not c.vae_latents:
            return None
        if not c.vae_fingerprint:
            raise ValueError("PipelineConfig.vae_latents is set but vae_fingerprint is empty: pass the fingerprint "
                             "of the VAE the train step uses (echo4o_jax.data.latents.vae_fingerprint)")
        store = LatentStore(c.vae_latents)
        store.check(fingerprint=c.vae_fingerprint, z_channels=self.model_cfg.vae.z_channels,
                    downsample=self.model_cfg.vae.downsample,
                    transforms={spec.label: vae_t for spec, (vae_t, _) in zip(c.datasets, dataset_transforms(c))},
                    records={spec.label: spec.path for spec in c.datasets})
        return store

    def _check_tokenizer(self) -> None:
        try:
            tok = load_tokenizer(self.config.tokenizer)
        except Exception as e:  # noqa: BLE001 - a missing file; tokenizers raises plain Exceptions for a bad one
            raise ValueError(f"cannot load the tokenizer {self.config.tokenizer} ({type(e).__name__}: {e})") from None
        st = self.model_cfg.special_tokens
        for field, name in _SPECIAL_TOKEN_NAMES.items():
            got = tok.token_to_id(name)
            want = getattr(st, field)
            if got is not None and got != want:
                raise ValueError(f"tokenizer {self.config.tokenizer}: {name} has id {got}, the model config "
                                 f"says {field}={want}")
        n = tok.get_vocab_size(with_added_tokens=True)
        if n > self.model_cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {n} tokens, more than the model vocab_size "
                             f"{self.model_cfg.llm.vocab_size}")
        # what the token ids depend on (not where the file is): another tokenizer gives other samples' lengths,
        # so other packs, from a resumed position (check_contents)
        self.tokenizer_digest = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def _fingerprint(self, *, stream_only: bool = False, paths: bool = False) -> str:
        """Of everything a resumed iterator state depends on; `stream_only`: without this process's place
        (process index / count) and `packs_per_step`, the settings `resharded_state` may change. The records
        are not told by where they are (the state's "contents": their shard files' sha256 and record counts,
        `check_contents`), so a dataset copied or moved elsewhere resumes; `paths`: the older form, with
        every shard's absolute path instead of the shard count."""
        c = self.config
        d = {
            "datasets": [[[os.path.abspath(f) for f in files] if paths else len(files), spec.weight]
                         for spec, files in zip(c.datasets, self.shards)],
            "transforms": [[repr(vae_t), repr(vit_t)] for vae_t, vit_t in dataset_transforms(c)],
            "budget": repr(c.budget),
            "knobs": [c.expected_num_tokens, c.max_tokens, c.max_tokens_per_sample, c.prefer_buffer_before,
                      c.max_buffer_size, *([] if stream_only else [c.packs_per_step]), c.text_dropout,
                      c.vit_dropout, c.vae_dropout, c.seed, c.shuffle, c.num_epochs,
                      *(["drop_unfit"] if c.drop_unfit else [])],  # (absent when False: older states resume)
        }
        if not stream_only:
            d["process"] = [self.process_index, self.process_count]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def check_contents(self, state: dict) -> None:
        """A DataContentsError naming the datasets whose records differ from those an iterator `state` was saved
        with (shard files' sha256 as their manifests list them, record counts): the same paths and settings
        with other records (a dataset rewritten, or completed in place) give another shuffled order, so its
        position would resume at another place of another stream. A state saved before it recorded its records
        ("contents" absent) is taken as of these records when its fingerprint holds these shards' paths (the older
        form); any other state without them is refused."""
        tok = state.get("tokenizer")  # (absent: saved before it was recorded)
        if tok is not None and tok != self.tokenizer_digest:
            raise DataContentsError(f"the tokenizer {self.config.tokenizer} is not the one the iterator state was "
                                    f"saved with ({self.tokenizer_digest} != {tok}): other token ids, other packs",
                                    inputs="tokenizer")
        then = state.get("contents")
        if then is None:
            if (state.get("fingerprint") in self.accepted_fingerprints[1:]
                    or state.get("stream_fingerprint") in self.accepted_stream_fingerprints[1:]):
                return  # an older state: its fingerprint holds its shards' paths, which tell its records
            raise DataContentsError("the iterator state does not record its records (\"contents\"): it cannot be "
                                    "told to be of these datasets")
        changed = [spec.label for spec, a, b in zip(self.config.datasets, then, self.contents) if a != b]
        if changed or len(then) != len(self.contents):
            raise DataContentsError(
                f"the records of dataset(s) {', '.join(changed) or '(another dataset list)'} differ from those the "
                "iterator state was saved with (shard files' sha256 or record counts): its position is a place in "
                "another data stream")

    # -------------------------------------------------------------------------------------- iterators
    def _process_parts(self, index: int, count: int) -> list:
        """Per dataset: the tagged records of process `index` of `count` (shuffled, its slice, repeated)."""
        import grain

        c = self.config
        parts = []
        for i, src in enumerate(self._sources):
            ds = grain.MapDataset.source(src).map_with_index(_TagDataset(i, len(src)))
            if c.shuffle:
                ds = ds.shuffle(seed=_seed32(c.seed, i, "shuffle"))
            ds = ds.slice(slice(index, None, count)).repeat(c.num_epochs)
            parts.append(ds)
        return parts

    def elements_from(self, offsets: Sequence[int] | None, place: tuple[int, int] | None = None):
        """The prepared elements (random access, index k): each dataset's records from its element `offsets[d]`
        of this process on (where a resharded run starts, `resharded_state`; None: from the start), mixed by
        weight. `place` (index, count): another process's stream (an old run's, for its buffered samples)."""
        import grain

        place = (self.process_index, self.process_count) if place is None else tuple(int(x) for x in place)
        key = (place, tuple(int(o) for o in offsets) if offsets else (0,) * len(self._parts))
        if key not in self._streams:
            own = place == (self.process_index, self.process_count)
            base = self._parts if own else self._process_parts(*place)
            parts = [ds.slice(slice(o, None)) if o else ds for ds, o in zip(base, key[1])]
            weights = [d.weight for d in self.config.datasets]
            mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
            self._streams[key] = mixed.map_with_index(self._prepare)
        return self._streams[key]

    def record_where(self, el: dict) -> str:
        """Where element `el`'s record is: `"<shard file>: record <index in the shard> (dataset <label>)"`."""
        d = el["dataset"]
        return f"{self._sources[d].where(el['record'])} (dataset {self.config.datasets[d].label})"

    def held_element(self, entry, offsets: Sequence[int] | None) -> dict:
        """A buffered / carried sample of an iterator state: its index k in this process's stream (from
        `offsets`), or [process index, process count, offsets, k]: one an old run's process held
        (`resharded_state` hands them over), recomputed from that process's stream."""
        if isinstance(entry, list):
            index, count, offs, k = entry
            el = self.elements_from(offs, place=(index, count))[int(k)]
            el["held_from"] = entry
            return el
        return self.elements_from(offsets)[int(entry)]

    def element_iterator(self, start: int = 0, offsets: Sequence[int] | None = None):
        """Prepared elements from index `start` on (worker processes if configured) of `elements_from(offsets)`."""
        import grain

        c = self.config
        ds = self.elements_from(offsets)
        if start:
            ds = ds.slice(slice(start, None))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads,
                                                     prefetch_buffer_size=c.read_buffer_size))
        if c.worker_count > 0:
            _mark_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count,
                                                                   per_worker_buffer_size=c.worker_buffer_size),
                                      worker_init_fn=_worker_ignores_ctrl_c)
        return iter(it_ds)

    def iterator(self, state: dict | None = None) -> "PackIterator":
        return PackIterator(self, state)

    def resharded_state(self, states: Sequence[dict]) -> tuple[dict, dict]:
        """(iterator state, info): where this process starts so as to go on with what `states` (every process's
        `PackIterator.get_state()` of a run on another process count or `packs_per_step`, with the same data
        settings otherwise) had read. Per dataset of n records, process p of P reads the positions p, p + P,
        ... of each epoch's shuffled order (epoch-major: global position g is epoch g // n, place g % n). The
        old processes had read T records of the dataset together; process p of this run starts at its first
        record at a global position >= T (`offsets`, per dataset) and the mixed stream restarts there. Exact
        when the old processes' reads end at one global position; otherwise the records an old process had
        read past T are read again and as many below T not at all (`read_twice`, the same count), this epoch.
        The samples the old processes held in their overflow buffers / carried over (read, not yet trained)
        are handed over: process p takes every P-th of them into its buffer (`handed_over`, their number). A
        ValueError when the states cannot be resharded (another data configuration, an older version)."""
        D = len(self._parts)
        for i, st in enumerate(states):
            if st.get("version") != _STATE_VERSION:
                raise ValueError(f"process {i}'s iterator state version {st.get('version')} != {_STATE_VERSION}")
            if "stream_fingerprint" not in st or st.get("read_by_dataset") is None:
                raise ValueError("the iterator states were saved by an older version, which cannot be resumed on "
                                 "another process count or packs_per_step")
            if st["stream_fingerprint"] not in self.accepted_stream_fingerprints:
                raise ValueError("iterator state was saved by a pipeline with another configuration "
                                 f"({st['stream_fingerprint']} != {self.stream_fingerprint}, not counting the "
                                 "process count and packs_per_step)")
            self.check_contents(st)
        P_old, P, p = len(states), self.process_count, self.process_index
        offsets, read_twice = [], 0
        for d, n in enumerate(self.dataset_sizes):
            # records of dataset d each old process had read (its stream's start + what it read since)
            used = [int((st.get("offsets") or [0] * D)[d]) + int(st["read_by_dataset"][d]) for st in states]
            T = sum(used)
            offsets.append(_positions_below(T, n, p, P))
            read_twice += sum(max(0, u - _positions_below(T, n, i, P_old)) for i, u in enumerate(used))

        def share(n: int) -> int:  # this process's part of a count summed over the old processes
            return n // P + (p < n % P)

        counters = {k: share(sum(int(st["counters"].get(k, 0)) for st in states)) for k in PackIterator._COUNTERS}
        # steps: the same on every process; pack numbers seed the packs' dropout (with the process index):
        # from the largest old one on, no (process, pack) seed of the old run is drawn again
        for k in ("steps_emitted", "packs_emitted"):
            counters[k] = max(int(st["counters"][k]) for st in states)
        held = [x if isinstance(x, list) else [i, P_old, st.get("offsets"), int(x)]  # (`held_element`)
                for i, st in enumerate(states) for x in list(st["buffer"]) + list(st["carry"])]
        state = {"version": _STATE_VERSION, "fingerprint": self.fingerprint, "contents": self.contents,
                 "stream_fingerprint": self.stream_fingerprint, "offsets": offsets, "next_element": 0,
                 "read_by_dataset": [0] * D, "exhausted": False, "buffer": held[p::P], "carry": [],
                 "counters": counters}
        info = {"elements_read": sum(int(st["next_element"]) for st in states), "offsets": offsets,
                "read_twice": read_twice, "handed_over": len(held)}
        return state, info


class PackBudgetError(RecordError):
    """No sample of the data fits the pack budget (`PackIterator._nothing_fits`)."""


class DataContentsError(ValueError):
    """An iterator state saved with other records in its datasets, or another tokenizer
    (`DataPipeline.check_contents`); `inputs`: which ("records" / "tokenizer")."""

    def __init__(self, msg: str, inputs: str = "records"):
        super().__init__(msg)
        self.inputs = inputs


def _records_digest(files: Sequence[str], records: int) -> str:
    """What a dataset's data stream depends on besides paths and settings: its record count and each shard
    file's sha256 as its manifest lists it (a shard without a manifest entry: its size; nothing is hashed)."""
    from echo4o_jax.data.records import listed_sha256

    shas = listed_sha256(files)
    parts = [sha or f"size {os.path.getsize(f)}" for f, sha in zip(files, shas)]
    return hashlib.sha256(json.dumps([records, parts]).encode()).hexdigest()[:16]


def _positions_below(g: int, n: int, p: int, P: int) -> int:
    """How many of process p's (of P) records of a dataset of n records lie at global positions < g (epoch-major;
    the process reads places p, p + P, ... of every epoch)."""
    epochs, place = divmod(g, n)
    return epochs * len(range(p, n, P)) + len(range(p, place, P))


class _Pack:
    """A pack under construction: its samples and actual (post-dropout) usage, replaying the dropout
    draws `pack_samples` will make with the same rng."""

    def __init__(self, pipe: DataPipeline, pack_no: int):
        c = pipe.config
        self.seed = [_seed32(c.seed, "pack"), pipe.process_index, pack_no]
        self.rng = np.random.default_rng(self.seed + [0])
        self.p = (c.text_dropout, c.vit_dropout, c.vae_dropout)
        self.moments = pipe.vae_moments is not None  # VAE items are [h, w, 2z] posterior moments
        self.elements: list[dict] = []
        self.text = self.vit = self.vae = self.n_vae = 0
        # the largest usage + no-dropout need each segment was checked against when a sample was added:
        # the capacities that would have let this pack take exactly these samples
        self.peak = [0, 0, 0, 0]

    @property
    def total(self) -> int:
        return self.text + self.vit + self.vae

    def fits(self, s, budget: PackBudget, max_tokens: int) -> bool:
        text, vit, vae, n_vae, _, _ = s
        return (self.text + text <= budget.text_tokens and self.vit + vit <= budget.vit_tokens
                and self.vae + vae <= budget.vae_tokens and self.n_vae + n_vae <= budget.vae_images
                and self.total + text + vit + vae <= max_tokens)

    def add(self, el: dict, cfg: BagelConfig) -> None:
        text, vit, vae, n_vae, _, _ = el["sizes"]
        self.peak = [max(a, b) for a, b in zip(self.peak, (self.text + text, self.vit + vit, self.vae + vae,
                                                           self.n_vae + n_vae))]
        p_text, p_vit, p_vae = self.p
        ti = ii = 0
        for item in el["sequence_plan"]:
            drop_cfg = item.get("enable_cfg", 0) == 1
            if item["type"] == "text":
                n = len(el["text_ids_list"][ti]) + 2
                ti += 1
                if drop_cfg and self.rng.random() < p_text:
                    continue
                self.text += n
                continue
            H, W, _ = el["images_hwc"][ii].shape
            ii += 1
            if item["type"] == "vit_image":
                if drop_cfg and self.rng.random() < p_vit:
                    continue
                ps = cfg.vit.patch_size
                self.vit += (H // ps) * (W // ps)
            else:
                if drop_cfg and self.rng.random() < p_vae:
                    continue
                H, W = vae_pixel_size(H, W, cfg, self.moments)
                d = cfg.latent_downsample
                self.vae += (H // d) * (W // d)
                self.n_vae += 1
            self.text += 2
        self.elements.append(el)

    def build(self, pipe: DataPipeline, out: PackedBatch | None = None, index: int = 0) -> PackedBatch:
        """The pack; with `out` (from `allocate_packs`) written into its row `index`."""
        c = pipe.config
        samples = [_official_sample(e) for e in self.elements]
        ts_rng = np.random.default_rng(self.seed + [1])
        batch = pack_samples(samples, pipe.model_cfg, c.budget, rng=np.random.default_rng(self.seed + [0]),
                             text_dropout=c.text_dropout, vit_dropout=c.vit_dropout, vae_dropout=c.vae_dropout,
                             timestep_fn=ts_rng.standard_normal, image_dtype=c.image_dtype, out=out,
                             out_index=index, vae_moments=pipe.vae_moments)
        if batch.num_tokens != self.total:  # the replayed dropout must match pack_samples' draws
            raise AssertionError(f"packer bookkeeping: {self.total} tokens expected, pack has {batch.num_tokens}")
        return batch


class PackIterator:
    """Yields `(PackedBatch stacked over packs_per_step, stats)`; `get_state()` / `DataPipeline.iterator(state)`
    resume exactly."""

    _COUNTERS = ("elements_read", "samples_packed", "tokens_packed", "skipped_too_long", "skipped_errors",
                 "packs_emitted", "steps_emitted", "dropped_unfit")

    def __init__(self, pipe: DataPipeline, state: dict | None = None):
        self.pipe = pipe
        self.cfg = pipe.config
        self._upstream = None
        self._pool = None
        self._exhausted = False
        self._buffer: list[dict] = []
        self._carry: list[dict] = []
        self._next_k = 0
        self._offsets: list[int] | None = None  # each dataset's start (`DataPipeline.elements_from`)
        self._read_by_dataset: list[int] | None = [0] * len(pipe.dataset_sizes)  # None: unknown (older state)
        self._consecutive_errors = 0
        self._skipped_in_a_row = 0  # samples skipped as too long since one was packed (`_fill_pack`)
        self._state_at_failure: dict | None = None  # `__next__` failed: the state before that step
        # that many in a row: none fits (twice this process's share of the records; at most 10,000 reads, so that
        # a budget too small for real data is reported in minutes, not after hours of reading)
        self._nothing_fits_after = min(2 * -(-sum(pipe.dataset_sizes) // pipe.process_count) + 100, 10_000)
        self.counters = {k: 0 for k in self._COUNTERS}
        self.recent_errors: collections.deque = collections.deque(maxlen=20)
        # skipped samples by (task, `skip_reason`) since this iterator was made (not part of the state)
        self.skipped_by: collections.Counter = collections.Counter()
        # main-process seconds (cumulative, not part of the state): waiting for prepared samples /
        # allocating the step's batch + pack_samples into it
        self.timing = {"wait_s": 0.0, "pack_s": 0.0}
        if state is not None:
            self._restore(state)

    # -------------------------------------------------------------------------------------- state
    def get_state(self) -> dict:
        if self._state_at_failure is not None:
            return self._state_at_failure
        return {
            "version": _STATE_VERSION,
            "fingerprint": self.pipe.fingerprint,
            "contents": list(self.pipe.contents),
            "tokenizer": self.pipe.tokenizer_digest,
            "stream_fingerprint": self.pipe.stream_fingerprint,
            "offsets": None if self._offsets is None else list(self._offsets),  # (copies: a snapshot stays put)
            "next_element": self._next_k,
            "read_by_dataset": None if self._read_by_dataset is None else list(self._read_by_dataset),
            "exhausted": self._exhausted,
            "buffer": [e.get("held_from", e["k"]) for e in self._buffer],
            "carry": [e.get("held_from", e["k"]) for e in self._carry],
            "counters": dict(self.counters),
        }

    def _restore(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')} != {_STATE_VERSION}")
        if state.get("fingerprint") not in self.pipe.accepted_fingerprints:
            raise ValueError("iterator state was saved by a pipeline with another configuration "
                             f"({state.get('fingerprint')} != {self.pipe.fingerprint})")
        self.pipe.check_contents(state)
        self._next_k = int(state["next_element"])
        self._offsets = state.get("offsets")
        rbd = state.get("read_by_dataset")
        self._read_by_dataset = None if rbd is None else [int(x) for x in rbd]
        self._exhausted = bool(state["exhausted"])
        self._buffer = [self.pipe.held_element(x, self._offsets) for x in state["buffer"]]
        self._carry = [self.pipe.held_element(x, self._offsets) for x in state["carry"]]
        self.counters.update({k: int(v) for k, v in state["counters"].items()})

    # -------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> "PackIterator":
        return self

    def close(self) -> None:
        up, self._upstream = self._upstream, None
        if up is not None and hasattr(up, "close"):
            up.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def __enter__(self) -> "PackIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _next_element(self) -> dict | None:
        if self._exhausted:
            return None
        if self._upstream is None:
            self._upstream = self.pipe.element_iterator(self._next_k, self._offsets)
        t0 = time.perf_counter()
        try:
            el = next(self._upstream)
        except StopIteration:
            self.timing["wait_s"] += time.perf_counter() - t0
            self._exhausted = True
            self.close()
            return None
        self.timing["wait_s"] += time.perf_counter() - t0
        if self.pipe.config.worker_count > 0:
            el = _own_arrays(el)
        if el["k"] != self._next_k:
            raise AssertionError(f"element stream out of order: got {el['k']}, expected {self._next_k}")
        self._next_k += 1
        self.counters["elements_read"] += 1
        if self._read_by_dataset is not None:
            self._read_by_dataset[el["dataset"]] += 1
        return el

    def _fill_pack(self) -> _Pack | None:
        c = self.cfg
        m = self.pipe.model_cfg
        pack = _Pack(self.pipe, self.counters["packs_emitted"])
        for el in self._carry:
            pack.add(el, m)
        self._carry = []
        while pack.total < c.expected_num_tokens:
            if pack.total < c.prefer_buffer_before and self._buffer:
                el, from_buffer = self._buffer.pop(0), True
            else:
                el, from_buffer = self._next_element(), False
                if el is None:
                    if not self._buffer:
                        break
                    el, from_buffer = self._buffer.pop(0), True
            if el["error"] is not None:
                self.counters["skipped_errors"] += 1
                self.recent_errors.append({"k": el["k"], "id": el["id"], "error": el["error"],
                                           "where": self.pipe.record_where(el)})
                self._consecutive_errors += 1
                if self._consecutive_errors >= c.max_consecutive_errors:
                    raise RecordError(f"{self._consecutive_errors} consecutive samples failed to load; last: "
                                      f"{list(self.recent_errors)[-3:]}")
                continue
            self._consecutive_errors = 0
            s = el["sizes"]
            reason = skip_reason(s, c)
            if reason is not None:
                self.counters["skipped_too_long"] += 1
                self.skipped_by[(el["task"], reason)] += 1
                self._skipped_in_a_row += 1
                if self._skipped_in_a_row > self._nothing_fits_after:
                    self._nothing_fits()
                continue
            self._skipped_in_a_row = 0
            if not pack.fits(s, c.budget, c.max_tokens):
                if not from_buffer and len(self._buffer) < c.max_buffer_size:
                    self._buffer.append(el)
                    continue
                if c.drop_unfit:  # the official loop: the pack is emitted and this sample is not trained on
                    self.counters["dropped_unfit"] += 1
                else:
                    self._carry = [el]
                break
            pack.add(el, m)
        if not pack.elements:
            return None
        self.counters["packs_emitted"] += 1
        return pack

    def _nothing_fits(self) -> None:
        """A PackBudgetError: more samples in a row than `_nothing_fits_after` were skipped as too long, so (all
        but certainly) none fits the budget; with data that repeats, the iterator would otherwise read forever
        without emitting a pack (a training run hung silently at its first step)."""
        c = self.cfg
        why = ", ".join(f"{n} x {task}/{reason}" for (task, reason), n in self.skipped_by.most_common(6))
        raise PackBudgetError(
            f"{self._skipped_in_a_row} samples in a row were skipped as too long ({why}): no sample of the data "
            f"fits the pack budget (text_tokens={c.budget.text_tokens}, vit_tokens={c.budget.vit_tokens}, "
            f"vae_tokens={c.budget.vae_tokens}, vae_images={c.budget.vae_images}, vae_image_size="
            f"{tuple(c.budget.vae_image_size)}; max_tokens={c.max_tokens}, max_tokens_per_sample="
            f"{c.max_tokens_per_sample}): raise data.budget.* (python -m echo4o_jax.data.pack_stats prints the "
            "smallest budget that takes every sample)")

    def __next__(self) -> tuple[PackedBatch, dict]:
        """The next step's packs and stats. When it fails (a record that cannot be read ...), `get_state` keeps
        returning the state from before it: the samples it had taken from the stream and the buffer are in no
        pack, buffer or carry, so a checkpoint of the later state would skip them (`Trainer` saves one)."""
        if self._state_at_failure is not None:
            raise RuntimeError("this iterator failed in an earlier step; resume a new one from get_state()")
        before = self.get_state()
        try:
            return self._next_step()
        except StopIteration:
            raise
        except BaseException:
            self._state_at_failure = before
            raise

    def _next_step(self) -> tuple[PackedBatch, dict]:
        c = self.cfg
        packs: list[_Pack] = []
        while len(packs) < c.packs_per_step:
            p = self._fill_pack()
            if p is None:
                break
            packs.append(p)
        if not packs:
            raise StopIteration
        t0 = time.perf_counter()
        # packs are written straight into the stacked arrays (no per-pack arrays, no stacking copy); rows
        # without a pack stay empty packs (num_samples == 0)
        stacked = allocate_packs(c.budget, self.pipe.model_cfg, c.packs_per_step, image_dtype=c.image_dtype,
                                 vae_moments=self.pipe.vae_moments)
        if len(packs) > 1 and c.pack_threads > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=c.pack_threads, thread_name_prefix="echo4o-pack")
            list(self._pool.map(lambda ip: ip[1].build(self.pipe, stacked, ip[0]), enumerate(packs)))
        else:
            for i, p in enumerate(packs):
                p.build(self.pipe, stacked, i)
        end = len(packs) < c.packs_per_step
        self.timing["pack_s"] += time.perf_counter() - t0
        labels = [d.label for d in c.datasets]
        by_ds = collections.Counter(labels[e["dataset"]] for p in packs for e in p.elements)
        by_task = collections.Counter(e["task"] for p in packs for e in p.elements)
        tokens = sum(p.total for p in packs)
        self.counters["samples_packed"] += sum(len(p.elements) for p in packs)
        self.counters["tokens_packed"] += tokens
        self.counters["steps_emitted"] += 1
        stats = {
            "step": self.counters["steps_emitted"] - 1,
            "packs": len(packs),
            "samples": sum(len(p.elements) for p in packs),
            "tokens": tokens,
            "tokens_text": sum(p.text for p in packs),
            "tokens_vit": sum(p.vit for p in packs),
            "tokens_vae": sum(p.vae for p in packs),
            "pack_peaks": [p.peak for p in packs],  # per pack: text / vit / vae tokens, VAE images (_Pack.peak)
            "capacity_tokens": c.packs_per_step * c.budget.total_tokens,
            "fill": tokens / (c.packs_per_step * c.budget.total_tokens),
            "samples_by_dataset": dict(by_ds),
            "samples_by_task": dict(by_task),
            "sample_ids": [[e["id"] for e in p.elements] for p in packs],
            "buffer": len(self._buffer),
            "skipped_by": {f"{t}/{r}": n for (t, r), n in sorted(self.skipped_by.items())},
            "end_of_data": end or (self._exhausted and not self._buffer and not self._carry),
            **self.counters,
            **{f"time_{k}": v for k, v in self.timing.items()},
        }
        return stacked, stats
