"""The Flax port against tensors recorded from the official PyTorch BAGEL (see tests/golden/README).

Parametrised over ECHO4O_GOLDEN_DIRS (conftest.py); every size comes from the folder's configs.
Tolerances are the golden README's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import load_npz, npz_json
from echo4o_jax import packing
from echo4o_jax.config import BagelConfig
from echo4o_jax.image_transform import ImageTransform
from echo4o_jax.inference import Inferencer
from echo4o_jax.model.bagel import bagel_key_rules, forward_packed, latent_tokens_from_latents, packed_loss
from echo4o_jax.model.loading import export_official, load_bagel, load_vae
from echo4o_jax.safetensors_io import SafetensorsFile

HUGE = 1 << 20  # the golden cases use a huge max size / max pixels and min size 1 (no resize beyond stride)


def assert_uint8_close(img, want):
    """The README's tolerance for returned pictures: at most 1 level off on <= 1% of the pixels."""
    img, want = np.asarray(img).astype(int), np.asarray(want).astype(int)
    assert img.shape == want.shape
    diff = np.abs(img - want)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01


def max_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def loss_close(got, want) -> bool:
    """The golden README's loss tolerance: relative 1e-4 (and float32 resolution at a loss of 0)."""
    return abs(float(got) - float(want)) <= 1e-4 * abs(float(want)) + 1e-7


def gradient_mismatches(got: dict, want: SafetensorsFile) -> list[str]:
    """Official-key gradients `got` against the recorded ones: every trainable tensor has one (the fixed sin-cos
    tables have none), shapes equal, per tensor max abs error <= 1e-4 + 1e-3 * max abs value (the golden
    README). Returns the tensors that miss it."""
    assert set(want.keys()) <= set(got)
    assert set(got) - set(want.keys()) == {"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"}
    bad = []
    for k in want.keys():
        w = want.get(k)
        tol = 1e-4 + 1e-3 * float(np.max(np.abs(w)))
        err = max_err(got[k], w)
        if err > tol:
            bad.append(f"{k}: {err:.3g} > {tol:.3g}")
    return bad


@pytest.fixture(scope="module")
def loaded(golden_dir):
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    return cfg, load_bagel(golden_dir, cfg), load_vae(golden_dir, cfg)


# ------------------------------------------------------------------------------------------ training


def golden_samples(d):
    samples = []
    for i, s in enumerate(npz_json(d["samples_json"])):
        n_img = sum(item["type"] != "text" for item in s["sequence_plan"])
        samples.append(dict(text_ids_list=s["text_ids_list"], sequence_plan=s["sequence_plan"],
                            image_tensor_list=[d[f"sample_{i}_image_{j}"] for j in range(n_img)]))
    return samples


def pack_golden(d, cfg, slack: int = 5) -> packing.PackedBatch:
    """The golden training pack through our packer, with the golden timestep draws. Slack leaves padding
    in every segment (padding must be inert); the VAE canvas is the official one (max image size of the
    batch), since the VAE's GroupNorm / attention see the zero padding."""
    samples = golden_samples(d)
    # one raw timestep per noisy image, in order: the first value of each run of equal finite values
    raw = d["packed_timesteps_raw"]
    it = iter([v for i, v in enumerate(raw) if np.isfinite(v) and (i == 0 or raw[i - 1] != v)])
    return packing.pack_samples(samples, cfg, packing.budget_for(samples, cfg, slack=slack),
                                rng=np.random.default_rng(0), timestep_fn=lambda: next(it))


@pytest.fixture(scope="module")
def train_case(golden_dir, loaded):
    cfg, model, vae = loaded
    d = load_npz(golden_dir / "train_step.npz")
    batch = pack_golden(d, cfg)
    arrays = {k: jnp.asarray(v) for k, v in packing.batch_arrays(batch).items()}
    latents = vae.encode(arrays["vae_images"])
    x0 = latent_tokens_from_latents(latents, arrays["vae_image_index"], arrays["vae_token_hw"], cfg.latent_patch_size)
    noise = np.zeros((batch.vae_capacity, cfg.patch_latent_dim), np.float32)
    n_vae = len(d["packed_vae_token_indexes"])
    noise[:n_vae] = d["noise"]  # the vae segment holds the VAE tokens in official order, then padding
    out = jax.jit(lambda b, n, x: forward_packed(model, b, n, x, debug=True))(arrays, jnp.asarray(noise), x0)
    return d, batch, arrays, latents, x0, jnp.asarray(noise), out


