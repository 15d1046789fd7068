"""Pallas flash-attention kernels (echo4o_jax/model/kernels) against the XLA reference, in interpret mode.

Random packed metadata (several samples; causal / FULL / NOISE splits; padding; shuffled physical
layout), GQA ratios 1 / 2 / 7, head dims 64 / 72 / 128, lengths that are not block multiples; values
and gradients. Block skipping is checked against a brute-force block mask and by poisoning keys that
only skipped blocks hold. The golden model forward runs with the kernel selected.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import xla_env
from echo4o_jax.config import BagelConfig, ConfigError
from echo4o_jax.model.attention import (CAUSAL, FULL, NOISE, TokenMeta, _pad_meta, attention, block_table,
                                        mask_from_meta, pair_list)
from echo4o_jax.model.kernels import pallas_flash as pf

BQ = BK = 16  # small blocks: several blocks per sequence at interpret-friendly sizes


def random_meta(rng, L: int, n_pad: int = 3, shuffle: bool = True) -> TokenMeta:
    """Samples of random segment plans (text runs, FULL and NOISE images), then padding; shuffled layout."""
    sample, split, mode = [], [], []
    s = sp = 0
    n_real = L - n_pad
    while len(sample) < n_real:
        for _ in range(int(rng.integers(1, 4))):
            if len(sample) >= n_real:
                break
            m = int(rng.choice([CAUSAL, FULL, NOISE], p=[0.5, 0.25, 0.25]))
            n = min(int(rng.integers(1, 9)), n_real - len(sample))
            if m == CAUSAL:  # each causal text token is its own split, as in the packer
                for _ in range(n):
                    sample.append(s); split.append(sp); mode.append(m); sp += 1
            else:
                sample += [s] * n; split += [sp] * n; mode += [m] * n; sp += 1
        s += 1
    for _ in range(n_pad):
        sample.append(-1); split.append(sp); mode.append(CAUSAL); sp += 1
    order = np.arange(L)
    perm = rng.permutation(L) if shuffle else np.arange(L)
    arr = lambda x: jnp.asarray(np.asarray(x, np.int32)[perm])
    return TokenMeta(arr(sample), arr(split), arr(mode), arr(order))


def qkv(rng, Lq, Lk, H, KVH, D, dtype=jnp.float32):
    f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
    return f(Lq, H, D), f(Lk, KVH, D), f(Lk, KVH, D)


def _loss(impl, meta_q, meta_k, scale, w, block=None):
    def f(q, k, v):
        o = attention(q, k, v, meta_q, meta_k, scale=scale, impl=impl, block_q=block or BQ, block_kv=block or BK)
        return jnp.sum(o * w), o
    return f


@pytest.mark.parametrize("impl,L,KVH,G,D,block", [
    ("pallas_interpret", 45, 2, 1, 64, None), ("pallas_interpret", 53, 2, 2, 72, None),
    ("pallas_interpret", 37, 1, 7, 128, None), ("pallas_tpu", 37, 1, 7, 72, None),
    # the XLA flash path (custom VJP, dynamic block lists), several block sizes
    ("xla_blockwise", 45, 2, 1, 64, 16), ("xla_blockwise", 300, 2, 3, 72, 64), ("xla_blockwise", 37, 1, 7, 128, 8),
    ("xla_blockwise", 200, 4, 2, 32, 512),
])
def test_values_and_grads_match_dense(impl, L, KVH, G, D, block):
    rng = np.random.default_rng(L)
    meta = random_meta(rng, L)
    H = KVH * G
    q, k, v = qkv(rng, L, L, H, KVH, D)
    w = jnp.asarray(rng.normal(size=(L, H, D)), jnp.float32)
    scale = D ** -0.5
    got = jax.jit(jax.value_and_grad(_loss(impl, meta, meta, scale, w, block), argnums=(0, 1, 2), has_aux=True))
    want = jax.jit(jax.value_and_grad(_loss("xla_dense", meta, meta, scale, w), argnums=(0, 1, 2), has_aux=True))
    (_, o1), g1 = got(q, k, v)
    (_, o2), g2 = want(q, k, v)
    np.testing.assert_allclose(o1, o2, atol=2e-5, rtol=1e-5)
    for name, a, b in zip("qkv", g1, g2):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("chunk,bq,bk", [(1, 16, 16), (3, 16, 8), (7, 8, 16)])
def test_xla_blockwise_chunks_of_pairs(chunk, bq, bk):
    """Chunks of the flat pair list that hold one row several times and split rows between chunks (and a
    partial last chunk), with q and kv blocks of different sizes: values and gradients equal the dense."""
    L, KVH, G, D = 150, 2, 3, 32
    rng = np.random.default_rng(chunk)
    meta = random_meta(rng, L)
    pad = lambda m, b, fill: _pad_meta(m, -(-L // b) * b, fill)
    rows, _, valid, count = pair_list(block_table(pad(meta, bq, -1), pad(meta, bk, -2), bq, bk), chunk)
    rows = np.asarray(rows)[: int(count)]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # where each row's pairs begin
    ends = np.r_[starts[1:], len(rows)]
    if chunk > 1:
        assert np.any(ends - starts >= 2) and any(a // chunk != (b - 1) // chunk for a, b in zip(starts, ends))
        assert int(count) % chunk, "the last chunk should be partial"
    q, k, v = qkv(rng, L, L, KVH * G, KVH, D)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(impl):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, meta, meta, scale=D ** -0.5, impl=impl, block_q=bq,
                                              block_kv=bk, chunk=chunk) * w)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (l1, g1), (l2, g2) = loss("xla_blockwise"), loss("xla_dense")
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for name, a, b in zip("qkv", g1, g2):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_xla_blockwise_under_vmap_with_different_packs():
    """vmap over packs whose block lists differ (the batched loops run the longest list): still exact."""
    L, H, KVH, D = 120, 4, 2, 16
    metas = [random_meta(np.random.default_rng(s), L) for s in range(3)]
    M = TokenMeta(*(jnp.stack([m[i] for m in metas]) for i in range(4)))
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(rng.normal(size=(3, L, h, D)), jnp.float32) for h in (H, KVH, KVH))

    def grads(impl):
        one = lambda q, k, v, m: jnp.sum(attention(q, k, v, m, m, scale=0.25, impl=impl, block_q=16,
                                                   block_kv=16) ** 2)
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.vmap(one)(q, k, v, M)), argnums=(0, 1, 2)))(q, k, v)

    for name, a, b in zip("qkv", grads("xla_blockwise"), grads("xla_dense")):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_separate_tiles_per_kernel_match_dense():
    """fwd, dQ and dK/dV with three different launch shapes (own block lists each): exact vs dense."""
    rng = np.random.default_rng(5)
    L, H, KVH, D = 150, 4, 2, 64
    meta = random_meta(rng, L)
    q, k, v = qkv(rng, L, L, H, KVH, D)
    w = jnp.asarray(rng.normal(size=(L, H, D)), jnp.float32)
    tuning = "fwd=32x16:w4:s2,dq=16x64:w4:s2,dkv=64x32:w4:s2"

    def loss(impl, **kw):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attention(
            q, k, v, meta, meta, scale=0.125, impl=impl, **kw) * w), argnums=(0, 1, 2)))(q, k, v)

    (l1, g1), (l2, g2) = loss("pallas_interpret", tuning=tuning), loss("xla_dense")
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for name, a, b in zip("qkv", g1, g2):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")
    tiles = pf.default_tiles(L, L, 128, 128, tuning=tuning)
    assert [t.bq for t in tiles] == [32, 16, 64] and [t.bk for t in tiles] == [16, 64, 32]


def test_tuning_errors_and_defaults():
    for bad in ("fwd=128x64", "fwd=100x64:w4:s2", "bwd=64x64:w4:s2", "fwd=8x64:w4:s2"):
        with pytest.raises(ValueError, match="attention tuning"):
            pf.parse_tuning(bad)
        with pytest.raises(ConfigError, match="attention tuning"):
            BagelConfig.bagel_7b_mot().replace(attention_impl="pallas_gpu", attention_tuning=bad).validate()
    # defaults (the H200 sweep's best): 64 x 64 blocks, 4 warps, 3 stages forward / 2 backward; capped by L
    assert pf.default_tiles(4096, 4096, 512, 512) == (pf.Tile(64, 64, 4, 3), pf.Tile(64, 64, 4, 2),
                                                           pf.Tile(64, 64, 4, 2))
    assert pf.default_tiles(20, 4096, 512, 512)[0] == pf.Tile(32, 64, 4, 3)
    assert pf.default_tiles(4096, 4096, 512, 512, tuning="dq=64x32:w8:s3")[1] == pf.Tile(64, 32, 8, 3)


def test_bf16_inputs_close_to_dense():
    rng = np.random.default_rng(1)
    L, H, KVH, D = 40, 4, 2, 64
    meta = random_meta(rng, L)
    q, k, v = qkv(rng, L, L, H, KVH, D, jnp.bfloat16)
    f = lambda impl: jax.jit(lambda q, k, v: attention(q, k, v, meta, meta, scale=D ** -0.5, impl=impl,
                                                       block_q=BQ, block_kv=BK))(q, k, v)
    o1, o2 = f("pallas_interpret"), f("xla_dense")
    assert o1.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o1, np.float32), np.asarray(o2, np.float32), atol=3e-2)


def _prepare(meta, L):
    return jax.jit(lambda m: pf.prepare(m, m, L, L, BQ, BK))(meta)


def _exact_block_mask(qm, km, bq, bk):
    mask = np.asarray(mask_from_meta(qm, km))
    Lq, Lk = mask.shape
    return mask.reshape(Lq // bq, bq, Lk // bk, bk).any(axis=(1, 3))


@pytest.mark.parametrize("seed", range(4))
def test_block_table_is_conservative(seed):
    rng = np.random.default_rng(100 + seed)
    L = 96  # one shape: one compile
    meta = random_meta(rng, L, n_pad=int(rng.integers(0, 6)), shuffle=bool(seed % 2))
    qm, km, table, _ = _prepare(meta, L)
    qm, km = TokenMeta(*qm), TokenMeta(*km)
    exact = _exact_block_mask(qm, km, BQ, BK)
    table = np.asarray(table)
    assert np.all(table[exact]), "a block with an allowed pair would be skipped"


def test_block_table_skips_in_causal_physical_order():
    """Several samples laid out in order: cross-sample blocks and blocks above the diagonal are skipped."""
    rng = np.random.default_rng(7)
    L = 128
    meta = random_meta(rng, L, n_pad=0, shuffle=False)
    qm, km, table, (kv_idx, kv_cnt, q_idx, q_cnt) = _prepare(meta, L)
    exact = _exact_block_mask(TokenMeta(*qm), TokenMeta(*km), BQ, BK)
    table = np.asarray(table)
    assert np.all(table[exact])
    n = table.shape[0]
    assert table.sum() < n * (n + 1) // 2  # strictly fewer than causal: sample isolation skips blocks
    assert not np.any(np.triu(table, 2))  # nothing far above the diagonal (bidir splits are < 16 tokens)
    # the compacted lists hold exactly the table's blocks
    kv_idx, kv_cnt = np.asarray(kv_idx), np.asarray(kv_cnt)
    for i in range(n):
        assert sorted(kv_idx[i, : kv_cnt[i]].tolist()) == np.flatnonzero(table[i]).tolist()
    q_idx, q_cnt = np.asarray(q_idx), np.asarray(q_cnt)
    for j in range(n):
        assert sorted(q_idx[j, : q_cnt[j]].tolist()) == np.flatnonzero(table[:, j]).tolist()


def test_skipped_blocks_are_never_read():
    """Keys of another sample, in whole blocks, hold NaN: any computed skipped block would poison the output
    (NaN * 0 = NaN in p @ v) and the gradients."""
    rng = np.random.default_rng(3)
    Lq, Lk, H, KVH, D = 20, 64, 2, 1, 64
    # keys: sample 0 (tokens 0..31, causal text + a FULL image), sample 1 (32..63); queries: sample 0's
    ks = np.r_[np.zeros(32), np.ones(32)].astype(np.int32)
    ksp = np.r_[np.arange(16), np.full(16, 16), 17 + np.arange(32)].astype(np.int32)
    kmo = np.r_[np.zeros(16), np.full(16, FULL), np.zeros(32)].astype(np.int32)
    kor = np.arange(Lk, dtype=np.int32)
    k_meta = TokenMeta(*map(jnp.asarray, (ks, ksp, kmo, kor)))
    sel = np.r_[np.arange(10), 16 + np.arange(10)]
    q_meta = TokenMeta(*(x[sel] for x in k_meta))
    q, k, v = qkv(rng, Lq, Lk, H, KVH, D)
    poison = jnp.asarray(np.r_[np.zeros(32), np.full(32, np.nan)], jnp.float32)[:, None, None]
    kp, vp = k + poison, v + poison
    table = np.asarray(pf.prepare(q_meta, k_meta, Lq, Lk, BQ, BK)[2])
    assert not table[:, 2:].any()  # both sample-1 key blocks are skipped for every query block
    impls = [("pallas_interpret", 0), ("pallas_tpu", 0), ("xla_blockwise", 0), ("xla_blockwise", 3)]  # (impl, chunk)
    f = lambda impl, chunk, q, k, v: attention(q, k, v, q_meta, k_meta, scale=D ** -0.5, impl=impl, block_q=BQ,
                                               block_kv=BK, chunk=chunk)
    want = f("xla_dense", 0, q, k, v)
    for impl, chunk in impls:
        got = jax.jit(lambda k, v: f(impl, chunk, q, k, v))(kp, vp)
        assert np.all(np.isfinite(got)), impl
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)
    # backward (Pallas: the dQ pass reads kv blocks, the dK/dV pass reads q blocks through the transposed
    # lists; XLA: one pass over the pair list, whose unused tail entries must not point at skipped blocks)
    for impl, chunk in (impls[0], impls[3]):
        loss = lambda q, k, v: jnp.sum(f(impl, chunk, q, k, v) * q.sum())
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kp, vp)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in g), impl
        assert not np.any(np.asarray(g[1])[32:]) and not np.any(np.asarray(g[2])[32:]), impl  # skipped: exact 0


@pytest.mark.parametrize("L,D", [(300, 72), (256, 128)])
def test_triton_lowering_on_cpu(L, D):
    """The non-interpreted kernels (forward and both backward passes) lower to Triton for CUDA on this
    CPU-only machine (no PTX compile here: that needs a GPU)."""
    rng = np.random.default_rng(0)
    meta = random_meta(rng, L)
    q, k, v = qkv(rng, L, L, 4, 2, D, jnp.bfloat16)
    f = lambda q, k, v: pf.flash_attention(q, k, v, meta, meta, scale=0.1, block_q=64, block_kv=64, interpret=False)
    g = jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    txt = jax.jit(g).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert txt.count("triton") >= 3


def test_mosaic_lowering_on_cpu(monkeypatch):
    """The non-interpreted TPU kernels (forward + both backward passes) lower to Mosaic here, with the
    device kind pinned to a TPU (Pallas asks the default device for its chip: a private hook); and, when
    libtpu is installed, compile ahead of time for a v5p topology (the Mosaic compiler proper: layouts, VMEM)."""
    import importlib.util

    from echo4o_jax.model.kernels.pallas_tpu_flash import flash_attention_tpu

    from jax._src.pallas.mosaic import tpu_info  # (private: jax is pinned; a move needs this test updated)

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    L, D, H, KVH = 300, 72, 4, 2
    S = lambda shape, dt, sh=None: jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    def step(q, k, v, m):
        f = lambda q, k, v: flash_attention_tpu(q, k, v, m, m, scale=0.1, block_q=128, block_kv=128, interpret=False)
        return jax.value_and_grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    def args(sh=None):
        return (S((L, H, D), jnp.bfloat16, sh), S((L, KVH, D), jnp.bfloat16, sh), S((L, KVH, D), jnp.bfloat16, sh),
                TokenMeta(*(S((L,), jnp.int32, sh) for _ in range(4))))

    txt = jax.jit(step).trace(*args()).lower(lowering_platforms=("tpu",)).as_text()
    assert txt.count("tpu_custom_call") >= 3
    if importlib.util.find_spec("libtpu") is None:  # (CI installs it: the tpu extra)
        pytest.skip("the lowering was checked; compiling it for a TPU topology needs libtpu (the tpu extra)")
    from jax.experimental import topologies

    dev = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
    jax.jit(step).trace(*args(jax.sharding.SingleDeviceSharding(dev))).lower().compile()


def test_config_accepts_kernel_impls():
    for impl in ("pallas_gpu", "pallas_tpu", "pallas_interpret"):
        BagelConfig.bagel_7b_mot().replace(attention_impl=impl).validate()
    with pytest.raises(ConfigError):
        BagelConfig.bagel_7b_mot().replace(attention_impl="splash").validate()


def test_golden_forward_with_kernel(golden_dir):
    """The golden training pack's forward with small attention blocks (so that the pack spans several query and
    key blocks: block skipping and the online softmax across blocks; test_golden runs one 512 block), with each
    kernel and with xla_blockwise: hidden states and per-token losses == the official recording (1e-4)."""
    from conftest import load_npz
    from test_golden import _to_official_order, max_err, pack_golden

    from echo4o_jax import packing
    from echo4o_jax.model.bagel import forward_packed, latent_tokens_from_latents
    from echo4o_jax.model.loading import load_bagel, load_vae

    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    d = load_npz(golden_dir / "train_step.npz")
    batch = pack_golden(d, cfg)
    arrays = {k: jnp.asarray(v) for k, v in packing.batch_arrays(batch).items()}
    vae = load_vae(golden_dir, cfg)
    x0 = latent_tokens_from_latents(vae.encode(arrays["vae_images"]), arrays["vae_image_index"],
                                    arrays["vae_token_hw"], cfg.latent_patch_size)
    noise = np.zeros(x0.shape, np.float32)
    noise[: len(d["packed_vae_token_indexes"])] = d["noise"]  # (as test_golden's train_case)
    L = len(batch.order)
    bq = bkv = 8  # (the smallest blocks allowed)
    assert L > 2 * bq, L  # several blocks each way
    for impl in ("xla_blockwise", "pallas_interpret", "pallas_tpu"):
        c = cfg.replace(attention_impl=impl, attention_block_q=bq, attention_block_kv=bkv)
        model = load_bagel(golden_dir, c)
        out = jax.jit(lambda b, n, x: forward_packed(model, b, n, x))(arrays, jnp.asarray(noise), x0)
        assert max_err(_to_official_order(batch, out["hidden"]), d["last_hidden_state"]) <= 1e-4, impl
        assert max_err(np.asarray(out["mse"])[np.asarray(out["mse_mask"])], d["out_mse"]) <= 1e-4, impl
        assert max_err(np.asarray(out["ce"])[np.asarray(out["ce_mask"])], d["out_ce"]) <= 1e-4, impl


_SHARDED_SCRIPT = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from test_kernels import random_meta
from echo4o_jax import sharding as shd
from echo4o_jax.model.attention import TokenMeta, attention

B, L, H, KVH, D = 4, 64, 4, 2, 16
metas = [random_meta(np.random.default_rng(s), L) for s in range(B)]
M = TokenMeta(*(jnp.stack([m[i] for m in metas]) for i in range(4)))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(B, L, h, D)), jnp.float32) for h in (H, KVH, KVH))
mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)

def grads(impl):
    one = lambda q, k, v, m: jnp.sum(attention(q, k, v, m, m, scale=0.25, impl=impl, block_q=16, block_kv=16) ** 2)
    g = jax.grad(lambda q, k, v, M: jnp.sum(jax.vmap(one, spmd_axis_name=("data", "fsdp"))(q, k, v, M)),
                 argnums=(0, 1, 2))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        f = jax.jit(g, in_shardings=(bs, bs, bs, bs))
        return f(q, k, v, M), f.lower(q, k, v, M).compile().as_text()

(a, hlo), (b, _) = grads("pallas_interpret"), grads("xla_dense")
err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
print("RESULT", err, hlo.count("all-gather"))
"""


