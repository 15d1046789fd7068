"""Mesh-shape arithmetic: parameter elements per device, and the (data, fsdp) split the TPU search picks."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from conftest import load_file
from flax import nnx

from echo4o_jax import sharding as shd
from echo4o_jax.config import BagelConfig
from echo4o_jax.model.bagel import Bagel

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _params_7b():
    return nnx.state(nnx.eval_shape(lambda: Bagel(BagelConfig.bagel_7b_mot(), rngs=nnx.Rngs(0))), nnx.Param)


def test_elements_per_device_counts_replicated_dims_whole():
    params = _params_7b()
    flat = list(nnx.to_flat_state(params))
    total = sum(int(np.prod(v.shape)) for _, v in flat)
    assert shd.elements_per_device(params, dict(data=1, fsdp=1, tensor=1)) == total
    # 256 does not divide the SigLIP width 1152 (ViT and connector input): those dims stay whole per chip
    report: list[str] = []
    for path, v in flat:
        shd.logical_to_spec(v.get_metadata().get("logical_axes"), v.shape, type("M", (), {"shape": dict(
            data=1, fsdp=256, tensor=1)}), report=report, name="/".join(map(str, path)))
    assert report and all("(vit_embed) not divisible by fsdp=256" in r for r in report)
    e = lambda data, fsdp: shd.elements_per_device(params, dict(data=data, fsdp=fsdp, tensor=1))
    assert e(1, 256) > total // 256 + 300_000_000  # the 0.4B replicated ViT weights
    assert e(2, 128) == e(1, 128) < e(1, 256)  # the data axis holds full copies of the FSDP shards
    assert e(1, 128) < total // 128 * 1.01  # 128 divides (almost) everything


def test_tpu_search_splits_data_and_fsdp_where_fsdp_would_replicate():
    tc = load_file(ROOT / "bench" / "tpu_compile.py", "tpu_compile_bench_split")
    c = tc.load_config(str(ROOT / "configs" / "echo4o_7b.py"))
    assert tc.data_fsdp_split(c, 64) == (1, 64)  # 1152 / 64 = 18: FSDP over every chip shards everything
    assert tc.data_fsdp_split(c, 256) == (2, 128)  # v6e-256: FSDP 256 would replicate the ViT


def test_a_mesh_that_leaves_the_model_whole_on_every_device_is_refused_up_front():
    """FSDP over 24 devices (3 nodes of 8 GPUs) does not divide the 7B's width 3584: every LLM matrix stayed
    whole on every device, ~14.2B parameters each, and the run died out of memory while setting up, the
    sharding report (printed later) never seen. Refused before the weights load, naming a split that shards
    them; FSDP over 8 (every width divides) passes."""
    import pytest

    from echo4o_jax.train.trainer import ConfigValueError, _check_replication

    params = _params_7b()
    flat = list(nnx.to_flat_state(params))

    def check(data, fsdp):
        mesh = type("M", (), {"shape": dict(data=data, fsdp=fsdp, tensor=1)})
        report: list[str] = []
        for path, v in flat:
            shd.logical_to_spec(v.get_metadata().get("logical_axes"), v.shape, mesh, report=report,
                                name="/".join(map(str, path)))
        _check_replication(params, mesh, report)

    check(1, 8)
    check(3, 8)  # (the split it names)
    with pytest.raises(ConfigValueError, match=r"^mesh data=1 fsdp=24 tensor=1 leaves 13\.\d\dB parameters whole on "
                                               r"every device .* GiB more per device .*not divisible by fsdp=24: "
                                               r"replicated \(and \d+ more\)\. Use a split that divides them \(e\.g\. "
                                               r"--config\.mesh\.data=3 --config\.mesh\.fsdp=8\), or "
                                               r"--config\.train\.allow_replicated=True"):
        check(1, 24)


def test_a_tensor_size_that_splits_heads_is_said():
    """tensor=8 divides the 7B's q / k / v widths (nothing replicated, nothing reported), but not its 28 query
    heads, 4 KV heads or the ViT's 16 heads: the sharding report says so; tensor=4 keeps the LLM's whole."""
    from echo4o_jax.train.trainer import head_split_notes

    cfg = BagelConfig.bagel_7b_mot()
    assert head_split_notes(cfg, 1) == head_split_notes(cfg, 2) == head_split_notes(cfg, 4) == []  # 28, 4, 16 heads
    assert [n.split(": each")[0] for n in head_split_notes(cfg, 8)] == [
        "LLM query heads 28 not divisible by tensor=8", "LLM key/value heads 4 not divisible by tensor=8"]


def test_a_tensor_group_spanning_processes_is_refused():
    """Each process puts its own packs on its devices' batch rows; a tensor group (one row) whose devices belong to
    two processes got two different packs, silently (two losses for one step). Refused: tensor must divide the
    devices per process."""
    import types

    from echo4o_jax.train.trainer import tensor_group_problem

    def mesh(shape, procs):
        devs = np.array([types.SimpleNamespace(process_index=p) for p in procs], dtype=object).reshape(shape)
        return types.SimpleNamespace(devices=devs, size=devs.size)

    assert tensor_group_problem(mesh((1, 1, 2), [0, 1])) == (
        "mesh.tensor=2 spans processes: a tensor group's devices must be one process's (each process loads its own "
        "packs), and a process has 1 device(s): use a mesh.tensor that divides 1")
    assert tensor_group_problem(mesh((2, 1, 1), [0, 1])) is None
    assert tensor_group_problem(mesh((1, 2, 4), [0, 0, 0, 0, 1, 1, 1, 1])) is None
    assert "divides 4" in tensor_group_problem(mesh((1, 1, 8), [0, 0, 0, 0, 1, 1, 1, 1]))


def test_processes_with_different_configs_are_refused(tmp_path, monkeypatch):
    """A host started with another config (optim.lr: its replicated weights trained apart; data.seed: overlapping
    data slices) or workdir trained silently: refused naming the processes, before anything is built."""
    from echo4o_jax.train import trainer as trainer_mod
    from echo4o_jax.train.config_base import base_config

    c = base_config()
    trainer_mod._check_same_config(c, tmp_path)  # one process: nothing to compare
    seen = []
    monkeypatch.setattr(trainer_mod, "_gather_process_states",
                        lambda st: seen.append(st) or [st, st, {"config": "0123456789abcdef"}])
    with pytest.raises(trainer_mod.ConfigValueError, match=r"process\(es\) \[2\] run another config or workdir than "
                                                           r"process 0 .*every host must run the same command"):
        trainer_mod._check_same_config(c, tmp_path)
    # process 1 with process 0's config (its hash, gathered above), process 0 with another lr, or another workdir
    c2 = base_config()
    c2.optim.lr = float(c.optim.lr) * 2
    monkeypatch.setattr(trainer_mod, "_gather_process_states", lambda st: [st, seen[0]])
    for cfg, wd in ((c2, tmp_path), (c, tmp_path / "other")):
        with pytest.raises(trainer_mod.ConfigValueError, match=r"process\(es\) \[1\] run another config"):
            trainer_mod._check_same_config(cfg, wd)
    trainer_mod._check_same_config(c, tmp_path)  # the same config and workdir: the same hash
