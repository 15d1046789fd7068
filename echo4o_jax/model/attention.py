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
attention in plain XLA with a custom VJP, looping in fixed-size chunks over the flat list of the
(q block, kv block) pairs the mask does not provably empty, also under vmap; never an L x L score
tensor) and a dense one (`xla_dense`, for tests and tiny inputs). Fused kernels (echo4o_jax/model/kernels): `pallas_gpu`
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
    chunk: int = 0,
) -> jax.Array:
    """q [Lq, H, D], k/v [Lk, KVH, D] (GQA: query head h uses KV head h // (H // KVH)) -> [Lq, H, D].
    `tuning`: Triton launch shapes of the `pallas_gpu` kernels (`kernels.pallas_flash.parse_tuning`);
    `chunk`: block pairs per loop step of `xla_blockwise` (0: the number of q blocks)."""
    Lq, H, D = q.shape
    KVH = k.shape[1]
    if H % KVH:
        raise ValueError(f"{H} query heads is not a multiple of {KVH} KV heads")
    problem = backend_problem(impl, jax.default_backend())
    if problem:
        raise ValueError(problem)
    if impl == "xla_dense":
        return _dense(q, k, v, mask_from_meta(q_meta, k_meta), scale)
    if impl == "xla_blockwise":
        return _blockwise(q, k, v, q_meta, k_meta, scale, block_q, block_kv, chunk)
    if impl == "pallas_tpu":
        from echo4o_jax.model.kernels.pallas_tpu_flash import flash_attention_tpu

        # Mosaic on TPU, interpret mode when lowered for the CPU
        kernel = _by_platform(functools.partial(flash_attention_tpu, scale=scale, block_q=block_q,
                                                block_kv=block_kv))
        return _per_shard(kernel, q, k, v, q_meta, k_meta)
    if impl in PALLAS_IMPLS:
        from echo4o_jax.model.kernels.pallas_flash import flash_attention

        # pallas_gpu: Triton on GPU, interpret mode when lowered for the CPU;
        # pallas_interpret: always interpret mode (any backend; slow, for tests and debugging).
        kernel = functools.partial(flash_attention, scale=scale, block_q=block_q, block_kv=block_kv, tuning=tuning)
        kernel = functools.partial(kernel, interpret=True) if impl == "pallas_interpret" else _by_platform(kernel)
        return _per_shard(kernel, q, k, v, q_meta, k_meta)
    raise ValueError(f"unknown attention impl {impl!r}")


def backend_problem(impl: str, backend: str) -> str | None:
    """Why `impl` cannot run on `backend` (jax.default_backend()), or None. On the CPU every kernel runs in
    interpret mode (tests; and an ahead-of-time compile for a TPU topology gets the real kernel by its lowering
    platform, `_by_platform`)."""
    own = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(impl)
    if own is None or backend in (own, "cpu"):
        return None
    fit = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla_blockwise")
    return (f"attention_impl={impl!r} is the {own.upper()} kernel and the backend is {backend!r}: use "
            f"attention_impl={fit!r} there (or xla_blockwise)")


def kernel_heads_problem(impl: str, heads: dict[str, int], tensor: int) -> str | None:
    """Why `impl` cannot use a `tensor`-way mesh axis that does not divide the KV heads, or None. A Pallas
    kernel (`_per_shard` splits the heads over "tensor" only when it divides them): every tensor device would
    gather q, k, v and run it on all heads (`tensor` times the attention work). `xla_blockwise`: the partitioner
    splits a KV head across devices inside its block-pair loops, and the step deadlocked (XLA:CPU, a mismatched
    collective rendezvous). `xla_dense` is left to the partitioner. `heads`: {what: KV heads} (the LLM's KV
    heads, the ViT's heads)."""
    if (impl not in PALLAS_IMPLS and impl != "xla_blockwise") or tensor <= 1:
        return None
    bad = [f"{what} {n}" for what, n in heads.items() if n % tensor]
    if not bad:
        return None
    why = ("its block-pair loops would split a KV head across devices (the step deadlocked on XLA:CPU)"
           if impl == "xla_blockwise" else
           f"the {impl} kernel would run the whole attention on every one of the {tensor} tensor devices")
    return (f"mesh.tensor={tensor} does not divide the KV heads ({', '.join(bad)}): {why}; use a mesh.tensor that "
            "divides them")


def model_attention_problem(cfg, tensor: int, backend: str) -> str | None:
    """Why the model config `cfg`'s attention_impl cannot run here, or None: on `backend` (`backend_problem`), or
    with a `tensor`-way mesh axis over the LLM's KV heads and the ViT's heads (`kernel_heads_problem`). The
    trainer's and generate's check."""
    return backend_problem(cfg.attention_impl, backend) or kernel_heads_problem(
        cfg.attention_impl, {"LLM": cfg.llm.num_kv_heads, "ViT": cfg.vit.num_heads}, tensor)


