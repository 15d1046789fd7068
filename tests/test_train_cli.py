"""The train command's contract (`echo4o_jax.train.__main__`): bad input is one `error:` line and exit
status 2 (flags, config keys and values, mesh, data settings, a workdir of another geometry, an unreadable
checkpoint) and leaves the workdir as it was; a finished workdir says so; a run stopped by a signal exits
128 + the signal; a resume is marked in log.jsonl."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from echo4o_jax.train.__main__ import run
from conftest import without_compilation_cache
from test_train import load_config
from test_train_processes import _losses

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "synthetic_tiny.py"


def _tiny(**train):
    c = load_config("synthetic_tiny")
    c.log.tensorboard = False
    c.checkpoint.async_save = False
    c.checkpoint.every = 2
    c.train.update(train)
    return c


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(d: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _records(wd) -> list[dict]:
    return [json.loads(x) for x in (pathlib.Path(wd) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished synthetic_tiny workdir: 4 steps, checkpoints at 2 and 4, every step logged."""
    wd = tmp_path_factory.mktemp("trained") / "wd"
    assert run(_tiny(steps=4), str(wd)) == 0
    return wd


@pytest.fixture
def workdir(trained, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(trained, wd)
    return wd


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("args, want", [
    (["--config.train.nope=1"], "error: unknown config key train.nope"),
    (["--config.train.step=5"], "error: unknown config key train.step (did you mean train.steps?)"),
    (["--config.train.steps.x=1"], "error: unknown config key train.steps.x: train.steps is a value, not a group of keys"),
    (["--config.train.steps=abc"], "error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--wrkdir=x"], "error: Unknown command line flag 'wrkdir'"),
    (['--config.mesh={"data": 2}'], "error: --config.mesh replaces the whole group mesh and needs exactly its keys "
     "['data', 'fsdp', 'tensor']; missing ['fsdp', 'tensor'] (set single keys instead, e.g. --config.mesh.data=...)"),
])
def test_flag_errors_are_one_line(tmp_path, args, want):
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.train", "--config", str(TINY), "--workdir",
                        str(tmp_path / "wd"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want), err
    assert not (tmp_path / "wd").exists()


def test_a_group_replaced_whole_must_give_its_keys():
    """`--config.mesh={...}` replaces the group: a missing key failed later with a traceback, an unknown one was
    silently ignored. Nested groups are checked too; an empty (free-form) group takes any keys."""
    from ml_collections import ConfigDict

    from echo4o_jax.train.config_cli import replaced_group

    default = ConfigDict(dict(mesh=dict(data=1, fsdp=-1), model=dict(geometry=dict(llm=dict(hidden=8, layers=2)),
                                                                      extra=dict())))
    c = ConfigDict(default.to_dict())
    c.mesh = dict(data=2, fsdp=-1, extra=3)
    assert replaced_group(default, c, "mesh") == (
        "--config.mesh replaces the whole group mesh and needs exactly its keys ['data', 'fsdp']; unknown ['extra'] "
        "(set single keys instead, e.g. --config.mesh.data=...)")
    c.mesh = dict(data=2, fsdp=-1)  # every key: fine
    assert replaced_group(default, c, "mesh") is None and replaced_group(default, c, "mesh.data") is None
    c.model = dict(geometry=dict(llm=dict(hidden=8)), extra=dict())
    assert replaced_group(default, c, "model").startswith("--config.model replaces the whole group model.geometry.llm "
                                                          "and needs exactly its keys ['hidden', 'layers']; missing")
    c.model = dict(geometry=dict(llm=dict(hidden=8, layers=2)), extra=dict(anything=1))
    assert replaced_group(default, c, "model") is None


def test_a_list_field_is_overridden_from_the_command_line(capsys):
    """ml_collections cannot override a list ("Type <class 'list'> ... is not supported for overriding"), so
    adding a synthesised dataset to data.records.datasets needed an edited config: `list_overrides` parses
    the list as the config files write it (dict(...) or {...}, `--config.key=v` or `--config.key v`); a value
    that is not a list literal is one error: line, exit 2."""
    from ml_collections import ConfigDict

    from echo4o_jax.train.config_cli import list_overrides

    default = ConfigDict(dict(data=dict(records=dict(datasets=[dict(path="a", weight=1)], root=""), seed=1)))
    argv = ["prog", "--config", "c.py", '--config.data.records.datasets=[dict(path="a", weight=1), '
            '{"path": "mine", "weight": 2.5}]', "--config.data.seed=3", "--config.data.records.datasets",
            '(dict(path="b", weight=-1, note=None, on=true),)', "--workdir", "w"]
    rest, found = list_overrides(argv, default)
    assert rest == ["prog", "--config", "c.py", "--config.data.seed=3", "--workdir", "w"]
    assert found == {"data.records.datasets": [dict(path="b", weight=-1, note=None, on=True)]}  # the last one
    for value, why in [('[dict(path=open("x"))]', "\"open('x')\" is not a literal (lists, dicts / dict(key=value), "
                                                  "strings, numbers, True / False / None)"),
                       ('[1,', "not a Python literal ('[' was never closed)"),
                       ('dict(path="a")', "expected a list (it replaces the whole list, e.g. [{'path': 'a', "
                                          "'weight': 1}])")]:
        with pytest.raises(SystemExit) as e:
            list_overrides(["prog", f"--config.data.records.datasets={value}"], default)
        assert e.value.code == 2
        assert _error_line(capsys) == f"error: --config.data.records.datasets={value}: {why}"