def test_pallas_kernel_runs_per_shard_under_a_mesh(tmp_path):
    """Under the trainer's mesh (data 2 x fsdp 2 x tensor 2, 8 CPU devices) and the model's vmap over
    packs, the kernel runs on each device's own packs and heads (shard_map): exact gradients and no
    all-gather in the compiled step (a bare kernel call gathers every pack onto every device)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = xla_env(devices=8)
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(root), str(root / "tests")], env=env,
                         capture_output=True, text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    err, gathers = line[0].split()[1:]
    assert float(err) < 1e-4 and int(gathers) == 0, line[0]


def test_rows_that_see_no_key_are_zero_everywhere():
    """A query row whose keys are all masked (only in direct calls: in the model every token sees itself): every
    implementation gives 0 there, and finite gradients; the reference gave NaN, and NaN in dV for every key."""
    rng = np.random.default_rng(5)
    L, H, KVH, D = 24, 4, 2, 64
    km = random_meta(rng, L, n_pad=0, shuffle=False)
    # queries of sample 0, then two rows of a sample no key has (sample 99): they see nothing
    qm = TokenMeta(*(jnp.concatenate([x[:6], jnp.asarray([99, 99] if i == 0 else x[:2], jnp.int32)])
                     for i, x in enumerate(km)))
    assert not bool(mask_from_meta(qm, km)[-2:].any()) and bool(mask_from_meta(qm, km)[:-2].any(-1).all())
    q, k, v = qkv(rng, 8, L, H, KVH, D)
    w = jnp.asarray(rng.normal(size=(8, H, D)), jnp.float32)
    res = {}
    for impl in ("xla_dense", "xla_blockwise", "pallas_interpret", "pallas_tpu"):
        (_, o), g = jax.jit(jax.value_and_grad(_loss(impl, qm, km, D ** -0.5, w, 8), argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
        assert bool(jnp.all(o[-2:] == 0)), impl
        assert all(bool(jnp.isfinite(x).all()) for x in (o, *g)), impl
        res[impl] = (o, g)
    for impl, (o, g) in res.items():
        np.testing.assert_allclose(o, res["xla_dense"][0], atol=2e-5, rtol=1e-5, err_msg=impl)
        for a, b in zip(g, res["xla_dense"][1]):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=impl)


def test_kernel_of_another_backend_is_refused(monkeypatch):
    """pallas_gpu where the default backend is a TPU (a bare AssertionError deep in Pallas) and pallas_tpu on a GPU
    are one error naming the implementation that fits; on the CPU both run (interpreted)."""
    from echo4o_jax.model.attention import backend_problem

    assert backend_problem("pallas_gpu", "tpu") == ("attention_impl='pallas_gpu' is the GPU kernel and the "
                                                    "backend is 'tpu': use attention_impl='pallas_tpu' there (or "
                                                    "xla_blockwise)")
    assert "use attention_impl='pallas_gpu'" in backend_problem("pallas_tpu", "gpu")
    for impl in ("pallas_gpu", "pallas_tpu", "pallas_interpret", "xla_blockwise", "xla_dense"):
        assert backend_problem(impl, "cpu") is None
    assert backend_problem("pallas_interpret", "tpu") is None and backend_problem("xla_blockwise", "gpu") is None
    rng = np.random.default_rng(0)
    meta = random_meta(rng, 16, n_pad=0)
    q, k, v = qkv(rng, 16, 16, 2, 1, 64)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="'pallas_gpu' is the GPU kernel .* use attention_impl='pallas_tpu'"):
        attention(q, k, v, meta, meta, scale=0.1, impl="pallas_gpu")


def test_pallas_tpu_compiles_the_mosaic_kernel_for_a_tpu_topology_from_the_cpu():
    """`attention(impl="pallas_tpu")` lowered for a TPU topology on this CPU-only machine (JAX_PLATFORMS=cpu, as
    bench/tpu_compile.py does) is the Mosaic kernel (tpu_custom_call), not its interpreted emulation: the mode is
    the lowering platform's, not jax.default_backend()'s (which is the CPU here, and chose interpret mode)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:  # (CI installs it: the tpu extra)
        pytest.skip("a TPU topology needs libtpu (the tpu extra)")
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devs = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[:1]
    mesh = jax.sharding.Mesh(np.array(devs), ("data",))
    L, H, KVH, D = 256, 4, 2, 128
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)

    def step(q, k, v, m):
        f = lambda q, k, v: attention(q, k, v, m, m, scale=0.1, impl="pallas_tpu", block_q=128, block_kv=128)
        return jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    args = (S((L, H, D), jnp.bfloat16), S((L, KVH, D), jnp.bfloat16), S((L, KVH, D), jnp.bfloat16),
            TokenMeta(*(S((L,), jnp.int32) for _ in range(4))))
    with jax.set_mesh(mesh):  # (Pallas reads the chip generation from the mesh's devices)
        lowered = jax.jit(step).lower(*args)
        assert lowered.as_text().count("tpu_custom_call") >= 3  # forward, dq, dkv
        lowered.compile()


