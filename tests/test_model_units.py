"""Unit tests: mask rules on hand-made metadata, blockwise attention, RoPE, sin-cos tables, the
abstract 7B-MoT geometry, remat / attention-implementation equivalence."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echo4o_jax.config import BagelConfig, LLMConfig
from echo4o_jax.model import keymap
from echo4o_jax.model.attention import CAUSAL, FULL, NOISE, TokenMeta, attention, mask_from_meta
from echo4o_jax.model.bagel import Bagel, bagel_key_rules
from echo4o_jax.model.layers import apply_rope, gelu_tanh, rope_cos_sin, silu, sincos_2d_table
from echo4o_jax.model.loading import flax_shapes
from echo4o_jax.model.vae import AutoEncoder, vae_key_rules
from echo4o_jax.safetensors_io import SafetensorsFile
from echo4o_jax.train import flops

DATA = pathlib.Path(__file__).parent / "data"


def meta(sample, split, mode, order=None):
    n = len(sample)
    order = list(range(n)) if order is None else order
    return TokenMeta(*(jnp.asarray(x, jnp.int32) for x in (sample, split, mode, order)))


# ----------------------------------------------------------------------------------------- mask rules


def test_mask_rules_hand_made():
    # sample 0: text(3, causal) | noisy image (3, noise) | clean copy (2, full) | text (2, causal)
    # sample 1: vit image (2, full) | text (2, causal); then 2 padding tokens
    C, F, N = CAUSAL, FULL, NOISE
    sample = [0] * 10 + [1] * 4 + [-1, -1]
    split = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, -1, -1]
    mode = [C, C, C, N, N, N, F, F, C, C, F, F, C, C, C, C]
    m = np.asarray(mask_from_meta(meta(sample, split, mode), meta(sample, split, mode)))
    # text is causal
    assert m[2, :3].all() and not m[0, 1] and not m[1, 2]
    # the noisy image sees the text before it and all of itself, bidirectionally
    assert m[3:6, 0:6].all()
    # nobody after the noisy image reads it, but they read what came before it
    assert not m[6:10, 3:6].any() and m[6:10, 0:3].all()
    # clean copy: bidirectional inside, never forward across splits
    assert m[6, 7] and not m[6, 8] and not m[7, 8]
    # samples are isolated
    assert not m[:10, 10:].any() and not m[10:14, :10].any()
    # full split (vit) is bidirectional; later causal text sees it
    assert m[10, 11] and m[12, 10:12].all() and not m[10, 12]
    # padding attends only itself and nobody attends padding
    assert m[14, 14] and m[15, 15] and not m[14, 15] and not m[14, :14].any() and not m[:14, 14:].any()


def test_mask_uses_order_not_physical_position():
    # the same causal text laid out in reverse physical order: causality follows `order`
    n = 5
    a = np.asarray(mask_from_meta(meta([0] * n, [0] * n, [CAUSAL] * n), meta([0] * n, [0] * n, [CAUSAL] * n)))
    rev = list(range(n))[::-1]
    mr = meta([0] * n, [0] * n, [CAUSAL] * n, rev)
    b = np.asarray(mask_from_meta(mr, mr))
    assert np.array_equal(b, a[::-1, ::-1])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block", [8, 16, 512])
def test_blockwise_attention_equals_dense(heads, kv_heads, block):
    rng = np.random.default_rng(0)
    L, D = 37, 8
    sample = [0] * 20 + [1] * 14 + [-1] * 3
    split = [0] * 7 + [1] * 6 + [2] * 7 + [3] * 5 + [4] * 9 + [-1] * 3
    mode = [CAUSAL] * 7 + [NOISE] * 6 + [FULL] * 7 + [FULL] * 5 + [CAUSAL] * 9 + [CAUSAL] * 3
    order = list(rng.permutation(L))  # arbitrary physical layout
    mt = meta(sample, split, mode, order)
    q = jnp.asarray(rng.standard_normal((L, heads, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((L, kv_heads, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, kv_heads, D)), jnp.float32)
    dense = attention(q, k, v, mt, mt, scale=D**-0.5, impl="xla_dense")
    blk = attention(q, k, v, mt, mt, scale=D**-0.5, impl="xla_blockwise", block_q=block, block_kv=block)
    assert np.all(np.isfinite(np.asarray(blk)))
    np.testing.assert_allclose(np.asarray(blk), np.asarray(dense), atol=2e-6)
    # gradients agree too (the blockwise path is what training differentiates)
    f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(
        q, k, v, mt, mt, scale=D**-0.5, impl=impl, block_q=block, block_kv=block))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(f("xla_blockwise"), f("xla_dense")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_blockwise_attention_never_builds_full_score_matrix():
    """With blocks of 64 over 1024 tokens, no intermediate of size L x L x heads appears in the jaxpr."""
    L, H, D = 1024, 4, 16
    mt = meta([0] * L, [0] * L, [CAUSAL] * L)
    q = jnp.zeros((L, H, D))
    jaxpr = jax.make_jaxpr(lambda q: attention(q, q, q, mt, mt, scale=1.0, block_q=64, block_kv=64))(q)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                sizes.append(int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)
    walk(jaxpr.jaxpr)
    assert max(sizes) < L * L  # the largest intermediate is a (block x L)-ish slab, not L x L


# ----------------------------------------------------------------------------------------- RoPE, tables


def test_bf16_activations_are_rounded_once_as_pytorch_computes_them():
    """PyTorch computes a bf16 SiLU / tanh-GELU in float32 and rounds once; JAX's composite bf16 versions
    rounded every step (tanh-GELU up to ~240 bf16 rounding steps off in the negative tail: the connector's and
    the ViT's MLPs; SiLU 2.4). Against the exact value (float64): within one rounding to bf16 (2^-8 relative,
    + 2^-20 absolute for float32's own error near 0)."""
    x = jnp.asarray(np.linspace(-8.0, 8.0, 4097), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    exact = {"silu": x64 / (1.0 + np.exp(-x64)),
             "gelu": 0.5 * x64 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x64 + 0.044715 * x64 ** 3)))}
    for name, fn in (("silu", silu), ("gelu", gelu_tanh)):
        got = fn(x)
        assert got.dtype == jnp.bfloat16
        err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - exact[name])
        steps = err / (np.abs(exact[name]) * 2.0 ** -8 + 2.0 ** -20)
        assert steps.max() <= 1.0, (name, float(steps.max()), float(x64[steps.argmax()]))


