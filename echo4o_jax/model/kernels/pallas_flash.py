"""Pallas flash attention (forward + backward) for BAGEL's packed masks, with block skipping.

The mask is computed *inside* the kernel from per-token metadata (`TokenMeta`: sample, split, mode,
order; rules in `attention.mask_from_meta`), stacked as one int32 [4, L] array blocked like q / k.

Block skipping: outside the kernel, cheap per-block bounds of the metadata give a conservative boolean
table `[nq, nk]` ("this (q-block, kv-block) pair may hold an allowed pair"; never False when one
exists, see `block_table`). It is compacted per q block into a list of the needed kv block indices
plus a count (and per kv block, of the needed q blocks, for the dK/dV pass); the kernels loop with a
dynamic trip count over only those blocks, so skipped blocks cost neither loads nor FLOPs.

Layout: one program per (q block, query head) for the forward and dQ passes, per (kv block, query
head) for dK/dV (GQA: per-query-head dK/dV are summed over the group in XLA). fp32 accumulation,
numerically a standard FlashAttention-2 online softmax. Head dim is zero-padded to a power of two
(Triton needs it; 72 -> 128), sequence lengths to block multiples with inert padding.

Backends: written for the Pallas Triton (GPU) lowering (power-of-two blocks, 2-D dots, scalar loads
from the block lists); `interpret=True` runs the same kernels on CPU (tests). The Mosaic (TPU) layout
of the same kernels is `pallas_tpu_flash` (it shares the mask, block table and block lists).

Why not TPU splash attention: splash masks are static numpy masks (known at trace time) combined with
dynamic `SegmentIds` that only test equality. BAGEL's rule needs, per token and per pack, the causal
axis `order` (tokens are not physically in causal order), bidirectional FULL/NOISE splits whose
extent varies per pack, and NOISE splits hidden from everything else; segment ids = sample gives
isolation only, and the rest would need a new static mask (a recompile) per packing layout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from echo4o_jax.model.attention import (CAUSAL, NOISE, TokenMeta, _Cfg, _next_pow2, _pad_meta, _round_up, block_lists,
                                        block_table, flash_vjp, rowsum_o_do)

__all__ = ["flash_attention", "block_table", "block_lists", "Tile", "parse_tuning", "default_tiles"]

_NEG = -1e30  # finite "masked" score (Triton-friendly); masked probabilities are zeroed explicitly


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


# ------------------------------------------------------------------------------------------ kernels
# (block tables, block lists and the custom-VJP wrapper are shared with the XLA path: model/attention.py)


def _rows(ref, sl=slice(None)):
    """The 4 metadata rows (sample, split, mode, order) of a [4, L] block, each loaded separately."""
    return tuple(ref[r, sl] for r in range(4))


def _mask(qm, km):
    """qm: 4 x [bq], km: 4 x [bk] (sample, split, mode, order) -> bool [bq, bk]; = attention.mask_from_meta."""
    return _mask_2d(tuple(x[:, None] for x in qm), tuple(x[None, :] for x in km))


def _mask_2d(qm, km):
    """qm: 4 x [bq, 1] columns, km: 4 x [1, bk] rows -> bool [bq, bk]."""
    qs, qsp, qmo, qo = qm
    ks, ksp, kmo, ko = km
    same_sample = (qs == ks) & (qs >= 0)
    same_split = qsp == ksp
    causal = ko <= qo
    bidir = same_split & (qmo != CAUSAL)
    hidden_noise = (kmo == NOISE) & ~same_split
    allowed = same_sample & (causal | bidir) & ~hidden_noise
    pad_self = (qs < 0) & (qo == ko) & (ks < 0)
    return allowed | pad_self


def _dot(a, b):  # a [m, k] @ b [k, n], fp32 accumulation
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_t(a, b):  # a [m, k] @ b[n, k].T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a[k, m].T @ b [k, n]
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, *, scale, bk):
    i = pl.program_id(0)
    q = q_ref[...]
    qm = _rows(qm_ref)
    bq, dp = q.shape

    def body(t, carry):
        m, l, acc = carry
        j = idx_ref[i, t]
        sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v, km = k_ref[sl, :], v_ref[sl, :], _rows(km_ref, sl)
        mask = _mask(qm, km)
        s = jnp.where(mask, _dot_t(q, k) * scale, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, dp), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    ok = l > 0
    o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, bk):
    i = pl.program_id(0)
    q, do, qm = q_ref[...], do_ref[...], _rows(qm_ref)
    lse, delta = lse_ref[...], delta_ref[...]

    def body(t, dq):
        j = idx_ref[i, t]
        sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v, km = k_ref[sl, :], v_ref[sl, :], _rows(km_ref, sl)
        mask = _mask(qm, km)
        s = _dot_t(q, k) * scale
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[:, None]), 0.0)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, bq):
    j = pl.program_id(0)
    k, v, km = k_ref[...], v_ref[...], _rows(km_ref)

    def body(t, carry):
        dk, dv = carry
        i = idx_ref[j, t]
        sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do, qm = q_ref[sl, :], do_ref[sl, :], _rows(qm_ref, sl)
        lse, delta = lse_ref[sl], delta_ref[sl]
        mask = _mask(qm, km)
        s = _dot_t(q, k) * scale
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[:, None]), 0.0)  # [bq, bk]
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta[:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[j], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------ pallas calls


class Tile(NamedTuple):
    """Triton launch shape of one kernel: q block rows, kv block rows, warps, software-pipeline stages."""
    bq: int
    bk: int
    warps: int
    stages: int


def _full(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _params(cfg: _Cfg, tile: Tile):
    if cfg.interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return dict(compiler_params=plgpu.CompilerParams(num_warps=tile.warps, num_stages=tile.stages))


def _fwd_call(q, k, v, qm, km, lists, cfg: _Cfg):
    Lq, H, dp = q.shape
    Lk = k.shape[0]
    tile = cfg.tiles[0]
    (kv_idx, kv_cnt), G = lists[0], cfg.groups
    bq = tile.bq
    q_spec = pl.BlockSpec((bq, None, dp), lambda i, h: (i, h, 0))
    kv_spec = pl.BlockSpec((Lk, None, dp), lambda i, h: (0, h // G, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, bk=tile.bk),
        grid=(Lq // bq, H),
        in_specs=[_full(kv_idx.shape), _full(kv_cnt.shape), q_spec, kv_spec, kv_spec,
                  pl.BlockSpec((4, bq), lambda i, h: (0, i)), _full(km.shape)],
        out_specs=[q_spec, pl.BlockSpec((None, bq), lambda i, h: (h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((H, Lq), jnp.float32)],
        interpret=cfg.interpret,
        name="bagel_flash_fwd",
        **_params(cfg, tile),
    )(kv_idx, kv_cnt, q, k, v, qm, km)


def _bwd_calls(q, k, v, qm, km, lists, do, lse, delta, cfg: _Cfg):
    Lq, H, dp = q.shape
    Lk, KVH, _ = k.shape
    G = cfg.groups
    (kv_idx, kv_cnt), (q_idx, q_cnt) = lists[1], lists[2]
    tile = cfg.tiles[1]
    bq, bk = tile.bq, tile.bk
    # dQ: grid over (q block, head), loop over the needed kv blocks
    q_blk = pl.BlockSpec((bq, None, dp), lambda i, h: (i, h, 0))
    kv_all = pl.BlockSpec((Lk, None, dp), lambda i, h: (0, h // G, 0))
    row_blk = pl.BlockSpec((None, bq), lambda i, h: (h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, bk=bk),
        grid=(Lq // bq, H),
        in_specs=[_full(kv_idx.shape), _full(kv_cnt.shape), q_blk, kv_all, kv_all,
                  pl.BlockSpec((4, bq), lambda i, h: (0, i)), _full(km.shape), q_blk, row_blk, row_blk],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret=cfg.interpret,
        name="bagel_flash_dq",
        **_params(cfg, tile),
    )(kv_idx, kv_cnt, q, k, v, qm, km, do, lse, delta)
    tile = cfg.tiles[2]
    bq, bk = tile.bq, tile.bk
    # dK/dV: grid over (kv block, query head), loop over the needed q blocks; summed over the group below
    q_all = pl.BlockSpec((Lq, None, dp), lambda j, h: (0, h, 0))
    kv_blk = pl.BlockSpec((bk, None, dp), lambda j, h: (j, h // G, 0))
    out_blk = pl.BlockSpec((bk, None, dp), lambda j, h: (j, h, 0))
    row_all = pl.BlockSpec((None, Lq), lambda j, h: (h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, bq=bq),
        grid=(Lk // bk, H),
        in_specs=[_full(q_idx.shape), _full(q_cnt.shape), q_all, kv_blk, kv_blk,
                  _full(qm.shape), pl.BlockSpec((4, bk), lambda j, h: (0, j)), q_all, row_all, row_all],
        out_specs=[out_blk, out_blk],
        out_shape=[jax.ShapeDtypeStruct((Lk, H, dp), jnp.float32)] * 2,
        interpret=cfg.interpret,
        name="bagel_flash_dkv",
        **_params(cfg, tile),
    )(q_idx, q_cnt, q, k, v, qm, km, do, lse, delta)
    dk = dk.reshape(Lk, KVH, G, dp).sum(axis=2)
    dv = dv.reshape(Lk, KVH, G, dp).sum(axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash = flash_vjp(_fwd_call, _bwd_calls, rowsum_o_do)


# ------------------------------------------------------------------------------------------ entry


def block_sizes(Lq: int, Lk: int, block_q: int, block_kv: int, max_block: int = 128) -> tuple[int, int]:
    """Power-of-two blocks >= 16 (Triton dot minimum), capped by `max_block` and the padded lengths."""
    bq = max(16, min(_pow2_floor(block_q), max_block, _next_pow2(max(Lq, 16))))
    bk = max(16, min(_pow2_floor(block_kv), max_block, _next_pow2(max(Lk, 16))))
    return bq, bk


def parse_tuning(text: str) -> dict[str, Tile]:
    """'fwd=128x64:w8:s3,dq=64x64:w4:s2,dkv=64x128:w8:s2' -> {kernel: Tile}; every part optional.

    Per kernel: q block rows x kv block rows (powers of two >= 16), Triton warps, pipeline stages."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            name, spec = part.split("=")
            blocks, w, st = spec.split(":")
            bq, bk = (int(x) for x in blocks.split("x"))
            if name not in ("fwd", "dq", "dkv") or not (w[0] == "w" and st[0] == "s"):
                raise ValueError
            tile = Tile(bq, bk, int(w[1:]), int(st[1:]))
        except ValueError:
            raise ValueError(f"attention tuning {part!r}: expected KERNEL=BQxBK:wWARPS:sSTAGES with KERNEL in "
                             f"fwd|dq|dkv, e.g. 'fwd=128x64:w8:s3'") from None
        if any(b < 16 or b & (b - 1) for b in (bq, bk)):
            raise ValueError(f"attention tuning {part!r}: block sizes must be powers of two >= 16")
        out[name] = tile
    return out


