"""Inference with a KV cache: context building, Euler flow sampler with 3-branch CFG, text decoding.

The semantics are those of the official `InterleaveInferencer.interleave_inference`:

* a context is a static-capacity KV cache (keys after q/k-norm and RoPE) + its length + next RoPE
  position; text appends `[bos] ids [eos]` (causal, und expert, one position per token); a ViT image
  appends `[soi] vit [eoi]` (full, und, one position, then +1); a clean VAE image appends
  `[soi] latents(t=0) [eoi]` (full, markers und / latents gen, one position, then +1);
* image generation: query block `[soi] x_t [eoi]` at the branch's position, bidirectional over the
  cache + itself, cache not updated; Euler from t=1 to 0 on the shifted schedule; CFG with the
  text-uncond (context before the last text item) and image-uncond (text only) branches, active for
  `cfg_interval[0] < t <= cfg_interval[1]`, renorm `global` / `channel` / `text_channel`;
* text: start token `<|im_start|>`, then greedy or temperature sampling until `<|im_end|>` or
  `max_length` tokens (the start token included), as the official `generate_text`.

All step functions are jitted with static shapes (the cache capacity is fixed per `Inferencer`; the sampler's
copies of the caches are cut to the contexts' length rounded up to `SAMPLER_CACHE_BUCKET`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from .config import BagelConfig
from .image_transform import ImageTransform, from_unit_range
from .model.attention import CAUSAL, FULL, TokenMeta
from .model.bagel import Bagel, latent_tokens_from_latents, tokens_to_latent
from .model.layers import dtype_of
from .model.qwen2_mot import KVCache
from .model.vae import AutoEncoder
from .sampling_defaults import VAE_POSTERIORS

__all__ = ["Context", "Inferencer", "timestep_schedule", "answer_ids", "cfg_branches", "cfg_combine",
           "CFG_RENORM_TYPES"]

CFG_RENORM_TYPES = ("global", "channel", "text_channel")
class ContextOverflow(ValueError):
    """What is added to a context does not fit its KV cache (max_context)."""


TEXT_BUCKET = 32  # text prefills are padded to a multiple of this (one compilation per bucket, not per length)
SAMPLER_CACHE_BUCKET = 512  # the sampler's caches are cut to the contexts' length rounded up to this
DECODE_BUCKET = 256  # the decoding loop's token buffer: max_length rounded up to this (one compilation per bucket)
_QUERY_ORDER = 1 << 29  # query blocks come after every cached token


@dataclasses.dataclass(frozen=True)
class Context:
    cache: KVCache
    kv_len: int
    rope: int
    n_splits: int


def timestep_schedule(num_timesteps: int, shift: float) -> np.ndarray:
    """float32 linspace(1, 0, n) then shift, as the official sampler."""
    t = np.linspace(1.0, 0.0, num_timesteps, dtype=np.float64).astype(np.float32)
    s = np.float32(shift)
    return (s * t / (np.float32(1.0) + (s - np.float32(1.0)) * t)).astype(np.float32)


def answer_ids(text_ids: Sequence[int], bos: int) -> list[int]:
    """The text of `Inferencer.generate_text`'s ids ([start token, generated...]): the generated ids up to a
    generated start token `<|im_start|>`, where the official `gen_text` cuts its decoded string
    (`split('<|im_end|>')[0].split('<|im_start|>')[1]`; an `<|im_end|>` ends the generation already)."""
    out = list(text_ids[1:])
    return out[:out.index(bos)] if bos in out else out


def cfg_branches(text_scale: float, img_scale: float) -> tuple[bool, bool]:
    """Which guidance terms the official `_forward_flow` applies at these scales (decided on the host, so that
    the scale values themselves can be traced: a new value does not compile a new sampler step): text guidance
    when text_scale > 1; image guidance on top of it when img_scale > 1."""
    use_text = float(text_scale) > 1.0
    return use_text, use_text and float(img_scale) > 1.0


def cfg_combine(v_c, v_t, v_i, *, text_scale, img_scale, renorm_type: str, renorm_min):
    """Official `_forward_flow` guidance. `v_t` / `v_i` are None for a term `cfg_branches` leaves out (v_i is
    ignored without v_t); the scales and renorm_min may be traced scalars."""
    if v_t is None:
        return v_c
    v_text_ = v_t + text_scale * (v_c - v_t)
    if renorm_type == "text_channel":
        scale = jnp.linalg.norm(v_c, axis=-1, keepdims=True) / (jnp.linalg.norm(v_text_, axis=-1, keepdims=True) + 1e-8)
        v_text = v_text_ * jnp.clip(scale, renorm_min, 1.0)
        return v_i + img_scale * (v_text - v_i) if v_i is not None else v_text
    v_ = v_i + img_scale * (v_text_ - v_i) if v_i is not None else v_text_
    if renorm_type == "global":
        n_c, n_ = jnp.linalg.norm(v_c), jnp.linalg.norm(v_)
    elif renorm_type == "channel":
        n_c, n_ = jnp.linalg.norm(v_c, axis=-1, keepdims=True), jnp.linalg.norm(v_, axis=-1, keepdims=True)
    else:
        raise ValueError(f"cfg_renorm_type={renorm_type!r}; expected one of {CFG_RENORM_TYPES}")
    return v_ * jnp.clip(n_c / (n_ + 1e-8), renorm_min, 1.0)


def _meta(n: int, split: int, mode: int, order0) -> TokenMeta:
    return TokenMeta(jnp.zeros((n,), jnp.int32), jnp.full((n,), split, jnp.int32),
                     jnp.full((n,), mode, jnp.int32), order0 + jnp.arange(n, dtype=jnp.int32))


class Inferencer:
    """Generation / understanding with a loaded `Bagel` and `AutoEncoder`."""

    def __init__(self, model: Bagel, vae: AutoEncoder | None, *, max_context: int = 4096,
                 vae_transform: ImageTransform | None = None, vit_transform: ImageTransform | None = None,
                 text_bucket: int = TEXT_BUCKET, retokenize: Callable[[list[int]], list[int]] | None = None):
        self.cfg: BagelConfig = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.vae = vae
        if vae is not None:
            self.vae_graphdef, self.vae_state = nnx.split(vae)
        self.max_context = max_context
        self.vae_transform = vae_transform or ImageTransform.vae_default()
        self.vit_transform = vit_transform or ImageTransform.vit_default()
        self.text_bucket = text_bucket
        # the official feeds a think text back as its decoded string encoded again (`update_context_text`): with a
        # tokenizer, `retokenize` (decode then encode) does the same; without, the generated ids go back as they are
        self.retokenize = retokenize
        self.dtype = dtype_of(self.cfg.compute_dtype)
        tok = self.cfg.special_tokens
        self.bos, self.eos, self.soi, self.eoi = tok.bos_token_id, tok.eos_token_id, tok.start_of_image, tok.end_of_image

    # ------------------------------------------------------------------ contexts
    def new_context(self) -> Context:
        model = nnx.merge(self.graphdef, self.state)
        return Context(model.llm.empty_cache(self.max_context, self.dtype), 0, 0, 0)

    def _check_room(self, ctx: Context, n: int, what: str):
        if ctx.kv_len + n > self.max_context:
            raise ContextOverflow(f"context overflow while adding {what}: {ctx.kv_len} + {n} tokens > max_context={self.max_context}")

    def add_text(self, ctx: Context, ids: Sequence[int]) -> Context:
        ids = [self.bos, *[int(i) for i in ids], self.eos]
        n = len(ids)
        padded = -(-n // self.text_bucket) * self.text_bucket  # one compilation per bucket, not per length
        self._check_room(ctx, padded, "text")
        arr = np.zeros((padded,), np.int32)
        arr[:n] = ids
        cache = _append_text(self.graphdef, self.state, ctx.cache, jnp.asarray(arr), jnp.int32(n),
                             jnp.int32(ctx.rope), jnp.int32(ctx.kv_len), jnp.int32(ctx.n_splits))
        return Context(cache, ctx.kv_len + n, ctx.rope + n, ctx.n_splits + 1)

    def add_vit_image(self, ctx: Context, image: Image.Image) -> Context:
        pixels = self.vit_transform(image)  # [H, W, 3]
        p = self.cfg.vit.patch_size
        H, W, C = pixels.shape
        side = self.cfg.vit_max_num_patch_per_side
        if H // p > side or W // p > side:
            raise ValueError(f"ViT image {H}x{W} has a {H // p}x{W // p} patch grid; the model's position table "
                             f"allows at most {side} per side ({side * p} px): lower the ViT transform's max size")
        patches = pixels.reshape(H // p, p, W // p, p, C).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * C)
        rows, cols = np.divmod(np.arange((H // p) * (W // p)), W // p)
        pos = rows * self.cfg.vit_max_num_patch_per_side + cols
        n = patches.shape[0] + 2
        self._check_room(ctx, n, "a ViT image")
        cache = _append_vit(self.graphdef, self.state, ctx.cache, jnp.asarray(patches), jnp.asarray(pos, jnp.int32),
                            jnp.int32(ctx.rope), jnp.int32(ctx.kv_len), jnp.int32(ctx.n_splits), self.soi, self.eoi)
        return Context(cache, ctx.kv_len + n, ctx.rope + 1, ctx.n_splits + 1)

    def encode_latent_tokens(self, pixels: np.ndarray, rng: jax.Array | None = None) -> tuple[jax.Array, int, int]:
        """[H, W, 3] in [-1, 1] (multiples of the latent stride) -> clean latent tokens [h*w, p*p*z]: the VAE
        posterior sampled with `rng` (the official), or its mean without."""
        if self.vae is None:
            raise ValueError("this Inferencer has no VAE: image inputs for generation need one")
        H, W, _ = pixels.shape
        ds = self.cfg.latent_downsample
        if H % ds or W % ds:
            raise ValueError(f"VAE image size {H}x{W} is not a multiple of {ds}")
        h, w = H // ds, W // ds
        self._check_latent_grid(h, w, f"VAE image {H}x{W}")
        lat = _vae_encode(self.vae_graphdef, self.vae_state, jnp.asarray(pixels)[None], rng is not None, rng)
        rows, cols = np.divmod(np.arange(h * w), w)
        tokens = latent_tokens_from_latents(lat, jnp.zeros((h * w,), jnp.int32),
                                            jnp.asarray(np.stack([rows, cols], 1), jnp.int32), self.cfg.latent_patch_size)
        return tokens, h, w

    def add_vae_image(self, ctx: Context, image: Image.Image, rng: jax.Array | None = None) -> Context:
        pixels = self.vae_transform(image)
        tokens, h, w = self.encode_latent_tokens(pixels, rng)
        n = h * w + 2
        self._check_room(ctx, n, "a VAE image")
        cache = _append_vae(self.graphdef, self.state, ctx.cache, tokens, self._latent_pos(h, w),
                            jnp.int32(ctx.rope), jnp.int32(ctx.kv_len), jnp.int32(ctx.n_splits), self.soi, self.eoi)
        return Context(cache, ctx.kv_len + n, ctx.rope + 1, ctx.n_splits + 1)

    def _check_latent_grid(self, h: int, w: int, what: str):
        m = self.cfg.max_latent_size
        if h > m or w > m:
            raise ValueError(f"{what} has a {h}x{w} latent grid; the model's latent position table allows at most "
                             f"{m} per side ({m * self.cfg.latent_downsample} px)")

    def _latent_pos(self, h: int, w: int) -> jax.Array:
        rows, cols = np.divmod(np.arange(h * w), w)
        return jnp.asarray(rows * self.cfg.max_latent_size + cols, jnp.int32)

    # ------------------------------------------------------------------ image generation
    def generate_image_latent(self, ctx: Context, cfg_text_ctx: Context, cfg_img_ctx: Context,
                              image_shape: tuple[int, int], *, init_noise=None, rng: jax.Array | None = None,
                              return_velocities: bool = False, **kw):
        """Final latent tokens [h*w, C] (or [images, h*w, C] when init_noise has a leading images axis),
        and the guided velocity of each step with `return_velocities`."""
        H, W = image_shape
        ds = self.cfg.latent_downsample
        shape = ((H // ds) * (W // ds), self.cfg.patch_latent_dim)
        if init_noise is None:
            if rng is None:
                raise ValueError("generate_image_latent needs init_noise or rng")
            init_noise = jax.random.normal(rng, shape, jnp.float32)
        x = jnp.asarray(init_noise, jnp.float32)
        batched = x.ndim == 3  # [images, tokens, C]: several images of one context in one pass
        if x.shape[-2:] != shape or x.ndim not in (2, 3):
            raise ValueError(f"init_noise shape {x.shape}, expected {shape} or (num_images, *{shape})")
        res = self.generate_image_latents([(ctx, cfg_text_ctx, cfg_img_ctx)], image_shape,
                                          (x if batched else x[None])[None], return_velocities=return_velocities, **kw)
        lat, vels = res if return_velocities else (res, None)
        lat = lat[0] if batched else lat[0, 0]
        if not return_velocities:
            return lat
        return lat, (vels[0] if batched else vels[0, 0])

    def generate_image_latents(
        self, contexts: Sequence[tuple[Context, Context, Context]], image_shape: tuple[int, int], init_noise, *,
        cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.5, cfg_interval=(0.4, 1.0),
        cfg_renorm_min: float = 0.0, cfg_renorm_type: str = "global", num_timesteps: int = 50,
        timestep_shift: float = 3.0, return_velocities: bool = False,
    ):
        """Several requests of one shape in one sampler pass: `contexts` = [(cond, text-uncond, image-uncond)]
        per request, init_noise [requests, images, h*w, C]. Returns latents [requests, images, h*w, C]
        (and velocities [requests, images, steps, h*w, C]). When every request's image-uncond context is its
        cond context (the same object: text-to-image, `build_contexts`), the cond velocity stands for the
        image-uncond one: 2 branches are run, not 3 (the official runs the third, identical one)."""
        if cfg_renorm_type not in CFG_RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type={cfg_renorm_type!r}; expected one of {CFG_RENORM_TYPES}")
        H, W = image_shape
        ds = self.cfg.latent_downsample
        if H % ds or W % ds:
            raise ValueError(f"image_shape {H}x{W} is not a multiple of {ds}")
        h, w = H // ds, W // ds
        self._check_latent_grid(h, w, f"image_shape {H}x{W}")
        x = jnp.asarray(init_noise, jnp.float32)
        want = (len(contexts), h * w, self.cfg.patch_latent_dim)
        if x.ndim != 4 or (x.shape[0], *x.shape[2:]) != want:
            raise ValueError(f"init_noise shape {x.shape}, expected ({want[0]}, images, {want[1]}, {want[2]})")
        img_is_cond = all(triple[2] is triple[0] for triple in contexts)
        ts = timestep_schedule(num_timesteps, timestep_shift)
        guided = cfg_branches(cfg_text_scale, cfg_img_scale)
        active = [cfg_interval[0] < t <= cfg_interval[1] for t in ts[:-1]]
        # branches the guided steps run: the image-uncond cache is stacked only when it is used and is not the cond
        # one again; the sampler's caches are cut to the contexts' length (bucketed), not max_context: the copy
        # below and every step's attention then cover the real context (a few hundred slots for a prompt), not
        # thousands of empty ones
        nb_guided = 1 if not (guided[0] and any(active)) else 3 if guided[1] and not img_is_cond else 2
        used = max(c.kv_len for triple in contexts for c in triple[:nb_guided])
        cap = min(self.max_context, -(-max(used, 1) // SAMPLER_CACHE_BUCKET) * SAMPLER_CACHE_BUCKET)
        stacked = jax.tree.map(lambda *a: jnp.stack(a).reshape(len(contexts), nb_guided, *a[0].shape),
                               *[_cut_cache(c.cache, cap) for triple in contexts for c in triple[:nb_guided]])
        ropes = jnp.asarray([[c.rope for c in triple[:nb_guided]] for triple in contexts], jnp.int32)
        branches = {nb_guided: (stacked, ropes)}  # (the cond branch alone for the unguided steps: sliced once)
        if nb_guided > 1:
            branches[1] = jax.tree.map(lambda a: a[:, :1], branches[nb_guided])
        lat_pos = self._latent_pos(h, w)
        scales = jnp.asarray([cfg_text_scale, cfg_img_scale, cfg_renorm_min], jnp.float32)  # (traced: no recompile)
        vels = []
        for i in range(num_timesteps - 1):
            t = ts[i]
            use_txt, use_img = guided if active[i] else (False, False)
            caches, rp = branches[nb_guided if use_txt else 1]
            v = _guided_velocity(self.graphdef, self.state, caches, rp, x, jnp.float32(t), lat_pos, self.soi,
                                 self.eoi, scales, cfg_renorm_type, img_is_cond, use_img)
            x = x - v * (ts[i] - ts[i + 1])
            if return_velocities:
                vels.append(v)
        return (x, jnp.stack(vels, axis=2)) if return_velocities else x

    def decode_latent(self, tokens: jax.Array, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Latent tokens [h*w, C] (or [images, h*w, C]) -> (decoded [(images,) H, W, 3] float in [-1, 1],
        uint8 picture(s))."""
        if self.vae is None:
            raise ValueError("this Inferencer has no VAE")
        H, W = image_shape
        ds = self.cfg.latent_downsample
        batched = tokens.ndim == 3
        toks = tokens if batched else tokens[None]
        z = jax.vmap(lambda t: tokens_to_latent(t, H // ds, W // ds, self.cfg.latent_patch_size,
                                                self.cfg.latent_channels))(toks)
        dec = np.asarray(_vae_decode(self.vae_graphdef, self.vae_state, z))
        dec = dec if batched else dec[0]
        return dec, from_unit_range(dec)

    # ------------------------------------------------------------------ text generation
    def generate_text(self, ctx: Context, *, max_length: int, do_sample: bool = False, temperature: float = 1.0,
                      rng: jax.Array | None = None) -> list[int]:
        """Official `generate_text`: returns [start token, generated...], at most `max_length` ids,
        stopping before an `<|im_end|>` prediction."""
        if do_sample and rng is None:
            raise ValueError("do_sample=True needs rng")
        if do_sample and not temperature > 0:  # (logits / 0: the official's softmax gives NaN and sampling fails)
            raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature}")
        # the whole loop runs on the device (`_decode_loop`: one dispatch, the cache updated in place; it was a
        # dispatch, a host sync and a copy of the cache per token); it stops at max_length, at an <|im_end|>
        # prediction, or where the context is full (then, as each token is checked for room, an error)
        room = self.max_context - ctx.kv_len
        ids, n, ended = _decode_loop(self.graphdef, self.state, ctx.cache, jnp.int32(ctx.rope), jnp.int32(ctx.kv_len),
                                     jnp.int32(ctx.n_splits), jnp.int32(max(0, min(max_length, room))),
                                     jnp.int32(self.bos), jnp.int32(self.eos), jnp.float32(temperature), rng,
                                     -(-max(max_length, 1) // DECODE_BUCKET) * DECODE_BUCKET, do_sample)
        out = np.asarray(ids)[:int(n)].tolist()
        if room < max_length and not bool(ended):
            self._check_room(Context(ctx.cache, ctx.kv_len + len(out), 0, 0), 1, "a generated token")
        return out

    # ------------------------------------------------------------------ interleaved
    def interleave_inference(
        self, inputs: Sequence[Any], *, understanding_output: bool = False, think: bool = False,
        system_prompt_ids: Sequence[int] | None = None, max_think_token_n: int = 1000, do_sample: bool = False,
        text_temperature: float = 0.3, image_shapes: tuple[int, int] = (1024, 1024), init_noise=None,
        rng: jax.Array | None = None, return_velocities: bool = False, output_shape: tuple[int, int] | None = None,
        vae_posterior: str = "sample", **gen_kwargs,
    ) -> dict[str, Any]:
        """`inputs`: token-id lists (text) and PIL images, in order. Returns a dict with `text_ids`
        (understanding / thinking output), and for generation `latent`, `decoded`, `image` (uint8).
        As the official code, the output shape is `image_shapes` unless an input image came last-most
        (then its VAE-resized shape); `output_shape` overrides both."""
        # the contexts' draws (text sampling, VAE posteriors) from a key folded off `rng`: the initial noise takes
        # `rng` itself (a key split for the text and used again for the noise gave correlated draws)
        ctx = self.build_contexts(inputs, understanding_output=understanding_output, think=think,
                                  system_prompt_ids=system_prompt_ids, max_think_token_n=max_think_token_n,
                                  do_sample=do_sample, text_temperature=text_temperature,
                                  image_shapes=image_shapes, rng=None if rng is None else jax.random.fold_in(rng, 1),
                                  vae_posterior=vae_posterior)
        out: dict[str, Any] = {k: ctx[k] for k in ("text_ids",) if k in ctx}
        if understanding_output:
            return out
        image_shapes = output_shape if output_shape is not None else ctx["image_shapes"]
        res = self.generate_image_latent(ctx["gen"], ctx["cfg_text"], ctx["cfg_img"], tuple(image_shapes),
                                         init_noise=init_noise, rng=rng, return_velocities=return_velocities,
                                         **gen_kwargs)
        latent, vels = res if return_velocities else (res, None)
        decoded, image = self.decode_latent(latent, tuple(image_shapes))
        out.update(latent=latent, decoded=decoded, image=image)
        if vels is not None:
            out["velocities"] = vels
        return out

    def build_contexts(
        self, inputs: Sequence[Any], *, understanding_output: bool = False, think: bool = False,
        system_prompt_ids: Sequence[int] | None = None, max_think_token_n: int = 1000, do_sample: bool = False,
        text_temperature: float = 0.3, image_shapes: tuple[int, int] = (1024, 1024), rng: jax.Array | None = None,
        vae_posterior: str = "sample",
    ) -> dict[str, Any]:
        """The official context building of `interleave_inference`: returns the cond (`gen`), text-uncond
        (`cfg_text`) and image-uncond (`cfg_img`) contexts, the output `image_shapes`, and `text_ids` when
        text was generated (understanding answer, or the think-mode reasoning appended to `gen`).
        `vae_posterior` (`sampling_defaults.VAE_POSTERIORS`): input images are VAE-encoded as a posterior sample
        (the official; image k's draw from `fold_in(rng, k)`: rng needed) or at its mean."""
        if think and system_prompt_ids is None:
            raise ValueError("think=True needs system_prompt_ids (the tokenized think system prompt)")
        if vae_posterior not in VAE_POSTERIORS:
            raise ValueError(f"vae_posterior={vae_posterior!r}; expected one of {VAE_POSTERIORS}")
        vae_images = 0 if understanding_output else sum(isinstance(x, Image.Image) for x in inputs)
        if vae_posterior == "sample" and vae_images and rng is None:
            raise ValueError("vae_posterior='sample' (the official) draws the input images' VAE posterior: give rng "
                             "(a jax.random key), or vae_posterior='mean'")
        gen = cfg_text = cfg_img = self.new_context()
        n_vae = 0
        # until an image comes, the image-uncond context is the cond one: the same object (computed once; the
        # sampler then runs 2 branches, not 3 identical ones: `generate_image_latents`)
        if think:
            gen = cfg_img = self.add_text(gen, system_prompt_ids)
        for item in inputs:
            if isinstance(item, Image.Image):
                item = self.vae_transform.resize(item)
                if not understanding_output:
                    key = jax.random.fold_in(rng, n_vae) if vae_posterior == "sample" else None
                    gen = self.add_vae_image(gen, item, key)
                    n_vae += 1
                gen = self.add_vit_image(gen, item)
                image_shapes = (item.size[1], item.size[0])
                cfg_text = gen
            elif isinstance(item, (list, tuple, np.ndarray)):
                cfg_text, same = gen, cfg_img is gen
                gen = self.add_text(gen, item)
                cfg_img = gen if same else self.add_text(cfg_img, item)
            else:
                raise TypeError(f"unsupported input {type(item).__name__}: expected token ids or a PIL image")
        out: dict[str, Any] = dict(gen=gen, cfg_text=cfg_text, cfg_img=cfg_img, image_shapes=tuple(image_shapes))
        if understanding_output or think:
            ids = self.generate_text(gen, max_length=max_think_token_n, do_sample=do_sample,
                                     temperature=text_temperature, rng=rng)
            out["text_ids"] = ids
            if not understanding_output:
                think_ids = answer_ids(ids, self.bos)
                out["gen"] = self.add_text(gen, self.retokenize(think_ids) if self.retokenize else think_ids)
        return out


# ---------------------------------------------------------------------------- jitted kernels


def _cut_cache(cache: KVCache, capacity: int) -> KVCache:
    """The first `capacity` slots of a cache (read-only use: the sampler's branches)."""
    return KVCache(cache.k[:, :capacity], cache.v[:, :capacity], jax.tree.map(lambda a: a[:capacity], cache.meta))


def _write(cache: KVCache, kv, meta: TokenMeta, kv_len) -> KVCache:
    k, v = kv
    nk = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, kv_len, 0, 0))
    nv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, kv_len, 0, 0))
    nm = TokenMeta(*(jax.lax.dynamic_update_slice(c, m, (kv_len,)) for c, m in zip(cache.meta, meta)))
    return KVCache(nk, nv, nm)