def test_list_overrides_reach_the_config_and_help_exits_0(tmp_path):
    """End to end (pack_stats, whose parser train and latents share): the list reaches the command's config (its
    bad weight is named by the records check); `--help` exits 0 (absl's exits 1) and latents' help lists its
    flags (it listed none: they were defined in the importable module, not in __main__)."""
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.data.pack_stats", "--config", str(ROOT / "configs/demo.py"),
                        "--config.data.records.demo_dir=", "--config.data.records.datasets",
                        '[dict(path="mine", weight="heavy")]', "--packs", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: bad config: data (records): data.records.datasets[0] (mine): weight must be a number, got 'heavy'"]
    # the same overrides from a --flagfile (a multi-host launcher's): the list reached ml_collections, which
    # refuses lists ("Type <class 'list'> ... is not supported for overriding")
    (tmp_path / "flags.txt").write_text('--config.data.records.demo_dir=\n'
                                        '--config.data.records.datasets=[dict(path="mine", weight="heavy")]\n')
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.data.pack_stats", "--config", str(ROOT / "configs/demo.py"),
                        f"--flagfile={tmp_path / 'flags.txt'}", "--packs", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: bad config: data (records): data.records.datasets[0] (mine): weight must be a number, got 'heavy'"]
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.data.latents", "-h"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)  # (-h as --help, as the argparse commands: it was an unknown flag)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"--{f}:" in r.stdout or f"--[no]{f}:" in r.stdout
               for f in ("config", "out", "verify", "parts", "merge")), r.stdout[-2000:]


def test_missing_config_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.py"
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.train", "--config", str(missing), "--workdir",
                        str(tmp_path / "wd")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: --config {missing}: no such file"]


def test_bad_model_and_mesh_values_are_one_line(tmp_path, capsys):
    wd = tmp_path / "wd"
    c = _tiny()
    c.model.remat = "bogus"
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == "error: bad config: model.remat='bogus': expected none|full|dots|dots_no_batch"
    c = _tiny()
    c.model.attention_impl = "bogus"
    assert run(c, str(wd)) == 2
    assert _error_line(capsys).startswith("error: bad config: model.attention_impl='bogus': expected xla_blockwise|")
    for k, v in (("attention_block_q", 0), ("attention_block_kv", -4), ("attention_block_q", 4)):
        c = _tiny()
        c.model[k] = v
        assert run(c, str(wd)) == 2
        q, kv = (v, c.model.attention_block_kv) if k == "attention_block_q" else (c.model.attention_block_q, v)
        assert _error_line(capsys) == (f"error: bad config: model.attention_block_q={q} / attention_block_kv={kv} "
                                       "must be >= 8")
    for part, key in (("llm", "num_layers"), ("vit", "num_heads")):  # (0 layers trained, then failed to save)
        c = _tiny()
        c.model.geometry[part][key] = 0
        assert run(c, str(wd)) == 2
        assert _error_line(capsys) == f"error: bad config: model.geometry: {part}.{key}=0 must be >= 1"
    c = _tiny()
    n = jax.device_count() + 1
    c.mesh.data = n
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == (f"error: bad config: mesh.data / fsdp / tensor: mesh {{'data': {n}, 'fsdp': 1, "
                                   f"'tensor': 1}} spans {n} devices; it must span all {jax.device_count()} (the "
                                   "product of the sizes; one of them may be -1: what is left)")
    assert not wd.exists()


def test_a_bad_budget_value_is_named_by_its_config_key(tmp_path, capsys):
    c = _tiny()
    c.data.budget.vae_image_size = (64,)
    assert run(c, str(tmp_path / "wd")) == 2
    assert _error_line(capsys) == ("error: bad config: data (synthetic): data.budget.vae_image_size=(64,) must be "
                                   "(H, W) ints >= 0")  # (it named PackBudget.vae_image_size)


