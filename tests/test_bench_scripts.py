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

    assert ab.main(["--config", str(TINY), "--iters", "1", "--impls", "xla_blockwise,xla_dense", "--dtype",
                    "float32", "--out", str(tmp_path / "attention.json")]) == 0
    a = json.loads((tmp_path / "attention.json").read_text())
    (att,) = [x for x in a["results"] if x["impl"] == "xla_blockwise"]  # (the reference itself)
    assert att["decoder_attention_s"] > 0 and "error" not in att
    # the dense implementation's figures against that reference: float32 noise, the golden tolerances' size
    (dense,) = [x for x in a["results"] if x["impl"] == "xla_dense"]
    assert "error" not in dense and dense["max_abs_err_loss"] <= 1e-4
    assert len(dense["max_abs_err_grads"]) == len(dense["max_abs_ref_grads"]) == 3  # q, k, v
    for err, ref in zip(dense["max_abs_err_grads"], dense["max_abs_ref_grads"]):
        assert ref > 0 and err <= 1e-4 + 1e-3 * ref

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
    # (and, both runs traced, one layer's device time by scope)
    deep = dict(r, num_layers=4, step_seconds=0.25, model_flops_per_step=130e12, mfu=130e12 / (0.25 * peak),
                update_seconds=0.04, layer_param_fraction=0.15, overrides=["model.geometry.llm.num_layers=4"],
                profile=dict(pr, note=None, by_scope={"mlp": 0.05, "attention": 0.03, "other": 0.01}))
    shallow = dict(deep, num_layers=2, step_seconds=0.16, model_flops_per_step=100e12, mfu=100e12 / (0.16 * peak),
                   overrides=["model.geometry.llm.num_layers=2"],
                   profile=dict(pr, note=None, by_scope={"mlp": 0.02, "attention": 0.01, "other": 0.008}))
    (tmp_path / "train_deep.json").write_text(json.dumps(deep))
    (tmp_path / "train_shallow.json").write_text(json.dumps(shallow))
    assert gs.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (scopes,) = [line for line in lines if "one decoder layer's device time by scope" in line]
    assert scopes.endswith("(traced runs; 26.0 ms): mlp 15.0 ms, attention 10.0 ms, other 1.0 ms")
    (layer,) = [line for line in lines if "one decoder layer (" in line]
    dt, df, u = 0.045, 15e12, 0.04 * 0.15
    assert layer.startswith("xla_blockwise remat ") and "(2 vs 4 layers) 45.0 ms, 15.0 TFLOP" in layer
    assert f"MFU {df / (dt * peak):.1%}" in layer and f"compute alone {(dt - u) * 1e3:.1f} ms" in layer
    assert f"MFU {df / ((dt - u) * peak):.1%})" in layer
    t28, f28 = 0.25 + 24 * dt, 130e12 + 24 * df
    assert f"step at 28 layers {t28:.3f} s, MFU {f28 / (t28 * peak):.1%}" in layer
    assert layer.endswith(f", attention {att['decoder_attention_s'] / a['layers'] * 28 / t28:.0%} of it")
    # a traced run with much of its time in command buffers (scopes hidden) gives no per-layer scopes and says
    # why; a little (at most gs.HIDDEN_LIMIT) is said but does not hide the rest
    from echo4o_jax.train.profile import COMMAND_BUFFER

    for hidden, per_layer in ((0.08 * 0.1, False), (0.002 * 0.1, True)):
        note = f"{hidden / 0.1:.0%} of the device time ran in XLA command buffers"
        shallow["profile"].update(note=note, device_seconds_per_step=0.1, by_scope={
            "mlp": 0.02, "attention": 0.01, "other": 0.008, COMMAND_BUFFER: hidden})
        (tmp_path / "train_shallow.json").write_text(json.dumps(shallow))
        assert gs.main([str(tmp_path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert bool([line for line in lines if "one decoder layer's device time by scope" in line]) == per_layer
        assert f"shallow profile: {note}" in lines
        assert any(line.startswith("shallow device time per step by scope") for line in lines)
    # as does one traced before the traced steps ran without command buffers (no note; H200, 2026-11-28)
    old = json.loads((ROOT / "bench/results/h200_train_pallas_gpu_full_2layers_2026-11-28.json").read_text())
    assert old["profile"]["top_ops"][0][0].startswith("command_buffer") and "note" not in old["profile"]
    shallow["profile"] = old["profile"]
    (tmp_path / "train_shallow.json").write_text(json.dumps(shallow))
    assert gs.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "one decoder layer's device time by scope" in line]
    assert any(line.startswith("shallow profile: at least 80% of its device time ran in XLA command buffers")
               for line in lines)


def test_cpu_baseline_refuses_bad_input_before_compiling(monkeypatch, capsys):
    """One `error:` line and exit 2, before any variant is compiled: the widths, budgets and blocks are checked
    as the Trainer checks them and the pack is built once (bad ones used to end in a traceback, some after the
    whole run)."""
    from echo4o_jax.train import trainer

    cb = load_file(ROOT / "bench" / "cpu_baseline.py", "cpu_baseline_script")

    def no_trainer(*a, **k):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(trainer, "Trainer", no_trainer)
    cases = [(["--variants", bad], "unknown variant") for bad in ("pallas_gpu", "xla_dense:x", "xla_blockwise,typo+latents")]
    cases += [(["--steps", "0"], "--steps 0: must be at least 1"),
              (["--image", "1000"], "--image 1000: must be a positive multiple of 16"),
              (["--text-budget", "256", "--image", "64"], "budget text_tokens=256"),
              (["--t2i", "-1"], "--t2i -1: must be at least 0"),
              (["--hidden", "16"], "--hidden 16: must be at least 32"),
              (["--hidden", "48"], "--hidden 48: must be a multiple of 32"),
              (["--variants", "xla_blockwise:0"], "--variants xla_blockwise:0: model.attention_block_q=0"),
              (["--vae-budget", "0"], "data.budget.text_tokens and vae_tokens must be > 0"),
              (["--t2i", "0", "--edit", "0", "--und", "0"], "the pack needs at least one sample"),
              (["--out", "/nonexistent_dir/x.json"], "--out /nonexistent_dir/x.json: no such folder /nonexistent_dir")]
    for bad, msg in cases:
        assert cb.main(bad) == 2, bad
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1 and not out, (bad, err)


def test_train_throughput_refuses_a_misspelt_override(capsys):
    """--set with a key the config lacks: one error line, exit 2, before anything is measured (it used to run
    the config's own value and record the typo as an override)."""
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    assert tt.main(["--config", str(TINY), "--set", "model.remat_typo=dots"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ("error: --set model.remat_typo=dots: unknown config key model.remat_typo (did you mean "
                           "model.remat?)") and out == ""
    assert tt.main(["--config", str(TINY), "--set", "model.remat"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    # values read as the train command reads list overrides (dict(...) too), else as the string
    from ml_collections import ConfigDict
    c = ConfigDict(dict(data=dict(datasets=[dict(path="a", weight=1)], name="x")))
    tt.apply_override(c, 'data.datasets=[dict(path="b", weight=2.5)]')
    tt.apply_override(c, "data.name=surreal")
    assert c.data.datasets == [dict(path="b", weight=2.5)] and c.data.name == "surreal"


def test_train_throughput_refuses_bad_input_before_measuring(monkeypatch, capsys):
    """Bad input is one `error:` line and exit 2 before the first implementation is measured (it used to be a
    JSON error row with exit 0, after the others were measured, or a ZeroDivisionError after the whole run)."""
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")

    def measure(args, impl):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(tt, "measure", measure)
    base = ["--config", str(TINY)]
    for bad, msg in ((["--steps", "0"], "--steps 0: must be at least 1"), (["--steps", "-2"], "--steps -2"),
                     (["--set", "model.remat=bogus"], "model.remat='bogus': expected"),
                     (["--set", "optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
                     (["--impls", "xla_blockwise,xla_dense,bogus"], "--impls xla_blockwise,xla_dense,bogus: unknown bogus"),
                     (["--impls", "xla_dense", "--set", "model.attention_block_q=0"], "--impls xla_dense: model."),
                     (["--set", "model.geometry.llm.num_layers=0"], "model.geometry: llm.num_layers=0 must be >= 1"),
                     (["--peak-flops", "-1"], "--peak-flops -1.0"), (["--profile-steps", "-1"], "--profile-steps -1"),
                     (["--out", "/nonexistent_dir/x.json"], "--out /nonexistent_dir/x.json: no such folder"),
                     (["--config", "/nonexistent.py"], "--config /nonexistent.py: no such file")):
        assert tt.main(base + bad) == 2, bad
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1 and not out, (bad, err)


def test_train_throughput_keeps_what_it_measured_when_interrupted(tmp_path, monkeypatch, capsys):
    """Ctrl-C with several --impls writes the implementations measured before it (the others marked) and exits
    130 with one line (it was a traceback that lost them); an implementation that failed makes the exit 1."""
    import pytest

    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")

    def measure(args, impl):
        if impl == "xla_dense":
            raise KeyboardInterrupt
        if impl == "pallas_interpret":
            raise RuntimeError("does not fit")
        return dict(attention_impl=impl, compile_seconds=1.0, step_seconds=0.5, tokens_per_second=100.0)

    monkeypatch.setattr(tt, "measure", measure)
    out = tmp_path / "t.json"
    try:
        rc = tt.main(["--config", str(TINY), "--impls", "xla_blockwise,xla_dense,pallas_gpu", "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C went through: what was measured before it is lost")
    assert rc == 130
    rows = json.loads(out.read_text())
    assert rows[0]["step_seconds"] == 0.5 and [r.get("interrupted") for r in rows] == [None, True, True]
    err = capsys.readouterr().err.strip()
    assert err == f"error: interrupted (Ctrl-C): 1 of 3 implementations measured, written to {out}"
    assert tt.main(["--config", str(TINY), "--impls", "xla_blockwise,pallas_interpret", "--out", str(out)]) == 1
    assert json.loads(out.read_text())[1]["error"] == "RuntimeError: does not fit"


def test_traced_steps_wall_time_leaves_the_profiler_out(monkeypatch):
    """The traced steps' wall time per step counts the steps, not the trace's start, stop and dump."""
    import contextlib
    import time

    from echo4o_jax.train import profile as prof

    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")

    @contextlib.contextmanager
    def slow_trace(*a, **k):
        time.sleep(0.3)
        yield
        time.sleep(0.3)

    monkeypatch.setattr(jax.profiler, "trace", slow_trace)
    monkeypatch.setattr(prof, "summarize_compiled_trace", lambda d, compiled, steps: dict(steps=steps))

    class Trainer:
        source = iter(range(2))
        _compiled, state = "the timed step", None

        def train_step(self, batch):
            time.sleep(0.01)

    out = tt.profile_steps(Trainer(), 2, "")
    assert 0.01 <= out["wall_seconds_per_step"] < 0.1, out


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
        _compiled = "the timed step"

        def train_step(self, batch):
            self.steps_run += 1

    tr = Trainer()
    assert tt.profile_steps(tr, 2, "") == {"error": "RuntimeError: CUPTI unavailable"}
    assert tr.steps_run == 0 and tr._compiled == "the timed step"


def test_gpu_profile_traces_a_step_compiled_without_command_buffers(monkeypatch):
    """On a GPU, CUDA graphs (XLA command buffers) hide their kernels' scopes (an H200 trace gave 91% "other"):
    the traced steps run the step compiled again without them; the timed executable is restored after."""
    import contextlib

    from echo4o_jax.train import profile as prof

    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.profiler, "trace", lambda *a, **k: contextlib.nullcontext())
    traced_with = []
    monkeypatch.setattr(prof, "summarize_compiled_trace",
                        lambda d, compiled, steps: traced_with.append(compiled) or dict(steps=steps))

    class Trainer:
        source = iter(range(3))
        _compiled = "the timed step"
        compile_cache_hit = "the timed step's"
        ran = []
        state = None

        def compile(self, batch, compiler_options=None):
            self._compiled = ("recompiled", tuple(sorted(compiler_options.items())))
            self.compile_cache_hit = "the profile's"
            return 1.5

        def train_step(self, batch):
            self.ran.append((batch, self._compiled))

    tr = Trainer()
    out = tt.profile_steps(tr, 2, "")
    readable = ("recompiled", (("xla_gpu_enable_command_buffer", ""),))
    assert traced_with == [readable] and tr._compiled == "the timed step"
    assert tr.compile_cache_hit == "the timed step's"
    assert tr.ran == [(0, readable), (0, readable), (1, readable)]  # a first run outside the trace, then 2
    assert out["compiler_options"] == {"xla_gpu_enable_command_buffer": ""} and out["compile_seconds"] == 1.5
    assert prof.readable_compiler_options("cpu") == {} and prof.readable_compiler_options("tpu") == {}


def test_tpu_compile_refuses_bad_arguments_before_compiling(capsys):
    """One `error:` line and exit 2, before libtpu is asked for a topology or a config compiled."""
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    base = ["--config", str(TINY)]
    cases = [
        (["--topology", "v7x:2x2x1"], "unknown TPU generation 'v7x'"),
        (["--topology", "v5p"], "expected GENERATION:AxB[xC]"),
        (["--topology", "v5p:2x0x1"], "expected GENERATION:AxB[xC]"),
        (["--topology", "v5p:2x2x1", "--remat", "bogus"], "--remat 'bogus'"),
        (["--topology", "v5p:2x2x1", "--tensor", "two"], "--tensor 'two'"),
        (["--topology", "v5p:2x2x1", "--headroom", "1.5"], "--headroom 1.5"),
        (["--topology", "v5p:2x2x1", "--no-search", "--remat", "full"], "with --no-search"),
        (["--topology", "v5p:2x2x1", "--set", "model.remat=full"], "the search sets model.remat"),
        (["--topology", "v5p:2x2x1", "--set", "model.remat"], "expected key=value"),
        (["--topology", "v5p:2x2x1", "--no-search", "--set", "nosuch.key=1"], "--set nosuch.key=1"),
        (["--topology", "v5p:2x2x1", "--no-search", "--set", "model.vae_posterior=bogus"], "model.vae_posterior"),
        (["--topology", "v5p:2x2x1", "--no-search", "--latents-dtype", "bfloat16"], "needs data.vae_latents"),
        (["--topology", "v5p:2x2x1", "--out", "/proc/nope/x.json"], "--out /proc/nope/x.json: no such folder"),
    ]
    for args, msg in cases:
        assert tc.main(base + args) == 2, args
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, err)
        assert "[tpu_compile]" not in out
    assert tc.main(["--config", "/nonexistent.py", "--topology", "v5p:2x2x1"]) == 2
    assert capsys.readouterr().err.startswith("error: --config /nonexistent.py")
    # a misspelt key is refused (it used to compile the config's own value under the typo's name), with the
    # key it was likely meant to be
    assert tc.main(base + ["--topology", "v5p:2x2x1", "--no-search", "--set", "model.remat_typo=full"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --set model.remat_typo=full: unknown config key "
                                               "model.remat_typo (did you mean model.remat?)")


def test_tpu_compile_refuses_a_mesh_that_does_not_span_the_chips(monkeypatch, capsys):
    """--no-search with mesh.tensor=3 on 4 chips is a usage error (it was reported as "every candidate failed to
    compile", exit 1: the docs' "no candidate fits"); checked on the topology's devices, before compiling."""
    import types

    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    monkeypatch.setattr(tc, "tpu_devices", lambda topology: [types.SimpleNamespace(device_kind="TPU v5")] * 4)

    def no_compile(*a, **k):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(tc, "compile_step", no_compile)
    assert tc.main(["--config", str(TINY), "--topology", "v5p:2x2x1", "--no-search", "--set", "mesh.tensor=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --topology v5p:2x2x1 has 4 chips: mesh ") and "4 devices" in err, err


def test_tpu_compile_without_libtpu_names_the_extra(monkeypatch, capsys):
    """With the README's first install (no `tpu` extra) the topology cannot be described: the error says what to
    install (it pointed at JAX's installation page only)."""
    import importlib.util

    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")

    def no_tpu(topology):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(tc, "tpu_devices", no_tpu)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert tc.main(["--config", str(TINY), "--topology", "v5p:2x2x1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --topology v5p:2x2x1: libtpu cannot describe it (RuntimeError: JAX TPU support not installed; cannot "
        "generate TPU topology.); libtpu is not installed: pip install -e '.[tpu]'")


def test_tpu_compile_packs_per_step_the_mesh_cannot_split(capsys):
    """data.packs_per_step must be a multiple of data x fsdp (= chips / tensor): the search skips the tensor
    sizes that break it, and a config none fits is one error line (it used to be reported as compile failures)."""
    pytest = __import__("pytest")
    pytest.importorskip("libtpu", reason="libtpu (the tpu extra) compiles for TPU topologies")
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench")
    assert tc.main(["--config", str(TINY), "--topology", "v5p:2x2x1", "--no-search",
                    "--set", "data.packs_per_step=2"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ("error: data.packs_per_step=2 must be a multiple of data x fsdp (= 4 chips / tensor: 4 "
                           "here); set it to -1 (one pack per data-parallel chip) or a multiple")
    assert "FAILED" not in out


def test_data_throughput_end_to_end_with_tiny_settings(tmp_path, monkeypatch, capsys):
    """bench/data_throughput.py runs every stage with tiny settings: the 7B recipe rows (packed as
    configs/echo4o_7b.py, consumption from the 28-layer extrapolation of the H100 layer runs) and the demo rows.
    The demo train step's timing is train_throughput.measure, run end to end in the test above; here it is
    replaced by a stand-in that checks it was handed a namespace carrying every attribute measure reads (the
    demo stage once crashed on `args.profile_steps`), so the test stays a few seconds long. The JSON is
    rewritten after each row, so a stage that fails keeps the rows measured before it."""
    import inspect
    import re

    import pytest

    dt = load_file(ROOT / "bench" / "data_throughput.py", "data_throughput_script")
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    gs = load_file(ROOT / "bench" / "gpu_summary.py", "gpu_summary_script")
    read = set(re.findall(r"\bargs\.(\w+)", inspect.getsource(tt.measure)))
    assert {"config", "set", "steps", "profile_steps", "profile_dir"} <= read
    handed = []

    def measure(args, impl):
        assert impl is None and all(hasattr(args, k) for k in read), sorted(read - set(vars(args)))
        handed.append(args)
        return dict(step_seconds=0.5, packs_per_step=2)

    monkeypatch.setattr(dt, "measure", measure)
    out_json = tmp_path / "dt.json"
    argv = ["--seconds", "0.3", "--workers", "", "--res", "256", "--samples", "3", "--demo-steps", "2",
            "--data-dir", str(tmp_path / "data"), "--json", str(out_json)]
    assert dt.main(argv) == 0
    (args,) = handed
    assert args.steps == 2 and args.config.endswith("configs/demo.py") and args.profile_steps == 0
    assert any(kv.startswith("data.records.demo_dir=") for kv in args.set)
    rows = json.loads(out_json.read_text())
    assert [r["workload"] for r in rows] == ["256^2 mix", "demo (configs/demo.py)"]
    # the 7B consumption: 8 GPUs / the 28-layer step gpu_summary extrapolates from the H100 remat-full runs
    runs = [(f.name, json.loads(f.read_text())) for f in sorted(ROOT.glob(dt.LAYER_RUNS))]
    (fit,) = [f for f in gs.layer_fits(runs) if f["remat"] == "full" and not f["tuning"]]
    assert abs(rows[0]["need_packs_s"] - 8 / fit["t28"]) < 1e-9 and 0 < fit["mfu28"] < 1
    text = capsys.readouterr().out
    assert f"{fit['mfu28']:.1%} MFU" in text and "28 layers extrapolated" in text
    # the recipe's budget (configs/echo4o_7b.py), not another one
    assert "text_tokens=1024, vit_tokens=4224, vae_tokens=11264, vae_images=4" in text
    assert rows[0]["tokens_per_pack"] <= 1024 + 4224 + 11264
    assert rows[1]["need_packs_s"] == 2 / 0.5
    # the 7B rows load as the trainer would (its pipeline config for the recipe: buffers, threads, drop_unfit,
    # dropouts), and the multi-reference samples (references at half scale) fit: none skipped as too long
    assert rows[0]["skipped_too_long"] == 0 and rows[0]["read"] >= 3
    import dataclasses

    from echo4o_jax.data.pipeline import PipelineConfig

    path = str(tmp_path / "data" / "photo256_halfrefs")
    pc = dt.recipe_pipeline_config(path, str(tmp_path / "data" / "tokenizer.json"), 2)
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
    assert (pc.worker_count, pc.packs_per_step, pc.drop_unfit, pc.vit_dropout) == (2, 8, True, 0.3)
    for k in ("worker_buffer_size", "read_threads", "read_buffer_size", "pack_threads"):
        assert getattr(pc, k) == defaults[k], k

    def broken(*a, **k):
        raise RuntimeError("demo stage failed")

    monkeypatch.setattr(dt, "demo_pipeline", broken)
    out_json.unlink()
    with pytest.raises(RuntimeError, match="demo stage failed"):
        dt.main(argv)
    assert [r["workload"] for r in json.loads(out_json.read_text())] == ["256^2 mix"]  # kept

    for bad, msg in ((["--workers", "x"], "--workers"), (["--seconds", "0"], "--seconds"),
                     (["--demo-steps", "0"], "--demo-steps"), (["--table-from", "/nonexistent.json"], "/nonexistent"),
                     (["--json", "/nonexistent_dir/x.json"], "--json /nonexistent_dir/x.json: no such folder")):
        with pytest.raises(SystemExit) as e:
            dt.main(argv + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err.strip().splitlines()[-1], bad


def test_generate_throughput_refuses_bad_input_with_one_error_line(capsys):
    """--requests < 2 (the first request compiles: per-request figures need a later one), --steps < 2, an
    unknown dtype, a bad size or checkpoint: `error:` and exit 2, no traceback, nothing timed."""
    import pytest

    gt = load_file(ROOT / "bench" / "generate_throughput.py", "generate_throughput_script")
    for bad, msg in ((["--requests", "1"], "--requests 1: at least 2"), (["--requests", "0"], "--requests 0"),
                     (["--steps", "0"], "--steps 0: at least 2"), (["--images", "0"], "--images 0"),
                     (["--dtype", "float16"], "invalid choice: 'float16'")):
        with pytest.raises(SystemExit) as e:
            gt.main(bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err, bad
    for bad, msg in ((["--ckpt", "/nonexistent"], "/nonexistent"), (["--size", "33x48"], "size 33x48")):
        assert gt.main(bad + ["--steps", "2", "--requests", "2"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1 and not out, bad


def test_interpret_mode_rows_and_unreported_memory_are_labelled(tmp_path, monkeypatch, capsys):
    """On the CPU the Pallas kernels run in interpret mode: attention_bench and train_throughput label such rows
    (table and JSON) as not kernel timings; a backend that reports no device memory shows `-`, not 0.0 GiB."""
    ab = load_file(ROOT / "bench" / "attention_bench.py", "attention_bench_script")
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    assert tt.interpret_mode("pallas_gpu", "cpu") and tt.interpret_mode("pallas_tpu", "cpu")
    assert tt.interpret_mode("pallas_interpret", "gpu") and not tt.interpret_mode("pallas_gpu", "gpu")
    assert not tt.interpret_mode("xla_blockwise", "cpu")

    assert ab.main(["--config", str(TINY), "--iters", "1", "--impls", "xla_blockwise,pallas_gpu", "--dtype", "float32",
                    "--out", str(tmp_path / "attention.json")]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "attention.json").read_text())["results"]}
    assert rows["pallas_gpu"]["interpret_mode"] is True and "interpret_mode" not in rows["xla_blockwise"]
    table = capsys.readouterr().out.split("\nattention")[-1]
    (pallas,) = [line for line in table.splitlines() if line.startswith("pallas_gpu")]
    (xla,) = [line for line in table.splitlines() if line.startswith("xla_blockwise")]
    assert pallas.endswith("(interpret mode: not a kernel timing)") and "interpret" not in xla

    # the multi-implementation table of train_throughput, on what measure records (measure itself: above)
    def measure(args, impl):
        return dict(attention_impl=impl, compile_seconds=1.0, step_seconds=0.5, tokens_per_second=100.0, mfu=None,
                    mfu_full_model=None, peak_device_memory_bytes=None if impl == "pallas_gpu" else 3 * 2**30,
                    interpret_mode=tt.interpret_mode(impl, "cpu"),
                    **(dict(peak_device_memory_at_most=3 * 2**30) if impl == "xla_dense" else {}))

    monkeypatch.setattr(tt, "measure", measure)
    assert tt.main(["--config", str(TINY), "--impls", "pallas_gpu,xla_blockwise,xla_dense"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (pallas,) = [line for line in lines if line.startswith("pallas_gpu ")]
    (xla,) = [line for line in lines if line.startswith("xla_blockwise ")]
    (dense,) = [line for line in lines if line.startswith("xla_dense ")]  # below an earlier one's peak
    assert dense.split()[4:7] == ["-", "-", "<=3.0"]
    assert pallas.split()[4:7] == ["-", "-", "-"] and pallas.endswith("(interpret mode: not a kernel timing)")
    assert xla.split()[4:7] == ["-", "-", "3.0"] and "interpret" not in xla


def test_a_second_implementations_peak_memory_is_not_the_firsts():
    """The allocator's peak cannot be reset: an implementation run after one that reached a higher peak reports
    no peak of its own (at most the earlier one, said in the JSON and the table), not the earlier one's."""
    tt = load_file(ROOT / "bench" / "train_throughput.py", "train_throughput_script")
    G = 2**30
    assert tt.own_peak({}, None) == dict(peak_device_memory_bytes=None)  # CPU: no memory stats
    assert tt.own_peak({"start": {"in_use": 0, "peak": 0}}, 5 * G) == dict(peak_device_memory_bytes=5 * G)
    assert tt.own_peak({"start": {"in_use": 0, "peak": 5 * G}}, 7 * G) == dict(peak_device_memory_bytes=7 * G)
    second = tt.own_peak({"start": {"in_use": G, "peak": 5 * G}}, 5 * G)
    assert second["peak_device_memory_bytes"] is None and second["peak_device_memory_at_most"] == 5 * G
    assert "at most 5.0 GiB" in second["peak_device_memory_note"]


def test_gpu_check_paths_are_the_callers(tmp_path):
    """OUT and CONFIG are taken relative to the folder gpu_check.sh is called from (it works in the repo root);
    a CONFIG that is not there stops it before any stage runs."""
    import subprocess

    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "OUT": "mine", "CONFIG": "configs/x.py"}, timeout=60)
    assert r.returncode == 2 and (tmp_path / "mine").is_dir(), r
    assert f"CONFIG=configs/x.py: no such file (relative to {tmp_path})" in r.stderr
    assert "=== 0 machine" not in r.stdout


def test_gpu_summary_reads_an_old_runs_relative_config_from_any_folder(tmp_path, monkeypatch):
    """Runs recorded before train_throughput wrote num_layers name their config relative to the repo root:
    their depth must not depend on the folder gpu_summary runs in (elsewhere the 4-layer H100 run dropped out
    and the per-layer fit silently used the 3-layer run)."""
    gs = load_file(ROOT / "bench" / "gpu_summary.py", "gpu_summary_script")
    monkeypatch.chdir(tmp_path)
    old = json.loads((ROOT / "bench/results/h100_train_pallas_gpu_full_4layers_2026-11-27.json").read_text())
    assert "num_layers" not in old and not pathlib.Path(old["config"]).is_absolute()
    assert gs.num_layers(old) == 4


def test_gpu_check_stops_without_a_gpu(tmp_path):
    """Without a GPU (JAX's backend cpu) stage 0 stops the check with one line: every stage used to run on the
    CPU in interpret mode for minutes and exit 0 with a summary that read like a GPU result."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": "o", "JAX_PLATFORMS": "cpu",
           "ATTN_TIMEOUT": "1", "TRAIN_TIMEOUT": "1", "PROFILE_TIMEOUT": "1"}  # (the old script: over at once)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r
    assert r.stderr.strip().splitlines()[-1].startswith("error: JAX's backend is cpu, not gpu: this check needs a GPU")
    assert "=== 0 machine" in r.stdout and "=== 1 imports" not in r.stdout


def test_attention_bench_refuses_bad_input_before_building_the_pack(monkeypatch, capsys):
    """One `error:` line, exit 2, before the pack is built or anything compiled (they were StatisticsError rows
    with exit 0, negative times, tracebacks); --sweep needs a GPU: interpreted timings would pick a "best
    tuning" from noise, which gpu_check.sh then trained with."""
    ab = load_file(ROOT / "bench" / "attention_bench.py", "attention_bench_script")

    def no_pack(*a, **k):
        raise AssertionError("built the pack before refusing")

    monkeypatch.setattr(ab, "pack_meta", no_pack)
    base = ["--config", str(TINY)]
    for bad, msg in ((["--iters", "0"], "--iters 0: must be at least 1"), (["--iters", "-1"], "--iters -1"),
                     (["--layers", "-2"], "--layers -2: must be at least 0"), (["--block", "-8"], "--block -8"),
                     (["--config", "/nonexist.py"], "--config /nonexist.py: no such file"),
                     (["--impls", "xla_blockwise,bogus"], "--impls xla_blockwise,bogus: unknown bogus"),
                     (["--out", "/nonexistent_dir/a.json"], "--out /nonexistent_dir/a.json: no such folder"),
                     (["--sweep"], "--sweep times pallas_gpu's Triton launch shapes: it needs a GPU (the backend is "
                                   "cpu")):
        assert ab.main(base + bad) == 2, bad
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1 and not out, (bad, err)


def test_attention_bench_counts_pallas_tpu_blocks_with_the_tpu_kernels_blocks():
    """pallas_tpu's blocks_kept is counted with the blocks its kernel runs with (512, capped by the padded
    length), not pallas_gpu's 64 x 64 tiles."""
    import inspect

    from echo4o_jax.model import attention
    from echo4o_jax.model.kernels.pallas_tpu_flash import BLOCK

    ab = load_file(ROOT / "bench" / "attention_bench.py", "attention_bench_script")
    assert inspect.signature(attention.attention).parameters["block_q"].default == BLOCK  # (what the bench takes)
    assert ab.tpu_blocks(1000) == (512, 512) and ab.tpu_blocks(40) == (40, 40)
    assert ab.tpu_blocks(1000, 128) == (128, 128)


def test_convert_memory_checks_layers_first_and_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    """Layer counts are checked before gigabytes are written (they failed in a child, with an off-by-one
    message or a traceback); on Ctrl-C the conversion child is waited for (it ends its Orbax save in order and
    removes its partial output; killed, it left hundreds of MB), and the run's leftovers are removed."""
    import pytest

    cm = load_file(ROOT / "bench" / "convert_memory.py", "convert_memory_script")

    def no_child(*a, **k):
        raise AssertionError("started a child before refusing")

    monkeypatch.setattr(cm.subprocess, "run", no_child)
    for bad, msg in ((["--llm-layers", "0"], "--llm-layers 0: must be at least 1"),
                     (["--vit-layers", "0"], "--vit-layers 0: must be at least 1"),
                     (["--llm-layers", "-1"], "--llm-layers -1"),
                     (["--workdir", "/proc/nope/w"], "--workdir /proc/nope/w: ")):
        assert cm.main(bad) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and len(err.splitlines()) == 1, (bad, err)

    calls = []

    class Child:  # Ctrl-C while the parent waits for the child (which got it too)
        pid = 4242

        def __init__(self, cmd, **kwargs):
            pass

        def communicate(self):
            calls.append("wait")
            if len(calls) == 1:
                raise KeyboardInterrupt
            return "", None

        def kill(self):
            calls.append("kill")

    monkeypatch.setattr(cm.subprocess, "Popen", Child)
    pids = []
    args = type("Args", (), dict(quiet=True, no_compression=False))
    with pytest.raises(KeyboardInterrupt):
        cm.run_child("to_jax", tmp_path / "official", tmp_path / "orbax", args, pids)
    assert calls == ["wait", "wait"] and pids == [4242]
    for name in (".orbax.tmp-4242-0123abcd", ".orbax.tmp-999-0123abcd", "orbax", "other"):
        (tmp_path / name).mkdir()
    cm.remove_run_files([tmp_path / "official", tmp_path / "orbax"], pids, keep=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".orbax.tmp-999-0123abcd", "other"]  # (not this run's)


def test_gpu_summary_marks_interpret_runs_and_unreported_memory(tmp_path, capsys):
    """A run without device memory figures shows `-` (it showed 0.0 GiB), an interpret-mode run says so (a CPU
    run read like a GPU result), and --help exits 0."""
    gs = load_file(ROOT / "bench" / "gpu_summary.py", "gpu_summary_script")
    run = dict(attention_impl="pallas_gpu", compile_seconds=1.0, step_seconds=0.5, tokens_per_second=100.0,
               peak_device_memory_bytes=None, interpret_mode=True)
    (tmp_path / "train_cpu.json").write_text(json.dumps(run))
    (tmp_path / "train_gpu.json").write_text(json.dumps(dict(run, peak_device_memory_bytes=3 * 2**30,
                                                             interpret_mode=False)))
    assert gs.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (cpu,) = [line for line in lines if line.startswith("cpu ")]
    (gpu,) = [line for line in lines if line.startswith("gpu ")]
    assert cpu.split()[6] == "-" and cpu.endswith("default  (interpret mode: not a kernel timing)")
    assert gpu.split()[6] == "3.0" and gpu.endswith("default")
    assert gs.main(["--help"]) == 0 and "python bench/gpu_summary.py OUT" in capsys.readouterr().out


def test_attention_share_scales_by_the_layers_the_run_had():
    """gpu_check.sh puts an out-of-memory fallback (num_layers=3) before a run's own num_layers=2: the run has 2
    layers (the last override applies), but its attention share was scaled as if it had 3 (1.5x too high)."""
    gs = load_file(ROOT / "bench" / "gpu_summary.py", "gpu_summary_layers")
    a = {"layers": 4, "results": [{"impl": "pallas_gpu", "decoder_attention_s": 0.040}]}
    r = {"overrides": ["model.geometry.llm.num_layers=3", "model.remat=full", "model.geometry.llm.num_layers=2"],
         "attention_impl": "pallas_gpu"}
    assert gs.num_layers(r) == 2
    assert abs(gs.attention_seconds(a, r) - 0.040 * 2 / 4) < 1e-12


def test_peak_flops_table_names_and_override():
    """The bf16 dense peak of a device kind (longest name first: an H200 is not an H20, an L40S not an L40);
    a kind the table lacks has none (the trainer says so on an accelerator), log.peak_flops overrides."""
    from echo4o_jax.train.flops import peak_flops_per_device as peak

    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989e12
    assert (peak("NVIDIA H20"), peak("NVIDIA L40"), peak("NVIDIA L40S")) == (148e12, 181.05e12, 362.05e12)
    assert peak("TPU v6 lite") == 918e12 and peak("TPU7x") == 2307e12
    assert peak("Some Future GPU") is None and peak("Some Future GPU", 5e14) == 5e14
