"""Precomputed VAE latents (`echo4o_jax.data.latents`, `data.vae_latents`) and the VAE posterior in the
train step (`model.vae_posterior`): the precomputed pipeline gives the in-step pipeline's loss and
gradients, resume, the errors, and sampling."""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import numpy as np
import pytest

from echo4o_jax.data.latents import (MANIFEST_NAME, LatentStore, LatentStoreError, merge_parts, precompute,
                                    vae_fingerprint)
from echo4o_jax.data import latents as latents_mod
from echo4o_jax.image_transform import ImageTransform
from echo4o_jax.packing import batch_arrays
from echo4o_jax.safetensors_io import SafetensorsFile
from echo4o_jax.train.config_base import base_config
from echo4o_jax.train.data_sources import make_source
from echo4o_jax.train.step import make_loss_and_grads
from echo4o_jax.train.trainer import ConfigValueError, Trainer, validate_config
from conftest import DEFAULT_GOLDEN, xla_env
from test_data_pipeline import _tokenizer_json, _write_dataset, config_file, corrupt_record, one_error_line
from test_data_records import count_calls

SIDE = 32  # every VAE image fills the budget canvas: in-step encoding sees no padding (module docstring of latents)
VAE_T = (SIDE, 16, 16)


def _config(data_dir, tok, **data):
    c = base_config()
    c.model.init = "checkpoint"  # the tiny golden BAGEL + VAE (loads in no time; the CLI loads it as the trainer)
    c.model.ckpt = str(DEFAULT_GOLDEN)
    c.data.kind = "records"
    c.data.tokenizer = tok
    c.data.records = dict(datasets=[dict(path=str(data_dir), weight=1.0)], root="", demo_dir="", workers=0,
                          vae_transform=VAE_T, vit_transform=(56, 14, 14))
    c.data.budget = dict(text_tokens=96, vit_tokens=48, vae_tokens=64, vae_images=6, vae_image_size=(SIDE, SIDE))
    c.data.expected_tokens = 150
    c.model.vae_posterior = "mean"
    c.log.tensorboard = False
    c.data.update(data)
    return c


def _keys(out) -> set[str]:
    m = json.loads((out / MANIFEST_NAME).read_text())
    return {k for ds in m["datasets"].values() for s in ds["shards"] for k in SafetensorsFile(out / s["file"]).keys()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    tok = _tokenizer_json(root / "tok.json")
    data_dir = _write_dataset(root / "ds", 12, 5, prefix="s", sizes=(SIDE,))
    out = root / "lat"
    c_in = _config(data_dir, tok)
    stats = precompute(c_in, str(out), batch=4, shard_bytes=12_000, log=None)
    c_lat = _config(data_dir, tok, vae_latents=str(out))
    return dict(root=root, tok=tok, data_dir=data_dir, out=out, stats=stats, c_in=c_in, c_lat=c_lat,
                tr_in=Trainer(c_in, root / "wd_in"), tr_lat=Trainer(c_lat, root / "wd_lat"))


@pytest.fixture(scope="module")
def steps(env):
    """loss / grads of the in-step and the precomputed pipelines' first batch, posterior mean and sampled."""
    tr_in, tr_lat = env["tr_in"], env["tr_lat"]
    b_in, b_lat = next(tr_in.source), next(tr_lat.source)
    assert tr_in.source.last_stats["sample_ids"] == tr_lat.source.last_stats["sample_ids"]
    fs = {post: jax.jit(make_loss_and_grads(tr_in.graphdef, tr_in.buffers, tr_in.vae_graphdef,
                                            patch=tr_in.cfg.latent_patch_size, ce_weight=1.0, mse_weight=1.0,
                                            vae_posterior=post)) for post in ("mean", "sample")}
    key = jax.random.PRNGKey(11)
    run = lambda post, b, k=key: fs[post](tr_in.state["params"], tr_in.vae_state, tr_in._device_batch(b), None, k)  # noqa: E731
    return dict(b_in=b_in, b_lat=b_lat, run=run, key=key,
                **{f"{post}_{src}": run(post, b) for post in ("mean", "sample")
                   for src, b in (("in", b_in), ("lat", b_lat))})


def _source(env, fingerprint=None, **data):
    """The trainer's records source for the env's dataset with `data` overrides (a pipeline is built and
    its store checked)."""
    tr = env["tr_in"]
    c = _config(env["data_dir"], env["tok"], **data)
    fp = vae_fingerprint(tr.vae_state) if fingerprint is None else fingerprint
    return make_source(c, tr.cfg, process_index=0, process_count=1, local_packs=1, vae_fingerprint=fp)


def _max_err(a, b) -> tuple[float, float]:
    err = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return err, max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))


# ---------------------------------------------------------------------------------------------- equality


