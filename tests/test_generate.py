"""The generation CLI and its code path: golden reproduction, end-to-end CLI, batch mode resume,
compilation counts, bad inputs."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import types

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import load_npz, npz_json, xla_env
from test_golden import assert_uint8_close, golden_max_context, max_err
from echo4o_jax import generate as G
from echo4o_jax import inference
from echo4o_jax.config import BagelConfig
from echo4o_jax.image_transform import ImageTransform

HUGE = 1 << 20


@pytest.fixture(scope="module")
def gen(golden_dir):
    g = G.Generator(golden_dir, max_context=golden_max_context(golden_dir, BagelConfig.from_checkpoint_dir(golden_dir),
                                                                text_bucket=G.TEXT_BUCKET))
    g.inf.vae_transform = ImageTransform(HUGE, 1, g.cfg.latent_downsample, HUGE)
    g.inf.vit_transform = ImageTransform(HUGE, 1, g.cfg.vit.patch_size, HUGE)
    return g


def _sizes(cfg):
    """The sizes the CLI / request tests use, read from the folder's config (bagel_tiny_a's in brackets): the
    latent stride `ds` (16), an output side of 2 latent tokens `side` (32: `size` [32, 32] as a request gives it,
    `hw` 32x32 as --size does), `other` output size of 2x3 latent tokens ([32, 48]), --vae-transform / --vit-transform
    flags (64 16 / 98 14: `vae`, `vit`, `vae_flags`, `vit_flags`) whose resizes fit the latent / ViT tables, and
    `und_hw` an input picture of 2x3 ViT patches (28x42)."""
    ds, p = cfg.latent_downsample, cfg.vit.patch_size
    side = 2 * ds
    vae = (min(cfg.max_latent_size, 4) * ds, ds)
    vit = (min(cfg.vit_max_num_patch_per_side, 7) * p, p)
    return types.SimpleNamespace(ds=ds, p=p, side=side, size=[side, side], hw=f"{side}x{side}", other=[side, 3 * ds],
                                 vae=vae, vit=vit, vae_flags=["--vae-transform", *map(str, vae)],
                                 vit_flags=["--vit-transform", *map(str, vit)], und_hw=(2 * p, 3 * p))


@pytest.fixture
def sz(golden_dir):  # (per test: its lists are a request's own)
    return _sizes(BagelConfig.from_checkpoint_dir(golden_dir))


def _golden_request(d):
    prompts = npz_json(d["prompt_ids_json"])
    images = [Image.fromarray(d[f"input_image_{k}"]) for k in range(sum(x == "image" for x in npz_json(d["input_order_json"])))]
    assert npz_json(d["input_order_json"])[-1] == "text"
    return prompts[-1], images, npz_json(d["kwargs_json"])


@pytest.mark.parametrize("case", ["t2i", "multiref"])
def test_generator_reproduces_golden(golden_dir, gen, case, monkeypatch):
    d = load_npz(golden_dir / f"{case}.npz")
    ids, images, kw = _golden_request(d)
    size = tuple(kw.pop("image_shapes")) if "image_shapes" in kw else None
    if images:  # recorded at the posterior mean (golden README), where the official default samples
        kw["vae_posterior"] = "mean"
    # the CLI draws the initial noise from the seed; feed the golden one through the same call
    noise = np.asarray(d["init_noise"])[None]

    def golden_noise(key, shape, *a, **k):
        assert tuple(shape) == noise.shape, (shape, noise.shape)  # the draw the sampler asks for, one image's
        return noise

    monkeypatch.setattr(jax.random, "normal", golden_noise)
    seen = []
    real = gen.inf.interleave_inference
    monkeypatch.setattr(gen.inf, "interleave_inference", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    out = gen.generate(prompt_ids=ids, images=images, size=size, seed=0, num_images=1, **kw)
    assert_uint8_close(out["images"][0], d["image_uint8"])
    # the latent and the decoded image too (test_golden's tolerances), not only the uint8 picture
    (res,) = seen
    assert max_err(np.asarray(res["latent"])[0], d["latent"]) <= 1e-3
    assert max_err(np.asarray(res["decoded"])[0], d["decoded"][0].transpose(1, 2, 0)) <= 5e-4


def test_generator_understanding_reproduces_golden(golden_dir, gen):
    d = load_npz(golden_dir / "understand.npz")
    ids, images, kw = _golden_request(d)
    out = gen.understand(prompt_ids=ids, images=images, max_new_tokens=kw["max_think_token_n"])
    assert [gen.cfg.special_tokens.bos_token_id, *out["answer_ids"]] == d["text_ids"].tolist()


def test_cli_end_to_end_writes_pngs(golden_dir, sz, tmp_path):
    rc = G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6,7,8", "--size", sz.hw, "--steps", "3",
                 "--num-images", "2", "--seed", "3", "--out", str(tmp_path / "one"), "--max-context", "128"])
    assert rc == 0
    pngs = sorted((tmp_path / "one").glob("*.png"))
    assert len(pngs) == 2 and all(np.asarray(Image.open(p)).shape == (sz.side, sz.side, 3) for p in pngs)
    rec = json.loads((tmp_path / "one" / "generation.json").read_text())
    assert rec["settings"]["num_timesteps"] == 3 and rec["settings"]["cfg_renorm_type"] == "global"

    # understanding through the CLI
    img = tmp_path / "in.png"
    Image.fromarray(np.full((*sz.und_hw, 3), 127, np.uint8)).save(img)
    rc = G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--understand",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "und"), "--max-context", "128",
                 *sz.vae_flags, *sz.vit_flags])
    assert rc == 0
    ans = json.loads((tmp_path / "und" / "answer.json").read_text())
    # what made the answer, as generation.json / metadata.jsonl keep it: weights, resizes, inputs by content
    assert "answer_ids" in ans and ans["prompt_ids"] == [5, 6] and ans["max_new_tokens"] == 3
    assert ans["ckpt"] == str(pathlib.Path(golden_dir).resolve()) and ans["images"] == [str(img.resolve())]
    assert ans["images_sha256"] == [hashlib.sha256(img.read_bytes()).hexdigest()]
    assert (ans["vae_transform"]["max_size"], ans["vit_transform"]["max_size"]) == (sz.vae[0], sz.vit[0])
    rc = G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--size", sz.hw,
                 "--steps", "2", "--out", str(tmp_path / "edit"), "--max-context", "128",
                 *sz.vae_flags, *sz.vit_flags])
    rec = json.loads((tmp_path / "edit" / "generation.json").read_text())
    assert rc == 0 and rec["images_sha256"] == ans["images_sha256"] and rec["images"] == ans["images"]
    assert (rec["vae_transform"], rec["vit_transform"], rec["num_images"]) == (ans["vae_transform"],
                                                                               ans["vit_transform"], 1)


def test_batch_mode_resumes_and_compiles_once_per_shape(golden_dir, gen, sz, tmp_path, monkeypatch):
    reqs = [dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=2),
            dict(id="b", prompt_ids=[4, 5, 6, 7, 8, 9, 10], size=sz.size, seed=1, num_images=2),
            dict(id="c", prompt_ids=[11], size=sz.size, seed=2, num_images=2)]
    fast = dict(num_timesteps=3)
    G.run_requests(gen, reqs[:1], tmp_path, overrides=fast, progress=False)
    n_vel = inference._guided_velocity._cache_size()
    n_txt = inference._append_text._cache_size()
    G.run_requests(gen, reqs[:2], tmp_path, overrides=fast, progress=False)  # "a" is skipped, "b" generated
    # a prompt of another length, same shape: no new compilation of the sampler nor of the text prefill
    assert inference._guided_velocity._cache_size() == n_vel
    assert inference._append_text._cache_size() == n_txt
    calls = []
    real = gen.generate_prepared
    monkeypatch.setattr(gen, "generate_prepared", lambda r: calls.append(r) or real(r))
    recs = G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)
    assert len(calls) == 1  # only "c" was left
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.glob("*_?.png")) == [f"{r}_{k}.png" for r in "abc" for k in range(2)]
    assert (tmp_path / "contact_sheet.png").exists()

    # the same requests batched in one sampler pass give the same pictures as one by one
    recs = G.run_requests(gen, reqs, tmp_path / "batched", overrides=fast, progress=False, batch_size=4)
    assert [r["batched_with"] for r in recs] == [3, 3, 3]
    for r in "abc":
        for k in range(2):
            assert_uint8_close(np.asarray(Image.open(tmp_path / "batched" / f"{r}_{k}.png")),
                               np.asarray(Image.open(tmp_path / f"{r}_{k}.png")))


def test_batch_reads_and_resizes_each_input_image_once(gen, tmp_path, monkeypatch):
    """run_requests checks every request (its images decoded) before the weights load, then generates from the
    checked requests, which hold the image paths, not pixels (memory stays bounded): per run, each request's
    input files are decoded for the check and at generation, and each decoded image is resized once (by the
    context building; the checks take the resized sizes from the sizes alone)."""
    from echo4o_jax.image_transform import ImageTransform as IT

    ds = gen.cfg.latent_downsample
    wide, tall = (5 * ds // 2, 3 * ds // 2), (3 * ds // 2, 5 * ds // 2)  # 40x24 / 24x40 for a stride of 16
    for name, (w, h) in [("p.png", wide), ("q.png", tall)]:
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / name)
    inputs = {str(tmp_path / "p.png"), str(tmp_path / "q.png")}
    opened, resized = [], []
    real_open, real_resize = Image.open, IT.resize

    def counting_open(fp, *a, **k):
        if isinstance(fp, (str, pathlib.Path)) and str(fp) in inputs:
            opened.append(pathlib.Path(fp).name)
        return real_open(fp, *a, **k)

    def counting_resize(self, img, *a, **k):
        resized.append(img.size)
        return real_resize(self, img, *a, **k)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(IT, "resize", counting_resize)
    reqs = [dict(id="a", prompt_ids=[1, 2], images=[str(tmp_path / "p.png")], seed=0),
            dict(id="b", prompt_ids=[3], images=[str(tmp_path / "p.png"), str(tmp_path / "q.png")], seed=1)]
    recs = G.run_requests(gen, reqs, tmp_path / "out", overrides=dict(num_timesteps=2), progress=False)
    # the last input's VAE-resized size (40x24 -> 32x32 for a stride of 16)
    assert [r["size"] for r in recs] == [[2 * ds, 2 * ds], [2 * ds, 2 * ds]]
    assert sorted(opened) == ["p.png"] * 4 + ["q.png"] * 2  # per request that names it: check, generation
    originals = [s for s in resized if s in (wide, tall)]
    assert sorted(originals) == [tall, wide, wide]
    # a resumed run (all finished) reads each image for its check only, and resizes none
    opened.clear(), resized.clear()
    G.run_requests(gen, reqs, tmp_path / "out", overrides=dict(num_timesteps=2), progress=False)
    assert sorted(opened) == ["p.png", "p.png", "q.png"] and resized == []


def test_crop_to_bbox_saves_the_content_as_the_official_benchmark_scripts(gen, sz, tmp_path, monkeypatch):
    """crop=True (eval.run's benchmarks: the official scripts' ``sample.crop(sample.getbbox())``) saves each image
    cut to its non-black pixels and records it; a rerun with the other choice is refused as generated otherwise,
    and a record older than the field is one made without cropping."""
    blank = np.zeros((4, 6, 3), np.uint8)
    np.testing.assert_array_equal(G.crop_to_bbox(blank), blank)  # all black: kept whole, as PIL's crop(None)
    real = gen.generate_prepared

    def bordered(r):  # black rows above, a black column on the right: what getbbox cuts
        res = real(r)
        imgs = [np.array(im) for im in res["images"]]
        for im in imgs:
            im[:3] = 0
            im[:, -1] = 0
        return {**res, "images": imgs}

    monkeypatch.setattr(gen, "generate_prepared", bordered)
    req = dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=1)
    fast = dict(num_timesteps=2)
    (rec,) = G.run_requests(gen, [req], tmp_path / "crop", overrides=fast, progress=False, crop=True)
    out = np.asarray(Image.open(tmp_path / "crop" / "a_0.png"))
    full = np.asarray(bordered(gen.check_request(req, fast))["images"][0])
    assert rec["crop_to_bbox"] is True and out.shape == (sz.side - 3, sz.side - 1, 3)
    box = Image.fromarray(full).getbbox()
    np.testing.assert_array_equal(out, full[box[1]:box[3], box[0]:box[2]])
    with pytest.raises(G.GenerateError, match=r"crop_to_bbox True -> False"):
        G.run_requests(gen, [req], tmp_path / "crop", overrides=fast, progress=False)
    (rec,) = G.run_requests(gen, [req], tmp_path / "plain", overrides=fast, progress=False)
    assert rec["crop_to_bbox"] is False
    assert np.asarray(Image.open(tmp_path / "plain" / "a_0.png")).shape == (sz.side, sz.side, 3)
    meta = tmp_path / "plain" / "metadata.jsonl"  # a record written before the field: made without cropping
    old = json.loads(meta.read_text())
    del old["crop_to_bbox"]
    meta.write_text(json.dumps(old) + "\n")
    monkeypatch.setattr(gen, "generate_prepared", lambda r: pytest.fail("a finished request generated again"))
    G.run_requests(gen, [req], tmp_path / "plain", overrides=fast, progress=False)
    with pytest.raises(G.GenerateError, match=r"crop_to_bbox False -> True"):
        G.run_requests(gen, [req], tmp_path / "plain", overrides=fast, progress=False, crop=True)


def test_check_sizes_and_batch_key_come_from_the_checked_request(gen, sz, tmp_path):
    # the checks' resized sizes equal the transforms' own (no pixel resampled for them)
    for t in [ImageTransform.vae_default(), ImageTransform.vit_default(), ImageTransform(64, 16, 16),
              ImageTransform(98, 14, 14), ImageTransform(500, 500, 16), ImageTransform(1024, 512, 16, 300 * 300)]:
        for size in [(40, 24), (24, 40), (1000, 300), (7, 513), (512, 512)]:
            assert G._resized_size(t, size) == t.resize(Image.new("RGB", size)).size, (t, size)
    over = dict(num_timesteps=3)
    a = gen.check_request(dict(prompt_ids=[1, 2], size=sz.size, seed=4), over)
    b = gen.check_request(dict(prompt_ids=[3], size=sz.size, seed=5, sampler={"cfg_renorm_min": 0.0}), over)
    c = gen.check_request(dict(prompt_ids=[3], size=sz.size, num_images=2), over)
    d = gen.check_request(dict(prompt_ids=[3], size=sz.size, sampler={"num_timesteps": 4}), over)
    e = gen.check_request(dict(prompt_ids=[3], images=[Image.new("RGB", (sz.side, sz.side))]), over)
    ds = gen.cfg.latent_downsample
    w, h = 5 * ds // 2, 3 * ds // 2  # 40x24 for a stride of 16: VAE-resized to 32x32
    Image.new("RGB", (w, h)).save(tmp_path / "p.png")
    f = gen.check_request(dict(prompt_ids=[3], images=[str(tmp_path / "p.png")]), over)
    assert f.images == [str(tmp_path / "p.png")] and f.shape == (2 * ds, 2 * ds)  # checked, no pixels held
    Image.new("RGB", (h, w)).save(tmp_path / "p.png")  # the file changes before the request's turn
    with pytest.raises(G.GenerateError, match=rf"p.png: {h}x{w} now, {w}x{h} when the request was checked"):
        gen.generate_prepared(f)
    keys = [G.Generator.batch_key(r) for r in (a, b, c, d, e)]
    assert keys[0] == keys[1] == ((sz.side, sz.side), 1, tuple(sorted(gen.sampler_settings(False, over).items())))
    assert len({keys[0], keys[2], keys[3]}) == 3 and keys[4] is None


class _Killed(BaseException):
    """Stands for the process being killed in the middle of a write."""


def _dying_save(monkeypatch):
    """Image.save writes the first 60 bytes of the PNG to its target, then the process 'dies'."""
    import io

    real = Image.Image.save

    def save(self, fp, format=None, **kw):
        buf = io.BytesIO()
        real(self, buf, format="PNG")
        if hasattr(fp, "write"):
            fp.write(buf.getvalue()[:60])
        else:
            with open(fp, "wb") as f:
                f.write(buf.getvalue()[:60])
        raise _Killed

    monkeypatch.setattr(Image.Image, "save", save)


def test_kill_mid_save_leaves_no_truncated_png(gen, sz, tmp_path, monkeypatch):
    req = dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=1)
    fast = dict(num_timesteps=3)
    with monkeypatch.context() as m:
        _dying_save(m)
        with pytest.raises(_Killed):
            G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no PNG under its name, no temporary left
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    before = (tmp_path / "a_0.png").read_bytes()
    # a kill while regenerating (other settings) keeps the previous picture whole
    with monkeypatch.context() as m:
        _dying_save(m)
        with pytest.raises(_Killed):
            G.run_requests(gen, [dict(req, seed=1)], tmp_path, overrides=fast, progress=False, regenerate=True)
    assert (tmp_path / "a_0.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_0.png", "contact_sheet.png", "metadata.jsonl"]


def test_resume_regenerates_truncated_png_and_cut_metadata(gen, sz, tmp_path, monkeypatch, capsys):
    reqs = [dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=2),
            dict(id="b", prompt_ids=[4, 5], size=sz.size, seed=1, num_images=1)]
    fast = dict(num_timesteps=3)
    G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)
    good = np.asarray(Image.open(tmp_path / "a_1.png"))
    # what a kill mid-write left behind before writes were atomic: a PNG cut short, a metadata line cut short
    (tmp_path / "a_1.png").write_bytes((tmp_path / "a_1.png").read_bytes()[:70])
    assert not G.image_complete(tmp_path / "a_1.png") and G.image_complete(tmp_path / "a_0.png")
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write('{"id": "b", "prompt": nu')
    calls = []  # "a" (2 images) and "b" (1 image) never share a sampler pass: one generate_prepared() call each
    real = gen.generate_prepared
    monkeypatch.setattr(gen, "generate_prepared", lambda r: calls.append(r.seed) or real(r))
    capsys.readouterr()
    recs = G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)
    err = capsys.readouterr().err
    assert calls == [0] and [r["id"] for r in recs] == ["a", "b"]  # only "a" (seed 0) generated again
    assert "a_1.png: exists but does not decode fully" in err and "last line is cut short" in err
    assert_uint8_close(np.asarray(Image.open(tmp_path / "a_1.png")), good)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "a"]
    # --regenerate / regenerate=True: the requests finished with other settings are generated again, those
    # finished with this run's settings are kept (so that an interrupted --regenerate run resumes)
    calls.clear()
    G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False, regenerate=True)
    assert calls == []
    G.run_requests(gen, [reqs[0], dict(reqs[1], seed=7)], tmp_path, overrides=fast, progress=False, regenerate=True)
    assert calls == [7]
    # a broken record that is not the last line is an error naming it
    (tmp_path / "metadata.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(G.GenerateError, match=r"metadata.jsonl:2: not JSON: .*; fix or remove that line"):
        G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)


def test_resume_refuses_a_finished_request_made_otherwise(golden_dir, gen, sz, tmp_path, monkeypatch, capsys):
    """metadata.jsonl records what made each finished request (checkpoint, prompt, seed, size, sampler ...);
    a request that asks for other pictures under the same id is refused, naming what differs, before anything
    is generated, instead of being skipped and its old images passed off as its own."""
    req = dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=1)
    fast = dict(num_timesteps=3)
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    meta = tmp_path / "metadata.jsonl"
    rec = json.loads(meta.read_text())
    assert (rec["ckpt"], rec["prompt_ids"], rec["seed"], rec["size"], rec["think"]) == (
        str(golden_dir.resolve()), [1, 2, 3], 0, sz.size, False)
    before = (tmp_path / "a_0.png").read_bytes()
    calls = []
    real = gen.generate_prepared
    monkeypatch.setattr(gen, "generate_prepared", lambda r: calls.append(r.seed) or real(r))
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)  # the same request: skipped
    assert calls == []
    for changed, over, what in [(dict(req, seed=1), fast, "seed 0 -> 1"),
                                (dict(req, prompt_ids=[1, 2, 4]), fast, "prompt_ids [1, 2, 3] -> [1, 2, 4]"),
                                (dict(req, size=sz.other), fast, f"size {sz.size} -> {sz.other}"),
                                (req, dict(num_timesteps=4), "settings.num_timesteps 3 -> 4")]:
        with pytest.raises(G.GenerateError, match=r"metadata.jsonl says 1 finished request\(s\) were generated "
                                                  r"otherwise, e.g. request 1 \(id=a\): .*" + re.escape(what)):
            G.run_requests(gen, [changed], tmp_path, overrides=over, progress=False)
    assert calls == [] and (tmp_path / "a_0.png").read_bytes() == before
    # another checkpoint's record, and a record of an older version that did not note the checkpoint
    meta.write_text(json.dumps({**rec, "ckpt": "/elsewhere/ckpt"}) + "\n")
    with pytest.raises(G.GenerateError, match=re.escape(f"ckpt '/elsewhere/ckpt' -> '{golden_dir.resolve()}'")):
        G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    meta.write_text(json.dumps({k: v for k, v in rec.items() if k != "ckpt"}) + "\n")
    with pytest.raises(G.GenerateError, match=r"ckpt \(not recorded\) -> .*--regenerate"):
        G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    # regenerate=True: generated again, and the new record makes the next run skip it
    G.run_requests(gen, [dict(req, seed=1)], tmp_path, overrides=fast, progress=False, regenerate=True)
    G.run_requests(gen, [dict(req, seed=1)], tmp_path, overrides=fast, progress=False)
    assert calls == [1]

    # the CLI: --regenerate reaches run_requests in batch mode, and is refused without --prompts
    seen = []
    monkeypatch.setattr(G, "run_requests", lambda *a, **kw: kw["counts"].update(generated=0)
                        or seen.append(kw["regenerate"]) or [])
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1], size=sz.size)])
    assert G.main(["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(tmp_path / "o"), "--regenerate"]) == 0
    assert seen == [True]
    capsys.readouterr()
    assert G.main(["--ckpt", str(golden_dir), "--prompt-ids", "1", "--regenerate"]) == 2
    assert capsys.readouterr().err.strip() == "error: --regenerate applies to --prompts (batch mode) only"


def test_editing_samples_the_vae_posterior_as_the_official(golden_dir, gen, sz, tmp_path, monkeypatch):
    """Reference images are VAE-encoded as the official inference does (its DiagonalGaussian samples the
    posterior): a draw from the request's seed (the same seed, the same pictures), unless vae_posterior=mean; the
    setting is recorded with editing requests and is not a setting of text-to-image."""
    d = load_npz(golden_dir / "multiref.npz")
    ids, images, _ = _golden_request(d)
    seen = []
    real = gen.inf.interleave_inference
    monkeypatch.setattr(gen.inf, "interleave_inference", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    run = lambda **kw: gen.generate(prompt_ids=ids, images=images, num_timesteps=3, **kw)["settings"]
    assert run(seed=0)["vae_posterior"] == "sample"
    assert run(seed=0)["vae_posterior"] == "sample"
    run(seed=1)
    assert run(seed=0, vae_posterior="mean")["vae_posterior"] == "mean"
    run(seed=1, vae_posterior="mean")
    lat = [np.asarray(r["latent"]) for r in seen]
    np.testing.assert_array_equal(lat[0], lat[1])  # reproducible from the seed
    assert max_err(lat[0], lat[3]) > 1e-4  # the posterior sample is not the mean
    # the seed draws the sampler's noise and the posterior: seed 1 against seed 0 differs beyond the noise's part
    assert max_err(lat[2] - lat[0], lat[4] - lat[3]) > 1e-4
    with pytest.raises(G.GenerateError,
                       match=r"vae_posterior \(--vae-posterior\) 'median': expected one of sample, mean"):
        run(seed=0, vae_posterior="median")
    # text-to-image: no VAE-encoded input, no such setting (eval.run's --gen-arg covers both kinds of benchmark)
    recs = G.run_requests(gen, [dict(id="t", prompt_ids=[1, 2], size=sz.size, sampler=dict(vae_posterior="mean"))],
                          tmp_path, overrides=dict(num_timesteps=2), progress=False)
    assert "vae_posterior" not in recs[0]["settings"]


def test_bad_inputs_give_clear_errors(golden_dir, gen, tmp_path):
    with pytest.raises(G.GenerateError, match="not found"):
        gen.generate(prompt_ids=[1], images=[tmp_path / "missing.png"])
    ds, m = gen.cfg.latent_downsample, gen.cfg.max_latent_size
    with pytest.raises(G.GenerateError, match=f"multiples of {ds}$"):
        gen.generate(prompt_ids=[1], size=(2 * ds - 2, 2 * ds))
    with pytest.raises(G.GenerateError, match="context tokens"):
        gen.generate(prompt_ids=[1] * gen.max_context, size=(2 * ds, 2 * ds))
    with pytest.raises(G.GenerateError, match="vocabulary"):
        gen.generate(prompt_ids=[10**6], size=(2 * ds, 2 * ds))
    with pytest.raises(G.GenerateError, match="position table"):  # one latent token over the table
        gen.generate(prompt_ids=[1], size=((m + 1) * ds, (m + 1) * ds))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(golden_dir / "llm_config.json", broken / "llm_config.json")
    with pytest.raises(G.GenerateError, match="incomplete or unreadable"):
        G.Generator(broken)
    assert G.main(["--ckpt", str(tmp_path / "nowhere"), "--prompt-ids", "1"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1]}\nnot json\n')
    with pytest.raises(G.GenerateError, match=r"bad.jsonl:2: not JSON: "):
        G.read_requests(bad)


_MESH_GEN = r"""
import sys, numpy as np
from echo4o_jax import generate as G
g = G.Generator(sys.argv[1], max_context=128, mesh=(1, 2, 2))
leaves = [x for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(g.model))]
n_sharded = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in leaves)
out = g.generate(prompt_ids=[5, 6, 7], size=(int(sys.argv[3]),) * 2, seed=1, num_images=1, num_timesteps=3)
np.save(sys.argv[2], out["images"][0])
print(n_sharded)
"""


@pytest.mark.slow
def test_generation_with_params_sharded_over_a_mesh(golden_dir, gen, sz, tmp_path):
    import subprocess
    import sys

    env = xla_env(devices=4)
    r = subprocess.run([sys.executable, "-c", _MESH_GEN, str(golden_dir), str(tmp_path / "img.npy"), str(sz.side)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1]) > 0  # parameters really are sharded
    ref = G.Generator(golden_dir, max_context=128).generate(prompt_ids=[5, 6, 7], size=(sz.side, sz.side), seed=1,
                                                            num_images=1, num_timesteps=3)["images"][0]
    assert_uint8_close(np.load(tmp_path / "img.npy"), ref)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_duplicate_request_ids_are_refused(golden_dir, gen, sz, tmp_path):
    # the audit's file: two lines with id "a" (64x64, then 32x32) used to leave one a_0.png and two records
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1, 2], size=[2 * sz.side, 2 * sz.side]),
                                               dict(id="b", prompt_ids=[3]),
                                               dict(id="a", prompt_ids=[4, 5], size=sz.size)])
    with pytest.raises(G.GenerateError, match=r"reqs.jsonl:3: id 'a' is already used by .*reqs.jsonl:1\b"):
        G.read_requests(f)
    # a default id (the line number) clashing with an explicit one
    f = _write_jsonl(tmp_path / "reqs2.jsonl", [dict(id="00002", prompt_ids=[1]), dict(prompt_ids=[2])])
    with pytest.raises(G.GenerateError, match=r"reqs2.jsonl:2: id '00002' is already used by .*reqs2.jsonl:1"):
        G.read_requests(f)
    # ids name files: no path separators
    f = _write_jsonl(tmp_path / "reqs3.jsonl", [dict(id="../x", prompt_ids=[1])])
    with pytest.raises(G.GenerateError, match=r"reqs3.jsonl:1: id '../x' cannot name a file"):
        G.read_requests(f)
    # the API (eval's generate_batch) too: nothing generated, nothing written
    reqs = [dict(id="a", prompt_ids=[1], size=sz.size), dict(id="a", prompt_ids=[2], size=sz.size)]
    with pytest.raises(G.GenerateError, match=r"request 2: id 'a' is already used by request 1"):
        G.run_requests(gen, reqs, tmp_path / "out", progress=False)
    with pytest.raises(G.GenerateError, match=r"request 1: id 'a\\ud800' cannot name a file .*lone surrogate"):
        G.run_requests(gen, [dict(id="a\ud800", prompt_ids=[1], size=sz.size)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_request_file_fails_before_the_weights_load(golden_dir, sz, tmp_path, monkeypatch, capsys):
    """Per-request errors name FILE:LINE (id=...); every request is checked before the weights load and
    before --out is created; relative image paths are read from the JSONL file's folder."""
    monkeypatch.setattr(G, "_GENERATORS", {})

    def no_weights(self):
        raise AssertionError("the weights were loaded for an invalid file")

    monkeypatch.setattr(G.Generator, "load_weights", no_weights)
    monkeypatch.chdir(tmp_path)  # relative image paths must not be read from here
    pix = (sz.side, sz.side, 3)
    Image.fromarray(np.full(pix, 200, np.uint8)).save(tmp_path / "ref.png")  # the CWD's, not the file's
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.fromarray(np.full(pix, 90, np.uint8)).save(sub / "here.png")
    good = [dict(id="a", prompt_ids=[1, 2], size=sz.size), dict(id="e", prompt_ids=[1], images=["here.png"])]
    out = tmp_path / "out"
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    side = cfg.max_latent_size * cfg.latent_downsample  # the largest output the latent position table allows
    cases = [
        (dict(id="b", prompt_ids=[3], size="huge"), r"sub/reqs.jsonl:3 \(id=b\): size 'huge': expected HxW"),
        (dict(id="c", prompt_ids=[3], images=["ref.png"]),
         r"sub/reqs.jsonl:3 \(id=c\): input image not found: /.*/sub/ref.png"),
        (dict(id="d", prompt_ids=[3], size=[side + 384, side + 384]),  # 512x512 for bagel_tiny_a
         rf"sub/reqs.jsonl:3 \(id=d\): output size {side + 384}x{side + 384} exceeds the model's position table.*"
         rf"at most {side}x{side}"),
        (dict(prompt_ids=[3], num_images=0), r"sub/reqs.jsonl:3 \(id=00003\): num_images 0: must be at least 1"),
        (dict(id="f", prompt_ids=[3], sampler={"steps": 3}), r"sub/reqs.jsonl:3 \(id=f\): unknown sampler setting"),
        # jax.random.key keeps a seed's low 32 bits: 2**32 + 3 would make seed 3's images under another name
        (dict(id="g", prompt_ids=[3], seed=2**32 + 3), rf"\(id=g\): seed {2**32 + 3}: must be below {2**32}"),
        (dict(id="h", prompt_ids=[3], seed=-1), r"\(id=h\): seed -1: must be at least 0"),
        (dict(id="i", prompt_ids=[3], size=[32.9, 32]), r"\(id=i\): size \[32.9, 32\]: expected \[height, width\] "
                                                         r"\(two integers\)"),
        (dict(id="j", prompt_ids=[3], size=["32", "32"]), r"\(id=j\): size \['32', '32'\]: expected"),
    ]
    for bad, msg in cases:
        f = _write_jsonl(sub / "reqs.jsonl", [good[0], good[1], bad])
        capsys.readouterr()
        assert G.main(["--ckpt", str(golden_dir), "--prompts", "sub/reqs.jsonl", "--out", str(out),
                       *sz.vae_flags, *sz.vit_flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(msg, err[0]), (msg, err[0])
        assert not out.exists()
    # the good lines pass every check (here.png read from the file's folder) without the weights
    reqs = G.read_requests(f)
    assert reqs[1]["images"] == [str(sub / "here.png")] == G.read_requests("sub/reqs.jsonl")[1]["images"]
    lazy = G.get_generator(golden_dir, vae_transform=sz.vae, vit_transform=sz.vit)
    for r in reqs[:2]:
        lazy.check_request(r)
    assert lazy.inf is None
    # per-request flags would be ignored in batch mode: refused
    assert G.main(["--ckpt", str(golden_dir), "--prompts", str(f), "--size", sz.hw, "--out", str(out)]) == 2
    assert "--size would be ignored" in capsys.readouterr().err and not out.exists()


def test_default_size_is_checked_like_an_explicit_one(golden_dir, gen, tmp_path, capsys):
    m, ds = gen.cfg.max_latent_size, gen.cfg.latent_downsample
    if m * ds >= 1024:  # (a golden folder with a large latent table) the default fits and is accepted
        gen.check(prompt_ids=[1, 2])
        return
    with pytest.raises(G.GenerateError, match=rf"output size 1024x1024 \(the default; no size given\) exceeds the "
                                              rf"model's position table \({m} x {ds} = {m * ds} px per side\); give a "
                                              rf"size of at most {m * ds}x{m * ds} \(--size HxW"):
        gen.generate(prompt_ids=[1, 2])
    out = tmp_path / "o"
    capsys.readouterr()
    assert G.main(["--ckpt", str(golden_dir), "--prompt-ids", "1,2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output size 1024x1024 (the default") and "--size" in err
    assert "Traceback" not in err and not out.exists()


def test_understanding_checks_only_what_it_feeds(golden_dir, gen, tmp_path, capsys, monkeypatch):
    # the VAE resize (official 1024/512: 512x512 here) is over a tiny model's latent table, but understanding
    # feeds the ViT only (of the VAE-resized image: 98x98 with --vit-transform 98 14, at most the ViT table's side)
    c = gen.cfg
    p, vit_max = c.vit.patch_size, c.vit_max_num_patch_per_side
    vit_side = vit_max * p
    small = min(vit_max, 7) * p
    img = tmp_path / "red.png"
    Image.fromarray(np.full((64, 64, 3), (200, 0, 0), np.uint8)).save(img)
    capsys.readouterr()
    rc = G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--understand",
                 "--max-new-tokens", "2", "--max-context", "128", "--vit-transform", str(small), str(p),
                 "--out", str(tmp_path / "und")])
    assert rc == 0, capsys.readouterr().err
    assert "answer_ids" in json.loads((tmp_path / "und" / "answer.json").read_text())
    # ... and the ViT is still checked (its own flag named): the default ViT resize of the 512x512 image is 518x518
    # (a ViT table of 37 patches per side or more would hold it: then a resize one patch over the table)
    over = [] if 518 // p > vit_max else ["--vit-transform", str(vit_side + p), str(vit_side + p)]
    assert G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--understand",
                   *over, "--out", str(tmp_path / "und2")]) == 2
    err = capsys.readouterr().err
    want = (rf"error: input image 0 ViT-resized \d+x\d+ \(from 64x64\) exceeds .*{vit_max} x {p} = {vit_side} px"
            r".*--vit-transform")
    assert re.search(want, err), err
    assert not (tmp_path / "und2").exists()
    # generating from it instead: every size over the model's tables in one error (they came one at a time)
    assert G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--vit-transform",
                   str(vit_side + p), str(vit_side + p), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for what in ("input image 0 VAE-resized", "input image 0 ViT-resized", "output size"):
        assert err.count(f"{what} ") == 1, (what, err)
    # two input images, the second over the tables: it is the one named
    big = tmp_path / "big.png"
    Image.fromarray(np.full((8, 4 * vit_side, 3), 9, np.uint8)).save(big)
    assert G.main(["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--image", str(img), "--image", str(big),
                   "--vae-transform", "1024", str(c.latent_downsample), "--vit-transform", str(small), str(p),
                   "--out", str(tmp_path / "gen2")]) == 2
    err = capsys.readouterr().err
    assert "input image 1 " in err and "input image 0 " not in err and f"(from {4 * vit_side}x8)" in err, err
    # the context count leaves out the VAE tokens understanding never adds, and counts what the context building
    # adds: an image (its ViT tokens; its VAE tokens when generating), the prompt (3 ids + bos / eos, room for a
    # text bucket), the generated tokens one by one. The picture: the largest side <= 6 latent tokens whose ViT
    # grid fits the ViT table.
    ds, M, bucket = c.latent_downsample, gen.max_context, G.TEXT_BUCKET
    k = min(6, c.max_latent_size)
    while k > 1 and round(k * ds / p) > vit_max:
        k -= 1
    side = k * ds
    n_vae = k * k + 2
    n_vit = round(side / p) ** 2 + 2  # the ViT resize: the nearest multiple of the patch size
    pic = Image.fromarray(np.full((side, side, 3), 60, np.uint8))
    new_tokens = M - n_vit - 5  # the most that fit
    assert n_vit + bucket <= M
    res = gen.understand(prompt_ids=[5, 6, 7], images=[pic], max_new_tokens=new_tokens)
    assert len(res["answer_ids"]) <= new_tokens
    with pytest.raises(G.GenerateError, match=f"need about {M + 1} context tokens"):
        gen.understand(prompt_ids=[5, 6, 7], images=[pic], max_new_tokens=new_tokens + 1)
    # generation does feed the VAE image
    with monkeypatch.context() as m:
        m.setattr(gen, "max_context", n_vae + n_vit + bucket - 1)  # (n_vit + bucket without the VAE tokens)
        with pytest.raises(G.GenerateError, match=f"need about {n_vae + n_vit + bucket} context tokens"):
            gen.check(prompt_ids=[5], images=[pic], size=(2 * ds, 2 * ds))


