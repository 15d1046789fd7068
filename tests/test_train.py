"""Training: golden gradients through the trainer's step code, start from a converted checkpoint, non-finite
handling, config validation, freeze flags, profiling, EMA and LR schedule (the runs in processes of their own:
tests/test_train_processes.py)."""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_file, load_npz
from echo4o_jax import packing
from echo4o_jax.config import BagelConfig
from echo4o_jax.model.bagel import bagel_key_rules
from echo4o_jax.model.loading import export_official, load_bagel, load_vae
from echo4o_jax.safetensors_io import SafetensorsFile
from echo4o_jax.train.optim import ema_update, lr_schedule
from echo4o_jax.train.profile import scope_of
from echo4o_jax.train.step import make_loss_and_grads, trainable_mask
from echo4o_jax.train.trainer import ConfigValueError, NonFiniteLossError, Trainer, model_config_from, validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str):
    return load_file(ROOT / "configs" / f"{name}.py", f"cfg_{name}").get_config()


# ------------------------------------------------------------------------------------------ golden grads


def test_train_step_gradients_equal_golden(golden_dir):
    from test_golden import gradient_mismatches, loss_close, pack_golden

    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    d = load_npz(golden_dir / "train_step.npz")
    batch = pack_golden(d, cfg, slack=4)
    arrays = {k: jnp.asarray(v)[None] for k, v in packing.batch_arrays(batch).items()}
    model, vae = load_bagel(golden_dir, cfg), load_vae(golden_dir, cfg)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    vae_gd, vae_state = nnx.split(vae)
    noise = np.zeros((1, batch.vae_capacity, cfg.patch_latent_dim), np.float32)
    noise[0, : len(d["noise"])] = d["noise"]
    # the golden recording took the posterior mean (deterministic); training samples it by default
    f = make_loss_and_grads(graphdef, nnx.to_pure_dict(buffers), vae_gd, patch=cfg.latent_patch_size,
                            ce_weight=float(d["ce_weight"]), mse_weight=float(d["mse_weight"]),
                            vae_posterior="mean")
    (loss, _), grads = jax.jit(f)(nnx.to_pure_dict(params), vae_state, arrays, jnp.asarray(noise), None)
    assert loss_close(loss, d["loss"]), (float(loss), float(d["loss"]))
    got = dict(export_official(nnx.merge(graphdef, grads, buffers), bagel_key_rules(cfg)))
    bad = gradient_mismatches(got, SafetensorsFile(golden_dir / "train_grads.safetensors"))
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------ units


def test_lr_schedule_warmup_then_constant_and_cosine():
    s = lr_schedule(1e-3, 4, 100, "constant")
    assert [float(s(i)) for i in range(6)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    c = lr_schedule(1e-3, 0, 10, "cosine", min_lr=1e-5)
    assert float(c(0)) == pytest.approx(1e-3)
    assert float(c(10)) == pytest.approx(1e-5)
    assert float(c(5)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)


def test_ema_update():
    e = {"a": jnp.asarray([1.0, 2.0])}
    p = {"a": jnp.asarray([3.0, 6.0])}
    out = ema_update(e, p, 0.75)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6])
    # frozen leaves (trainable False) keep their EMA bit for bit, as the official skips them: computed, an EMA
    # equal to its weights drifts by rounding where the multiply and add round apart (eager here; a fused
    # multiply-add keeps it)
    w = jnp.asarray(np.random.default_rng(0).normal(0.0, 0.05, 10_000), jnp.float32)
    e, p = {"a": w, "b": w}, {"a": w, "b": w}
    out = ema_update(e, p, 0.9999, {"a": False, "b": True})
    assert np.array_equal(out["a"], w) and not np.array_equal(out["b"], w)


