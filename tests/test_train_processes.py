"""Training end to end, in processes of their own: exact resume after a hard kill and after SIGTERM, the demo
config's falling loss, 2 jax.distributed processes (stop on a signal to one, resume as if never stopped; resume
on 1 process with train.data_resume=reshard) and an 8-device mesh (restore onto it, equal to one device)."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import xla_env
from test_train import ROOT, load_config
from echo4o_jax.train.trainer import Trainer


def _train_cmd(workdir, *overrides, config="synthetic_tiny"):
    """`config`: the name of a file in configs/, or a config file's path."""
    path = config if config.endswith(".py") else str(ROOT / "configs" / f"{config}.py")
    return [sys.executable, "-m", "echo4o_jax.train", "--config", path,
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
    env = {k: v for k, v in xla_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
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
    logs the losses of an uninterrupted run; the stopped run also goes on on 1 process with
    train.data_resume=reshard, starting where the 2 processes' data had got to. Before: process 0 alone saved the frozen VAE (an Orbax save syncs
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
    # tokens, fill and MFU count both processes' packs, not process 0's twice
    from conftest import load_file
    from echo4o_jax.train.data_sources import budget_from_config

    demo = load_file(ROOT / "configs" / "demo.py", "demo_cfg_mp").get_config()
    cap = budget_from_config(demo.data.budget).total_tokens
    for x in (x for x in map(json.loads, (ref / "log.jsonl").read_text().splitlines()) if "loss" in x):
        assert len(x["tokens_by_process"]) == 2 and x["tokens"] == sum(x["tokens_by_process"])
        assert x["fill"] == pytest.approx(x["tokens"] / (2 * cap))
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
    shutil.copytree(wd, tmp_path / "one")  # (stopped: resumed on 1 process below)
    outs = _finish(_start_two_processes(wd, *common, config="demo"))  # resumed
    assert all("[train] step 6:" in o for o in outs) and list_train_steps(wd)[-1] == 6
    want, got = _losses(ref), _losses(wd)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    # the stopped run on 1 process (2 packs): its data position is resharded from the 2 processes' states
    one = tmp_path / "one"
    meta = json.loads((one / "checkpoints" / str(stopped) / "meta" / "metadata").read_text())
    r = subprocess.run(_train_cmd(one, *common, "--config.train.data_resume=reshard", config="demo"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=xla_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rec = [x for x in map(json.loads, (one / "log.jsonl").read_text().splitlines()) if x.get("event") == "data_resharded"]
    states = meta["data_states"]
    read = [sum(s["read_by_dataset"][d] for s in states) for d in range(len(states[0]["read_by_dataset"]))]
    assert len(rec) == 1 and rec[0]["step"] == stopped and min(read) > 0  # (the demo mixes 3 datasets)
    # one process goes on from every dataset's first record that neither old process had read
    assert {k: rec[0][k] for k in ("from_processes", "processes", "packs_per_process", "offsets", "handed_over")} == dict(
        from_processes=2, processes=1, packs_per_process=2, offsets=read,
        handed_over=sum(len(s["buffer"]) + len(s["carry"]) for s in states))
    assert sorted(_losses(one)) == list(range(1, 7))


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
    env = xla_env(devices=8)
    r = subprocess.run([sys.executable, "-c", _RESTORE_SCRIPT, str(ROOT / "tests"), str(tmp_path / "wd"),
                        str(tmp_path / "params.npz")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["step"] == 2 and out["n"] == len(flat) and out["n_restored_sharded"] > 0
    assert out["err"] == 0.0
    assert out["n_sharded"] > 0  # parameters really are distributed over the mesh
    assert out["loss_s"] == pytest.approx(out["loss_1"], rel=1e-5)
    assert out["grad_err"] <= 1e-5 * max(1.0, out["grad_scale"])
    # the sharded step keeps the packs' activations batch-sharded: a gather from a position table sharded by
    # width (fsdp) made XLA replicate the ViT's activations on every chip (lookup_rows gathers the table first)
    assert "Involuntary full rematerialization" not in r.stderr


def test_a_mesh_leaving_parameters_whole_is_refused_before_the_weights_load(tmp_path):
    """The train command on 6 devices with FSDP over all of them (6 divides none of the tiny model's widths):
    with the limit at 0 bytes (the 7B's case, tested in test_sharding) one error line naming a split, exit 2,
    before anything is written; train.allow_replicated=True runs."""
    script = ("import runpy, sys\n"
              "import echo4o_jax.train.trainer as T\n"
              "T._REPLICATED_LIMIT = 0\n"
              "sys.argv[0] = 'echo4o_jax.train'\n"
              "runpy.run_module('echo4o_jax.train', run_name='__main__', alter_sys=True)\n")
    env = xla_env(devices=6)
    wd = tmp_path / "wd"
    args = [sys.executable, "-c", script, *_train_cmd(wd, "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                                      "--config.train.steps=1", "--config.data.packs_per_step=-1")[3:]]
    p = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("error: bad config: mesh data=1 fsdp=6 tensor=1 leaves ") and "by fsdp=6" in err[0]
    assert "--config.train.allow_replicated=True" in err[0] and not (wd / "checkpoints").exists()
    # with train.allow_replicated the trainer is built (the weights loaded, nothing compiled)
    build = ("import importlib.util, sys\n"
             "import echo4o_jax.train.trainer as T\n"
             "T._REPLICATED_LIMIT = 0\n"
             f"spec = importlib.util.spec_from_file_location('cfg', {str(ROOT / 'configs' / 'synthetic_tiny.py')!r})\n"
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
             "c = m.get_config()\n"
             "c.mesh.data, c.mesh.fsdp, c.train.allow_replicated, c.data.packs_per_step = 1, -1, True, -1\n"
             "tr = T.Trainer(c, sys.argv[1])\n"
             "print(len(tr.sharding_report))\n")
    p = subprocess.run([sys.executable, "-c", build, str(tmp_path / "wd2")], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and int(p.stdout.strip().splitlines()[-1]) > 0, p.stderr[-3000:]


@pytest.mark.slow
def test_a_record_one_process_cannot_read_stops_both_after_saving(tmp_path):
    """2 processes on a records dataset; a record that only process 1 reads is unreadable (a corrupt shard chunk):
    both stop at once after the step in flight, which every process logs and saves (the save is collective), process
    1 naming the record, process 0 naming process 1. Before, process 1 alone stopped (its steps since the checkpoint
    lost) and process 0 waited in the next step's collective for minutes, then aborted. A first batch that fails
    on one process stops both too, before anything is compiled."""
    from echo4o_jax.checkpoint import list_train_steps
    from echo4o_jax.data.pipeline import DataPipeline
    from echo4o_jax.train.data_sources import budget_from_config
    from echo4o_jax.train.records_source import pipeline_config_from
    from echo4o_jax.train.trainer import model_config_from
    from test_data_pipeline import _tokenizer_json, _write_dataset, config_file, corrupt_record
    from test_latents import SIDE, _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    for k, name in ((12, "later"), (0, "first")):  # process 1's k-th record in its stream
        d = _write_dataset(tmp_path / name / "ds", 40, 5, prefix="s", sizes=(SIDE,))
        c = _config(d, tok)
        c.train.steps, c.checkpoint.every, c.log.every, c.log.sample_every = 40, 100, 1, 0
        c.data.packs_per_step = 2
        c.train.compilation_cache = str(tmp_path / "xla_cache")
        pc = pipeline_config_from(c, budget_from_config(c.data.budget), local_packs=1)
        pipe = DataPipeline(pc, model_config_from(c), process_index=1, process_count=2)
        shard, index = corrupt_record(d, pipe._parts[0][k][1])  # (the record's index in the dataset)
        wd = tmp_path / name / "wd"
        procs = _start_two_processes(wd, config=config_file(tmp_path / name / "cfg.py", c))
        errs = []
        try:
            for p in procs:
                _, err = p.communicate(timeout=240)
                assert p.returncode == 2, err[-3000:]
                errs.append(err.strip().splitlines()[-1])
        finally:
            for p in procs:
                p.kill()
        assert errs[1].startswith(f"error: {shard}: record {index}: cannot read (RuntimeError: "), errs[1]
        if name == "first":
            assert errs[0] == ("error: process(es) [1] could not read their first batch (their logs say why): this "
                               "process stops with them, nothing of this run trained")
            assert not list_train_steps(wd)
            continue
        step = max(_losses(wd))
        assert 0 < step < 40 and list_train_steps(wd) == [step]
        saved = (f" [the {step} step(s) this run trained were saved: checkpoint {step} in {wd / 'checkpoints'}; the same "
                 "command resumes from it once the data is fixed]")
        assert errs[1].endswith(") (dataset ds)" + saved), errs[1]
        assert errs[0] == (f"error: process(es) [1] could not read their next batch after step {step} (their logs say "
                           "why): this process stops with them" + saved)