def test_block_sizes_below_8_and_a_negative_chunk_are_config_errors():
    for k, v in (("attention_block_q", 0), ("attention_block_kv", -16), ("attention_block_q", 4),
                 ("attention_chunk", -1)):
        with pytest.raises(ConfigError, match=f"{k}={v} must be >= 0" if k == "attention_chunk" else f"{k}={v} must"):
            BagelConfig.bagel_7b_mot().replace(**{k: v}).validate()
    BagelConfig.bagel_7b_mot().replace(attention_block_q=8, attention_block_kv=8, attention_chunk=3).validate()


def test_a_tensor_axis_that_does_not_divide_the_kv_heads_is_refused_for_the_kernels():
    """The kernels split heads over "tensor" only when it divides the KV heads; otherwise each tensor device would
    run the whole attention (8x the work for the 7B's 4 KV heads at tensor=8): refused, naming the heads."""
    from echo4o_jax.model.attention import kernel_heads_problem
    from echo4o_jax.train.trainer import ConfigValueError, check_attention_mesh

    cfg = BagelConfig.bagel_7b_mot().replace(attention_impl="pallas_tpu")
    with pytest.raises(ConfigValueError, match=r"mesh.tensor=8 does not divide the KV heads \(LLM 4\): the "
                                               r"pallas_tpu kernel .* \(model.attention_impl='pallas_tpu'\)"):
        check_attention_mesh(cfg, 8, backend="tpu")
    for t in (1, 2, 4):
        check_attention_mesh(cfg, t, backend="tpu")
    check_attention_mesh(cfg.replace(attention_impl="xla_dense"), 8, backend="tpu")  # (the partitioner's)
    with pytest.raises(ConfigValueError, match=r"mesh.tensor=8 does not divide the KV heads \(LLM 4\): its block-pair "
                                               r"loops would split a KV head across devices"):
        check_attention_mesh(cfg.replace(attention_impl="xla_blockwise"), 8, backend="tpu")
    assert "ViT 16" in kernel_heads_problem("pallas_gpu", {"LLM": 4, "ViT": 16}, 32)
    with pytest.raises(ConfigValueError, match=r"'pallas_tpu' is the TPU kernel .* \(model.attention_impl='pallas_tpu'\)"):
        check_attention_mesh(cfg, 1, backend="gpu")