def test_gen_mode_queries_and_keys_normalised_and_rotated_in_float32_as_the_official():
    """The official `forward_inference(mode="gen")` (the sampler's velocity, a VAE image's context update) casts
    bf16 queries / keys to float32 before q/k-norm and RoPE and rounds once after (`qk_float32`); training and
    "und" mode round at each step. Written out here as the official does it, on a bf16 model at positions in
    the thousands: the keys it caches agree (within one bf16 rounding; XLA may fuse the float32 ops in another
    order) where the stepwise bf16 path differs on about half of them. RoPE positions must be integers."""
    from echo4o_jax.model.layers import linear, rms_norm
    from echo4o_jax.model.qwen2_mot import Qwen2MoT

    cfg = LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=32)
    D, half = cfg.head_dim, cfg.head_dim // 2
    llm = Qwen2MoT(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    for expert in (llm.und, llm.gen):  # (norm weights not all ones: their product is rounded too)
        for name in ("k_norm", "q_norm", "bk"):
            a = getattr(expert, name)
            a[...] = jnp.asarray(rng.normal(1.0, 0.3, a.shape), jnp.bfloat16)
    L, n_und = 64, 3
    x = jnp.asarray(rng.normal(0.0, 1.0, (L, cfg.hidden_size)), jnp.bfloat16)
    pos = jnp.asarray(5000 + rng.integers(0, 3000, L), jnp.int32)
    meta = TokenMeta(jnp.zeros(L, jnp.int32), jnp.zeros(L, jnp.int32), jnp.full(L, FULL, jnp.int32),
                     jnp.arange(L, dtype=jnp.int32))
    cos, sin = rope_cos_sin(pos, D, cfg.rope_theta, jnp.bfloat16)  # (the official's are in the input's dtype)
    official = []
    for rows, expert in ((slice(0, n_und), llm.und), (slice(n_und, L), llm.gen)):
        p = {k: v[0] for k, v in expert.arrays().items()}
        k = linear(rms_norm(x[rows], p["input_norm"], cfg.rms_norm_eps), p["wk"], p["bk"])
        k = k.reshape(-1, cfg.num_kv_heads, D).astype(jnp.float32)  # .to(torch.float32), then k_norm, RoPE
        k = p["k_norm"].astype(jnp.float32) * (k * jax.lax.rsqrt(jnp.mean(k * k, -1, keepdims=True) + cfg.rms_norm_eps))
        c, s = cos[rows, None].astype(jnp.float32), sin[rows, None].astype(jnp.float32)
        official.append((k * c + jnp.concatenate([-k[..., half:], k[..., :half]], -1) * s).astype(jnp.bfloat16))
    want = np.asarray(jnp.concatenate(official).astype(jnp.float32))
    got = {}
    for gen_mode in (True, False):
        _, kv = llm(x, n_und, meta, pos, return_kv=True, qk_float32=gen_mode, attention_impl="xla_dense")
        got[gen_mode] = np.asarray(kv[0][0].astype(jnp.float32))
    assert np.all(np.abs(got[True] - want) <= 2.0**-7 * np.abs(want)) and np.mean(got[True] != want) < 0.01
    assert np.mean(got[False] != want) > 0.2
    with pytest.raises(TypeError, match="RoPE positions must be integers"):
        rope_cos_sin(pos.astype(jnp.bfloat16), D, cfg.rope_theta, jnp.bfloat16)


def test_rope_rotate_half_explicit_values():
    # head_dim 4, theta 100: inv_freq = [1, 0.1]; x = e0 at position p -> [cos p, 0, sin p, 0]
    p = 3
    cos, sin = rope_cos_sin(jnp.asarray([p]), 4, 100.0, jnp.float32)
    out = np.asarray(apply_rope(jnp.asarray([[[1.0, 0.0, 0.0, 0.0]]]), cos, sin))[0, 0]
    np.testing.assert_allclose(out, [np.cos(p), 0, np.sin(p), 0], atol=1e-6)
    x = jnp.asarray([[[0.0, 1.0, 0.0, 0.0]]])
    out = np.asarray(apply_rope(x, cos, sin))[0, 0]
    np.testing.assert_allclose(out, [0, np.cos(0.1 * p), 0, np.sin(0.1 * p)], atol=1e-6)


def test_rope_is_relative():
    rng = np.random.default_rng(1)
    D = 16
    q = jnp.asarray(rng.standard_normal((1, 1, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, D)), jnp.float32)

    def score(pq, pk):
        cq, sq = rope_cos_sin(jnp.asarray([pq]), D, 1e6, jnp.float32)
        ck, sk = rope_cos_sin(jnp.asarray([pk]), D, 1e6, jnp.float32)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert abs(score(7, 3) - score(104, 100)) < 1e-4
    assert abs(score(7, 3) - score(3, 7)) > 1e-3


def test_sincos_tables_match_official_checkpoint(golden_dir):
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    f = SafetensorsFile(golden_dir / "ema.safetensors")
    H = cfg.llm.hidden_size
    np.testing.assert_allclose(sincos_2d_table(cfg.max_latent_size, H), f.get("latent_pos_embed.pos_embed"), atol=1e-6)
    np.testing.assert_allclose(sincos_2d_table(cfg.vit_max_num_patch_per_side, H), f.get("vit_pos_embed.pos_embed"), atol=1e-6)


def test_sincos_table_layout():
    t = sincos_2d_table(4, 8)  # F = 2 frequencies: omega = [1, 1/100]
    y, x = 2, 3
    row = t[y * 4 + x]
    om = np.array([1.0, 0.01])
    np.testing.assert_allclose(row, np.concatenate([np.sin(x * om), np.cos(x * om), np.sin(y * om), np.cos(y * om)]), atol=1e-6)


# ----------------------------------------------------------------------------------------- 7B geometry


def _tsv():
    rows = {}
    for line in (DATA / "bagel_7b_mot_keys.tsv").read_text().splitlines():
        if line.startswith("#") or line.startswith("file\t"):
            continue
        f, key, shape = line.split("\t")
        rows.setdefault(f, {})[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return rows


def test_abstract_7b_mot_parameter_count_and_key_table():
    cfg = BagelConfig.bagel_7b_mot()
    abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    shapes = flax_shapes(abstract)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 14_607_260_128
    entries = keymap.expand_rules(bagel_key_rules(cfg))
    ours = {e.key: keymap.official_shape(e, shapes[e.path]) for e in entries}
    want = _tsv()["ema.safetensors"]
    assert len(want) == 1223
    assert ours == want

    vae_abs = nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))
    vshapes = flax_shapes(vae_abs)
    assert sum(int(np.prod(s)) for s in vshapes.values()) == 83_819_683
    ventries = keymap.expand_rules(vae_key_rules(cfg.vae))
    assert {e.key: keymap.official_shape(e, vshapes[e.path]) for e in ventries} == _tsv()["ae.safetensors"]


