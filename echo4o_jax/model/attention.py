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

One entry point, `attention`, with a memory-efficient XLA implementation (`xla_blockwise`: flash
attention in plain XLA with a custom VJP, looping only over the (q block, kv block) pairs the mask does
not provably empty, also under vmap; never an L x L score tensor) and a dense one
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
        kernel = functools.partial(flash_attention_tpu, scale=scale, block_q=block_q, block_kv=block_kv)
        return _per_shard(kernel, q, k, v, q_meta, k_meta)
    if impl in PALLAS_IMPLS:
        from echo4o_jax.model.kernels.pallas_flash import flash_attention

        # pallas_gpu: Triton lowering on GPU, interpret mode when the default backend is the CPU;
        # pallas_interpret: always interpret mode (any backend; slow, for tests and debugging).
        interpret = True if impl == "pallas_interpret" else None
        kernel = functools.partial(flash_attention, scale=scale, block_q=block_q, block_kv=block_kv,
                                   interpret=interpret, tuning=tuning)
        return _per_shard(kernel, q, k, v, q_meta, k_meta)
    raise ValueError(f"unknown attention impl {impl!r}")


def _per_shard(kernel, q, k, v, q_meta, k_meta):
    """Run a Pallas kernel on each device's own shard under the current mesh (`jax.set_mesh`).

    The SPMD partitioner cannot split a kernel call: left alone it would gather every pack of the global
    batch onto every device. Inside `shard_map` each device runs the kernel on its local data: heads split
    over "tensor" (when the mesh has it and the KV heads divide), and, under the model's
    `vmap(..., spmd_axis_name=("data", "fsdp"))` over packs, the packs axis split over the batch axes
    (shard_map's batching rule maps the vmapped axis to `spmd_axis_name`). Without a mesh: a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, q_meta, k_meta)
    P = jax.sharding.PartitionSpec
    tp = mesh.shape.get("tensor", 1)
    heads = "tensor" if tp > 1 and k.shape[1] % tp == 0 else None
    spec, mspec = P(None, heads, None), TokenMeta(*([P(None)] * 4))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, mspec, mspec), out_specs=spec,
                         check_vma=False)(q, k, v, q_meta, k_meta)


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


# ------------------------------------------------------------------ block skipping and flash VJP (shared
# with the Pallas kernels in echo4o_jax/model/kernels)

_I32_MAX = jnp.iinfo(jnp.int32).max
_I32_MIN = jnp.iinfo(jnp.int32).min


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class _Bounds(NamedTuple):
    s_min: jax.Array  # sample range of real (sample >= 0) tokens
    s_max: jax.Array
    sp_min: jax.Array  # split range of real tokens
    sp_max: jax.Array
    o_lo: jax.Array  # q: max order of real tokens; k: min order of real non-NOISE tokens
    po_min: jax.Array  # order range of padding (sample < 0) tokens
    po_max: jax.Array


def _bounds(m: TokenMeta, b: int, is_key: bool) -> _Bounds:
    n = m.sample.shape[0] // b
    r = lambda x: x.reshape(n, b)
    s, sp, mo, o = r(m.sample), r(m.split), r(m.mode), r(m.order)
    real, pad = s >= 0, s < 0
    mn = lambda x, w: jnp.where(w, x, _I32_MAX).min(axis=1)
    mx = lambda x, w: jnp.where(w, x, _I32_MIN).max(axis=1)
    o_lo = mn(o, real & (mo != NOISE)) if is_key else mx(o, real)
    return _Bounds(mn(s, real), mx(s, real), mn(sp, real), mx(sp, real), o_lo, mn(o, pad), mx(o, pad))


def _overlap(a_min, a_max, b_min, b_max):
    return (a_min[:, None] <= b_max[None, :]) & (b_min[None, :] <= a_max[:, None])


def block_table(q_meta: TokenMeta, k_meta: TokenMeta, bq: int, bk: int) -> jax.Array:
    """Conservative bool [Lq/bq, Lk/bk]: False only if no (query, key) pair of the two blocks is allowed.

    An allowed real pair needs the same sample and either order_k <= order_q with key not NOISE
    (a NOISE key is only visible inside its own split), or the same split; padding pairs need equal
    orders among padding tokens. Each condition is relaxed to an interval-overlap test on per-block
    bounds, so the table is a superset of the exact block mask.
    """
    qb, kb = _bounds(q_meta, bq, False), _bounds(k_meta, bk, True)
    same_sample = _overlap(qb.s_min, qb.s_max, kb.s_min, kb.s_max)
    causal = kb.o_lo[None, :] <= qb.o_lo[:, None]
    same_split = _overlap(qb.sp_min, qb.sp_max, kb.sp_min, kb.sp_max)
    pad = _overlap(qb.po_min, qb.po_max, kb.po_min, kb.po_max)
    return (same_sample & (causal | same_split)) | pad


def block_lists(table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: indices of the True columns first (ascending), padded to a power of two; and counts
    (length padded to a power of two, for Triton-friendly whole-array blocks)."""
    n_rows, n_cols = table.shape
    idx = jnp.argsort(~table, axis=1, stable=True).astype(jnp.int32)
    idx = jnp.pad(idx, ((0, 0), (0, _next_pow2(n_cols) - n_cols)))
    cnt = table.sum(axis=1, dtype=jnp.int32)
    cnt = jnp.pad(cnt, (0, _next_pow2(n_rows) - n_rows))
    return idx, cnt


