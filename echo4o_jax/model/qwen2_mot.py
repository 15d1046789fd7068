"""Qwen2 Mixture-of-Transformers decoder (BAGEL's language model).

Two experts (understanding `und`, generation `gen`) each own every per-layer weight: input /
post-attention RMSNorms, q/k/v/o projections (q/k/v with bias), per-head q/k RMSNorms and a SwiGLU MLP.
All tokens share one attention softmax (GQA, rotate-half RoPE). Final norms are per expert; the
embedding and the untied `lm_head` are shared.

MoT routing without doubled FLOPs: the token array is laid out in two static streams,
`[und tokens (n_und) | gen tokens]`. Each stream goes through its own expert's matmuls only; the
attention runs over the concatenation and gets its mask (causality included) from per-token
metadata, so the physical order of tokens does not matter. Layers are stacked on a leading axis and
run with `jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import LLMConfig
from .attention import TokenMeta, attention, concat_meta
from .layers import apply_rope, linear, param, remat_policy, rms_norm, rope_cos_sin, silu

__all__ = ["ExpertLayers", "Qwen2MoT", "KVCache", "EXPERT_FIELDS"]

# Per-layer weights of one expert: name -> (shape fn, logical axes, init).
EXPERT_FIELDS = {
    "input_norm": (lambda c: (c.hidden_size,), ("embed",), "ones"),
    "post_norm": (lambda c: (c.hidden_size,), ("embed",), "ones"),
    "wq": (lambda c: (c.hidden_size, c.num_heads * c.head_dim), ("embed", "q_heads"), "normal"),
    "bq": (lambda c: (c.num_heads * c.head_dim,), ("q_heads",), "zeros"),
    "wk": (lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), "normal"),
    "bk": (lambda c: (c.num_kv_heads * c.head_dim,), ("kv_heads",), "zeros"),
    "wv": (lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), "normal"),
    "bv": (lambda c: (c.num_kv_heads * c.head_dim,), ("kv_heads",), "zeros"),
    "wo": (lambda c: (c.num_heads * c.head_dim, c.hidden_size), ("q_heads", "embed"), "normal"),
    "q_norm": (lambda c: (c.head_dim,), ("head_dim",), "ones"),
    "k_norm": (lambda c: (c.head_dim,), ("head_dim",), "ones"),
    "w_gate": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "w_up": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "w_down": (lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal"),
}


def pin_activation(y: jax.Array) -> jax.Array:
    """Under a mesh context (`jax.set_mesh`, as the trainer compiles), a sharding constraint with every
    dim UNCONSTRAINED: inside `vmap(..., spmd_axis_name=("data", "fsdp"))` (see `packed_loss`) it pins the
    packs' batch axis to (data, fsdp), so XLA never replicates activations across the data-parallel chips.
    A no-op without a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return y
    from jax.sharding import PartitionSpec as P

    return jax.lax.with_sharding_constraint(y, P(*([P.UNCONSTRAINED] * y.ndim)))