def test_bad_records_settings_are_one_line(tmp_path, capsys):
    wd = tmp_path / "wd"
    c = _tiny()
    c.data.kind = "records"
    c.data.records = dict(datasets=[], demo_dir="", workers=0)
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == ("error: bad config: data (records): data.kind='records' needs "
                                   "data.records.datasets (or data.records.demo_dir)")
    for ds, msg in [(dict(path="t2i"), "data.records.datasets[0]: expected dict(path=..., weight=...), got "
                                       "{'path': 't2i'}"),  # (was a KeyError traceback)
                    (dict(path="t2i", weight="2"), "data.records.datasets[0] (t2i): weight must be a number, got '2'"),
                    (dict(path="", weight=1.0), "data.records.datasets[0]: path must be a non-empty string, got ''")]:
        c.data.records = dict(datasets=[ds], demo_dir="", workers=0)
        assert run(c, str(wd)) == 2
        assert _error_line(capsys) == f"error: bad config: data (records): {msg}"
    c.data.tokenizer = str(tmp_path / "tokenizer.json")  # never read: the transform is refused first
    c.data.records = dict(datasets=[dict(path=str(tmp_path / "ds"), weight=1.0)], demo_dir="", workers=0,
                          vae_transform=(1024, 256, 16), vit_transform=(98, 28, 14))
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == ("error: bad config: data (records): dataset ds: VAE max_size 1024 exceeds the "
                                   "model's 16 latent positions per side")
    # the [max, min] form of generate's flags (was a TypeError traceback), and a transform that resized every image
    # to one stride
    for vae_t, msg in [((256, 64), "expected (max_size, min_size, stride) or (max_size, min_size, stride, "
                                   "max_pixels)"),
                       ((256, 64, 16, 0), "image transform (max_size=256, min_size=64, stride=16, max_pixels=0): "
                                          "needs 0 < min_size <= max_size, stride >= 1, max_pixels >= 1")]:
        c.data.records.vae_transform = vae_t
        assert run(c, str(wd)) == 2
        assert _error_line(capsys) == f"error: bad config: data (records): data.records.vae_transform={vae_t!r}: {msg}"
    assert not wd.exists()


