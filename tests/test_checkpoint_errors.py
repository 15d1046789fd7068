"""Bad official checkpoints give one clear error naming what is wrong (file, key, shape, dtype)."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from echo4o_jax.config import BagelConfig, ConfigError
from echo4o_jax.model.keymap import CheckpointMismatchError
from echo4o_jax.model.loading import export_official, load_bagel
from echo4o_jax.model.bagel import bagel_key_rules
from echo4o_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from test_convert import break_keys, make_official


def _copy(golden_dir, tmp_path, mutate=None):
    return make_official(golden_dir, tmp_path / "ckpt", mutate=mutate)


def test_missing_unexpected_and_misshaped_keys_in_one_error(golden_dir, tmp_path):
    ckpt = _copy(golden_dir, tmp_path, break_keys)
    with pytest.raises(CheckpointMismatchError) as e:
        load_bagel(ckpt)
    msg = str(e.value)
    assert "ema.safetensors" in msg
    assert "missing keys (1)" in msg and "language_model.model.norm.weight" in msg
    assert "unexpected keys (1)" in msg and "language_model.model.extra.weight" in msg
    assert "wrong shapes (1)" in msg and "connector.fc1.weight" in msg


def test_wrong_dtype(golden_dir, tmp_path):
    def mutate(t):
        t["vae2llm.bias"] = t["vae2llm.bias"].astype(np.int32)

    with pytest.raises(CheckpointMismatchError, match=r"vae2llm.bias: dtype int32"):
        load_bagel(_copy(golden_dir, tmp_path, mutate))


def test_truncated_file_names_the_file(golden_dir, tmp_path):
    ckpt = _copy(golden_dir, tmp_path)
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match=r"ema.safetensors: truncated"):
        load_bagel(ckpt)
    (ckpt / "ema.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(SafetensorsError, match=r"ema.safetensors"):
        load_bagel(ckpt)


def test_missing_config_file(golden_dir, tmp_path):
    ckpt = _copy(golden_dir, tmp_path)
    (ckpt / "vit_config.json").unlink()
    with pytest.raises(ConfigError, match="vit_config.json"):
        load_bagel(ckpt)


@pytest.mark.parametrize("file,change,message", [
    ("llm_config.json", lambda d: [d], "llm_config.json: expected a JSON object, got list"),
    ("llm_config.json", lambda d: {k: v for k, v in d.items() if k != "hidden_size"},
     "llm_config.json: no 'hidden_size'"),
    ("llm_config.json", dict(num_hidden_layers=-1), "llm_config.json: num_hidden_layers=-1 must be >= 1"),
    ("llm_config.json", dict(hidden_size="64"), "llm_config.json: 'hidden_size' must be an integer, got '64'"),
    ("llm_config.json", dict(num_attention_heads=4.9), "'num_attention_heads' must be an integer, got 4.9"),
    ("llm_config.json", dict(rms_norm_eps="abc"), "llm_config.json: 'rms_norm_eps' must be a number, got 'abc'"),
    ("llm_config.json", dict(rope_theta="1e6"), "llm_config.json: 'rope_theta' must be a number, got '1e6'"),
    ("llm_config.json", dict(rope_theta=0), "llm_config.json: rope_theta=0 must be > 0.0"),
    ("llm_config.json", dict(num_key_value_heads=True), "'num_key_value_heads' must be an integer, got True"),
    ("vit_config.json", dict(num_hidden_layers=1), "vit_config.json: num_hidden_layers=1 must be >= 2"),
    ("vit_config.json", dict(layer_norm_eps=[1e-6]), "vit_config.json: 'layer_norm_eps' must be a number"),
    ("meta.json", lambda d: {**d, "ae": {**d["ae"], "ch_mult": [1, "2"]}},
     "meta.json 'ae': 'ch_mult' must be a list of positive integers, got [1, '2']"),
    ("meta.json", lambda d: {**d, "ae": {**d["ae"], "z_channels": 16.5}}, "meta.json 'ae': 'z_channels' must be an "
     "integer, got 16.5"),
    ("meta.json", lambda d: {**d, "ae": {**d["ae"], "scale_factor": "0.36"}}, "meta.json 'ae': 'scale_factor' must "
     "be a number, got '0.36'"),
    ("meta.json", lambda d: {**d, "bagel": {**d["bagel"], "max_latent_size": "8"}}, "meta.json 'bagel': "
     "'max_latent_size' must be an integer, got '8'"),
    ("meta.json", lambda d: {**d, "bagel": [1]}, "meta.json: 'bagel' must be a JSON object, got list"),
    ("meta.json", lambda d: {**d, "bagel": {**d["bagel"], "special_token_ids": {"bos_token_id": "2"}}},
     "meta.json 'special_token_ids': 'bos_token_id' must be an integer, got '2'"),
])
def test_bad_config_values_name_file_and_key(golden_dir, tmp_path, file, change, message):
    """A config value of the wrong type or range is a ConfigError naming the file and the key (a string, a
    list or a negative layer count ended in a KeyError / TypeError from deep inside JAX, or was converted
    silently: 4.9 heads -> 4, "1e6" -> 1e6)."""
    ckpt = _copy(golden_dir, tmp_path)
    d = json.loads((ckpt / file).read_text())
    d = change(d) if callable(change) else {**d, **change}
    (ckpt / file).write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        BagelConfig.from_checkpoint_dir(ckpt)
    assert str(e.value).startswith(str(ckpt / file)) and message in str(e.value), str(e.value)


def test_sharded_bfloat16_checkpoint_loads_and_exports_exactly(golden_dir, tmp_path):
    """Several shards + index JSON, in bfloat16: loads, and exports back bit for bit."""
    src = SafetensorsFile(golden_dir / "ema.safetensors")
    keys = src.keys()
    out = tmp_path / "sharded"
    out.mkdir()
    for name in ("llm_config.json", "vit_config.json", "meta.json"):
        shutil.copy(golden_dir / name, out / name)
    bf = {k: np.array(src.get(k)).astype(ml_dtypes.bfloat16) for k in keys}
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"ema-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(out / name, {k: bf[k] for k in part})
        weight_map.update({k: name for k in part})
    (out / "ema.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = BagelConfig.from_checkpoint_dir(out)
    model = load_bagel(out, cfg, dtype="bfloat16")
    back = dict(export_official(model, bagel_key_rules(cfg)))
    assert set(back) == set(keys)
    for k in keys:
        assert back[k].dtype == bf[k].dtype and back[k].tobytes() == bf[k].tobytes(), k


def test_geometry_diff_names_the_geometry_fields_only(golden_dir):
    """What a resumed training run may not change (`checkpoint.model_geometry`): every field that shapes the
    parameters or gives token ids their meaning; the execution settings (`RESUMABLE_MODEL_FIELDS`) may change."""
    import dataclasses

    from echo4o_jax.checkpoint import RESUMABLE_MODEL_FIELDS, geometry_diff, model_geometry

    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    geo = model_geometry(cfg)
    assert {"llm.hidden_size", "vit.num_layers", "vae.ch_mult", "special_tokens.bos_token_id", "max_latent_size",
            "latent_patch_size"} <= set(geo)
    assert not set(RESUMABLE_MODEL_FIELDS) & set(geo)
    execution = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16", remat="full", attention_impl="xla_dense",
                            attention_block_q=64, attention_block_kv=64, timestep_shift=3.0, freeze_und=True)
    assert geometry_diff(cfg, execution) == []
    other = cfg.replace(max_latent_size=cfg.max_latent_size * 2,
                        llm=dataclasses.replace(cfg.llm, num_layers=cfg.llm.num_layers + 1),
                        special_tokens=dataclasses.replace(cfg.special_tokens, eos_token_id=7))
    assert geometry_diff(cfg, other) == [
        ("llm.num_layers", cfg.llm.num_layers, cfg.llm.num_layers + 1),
        ("max_latent_size", cfg.max_latent_size, cfg.max_latent_size * 2),
        ("special_tokens.eos_token_id", cfg.special_tokens.eos_token_id, 7)]


def test_tensorstore_errors_lose_the_specs_appended_to_them():
    """tensorstore appends its read spec (2,000 characters of JSON) in several forms: an error line keeps the
    message only."""
    from echo4o_jax.checkpoint import tensorstore_error

    spec = "{" + '"driver":"zarr",' * 100 + "}"
    for text in (f"NOT_FOUND: Metadata at \"a/.zarray\" does not exist [tensorstore_spec='{spec}']",
                 f"NOT_FOUND: Metadata at \"a/.zarray\" does not exist [tensorstore_spec[1]='{spec}'] "
                 f"[tensorstore_spec[0]='{spec}']",
                 f"NOT_FOUND: Metadata at \"a/.zarray\" does not exist See full TensorStore details {spec}"):
        assert tensorstore_error(ValueError(text)) == 'NOT_FOUND: Metadata at "a/.zarray" does not exist'
    wrapped = Exception("Encountered error while reading array index 3")
    wrapped.__cause__ = ValueError(f"DATA_LOSS: truncated [tensorstore_spec='{spec}']")
    assert tensorstore_error(wrapped) == "DATA_LOSS: truncated"


def test_a_long_tensorstore_error_keeps_its_cause():
    """A write error names the OCDBT folder and the file, two long paths, before its cause: a line cut at 400
    characters lost the cause in a deep workdir (seen in CI: the full-disk test under a long pytest tmp path)."""
    from echo4o_jax.checkpoint import tensorstore_error

    folder = "/tmp/" + "a" * 150 + "/wd/vae.orbax-checkpoint-tmp/ocdbt.process_0/"
    text = (f'OUT_OF_RANGE: Error writing "encoder.mid.attn_1.v.kernel/0.0" in OCDBT database at local file '
            f'"{folder}": Failed writing: "{folder}d/7216abf9294f5ef0": Failed to write 172229 bytes to file 14: '
            f"File too large [os_error_code='27']")
    line = tensorstore_error(ValueError(text))
    assert line.startswith("OUT_OF_RANGE: Error writing") and line.endswith("File too large [os_error_code='27']")
    assert len(line) < len(text) and " ... " in line


def test_model_files_copied_from_a_read_only_folder_can_be_copied_again(golden_dir, tmp_path):
    """A read-only source (a shared model store, a read-only golden folder) made read-only copies: every training
    resume then failed to copy them again ("cannot write the model files of workdir ...: Permission denied", for
    any user but root). Copies take the bytes, not the mode; a read-only copy made before is replaced."""
    import shutil
    import stat

    from echo4o_jax import checkpoint as ck

    src = tmp_path / "src"
    shutil.copytree(golden_dir, src, ignore=shutil.ignore_patterns("*.safetensors", "*.npz", "cases*"))
    names = [n for n in ck.CONFIG_FILES if (src / n).is_file()]
    assert "llm_config.json" in names
    for n in names:
        (src / n).chmod(0o444)
    dst = tmp_path / "dst"
    dst.mkdir()
    assert ck.copy_model_files(src, dst) == names
    for n in names:
        assert (dst / n).stat().st_mode & stat.S_IWUSR and (dst / n).read_bytes() == (src / n).read_bytes()
        (dst / n).chmod(0o444)  # (as an earlier version left them)
    ck.copy_model_files(src, dst)
    assert all((dst / n).stat().st_mode & stat.S_IWUSR for n in names)
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_damaged_orbax_folder_is_one_short_error(tmp_path):
    """A folder copied in part (cp -r, rsync cut short): a missing manifest.ocdbt was a ~1,000-character line
    ending in tensorstore's JSON spec; a _METADATA entry without key_metadata, a KeyError traceback."""
    import json

    import numpy as np

    from echo4o_jax.checkpoint import CheckpointError, OrbaxItem, save_pytree

    item = tmp_path / "params"
    save_pytree(item, {"a": np.ones((4, 4), np.float32), "b": np.zeros((3,), np.float32)})
    assert OrbaxItem(item).shape("a") == (4, 4)
    (item / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointError) as ei:
        OrbaxItem(item).open("a")
    msg = str(ei.value)
    assert msg.startswith(f"{item}: cannot open array 'a': ") and "tensorstore_spec" not in msg and len(msg) < 600
    meta = json.loads((item / "_METADATA").read_text())
    first = next(iter(meta["tree_metadata"]))
    del meta["tree_metadata"][first]["key_metadata"]
    (item / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"_METADATA: corrupt Orbax metadata \(KeyError\('key_metadata'\)\)"):
        OrbaxItem(item)


def test_model_config_files_are_written_whole_and_a_cut_short_one_is_rewritten(golden_dir, tmp_path, monkeypatch):
    """WORKDIR/model_config: a full disk (or a kill) while meta.json is rewritten leaves the old file, not a cut-short
    one (a resume read it as invalid JSON); a generated llm/vit config that an earlier write left empty is written
    again (it was kept for good: every later resume and export failed)."""
    import errno
    import os

    from echo4o_jax.checkpoint import META_FILE, write_model_config

    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    dst = write_model_config(tmp_path / "model_config", cfg)
    meta = (dst / META_FILE).read_text()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_model_config(dst, cfg)  # (the llm / vit configs are there: meta.json is rewritten, and fails)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (dst / META_FILE).read_text() == meta
    assert sorted(p.name for p in dst.iterdir()) == sorted(["llm_config.json", "vit_config.json", META_FILE])
    (dst / "llm_config.json").write_text("")  # as an out-of-disk first start of an earlier version left it
    write_model_config(dst, cfg)
    assert json.loads((dst / "llm_config.json").read_text()) == cfg.llm.to_hf()
    assert BagelConfig.from_checkpoint_dir(dst) == cfg
