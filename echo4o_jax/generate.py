"""Generation from the command line: text-to-image, multi-reference / editing, understanding, batch.

    python -m echo4o_jax.generate --ckpt DIR --prompt "a red cube left of a blue ball" --out outputs/gen
    python -m echo4o_jax.generate --ckpt DIR --image a.png --image b.png --prompt "put them together"
    python -m echo4o_jax.generate --ckpt DIR --image a.png --prompt "What is shown?" --understand
    python -m echo4o_jax.generate --ckpt DIR --prompts requests.jsonl --out outputs/batch

DIR is an official PyTorch BAGEL / Echo-4o folder, a converted Orbax checkpoint or a training workdir
(EMA weights of its latest checkpoint, or of `--step N`; --step is refused for other folders). With no
--ckpt the offline demo runs: the bundled tiny random checkpoint (tests/golden/bagel_tiny_a),
text-to-image, one PNG.

Per-task defaults are the official ones: text-to-image text scale 4.0, image scale 1.5,
cfg_interval [0.4, 1.0], renorm `global`; with reference images (multi-reference / editing) text
scale 4.0, image scale 2.0, cfg_interval [0.0, 1.0], renorm `text_channel`; shift 3.0, 50 steps.
Every one is overridable (checked: steps at least 2, scales >= 0, 0 <= cfg_interval low <= high <= 1,
0 <= renorm min <= 1, shift > 0). `--think` adds the official "think" system prompt and generates the
reasoning text (at most --max-new-tokens, default 1000 as the official interleave_inference) before the
image (or the answer). A prompt
(text or ids, not both) must not be empty; flags a mode would ignore are refused (e.g. --size, --seed,
--steps or --cfg-* with --understand; --max-new-tokens without --think or --understand).

Single mode writes `image_seed<seed>_<k>.png` and `generation.json` (or `answer.json` with --understand; each
records what made it as batch mode's metadata.jsonl does: the checkpoint's identity, dtype, input resizes,
prompt, reference images with the sha256 of their content, settings) into --out (checked before the model
loads: a folder or a path to create; without --out, a new folder
`outputs/generate/<date-time>` per run). An --out that holds an earlier
single-mode generation (generation.json, answer.json, image_seed*_*.png) is refused unless `--overwrite`,
which removes that generation's files once the new one is written (other files stay); an --out holding a
batch run (metadata.jsonl) is refused.

Batch mode (`--prompts FILE.jsonl`), one request per line:
    {"id": "cat", "prompt": "...", "images": ["ref.png"], "size": [1024, 1024], "seed": 0, "num_images": 4}
(`id` defaults to the line number, `prompt_ids` may replace `prompt`; seeds in [0, 2**32), since
jax.random.key keeps a seed's low 32 bits; optional `think`: true,
`max_new_tokens` (think requests: the think text's limit, default --max-new-tokens) and `sampler`:
{setting: value}; any other key is refused). Ids must be unique in the file (they name the outputs, at most
200 bytes). Relative image paths are read from the JSONL file's folder, not the current directory. Every
request is checked (JSON, keys, ids, sizes, sampler values, image files, prompt length) before the model
weights load and before `--out` is created; an error names `FILE:LINE (id=...)`. The per-request flags
(--prompt, --image, --size, --seed, --num-images, --think, --understand) are refused with --prompts. It
writes `<id>_<k>.png`, `metadata.jsonl` (one line per finished request, the last one of an id when it was
regenerated; `outputs` are file names in --out, `outputs_sha256` their content) and `contact_sheet.png` (the
first 256 outputs; made again when a run generated something); re-running (from any directory) skips finished
requests (a PNG cut short by a kill does not count: PNGs are written to a temporary file and renamed, and one
that does not decode, or is not the image its record names, is generated again). A finished request recorded
with other settings is refused, naming each field that differs with
both values: the checkpoint (folder, workdir step, size and mtime of its weight files), --dtype, the
--vae-transform / --vit-transform resizes, prompt, reference images (path and sha256 of the content),
seed, number of images, size, think and its max_new_tokens, sampler settings. Use another --out, or
`--regenerate` to generate those requests again (requests finished with this run's settings are kept: an
interrupted --regenerate run resumes). Ctrl-C, or an output that cannot be written (a full disk: one
`error:` line naming it), stops the batch with one line saying how many requests are finished (kept:
rerun the same command to resume); a rerun removes the temporary files (.<id>_<k>.png.<pid>.tmp) of a
killed run. The sampler is compiled once per (resolution, number of references, which CFG terms apply:
not per scale value) and reused; the CFG branches and the `num_images` images of a request run batched in
one forward pass.

Without --size, text-to-image makes 1024x1024 and editing the last input image's VAE-resized size;
either must fit the model's latent position table (an error names the largest size it allows).

Single mode writes its images and record all at once (temporary files, then renamed): an output that cannot
be written (a full disk) is one `error:` line naming it, and --out is left as it was.

Exit status: 0 done; 2 bad input (one `error:` line, nothing generated; also argparse's usage errors), or an
output that cannot be written (finished batch requests are kept); 130 interrupted (Ctrl-C; finished batch
requests are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
import pathlib
import re
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from .interrupts import exit_process, keep_ctrl_c
from .jsonl import jsonl_lines, valid_unicode
from .paths import file_sha256, pid_running
from .sampling_defaults import (DEFAULT_SIZE, SETTING_FLAGS, VAE_POSTERIORS, TaskDefaults, default_dtype,
                                task_defaults)

DEMO_CKPT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "bagel_tiny_a"
DEMO_PROMPT_IDS = [13, 60, 2, 38, 77, 23, 87, 59, 101]

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here")
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here")


SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(TaskDefaults))
SAMPLER_FLAGS = {k: "--steps" if k == "num_timesteps" else "--" + k.replace("_", "-") for k in SAMPLER_KEYS}
# the keys of a batch request (a --prompts line, or a generate_batch request); any other is refused
REQUEST_KEYS = ("id", "prompt", "prompt_ids", "images", "size", "seed", "num_images", "think", "max_new_tokens",
                "sampler")
DEFAULT_MAX_NEW_TOKENS = 1000  # --max-new-tokens (understanding answer, think text): the official interleave_inference's
DTYPES = ("float32", "bfloat16")  # --dtype, generate_batch's `dtype`
MAX_ID_BYTES = 200  # a request id names files (<id>_<k>.png and its temporary .<id>_<k>.png.<pid>.tmp)


DEFAULT_OUT = pathlib.Path("outputs/generate")  # single mode without --out: a new <date-time> folder under it
TEXT_BUCKET = 32  # text prefills are padded to a multiple of this (inference.TEXT_BUCKET; not imported from
#                   there: this module loads JAX only when a model is)


class GenerateError(ValueError):
    """Bad generation input (missing file, bad size, incomplete checkpoint, prompt too long ...)."""


@contextlib.contextmanager
def _checkpoint_errors(ckpt: pathlib.Path):
    """Loader errors -> one GenerateError naming the checkpoint."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .model.keymap import CheckpointMismatchError
    from .safetensors_io import SafetensorsError

    try:
        yield
    except (ConfigError, SafetensorsError, CheckpointError, CheckpointMismatchError, FileNotFoundError) as e:
        raise GenerateError(f"checkpoint {ckpt} is incomplete or unreadable: {e}") from None


def _check_sampler(settings) -> dict[str, Any]:
    """Sampler settings checked by name and value (types, ranges, choices; None = not given, passes): a
    GenerateError names the setting, its flag and the value. Returns them with cfg_interval a tuple."""
    from .inference import CFG_RENORM_TYPES

    unknown = [k for k in settings if k not in SAMPLER_KEYS]
    if unknown:
        raise GenerateError(f"unknown sampler setting {', '.join(map(repr, unknown))}; known: {', '.join(SAMPLER_KEYS)}")
    out = {}
    for k, v in settings.items():
        what = f"{k} ({SAMPLER_FLAGS[k]})"
        if v is None:
            pass
        elif k == "num_timesteps":  # the sampler makes num_timesteps - 1 denoising steps
            v = _as_int(v, what, minimum=2)
        elif k == "cfg_renorm_type":
            if v not in CFG_RENORM_TYPES:
                raise GenerateError(f"{what} {v!r}: expected one of {', '.join(CFG_RENORM_TYPES)}")
        elif k == "vae_posterior":
            if v not in VAE_POSTERIORS:
                raise GenerateError(f"{what} {v!r}: expected one of {', '.join(VAE_POSTERIORS)}")
        elif k == "cfg_interval":
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
                raise GenerateError(f"{what} {v!r}: expected [low, high]")
            lo, hi = (_as_number(x, what) for x in v)
            if not 0 <= lo <= hi <= 1:
                raise GenerateError(f"{what} {list(v)!r}: expected 0 <= low <= high <= 1")
            v = tuple(v)
        else:
            lo, hi = {"cfg_renorm_min": (0, 1), "timestep_shift": (0, math.inf)}.get(k, (0, math.inf))
            n = _as_number(v, what)
            if not lo <= n <= hi or (k == "timestep_shift" and n == 0):
                raise GenerateError(f"{what} {v!r}: must be " + {"cfg_renorm_min": "between 0 and 1",
                                                                 "timestep_shift": "positive"}.get(k, "at least 0"))
        out[k] = v
    return out