# ------------------------------------------------------------------------------------- audit fixes


@pytest.fixture
def no_weights(monkeypatch):
    """Generators made afresh, whose weights must not load: what is tested fails before."""
    monkeypatch.setattr(G, "_GENERATORS", {})

    def refuse(self):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(G.Generator, "load_weights", refuse)


def _one_error(capsys, argv, status=2):
    capsys.readouterr()
    assert G.main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def workdir(gen, tmp_path_factory):
    """A training workdir holding the golden weights as its step-4 checkpoint."""
    from flax import nnx

    from echo4o_jax import checkpoint as ck

    d = tmp_path_factory.mktemp("workdir")
    ck.write_model_config(d / "model_config", gen.cfg, src_dir=gen.ckpt)
    ck.save_vae(d / "vae", gen.vae)
    ck.save_pytree(d / "checkpoints" / "4" / "ema", nnx.to_pure_dict(nnx.state(gen.model)))
    return d


def test_checkpoint_given_relative_to_the_working_directory(workdir, sz, tmp_path, monkeypatch):
    """`--ckpt runs/echo4o` as the README writes it: Orbax (tensorstore) refuses relative checkpoint paths, so the
    loaders make every path absolute (a relative workdir used to end in a traceback)."""
    monkeypatch.setattr(G, "_GENERATORS", {})
    monkeypatch.chdir(workdir.parent)
    out = tmp_path / "rel"
    assert G.main(["--ckpt", workdir.name, "--prompt-ids", "1,2", "--size", sz.hw, "--steps", "2",
                   "--max-context", "128", "--out", str(out)]) == 0
    rec = json.loads((out / "generation.json").read_text())
    assert (rec["ckpt"], rec["ckpt_step"]) == (str(workdir.resolve()), 4)
    assert G.checkpoint_identity(workdir.name) == G.checkpoint_identity(workdir)


