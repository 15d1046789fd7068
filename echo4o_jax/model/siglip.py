"""SigLIP NaViT vision encoder (understanding path), as BAGEL uses it.

Patch embedding is a Linear over (kh, kw, c)-ordered patches; a learned position table indexed by
`row * max_side + col`; `vit_config.num_hidden_layers - 1` pre-LN encoder layers (stacked, scanned);
post-LayerNorm. Images are packed: attention is bidirectional inside each image only (`image_id`,
-1 = padding), through the shared metadata-driven attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ViTConfig
from .attention import FULL, TokenMeta, attention
from .layers import gelu_tanh, layer_norm, linear, lookup_rows, param, remat_policy

__all__ = ["SigLIPNaViT", "VIT_LAYER_FIELDS"]

VIT_LAYER_FIELDS = {
    "ln1_w": (lambda c: (c.hidden_size,), ("vit_embed",), "ones"),
    "ln1_b": (lambda c: (c.hidden_size,), ("vit_embed",), "zeros"),
    "wq": (lambda c: (c.hidden_size, c.hidden_size), ("vit_embed", "vit_heads"), "normal"),
    "bq": (lambda c: (c.hidden_size,), ("vit_heads",), "zeros"),
    "wk": (lambda c: (c.hidden_size, c.hidden_size), ("vit_embed", "vit_heads"), "normal"),
    "bk": (lambda c: (c.hidden_size,), ("vit_heads",), "zeros"),
    "wv": (lambda c: (c.hidden_size, c.hidden_size), ("vit_embed", "vit_heads"), "normal"),
    "bv": (lambda c: (c.hidden_size,), ("vit_heads",), "zeros"),
    "wo": (lambda c: (c.hidden_size, c.hidden_size), ("vit_heads", "vit_embed"), "normal"),
    "bo": (lambda c: (c.hidden_size,), ("vit_embed",), "zeros"),
    "ln2_w": (lambda c: (c.hidden_size,), ("vit_embed",), "ones"),
    "ln2_b": (lambda c: (c.hidden_size,), ("vit_embed",), "zeros"),
    "fc1_w": (lambda c: (c.hidden_size, c.intermediate_size), ("vit_embed", "vit_mlp"), "normal"),
    "fc1_b": (lambda c: (c.intermediate_size,), ("vit_mlp",), "zeros"),
    "fc2_w": (lambda c: (c.intermediate_size, c.hidden_size), ("vit_mlp", "vit_embed"), "normal"),
    "fc2_b": (lambda c: (c.hidden_size,), ("vit_embed",), "zeros"),
}


class ViTLayers(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        for name, (shape_fn, axes, init) in VIT_LAYER_FIELDS.items():
            setattr(self, name, param(rngs, (cfg.num_layers, *shape_fn(cfg)), ("layers", *axes), init, param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in VIT_LAYER_FIELDS}


class SigLIPNaViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_w = param(rngs, (cfg.patch_dim, d), ("patch", "vit_embed"), "normal", param_dtype)
        self.patch_b = param(rngs, (d,), ("vit_embed",), "zeros", param_dtype)
        self.pos_embed = param(rngs, (cfg.num_positions, d), (None, "vit_embed"), "normal", param_dtype)
        self.layers = ViTLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_ln_w = param(rngs, (d,), ("vit_embed",), "ones", param_dtype)
        self.post_ln_b = param(rngs, (d,), ("vit_embed",), "zeros", param_dtype)

    def __call__(self, patches: jax.Array, pos_ids: jax.Array, image_id: jax.Array, *,
                 attention_impl: str = "xla_blockwise", block_q: int = 512, block_kv: int = 512, tuning: str = "",
                 chunk: int = 0, remat: str = "none") -> jax.Array:
        """patches [N, p*p*3] (in [-1, 1]), pos_ids [N], image_id [N] -> [N, hidden] after post-LN."""
        c = self.cfg
        dt = patches.dtype
        N = patches.shape[0]
        nh, hd = c.num_heads, c.hidden_size // c.num_heads
        image_id = image_id.astype(jnp.int32)
        meta = TokenMeta(image_id, image_id, jnp.full((N,), FULL, jnp.int32), jnp.arange(N, dtype=jnp.int32))
        x = linear(patches, self.patch_w[...], self.patch_b[...])
        x = x + lookup_rows(self.pos_embed[...].astype(dt), pos_ids)
        eps = c.layer_norm_eps

        def layer(x, p):
            h = layer_norm(x, p["ln1_w"], p["ln1_b"], eps)
            q = linear(h, p["wq"], p["bq"]).reshape(N, nh, hd)
            k = linear(h, p["wk"], p["bk"]).reshape(N, nh, hd)
            v = linear(h, p["wv"], p["bv"]).reshape(N, nh, hd)
            o = attention(q, k, v, meta, meta, scale=hd**-0.5, impl=attention_impl,
                          block_q=block_q, block_kv=block_kv, tuning=tuning, chunk=chunk).reshape(N, c.hidden_size)
            x = x + linear(o, p["wo"], p["bo"])
            h = layer_norm(x, p["ln2_w"], p["ln2_b"], eps)
            x = x + linear(gelu_tanh(linear(h, p["fc1_w"], p["fc1_b"])), p["fc2_w"], p["fc2_b"])
            return x, None

        policy = remat_policy(remat)
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        params = {k: v.astype(dt) for k, v in self.layers.arrays().items()}
        x, _ = jax.lax.scan(layer, x, params)
        return layer_norm(x, self.post_ln_w[...], self.post_ln_b[...], eps)
