"""Training: golden gradients through the trainer's step code, sharded == single-device, exact resume
after a hard kill, SIGTERM, non-finite handling, config validation, EMA and LR schedule."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import load_file, load_npz
from echo4o_jax import packing
from echo4o_jax.config import BagelConfig
from echo4o_jax.model.bagel import bagel_key_rules
from echo4o_jax.model.loading import export_official, load_bagel, load_vae
from echo4o_jax.safetensors_io import SafetensorsFile
from echo4o_jax.train.optim import ema_update, lr_schedule
from echo4o_jax.train.step import make_loss_and_grads, trainable_mask
from echo4o_jax.train.trainer import ConfigValueError, NonFiniteLossError, Trainer, model_config_from, validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str):
    return load_file(ROOT / "configs" / f"{name}.py", f"cfg_{name}").get_config()


# ------------------------------------------------------------------------------------------ golden grads


def test_train_step_gradients_equal_golden(golden_dir):
    from test_golden import pack_golden

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
    assert abs(float(loss) - float(d["loss"])) <= 1e-4 * max(1.0, abs(float(d["loss"])))
    got = dict(export_official(nnx.merge(graphdef, grads, buffers), bagel_key_rules(cfg)))
    want = SafetensorsFile(golden_dir / "train_grads.safetensors")
    for k in want.keys():
        w = want.get(k)
        assert np.max(np.abs(got[k] - w)) <= 1e-4 + 1e-3 * np.max(np.abs(w)), k


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


def test_bad_config_values_rejected_before_compiling():
    c = load_config("synthetic_tiny")
    c.optim.lr = 0.0
    with pytest.raises(ConfigValueError, match="optim.lr"):
        validate_config(c)
    c = load_config("synthetic_tiny")
    c.data.packs_per_step = 0
    with pytest.raises(ConfigValueError, match="packs_per_step"):
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

    def no_placement(*a, **k):
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
    res = tr.run()
    assert res["step"] == 2 and all(np.isfinite(h["loss"]) for h in res["history"])
    # sample grids from token-id prompts need no tokenizer (data.tokenizer is unset here)
    tr.config.log.sample_prompts, tr.config.log.sample_steps = [[1, 2, 3], [4]], 2
    grid = tr.sample_grid(2)
    H, W = tr.config.log.sample_size
    assert grid.shape == (H, 2 * W, 3) and grid.dtype == np.uint8


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


def test_profile_steps_report_device_time_by_named_scope(tmp_path, capsys):
    """log.profile_start / profile_steps: the traced steps' device time by the model's named scopes is
    printed and written to <workdir>/profile/summary.json, and training goes on to its last step."""
    c = load_config("synthetic_tiny")
    c.train.steps = 3
    c.log.tensorboard = False
    c.log.profile_start = 1
    c.log.profile_steps = 1
    out = Trainer(c, tmp_path).run()
    assert out["step"] == 3 and len(out["history"]) == 3
    s = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert s["steps"] == 1 and s["events"] > 0
    assert {"attention", "mlp", "qkv", "optimizer"} <= {k for k, v in s["by_scope"].items() if v > 0}
    assert list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
    printed = capsys.readouterr().out
    assert "[profile] step 2, device time per step" in printed and "attention" in printed


# ------------------------------------------------------------------------------------------ processes


def _train_cmd(workdir, *overrides, config="synthetic_tiny"):
    return [sys.executable, "-m", "echo4o_jax.train", "--config", str(ROOT / "configs" / f"{config}.py"),
            "--workdir", str(workdir), "--config.log.tensorboard=False", *overrides]


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (pathlib.Path(workdir) / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # the last record of a step wins (a resumed run re-logs it after its marker)
    return out


def _cache_hits(workdir) -> list[bool]:
    """compile_cache_hit of each run's compile record in log.jsonl."""
    recs = [json.loads(x) for x in (pathlib.Path(workdir) / "log.jsonl").read_text().splitlines()]
    return [r["compile_cache_hit"] for r in recs if "compile_seconds" in r]


