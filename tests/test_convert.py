"""Weight conversion both ways (official safetensors <-> Orbax), restore, training workdirs, bad inputs.

Parametrised over ECHO4O_GOLDEN_DIRS (conftest.py); every size comes from the folder's configs.
The golden forward is the one of tests/test_golden.py (its `train_case` fixture, fed with the
restored model through the `loaded` fixture below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from echo4o_jax import __version__
from echo4o_jax import checkpoint as ck
from echo4o_jax import convert
from echo4o_jax.config import BagelConfig, ConfigError
from echo4o_jax.model import keymap
from echo4o_jax.model.bagel import bagel_key_rules
from echo4o_jax.model.keymap import CheckpointMismatchError
from echo4o_jax.model.loading import export_official, load_bagel, load_vae
from echo4o_jax.safetensors_io import (SafetensorsError, SafetensorsFile, open_checkpoint_file,
                                       write_safetensors)
from conftest import without_compilation_cache
from test_golden import _to_official_order, max_err, train_case  # noqa: F401  (fixture reused)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = np.dtype(ml_dtypes.bfloat16)
SIDE_FILES = ("llm_config.json", "vit_config.json", "meta.json")


# ------------------------------------------------------------------------------------------ helpers


def tensors_of(folder, name) -> dict[str, np.ndarray]:
    f = open_checkpoint_file(folder, name)
    return {k: f.read(k) for k in f.keys()}


def assert_bit_exact(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: key sets differ: {sorted(set(got) ^ set(want))[:10]}"
    bad = [k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
           or got[k].tobytes() != want[k].tobytes()]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def make_official(golden_dir, dst, *, dtype=None, shards: int = 1, mutate=None, vae_mutate=None):
    """A copy of the golden official folder: ema in `dtype`, in `shards` files + index, mutated."""
    dst.mkdir(parents=True)
    for name in SIDE_FILES:
        shutil.copy(golden_dir / name, dst / name)
    ema = tensors_of(golden_dir, "ema.safetensors")
    if dtype is not None:
        ema = {k: v.astype(dtype) for k, v in ema.items()}
    if mutate:
        mutate(ema)
    keys = list(ema)
    if shards == 1:
        write_safetensors(dst / "ema.safetensors", ema)
    else:
        weight_map = {}
        for j, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
            name = f"ema-{j + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(dst / name, {keys[i]: ema[keys[i]] for i in part})
            weight_map.update({keys[i]: name for i in part})
        (dst / "ema.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ae = tensors_of(golden_dir, "ae.safetensors")
    if vae_mutate:
        vae_mutate(ae)
    write_safetensors(dst / "ae.safetensors", ae)
    return dst


def listing(path) -> dict:
    """Every file under `path` with its bytes (to show that a folder is unchanged)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "orbax"
    manifest = convert.convert_to_orbax(golden_dir, out, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def loaded(converted):
    """Overrides the fixture of test_golden.py: `train_case` then runs on the restored model."""
    out, _ = converted
    cfg = BagelConfig.from_checkpoint_dir(out)
    return cfg, ck.restore_bagel(out), ck.restore_vae(out)


# ------------------------------------------------------------------------------------------ golden folders


def test_converted_folder_given_relative_to_the_working_directory(converted, loaded, monkeypatch):
    """`--config.model.ckpt=ckpt/bagel7b` as the README writes it: Orbax refuses relative checkpoint paths (the
    trainer's VAE load used to fail with "Checkpoint path should be absolute"), so the loaders make them absolute."""
    out, _ = converted
    _, model, vae = loaded
    monkeypatch.chdir(out.parent)
    for a, b in ((ck.load_any_bagel(out.name), model), (ck.load_any_vae(out.name), vae)):
        la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
        assert len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_converted_folder_layout_and_manifest(golden_dir, converted):
    out, manifest = converted
    assert ck.is_converted_dir(out) and ck.is_orbax_dir(out) and not ck.is_official_dir(out)
    assert ck.is_official_dir(golden_dir) and not ck.is_orbax_dir(golden_dir)
    for name in ("llm_config.json", "vit_config.json"):
        assert (out / name).read_bytes() == (golden_dir / name).read_bytes()
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    # meta.json: the config's fields, and the source's other keys carried over (provenance: variant, seed, ...)
    src_meta = json.loads((golden_dir / "meta.json").read_text())
    assert json.loads((out / "meta.json").read_text()) == {**src_meta, **cfg.meta_dict()}
    assert BagelConfig.from_checkpoint_dir(out) == cfg
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["tool_version"] == __version__
    files = {f["name"]: f for f in manifest["source"]["files"]}
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json"):
        data = (golden_dir / name).read_bytes()
        assert files[name]["size"] == len(data)
        assert files[name]["sha256"] == hashlib.sha256(data).hexdigest()
    ema, ae = SafetensorsFile(golden_dir / "ema.safetensors"), SafetensorsFile(golden_dir / "ae.safetensors")
    n_ema = sum(int(np.prod(s)) for s, _ in ema.info().values())
    n_ae = sum(int(np.prod(s)) for s, _ in ae.info().values())
    assert manifest["parameter_count"] == {"params": n_ema, "vae": n_ae, "total": n_ema + n_ae}
    assert manifest["key_counts"] == {"ema.safetensors": len(ema.keys()), "ae.safetensors": len(ae.keys())}
    assert manifest["dtype"] == "float32"
    # no temporary sibling left behind
    assert sorted(p.name for p in out.parent.iterdir()) == ["orbax"]


def test_restored_model_equals_loaded_official(golden_dir, converted, loaded):
    cfg, model, vae = loaded
    want_b = load_bagel(golden_dir, cfg)
    want_v = load_vae(golden_dir, cfg)
    pairs = [(model, want_b), (vae, want_v), (ck.load_any_bagel(converted[0]), want_b),
             (ck.load_any_bagel(golden_dir), want_b), (ck.load_any_vae(converted[0]), want_v)]
    for got, want in pairs:
        g = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(got))}
        w = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(want))}
        assert set(g) == set(w)
        bad = [p for p in w if g[p].dtype != w[p].dtype or not np.array_equal(g[p], w[p])]
        assert not bad, bad[:5]


