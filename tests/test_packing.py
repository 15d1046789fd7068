"""The packer against the official `PackedDataset.pack_sequence` (golden train_step.npz) and hand-made cases."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import load_npz, npz_json
from echo4o_jax.config import BagelConfig, LLMConfig, SpecialTokens, VAEConfig, ViTConfig
from echo4o_jax.model import attention as attn
from echo4o_jax.packing import (
    CAUSAL,
    FULL,
    NOISE,
    PackBudget,
    PackError,
    PackOverflowError,
    attention_masks,
    batch_arrays,
    budget_for,
    dense_attention_mask,
    pack_samples,
    sample_sizes,
    stack_batches,
    to_official,
)


# ---------------------------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden(golden_dir):
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    g = load_npz(golden_dir / "train_step.npz")
    samples = npz_json(g["samples_json"])
    for i, s in enumerate(samples):
        n_img = sum(it["type"] in ("vit_image", "vae_image") for it in s["sequence_plan"])
        s["image_tensor_list"] = [g[f"sample_{i}_image_{j}"] for j in range(n_img)]
    # one raw timestep per noisy VAE image, in order
    ts, start = [], 0
    for h, w in g["patchified_vae_latent_shapes"]:
        t = g["packed_timesteps_raw"][start]
        if np.isfinite(t):
            ts.append(float(t))
        start += int(h * w)
    return cfg, g, samples, ts


def _pack_golden(golden, slack=5):
    cfg, g, samples, ts = golden
    tight = budget_for(samples, cfg)
    ds = cfg.latent_downsample
    budget = PackBudget(
        text_tokens=tight.text_tokens + slack,
        vit_tokens=tight.vit_tokens + slack,
        vae_tokens=tight.vae_tokens + slack,
        vae_images=tight.vae_images + 1,
        vae_image_size=(tight.vae_image_size[0] + ds, tight.vae_image_size[1] + 2 * ds),
    )
    it = iter(ts)
    before = copy.deepcopy(npz_json(g["samples_json"]))
    batch = pack_samples(samples, cfg, budget, rng=np.random.default_rng(0), timestep_fn=lambda: next(it))
    assert next(it, None) is None  # one draw per noisy image
    # caller's lists untouched
    assert [{k: s[k] for k in ("text_ids_list", "sequence_plan")} for s in samples] == before
    assert all(len(s["image_tensor_list"]) > 0 for s in samples)
    return batch, budget


def test_golden_official_arrays(golden):
    cfg, g, samples, ts = golden
    batch, budget = _pack_golden(golden)
    o = to_official(batch)
    assert o["sequence_length"] == int(g["sequence_length"]) == batch.num_tokens
    assert batch.num_samples == len(samples)
    for k in ("sample_lens", "packed_text_ids", "packed_text_indexes", "packed_position_ids",
              "packed_vit_position_ids", "packed_vit_token_indexes", "vit_token_seqlens",
              "packed_latent_position_ids", "packed_vae_token_indexes", "patchified_vae_latent_shapes",
              "mse_loss_indexes", "packed_label_ids", "ce_loss_indexes"):
        np.testing.assert_array_equal(o[k], g[k], err_msg=k)
    np.testing.assert_array_equal(o["packed_vit_tokens"], g["packed_vit_tokens"])
    np.testing.assert_array_equal(o["packed_timesteps"], g["packed_timesteps_raw"])  # -inf included
    np.testing.assert_allclose(o["ce_loss_weights"], g["ce_loss_weights"], rtol=1e-6)
    assert o["padded_images"].shape == g["padded_images"].shape
    np.testing.assert_array_equal(o["padded_images"], g["padded_images"])


def test_golden_attention_masks(golden):
    cfg, g, samples, _ = golden
    batch, _ = _pack_golden(golden)
    masks = attention_masks(batch)
    assert len(masks) == len(samples)
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(m, g[f"attention_mask_{i}"], err_msg=f"attention_mask_{i}")


def test_golden_layout_invariants(golden):
    cfg, g, samples, _ = golden
    batch, budget = _pack_golden(golden)
    L = budget.total_tokens
    T, V = budget.text_tokens, budget.vit_tokens
    for k in ("sample_id", "split_id", "split_mode", "order", "position_id"):
        assert getattr(batch, k).shape == (L,) and getattr(batch, k).dtype == np.int32, k
    # order is a permutation of 0..L-1, real tokens first
    assert sorted(batch.order.tolist()) == list(range(L))
    real = batch.sample_id >= 0
    assert real.sum() == batch.num_tokens
    assert (batch.order[real] < batch.num_tokens).all() and (batch.order[~real] >= batch.num_tokens).all()
    pad_order = batch.order[~real]
    assert (np.diff(pad_order) > 0).all()
    # within each segment real tokens come first, in official order
    for sl in (batch.text_slice, batch.vit_slice, batch.vae_slice):
        r = real[sl]
        n = r.sum()
        assert r[:n].all() and not r[n:].any()
        assert (np.diff(batch.order[sl][:n]) > 0).all()
    # segments hold the right kinds of tokens
    st = cfg.special_tokens
    o = to_official(batch)
    assert real[:T].sum() == len(g["packed_text_ids"])
    assert real[T:T + V].sum() == len(g["packed_vit_tokens"])
    assert real[T + V:].sum() == len(g["packed_vae_token_indexes"])
    assert (batch.split_mode[T:T + V][real[T:T + V]] == FULL).all()
    # padding values
    assert (batch.text_ids[~real[:T]] == 0).all() and (batch.text_labels[~real[:T]] == -1).all()
    assert (batch.vit_image_id[~real[T:T + V]] == -1).all()
    assert (batch.vae_image_index[~real[T + V:]] == -1).all()
    assert np.isneginf(batch.timestep_raw[~real[T + V:]]).all()
    assert not batch.mse_mask[~real[T + V:]].any()
    # images: NHWC, zero padded, hw recorded
    n_img = len(g["patchified_vae_latent_shapes"])
    assert batch.vae_images.shape == (budget.vae_images, *budget.vae_image_size, 3)
    assert (batch.vae_image_hw[n_img:] == 0).all() and not batch.vae_images[n_img:].any()
    for i in range(n_img):
        H, W = batch.vae_image_hw[i]
        assert not batch.vae_images[i, H:].any() and not batch.vae_images[i, :, W:].any()
    # vae_token_hw matches latent positions
    sel = real[T + V:]
    np.testing.assert_array_equal(
        batch.latent_pos_ids[sel], batch.vae_token_hw[sel, 0] * cfg.max_latent_size + batch.vae_token_hw[sel, 1]
    )
    assert {st.bos_token_id, st.eos_token_id}.issubset(set(o["packed_text_ids"].tolist()))


def test_stack_and_arrays(golden):
    batch, budget = _pack_golden(golden)
    d = batch_arrays(batch)
    assert d["sample_id"].shape == (budget.total_tokens,) and int(d["num_tokens"]) == batch.num_tokens
    st = stack_batches([batch, batch])
    assert st.sample_id.shape == (2, budget.total_tokens)
    assert st.vae_images.shape[0] == 2 and list(st.num_tokens) == [batch.num_tokens] * 2
    with pytest.raises(ValueError, match="one pack"):
        to_official(st)


def test_sample_sizes_match_golden(golden):
    cfg, g, samples, _ = golden
    sizes = [sample_sizes(s, cfg) for s in samples]
    assert [s.total_tokens for s in sizes] == list(g["sample_lens"])


# ---------------------------------------------------------------------------------------------- hand-made

BOS, EOS, SOI, EOI = 90, 91, 92, 93


def _cfg() -> BagelConfig:
    llm = LLMConfig(vocab_size=100, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4)
    vit = ViTConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, patch_size=2)
    return BagelConfig(llm=llm, vit=vit, vae=VAEConfig(), max_latent_size=4, vit_max_num_patch_per_side=8,
                       special_tokens=SpecialTokens(BOS, EOS, SOI, EOI))


def _item(typ, loss=0, cfg=0, stl=0, label=None):
    return {"type": typ, "loss": loss, "enable_cfg": cfg, "special_token_loss": stl, "special_token_label": label}


def _img(h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


BIG = PackBudget(text_tokens=64, vit_tokens=64, vae_tokens=64, vae_images=4, vae_image_size=(64, 64))


def _official_mask(split_lens, modes):
    """Official `prepare_attention_mask_per_sample` (test oracle)."""
    n = sum(split_lens)
    m = np.zeros((n, n), bool)
    c = 0
    for s, mode in zip(split_lens, modes):
        m[c:c + s, c:c + s] = np.tril(np.ones((s, s), bool)) if mode == "causal" else True
        m[c:c + s, :c] = True
        c += s
    c = 0
    for s, mode in zip(split_lens, modes):
        if mode == "noise":
            m[:, c:c + s] = False
            m[c:c + s, c:c + s] = True
        c += s
    return m


def test_constants_match_attention():
    assert (CAUSAL, FULL, NOISE) == (attn.CAUSAL, attn.FULL, attn.NOISE)


def test_mask_rules_edit_sample():
    cfg = _cfg()
    # text -> noisy image -> clean copy of it -> ViT image -> text ; second sample: text only
    s0 = {"text_ids_list": [[1, 2, 3], [4, 5]],
          "sequence_plan": [_item("text"), _item("vae_image", loss=1), _item("vae_image"), _item("vit_image"),
                            _item("text", loss=1)],
          "image_tensor_list": [_img(32, 32), _img(32, 32), _img(4, 6)]}
    s1 = {"text_ids_list": [[7]], "sequence_plan": [_item("text")], "image_tensor_list": []}
    b = pack_samples([s0, s1], cfg, BIG, rng=np.random.default_rng(0), timestep_fn=lambda: 0.5)
    o = to_official(b)
    # layout: text(5) | noisy(4+2) | clean(4+2) | vit(6+2) | text(4) ; sample 1: text(3)
    assert o["split_lens"].tolist() == [5, 6, 6, 8, 4, 3]
    assert o["attn_modes"] == ["causal", "noise", "full", "full", "causal", "causal"]
    assert o["sample_lens"].tolist() == [29, 3]
    # positions: noisy image does not advance rope, clean copy shares its position
    assert o["packed_position_ids"].tolist() == (
        [0, 1, 2, 3, 4] + [5] * 6 + [5] * 6 + [6] * 8 + [7, 8, 9, 10] + [0, 1, 2])
    assert o["packed_timesteps"][:4].tolist() == [0.5] * 4 and np.isneginf(o["packed_timesteps"][4:]).all()
    assert o["mse_loss_indexes"].tolist() == [6, 7, 8, 9]
    assert o["packed_label_ids"].tolist() == [4, 5, EOS]
    np.testing.assert_allclose(o["ce_loss_weights"], [1 / np.sqrt(3)] * 3, rtol=1e-6)

    m0, m1 = attention_masks(b)
    np.testing.assert_array_equal(m0, _official_mask([5, 6, 6, 8, 4], ["causal", "noise", "full", "full", "causal"]))
    np.testing.assert_array_equal(m1, np.tril(np.ones((3, 3), bool)))
    noisy = slice(5, 11)
    assert not m0[11:, noisy].any()  # later tokens (clean copy, ViT, text) never see the noisy split
    assert m0[noisy, noisy].all() and m0[noisy, :5].all()  # noisy image: bidirectional, sees the text
    assert m0[11:17, 11:17].all() and not m0[11:17, 17:].any()  # full split bidirectional, not forward
    assert m0[17:25, 17:25].all()

    # whole-array mask: samples isolated, padding attends only itself, nobody attends padding
    full = dense_attention_mask(b)
    sid = b.sample_id
    assert not (full & (sid[:, None] != sid[None, :]) & (sid[:, None] >= 0)).any()
    pad = sid < 0
    np.testing.assert_array_equal(full[np.ix_(pad, pad)], np.eye(pad.sum(), dtype=bool))
    assert not full[np.ix_(pad, ~pad)].any() and not full[np.ix_(~pad, pad)].any()


def test_vit_tokens_and_special_token_loss():
    cfg = _cfg()
    img = _img(4, 6, seed=3)
    s = {"text_ids_list": [[1]],
         "sequence_plan": [_item("vit_image", stl=1, label=EOS), _item("text", stl=1, label=EOS)],
         "image_tensor_list": [img]}
    b = pack_samples([s], cfg, BIG, rng=np.random.default_rng(0))
    o = to_official(b)
    assert o["packed_text_ids"].tolist() == [SOI, EOI, BOS, 1, EOS]
    assert o["packed_text_indexes"].tolist() == [0, 7, 8, 9, 10]
    assert o["packed_vit_token_indexes"].tolist() == list(range(1, 7))
    assert o["packed_vit_position_ids"].tolist() == [0, 1, 2, 8, 9, 10]
    # token (r, c) = image[:, 2r:2r+2, 2c:2c+2] in (kh, kw, c) order
    np.testing.assert_array_equal(o["packed_vit_tokens"][4], img[:, 2:4, 2:4].transpose(1, 2, 0).reshape(-1))
    assert o["ce_loss_indexes"].tolist() == [7, 10] and o["packed_label_ids"].tolist() == [EOS, EOS]
    assert o["ce_loss_weights"].tolist() == [1.0, 1.0]


def test_dropout_text():
    cfg = _cfg()
    s = {"text_ids_list": [[1, 2], [3]], "sequence_plan": [_item("text", cfg=1), _item("text")],
         "image_tensor_list": []}
    b = pack_samples([s], cfg, BIG, rng=np.random.default_rng(0), text_dropout=1.0)
    o = to_official(b)
    assert o["packed_text_ids"].tolist() == [BOS, 3, EOS]
    assert o["packed_position_ids"].tolist() == [0, 1, 2]  # rope not advanced


@pytest.mark.parametrize("typ,hw", [("vit_image", (4, 4)), ("vae_image", (32, 16))])
def test_dropout_image(typ, hw):
    cfg = _cfg()
    s = {"text_ids_list": [[1], [2]],
         "sequence_plan": [_item("text"), _item(typ, cfg=1), _item("text")],
         "image_tensor_list": [_img(*hw)]}
    kw = {"vit_dropout": 1.0} if typ == "vit_image" else {"vae_dropout": 1.0}
    b = pack_samples([s], cfg, BIG, rng=np.random.default_rng(0), **kw)
    o = to_official(b)
    assert o["sequence_length"] == 6 and o["packed_text_ids"].tolist() == [BOS, 1, EOS, BOS, 2, EOS]
    assert o["packed_position_ids"].tolist() == [0, 1, 2, 4, 5, 6]  # rope advanced by 1
    assert len(o["packed_vit_tokens"]) == 0 and len(o["packed_vae_token_indexes"]) == 0
    assert o["padded_images"].shape[0] == 0 and not b.vae_image_hw.any()
    # items without enable_cfg are never dropped
    s["sequence_plan"][1]["enable_cfg"] = 0
    b = pack_samples([s], cfg, BIG, rng=np.random.default_rng(0), **kw)
    assert b.num_tokens > 6


def test_default_timestep_uses_rng():
    cfg = _cfg()
    s = {"text_ids_list": [], "sequence_plan": [_item("vae_image", loss=1)], "image_tensor_list": [_img(16, 16)]}
    b = pack_samples([s], cfg, BIG, rng=np.random.default_rng(7))
    assert b.timestep_raw[0] == np.float32(np.random.default_rng(7).standard_normal())
    assert b.mse_mask[0] and b.split_mode[b.vae_slice][0] == NOISE


def test_overflow_errors():
    cfg = _cfg()
    s = {"text_ids_list": [[1, 2, 3]], "id": "abc",
         "sequence_plan": [_item("text"), _item("vit_image"), _item("vae_image")],
         "image_tensor_list": [_img(4, 4), _img(32, 48)]}
    need = budget_for([s], cfg)
    assert (need.text_tokens, need.vit_tokens, need.vae_tokens, need.vae_images, need.vae_image_size) == (
        9, 4, 6, 1, (32, 48))
    pack_samples([s], cfg, need, rng=np.random.default_rng(0))  # exact fit is fine
    first = {"text_ids_list": [[5]], "sequence_plan": [_item("text")]}
    need = budget_for([first, s], cfg)
    for field, value, match in (
        ("text_tokens", 11, "text_tokens"),
        ("vit_tokens", 3, "vit_tokens"),
        ("vae_tokens", 5, "vae_tokens"),
        ("vae_images", 0, "vae_images"),
        ("vae_image_size", (32, 32), "vae_image_size"),
    ):
        bud = PackBudget(**{**{f: getattr(need, f) for f in
                               ("text_tokens", "vit_tokens", "vae_tokens", "vae_images", "vae_image_size")},
                            field: value})
        with pytest.raises(PackOverflowError, match=match) as e:
            pack_samples([first, s], cfg, bud, rng=np.random.default_rng(0))
        assert "sample 1" in str(e.value) and "abc" in str(e.value)
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_samples([s], cfg, PackBudget(64, 64, 64, 2, (40, 48)), rng=np.random.default_rng(0))


@pytest.mark.parametrize("typ,img,match", [
    ("vae_image", np.zeros((3, 24, 32), np.float32), "multiple of 16"),
    ("vae_image", np.zeros((32, 32, 3), np.float32), r"\[3, H, W\]"),
    ("vit_image", np.zeros((3, 5, 4), np.float32), "multiple of 2"),
    ("vit_image", np.zeros((3, 18, 4), np.float32), "more than 8 per side"),
    ("vae_image", np.zeros((3, 80, 16), np.float32), "more than 4 per side"),
])
def test_bad_image_errors(typ, img, match):
    cfg = _cfg()
    s = {"text_ids_list": [[1]], "sequence_plan": [_item("text"), _item(typ)], "image_tensor_list": [img]}
    with pytest.raises(PackError, match=match) as e:
        pack_samples([s, s], cfg, BIG, rng=np.random.default_rng(0))
    assert "sample 0, plan item 1" in str(e.value)


def test_plan_mismatch_errors():
    cfg = _cfg()
    bad_text = {"text_ids_list": [[1], [2]], "sequence_plan": [_item("text")], "image_tensor_list": []}
    bad_img = {"text_ids_list": [], "sequence_plan": [_item("vit_image")], "image_tensor_list": []}
    ok = {"text_ids_list": [[1]], "sequence_plan": [_item("text")], "image_tensor_list": []}
    with pytest.raises(PackError, match="sample 1.*text items"):
        pack_samples([ok, bad_text], cfg, BIG, rng=np.random.default_rng(0))
    with pytest.raises(PackError, match="sample 0.*image items"):
        pack_samples([bad_img], cfg, BIG, rng=np.random.default_rng(0))
    with pytest.raises(PackError, match="outside"):
        pack_samples([{**ok, "text_ids_list": [[100]]}], cfg, BIG, rng=np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- uint8 images


def _quantized(golden):
    """The golden samples with images as uint8 pixels ([C, H, W] views of [H, W, C] arrays, as the data
    pipeline hands them over) and the same samples with those pixels normalised by the official
    ToTensor + Normalize (image_transform.to_unit_range on a PIL image)."""
    from PIL import Image

    from echo4o_jax.image_transform import to_unit_range

    cfg, g, samples, ts = golden
    s8, sf = copy.deepcopy(samples), copy.deepcopy(samples)
    for a, b in zip(s8, sf):
        hwc = [np.ascontiguousarray(np.round((x.transpose(1, 2, 0) * 0.5 + 0.5) * 255).astype(np.uint8))
               for x in a["image_tensor_list"]]
        a["image_tensor_list"] = [x.transpose(2, 0, 1) for x in hwc]
        b["image_tensor_list"] = [to_unit_range(Image.fromarray(x)).transpose(2, 0, 1) for x in hwc]
    return cfg, s8, sf, ts


def test_unit_range_lut_is_official_normalize():
    from PIL import Image

    from echo4o_jax.image_transform import to_unit_range
    from echo4o_jax.packing import unit_range_lut

    px = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    ref = to_unit_range(Image.fromarray(px))[..., 0].reshape(-1)
    lut = unit_range_lut()
    assert lut.dtype == np.float32 and lut.shape == (256,)
    np.testing.assert_array_equal(lut.view(np.uint32), ref.view(np.uint32))
    # and the literal formula in float32
    x = np.arange(256).astype(np.float32)
    np.testing.assert_array_equal(lut, ((x / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5))


@pytest.mark.parametrize("mode", ["fresh", "out"])
def test_uint8_pack_normalizes_to_float_pack_bitwise(golden, mode):
    """uint8 packs + normalize_images (numpy and jitted) == float32 packs of the officially normalised
    images, bit for bit, padding included; the float32 packer normalises uint8 inputs the same way."""
    import jax

    from echo4o_jax.packing import allocate_packs, normalize_images

    cfg, s8, sf, ts = _quantized(golden)
    budget = _pack_golden(golden)[1]

    def pack(samples, dtype, out=None, i=0):
        it = iter(ts)
        return pack_samples(samples, cfg, budget, rng=np.random.default_rng(0), timestep_fn=lambda: next(it),
                            image_dtype=dtype, out=out, out_index=i)

    ref = batch_arrays(pack(sf, "float32"))
    if mode == "fresh":
        b8 = batch_arrays(pack(s8, "uint8"))
        bf = batch_arrays(pack(s8, "float32"))  # uint8 inputs normalised by the packer
    else:
        out8 = allocate_packs(budget, cfg, 3, image_dtype="uint8")
        row = pack(s8, None, out8, 1)
        assert row.vae_images.dtype == np.uint8 and np.shares_memory(row.vae_images, out8.vae_images)
        assert out8.num_tokens.tolist() == [0, row.num_tokens, 0] and out8.num_samples[1] == len(s8)
        b8 = {k: v[1] for k, v in batch_arrays(out8).items()}
        outf = allocate_packs(budget, cfg, 2, image_dtype="float32")
        pack(sf, "float32", outf, 0)
        bf = {k: v[0] for k, v in batch_arrays(outf).items()}
        # the unused rows are empty packs
        empty = batch_arrays(pack_samples([], cfg, budget, rng=np.random.default_rng(0), image_dtype="uint8"))
        for k in empty:
            np.testing.assert_array_equal(batch_arrays(out8)[k][2], empty[k], err_msg=k)
    assert b8["vae_images"].dtype == np.uint8 and b8["vit_patches"].dtype == np.uint8
    for got in (normalize_images(b8), {k: np.asarray(v) for k, v in jax.jit(normalize_images)(b8).items()}, bf):
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype, k
            np.testing.assert_array_equal(np.asarray(got[k]).reshape(-1).view(np.uint8),
                                          ref[k].reshape(-1).view(np.uint8), err_msg=k)


def test_normalize_images_passes_floats_and_stacks(golden):
    from echo4o_jax.packing import normalize_images

    cfg, s8, sf, ts = _quantized(golden)
    budget = _pack_golden(golden)[1]
    f = batch_arrays(pack_samples(sf, cfg, budget, rng=np.random.default_rng(0)))
    assert normalize_images(f)["vae_images"] is f["vae_images"]
    u = [pack_samples(s8[:k], cfg, budget, rng=np.random.default_rng(0), image_dtype="uint8") for k in (1, 3)]
    fl = [pack_samples(sf[:k], cfg, budget, rng=np.random.default_rng(0)) for k in (1, 3)]
    a, b = normalize_images(batch_arrays(stack_batches(u))), batch_arrays(stack_batches(fl))
    for k in b:
        if k != "timestep_raw":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_uint8_errors(golden):
    from echo4o_jax.packing import allocate_packs

    cfg, s8, sf, ts = _quantized(golden)
    budget = _pack_golden(golden)[1]
    with pytest.raises(PackError, match="uint8"):
        pack_samples(sf, cfg, budget, rng=np.random.default_rng(0), image_dtype="uint8")
    with pytest.raises(ValueError, match="image_dtype"):
        pack_samples(sf, cfg, budget, rng=np.random.default_rng(0), image_dtype="bfloat16")
    out = allocate_packs(budget, cfg, 2, image_dtype="uint8")
    with pytest.raises(ValueError, match="is uint8.*need float32"):
        pack_samples(sf, cfg, budget, rng=np.random.default_rng(0), image_dtype="float32", out=out)
    small = PackBudget(budget.text_tokens, budget.vit_tokens, budget.vae_tokens - 1, budget.vae_images,
                       budget.vae_image_size)
    with pytest.raises(ValueError, match="need int32"):
        pack_samples(s8, cfg, small, rng=np.random.default_rng(0), out=out)
    # sample_sizes does not care about the dtype
    assert [sample_sizes(s, cfg) for s in s8] == [sample_sizes(s, cfg) for s in sf]


def test_uint8_batch_gives_identical_loss_and_grads(golden_dir):
    """The train step's loss and gradients on a uint8 batch (normalised inside the step) equal those on
    the float32 batch of the same pixels, bit for bit."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from echo4o_jax.model.loading import load_bagel, load_vae
    from echo4o_jax.train.step import make_loss_and_grads

    from test_golden import golden_samples

    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    g = load_npz(golden_dir / "train_step.npz")
    samples = golden_samples(g)
    _, s8, sf, _ = _quantized((cfg, g, samples, None))
    budget = budget_for(samples, cfg, slack=4)
    batches = []
    for ss, dt in ((s8, "uint8"), (sf, "float32")):
        b = pack_samples(ss, cfg, budget, rng=np.random.default_rng(0), image_dtype=dt)
        batches.append({k: jnp.asarray(v)[None] for k, v in batch_arrays(b).items()})
    assert batches[0]["vae_images"].dtype == jnp.uint8
    model, vae = load_bagel(golden_dir, cfg), load_vae(golden_dir, cfg)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    vae_gd, vae_state = nnx.split(vae)
    f = jax.jit(make_loss_and_grads(graphdef, nnx.to_pure_dict(buffers), vae_gd, patch=cfg.latent_patch_size,
                                    ce_weight=1.0, mse_weight=1.0))
    p = nnx.to_pure_dict(params)
    rng = jax.random.PRNGKey(0)
    (l8, a8), g8 = f(p, vae_state, batches[0], None, rng)
    (lf, af), gf = f(p, vae_state, batches[1], None, rng)
    assert np.isfinite(float(lf))
    assert np.asarray(l8).tobytes() == np.asarray(lf).tobytes()
    for x, y in zip(jax.tree.leaves((a8, g8)), jax.tree.leaves((af, gf))):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
