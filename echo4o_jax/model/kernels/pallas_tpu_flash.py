"""TPU (Mosaic) variant of the BAGEL flash-attention kernel: same mask, same block lists, TPU-style grid.

Differences from `pallas_flash` (the Triton-shaped kernel): heads lead ([H, L, D] layouts, so a block
is a clean 2-D (rows, D) tile), the kv (or q) loop is the innermost *grid* axis with fp32 VMEM scratch
accumulators, and the block lists go in as scalar-prefetch (SMEM) arrays used by the BlockSpec index
maps: step t of q block i fetches kv block list[i, t]; steps past the block's count re-use the last
needed block index (no new DMA) and are skipped with `pl.when`, so skipped blocks cost neither HBM
traffic nor MXU work. Metadata: q rows as [4, Lq, 1] columns, k rows as [4, 1, Lk] rows.

Block sizes on TPU: bq a multiple of 8, bk a multiple of 128 (lane width); interpret mode takes any.
Tested for values in interpret mode; the real Mosaic kernels compile ahead of time for v5p / v5e /
v6e topologies with libtpu on a CPU machine (tests/test_kernels.py), but have never run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from echo4o_jax.model.attention import TokenMeta, _round_up
from echo4o_jax.model.attention import _Cfg, flash_vjp
from echo4o_jax.model.kernels.pallas_flash import _NEG, _dot, _dot_t, _dot_tn, _mask_2d, prepare

__all__ = ["flash_attention_tpu"]


def _qrows(ref):  # [4, bq, 1] block -> 4 x [bq, 1] (2-D throughout: no 1-D vectors for Mosaic)
    return tuple(ref[r] for r in range(4))


def _krows(ref):  # [4, 1, bk] block -> 4 x [1, bk]
    return tuple(ref[r] for r in range(4))


def _pick(idx_ref, cnt_ref, row, t, width):
    """Block index for step t of `row`: list[row, min(t, cnt-1)] (repeats the last one: no new DMA)."""
    last = jnp.maximum(cnt_ref[row] - 1, 0)
    return idx_ref[row * width + jnp.minimum(t, last)]


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, scale, n_steps):
    i, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[i])
    def _():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        mask = _mask_2d(_qrows(qm_ref), _krows(km_ref))
        s = jnp.where(mask, _dot_t(q, k) * scale, _NEG)
        m = m_sc[...]  # [bq, 1]
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v)
        m_sc[...] = m_new

    @pl.when(t == n_steps - 1)
    def _():
        l = l_sc[...]
        ok = l > 0
        o_ref[...] = (acc_sc[...] / jnp.where(ok, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(jnp.where(ok, l, 1.0)), 0.0)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc,
               *, scale, n_steps):
    i, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[i])
    def _():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _mask_2d(_qrows(qm_ref), _krows(km_ref))
        s = _dot_t(q, k) * scale
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_ref[...]), 0.0)
        ds = p * (_dot_t(do, v) - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(t == n_steps - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, scale, n_steps):
    j, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[j])
    def _():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _mask_2d(_qrows(qm_ref), _krows(km_ref))
        s = _dot_t(q, k) * scale
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_ref[...]), 0.0)  # [bq, bk]
        dv_sc[...] += _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta_ref[...])
        dk_sc[...] += _dot_tn(ds.astype(q.dtype), q)

    @pl.when(t == n_steps - 1)
    def _():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _params(cfg):
    if cfg.interpret:
        return {}
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))


def _fwd_call(q, k, v, qm, km, lists, cfg: _Cfg):
    kv_idx, kv_cnt = lists[:2]
    H, Lq, D = q.shape
    Lk = k.shape[1]
    bq, bk, G = cfg.bq, cfg.bk, cfg.groups
    nq = Lq // bq
    width = kv_idx.shape[1]
    steps = Lk // bk
    pick = lambda i, t, idx, cnt: _pick(idx, cnt, i, t, width)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(H, nq, steps),
        in_specs=[
            pl.BlockSpec((None, bq, D), lambda h, i, t, idx, cnt: (h, i, 0)),
            pl.BlockSpec((None, bk, D), lambda h, i, t, idx, cnt: (h // G, pick(i, t, idx, cnt), 0)),
            pl.BlockSpec((None, bk, D), lambda h, i, t, idx, cnt: (h // G, pick(i, t, idx, cnt), 0)),
            pl.BlockSpec((4, bq, 1), lambda h, i, t, idx, cnt: (0, i, 0)),
            pl.BlockSpec((4, 1, bk), lambda h, i, t, idx, cnt: (0, 0, pick(i, t, idx, cnt))),
        ],
        out_specs=[pl.BlockSpec((None, bq, D), lambda h, i, t, idx, cnt: (h, i, 0)),
                   pl.BlockSpec((None, bq, 1), lambda h, i, t, idx, cnt: (h, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, n_steps=steps),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((H, Lq, 1), jnp.float32)],
        interpret=cfg.interpret,
        name="bagel_flash_fwd_tpu",
        **_params(cfg),
    )(kv_idx.reshape(-1), kv_cnt, q, k, v, qm, km)


def _bwd_calls(q, k, v, qm, km, lists, do, lse, delta, cfg: _Cfg):
    kv_idx, kv_cnt, q_idx, q_cnt = lists
    H, Lq, D = q.shape
    KVH, Lk, _ = k.shape
    bq, bk, G = cfg.bq, cfg.bk, cfg.groups
    nq, nk = Lq // bq, Lk // bk
    w_kv, w_q = kv_idx.shape[1], q_idx.shape[1]
    pick_kv = lambda i, t, idx, cnt: _pick(idx, cnt, i, t, w_kv)
    pick_q = lambda j, t, idx, cnt: _pick(idx, cnt, j, t, w_q)
    q_blk = pl.BlockSpec((None, bq, D), lambda h, i, t, idx, cnt: (h, i, 0))
    kv_sel = pl.BlockSpec((None, bk, D), lambda h, i, t, idx, cnt: (h // G, pick_kv(i, t, idx, cnt), 0))
    row_blk = pl.BlockSpec((None, bq, 1), lambda h, i, t, idx, cnt: (h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, n_steps=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(H, nq, nk),
            in_specs=[q_blk, kv_sel, kv_sel, pl.BlockSpec((4, bq, 1), lambda h, i, t, idx, cnt: (0, i, 0)),
                      pl.BlockSpec((4, 1, bk), lambda h, i, t, idx, cnt: (0, 0, pick_kv(i, t, idx, cnt))),
                      q_blk, row_blk, row_blk],
            out_specs=q_blk, scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret=cfg.interpret, name="bagel_flash_dq_tpu", **_params(cfg),
    )(kv_idx.reshape(-1), kv_cnt, q, k, v, qm, km, do, lse, delta)
    q_sel = pl.BlockSpec((None, bq, D), lambda h, j, t, idx, cnt: (h, pick_q(j, t, idx, cnt), 0))
    kv_blk = pl.BlockSpec((None, bk, D), lambda h, j, t, idx, cnt: (h // G, j, 0))
    row_sel = pl.BlockSpec((None, bq, 1), lambda h, j, t, idx, cnt: (h, pick_q(j, t, idx, cnt), 0))
    out_blk = pl.BlockSpec((None, bk, D), lambda h, j, t, idx, cnt: (h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, n_steps=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(H, nk, nq),
            in_specs=[q_sel, kv_blk, kv_blk,
                      pl.BlockSpec((4, bq, 1), lambda h, j, t, idx, cnt: (0, pick_q(j, t, idx, cnt), 0)),
                      pl.BlockSpec((4, 1, bk), lambda h, j, t, idx, cnt: (0, 0, j)),
                      q_sel, row_sel, row_sel],
            out_specs=[out_blk, out_blk],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((H, Lk, D), jnp.float32)] * 2,
        interpret=cfg.interpret, name="bagel_flash_dkv_tpu", **_params(cfg),
    )(q_idx.reshape(-1), q_cnt, q, k, v, qm, km, do, lse, delta)
    dk = dk.reshape(KVH, G, Lk, D).sum(axis=1)
    dv = dv.reshape(KVH, G, Lk, D).sum(axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash = flash_vjp(_fwd_call, _bwd_calls, lambda o, do: jnp.einsum(
    "hqd,hqd->hq", o.astype(jnp.float32), do.astype(jnp.float32))[..., None])


BLOCK = 512  # default block_q / block_kv


def block_sizes(Lq: int, Lk: int, block_q: int = BLOCK, block_kv: int = BLOCK, interpret: bool | None = None):
    """(bq, bk) the kernel runs with for these lengths (also bench/attention_bench.py's blocks_kept)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret:  # any block size; keep them >= 8 and no larger than the padded lengths
        return min(max(8, block_q), _round_up(Lq, 8)), min(max(8, block_kv), _round_up(Lk, 8))
    # (8, 128) tiling: bq rows on sublanes, bk key columns on lanes
    return (min(_round_up(max(8, block_q), 8), _round_up(Lq, 8)),
            min(_round_up(max(128, block_kv), 128), _round_up(Lk, 128)))


def flash_attention_tpu(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float, block_q: int = BLOCK,
                        block_kv: int = BLOCK, interpret: bool | None = None):
    """q [Lq, H, D], k/v [Lk, KVH, D] -> [Lq, H, D]; same contract as `attention.attention`."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    bq, bk = block_sizes(Lq, Lk, block_q, block_kv, interpret)
    Lq_p, Lk_p = _round_up(Lq, bq), _round_up(Lk, bk)
    qm, km, _, lists = prepare(q_meta, k_meta, Lq, Lk, bq, bk)
    tr = lambda x, L: jnp.transpose(jnp.pad(x, ((0, L - x.shape[0]), (0, 0), (0, 0))), (1, 0, 2))
    cfg = _Cfg(float(scale), bq, bk, H // KVH, bool(interpret))
    o = _flash(tr(q, Lq_p), tr(k, Lk_p), tr(v, Lk_p), qm[:, :, None], km[:, None, :], lists, cfg)
    return jnp.transpose(o, (1, 0, 2))[:Lq]