class _Cfg(NamedTuple):
    scale: float
    bq: int
    bk: int
    groups: int
    interpret: bool
    tiles: tuple = ()  # GPU: (fwd, dq, dkv) Tiles


def flash_vjp(fwd_call, bwd_calls, delta_fn):
    """The custom-VJP flash function of one kernel family: `fwd_call(...) -> (o, lse)`,
    `bwd_calls(...) -> (dq, dk, dv)`, `delta_fn(o, do)` = rowsum(o * do) in the kernel's layout; `lists`
    (integer block lists, no gradient) is whatever pytree the family's calls read."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def flash(q, k, v, qm, km, lists, cfg):
        return fwd_call(q, k, v, qm, km, lists, cfg)[0]

    def fwd(q, k, v, qm, km, lists, cfg):
        o, lse = fwd_call(q, k, v, qm, km, lists, cfg)
        return o, (q, k, v, qm, km, lists, o, lse)

    def bwd(cfg, res, do):
        q, k, v, qm, km, lists, o, lse = res
        dq, dk, dv = bwd_calls(q, k, v, qm, km, lists, do, lse, delta_fn(o, do), cfg)
        return dq, dk, dv, None, None, None

    flash.defvjp(fwd, bwd)
    return flash


def _blockwise(q, k, v, q_meta, k_meta, scale, block_q, block_kv):
    """Flash attention in plain XLA: the kernels' algorithm (online softmax forward, dQ and dK/dV passes
    with a custom VJP) over the compacted lists of the blocks the mask does not empty (`block_table`,
    `block_lists`); step t handles the t-th listed block of every row at once. The loops have dynamic trip
    counts (the longest list), so skipped blocks cost nothing, also under `vmap` over packs (a batched loop
    runs the longest list of the batch). Residuals: q, k, v, o and the row log-sum-exp."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    bq = min(block_q, _round_up(Lq, 8))
    bk = min(block_kv, _round_up(Lk, 8))
    Lq_p, Lk_p = _round_up(Lq, bq), _round_up(Lk, bk)
    qm = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in q_meta)), Lq_p, -1)
    km = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in k_meta)), Lk_p, -2)  # padded keys match nothing
    table = block_table(qm, km, bq, bk)
    lists = block_lists(table) + block_lists(table.T)
    pad = lambda x, L: jnp.pad(x, ((0, L - x.shape[0]), (0, 0), (0, 0)))
    cfg = _Cfg(float(scale), bq, bk, H // KVH, False)
    o = _xla_flash(pad(q, Lq_p), pad(k, Lk_p), pad(v, Lk_p), jnp.stack(qm), jnp.stack(km), lists, cfg)
    return o[:Lq]


def _step_blocks(idx, cnt, t):
    """Step t of every row's block list: (block index per row [n], whether row has a t-th block [n])."""
    n = idx.shape[0]
    return idx[:, t], t < cnt[:n]


def _scores(qb, kb, qmb, kmb, valid, scale):
    """Row-batched block pairs: qb [n, bq, KVH, G, D], kb [n, bk, KVH, D], metas [4, n, b], valid [n] ->
    (fp32 scores [n, KVH, G, bq, bk], mask [n, 1, 1, bq, bk])."""
    s = jnp.einsum("nqhgd,nkhd->nhgqk", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = jax.vmap(mask_from_meta)(TokenMeta(*qmb), TokenMeta(*kmb)) & valid[:, None, None]
    return s, mask[:, None, None]


def _xla_fwd(q, k, v, qm, km, lists, cfg):
    """Forward. Step t handles, for every q block at once, the t-th kv block of its list (rows whose list
    is shorter are masked), for t < the longest list: few large steps instead of one per block pair."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    G, bq, bk = cfg.groups, cfg.bq, cfg.bk
    nq, nk = Lq // bq, Lk // bk
    kv_idx, kv_cnt = lists[0], lists[1]
    qb, qmb = q.reshape(nq, bq, KVH, G, D), qm.reshape(4, nq, bq)
    kb_all, vb_all, kmb_all = k.reshape(nk, bk, KVH, D), v.reshape(nk, bk, KVH, D), km.reshape(4, nk, bk)

    def body(t, carry):
        m, l, acc = carry
        j, valid = _step_blocks(kv_idx, kv_cnt, t)
        s, mask = _scores(qb, kb_all[j], qmb, kmb_all[:, j], valid, cfg.scale)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        vb = vb_all[j]
        acc = acc * alpha[..., None] + jnp.einsum("nhgqk,nkhd->nhgqd", p.astype(vb.dtype), vb,
                                                  preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(axis=-1), acc

    init = (jnp.full((nq, KVH, G, bq), -jnp.inf, jnp.float32), jnp.zeros((nq, KVH, G, bq), jnp.float32),
            jnp.zeros((nq, KVH, G, bq, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, jnp.max(kv_cnt[:nq]), body, init)
    ok = l > 0
    o = acc / jnp.where(ok, l, 1.0)[..., None]
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)  # [nq, KVH, G, bq]
    return (jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(Lq, H, D).astype(q.dtype),
            jnp.transpose(lse, (1, 2, 0, 3)).reshape(KVH, G, Lq))


def _xla_bwd(q, k, v, qm, km, lists, do, lse, delta, cfg):
    """dQ (rows = q blocks, steps over their kv lists) and dK/dV (rows = kv blocks, steps over their q
    lists), each batched over rows like the forward; GQA groups are summed inside the dK/dV einsums."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    G, bq, bk = cfg.groups, cfg.bq, cfg.bk
    nq, nk = Lq // bq, Lk // bk
    kv_idx, kv_cnt, q_idx, q_cnt = lists
    qb_all, dob_all = (x.reshape(nq, bq, KVH, G, D) for x in (q, do))
    kb_all, vb_all = k.reshape(nk, bk, KVH, D), v.reshape(nk, bk, KVH, D)
    qmb_all, kmb_all = qm.reshape(4, nq, bq), km.reshape(4, nk, bk)
    lse_b, delta_b = (jnp.transpose(x.reshape(KVH, G, nq, bq), (2, 0, 1, 3)) for x in (lse, delta))

    def probs(qb, kb, qmb, kmb, valid, lse_rows):  # p [n, KVH, G, bq, bk] from the saved log-sum-exp
        s, mask = _scores(qb, kb, qmb, kmb, valid, cfg.scale)
        return jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_rows[..., None]), 0.0)

    def dq_body(t, dq):
        j, valid = _step_blocks(kv_idx, kv_cnt, t)
        kb, vb = kb_all[j], vb_all[j]
        p = probs(qb_all, kb, qmb_all, kmb_all[:, j], valid, lse_b)
        dp = jnp.einsum("nqhgd,nkhd->nhgqk", dob_all, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_b[..., None])
        return dq + jnp.einsum("nhgqk,nkhd->nqhgd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, jnp.max(kv_cnt[:nq]), dq_body, jnp.zeros((nq, bq, KVH, G, D), jnp.float32))

    def dkv_body(t, carry):
        dk, dv = carry
        i, valid = _step_blocks(q_idx, q_cnt, t)
        qb, dob = qb_all[i], dob_all[i]
        p = probs(qb, kb_all, qmb_all[:, i], kmb_all, valid, lse_b[i])
        dv = dv + jnp.einsum("nhgqk,nqhgd->nkhd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
        dp = jnp.einsum("nqhgd,nkhd->nhgqk", dob, vb_all, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_b[i][..., None])
        dk = dk + jnp.einsum("nhgqk,nqhgd->nkhd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((nk, bk, KVH, D), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, jnp.max(q_cnt[:nk]), dkv_body, (zeros, zeros))
    return ((dq * cfg.scale).reshape(Lq, H, D).astype(q.dtype), (dk * cfg.scale).reshape(Lk, KVH, D).astype(k.dtype),
            dv.reshape(Lk, KVH, D).astype(v.dtype))


def rowsum_o_do(o, do):
    """rowsum(o * do) [H, L] of [L, H, D] arrays (flash backward's delta), in float32."""
    return jnp.einsum("qhd,qhd->hq", o.astype(jnp.float32), do.astype(jnp.float32))


def _xla_bwd_calls(q, k, v, qm, km, lists, do, lse, delta, cfg):
    return _xla_bwd(q, k, v, qm, km, lists, do, lse, delta.reshape(lse.shape), cfg)


_xla_flash = flash_vjp(_xla_fwd, _xla_bwd_calls, rowsum_o_do)  # the bwd reshapes delta to [KVH, G, L]