@pytest.mark.slow
def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    # every run shares one persistent compilation cache: only the first compiles the step
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    common = ["--config.train.steps=8", "--config.checkpoint.every=2",
              f"--config.train.compilation_cache={tmp_path / 'xla_cache'}"]
    out = subprocess.run(_train_cmd(tmp_path / "a", *common), check=True, cwd=ROOT, capture_output=True, text=True)
    ref = _losses(tmp_path / "a")
    assert sorted(ref) == list(range(1, 9))
    assert _cache_hits(tmp_path / "a") == [False] and any((tmp_path / "xla_cache").iterdir())
    assert f"(compilation cache {tmp_path / 'xla_cache'}: miss)" in out.stdout

    wd = tmp_path / "b"
    p = subprocess.Popen(_train_cmd(wd, *common, "--config.train.debug_step_delay=0.4"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (wd / "checkpoints" / "4").exists():
        assert p.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(_losses(wd))
    assert killed_at < 8
    from echo4o_jax.checkpoint import list_train_steps

    restored = list_train_steps(wd)[-1]
    subprocess.run(_train_cmd(wd, *common), check=True, cwd=ROOT, capture_output=True)
    got = _losses(wd)
    assert sorted(got) == list(range(1, 9))
    assert _cache_hits(wd) == [True, True]  # the killed run and its resume loaded the step from the cache
    for s in range(1, 9):
        assert got[s] == pytest.approx(ref[s], abs=1e-6), s
    # the resume is marked; the steps the killed run logged after its last checkpoint are named and re-logged
    recs = [json.loads(x) for x in (wd / "log.jsonl").read_text().splitlines()]
    marks = [i for i, r in enumerate(recs) if r.get("event") == "resumed"]
    assert len(marks) == 1 and recs[marks[0]]["step"] == restored
    if killed_at > restored:
        assert recs[marks[0]]["superseded_steps"] == [restored + 1, killed_at]
    assert [r["step"] for r in recs[marks[0]:] if "loss" in r] == list(range(restored + 1, 9))

    # SIGTERM: finish the step, save, exit 128 + SIGTERM saying so; a resumed run ends at the same place
    wd = tmp_path / "c"
    p = subprocess.Popen(_train_cmd(wd, *common, "--config.train.debug_step_delay=0.4"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (wd / "log.jsonl").exists() or len(_losses(wd)) < 3:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    saved = sorted(int(x.name) for x in (wd / "checkpoints").iterdir() if x.name.isdigit())
    assert saved[-1] == max(_losses(wd)) < 8
    assert out.strip().splitlines()[-1] == (f"[train] stopped by SIGTERM at step {saved[-1]} of 8 (checkpoint saved); "
                                            f"rerun the same command to resume (workdir {wd})")
    subprocess.run(_train_cmd(wd, *common), check=True, cwd=ROOT, capture_output=True)
    assert _losses(wd)[8] == pytest.approx(ref[8], abs=1e-6)


_EIGHT_DEVICE_TRAINER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from test_train import load_config
from echo4o_jax.train.trainer import Trainer

c = load_config("synthetic_tiny")
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
c.data.packs_per_step = 4
c.log.tensorboard = False
tr = Trainer(c, sys.argv[2])
"""  # the shared start of the 8-device subprocess scripts: a synthetic_tiny Trainer on a 2 x 2 x 2 mesh

_MESH_PART = r"""
from echo4o_jax.train.step import make_loss_and_grads

assert tr.mesh.size == 8, tr.mesh
batch = next(tr.source)
f = make_loss_and_grads(tr.graphdef, tr.buffers, tr.vae_graphdef, patch=tr.cfg.latent_patch_size,
                        ce_weight=1.0, mse_weight=1.0)
dev = tr._device_batch(batch)
key = jax.random.PRNGKey(3)
with jax.set_mesh(tr.mesh):  # as the trainer compiles: activations pinned to (data, fsdp) in the model
    (loss_s, _), g_s = jax.jit(f)(tr.state["params"], tr.vae_state, dev, None, key)
one = jax.devices()[0]
put = lambda t: jax.device_put(jax.device_get(t), one)
(loss_1, _), g_1 = jax.jit(f)(put(tr.state["params"]), put(tr.vae_state), put(dev), None, key)
tr.compile(batch)
m = tr.train_step(batch)  # the real sharded, donated step runs on the mesh
assert np.isfinite(m["loss"]) and m["ok"] == 1.0, m
sharded_leaf = [x for x in jax.tree.leaves(tr.state["params"]) if len(x.sharding.device_set) > 1]
err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_1)))
scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(g_1))
out.update(loss_s=float(loss_s), loss_1=float(loss_1), grad_err=err, grad_scale=scale, n_sharded=len(sharded_leaf))
print(json.dumps(out))
"""  # (after _RESTORE_SCRIPT's part, in the same process: one 8-device Trainer for both checks)


@pytest.mark.slow
def test_demo_config_runs_end_to_end_with_falling_loss(tmp_path):
    data = tmp_path / "demo_data"
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
                        "--workdir", str(tmp_path / "wd"), "--config.train.steps=40", "--config.log.sample_every=40",
                        "--config.log.every=1",
                        f"--config.data.records.demo_dir={data}",
                        f"--config.data.tokenizer={data / 'tokenizer' / 'tokenizer.json'}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(tmp_path / "wd")
    first = np.mean([losses[s] for s in range(1, 11)])
    last = np.mean([losses[s] for s in range(31, 41)])
    assert last < first - 0.3, (first, last)
    # every step logs the pack fill (real tokens / capacity) and the records pipeline's counters
    from conftest import load_file
    from echo4o_jax.train.data_sources import budget_from_config

    cap = budget_from_config(load_file(ROOT / "configs" / "demo.py", "demo_cfg_fill").get_config().data.budget).total_tokens
    recs = [json.loads(x) for x in (tmp_path / "wd" / "log.jsonl").read_text().splitlines()]
    recs = [x for x in recs if "loss" in x]
    assert len(recs) == 40
    for x in recs:
        assert 0 < x["fill"] <= 1 and x["data_skipped_too_long"] >= 0 and x["data_skipped_errors"] == 0
        assert x["data_time_wait_s"] >= 0
        packs = x["tokens"] / x["fill"] / cap  # capacity = packs per step x the budget's tokens
        assert packs == pytest.approx(round(packs), abs=1e-6) and round(packs) >= 1
    grid = tmp_path / "wd" / "samples" / "step_0000040.png"
    assert grid.exists() and np.asarray(Image.open(grid)).shape == (64, 64 * 3, 3)
    assert list((tmp_path / "wd" / "tensorboard").glob("events.out.tfevents.*"))


def test_freeze_flags_as_the_official(tmp_path):
    """train.freeze_vit / freeze_llm = the official `requires_grad = False` on the ViT / the language model:
    their gradients are zero (so the clipped global norm is the trained parameters' norm), every other
    gradient is unchanged, they never move, and everything else trains (the connector too)."""
    c = load_config("synthetic_tiny")
    c.train.freeze_vit = True
    c.optim.warmup_steps = 0
    c.log.tensorboard = False
    tr = Trainer(c, tmp_path)
    before = jax.device_get(tr.state["params"])
    batch = next(tr.source)
    dev = tr._device_batch(batch)

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


def test_freeze_und_reaches_the_model():
    """train.freeze_und turns on the model's detaches (as the official, no parameter mask:
    tests/test_model_units.py::test_freeze_und_detaches_understanding_paths_as_the_official)."""
    from echo4o_jax.train.trainer import model_config_from

    c = load_config("synthetic_tiny")
    assert model_config_from(c).freeze_und is False
    c.train.freeze_und = True
    assert model_config_from(c).freeze_und is True


_RESTORE_SCRIPT = _EIGHT_DEVICE_TRAINER + r"""
assert tr.restore()
want = np.load(sys.argv[3])
flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tr.state["params"])[0]}
err = max(float(np.max(np.abs(np.asarray(flat[k]) - want[k]))) for k in want.files)
out = dict(err=err, n=len(want.files), n_restored_sharded=sum(len(v.sharding.device_set) > 1 for v in flat.values()),
           step=int(tr.state["step"]))
