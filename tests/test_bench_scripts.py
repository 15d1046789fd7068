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
    assert tt.main(["--config", str(TINY), "--steps", "1", "--impls", "xla_blockwise", "--profile-steps", "1",
                    "--peak-flops", str(peak), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "error" not in r, r
    assert r["attention_impl"] == "xla_blockwise" and r["tokens_per_step"] > 0 and r["model_flops_per_step"] > 0
    assert abs(r["tokens_per_second"] - r["tokens_per_step"] / r["step_seconds"]) < 1e-6 * r["tokens_per_second"]
    assert abs(r["mfu"] - r["model_flops_per_step"] / (r["step_seconds"] * len(jax.devices()) * peak)) < 1e-12
    # the traced step's op time by named scope: every part of the model shows up, and the parts add up
    pr = r["profile"]
    assert pr["steps"] == 1 and pr["events"] > 0
    assert {"attention", "qkv", "mlp", "norm", "o_proj", "vit", "lm_head_ce", "vae_encode", "optimizer"} <= {
        k for k, v in pr["by_scope"].items() if v > 0}
    assert abs(sum(pr["by_scope"].values()) - pr["device_seconds_per_step"]) < 1e-9
    assert pr["unmapped_events"] < 0.2 * pr["events"]
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
    # the optimizer part timed alone, and one decoder layer's share of the parameters
    n_llm_layers = sum(x.size for e in ("und", "gen") for x in jax.tree.leaves(params["llm"][e]))
    assert r["num_layers"] == cfg.model.geometry.llm.num_layers and r["update_seconds"] > 0
    assert abs(r["layer_param_fraction"] * r["num_layers"] * (n_bytes // 4) - n_llm_layers) < 1e-6 * n_llm_layers
    assert r["compiled_memory"]["argument"] >= r["train_state_bytes"]

    # CPU reports no device memory: give the summary the phases a GPU run records
    G = 2**30
    r["memory_phases"] = {"setup": {"in_use": 45 * G, "peak": 60 * G}, "first_step": {"in_use": 46 * G, "peak": 79 * G}}
    out.write_text(json.dumps(r))
    capsys.readouterr()
    assert gs.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.split()[0] == "xla_blockwise" and "memory" not in line
           and "by scope" not in line]
    assert len(row) == 1
    share = f"{att['decoder_attention_s'] / r['step_seconds']:.0%}"
    assert f"{r['step_seconds']:.3f}" in row[0] and f"{r['mfu']:.1%}" in row[0] and share in row[0]
    assert f"{r['mfu_full_model']:.1%}" in row[0]
    assert "xla_blockwise memory GiB (in use / peak so far): setup 45.0 / 60.0, first_step 46.0 / 79.0" in text
    assert f"train state {r['train_state_bytes'] / G:.1f}" in text
    (scope_line,) = [line for line in text.splitlines() if "device time per step by scope" in line]
    top_scope, top_s = next(iter(pr["by_scope"].items()))
    assert scope_line.startswith("xla_blockwise ") and f"{top_scope} {top_s * 1e3:.1f} ms" in scope_line

    # per-layer rows: runs equal but for their depth give one layer's time, FLOPs and MFU, split from its
    # share of the optimizer update, and the step extrapolated to 28 layers
    deep = dict(r, num_layers=4, step_seconds=0.25, model_flops_per_step=130e12, mfu=130e12 / (0.25 * peak),
                update_seconds=0.04, layer_param_fraction=0.15, overrides=["model.geometry.llm.num_layers=4"])
    shallow = dict(deep, num_layers=2, step_seconds=0.16, model_flops_per_step=100e12, mfu=100e12 / (0.16 * peak),
                   overrides=["model.geometry.llm.num_layers=2"])
    (tmp_path / "train_deep.json").write_text(json.dumps(deep))
    (tmp_path / "train_shallow.json").write_text(json.dumps(shallow))
    assert gs.main([str(tmp_path)]) == 0
    (layer,) = [line for line in capsys.readouterr().out.splitlines() if "one decoder layer" in line]
    dt, df, u = 0.045, 15e12, 0.04 * 0.15
    assert layer.startswith("xla_blockwise remat ") and "(2 vs 4 layers) 45.0 ms, 15.0 TFLOP" in layer
    assert f"MFU {df / (dt * peak):.1%}" in layer and f"compute alone {(dt - u) * 1e3:.1f} ms" in layer
    assert f"MFU {df / ((dt - u) * peak):.1%})" in layer
    t28, f28 = 0.25 + 24 * dt, 130e12 + 24 * df
    assert f"step at 28 layers {t28:.3f} s, MFU {f28 / (t28 * peak):.1%}" in layer


def test_cpu_baseline_refuses_unknown_variants_before_compiling(capsys):
    import pytest

    cb = load_file(ROOT / "bench" / "cpu_baseline.py", "cpu_baseline_script")
    for bad in ("pallas_gpu", "xla_dense:x", "xla_blockwise,typo+latents"):
        with pytest.raises(SystemExit) as e:
            cb.main(["--variants", bad])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert "unknown variant" in err and "compiled" not in out  # refused before any variant compiled


def test_a_failing_profiler_is_reported_not_fatal(monkeypatch):
    """train_throughput's profile is an extra: a profiler that fails (no CUPTI on the machine, ...) is
    recorded as the run's profile error, and the measurements taken before it are kept."""
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")

    def no_profiler(*args, **kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(jax.profiler, "trace", no_profiler)

    class Trainer:  # what profile_steps uses of a trainer
        source = iter(range(2))
        steps_run = 0

        def train_step(self, batch):
            self.steps_run += 1

    tr = Trainer()
    assert tt.profile_steps(tr, 2, "") == {"error": "RuntimeError: CUPTI unavailable"}
    assert tr.steps_run == 0