def test_workdir_step_is_recorded_and_a_newer_step_is_refused(golden_dir, workdir, sz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "_GENERATORS", {})
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1, 2], size=sz.size)])
    out = tmp_path / "out"
    argv = ["--ckpt", str(workdir), "--prompts", str(f), "--out", str(out), "--steps", "2", "--max-context", "128"]
    assert G.main(argv) == 0
    rec = json.loads((out / "metadata.jsonl").read_text())
    assert (rec["ckpt"], rec["ckpt_step"]) == (str(workdir.resolve()), 4)
    assert set(rec["ckpt_weights"]) == {"checkpoints/4/ema/_METADATA", "vae/_METADATA"}
    shutil.copytree(workdir / "checkpoints" / "4", workdir / "checkpoints" / "6")  # the training went on
    try:
        err = _one_error(capsys, argv)
        assert "reqs.jsonl:1 (id=a): " in err and "ckpt_step 4 -> 6" in err and "--regenerate" in err, err
        assert G.main(argv + ["--step", "4"]) == 0  # the step the images were made with: resumed
        err = _one_error(capsys, argv + ["--step", "5"])
        assert err == f"error: --step: {workdir}: no checkpoint for step 5 (available: [4, 6])", err
        # single mode records the step too
        assert G.main(["--ckpt", str(workdir), "--prompt-ids", "1,2", "--size", sz.hw, "--steps", "2",
                       "--max-context", "128", "--out", str(tmp_path / "one")]) == 0
        assert json.loads((tmp_path / "one" / "generation.json").read_text())["ckpt_step"] == 6
    finally:
        shutil.rmtree(workdir / "checkpoints" / "6")
    # --step is a flag of its own (no prefix match for --steps), refused for a folder that is not a workdir
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompt-ids", "1", "--step", "4", "--out", str(tmp_path / "o")])
    assert err.startswith(f"error: --step 4: {golden_dir} is not a training workdir"), err
    with pytest.raises(SystemExit):
        G.build_parser().parse_args(["--step", "4", "--num-imag", "2"])
    ident = G.checkpoint_identity(golden_dir)
    st = (golden_dir / "ema.safetensors").stat()
    assert ident["ckpt_step"] is None and ident["ckpt_weights"]["ema.safetensors"] == [st.st_size, st.st_mtime_ns]