def default_tiles(Lq: int, Lk: int, block_q: int, block_kv: int,
                  max_block: int = 64, tuning: str = "") -> tuple[Tile, Tile, Tile]:
    """(fwd, dq, dkv) tiles. Default: 64 x 64 blocks (`block_sizes`, capped by `max_block`), 4 warps,
    3 pipeline stages for the forward and 2 for the backward kernels: the fastest of the shapes
    bench/attention_bench.py --sweep tried on an H200 for the 7B geometry's 10.7K-token pack (head dim 128,
    bf16; fwd+bwd 7.0 ms vs 13.0 ms for 128 x 128 / 8 warps; results in bench/results/). Entries of `tuning`
    (`parse_tuning`) replace them, their blocks capped by the padded lengths."""
    bq, bk = block_sizes(Lq, Lk, block_q, block_kv, max_block)
    base = Tile(bq, bk, 4, 2)
    given = parse_tuning(tuning)
    fit = lambda t: t._replace(bq=min(t.bq, _next_pow2(max(Lq, 16))), bk=min(t.bk, _next_pow2(max(Lk, 16))))
    defaults = dict(fwd=base._replace(stages=3), dq=base, dkv=base)
    return tuple(fit(given.get(name, defaults[name])) for name in ("fwd", "dq", "dkv"))


