"""Write a golden folder of the layout of tests/golden/bagel_tiny_a at OTHER model sizes.

    python tests/variant_golden.py OUT_DIR [--preset b|c|d] [--hidden 96 --heads 3 ...]
    ECHO4O_GOLDEN_DIRS=OUT_DIR python -m pytest tests/test_golden.py ...

THIS IS NOT AN ORACLE. Every output in the folder (activations, losses, gradients, sampler velocities,
decoded images, greedy tokens) is computed by OUR OWN port (echo4o_jax: packer, `forward_packed` /
`packed_loss`, `Inferencer`, `AutoEncoder`) from a randomly initialised model of the requested sizes,
and the weights are written by our own exporter (`export_official` with the key tables). A port bug
therefore reproduces itself here and passes. The only purpose of such a folder is to check that the
golden-parametrised tests (and the library code under them) read every size from the folder's config
files instead of assuming bagel_tiny_a's sizes: against it, a correct test passes up to float noise,
and a failure points at a hard-coded size or assumption (or at this recorder). Numerical agreement with
the official BAGEL is checked only by the folders recorded from the official PyTorch code
(tests/golden/bagel_tiny_a).

Layout (files, keys, dtypes, rank of every array, JSON fields) follows bagel_tiny_a exactly (see the
golden README, ../shared/golden/README.md); the sample structure of train_step.npz (three
samples: text-to-image, multi-reference, understanding) and the inference cases (t2i, multiref,
understand, vae) are bagel_tiny_a's, with fresh random token ids below the special tokens (which sit at
vocab - 10 .. vocab - 7 as in bagel_tiny_a) and fresh random uint8-valued images whose sizes are chosen
per preset to use the preset's latent / ViT position tables (clipped to them).

Weights: LLM / ViT / connector / embedders ~ N(0, 0.05), every `*norm*` tensor 1 + N(0, 0.1) (as
bagel_tiny_a); the sin-cos tables are the fixed ones; the VAE gets PyTorch's default init (uniform
+-1/sqrt(fan_in)) with slightly perturbed GroupNorms. The VAE posterior is taken at its mean, attention is
float32, as in the official recording.

The VAE `ch` * every `ch_mult` must be a multiple of 32 (the official GroupNorm has 32 groups), and
`downsample` is 2 ** (len(ch_mult) - 1), as the official FLUX autoencoder requires.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

REFERENCE = HERE / "golden" / "bagel_tiny_a"  # the layout (keys, dtypes) to reproduce

# ------------------------------------------------------------------------------------------ presets
# Token grids (rows, cols) of the images: VAE grids are in latent tokens (x latent_downsample pixels),
# ViT grids in patches (x patch_size pixels); every grid is clipped to the model's position tables.
PRESETS = {
    # GQA 3, deeper, wider vocab, larger position tables, 4-level VAE of other widths and 2 res blocks
    "b": dict(
        vocab=200, hidden=96, heads=3, kv_heads=1, layers=3, intermediate=160,
        vit_hidden=48, vit_heads=3, vit_layers=4, vit_intermediate=80,
        vae_ch=32, vae_ch_mult=(1, 2, 3, 3), vae_res_blocks=2, z_channels=16, latent_patch_size=2,
        scale_factor=0.3611, shift_factor=0.1159,
        max_latent_size=12, vit_max_patches=9, timestep_shift=1.0, rope_theta=1e6,
        # train samples: s0 vae | s1 vae, vit, vae, vae(noisy) | s2 vit
        train_grids=[[(4, 3)], [(2, 5), (4, 9), (3, 2), (3, 3)], [(9, 3)]],
        t2i_shape=(3, 5), multiref_shapes=[(3, 4), (4, 2)], understand_px=(56, 84), vae_grid=(5, 3),
    ),
    # head_dim 72, no GQA, one layer; smaller position tables; other VAE widths / ch_mult; other VAE
    # scale / shift and training timestep shift
    "c": dict(
        vocab=300, hidden=144, heads=2, kv_heads=2, layers=1, intermediate=200,
        vit_hidden=72, vit_heads=2, vit_layers=2, vit_intermediate=96,
        vae_ch=32, vae_ch_mult=(2, 1, 2, 2), vae_res_blocks=1, z_channels=16, latent_patch_size=2,
        scale_factor=0.5, shift_factor=0.2,
        max_latent_size=6, vit_max_patches=5, timestep_shift=2.0, rope_theta=10000.0,
        train_grids=[[(6, 2)], [(2, 3), (5, 2), (3, 2), (2, 4)], [(3, 5)]],
        t2i_shape=(4, 2), multiref_shapes=[(2, 3), (3, 2)], understand_px=(28, 42), vae_grid=(3, 6),
    ),
    # latent geometry other than FLUX's defaults (the official code reads both from its configs):
    # z_channels 8, latent_patch_size 1 (token dim 8, latent stride 8), GQA 2
    "d": dict(
        vocab=128, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=96,
        vit_hidden=32, vit_heads=2, vit_layers=3, vit_intermediate=48,
        vae_ch=32, vae_ch_mult=(1, 1, 2, 2), vae_res_blocks=1, z_channels=8, latent_patch_size=1,
        scale_factor=0.3611, shift_factor=0.1159,
        max_latent_size=10, vit_max_patches=7, timestep_shift=1.0, rope_theta=1e6,
        train_grids=[[(4, 4)], [(4, 6), (2, 3), (6, 4), (6, 4)], [(3, 2)]],
        t2i_shape=(4, 6), multiref_shapes=[(4, 6), (6, 4)], understand_px=(28, 42), vae_grid=(6, 8),
    ),
}

SIZE_FLAGS = ("vocab", "hidden", "heads", "kv_heads", "layers", "intermediate", "vit_hidden", "vit_heads",
              "vit_layers", "vit_intermediate", "vae_ch", "vae_res_blocks", "z_channels", "latent_patch_size",
              "max_latent_size", "vit_max_patches")


def build_config(p: dict):
    from echo4o_jax.config import BagelConfig, LLMConfig, SpecialTokens, VAEConfig, ViTConfig

    vocab = p["vocab"]
    llm = LLMConfig(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                    num_layers=p["layers"], num_heads=p["heads"], num_kv_heads=p["kv_heads"],
                    head_dim=p["hidden"] // p["heads"], rope_theta=float(p["rope_theta"]), rms_norm_eps=1e-6,
                    max_position_embeddings=512)
    if llm.head_dim * llm.num_heads != llm.hidden_size:
        raise SystemExit("hidden must be a multiple of heads (Qwen2: head_dim = hidden / heads)")
    vit = ViTConfig(hidden_size=p["vit_hidden"], intermediate_size=p["vit_intermediate"],
                    num_layers=p["vit_layers"] - 1, num_heads=p["vit_heads"], patch_size=14,
                    image_size=14 * p["vit_max_patches"], layer_norm_eps=1e-6)
    mult = tuple(int(m) for m in p["vae_ch_mult"])
    if any(p["vae_ch"] * m % 32 for m in mult):
        raise SystemExit("vae_ch * ch_mult must be multiples of 32 (GroupNorm(32))")
    vae = VAEConfig(resolution=256, in_channels=3, ch=p["vae_ch"], out_ch=3, ch_mult=mult,
                    num_res_blocks=p["vae_res_blocks"], z_channels=p["z_channels"],
                    scale_factor=float(p["scale_factor"]), shift_factor=float(p["shift_factor"]),
                    downsample=2 ** (len(mult) - 1))
    st = SpecialTokens(bos_token_id=vocab - 10, eos_token_id=vocab - 9, start_of_image=vocab - 8,
                       end_of_image=vocab - 7)
    return BagelConfig(llm=llm, vit=vit, vae=vae, special_tokens=st, latent_patch_size=p["latent_patch_size"],
                       max_latent_size=p["max_latent_size"], vit_max_num_patch_per_side=p["vit_max_patches"],
                       timestep_shift=float(p["timestep_shift"]))


# ------------------------------------------------------------------------------------------ writers


def _dump_json(path: pathlib.Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=1))


def write_configs(out: pathlib.Path, cfg, preset: str, seed: int) -> None:
    ref_llm = json.loads((REFERENCE / "llm_config.json").read_text())
    ref_vit = json.loads((REFERENCE / "vit_config.json").read_text())
    llm = {k: v for k, v in cfg.llm.to_hf().items() if k in ref_llm}  # Qwen2's fields: no head_dim
    llm["torch_dtype"] = ref_llm["torch_dtype"]
    assert list(llm) == [k for k in ref_llm if k in llm] and set(llm) == set(ref_llm), (set(llm) ^ set(ref_llm))
    llm = {k: llm[k] for k in ref_llm}
    vit = {k: v for k, v in cfg.vit.to_hf().items() if k in ref_vit}
    assert set(vit) == set(ref_vit), set(vit) ^ set(ref_vit)
    vit = {k: vit[k] for k in ref_vit}
    meta = cfg.meta_dict()
    meta.update(variant=preset, seed=seed,
                torch="none: recorded by tests/variant_golden.py with echo4o_jax itself (NOT an oracle)")
    ref_meta = json.loads((REFERENCE / "meta.json").read_text())
    assert set(meta) == set(ref_meta) and set(meta["ae"]) == set(ref_meta["ae"])
    assert set(meta["bagel"]) == set(ref_meta["bagel"])
    meta["ae"] = {k: meta["ae"][k] for k in ref_meta["ae"]}  # the reference's field order
    meta["bagel"] = {k: meta["bagel"][k] for k in ref_meta["bagel"]}
    meta = {k: meta[k] for k in ref_meta}
    _dump_json(out / "llm_config.json", llm)
    _dump_json(out / "vit_config.json", vit)
    _dump_json(out / "meta.json", meta)


def random_bagel_tensors(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from flax import nnx

    from echo4o_jax.model.bagel import Bagel, bagel_key_rules
    from echo4o_jax.model.loading import export_official

    model = Bagel(cfg, rngs=nnx.Rngs(0))
    out = {}
    for k, v in export_official(model, bagel_key_rules(cfg)):
        v = np.asarray(v, np.float32)
        if k.endswith("pos_embed.pos_embed"):  # fixed sin-cos tables
            out[k] = v
        elif "norm" in k:
            out[k] = (1.0 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            out[k] = (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    return out


def random_vae_tensors(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from flax import nnx

    from echo4o_jax.model import keymap
    from echo4o_jax.model.vae import AutoEncoder, vae_key_rules

    abstract = nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))
    shapes = {tuple(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    entries = keymap.expand_rules(vae_key_rules(cfg.vae))
    fan_in = {}
    for e in entries:
        s = keymap.official_shape(e, shapes[e.path])
        if e.key.endswith(".weight") and len(s) == 4:
            fan_in[e.key[: -len(".weight")]] = int(np.prod(s[1:]))
    out = {}
    for e in entries:
        shape = keymap.official_shape(e, shapes[e.path])
        base = e.key.rsplit(".", 1)[0]
        if base in fan_in:  # conv weight / bias: torch default init
            bound = 1.0 / np.sqrt(fan_in[base])
            out[e.key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif e.key.endswith(".weight"):  # GroupNorm scale
            out[e.key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # GroupNorm shift
            out[e.key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _save_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))  # the writer of the official folders' files (byte-identical headers)


def _save_npz(path: pathlib.Path, arrays: dict) -> None:
    """Keys in the reference file's order (numbered families -- dbg_layer_{i}_output, attention_mask_{i},
    sample_{i}_image_{j}, input_image_{k} -- where the reference has its first one, in numeric order, as many
    as this model / these samples give), each with the reference's dtype and rank."""
    with np.load(REFERENCE / path.name) as ref:
        ref_keys = list(ref.files)
        like = {k: (ref[k].dtype, ref[k].ndim) for k in ref.files}
    family = {k: _family(k) for k in list(arrays) + ref_keys}
    for k in arrays:
        if k not in like and not any(family[r] == family[k] for r in ref_keys if family[k]):
            raise AssertionError(f"{path.name}: key {k!r} has no counterpart in the reference")
    for r in ref_keys:
        if not family[r] and r not in arrays:
            raise AssertionError(f"{path.name}: reference key {r!r} not written")
    order, done = [], set()
    for r in ref_keys:
        if not family[r]:
            order.append(r)
        elif family[r] not in done:
            done.add(family[r])
            order += sorted((k for k in arrays if family[k] == family[r]),
                            key=lambda k: tuple(int(x) for x in re.findall(r"\d+", k)))
    out = {}
    for k in order:
        dt, nd = like.get(k) or like[next(r for r in ref_keys if family[r] and family[r] == family[k])]
        v = arrays[k]
        if dt.kind == "U":
            v = np.asarray(v if isinstance(v, str) else json.dumps(v))
        else:
            v = np.asarray(v).astype(dt)
        assert v.ndim == nd, (path.name, k, v.shape, nd)
        out[k] = v
    np.savez_compressed(path, **out)