def test_bad_values_in_a_request_file_are_refused_up_front(golden_dir, sz, tmp_path, no_weights, capsys):
    """Sampler values, unknown keys, empty prompts, prompt and prompt_ids both, ids too long for a file name,
    max_new_tokens without think: FILE:LINE (id=...) before the weights load, --out not created."""
    out = tmp_path / "out"
    good = dict(id="a", prompt_ids=[1, 2], size=sz.size)
    cases = [
        (dict(id="b", prompt_ids=[3], sampler={"cfg_renorm_type": "bogus"}),
         r"reqs.jsonl:2 \(id=b\): cfg_renorm_type \(--cfg-renorm-type\) 'bogus': expected one of global, channel, "
         r"text_channel$"),
        (dict(id="b", prompt_ids=[3], sampler={"num_timesteps": "3"}),
         r"reqs.jsonl:2 \(id=b\): num_timesteps \(--steps\) '3': expected an integer$"),
        (dict(id="b", prompt_ids=[3], sampler={"num_timesteps": 1}),
         r"reqs.jsonl:2 \(id=b\): num_timesteps \(--steps\) 1: must be at least 2$"),
        (dict(id="b", prompt_ids=[3], sampler={"cfg_interval": [0.6, 0.2]}),
         r"\(id=b\): cfg_interval \(--cfg-interval\) \[0.6, 0.2\]: expected 0 <= low <= high <= 1$"),
        (dict(id="b", prompt_ids=[3], sampler={"timestep_shift": 0}),
         r"\(id=b\): timestep_shift \(--timestep-shift\) 0: must be positive$"),
        (dict(id="b", prompt_ids=[3], sampler={"cfg_text_scale": "4"}),
         r"\(id=b\): cfg_text_scale \(--cfg-text-scale\) '4': expected a finite number$"),
        (dict(id="b", prompt_ids=[3], sampler={"cfg_renorm_min": 2}),
         r"\(id=b\): cfg_renorm_min \(--cfg-renorm-min\) 2: must be between 0 and 1$"),
        (dict(id="b", prompt_ids=[3], sede=4),
         r"reqs.jsonl:2 \(id=b\): unknown request key 'sede'; known: id, prompt, prompt_ids, images, size, seed, "
         r"num_images, think, max_new_tokens, sampler$"),
        (dict(id="b", prompt=""), r"reqs.jsonl:2 \(id=b\): prompt '' is empty"),
        (dict(id="b", prompt_ids=[]), r"reqs.jsonl:2 \(id=b\): prompt_ids is empty"),
        (dict(id="b", prompt="a cat", prompt_ids=[3]), r"reqs.jsonl:2 \(id=b\): both a prompt and prompt ids given"),
        (dict(id="x" * 300, prompt_ids=[3]), r"reqs.jsonl:2: id 'x{37}\.\.\.' cannot name a file .*at most 200 bytes"),
        (dict(id="b", prompt_ids=[3], max_new_tokens=5), r"\(id=b\): max_new_tokens applies to think requests only"),
        # JSON's "\ud800" (a lone surrogate) and "\u0000": tracebacks (UnicodeEncodeError, embedded null byte)
        (dict(id="b\ud800", prompt_ids=[3]), r"reqs.jsonl:2: not valid Unicode: a lone surrogate escape"),
        (dict(id="b", prompt_ids=[3], images=["x\ud800.png"]), r"reqs.jsonl:2: not valid Unicode"),
        (dict(id="b", prompt_ids=[3], images=["\u0000x.png"]),
         r"reqs.jsonl:2 \(id=b\): image path '\\x00x.png' holds a NUL or a lone surrogate"),
    ]
    for bad, msg in cases:
        f = _write_jsonl(tmp_path / "reqs.jsonl", [good, bad])
        err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(out)])
        assert re.search(msg, err), (msg, err)
        assert not out.exists()