def test_restored_model_reproduces_golden_outputs(train_case):
    d, batch, arrays, latents, x0, noise, out = train_case
    assert max_err(latents, d["padded_latent"].transpose(0, 2, 3, 1)) <= 1e-4
    assert max_err(_to_official_order(batch, out["hidden"]), d["last_hidden_state"]) <= 1e-4
    mse = np.asarray(out["mse"])[np.asarray(out["mse_mask"])]
    assert max_err(mse, d["out_mse"]) <= 1e-4


def test_export_back_is_bit_exact(golden_dir, converted, tmp_path):
    src, _ = converted
    out = tmp_path / "back"
    summary = convert.convert_to_official(src, out, progress=False)
    assert summary["ema_files"] == ["ema.safetensors"]
    for name in ("ema.safetensors", "ae.safetensors"):
        assert_bit_exact(tensors_of(out, name), tensors_of(golden_dir, name), name)
        assert SafetensorsFile(out / name).metadata == {"format": "pt"}
    for name in ("llm_config.json", "vit_config.json"):
        assert (out / name).read_bytes() == (golden_dir / name).read_bytes()
    assert BagelConfig.from_checkpoint_dir(out) == BagelConfig.from_checkpoint_dir(golden_dir)


def test_restore_onto_a_mesh_with_dtype(converted):
    out, _ = converted
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    layer = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    stacked = ck.stacked_paths(BagelConfig.from_checkpoint_dir(out))
    model = ck.restore_bagel(out, dtype=jnp.bfloat16,
                             shardings=lambda path, leaf: layer if tuple(path) in stacked else repl)
    assert model.cfg.param_dtype == "bfloat16"
    assert model.llm.und.wq[...].dtype == jnp.bfloat16
    assert model.llm.und.wq[...].sharding == layer
    assert model.llm.embed[...].sharding == repl
    vae = ck.restore_vae(out, shardings=repl)
    leaf = jax.tree.leaves(nnx.to_pure_dict(nnx.state(vae)))[0]
    assert leaf.sharding == repl and leaf.dtype == jnp.float32


def test_official_folder_loads_straight_into_its_shardings(golden_dir, loaded, monkeypatch):
    """An official folder given with shardings (training from it: model.ckpt) places each variable straight
    into its sharding: nothing goes whole onto the default device first (the 7B model did, before a
    reshard), and the values are those of the plain load."""
    from echo4o_jax.model import loading

    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    layer = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    stacked = ck.stacked_paths(BagelConfig.from_checkpoint_dir(golden_dir))

    class NoWholeArrays:  # loading's jnp, whose asarray (the whole-variable placement) fails
        def __getattr__(self, name):
            return getattr(jnp, name)

        def asarray(self, *a, **k):
            raise AssertionError("a variable went whole onto the default device")

    monkeypatch.setattr(loading, "jnp", NoWholeArrays())
    model = ck.load_any_bagel(golden_dir, shardings=lambda path, leaf: layer if tuple(path) in stacked else repl)
    vae = ck.load_any_vae(golden_dir, shardings=repl)
    monkeypatch.undo()
    assert model.llm.und.wq[...].sharding == layer and model.llm.embed[...].sharding == repl
    assert all(x.sharding == repl for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(vae))))
    want = dict(ck.flatten_dict(nnx.to_pure_dict(nnx.state(loaded[1]))))
    got = dict(ck.flatten_dict(nnx.to_pure_dict(nnx.state(model))))
    assert set(got) == set(want)
    for k, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(w), err_msg=str(k))