def _to_official_order(batch, x):
    """Rows of a per-token array [L, ...] in official packed order (real tokens only)."""
    idx = np.argsort(batch.order)[: batch.num_tokens]
    return np.asarray(x)[idx]


def test_vae_latent_of_packed_images(train_case):
    d, batch, arrays, latents, *_ = train_case
    want = d["padded_latent"].transpose(0, 2, 3, 1)
    assert max_err(latents, want) <= 1e-4


def test_vae_latents_on_a_larger_static_canvas_equal_the_official(golden_dir, loaded, train_case):
    """Training packs have a static VAE canvas (data.budget.vae_image_size), usually larger than the
    official one (the max image size of the pack, whose zero padding the encoder's GroupNorm and attention
    see). The train step encodes each image on its pack's official canvas inside the larger one, so the
    latent tokens equal those of the official canvas; encoding the whole larger canvas would not."""
    import dataclasses

    from echo4o_jax.train.step import encode_batch_latents

    cfg, _, vae = loaded
    d, batch, _, _, x0, *_ = train_case
    samples = golden_samples(d)
    b = packing.budget_for(samples, cfg, slack=5)
    ds = cfg.latent_downsample
    b = dataclasses.replace(b, vae_image_size=(b.vae_image_size[0] + ds, b.vae_image_size[1] + 2 * ds))
    big = packing.pack_samples(samples, cfg, b, rng=np.random.default_rng(0))
    assert big.vae_images.shape[1:3] == b.vae_image_size
    arrays = {k: jnp.asarray(v)[None] for k, v in packing.batch_arrays(big).items()}
    n_vae = len(d["packed_vae_token_indexes"])
    got = encode_batch_latents(vae, arrays, cfg.latent_patch_size)[0]
    assert max_err(got[:n_vae], x0[:n_vae]) <= 1e-4
    whole = latent_tokens_from_latents(vae.encode(arrays["vae_images"][0]), arrays["vae_image_index"][0],
                                       arrays["vae_token_hw"][0], cfg.latent_patch_size)
    assert max_err(whole[:n_vae], x0[:n_vae]) > 1e-2  # the padding matters: the check above is not vacuous


def test_llm_input_and_intermediates(train_case):
    d, batch, arrays, latents, x0, noise, out = train_case
    assert max_err(_to_official_order(batch, out["dbg_llm_input"]), d["dbg_llm_input"]) <= 1e-4
    assert max_err(out["dbg_vit_output"][: len(d["dbg_vit_output"])], d["dbg_vit_output"]) <= 1e-4
    assert max_err(out["dbg_connector_output"][: len(d["dbg_connector_output"])], d["dbg_connector_output"]) <= 1e-4
    n_vae = len(d["packed_vae_token_indexes"])
    assert max_err(out["dbg_x_t"][:n_vae], d["dbg_x_t"]) <= 1e-4
    assert max_err(out["dbg_timestep_embeds"][:n_vae], d["dbg_timestep_embeds"]) <= 1e-4
    layers = [k for k in d if k.startswith("dbg_layer_")]
    assert len(layers) == out["dbg_layer_outputs"].shape[0]
    for i in range(len(layers)):
        got = _to_official_order(batch, out["dbg_layer_outputs"][i])
        assert max_err(got, d[f"dbg_layer_{i}_output"]) <= 1e-4, f"layer {i}"


def test_last_hidden_state_and_per_token_losses(train_case):
    d, batch, arrays, latents, x0, noise, out = train_case
    assert max_err(_to_official_order(batch, out["hidden"]), d["last_hidden_state"]) <= 1e-4
    mse = np.asarray(out["mse"])[np.asarray(out["mse_mask"])]
    assert max_err(mse, d["out_mse"]) <= 1e-4
    ce = np.asarray(out["ce"])[np.asarray(out["ce_mask"])]
    assert max_err(ce, d["out_ce"]) <= 1e-4
    # padding is inert: no loss anywhere outside the labelled / noisy tokens
    assert np.all(np.asarray(out["ce"])[~np.asarray(out["ce_mask"])] == 0)
    assert np.all(np.isfinite(np.asarray(out["hidden"])))