def test_precomputed_batch_carries_moments_instead_of_images(env, steps):
    b_in, b_lat = steps["b_in"], steps["b_lat"]
    a_in, a_lat = batch_arrays(b_in), batch_arrays(b_lat)
    assert "vae_images" in a_in and "vae_moments" not in a_in
    assert "vae_moments" in a_lat and "vae_images" not in a_lat
    z, f = env["tr_in"].cfg.vae.z_channels, env["tr_in"].cfg.vae.downsample
    assert a_lat["vae_moments"].shape == a_in["vae_images"].shape[:2] + (SIDE // f, SIDE // f, 2 * z)
    assert a_lat["vae_moments"].dtype == np.float32
    for k in a_in.keys() - {"vae_images", "vae_image_hw"}:  # same packing, token for token
        np.testing.assert_array_equal(a_in[k], a_lat[k], err_msg=k)
    np.testing.assert_array_equal(a_in["vae_image_hw"] // f, a_lat["vae_image_hw"])  # latent hw
    assert b_in.num_tokens.sum() > 0 and (a_in["vae_image_hw"] > 0).any()


def test_precomputed_step_equals_in_step_encoding(steps):
    (loss_in, _), g_in = steps["mean_in"]
    (loss_lat, _), g_lat = steps["mean_lat"]
    assert float(loss_lat) == pytest.approx(float(loss_in), rel=1e-5, abs=1e-6)
    err, scale = _max_err(g_lat, g_in)
    assert err <= 1e-5 * max(1.0, scale)


def test_posterior_sample_differs_from_mean_and_is_deterministic(steps):
    (loss_mean, _), _ = steps["mean_lat"]
    (loss_s, _), g_s = steps["sample_lat"]
    assert abs(float(loss_s) - float(loss_mean)) > 1e-6
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g_s))
    (loss_again, _), g_again = steps["run"]("sample", steps["b_lat"])  # same key: same sample
    assert float(loss_again) == float(loss_s)
    assert _max_err(g_again, g_s)[0] == 0.0
    (loss_other, _), _ = steps["run"]("sample", steps["b_lat"], jax.random.PRNGKey(12))
    assert float(loss_other) != float(loss_s)


def test_in_step_sampling_samples_like_the_precomputed_path(steps):
    (loss_mean, _), _ = steps["mean_in"]
    (loss_s, _), g_s = steps["sample_in"]
    assert abs(float(loss_s) - float(loss_mean)) > 1e-6
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g_s))
    # same key, same canvases: the in-step path draws the very sample of the precomputed one
    (loss_lat, _), g_lat = steps["sample_lat"]
    assert float(loss_s) == pytest.approx(float(loss_lat), rel=1e-5, abs=1e-6)
    err, scale = _max_err(g_lat, g_s)
    assert err <= 1e-5 * max(1.0, scale)


def test_trainer_step_runs_on_precomputed_latents(env):
    """The real (donated, sharded) train step with `model.vae_posterior="sample"` and precomputed moments."""
    tr = env["tr_lat"]
    b = next(tr.source)
    tr.compile(b)
    m = tr.train_step(b)
    assert m["ok"] == 1.0 and np.isfinite(m["loss"])


# ---------------------------------------------------------------------------------------------- store


def test_rerun_writes_nothing_new(env):
    out = env["out"]
    assert env["stats"]["images_written"] > 0 and env["stats"]["failed"] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sum(n.endswith(".safetensors") for n in before) > 1  # several shards
    stats = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=None)
    assert stats["images_written"] == 0 and stats["images_skipped"] == env["stats"]["images_written"]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == {k: v for k, v in before.items() if k != MANIFEST_NAME}