def _run(model: Bagel, x, n_und, meta, positions, cache, *, return_kv, gen_mode: bool = False):
    """The language model over the query tokens `x` with the cache as context. `gen_mode`: the official
    `forward_inference(mode="gen")` calls (a VAE image's context update, the sampler's velocity), which
    normalise and rotate queries and keys in float32 (`Qwen2MoT.__call__`'s `qk_float32`)."""
    c = model.cfg
    return model.llm(x, n_und, meta, positions, cache=cache, return_kv=return_kv,
                     attention_impl=c.attention_impl, block_q=c.attention_block_q, block_kv=c.attention_block_kv,
                     tuning=c.attention_tuning, chunk=c.attention_chunk, qk_float32=gen_mode)


@functools.partial(jax.jit, static_argnums=(0,))
def _append_text(graphdef, state, cache, ids, n_real, rope, kv_len, split):
    """ids padded to a bucket; the padding (sample -1) is written to the cache but never attended."""
    model = nnx.merge(graphdef, state)
    n = ids.shape[0]
    dt = dtype_of(model.cfg.compute_dtype)
    x = model.llm.embed_tokens(ids, dt)
    meta = _meta(n, split, CAUSAL, kv_len)
    meta = meta._replace(sample=jnp.where(jnp.arange(n) < n_real, 0, -1).astype(jnp.int32))
    _, kv = _run(model, x, n, meta, rope + jnp.arange(n, dtype=jnp.int32), cache, return_kv=True)
    return _write(cache, kv, meta, kv_len)