# ------------------------------------------------------------------------------------------ sharded inputs, dtypes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_input_roundtrip(golden_dir, tmp_path, dtype):
    src = make_official(golden_dir, tmp_path / "src", dtype=np.dtype(BF16 if dtype == "bfloat16" else dtype), shards=3)
    mid, back, back_sharded = tmp_path / "orbax", tmp_path / "back", tmp_path / "back_sharded"
    manifest = convert.convert_to_orbax(src, mid, progress=False, compress=dtype == "float32")
    assert manifest["dtype"] == dtype and manifest["compression"] == ("zstd-1" if dtype == "float32" else None)
    assert {f["name"] for f in manifest["source"]["files"]} >= {"ema.safetensors.index.json",
                                                               "ema-00001-of-00003.safetensors"}
    model = ck.restore_bagel(mid)
    assert model.cfg.param_dtype == dtype and model.llm.embed[...].dtype == np.dtype(BF16 if dtype == "bfloat16" else dtype)
    want = tensors_of(src, "ema.safetensors")
    convert.convert_to_official(mid, back, progress=False)
    assert_bit_exact(tensors_of(back, "ema.safetensors"), want, "ema")
    assert_bit_exact(tensors_of(back, "ae.safetensors"), tensors_of(src, "ae.safetensors"), "ae")
    # sharded output: shards + HF index
    total = sum(v.nbytes for v in want.values())
    summary = convert.convert_to_official(mid, back_sharded, max_shard_size=total // 3 + 1, progress=False)
    index = json.loads((back_sharded / "ema.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(want)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and summary["ema_files"] == shards + ["ema.safetensors.index.json"]
    assert not (back_sharded / "ema.safetensors").exists()
    for shard in shards:
        assert os.path.getsize(back_sharded / shard) <= total // 3 + 1 + 64 * 1024  # + header
    assert_bit_exact(tensors_of(back_sharded, "ema.safetensors"), want, "ema (sharded)")


def test_fp32_source_to_bf16_and_back(golden_dir, tmp_path):
    mid, back = tmp_path / "orbax", tmp_path / "back"
    convert.convert_to_orbax(golden_dir, mid, dtype="bfloat16", progress=False)
    convert.convert_to_official(mid, back, dtype="bfloat16", progress=False)
    want = {k: v.astype(BF16) for k, v in tensors_of(golden_dir, "ema.safetensors").items()}
    assert_bit_exact(tensors_of(back, "ema.safetensors"), want, "ema bf16")
    assert_bit_exact(tensors_of(back, "ae.safetensors"), tensors_of(golden_dir, "ae.safetensors"), "ae")
    # and back up to float32: the bf16 values, widened exactly
    back32 = tmp_path / "back32"
    convert.convert_to_official(mid, back32, dtype="float32", progress=False)
    assert_bit_exact(tensors_of(back32, "ema.safetensors"), {k: v.astype(np.float32) for k, v in want.items()}, "ema")


def test_fast_transpose_is_an_exact_transpose():
    rng = np.random.default_rng(0)
    for shape in ((3, 5), (300, 700), (2, 513, 257), (1000, 70)):
        for dt in (np.float32, BF16, np.float16):
            x = rng.standard_normal(shape).astype(dt)
            want = np.ascontiguousarray(np.swapaxes(x, -1, -2))
            for got in (keymap.LINEAR.to_flax(x), keymap.LINEAR.to_official(x)):
                assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
                assert got.tobytes() == want.tobytes()
            for t in (keymap.LINEAR, keymap.ID):  # row-block streaming of a transform
                for official, fn in ((False, t.to_flax), (True, t.to_official)):
                    blocks = list(convert._row_blocks(t, x, 7, official))
                    assert all(len(b) <= 7 for b in blocks)
                    assert np.concatenate(blocks).tobytes() == fn(x).tobytes()


# ------------------------------------------------------------------------------------------ training workdir


def _perturbed(state: dict, delta: float) -> dict:
    return jax.tree.map(lambda x: np.asarray(x) + np.asarray(delta, np.asarray(x).dtype), state)


@pytest.fixture(scope="module")
def workdir(golden_dir, tmp_path_factory):
    """A fake training workdir: model_config/, vae/, checkpoints/{10,20} (params, ema, opt_state, meta).
    `ema` holds only the Params (not the fixed sin-cos Buffers): readers recompute those."""
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    model = load_bagel(golden_dir, cfg)
    wd = tmp_path_factory.mktemp("train") / "run"
    ck.write_model_config(wd / "model_config", cfg, golden_dir, manifest={"note": "test"})
    ck.save_vae(wd / "vae", load_vae(golden_dir, cfg))
    full = nnx.to_pure_dict(nnx.state(model))
    _, params_only, _ = nnx.split(model, nnx.Param, ...)
    params_only = nnx.to_pure_dict(params_only)
    stacked = ck.stacked_paths(cfg)
    mngr = ck.train_checkpoint_manager(wd)
    expected = {}
    for step in (10, 20):
        params = _perturbed(full, step)
        ema = _perturbed(params_only, step + 0.5)
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params, save_args=ck.train_save_args(params, stacked)),
            ema=ocp.args.StandardSave(ema, save_args=ck.train_save_args(ema, stacked)),
            opt_state=ocp.args.StandardSave({"count": np.int32(step), "mu": _perturbed(params_only, 0)}),
            meta=ocp.args.JsonSave({"step": step})))
        expected[step] = {"params": params, "ema": ema}
    mngr.wait_until_finished()
    mngr.close()
    return wd, cfg, model, expected


def _official_of(cfg, state: dict) -> dict[str, np.ndarray]:
    """Expected official tensors of a pure-dict state, through the loader's exporter."""
    graphdef, abstract = nnx.split(ck.abstract_bagel(cfg))
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, state))
    return dict(export_official(nnx.merge(graphdef, abstract), bagel_key_rules(cfg)))


def test_training_workdir_readers(workdir, golden_dir):
    wd, cfg, model, expected = workdir
    assert ck.is_train_workdir(wd) and ck.is_orbax_dir(wd) and not ck.is_converted_dir(wd)
    assert ck.list_train_steps(wd) == [10, 20]
    assert ck.read_train_meta(wd) == {"step": 20}
    assert json.loads((wd / "model_config" / "manifest.json").read_text()) == {"note": "test"}
    # stacked arrays are chunked one layer per chunk
    item = ck.OrbaxItem(wd / "checkpoints" / "20" / "ema")
    assert item.chunks("llm.und.w_gate")[0] == 1
    m = ck.restore_train_weights(wd, weights="params", step=10)
    np.testing.assert_array_equal(np.asarray(m.llm.und.wq[...]), expected[10]["params"]["llm"]["und"]["wq"])
    np.testing.assert_array_equal(np.asarray(m.latent_pos_embed[...]), expected[10]["params"]["latent_pos_embed"])
    m = ck.load_any_bagel(wd)  # ema of the latest step; the sin-cos tables recomputed
    np.testing.assert_array_equal(np.asarray(m.vit.layers.fc1_w[...]), expected[20]["ema"]["vit"]["layers"]["fc1_w"])
    np.testing.assert_allclose(np.asarray(m.latent_pos_embed[...]), np.asarray(model.latent_pos_embed[...]), atol=1e-6)
    vae = ck.load_any_vae(wd)
    np.testing.assert_array_equal(np.asarray(vae.encoder.conv_in.kernel[...]),
                                  np.asarray(load_vae(golden_dir, cfg).encoder.conv_in.kernel[...]))
    with pytest.raises(ck.CheckpointError, match="no checkpoint for step 15"):
        ck.restore_train_weights(wd, step=15)