def test_model_checkpoint_and_sampling_settings_are_checked_before_training(golden_dir, tmp_path, capsys):
    """A checkpoint that is set but ignored, one that cannot be read (truncated, keys missing), a workdir that is
    a file and a sample size the model cannot draw are one error line each before any step; nothing is written."""
    wd = tmp_path / "wd"
    c = _tiny()
    c.model.ckpt = str(golden_dir)  # model.init stays random
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == (f"error: bad config: model.ckpt={str(golden_dir)!r} is set but model.init='random': "
                                   "the checkpoint would be ignored and a random model of model.geometry trained. Add "
                                   "--config.model.init=checkpoint to start from it, or leave model.ckpt empty")
    bad = tmp_path / "bad"
    c.model.init, c.model.ckpt = "checkpoint", str(bad)  # (a mistyped path)
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == (f"error: bad config: model.ckpt={str(bad)!r}: no such folder (an official or "
                                   "converted checkpoint folder)")
    shutil.copytree(golden_dir, bad)
    ema = bad / "ema.safetensors"
    size = ema.stat().st_size
    with open(ema, "r+b") as f:
        f.truncate(size - 100)
    c.model.init, c.model.ckpt = "checkpoint", str(bad)
    assert run(c, str(wd)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: model.ckpt={str(bad)!r}: cannot load the model: {ema}: truncated"), line
    shutil.copy2(golden_dir / "ema.safetensors", ema)
    (bad / "ae.safetensors").write_bytes(b"not a safetensors file")
    assert run(c, str(wd)) == 2
    assert _error_line(capsys).startswith(f"error: model.ckpt={str(bad)!r}: cannot load the VAE: {bad / 'ae.safetensors'}")
    assert not wd.exists()

    c = _tiny()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for w in (afile, afile / "wd"):
        assert run(c, str(w)) == 2
        assert _error_line(capsys) == (f"error: bad config: workdir {w}: " + (
            "exists and is not a folder" if w == afile else f"{afile} is a file, not a folder"))
    assert afile.read_text() == "x"

    from echo4o_jax.train.trainer import model_config_from

    m = model_config_from(c)
    ds, side = m.latent_downsample, m.max_latent_size
    c.log.sample_every, c.log.sample_prompts = 1, [[1, 2, 3]]
    for size in [(ds * (side + 1), ds), (ds + 1, ds), (0, ds)]:
        c.log.sample_size = size
        assert run(c, str(wd)) == 2
        assert _error_line(capsys) == (f"error: bad config: log.sample_size={size}: each side must be a positive "
                                       f"multiple of {ds} px and at most {ds * side} px (the model's latent position "
                                       f"table: {side} per side)")
    c.log.sample_size, c.log.sample_prompts = (ds, ds), ["text needs a tokenizer"]
    assert run(c, str(wd)) == 2
    assert _error_line(capsys) == ("error: bad config: log.sample_prompts holds text but there is no tokenizer: set "
                                   "data.tokenizer (tokenizer.json, or a folder holding it)")
    # prompts the sample grid could not feed: a traceback at the first grid, after the steps since the last save
    vocab = m.llm.vocab_size
    for prompts, msg in [([5], "log.sample_prompts[0]=5: expected a text or a list of token ids"),
                         ([[1], [vocab]], f"log.sample_prompts[1]: token ids must be in [0, {vocab}), got [{vocab}]"),
                         ([[1] * 300], "log.sample_prompts[0] takes 320 context tokens (padded to 32), more than "
                                       "log.sample_max_context=256")]:
        c.log.sample_prompts, c.log.sample_max_context = prompts, 256
        assert run(c, str(wd)) == 2
        assert _error_line(capsys) == f"error: bad config: {msg}"
    assert not wd.exists()


def test_recipe_reads_the_folders_the_importer_writes():
    import inspect

    from echo4o_jax.data.import_echo4o import import_echo4o

    recipe = load_config("echo4o_7b")
    written = inspect.signature(import_echo4o).parameters["subsets"].default
    assert sorted(d["path"] for d in recipe.data.records.datasets) == sorted(written)


def test_changed_data_settings_are_named_and_another_slice_may_reshard(tmp_path, capsys, monkeypatch):
    """A records checkpoint resumed with other data settings is refused, naming them; when only the process
    count / packs per process changed, the error offers train.data_resume=reshard, which then goes on from
    the run's data position (logged as a data_resharded record)."""
    from echo4o_jax.train.trainer import Trainer
    from test_data_pipeline import _tokenizer_json, _write_dataset
    from test_latents import SIDE, _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    data = _write_dataset(tmp_path / "ds", 6, 5, prefix="s", sizes=(SIDE,))
    wd = tmp_path / "wd"
    c = _config(data, tok)
    c.checkpoint.async_save = False
    tr = Trainer(c, wd)
    next(tr.source)  # (a data position past the start)
    st = tr.source.get_state()
    tr.save(force=True)  # step 0, with the records iterator's state
    tr.ckpt.wait_until_finished()
    # a 2-process run's states (here: this one's twice) on 1 process: refused, or resharded
    with pytest.raises(ValueError, match="the checkpoint holds the data states of 2 processes, this run has 1"):
        tr.source.resume([st, st], reshard=False)
    assert tr.source.resume([st, st], reshard=True)["offsets"] == [2 * st["next_element"]]  # (one dataset)
    assert tr.source.get_state()["offsets"] == [2 * st["next_element"]]
    # multi-host: a process that resharded while the others resumed exactly (their configs differ) stops all
    import echo4o_jax.train.trainer as trainer_mod

    real = trainer_mod._gather_process_states
    monkeypatch.setattr(trainer_mod, "_gather_process_states",
                        lambda s: real(s) + [{"refused": False, "resharded": True}])
    with pytest.raises(trainer_mod.CheckpointError, match=r"process\(es\) \[1\] resharded the data state of step 0"):
        tr.restore()
    monkeypatch.undo()
    before = _files(wd)
    assert run(_config(data, tok, packs_per_step=2), str(wd)) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: the data iterator state of step 0 in workdir {wd} cannot resume with this "
                          "config's data settings (iterator state was saved by a pipeline with another configuration")
    assert ("Settings that differ from the checkpoint's run: data.packs_per_step: checkpoint 1, config 2; "
            "packs per process: checkpoint 1, this run 2. Resume with the checkpoint's values, set "
            "train.data_resume=reshard to go on") in err
    assert _files(wd) == before
    c = _config(data, tok, packs_per_step=2, seed=1)  # another data setting too: no reshard offered
    c.train.data_resume = "reshard"
    assert run(c, str(wd)) == 2
    err = _error_line(capsys)
    assert "data.seed: checkpoint 0, config 1" in err and "data_resume=reshard" not in err
    assert err.endswith("set train.data_resume=restart to keep the weights, optimizer and step and start the data "
                        "stream from its beginning, or use another --workdir")
    assert _files(wd) == before
    c = _config(data, tok, packs_per_step=2)
    c.train.update(steps=1, data_resume="reshard")
    c.checkpoint.async_save = False
    assert run(c, str(wd)) == 0
    rec = [r for r in _records(wd) if r.get("event") == "data_resharded"]
    assert len(rec) == 1 and rec[0]["step"] == 0
    assert {k: rec[0][k] for k in ("from_processes", "from_packs_per_process", "processes", "packs_per_process",
                                   "elements_read", "offsets", "read_twice")} == dict(
        from_processes=1, from_packs_per_process=1, processes=1, packs_per_process=2,
        elements_read=st["next_element"], offsets=[st["next_element"]], read_twice=0)
    assert st["next_element"] > 0 and rec[0]["handed_over"] == len(st["buffer"]) + len(st["carry"])
    assert "[train] data resharded (train.data_resume=reshard): 1 process(es) x 1 pack(s) -> 1 x 2" in \
        capsys.readouterr().out
    c = _config(data, tok, packs_per_step=2, seed=1)  # train.data_resume=restart names what changed (it gave a hash)
    c.train.update(steps=2, data_resume="restart")
    c.checkpoint.async_save = False
    assert run(c, str(wd)) == 0
    why = [r["why"] for r in _records(wd) if r.get("event") == "data_restarted"]
    assert len(why) == 1 and why[0].endswith("; data settings that differ from the checkpoint's run: data.seed: "
                                             "checkpoint 0, config 1"), why
    assert "data settings that differ from the checkpoint's run: data.seed: checkpoint 0, config 1)" in \
        capsys.readouterr().out


