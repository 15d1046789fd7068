"""Attention over packed sequences, with the mask computed from per-token metadata.

No L x L mask ever travels in a batch. Each token carries:

    sample  int32  sample id inside the pack (-1 = padding)
    split   int32  split id (unique within the pack); an image (ViT, clean VAE or noisy VAE) is one split
    mode    int32  CAUSAL (text), FULL (ViT / clean VAE image), NOISE (noisy VAE target)
    order   int32  index in the official packed order (the causal axis; unique per token)

Rules (official `prepare_attention_mask_per_sample` / flex `create_sparse_mask`), query i, key j:
  1. only inside one sample;
  2. allowed if order[j] <= order[i] (causal) or i, j are in the same FULL/NOISE split;
  3. forbidden if j is in a NOISE split other than i's own (nobody reads a noisy image);
  4. padding (sample < 0) attends to itself only, so it stays finite and inert.

One entry point, `attention`, with a memory-efficient XLA reference implementation (`xla_blockwise`:
query blocks x key blocks with an online softmax, never an L x L score tensor) and a dense one
(`xla_dense`, for tests and tiny inputs). Fused kernels (echo4o_jax/model/kernels): `pallas_gpu`
(Pallas flash attention, forward + backward, mask computed in-kernel from the metadata, block
skipping; Triton on GPU, interpret mode on CPU), `pallas_tpu` (the same kernel laid out for Mosaic:
grid-axis kv loop, scalar-prefetched block lists; interpret mode on CPU) and `pallas_interpret`
(the GPU-shaped kernel, always interpreted).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["CAUSAL", "FULL", "NOISE", "TokenMeta", "mask_from_meta", "attention", "concat_meta"]

CAUSAL, FULL, NOISE = 0, 1, 2

# fused Pallas flash-attention kernels (echo4o_jax/model/kernels)
PALLAS_IMPLS = ("pallas_gpu", "pallas_tpu", "pallas_interpret")
IMPLS = ("xla_blockwise", "xla_dense") + PALLAS_IMPLS


class TokenMeta(NamedTuple):
    sample: jax.Array
    split: jax.Array
    mode: jax.Array
    order: jax.Array

    def slice(self, start: int, stop: int) -> "TokenMeta":
        return TokenMeta(*(x[start:stop] for x in self))


def concat_meta(*metas: TokenMeta) -> TokenMeta:
    return TokenMeta(*(jnp.concatenate(xs, axis=0) for xs in zip(*metas)))


def mask_from_meta(q: TokenMeta, k: TokenMeta) -> jax.Array:
    """Boolean [Lq, Lk] mask, True = may attend."""
    qs, ks = q.sample[:, None], k.sample[None, :]
    same_sample = (qs == ks) & (qs >= 0)
    same_split = q.split[:, None] == k.split[None, :]
    causal = k.order[None, :] <= q.order[:, None]
    bidir = same_split & (q.mode[:, None] != CAUSAL)
    hidden_noise = (k.mode[None, :] == NOISE) & ~same_split
    allowed = same_sample & (causal | bidir) & ~hidden_noise
    pad_self = (qs < 0) & (q.order[:, None] == k.order[None, :]) & (ks < 0)
    return allowed | pad_self


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    scale: float,
    impl: str = "xla_blockwise",
    block_q: int = 512,
    block_kv: int = 512,
    tuning: str = "",
) -> jax.Array:
    """q [Lq, H, D], k/v [Lk, KVH, D] (GQA: query head h uses KV head h // (H // KVH)) -> [Lq, H, D].
    `tuning`: Triton launch shapes of the `pallas_gpu` kernels (`kernels.pallas_flash.parse_tuning`)."""
    Lq, H, D = q.shape
    KVH = k.shape[1]
    if H % KVH:
        raise ValueError(f"{H} query heads is not a multiple of {KVH} KV heads")
    if impl == "xla_dense":
        return _dense(q, k, v, mask_from_meta(q_meta, k_meta), scale)
    if impl == "xla_blockwise":
        return _blockwise(q, k, v, q_meta, k_meta, scale, block_q, block_kv)
    if impl == "pallas_tpu":
        from echo4o_jax.model.kernels.pallas_tpu_flash import flash_attention_tpu

        # Mosaic on TPU, interpret mode when the default backend is the CPU
        return flash_attention_tpu(q, k, v, q_meta, k_meta, scale=scale, block_q=block_q, block_kv=block_kv)
    if impl in PALLAS_IMPLS:
        from echo4o_jax.model.kernels.pallas_flash import flash_attention

        # pallas_gpu: Triton lowering on GPU, interpret mode when the default backend is the CPU;
        # pallas_interpret: always interpret mode (any backend; slow, for tests and debugging).
        interpret = True if impl == "pallas_interpret" else None
        return flash_attention(q, k, v, q_meta, k_meta, scale=scale, block_q=block_q, block_kv=block_kv,
                               interpret=interpret, tuning=tuning)
    raise ValueError(f"unknown attention impl {impl!r}")


def _dense(q, k, v, mask, scale):
    Lq, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    qg = q.reshape(Lq, KVH, G, D)
    s = jnp.einsum("qhgd,khd->hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("hgqk,khd->qhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(Lq, H, D).astype(q.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_meta(m: TokenMeta, n: int, sample_fill: int) -> TokenMeta:
    L = m.sample.shape[0]
    if n == L:
        return m
    pad = n - L
    big = jnp.iinfo(jnp.int32).max
    return TokenMeta(
        jnp.concatenate([m.sample, jnp.full((pad,), sample_fill, jnp.int32)]),
        jnp.concatenate([m.split, jnp.full((pad,), -1, jnp.int32)]),
        jnp.concatenate([m.mode, jnp.zeros((pad,), jnp.int32)]),
        # distinct from every real order value, distinct between q padding and k padding
        jnp.concatenate([m.order, big - (2 if sample_fill == -1 else 3) - 2 * jnp.arange(pad, dtype=jnp.int32)]),
    )


def _blockwise(q, k, v, q_meta, k_meta, scale, block_q, block_kv):
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    G = H // KVH
    bq = min(block_q, _round_up(Lq, 8))
    bk = min(block_kv, _round_up(Lk, 8))
    Lq_p, Lk_p = _round_up(Lq, bq), _round_up(Lk, bk)
    q_meta = TokenMeta(*(jnp.asarray(x, jnp.int32) for x in q_meta))
    k_meta = TokenMeta(*(jnp.asarray(x, jnp.int32) for x in k_meta))
    qp = jnp.pad(q, ((0, Lq_p - Lq), (0, 0), (0, 0))).reshape(Lq_p // bq, bq, KVH, G, D)
    kp = jnp.pad(k, ((0, Lk_p - Lk), (0, 0), (0, 0))).reshape(Lk_p // bk, bk, KVH, D)
    vp = jnp.pad(v, ((0, Lk_p - Lk), (0, 0), (0, 0))).reshape(Lk_p // bk, bk, KVH, D)
    qm = _pad_meta(q_meta, Lq_p, -1)
    km = _pad_meta(k_meta, Lk_p, -2)  # padded keys match nothing
    qm_b = TokenMeta(*(x.reshape(Lq_p // bq, bq) for x in qm))
    km_b = TokenMeta(*(x.reshape(Lk_p // bk, bk) for x in km))

    @jax.checkpoint
    def one_q_block(args):
        qb, qmb, need_row = args  # [bq, KVH, G, D]; need_row [nk]: False = no allowed pair in that kv block

        def body(carry, kv):
            kb, vb, kmb, need = kv
            return jax.lax.cond(need, lambda c: update(c, kb, vb, kmb), lambda c: c, carry), None

        def update(carry, kb, vb, kmb):
            m, l, acc = carry
            s = jnp.einsum("qhgd,khd->hgqk", qb, kb, preferred_element_type=jnp.float32) * scale
            mask = mask_from_meta(TokenMeta(*qmb), TokenMeta(*kmb))[None, None]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
            alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
            l = l * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum(
                "hgqk,khd->hgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
            )
            return m_new, l, acc

        init = (
            jnp.full((KVH, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((KVH, G, bq), jnp.float32),
            jnp.zeros((KVH, G, bq, D), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(body, init, (kp, vp, tuple(km_b), need_row))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.transpose(out, (2, 0, 1, 3))  # [bq, KVH, G, D]

    # block skipping: (q block, kv block) pairs whose mask is provably empty are not computed
    from .kernels.pallas_flash import block_table

    need = block_table(qm, km, bq, bk)
    out = jax.lax.map(one_q_block, (qp, tuple(qm_b), need))
    return out.reshape(Lq_p, H, D)[:Lq].astype(q.dtype)