@pytest.mark.parametrize("weights", ["ema", "params"])
def test_training_workdir_export(workdir, golden_dir, tmp_path, weights):
    wd, cfg, model, expected = workdir
    out = tmp_path / "torch"
    step = None if weights == "ema" else 10
    summary = convert.convert_to_official(wd, out, weights=weights, step=step, progress=False)
    assert summary["source"] == {"path": str(wd), "kind": "training", "step": step or 20, "weights": weights}
    got = tensors_of(out, "ema.safetensors")
    state = expected[step or 20][weights]
    if weights == "ema":  # the Buffers were not saved: recomputed, close to the official tables
        tables = {k: got.pop(k) for k in ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")}
        src = tensors_of(golden_dir, "ema.safetensors")
        for k, v in tables.items():
            np.testing.assert_allclose(v, src[k], atol=1e-6)
        full = dict(state, latent_pos_embed=np.asarray(model.latent_pos_embed[...]),
                    vit_pos_embed=np.asarray(model.vit_pos_embed[...]))
        want = _official_of(cfg, full)
        for k in tables:
            del want[k]
    else:
        want = _official_of(cfg, state)
    assert_bit_exact(got, want, f"ema.safetensors from {weights}")
    assert_bit_exact(tensors_of(out, "ae.safetensors"), tensors_of(golden_dir, "ae.safetensors"), "ae")
    for name in ("llm_config.json", "vit_config.json"):
        assert (out / name).read_bytes() == (golden_dir / name).read_bytes()


# ------------------------------------------------------------------------------------------ bad inputs


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def break_keys(t: dict) -> None:
    """One missing, one unexpected and one misshaped key in an official ema tensor dict."""
    del t["language_model.model.norm.weight"]
    t["language_model.model.extra.weight"] = np.zeros(3, np.float32)
    k = "connector.fc1.weight"
    t[k] = np.zeros((t[k].shape[0] + 1, t[k].shape[1]), np.float32)


def test_mismatched_keys_one_error_nothing_written(golden_dir, tmp_path):
    def mutate(t):
        break_keys(t)
        t["vae2llm.bias"] = t["vae2llm.bias"].astype(np.int32)

    def vae_mutate(t):
        del t[sorted(t)[0]]

    src = make_official(golden_dir, tmp_path / "src", mutate=mutate, vae_mutate=vae_mutate)
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError) as e:
        convert.convert_to_orbax(src, out, progress=False)
    msg = str(e.value)
    assert "ema.safetensors" in msg and "ae.safetensors" in msg
    assert "missing keys (1)" in msg and "language_model.model.norm.weight" in msg
    assert "unexpected keys (1)" in msg and "language_model.model.extra.weight" in msg
    assert "wrong shapes (1)" in msg and "connector.fc1.weight" in msg
    assert "wrong dtypes (1)" in msg and "vae2llm.bias: dtype int32" in msg
    _assert_nothing_written(out)