def test_other_records_under_the_same_path_are_refused_and_restart_goes_on(tmp_path, capsys):
    """A dataset rewritten at the same path (or completed in place) gives another shuffled stream: resuming the
    old position in it was accepted silently (the state's fingerprint saw paths and settings only). It is
    refused, naming the dataset and offering train.data_resume=restart, which resumes the weights, optimizer and
    step, starts the data stream from its beginning and logs a data_restarted record; left on, it changes nothing
    while the data state can resume."""
    import shutil

    from test_data_pipeline import _tokenizer_json, _write_dataset
    from test_latents import SIDE, _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    data = _write_dataset(tmp_path / "ds", 6, 5, prefix="s", sizes=(SIDE,))
    wd = tmp_path / "wd"
    c = _config(data, tok)
    c.train.steps = 1
    c.checkpoint.update(async_save=False, every=1)
    assert run(c, str(wd)) == 0
    capsys.readouterr()
    shutil.rmtree(data)
    _write_dataset(tmp_path / "ds", 6, 6, prefix="s", sizes=(SIDE,))  # other records, same files and settings
    c.train.steps = 2
    before = _files(wd)
    assert run(c, str(wd)) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: the data iterator state of step 1 in workdir {wd} cannot resume with this "
                          "config's data settings (the records of dataset(s) ds differ from those the iterator state "
                          "was saved with (shard files' sha256 or record counts)"), err
    assert err.endswith("Resume with the records the run trained on, set train.data_resume=restart to keep the "
                        "weights, optimizer and step and start the data stream from its beginning, or use another "
                        "--workdir")
    assert _files(wd) == before
    c.train.data_resume = "restart"
    assert run(c, str(wd)) == 0
    assert ("[train] data stream started from its beginning (train.data_resume=restart: the data state of step 1 "
            "cannot resume: the records of dataset(s) ds differ") in capsys.readouterr().out
    recs = _records(wd)
    assert [r["step"] for r in recs if r.get("event") == "data_restarted"] == [1]
    assert max(r["step"] for r in recs if "loss" in r) == 2
    c.train.update(steps=3)  # the setting left on: a state that can resume exactly still does
    assert run(c, str(wd)) == 0
    assert [r["step"] for r in _records(wd) if r.get("event") == "data_restarted"] == [1]


# ------------------------------------------------------------------------------------------ workdirs


def test_other_geometry_is_refused_and_leaves_the_workdir_as_it_was(workdir, capsys):
    before = _files(workdir)
    c = _tiny(steps=4)
    c.model.geometry.max_latent_size = 8
    c.model.geometry.llm.num_layers = 3
    c.model.remat = "full"  # an execution setting: not named
    assert run(c, str(workdir)) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: workdir {workdir} holds checkpoints of another model geometry than this "
                          "config's (model.geometry): llm.num_layers: workdir 2, config 3; max_latent_size: "
                          "workdir 16, config 8. The geometry cannot change on resume; these settings may: "
                          "model.param_dtype, model.compute_dtype, model.remat, model.attention_impl")
    assert err.endswith(", model.timestep_shift, train.freeze_und. Use the workdir's geometry or another --workdir")
    assert _files(workdir) == before  # model_config/, config.json, checkpoints, log untouched


def test_settings_that_change_the_optimizer_state_are_named_on_resume(workdir, capsys):
    """A gradient clip switched off, or a frozen ViT, changes the optimizer state's tree: one line naming the
    settings (Orbax's tree mismatch was reported as a broken checkpoint, each earlier one too), the workdir
    as it was. Checkpoints from before the layout was recorded are compared with the run's config.json."""
    before = _files(workdir)
    for change, named in ((dict(grad_clip=0.0), "optim.grad_clip > 0: checkpoint True, config False"),
                          (dict(freeze_vit=True), "train.freeze_vit: checkpoint False, config True")):
        c = _tiny(steps=6)
        for k, v in change.items():
            (c.optim if k == "grad_clip" else c.train)[k] = v
        assert run(c, str(workdir)) == 2
        assert _error_line(capsys) == (
            f"error: the optimizer state of the checkpoint of step 4 in workdir {workdir} has another layout than "
            f"this config's ({named}): these settings cannot change on resume (a gradient clip switched on or "
            "off, or other frozen parts, change the optimizer state). Resume with the run's values (its "
            "config.json), or use another --workdir")
        assert _files(workdir) == before
    meta = workdir / "checkpoints" / "4" / "meta" / "metadata"
    m = json.loads(meta.read_text())
    del m["optimizer_layout"]  # (a checkpoint saved before it was recorded)
    meta.write_text(json.dumps(m))
    c = _tiny(steps=6)
    c.optim.grad_clip = 0.0
    assert run(c, str(workdir)) == 2
    assert "(optim.grad_clip > 0: checkpoint True, config False)" in _error_line(capsys)


def test_a_workdir_that_cannot_be_written_is_one_line_before_the_set_up(tmp_path, capsys, monkeypatch):
    """A workdir that cannot be written (a read-only mount: here os.access says so, as it does there) is one
    error line, exit 2, before the model is set up (it was a traceback, exit 1, after it). (A file on its way:
    test_model_checkpoint_and_sampling_settings_are_checked_before_training.)"""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro) else real(p, mode, **k))
    assert run(_tiny(), str(ro / "wd")) == 2
    assert _error_line(capsys) == f"error: bad config: workdir {ro / 'wd'}: {ro} is not writable"
    assert not list(ro.iterdir())