def test_bad_flags_are_refused_before_the_weights_load(golden_dir, sz, tmp_path, no_weights, capsys):
    img = tmp_path / "in.png"
    Image.fromarray(np.full((sz.side, sz.side, 3), 9, np.uint8)).save(img)
    (tmp_path / "afile").write_text("x")
    base = ["--ckpt", str(golden_dir), "--prompt-ids", "1,2", "--size", sz.hw]
    und = ["--ckpt", str(golden_dir), "--prompt-ids", "1,2", "--image", str(img), "--understand"]
    cases = [
        (base + ["--steps", "-1"], "error: num_timesteps (--steps) -1: must be at least 2"),
        (base + ["--steps", "1"], "error: num_timesteps (--steps) 1: must be at least 2"),
        (base + ["--steps", "0"], "error: num_timesteps (--steps) 0: must be at least 2"),
        (["--ckpt", str(img), "--prompt-ids", "1"], f"error: checkpoint {img} is a file: --ckpt takes a checkpoint"),
        (base + ["--out", str(tmp_path / "afile")], f"error: --out {tmp_path / 'afile'}: exists and is not a folder"),
        (base + ["--out", str(tmp_path / "afile" / "sub")],
         f"error: --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder"),
        (["--ckpt", str(golden_dir), "--prompts", str(img), "--out", str(tmp_path / "afile")],
         f"error: --out {tmp_path / 'afile'}: exists and is not a folder"),
        (und + ["--size", sz.hw, "--seed", "3", "--steps", "4", "--cfg-text-scale", "2"],
         "error: --size, --seed, --cfg-text-scale, --steps would be ignored by --understand"),
        (und + ["--num-images", "2"], "error: --num-images would be ignored by --understand"),
        (base + ["--max-new-tokens", "9"], "error: --max-new-tokens would be ignored without --think or --understand"),
        (base + ["--vae-posterior", "mean"], "error: --vae-posterior would be ignored without --image"),
        (und + ["--vae-posterior", "mean"], "error: --vae-posterior would be ignored by --understand"),
        (["--ckpt", str(golden_dir), "--prompt", "a cat", "--prompt-ids", "5,6,7", "--size", sz.hw],
         "error: both a prompt and prompt ids given"),
        (["--ckpt", str(golden_dir), "--prompt", "", "--size", sz.hw], "error: prompt '' is empty"),
        (["--ckpt", str(golden_dir), "--prompt", "   ", "--image", str(img), "--understand"],
         "error: prompt '   ' is empty"),
        (base + ["--vae-transform", "64", "200"], "error: --vae-transform 64 200: expected MAX MIN with 0 < MIN <= MAX"),
        # a folder without tokenizer files (the golden one): which flag takes token ids
        (["--ckpt", str(golden_dir), "--prompt", "a cat", "--size", sz.hw],
         f"error: {golden_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): give token ids "
         "instead of text (--prompt-ids 1,2,3"),
    ]
    for argv, start in cases:
        err = _one_error(capsys, argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]))
        assert err.startswith(start), (start, err)
    assert not (tmp_path / "o").exists()
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1], size=sz.size)])
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f), "--overwrite", "--out", str(tmp_path / "o")])
    assert err.startswith("error: --overwrite applies to single mode"), err
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f), "--max-new-tokens", "9",
                              "--out", str(tmp_path / "o")])
    assert err.startswith("error: --max-new-tokens would be ignored: no request of"), err