def _pad_metas(q_meta: TokenMeta, k_meta: TokenMeta, Lq_p: int, Lk_p: int) -> tuple[TokenMeta, TokenMeta]:
    qm = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in q_meta)), Lq_p, -1)
    km = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in k_meta)), Lk_p, -2)  # padded keys match nothing
    return qm, km


def prepare(q_meta: TokenMeta, k_meta: TokenMeta, Lq: int, Lk: int, bq: int, bk: int):
    """Padded metadata ([4, L] int32 each) and the block lists (forward/dQ and dK/dV directions)."""
    qm, km = _pad_metas(q_meta, k_meta, _round_up(Lq, bq), _round_up(Lk, bk))
    table = block_table(qm, km, bq, bk)
    kv_idx, kv_cnt = block_lists(table)
    q_idx, q_cnt = block_lists(table.T)
    return jnp.stack(qm), jnp.stack(km), table, (kv_idx, kv_cnt, q_idx, q_cnt)


def flash_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float, block_q: int = 128,
                    block_kv: int = 128, interpret: bool | None = None, max_block: int = 64, tuning: str = ""):
    """q [Lq, H, D], k/v [Lk, KVH, D] -> [Lq, H, D]; same contract as `attention.attention`.
    `tuning`: per-kernel launch shapes (`parse_tuning`), e.g. measured with bench/attention_bench.py --sweep."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    tiles = default_tiles(Lq, Lk, block_q, block_kv, max_block, tuning)
    Lq_p = _round_up(Lq, max(t.bq for t in tiles))  # powers of two: a multiple of every tile's block
    Lk_p = _round_up(Lk, max(t.bk for t in tiles))
    dp = max(16, _next_pow2(D))
    qm, km = _pad_metas(q_meta, k_meta, Lq_p, Lk_p)
    lists = {}
    for t in tiles:
        if (t.bq, t.bk) not in lists:
            table = block_table(qm, km, t.bq, t.bk)
            lists[t.bq, t.bk] = (block_lists(table), block_lists(table.T))
    fwd, dq, dkv = tiles
    lists = (lists[fwd.bq, fwd.bk][0], lists[dq.bq, dq.bk][0], lists[dkv.bq, dkv.bk][1])
    pad = lambda x, L: jnp.pad(x, ((0, L - x.shape[0]), (0, 0), (0, dp - D)))
    cfg = _Cfg(float(scale), fwd.bq, fwd.bk, H // KVH, bool(interpret), tiles)
    o = _flash(pad(q, Lq_p), pad(k, Lk_p), pad(v, Lk_p), jnp.stack(qm), jnp.stack(km), lists, cfg)
    return o[:Lq, :, :D]
