"""Sequence packing: official BAGEL samples -> one packed batch with static shapes.

This reproduces the official `PackedDataset.pack_sequence` (ByteDance-Seed/Bagel
`data/dataset_base.py`) token for token, but lays the pack out for a static-shape JAX model:

    [ text segment (text_capacity) | vit segment (vit_capacity) | vae segment (vae_capacity) ]

* text segment: every text id, markers included (`<|im_start|>`, `<|im_end|>`, start/end of image);
  run by the understanding expert.
* vit segment: ViT patch tokens; understanding expert.
* vae segment: VAE latent tokens (clean and noisy); generation expert.

Inside each segment tokens follow the official packed order. Unused slots are padding. Each token
carries the metadata of `echo4o_jax.model.attention` (`sample`, `split`, `mode`, `order`), from which
`mask_from_meta` rebuilds the official per-sample attention masks, and its RoPE position.

`to_official` rebuilds the official arrays (sorting by `order`); `attention_masks` rebuilds the official
per-sample masks through `mask_from_meta`.

Images: `pack_samples(..., image_dtype="float32")` (default) stores `vae_images` / `vit_patches` as [-1, 1]
floats; `image_dtype="uint8"` stores the decoded pixels as they are (4x fewer bytes to copy in the
loader and to send to the device) and `normalize_images` (jit-able, called by the train step) turns them
into bit for bit the float32 arrays. `allocate_packs(budget, cfg, n)` + `pack_samples(..., out=batch,
out_index=i)` write packs straight into one stacked batch (the data loader's path: no per-pack arrays,
no stacking copy, padding never written).

Precomputed VAE latents (`vae_moments="float32" | "bfloat16"`, the data pipeline's `vae_latents` option):
the samples' VAE images are then the frozen encoder's posterior moments [2z, h, w] (h, w = H/8, W/8)
instead of pixels, and the pack carries `vae_moments` canvases [vae_images, Hmax/8, Wmax/8, 2z] (zero
padded, that dtype) instead of `vae_images`, with `vae_image_hw` = the latent (h, w). Token counts,
budget checks and everything else are computed from the equivalent pixel size (h * 8, w * 8), so a pack
is laid out exactly as with the pixel images.

Pure numpy; jax is imported lazily only by `attention_masks` / `dense_attention_mask` / `PackedBatch.token_meta`.

The official dataset skips a sample whose estimated `num_tokens + 2 * len(sequence_plan)` exceeds
`max_num_tokens_per_sample` before packing; that policy belongs to the data loader (see
`sample_sizes` for the exact per-sample requirement). `pack_samples` never skips or truncates: it
raises `PackOverflowError` when a capacity is exceeded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from echo4o_jax.config import BagelConfig

__all__ = [
    "CAUSAL",
    "FULL",
    "NOISE",
    "PackBudget",
    "PackError",
    "PackOverflowError",
    "PackedBatch",
    "SampleSizes",
    "sample_sizes",
    "budget_for",
    "patchify",
    "pack_samples",
    "to_official",
    "attention_masks",
    "dense_attention_mask",
    "batch_arrays",
    "stack_batches",
    "allocate_packs",
    "IMAGE_DTYPES",
    "normalize_images",
    "unit_range_lut",
    "MOMENT_DTYPES",
    "moments_dtype",
    "vae_pixel_size",
]

# Same values as echo4o_jax.model.attention (kept here so that this module does not import jax).
CAUSAL, FULL, NOISE = 0, 1, 2

_TEXT, _VIT, _VAE = "text", "vit_image", "vae_image"

# Dtype of the packed image fields (`vae_images`, `vit_patches`):
#   "float32": values in [-1, 1] (official ToTensor + Normalize(0.5, 0.5)), padding 0.0;
#   "uint8": raw decoded pixels [0, 255], padding 0; `normalize_images` (on device, inside the step) turns
#            them into exactly the float32 arrays of the "float32" layout.
IMAGE_DTYPES = ("float32", "uint8")
# Dtypes of precomputed VAE posterior moments (`vae_moments` canvases).
MOMENT_DTYPES = ("float32", "bfloat16")


def moments_dtype(name: str) -> np.dtype:
    """numpy dtype of a `MOMENT_DTYPES` name (bfloat16 via ml_dtypes)."""
    if name not in MOMENT_DTYPES:
        raise ValueError(f"moments dtype {name!r}: expected one of {MOMENT_DTYPES}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def vae_pixel_size(h: int, w: int, cfg: BagelConfig, moments: bool) -> tuple[int, int]:
    """The pixel size (H, W) a VAE item stands for: its own size, or for posterior moments [h, w] (precomputed
    latents) the size of the image they encode (h, w) * the VAE downsample."""
    f = cfg.vae.downsample if moments else 1
    return h * f, w * f


class PackError(ValueError):
    """A sample is malformed (plan / item count mismatch, bad image shape, unsupported plan item)."""


class PackOverflowError(ValueError):
    """The samples do not fit the pack budget."""


@dataclasses.dataclass(frozen=True)
class PackBudget:
    text_tokens: int  # capacity of the text segment (all text ids incl. markers)
    vit_tokens: int  # capacity of the vit segment
    vae_tokens: int  # capacity of the vae latent-token segment
    vae_images: int  # max number of VAE images per pack
    vae_image_size: tuple[int, int]  # (Hmax, Wmax) padded VAE image size

    def __post_init__(self):
        for name in ("text_tokens", "vit_tokens", "vae_tokens", "vae_images"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"PackBudget.{name}={v!r} must be a non-negative int")
        if len(self.vae_image_size) != 2 or any(int(s) != s or s < 0 for s in self.vae_image_size):
            raise ValueError(f"PackBudget.vae_image_size={self.vae_image_size!r} must be (H, W) ints >= 0")
        object.__setattr__(self, "vae_image_size", tuple(int(s) for s in self.vae_image_size))

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.vit_tokens + self.vae_tokens


_TOKEN_FIELDS = ("sample_id", "split_id", "split_mode", "order", "position_id")
_TEXT_FIELDS = ("text_ids", "text_labels", "text_ce_weight")
_VIT_FIELDS = ("vit_patches", "vit_pos_ids", "vit_image_id")
_VAE_FIELDS = ("vae_image_index", "vae_token_hw", "latent_pos_ids", "timestep_raw", "mse_mask")
_IMAGE_FIELDS = ("vae_images", "vae_image_hw", "vae_moments")  # one of vae_images / vae_moments is None
_ARRAY_FIELDS = _TOKEN_FIELDS + _TEXT_FIELDS + _VIT_FIELDS + _VAE_FIELDS + _IMAGE_FIELDS


@dataclasses.dataclass
class PackedBatch:
    """One pack (numpy). After `stack_batches`, every array gets a leading batch axis and
    `num_tokens` / `num_samples` become int32 arrays [B]. The VAE canvases are `vae_images` (pixels) or
    `vae_moments` (precomputed posterior moments); the other one is None."""

    # per token, length L = text_capacity + vit_capacity + vae_capacity (segments text | vit | vae)
    sample_id: np.ndarray  # int32, -1 padding
    split_id: np.ndarray  # int32, unique per split in the pack, -1 padding
    split_mode: np.ndarray  # int32 CAUSAL / FULL / NOISE, 0 padding
    order: np.ndarray  # int32 official packed index; padding num_tokens + k
    position_id: np.ndarray  # int32 RoPE position, 0 padding
    # text segment [text_capacity]
    text_ids: np.ndarray  # int32, 0 padding
    text_labels: np.ndarray  # int32, -1 = no CE
    text_ce_weight: np.ndarray  # float32, 0 = no CE
    # vit segment [vit_capacity]
    vit_patches: np.ndarray  # float32 [vit_capacity, p*p*C] in [-1, 1], or uint8 pixels (image_dtype)
    vit_pos_ids: np.ndarray  # int32
    vit_image_id: np.ndarray  # int32, -1 padding
    # vae segment [vae_capacity]
    vae_image_index: np.ndarray  # int32 index into vae_images, -1 padding
    vae_token_hw: np.ndarray  # int32 [vae_capacity, 2] (row, col) in the latent grid
    latent_pos_ids: np.ndarray  # int32
    timestep_raw: np.ndarray  # float32, -inf clean and padding
    mse_mask: np.ndarray  # bool
    # images
    vae_image_hw: np.ndarray  # int32 [vae_images, 2] real (H, W) of each canvas (pixels, or latent for moments), 0 unused
    num_tokens: Any  # int (real tokens)
    num_samples: Any  # int
    vae_images: Any = None  # float32 [vae_images, Hmax, Wmax, C] NHWC zero padded, or uint8 pixels
    vae_moments: Any = None  # [vae_images, Hmax/8, Wmax/8, 2z] posterior moments (MOMENT_DTYPES), zero padded

    def __post_init__(self):
        if (self.vae_images is None) == (self.vae_moments is None):
            raise ValueError("PackedBatch needs exactly one of vae_images (pixels) / vae_moments (precomputed latents)")

    @property
    def text_capacity(self) -> int:
        return self.text_ids.shape[-1]

    @property
    def vit_capacity(self) -> int:
        return self.vit_pos_ids.shape[-1]

    @property
    def vae_capacity(self) -> int:
        return self.latent_pos_ids.shape[-1]

    @property
    def total_tokens(self) -> int:
        return self.sample_id.shape[-1]

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_capacity)

    @property
    def vit_slice(self) -> slice:
        return slice(self.text_capacity, self.text_capacity + self.vit_capacity)

    @property
    def vae_slice(self) -> slice:
        return slice(self.text_capacity + self.vit_capacity, self.total_tokens)

    def row(self, i: int) -> "PackedBatch":
        """Pack `i` of a stacked batch, as views (writes go into this batch)."""
        if self.sample_id.ndim != 2:
            raise ValueError("row() needs a stacked batch")
        fields = {k: getattr(self, k)[i] for k in _present_fields(self)}
        return PackedBatch(**fields, num_tokens=int(self.num_tokens[i]), num_samples=int(self.num_samples[i]))

    def token_meta(self):
        """`echo4o_jax.model.attention.TokenMeta` of the whole token array (numpy leaves)."""
        from echo4o_jax.model.attention import TokenMeta

        return TokenMeta(self.sample_id, self.split_id, self.split_mode, self.order)


def _present_fields(batch: PackedBatch) -> tuple[str, ...]:
    """The array fields the batch holds (without the unused VAE canvas)."""
    return tuple(k for k in _ARRAY_FIELDS if getattr(batch, k) is not None)


@dataclasses.dataclass(frozen=True)
class SampleSizes:
    """What one sample needs when packed without dropout."""

    text_tokens: int
    vit_tokens: int
    vae_tokens: int
    vae_images: int
    vae_image_size: tuple[int, int]  # max (H, W) over the sample's VAE images, (0, 0) if none

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.vit_tokens + self.vae_tokens


# ---------------------------------------------------------------------------------------------- helpers


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], feature order (kh, kw, c) (official `patchify`)."""
    p = patch_size
    c, h, w = image.shape
    x = image.reshape(c, h // p, p, w // p, p)
    x = np.einsum("chpwq->hwpqc", x)
    return x.reshape(-1, p * p * c)


def _to_unit_range_np(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the official ToTensor + Normalize(0.5, 0.5) in float32:
    ((x / 255) - 0.5) / 0.5 (the formula of `image_transform.to_unit_range`)."""
    a = np.asarray(pixels).astype(np.float32) / np.float32(255.0)
    return (a - np.float32(0.5)) / np.float32(0.5)


_LUT = _to_unit_range_np(np.arange(256, dtype=np.uint8))
_LUT.setflags(write=False)


def unit_range_lut() -> np.ndarray:
    """float32 [256]: the normalised value of every uint8 pixel (`_to_unit_range_np(arange(256))`)."""
    return _LUT


def _images_dtype(sample: dict, vae_moments: str | None = None) -> str:
    imgs = sample.get("image_tensor_list", [])
    if vae_moments is not None:  # the pixel images only
        imgs = [a for a in imgs if getattr(a, "dtype", None) != moments_dtype(vae_moments)]
    return "uint8" if imgs and all(getattr(a, "dtype", None) == np.uint8 for a in imgs) else "float32"


def normalize_images(batch: dict) -> dict:
    """Arrays of `batch_arrays` (one pack or stacked; numpy or jax, jit-able) with uint8 `vae_images` /
    `vit_patches` turned into the float32 arrays a float32 pack holds: every real pixel x becomes
    ((x / 255) - 0.5) / 0.5 in float32 (the official ToTensor + Normalize, bit for bit: a lookup in the
    256-entry table `unit_range_lut`, so no compiler rewrite of the division can change a bit), padding
    (pixels outside `vae_image_hw`, ViT rows with `vit_image_id < 0`) becomes 0.0. Float fields are left
    as they are; returns a new dict."""
    out = dict(batch)
    vi, vp = batch.get("vae_images"), batch.get("vit_patches")
    todo = [a for a in (vi, vp) if a is not None and a.dtype == np.uint8]
    if not todo:
        return out
    if all(isinstance(a, np.ndarray) for a in todo):
        xp, lut = np, _LUT
    else:
        import jax.numpy as xp

        lut = xp.asarray(_LUT)
    if vi is not None and vi.dtype == np.uint8:
        H, W = vi.shape[-3], vi.shape[-2]
        hw = batch["vae_image_hw"]
        rows = xp.arange(H)[:, None] < hw[..., 0, None, None]  # [..., N, H, 1]
        cols = xp.arange(W)[None, :] < hw[..., 1, None, None]  # [..., N, 1, W]
        mask = (rows & cols)[..., None]
        out["vae_images"] = xp.where(mask, lut[vi.astype(xp.int32)], xp.float32(0.0))
    if vp is not None and vp.dtype == np.uint8:
        mask = (batch["vit_image_id"] >= 0)[..., None]
        out["vit_patches"] = xp.where(mask, lut[vp.astype(xp.int32)], xp.float32(0.0))
    return out


def _grid_pos_ids(h: int, w: int, max_per_side: int) -> np.ndarray:
    """Official `get_flattened_position_ids_extrapolate` on an h x w grid."""
    return (np.arange(h)[:, None] * max_per_side + np.arange(w)[None, :]).reshape(-1)


def _len2weight(n: int) -> float:
    return 1.0 / math.sqrt(n)


def _sample_name(idx: int, sample: dict) -> str:
    for key in ("id", "sample_id", "data_indexes"):
        if key in sample:
            return f"sample {idx} ({key}={sample[key]!r})"
    return f"sample {idx}"


def _check_image(image, stride: int, max_per_side: int, channels: int, where: str, what: str,
                 image_dtype: str = "float32", moments: str | None = None) -> np.ndarray:
    """A [C, H, W] image (or, with `moments`, posterior moments of exactly that dtype) checked."""
    arr = np.asarray(image)
    if moments is not None:
        if arr.dtype != moments_dtype(moments):
            raise PackError(f"{where}: {what} must be {moments} posterior moments (vae_moments={moments!r}), "
                            f"got {arr.dtype}")
    elif image_dtype == "uint8":
        if arr.dtype != np.uint8:
            raise PackError(f"{where}: {what} must be uint8 pixels for image_dtype='uint8', got {arr.dtype}")
    elif arr.dtype == np.uint8:
        arr = _to_unit_range_np(arr)
    else:
        arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != channels:
        raise PackError(f"{where}: {what} must be [{channels}, H, W], got shape {tuple(arr.shape)}")
    _, H, W = arr.shape
    if H <= 0 or W <= 0 or H % stride or W % stride:
        raise PackError(f"{where}: {what} size {H}x{W} is not a positive multiple of {stride}")
    if H // stride > max_per_side or W // stride > max_per_side:
        raise PackError(
            f"{where}: {what} size {H}x{W} gives a {H // stride}x{W // stride} grid, more than "
            f"{max_per_side} per side (position table size)"
        )
    return arr


def _validate_sample(idx: int, sample: dict, cfg: BagelConfig, image_dtype: str = "float32",
                     vae_moments: str | None = None):
    """Returns (plan, text_ids_list, images) as fresh lists, validated. Images are float32 arrays (uint8
    inputs normalised exactly as the official ToTensor + Normalize), or uint8 for image_dtype='uint8';
    with `vae_moments` the VAE items are posterior moments [2z, h, w] of that dtype."""
    name = _sample_name(idx, sample)
    try:
        plan = list(sample["sequence_plan"])
        texts = list(sample["text_ids_list"])
    except KeyError as e:
        raise PackError(f"{name}: missing key {e.args[0]!r}") from None
    images = list(sample.get("image_tensor_list", []))
    n_text = sum(1 for it in plan if it.get("type") == _TEXT)
    n_img = sum(1 for it in plan if it.get("type") in (_VIT, _VAE))
    if n_text != len(texts):
        raise PackError(f"{name}: sequence_plan has {n_text} text items but text_ids_list has {len(texts)}")
    if n_img != len(images):
        raise PackError(f"{name}: sequence_plan has {n_img} image items but image_tensor_list has {len(images)}")
    vocab = cfg.llm.vocab_size
    ti = ii = 0
    out_texts, out_images = [], []
    for k, item in enumerate(plan):
        where = f"{name}, plan item {k} ({item.get('type')!r})"
        typ = item.get("type")
        if typ not in (_TEXT, _VIT, _VAE):
            raise PackError(f"{where}: unknown item type")
        if not item.get("split_start", True) or not item.get("split_end", True) or "frame_delta" in item:
            raise PackError(f"{where}: multi-item splits / frame_delta (video) are not supported")
        if item.get("special_token_loss", 0) == 1:
            lab = item.get("special_token_label")
            if lab is None or not (0 <= int(lab) < vocab):
                raise PackError(f"{where}: special_token_loss=1 needs a special_token_label in [0, {vocab})")
        if typ == _TEXT:
            ids = np.asarray(texts[ti], dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise PackError(f"{where}: text ids outside [0, {vocab})")
            out_texts.append(ids)
            ti += 1
        elif typ == _VIT:
            out_images.append(
                _check_image(images[ii], cfg.vit.patch_size, cfg.vit_max_num_patch_per_side,
                             cfg.vit.num_channels, where, f"image {ii}", image_dtype)
            )
            ii += 1
        elif vae_moments is not None:
            out_images.append(
                _check_image(images[ii], cfg.latent_patch_size, cfg.max_latent_size, 2 * cfg.vae.z_channels,
                             where, f"moments {ii}", moments=vae_moments)
            )
            ii += 1
        else:
            out_images.append(
                _check_image(images[ii], cfg.latent_downsample, cfg.max_latent_size, cfg.vae.in_channels,
                             where, f"image {ii}", image_dtype)
            )
            ii += 1
    return plan, out_texts, out_images


def sample_sizes(sample: dict, cfg: BagelConfig, *, index: int = 0, vae_moments: str | None = None) -> SampleSizes:
    """Exact capacities one sample needs when nothing is dropped (for budgets and loader packing).
    `index` only names the sample in error messages; `vae_moments`: its VAE items are posterior moments
    of that dtype (sizes are then those of the images they encode)."""
    plan, texts, images = _validate_sample(index, sample, cfg, _images_dtype(sample, vae_moments), vae_moments)
    text = vit = vae = n_vae = 0
    hmax = wmax = 0
    ti = ii = 0
    for item in plan:
        if item["type"] == _TEXT:
            text += len(texts[ti]) + 2
            ti += 1
            continue
        img = images[ii]
        ii += 1
        text += 2
        _, H, W = img.shape
        if item["type"] == _VIT:
            p = cfg.vit.patch_size
            vit += (H // p) * (W // p)
        else:
            H, W = vae_pixel_size(H, W, cfg, vae_moments is not None)
            d = cfg.latent_downsample
            vae += (H // d) * (W // d)
            n_vae += 1
            hmax, wmax = max(hmax, H), max(wmax, W)
    return SampleSizes(text, vit, vae, n_vae, (hmax, wmax))


def budget_for(samples: Sequence[dict], cfg: BagelConfig, *, slack: int = 0, round_to: int = 1) -> PackBudget:
    """The smallest budget holding `samples` without dropout, plus `slack` tokens per segment, each token
    capacity rounded up to a multiple of `round_to`."""
    sizes = [sample_sizes(s, cfg, index=i) for i, s in enumerate(samples)]

    def cap(n):
        n += slack
        return -(-n // round_to) * round_to

    return PackBudget(
        text_tokens=cap(sum(s.text_tokens for s in sizes)),
        vit_tokens=cap(sum(s.vit_tokens for s in sizes)),
        vae_tokens=cap(sum(s.vae_tokens for s in sizes)),
        vae_images=sum(s.vae_images for s in sizes),
        vae_image_size=(max([s.vae_image_size[0] for s in sizes], default=0),
                        max([s.vae_image_size[1] for s in sizes], default=0)),
    )


# ---------------------------------------------------------------------------------------------- packing


def pack_samples(
    samples: Sequence[dict],
    cfg: BagelConfig,
    budget: PackBudget,
    *,
    rng: np.random.Generator,
    text_dropout: float = 0.0,
    vit_dropout: float = 0.0,
    vae_dropout: float = 0.0,
    timestep_fn: Callable[[], float] | None = None,
    image_dtype: str | None = None,
    out: PackedBatch | None = None,
    out_index: int = 0,
    vae_moments: str | None = None,
) -> PackedBatch:
    """Pack official-format samples into one `PackedBatch` laid out as text | vit | vae segments.

    Mirrors `PackedDataset.pack_sequence`: one dropout draw (`rng.random()`) per plan item with
    `enable_cfg == 1`; one raw timestep per noisy VAE image (`timestep_fn()`, default
    `rng.standard_normal()`). The caller's lists are not modified.

    image_dtype: "float32" (default): `vae_images` / `vit_patches` hold [-1, 1] floats; float images are
    copied as they are, uint8 images are normalised exactly as the official ToTensor + Normalize.
    "uint8": the images must be uint8 pixels, copied as they are (4x fewer bytes to copy and transfer);
    `normalize_images` gives the float32 arrays on device.
    out / out_index: write the pack into row `out_index` of a stacked batch from `allocate_packs` (whose
    image arrays must still be zero there; every other field of the row is overwritten) instead of
    allocating one; returns that row (views) and sets `out.num_tokens[out_index]` / `num_samples`.
    `image_dtype` defaults to the dtype of `out`.
    vae_moments: the samples' VAE items are precomputed posterior moments [2z, h, w] of this dtype
    (`MOMENT_DTYPES`), packed into `vae_moments` canvases instead of `vae_images` (see the module
    docstring); with `out`, defaults to out's canvases.
    """
    if image_dtype is None:
        image_dtype = "float32" if out is None else str(out.vit_patches.dtype)
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype={image_dtype!r}: expected one of {IMAGE_DTYPES}")
    if vae_moments is None and out is not None and out.vae_moments is not None:
        vae_moments = str(out.vae_moments.dtype)
    if vae_moments is not None:
        moments_dtype(vae_moments)  # validates the name
    if out is not None:
        _check_out(out, budget, cfg, image_dtype, vae_moments)
        if not 0 <= out_index < out.sample_id.shape[0]:
            raise IndexError(f"pack_samples: out_index={out_index} outside the {out.sample_id.shape[0]} packs of out")
    ds = cfg.latent_downsample
    p = cfg.vit.patch_size
    Hmax, Wmax = budget.vae_image_size
    if Hmax % ds or Wmax % ds:
        raise ValueError(f"PackBudget.vae_image_size={budget.vae_image_size} must be multiples of {ds}")
    st = cfg.special_tokens
    draw_t = timestep_fn if timestep_fn is not None else rng.standard_normal

    # chunks of per-segment columns, in official order
    text_cols: dict[str, list] = {k: [] for k in ("ids", "labels", "w", "sample", "split", "mode", "order", "pos")}
    vit_cols: dict[str, list] = {k: [] for k in ("posid", "img", "sample", "split", "order", "pos")}
    vit_imgs: list[tuple[np.ndarray, int, int]] = []  # (image [C, H, W], gh, gw), patchified at the end
    vae_cols: dict[str, list] = {k: [] for k in ("img", "hw", "posid", "t", "mse", "sample", "split", "mode",
                                                 "order", "pos")}
    vae_imgs: list[np.ndarray] = []
    n_text = n_vit = n_vae = 0
    curr = 0  # official packed index
    split = 0
    vit_img = 0

    def add_text(ids, labels, weights, s, sp, mode, order, pos):
        nonlocal n_text
        n = len(ids)
        text_cols["ids"].append(np.asarray(ids, np.int32))
        text_cols["labels"].append(np.asarray(labels, np.int32))
        text_cols["w"].append(np.asarray(weights, np.float32))
        text_cols["sample"].append(np.full(n, s, np.int32))
        text_cols["split"].append(np.full(n, sp, np.int32))
        text_cols["mode"].append(np.full(n, mode, np.int32))
        text_cols["order"].append(np.asarray(order, np.int32))
        text_cols["pos"].append(np.asarray(pos, np.int32))
        n_text += n

    for si, sample in enumerate(samples):
        name = _sample_name(si, sample)
        plan, texts, images = _validate_sample(si, sample, cfg, image_dtype, vae_moments)
        rope = 0
        for k, item in enumerate(plan):
            typ = item["type"]
            cfg_item = item.get("enable_cfg", 0) == 1
            loss = item.get("loss", 0) == 1
            stl = item.get("special_token_loss", 0) == 1
            stlab = int(item["special_token_label"]) if stl else -1
            if typ == _TEXT:
                ids = texts.pop(0)
                if cfg_item and rng.random() < text_dropout:
                    continue
                n = len(ids) + 2
                toks = np.concatenate([[st.bos_token_id], ids, [st.eos_token_id]])
                labels = np.full(n, -1, np.int64)
                weights = np.zeros(n, np.float64)
                if loss:
                    labels[: n - 1] = np.concatenate([ids, [st.eos_token_id]])
                    weights[: n - 1] = _len2weight(len(ids) + 1)
                if stl:
                    labels[n - 1] = stlab
                    weights[n - 1] = 1.0
                add_text(toks, labels, weights, si, split, CAUSAL, np.arange(curr, curr + n),
                         np.arange(rope, rope + n))
                curr += n
                rope += n
                split += 1
                continue

            img = images.pop(0)
            if typ == _VIT:
                if cfg_item and rng.random() < vit_dropout:
                    rope += 1
                    continue
                _, H, W = img.shape
                gh, gw = H // p, W // p
                N = gh * gw
                mode = FULL
            else:
                if cfg_item and rng.random() < vae_dropout:
                    rope += 1
                    continue
                H, W = vae_pixel_size(img.shape[1], img.shape[2], cfg, vae_moments is not None)
                if H > Hmax or W > Wmax:
                    raise PackOverflowError(
                        f"{name}, plan item {k} (vae_image): image {H}x{W} exceeds vae_image_size {Hmax}x{Wmax}"
                    )
                gh, gw = H // ds, W // ds
                N = gh * gw
                mode = NOISE if loss else FULL
            # start marker, N image tokens, end marker: one split, one RoPE position
            add_text([st.start_of_image], [-1], [0.0], si, split, mode, [curr], [rope])
            body = np.arange(curr + 1, curr + 1 + N)
            end_lab, end_w = (stlab, 1.0) if stl else (-1, 0.0)
            add_text([st.end_of_image], [end_lab], [end_w], si, split, mode, [curr + 1 + N], [rope])
            if typ == _VIT:
                vit_imgs.append((img, gh, gw))
                vit_cols["posid"].append(_grid_pos_ids(gh, gw, cfg.vit_max_num_patch_per_side))
                vit_cols["img"].append(np.full(N, vit_img, np.int32))
                vit_cols["sample"].append(np.full(N, si, np.int32))
                vit_cols["split"].append(np.full(N, split, np.int32))
                vit_cols["order"].append(body)
                vit_cols["pos"].append(np.full(N, rope, np.int32))
                vit_img += 1
                n_vit += N
                rope += 1
            else:
                t = np.float32(draw_t()) if loss else np.float32(-np.inf)
                rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
                vae_cols["img"].append(np.full(N, len(vae_imgs), np.int32))
                vae_cols["hw"].append(np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1))
                vae_cols["posid"].append(_grid_pos_ids(gh, gw, cfg.max_latent_size))
                vae_cols["t"].append(np.full(N, t, np.float32))
                vae_cols["mse"].append(np.full(N, loss, bool))
                vae_cols["sample"].append(np.full(N, si, np.int32))
                vae_cols["split"].append(np.full(N, split, np.int32))
                vae_cols["mode"].append(np.full(N, mode, np.int32))
                vae_cols["order"].append(body)
                vae_cols["pos"].append(np.full(N, rope, np.int32))
                vae_imgs.append(img)
                n_vae += N
                if not loss:
                    rope += 1
            curr += N + 2
            split += 1

        for what, used, capa in (
            ("text_tokens", n_text, budget.text_tokens),
            ("vit_tokens", n_vit, budget.vit_tokens),
            ("vae_tokens", n_vae, budget.vae_tokens),
            ("vae_images", len(vae_imgs), budget.vae_images),
        ):
            if used > capa:
                raise PackOverflowError(
                    f"{name} does not fit: the pack needs {used} {what} up to and including it, "
                    f"budget {what}={capa}"
                )

    num_tokens = curr
    Tc, Vc = budget.text_tokens, budget.vit_tokens
    L = budget.total_tokens
    if out is None:
        row = allocate_packs(budget, cfg, None, image_dtype=image_dtype, vae_moments=vae_moments)
    else:
        row = out.row(out_index)

    def put(dst, chunks, fill, dtype=None):
        """Real entries then padding into the preallocated `dst` (a view)."""
        n = 0
        for c in chunks:
            m = len(c)
            dst[n:n + m] = c
            n += m
        if n > len(dst):  # cannot happen: capacities were checked per sample
            raise PackOverflowError(f"internal: {n} entries for a segment of {len(dst)}")
        dst[n:] = fill

    segs = ((0, Tc), (Tc, Tc + Vc), (Tc + Vc, L))
    for (a, b), chunks in zip(segs, (text_cols["sample"], vit_cols["sample"], vae_cols["sample"])):
        put(row.sample_id[a:b], chunks, -1)
    for (a, b), chunks in zip(segs, (text_cols["split"], vit_cols["split"], vae_cols["split"])):
        put(row.split_id[a:b], chunks, -1)
    for (a, b), chunks in zip(segs, (text_cols["mode"], [np.full(n_vit, FULL, np.int32)], vae_cols["mode"])):
        put(row.split_mode[a:b], chunks, 0)
    for (a, b), chunks in zip(segs, (text_cols["pos"], vit_cols["pos"], vae_cols["pos"])):
        put(row.position_id[a:b], chunks, 0)
    for (a, b), chunks in zip(segs, (text_cols["order"], vit_cols["order"], vae_cols["order"])):
        put(row.order[a:b], chunks, -1)
    pad = row.sample_id < 0
    row.order[pad] = num_tokens + np.arange(int(pad.sum()), dtype=np.int32)

    put(row.text_ids, text_cols["ids"], 0)
    put(row.text_labels, text_cols["labels"], -1)
    put(row.text_ce_weight, text_cols["w"], 0.0)
    put(row.vit_pos_ids, vit_cols["posid"], 0)
    put(row.vit_image_id, vit_cols["img"], -1)
    put(row.vae_image_index, vae_cols["img"], -1)
    put(row.vae_token_hw, vae_cols["hw"], 0)
    put(row.latent_pos_ids, vae_cols["posid"], 0)
    put(row.timestep_raw, vae_cols["t"], -np.inf)
    put(row.mse_mask, vae_cols["mse"], False)

    # images: one copy each, straight into the (zeroed) output; padding is never touched
    Cv = cfg.vit.num_channels
    o = 0
    for img, gh, gw in vit_imgs:
        n = gh * gw
        # patchify (feature order kh, kw, c) as one strided copy
        row.vit_patches[o:o + n].reshape(gh, gw, p, p, Cv)[...] = img.reshape(Cv, gh, p, gw, p).transpose(1, 3, 2, 4, 0)
        o += n
    canvas = row.vae_images if vae_moments is None else row.vae_moments
    for i, img in enumerate(vae_imgs):
        _, H, W = img.shape
        canvas[i, :H, :W] = np.transpose(img, (1, 2, 0))
        row.vae_image_hw[i] = (H, W)
    row.vae_image_hw[len(vae_imgs):] = 0

    row.num_tokens = int(num_tokens)
    row.num_samples = len(samples)
    if out is not None:
        out.num_tokens[out_index] = row.num_tokens
        out.num_samples[out_index] = row.num_samples
    return row


def _field_specs(budget: PackBudget, cfg: BagelConfig, image_dtype: str, vae_moments: str | None = None) -> dict:
    """field -> (shape, dtype, padding fill) of one pack (the VAE canvas: `vae_images`, or `vae_moments`)."""
    Tc, Vc, Ac, L = budget.text_tokens, budget.vit_tokens, budget.vae_tokens, budget.total_tokens
    patch_dim = cfg.vit.patch_size ** 2 * cfg.vit.num_channels
    Hmax, Wmax = budget.vae_image_size
    img = np.dtype(image_dtype)
    i32, f32 = np.int32, np.float32
    if vae_moments is None:
        canvas = {"vae_images": ((budget.vae_images, Hmax, Wmax, cfg.vae.in_channels), img, 0)}
    else:
        f = cfg.vae.downsample
        canvas = {"vae_moments": ((budget.vae_images, Hmax // f, Wmax // f, 2 * cfg.vae.z_channels),
                                  moments_dtype(vae_moments), 0)}
    return {
        "sample_id": ((L,), i32, -1), "split_id": ((L,), i32, -1), "split_mode": ((L,), i32, 0),
        "order": ((L,), i32, None), "position_id": ((L,), i32, 0),
        "text_ids": ((Tc,), i32, 0), "text_labels": ((Tc,), i32, -1), "text_ce_weight": ((Tc,), f32, 0.0),
        "vit_patches": ((Vc, patch_dim), img, 0), "vit_pos_ids": ((Vc,), i32, 0), "vit_image_id": ((Vc,), i32, -1),
        "vae_image_index": ((Ac,), i32, -1), "vae_token_hw": ((Ac, 2), i32, 0), "latent_pos_ids": ((Ac,), i32, 0),
        "timestep_raw": ((Ac,), f32, -np.inf), "mse_mask": ((Ac,), bool, False),
        **canvas,
        "vae_image_hw": ((budget.vae_images, 2), i32, 0),
    }


def allocate_packs(budget: PackBudget, cfg: BagelConfig, n: int | None, *, image_dtype: str = "float32",
                   vae_moments: str | None = None) -> PackedBatch:
    """`n` empty packs stacked (leading axis n; `n=None`: one pack without the axis), every row equal to
    `pack_samples([], ...)`. The image arrays are `np.zeros` (pages the OS zero-fills lazily: the padding
    is never written). Fill rows with `pack_samples(..., out=batch, out_index=i)`. `vae_moments` (a
    `MOMENT_DTYPES` name): `vae_moments` canvases instead of `vae_images`."""
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype={image_dtype!r}: expected one of {IMAGE_DTYPES}")
    lead = () if n is None else (int(n),)
    fields = {}
    for k, (shape, dtype, fill) in _field_specs(budget, cfg, image_dtype, vae_moments).items():
        if k == "order":
            a = np.empty(lead + shape, dtype)
            a[...] = np.arange(shape[0], dtype=dtype)
        elif fill == 0 or fill is False:
            a = np.zeros(lead + shape, dtype)
        else:
            a = np.full(lead + shape, fill, dtype)
        fields[k] = a
    if n is None:
        return PackedBatch(**fields, num_tokens=0, num_samples=0)
    return PackedBatch(**fields, num_tokens=np.zeros(lead, np.int32), num_samples=np.zeros(lead, np.int32))


def _check_out(out: PackedBatch, budget: PackBudget, cfg: BagelConfig, image_dtype: str,
               vae_moments: str | None = None) -> None:
    specs = _field_specs(budget, cfg, image_dtype, vae_moments)
    n = out.sample_id.shape[0] if out.sample_id.ndim == 2 else None
    if n is None:
        raise ValueError("pack_samples(out=...) needs a stacked batch from allocate_packs(..., n)")
    for k, (shape, dtype, _) in specs.items():
        a = getattr(out, k)
        if a is None:
            raise ValueError(f"pack_samples(out=...): out has no {k!r} canvas (vae_moments={vae_moments!r})")
        if a.shape != (n, *shape) or a.dtype != dtype:
            raise ValueError(f"pack_samples(out=...): field {k!r} is {a.dtype}{list(a.shape)}, the budget and "
                             f"image_dtype={image_dtype!r} need {np.dtype(dtype)}{[n, *shape]}")


# ---------------------------------------------------------------------------------------------- views


def _check_single(batch: PackedBatch, fn: str) -> None:
    if batch.sample_id.ndim != 1:
        raise ValueError(f"{fn} takes one pack, not a stacked batch (sample_id shape {batch.sample_id.shape})")


def to_official(batch: PackedBatch) -> dict[str, Any]:
    """Rebuild the official `PackedDataset.to_tensor` arrays (numpy; int64 indices, float32 values).

    Components that the pack does not use are returned as empty arrays (the official omits them).
    For a `vae_moments` pack, `padded_images` holds the moments canvases [N, 2z, h, w] (cropped likewise).
    Extra keys: `split_lens`, `attn_modes` (the official flex-path lists, without the padding entry).
    """
    _check_single(batch, "to_official")
    T = batch.text_capacity
    vs, as_ = batch.vit_slice, batch.vae_slice
    n = int(batch.num_tokens)
    i64 = np.int64

    real = batch.sample_id >= 0
    pos = np.zeros(n, i64)
    pos[batch.order[real]] = batch.position_id[real]
    sample_lens = np.bincount(batch.sample_id[real], minlength=int(batch.num_samples)).astype(i64)

    # text
    t_real = np.nonzero(batch.sample_id[:T] >= 0)[0]
    t_ord = batch.order[:T][t_real]
    t_sel = t_real[np.argsort(t_ord, kind="stable")]
    packed_text_ids = batch.text_ids[t_sel].astype(i64)
    packed_text_indexes = batch.order[:T][t_sel].astype(i64)
    ce_sel = t_sel[batch.text_labels[t_sel] >= 0]

    # vit
    v_sid, v_ord = batch.sample_id[vs], batch.order[vs]
    v_real = np.nonzero(v_sid >= 0)[0]
    v_sel = v_real[np.argsort(v_ord[v_real], kind="stable")]
    vit_ids = batch.vit_image_id[v_sel]
    n_vit_img = int(vit_ids.max()) + 1 if vit_ids.size else 0
    vit_token_seqlens = np.bincount(vit_ids, minlength=n_vit_img).astype(i64)

    # vae
    a_sid, a_ord = batch.sample_id[as_], batch.order[as_]
    a_real = np.nonzero(a_sid >= 0)[0]
    a_sel = a_real[np.argsort(a_ord[a_real], kind="stable")]
    a_img = batch.vae_image_index[a_sel]
    n_img = int(a_img.max()) + 1 if a_img.size else 0
    shapes = np.zeros((n_img, 2), i64)
    if n_img:
        np.maximum.at(shapes, a_img, batch.vae_token_hw[a_sel].astype(i64) + 1)
    hw = batch.vae_image_hw[:n_img]
    Hm, Wm = (int(hw[:, 0].max()), int(hw[:, 1].max())) if n_img else (0, 0)
    canvas = batch.vae_images if batch.vae_images is not None else batch.vae_moments
    padded_images = np.ascontiguousarray(np.transpose(canvas[:n_img, :Hm, :Wm], (0, 3, 1, 2)))
    mse_sel = a_sel[batch.mse_mask[a_sel]]

    # splits (official order)
    r_idx = np.nonzero(real)[0]
    r_idx = r_idx[np.argsort(batch.order[r_idx], kind="stable")]
    splits = batch.split_id[r_idx]
    boundaries = np.nonzero(np.diff(splits))[0] + 1
    starts = np.concatenate([[0], boundaries]) if len(splits) else np.zeros(0, int)
    split_lens = np.diff(np.concatenate([starts, [len(splits)]])).astype(i64) if len(splits) else np.zeros(0, i64)
    names = {CAUSAL: "causal", FULL: "full", NOISE: "noise"}
    attn_modes = [names[int(m)] for m in batch.split_mode[r_idx][starts]] if len(splits) else []

    return dict(
        sequence_length=n,
        sample_lens=sample_lens,
        packed_text_ids=packed_text_ids,
        packed_text_indexes=packed_text_indexes,
        packed_position_ids=pos,
        packed_vit_tokens=batch.vit_patches[v_sel],
        packed_vit_position_ids=batch.vit_pos_ids[v_sel].astype(i64),
        packed_vit_token_indexes=v_ord[v_sel].astype(i64),
        vit_token_seqlens=vit_token_seqlens,
        padded_images=padded_images,
        patchified_vae_latent_shapes=shapes,
        packed_latent_position_ids=batch.latent_pos_ids[a_sel].astype(i64),
        packed_vae_token_indexes=a_ord[a_sel].astype(i64),
        packed_timesteps=batch.timestep_raw[a_sel],
        mse_loss_indexes=a_ord[mse_sel].astype(i64),
        packed_label_ids=batch.text_labels[ce_sel].astype(i64),
        ce_loss_indexes=batch.order[:T][ce_sel].astype(i64),
        ce_loss_weights=batch.text_ce_weight[ce_sel],
        split_lens=split_lens,
        attn_modes=attn_modes,
    )


def attention_masks(batch: PackedBatch) -> list[np.ndarray]:
    """Per-sample boolean masks [len_i, len_i] in official order, from `mask_from_meta` on the batch
    metadata (the same function the model uses)."""
    import jax.numpy as jnp

    from echo4o_jax.model.attention import TokenMeta, mask_from_meta

    _check_single(batch, "attention_masks")
    out = []
    for s in range(int(batch.num_samples)):
        idx = np.nonzero(batch.sample_id == s)[0]
        idx = idx[np.argsort(batch.order[idx], kind="stable")]
        meta = TokenMeta(*(jnp.asarray(a[idx]) for a in (batch.sample_id, batch.split_id, batch.split_mode,
                                                         batch.order)))
        out.append(np.asarray(mask_from_meta(meta, meta)))
    return out


def dense_attention_mask(batch: PackedBatch) -> np.ndarray:
    """The [L, L] mask over the whole token array, in slot (segment) order, from `mask_from_meta`."""
    import jax.numpy as jnp

    from echo4o_jax.model.attention import TokenMeta, mask_from_meta

    _check_single(batch, "dense_attention_mask")
    meta = TokenMeta(*(jnp.asarray(a) for a in batch.token_meta()))
    return np.asarray(mask_from_meta(meta, meta))


def batch_arrays(batch: PackedBatch) -> dict[str, np.ndarray]:
    """Every array field (plus `num_tokens` / `num_samples` as int32 arrays), for jit / device_put."""
    d = {k: getattr(batch, k) for k in _present_fields(batch)}
    d["num_tokens"] = np.asarray(batch.num_tokens, np.int32)
    d["num_samples"] = np.asarray(batch.num_samples, np.int32)
    return d


def stack_batches(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Stack packs built with the same budget into one PackedBatch with a leading batch axis."""
    if not batches:
        raise ValueError("stack_batches needs at least one PackedBatch")
    fields = {}
    for k in _present_fields(batches[0]):
        arrs = [getattr(b, k) for b in batches]
        if any(a is None for a in arrs):
            raise ValueError(f"stack_batches: field {k!r} is missing from some packs (vae_images vs vae_moments?)")
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"stack_batches: field {k!r} has different shapes {sorted(shapes)} (different budgets?)")
        fields[k] = np.stack(arrs)
    fields["num_tokens"] = np.asarray([b.num_tokens for b in batches], np.int32)
    fields["num_samples"] = np.asarray([b.num_samples for b in batches], np.int32)
    return PackedBatch(**fields)
