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
    try:
        devices = tc.tpu_devices("v5p:2x2x1")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"libtpu cannot describe a v5p:2x2x1 topology here: {e}")
    assert len(devices) == 4
    r = tc.compile_step(c, devices, tc.chip_hbm("v5p:2x2x1"))
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["packs"] == 2
    assert r["argument_bytes"] > 0 and r["output_bytes"] > 0 and r["temp_bytes"] > 0
    assert 0 < r["total_bytes"] < r["hbm_bytes"] and r["headroom"] > 0.9
    assert r["flops_per_chip"] > 0