def _image_block(model: Bagel, body: jax.Array, soi: int, eoi: int, split, order0) -> tuple[jax.Array, TokenMeta]:
    """`[soi] body [eoi]` laid out [soi, eoi, body...] (markers first: und stream), one FULL split,
    `order` in official order (soi, body..., eoi) starting at order0."""
    n = body.shape[0]
    markers = model.llm.embed_tokens(jnp.asarray([soi, eoi], jnp.int32), body.dtype)
    order = order0 + jnp.concatenate([jnp.asarray([0, n + 1], jnp.int32), 1 + jnp.arange(n, dtype=jnp.int32)])
    meta = TokenMeta(jnp.zeros((n + 2,), jnp.int32), jnp.full((n + 2,), split, jnp.int32),
                     jnp.full((n + 2,), FULL, jnp.int32), order)
    return jnp.concatenate([markers, body]), meta


def _append_block(model: Bagel, cache, x, meta, n_und, rope, kv_len, gen_mode: bool = False):
    _, kv = _run(model, x, n_und, meta, jnp.full((x.shape[0],), rope, jnp.int32), cache, return_kv=True,
                 gen_mode=gen_mode)
    return _write(cache, kv, meta, kv_len)


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _append_vit(graphdef, state, cache, patches, pos_ids, rope, kv_len, split, soi, eoi):
    model = nnx.merge(graphdef, state)
    vit = model.embed_vit(patches, pos_ids, jnp.zeros((patches.shape[0],), jnp.int32))
    x, meta = _image_block(model, vit, soi, eoi, split, kv_len)
    return _append_block(model, cache, x, meta, x.shape[0], rope, kv_len)


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _append_vae(graphdef, state, cache, tokens, lat_pos, rope, kv_len, split, soi, eoi):
    model = nnx.merge(graphdef, state)
    lat = model.embed_latents(tokens, jnp.zeros((tokens.shape[0],), jnp.float32), lat_pos)
    x, meta = _image_block(model, lat, soi, eoi, split, kv_len)
    return _append_block(model, cache, x, meta, 2, rope, kv_len, gen_mode=True)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 10, 11, 12))