""" + _MESH_PART


def _start_two_processes(workdir, *overrides, config="synthetic_tiny") -> list[subprocess.Popen]:
    """The train command on 2 jax.distributed CPU processes of one device each (JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, as on a GPU cluster; TPU pods set theirs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    return [subprocess.Popen(_train_cmd(workdir, *overrides, config=config), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**env, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]


def _finish(procs, returncode=0, timeout=240) -> list[str]:
    """Their outputs, once both exited with `returncode`; a hung process (e.g. one waiting in a collective
    the other never joins) is killed."""
    outs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == returncode, f"process {i} exited {p.returncode}: {err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return outs


@pytest.mark.slow
def test_two_processes_stop_and_resume_as_if_never_stopped(tmp_path):
    """Multi-host, on the demo config (records pipeline: each process reads its slice of the data): 2 processes
    (one CPU device each) train and save cooperatively; a SIGTERM that reaches one process only stops both
    after the same step, with a checkpoint; the resumed run (each process restoring its own data iterator)
    logs the losses of an uninterrupted run. Before: process 0 alone saved the frozen VAE (an Orbax save syncs
    every process: it waited forever); every process wrote the demo data; a signal stopped only the process
    it reached; the checkpoint kept process 0's data state only, which process 1 could not resume."""
    from echo4o_jax.checkpoint import list_train_steps

    data = tmp_path / "demo_data"
    common = ["--config.train.steps=6", "--config.data.packs_per_step=2", "--config.log.every=1",
              "--config.checkpoint.every=3", "--config.log.sample_every=0", f"--config.data.records.demo_dir={data}",
              f"--config.data.tokenizer={data / 'tokenizer' / 'tokenizer.json'}",
              f"--config.train.compilation_cache={tmp_path / 'xla_cache'}"]
    ref = tmp_path / "uninterrupted"
    _finish(_start_two_processes(ref, *common, config="demo"))
    wd = tmp_path / "mp"
    procs = _start_two_processes(wd, *common, "--config.train.debug_step_delay=0.5", config="demo")
    deadline = time.time() + 240
    while not (wd / "log.jsonl").exists() or not _losses(wd):  # process 0 logged a step
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    outs = _finish(procs, returncode=128 + signal.SIGTERM)
    stopped = list_train_steps(wd)[-1]
    assert 0 < stopped < 6 and max(_losses(wd)) == stopped
    assert all(f"[train] stopped by SIGTERM at step {stopped} of 6 (checkpoint saved)" in o for o in outs)
    outs = _finish(_start_two_processes(wd, *common, config="demo"))  # resumed
    assert all("[train] step 6:" in o for o in outs) and list_train_steps(wd)[-1] == 6
    want, got = _losses(ref), _losses(wd)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh_which_equals_single_device(tmp_path):
    """A one-device checkpoint restores onto a 2 x 2 x 2 mesh (values exact, parameters sharded); on that
    mesh the loss and gradients equal one device's, and the real sharded, donated step runs."""
    c = load_config("synthetic_tiny")
    c.train.steps = 2
    c.checkpoint.every = 2
    c.log.tensorboard = False
    tr = Trainer(c, tmp_path / "wd")
    tr.run()
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tr.state["params"]))[0]}
    np.savez(tmp_path / "params.npz", **flat)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _RESTORE_SCRIPT, str(ROOT / "tests"), str(tmp_path / "wd"),
                        str(tmp_path / "params.npz")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["step"] == 2 and out["n"] == len(flat) and out["n_restored_sharded"] > 0
    assert out["err"] == 0.0
    assert out["n_sharded"] > 0  # parameters really are distributed over the mesh
    assert out["loss_s"] == pytest.approx(out["loss_1"], rel=1e-5)
    assert out["grad_err"] <= 1e-5 * max(1.0, out["grad_scale"])
