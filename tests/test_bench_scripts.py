"""The benchmark scripts a lent GPU runs (bench/gpu_check.sh: attention_bench, train_throughput, gpu_summary)
work end to end on CPU with the tiny config, so a GPU's few minutes are not lost to a broken script, and
their figures are consistent with what they measured."""

from __future__ import annotations

import json
import pathlib

import jax
from conftest import load_file
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "synthetic_tiny.py"


def test_attention_and_train_benchmarks_and_gpu_summary(tmp_path, capsys):
    ab = load_file(ROOT / "bench" / "attention_bench.py", "attention_bench_script")
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    gs = load_file(ROOT / "bench" / "gpu_summary.py", "gpu_summary_script")

    assert ab.main(["--config", str(TINY), "--iters", "1", "--impls", "xla_blockwise", "--dtype", "float32",
                    "--out", str(tmp_path / "attention.json")]) == 0
    a = json.loads((tmp_path / "attention.json").read_text())
    (att,) = [x for x in a["results"] if x["impl"] == "xla_blockwise"]
    assert att["max_abs_err_loss"] == 0.0 and att["decoder_attention_s"] > 0

    peak = 1e12
    out = tmp_path / "train_xla_blockwise.json"
    assert tt.main(["--config", str(TINY), "--steps", "1", "--impls", "xla_blockwise",
                    "--peak-flops", str(peak), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "error" not in r, r
    assert r["attention_impl"] == "xla_blockwise" and r["tokens_per_step"] > 0 and r["model_flops_per_step"] > 0
    assert abs(r["tokens_per_second"] - r["tokens_per_step"] / r["step_seconds"]) < 1e-6 * r["tokens_per_second"]
    assert abs(r["mfu"] - r["model_flops_per_step"] / (r["step_seconds"] * len(jax.devices()) * peak)) < 1e-12
    # the full-model count adds the ViT, connector, latent projections and the VAE encoder to the official one
    assert r["model_flops_full_per_step"] > r["model_flops_per_step"]
    assert abs(r["mfu_full_model"] / r["mfu"] - r["model_flops_full_per_step"] / r["model_flops_per_step"]) < 1e-9
    # the train state is fp32 params + EMA + two Adam moments (+ step and rng), all arguments of the step
    cfg = tt.load_config(str(TINY))
    from echo4o_jax.model.bagel import Bagel
    from echo4o_jax.train.trainer import model_config_from

    params = nnx.state(nnx.eval_shape(lambda: Bagel(model_config_from(cfg), rngs=nnx.Rngs(0))), nnx.Param)
    n_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    assert 4 * n_bytes <= r["train_state_bytes"] <= 4 * n_bytes + 1024
    assert r["compiled_memory"]["argument"] >= r["train_state_bytes"]

    # CPU reports no device memory: give the summary the phases a GPU run records
    G = 2**30
    r["memory_phases"] = {"setup": {"in_use": 45 * G, "peak": 60 * G}, "first_step": {"in_use": 46 * G, "peak": 79 * G}}
    out.write_text(json.dumps(r))
    capsys.readouterr()
    assert gs.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.split()[0] == "xla_blockwise" and "memory" not in line]
    assert len(row) == 1
    share = f"{att['decoder_attention_s'] / r['step_seconds']:.0%}"
    assert f"{r['step_seconds']:.3f}" in row[0] and f"{r['mfu']:.1%}" in row[0] and share in row[0]
    assert f"{r['mfu_full_model']:.1%}" in row[0]
    assert "xla_blockwise memory GiB (in use / peak so far): setup 45.0 / 60.0, first_step 46.0 / 79.0" in text
    assert f"train state {r['train_state_bytes'] / G:.1f}" in text


def test_cpu_baseline_refuses_unknown_variants_before_compiling(capsys):
    import pytest

    cb = load_file(ROOT / "bench" / "cpu_baseline.py", "cpu_baseline_script")
    for bad in ("pallas_gpu", "xla_dense:x", "xla_blockwise,typo+latents"):
        with pytest.raises(SystemExit) as e:
            cb.main(["--variants", bad])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert "unknown variant" in err and "compiled" not in out  # refused before any variant compiled