def test_hf_configs_round_trip_with_a_head_dim_other_than_hidden_over_heads():
    """The llm_config.json / vit_config.json written with a converted or exported checkpoint read back as
    the same geometry (head_dim 72 is not hidden / heads here: it must be written, not derived)."""
    from echo4o_jax.config import LLMConfig, ViTConfig

    llm = dataclasses.replace(BagelConfig.bagel_7b_mot().llm, hidden_size=1024, num_heads=8, head_dim=72)
    assert llm.hidden_size // llm.num_heads != llm.head_dim
    assert LLMConfig.from_hf(llm.to_hf()) == llm
    vit = BagelConfig.bagel_7b_mot().vit
    assert ViTConfig.from_hf(vit.to_hf()) == vit


# ----------------------------------------------------------------------------------------- FLOP accounting


def test_official_flop_formula_counts_one_expert_of_the_checkpoint():
    """N_active of the official MFU formula = the understanding expert's decoder matrices (q, k, v, o, gate,
    up, down; no biases or norms) + embedding + LM head, counted from the checkpoint's key table."""
    want = sum(int(np.prod(shape)) for key, shape in _tsv()["ema.safetensors"].items()
               if key.startswith("language_model.") and key.endswith(".weight") and "moe_gen" not in key
               and ("_proj." in key or key.endswith(("embed_tokens.weight", "lm_head.weight"))))
    cfg = BagelConfig.bagel_7b_mot()
    assert flops.active_params(cfg.llm) == want
    lens = np.array([700, 1300])
    assert flops.step_flops(cfg.llm, int(lens.sum()), lens) == 6.0 * want * lens.sum() + \
        12.0 * cfg.llm.head_dim * cfg.llm.num_heads * cfg.llm.num_layers * float(np.sum(lens.astype(np.float64) ** 2))


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _vision_bagel(vit_layers: int):
    """BAGEL-7B's ViT (one layer: XLA's cost analysis counts a scan body once) and connector with a small
    LLM, as abstract shapes (nothing allocated: the counts come from compiling)."""
    from echo4o_jax.config import LLMConfig

    full = BagelConfig.bagel_7b_mot()
    llm = LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=128)
    vit = dataclasses.replace(full.vit, num_layers=vit_layers)
    cfg = BagelConfig(llm=llm, vit=vit, vae=full.vae, max_latent_size=64, vit_max_num_patch_per_side=70)
    return cfg, nnx.split(nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("n", [256, 400])
def test_vit_and_connector_flops_match_xla(n):
    """The ViT + connector count for one image of n patches, forward and trained (forward + backward),
    against XLA's own count of the compiled computation (which adds the elementwise work: layer norms,
    GELU, softmax). Dense attention: XLA's cost analysis counts a loop body once, not per trip."""
    cfg, (gd, state) = _vision_bagel(1)
    pos = jnp.arange(n, dtype=jnp.int32) % cfg.vit.num_positions
    image_id = jnp.zeros((n,), jnp.int32)
    x = jax.ShapeDtypeStruct((n, cfg.vit.patch_dim), jnp.float32)

    def forward(state, x):
        m = nnx.merge(gd, state)
        m.cfg = dataclasses.replace(m.cfg, attention_impl="xla_dense")
        return m.embed_vit(x, pos, image_id)

    def trained(state, x):
        return jax.grad(lambda s: jnp.sum(forward(s, x)))(state)

    # the benchmarks' full-model count of a pack holding only this image (ViT + connector), trained, and
    # its forward (a frozen ViT's count less the connector's weight gradient)
    ours_trained = flops.full_step_flops(cfg, 0, [], [n], 0)
    H = cfg.llm.hidden_size
    ours_fwd = flops.full_step_flops(cfg, 0, [], [n], 0, freeze_vit=True) - 2 * n * (cfg.vit.hidden_size * H + H * H)
    xla_fwd, xla_trained = _xla_flops(forward, state, x), _xla_flops(trained, state, x)
    assert 0.97 * xla_fwd <= ours_fwd <= xla_fwd, (ours_fwd, xla_fwd)
    assert 0.97 * xla_trained <= ours_trained <= xla_trained, (ours_trained, xla_trained)
    assert flops.full_step_flops(cfg, 0, [], [n], 0, visual_und=False) == 0.0  # train.visual_und=False: not run
    # images attend only within themselves: a pack's count is the sum of its images' counts
    assert flops.vit_flops(cfg.vit, [n, 100]) == flops.vit_flops(cfg.vit, [n]) + flops.vit_flops(cfg.vit, [100])


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_vae_encoder_flops_match_xla(hw):
    cfg = BagelConfig.bagel_7b_mot()
    gd, state = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)).encoder))
    x = jax.ShapeDtypeStruct((1, *hw, cfg.vae.in_channels), jnp.float32)
    xla = _xla_flops(lambda s, x: nnx.merge(gd, s)(x), state, x)
    ours = flops.vae_encoder_flops(cfg.vae, [hw])
    assert 0.99 * xla <= ours <= xla, (ours, xla)
    assert flops.vae_encoder_flops(cfg.vae, [hw, hw]) == 2 * ours