def _loss_fn(model, arrays, noise, x0, d):
    batched = {k: v[None] for k, v in arrays.items()}
    return packed_loss(model, batched, noise[None], x0[None], ce_weight=float(d["ce_weight"]),
                       mse_weight=float(d["mse_weight"]))


def test_losses(train_case, loaded):
    d, batch, arrays, latents, x0, noise, out = train_case
    _, model, _ = loaded
    loss, parts = jax.jit(lambda: _loss_fn(model, arrays, noise, x0, d))()
    for name, got in (("loss", loss), ("loss_ce", parts["loss_ce"]), ("loss_mse", parts["loss_mse"])):
        assert loss_close(got, d[name]), (name, float(got), float(d[name]))


def test_ce_loss_reweighting_uses_the_official_token_weights(train_case, loaded):
    """`ce_reweighting` (official `ce_loss_reweighting`): CE = sum(ce_i * w_i) / sum(w_i) with the official
    per-token weights `ce_loss_weights` and per-token losses `out_ce` recorded in the golden batch."""
    d, batch, arrays, latents, x0, noise, out = train_case
    _, model, _ = loaded
    w = np.asarray(arrays["text_ce_weight"])[np.asarray(out["ce_mask"])]
    np.testing.assert_allclose(w, d["ce_loss_weights"], rtol=1e-6)  # the packer's weights are the official ones
    want = float(np.sum(d["out_ce"].astype(np.float64) * d["ce_loss_weights"]) / np.sum(d["ce_loss_weights"]))
    batched = {k: v[None] for k, v in arrays.items()}
    _, parts = jax.jit(lambda: packed_loss(model, batched, noise[None], x0[None], ce_reweighting=True))()
    assert loss_close(parts["loss_ce"], want)
    assert abs(float(parts["loss_ce"]) - float(d["loss_ce"])) > 1e-3  # the weights change the CE here