def _as_number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GenerateError(f"{what} {v!r}: expected a finite number")
    return v


SEED_LIMIT = 2**32  # jax.random.key(seed) keeps the low 32 bits: seeds 3 and 2**32 + 3 are one key


def _as_int(v, what: str, minimum: int | None = None, limit: int | None = None) -> int:
    try:
        if isinstance(v, bool):
            raise TypeError
        n = operator.index(v)
    except TypeError:
        raise GenerateError(f"{what} {v!r}: expected an integer") from None
    if minimum is not None and n < minimum:
        raise GenerateError(f"{what} {n}: must be at least {minimum}")
    if limit is not None and n >= limit:
        raise GenerateError(f"{what} {n}: must be below {limit}")
    return n


class _Prepared(NamedTuple):
    """A checked generation request: prompt ids, PIL images, sampler settings, output (H, W), ..."""
    ids: list[int]
    images: list
    sampler: dict[str, Any]
    shape: tuple[int, int]
    seed: int
    num_images: int
    sys_ids: list[int] | None  # the think system prompt (think mode), else None
    max_think_tokens: int
    image_sizes: tuple = ()  # (width, height) of each image as checked


def parse_size(s, stride: int) -> tuple[int, int]:
    if isinstance(s, str):
        try:
            s = tuple(int(x) for x in s.lower().split("x"))
        except ValueError:
            raise GenerateError(f"size {s!r}: expected HxW, e.g. 1024x1024") from None
    try:
        h, w = s
        h, w = (operator.index(x) for x in (h, w) if not isinstance(x, bool))
    except (TypeError, ValueError):
        raise GenerateError(f"size {s!r}: expected [height, width] (two integers)") from None
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise GenerateError(f"size {h}x{w}: height and width must be positive multiples of {stride}")
    return h, w


def _read_image(path):
    from PIL import Image, UnidentifiedImageError

    from .image_transform import pil_img2rgb, unsupported_mode

    p = pathlib.Path(path)
    if not p.exists():
        raise GenerateError(f"input image not found: {p}")
    try:
        with Image.open(p) as im:
            bad_mode = unsupported_mode(im)
            if bad_mode is None:
                return pil_img2rgb(im)  # as the official inferencer: transparent pixels on white
    except (UnidentifiedImageError, OSError) as e:
        raise GenerateError(f"cannot read image {p}: {e}") from None
    except Image.DecompressionBombError as e:  # more pixels than PIL allows (not an OSError); its limit stays
        raise GenerateError(f"cannot read image {p}: too many pixels for PIL ({e}; its limit is "
                            "PIL.Image.MAX_IMAGE_PIXELS): use a smaller image") from None
    raise GenerateError(f"cannot use image {p}: {bad_mode}")