@pytest.mark.parametrize("async_save,vae", [(True, False), (False, False), (True, True)])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, async_save, vae):
    """A save that fails for want of space (here: a file size limit, as a full disk would) stops training at
    once with one error line naming the step, the cause and the last complete checkpoint, exit 2; so does the
    frozen VAE's save in a new workdir (`vae`). An asynchronous save's failure surfaced only at the next save,
    `checkpoint.every` steps later, as ~2,500 lines of Orbax and asyncio tracebacks and exit 1."""
    wd = tmp_path / "wd"
    if not vae:  # a workdir at step 1 (its VAE saved); the resumed run fails at its first save
        assert run(_tiny(steps=1), str(wd)) == 0
    limited = ("import resource, runpy, sys\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))\n"
               "sys.argv[0] = 'echo4o_jax.train'\n"
               "runpy.run_module('echo4o_jax.train', run_name='__main__', alter_sys=True)\n")
    p = subprocess.run([sys.executable, "-c", limited, "--config", str(TINY), "--workdir", str(wd),
                        "--config.train.steps=12", "--config.checkpoint.every=2",
                        f"--config.checkpoint.async_save={async_save}", "--config.log.tensorboard=False"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**without_compilation_cache(os.environ), "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, p.stderr[-3000:]
    # (not the progress bar's lines: "2/12 [00:01<00:12, 2.74it/s" or, a slow step under load, "1.27s/it")
    lines = [x for x in p.stderr.splitlines() if not re.search(r"\d+/\d+ \[", x) and x.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    # (the cause at the end of a long tensorstore message was cut with its middle kept: tensorstore_error keeps
    # the end, as test_checkpoint_errors checks)
    assert "File too large" in lines[0], lines
    if vae:
        assert lines[0].startswith(f"error: saving the frozen VAE to {wd / 'vae'} failed: ") and lines[0].endswith(
            "(once the disk has room, the same command goes on)"), lines
        assert not (wd / "log.jsonl").exists() and (not (wd / "checkpoints").exists() or not list(
            (wd / "checkpoints").iterdir()))
        return
    assert lines[0].startswith(f"error: saving the checkpoint of step 2 in {wd / 'checkpoints'} failed: "), lines
    assert lines[0].endswith("Training stopped; the last complete checkpoint: step 1 (once the disk has room, the "
                             "same command resumes from it)"), lines
    steps = [r["step"] for r in _records(wd) if "loss" in r]
    assert max(steps) < 12


def test_a_second_run_on_a_workdir_in_use_is_refused(workdir, capsys, monkeypatch):
    """Two runs on one workdir (two jobs, a command started twice) trained side by side, each saving over the
    other's checkpoints: the second is one error line naming the first's pid; the workdir is as it was."""
    from echo4o_jax.paths import hold_lock
    from echo4o_jax.train.trainer import Trainer

    other = hold_lock(workdir, "test")  # (the first run's lock)
    try:
        before = _files(workdir)
        with monkeypatch.context() as m:  # refused before the model is built (a 7B run's weights load for minutes)
            m.setattr(Trainer, "_build", lambda self: pytest.fail("built before the workdir's lock was checked"))
            assert run(_tiny(steps=6), str(workdir)) == 2
        assert _error_line(capsys) == (f"error: workdir {workdir} is in use by another run (it holds the folder's "
                                       "lock): one run at a time")
        assert _files(workdir) == before
    finally:
        other.close()
    import errno
    import fcntl

    real_flock = fcntl.flock

    def no_locks(fd, op):  # (only the workdir's: JAX's compilation cache takes a lock of its own elsewhere)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(workdir)):
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a file system without locks: said, and training goes on
    capsys.readouterr()
    assert run(_tiny(steps=5), str(workdir)) == 0
    assert (f"[train] warning: workdir {workdir}: cannot lock {workdir} (No locks available): a second run on "
            "this workdir would not be refused") in capsys.readouterr().out


def test_finished_workdir_says_so_and_execution_settings_may_change(workdir, capsys):
    before = _files(workdir)
    c = _tiny(steps=4)
    c.model.remat = "full"
    c.model.attention_impl = "xla_dense"
    assert run(c, str(workdir)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"[train] already complete: workdir {workdir} is at step 4 (train.steps=4); nothing to train (a larger "
        "--config.train.steps trains further)")
    after = _files(workdir)
    assert {k for k in before if before[k] != after.get(k)} == {"config.json"}  # this run's config
    assert json.loads(after["config.json"])["model"]["remat"] == "full"


def test_unreadable_checkpoint_names_the_earlier_steps_and_resuming_from_one_works(workdir, capsys):
    ref = _losses(workdir)
    manifest = workdir / "checkpoints" / "4" / "ema" / "manifest.ocdbt"  # tensorstore's spec was in the line
    saved = manifest.read_bytes()
    manifest.unlink()
    assert run(_tiny(steps=4), str(workdir)) == 2
    err = _error_line(capsys)
    assert err.startswith("error: cannot restore the checkpoint of step 4") and "Earlier checkpoints" in err, err
    assert len(err) < 1000 and "tensorstore_spec" not in err, err
    manifest.write_bytes(saved)
    meta = workdir / "checkpoints" / "4" / "opt_state" / "_METADATA"  # (Orbax's error named no file then)
    saved = meta.read_bytes()
    meta.unlink()
    assert run(_tiny(steps=4), str(workdir)) == 2
    assert "[opt_state/_METADATA is missing]. Earlier checkpoints" in _error_line(capsys)
    meta.write_bytes(saved)
    data = workdir / "checkpoints" / "4" / "params" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    before = _files(workdir)
    assert run(_tiny(steps=4), str(workdir)) == 2
    err = _error_line(capsys)
    step_dir, moved = workdir / "checkpoints" / "4", workdir / "broken_checkpoint_4"
    assert err.startswith(f"error: cannot restore the checkpoint of step 4 in workdir {workdir} ({step_dir}): "), err
    assert err.endswith(f". Earlier checkpoints: steps [2]. To resume from step 2, move the broken one out of "
                        f"checkpoints/ (mv {step_dir} {moved}) and rerun"), err
    assert len(err) < 1000 and ".." not in err
    assert _files(workdir) == before
    shutil.move(step_dir, moved)  # as the message says
    assert run(_tiny(steps=4), str(workdir)) == 0
    recs = _records(workdir)
    marks = [i for i, r in enumerate(recs) if r.get("event") == "resumed"]
    assert len(marks) == 1
    mark = recs[marks[0]]
    assert mark["step"] == 2 and mark["superseded_steps"] == [3, 4]
    assert [r["step"] for r in recs[marks[0]:] if "loss" in r] == [3, 4]  # logged again after the marker
    got = _losses(workdir)  # the last record of a step wins: the resumed run's, equal to the first run's
    assert sorted(got) == [1, 2, 3, 4]
    for s in (3, 4):
        assert got[s] == pytest.approx(ref[s], abs=1e-6)


def test_interrupted_run_exits_128_plus_the_signal(workdir, capsys):
    def interrupt():  # once the resumed run has logged a step (its SIGINT handler is installed)
        deadline = time.time() + 600
        while time.time() < deadline:
            if any("loss" in r and r["step"] > 4 for r in _records(workdir)):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    assert run(_tiny(steps=40, debug_step_delay=0.3), str(workdir)) == 128 + signal.SIGINT
    t.join()
    step = max(_losses(workdir))
    assert 4 < step < 40
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"[train] stopped by SIGINT at step {step} of 40 (checkpoint saved); rerun the same command to resume "
        f"(workdir {workdir})")
    assert (workdir / "checkpoints" / str(step)).is_dir()
    resumed = [r for r in _records(workdir) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and "superseded_steps" not in resumed[0]


def test_ctrl_c_while_the_first_step_runs_saves_it(tmp_path, capsys, monkeypatch):
    """A SIGINT once the first step is under way (here: while the next batch is packed, which overlaps the step)
    lets that step finish, saves it and exits 130 (it ended the run with nothing saved)."""
    import echo4o_jax.train.__main__ as train_main
    import echo4o_jax.train.trainer as trainer_mod

    def hard_exit(code):  # (a Ctrl-C taken for one before the first step: the process would end here)
        pytest.fail(f"the run ended at once with {code}, nothing saved")

    real = trainer_mod.Trainer._fetch_ahead

    def fetch_ahead(self):  # (the loop's handler, called as a delivered Ctrl-C calls it: see the test above)
        if int(self.state["step"]) == 1:  # (the first step's state: dispatched)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "_fetch_ahead", fetch_ahead)
    monkeypatch.setattr(train_main, "_hard_exit", hard_exit)
    wd = tmp_path / "wd"
    assert run(_tiny(steps=3), str(wd)) == 128 + signal.SIGINT
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"[train] stopped by SIGINT at step 1 of 3 (checkpoint saved); rerun the same command to resume (workdir {wd})")
    assert (wd / "checkpoints" / "1").is_dir()


def test_sigterm_to_the_process_group_with_data_workers_saves_and_exits_143(tmp_path, capsys):
    """A job scheduler's SIGTERM to the whole process group also ends the records pipeline's worker processes
    (they keep SIGTERM: multiprocessing stops them with it at exit): the next batch cannot come. The steps
    trained are saved and the run exits 143, as for a SIGTERM to the trainer alone (it failed with 'Worker
    process was terminated unexpectedly', losing the steps since the last checkpoint)."""
    import multiprocessing

    c = load_config("demo")
    c.data.records.demo_dir = str(tmp_path / "demo_data")
    c.data.records.workers = 1
    c.train.steps, c.train.debug_step_delay = 40, 0.3
    c.checkpoint.every, c.checkpoint.async_save = 1000, False
    c.log.every, c.log.sample_every, c.log.tensorboard = 1, 0, False
    wd = tmp_path / "wd"

    def group_sigterm():  # once a step is logged (the handler is installed), as `kill -TERM -PGID` would
        deadline = time.time() + 600
        while time.time() < deadline:
            if (wd / "log.jsonl").exists() and any("loss" in r and r["step"] >= 2 for r in _records(wd)):
                for w in multiprocessing.active_children():
                    os.kill(w.pid, signal.SIGTERM)
                time.sleep(0.5)  # the trainer's handler runs last: it meets the ended workers first
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    t = threading.Thread(target=group_sigterm, daemon=True)
    t.start()
    assert run(c, str(wd)) == 128 + signal.SIGTERM
    t.join()
    step = max(_losses(wd))
    assert 2 <= step < 40 and (wd / "checkpoints" / str(step)).is_dir()
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == (f"[train] stopped by SIGTERM at step {step} of 40 (checkpoint saved); "
                                            f"rerun the same command to resume (workdir {wd})")


def test_a_group_sigterm_before_the_first_batch_exits_143_in_one_line(tmp_path, capsys, monkeypatch):
    """A job scheduler's SIGTERM to the process group while the first batch is read (the compile has not begun):
    the data workers end with it, so no batch comes. Nothing was trained: one line, exit 143 (a traceback, exit 1).
    """
    from echo4o_jax.train import trainer as T

    real_init = T.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        source = self.source

        class Ended:  # the workers ended by the group's SIGTERM, which reaches the trainer too
            def __next__(self_):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # (the handler runs)
                raise RuntimeError("Worker process was terminated unexpectedly")

            def __getattr__(self_, name):
                return getattr(source, name)

        self.source = Ended()

    monkeypatch.setattr(T.Trainer, "__init__", init)
    wd = tmp_path / "wd"
    assert run(_tiny(steps=3), str(wd)) == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == (f"[train] stopped by SIGTERM at step 0 of 3 before this run trained a "
                                            f"step: nothing new to save; rerun the same command to start or resume "
                                            f"(workdir {wd})")
    assert "Traceback" not in err and not list((wd / "checkpoints").glob("[0-9]*"))


def test_ctrl_c_before_the_first_step_is_one_line_and_ends_the_process(tmp_path, capsys, monkeypatch):
    """A SIGINT while the model is set up or restored (before the step loop's handler): one line, exit 130,
    without the interpreter's teardown (which can crash with an XLA compilation in flight)."""
    import echo4o_jax.train.__main__ as train_main
    import echo4o_jax.train.trainer as trainer_mod

    class Interrupted(Exception):
        pass

    def setup(*a, **k):
        raise KeyboardInterrupt

    def hard_exit(code):
        raise Interrupted(code)

    monkeypatch.setattr(trainer_mod, "Trainer", setup)
    monkeypatch.setattr(train_main, "_hard_exit", hard_exit)
    with pytest.raises(Interrupted) as e:
        run(_tiny(steps=2), str(tmp_path / "wd"))
    assert e.value.args == (128 + signal.SIGINT,)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"[train] interrupted (SIGINT) before the first step of this run started (setting up, restoring "
                   f"or compiling): nothing was trained or saved; rerun the same command to start or resume "
                   f"(workdir {tmp_path / 'wd'})"]


def test_ctrl_c_while_the_step_compiles_ends_at_once(tmp_path, capsys, monkeypatch):
    """A SIGINT after the step loop's handler is installed but before a step has started (the compile: minutes
    for the 7B model) ends the run at once as above (it used to wait for the compile, train a step and save it);
    once the first step is under way it finishes the step and saves (test_interrupted_run_exits_128_plus_the_signal,
    test_ctrl_c_while_the_first_step_runs_saves_it)."""
    import echo4o_jax.train.__main__ as train_main
    import echo4o_jax.train.trainer as trainer_mod

    class Interrupted(Exception):
        pass

    def hard_exit(code):
        raise Interrupted(code)

    real = trainer_mod.Trainer.compile

    def compile_interrupted(self, batch):
        # the step loop's SIGINT handler, called as a delivered Ctrl-C calls it (a real signal sent here could land
        # in a gc callback and, swallowed, be sent again by keep_ctrl_c after this test: into the next one)
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return real(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "compile", compile_interrupted)
    monkeypatch.setattr(train_main, "_hard_exit", hard_exit)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when pytest was started in the background
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as e:
        run(_tiny(steps=2), str(tmp_path / "wd"))
    assert e.value.args == (128 + signal.SIGINT,) and time.monotonic() - t0 < 60
    assert "interrupted (SIGINT) before the first step of this run started" in capsys.readouterr().err
    assert not list((tmp_path / "wd" / "checkpoints").glob("[0-9]*"))
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler was taken down


def test_overrides_the_config_does_not_use_are_refused(tmp_path):
    """--config.model.geometry.* under model.init=checkpoint (the Echo-4o config) changed nothing: 4 layers
    asked, the 28-layer 7B built (out of memory on a small machine, or a full-size run unsaid)."""
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.train", "--config", str(ROOT / "configs" / "echo4o_7b.py"),
                        "--workdir", str(tmp_path / "wd"), "--config.model.geometry.llm.num_layers=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --config.model.geometry.llm.num_layers: model.geometry is not used with model.init='checkpoint' "
        "(the geometry is model.ckpt's, ''); a smaller model needs model.init=random"]
    assert not (tmp_path / "wd").exists()
    from echo4o_jax.train.config_cli import unused_override

    c = _tiny()
    assert unused_override(c, "model.geometry.llm.num_layers") is None  # (init=random: it is the geometry)
    c.data.kind = "records"
    assert unused_override(c, "data.synthetic") == "--config.data.synthetic: data.synthetic is not used with " \
                                                   "data.kind='records'"