def _by_platform(kernel):
    """`kernel(..., interpret=...)` as a function of (q, k, v, q_meta, k_meta) whose mode is chosen by the platform
    the computation is lowered for (`lax.platform_dependent`): interpret mode for the CPU, the compiled kernel
    otherwise. Not by `jax.default_backend()`: an ahead-of-time compile for a TPU topology on a CPU-only machine
    (bench/tpu_compile.py, JAX_PLATFORMS=cpu) must get the Mosaic kernel, not its interpreted emulation."""
    def run(q, k, v, q_meta, k_meta):
        return jax.lax.platform_dependent(q, k, v, q_meta, k_meta, cpu=functools.partial(kernel, interpret=True),
                                          default=functools.partial(kernel, interpret=False))
    return run


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
    sees = mask.any(-1)[None, None, :, None]  # a row that sees no key (only in direct calls): 0, as the kernels
    p = jnp.where(sees, jax.nn.softmax(jnp.where(sees, s, 0.0), axis=-1), 0.0)  # (not NaN, nor NaN gradients)
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
    chunk: int = 0  # XLA path: block pairs per loop step


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


def pair_list(table: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The table's True (q block, kv block) pairs in row-major order, as (rows, cols, valid, count): static
    length (every block pair of the table, rounded up to a multiple of `chunk`), the first `count` entries
    are the listed pairs, `valid` marks them; the others repeat the first pair (a chunk's unused entries
    are computed fully masked: they must not read blocks the table skips, which may hold anything)."""
    nq, nk = table.shape
    flat = table.reshape(-1)
    count = flat.sum(dtype=jnp.int32)
    n_all = _round_up(nq * nk, chunk)
    idx = jnp.pad(jnp.argsort(~flat, stable=True).astype(jnp.int32), (0, n_all - nq * nk))
    valid = jnp.arange(n_all) < count
    idx = jnp.where(valid, idx, idx[0])
    return idx // nk, idx % nk, valid, count


def _blockwise(q, k, v, q_meta, k_meta, scale, block_q, block_kv, chunk=0):
    """Flash attention in plain XLA over the flat list of the (q block, kv block) pairs the mask does not
    provably empty (`block_table`, `pair_list`): step t handles pairs [t*C, (t+1)*C) of the list at once
    (C = `chunk`, default the number of q blocks), whichever rows they belong to, so the work is the listed
    pairs rounded up to one chunk, not rows x longest row. The forward merges each chunk into per-row
    online-softmax statistics with scatter-max / scatter-add (a row may appear several times in a chunk);
    the backward is one pass over the same list (dQ, dK, dV scatter-added: each score block is recomputed
    once, not once for dQ and once for dK/dV). The loops have a dynamic trip count (the listed pairs); under
    `vmap` over packs, the longest list of the batch (shorter lists' extra chunks are invalid pairs, which
    add nothing). Residuals: q, k, v, o and the row log-sum-exp."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    bq = min(block_q, _round_up(Lq, 8))
    bk = min(block_kv, _round_up(Lk, 8))
    Lq_p, Lk_p = _round_up(Lq, bq), _round_up(Lk, bk)
    qm = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in q_meta)), Lq_p, -1)
    km = _pad_meta(TokenMeta(*(jnp.asarray(x, jnp.int32) for x in k_meta)), Lk_p, -2)  # padded keys match nothing
    table = block_table(qm, km, bq, bk)
    cfg = _Cfg(float(scale), bq, bk, H // KVH, False, chunk=int(chunk) or Lq_p // bq)
    pad = lambda x, L: jnp.pad(x, ((0, L - x.shape[0]), (0, 0), (0, 0)))
    o = _xla_flash(pad(q, Lq_p), pad(k, Lk_p), pad(v, Lk_p), jnp.stack(qm), jnp.stack(km),
                   pair_list(table, cfg.chunk), cfg)
    return o[:Lq]


def _heads_major(x, b, G):
    """[L, KVH*G, D] -> [L/b, KVH, G*b, D]: blocks of b tokens, the G query heads of a KV head and the
    block's tokens on one axis (the matmul rows), so every pair's einsum is a plain batched matmul."""
    L, H, D = x.shape
    KVH = H // G
    return x.reshape(L // b, b, KVH, G, D).transpose(0, 2, 3, 1, 4).reshape(L // b, KVH, G * b, D)


def _tokens_major(x, G):
    """Inverse of `_heads_major`: [n, KVH, G*b, D] -> [n*b, KVH*G, D]."""
    n, KVH, Gb, D = x.shape
    b = Gb // G
    return x.reshape(n, KVH, G, b, D).transpose(0, 3, 1, 2, 4).reshape(n * b, KVH * G, D)


def _chunk(pairs, t, C):
    """Pairs [t*C, (t+1)*C) of the list: (rows [C], cols [C], valid [C])."""
    return tuple(jax.lax.dynamic_slice_in_dim(x, t * C, C) for x in pairs[:3])


def _pair_scores(qc, kc, qmb, kmb, r, c, ok, cfg):
    """Scores of C block pairs, qc [C, KVH, G*bq, D], kc [C, KVH, bk, D] -> (fp32 [C, KVH, G*bq, bk],
    mask of the same shape: the pair's token mask, False for invalid pairs)."""
    C, KVH, Gbq, _ = qc.shape
    s = jnp.einsum("chqd,chkd->chqk", qc, kc, preferred_element_type=jnp.float32) * cfg.scale
    mask = jax.vmap(mask_from_meta)(TokenMeta(*qmb[:, r]), TokenMeta(*kmb[:, c])) & ok[:, None, None]
    mask = jnp.broadcast_to(mask[:, None, None], (C, KVH, cfg.groups, cfg.bq, cfg.bk))
    return s, mask.reshape(C, KVH, Gbq, cfg.bk)


def _xla_fwd(q, k, v, qm, km, pairs, cfg):
    """Forward: online softmax per q-block row; a chunk's pairs raise their rows' maxima (scatter-max),
    the rows' running sums are rescaled once per chunk and the pairs' contributions scatter-added."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    G, bq, bk, C = cfg.groups, cfg.bq, cfg.bk, cfg.chunk
    nq, nk = Lq // bq, Lk // bk
    qT, kT, vT = _heads_major(q, bq, G), _heads_major(k, bk, 1), _heads_major(v, bk, 1)
    qmb, kmb = qm.reshape(4, nq, bq), km.reshape(4, nk, bk)

    def body(t, carry):
        m, l, acc = carry
        r, c, ok = _chunk(pairs, t, C)
        s, mask = _pair_scores(qT[r], kT[c], qmb, kmb, r, c, ok, cfg)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = m.at[r].max(s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        p = jnp.exp(s - m_safe[r][..., None])  # masked scores are -inf: p = 0
        pv = jnp.einsum("chqk,chkd->chqd", p.astype(vT.dtype), vT[c], preferred_element_type=jnp.float32)
        return m_new, (l * alpha).at[r].add(p.sum(axis=-1)), (acc * alpha[..., None]).at[r].add(pv)

    init = (jnp.full((nq, KVH, G * bq), -jnp.inf, jnp.float32), jnp.zeros((nq, KVH, G * bq), jnp.float32),
            jnp.zeros((nq, KVH, G * bq, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, -(-pairs[3] // C), body, init)
    ok = l > 0
    o = acc / jnp.where(ok, l, 1.0)[..., None]
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)  # [nq, KVH, G*bq]
    return _tokens_major(o, G).astype(q.dtype), lse


def _xla_bwd(q, k, v, qm, km, pairs, do, lse, delta, cfg):
    """dQ, dK and dV in one pass over the pair list (probabilities from the saved log-sum-exp); GQA groups
    are summed inside the dK/dV einsums (the G heads share the matmul's contracted axis)."""
    Lq, H, D = q.shape
    Lk, KVH, _ = k.shape
    G, bq, bk, C = cfg.groups, cfg.bq, cfg.bk, cfg.chunk
    nq, nk = Lq // bq, Lk // bk
    qT, doT, kT, vT = _heads_major(q, bq, G), _heads_major(do, bq, G), _heads_major(k, bk, 1), _heads_major(v, bk, 1)
    qmb, kmb = qm.reshape(4, nq, bq), km.reshape(4, nk, bk)
    # delta [H, Lq] -> the lse layout [nq, KVH, G*bq]
    delta = delta.reshape(KVH, G, nq, bq).transpose(2, 0, 1, 3).reshape(nq, KVH, G * bq)

    def body(t, carry):
        dq, dk, dv = carry
        r, c, ok = _chunk(pairs, t, C)
        qc, doc, kc, vc = qT[r], doT[r], kT[c], vT[c]
        s, mask = _pair_scores(qc, kc, qmb, kmb, r, c, ok, cfg)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[r][..., None]), 0.0)
        dp = jnp.einsum("chqd,chkd->chqk", doc, vc, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[r][..., None])
        dq = dq.at[r].add(jnp.einsum("chqk,chkd->chqd", ds.astype(kc.dtype), kc, preferred_element_type=jnp.float32))
        dk = dk.at[c].add(jnp.einsum("chqk,chqd->chkd", ds.astype(qc.dtype), qc, preferred_element_type=jnp.float32))
        dv = dv.at[c].add(jnp.einsum("chqk,chqd->chkd", p.astype(doc.dtype), doc, preferred_element_type=jnp.float32))
        return dq, dk, dv

    zeros_k = jnp.zeros((nk, KVH, bk, D), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, -(-pairs[3] // C), body,
                                   (jnp.zeros((nq, KVH, G * bq, D), jnp.float32), zeros_k, zeros_k))
    return (_tokens_major(dq * cfg.scale, G).astype(q.dtype), _tokens_major(dk * cfg.scale, 1).astype(k.dtype),
            _tokens_major(dv, 1).astype(v.dtype))


def rowsum_o_do(o, do):
    """rowsum(o * do) [H, L] of [L, H, D] arrays (flash backward's delta), in float32."""
    return jnp.einsum("qhd,qhd->hq", o.astype(jnp.float32), do.astype(jnp.float32))


_xla_flash = flash_vjp(_xla_fwd, _xla_bwd, rowsum_o_do)  # the bwd lays delta out as lse