def test_bad_config_values_rejected_before_compiling():
    c = load_config("synthetic_tiny")
    c.optim.lr = 0.0
    with pytest.raises(ConfigValueError, match="optim.lr"):
        validate_config(c)
    for key, value, msg in (("sample_every", -5, r"log.sample_every=-5 must be >= 0"),
                            ("sample_steps", 0, r"log.sample_steps=0 must be > 0")):
        c = load_config("synthetic_tiny")
        c.log.sample_every = 10
        c.log[key] = value
        with pytest.raises(ConfigValueError, match=msg):
            validate_config(c)
    c = load_config("synthetic_tiny")
    c.data.packs_per_step = 0
    with pytest.raises(ConfigValueError, match="packs_per_step"):
        validate_config(c)
    for section in ("train", "data"):  # (a negative data.seed was a traceback at the first batch)
        c = load_config("synthetic_tiny")
        c[section].seed = -1
        with pytest.raises(ConfigValueError, match=rf"^{section}.seed=-1 must be >= 0$"):
            validate_config(c)
    # (a timestep shift of 0 made every training timestep 0, silently; optim.eps=0 a NaN loss at step 2, after
    # the compile; an infinite lr, a negative weight decay were taken)
    for key, value, msg in (("model.timestep_shift", 0.0, r"model.timestep_shift=0.0 must be > 0 \(1.0: no shift\)"),
                            ("model.timestep_shift", -2.0, r"model.timestep_shift=-2.0 must be > 0"),
                            ("optim.eps", 0.0, r"optim.eps=0.0 must be > 0 \(the official 1e-15\)"),
                            ("optim.weight_decay", -0.1, r"optim.weight_decay=-0.1 must be >= 0"),
                            ("optim.lr", float("inf"), r"optim.lr=inf must be > 0 and finite"),
                            # (in TFLOP/s, the official flag's unit: an MFU of ~5e11; negative: a negative MFU)
                            ("log.peak_flops", 989.0, r"log.peak_flops=989.0 must be 0 \(the device's from the "
                                                      r"table\) or a device's peak in FLOP/s, e.g. 989e12"),
                            ("log.peak_flops", -1.0, r"log.peak_flops=-1.0 must be 0")):
        c = load_config("synthetic_tiny")
        group, name = key.split(".")
        c[group][name] = value
        with pytest.raises(ConfigValueError, match=rf"^{msg}"):
            validate_config(c)
    for min_lr in (1.0, -1e-7):  # (above lr the cosine "decay" climbed to min_lr: accepted silently)
        c = load_config("synthetic_tiny")
        c.optim.update(schedule="cosine", min_lr=min_lr)
        with pytest.raises(ConfigValueError, match=rf"optim.min_lr={min_lr} must be in \[0, optim.lr="):
            validate_config(c)
        c.optim.schedule = "constant"  # (min_lr unused)
        validate_config(c)
    c = load_config("synthetic_tiny")
    c.model.init = "checkpoint"
    with pytest.raises(ConfigValueError, match="model.ckpt"):
        Trainer(c, "/nonexistent-workdir-not-created")
    assert not os.path.exists("/nonexistent-workdir-not-created")
    with pytest.raises(ConfigValueError, match="'gs://bucket/run': a URL"):
        Trainer(load_config("synthetic_tiny"), "gs://bucket/run")
    assert not os.path.exists("gs:")


def test_trainer_starts_from_a_converted_checkpoint(golden_dir, tmp_path, monkeypatch):
    """model.init=checkpoint with a converted folder (python -m tools.convert_weights.to_jax): the weights and
    the VAE are restored straight into the mesh's shardings (each leaf as the trainer's shardings say, never
    whole on one device first: nothing is placed afterwards), equal the official ones in param_dtype, and
    train."""
    import echo4o_jax.sharding as shd
    from echo4o_jax.checkpoint import flatten_dict
    from echo4o_jax.convert import convert_to_orbax

    real_put = shd.put_global

    def no_placement(tree, shardings):  # (the fixed sin-cos tables are computed here, then placed: fine)
        if set(tree) <= {"latent_pos_embed", "vit_pos_embed"}:
            return real_put(tree, shardings)
        raise AssertionError("weights loaded whole, then placed on the mesh")

    monkeypatch.setattr(shd, "put_global", no_placement)

    conv = tmp_path / "conv"
    convert_to_orbax(golden_dir, conv, dtype="bfloat16", progress=False, hash_files=False)
    c = load_config("synthetic_tiny")
    c.model.init, c.model.ckpt = "checkpoint", str(conv)
    c.train.steps = 2
    c.log.tensorboard = False
    tr = Trainer(c, tmp_path / "wd")
    official = load_bagel(golden_dir, BagelConfig.from_checkpoint_dir(golden_dir))
    want = dict(flatten_dict(nnx.to_pure_dict(nnx.state(official, nnx.Param))))
    got = dict(flatten_dict(tr.state["params"]))
    shardings = dict(flatten_dict(tr.param_sh))
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == jnp.float32 and got[k].sharding == shardings[k], k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))
    # the sin-cos position tables are the float32 ones, as the official trainer keeps them (it drops the
    # checkpoint's, here rounded to bf16; they were trained on as restored)
    from echo4o_jax.checkpoint import fixed_tables

    assert set(tr.buffers) == {k[0] for k in fixed_tables(tr.cfg)}
    for (name,), make in fixed_tables(tr.cfg).items():
        assert tr.buffers[name].dtype == jnp.float32 and tr.buffers[name].sharding == tr.buffer_sh[name]
        np.testing.assert_array_equal(np.asarray(tr.buffers[name]), make())
        assert not np.array_equal(np.asarray(jnp.asarray(make(), jnp.bfloat16), np.float32), make())
    res = tr.run()
    assert res["step"] == 2 and all(np.isfinite(h["loss"]) for h in res["history"])
    # sample grids from token-id prompts need no tokenizer (data.tokenizer is unset here)
    tr.config.log.sample_prompts, tr.config.log.sample_steps = [[1, 2, 3], [4]], 2
    grid = tr.sample_grid(2)
    H, W = tr.config.log.sample_size
    assert grid.shape == (H, 2 * W, 3) and grid.dtype == np.uint8