def test_single_mode_refuses_an_earlier_generation_unless_overwrite(golden_dir, sz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "_GENERATORS", {})
    out = tmp_path / "out"
    run = ["--ckpt", str(golden_dir), "--size", sz.hw, "--steps", "2", "--seed", "5", "--max-context", "128",
           "--out", str(out)]
    assert G.main(run + ["--prompt-ids", "1,2", "--num-images", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["generation.json", "image_seed5_0.png", "image_seed5_1.png", "notes.txt"]
    err = _one_error(capsys, run + ["--prompt-ids", "3"])
    assert err == (f"error: --out {out} holds an earlier generation (generation.json, image_seed5_0.png, "
                   "image_seed5_1.png): use another --out, or --overwrite to replace it"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert G.main(run + ["--prompt-ids", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "image_seed5_0.png", "notes.txt"]
    rec = json.loads((out / "generation.json").read_text())
    assert rec["prompt_ids"] == [3] and rec["outputs"] == ["image_seed5_0.png"] and rec["ckpt_step"] is None
    # a full disk while writing the record (after the image): one error line naming it; --out as it was (the
    # earlier generation whole, no empty generation.json, no temporary file)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_fsync, fsyncs = os.fsync, []

    def fsync(fd):
        fsyncs.append(fd)
        if len(fsyncs) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        err = _one_error(capsys, run + ["--prompt-ids", "4", "--overwrite"])
    assert err == (f"error: cannot write {out / 'generation.json'}: No space left on device; nothing of this run was "
                   f"written ({out} holds what it held before): rerun the same command once it can be written"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a batch folder is not single mode's to replace
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "metadata.jsonl").write_text("")
    err = _one_error(capsys, run[:-1] + [str(tmp_path / "batch"), "--prompt-ids", "3", "--overwrite"])
    assert err.endswith("holds a batch run (metadata.jsonl): use another --out"), err
    # and a single-mode folder is not a batch run's to resume in
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1], size=sz.size)])
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(out)])
    assert err == f"error: --out {out} holds a single-mode generation (generation.json): use another --out for a " \
                  "batch run", err


def test_batch_resumes_from_another_directory_with_its_contact_sheet(golden_dir, sz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "_GENERATORS", {})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((sz.side, sz.side, 3), 90, np.uint8)).save(tmp_path / "ref.png")
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="x", prompt_ids=[1, 2], images=["ref.png"]),
                                               dict(id="y", prompt_ids=[3], size=sz.size, num_images=2)])
    flags = ["--ckpt", str(golden_dir), "--steps", "2", "--max-context", "256", *sz.vae_flags, *sz.vit_flags]
    monkeypatch.chdir(tmp_path / "a")
    capsys.readouterr()
    assert G.main(flags + ["--prompts", "../reqs.jsonl", "--out", "out"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": 2 generated")
    out = tmp_path / "a" / "out"
    recs = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["outputs"] for r in recs] == [["x_0.png"], ["y_0.png", "y_1.png"]]  # relative to --out
    assert recs[0]["images"] == [str(tmp_path / "ref.png")] and len(recs[0]["images_sha256"][0]) == 64
    # a record of an older version: outputs relative to its working directory
    recs[1]["outputs"] = ["out/y_0.png", "out/y_1.png"]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (out / "contact_sheet.png").unlink()
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setattr(G.Generator, "load_weights", lambda self: pytest.fail("nothing is left to generate"))
    assert G.main(flags + ["--prompts", str(f), "--out", str(out)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith(": 0 generated, 2 already finished")  # (not read as a run)
    assert Image.open(out / "contact_sheet.png").size == (3 * 256, 256)  # every image, also the older record's


def test_resume_compares_dtype_resizes_and_reference_content(gen, sz, tmp_path, monkeypatch):
    for name, v in [("p.png", 90), ("q.png", 30)]:
        Image.fromarray(np.full((sz.side, sz.side, 3), v, np.uint8)).save(tmp_path / name)
    req = dict(id="a", prompt_ids=[1, 2], images=[str(tmp_path / "p.png")])
    fast = dict(num_timesteps=2)
    out = tmp_path / "out"
    G.run_requests(gen, [req], out, overrides=fast, progress=False)
    G.run_requests(gen, [req], out, overrides=fast, progress=False)  # unchanged: resumes

    def refused(what):
        with pytest.raises(G.GenerateError, match=r"generated otherwise, e\.g\. request 1 \(id=a\): .*" + what):
            G.run_requests(gen, [req], out, overrides=fast, progress=False)

    with monkeypatch.context() as m:
        m.setattr(gen, "dtype", "bfloat16")
        refused(re.escape("dtype 'float32' -> 'bfloat16'"))
    with monkeypatch.context() as m:
        m.setattr(gen.inf, "vae_transform", ImageTransform(HUGE, 2, gen.cfg.latent_downsample, HUGE))
        refused(r"vae_transform\.min_size 1 -> 2")
    shutil.copy(tmp_path / "q.png", tmp_path / "p.png")  # another picture under the same name
    refused(r"images_sha256 \['[0-9a-f]{16}")


def test_think_token_limit_in_batch_mode(golden_dir, gen, sz, tmp_path, monkeypatch):
    class Tok:  # the golden checkpoint has no tokenizer; think mode needs one for its system prompt
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [1, 2, 3]})()

    monkeypatch.setattr(gen, "tokenizer", Tok())
    think = dict(prompt_ids=[5], size=sz.size, think=True)
    assert gen.check_request(think, {}, 7).max_think_tokens == 7  # --max-new-tokens
    assert gen.check_request(dict(think, max_new_tokens=3), {}, 7).max_think_tokens == 3  # the request's own
    with pytest.raises(G.GenerateError, match=r"max_new_tokens \(think\) 0: must be at least 1"):
        gen.check_request(dict(think, max_new_tokens=0), {}, 7)
    # the CLI passes --max-new-tokens to run_requests (default 1000, the official interleave_inference's)
    seen = []
    monkeypatch.setattr(G, "run_requests", lambda *a, **kw: kw["counts"].update(generated=0)
                        or seen.append(kw["max_new_tokens"]) or [])
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(think, id="t")])
    for extra, want in [([], 1000), (["--max-new-tokens", "12"], 12)]:
        assert G.main(["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(tmp_path / "o"), *extra]) == 0
        assert seen[-1] == want


def test_think_requests_are_checked_for_the_context_they_take(golden_dir, sz, monkeypatch, tmp_path):
    """The context check counts a think request as the context building adds it: the system prompt (it was
    left out) and the bucket padding of the think text added back. A request that passed the check overflowed
    mid-batch (a traceback, exit 1); at the smallest max_context the check takes, generation fits."""
    class Tok:  # the golden checkpoint has no tokenizer; think mode needs one for its system prompt
        def encode(self, text, add_special_tokens=False):  # a 40-token system prompt; the think text round trips
            ids = list(range(1, 41)) if text == G.GEN_THINK_SYSTEM_PROMPT else [int(x) for x in text.split()]
            return type("E", (), {"ids": ids})()

        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    def generator(max_context):
        g = G.Generator(golden_dir, max_context=max_context)
        monkeypatch.setattr(g, "tokenizer", Tok())
        return g

    req = dict(prompt_ids=[5], size=sz.size, think=True, max_think_tokens=5, num_timesteps=2)
    b = G.TEXT_BUCKET
    pad = lambda n: -(-n // b) * b  # noqa: E731
    # system prompt (40 + 2 kept), prompt (1 + 2), then 5 generated, and at most 4 of them added back as a text
    need = max(pad(42), 42 + pad(3), 45 + 5, 45 + pad(4 + 2))
    with pytest.raises(G.GenerateError, match=rf"need about {need} context tokens, more than --max-context="
                                              rf"{need - 1}"):
        generator(need - 1).check(**req)
    # (run as a batch request: its record keeps the think text, as a single run's generation.json does)
    g = generator(need)
    recs = G.run_requests(g, [dict(id="t", prompt_ids=[5], size=sz.size, think=True, max_new_tokens=5)],
                          tmp_path / "out", overrides=dict(num_timesteps=2), progress=False)
    assert recs[0]["outputs"] == ["t_0.png"] and isinstance(recs[0]["think_text"], str)
    assert json.loads((tmp_path / "out" / "metadata.jsonl").read_text())["think_text"] == recs[0]["think_text"]
    # a think text that encodes again to more tokens than were generated (e.g. bytes decoding to U+FFFD) no longer
    # fits: one error naming the cause (it was a ValueError's traceback mid-batch); the finished request is kept
    encode = g.tokenizer.encode
    monkeypatch.setattr(g.tokenizer, "encode", lambda text, **kw: encode(text) if text == G.GEN_THINK_SYSTEM_PROMPT
                        else type("E", (), {"ids": [7] * 100})())
    monkeypatch.setattr(g.inf, "retokenize", g._retokenize)  # (the cached model's Inferencer: made without Tok)
    with pytest.raises(G.GenerateError, match=r"^context overflow while adding text: .*: the think text, decoded and "
                                              r"encoded again .* raise the context capacity \(--max-context\)$"):
        G.run_requests(g, [dict(id="t", prompt_ids=[5], size=sz.size, think=True, max_new_tokens=5),
                           dict(id="u", prompt_ids=[6], size=sz.size, think=True, max_new_tokens=5)],
                       tmp_path / "out", overrides=dict(num_timesteps=2), progress=False)
    assert [json.loads(x)["id"] for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()] == ["t"]


def test_a_request_made_otherwise_is_refused_whatever_its_outputs(gen, sz, tmp_path):
    """A finished request asked again with other settings is refused unless regenerated: also when it now asks
    for more images, or one of its outputs is missing (it was then regenerated silently, its old images
    overwritten with the new settings)."""
    req = dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=1)
    fast = dict(num_timesteps=2)
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    with pytest.raises(G.GenerateError, match=r"generated otherwise, e.g. .*\(id=a\): num_images 1 -> 2"):
        G.run_requests(gen, [dict(req, num_images=2)], tmp_path, overrides=fast, progress=False)
    (tmp_path / "a_0.png").unlink()
    with pytest.raises(G.GenerateError, match=r"\(id=a\): seed 0 -> 7"):
        G.run_requests(gen, [dict(req, seed=7)], tmp_path, overrides=fast, progress=False)
    assert not (tmp_path / "a_0.png").exists()
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)  # (the same settings: made again)
    assert (tmp_path / "a_0.png").is_file()


def test_the_contact_sheet_is_bounded_and_made_when_something_was_generated(gen, sz, tmp_path, monkeypatch):
    """The sheet held every output (2.9 GB and 138 s for 4,000 images, too large for PIL to open) and was made
    again by every rerun, one that generated nothing too."""
    from PIL import Image as PILImage

    monkeypatch.setattr(G, "CONTACT_SHEET_MAX", 2)
    reqs = [dict(id=f"r{k}", prompt_ids=[k + 1], size=sz.size, seed=k) for k in range(3)]
    G.run_requests(gen, reqs, tmp_path, overrides=dict(num_timesteps=2), progress=False)
    with PILImage.open(tmp_path / "contact_sheet.png") as im:
        assert im.size == (2 * 256, 256)  # the first 2 outputs
    made = []
    monkeypatch.setattr(G, "write_contact_sheet", lambda paths, out: made.append(len(paths)))
    G.run_requests(gen, reqs, tmp_path, overrides=dict(num_timesteps=2), progress=False)
    assert made == []  # nothing generated: the sheet stays
    (tmp_path / "r2_0.png").unlink()
    G.run_requests(gen, reqs, tmp_path, overrides=dict(num_timesteps=2), progress=False)
    assert made == [2]


def test_a_stopped_regenerate_leaves_no_mix_of_images(gen, sz, tmp_path, monkeypatch, capsys):
    """A --regenerate run stopped after some of a request's images were replaced left its old record vouching
    for them: a rerun with the old settings took the mix as finished. Records name their images' sha256. A
    regenerate with fewer images removes the old extra ones."""
    req = dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=2)
    fast = dict(num_timesteps=2)
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    first = [(tmp_path / f"a_{k}.png").read_bytes() for k in range(2)]
    real, saved = G.save_png, []

    def stopped_after_one(img, path):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        real(img, path)

    with monkeypatch.context() as m:
        m.setattr(G, "save_png", stopped_after_one)
        with pytest.raises(KeyboardInterrupt):
            G.run_requests(gen, [dict(req, seed=7)], tmp_path, overrides=fast, progress=False, regenerate=True)
    assert (tmp_path / "a_0.png").read_bytes() != first[0]  # replaced; a_1.png is seed 0's
    calls = []
    real_gen = gen.generate_prepared
    monkeypatch.setattr(gen, "generate_prepared", lambda r: calls.append(r.seed) or real_gen(r))
    capsys.readouterr()
    G.run_requests(gen, [req], tmp_path, overrides=fast, progress=False)
    assert calls == [0] and "a_0.png: not the image(s) metadata.jsonl records for request 'a'" in capsys.readouterr().err
    for k in range(2):
        assert_uint8_close(np.asarray(Image.open(tmp_path / f"a_{k}.png")), np.asarray(Image.open(io.BytesIO(first[k]))))
    G.run_requests(gen, [dict(req, num_images=1)], tmp_path, overrides=fast, progress=False, regenerate=True)
    assert not (tmp_path / "a_1.png").exists() and (tmp_path / "a_0.png").is_file()