class ExpertLayers(nnx.Module):
    """All decoder layers of one expert, stacked on a leading `layers` axis."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        for name, (shape_fn, axes, init) in EXPERT_FIELDS.items():
            setattr(self, name, param(rngs, (cfg.num_layers, *shape_fn(cfg)), ("layers", *axes), init, param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in EXPERT_FIELDS}


class KVCache(NamedTuple):
    """Static-size KV cache of one context: keys after q/k-norm and RoPE.

    k, v: [num_layers, capacity, kv_heads, head_dim]; meta: TokenMeta [capacity] (sample -1 = empty).
    """

    k: jax.Array
    v: jax.Array
    meta: TokenMeta


class Qwen2MoT(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal", param_dtype)
        self.und = ExpertLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.gen = ExpertLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.norm = param(rngs, (cfg.hidden_size,), ("embed",), "ones", param_dtype)
        self.norm_gen = param(rngs, (cfg.hidden_size,), ("embed",), "ones", param_dtype)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal", param_dtype)

    # ------------------------------------------------------------------ pieces
    def embed_tokens(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embed[...], ids, axis=0).astype(dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        return jnp.dot(h, self.lm_head[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def empty_cache(self, capacity: int, dtype) -> KVCache:
        c = self.cfg
        z = jnp.zeros((c.num_layers, capacity, c.num_kv_heads, c.head_dim), dtype)
        meta = TokenMeta(
            jnp.full((capacity,), -1, jnp.int32), jnp.full((capacity,), -1, jnp.int32),
            jnp.zeros((capacity,), jnp.int32), jnp.full((capacity,), jnp.iinfo(jnp.int32).max // 2, jnp.int32),
        )
        return KVCache(z, z, meta)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        x: jax.Array,
        n_und: int,
        meta: TokenMeta,
        positions: jax.Array,
        *,
        cache: KVCache | None = None,
        return_kv: bool = False,
        final_norm: bool = True,
        attention_impl: str = "xla_blockwise",
        block_q: int = 512,
        block_kv: int = 512,
        tuning: str = "",
        chunk: int = 0,
        remat: str = "none",
        return_layer_outputs: bool = False,
        freeze_und: bool = False,
        qk_float32: bool = False,
    ):
        """x [L, H] laid out as [und stream (n_und) | gen stream]; returns hidden [L, H] (after the
        per-expert final norms when `final_norm`), plus per-layer (k, v) [num_layers, L, KVH, D] when
        `return_kv` (for a cache update) and per-layer outputs when `return_layer_outputs`.
        With `cache`, every token additionally attends to the cached context (read-only here).
        `freeze_und` (training): as the official `freeze_und`, no gradient flows along an understanding token's
        paths: its input, its queries, keys and values, its attention and MLP outputs and its final norm are
        detached (the gen tokens still read its keys and values, as constants), so no understanding-expert
        weight gets a gradient; the LM head still does, from the CE on those (constant) hidden states.
        `qk_float32` (inference in the official "gen" mode: the sampler's velocity and a VAE image's context
        update): queries and keys are normalised and rotated in float32 and rounded to the compute dtype once, as
        the official `forward_inference(mode="gen")` does (its training and "und" mode round at each step, as
        here without it). A no-op in float32."""
        c = self.cfg
        L = x.shape[0]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        scale = c.head_dim**-0.5
        eps = c.rms_norm_eps
        key_meta = meta if cache is None else concat_meta(cache.meta, meta)

        def qkv(h, p):
            n = h.shape[0]
            q = linear(h, p["wq"], p["bq"]).reshape(n, c.num_heads, c.head_dim)
            k = linear(h, p["wk"], p["bk"]).reshape(n, c.num_kv_heads, c.head_dim)
            v = linear(h, p["wv"], p["bv"]).reshape(n, c.num_kv_heads, c.head_dim)
            if qk_float32:
                q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            return rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps), v

        def mlp(h, p):
            return linear(silu(linear(h, p["w_gate"])) * linear(h, p["w_up"]), p["w_down"])

        def per_expert(fn, xs, pu, pg, detach_und=False):
            a = fn(xs[:n_und], pu)
            b = fn(xs[n_und:], pg)
            if detach_und and freeze_und:
                a = jax.tree.map(jax.lax.stop_gradient, a)
            if isinstance(a, tuple):
                return tuple(pin_activation(jnp.concatenate([u, g], axis=0)) for u, g in zip(a, b))
            return pin_activation(jnp.concatenate([a, b], axis=0))

        def layer(x, xs):  # named scopes: where the step's time goes (train/profile.py)
            pu, pg, ck, cv = xs
            with jax.named_scope("norm"):
                h = per_expert(lambda t, p: rms_norm(t, p["input_norm"], eps), x, pu, pg)
            with jax.named_scope("qkv"):
                q, k, v = per_expert(qkv, h, pu, pg, detach_und=True)
            with jax.named_scope("rope"):
                q, k = apply_rope(q, cos, sin).astype(x.dtype), apply_rope(k, cos, sin).astype(x.dtype)
            keys, vals = (k, v) if ck is None else (jnp.concatenate([ck, k]), jnp.concatenate([cv, v]))
            with jax.named_scope("attention"):
                o = attention(q, keys, vals, meta, key_meta, scale=scale, impl=attention_impl, block_q=block_q,
                              block_kv=block_kv, tuning=tuning, chunk=chunk).reshape(L, c.num_heads * c.head_dim)
            with jax.named_scope("o_proj"):
                x = x + per_expert(lambda t, p: linear(t, p["wo"]), o, pu, pg, detach_und=True)
            with jax.named_scope("norm"):
                h = per_expert(lambda t, p: rms_norm(t, p["post_norm"], eps), x, pu, pg)
            with jax.named_scope("mlp"):
                x = x + per_expert(mlp, h, pu, pg, detach_und=True)
            out = (k, v) if return_kv else None
            return x, (out, x if return_layer_outputs else None)

        policy = remat_policy(remat)
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

        dt = x.dtype
        pu = {k: v.astype(dt) for k, v in self.und.arrays().items()}
        pg = {k: v.astype(dt) for k, v in self.gen.arrays().items()}
        if freeze_und:
            x = jnp.concatenate([jax.lax.stop_gradient(x[:n_und]), x[n_und:]])
        ck = cv = None
        if cache is not None:
            ck, cv = cache.k.astype(dt), cache.v.astype(dt)
        x, (kv, layer_outs) = jax.lax.scan(layer, x, (pu, pg, ck, cv))
        if final_norm:
            hu = rms_norm(x[:n_und], self.norm[...], eps)
            x = jnp.concatenate([jax.lax.stop_gradient(hu) if freeze_und else hu,
                                 rms_norm(x[n_und:], self.norm_gen[...], eps)])
        outs = [x]
        if return_kv:
            outs.append(kv)
        if return_layer_outputs:
            outs.append(layer_outs)
        return outs[0] if len(outs) == 1 else tuple(outs)