def test_truncated_file_names_it_nothing_written(golden_dir, tmp_path):
    src = make_official(golden_dir, tmp_path / "src", shards=2)
    shard = src / "ema-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(SafetensorsError, match=r"ema-00002-of-00002.safetensors: truncated"):
        convert.convert_to_orbax(src, out, progress=False)
    _assert_nothing_written(out)
    src2 = make_official(golden_dir, tmp_path / "src2")
    (src2 / "ae.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(SafetensorsError, match=r"ae.safetensors: truncated"):
        convert.convert_to_orbax(src2, out, progress=False)
    _assert_nothing_written(out)


def test_missing_config_nothing_written(golden_dir, tmp_path):
    src = make_official(golden_dir, tmp_path / "src")
    (src / "vit_config.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="vit_config.json"):
        convert.convert_to_orbax(src, out, progress=False)
    _assert_nothing_written(out)
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        convert.convert_to_orbax(tmp_path / "nope", out, progress=False)
    _assert_nothing_written(out)


def test_source_mistakes_are_named_as_what_they_are(golden_dir, tmp_path):
    """The weights file given as --src, and a broken link (a copied Hugging Face cache snapshot: its relative
    links to ../../blobs break), were both "not found"."""
    src = make_official(golden_dir, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=rf"{src / 'ema.safetensors'} is a file: --src is the folder that "
                                                rf"holds the official checkpoint \(here {src}\)"):
        convert.convert_to_orbax(src / "ema.safetensors", out, progress=False)
    (src / "ema.safetensors").unlink()
    (src / "ema.safetensors").symlink_to("../../blobs/0123abcd")
    with pytest.raises(SafetensorsError, match=r"ema.safetensors: a broken symbolic link \(to ../../blobs/0123abcd, "
                                               r"which does not exist\)"):
        convert.convert_to_orbax(src, out, progress=False)
    _assert_nothing_written(out)


def test_the_full_disk_message_sizes_the_output_in_its_dtype(golden_dir, tmp_path, monkeypatch):
    """--dtype float32 of a bfloat16 source writes twice its bytes: the space named was the source's."""
    src = make_official(golden_dir, tmp_path / "src", dtype=ml_dtypes.bfloat16)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "save_streamed", full)
    with pytest.raises(convert.OutputError, match=r"output takes about ([\d,.]+) MiB") as ei:
        convert.convert_to_orbax(src, tmp_path / "out", dtype="float32", vae_dtype="float32", progress=False)
    mib = float(re.search(r"about ([\d,.]+) MiB", str(ei.value)).group(1).replace(",", ""))
    n_params = sum(v.size for name in ("ema.safetensors", "ae.safetensors") for v in tensors_of(src, name).values())
    assert mib == pytest.approx(n_params * 4 / 2**20, abs=0.05)  # (every tensor, in float32)


def test_ctrl_c_inside_the_orbax_save_ends_it_in_order(golden_dir, converted, tmp_path, monkeypatch, caplog):
    """A Ctrl-C while the Orbax save runs stops the block writer (at the first block after the main thread has
    run the handler) and lets the save end in order, then raises KeyboardInterrupt before the next item (the
    VAE) is saved: no folder is left beside --out (Orbax's threads went on writing after the interrupted call
    had removed its temporary folder, and recreated it, logging tracebacks), and an earlier conversion in
    --out is kept. (How many blocks are written before the handler runs depends on the machine's load.)"""
    out = tmp_path / "out"
    shutil.copytree(converted[0], out)
    before = tree_state(out)
    real, served, saves = convert._prefetched, [], []

    def prefetched(items, depth=1):
        saves.append(1)
        if len(saves) > 1:  # (a later item's save: the Ctrl-C did not stop the conversion)
            return real(items, depth)

        def interrupting():
            for n, item in enumerate(items()):
                if n == 3:
                    os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread: the deferred Ctrl-C
                served.append(n)
                yield item
        return real(interrupting, depth)

    monkeypatch.setattr(convert, "_prefetched", prefetched)
    monkeypatch.setattr(convert, "_remove_when_quiet", lambda folder: shutil.rmtree(folder))  # no second chance
    caplog.set_level(logging.WARNING)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_to_orbax(golden_dir, out, overwrite=True, progress=False)
    assert signal.getsignal(signal.SIGINT) is previous
    time.sleep(1.0)  # anything still writing would show now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and tree_state(out) == before
    assert len(saves) == 1 and len(served) > 3
    assert "Traceback" not in caplog.text and "raised an exception" not in caplog.text


def test_restore_errors_not_about_the_files_pass_unchanged(converted, monkeypatch):
    """Only what tensorstore / Orbax raise for unreadable chunks (ValueError, Orbax's bare Exception) is reported
    as a damaged checkpoint; device memory or XLA errors while restoring pass as they are (generate called an
    out-of-memory "checkpoint ... is incomplete or unreadable")."""
    def failing(exc):
        def restore(self, *a, **k):
            raise exc
        return restore

    monkeypatch.setattr(ocp.Checkpointer, "restore", failing(RuntimeError("RESOURCE_EXHAUSTED: out of memory")))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        ck.restore_bagel(converted[0])
    monkeypatch.setattr(ocp.Checkpointer, "restore", failing(ValueError("NOT_FOUND: Error reading \"x\"")))
    with pytest.raises(ck.CheckpointError, match=r"params: cannot read its arrays .*NOT_FOUND: Error reading"):
        ck.restore_bagel(converted[0])


def test_remove_when_quiet_outlasts_late_writers(tmp_path):
    """The cleanup after a failed save removes the temporary folder again when a writer still in flight (a
    tensorstore thread) recreates it after the first removal."""
    import threading

    tmp = tmp_path / ".out.tmp-1"
    (tmp / "params").mkdir(parents=True)

    def late_writer():
        time.sleep(0.5)
        (tmp / "params" / "d").mkdir(parents=True, exist_ok=True)
        (tmp / "params" / "d" / "chunk").write_bytes(b"x")

    t = threading.Thread(target=late_writer)
    t.start()
    convert._remove_when_quiet(tmp, quiet_s=1.0)
    t.join()
    assert not tmp.exists()


def test_out_under_a_file_is_named(golden_dir, converted, tmp_path):
    """An --out whose parent is a file: one error naming the file (was "[Errno 17] File exists: ...")."""
    (tmp_path / "afile").write_text("mine")
    for fn, src in ((convert.convert_to_orbax, golden_dir), (convert.convert_to_official, converted[0])):
        with pytest.raises(convert.OutputError) as e:
            fn(src, tmp_path / "afile" / "sub", progress=False)
        assert str(e.value) == (f"the output folder {tmp_path / 'afile' / 'sub'} cannot be made: "
                                f"{tmp_path / 'afile'} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_non_empty_out_refused_unless_overwrite(golden_dir, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(convert.OutputExistsError, match="not empty"):
        convert.convert_to_orbax(golden_dir, out, progress=False)
    with pytest.raises(convert.OutputExistsError, match="not empty"):
        convert.convert_to_official(converted[0], out, progress=False)
    assert listing(out) == before
    # --overwrite replaces the whole folder: only an earlier output of the same direction (a mistyped --out
    # with --overwrite deleted any folder, e.g. one of photos)
    for fn, src, what in ((convert.convert_to_orbax, golden_dir, "a converted folder"),
                          (convert.convert_to_official, converted[0], "an exported folder")):
        with pytest.raises(convert.OutputExistsError, match=f"is not empty and is not {what} .*--overwrite replaces "
                                                            "only an earlier output of this command"):
            fn(src, out, overwrite=True, progress=False)
    assert listing(out) == before
    (out / "keep.txt").unlink()
    convert.convert_to_official(converted[0], out, progress=False)
    (out / "keep.txt").write_text("mine")  # beside an earlier export: it would be deleted with it
    with pytest.raises(convert.OutputExistsError, match="is not empty and is not a converted folder"):
        convert.convert_to_orbax(golden_dir, out, overwrite=True, progress=False)  # not the other direction's
    with pytest.raises(convert.OutputExistsError, match=r"holds 1 file\(s\) that this command does not write "
                                                        r"\(keep.txt\)"):
        convert.convert_to_official(converted[0], out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert.convert_to_official(converted[0], out, overwrite=True, progress=False)
    assert (out / "ema.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    download = tmp_path / "BAGEL-7B-MoT"  # an official download (no meta.json): never replaced
    download.mkdir()
    for n in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"):
        shutil.copy2(golden_dir / n, download / n)
    with pytest.raises(convert.OutputExistsError, match="is not empty and is not an exported folder"):
        convert.convert_to_official(converted[0], download, overwrite=True, progress=False)
    shutil.rmtree(download)
    conv = tmp_path / "conv"
    convert.convert_to_orbax(golden_dir, conv, progress=False)
    convert.convert_to_orbax(golden_dir, conv, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert.convert_to_official(converted[0], empty, progress=False)  # an empty folder is fine


def test_overwrite_refuses_an_output_holding_other_files(golden_dir, converted, tmp_path):
    """An official folder with meta.json that also holds other files (here a copy of the golden folder, with
    its recorded tensors): `to_torch --overwrite` deleted them; it now names them and leaves all as it was.
    The same for a converted folder holding another file."""
    out = tmp_path / "official_copy"
    shutil.copytree(golden_dir, out)
    before = listing(out)
    with pytest.raises(convert.OutputExistsError, match=r"holds \d+ file\(s\) that this command does not write "
                                                        r"\(multiref.npz, t2i.npz, train_grads.safetensors, "):
        convert.convert_to_official(converted[0], out, overwrite=True, progress=False)
    assert listing(out) == before
    conv = tmp_path / "conv"
    shutil.copytree(converted[0], conv)
    (conv / "notes.txt").write_text("mine")
    with pytest.raises(convert.OutputExistsError, match=r"holds 1 file\(s\) that this command does not write "
                                                        r"\(notes.txt\)"):
        convert.convert_to_orbax(golden_dir, conv, overwrite=True, progress=False)
    assert (conv / "notes.txt").read_text() == "mine"


def test_leftovers_of_killed_conversions_are_removed(golden_dir, converted, tmp_path, capsys):
    """A conversion killed with kill -9 leaves its partial output `.OUT.tmp-PID-*` beside OUT (tens of GB for
    the 7B model), which no later run removed. The next conversion into OUT removes those of processes that no
    longer run, and an `.OUT.old-PID-*` (the output being replaced) once OUT exists; while OUT is missing the
    `.old-` folder is the last complete output: kept, and named."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    tmp_left = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    old_left = tmp_path / f".out.old-{dead.pid}-4567cdef"
    running = tmp_path / f".out.tmp-{os.getppid()}-89abcdef"  # a conversion still running: not touched
    other = tmp_path / f".other.tmp-{dead.pid}-0123abcd"  # another output's: not touched
    for d in (tmp_left, old_left, running, other):
        (d / "params").mkdir(parents=True)
    convert.convert_to_official(converted[0], out, progress=False)
    err = capsys.readouterr().err
    assert f"note: {old_left} holds the output that an interrupted conversion was replacing" in err
    assert f"note: removed {tmp_left}, left by a conversion into {out} that was killed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", old_left.name, running.name, other.name])
    convert.convert_to_official(converted[0], out, overwrite=True, progress=False)  # OUT exists now
    assert f"note: removed {old_left}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, other.name])


def test_mount_point_as_out_is_refused_before_the_conversion(golden_dir, converted, tmp_path, monkeypatch):
    """An empty mount point as --out: the output is written beside it and renamed, which cannot replace a mount
    point; that failed (EBUSY) after the whole conversion, written on the parent's disk. Refused up front."""
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out.resolve()) or real(p))
    for fn, src in ((convert.convert_to_orbax, golden_dir), (convert.convert_to_official, converted[0])):
        with pytest.raises(convert.OutputError, match=rf"{out} is a mount point .* give a folder inside it, "
                                                      rf"e.g. {out / 'bagel'}"):
            fn(src, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and not list(out.iterdir())


@pytest.mark.parametrize("tool", ["to_jax", "to_torch"])
def test_full_disk_is_one_line_and_leaves_nothing(golden_dir, converted, tmp_path, tool):
    """Writing fails for want of space (here: the file size limit, as a full disk or quota would): one error
    line naming the output folder and the cause, exit status 2, nothing left beside --out. to_jax printed ~100
    lines (Orbax's thread tracebacks, then a 2,000-character tensorstore spec); to_torch printed
    "[Errno 28] No space left on device" naming no file."""
    src = ["--src", str(golden_dir)] if tool == "to_jax" else ["--ckpt", str(converted[0])]
    out = tmp_path / "out"
    env = dict(without_compilation_cache(os.environ), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    limited = ("import resource, runpy, sys\n"  # (set in the child: a preexec_fn would fork this JAX process)
               "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
               f"sys.argv[0] = 'tools.convert_weights.{tool}'\n"
               f"runpy.run_module('tools.convert_weights.{tool}', run_name='__main__', alter_sys=True)\n")
    p = subprocess.run([sys.executable, "-c", limited, *src, "--out", str(out), "--no-progress"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"error: cannot write the output folder {out}: File too large (the partial output "
                               "was removed; the output takes about "), p.stderr
    assert len(p.stderr.splitlines()) == 1 and not p.stdout
    assert not list(tmp_path.iterdir())


def test_sigterm_removes_the_partial_output(golden_dir, tmp_path):
    """SIGTERM (a job scheduler's stop) is handled as a Ctrl-C: exit status 143, one line, no partial output
    left beside --out (it left a hidden folder as large as the part converted)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    script = ("import os, signal, sys, threading, time\n"
              "from echo4o_jax import convert\n"
              "real = convert._prefetched\n"
              "def prefetched(items, depth=1):\n"
              "    def slow():\n"
              "        for n, item in enumerate(items()):\n"
              "            if n == 3:\n"
              "                os.kill(os.getpid(), signal.SIGTERM)\n"
              "            yield item\n"
              "    return real(slow, depth)\n"
              "convert._prefetched = prefetched\n"
              "from tools.convert_weights import to_jax\n"
              "sys.exit(to_jax.main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", script, "--src", str(golden_dir), "--out", str(out), "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 143, p.stderr
    assert p.stderr.strip() == "terminated (SIGTERM): nothing was written to the output folder"
    time.sleep(1.0)  # anything still writing would show now
    assert not list(tmp_path.iterdir())


def test_official_training_checkpoint_folder(golden_dir, tmp_path):
    """An official training checkpoint (ema.safetensors + model.safetensors, no configs) is named as such, with
    what to copy into it (it was "missing config file: .../llm_config.json"); then `weights="model"`
    (--weights model) converts its non-EMA weights."""
    ckpt = tmp_path / "0005000"
    ckpt.mkdir()
    ema = tensors_of(golden_dir, "ema.safetensors")
    write_safetensors(ckpt / "ema.safetensors", ema)
    model = {k: (v * 2).astype(v.dtype) for k, v in ema.items()}
    write_safetensors(ckpt / "model.safetensors", model)
    with pytest.raises(ck.CheckpointError, match=r"holds ema.safetensors and model.safetensors but no "
                                                 r"llm_config.json: an official training checkpoint .* copy "
                                                 r"llm_config.json, vit_config.json, ae.safetensors"):
        convert.convert_to_orbax(ckpt, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0005000"]
    for name in SIDE_FILES + ("ae.safetensors",):
        if (golden_dir / name).is_file():
            shutil.copy(golden_dir / name, ckpt / name)
    m = convert.convert_to_orbax(ckpt, tmp_path / "out", progress=False, hash_files=False, weights="model")
    assert m["items"]["params"]["source"] == "model.safetensors" and "model.safetensors" in m["key_counts"]
    convert.convert_to_official(tmp_path / "out", tmp_path / "back", progress=False)
    assert_bit_exact(tensors_of(tmp_path / "back", "ema.safetensors"), model, "model.safetensors via to_jax")
    with pytest.raises(ValueError, match="weights='params': expected 'ema' or 'model'"):
        convert.convert_to_orbax(ckpt, tmp_path / "out2", progress=False, weights="params")
    (ckpt / "ema.safetensors").unlink()  # the non-EMA weights only: the flag that converts them is named
    with pytest.raises(FileNotFoundError, match=r"has no ema.safetensors but a model.safetensors .*--weights model"):
        convert.convert_to_orbax(ckpt, tmp_path / "out2", progress=False)


def test_to_torch_bad_inputs_nothing_written(golden_dir, converted, workdir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ck.CheckpointError, match="neither a converted Orbax folder"):
        convert.convert_to_official(golden_dir, out, progress=False)
    with pytest.raises(ck.CheckpointError, match="no checkpoint for step 7"):
        convert.convert_to_official(workdir[0], out, step=7, progress=False)
    with pytest.raises(ck.CheckpointError, match="--step does not apply"):
        convert.convert_to_official(converted[0], out, step=7, progress=False)
    with pytest.raises(ck.CheckpointError, match="holds one set of weights .*--weights params applies to a training"):
        convert.convert_to_official(converted[0], out, weights="params", progress=False)  # (was ignored)
    # configs that do not match the stored arrays: one error listing the arrays
    bad = tmp_path / "bad"
    shutil.copytree(converted[0], bad)
    llm = json.loads((bad / "llm_config.json").read_text())
    llm["intermediate_size"] += 8
    (bad / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes \(\d+\):\n    llm.gen.w_down"):
        convert.convert_to_official(bad, out, progress=False)
    with pytest.raises(CheckpointMismatchError, match="wrong shapes"):
        ck.restore_bagel(bad)
    _assert_nothing_written(out)


def tree_state(path) -> dict:
    """Every entry under `path` (files with their bytes, folders, symlinks with their targets)."""
    def one(p):
        if p.is_symlink():
            return ("link", os.readlink(p))
        return p.read_bytes() if p.is_file() else "dir"
    return {str(p.relative_to(path)): one(p) for p in sorted(path.rglob("*"))}


def test_out_overlapping_a_workdir_refused_nothing_lost(workdir, tmp_path):
    """--out the workdir itself, its parent, a folder inside it, a symlink to it, or (through a symlinked
    checkpoints/) the folder that really holds its checkpoints: refused with or without overwrite."""
    parent = tmp_path / "P"
    wd = parent / "run"
    shutil.copytree(workdir[0], wd)
    (wd / "log.jsonl").write_text('{"step": 20}\n')
    (wd / "link").symlink_to(wd, target_is_directory=True)
    big = tmp_path / "big"
    big.mkdir()
    shutil.copytree(workdir[0], big / "run2")
    wd2 = tmp_path / "run2"
    wd2.mkdir()
    for name in ("model_config", "vae"):
        (wd2 / name).symlink_to(big / "run2" / name, target_is_directory=True)
    (wd2 / "checkpoints").symlink_to(big / "run2" / "checkpoints", target_is_directory=True)
    before = tree_state(tmp_path)
    cases = [(wd, wd, "is the source"), (wd, parent, "contains the source"), (wd, wd / "export", "lies inside"),
             (wd, wd / "checkpoints", "lies inside"), (wd, wd / "link", "is the source"),
             (wd2, big, "contains .*model_config/llm_config.json, read from the source"),
             (wd2, big / "run2", "contains .*, read from the source"),
             (wd2, big / "run2" / "checkpoints",
              r"contains .*checkpoints/20/ema, read from the source .*\(real paths: ")]
    for src, out, rel in cases:
        for overwrite in (True, False):
            with pytest.raises(convert.SourceOverlapError, match=rel) as e:
                convert.convert_to_official(src, out, overwrite=overwrite, progress=False)
            msg = str(e.value)
            assert str(out) in msg and str(src) in msg, msg
    assert tree_state(tmp_path) == before
    # and the workdir still exports (to a folder beside it)
    convert.convert_to_official(wd, tmp_path / "beside", progress=False)
    assert (tmp_path / "beside" / "ema.safetensors").is_file() and (wd / "log.jsonl").is_file()


def test_out_overlapping_an_official_or_converted_source_refused(golden_dir, converted, tmp_path):
    parent = tmp_path / "P"
    src = make_official(golden_dir, parent / "src")
    blobs = tmp_path / "blobs"  # a source whose weights are symlinks (as in the Hugging Face cache)
    blobs.mkdir()
    src2 = make_official(golden_dir, tmp_path / "src2")
    for name in ("ema.safetensors", "ae.safetensors"):
        (src2 / name).rename(blobs / name)
        (src2 / name).symlink_to(blobs / name)
    conv = tmp_path / "conv"
    shutil.copytree(converted[0], conv)
    before = tree_state(tmp_path)
    for fn, s, out, rel in [(convert.convert_to_orbax, src, src, "is the source"),
                            (convert.convert_to_orbax, src, parent, "contains the source"),
                            (convert.convert_to_orbax, src, src / "jax", "lies inside the source"),
                            (convert.convert_to_orbax, src2, blobs,
                             r"contains \S*/src2/ae.safetensors, read from the source .*\(real paths: "),
                            (convert.convert_to_official, conv, conv, "is the source"),
                            (convert.convert_to_official, conv, conv / "vae", "lies inside the source")]:
        for overwrite in (True, False):
            with pytest.raises(convert.SourceOverlapError, match=rel) as e:
                fn(s, out, overwrite=overwrite, progress=False)
            assert str(out) in str(e.value) and str(s) in str(e.value)
    assert tree_state(tmp_path) == before
    convert.convert_to_orbax(src2, tmp_path / "jax", progress=False)  # symlinked weights convert fine


def test_out_symlink_is_written_through(converted, tmp_path):
    """An --out symlink to a folder: the export lands in the target, the link stays."""
    target = tmp_path / "disk" / "export"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    convert.convert_to_official(converted[0], link, progress=False)
    (target / "ema.safetensors").write_bytes(b"an older export")
    with pytest.raises(convert.OutputExistsError, match="not empty"):
        convert.convert_to_official(converted[0], link, progress=False)
    summary = convert.convert_to_official(converted[0], link, overwrite=True, progress=False)
    assert summary["out"] == str(link)
    assert link.is_symlink() and (target / "ema.safetensors").read_bytes() != b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]


def test_to_jax_on_a_workdir_or_converted_folder_says_what_to_do(workdir, converted, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ck.CheckpointError, match="is a training workdir") as e:
        convert.convert_to_orbax(workdir[0], out, progress=False)
    msg = str(e.value)
    assert f"python -m tools.convert_weights.to_torch --ckpt {workdir[0]}" in msg
    assert f"python -m echo4o_jax.generate --ckpt {workdir[0]}" in msg
    _assert_nothing_written(out)
    with pytest.raises(ck.CheckpointError, match="is a converted Orbax folder") as e:
        convert.convert_to_orbax(converted[0], out, progress=False)
    assert f"python -m tools.convert_weights.to_torch --ckpt {converted[0]}" in str(e.value)
    _assert_nothing_written(out)


# ------------------------------------------------------------------------------------------ entry points


def test_cli_round_trip(golden_dir, tmp_path, capsys):
    if REPO not in sys.path:  # the entry points run from a checkout (`python -m tools...` from the root)
        sys.path.insert(0, REPO)
    from tools.convert_weights import to_jax, to_torch

    mid, back = tmp_path / "orbax", tmp_path / "back"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "tools.convert_weights.to_jax", "--src", str(golden_dir),
                        "--out", str(mid), "--dtype", "bfloat16"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    assert "tensors" in p.stderr  # the progress bar
    # the golden folder has no tokenizer files: said, with what the checkpoint then takes
    assert f"note: {golden_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)" in p.stderr
    assert "generate --prompt-ids" in p.stderr
    assert to_torch.main(["--ckpt", str(mid), "--out", str(back), "--dtype", "bfloat16", "--max-shard-size", "100KB",
                          "--no-progress"]) == 0
    want = {k: v.astype(BF16) for k, v in tensors_of(golden_dir, "ema.safetensors").items()}
    assert_bit_exact(tensors_of(back, "ema.safetensors"), want, "ema bf16 via the CLIs")
    assert (back / "ema.safetensors.index.json").is_file()
    src_meta = json.loads((golden_dir / "meta.json").read_text())  # its other keys survive the round trip
    assert json.loads((back / "meta.json").read_text()) == src_meta
    capsys.readouterr()
    assert to_jax.main(["--src", str(golden_dir), "--out", str(back), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err


def test_cli_refuses_out_overlapping_source(golden_dir, workdir, tmp_path, capsys):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tools.convert_weights import to_jax, to_torch

    parent = tmp_path / "P"
    wd = parent / "wd"
    shutil.copytree(workdir[0], wd)
    src = make_official(golden_dir, tmp_path / "src")
    before = tree_state(tmp_path)
    for argv, src_path, out_path in [
            (["to_torch", "--ckpt", str(wd), "--out", str(wd)], wd, wd),
            (["to_torch", "--ckpt", str(wd), "--out", str(parent)], wd, parent),
            (["to_jax", "--src", str(src), "--out", str(src)], src, src)]:
        main = to_torch.main if argv[0] == "to_torch" else to_jax.main
        capsys.readouterr()
        assert main(argv[1:] + ["--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the output folder ") and "would replace the source" in err
        assert str(src_path) in err and str(out_path) in err
    assert tree_state(tmp_path) == before
    assert to_jax.main(["--src", str(wd), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training workdir" in err and "to_torch --ckpt" in err and not (tmp_path / "x").exists()


def test_the_conversion_tools_run_jax_on_the_cpu_unless_told():
    """The conversion is host I/O, but Orbax's save started JAX's default backend: on a GPU host it took ~75% of
    each GPU's memory beside a running job. The tools default JAX_PLATFORMS to cpu; a value given is kept."""
    code = "import os, tools.convert_weights; print(os.environ.get('JAX_PLATFORMS'))"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    for given, expected in ((None, "cpu"), ("cuda", "cuda")):
        e = dict(env, **({"JAX_PLATFORMS": given} if given else {}))
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == expected, (p.stdout, p.stderr)