def test_killed_run_resumes_losing_at_most_one_shard(env, tmp_path):
    out = tmp_path / "lat"

    class Killed(Exception):
        pass

    def kill(name):
        raise Killed(name)

    with pytest.raises(Killed):
        precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, on_shard=kill, log=None)
    first = _keys(out)
    assert 0 < len(first) < env["stats"]["images_written"]
    with pytest.raises(LatentStoreError, match="dataset 'ds' is incomplete"):
        _source(env, vae_latents=str(out))
    stats = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=None)
    assert stats["images_written"] == env["stats"]["images_written"] - len(first)
    assert _keys(out) == _keys(env["out"])
    ref, got = LatentStore(env["out"]), LatentStore(out)
    for k in _keys(out):
        rid, idx = k.rsplit("#", 1)
        a = ref._files("ds")[k].get(k)
        np.testing.assert_allclose(got.moments("ds", rid, int(idx), a.shape[:2]), a, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def _make_source(env, data_dir, out):
    return make_source(_config(data_dir, env["tok"], vae_latents=str(out)), env["tr_in"].cfg, process_index=0,
                       process_count=1, local_packs=1, vae_fingerprint=vae_fingerprint(env["tr_in"].vae_state))


def test_added_records_are_refused_until_encoded(env, tmp_path):
    d = _write_dataset(tmp_path / "ds", 3, 7, prefix="m", sizes=(SIDE,))
    out = tmp_path / "lat"
    first = precompute(_config(d, env["tok"]), str(out), batch=4, log=None)
    _write_dataset(d, 1, 8, prefix="late", sizes=(SIDE,), append=True)  # a t2i record added afterwards (new shard)
    with pytest.raises(LatentStoreError, match=rf"dataset 'ds': .*1 record shard\(s\) read now were not encoded "
                                               rf"\(records added after the precompute run\?\): {d}/late-\d{{5}}"
                                               rf"\.array_record: run python -m echo4o_jax.data.latents .*--out {out} again"):
        _make_source(env, d, out)
    again = precompute(_config(d, env["tok"]), str(out), batch=4, log=None)
    assert again["images_written"] == 1 and again["images_skipped"] == first["images_written"]
    assert any(k.startswith("late0#") for k in _keys(out))
    next(_make_source(env, d, out))
    store = LatentStore(out)  # a latent the manifest does not hold is still fatal when read
    with pytest.raises(LatentStoreError, match=r"missing latent for dataset 'ds', record 'nope', image 0"):
        store.moments("ds", "nope", 0, (4, 4))


def test_latents_of_other_records_with_the_same_label_and_ids_are_refused(env, tmp_path):
    """Folders a/ds and b/ds: same label, same record ids, other images. Training with a/ds's latents on
    b/ds and a precompute rerun of b/ds into a/ds's folder are refused naming both folders; nothing written
    is lost. A copy of a/ds elsewhere (a folder moved to another machine) is the same records."""
    import shutil

    a = _write_dataset(tmp_path / "a" / "ds", 4, 21, prefix="s", sizes=(SIDE,))
    b = _write_dataset(tmp_path / "b" / "ds", 4, 22, prefix="s", sizes=(SIDE,))
    out = tmp_path / "lat"
    first = precompute(_config(a, env["tok"]), str(out), batch=4, log=None)
    assert first["images_written"] > 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = (rf"dataset 'ds': the latents were made from the records in {a}, the records read now are in {b}; "
               rf"\d record shard\(s\) the latents were made from are not among the records read now \(rewritten, "
               rf"replaced or removed\): {a}/s-00000\.array_record.*; \d record shard\(s\) read now were not encoded")
    with pytest.raises(LatentStoreError, match=refused + r".*: these latents are not the records' latents \(precompute "
                                                r"them into another --out\)"):
        _make_source(env, b, out)
    with pytest.raises(LatentStoreError, match=rf"{out}: " + refused + r".*: use another --out"):
        precompute(_config(b, env["tok"]), str(out), batch=4, log=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing lost
    c = shutil.copytree(a, tmp_path / "elsewhere" / "ds")
    next(_make_source(env, c, out))
    again = precompute(_config(c, env["tok"]), str(out), batch=4, log=None)
    assert again["images_written"] == 0 and again["images_skipped"] == first["images_written"]
    m = json.loads((out / MANIFEST_NAME).read_text())["datasets"]["ds"]
    assert m["complete"] and m["path"] and all(p.startswith(f"{c}{os.sep}") for p in m["path"])


def test_folder_without_records_sha256(env, tmp_path):
    """A latent folder written before records_sha256: training says how to add it; a precompute rerun on
    the record files it lists adds it (encoding nothing), on other record files it is refused."""
    import shutil

    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    shas = m["datasets"]["ds"].pop("records_sha256")
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(LatentStoreError, match=rf"dataset 'ds' was precomputed before latent folders recorded the "
                                               rf"sha256 of their records.*--out {out} again"):
        _source(env, vae_latents=str(out))
    other = _write_dataset(tmp_path / "ds", 3, 5, prefix="s", sizes=(SIDE,))
    with pytest.raises(LatentStoreError, match=rf"{out}: dataset 'ds' was precomputed from the records "
                                               rf"{env['data_dir']}/s-00000.*this config reads {other}/s-00000.*use another --out"):
        precompute(_config(other, env["tok"]), str(out), batch=4, log=None)
    logs = []
    stats = precompute(env["c_in"], str(out), batch=4, log=logs.append)
    assert stats["images_written"] == 0
    assert any("the latents' records sha256 recorded from" in line for line in logs)
    import hashlib

    ds = json.loads((out / MANIFEST_NAME).read_text())["datasets"]["ds"]
    assert ds["records_sha256"] == [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in ds["path"]] == shas
    next(_source(env, vae_latents=str(out)))


def test_broken_latent_shard_is_fatal_and_a_rerun_repairs_it(env, tmp_path):
    """A listed shard that is missing or truncated is a LatentStoreError naming the file (at the check, and
    when read after it), never counted bad samples; a precompute rerun re-encodes what it held."""
    import shutil

    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    shards = json.loads((out / MANIFEST_NAME).read_text())["datasets"]["ds"]["shards"]
    gone, cut = shards[0], shards[1]
    store = LatentStore(out)  # opened (and checked) before the shard went missing: fatal when read
    (out / gone["file"]).unlink()
    k = sorted(_keys(env["out"]))[0]
    with pytest.raises(LatentStoreError, match=rf"latent shard {gone['file']} of dataset 'ds' is missing: run "
                                               rf"python -m echo4o_jax.data.latents --config ... --out {out} again"):
        store.moments("ds", k.rsplit("#")[0], 0, (4, 4))
    with pytest.raises(LatentStoreError, match=rf"latent shard {gone['file']} of dataset 'ds' is missing"):
        _source(env, vae_latents=str(out))
    data = (out / cut["file"]).read_bytes()
    (out / cut["file"]).write_bytes(data[: len(data) // 2])
    (out / gone["file"]).write_bytes(b"")  # present again but empty
    with pytest.raises(LatentStoreError, match=rf"latent shard {gone['file']} of dataset 'ds' is 0 bytes, the "
                                               rf"manifest lists {gone['bytes']} \(truncated or rewritten\)"):
        _source(env, vae_latents=str(out))
    logs = []
    stats = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=logs.append)
    assert stats["images_written"] == gone["images"] + cut["images"]
    assert stats["images_skipped"] == env["stats"]["images_written"] - stats["images_written"]
    assert sum(f"latent shard {s['file']} is" in line and "encoded again" in line for line in logs for s in (gone, cut)) == 2
    assert (out / (cut["file"] + ".broken")).read_bytes() == data[: len(data) // 2]  # kept, out of the way
    _same_latents(out, env["out"])
    next(_source(env, vae_latents=str(out)))



def _overwrite_middle(path, n: int = 1000) -> bytes:
    """Overwrite `n` bytes in the middle of file `path` with 0xff (a float32 NaN), its size unchanged (the
    manifest's size check cannot see it); returns the file's new bytes."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid: mid + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    return bytes(data)


def test_corrupt_latent_shard_is_fatal_when_read_and_a_rerun_repairs_it(env, tmp_path):
    """Bytes changed inside a latent shard, its size unchanged: the check at training start (headers only)
    passes, reading a damaged latent is a LatentStoreError naming the shard and the key (old code: NaNs handed
    to training), the others read as stored; a precompute rerun with --verify reads every tensor, keeps the shard as
    .broken, re-encodes its images, and the latents equal an undamaged run's. A changed header (a checksum
    digit) is caught by the check, through the manifest's header checksum."""
    import shutil

    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    shards = json.loads((out / MANIFEST_NAME).read_text())["datasets"]["ds"]["shards"]
    bad = shards[0]
    data = _overwrite_middle(out / bad["file"])
    ref, now = SafetensorsFile(env["out"] / bad["file"]), SafetensorsFile(out / bad["file"])
    hit = [k for k in ref.keys() if now.get(k).tobytes() != ref.get(k).tobytes()]
    assert hit and np.isnan(now.get(hit[0])).any()  # the damage is in the data, not in the header
    store = LatentStore(out)
    m = store.manifest
    check = dict(fingerprint=m["vae_fingerprint"], z_channels=m["z_channels"], downsample=m["downsample"],
                 transforms={"ds": ImageTransform(*VAE_T)}, records={"ds": env["data_dir"]})
    store.check(**check)
    hw = (SIDE // 8, SIDE // 8)
    for k in ref.keys():
        rid, idx = k.rsplit("#", 1)
        if k not in hit:
            np.testing.assert_array_equal(store.moments("ds", rid, int(idx), hw), ref.get(k))
            continue
        with pytest.raises(LatentStoreError, match=rf"latents {out}: latent shard {bad['file']} of dataset 'ds' is "
                                                   rf"corrupt: tensor '{k}' reads with crc32 [0-9a-f]{{8}}, the shard "
                                                   rf"lists [0-9a-f]{{8}} .*: run python -m echo4o_jax.data.latents "
                                                   rf"--config \.\.\. --out {out} --verify again"):
            store.moments("ds", rid, int(idx), hw)
    logs = []
    # a plain rerun (resuming a killed run) reads headers only: hundreds of GB are not read again
    assert precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=None)["images_written"] == 0
    stats = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=logs.append, verify=True)
    assert stats["images_written"] == bad["images"]
    assert stats["images_skipped"] == env["stats"]["images_written"] - bad["images"]
    assert sum(f"latent shard {bad['file']} is corrupt: tensor '" in line and "encoded again" in line
               for line in logs) == 1
    assert (out / (bad["file"] + ".broken")).read_bytes() == data  # kept, out of the way
    _same_latents(out, env["out"])
    next(_source(env, vae_latents=str(out)))
    # a header changed in place (one tensor's checksum digits: still a valid header of the same size)
    shard = json.loads((out / MANIFEST_NAME).read_text())["datasets"]["ds"]["shards"][-1]
    f = SafetensorsFile(out / shard["file"])
    crc = json.loads(f.metadata["crc32"])[f.keys()[0]]
    raw = (out / shard["file"]).read_bytes()
    (out / shard["file"]).write_bytes(raw.replace(crc.encode(), f"{int(crc, 16) ^ 1:08x}".encode(), 1))
    with pytest.raises(LatentStoreError, match=rf"latent shard {shard['file']} of dataset 'ds' is corrupt: its "
                                               rf"header reads with crc32 [0-9a-f]{{8}}, the manifest lists "
                                               rf"{shard['header_crc32']}"):
        LatentStore(out).check(**check)


def test_latent_folder_written_before_checksums_is_read_unverified(env, tmp_path):
    """Shards without checksums (no "crc32" metadata, no "header_crc32" entry: written before they existed)
    are read as before, unverified; a precompute rerun keeps them, encodes nothing, and says so."""
    import shutil

    from echo4o_jax.safetensors_io import write_safetensors

    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    for s in m["datasets"]["ds"]["shards"]:
        f = SafetensorsFile(out / s["file"])
        write_safetensors(out / s["file"], [(k, f.read(k)) for k in f.keys()],
                          metadata={k: v for k, v in f.metadata.items() if k != "crc32"})
        del s["header_crc32"]
        s["bytes"] = (out / s["file"]).stat().st_size
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    _same_latents(out, env["out"])
    logs = []
    stats = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=logs.append)
    assert stats["images_written"] == 0 and stats["images_skipped"] == env["stats"]["images_written"]
    n = len(m["datasets"]["ds"]["shards"])
    assert any(f"ds: {n} latent shard(s) were written before shards carried checksums: kept and read "
               "unverified" in line for line in logs)
    next(_source(env, vae_latents=str(out)))

def test_latent_shard_headers_read_once_and_records_compared_once(env, tmp_path, monkeypatch):
    """Building the pipeline (the store's check) and reading its batches read each latent shard header once
    and compare the records once; a shard that breaks after the check is still fatal, naming it."""
    import shutil

    from echo4o_jax.data import latents

    headers = count_calls(monkeypatch, latents, "SafetensorsFile")
    compared = count_calls(monkeypatch, latents, "_records_mismatch")
    src = _source(env, vae_latents=str(env["out"]))
    next(src)
    next(src)
    shards = json.loads((env["out"] / MANIFEST_NAME).read_text())["datasets"]["ds"]["shards"]
    assert headers == collections.Counter(str(env["out"] / s["file"]) for s in shards)  # old code: twice each
    assert compared == {"ds": 1}
    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    store = LatentStore(out)
    m = store.manifest
    check = dict(fingerprint=m["vae_fingerprint"], z_channels=m["z_channels"], downsample=m["downsample"],
                 transforms={"ds": ImageTransform(*VAE_T)}, records={"ds": env["data_dir"]})
    store.check(**check)
    gone, cut = shards[0], shards[1]
    (out / gone["file"]).unlink()
    k = SafetensorsFile(env["out"] / gone["file"]).keys()[0]
    with pytest.raises(LatentStoreError, match=rf"latent shard {gone['file']} of dataset 'ds' is missing: run "
                                               rf"python -m echo4o_jax.data.latents --config ... --out {out} again"):
        store.moments("ds", k.rsplit("#")[0], 0, (4, 4))
    shutil.copy(env["out"] / gone["file"], out / gone["file"])
    store.check(**check)
    os.truncate(out / cut["file"], cut["bytes"] // 2)
    k = SafetensorsFile(env["out"] / cut["file"]).keys()[-1]  # its data is in the lost half
    with pytest.raises(LatentStoreError, match=rf"latent shard {cut['file']} of dataset 'ds' is {cut['bytes'] // 2} "
                                               rf"bytes, the manifest lists {cut['bytes']} \(truncated or rewritten\)"):
        store.moments("ds", k.rsplit("#")[0], int(k.rsplit("#")[1]), (SIDE // 8, SIDE // 8))


def test_precompute_rerun_compares_the_records_once(env, tmp_path, monkeypatch):
    """A precompute rerun (`_Writer.begin`) compares the records read now with the latents' once: records
    moved (same files elsewhere), records added, records of other shards (refused)."""
    import shutil

    from echo4o_jax.data import latents

    out = tmp_path / "lat"
    shutil.copytree(env["out"], out)
    moved = shutil.copytree(env["data_dir"], tmp_path / "moved" / "ds")
    m = json.loads((out / MANIFEST_NAME).read_text())
    w = latents._Writer(str(out), fingerprint=m["vae_fingerprint"], z_channels=m["z_channels"],
                        downsample=m["downsample"], dtype=m["dtype"], shard_bytes=1 << 20)
    compared = count_calls(monkeypatch, latents, "_records_mismatch")
    files = latents._record_files(moved)
    assert w.begin("ds", files, ImageTransform(*VAE_T)) == _keys(env["out"])
    assert compared == {"ds": 1} and w.ds["path"] == files and w.ds["complete"]  # old code: 2 calls
    _write_dataset(moved, 1, 8, prefix="late", sizes=(SIDE,), append=True)
    compared.clear()
    w.begin("ds", latents._record_files(moved), ImageTransform(*VAE_T))
    assert compared == {"ds": 1} and not w.ds["complete"] and len(w.ds["path"]) == len(files) + 1
    other = _write_dataset(tmp_path / "b" / "ds", 4, 22, prefix="s", sizes=(SIDE,))
    compared.clear()
    with pytest.raises(LatentStoreError, match=rf"{out}: dataset 'ds': .*record shard\(s\) the latents were made "
                                               rf"from are not among the records read now.*: use another --out"):
        w.begin("ds", latents._record_files(other), ImageTransform(*VAE_T))
    assert compared == {"ds": 1}


def test_fingerprint_mismatch(env):
    assert vae_fingerprint(env["tr_lat"].vae_state) == env["stats"]["vae_fingerprint"]  # the trainer's VAE is the CLI's
    other = jax.tree.map(lambda x: x, env["tr_in"].vae_state)
    other["encoder"]["conv_in"]["bias"] = other["encoder"]["conv_in"]["bias"] + 1e-3  # another VAE
    fp = vae_fingerprint(other)
    assert fp != env["stats"]["vae_fingerprint"]
    with pytest.raises(LatentStoreError, match=f"VAE fingerprint mismatch: .*{env['stats']['vae_fingerprint']}.*{fp}"):
        _source(env, fingerprint=fp, vae_latents=str(env["out"]))


def test_transform_mismatch(env):
    records = dict(env["c_in"].data.records)
    records["vae_transform"] = (48, 16, 16)
    with pytest.raises(LatentStoreError, match=r"VAE transform mismatch for dataset 'ds': stored "
                                               r"ImageTransform\(max_size=32.*the pipeline uses ImageTransform\(max_size=48"):
        _source(env, vae_latents=str(env["out"]), records=records)


def test_store_errors(env, tmp_path):
    with pytest.raises(LatentStoreError, match="is not a folder"):
        LatentStore(tmp_path / "nope")
    with pytest.raises(LatentStoreError, match=f"has no {MANIFEST_NAME}"):
        LatentStore(tmp_path)
    store = LatentStore(env["out"])
    m = store.manifest
    ok = dict(fingerprint=m["vae_fingerprint"], z_channels=m["z_channels"], downsample=m["downsample"],
              transforms={"ds": ImageTransform(*VAE_T)}, records={"ds": env["data_dir"]})
    store.check(**ok)
    with pytest.raises(LatentStoreError, match=f"z_channels mismatch: stored {m['z_channels']}, .* has {m['z_channels'] + 1}"):
        store.check(**{**ok, "z_channels": m["z_channels"] + 1})
    with pytest.raises(LatentStoreError, match="no latents for dataset 'other'"):
        store.check(**{**ok, "transforms": {"other": ImageTransform(*VAE_T)}, "records": {"other": env["data_dir"]}})
    k = sorted(_keys(env["out"]))[0]
    rid, idx = k.rsplit("#", 1)
    with pytest.raises(LatentStoreError, match=f"record '{rid}', image {idx}: stored moments are float32"):
        store.moments("ds", rid, int(idx), (3, 3))
    with pytest.raises(LatentStoreError, match="another --out|dtype='float32'"):
        precompute(env["c_in"], str(env["out"]), dtype="bfloat16", log=None)


def test_out_that_is_not_a_latents_folder_is_refused_and_left_alone(env, tmp_path):
    """A non-empty --out without latents (a mistyped path naming a checkpoint): refused before anything is
    written (its *.safetensors were deleted as leftovers of a killed run); an --out that cannot be made is
    named before the VAE is loaded; a full disk is one error naming the shard, keeping the shards written."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("ema.safetensors", "ae.safetensors", "config.json"):
        (ckpt / name).write_bytes(b"weights")
    with pytest.raises(LatentStoreError, match=rf"{ckpt} is not empty \(ae.safetensors, config.json, "
                                               rf"ema.safetensors\) and holds no latents \({MANIFEST_NAME}\)"):
        precompute(env["c_in"], str(ckpt), log=None)
    assert sorted(p.name for p in ckpt.iterdir()) == ["ae.safetensors", "config.json", "ema.safetensors"]
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(LatentStoreError, match=rf"--out {afile / 'lat'}: {afile} is a file, not a folder"):
        precompute(env["c_in"], str(afile / "lat"), log=None)

    out = tmp_path / "lat"
    real = latents_mod.write_safetensors
    calls = []

    def full_disk(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    latents_mod.write_safetensors = full_disk
    try:
        with pytest.raises(LatentStoreError, match=rf"cannot write the latents shard {out}/.*: No space left on "
                                                   "device; the shards finished so far are kept"):
            precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=None)
    finally:
        latents_mod.write_safetensors = real
    kept = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["file"] for ds in kept["datasets"].values() for s in ds["shards"]] == [os.path.basename(calls[0])]
    s = precompute(env["c_in"], str(out), batch=4, shard_bytes=12_000, log=None)  # the rerun goes on
    assert s["images_skipped"] > 0 and _keys(out) == _keys(env["out"])


def test_config_values_checked():
    c = base_config()
    c.model.vae_posterior = "median"
    with pytest.raises(ConfigValueError, match="model.vae_posterior='median': expected one of sample|mean"):
        validate_config(c)
    c = base_config()
    c.data.vae_latents = "/somewhere"
    with pytest.raises(ConfigValueError, match="data.vae_latents=.* needs data.kind='records'"):
        validate_config(c)
    with pytest.raises(ValueError, match="vae_posterior='median'"):
        make_loss_and_grads(None, None, None, patch=2, ce_weight=1.0, mse_weight=1.0, vae_posterior="median")


def test_train_command_reports_a_missing_latent_folder_in_one_line(env, capsys):
    from echo4o_jax.train.__main__ import run

    missing = env["root"] / "no_latents_here"
    assert run(_config(env["data_dir"], env["tok"], vae_latents=str(missing)), str(env["root"] / "wd_cli")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: precomputed latents: {missing} is not a folder (write it with python -m "
                   f"echo4o_jax.data.latents --config ... --out {missing})"]


# ---------------------------------------------------------------------------------------------- parts


def _same_latents(out, ref) -> None:
    assert _keys(out) == _keys(ref)
    a, b = LatentStore(out), LatentStore(ref)
    for k in _keys(ref):
        rid, idx = k.rsplit("#", 1)
        want = b._files("ds")[k].get(k)
        np.testing.assert_allclose(a.moments("ds", rid, int(idx), want.shape[:2]), want, atol=1e-5, err_msg=k)


def _cli(*args, devices: int = 1, env_extra: dict | None = None, wait: bool = True):
    """The latents CLI in a subprocess (`wait=False`: the Popen, output to pipes)."""
    import subprocess
    import sys

    env = {**xla_env(devices=devices), **(env_extra or {})}
    cmd = [sys.executable, "-m", "echo4o_jax.data.latents", *args]
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _config_file(env, path):
    """The env's in-step config as a config file for the CLI."""
    return config_file(path, env["c_in"])


def test_parts_on_several_devices_merge_into_the_single_run(env, tmp_path):
    """Part 0 of 2 here, part 1 by the CLI on 4 devices (batches split over them), then --merge: the same
    latents as the single run; before the merge the folder is not readable, a rerun of a part writes
    nothing and leaves the other part's files alone, and the layouts never mix."""
    out = tmp_path / "lat"
    kw = dict(batch=4, shard_bytes=12_000, log=None)
    s0 = precompute(env["c_in"], str(out), part=0, parts=2, **kw)
    assert 0 < s0["images_written"] < env["stats"]["images_written"]
    with pytest.raises(LatentStoreError, match=r"has no latents.json \(it holds 1 part manifest\(s\): merge them"):
        LatentStore(out)
    r = _cli("--out", str(out), "--merge")
    assert r.returncode == 2 and "error:" in r.stderr and "parts [1] of 2 have not written a manifest" in r.stderr
    r = _cli("--config", _config_file(env, tmp_path / "cfg.py"), "--out", str(out), "--parts", "2", "--part", "1", "--batch", "3",
             "--shard_mb", "0.0115", devices=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "encoding on 4 device(s) (cpu), batches of 4; part 1 of 2" in r.stdout  # --batch 3 rounded up
    assert "--merge" in r.stdout
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if "-part00001-of-00002-" in p.name}
    assert len(files) > 1
    again = precompute(env["c_in"], str(out), part=0, parts=2, **kw)
    assert again["images_written"] == 0 and again["images_skipped"] == s0["images_written"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if "-part00001-of-00002-" in p.name} == files
    r = _cli("--out", str(out), "--merge")
    assert r.returncode == 0, r.stderr[-3000:]
    m, single = (json.loads((d / MANIFEST_NAME).read_text()) for d in (out, env["out"]))
    assert m["parts"] == 2 and m["vae_fingerprint"] == single["vae_fingerprint"]
    for k in ("records", "images", "complete", "transform", "path"):
        assert m["datasets"]["ds"][k] == single["datasets"]["ds"][k], k
    _same_latents(out, env["out"])
    next(_source(env, vae_latents=str(out)))  # the pipeline reads the merged folder
    lost = next(s for s in m["datasets"]["ds"]["shards"] if "-part00000-of-00002-" in s["file"])
    (out / lost["file"]).unlink()  # a part's shard lost: that part's rerun and a merge repair the folder
    with pytest.raises(LatentStoreError, match=rf"{lost['file']} of dataset 'ds' is missing: run its part again "
                                               rf"\(.*--parts 2 --part 0\), then --merge"):
        _source(env, vae_latents=str(out))
    assert precompute(env["c_in"], str(out), part=0, parts=2, **kw)["images_written"] == lost["images"]
    merge_parts(str(out), log=None)
    _same_latents(out, env["out"])
    with pytest.raises(LatentStoreError, match=r"holds latents written in \[2\] parts"):
        precompute(env["c_in"], str(out), **kw)
    with pytest.raises(LatentStoreError, match="holds latents written in \\[2\\] parts, this run would write 3"):
        precompute(env["c_in"], str(out), part=0, parts=3, **kw)
    with pytest.raises(LatentStoreError, match="holds a single run's latents: --parts 2 needs another --out"):
        precompute(env["c_in"], str(env["out"]), part=1, parts=2, **kw)


def test_merge_refuses_parts_that_disagree(env, tmp_path):
    out = tmp_path / "lat"
    kw = dict(batch=4, log=None)
    precompute(env["c_in"], str(out), part=0, parts=2, **kw)
    precompute(env["c_in"], str(out), part=1, parts=2, **kw)
    name = "latents.part-00001-of-00002.json"
    m = json.loads((out / name).read_text())
    m["datasets"]["ds"]["complete"] = False
    (out / name).write_text(json.dumps(m))
    with pytest.raises(LatentStoreError, match=f"{name}: dataset 'ds' is incomplete: run part 1 again"):
        merge_parts(str(out), log=None)
    m["datasets"]["ds"].update(complete=True, transform="ImageTransform(max_size=999)")
    (out / name).write_text(json.dumps(m))
    with pytest.raises(LatentStoreError, match=f"{name}: dataset 'ds' has transform 'ImageTransform\\(max_size=999\\)'"):
        merge_parts(str(out), log=None)
    m["datasets"]["ds"].update(transform=json.loads((out / "latents.part-00000-of-00002.json").read_text())
                               ["datasets"]["ds"]["transform"], records_sha256=["0" * 64])
    (out / name).write_text(json.dumps(m))
    with pytest.raises(LatentStoreError, match=f"{name}: dataset 'ds' has records_sha256 \\['0000"):
        merge_parts(str(out), log=None)
    with pytest.raises(ValueError, match="part 2 of 2"):
        precompute(env["c_in"], str(out), part=2, parts=2, **kw)


def test_multi_process_launch_splits_and_merges(env, tmp_path):
    """The same CLI command on 2 jax.distributed processes (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, as on a GPU cluster): one part each, process 0 merges after both finished."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out, cfg = tmp_path / "lat", _config_file(env, tmp_path / "cfg.py")
    procs = [_cli("--config", cfg, "--out", str(out), "--batch", "4", wait=False,
                  env_extra=dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                 JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (so, se)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {se[-3000:]}"
        assert f"part {i} of 2" in so
    assert "merged 2 parts" in outs[0][0]
    assert json.loads((out / MANIFEST_NAME).read_text())["parts"] == 2
    _same_latents(out, env["out"])


# ---------------------------------------------------------------------------------------------- command line


def test_cli_reports_bad_input_in_one_line(env, tmp_path):
    """The CLI reports bad input as the train command does, one `error:` line and exit status 2, before
    anything is written (they were tracebacks): an unknown config key, flag values, a missing dataset, an
    incomplete dataset (refused as training refuses it), transforms too large for the model, an unreadable
    record."""
    from test_data_pipeline import _failed_dataset

    out = tmp_path / "lat"
    cfg = _config_file(env, tmp_path / "cfg.py")
    assert one_error_line(_cli("--config", cfg, "--out", str(out), "--config.data.bogus=1")) == (
        "error: unknown config key data.bogus")
    assert one_error_line(_cli("--config", cfg, "--out", str(out), "--batch", "0")) == "error: --batch=0: need at least 1"
    assert one_error_line(_cli("--config", cfg, "--out", str(out), "--parts", "2", "--part", "2")) == (
        "error: --part=2: parts are numbered 0 .. 1 (--parts=2)")

    def refused(c) -> str:
        return one_error_line(_cli("--config", config_file(tmp_path / "c.py", c), "--out", str(out)))

    assert refused(_config(tmp_path / "nope", env["tok"])) == (
        f"error: {tmp_path / 'nope'}: no such dataset, shard or glob match")
    part = _failed_dataset(tmp_path / "part")
    assert refused(_config(part, env["tok"])).startswith(
        f"error: dataset part: {part}/manifest.json says the dataset is incomplete (error: 2 samples failed")
    c = _config(env["data_dir"], env["tok"])
    c.data.records.vae_transform = (1024, 512, 16)
    assert refused(c) == ("error: bad config: data (records): dataset ds: VAE max_size 1024 exceeds the model's 8 "
                          "latent positions per side")
    assert not out.exists()
    bad = _write_dataset(tmp_path / "bad", 3, 5, prefix="s", sizes=(SIDE,))
    shard, index = corrupt_record(bad, 1)
    assert re.fullmatch(re.escape(f"error: {shard}: record {index}: cannot read (RuntimeError: ") + ".*hash mismatch.*",
                        refused(_config(bad, env["tok"])))


def test_cli_does_not_print_orbax_info_logs(env, tmp_path):
    """With an Orbax VAE (model.ckpt a converted folder or a training workdir) the CLI printed Orbax's INFO lines
    (`I1127 ... Restoring checkpoint ...`) on every run: absl logging is at WARNING, as in the train command."""
    from echo4o_jax.checkpoint import VAE_ITEM, save_pytree, write_model_config

    ckpt = tmp_path / "ckpt"  # a converted folder: model config + the VAE as an Orbax item
    write_model_config(ckpt, env["tr_in"].cfg, src_dir=DEFAULT_GOLDEN)
    save_pytree(ckpt / VAE_ITEM, env["tr_in"].vae_state)
    c = _config(env["data_dir"], env["tok"])
    c.model.ckpt = str(ckpt)
    r = _cli("--config", config_file(tmp_path / "c.py", c), "--out", str(tmp_path / "lat"), "--batch", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not re.search(r"^I\d{4} ", r.stderr, re.M), r.stderr[-3000:]
    _same_latents(tmp_path / "lat", env["out"])  # the same VAE as the env's (its safetensors)


def test_a_damaged_latents_manifest_is_a_latent_store_error(tmp_path):
    """latents.json that is not UTF-8, or not a JSON object: a UnicodeDecodeError / AttributeError traceback."""
    for content, why in ((b"\xff\xfe{}", "is not valid JSON"), (b"[1]", "is not a JSON object \\(got a list\\)")):
        (tmp_path / MANIFEST_NAME).write_bytes(content)
        with pytest.raises(LatentStoreError, match=rf"precomputed latents: .*{MANIFEST_NAME} {why}"):
            LatentStore(str(tmp_path))