def _guided_velocity(graphdef, state, caches, ropes, x_t, t, lat_pos, soi, eoi, scales, renorm_type, img_is_cond,
                     use_img):
    """x_t [requests, images, N, C] -> guided velocity, same shape. Per request, its CFG branches
    (cond / text-uncond / image-uncond: caches [requests, branches, ...]; one branch: no guidance) and its images
    run batched (vmap) over that request's context caches. `scales` = [text, image, renorm_min] (traced);
    `use_img`: the image guidance term applies (`cfg_branches`); `img_is_cond`: the image-uncond context is the
    cond one (its velocity is the cond velocity; caches hold 2 branches)."""
    model = nnx.merge(graphdef, state)

    def one_image(x, caches, ropes):
        n = x.shape[0]
        lat = model.embed_latents(x, jnp.full((n,), t, jnp.float32), lat_pos)
        xq, meta = _image_block(model, lat, soi, eoi, _QUERY_ORDER, _QUERY_ORDER)

        def branch(cache, rope):
            h = _run(model, xq, 2, meta, jnp.full((n + 2,), rope, jnp.int32), cache, return_kv=False, gen_mode=True)
            return model.velocity(h[2:]).astype(jnp.float32)

        v = jax.vmap(branch)(caches, ropes)
        nb = v.shape[0]
        v_img = None if nb == 1 or not use_img else v[0] if img_is_cond else v[2]
        return cfg_combine(v[0], v[1] if nb > 1 else None, v_img, text_scale=scales[0], img_scale=scales[1],
                           renorm_type=renorm_type, renorm_min=scales[2])

    one_request = jax.vmap(one_image, in_axes=(0, None, None))  # images of one request share its caches
    return jax.vmap(one_request)(x_t, caches, ropes)