def _resized_size(transform, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of `transform.resize` on an image of `size` (width, height), from the sizes alone: the
    checks need no resized pixels (the context building resizes each image, once)."""
    from .image_transform import resize_shape

    t = transform
    return resize_shape(*size, t.max_size, t.min_size, t.stride, t.max_pixels)


def _under_mesh(method):
    """Run a Generator method under its parameters' mesh (`jax.set_mesh`), as the trainer compiles: the
    model's traced functions then see the mesh, so Pallas attention runs per shard (heads over `tensor`)
    instead of on gathered inputs. Without --mesh: a plain call."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.mesh is None:
            return method(self, *args, **kwargs)
        with self._jax.set_mesh(self.mesh):
            return method(self, *args, **kwargs)

    return wrapped


class _TransformSlot:
    """A Generator's resize transform: its own until the Inferencer exists, then the Inferencer's (reads and
    writes go through), so that request checks and context building always use the same transform."""

    def __init__(self, name: str):
        self.name, self.own = name, "_" + name

    def __get__(self, gen, owner=None):
        if gen is None:
            return self
        return getattr(gen, self.own) if gen.inf is None else getattr(gen.inf, self.name)

    def __set__(self, gen, t):
        setattr(gen, self.own, t)
        if gen.inf is not None:
            setattr(gen.inf, self.name, t)


class Generator:
    """A checkpoint's config + tokenizer + Inferencer, reused across requests (compiled step functions
    are cached per shape). With `load_weights=False` the weights load at the first generation, so that
    requests are checked (`check`, `check_request`) against the model's limits before the slow part.
    `step`: a training workdir's checkpoint step (None: its latest, resolved now: a checkpoint the training
    saves meanwhile is not picked up); `identity` (checkpoint_identity) says which weights these are."""

    def __init__(self, ckpt: str | pathlib.Path, *, step: int | None = None, dtype: str | None = None,
                 max_context: int = 0, attention_impl: str | None = None,
                 demo: bool = False, vae_transform: tuple[int, int] | None = None,
                 vit_transform: tuple[int, int] | None = None, mesh: tuple[int, int, int] | None = None,
                 load_weights: bool = True):
        import jax

        from .checkpoint import load_config
        from .image_transform import ImageTransform, valid_sides

        self.ckpt = pathlib.Path(ckpt)
        self.dtype = dtype = dtype or default_dtype()
        self.mesh = None
        self.inf = None
        if not self.ckpt.exists():
            raise GenerateError(f"checkpoint folder not found: {self.ckpt}")
        if not self.ckpt.is_dir():
            raise GenerateError(f"checkpoint {self.ckpt} is a file: --ckpt takes a checkpoint folder (official, "
                                "converted or a training workdir)")
        for flag, t in (("--vae-transform", vae_transform), ("--vit-transform", vit_transform)):
            if t is not None and not valid_sides(t):
                raise GenerateError(f"{flag} {' '.join(map(str, t))}: expected MAX MIN with 0 < MIN <= MAX")
        with _checkpoint_errors(self.ckpt):
            self.cfg = load_config(self.ckpt, compute_dtype=dtype)
        self.identity = checkpoint_identity(self.ckpt, step)
        self.step = self.identity["ckpt_step"]
        if mesh is not None:  # params sharded by the logical-axis rules (14B in bf16 over several chips)
            from . import sharding as shd

            try:
                self.mesh = shd.make_mesh(*mesh)
            except ValueError as e:
                raise GenerateError(f"--mesh {','.join(map(str, mesh))}: {e}") from None
        if attention_impl:  # (else the config's default, xla_blockwise)
            self.cfg = self.cfg.replace(attention_impl=_attention_impl(attention_impl, self.mesh, self.cfg))
        self.tokenizer = _load_tokenizer(self.ckpt)
        self.max_context = max_context or (256 if demo else 8192)
        if demo:  # the tiny checkpoint's images are tiny: no upscaling to 512 px
            vae_transform, vit_transform = vae_transform or (1024, 16), vit_transform or (980, 14)
        self._vae_transform = (ImageTransform(*vae_transform, self.cfg.latent_downsample) if vae_transform
                               else ImageTransform.vae_default())
        self._vit_transform = (ImageTransform(*vit_transform, self.cfg.vit.patch_size) if vit_transform
                               else ImageTransform.vit_default())
        self._jax = jax
        if load_weights:
            self.load_weights()

    def load_weights(self) -> None:
        """Load the model and VAE weights and build the Inferencer (once; later calls do nothing)."""
        if self.inf is not None:
            return
        from .checkpoint import load_any_bagel, load_any_vae
        from .inference import Inferencer

        shardings = vae_shardings = None
        if self.mesh is not None:
            from flax import nnx

            from . import sharding as shd
            from .model.bagel import Bagel

            shardings = shd.state_shardings(nnx.state(nnx.eval_shape(lambda: Bagel(self.cfg, rngs=nnx.Rngs(0)))),
                                            self.mesh)
            vae_shardings = shd.replicated(self.mesh)
        with _checkpoint_errors(self.ckpt):
            self.model = load_any_bagel(self.ckpt, dtype=self.dtype, shardings=shardings, step=self.step,
                                        compute_dtype=self.dtype, attention_impl=self.cfg.attention_impl)
            self.vae = load_any_vae(self.ckpt, self.cfg, shardings=vae_shardings)
        self.inf = Inferencer(self.model, self.vae, max_context=self.max_context, vae_transform=self._vae_transform,
                              vit_transform=self._vit_transform, text_bucket=TEXT_BUCKET,
                              retokenize=None if self.tokenizer is None else self._retokenize)

    def _retokenize(self, ids: Sequence[int]) -> list[int]:
        """The think text's ids as the official feeds them back: its decoded string encoded again."""
        return self.tokenizer.encode(self.decode_text(ids), add_special_tokens=False).ids

    # the resize transforms are the Inferencer's once it exists (the checks and the context building use one pair)
    vae_transform = _TransformSlot("vae_transform")
    vit_transform = _TransformSlot("vit_transform")

    # ------------------------------------------------------------------ inputs
    def encode(self, prompt: str | None = None, prompt_ids: Sequence[int] | None = None) -> list[int]:
        if prompt is not None and prompt_ids is not None:
            raise GenerateError("both a prompt and prompt ids given (--prompt and --prompt-ids, or `prompt` and "
                                "`prompt_ids`): give one")
        if prompt_ids is not None:
            if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
                raise GenerateError(f"prompt_ids {prompt_ids!r}: expected a list of token ids")
            if not prompt_ids:
                raise GenerateError("prompt_ids is empty: give at least one token id")
            ids = [_as_int(i, "prompt_ids entry") for i in prompt_ids]
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise GenerateError(f"prompt {prompt!r}: expected a string")
            if not prompt.strip():
                raise GenerateError(f"prompt {prompt!r} is empty: give a prompt")
            if self.tokenizer is None:
                raise GenerateError(f"{self.ckpt} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
                                    "give token ids instead of text (--prompt-ids 1,2,3; `prompt_ids` in a "
                                    "--prompts request), or copy the release's tokenizer files into the folder")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            raise GenerateError("a request needs `prompt` (or `prompt_ids`)")
        bad = [i for i in ids if not 0 <= i < self.cfg.llm.vocab_size]
        if bad:
            raise GenerateError(f"prompt token ids outside the vocabulary (size {self.cfg.llm.vocab_size}): {bad[:10]}")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _think_prompt(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GenerateError("--think needs a checkpoint with tokenizer files")
        return self.encode(text)

    @staticmethod
    def _read_images(images) -> list:
        if isinstance(images, (str, bytes, pathlib.Path)) or not isinstance(images, Sequence):
            raise GenerateError(f"images {images!r}: expected a list of image paths")
        from PIL import Image

        from .image_transform import pil_img2rgb, unsupported_mode

        for i, im in enumerate(images):
            if isinstance(im, Image.Image) and (bad := unsupported_mode(im)):
                raise GenerateError(f"cannot use input image {i}: {bad}")
        return [_read_image(im) if isinstance(im, (str, pathlib.Path)) else
                pil_img2rgb(im) if isinstance(im, Image.Image) else im for im in images]

    @staticmethod
    def _grid_problem(problems: dict, h: int, w: int, limit: int, stride: int, what: str, fix: str,
                      note: str = "") -> None:
        """Adds to `problems` (once per `what`) when an h x w image is over the position table."""
        if (h // stride > limit or w // stride > limit) and what not in problems:
            problems[what] = (f"{what} {h}x{w}{note} exceeds the model's position table ({limit} x {stride} = "
                              f"{limit * stride} px per side); {fix}")

    def _check_context(self, ids, images, new_tokens: int, out_shape=None, *, understanding: bool = False,
                       default_size: bool = False, sys_ids=None):
        """What the context building will feed must fit the model: each input image resized as
        `Inferencer.build_contexts` does (VAE transform; the ViT sees the VAE-resized image; the VAE image
        itself only when generating), the output size (`default_size`: not given by the user), and the
        context tokens within max_context, counted as `build_contexts` adds them: the think system prompt
        (`sys_ids`), the images, the prompt (each text with its bos / eos, room for its bucket's padding),
        `new_tokens` generated ones, and (think before an image) those added back as a text. The think system
        prompt and the padding of the text added back were not counted: such a request passed this check and
        overflowed the context mid-batch. Every size over the model's tables is said in one error."""
        c = self.cfg
        kv = need = 0
        problems: dict[str, str] = {}

        def add(n: int, room: int | None = None):  # n tokens kept; `room`: what adding them checks for
            nonlocal kv, need
            need = max(need, kv + (n if room is None else room))
            kv += n

        def add_text(n_ids: int):
            add(n_ids + 2, -(-(n_ids + 2) // TEXT_BUCKET) * TEXT_BUCKET)

        if sys_ids is not None:
            add_text(len(sys_ids))
        for i, im in enumerate(images):
            w, h = _resized_size(self.vae_transform, im.size)
            src = f" (from {im.size[0]}x{im.size[1]})"  # (which of several inputs is at fault: its index and size)
            if not understanding:  # understanding feeds the ViT only (official vae=not understanding_output)
                self._grid_problem(problems, h, w, c.max_latent_size, c.latent_downsample,
                                   f"input image {i} VAE-resized",
                                   f"lower the VAE resize ({SETTING_FLAGS['vae_transform']})", src)
                add((h // c.latent_downsample) * (w // c.latent_downsample) + 2)
            vw, vh = _resized_size(self.vit_transform, (w, h))
            self._grid_problem(problems, vh, vw, c.vit_max_num_patch_per_side, c.vit.patch_size,
                               f"input image {i} ViT-resized",
                               f"lower the ViT resize ({SETTING_FLAGS['vit_transform']})", src)
            add((vh // c.vit.patch_size) * (vw // c.vit.patch_size) + 2)
        add_text(len(ids))
        if new_tokens:
            need = max(need, kv + new_tokens)  # (generated one by one after the context)
            if not understanding:  # think: the text generated (at most new_tokens - 1 after its start token)
                add_text(new_tokens - 1)  # is added back to the context before the image
        if out_shape is not None:
            m = c.max_latent_size * c.latent_downsample
            self._grid_problem(problems, *out_shape, c.max_latent_size, c.latent_downsample, "output size",
                               f"give a size of at most {m}x{m} ({SETTING_FLAGS['size']})",
                               " (the default; no size given)" if default_size else "")
        if problems:
            raise GenerateError("; ".join(problems.values()))
        if need > self.max_context:
            raise GenerateError(f"the prompt and images need about {need} context tokens, more than "
                                f"{SETTING_FLAGS['max_context']}={self.max_context}; raise it or shorten the prompt")

    def sampler_settings(self, has_images: bool, overrides: dict[str, Any]) -> dict[str, Any]:
        """The task's defaults under the checked `overrides`; a setting the task does not have (vae_posterior
        without reference images: nothing is VAE-encoded) is left out, also when given (eval.run's --gen-arg
        covers text-to-image and editing benchmarks alike)."""
        d = task_defaults(has_images).settings()
        d.update({k: v for k, v in _check_sampler(overrides).items() if v is not None and (k in d or has_images)})
        return d

    def _prepare(self, prompt=None, *, prompt_ids=None, images: Sequence = (), size=None, seed: int = 0,
                 num_images: int = 1, think: bool = False, max_think_tokens: int = 1000,
                 **sampler) -> _Prepared:
        """Every check of a generation request (no weights needed): prompt, images, sampler settings,
        size (default 1024x1024 without reference images, else the last one's VAE-resized size), context."""
        ids = self.encode(prompt, prompt_ids)
        images = self._read_images(images)
        kw = self.sampler_settings(bool(images), sampler)
        seed = _as_int(seed, "seed", minimum=0, limit=SEED_LIMIT)
        num_images = _as_int(num_images, "num_images", minimum=1)
        max_think_tokens = _as_int(max_think_tokens, "max_new_tokens (think)", minimum=1)
        sys_ids = self._think_prompt(GEN_THINK_SYSTEM_PROMPT) if think else None
        if size is not None:
            shape = parse_size(size, self.cfg.latent_downsample)
        elif images:  # official: the last input image's VAE-resized shape
            w, h = _resized_size(self.vae_transform, images[-1].size)
            shape = (h, w)
        else:
            shape = DEFAULT_SIZE
        self._check_context(ids, images, max_think_tokens if think else 0, shape,
                            default_size=size is None and not images, sys_ids=sys_ids)
        return _Prepared(ids, images, kw, shape, seed, num_images, sys_ids, max_think_tokens,
                         tuple(im.size for im in images))

    def check(self, prompt=None, **kw) -> None:
        """Raise GenerateError when `generate(prompt, **kw)` would reject its input (no weights needed)."""
        self._prepare(prompt, **kw)

    def check_request(self, req: dict, overrides: dict | None = None, max_new_tokens: int | None = None) -> _Prepared:
        """`check` for a batch request (its fields and `sampler` settings over `overrides`, its `max_new_tokens`
        over `max_new_tokens`); returns the checked request, which `generate_prepared` / `generate_many` take as
        it is. Its images stay as given (paths are decoded for the check, then dropped: a long batch holds no
        pixels between its check and its turn)."""
        kw = _request_kwargs(req, overrides or {}, max_new_tokens)
        return self._prepare(**kw)._replace(images=list(kw["images"]))

    # ------------------------------------------------------------------ tasks
    def generate(self, prompt=None, *, prompt_ids=None, images: Sequence = (), size=None, seed: int = 0,
                 num_images: int = 1, think: bool = False, max_think_tokens: int = 1000,
                 **sampler) -> dict[str, Any]:
        """Images (uint8 [H, W, 3] each) for one request; `num_images` share the context and run batched.
        The request is checked before the weights load (when not loaded yet) and before any compute."""
        return self.generate_prepared(self._prepare(prompt, prompt_ids=prompt_ids, images=images, size=size,
                                                    seed=seed, num_images=num_images, think=think,
                                                    max_think_tokens=max_think_tokens, **sampler))

    def generate_prepared(self, r: _Prepared) -> dict[str, Any]:
        """`generate` for a request already checked (`check_request`): only its image files are read again."""
        self.load_weights()
        return self._generate(self._with_pixels(r))

    def _with_pixels(self, r: _Prepared) -> _Prepared:
        images = self._read_images(r.images)
        for spec, im, size in zip(r.images, images, r.image_sizes):
            if im.size != size:  # the file changed since its check: the checks no longer hold
                raise GenerateError(f"input image {spec}: {im.size[0]}x{im.size[1]} now, {size[0]}x{size[1]} when "
                                    "the request was checked (the file changed during the run)")
        return r._replace(images=images)

    @_under_mesh
    def _generate(self, r: _Prepared) -> dict[str, Any]:
        jax = self._jax
        ds = self.cfg.latent_downsample
        n_tok = (r.shape[0] // ds) * (r.shape[1] // ds)
        noise = jax.random.normal(jax.random.key(r.seed), (r.num_images, n_tok, self.cfg.patch_latent_dim))
        from .inference import ContextOverflow

        try:
            res = self.inf.interleave_inference([*r.images, r.ids], think=r.sys_ids is not None,
                                                system_prompt_ids=r.sys_ids, max_think_token_n=r.max_think_tokens,
                                                image_shapes=r.shape, output_shape=r.shape, init_noise=noise,
                                                rng=jax.random.key(r.seed), **r.sampler)
        except ContextOverflow as e:  # (checked before: only the think text, encoded again, can be longer)
            raise GenerateError(f"{e}: the think text, decoded and encoded again as the official feeds it back, "
                                f"came out longer than the room checked for it; raise the context capacity "
                                f"({SETTING_FLAGS['max_context']})") from None
        images_out = res["image"] if res["image"].ndim == 4 else res["image"][None]
        out = dict(images=list(images_out), settings=r.sampler, size=list(r.shape), prompt_ids=r.ids)
        if "text_ids" in res:
            from .inference import answer_ids

            out["think"] = self.decode_text(answer_ids(res["text_ids"], self.cfg.special_tokens.bos_token_id))
        return out

    @staticmethod
    def batch_key(r: _Prepared) -> tuple | None:
        """Checked requests with equal keys run together in one sampler pass (text-to-image of one shape and
        one sampler setting); None = run alone (reference images, think mode)."""
        if r.images or r.sys_ids is not None:
            return None
        return r.shape, r.num_images, tuple(sorted(r.sampler.items()))

    def generate_many(self, prepared: Sequence[_Prepared]) -> list[dict[str, Any]]:
        """Checked text-to-image requests (`check_request`) of one `batch_key`: contexts built per request,
        then one batched sampler pass (each request keeps its own seed's noise, so results equal one-by-one
        runs up to float rounding: a pixel may differ by one level with the batch's composition, so a resumed
        batch is not bit-identical to an uninterrupted one). Each group size compiles its own sampler pass."""
        self.load_weights()
        return self._generate_many([self._with_pixels(r) for r in prepared])

    @_under_mesh
    def _generate_many(self, prepared: Sequence[_Prepared]) -> list[dict[str, Any]]:
        jax = self._jax
        size, n, kw = prepared[0].shape, prepared[0].num_images, prepared[0].sampler
        ds = self.cfg.latent_downsample
        n_tok = (size[0] // ds) * (size[1] // ds)
        triples, noises = [], []
        for r in prepared:
            c = self.inf.build_contexts([r.ids], image_shapes=size)
            triples.append((c["gen"], c["cfg_text"], c["cfg_img"]))
            noises.append(jax.random.normal(jax.random.key(r.seed), (n, n_tok, self.cfg.patch_latent_dim)))
        lat = self.inf.generate_image_latents(triples, size, jax.numpy.stack(noises), **kw)
        out = []
        for i, r in enumerate(prepared):
            _, images = self.inf.decode_latent(lat[i], size)
            out.append(dict(images=list(images), settings=kw, size=list(size), prompt_ids=r.ids))
        return out

    def understand(self, prompt=None, *, prompt_ids=None, images: Sequence = (),
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, think: bool = False) -> dict[str, Any]:
        ids = self.encode(prompt, prompt_ids)
        images = self._read_images(images)
        if not images:
            raise GenerateError("understanding needs at least one image")
        max_new_tokens = _as_int(max_new_tokens, "max_new_tokens", minimum=1)
        sys_ids = self._think_prompt(VLM_THINK_SYSTEM_PROMPT) if think else None
        self._check_context(ids, images, max_new_tokens, understanding=True, sys_ids=sys_ids)
        self.load_weights()
        return self._understand(ids, images, max_new_tokens, sys_ids)

    @_under_mesh
    def _understand(self, ids, images, max_new_tokens, sys_ids) -> dict[str, Any]:
        res = self.inf.interleave_inference([*images, ids], understanding_output=True, think=sys_ids is not None,
                                            system_prompt_ids=sys_ids, max_think_token_n=max_new_tokens)
        from .inference import answer_ids

        answer = answer_ids(res["text_ids"], self.cfg.special_tokens.bos_token_id)
        return dict(answer=self.decode_text(answer), answer_ids=answer)


def _load_tokenizer(ckpt: pathlib.Path):
    from .checkpoint import config_dir

    d = config_dir(ckpt)
    if not ((d / "tokenizer.json").exists() or (d / "vocab.json").exists()):
        return None
    from .data.pipeline import load_tokenizer

    return load_tokenizer(d)


def checkpoint_identity(ckpt, step: int | None = None) -> dict[str, Any]:
    """Which weights a checkpoint folder gives, as the records keep it (metadata.jsonl, generation.json,
    eval.run's generation.json): `ckpt` (the folder, resolved), `ckpt_step` (a training workdir's checkpoint
    step: `step`, default its latest; None for other folders, where a `step` is an error) and `ckpt_weights`
    ({file: [size, mtime_ns]} of the files that hold or describe the weights: a workdir step's ema/_METADATA
    and the workdir's vae/_METADATA; a converted folder's manifest.json, params/_METADATA, vae/_METADATA; an
    official folder's *.safetensors and their index files), so that a folder trained on, converted again or
    replaced in place counts as other weights. A path that is not a folder gives its path alone (the loader
    refuses it)."""
    from .checkpoint import CheckpointError, EMA_ITEM, VAE_ITEM, is_train_workdir, train_step_dir

    p = pathlib.Path(os.path.abspath(ckpt))  # as the checkpoint module's paths (relative_to below)
    out = dict(ckpt=str(p.resolve()), ckpt_step=None, ckpt_weights=None)
    if is_train_workdir(p):
        try:
            out["ckpt_step"], step_dir = train_step_dir(p, step)
        except CheckpointError as e:
            raise GenerateError(f"--step: {e}" if step is not None else str(e)) from None
        files = [step_dir / EMA_ITEM / "_METADATA", p / VAE_ITEM / "_METADATA"]
    elif step is not None:
        raise GenerateError(f"--step {step}: {p} is not a training workdir (model_config/ + checkpoints/); --step "
                            "picks one of a workdir's checkpoints, a converted or official folder holds one")
    elif not p.is_dir():
        return out
    else:
        files = [p / "manifest.json", p / "params" / "_METADATA", p / VAE_ITEM / "_METADATA",
                 *sorted(p.glob("*.safetensors")), *sorted(p.glob("*.safetensors.index.json"))]
    stats = {str(f.relative_to(p)): f.stat() for f in files if f.is_file()}
    out["ckpt_weights"] = {k: [st.st_size, st.st_mtime_ns] for k, st in stats.items()}
    return out


# ---------------------------------------------------------------------------------------------- batch

def _attention_impl(impl, mesh, cfg) -> str:
    """`impl` checked for this backend and mesh (the model config's own checks), or a GenerateError naming the flag."""
    import jax

    from .model.attention import IMPLS, model_attention_problem

    flag = SETTING_FLAGS["attention_impl"]
    if impl not in IMPLS:
        raise GenerateError(f"attention_impl ({flag}) {impl!r}: expected one of {', '.join(IMPLS)}")
    tensor = mesh.shape["tensor"] if mesh is not None else 1
    problem = model_attention_problem(cfg.replace(attention_impl=impl), tensor, jax.default_backend())
    if problem:
        raise GenerateError(f"attention_impl ({flag}): {problem}")
    return impl


_GENERATORS: dict[tuple, Generator] = {}


def get_generator(ckpt, **kw) -> Generator:
    """A Generator per (checkpoint, settings incl. `step`), cached; config and tokenizer load now, the weights
    at its first generation (after the requests are checked). A training workdir's latest step is resolved
    per call: a checkpoint saved since gives another Generator."""
    ident = checkpoint_identity(ckpt, kw.pop("step", None))
    kw["step"] = ident["ckpt_step"]
    kw["dtype"] = kw.get("dtype") or default_dtype()  # (the default named or not: one Generator)
    key = (ident["ckpt"], json.dumps(ident["ckpt_weights"]), tuple(sorted(kw.items())))
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator(ckpt, load_weights=False, **kw)
    return _GENERATORS[key]


SOURCE_KEY = "_source"  # read_requests notes each request's 'FILE:LINE' here, for error messages


def _source(req: dict, i: int) -> str:
    return req.get(SOURCE_KEY) or f"request {i + 1}"


def _request_ids(requests: Sequence[dict]) -> list[str]:
    """The id of each request (default: its index, 5 digits). An id must be a string or an integer usable in
    a file name (it names `<id>_<k>.png`) and unique: a repeated id would overwrite the first request's
    images; the error names both requests."""
    ids: list[str] = []
    first: dict[str, int] = {}
    for i, req in enumerate(requests):
        rid = req.get("id", f"{i:05d}")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise GenerateError(f"{_source(req, i)}: id {rid!r}: expected a string or an integer")
        rid = str(rid)
        if not rid or any(c in rid for c in "/\\\0") or len(rid.encode("utf-8", "replace")) > MAX_ID_BYTES \
                or not valid_unicode(rid):
            raise GenerateError(f"{_source(req, i)}: id {rid if len(rid) <= 40 else rid[:37] + '...'!r} cannot name "
                                f"a file (<id>_<k>.png): it must be non-empty, at most {MAX_ID_BYTES} bytes, "
                                "without '/' or '\\' or a lone surrogate (\\ud800-\\udfff)")
        if rid in first:
            j = first[rid]
            raise GenerateError(f"{_source(req, i)}: id {rid!r} is already used by {_source(requests[j], j)}; "
                                "ids name the output files (<id>_<k>.png), so each must be unique")
        first[rid] = i
        ids.append(rid)
    return ids


def _request_kwargs(req: dict, overrides: dict, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The `Generator.generate` keywords of a batch request: its fields (REQUEST_KEYS; another key is an error),
    its `sampler` settings over `overrides`, its `max_new_tokens` over `max_new_tokens` (None: the Generator's
    default)."""
    unknown = [k for k in req if k not in REQUEST_KEYS and k != SOURCE_KEY]
    if unknown:
        raise GenerateError(f"unknown request key {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_KEYS)}")
    sampler = req.get("sampler", {})
    if not isinstance(sampler, dict):
        raise GenerateError(f"sampler {sampler!r}: expected an object of sampler settings")
    sampler = _check_sampler({**overrides, **sampler})  # before they become keywords beside `seed`, `size` ...
    think = req.get("think", False)
    if not isinstance(think, bool):
        raise GenerateError(f"think {think!r}: expected true or false")
    if req.get("max_new_tokens") is not None:
        if not think:
            raise GenerateError("max_new_tokens applies to think requests only (the think text's limit)")
        max_new_tokens = req["max_new_tokens"]
    limit = {} if max_new_tokens is None else dict(max_think_tokens=max_new_tokens)
    return dict(prompt=req.get("prompt"), prompt_ids=req.get("prompt_ids"), images=req.get("images", []),
                size=req.get("size"), seed=req.get("seed", 0), num_images=req.get("num_images", 1), think=think,
                **limit, **sampler)


def _request_paths(out_dir: pathlib.Path, rid: str, n: int) -> list[pathlib.Path]:
    return [out_dir / f"{rid}_{k}.png" for k in range(n)]


class OutputError(GenerateError):
    """An output that could not be written (a full disk, no permission ...): names the file and the cause."""

    def __init__(self, path, cause: OSError):
        super().__init__(f"cannot write {path}: {cause.strerror or cause}")


def _outputs_recorded(record: dict, paths: Sequence[pathlib.Path]) -> bool:
    """Whether `paths` hold the images `record` names (their sha256; records of older versions name none);
    those that do not (a run stopped while --regenerate replaced them) are said: the request is generated
    again."""

    want = record.get("outputs_sha256")
    if want is None:
        return True
    other = [p.name for p, h in zip(paths, want) if file_sha256(p) != h]
    if other or len(want) != len(paths):
        print(f"{', '.join(other) or record.get('id')}: not the image(s) metadata.jsonl records for request "
              f"{record.get('id')!r} (a run stopped while regenerating it?); generating it again", file=sys.stderr)
        return False
    return True


def _unlink(path: pathlib.Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(path, e) from None


# the temporary file of an output being written: .<name>.<pid>.tmp beside it (write_files); a rerun removes those
# of processes no longer running (killed mid-write)
_TEMP_NAME = re.compile(r"\.(.+\.png|generation\.json|answer\.json)\.(\d+)\.tmp")


def write_files(files: Sequence[tuple[pathlib.Path, Any]]) -> None:
    """Write each (path, write(f)) atomically, all of them or none: each to a temporary file in its folder
    (flushed to disk), then all renamed over their paths, so that a kill or a failure never leaves a truncated file
    under a final name, nor a part of the files. An OSError (a full disk ...) is an OutputError naming the file;
    the temporary files are removed on any failure."""
    staged = []
    try:
        for path, write in files:
            path = pathlib.Path(path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append((tmp, path))
            with _naming(path), open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            with _naming(path):
                os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path):
    try:
        yield
    except OSError as e:
        raise OutputError(path, e) from None


def save_png(img, path) -> None:
    """Write `img` (uint8 [H, W, 3]) to `path` atomically (write_files)."""
    write_files([(path, functools.partial(_write_png, img))])


def crop_to_bbox(img) -> np.ndarray:
    """`img` (uint8 [H, W, 3]) cropped to the bounding box of its non-black pixels, as the official benchmark
    generation scripts save their samples (``sample.crop(sample.getbbox())``: BAGEL's GenEval script, Echo-4o's
    OmniContext script); an all-black image is kept whole (getbbox: None, crop(None): the whole image)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(img))
    return np.asarray(im.crop(im.getbbox()))


def _write_png(img, f) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(img)).save(f, format="PNG")


def _remove_stale_temps(folder: pathlib.Path) -> None:
    """Remove the temporary files write_files left in `folder` in a process that is no longer running (a kill -9
    mid-write); those of running processes (another run writing there) stay."""
    for p in folder.glob(".*.tmp"):
        m = _TEMP_NAME.fullmatch(p.name)
        if m and not pid_running(int(m[2])):
            p.unlink(missing_ok=True)


def image_complete(path) -> bool:
    """Whether `path` is an image that decodes to its last pixel (a file cut short by a kill does not)."""
    from echo4o_jax.data.records import RecordError, probe_image

    try:
        probe_image(pathlib.Path(path).read_bytes(), check="decode")
    except (OSError, RecordError):
        return False
    return True


def outputs_finished(paths: Sequence, what: str) -> bool:
    """The resume check of one request (run_requests, echo4o_jax.eval.run): whether every output in `paths`
    exists and decodes fully (`image_complete`; nothing is decoded while one is absent). Outputs that exist
    but do not decode (a write cut short by a kill) are reported on stderr: `what` is generated again."""
    paths = [pathlib.Path(p) for p in paths]
    if not all(p.is_file() for p in paths):
        return False
    broken = [str(p) for p in paths if not image_complete(p)]
    if broken:
        print(f"{', '.join(broken)}: exists but does not decode fully (interrupted write?); generating {what} "
              "again", file=sys.stderr)
    return not broken


def _read_metadata(meta_path: pathlib.Path) -> dict[str, dict]:
    """{id: record} of the finished requests in `meta_path` (the last record per id). A last line cut
    short by a kill (no newline, not JSON) is reported and cut off, so that the next record starts on a
    line of its own; its request counts as unfinished. Any other line that is not a JSON record is an
    error naming it."""
    if not meta_path.exists():
        return {}
    data = meta_path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    if tail.strip():  # no final newline: an interrupted append
        try:
            json.loads(tail)
        except ValueError:
            print(f"{meta_path}: the last line is cut short (interrupted write?): {tail[:80]!r}; removing it, "
                  "its request is generated again", file=sys.stderr)
            with open(meta_path, "r+b") as f:
                f.truncate(complete)
            data = data[:complete]
        else:
            with open(meta_path, "ab") as f:
                f.write(b"\n")
    done = {}
    for n, r, why in jsonl_lines(data.splitlines()):
        if why:
            raise GenerateError(f"{meta_path}:{n}: {why}; fix or remove that line")
        if "id" not in r:
            raise GenerateError(f"{meta_path}:{n}: a record needs an `id`")
        done[r["id"]] = r
    return done


def _image_identity(im) -> tuple[str, str]:
    """(what, sha256 of the content) of a reference image: a file (its resolved path, its bytes' hash) or an
    image object given to the API (its pixels' hash)."""
    if isinstance(im, (str, pathlib.Path)):
        p = pathlib.Path(im)
        try:
            return str(p.resolve()), file_sha256(p)
        except OSError as e:
            raise GenerateError(f"cannot read image {p}: {e}") from None
    return f"<{type(im).__name__} {im.size[0]}x{im.size[1]}>", hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def _inputs_record(gen: Generator, prompt, images) -> dict[str, Any]:
    """The part of a record every mode shares: the checkpoint's identity, dtype, input resizes, prompt and
    reference images (resolved paths, sha256 of their content)."""
    ims = [_image_identity(im) for im in images]
    return dict(**gen.identity, dtype=gen.dtype, vae_transform=dataclasses.asdict(gen.vae_transform),
                vit_transform=dataclasses.asdict(gen.vit_transform), prompt=prompt,
                images=[name for name, _ in ims], images_sha256=[h for _, h in ims])


def _generated_with(gen: Generator, req: dict, r: _Prepared) -> dict[str, Any]:
    """What makes a request's pictures, as its metadata.jsonl record keeps it: the checkpoint's identity
    (folder, workdir step, weight files), dtype, input resizes, prompt (and its token ids), reference images
    (resolved paths, sha256 of their content), seed, number of images, size, think mode (and its token limit),
    sampler settings."""
    think = r.sys_ids is not None
    return dict(**_inputs_record(gen, req.get("prompt"), req.get("images", [])), prompt_ids=list(r.ids),
                seed=r.seed, num_images=r.num_images, size=list(r.shape), think=think,
                max_new_tokens=r.max_think_tokens if think else None,
                settings={k: list(v) if isinstance(v, tuple) else v for k, v in r.sampler.items()})


_ABSENT = object()
# fields added to metadata.jsonl records after they were first written: their value in an older record
RECORD_DEFAULTS = {"crop_to_bbox": False}


def _changed_settings(record: dict, now: dict[str, Any]) -> str:
    """'' when a finished request's record matches `now` (_generated_with); else each differing field with both
    values, e.g. ``seed 0 -> 1``, and each differing key of a dict field, e.g. ``settings.num_timesteps 2 -> 50``
    (a field the record lacks, written by an older version, differs too)."""
    def short(v, absent="(not recorded)"):
        t = absent if v is _ABSENT else repr(v)
        return t if len(t) <= 80 else t[:77] + "..."

    parts = []
    for k, v in now.items():
        was = record.get(k, RECORD_DEFAULTS.get(k, _ABSENT))
        if was == v:
            continue
        if isinstance(was, dict) and isinstance(v, dict):
            parts += [f"{k}.{kk} {short(was.get(kk, _ABSENT))} -> {short(v.get(kk, _ABSENT), '(none)')}"
                      for kk in sorted(was.keys() | v.keys()) if was.get(kk, _ABSENT) != v.get(kk, _ABSENT)]
        else:
            parts.append(f"{k} {short(was)} -> {short(v)}")
    return ", ".join(parts)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C in run_requests: `finished` of `total` requests are finished (their images and records kept)."""

    def __init__(self, finished: int, total: int):
        super().__init__(f"{finished} of {total} requests finished")
        self.finished, self.total = finished, total


def check_out_dir(out) -> None:
    """An output folder must be a folder or a path that can become one: an existing file, or a path under a
    file, is a GenerateError (before anything is generated)."""
    from .paths import folder_problem

    why = folder_problem(out)
    if why:
        raise GenerateError(f"--out {out}: {why}")


def _make_out_dir(out: pathlib.Path) -> None:
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenerateError(f"--out {out}: cannot create the folder ({e})") from None


def check_requests(gen: Generator, requests: Sequence[dict], overrides: dict | None = None,
                   max_new_tokens: int | None = None) -> tuple[list[str], list[_Prepared]]:
    """Every request checked against the model (`Generator.check_request`; ids unique), nothing written:
    -> (ids, checked requests). The first error names the request (its 'FILE:LINE', else its number) and id."""
    ids = _request_ids(requests)
    overrides = dict(overrides or {})
    prepared = []
    for i, (rid, req) in enumerate(zip(ids, requests)):
        try:
            prepared.append(gen.check_request(req, overrides, max_new_tokens))
        except GenerateError as e:
            raise GenerateError(f"{_source(req, i)} (id={rid}): {e}") from None
    return ids, prepared


def run_requests(gen: Generator, requests: Sequence[dict], out_dir, *, overrides: dict | None = None,
                 max_new_tokens: int | None = None,
                 progress: bool = True, batch_size: int = 4, regenerate: bool = False,
                 counts: dict | None = None, crop: bool = False) -> list[dict]:
    """Generate every request into `out_dir` (`<id>_<k>.png`, written atomically); finished requests (listed
    in metadata.jsonl, every PNG present and decoding fully) are skipped; a PNG that does not decode (an
    interrupted write) is reported and its request generated again. A finished request whose record differs
    from the request (checkpoint, prompt, images, seed, number of images, size, think, sampler settings) is an
    error naming it, before anything is generated: its images are not this request's; with `regenerate` it is
    generated again (one finished with exactly these settings is still skipped: an interrupted regenerate run
    resumes). An output that cannot be written (a full disk) is a GenerateError naming it, the finished
    requests kept (a rerun resumes); temporary files of a killed earlier run are removed.
    Consecutive text-to-image requests of one shape and sampler setting run batched (up to `batch_size` per
    sampler pass). Every request is checked (its images decoded) before anything is loaded or written, and
    generated from that checked form: its images are decoded again at its turn (no pixels are held meanwhile)
    and resized once. `max_new_tokens`: the think text's limit of a think request without its own
    `max_new_tokens` (None: the Generator's default). Returns one record per request (`outputs`: file names in
    `out_dir`); `counts` (a dict), when given, gets "generated": how many this call generates (the others were
    finished). `crop`: each image is saved cropped to its non-black content (crop_to_bbox, as the official
    benchmark scripts; recorded as `crop_to_bbox`). Ctrl-C raises BatchInterrupted (a KeyboardInterrupt) saying
    how many requests are finished."""
    from tqdm import tqdm


    out_dir = pathlib.Path(out_dir)
    ids, prepared = check_requests(gen, requests, overrides, max_new_tokens)
    _make_out_dir(out_dir)
    _remove_stale_temps(out_dir)
    meta_path = out_dir / "metadata.jsonl"
    done = _read_metadata(meta_path)
    records: dict[int, dict] = {}
    pending, changed = [], []
    for i, (rid, req, r) in enumerate(zip(ids, requests, prepared)):
        paths = _request_paths(out_dir, rid, r.num_images)
        if rid in done:  # (its outputs complete or not: a request changed is not regenerated silently)
            diff = _changed_settings(done[rid], {**_generated_with(gen, req, r), "crop_to_bbox": crop})
            if not diff and outputs_finished(paths, f"request {rid!r}") and _outputs_recorded(done[rid], paths):
                records[i] = done[rid]
                continue
            if diff and not regenerate:
                changed.append(f"{_source(req, i)} (id={rid}): {diff}")
        pending.append((i, rid, req, r, paths))
    if changed:  # keeping those images would pass them off as this request's
        raise GenerateError(f"{meta_path} says {len(changed)} finished request(s) were generated otherwise, e.g. "
                            f"{changed[0]}. Nothing was generated: use another output folder, or regenerate them "
                            "(--regenerate)")
    if counts is not None:  # (the CLI's last line: how many this run generates)
        counts["generated"] = len(pending)
    # consecutive requests of one shape and sampler setting share a sampler pass
    groups: list[list] = []
    last_key = None
    for item in pending:
        key = gen.batch_key(item[3])
        if groups and key is not None and len(groups[-1]) < batch_size and key == last_key:
            groups[-1].append(item)
        else:
            groups.append([item])
        last_key = key
    try:
        with tqdm(total=len(pending), disable=not progress, desc="generate") as bar:  # closed before an error prints
            for group in groups:
                t0 = time.time()
                if len(group) == 1:
                    results = [gen.generate_prepared(group[0][3])]
                else:
                    results = gen.generate_many([g[3] for g in group])
                seconds = round((time.time() - t0) / len(group), 3)
                for (i, rid, req, r, paths), res in zip(group, results):
                    for p, img in zip(paths, res["images"]):
                        save_png(crop_to_bbox(img) if crop else img, p)
                    # (the outputs' sha256: a run stopped while replacing a request's images, --regenerate, left
                    # its old record vouching for a mix of old and new ones)
                    rec = dict(id=rid, **_generated_with(gen, req, r), crop_to_bbox=crop,
                               outputs=[p.name for p in paths],
                               outputs_sha256=[file_sha256(p) for p in paths], seconds=seconds,
                               batched_with=len(group))
                    if res.get("think") is not None:  # (the planning text, as a single run's generation.json)
                        rec["think_text"] = res["think"]
                    with _naming(meta_path), open(meta_path, "a") as f:  # a line cut short: _read_metadata
                        f.write(json.dumps(rec) + "\n")
                    records[i] = rec
                    if rid in done:  # regenerated with fewer images: the old extra ones are no one's
                        for p in _request_paths(out_dir, rid, len(done[rid].get("outputs") or ()))[len(paths):]:
                            _unlink(p)
                bar.update(len(group))
        # the outputs are named by the ids (records of older versions held paths relative to their working directory)
        # (a sheet of every output grew without bound: 2.9 GB and 138 s for 4,000 images, too large for PIL to
        # open, and was made again by every rerun, also one that generated nothing)
        sheet = out_dir / "contact_sheet.png"
        if pending or not sheet.exists():
            outputs = [p for rid, r in zip(ids, prepared) for p in _request_paths(out_dir, rid, r.num_images)]
            write_contact_sheet(outputs[:CONTACT_SHEET_MAX], sheet)
    except KeyboardInterrupt:
        raise BatchInterrupted(len(records), len(requests)) from None
    except OutputError as e:
        raise GenerateError(f"{e}; {len(records)} of {len(requests)} requests finished and kept: rerun the same "
                            "command to resume") from None
    return [records[i] for i in sorted(records)]


CONTACT_SHEET_MAX = 256  # outputs on a batch's contact sheet (the first ones): 2048 x 8192 px at most


def write_contact_sheet(paths: Sequence, out, cell: int = 256, cols: int = 8) -> None:
    from PIL import Image

    paths = [pathlib.Path(p) for p in paths if pathlib.Path(p).exists()]
    if not paths:
        return
    cols = min(cols, len(paths))
    rows = -(-len(paths) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((cell, cell))
            sheet.paste(im, ((i % cols) * cell + (cell - im.width) // 2, (i // cols) * cell + (cell - im.height) // 2))
    save_png(sheet, out)


# generate_batch's settings besides the sampler's: the loader's, the input resizes, the think text's limit, the crop
BATCH_KEYS = ("step", "dtype", "max_context", "attention_impl", "vae_transform", "vit_transform", "max_new_tokens",
              "crop_to_bbox")


def generate_batch(ckpt: str, requests: list[dict], out_dir: str | None, *, regenerate: bool = False,
                   check_only: bool = False, progress: bool = True, **overrides) -> list[dict]:
    """API for the evaluation: requests with `id`, `prompt`, `images`, `size`, `seed`, `num_images`;
    writes `<out_dir>/<id>_<k>.png` (finished requests skipped; with `regenerate` those finished with other
    settings are generated again: run_requests; `progress`: its progress bar). The loaded
    checkpoint is cached per path. Sampler settings (cfg_text_scale, cfg_img_scale, cfg_interval,
    cfg_renorm_type, cfg_renorm_min, timestep_shift, num_timesteps; vae_posterior for the requests with
    reference images) may be passed as overrides. Every
    request is checked (ids unique, keys, sizes, sampler values, image files, prompt length; the error names
    the request) before the weights load or anything is written. `step` (a training workdir's checkpoint step,
    default its latest), `dtype` (DTYPES), `max_context`, `attention_impl` configure the loader (checked as the
    CLI's flags);
    `vae_transform` / `vit_transform` ([max, min] side, as --vae-transform / --vit-transform) the input resizes of
    this batch only (set on the cached Generator and restored after it: one loaded model serves batches with
    different transforms); `max_new_tokens` is run_requests', `crop_to_bbox` its `crop`. `check_only`: the requests are checked (the model
    loaded and cached, their images read) and nothing is written or generated (-> []): an evaluation checks every
    benchmark's requests before it generates any."""
    from .image_transform import ImageTransform, valid_sides

    unknown = [k for k in overrides if k not in SAMPLER_KEYS + BATCH_KEYS]
    if unknown:  # (eval.run's --gen-arg: every key it may pass is named, not the sampler's alone)
        raise GenerateError(f"unknown setting {', '.join(map(repr, unknown))}; known: "
                            f"{', '.join(SAMPLER_KEYS + BATCH_KEYS)}")
    load_kw = {k: overrides.pop(k) for k in ("step", "dtype", "max_context", "attention_impl") if k in overrides}
    if "dtype" in load_kw and load_kw["dtype"] not in DTYPES:  # (the loader would fail once the weights load)
        raise GenerateError(f"dtype ({SETTING_FLAGS['dtype']}) {load_kw['dtype']!r}: expected one of "
                            f"{', '.join(DTYPES)}")
    for k in ("step", "max_context"):
        if load_kw.get(k) is not None:
            _as_int(load_kw[k], f"{k} ({SETTING_FLAGS[k]})", minimum=0)
    transforms = {}
    for k in ("vae_transform", "vit_transform"):
        if k in overrides:
            t = overrides.pop(k)
            if not valid_sides(t):
                raise GenerateError(f"{k} {t!r}: expected [MAX, MIN] image sides with 0 < MIN <= MAX")
            transforms[k] = tuple(t)
    run_kw = {k: overrides.pop(k) for k in ("max_new_tokens",) if k in overrides}
    if "crop_to_bbox" in overrides:
        run_kw["crop"] = overrides.pop("crop_to_bbox")
        if not isinstance(run_kw["crop"], bool):
            raise GenerateError(f"crop_to_bbox {run_kw['crop']!r}: expected true or false")
    gen = get_generator(ckpt, **load_kw)
    saved = {k: getattr(gen, k) for k in transforms}
    try:
        for k, (hi, lo) in transforms.items():
            stride = gen.cfg.latent_downsample if k == "vae_transform" else gen.cfg.vit.patch_size
            setattr(gen, k, ImageTransform(hi, lo, stride))
        if check_only:
            check_requests(gen, requests, overrides, run_kw.get("max_new_tokens"))
            return []
        return run_requests(gen, requests, out_dir, overrides=overrides, regenerate=regenerate, progress=progress,
                            **run_kw)
    finally:
        for k, t in saved.items():
            setattr(gen, k, t)


def read_requests(path) -> list[dict]:
    """The requests of a JSONL file (one object per line, blank lines skipped), checked for what needs no
    model: valid JSON, `prompt` or `prompt_ids`, `images` a list of paths, ids unique and usable as file
    names (default id: the line number, 5 digits). Relative image paths are taken relative to the file's
    folder (stored resolved). Each request notes its 'FILE:LINE' under SOURCE_KEY, which run_requests
    names in its errors; run_requests checks the rest (sizes, image files, prompt length ...) against the
    model before generating anything."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise GenerateError(f"prompts file not found: {p}")
    out = []
    for n, r, why in jsonl_lines(p.read_bytes().splitlines()):
        where = f"{p}:{n}"
        if why:
            raise GenerateError(f"{where}: {why}")
        if "prompt" not in r and "prompt_ids" not in r:
            raise GenerateError(f"{where}: each line needs an object with `prompt` (or `prompt_ids`)")
        r.setdefault("id", f"{n:05d}")
        r[SOURCE_KEY] = where
        images = r.get("images", [])
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise GenerateError(f"{where} (id={r['id']}): `images` {images!r}: expected a list of image paths")
        bad = next((x for x in images if "\0" in x or not valid_unicode(x)), None)
        if bad is not None:  # (a traceback from resolve(): "embedded null byte", UnicodeEncodeError)
            raise GenerateError(f"{where} (id={r['id']}): image path {bad!r} holds a NUL or a lone surrogate "
                                "(\\ud800-\\udfff): no file has that name")
        r["images"] = [str((p.parent / x).resolve()) for x in images]  # an absolute path stays as it is
        out.append(r)
    if not out:
        raise GenerateError(f"{p}: no requests (one JSON object per line)")
    _request_ids(out)
    return out


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m echo4o_jax.generate", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=pathlib.Path, default=None)
    p.add_argument("--step", type=int, default=None,
                   help="a training workdir's checkpoint step (default: its latest); refused for other folders")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--prompts", type=pathlib.Path, default=None,
                   help="batch mode: a JSONL file of requests (ids unique; relative image paths are read from "
                        "the file's folder); every request is checked before the model loads")
    p.add_argument("--image", action="append", default=[], help="reference / input image (repeat)")
    p.add_argument("--understand", action="store_true", help="answer in text about the image(s)")
    p.add_argument("--think", action="store_true", help="official think mode (reasoning text first)")
    p.add_argument("--size", default=None, help="HxW (default 1024x1024, or the last input image's)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--num-images", type=int, default=None, help="default 1")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help=f"output folder (single mode and --understand: default a new folder {DEFAULT_OUT}/<date-time> "
                        "per run; batch mode: required, the folder a rerun resumes)")
    p.add_argument("--overwrite", action="store_true",
                   help="single mode: replace the earlier generation in --out (its files are removed once the new "
                        "one is written); without it such an --out is refused")
    p.add_argument("--regenerate", action="store_true",
                   help="with --prompts: generate again the finished requests made with other settings (otherwise "
                        "refused); those finished with this run's settings are kept, so an interrupted "
                        "--regenerate run resumes")
    p.add_argument("--steps", dest="num_timesteps", type=int, default=None)
    p.add_argument("--cfg-text-scale", type=float, default=None)
    p.add_argument("--cfg-img-scale", type=float, default=None)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None)
    p.add_argument("--cfg-renorm-type", choices=["global", "channel", "text_channel"], default=None)
    p.add_argument("--cfg-renorm-min", type=float, default=None)
    p.add_argument("--timestep-shift", type=float, default=None)
    p.add_argument("--vae-posterior", choices=VAE_POSTERIORS, default=None,
                   help="how --image inputs are VAE-encoded: sample (default, the official: a posterior sample "
                        "drawn from the seed) or mean (the posterior mean)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"length limit of the --understand answer / the --think text (default "
                        f"{DEFAULT_MAX_NEW_TOKENS}; batch mode: of think requests without their own max_new_tokens)")
    p.add_argument("--max-context", type=int, default=0, help="KV-cache capacity in tokens (default 8192)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' and compute dtype (default: bfloat16 on a GPU / TPU, as the official inference; "
                        "float32 on the CPU)")
    p.add_argument("--attention-impl", default=None, metavar="IMPL",
                   help="the model's attention: xla_blockwise (default), pallas_gpu / pallas_tpu (the fused "
                        "kernels, on a GPU / TPU), xla_dense; not recorded with the images: it changes them by float "
                        "rounding only, as a batch's composition does")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard the parameters over a device mesh, e.g. 1,-1,1 (FSDP over all devices)")
    p.add_argument("--vae-transform", type=int, nargs=2, metavar=("MAX", "MIN"), default=None,
                   help="input-image resize for the VAE path (official 1024 512)")
    p.add_argument("--vit-transform", type=int, nargs=2, metavar=("MAX", "MIN"), default=None,
                   help="input-image resize for the ViT path (official 980 224; some eval scripts use 980 378)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_ctrl_c()
    try:
        return _run(args)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BatchInterrupted as e:
        print(f"interrupted: {e.finished} of {e.total} requests finished and kept; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: nothing of this run was written", file=sys.stderr)
        return 130


SINGLE_RECORDS = ("generation.json", "answer.json")


def _fresh_out(root: pathlib.Path) -> pathlib.Path:
    """A folder under `root` that does not exist yet, named by the date and time (-2, -3 ... if taken)."""
    base = root / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _earlier_generation(out: pathlib.Path) -> list[pathlib.Path]:
    """The files of an earlier single-mode run in `out`: its record and its images."""
    if not out.is_dir():
        return []
    return sorted([out / n for n in SINGLE_RECORDS if (out / n).is_file()] + list(out.glob("image_seed*_*.png")))


def _run(args) -> int:
    demo = args.ckpt is None
    ckpt = DEMO_CKPT if demo else args.ckpt
    sampler = _check_sampler({k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k, None) is not None})
    given = [SAMPLER_FLAGS[k] for k in sampler]
    if demo:
        sampler.setdefault("num_timesteps", 8)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    t0 = time.time()
    try:
        mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
    except ValueError:
        mesh = ()
    if mesh is not None and len(mesh) != 3:
        raise GenerateError(f"--mesh {args.mesh!r}: expected DATA,FSDP,TENSOR (integers, one may be -1)")
    reqs = None
    if args.regenerate and args.prompts is None:
        raise GenerateError("--regenerate applies to --prompts (batch mode) only")
    if args.out is None:
        if args.prompts is not None:
            raise GenerateError("--prompts needs --out: the folder the outputs go to, which a rerun resumes")
        if args.overwrite:
            raise GenerateError("--overwrite replaces the generation in --out: give --out")
        args.out = _fresh_out(DEFAULT_OUT)
    check_out_dir(args.out)
    if args.prompts is not None:
        per_request = [flag for flag, v in (("--prompt", args.prompt), ("--prompt-ids", args.prompt_ids),
                                            ("--image", args.image or None), ("--understand", args.understand or None),
                                            ("--think", args.think or None), ("--size", args.size),
                                            ("--seed", args.seed), ("--num-images", args.num_images))
                       if v is not None]
        if per_request:
            raise GenerateError(f"--prompts takes each request's settings from its line; {', '.join(per_request)} "
                                "would be ignored: put them in the JSONL (see --help)")
        if args.overwrite:
            raise GenerateError("--overwrite applies to single mode; batch mode resumes (--regenerate generates "
                                "every request again)")
        earlier = _earlier_generation(args.out)
        if earlier:
            raise GenerateError(f"--out {args.out} holds a single-mode generation ({earlier[0].name}): use another "
                                "--out for a batch run")
        reqs = read_requests(args.prompts)  # before the checkpoint: a broken file fails in seconds
        if args.max_new_tokens is not None and not any(r.get("think") is True for r in reqs):
            raise GenerateError(f"--max-new-tokens would be ignored: no request of {args.prompts} has "
                                "\"think\": true")
    else:
        ignored = ([f for f, v in (("--size", args.size), ("--seed", args.seed), ("--num-images", args.num_images))
                    if v is not None] + given) if args.understand else (
            ["--max-new-tokens"] if args.max_new_tokens is not None and not args.think else [])
        if ignored:
            raise GenerateError(f"{', '.join(ignored)} would be ignored "
                                + ("by --understand (it generates text)" if args.understand
                                   else "without --think or --understand (it limits their text)"))
        if args.vae_posterior is not None and not args.image:
            raise GenerateError("--vae-posterior would be ignored without --image (it sets how input images are "
                                "VAE-encoded)")
        if (args.out / "metadata.jsonl").exists():
            raise GenerateError(f"--out {args.out} holds a batch run (metadata.jsonl): use another --out")
        earlier = _earlier_generation(args.out)
        if earlier and not args.overwrite:
            raise GenerateError(f"--out {args.out} holds an earlier generation ({', '.join(p.name for p in earlier[:3])}"
                                f"{', ...' if len(earlier) > 3 else ''}): use another --out, or --overwrite to "
                                "replace it")
    # config and tokenizer now; the weights load at the first generation, once the input is checked
    gen = get_generator(ckpt, step=args.step, dtype=args.dtype, max_context=args.max_context, demo=demo, mesh=mesh,
                        attention_impl=args.attention_impl,
                        vae_transform=tuple(args.vae_transform) if args.vae_transform else None,
                        vit_transform=tuple(args.vit_transform) if args.vit_transform else None)
    if reqs is not None:  # run_requests checks every request before it creates --out
        counts: dict = {}
        recs = run_requests(gen, reqs, args.out, overrides=sampler, regenerate=args.regenerate,
                            max_new_tokens=max_new_tokens, counts=counts)
        done = len(recs) - counts["generated"]
        print(f"{len(recs)} requests -> {args.out} (metadata.jsonl, contact_sheet.png) in {time.time() - t0:.1f}s: "
              f"{counts['generated']} generated" + (f", {done} already finished" if done else ""))
        return 0
    seed = 0 if args.seed is None else args.seed
    try:
        prompt_ids = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else None
    except ValueError:
        raise GenerateError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated token ids") from None
    if demo and args.prompt is None and prompt_ids is None:
        prompt_ids = DEMO_PROMPT_IDS
    if args.understand:
        res = gen.understand(args.prompt, prompt_ids=prompt_ids, images=args.image,
                             max_new_tokens=max_new_tokens, think=args.think)
        print(res["answer"])
        if gen.tokenizer is None:
            print(f"(token ids: {args.ckpt} has no tokenizer files to turn them into text)", file=sys.stderr)
        rec = dict(**_inputs_record(gen, args.prompt, args.image), prompt_ids=prompt_ids, think=args.think,
                   max_new_tokens=max_new_tokens, **res)
        _write_single(args.out, [(args.out / "answer.json", _json_writer(rec))])
        print(f"(saved to {args.out / 'answer.json'})", file=sys.stderr)
        _remove_earlier(earlier, [args.out / "answer.json"])
        return 0
    size = args.size or ((32, 48) if demo and not args.image else None)
    res = gen.generate(args.prompt, prompt_ids=prompt_ids, images=args.image, size=size, seed=seed,
                       num_images=1 if args.num_images is None else args.num_images, think=args.think,
                       max_think_tokens=max_new_tokens, **sampler)
    paths = [args.out / f"image_seed{seed}_{k}.png" for k in range(len(res["images"]))]
    rec = dict(**_inputs_record(gen, args.prompt, args.image), prompt_ids=res["prompt_ids"], seed=seed,
               num_images=len(paths), size=res["size"], outputs=[p.name for p in paths],
               settings={k: list(v) if isinstance(v, tuple) else v for k, v in res["settings"].items()})
    if "think" in res:
        rec.update(max_new_tokens=max_new_tokens, think=res["think"])
    _write_single(args.out, [*((p, functools.partial(_write_png, img)) for p, img in zip(paths, res["images"])),
                             (args.out / "generation.json", _json_writer(rec))])
    _remove_earlier(earlier, [*paths, args.out / "generation.json"])
    print(f"wrote {', '.join(map(str, paths))} ({res['size'][0]}x{res['size'][1]}) in {time.time() - t0:.1f}s")
    return 0


def _json_writer(rec: dict):
    return lambda f: f.write(json.dumps(rec, indent=1).encode())


def _write_single(out: pathlib.Path, files) -> None:
    """Single mode's outputs, written all or none (write_files): a failure (a full disk) leaves --out as it was,
    an earlier generation there (--overwrite) included."""
    _make_out_dir(out)
    _remove_stale_temps(out)
    try:
        write_files(files)
    except OutputError as e:
        raise GenerateError(f"{e}; nothing of this run was written ({out} holds what it held before): rerun the "
                            "same command once it can be written") from None


def _remove_earlier(earlier: Sequence[pathlib.Path], written: Sequence[pathlib.Path]) -> None:
    """--overwrite: once the new generation is written, the earlier one's files it did not replace go."""
    for p in set(earlier) - set(written):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    exit_process(main())