# ----------------------------------------------------------------------------------------- config / remat


def _golden_pack_loss(golden_dir):
    """(base config, run(**cfg_overrides, ce_weight=1.0) -> (loss, grads as a pure dict)) on the golden
    training pack with fixed noise / latents."""
    from test_golden import golden_samples  # noqa: E402  (shared golden helpers)
    from conftest import load_npz
    from echo4o_jax import packing
    from echo4o_jax.model.bagel import packed_loss
    from echo4o_jax.model.loading import load_bagel

    base = BagelConfig.from_checkpoint_dir(golden_dir)
    d = load_npz(golden_dir / "train_step.npz")
    samples = golden_samples(d)
    batch = packing.pack_samples(samples, base, packing.budget_for(samples, base, slack=3),
                                 rng=np.random.default_rng(0))
    arrays = {k: jnp.asarray(v)[None] for k, v in packing.batch_arrays(batch).items()}
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((1, batch.vae_capacity, base.patch_latent_dim)), jnp.float32)
    x0 = jnp.asarray(rng.standard_normal((1, batch.vae_capacity, base.patch_latent_dim)), jnp.float32)

    def run(ce_weight=1.0, **kw):
        model = load_bagel(golden_dir, base.replace(**kw))
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        loss_of = lambda p: packed_loss(nnx.merge(gd, p, rest), arrays, noise, x0, ce_weight=ce_weight)[0]
        loss, g = jax.jit(jax.value_and_grad(loss_of))(params)
        return float(loss), nnx.to_pure_dict(g)

    return base, run