@functools.partial(jax.jit, static_argnums=(0, 11, 12))
def _decode_loop(graphdef, state, cache, rope, kv_len, split, limit, bos, eos, temperature, rng, buffer: int,
                 do_sample: bool):
    """`Inferencer.generate_text` on the device: from the start token, each step writes the token to the cache
    (its own split, the next position) and picks the next one (argmax, or a sample at `temperature` with a key
    split off `rng` per step), until `<|im_end|>` is picked or `limit` (<= `buffer`, static: max_length rounded up
    to DECODE_BUCKET) tokens are out. Returns (ids [buffer], the count, whether it ended on <|im_end|>). The
    cache is the loop's carry: updated in place (the caller's buffer is copied once, not per token)."""
    model = nnx.merge(graphdef, state)
    dt = dtype_of(model.cfg.compute_dtype)
    rng = jax.random.key(0) if rng is None else rng

    def body(carry):
        i, tok, cache, ids, _, rng = carry
        ids = ids.at[i].set(tok)
        x = model.llm.embed_tokens(tok[None], dt)
        meta = _meta(1, split + i, CAUSAL, kv_len + i)
        h, kv = _run(model, x, 1, meta, (rope + i)[None], cache, return_kv=True)
        cache = _write(cache, kv, meta, kv_len + i)
        # logits in the compute dtype, as the official's lm_head output under bf16 autocast (argmax: bf16 ties)
        logits = model.llm.logits(h)[0].astype(dt)
        if do_sample:
            rng, sub = jax.random.split(rng)
            nxt = jax.random.categorical(sub, logits.astype(jnp.float32) / temperature)
        else:
            nxt = jnp.argmax(logits)
        nxt = nxt.astype(jnp.int32)
        return i + 1, nxt, cache, ids, nxt == eos, rng

    init = (jnp.int32(0), bos, cache, jnp.zeros((buffer,), jnp.int32), jnp.bool_(False), rng)
    n, _, _, ids, ended, _ = jax.lax.while_loop(lambda c: (c[0] < limit) & ~c[4], body, init)
    return ids, n, ended


@functools.partial(jax.jit, static_argnums=(0, 3))
def _vae_encode(graphdef, state, pixels, sample, rng):
    vae = nnx.merge(graphdef, state)
    return vae.encode(pixels, sample=sample, rng=rng)


@functools.partial(jax.jit, static_argnums=(0,))
def _vae_decode(graphdef, state, z):
    vae = nnx.merge(graphdef, state)
    return vae.decode(z)