def test_ctrl_c_in_a_batch_is_one_line(golden_dir, sz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "_GENERATORS", {})
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id=f"r{k}", prompt_ids=[k + 1], size=sz.size, num_images=k + 1)
                                               for k in range(3)])
    real = G.Generator.generate_prepared
    calls = []

    def interrupted_second(self, r):
        calls.append(r)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, r)

    monkeypatch.setattr(G.Generator, "generate_prepared", interrupted_second)
    argv = ["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(tmp_path / "out"), "--steps", "2",
            "--max-context", "128"]
    capsys.readouterr()
    assert G.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err  # the progress bar, then one line
    assert err.strip().splitlines()[-1] == "interrupted: 1 of 3 requests finished and kept; rerun the same command to resume"
    assert [json.loads(x)["id"] for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()] == ["r0"]
    assert G.main(argv) == 0 and len(calls) == 4  # resumed: r1 and r2
    # an interrupted --regenerate (other settings) resumes too: the requests it finished are kept
    calls.clear()
    regen = argv + ["--cfg-text-scale", "2", "--regenerate"]
    assert G.main(regen) == 130 and len(calls) == 2  # r0 made again, interrupted in r1
    assert G.main(regen) == 0 and [r.num_images for r in calls[2:]] == [2, 3]  # r1 and r2 only


def test_generate_batch_sets_image_transforms_for_its_batch_only(monkeypatch):
    """`vae_transform` / `vit_transform` overrides (eval.run --gen-arg, OmniContext's ViT transform) resize the
    inputs of this batch, on the cached Generator (no second model load), also once its Inferencer exists, and
    are restored after it, even when the batch fails; the sampler overrides go to the requests."""
    import types

    from echo4o_jax.image_transform import ImageTransform

    vae0, vit0 = ImageTransform.vae_default(), ImageTransform.vit_default()
    gen = object.__new__(G.Generator)  # no checkpoint: only the transform slots matter here
    gen.cfg = types.SimpleNamespace(latent_downsample=16, vit=types.SimpleNamespace(patch_size=14))
    gen.inf, gen._vae_transform, gen._vit_transform = None, vae0, vit0
    loads, runs, progress, crops = [], [], [], []

    def run_requests(g, reqs, out, **kw):
        progress.append(kw["progress"])
        crops.append(kw.get("crop"))
        # the weights load during the batch: the Inferencer takes the Generator's transforms then
        g.inf = types.SimpleNamespace(vae_transform=g.vae_transform, vit_transform=g.vit_transform)
        runs.append((g.vae_transform, g.vit_transform, kw["overrides"]))
        if kw["overrides"].get("cfg_renorm_type") == "fail":
            raise RuntimeError("batch failed")
        return []

    monkeypatch.setattr(G, "get_generator", lambda ckpt, **kw: loads.append(kw) or gen)
    monkeypatch.setattr(G, "run_requests", run_requests)
    G.generate_batch("ckpt", [], "out", vit_transform=[980, 378], cfg_img_scale=1.5, max_context=512)
    assert loads == [{"max_context": 512}]
    assert runs == [(vae0, ImageTransform(980, 378, 14), {"cfg_img_scale": 1.5})] and progress == [True]
    assert (gen.vae_transform, gen.vit_transform) == (vae0, vit0) and gen.inf.vit_transform == vit0
    with pytest.raises(RuntimeError, match="batch failed"):
        G.generate_batch("ckpt", [], "out", vae_transform=(512, 256), cfg_renorm_type="fail")
    assert runs[-1][0] == ImageTransform(512, 256, 16) and (gen.vae_transform, gen.inf.vae_transform) == (vae0, vae0)
    for bad in ([980], [300, 400], [True, True]):
        with pytest.raises(G.GenerateError, match=r"vit_transform .*: expected \[MAX, MIN\] image sides"):
            G.generate_batch("ckpt", [], "out", vit_transform=bad)
    G.generate_batch("ckpt", [], "out", progress=False)  # eval.run --no-progress
    assert progress[-1] is False
    G.generate_batch("ckpt", [], "out", crop_to_bbox=True, cfg_img_scale=1.0)  # run_requests' crop, not a sampler key
    assert crops[-1] is True and runs[-1][2] == {"cfg_img_scale": 1.0}
    with pytest.raises(G.GenerateError, match=r"crop_to_bbox 'yes': expected true or false$"):
        G.generate_batch("ckpt", [], "out", crop_to_bbox="yes")
    # an unknown key names every one generate_batch takes (eval.run's --gen-arg), not the sampler's alone
    with pytest.raises(G.GenerateError, match=r"^unknown setting 'bogus'; known: cfg_text_scale, .*num_timesteps") as ei:
        G.generate_batch("ckpt", [], "out", bogus=1, check_only=True)
    assert all(k in str(ei.value) for k in G.BATCH_KEYS + ("vae_posterior",))
    # the loader's settings are checked as the CLI's flags, before the checkpoint is looked at
    loads.clear()
    for bad, msg in [(dict(dtype="foo"), "dtype (--dtype) 'foo': expected one of float32, bfloat16"),
                     (dict(dtype="float16"), "dtype (--dtype) 'float16': expected one of float32, bfloat16"),
                     (dict(max_context=-1), "max_context (--max-context) -1: must be at least 0"),
                     (dict(max_context="9"), "max_context (--max-context) '9': expected an integer"),
                     (dict(step=1.5), "step (--step) 1.5: expected an integer")]:
        with pytest.raises(G.GenerateError, match=re.escape(msg) + "$"):
            G.generate_batch("ckpt", [], "out", check_only=True, **bad)
    assert loads == []