def test_attention_chunk_reaches_the_blockwise_loop(golden_dir, monkeypatch):
    """model.attention_chunk (xla_blockwise's block pairs per loop step) is what the LLM's and the ViT's attention
    calls get, and changes no value."""
    from echo4o_jax.model import qwen2_mot, siglip
    from echo4o_jax.model.loading import load_bagel

    cfg = BagelConfig.from_checkpoint_dir(golden_dir).replace(attention_block_q=8, attention_block_kv=8)
    seen = []
    real = attention

    def spy(*a, **kw):
        seen.append(kw["chunk"])
        return real(*a, **kw)

    monkeypatch.setattr(qwen2_mot, "attention", spy)
    monkeypatch.setattr(siglip, "attention", spy)
    rng = np.random.default_rng(0)
    n = 12
    meta = random_meta(rng, n, n_pad=0, shuffle=False)
    outs = []
    x = jnp.asarray(rng.normal(size=(n, cfg.llm.hidden_size)), jnp.float32)
    for chunk in (0, 1):
        model = load_bagel(golden_dir, cfg=cfg.replace(attention_chunk=chunk))
        outs.append(model.llm(x, n // 2, meta, meta.order, **model._kw()))
        patches = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 3 * cfg.vit.patch_size ** 2)), jnp.float32)
        model.vit(patches, jnp.arange(4), jnp.zeros(4, jnp.int32), **model._kw())
    assert set(seen[:len(seen) // 2]) == {0} and set(seen[len(seen) // 2:]) == {1}
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