def test_a_resume_does_not_load_the_base_checkpoint_again(golden_dir, tmp_path, monkeypatch, capsys):
    """model.init=checkpoint: a resume takes the weights from the workdir's checkpoint, so model.ckpt's are not
    read again (a 7B run re-read 14B parameters at every restart); the resumed run continues from them."""
    import echo4o_jax.checkpoint as ck

    c = load_config("synthetic_tiny")
    c.model.init, c.model.ckpt = "checkpoint", str(golden_dir)
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 2, 2, False, False
    Trainer(c, tmp_path).run()
    saved = Trainer(c, tmp_path)
    assert saved.restore(2)

    def no_load(*a, **k):
        raise AssertionError("model.ckpt's weights were loaded for a resume")

    monkeypatch.setattr(ck, "load_any_bagel", no_load)
    capsys.readouterr()
    c.train.steps = 3
    tr = Trainer(c, tmp_path)
    assert f"[train] resuming in {tmp_path}: the weights come from its checkpoint" in capsys.readouterr().out
    assert tr.restore()
    for a, b in zip(jax.tree.leaves(tr.state["params"]), jax.tree.leaves(saved.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    res = tr.run()
    assert res["step"] == 3 and res["resumed"]


def test_a_stray_folder_in_checkpoints_is_no_step_and_a_restore_frees_the_state_it_replaces(golden_dir, tmp_path,
                                                                                            capsys):
    """`checkpoints/backup_5` (any `<name>_<digits>` folder: Orbax's listing counts it) was taken for step 5: a
    model.init=checkpoint run then took itself for a resume, loaded no weights from model.ckpt, restored none and
    trained random ones from step 0. Only step-named folders are steps. And a restore frees the state it replaces
    before the checkpoint's is read (a resume held two train states at its peak)."""
    import echo4o_jax.checkpoint as ck

    c = load_config("synthetic_tiny")
    c.model.init, c.model.ckpt = "checkpoint", str(golden_dir)
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 2, 2, False, False
    for name in ("backup_5", "broken_2", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert ck.list_train_steps(tmp_path) == []
    capsys.readouterr()
    tr = Trainer(c, tmp_path)
    assert "resuming" not in capsys.readouterr().out
    base = dict(export_official(load_bagel(golden_dir, tr.cfg), bagel_key_rules(tr.cfg)))
    got = dict(export_official(nnx.merge(tr.graphdef, tr.state["params"], tr.buffers), bagel_key_rules(tr.cfg)))
    k = "language_model.model.layers.0.mlp.gate_proj.weight"
    np.testing.assert_array_equal(got[k], base[k])  # model.ckpt's weights, not random ones
    tr.run()
    assert ck.list_train_steps(tmp_path) == [2]
    resumed = Trainer(c, tmp_path)
    old = jax.tree.leaves(resumed.state["params"])[0]
    assert resumed.restore() and old.is_deleted()
    for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(tr.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _dying(source, after: int):
    """`source` whose data workers die (killed outright: the out-of-memory killer) once it has served `after`
    batches."""
    served = []

    class Dying:
        def __next__(self):
            if len(served) == after:
                raise RuntimeError("Worker process was terminated unexpectedly")
            served.append(1)
            return next(source)

        def __getattr__(self, name):
            return getattr(source, name)

    return Dying()


def test_a_data_worker_that_died_saves_the_steps_trained_first(tmp_path):
    """A data worker killed outright (the out-of-memory killer) ends the source with a RuntimeError: the steps
    trained since the last checkpoint are saved before it ends the run (they were lost), and a note says so."""
    import echo4o_jax.checkpoint as ck

    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 6, 100, False, False
    tr = Trainer(c, tmp_path)
    tr.source = _dying(tr.source, after=3)
    with pytest.raises(RuntimeError, match="terminated unexpectedly") as ei:
        tr.run()
    assert ck.list_train_steps(tmp_path) == [3]
    assert any("the 3 step(s) this run trained were saved: checkpoint 3" in n for n in ei.value.__notes__)


def test_a_device_error_while_the_next_batch_is_copied_is_not_taken_for_a_data_error(tmp_path, monkeypatch):
    """The next batch's host-to-device copy overlaps the step in flight: its error (out of device memory) is
    raised as it is, not handled as a data worker that died (its steps saved and a note saying the data needs
    fixing)."""
    import echo4o_jax.checkpoint as ck

    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 6, 100, False, False
    tr = Trainer(c, tmp_path)
    real, calls = tr._device_batch, []

    def device_batch(batch):  # the compile's copy, step 1's, then step 2's (made while step 1 runs) fails
        calls.append(1)
        if len(calls) == 3:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
        return real(batch)

    monkeypatch.setattr(tr, "_device_batch", device_batch)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as ei:
        tr.run()
    assert not getattr(ei.value, "__notes__", None) and ck.list_train_steps(tmp_path) == []


def test_a_data_worker_that_died_when_the_disk_is_full_says_both(tmp_path, monkeypatch):
    """The save of the steps trained before a data worker died can fail too (a full disk): both are said, the
    data error raised (the save's error was a traceback raised over it)."""
    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 6, 100, False, False
    tr = Trainer(c, tmp_path)
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    tr.source = _dying(tr.source, after=3)
    monkeypatch.setattr(tr.ckpt, "save", full)
    with pytest.raises(RuntimeError, match="terminated unexpectedly") as ei:
        tr.run()
    assert any(n.startswith("[the 3 step(s) this run trained could not be saved: saving the checkpoint of step 3 in ")
               and "No space left on device" in n for n in ei.value.__notes__), ei.value.__notes__


def _sigterm_after(monkeypatch, method: str, step: int):
    """Trainer.<method> sends this process a SIGTERM (a preemption notice) once it has run with the state at
    `step`."""
    import os
    import signal
    import time

    real = getattr(Trainer, method)

    def patched(self, *a, **k):
        out = real(self, *a, **k)
        if int(self.state["step"]) == step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # (the handler runs)
        return out

    monkeypatch.setattr(Trainer, method, patched)


def test_a_signal_during_a_save_stops_at_that_checkpoint(tmp_path, monkeypatch):
    """A SIGTERM (a preemption notice) that arrives while step 2's checkpoint is written stops the run there: it
    trained step 3 and wrote another full checkpoint inside the grace period."""
    import signal

    import echo4o_jax.checkpoint as ck

    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 6, 2, False, False
    _sigterm_after(monkeypatch, "save", 2)
    res = Trainer(c, tmp_path).run()
    assert res["stopped_by"] == signal.SIGTERM and res["step"] == 2
    assert ck.list_train_steps(tmp_path) == [2]


def test_the_step_a_signal_stops_at_is_logged(tmp_path, monkeypatch):
    """A run stopped by a signal logs its last step whatever log.every: the steps after the last logged one were
    never in log.jsonl (the resumed run goes on after them)."""
    import json
    import signal

    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 8, 4, False, False
    c.log.every = 2
    _sigterm_after(monkeypatch, "_collect", 3)
    res = Trainer(c, tmp_path).run()
    assert res["stopped_by"] == signal.SIGTERM and res["step"] == 3
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 3]


def test_a_resume_that_stretches_a_cosine_schedule_says_so(tmp_path, capsys):
    """optim.schedule=cosine decays over train.steps: resuming with more steps moved the learning rate at once
    (here from the floor back up), silently."""
    c = load_config("synthetic_tiny")
    c.optim.schedule, c.optim.warmup_steps, c.optim.min_lr = "cosine", 0, 0.0
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 2, 2, False, False
    Trainer(c, tmp_path).run()
    c.train.steps = 2
    Trainer(c, tmp_path).restore()
    assert "warning" not in capsys.readouterr().out  # (the same steps: nothing to say)
    c.train.steps = 4
    tr = Trainer(c, tmp_path)
    tr.restore()
    out = capsys.readouterr().out
    old, new = (float(lr_schedule(float(c.optim.lr), 0, n, "cosine", 0.0)(2)) for n in (2, 4))  # (the two schedules)
    assert old < new
    assert (f"[train] warning: optim.schedule=cosine decays over train.steps, which was 2 in this workdir's run and "
            f"is 4 now: the learning rate at step 2 moves from {old:.3g} to {new:.3g}") in out, out
    # another schedule (with the steps): each schedule as its own settings give it (the "before" was the cosine
    # formula with the old steps, and a schedule change alone was not said)
    c.optim.schedule = "constant"
    tr = Trainer(c, tmp_path)
    tr.restore()
    out = capsys.readouterr().out
    assert (f"[train] warning: the learning-rate schedule differs from this workdir's run (optim.schedule: cosine -> "
            f"constant; train.steps: 2 -> 4): the learning rate at step 2 moves from {old:.3g} to "
            f"{float(c.optim.lr):.3g}") in out, out


def test_a_workdir_resumes_without_its_base_checkpoint_folder(golden_dir, tmp_path):
    """model.ckpt gone (a moved or deleted folder) after the run started: the error says to give the workdir
    itself, which then stands for it (configs, tokenizer, frozen VAE copy; a resume loads no base weights).
    Its own model_config was copied onto itself, a SameFileError that stopped the run."""
    import shutil

    base, wd = tmp_path / "base", tmp_path / "wd"
    shutil.copytree(golden_dir, base)
    c = load_config("synthetic_tiny")
    c.model.init, c.model.ckpt = "checkpoint", str(base)
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 2, 2, False, False
    first = Trainer(c, wd)
    first.run()
    shutil.rmtree(base)
    c.train.steps = 3
    with pytest.raises(ConfigValueError, match=rf"no such folder .*To resume without it, give the workdir itself: "
                                               rf"--config.model.ckpt={re.escape(str(wd))} "):
        Trainer(c, wd)
    configs = {p.name: p.read_bytes() for p in (wd / "model_config").iterdir()}
    c.model.ckpt = str(wd)
    tr = Trainer(c, wd)
    assert tr.vae_fingerprint == first.vae_fingerprint  # (the same frozen VAE: a resume checks it)
    res = tr.run()
    assert res["step"] == 3 and res["resumed"]
    assert {p.name: p.read_bytes() for p in (wd / "model_config").iterdir()} == configs


def test_synthetic_packs_do_not_depend_on_the_process_count():
    """Synthetic packs are seeded by their global index: 2 processes of 1 pack make one process's 2 packs."""
    from echo4o_jax.train.data_sources import make_source

    c = load_config("synthetic_tiny")
    cfg = model_config_from(c)
    one = next(make_source(c, cfg, process_index=0, process_count=1, local_packs=2))
    two = [next(make_source(c, cfg, process_index=i, process_count=2, local_packs=1)) for i in range(2)]
    for k, v in packing.batch_arrays(one).items():
        np.testing.assert_array_equal(v, np.concatenate([packing.batch_arrays(b)[k] for b in two]), err_msg=k)


def test_compilation_cache_setting(tmp_path, monkeypatch):
    """train.compilation_cache points JAX's persistent cache ("~" expanded; "" leaves JAX's setting alone);
    JAX_COMPILATION_CACHE_DIR, when set, takes precedence. (Hits are checked end to end by the kill / resume
    test.)"""
    from jax.experimental.compilation_cache import compilation_cache as cc

    from echo4o_jax.train.trainer import use_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert use_compilation_cache("") == (before or None)
        assert use_compilation_cache("~/cc") == str(tmp_path / "cc") == jax.config.jax_compilation_cache_dir
        assert use_compilation_cache("gs://bucket/~cache") == "gs://bucket/~cache"  # not a local path
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        got = use_compilation_cache(str(tmp_path / "cfg"))  # the environment's, even when set after jax's import
        assert got == str(tmp_path / "env") == jax.config.jax_compilation_cache_dir
    finally:  # nothing compiles in between: restore before any later test does
        jax.config.update("jax_compilation_cache_dir", before)
        cc.reset_cache()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = load_config("synthetic_tiny")
    c.optim.lr = 1e30
    c.optim.warmup_steps = 0
    c.train.steps = 6
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.log.tensorboard = False
    tr = Trainer(c, tmp_path)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step") as e:
        tr.run()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert f"last good checkpoint: step {steps[-1]}" in str(e.value)
    # every saved checkpoint holds finite weights
    tr2 = Trainer(c, tmp_path)
    assert tr2.restore(steps[-1])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tr2.state["params"]))
    # a resume whose first step is non-finite: the restored checkpoint is not called good (its data carries no
    # checksum: a damaged one trains NaN from its first step), the one before it is named
    with pytest.raises(NonFiniteLossError) as e:
        Trainer(c, tmp_path).run()
    assert (f"; last checkpoint: step {steps[-1]} in {tmp_path / 'checkpoints'}, which this run resumed from and no "
            f"step after which was finite: it may be damaged"
            + (f" (the one before: step {steps[-2]})." if len(steps) > 1 else ".")) in str(e.value), (steps, e.value)


def test_skipped_nonfinite_steps_log_the_lr_applied_and_stop_after_too_many(tmp_path):
    """train.skip_nonfinite: a skipped step keeps the optimizer state, so its schedule's count lags the step;
    the lr logged is the one the optimizer applies (it was schedule(step)), and a run of non-finite steps
    longer than the limit stops (every step was NaN and the run exited 0)."""
    from echo4o_jax.train.trainer import _MAX_SKIPPED_IN_A_ROW

    c = load_config("synthetic_tiny")
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = 1e30, 8, 0.0
    c.train.steps, c.train.skip_nonfinite = _MAX_SKIPPED_IN_A_ROW + 10, True
    c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard, c.log.every = 1000, False, False, 1
    tr = Trainer(c, tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"{_MAX_SKIPPED_IN_A_ROW + 1} steps in a row were non-finite "
                                                 rf"\(train.skip_nonfinite skips at most {_MAX_SKIPPED_IN_A_ROW} in "
                                                 r"a row\); last good checkpoint: none in .*checkpoints\.$"):
        tr.run()
    def strict(const):  # (bare NaN / Infinity: not JSON, which jq and other strict readers refuse)
        raise ValueError(f"{const} in log.jsonl")

    recs = [json.loads(x, parse_constant=strict) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    bad = [r for r in steps if not r["ok"]]
    assert len(bad) == _MAX_SKIPPED_IN_A_ROW and bad[-1]["step"] == steps[-1]["step"]  # (the last raised unlogged)
    assert all(r["loss"] is None for r in bad)  # (non-finite: null)
    applied = sum(r["ok"] for r in steps)  # the optimizer's count: the steps it applied
    assert all(r["lr"] == pytest.approx(float(tr.schedule(applied))) for r in bad)
    assert float(tr.schedule(applied)) != float(tr.schedule(bad[-1]["step"] - 1))  # (what was logged before)


def test_resume_with_another_frozen_vae_is_refused(tmp_path):
    """model.init=random draws the frozen VAE from train.seed: a resume with another seed would train the
    rest of the run against another VAE. Refused, naming why; the same seed resumes."""
    from echo4o_jax.checkpoint import CheckpointError

    c = load_config("synthetic_tiny")
    c.checkpoint.async_save = False
    c.log.tensorboard = False
    Trainer(c, tmp_path).save(force=True)  # step 0's checkpoint records the VAE's fingerprint
    c.train.seed = int(c.train.seed) + 1
    with pytest.raises(CheckpointError, match=r"frozen VAE .* trained with \(checkpoint of step 0\): model.init="
                                              rf"random draws it with train.seed \+ 1 = {c.train.seed + 1}"):
        Trainer(c, tmp_path).restore()
    c.train.seed = int(c.train.seed) - 1
    tr = Trainer(c, tmp_path)
    assert tr.restore() and int(tr.state["step"]) == 0


def test_a_resumed_bf16_run_keeps_its_ema_in_float32(tmp_path, capsys):
    """model.param_dtype=bfloat16: the EMA is float32 (init_train_state) and stays so across a resume (it was
    restored in the params' dtype: bf16 from the first resume on, where a 0.9999 decay barely moves it). The run
    warns that its master weights and AdamW state are bf16 (the official keeps them in float32)."""
    def cfg(steps):
        c = load_config("synthetic_tiny")
        c.model.param_dtype = "bfloat16"
        c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = steps, 2, False, False
        return c

    Trainer(cfg(2), tmp_path / "resumed").run()
    assert "[train] warning: model.param_dtype=bfloat16 keeps the master weights" in capsys.readouterr().out
    resumed = Trainer(cfg(3), tmp_path / "resumed")
    assert resumed.restore() and int(resumed.state["step"]) == 2
    assert {x.dtype for x in jax.tree.leaves(resumed.state["ema"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(resumed.state["params"])} == {jnp.dtype(jnp.bfloat16)}


def _fake_clock(monkeypatch):
    """time.perf_counter (the trainer's step timer) running ahead of the real one by what the returned function is
    given (seconds): a delay of any length without waiting for it."""
    import time

    real, ahead = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + ahead[0])
    return lambda seconds: ahead.__setitem__(0, ahead[0] + seconds)


def test_profile_steps_report_device_time_by_named_scope(tmp_path, capsys, monkeypatch):
    """log.profile_start / profile_steps: the traced steps' device time by the model's named scopes is
    printed and written to <workdir>/profile/summary.json, and training goes on to its last step. The trace's
    stop and summary (seconds on a big model; 1000 s of a fake clock here) are not charged to the last traced step
    (its step_seconds, tokens/s and MFU in log.jsonl)."""
    from echo4o_jax.train import trainer as trainer_mod

    late = _fake_clock(monkeypatch)
    real_close = trainer_mod._StepProfile.close
    monkeypatch.setattr(trainer_mod._StepProfile, "close", lambda self, **k: (late(1000.0), real_close(self, **k)))
    c = load_config("synthetic_tiny")
    c.train.steps = 3
    c.log.tensorboard = False
    c.log.profile_start = 1
    c.log.profile_steps = 1
    tr = Trainer(c, tmp_path)
    out = tr.run()
    assert out["step"] == 3 and len(out["history"]) == 3
    assert max(m["step_seconds"] for m in out["history"]) < 1000.0, [m["step_seconds"] for m in out["history"]]
    # the skip-on-non-finite cond is the optimizer's: a GPU compile fuses the update into selects named after it
    conds = [n for n in re.findall(r'op_name="([^"]*)"', tr._compiled.as_text())
             if re.search(r"(?<!/while)/cond\b", n)]  # (not a while loop's condition)
    assert conds and {scope_of(n) for n in conds} == {"optimizer"}, sorted(set(conds))[:5]
    s = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert s["steps"] == 1 and s["events"] > 0
    assert {"attention", "mlp", "qkv", "optimizer"} <= {k for k, v in s["by_scope"].items() if v > 0}
    assert list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
    printed = capsys.readouterr().out
    assert "[profile] step 2, device time per step" in printed and "attention" in printed


def test_a_step_that_fails_while_traced_raises_its_own_error(tmp_path, capsys, monkeypatch):
    """A traced step that fails (its donated state deleted): the trace is stopped, not summarised, and the
    step's own error is the one raised (waiting on the deleted state raised "Array has been deleted" over it)."""
    import jax

    real = Trainer._dispatch

    def dispatch(self, dev):
        if int(self.state["step"]) == 2:
            jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else x, self.state)
            raise RuntimeError("the step failed")
        return real(self, dev)

    monkeypatch.setattr(Trainer, "_dispatch", dispatch)
    c = load_config("synthetic_tiny")
    c.train.steps, c.log.tensorboard, c.log.profile_start, c.log.profile_steps = 4, False, 1, 3
    with pytest.raises(RuntimeError, match="the step failed"):
        Trainer(c, tmp_path).run()
    assert (f"[profile] the run failed after 1 traced step(s): partial trace in {tmp_path / 'profile'}, not "
            "summarised") in capsys.readouterr().err
    assert not (tmp_path / "profile" / "summary.json").exists()


def test_a_checkpoint_save_is_not_charged_to_the_next_step(tmp_path, monkeypatch):
    """A save (the first one blocks for seconds on a mesh, even async) or a sample grid runs after its step's
    time was taken: the next step's step_seconds, tokens/s and MFU must not include it (they did: an 8-device
    run logged 8.55 s for a 0.4 s step after each checkpoint). Here a save takes 1000 s of a fake clock."""
    late = _fake_clock(monkeypatch)
    real_save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **k: (late(1000.0), real_save(self, *a, **k))[1])
    c = load_config("synthetic_tiny")
    c.train.steps = 3
    c.checkpoint.every = 1
    c.log.tensorboard = False
    out = Trainer(c, tmp_path).run()
    assert out["step"] == 3 and (tmp_path / "checkpoints" / "2").is_dir()
    assert max(m["step_seconds"] for m in out["history"]) < 1000.0, [m["step_seconds"] for m in out["history"]]


def test_the_next_batch_is_fetched_while_a_step_runs_and_checkpoints_keep_the_trained_batches_state(tmp_path,
                                                                                                   monkeypatch):
    """The loop packs the next batch while the device runs a step (dispatched, its metrics not yet read), and
    fetches nothing past the last step; a checkpoint saves the data state after the batches trained, not after the
    one fetched ahead (a resume from it would skip that batch)."""
    import echo4o_jax.checkpoint as ck

    events = []
    for name in ("_dispatch", "_collect"):
        real = getattr(Trainer, name)
        monkeypatch.setattr(Trainer, name, lambda self, x, real=real, name=name: (events.append(name),
                                                                                  real(self, x))[1])
    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 3, 2, False, False
    tr = Trainer(c, tmp_path)
    source = tr.source

    class Recorded:
        def __next__(self):
            events.append("next")
            return next(source)

        def __getattr__(self, name):
            return getattr(source, name)

    tr.source = Recorded()
    assert tr.run()["step"] == 3
    assert events == ["next"] + ["_dispatch", "next", "_collect"] * 2 + ["_dispatch", "_collect"]
    assert ck.read_train_meta(tmp_path, 2)["data_states"][0]["step"] == 2  # (3 batches were fetched by then)
    assert ck.read_train_meta(tmp_path, 3)["data_states"][0]["step"] == 3


def test_a_run_killed_before_its_first_checkpoint_is_marked_restarted(tmp_path):
    """The steps logged by a run that finished no checkpoint are logged again by the next run, which starts from
    step 0: a "restarted" marker names them (as "resumed" does after a checkpoint), so readers keep the last
    record of each step; a first run writes no marker."""
    import shutil

    c = load_config("synthetic_tiny")
    c.train.steps = 2
    c.log.every = 1
    c.log.tensorboard = False
    Trainer(c, tmp_path).run()
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed before its first save finished
    Trainer(c, tmp_path).run()
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    marks = [(i, r) for i, r in enumerate(recs) if r.get("event")]
    assert [(r["step"], r["event"], r["superseded_steps"]) for _, r in marks] == [(0, "restarted", [1, 2])]
    assert [r["step"] for r in recs[marks[0][0]:] if "loss" in r] == [1, 2]


def test_an_unreachable_profile_start_is_said(tmp_path, capsys):
    """A profile_start the run never reaches (a resumed run past it, or past train.steps) would trace nothing:
    the run says so when it starts (`Trainer.run` calls check_reachable(first step, train.steps))."""
    import types

    from echo4o_jax.train.trainer import _StepProfile

    tr = types.SimpleNamespace(workdir=tmp_path, is_main=True)
    for start, first, total, why in [(2, 3, 5, "this run starts after step 3"), (9, 0, 5, "train.steps is 5"),
                                     (5, 0, 5, "train.steps is 5")]:
        _StepProfile(tr, start, 1).check_reachable(first, total)
        assert capsys.readouterr().out == (f"[profile] log.profile_start={start} is never reached ({why}): nothing "
                                           "will be traced\n")
    for start, first, total in [(0, 0, 5), (2, 0, 5), (3, 3, 5), (4, 0, 5)]:  # off, or reached
        _StepProfile(tr, start, 1).check_reachable(first, total)
        assert capsys.readouterr().out == ""


def _tiny_trainer(tmp_path, **train):
    """A synthetic_tiny Trainer with `train.<key>=value` set (no warm-up, no TensorBoard), its params before any
    step, its first batch and that batch on device."""
    c = load_config("synthetic_tiny")
    for k, v in train.items():
        c.train[k] = v
    c.optim.warmup_steps = 0
    c.log.tensorboard = False
    tr = Trainer(c, tmp_path)
    batch = next(tr.source)
    return tr, jax.device_get(tr.state["params"]), batch, tr._device_batch(batch)


def test_freeze_flags_as_the_official(tmp_path):
    """train.freeze_vit / freeze_llm = the official `requires_grad = False` on the ViT / the language model:
    their gradients are zero (so the clipped global norm is the trained parameters' norm), every other
    gradient is unchanged, they never move, and everything else trains (the connector too)."""
    tr, before, batch, dev = _tiny_trainer(tmp_path, freeze_vit=True)

    def grads(trainable):
        f = make_loss_and_grads(tr.graphdef, tr.buffers, tr.vae_graphdef, patch=tr.cfg.latent_patch_size,
                                ce_weight=1.0, mse_weight=1.0, trainable=trainable)
        return jax.device_get(jax.jit(f)(tr.state["params"], tr.vae_state, dev, None, jax.random.key(1))[1])

    g_all = grads(None)
    for flag, frozen in (("freeze_vit", "vit"), ("freeze_llm", "llm")):
        g = grads(trainable_mask(before, **{flag: True}))
        for top in g_all:
            unfrozen, with_flag = jax.tree.leaves(g_all[top]), jax.tree.leaves(g[top])
            if top == frozen:
                assert any(np.any(a) for a in unfrozen) and not any(np.any(b) for b in with_flag), (flag, top)
            else:
                for a, b in zip(unfrozen, with_flag):
                    np.testing.assert_array_equal(a, b, err_msg=f"{flag}: {top}")
    tr.compile(batch)  # the trainer's step under freeze_vit: the optimizer and the step get the same mask
    for _ in range(2):
        assert tr.train_step(batch)["ok"] == 1.0
    after = jax.device_get(tr.state["params"])
    for top in before:
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[top]), jax.tree.leaves(after[top]))]
        assert (not any(moved)) if top == "vit" else all(moved), (top, moved)
    # the EMA of frozen weights stays the weights (the official fsdp_ema_update skips them; updating it anyway
    # drifts it by the rounding of decay * e + (1 - decay) * e)
    for a, b in zip(jax.tree.leaves(before["vit"]), jax.tree.leaves(jax.device_get(tr.state["ema"]["vit"]))):
        np.testing.assert_array_equal(a, b)


