"""BAGEL assembly: Qwen2 MoT + SigLIP NaViT + connector, time embedder, vae2llm/llm2vae, position tables.

`Bagel` holds every tensor of the official `ema.safetensors` (the FLUX VAE lives in `vae.py`).
`bagel_key_rules` is the one declarative table official key <-> Flax path for those tensors.
The training forward (`forward_packed`, `packed_loss`) is a pure function of the model state and a
packed batch (see `echo4o_jax.packing`), usable under `jax.jit` and `jax.grad`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import BagelConfig
from .attention import TokenMeta
from .keymap import LINEAR, Rule
from .layers import (Buffer, dtype_of, gelu_tanh, linear, lookup_rows, param, silu, sincos_2d_table,
                     timestep_frequencies)
from .qwen2_mot import Qwen2MoT
from .siglip import SigLIPNaViT

__all__ = [
    "Dense",
    "Bagel",
    "bagel_key_rules",
    "shift_timesteps",
    "latent_tokens_from_latents",
    "tokens_to_latent",
    "forward_packed",
    "packed_loss",
]


class Dense(nnx.Module):
    def __init__(self, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 zero_init: bool = False):
        self.w = param(rngs, (din, dout), axes, "zeros" if zero_init else "normal", param_dtype)
        self.b = param(rngs, (dout,), axes[1:], "zeros", param_dtype)

    def __call__(self, x):
        return linear(x, self.w[...], self.b[...])


class Bagel(nnx.Module):
    def __init__(self, cfg: BagelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        H = cfg.llm.hidden_size
        self.llm = Qwen2MoT(cfg.llm, rngs=rngs, param_dtype=pdt)
        self.vit = SigLIPNaViT(cfg.vit, rngs=rngs, param_dtype=pdt)
        self.connector_fc1 = Dense(cfg.vit.hidden_size, H, ("vit_embed", "embed"), rngs=rngs, param_dtype=pdt)
        self.connector_fc2 = Dense(H, H, ("embed", "embed_out"), rngs=rngs, param_dtype=pdt)
        self.time_fc1 = Dense(cfg.timestep_embed_dim, H, (None, "embed"), rngs=rngs, param_dtype=pdt)
        self.time_fc2 = Dense(H, H, ("embed", "embed_out"), rngs=rngs, param_dtype=pdt)
        self.vae2llm = Dense(cfg.patch_latent_dim, H, (None, "embed"), rngs=rngs, param_dtype=pdt)
        self.llm2vae = Dense(H, cfg.patch_latent_dim, ("embed", None), rngs=rngs, param_dtype=pdt, zero_init=True)
        self.latent_pos_embed = Buffer(jnp.asarray(sincos_2d_table(cfg.max_latent_size, H)), logical_axes=(None, "embed"))
        self.vit_pos_embed = Buffer(jnp.asarray(sincos_2d_table(cfg.vit_max_num_patch_per_side, H)), logical_axes=(None, "embed"))

    # ------------------------------------------------------------------ embeddings
    def _kw(self) -> dict[str, Any]:
        c = self.cfg
        return dict(attention_impl=c.attention_impl, block_q=c.attention_block_q, block_kv=c.attention_block_kv,
                    tuning=c.attention_tuning, chunk=c.attention_chunk, remat=c.remat)

    def embed_vit(self, patches, pos_ids, image_id, *, debug: dict | None = None):
        dt = dtype_of(self.cfg.compute_dtype)
        h = self.vit(patches.astype(dt), pos_ids, image_id, **self._kw())
        conn = self.connector_fc2(gelu_tanh(self.connector_fc1(h)))
        if debug is not None:
            debug["vit_output"], debug["connector_output"] = h, conn
        return conn + lookup_rows(self.vit_pos_embed[...].astype(dt), pos_ids)

    def time_embed(self, t: jax.Array) -> jax.Array:
        dt = dtype_of(self.cfg.compute_dtype)
        args = t.astype(jnp.float32)[:, None] * timestep_frequencies(self.cfg.timestep_embed_dim)[None, :]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(dt)
        return self.time_fc2(silu(self.time_fc1(emb)))

    def embed_latents(self, x_t, t, latent_pos_ids, *, debug: dict | None = None):
        dt = dtype_of(self.cfg.compute_dtype)
        temb = self.time_embed(t)
        if debug is not None:
            debug["timestep_embeds"] = temb
        pos = lookup_rows(self.latent_pos_embed[...].astype(dt), latent_pos_ids)
        return self.vae2llm(x_t.astype(dt)) + temb + pos

    def velocity(self, h_gen: jax.Array) -> jax.Array:
        return self.llm2vae(h_gen)


# ---------------------------------------------------------------------------- key table


def bagel_key_rules(cfg: BagelConfig) -> list[Rule]:
    L, V = cfg.llm.num_layers, cfg.vit.num_layers
    lm = "language_model.model.layers.{i}."
    rules = [
        Rule("language_model.model.embed_tokens.weight", ("llm", "embed")),
        Rule("language_model.lm_head.weight", ("llm", "lm_head"), LINEAR),
        Rule("language_model.model.norm.weight", ("llm", "norm")),
        Rule("language_model.model.norm_moe_gen.weight", ("llm", "norm_gen")),
    ]
    for expert, sfx in (("und", ""), ("gen", "_moe_gen")):
        mlp = "mlp" + sfx
        rules += [
            Rule(lm + f"input_layernorm{sfx}.weight", ("llm", expert, "input_norm"), stacked=L),
            Rule(lm + f"post_attention_layernorm{sfx}.weight", ("llm", expert, "post_norm"), stacked=L),
            Rule(lm + f"self_attn.q_proj{sfx}.weight", ("llm", expert, "wq"), LINEAR, stacked=L),
            Rule(lm + f"self_attn.q_proj{sfx}.bias", ("llm", expert, "bq"), stacked=L),
            Rule(lm + f"self_attn.k_proj{sfx}.weight", ("llm", expert, "wk"), LINEAR, stacked=L),
            Rule(lm + f"self_attn.k_proj{sfx}.bias", ("llm", expert, "bk"), stacked=L),
            Rule(lm + f"self_attn.v_proj{sfx}.weight", ("llm", expert, "wv"), LINEAR, stacked=L),
            Rule(lm + f"self_attn.v_proj{sfx}.bias", ("llm", expert, "bv"), stacked=L),
            Rule(lm + f"self_attn.o_proj{sfx}.weight", ("llm", expert, "wo"), LINEAR, stacked=L),
            Rule(lm + f"self_attn.q_norm{sfx}.weight", ("llm", expert, "q_norm"), stacked=L),
            Rule(lm + f"self_attn.k_norm{sfx}.weight", ("llm", expert, "k_norm"), stacked=L),
            Rule(lm + f"{mlp}.gate_proj.weight", ("llm", expert, "w_gate"), LINEAR, stacked=L),
            Rule(lm + f"{mlp}.up_proj.weight", ("llm", expert, "w_up"), LINEAR, stacked=L),
            Rule(lm + f"{mlp}.down_proj.weight", ("llm", expert, "w_down"), LINEAR, stacked=L),
        ]
    vm = "vit_model.vision_model."
    vl = vm + "encoder.layers.{i}."
    rules += [
        Rule(vm + "embeddings.patch_embedding.weight", ("vit", "patch_w"), LINEAR),
        Rule(vm + "embeddings.patch_embedding.bias", ("vit", "patch_b")),
        Rule(vm + "embeddings.position_embedding.weight", ("vit", "pos_embed")),
        Rule(vm + "post_layernorm.weight", ("vit", "post_ln_w")),
        Rule(vm + "post_layernorm.bias", ("vit", "post_ln_b")),
    ]
    for off, ours in (("layer_norm1.weight", "ln1_w"), ("layer_norm1.bias", "ln1_b"),
                      ("layer_norm2.weight", "ln2_w"), ("layer_norm2.bias", "ln2_b"),
                      ("self_attn.q_proj.bias", "bq"), ("self_attn.k_proj.bias", "bk"),
                      ("self_attn.v_proj.bias", "bv"), ("self_attn.out_proj.bias", "bo"),
                      ("mlp.fc1.bias", "fc1_b"), ("mlp.fc2.bias", "fc2_b")):
        rules.append(Rule(vl + off, ("vit", "layers", ours), stacked=V))
    for off, ours in (("self_attn.q_proj.weight", "wq"), ("self_attn.k_proj.weight", "wk"),
                      ("self_attn.v_proj.weight", "wv"), ("self_attn.out_proj.weight", "wo"),
                      ("mlp.fc1.weight", "fc1_w"), ("mlp.fc2.weight", "fc2_w")):
        rules.append(Rule(vl + off, ("vit", "layers", ours), LINEAR, stacked=V))
    for official, ours in (("connector.fc1", "connector_fc1"), ("connector.fc2", "connector_fc2"),
                           ("time_embedder.mlp.0", "time_fc1"), ("time_embedder.mlp.2", "time_fc2"),
                           ("vae2llm", "vae2llm"), ("llm2vae", "llm2vae")):
        rules.append(Rule(official + ".weight", (ours, "w"), LINEAR))
        rules.append(Rule(official + ".bias", (ours, "b")))
    rules += [
        Rule("latent_pos_embed.pos_embed", ("latent_pos_embed",)),
        Rule("vit_pos_embed.pos_embed", ("vit_pos_embed",)),
    ]
    return rules


# ---------------------------------------------------------------------------- training forward


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    return shift * t / (1.0 + (shift - 1.0) * t)


def latent_tokens_from_latents(latents: jax.Array, image_index: jax.Array, token_hw: jax.Array, p: int) -> jax.Array:
    """Patchify VAE latents [N, hl, wl, z] and gather one token per (image, row, col): [T, p*p*z],
    feature order (p, q, c) as the official `einsum('chpwq->hwpqc')`."""
    N, hl, wl, z = latents.shape
    g = latents[:, : hl // p * p, : wl // p * p].reshape(N, hl // p, p, wl // p, p, z)
    g = g.transpose(0, 1, 3, 2, 4, 5).reshape(N, hl // p, wl // p, p * p * z)
    idx = jnp.clip(image_index, 0, N - 1)
    return g[idx, token_hw[:, 0], token_hw[:, 1]]


def tokens_to_latent(tokens: jax.Array, h: int, w: int, p: int, z: int) -> jax.Array:
    """Inverse patchify: [h*w, p*p*z] -> latent [h*p, w*p, z] (NHWC without N)."""
    return tokens.reshape(h, w, p, p, z).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, z)


def _meta(batch: Mapping[str, jax.Array]) -> TokenMeta:
    return TokenMeta(batch["sample_id"], batch["split_id"], batch["split_mode"], batch["order"])


def forward_packed(model: Bagel, batch: Mapping[str, jax.Array], noise: jax.Array, latent_tokens: jax.Array,
                   *, debug: bool = False, visual_und: bool = True) -> dict[str, jax.Array]:
    """One packed sequence (no batch axis), laid out [text | vit | vae] (see `echo4o_jax.packing`).
    `visual_und=False` is the official training flag's other mode: the ViT and connector are not run, the ViT
    tokens' slots stay zero vectors (with their positions, in the understanding stream) as the official
    `packed_sequence = new_zeros(...)` leaves them.

    latent_tokens: clean VAE latent tokens x0 [Cg, p*p*z] (from `latent_tokens_from_latents`);
    noise: eps of the same shape. Returns per-token outputs:
      ce [Ct] (0 where no label), ce_mask [Ct], mse [Cg, C] (squared error), mse_mask [Cg],
      hidden [L, H] (after the final per-expert norms), and the debug activations when `debug`.
    """
    cfg = model.cfg
    dt = dtype_of(cfg.compute_dtype)
    dbg: dict | None = {} if debug else None
    Ct = batch["text_ids"].shape[0]
    Cv = batch["vit_patches"].shape[0]
    text = model.llm.embed_tokens(batch["text_ids"], dt)
    parts = [text]
    if Cv and not visual_und:
        parts.append(jnp.zeros((Cv, text.shape[-1]), text.dtype))
    elif Cv:
        with jax.named_scope("vit"):
            parts.append(model.embed_vit(batch["vit_patches"], batch["vit_pos_ids"], batch["vit_image_id"],
                                         debug=dbg))
    t = jax.nn.sigmoid(batch["timestep_raw"].astype(jnp.float32))
    t = shift_timesteps(t, cfg.timestep_shift)
    x0 = latent_tokens.astype(jnp.float32)
    eps = noise.astype(jnp.float32)
    x_t = (1.0 - t[:, None]) * x0 + t[:, None] * eps
    parts.append(model.embed_latents(x_t, t, batch["latent_pos_ids"], debug=dbg))
    x = jnp.concatenate(parts, axis=0)
    n_und = Ct + Cv
    out = model.llm(x, n_und, _meta(batch), batch["position_id"], return_layer_outputs=debug,
                    freeze_und=cfg.freeze_und, **model._kw())
    h, layer_outs = (out if debug else (out, None))

    # text: CE on labelled positions
    with jax.named_scope("lm_head_ce"):
        logits = model.llm.logits(h[:Ct])
        labels = batch["text_labels"]
        ce_mask = labels >= 0
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.clip(labels, 0)[:, None], axis=-1)[:, 0]
        ce = jnp.where(ce_mask, logz - picked, 0.0)

    # image: flow-matching MSE on noisy target tokens (target = eps - x0)
    with jax.named_scope("velocity_mse"):
        v_pred = model.velocity(h[n_und:]).astype(jnp.float32)
        mse_mask = batch["mse_mask"] & (t > 0)
        mse = jnp.where(mse_mask[:, None], jnp.square(v_pred - (eps - x0)), 0.0)
    res = dict(ce=ce, ce_mask=ce_mask, mse=mse, mse_mask=mse_mask, hidden=h)
    if debug:
        res.update({f"dbg_{k}": v for k, v in dbg.items()})
        res["dbg_x_t"] = x_t
        res["dbg_llm_input"] = x
        res["dbg_layer_outputs"] = layer_outs
    return res


def packed_loss(model: Bagel, batch: Mapping[str, jax.Array], noise: jax.Array, latent_tokens: jax.Array,
                *, ce_weight: float = 1.0, mse_weight: float = 1.0, ce_reweighting: bool = False,
                visual_und: bool = True,
                batch_axes: tuple[str, ...] = ("data", "fsdp")) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss over a batch of packs (leading axis B on every array), normalised as the official code:
    CE = sum / (global count of CE tokens), MSE = (mean over channels, summed over tokens) / (global
    count of MSE tokens); loss = ce_weight * CE + mse_weight * MSE. `ce_reweighting` (the official
    `ce_loss_reweighting`, off by default): CE = sum of ce * `text_ce_weight` (1 / sqrt(the length of its
    text segment)) / (global sum of those weights). Under a mesh the packs' axis stays
    sharded over `batch_axes` inside the model (vmap spmd_axis_name + `qwen2_mot.pin_activation`).
    `visual_und`: see `forward_packed`."""
    def one(b, n, x0):
        return forward_packed(model, b, n, x0, visual_und=visual_und)

    out = jax.vmap(one, spmd_axis_name=batch_axes)(dict(batch), noise, latent_tokens)
    ce_count = jnp.sum(out["ce_mask"])
    mse_count = jnp.sum(out["mse_mask"])
    if ce_reweighting:
        w = jnp.where(out["ce_mask"], batch["text_ce_weight"], 0.0)
        loss_ce = jnp.sum(out["ce"] * w) / jnp.maximum(jnp.sum(w), 1e-12)
    else:
        loss_ce = jnp.sum(out["ce"]) / jnp.maximum(ce_count, 1)
    loss_mse = jnp.sum(jnp.mean(out["mse"], axis=-1)) / jnp.maximum(mse_count, 1)
    loss = ce_weight * loss_ce + mse_weight * loss_mse
    return loss, dict(loss_ce=loss_ce, loss_mse=loss_mse, ce_tokens=ce_count, mse_tokens=mse_count)