def test_without_out_each_single_run_gets_a_new_folder(golden_dir, sz, tmp_path, monkeypatch, capsys):
    """Without --out, single mode writes into a new outputs/generate/<date-time> folder per run (a fixed default
    refused the second run as "holds an earlier generation"); batch mode needs --out (the folder it resumes)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt", str(golden_dir), "--prompt-ids", "5,6", "--size", sz.hw, "--steps", "2",
            "--max-context", "128"]
    assert G.main(argv) == 0 and G.main(argv) == 0
    runs = sorted((tmp_path / "outputs" / "generate").iterdir())
    assert len(runs) == 2 and all((r / "generation.json").is_file() for r in runs)
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1], size=sz.size)])
    capsys.readouterr()
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f)])
    assert err == "error: --prompts needs --out: the folder the outputs go to, which a rerun resumes", err


def test_transparent_input_images_go_on_white_as_the_official_inferencer(tmp_path):
    """The official inferencer feeds each input image through `pil_img2rgb` (transparent pixels on white), as
    the training data is read; a plain convert("RGB") showed the colour under transparent pixels instead."""
    blue = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    blue.putpixel((0, 0), (0, 0, 255, 255))
    blue.save(tmp_path / "rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=1)  # palette index 1 (blue) transparent
    for im in (G._read_image(tmp_path / "rgba.png"), G.Generator._read_images([blue])[0]):
        assert im.mode == "RGB" and im.getpixel((3, 3)) == (255, 255, 255) and im.getpixel((0, 0)) == (0, 0, 255)
    assert G._read_image(tmp_path / "pal.png").getpixel((3, 3)) == (255, 255, 255)
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert G.Generator._read_images([rgb])[0].getpixel((0, 0)) == (1, 2, 3)


def test_sixteen_bit_greyscale_input_is_refused(tmp_path):
    """A 16-bit greyscale input converts to an almost white RGB image (PIL clips): refused, naming the file."""
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "g16.png")
    with pytest.raises(G.GenerateError, match=r"cannot use image .*g16.png: 16-bit greyscale image \(PIL mode I;16"):
        G._read_image(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:  # (a PIL image given to the library)
        with pytest.raises(G.GenerateError, match=r"cannot use input image 0: 16-bit greyscale image"):
            G.Generator._read_images([im])


def test_an_image_over_pils_pixel_limit_is_one_error_line(golden_dir, tmp_path, no_weights, monkeypatch, capsys):
    """PIL refuses an image of more than twice Image.MAX_IMAGE_PIXELS (a DecompressionBombError, not an
    OSError): one error line naming the file and why, in single and batch mode, before the weights load."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: as a 20000x20000 image under PIL's limit
    big, out = tmp_path / "big.png", tmp_path / "o"
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompt-ids", "1", "--image", str(big), "--out", str(out)])
    assert err.startswith(f"error: cannot read image {big}: too many pixels for PIL (Image size (256 pixels) "
                          "exceeds limit of 200 pixels") and "PIL.Image.MAX_IMAGE_PIXELS" in err, err
    f = _write_jsonl(tmp_path / "reqs.jsonl", [dict(id="a", prompt_ids=[1], images=["big.png"])])
    err = _one_error(capsys, ["--ckpt", str(golden_dir), "--prompts", str(f), "--out", str(out)])
    assert err.startswith(f"error: {f}:1 (id=a): cannot read image {big}: too many pixels for PIL"), err
    assert not out.exists()


def test_a_full_disk_stops_the_batch_keeping_what_is_finished(gen, sz, tmp_path, monkeypatch):
    """An output that cannot be written (a full disk) is one GenerateError naming it and the cause, saying how many
    requests are finished and kept (no temporary file is left); the rerun resumes, removing the temporary files
    of a killed run (a process no longer running) and only those."""
    reqs = [dict(id="a", prompt_ids=[1, 2, 3], size=sz.size, seed=0, num_images=2),
            dict(id="b", prompt_ids=[4, 5], size=sz.size, seed=1, num_images=1)]
    fast = dict(num_timesteps=3)
    real, saved = Image.Image.save, []

    def save(self, fp, format=None, **kw):  # room for two PNGs: a part of the third is written, then ENOSPC
        if len(saved) == 2:
            fp.write(b"\x89PNG\r\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(fp)
        return real(self, fp, format=format, **kw)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", save)
        with pytest.raises(G.GenerateError) as e:
            G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)
    assert str(e.value) == (f"cannot write {tmp_path / 'b_0.png'}: No space left on device; 1 of 2 requests finished "
                            "and kept: rerun the same command to resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_0.png", "a_1.png", "metadata.jsonl"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f".b_0.png.{dead.pid}.tmp", f".contact_sheet.png.{dead.pid}.tmp"]  # left by a kill -9
    kept = [f".a_0.png.{os.getppid()}.tmp",  # a running process's
            f"b_0.png.{dead.pid}.tmp", f".notes.{dead.pid}.tmp", ".b_0.png.x.tmp"]  # not write_files' names
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"\x89PNG")
    calls = []
    real_gen = gen.generate_prepared
    monkeypatch.setattr(gen, "generate_prepared", lambda r: calls.append(r.seed) or real_gen(r))
    G.run_requests(gen, reqs, tmp_path, overrides=fast, progress=False)
    assert calls == [1]  # b only
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a_0.png", "a_1.png", "b_0.png", "contact_sheet.png", "metadata.jsonl"] + kept)


def test_the_default_dtype_is_bfloat16_on_accelerators_as_the_official_and_float32_on_the_cpu(golden_dir, no_weights,
                                                                                          monkeypatch):
    """A generation that names no dtype runs in bfloat16 on a GPU / TPU (the official inference's dtype; float32's
    14B weights and caches did not fit an 80 GB GPU with a benchmark batch) and in float32 on the CPU; the dtype a
    Generator records is the one it runs in, and naming the default is the same (cached) Generator."""
    from echo4o_jax.sampling_defaults import default_settings

    assert G.Generator(golden_dir, load_weights=False).dtype == "float32" == default_settings(False)["dtype"]
    assert G.get_generator(golden_dir) is G.get_generator(golden_dir, dtype="float32")
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert G.Generator(golden_dir, load_weights=False).dtype == "bfloat16" == default_settings(True)["dtype"]
        assert G.get_generator(golden_dir) is G.get_generator(golden_dir, dtype="bfloat16")


def test_attention_impl_is_chosen_for_generation_and_checked(golden_dir, sz, tmp_path, capsys, monkeypatch):
    """--attention-impl (generate_batch / eval.run: attention_impl) selects the model's attention for generation:
    a kernel (here pallas_tpu, interpreted on the CPU) reproduces the golden text-to-image case as xla_blockwise
    does; a name that is none, or the other backend's kernel, is one error line naming the flag."""
    d = load_npz(golden_dir / "t2i.npz")
    ids, images, kw = _golden_request(d)
    size = tuple(kw.pop("image_shapes"))
    g = G.Generator(golden_dir, max_context=golden_max_context(golden_dir, BagelConfig.from_checkpoint_dir(golden_dir),
                                                                 text_bucket=G.TEXT_BUCKET),
                    attention_impl="pallas_tpu")
    assert g.cfg.attention_impl == g.model.cfg.attention_impl == "pallas_tpu"
    noise = np.asarray(d["init_noise"])[None]  # (the golden noise for the sampler's draw: after the weights loaded)
    monkeypatch.setattr(jax.random, "normal", lambda key, shape, *a, **k: noise)
    seen = []
    real = g.inf.interleave_inference
    monkeypatch.setattr(g.inf, "interleave_inference", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    g.generate(prompt_ids=ids, size=size, seed=0, num_images=1, **kw)
    assert max_err(np.asarray(seen[0]["latent"])[0], d["latent"]) <= 1e-3
    monkeypatch.undo()
    base = ["--ckpt", str(golden_dir), "--prompt-ids", "1,2", "--size", sz.hw, "--out", str(tmp_path / "o")]
    assert _one_error(capsys, base + ["--attention-impl", "flash"]) == (
        "error: attention_impl (--attention-impl) 'flash': expected one of xla_blockwise, xla_dense, pallas_gpu, "
        "pallas_tpu, pallas_interpret")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _one_error(capsys, base + ["--attention-impl", "pallas_tpu"]).startswith(
        "error: attention_impl (--attention-impl): attention_impl='pallas_tpu' is the TPU kernel and the backend is "
        "'gpu': use attention_impl='pallas_gpu' there")
