"""Small shared building blocks: parameters with logical axes, norms, RoPE, sin-cos tables, remat."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Buffer",
    "param",
    "rms_norm",
    "layer_norm",
    "gelu_tanh",
    "silu",
    "linear",
    "rope_cos_sin",
    "apply_rope",
    "sincos_2d_table",
    "timestep_frequencies",
    "remat_policy",
    "dtype_of",
]


class Buffer(nnx.Variable):
    """A fixed (non-trainable) array stored in the checkpoint, e.g. the sin-cos position tables."""


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], init: str = "normal",
          dtype=jnp.float32, std: float = 0.02) -> nnx.Param:
    """A parameter with its logical axis names (`logical_axes` metadata, used by the sharding rules)."""
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


def lookup_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` for a small table (position embeddings) whose row width is sharded (fsdp): under a mesh the
    table is gathered whole first, as FSDP gathers a weight before use. A gather from the sharded table gives
    rows split by width, which the packs' batch sharding then needs whole: XLA could only replicate the
    activations ("Involuntary full rematerialization") - larger than the table by far for the ViT's tokens."""
    if not jax.sharding.get_abstract_mesh().empty:
        from jax.sharding import PartitionSpec as P

        table = jax.lax.with_sharding_constraint(table, P(*([None] * table.ndim)))
    return jnp.take(table, ids, axis=0)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: statistics in float32, cast back to the input dtype, then scale."""
    dt = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(dt) * xf.astype(dt)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    dt = x.dtype
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(dt)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-GELU computed in float32 and rounded once to x's dtype, as PyTorch computes bf16 activations (JAX's
    composite bf16 GELU rounds every step: up to ~240 bf16 roundings off in the negative tail)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in float32 and rounded once to x's dtype (PyTorch's bf16 silu; see gelu_tanh)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b), computed in x's dtype."""
    y = jnp.dot(x, w.astype(x.dtype))
    if b is not None:
        y = y + b.astype(x.dtype)
    return y


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """HF default RoPE: float32 angles, [angles, angles] layout, cast to the activation dtype. Positions must be
    integers (a bfloat16 position is exact only up to 256: 10,000 would rotate as 9,984)."""
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"RoPE positions must be integers, got {positions.dtype}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [L, heads, D]; rotate-half (non-interleaved)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def sincos_2d_table(grid: int, dim: int) -> np.ndarray:
    """[grid*grid, dim] table, row y*grid + x = [sin(x w), cos(x w), sin(y w), cos(y w)] (float64 -> float32)."""
    if dim % 4:
        raise ValueError(f"sin-cos table dim {dim} must be a multiple of 4")
    f = dim // 4
    omega = 1.0 / 10000 ** (np.arange(f, dtype=np.float64) / f)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    def one(pos):
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one(xs), one(ys)], axis=1).astype(np.float32)


def timestep_frequencies(dim: int) -> jax.Array:
    half = dim // 2
    return jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)


def remat_policy(name: str) -> Callable | None:
    """Wrap a layer function for rematerialisation according to the config's `remat`."""
    if name == "none":
        return None
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}")
    return policies[name]
