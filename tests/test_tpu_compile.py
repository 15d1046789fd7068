"""The demo config's full train step compiles ahead of time for a TPU topology (v5p:2x2x1) on this CPU
machine, through the same code path as `bench/tpu_compile.py` (needs libtpu: the `tpu` extra)."""

from __future__ import annotations

import os
import pathlib

import pytest
from conftest import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]' or 'jax[tpu]==<jax version>')")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no exclusive TPU lock needed


def test_demo_train_step_compiles_for_v5p_2x2x1():
    import jax

    if jax.default_backend() == "tpu":
        pytest.skip("on a real TPU host: the topology API is for compiling without one")
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    c = load_file(ROOT / "configs" / "demo.py", "demo_config").get_config()
    c.data.packs_per_step = -1  # one pack per data-parallel chip
    c.mesh = dict(data=1, fsdp=2, tensor=2)
    c.model.remat = "full"
    # the demo geometry; fewer / smaller padded VAE canvases keep the compile short
    c.data.budget.vae_images = 2
    devices = tc.tpu_devices("v5p:2x2x1")  # (libtpu is installed: a failure here is a failure)
    assert len(devices) == 4
    r = tc.compile_step(c, devices, tc.chip_hbm("v5p:2x2x1"))
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["packs"] == 2
    assert r["argument_bytes"] > 0 and r["output_bytes"] > 0 and r["temp_bytes"] > 0
    assert 0 < r["total_bytes"] < r["hbm_bytes"] and r["headroom"] > 0.9
    assert r["flops_per_chip"] > 0


def _tiny_on_v5p():
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    devices = tc.tpu_devices("v5p:2x2x1")
    c = load_file(ROOT / "configs" / "synthetic_tiny.py", "tiny_config").get_config()
    c.data.packs_per_step = -1
    c.mesh = dict(data=1, fsdp=4, tensor=1)
    return tc, devices, c


def test_the_trainers_settings_reach_the_compiled_step(monkeypatch):
    """freeze_und, vae_posterior, ce_loss_reweighting and data.vae_latents reach the step bench/tpu_compile.py
    lowers for a TPU topology: the model config, the step's make_train_step arguments (train_step_from_config, as the Trainer) and
    the batch (precomputed latents: `vae_moments` canvases, no VAE encoder; records: uint8 images)."""
    import jax

    if jax.default_backend() == "tpu":
        pytest.skip("on a real TPU host: the topology API is for compiling without one")
    import echo4o_jax.train.trainer as trainer_mod

    tc, devices, c = _tiny_on_v5p()
    seen = []
    real = trainer_mod.make_train_step  # (what train_step_from_config calls, for the Trainer and tpu_compile)
    monkeypatch.setattr(trainer_mod, "make_train_step", lambda *a, **kw: seen.append(kw) or real(*a, **kw))

    b, pixels = tc.lower_step(c, devices)
    assert not b.cfg.freeze_und and b.vae_moments is None
    batch = b.args[3]
    assert "vae_images" in batch and "vae_moments" not in batch and batch["vit_patches"].dtype == "float32"
    assert seen[-1]["vae_posterior"] == "sample" and seen[-1]["ce_reweighting"] is False
    assert "convolution" in pixels.as_text()  # the VAE encoder runs in the step

    c.train.freeze_und = True
    c.model.vae_posterior = "mean"
    c.train.ce_loss_reweighting = True
    c.data.kind = "records"  # (data.vae_latents needs it; no dataset is read to build the abstract batch)
    c.data.vae_latents = "/nonexistent/latents"
    b, latents = tc.lower_step(c, devices, "bfloat16")
    assert b.cfg.freeze_und and b.vae_moments == "bfloat16"
    batch = b.args[3]
    bud, g = c.data.budget, c.model.geometry.vae
    assert "vae_images" not in batch
    assert batch["vae_moments"].shape == (4, bud.vae_images, bud.vae_image_size[0] // g.downsample,
                                          bud.vae_image_size[1] // g.downsample, 2 * g.z_channels)
    assert batch["vae_moments"].dtype == "bfloat16" and batch["vit_patches"].dtype == "uint8"
    assert seen[-1]["vae_posterior"] == "mean" and seen[-1]["ce_reweighting"] is True
    assert "convolution" not in latents.as_text()  # precomputed latents: no VAE encoder


def test_pallas_tpu_steps_compile_the_mosaic_kernel_and_pallas_gpu_is_refused():
    """model.attention_impl=pallas_tpu compiled for a TPU topology here (JAX_PLATFORMS=cpu) is the Mosaic kernel in
    every attention (its interpreted emulation was compiled before: jax.default_backend() is the CPU here), and the
    count is in the result; pallas_gpu, the GPU kernel, is refused naming the one that fits."""
    import jax

    from echo4o_jax.train.trainer import ConfigValueError

    if jax.default_backend() == "tpu":
        pytest.skip("on a real TPU host: the topology API is for compiling without one")
    tc, devices, c = _tiny_on_v5p()
    c.model.attention_impl = "pallas_tpu"
    r = tc.compile_step(c, devices, tc.chip_hbm("v5p:2x2x1"))
    assert r["tpu_custom_calls"] >= 6  # forward, dq, dkv: in the LLM's and in the ViT's layers
    c.model.attention_impl = "pallas_gpu"
    with pytest.raises(ConfigValueError, match="'pallas_gpu' is the GPU kernel and the backend is 'tpu': "
                                               "use attention_impl='pallas_tpu'"):
        tc.compile_step(c, devices)


def test_a_checkpoint_config_without_ckpt_compiles_the_released_geometry_with_its_settings():
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    c = load_file(ROOT / "configs" / "echo4o_7b.py", "echo4o_7b_config").get_config()
    c.train.freeze_und = True
    c.model.attention_tuning = "fwd=64x64:w4:s3"
    cfg = tc.bagel_config(c)
    assert cfg.llm.hidden_size == 3584 and cfg.llm.num_layers == 28 and cfg.max_latent_size == 64
    assert cfg.freeze_und and cfg.attention_tuning == "fwd=64x64:w4:s3" and cfg.remat == "full"
    assert c.model.init == "checkpoint"  # the caller's config is left as it was


def test_every_candidate_failing_is_reported_with_its_reasons(capsys, monkeypatch):
    tc, _, _ = _tiny_on_v5p()

    def failing(c, *args, **kwargs):  # each candidate fails to compile, for a reason of its tensor size
        raise (RuntimeError("RESOURCE_EXHAUSTED: out of HBM") if c.mesh.tensor == 1 else ValueError("no layout"))

    monkeypatch.setattr(tc, "compile_step", failing)
    assert tc.main(["--config", str(ROOT / "configs" / "synthetic_tiny.py"), "--topology", "v5p:2x2x1",
                    "--tensor", "1,2", "--set", "data.packs_per_step=-1"]) == 1
    out = capsys.readouterr().out
    assert "no candidate fits" not in out
    assert "every candidate (8) failed to compile; 2 distinct reasons:" in out
    assert "  RuntimeError: RESOURCE_EXHAUSTED: out of HBM" in out and "  ValueError: no layout" in out