@pytest.mark.parametrize("blocks", [None, (8, 8)])
def test_gradients_match_official(golden_dir, train_case, loaded, blocks):
    """Every trainable parameter's gradient == the official's. `blocks` (q, kv): small attention blocks, so that
    the golden pack spans several of each (the default 512 block holds it whole): the blockwise backward's
    block skipping and merging checked against the official gradients too."""
    d, batch, arrays, latents, x0, noise, out = train_case
    cfg, model, _ = loaded
    if blocks is not None:
        assert len(batch.order) > 2 * blocks[0]
        cfg = cfg.replace(attention_block_q=blocks[0], attention_block_kv=blocks[1])
        model = load_bagel(golden_dir, cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad_fn(params):
        return jax.grad(lambda p: _loss_fn(nnx.merge(graphdef, p, rest), arrays, noise, x0, d)[0])(params)

    grads = grad_fn(params)
    grad_model = nnx.merge(graphdef, grads, rest)
    want = SafetensorsFile(golden_dir / "train_grads.safetensors")
    got = dict(export_official(grad_model, bagel_key_rules(cfg)))
    bad = gradient_mismatches(got, want)
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------ inference


def golden_max_context(golden_dir, cfg, text_bucket: int = 32) -> int:
    """A KV cache that holds every inference case of the folder, counted from its case files: each text with its
    two wrapping tokens and a text bucket of padding room, each input image as VAE and ViT tokens (+ 2 each),
    the generated image's tokens (+ 2) or the answer's; at least 256 (bagel_tiny_a's cases need under 100),
    rounded up to a multiple of 64."""
    ds, p = cfg.latent_downsample, cfg.vit.patch_size
    need = 0
    for case in ("t2i", "multiref", "understand"):
        d = load_npz(golden_dir / f"{case}.npz")
        n = sum(len(ids) + 2 + text_bucket for ids in npz_json(d["prompt_ids_json"]))
        for k in range(sum(x == "image" for x in npz_json(d["input_order_json"]))):
            h, w = d[f"input_image_{k}"].shape[:2]
            n += (h // ds) * (w // ds) + 2 + round(h / p) * round(w / p) + 2
        n += d["init_noise"].shape[0] + 2 if "init_noise" in d else 0
        n += int(npz_json(d["kwargs_json"]).get("max_think_token_n", 0))
        need = max(need, n)
    return max(256, -(-need // 64) * 64)


def golden_inferencer(cfg, model, vae, max_context: int) -> Inferencer:
    """The inference cases' settings: no resize beyond the strides (huge max size / pixels, min size 1)."""
    return Inferencer(model, vae, max_context=max_context,
                      vae_transform=ImageTransform(HUGE, 1, cfg.latent_downsample, HUGE),
                      vit_transform=ImageTransform(HUGE, 1, cfg.vit.patch_size, HUGE))


@pytest.fixture(scope="module")
def inferencer(golden_dir, loaded):
    return golden_inferencer(*loaded, max_context=golden_max_context(golden_dir, loaded[0]))


def _golden_kwargs(d) -> dict:
    """A case's recorded sampler settings, with the posterior setting it was recorded with (the golden README:
    `DiagonalGaussian.sample = False`, the mean; the official default samples) and `image_shapes` a tuple."""
    kw = dict(npz_json(d["kwargs_json"]), vae_posterior="mean")
    if "image_shapes" in kw:
        kw["image_shapes"] = tuple(kw["image_shapes"])
    return kw


def _inputs(d):
    prompts = iter(npz_json(d["prompt_ids_json"]))
    n_img = 0
    inputs = []
    for kind in npz_json(d["input_order_json"]):
        if kind == "text":
            inputs.append(next(prompts))
        else:
            inputs.append(Image.fromarray(d[f"input_image_{n_img}"]))
            n_img += 1
    return inputs


@pytest.mark.parametrize("case", ["t2i", "multiref"])
def test_image_generation(golden_dir, inferencer, case):
    d = load_npz(golden_dir / f"{case}.npz")
    kw = _golden_kwargs(d)
    out = inferencer.interleave_inference(_inputs(d), init_noise=d["init_noise"], return_velocities=True, **kw)
    vel = np.asarray(out["velocities"])
    assert vel.shape == d["dbg_velocity_per_step"].shape
    # each step's guided velocity is a model output (as out_mse): the activations' 1e-4 (measured ~2e-6); the
    # README's 1e-3 is for the latent the whole sampler integrates
    assert max_err(vel, d["dbg_velocity_per_step"]) <= 1e-4
    assert max_err(out["latent"], d["latent"]) <= 1e-3
    assert max_err(out["decoded"], d["decoded"][0].transpose(1, 2, 0)) <= 5e-4
    assert_uint8_close(out["image"], d["image_uint8"])


@pytest.mark.parametrize("case", ["t2i", "multiref"])
def test_new_cfg_scale_values_compile_nothing(golden_dir, inferencer, case):
    """The CFG scales and renorm_min are traced: after sampling with other values (the same guidance terms
    on), the recorded values compile no new sampler step and still reproduce the official velocities."""
    import echo4o_jax.inference as inference

    d = load_npz(golden_dir / f"{case}.npz")
    kw = _golden_kwargs(d)
    other = dict(kw, cfg_text_scale=kw["cfg_text_scale"] + 1.5, cfg_renorm_min=0.25)
    if kw["cfg_img_scale"] > 1.0:
        other["cfg_img_scale"] = kw["cfg_img_scale"] + 0.75
    inference._guided_velocity.clear_cache()
    out = inferencer.interleave_inference(_inputs(d), init_noise=d["init_noise"], return_velocities=True, **other)
    compiled = inference._guided_velocity._cache_size()
    assert compiled > 0
    assert max_err(np.asarray(out["velocities"]), d["dbg_velocity_per_step"]) > 1e-2  # (other values: other output)
    out = inferencer.interleave_inference(_inputs(d), init_noise=d["init_noise"], return_velocities=True, **kw)
    assert inference._guided_velocity._cache_size() == compiled
    assert max_err(np.asarray(out["velocities"]), d["dbg_velocity_per_step"]) <= 1e-4


@pytest.mark.parametrize("case", ["t2i", "multiref"])
def test_sampler_attends_a_cache_cut_to_the_context(golden_dir, loaded, case, monkeypatch):
    """With a max_context far above the contexts' length, the sampler's branch caches hold the contexts' length
    rounded up to SAMPLER_CACHE_BUCKET (not max_context's empty slots), and give the official velocities."""
    import echo4o_jax.inference as inference

    bucket = inference.SAMPLER_CACHE_BUCKET
    big = golden_inferencer(*loaded, max_context=golden_max_context(golden_dir, loaded[0]) + 2 * bucket)
    d = load_npz(golden_dir / f"{case}.npz")
    kw = _golden_kwargs(d)
    ctx = big.build_contexts(_inputs(d), image_shapes=kw.get("image_shapes"), vae_posterior="mean")
    want = -(-max(ctx[k].kv_len for k in ("gen", "cfg_text", "cfg_img")) // bucket) * bucket
    assert want < big.max_context
    capacities = []
    real = inference._guided_velocity
    monkeypatch.setattr(inference, "_guided_velocity", lambda g, s, caches, *a: (
        capacities.append(caches.k.shape[3]), real(g, s, caches, *a))[1])
    out = big.interleave_inference(_inputs(d), init_noise=d["init_noise"], return_velocities=True, **kw)
    assert set(capacities) == {want}
    assert max_err(np.asarray(out["velocities"]), d["dbg_velocity_per_step"]) <= 1e-4


def test_input_images_sample_the_vae_posterior_unless_mean(golden_dir, inferencer):
    """The official default samples the posterior of input images (a key is needed), the mean on request; an
    RGBA image goes on white before its resize (the official `pil_img2rgb`), not through a plain RGB convert."""
    d = load_npz(golden_dir / "multiref.npz")
    with pytest.raises(ValueError, match="vae_posterior='sample' .* give rng"):
        inferencer.build_contexts(_inputs(d))
    with pytest.raises(ValueError, match="vae_posterior='median'"):
        inferencer.build_contexts(_inputs(d), vae_posterior="median")
    img = next(x for x in _inputs(d) if isinstance(x, Image.Image))
    pixels = inferencer.vae_transform(img)
    key = jax.random.key(0)
    mean, sample = (np.asarray(inferencer.encode_latent_tokens(pixels, k)[0]) for k in (None, key))
    np.testing.assert_array_equal(sample, np.asarray(inferencer.encode_latent_tokens(pixels, key)[0]))
    assert max_err(sample, mean) > 1e-4
    rgba = img.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: white, as the official
    assert np.asarray(inferencer.vae_transform.resize(rgba)).min() == 255


def test_understanding_text(golden_dir, inferencer):
    d = load_npz(golden_dir / "understand.npz")
    kw = npz_json(d["kwargs_json"])
    out = inferencer.interleave_inference(_inputs(d), **kw)
    assert out["text_ids"] == d["text_ids"].tolist()


def test_think_text_goes_back_as_the_official_cuts_and_encodes_it(golden_dir, inferencer, monkeypatch):
    """The official `gen_text` decodes the generated ids and keeps the text between the start token and a
    generated `<|im_start|>`; `interleave_inference` encodes that string again for the context. Ours: the ids cut
    there (`answer_ids`), then `retokenize` (the Generator's decode + encode) when the Inferencer has one."""
    import echo4o_jax.inference as inference

    bos = inferencer.bos
    assert inference.answer_ids([bos, 7, 8, bos, 9], bos) == [7, 8] and inference.answer_ids([bos], bos) == []
    d = load_npz(golden_dir / "t2i.npz")
    shape = _golden_kwargs(d)["image_shapes"]

    def think_context(generated, retokenize=None):
        monkeypatch.setattr(inferencer, "generate_text", lambda *a, **k: generated)
        monkeypatch.setattr(inferencer, "retokenize", retokenize)
        c = inferencer.build_contexts(_inputs(d), think=True, system_prompt_ids=[1, 2, 3], image_shapes=shape)
        return c["gen"]

    def same(a, b):
        assert (a.kv_len, a.rope) == (b.kv_len, b.rope)
        np.testing.assert_array_equal(np.asarray(a.cache.k), np.asarray(b.cache.k))

    same(think_context([bos, 7, 8, bos, 9]), think_context([bos, 7, 8]))
    same(think_context([bos, 7, 8], retokenize=lambda ids: [*ids, 11]), think_context([bos, 7, 8, 11]))
    assert think_context([bos, 7, 8]).kv_len != think_context([bos, 7, 8, 11]).kv_len  # (the comparison sees ids)


def test_text_decoding_stops_before_the_end_token_and_checks_its_temperature(inferencer, monkeypatch):
    """Greedy decoding feeds the start token, then each argmax, and stops when `<|im_end|>` is predicted
    (not returned), as the official `generate_text`; sampling at temperature <= 0 is an error (the official's
    softmax of logits / 0 is NaN)."""
    ctx = inferencer.add_text(inferencer.new_context(), [5, 6, 7])
    free = inferencer.generate_text(ctx, max_length=6)
    assert len(free) == 6 and free[0] == inferencer.bos and inferencer.eos not in free
    # the last token free decoding picked, as the end token: decoding stops before its first prediction
    k = free.index(free[-1], 1)
    monkeypatch.setattr(inferencer, "eos", free[-1])
    assert inferencer.generate_text(ctx, max_length=6) == free[:k]
    monkeypatch.undo()
    # the context's room (no end token predicted): an error where a token would not fit, none up to the room
    room = inferencer.max_context - ctx.kv_len
    monkeypatch.setattr(inferencer, "eos", -1)
    with pytest.raises(ValueError, match="context overflow while adding a generated token"):
        inferencer.generate_text(ctx, max_length=room + 1)
    full = inferencer.generate_text(ctx, max_length=room)
    assert len(full) == room and full[:6] == free
    monkeypatch.undo()
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature > 0"):
            inferencer.generate_text(ctx, max_length=3, do_sample=True, temperature=t, rng=jax.random.key(0))


def test_text_to_image_runs_two_cfg_branches_for_the_official_three(golden_dir, inferencer, monkeypatch):
    """With no input image, the official image-uncond context is the cond one (the same text): it is built once
    (the same object) and the sampler runs 2 branches, taking the cond velocity for the image-uncond one. The
    velocities equal those of the 3 branches the official runs (a copy of the cond context as the third), here
    with an image scale > 1 (the golden t2i case has none); with an input image, or a thinking turn appended to
    the cond context, 3 distinct contexts remain."""
    import dataclasses

    import echo4o_jax.inference as inference

    d = load_npz(golden_dir / "t2i.npz")
    kw = npz_json(d["kwargs_json"])
    shape = tuple(kw.pop("image_shapes"))
    kw.update(cfg_img_scale=1.5, cfg_interval=(0.0, 1.0))
    ctx = inferencer.build_contexts(_inputs(d), image_shapes=shape)
    assert ctx["cfg_img"] is ctx["gen"] and ctx["cfg_text"] is not ctx["gen"]
    branches = []
    real = inference._guided_velocity
    monkeypatch.setattr(inference, "_guided_velocity", lambda g, s, caches, *a: (
        branches.append(caches.k.shape[1]), real(g, s, caches, *a))[1])
    noise = d["init_noise"]
    _, two = inferencer.generate_image_latent(ctx["gen"], ctx["cfg_text"], ctx["cfg_img"], shape,
                                              init_noise=noise, return_velocities=True, **kw)
    assert set(branches) == {2}
    branches.clear()
    copy = dataclasses.replace(ctx["gen"])  # (another object: the sampler cannot tell it is the cond context)
    _, three = inferencer.generate_image_latent(ctx["gen"], ctx["cfg_text"], copy, shape, init_noise=noise,
                                                return_velocities=True, **kw)
    assert set(branches) == {3}
    np.testing.assert_array_equal(np.asarray(two), np.asarray(three))
    m = load_npz(golden_dir / "multiref.npz")
    ctx = inferencer.build_contexts(_inputs(m), vae_posterior="mean")
    assert len({id(ctx[k]) for k in ("gen", "cfg_text", "cfg_img")}) == 3
    ctx = inferencer.build_contexts(_inputs(d), think=True, system_prompt_ids=[1, 2, 3], max_think_token_n=3)
    assert len({id(ctx[k]) for k in ("gen", "cfg_text", "cfg_img")}) == 3