def test_remat_and_attention_impls_give_the_same_loss_and_grads(golden_dir):
    _, run = _golden_pack_loss(golden_dir)
    ref_loss, ref_g = run()
    for kw in (dict(remat="full"), dict(remat="dots"), dict(attention_impl="xla_dense"),
               dict(attention_block_q=8, attention_block_kv=16)):
        loss, g = run(**kw)
        assert abs(loss - ref_loss) < 1e-5, kw
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=str(kw))


def test_freeze_und_detaches_understanding_paths_as_the_official(golden_dir):
    """Official `freeze_und`: the und tokens' input, queries / keys / values, attention / MLP outputs and
    final norm are detached. Same forward; no gradient reaches the ViT, connector, text embedding, final
    norm or any und-expert weight (each of them gets one without the flag); the LM head still gets the CE
    gradient, unchanged (its input is only detached); the CE loss (read from und tokens only) no longer
    reaches any gen-expert weight; and (with two layers or more) the MSE gradient of the gen expert changes
    on this pack, whose multi-reference sample has instruction text (und) reading clean VAE tokens (gen)."""
    base, run = _golden_pack_loss(golden_dir)
    loss, g = run()
    loss_f, g_f = run(freeze_und=True)
    assert abs(loss - loss_f) < 1e-6
    norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
    for name in ("vit", "connector_fc1", "connector_fc2"):
        assert norm(g[name]) > 0 and norm(g_f[name]) == 0.0, name
    for name in ("embed", "norm"):
        assert norm(g["llm"][name]) > 0 and norm(g_f["llm"][name]) == 0.0, name
    for name in g["llm"]["und"]:
        assert norm(g["llm"]["und"][name]) > 0 and norm(g_f["llm"]["und"][name]) == 0.0, name
    np.testing.assert_allclose(np.asarray(g_f["llm"]["lm_head"]), np.asarray(g["llm"]["lm_head"]), rtol=1e-5, atol=1e-8)
    assert norm(g_f["llm"]["lm_head"]) > 0
    _, g_f_no_ce = run(freeze_und=True, ce_weight=0.0)
    for a, b in zip(jax.tree.leaves(g_f["llm"]["gen"]), jax.tree.leaves(g_f_no_ce["llm"]["gen"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    _, g_no_ce = run(ce_weight=0.0)
    diff = norm(jax.tree.map(lambda a, b: a - b, g_no_ce["llm"]["gen"], g_f_no_ce["llm"]["gen"]))
    if base.llm.num_layers > 1:
        assert diff > 1e-6 * norm(g_no_ce["llm"]["gen"])
    else:  # one layer: the und tokens' outputs (the only detached path from gen weights to the MSE) feed nothing
        assert diff <= 1e-10 * norm(g_no_ce["llm"]["gen"])


def _official_guidance(v, v_text, v_img, text_scale, img_scale, renorm_type, renorm_min):
    """NumPy (float64) of the official sampler's guidance (`_forward_flow`, ByteDance-Seed/Bagel), one image's
    velocities [tokens, channels]: the reference cfg_combine is checked against."""
    if text_scale <= 1.0:
        return v
    norm = lambda x, channel: np.linalg.norm(x, axis=-1, keepdims=True) if channel else np.linalg.norm(x)
    with_text = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        with_text = with_text * np.clip(norm(v, True) / (norm(with_text, True) + 1e-8), renorm_min, 1.0)
        return v_img + img_scale * (with_text - v_img) if img_scale > 1.0 else with_text
    both = v_img + img_scale * (with_text - v_img) if img_scale > 1.0 else with_text
    channel = renorm_type == "channel"
    return both * np.clip(norm(v, channel) / (norm(both, channel) + 1e-8), renorm_min, 1.0)


def test_cfg_combine_equals_the_official_guidance():
    """Every renorm type (the golden sampler cases run `global` and `text_channel` only), with and without the
    image branch, text scale <= 1 (no guidance), and a renorm_min that clamps."""
    from echo4o_jax.inference import CFG_RENORM_TYPES, cfg_branches, cfg_combine

    rng = np.random.default_rng(0)
    v, v_text, v_img = (rng.normal(size=(24, 16)) for _ in range(3))
    clamped = 0
    for renorm_type in CFG_RENORM_TYPES:
        for text_scale, img_scale, renorm_min in [(4.0, 1.0, 0.0), (4.0, 2.0, 0.0), (4.0, 2.0, 0.9), (1.0, 2.0, 0.0),
                                                  (0.5, 1.5, 0.5)]:
            want = _official_guidance(v, v_text, v_img, text_scale, img_scale, renorm_type, renorm_min)
            use_text, use_img = cfg_branches(text_scale, img_scale)
            got = cfg_combine(jnp.asarray(v, jnp.float32), jnp.asarray(v_text, jnp.float32) if use_text else None,
                              jnp.asarray(v_img, jnp.float32) if use_img else None,
                              text_scale=jnp.float32(text_scale), img_scale=jnp.float32(img_scale),
                              renorm_type=renorm_type, renorm_min=jnp.float32(renorm_min))
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{renorm_type} {text_scale} {img_scale} {renorm_min}")
            if renorm_min and text_scale > 1.0:  # the clamp at renorm_min acts (else 0.9 would test nothing)
                unclamped = _official_guidance(v, v_text, v_img, text_scale, img_scale, renorm_type, 0.0)
                clamped += not np.allclose(want, unclamped)
    assert clamped == len(CFG_RENORM_TYPES)


def test_the_vit_position_grid_must_fit_siglips_table():
    """ViT position ids are row * vit_max_num_patch_per_side + col into SigLIP's (image_size / patch)^2 table: a
    grid side over the table's (a smaller SigLIP with the release's 70) is a config error; a lookup past the table
    gave NaN activations silently (the official's nn.Embedding raises)."""
    from echo4o_jax.config import ConfigError

    cfg = BagelConfig.bagel_7b_mot()
    cfg.validate()  # the release: 980 / 14 = 70 = vit_max_num_patch_per_side
    small = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, image_size=384))
    with pytest.raises(ConfigError, match=r"vit_max_num_patch_per_side=70 exceeds .* 384 / patch_size 14 = 27"):
        small.validate()
    dataclasses.replace(small, vit_max_num_patch_per_side=27).validate()
