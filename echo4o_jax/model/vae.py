"""The FLUX autoencoder used by BAGEL (official `flux/modules/autoencoder.py`), in Flax NNX.

NHWC everywhere; images in [-1, 1]. Module attribute names follow the official state dict so that the
Flax paths read like the official keys:

    encoder.down.0.block.1.conv1.weight  <->  ('encoder', 'down', 0, 'block', 1, 'conv1', 'kernel')

Conv kernels are [kh, kw, I, O]; GroupNorm has `scale` / `bias`. GroupNorm statistics and the
attention softmax are computed in float32 whatever the compute dtype. Every size comes from `VAEConfig`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from echo4o_jax.config import VAEConfig
from echo4o_jax.model.keymap import CONV, ID, Rule

__all__ = ["AutoEncoder", "latent_from_moments", "region_masks", "vae_key_rules"]

NUM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def _zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x with every position outside the region `mask` [N, H, W, 1] set to 0 (no-op without a mask)."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def region_masks(valid_hw: jax.Array, canvas_hw: tuple[int, int], levels: int) -> list[jax.Array]:
    """Per resolution level l (canvas / 2^l), bool [N, H_l, W_l, 1]: inside the region [0, h / 2^l) x
    [0, w / 2^l) of each image (`valid_hw` [N, 2] pixels, multiples of 2^(levels - 1))."""
    H, W = canvas_hw
    out = []
    for lvl in range(levels):
        f = 2**lvl
        ys = jnp.arange(H // f)[None, :, None, None] < (valid_hw[:, 0] // f)[:, None, None, None]
        xs = jnp.arange(W // f)[None, None, :, None] < (valid_hw[:, 1] // f)[:, None, None, None]
        out.append(ys & xs)
    return out


# ---------------------------------------------------------------------------------------- layers
class Conv(nnx.Module):
    """2-D convolution, NHWC, kernel [kh, kw, I, O], explicit padding ((top, bottom), (left, right))."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, *, stride: int = 1, padding=None,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, precision=None):
        if padding is None:
            p = kernel_size // 2
            padding = ((p, p), (p, p))
        self.stride, self.padding = stride, padding
        self.dtype, self.precision = dtype, precision
        fan_in = c_in * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)  # torch's default Conv2d init
        k_kernel, k_bias = jax.random.split(rngs.params())
        self.kernel = nnx.Param(jax.random.uniform(
            k_kernel, (kernel_size, kernel_size, c_in, c_out), param_dtype, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(k_bias, (c_out,), param_dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm(32, c, eps=1e-6, affine=True) over NHWC; two-pass statistics in float32."""

    def __init__(self, c: int, *, dtype=jnp.float32, param_dtype=jnp.float32):
        if c % NUM_GROUPS:
            raise ValueError(f"GroupNorm: {c} channels is not a multiple of {NUM_GROUPS} groups")
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((c,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask` [N, H, W, 1]: statistics over the positions inside it only (a smaller image embedded in
        a larger zero canvas normalises as on its own canvas)."""
        n, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(n, h, w, NUM_GROUPS, c // NUM_GROUPS)
        if mask is None:
            mean = g.mean(axis=(1, 2, 4), keepdims=True)
            var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        else:
            m = mask[..., None].astype(jnp.float32)  # [N, H, W, 1, 1]
            count = jnp.maximum(jnp.sum(m, axis=(1, 2), keepdims=True), 1.0) * (c // NUM_GROUPS)  # empty: finite
            mean = jnp.sum(g * m, axis=(1, 2, 4), keepdims=True) / count
            var = jnp.sum(jnp.square((g - mean) * m), axis=(1, 2, 4), keepdims=True) / count
        y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(n, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------- blocks
class ResnetBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs, **kw):
        dt = dict(dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.norm1 = GroupNorm(c_in, **dt)
        self.conv1 = Conv(c_in, c_out, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(c_out, **dt)
        self.conv2 = Conv(c_out, c_out, 3, rngs=rngs, **kw)
        self.nin_shortcut = Conv(c_in, c_out, 1, rngs=rngs, **kw) if c_in != c_out else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = self.conv1(_zero_outside(swish(self.norm1(x, mask)), mask))
        h = self.conv2(_zero_outside(swish(self.norm2(h, mask)), mask))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the h*w positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw):
        self.dtype, self.precision = kw["dtype"], kw["precision"]
        self.norm = GroupNorm(c, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.q = Conv(c, c, 1, rngs=rngs, **kw)
        self.k = Conv(c, c, 1, rngs=rngs, **kw)
        self.v = Conv(c, c, 1, rngs=rngs, **kw)
        self.proj_out = Conv(c, c, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        n, h, w, c = x.shape
        y = self.norm(x, mask)
        q, k, v = (f(y).reshape(n, h * w, c) for f in (self.q, self.k, self.v))
        s = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision).astype(jnp.float32)
        if mask is not None:  # keys inside the region only (finite fill: an empty region stays finite)
            s = jnp.where(mask.reshape(n, 1, h * w), s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s / math.sqrt(c), axis=-1).astype(self.dtype)
        o = jnp.einsum("nqk,nkc->nqc", p, v, precision=self.precision).reshape(n, h, w, c)
        return x + self.proj_out(o)


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw):
        self.conv = Conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.conv(_zero_outside(x, mask))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw):
        self.conv = Conv(c, c, 3, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], *, downsample=None, upsample=None):
        self.block = nnx.List(blocks)
        self.downsample = downsample
        self.upsample = upsample


class Mid(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, **kw):
        self.block_1 = ResnetBlock(c, c, rngs=rngs, **kw)
        self.attn_1 = AttnBlock(c, rngs=rngs, **kw)
        self.block_2 = ResnetBlock(c, c, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x, mask), mask), mask)


# ---------------------------------------------------------------------------------------- posterior
def latent_from_moments(moments: jax.Array, cfg: VAEConfig, *, rng: jax.Array | None = None) -> jax.Array:
    """Posterior moments [..., 2z] (mean | logvar, the encoder output) -> scaled latent [..., z] float32:
    the mean (`rng=None`) or a sample `mean + exp(0.5 * clip(logvar)) * N(0, 1)` drawn with `rng` over the
    whole moments shape, then `scale * (z - shift)`. The one place of this maths: `AutoEncoder.encode`,
    the train step and the precomputed-latent path (`echo4o_jax.data.latents`) all go through it."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    z = mean
    if rng is not None:
        logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return cfg.scale_factor * (z - cfg.shift_factor)


# ---------------------------------------------------------------------------------------- encoder / decoder
class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, **kw):
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        in_mult = (1,) + mult
        self.conv_in = Conv(cfg.in_channels, ch, 3, rngs=rngs, **kw)
        levels = []
        for i in range(len(mult)):
            block_in, block_out = ch * in_mult[i], ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, rngs=rngs, **kw))
                block_in = block_out
            down = Downsample(block_in, rngs=rngs, **kw) if i != len(mult) - 1 else None
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        self.mid = Mid(block_in, rngs=rngs, **kw)
        self.norm_out = GroupNorm(block_in, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(block_in, 2 * cfg.z_channels, 3, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """x [N, H, W, C] -> moments [N, H/f, W/f, 2z]. `valid_hw` [N, 2] (pixels, multiples of f): encode
        each image as if its canvas were only [0, h) x [0, w) of x (the official code zero-pads the images of
        a batch to their max size, and GroupNorm / the mid-block attention see that padding): statistics and
        attention keys inside the region only, zeros outside it before every spatial convolution. Inside
        the region the moments equal those of the cropped canvas; outside they are meaningless."""
        masks = [None] * len(self.down)
        if valid_hw is not None:
            masks = region_masks(valid_hw, x.shape[1:3], len(self.down))
        h = self.conv_in(_zero_outside(x, masks[0]))
        for level, mask in zip(self.down, masks):
            for block in level.block:
                h = block(h, mask)
            if level.downsample is not None:
                h = level.downsample(h, mask)
        mask = masks[-1]
        h = self.mid(h, mask)
        return self.conv_out(_zero_outside(swish(self.norm_out(h, mask)), mask))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, **kw):
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.z_channels, block_in, 3, rngs=rngs, **kw)
        self.mid = Mid(block_in, rngs=rngs, **kw)
        levels: list[Level] = [None] * len(mult)  # type: ignore[list-item]
        for i in reversed(range(len(mult))):  # built in application order, stored by level index
            block_out = ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, rngs=rngs, **kw))
                block_in = block_out
            up = Upsample(block_in, rngs=rngs, **kw) if i != 0 else None
            levels[i] = Level(blocks, upsample=up)
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(block_in, cfg.out_ch, 3, rngs=rngs, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # up[0] is applied last
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nnx.Module):
    """FLUX AE: `encode` -> scaled/shifted latent [N, H/8, W/8, z]; `decode` -> image [N, H, W, out_ch]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision: jax.lax.PrecisionLike = None):
        if cfg.downsample != 2 ** (len(cfg.ch_mult) - 1):
            raise ValueError(f"VAEConfig: downsample={cfg.downsample} but ch_mult={tuple(cfg.ch_mult)} gives "
                             f"{2 ** (len(cfg.ch_mult) - 1)} (2 ** (len(ch_mult) - 1))")
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.encoder = Encoder(cfg, rngs=rngs, **kw)
        self.decoder = Decoder(cfg, rngs=rngs, **kw)

    def encode_moments(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """[N, H, W, in_channels] -> [N, h, w, 2z] (posterior mean and logvar, concatenated); `valid_hw`:
        per image, the canvas the official code would have encoded it on (`Encoder.__call__`)."""
        return self.encoder(x, valid_hw)

    def encode(self, x: jax.Array, *, sample: bool = False, rng: jax.Array | None = None) -> jax.Array:
        """Posterior mean (or a sample with `sample=True, rng=key`), then `scale * (z - shift)`."""
        if sample and rng is None:
            raise ValueError("AutoEncoder.encode(sample=True) needs an rng key (rng=jax.random.key(...))")
        z = latent_from_moments(self.encode_moments(x), self.cfg, rng=rng if sample else None)
        return z.astype(self.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled/shifted latent [N, h, w, z] -> image [N, 8h, 8w, out_ch] (roughly in [-1, 1])."""
        z = z.astype(jnp.float32) / self.cfg.scale_factor + self.cfg.shift_factor
        return self.decoder(z.astype(self.dtype))


# ---------------------------------------------------------------------------------------- checkpoint keys
def _conv_rules(official: str, path: tuple) -> list[Rule]:
    return [Rule(f"{official}.weight", path + ("kernel",), CONV), Rule(f"{official}.bias", path + ("bias",), ID)]


def _norm_rules(official: str, path: tuple) -> list[Rule]:
    return [Rule(f"{official}.weight", path + ("scale",), ID), Rule(f"{official}.bias", path + ("bias",), ID)]


def _resnet_rules(official: str, path: tuple, c_in: int, c_out: int) -> list[Rule]:
    rules = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        make = _norm_rules if name.startswith("norm") else _conv_rules
        rules += make(f"{official}.{name}", path + (name,))
    if c_in != c_out:
        rules += _conv_rules(f"{official}.nin_shortcut", path + ("nin_shortcut",))
    return rules


def _mid_rules(official: str, path: tuple, c: int) -> list[Rule]:
    rules = _resnet_rules(f"{official}.block_1", path + ("block_1",), c, c)
    rules += _norm_rules(f"{official}.attn_1.norm", path + ("attn_1", "norm"))
    for name in ("q", "k", "v", "proj_out"):
        rules += _conv_rules(f"{official}.attn_1.{name}", path + ("attn_1", name))
    rules += _resnet_rules(f"{official}.block_2", path + ("block_2",), c, c)
    return rules


def vae_key_rules(cfg: VAEConfig) -> list[Rule]:
    """Every key of the official `ae.safetensors` -> its AutoEncoder state path."""
    ch, mult = cfg.ch, tuple(cfg.ch_mult)
    in_mult = (1,) + mult
    rules: list[Rule] = []

    # Encoder
    rules += _conv_rules("encoder.conv_in", ("encoder", "conv_in"))
    for i in range(len(mult)):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for j in range(cfg.num_res_blocks):
            rules += _resnet_rules(f"encoder.down.{i}.block.{j}", ("encoder", "down", i, "block", j),
                                   block_in, block_out)
            block_in = block_out
        if i != len(mult) - 1:
            rules += _conv_rules(f"encoder.down.{i}.downsample.conv", ("encoder", "down", i, "downsample", "conv"))
    rules += _mid_rules("encoder.mid", ("encoder", "mid"), block_in)
    rules += _norm_rules("encoder.norm_out", ("encoder", "norm_out"))
    rules += _conv_rules("encoder.conv_out", ("encoder", "conv_out"))

    # Decoder
    block_in = ch * mult[-1]
    rules += _conv_rules("decoder.conv_in", ("decoder", "conv_in"))
    rules += _mid_rules("decoder.mid", ("decoder", "mid"), block_in)
    for i in reversed(range(len(mult))):
        block_out = ch * mult[i]
        for j in range(cfg.num_res_blocks + 1):
            rules += _resnet_rules(f"decoder.up.{i}.block.{j}", ("decoder", "up", i, "block", j),
                                   block_in, block_out)
            block_in = block_out
        if i != 0:
            rules += _conv_rules(f"decoder.up.{i}.upsample.conv", ("decoder", "up", i, "upsample", "conv"))
    rules += _norm_rules("decoder.norm_out", ("decoder", "norm_out"))
    rules += _conv_rules("decoder.conv_out", ("decoder", "conv_out"))
    return rules