def _family(k: str) -> str:
    """The numbered family of a key ('' for a plain key)."""
    for pat in (r"dbg_layer_\d+_output", r"attention_mask_\d+", r"sample_\d+_image_\d+", r"input_image_\d+"):
        if re.fullmatch(pat, k):
            return pat
    return ""


# ------------------------------------------------------------------------------------------ inputs


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth random field plus noise (textured, like bagel_tiny_a's)."""
    lo = rng.uniform(0, 255, (max(2, h // 8), max(2, w // 8), 3))
    ys = np.linspace(0, lo.shape[0] - 1, h)
    xs = np.linspace(0, lo.shape[1] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, lo.shape[0] - 1), np.minimum(x0 + 1, lo.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = (1 - fx) * lo[y0][:, x0] + fx * lo[y0][:, x1]
    bottom = (1 - fx) * lo[y1][:, x0] + fx * lo[y1][:, x1]
    img = (1 - fy) * top + fy * bottom
    img = img + rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _unit(u8: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1], the official ToTensor + Normalize (as the packer)."""
    from echo4o_jax.packing import unit_range_lut

    return unit_range_lut()[u8].transpose(2, 0, 1).copy()


def _text_ids(rng, n: int, cfg) -> list[int]:
    top = min(cfg.special_tokens.as_dict().values())
    return [int(x) for x in rng.integers(0, top, n)]


def make_samples(cfg, p: dict, rng: np.random.Generator) -> list[dict]:
    """bagel_tiny_a's three training samples (plans, text lengths), with new ids and images."""
    with np.load(REFERENCE / "train_step.npz") as ref:
        samples = json.loads(str(ref["samples_json"]))
        ref_special = json.loads((REFERENCE / "meta.json").read_text())["bagel"]["special_token_ids"]
    special_map = {v: getattr(cfg.special_tokens, k) for k, v in ref_special.items()}
    ds, vp = cfg.latent_downsample, cfg.vit.patch_size
    out = []
    for i, s in enumerate(samples):
        texts = [_text_ids(rng, len(t), cfg) for t in s["text_ids_list"]]
        plan = [dict(it) for it in s["sequence_plan"]]
        for it in plan:
            if it.get("special_token_label") is not None:
                it["special_token_label"] = special_map[int(it["special_token_label"])]
        grids = list(p["train_grids"][i])
        images = []
        for it in plan:
            if it["type"] == "text":
                continue
            gh, gw = grids.pop(0)
            if it["type"] == "vae_image":
                m = cfg.max_latent_size
                H, W = min(gh, m) * ds, min(gw, m) * ds
            else:
                m = cfg.vit_max_num_patch_per_side
                H, W = min(gh, m) * vp, min(gw, m) * vp
            images.append(_unit(random_image(rng, H, W)))
        out.append(dict(text_ids_list=texts, sequence_plan=plan, image_tensor_list=images))
    return out


# ------------------------------------------------------------------------------------------ recording


def record_train_step(out: pathlib.Path, cfg, model, vae, samples, rng) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from echo4o_jax import packing
    from echo4o_jax.model.bagel import bagel_key_rules, forward_packed, latent_tokens_from_latents, packed_loss
    from echo4o_jax.model.loading import export_official

    raws = iter(rng.standard_normal(16).astype(np.float32))
    batch = packing.pack_samples(samples, cfg, packing.budget_for(samples, cfg), rng=np.random.default_rng(0),
                                 timestep_fn=lambda: next(raws))
    o = packing.to_official(batch)
    arrays = {k: jnp.asarray(v) for k, v in packing.batch_arrays(batch).items()}
    latents = vae.encode(arrays["vae_images"])  # posterior mean, after scale / shift (NHWC)
    x0 = latent_tokens_from_latents(latents, arrays["vae_image_index"], arrays["vae_token_hw"], cfg.latent_patch_size)
    n_vae = len(o["packed_vae_token_indexes"])
    assert n_vae == batch.vae_capacity  # no padding: the vae segment is the official order
    noise = rng.standard_normal((n_vae, cfg.patch_latent_dim)).astype(np.float32)
    res = jax.jit(lambda b, n, x: forward_packed(model, b, n, x, debug=True))(arrays, jnp.asarray(noise), x0)
    ce_w, mse_w = 0.25, 1.0

    def loss_fn(m):
        batched = {k: v[None] for k, v in arrays.items()}
        return packed_loss(m, batched, jnp.asarray(noise)[None], x0[None], ce_weight=ce_w, mse_weight=mse_w)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value_and_grad = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)), has_aux=True)
    (loss, parts), grads = jax.jit(value_and_grad)(params)
    grad_tensors = {k: np.asarray(v, np.float32) for k, v in export_official(nnx.merge(graphdef, grads, rest),
                                                                            bagel_key_rules(cfg))
                    if not k.endswith("pos_embed.pos_embed")}
    _save_safetensors(out / "train_grads.safetensors", grad_tensors)

    from test_golden import _to_official_order

    official = lambda x: _to_official_order(batch, x)  # noqa: E731
    n_vit = len(o["packed_vit_tokens"])
    mse_mask, ce_mask = np.asarray(res["mse_mask"]), np.asarray(res["ce_mask"])
    d = dict(
        sequence_length=o["sequence_length"], sample_lens=o["sample_lens"], packed_text_ids=o["packed_text_ids"],
        packed_text_indexes=o["packed_text_indexes"], packed_position_ids=o["packed_position_ids"],
        padded_images=o["padded_images"], padded_latent=np.asarray(latents).transpose(0, 3, 1, 2),
        patchified_vae_latent_shapes=o["patchified_vae_latent_shapes"],
        packed_latent_position_ids=o["packed_latent_position_ids"],
        packed_vae_token_indexes=o["packed_vae_token_indexes"], packed_vit_tokens=o["packed_vit_tokens"],
        packed_vit_position_ids=o["packed_vit_position_ids"], packed_vit_token_indexes=o["packed_vit_token_indexes"],
        vit_token_seqlens=o["vit_token_seqlens"], packed_timesteps_raw=o["packed_timesteps"],
        mse_loss_indexes=o["mse_loss_indexes"], packed_label_ids=o["packed_label_ids"],
        ce_loss_indexes=o["ce_loss_indexes"], ce_loss_weights=o["ce_loss_weights"], noise=noise,
        out_mse=np.asarray(res["mse"])[mse_mask], out_ce=np.asarray(res["ce"])[ce_mask],
        last_hidden_state=official(res["hidden"]),
        dbg_vit_output=np.asarray(res["dbg_vit_output"])[:n_vit],
        dbg_connector_output=np.asarray(res["dbg_connector_output"])[:n_vit],
        dbg_timestep_embeds=np.asarray(res["dbg_timestep_embeds"])[:n_vae],
        dbg_x_t=np.asarray(res["dbg_x_t"])[:n_vae], dbg_llm_input=official(res["dbg_llm_input"]),
        loss_ce=float(parts["loss_ce"]), loss_mse=float(parts["loss_mse"]), loss=float(loss),
        ce_weight=ce_w, mse_weight=mse_w,
        samples_json=[dict(text_ids_list=s["text_ids_list"], sequence_plan=s["sequence_plan"]) for s in samples],
    )
    for i in range(cfg.llm.num_layers):
        d[f"dbg_layer_{i}_output"] = official(res["dbg_layer_outputs"][i])
    for i, s in enumerate(samples):
        for j, img in enumerate(s["image_tensor_list"]):
            d[f"sample_{i}_image_{j}"] = img
    for i, m in enumerate(packing.attention_masks(batch)):
        d[f"attention_mask_{i}"] = m
    # the timesteps of clean tokens are -inf; padded_latent zero where the images are
    _save_npz(out / "train_step.npz", d)


def _inputs(order, prompts, images):
    from PIL import Image

    prompts, images = iter(prompts), iter(images)
    return [next(prompts) if k == "text" else Image.fromarray(next(images)) for k in order]


def record_generation(out: pathlib.Path, name: str, cfg, inf, rng, p: dict) -> None:
    with np.load(REFERENCE / f"{name}.npz") as ref:
        order = json.loads(str(ref["input_order_json"]))
        ref_prompts = json.loads(str(ref["prompt_ids_json"]))
        kw = json.loads(str(ref["kwargs_json"]))
    ds = cfg.latent_downsample
    prompts = [_text_ids(rng, len(t), cfg) for t in ref_prompts]
    images = []
    if name == "multiref":  # each input image enters the VAE and (resized to multiples of 14) the ViT
        for gh, gw in p["multiref_shapes"]:
            images.append(random_image(rng, _vae_and_vit(gh, cfg) * ds, _vae_and_vit(gw, cfg) * ds))
    shape_src = None
    if "image_shapes" in kw:
        gh, gw = p["t2i_shape"]
        kw["image_shapes"] = [min(gh, cfg.max_latent_size) * ds, min(gw, cfg.max_latent_size) * ds]
        shape_src = tuple(kw["image_shapes"])
    else:
        shape_src = images[-1].shape[:2]
    H, W = shape_src
    init_noise = rng.standard_normal(((H // ds) * (W // ds), cfg.patch_latent_dim)).astype(np.float32)
    call_kw = dict(kw, vae_posterior="mean")  # (as the golden recordings: the posterior mean)
    if "image_shapes" in call_kw:
        call_kw["image_shapes"] = tuple(call_kw["image_shapes"])
    res = inf.interleave_inference(_inputs(order, prompts, images), init_noise=init_noise, return_velocities=True,
                                   **call_kw)
    d = dict(init_noise=init_noise, latent=np.asarray(res["latent"]),
             decoded=np.asarray(res["decoded"])[None].transpose(0, 3, 1, 2),
             dbg_velocity_per_step=np.asarray(res["velocities"]), image_uint8=np.asarray(res["image"]),
             prompt_ids_json=prompts, input_order_json=order, kwargs_json=kw)
    for k, img in enumerate(images):
        d[f"input_image_{k}"] = img
    _save_npz(out / f"{name}.npz", d)


def _vae_and_vit(g: int, cfg) -> int:
    """A latent grid side <= g that fits the latent table and whose pixels, resized to the nearest multiple of
    the ViT patch, fit the ViT table."""
    g = min(g, cfg.max_latent_size)
    while g > 1 and round(g * cfg.latent_downsample / cfg.vit.patch_size) > cfg.vit_max_num_patch_per_side:
        g -= 1
    return g


def record_understand(out: pathlib.Path, cfg, inf, rng, p: dict) -> None:
    with np.load(REFERENCE / "understand.npz") as ref:
        order = json.loads(str(ref["input_order_json"]))
        ref_prompts = json.loads(str(ref["prompt_ids_json"]))
        kw = json.loads(str(ref["kwargs_json"]))
    prompts = [_text_ids(rng, len(t), cfg) for t in ref_prompts]
    h, w = p["understand_px"]
    side = (cfg.vit_max_num_patch_per_side - 1) * cfg.vit.patch_size  # after the VAE and ViT rounding: fits
    img = random_image(rng, min(h, side), min(w, side))
    res = inf.interleave_inference(_inputs(order, prompts, [img]), **kw)
    d = dict(text_ids=np.asarray(res["text_ids"]), prompt_ids_json=prompts, input_image_0=img,
             input_order_json=order, kwargs_json=kw)
    _save_npz(out / "understand.npz", d)


def record_vae(out: pathlib.Path, cfg, vae, rng, p: dict) -> None:
    import jax.numpy as jnp

    gh, gw = p["vae_grid"]
    ds = cfg.latent_downsample
    img = _unit(random_image(rng, gh * ds, gw * ds))[None]  # [1, 3, H, W]
    x = jnp.asarray(img.transpose(0, 2, 3, 1))
    moments = np.asarray(vae.encode_moments(x)).transpose(0, 3, 1, 2)
    latent = vae.encode(x)
    decoded = np.asarray(vae.decode(latent)).transpose(0, 3, 1, 2)
    _save_npz(out / "vae.npz", dict(image=img, moments=moments, latent=np.asarray(latent).transpose(0, 3, 1, 2),
                                    decoded=decoded))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\nNOT AN ORACLE: every output is "
                                 "echo4o_jax's own; it only checks that the golden tests read every size from the "
                                 "folder (see the module docstring).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path, help="folder to write (created; must be empty or absent)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="b")
    ap.add_argument("--seed", type=int, default=0)
    for f in SIZE_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"override the preset's {f}")
    ap.add_argument("--vae-ch-mult", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="comma-separated, e.g. 1,2,2,2")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for f in SIZE_FLAGS + ("vae_ch_mult",):
        v = getattr(args, f)
        if v is not None:
            p[f] = v
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} exists and is not empty")
    args.out.mkdir(parents=True, exist_ok=True)

    from echo4o_jax.model.loading import load_bagel, load_vae

    cfg = build_config(p)
    cfg.validate()
    rng = np.random.default_rng(args.seed)
    write_configs(args.out, cfg, args.preset if all(getattr(args, f) is None for f in SIZE_FLAGS) else "custom",
                  args.seed)
    _save_safetensors(args.out / "ema.safetensors", random_bagel_tensors(cfg, rng))
    _save_safetensors(args.out / "ae.safetensors", random_vae_tensors(cfg, rng))
    # everything below runs on the model as the tests load it (through our loader)
    from echo4o_jax.config import BagelConfig

    cfg2 = BagelConfig.from_checkpoint_dir(args.out)
    assert cfg2 == cfg, (cfg2, cfg)
    model, vae = load_bagel(args.out, cfg), load_vae(args.out, cfg)
    record_train_step(args.out, cfg, model, vae, make_samples(cfg, p, rng), rng)
    from test_golden import golden_inferencer

    inf = golden_inferencer(cfg, model, vae, max_context=4096)  # (the cases are drawn below: room for any)
    record_generation(args.out, "t2i", cfg, inf, rng, p)
    record_generation(args.out, "multiref", cfg, inf, rng, p)
    record_understand(args.out, cfg, inf, rng, p)
    record_vae(args.out, cfg, vae, rng, p)
    print(f"wrote {args.out} (preset {args.preset}): NOT an oracle -- outputs of echo4o_jax itself")
    return 0


if __name__ == "__main__":
    sys.exit(main())