def test_visual_und_off_as_the_official_model_without_a_vit(tmp_path):
    """train.visual_und=False (the official flag; configs/echo4o_7b.py): the ViT tokens' slots enter the language
    model as zero vectors at their places (the official `new_zeros` sequence, no ViT), so nothing depends on the
    ViT's pixels or weights, the other rows are those of visual_und=True; the ViT and connector get no gradient,
    never move and keep their EMA; everything else trains."""
    from echo4o_jax.model.bagel import forward_packed
    from echo4o_jax.packing import normalize_images

    tr, before, batch, dev = _tiny_trainer(tmp_path, visual_und=False)
    vit_rows = np.asarray(batch.vit_image_id[0]) >= 0
    assert vit_rows.any()  # the synthetic packs hold ViT images
    one = jax.tree.map(lambda x: x[0], normalize_images(dev))
    model = nnx.merge(tr.graphdef, tr.state["params"], tr.buffers)
    zeros = jnp.zeros(one["latent_pos_ids"].shape + (tr.cfg.patch_latent_dim,))
    x = {und: np.asarray(forward_packed(model, one, zeros, zeros, debug=True, visual_und=und)["dbg_llm_input"])
         for und in (True, False)}
    Ct = one["text_ids"].shape[0]
    vit_slots = slice(Ct, Ct + one["vit_patches"].shape[0])
    assert not np.any(x[False][vit_slots]) and np.any(x[True][vit_slots][vit_rows])
    rest = np.ones(len(x[False]), bool)
    rest[vit_slots] = False
    np.testing.assert_array_equal(x[False][rest], x[True][rest])

    def loss_and_grads(params, dev, visual_und):
        f = make_loss_and_grads(tr.graphdef, tr.buffers, tr.vae_graphdef, patch=tr.cfg.latent_patch_size,
                                ce_weight=1.0, mse_weight=1.0, visual_und=visual_und)
        return jax.device_get(jax.jit(f)(params, tr.vae_state, dev, None, jax.random.key(1)))

    (loss, _), g = loss_and_grads(tr.state["params"], dev, False)
    (loss_on, _), _ = loss_and_grads(tr.state["params"], dev, True)
    assert loss != loss_on  # (the ViT features count when it is on)
    other = dict(dev, vit_patches=jnp.ones_like(dev["vit_patches"]) * 7)
    other_params = dict(tr.state["params"], vit=jax.tree.map(lambda w: w + 1.0, tr.state["params"]["vit"]))
    assert loss_and_grads(tr.state["params"], other, False)[0][0] == loss
    assert loss_and_grads(other_params, dev, False)[0][0] == loss
    for top in ("vit", "connector_fc1", "connector_fc2"):
        assert not any(np.any(a) for a in jax.tree.leaves(g[top])), top

    tr.compile(batch)
    for _ in range(2):
        assert tr.train_step(batch)["ok"] == 1.0
    after, ema = jax.device_get(tr.state["params"]), jax.device_get(tr.state["ema"])
    for top in before:
        still = top in ("vit", "connector_fc1", "connector_fc2")
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[top]), jax.tree.leaves(after[top]))]
        assert (not any(moved)) if still else all(moved), (top, moved)
        if still:
            for a, b in zip(jax.tree.leaves(before[top]), jax.tree.leaves(ema[top])):
                np.testing.assert_array_equal(a, b)


def test_freeze_und_reaches_the_model():
    """train.freeze_und turns on the model's detaches (as the official, no parameter mask:
    tests/test_model_units.py::test_freeze_und_detaches_understanding_paths_as_the_official)."""
    from echo4o_jax.train.trainer import model_config_from

    c = load_config("synthetic_tiny")
    assert model_config_from(c).freeze_und is False
    c.train.freeze_und = True
    assert model_config_from(c).freeze_und is True
