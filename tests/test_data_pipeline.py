"""The Grain pipeline: packing semantics (golden samples_json), policy, dropout, determinism, exact resume
(also with 2 worker processes), process sharding, mixing, skips."""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import json
import os
import time
import pathlib
import glob
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import DEFAULT_GOLDEN, load_npz, npz_json
from echo4o_jax.config import BagelConfig, SpecialTokens
from echo4o_jax.data.pipeline import (DataPipeline, DatasetSpec, PipelineConfig, load_tokenizer, skip_reason,
                                      stack_packs)
from echo4o_jax.data.records import (
    Record,
    RecordError,
    RecordReader,
    RecordWriter,
    load_manifest,
    multiref_record,
    t2i_record,
    understanding_record,
)
from echo4o_jax.image_transform import ImageTransform
from echo4o_jax.packing import (
    PackBudget,
    PackedBatch,
    batch_arrays,
    budget_for,
    normalize_images,
    pack_samples,
    stack_batches,
    to_official,
)

# These tests pack for the bundled tiny model (DEFAULT_GOLDEN, not parametrised over golden folders); the numbers
# that must match it are read from its config (bagel_tiny_a's in brackets).
_MODEL = BagelConfig.from_checkpoint_dir(DEFAULT_GOLDEN)
_ST = _MODEL.special_tokens
SPECIALS = (_ST.bos_token_id, _ST.eos_token_id, _ST.start_of_image, _ST.end_of_image)  # (150, 151, 152, 153)
N_WORDS = min(SPECIALS)  # word ids w0 .. below the special tokens (150)
_DS, _P = _MODEL.latent_downsample, _MODEL.vit.patch_size  # (16, 14)
VAE_T = ImageTransform(4 * _DS, _DS, _DS)  # (64, 16, 16): 4 of the latent table's 8 positions per side
VIT_T = ImageTransform(4 * _P, _P, _P)  # (56, 14, 14)
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- helpers


def _tokenizer_json(path, n_words=N_WORDS, specials=SPECIALS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n_words)}
    for name, i in zip(("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"), specials):
        vocab[name] = i
    vocab["[UNK]"] = max(vocab.values()) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def _png(arr_u8_hwc) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr_u8_hwc).save(b, format="PNG")
    return b.getvalue()


def _rand_png(rng, w, h):
    return _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _words(rng, n):
    return " ".join(f"w{int(i)}" for i in rng.integers(0, N_WORDS, n))


def _write_dataset(d, n, seed, *, prefix="r", huge=(), corrupt=(), sizes=(16, 32, 48, 64), append=False):
    """n mixed records (t2i / multiref / understanding) of varied sizes (VAE image sides drawn from `sizes`);
    `append`: added to an existing dataset (ids must differ)."""
    rng = np.random.default_rng(seed)
    with RecordWriter(d, shard_bytes=6000, name=prefix, append=append) as w:
        for i in range(n):
            rid = f"{prefix}{i}"
            kind = i % 3
            side = lambda: int(rng.choice(sizes))  # noqa: E731
            if i in huge:  # more VAE tokens than any pack holds
                imgs = [_rand_png(rng, 64, 64) for _ in range(5)]
                w.write(multiref_record(rid, imgs[:4], _words(rng, 4), imgs[4]))
            elif kind == 0:
                img = _rand_png(rng, side(), side())
                if i in corrupt:
                    img = img[: len(img) // 2]  # header readable, pixels truncated
                w.write(t2i_record(rid, [_words(rng, int(rng.integers(2, 9))), _words(rng, 3)], img))
            elif kind == 1:
                refs = [_rand_png(rng, side(), side()) for _ in range(int(rng.integers(1, 3)))]
                w.write(multiref_record(rid, refs, _words(rng, int(rng.integers(3, 7))),
                                        _rand_png(rng, side(), side())))
            else:
                w.write(understanding_record(rid, _rand_png(rng, 42, 28), _words(rng, 3),
                                             _words(rng, int(rng.integers(2, 6)))))
    return str(d)


def corrupt_record(d, record: int) -> tuple[str, int]:
    """Flips 20 bytes inside record `record` (index in the dataset `d`; records are stored uncompressed);
    returns (its shard file, its index in the shard)."""
    m = load_manifest(d)
    k, i = 0, record
    while i >= m["shards"][k]["records"]:
        i, k = i - m["shards"][k]["records"], k + 1
    shard = os.path.join(d, m["shards"][k]["file"])
    data = bytearray(open(shard, "rb").read())
    at = [j for j in range(len(data)) if data.startswith(b"E4OR", j)][i]  # the record's magic
    data[at + 100:at + 120] = bytes(b ^ 0xFF for b in data[at + 100:at + 120])
    open(shard, "wb").write(bytes(data))
    return shard, i


def config_file(path, c) -> str:
    """The training config `c` as a config file (for the command-line tools)."""
    path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict(json.loads({c.to_json()!r}))\n")
    return str(path)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a command that refused its input (exit status 2, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-3000:])
    return lines[0]


@pytest.fixture(scope="module")
def model_cfg():
    return BagelConfig.from_checkpoint_dir(DEFAULT_GOLDEN)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return {
        "tok": _tokenizer_json(root / "tok.json"),
        "a": _write_dataset(root / "a", 60, 0, prefix="a"),
        "b": _write_dataset(root / "b", 30, 1, prefix="b"),
        "bad": _write_dataset(root / "bad", 12, 2, prefix="x", huge=(4, 7), corrupt=(3,)),
    }


BUDGET = PackBudget(text_tokens=96, vit_tokens=48, vae_tokens=64, vae_images=6, vae_image_size=(64, 64))


def _cfg(data, **kw):
    base = dict(datasets=(DatasetSpec(data["a"]),), tokenizer=data["tok"], budget=BUDGET,
                expected_num_tokens=150, vae_transform=VAE_T, vit_transform=VIT_T, seed=3)
    base.update(kw)
    return PipelineConfig(**base)


def _run(pipe, n, state=None):
    it = pipe.iterator(state)
    out = []
    try:
        for _ in range(n):
            try:
                b, st = next(it)
            except StopIteration:
                break
            out.append((batch_arrays(b), st))
        return out, it.get_state()
    finally:
        it.close()


def _assert_same(x, y):
    assert len(x) == len(y) > 0
    for (ba, sa), (bb, sb) in zip(x, y):
        assert sa["sample_ids"] == sb["sample_ids"]
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)


# ---------------------------------------------------------------------------------------------- golden


def _golden_records(g, samples):
    """The golden samples as records: ids become words w<id>; images lossless PNG."""
    recs = []
    for i, s in enumerate(samples):
        plan, images = [], []
        texts = [" ".join(f"w{t}" for t in ids) for ids in s["text_ids_list"]]
        for it in s["sequence_plan"]:
            item = {k: it[k] for k in ("type", "loss", "enable_cfg", "special_token_loss", "special_token_label")}
            if it["type"] != "text":
                a = g[f"sample_{i}_image_{len(images)}"]
                u8 = np.round((a * 0.5 + 0.5) * 255).astype(np.uint8).transpose(1, 2, 0)
                item["image"] = len(images)
                images.append(_png(u8))
            plan.append(item)
        n_loss = sum(it["type"] == "vae_image" and it["loss"] for it in plan)
        task = "understanding" if not n_loss else ("t2i" if len(images) == 1 else "multiref")
        recs.append(Record(id=f"golden{i}", task=task, plan=plan, texts=texts, images=images))
    return recs


def test_golden_samples_through_pipeline(golden_dir, tmp_path):
    """Records made from the official samples, through decode / resize / tokenise / pack, give the
    packer's (and the official) packed batch."""
    cfg = BagelConfig.from_checkpoint_dir(golden_dir)
    g = load_npz(golden_dir / "train_step.npz")
    samples = npz_json(g["samples_json"])
    for i, s in enumerate(samples):
        n_img = sum(it["type"] != "text" for it in s["sequence_plan"])
        s["image_tensor_list"] = [g[f"sample_{i}_image_{j}"] for j in range(n_img)]
    st = cfg.special_tokens
    tok = _tokenizer_json(tmp_path / "tok.json", n_words=min(st.bos_token_id, st.eos_token_id,
                                                              st.start_of_image, st.end_of_image),
                          specials=(st.bos_token_id, st.eos_token_id, st.start_of_image, st.end_of_image))
    with RecordWriter(tmp_path / "golden", name="golden") as w:
        for r in _golden_records(g, samples):
            w.write(r)
    tight = budget_for(samples, cfg)
    ds = cfg.latent_downsample
    budget = dataclasses.replace(tight, text_tokens=tight.text_tokens + 3, vae_images=tight.vae_images + 1,
                                 vae_image_size=(tight.vae_image_size[0] + ds, tight.vae_image_size[1]))
    # the largest side of the VAE / ViT images (each within its own position table): no image is resized
    sides = {"vae_image": 0, "vit_image": 0}
    for s in samples:
        imgs = iter(s["image_tensor_list"])
        for it in s["sequence_plan"]:
            if it["type"] != "text":
                sides[it["type"]] = max(sides[it["type"]], *next(imgs).shape[1:])
    pc = PipelineConfig(datasets=(DatasetSpec(str(tmp_path / "golden")),), tokenizer=tok, budget=budget,
                        expected_num_tokens=10**6, shuffle=False, num_epochs=1, text_dropout=0.0,
                        vit_dropout=0.0, vae_dropout=0.0,
                        vae_transform=ImageTransform(sides["vae_image"], ds, ds),
                        vit_transform=ImageTransform(sides["vit_image"], cfg.vit.patch_size, cfg.vit.patch_size))
    it = DataPipeline(pc, cfg).iterator()
    batch, stats = next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert stats["sample_ids"] == [["golden0", "golden1", "golden2"]] and stats["end_of_data"]
    # the default uint8 batch, normalised as on device, is bit for bit the float32 batch
    assert batch.vae_images.dtype == np.uint8 and batch.vit_patches.dtype == np.uint8
    batch_f, _ = next(DataPipeline(dataclasses.replace(pc, image_dtype="float32"), cfg).iterator())
    one = normalize_images(batch_arrays(batch))
    ref_f = batch_arrays(batch_f)
    for k in ref_f:
        assert one[k].dtype == ref_f[k].dtype, k
        np.testing.assert_array_equal(one[k], ref_f[k], err_msg=k)
    one = {k: v[0] for k, v in one.items()}
    pb = PackedBatch(**one)
    o = to_official(pb)
    for k in ("sample_lens", "packed_text_ids", "packed_text_indexes", "packed_position_ids",
              "packed_vit_position_ids", "packed_vit_token_indexes", "vit_token_seqlens",
              "packed_latent_position_ids", "packed_vae_token_indexes", "patchified_vae_latent_shapes",
              "mse_loss_indexes", "packed_label_ids", "ce_loss_indexes"):
        np.testing.assert_array_equal(o[k], g[k], err_msg=k)
    np.testing.assert_allclose(o["packed_vit_tokens"], g["packed_vit_tokens"], atol=1e-6)
    np.testing.assert_allclose(o["padded_images"], g["padded_images"], atol=1e-6)
    np.testing.assert_allclose(o["ce_loss_weights"], g["ce_loss_weights"], rtol=1e-6)
    assert np.array_equal(np.isfinite(o["packed_timesteps"]), np.isfinite(g["packed_timesteps_raw"]))
    # and equal to pack_samples on the official samples (timesteps aside)
    ref = pack_samples(copy.deepcopy(samples), cfg, budget, rng=np.random.default_rng(0))
    for k, v in batch_arrays(ref).items():
        if k == "timestep_raw":
            assert np.array_equal(np.isfinite(v), np.isfinite(one[k]))
            continue
        if v.dtype.kind == "f":
            np.testing.assert_allclose(one[k], v, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(one[k], v, err_msg=k)


# ---------------------------------------------------------------------------------------------- policy


def _reference_packs(elements, c: PipelineConfig):
    """The official PackedDataset.__iter__ loop on total token counts (no dropout): a sample that neither fits
    nor can be buffered is dropped with `drop_unfit` (the official), else (the documented deviation) it starts
    the next pack."""
    packs, cur, curr, buffer = [], [], 0, []
    it = iter(elements)
    while True:
        if curr < c.prefer_buffer_before and buffer:
            s, fb = buffer.pop(0), True
        else:
            s, fb = next(it, None), False
            if s is None:
                if not buffer:
                    break
                s, fb = buffer.pop(0), True
        n = s[1]
        if n > c.max_tokens_per_sample:
            continue
        if curr + n > c.max_tokens:
            if len(buffer) < c.max_buffer_size and not fb:
                buffer.append(s)
                continue
            packs.append(cur)
            if c.drop_unfit:  # official: yield the pack, read on
                cur, curr = [], 0
                continue
            cur, curr = [s], n
            if curr >= c.expected_num_tokens:
                packs.append(cur)
                cur, curr = [], 0
            continue
        cur.append(s)
        curr += n
        if curr >= c.expected_num_tokens:
            packs.append(cur)
            cur, curr = [], 0
    if cur:
        packs.append(cur)
    return [[x[0] for x in p] for p in packs]


@pytest.mark.parametrize("drop_unfit,buffer", [(False, 3), (True, 3), (False, 0), (True, 0)])
def test_packing_policy_matches_official_loop(data, model_cfg, drop_unfit, buffer):
    big = PackBudget(text_tokens=400, vit_tokens=400, vae_tokens=400, vae_images=40, vae_image_size=(64, 64))
    c = _cfg(data, budget=big, max_num_tokens=70, expected_num_tokens=55, max_num_tokens_per_sample=45,
             prefer_buffer_before=25, max_buffer_size=buffer, num_epochs=1, text_dropout=0.0, vit_dropout=0.0,
             vae_dropout=0.0, drop_unfit=drop_unfit)
    pipe = DataPipeline(c, model_cfg)
    n = len(pipe.elements)
    els = [pipe.elements[k] for k in range(n)]
    ref = _reference_packs([(e["id"], sum(e["sizes"][:3])) for e in els], c)
    out, _ = _run(pipe, 1000)
    got = [p for _, st in out for p in st["sample_ids"]]
    assert got == ref
    # every sample read is packed, skipped as too long or (official) dropped for not fitting
    last = out[-1][1]
    assert last["samples_packed"] + last["skipped_too_long"] + last["dropped_unfit"] == n
    if buffer == 0:  # every sample that does not fit is the drop's (or the carry's) case
        assert (last["dropped_unfit"] > 0) == drop_unfit
    assert any(sum(e["sizes"][:3]) > 45 for e in els)  # the per-sample limit was exercised
    assert out[-1][1]["skipped_too_long"] == sum(sum(e["sizes"][:3]) > 45 for e in els)
    by_task = collections.Counter(e["task"] for e in els if sum(e["sizes"][:3]) > 45)
    assert out[-1][1]["skipped_by"] == {f"{t}/max_tokens_per_sample": n for t, n in sorted(by_task.items())}
    assert max(st["buffer"] for _, st in out) >= min(buffer, 1)  # the overflow buffer was used
    for b, st in out:  # every pack within the hard cap
        assert (b["num_tokens"] <= 70).all()


def test_dropout_through_pack_samples(data, model_cfg):
    # all conditions dropped: no caption / ViT / clean-VAE tokens remain, targets and answers stay
    c = _cfg(data, text_dropout=1.0, vit_dropout=1.0, vae_dropout=1.0, num_epochs=1)
    out, _ = _run(DataPipeline(c, model_cfg), 1000)
    for b, st in out:  # ViT images left: those of understanding samples (not CFG-droppable)
        n_und = sum(int(i[1:]) % 3 == 2 for i in st["sample_ids"][0])
        assert len(set(b["vit_image_id"][0][b["vit_image_id"][0] >= 0].tolist())) == n_und
        real_vae = b["vae_image_index"] >= 0
        assert b["mse_mask"][real_vae].all()  # only noisy targets left
    # partial dropout: the packer's replayed draws agree with pack_samples (asserted inside) over many packs
    c = _cfg(data, text_dropout=0.5, vit_dropout=0.5, vae_dropout=0.5, num_epochs=1, packs_per_step=2)
    out, _ = _run(DataPipeline(c, model_cfg), 1000)
    assert sum(st["samples"] for _, st in out) == 60


def test_same_seed_same_order_and_shapes(data, model_cfg):
    c = _cfg(data, packs_per_step=2)
    a, _ = _run(DataPipeline(c, model_cfg), 4)
    b, _ = _run(DataPipeline(dataclasses.replace(c, pack_threads=1), model_cfg), 4)
    _assert_same(a, b)
    d, _ = _run(DataPipeline(dataclasses.replace(c, seed=4), model_cfg), 4)
    assert [st["sample_ids"] for _, st in a] != [st["sample_ids"] for _, st in d]
    L = BUDGET.total_tokens
    for arr, st in a:
        assert arr["sample_id"].shape == (2, L) and arr["vae_images"].shape == (2, 6, 64, 64, 3)
        assert st["packs"] == 2 and 0 < st["fill"] <= 1 and st["tokens"] == int(arr["num_tokens"].sum())


def test_stack_packs_equals_stack_batches(data, model_cfg):
    c = _cfg(data, packs_per_step=1)
    it = DataPipeline(c, model_cfg).iterator()
    packs = [next(it)[0] for _ in range(3)]
    one = [PackedBatch(**{k: v[0] for k, v in batch_arrays(p).items()}) for p in packs]
    one.append(pack_samples([], model_cfg, BUDGET, rng=np.random.default_rng(0), image_dtype="uint8"))
    for group in (one[:1], one):
        x, y = batch_arrays(stack_packs(group)), batch_arrays(stack_batches(group))
        for k in y:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    it.close()


def test_packs_written_into_stacked_batch(data, model_cfg):
    """Packs built straight into the step's stacked arrays (threads or not) equal the packs of one-pack
    steps stacked by stack_batches; the rows after the data ends equal pack_samples([])."""
    c1 = _cfg(data, packs_per_step=1, num_epochs=1)
    singles = [PackedBatch(**{k: v[0] for k, v in arr.items()}) for arr, _ in _run(DataPipeline(c1, model_cfg), 1000)[0]]
    assert len(singles) >= 5
    empty = pack_samples([], model_cfg, BUDGET, rng=np.random.default_rng(0), image_dtype="uint8")
    n = 3
    rows = singles + [empty] * (-len(singles) % n)
    for threads in (1, 4):
        out, _ = _run(DataPipeline(dataclasses.replace(c1, packs_per_step=n, pack_threads=threads), model_cfg), 1000)
        assert len(out) == len(rows) // n and out[-1][1]["end_of_data"]
        for j, (arr, st) in enumerate(out):
            ref = batch_arrays(stack_batches(rows[j * n:(j + 1) * n]))
            assert set(arr) == set(ref)
            for k in ref:
                assert arr[k].dtype == ref[k].dtype, k
                np.testing.assert_array_equal(arr[k], ref[k], err_msg=k)


def test_image_dtype_float32_equals_normalized_uint8(data, model_cfg):
    """image_dtype='float32' (normalised by the packer) and the default uint8 batches normalised by
    `normalize_images` (numpy and jitted jax) are bit-identical, padding included."""
    import jax

    c = _cfg(data, packs_per_step=2, vit_dropout=0.5)
    u8, _ = _run(DataPipeline(c, model_cfg), 3)
    f32, _ = _run(DataPipeline(dataclasses.replace(c, image_dtype="float32"), model_cfg), 3)
    norm_jit = jax.jit(normalize_images)
    for (a, _), (b, _) in zip(u8, f32):
        assert a["vae_images"].dtype == np.uint8 and b["vae_images"].dtype == np.float32
        for got in (normalize_images(a), {k: np.asarray(v) for k, v in norm_jit(a).items()}):
            for k in b:
                assert got[k].dtype == b[k].dtype, k
                np.testing.assert_array_equal(got[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)
    with pytest.raises(ValueError, match="image_dtype"):
        _cfg(data, image_dtype="float16")


def test_resume_exact(data, model_cfg):
    c = _cfg(data, datasets=(DatasetSpec(data["a"], 2.0), DatasetSpec(data["b"], 1.0)), packs_per_step=2,
             max_buffer_size=4)
    pipe = DataPipeline(c, model_cfg)
    full, _ = _run(pipe, 9)
    head, state = _run(pipe, 4)
    _assert_same(head, full[:4])
    state = json.loads(json.dumps(state))  # JSON-serialisable
    assert state["buffer"] or state["carry"]  # the restore of buffered samples is exercised
    tail, _ = _run(DataPipeline(c, model_cfg), 5, state=state)
    _assert_same(tail, full[4:])
    with pytest.raises(ValueError, match="another configuration"):
        DataPipeline(dataclasses.replace(c, seed=9), model_cfg).iterator(state)


def test_resume_exact_with_two_workers(data, model_cfg):
    c = _cfg(data, packs_per_step=2, max_buffer_size=4)
    ref, _ = _run(DataPipeline(c, model_cfg), 6)
    cw = dataclasses.replace(c, worker_count=2, worker_buffer_size=2, read_threads=1)
    head, state = _run(DataPipeline(cw, model_cfg), 3)
    _assert_same(head, ref[:3])
    tail, _ = _run(DataPipeline(cw, model_cfg), 3, state=json.loads(json.dumps(state)))
    _assert_same(tail, ref[3:])


def test_worker_processes_ignore_ctrl_c(data, model_cfg):
    """A terminal's Ctrl-C reaches the whole process group: the worker processes ignore it (the trainer finishes
    its step and saves; workers that died of it made its next batch fail, losing the steps since the last
    checkpoint), and the packs go on coming, the same as without the signal."""
    import multiprocessing
    import signal

    c = _cfg(data, packs_per_step=2, max_buffer_size=4)
    ref, _ = _run(DataPipeline(c, model_cfg), 4)
    cw = dataclasses.replace(c, worker_count=1, worker_buffer_size=1, read_threads=1)
    it = DataPipeline(cw, model_cfg).iterator()
    def one():
        b, st = next(it)
        return batch_arrays(b), st

    try:
        got = [one()]
        workers = multiprocessing.active_children()
        assert workers
        for w in workers:
            os.kill(w.pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(w.is_alive() for w in workers)
        got += [one() for _ in range(3)]
    finally:
        it.close()
    _assert_same(got, ref)


def test_worker_processes_end_when_the_trainer_is_killed_outright(data, tmp_path):
    """A process reading with worker processes, killed with SIGKILL (as the out-of-memory killer does), cannot stop
    them: they kept running (~200 MB each) for good. They now end within seconds of their parent."""
    import signal

    script = tmp_path / "read.py"
    script.write_text(f"""
import dataclasses, multiprocessing, sys, time
sys.path[:0] = [{str(pathlib.Path(__file__).parent)!r}]
from test_data_pipeline import DEFAULT_GOLDEN, BagelConfig, DataPipeline, _cfg
if __name__ == "__main__":  # (the workers are spawned: they import this file)
    data = {{"a": {data["a"]!r}, "tok": {data["tok"]!r}}}
    c = dataclasses.replace(_cfg(data, packs_per_step=2, max_buffer_size=4), worker_count=1, worker_buffer_size=1,
                            read_threads=1)
    it = DataPipeline(c, BagelConfig.from_checkpoint_dir(DEFAULT_GOLDEN)).iterator()
    next(it)
    print(" ".join(str(w.pid) for w in multiprocessing.active_children()), flush=True)
    time.sleep(600)
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert pids, "no worker process started"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[-1].split()[0] != "Z"  # (a zombie has ended)
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(q) for q in pids):
        time.sleep(0.2)
    left = [q for q in pids if alive(q)]
    for q in left:
        os.kill(q, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their killed parent"


def test_samples_from_worker_processes_hold_no_shared_memory(data, model_cfg):
    """Grain's worker processes send arrays through shared-memory blocks; the pipeline copies them out as each
    sample arrives, so the samples it holds (overflow buffer, carry) keep no block alive: blocks still held at
    exit were reported by Python's resource tracker as leaked after each `pack_stats` / training run."""
    from echo4o_jax.data import pipeline

    c = dataclasses.replace(_cfg(data, packs_per_step=2, max_buffer_size=4), worker_count=2,
                            worker_buffer_size=2, read_threads=1)
    it = DataPipeline(c, model_cfg).iterator()
    seen = []
    orig = pipeline._own_arrays

    def spy(el):
        seen.append(el)
        return orig(el)

    try:
        pipeline._own_arrays = spy
        for _ in range(3):
            next(it)
        held = it._buffer + it._carry
    finally:
        pipeline._own_arrays = orig
        it.close()
    arrays = lambda x: ([a for v in x.values() for a in arrays(v)] if isinstance(x, dict) else  # noqa: E731
                        [a for v in x for a in arrays(v)] if isinstance(x, (list, tuple)) else
                        [x] if isinstance(x, np.ndarray) else [])
    assert any(type(a) is not np.ndarray for el in seen for a in arrays(el))  # shared memory did arrive
    assert held and all(type(a) is np.ndarray for el in held for a in arrays(el))


def test_two_processes_see_each_sample_once_per_epoch(data, model_cfg):
    seen = {}
    for epochs in (1, 2):
        ids = []
        orders = []
        for p in range(2):
            c = _cfg(data, num_epochs=epochs, packs_per_step=3)
            out, _ = _run(DataPipeline(c, model_cfg, process_index=p, process_count=2), 10**6)
            pid = [i for _, st in out for pack in st["sample_ids"] for i in pack]
            assert out[-1][1]["end_of_data"] and out[-1][1]["skipped_too_long"] == 0
            ids += pid
            orders.append(pid)
            last = out[-1][0]
            assert last["sample_id"].shape[0] == 3
        seen[epochs] = (ids, orders)
    ids1 = seen[1][0]
    assert sorted(ids1) == sorted(f"a{i}" for i in range(60))  # each exactly once
    assert not set(seen[1][1][0]) & set(seen[1][1][1])  # disjoint per process
    ids2 = seen[2][0]
    assert sorted(ids2) == sorted([f"a{i}" for i in range(60)] * 2)


def test_resharded_state_goes_on_with_each_datasets_order(data, model_cfg, tmp_path):
    """2 processes read 3 steps of a mix of 60 and 7 records (the 7 wrap into later epochs, not divisible by
    the process counts); 3 processes, then 1, resume from their states: each new process reads, per dataset,
    exactly its own places of the global epoch-major order from the first position the old processes had not
    reached together (the reference order is one process's), `read_twice` counts the old reads past that
    position (enumerated here), and the samples the old processes held in their buffers are shared out."""
    from echo4o_jax.data.records import decode_record

    small = _write_dataset(tmp_path / "small", 7, 9, prefix="s", sizes=(16,))
    c = _cfg(data, datasets=(DatasetSpec(data["a"], 2.0), DatasetSpec(small, 1.0)), packs_per_step=2,
             max_buffer_size=4)
    olds = [DataPipeline(c, model_cfg, process_index=p, process_count=2) for p in range(2)]
    states = [json.loads(json.dumps(_run(pipe, 3)[1])) for pipe in olds]
    held = sorted(olds[i].elements[k]["id"] for i, st in enumerate(states) for k in st["buffer"] + st["carry"])
    one = DataPipeline(c, model_cfg)  # one process reads every place: its record stream is the global order
    sizes = one.dataset_sizes
    assert sizes == [60, 7]
    glob = lambda d, g: decode_record(one._parts[d][g][2]).id
    used = [[st["read_by_dataset"][d] for st in states] for d in range(2)]  # records read per old process
    assert sum(used[1]) > 7  # the small dataset is past its first epoch
    twice = 0
    for d, n in enumerate(sizes):  # the old processes' reads as global positions: read again if past sum(used)
        for i, u in enumerate(used[d]):
            L = len(range(i, n, 2))
            twice += sum((j // L) * n + i + (j % L) * 2 >= sum(used[d]) for j in range(u))
    assert held  # handing over exercised
    for P in (3, 1):
        taken = []
        for p in range(P):
            pipe = DataPipeline(dataclasses.replace(c, packs_per_step=3 - P // 3), model_cfg, process_index=p,
                                process_count=P)
            state, info = pipe.resharded_state(states)
            assert info["read_twice"] == twice
            assert info["handed_over"] == len(held)
            taken += [pipe.held_element(x, state["offsets"])["id"] for x in state["buffer"]]
            els = pipe.elements_from(state["offsets"])
            read = [els[k] for k in range(30)]
            for d, n in enumerate(sizes):
                got = [e["id"] for e in read if e["dataset"] == d]
                places = (g for g in range(sum(used[d]), 10**6) if (g % n) % P == p)
                assert got == [glob(d, next(places)) for _ in got], (P, p, d)
            if P == 3 and p == 0:  # it trains its held samples and that stream; its state resumes exactly
                assert state["buffer"]
                full, _ = _run(pipe, 3, state)
                head, st = _run(pipe, 2, state)
                assert st["offsets"] == state["offsets"]
                tail, _ = _run(pipe, 1, json.loads(json.dumps(st)))
                _assert_same(head + tail, full)
                stream = [e["id"] for e in (els[k] for k in range(st["next_element"]))]
                trained = {i for _, b in head for pack in b["sample_ids"] for i in pack}
                assert trained <= set(stream) | set(held) and set(taken) <= trained
        assert sorted(taken) == held
    with pytest.raises(ValueError, match="another configuration"):
        DataPipeline(dataclasses.replace(c, seed=9), model_cfg).resharded_state(states)
    old = [{k: v for k, v in st.items() if k != "read_by_dataset"} for st in states]
    with pytest.raises(ValueError, match="older version"):
        DataPipeline(c, model_cfg).resharded_state(old)


def test_mixing_by_weight(data, model_cfg):
    c = _cfg(data, datasets=(DatasetSpec(data["a"], 3.0, name="A"), DatasetSpec(data["b"], 1.0, name="B")),
             text_dropout=0.0)
    pipe = DataPipeline(c, model_cfg)
    names = [pipe.elements[k]["id"][0] for k in range(200)]
    assert names.count("a") == 150 and names.count("b") == 50
    out, _ = _run(pipe, 3)
    tot = {}
    for _, st in out:
        for k, v in st["samples_by_dataset"].items():
            tot[k] = tot.get(k, 0) + v
    assert set(tot) == {"A", "B"} and tot["A"] > tot["B"] > 0, tot  # (3:1 by weight)


def test_truncated_shard_named_when_the_pipeline_is_built(data, model_cfg, tmp_path):
    import shutil

    from echo4o_jax.data.records import RecordError

    d = tmp_path / "a"
    shutil.copytree(data["a"], d)
    shard = sorted(d.glob("*.array_record"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RecordError, match=re.escape(str(shard))):
        DataPipeline(_cfg(data, datasets=(DatasetSpec(str(d)),)), model_cfg)


def test_each_shard_opened_once_when_the_pipeline_is_built(data, model_cfg, monkeypatch):
    """Building the pipeline opens every shard exactly once (its record count); grain's source is given the
    counts and opens a shard only to read it."""
    from echo4o_jax.data.records import resolve_shards
    from test_data_records import count_shard_opens

    c = _cfg(data, datasets=(DatasetSpec(data["a"], 3.0), DatasetSpec(data["b"], 1.0)), shuffle=False)
    shards = resolve_shards(data["a"]) + resolve_shards(data["b"])
    assert len(resolve_shards(data["a"])) > 1 and len(resolve_shards(data["b"])) > 1
    opened = count_shard_opens(monkeypatch)
    pipe = DataPipeline(c, model_cfg)
    assert opened == collections.Counter(shards)  # old code: twice each (count, then grain's source)
    els = [pipe.elements[k] for k in range(4)]  # read through the lazily opened readers
    assert [e["id"] for e in els] == ["a0", "a1", "a2", "b0"] and all(e["error"] is None for e in els)


def test_overlong_and_corrupt_samples_counted(data, model_cfg):
    c = _cfg(data, datasets=(DatasetSpec(data["bad"]),), num_epochs=1, shuffle=False)
    pipe = DataPipeline(c, model_cfg)
    out, state = _run(pipe, 100)
    ids = [i for _, st in out for p in st["sample_ids"] for i in p]
    st = out[-1][1]
    assert st["skipped_too_long"] == 2
    # both over-long records (x4, x7: 4 references + target) are within the per-sample limit but exceed the
    # budget's ViT tokens (the first segment checked) in an empty pack
    sizes = {e["id"]: e["sizes"] for e in (pipe.elements[k] for k in range(12)) if e["id"] in ("x4", "x7")}
    for i in ("x4", "x7"):
        assert sum(sizes[i][:3]) <= c.max_tokens_per_sample and sizes[i][1] > BUDGET.vit_tokens
        assert skip_reason(sizes[i], c) == "vit_tokens"
    assert st["skipped_by"] == {"multiref/vit_tokens": 2}
    assert st["skipped_errors"] == 1
    assert sorted(ids) == sorted(f"x{i}" for i in range(12) if i not in (3, 4, 7))
    assert state["counters"]["elements_read"] == 12


def test_config_checks(data, model_cfg, tmp_path):
    ds, m = model_cfg.latent_downsample, model_cfg.max_latent_size
    with pytest.raises(ValueError, match="stride"):
        DataPipeline(_cfg(data, vae_transform=ImageTransform(4 * ds, ds, ds // 2)), model_cfg)
    with pytest.raises(ValueError, match="latent positions"):  # twice the latent table's side (256 px)
        DataPipeline(_cfg(data, vae_transform=ImageTransform(2 * m * ds, ds, ds)), model_cfg)
    other = model_cfg.replace(special_tokens=SpecialTokens(1, 2, 3, 4))
    with pytest.raises(ValueError, match="<|im_start|>"):
        DataPipeline(_cfg(data), other)
    with pytest.raises(ValueError, match="weight"):
        _cfg(data, datasets=(DatasetSpec(data["a"], 0.0),))
    with pytest.raises(ValueError, match="weight=inf must be a finite number > 0"):  # (was Grain's OverflowError)
        _cfg(data, datasets=(DatasetSpec(data["a"], float("inf")),))
    # transforms that resized every image to one stride (max_pixels <= 0, max_size 0) or min > max
    for bad in ((64, 16, 16, 0), (0, 0, 16), (32, 64, 16), (64, 16, 0)):
        with pytest.raises(ValueError, match="needs 0 < min_size <= max_size, stride >= 1, max_pixels >= 1"):
            ImageTransform(*bad)
    with pytest.raises(ValueError, match="process_index"):
        DataPipeline(_cfg(data), model_cfg, process_index=2, process_count=2)


def test_tokenizer_from_vocab_and_merges(tmp_path):
    """A checkpoint folder without tokenizer.json: Qwen2-style BPE from vocab.json + merges.txt."""
    from tokenizers import pre_tokenizers

    bl = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(bl))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    n = len(vocab)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n): {"content": "<|im_start|>", "special": True}, str(n + 1): {"content": "<|im_end|>", "special": True}}}))
    tok = load_tokenizer(tmp_path)
    enc = tok.encode("hello world", add_special_tokens=False)
    assert enc.tokens[:2] == ["hello", "Ġw"] and tok.decode(enc.ids) == "hello world"
    assert tok.token_to_id("<|im_end|>") == n + 1
    assert tok.encode("<|im_start|>hello", add_special_tokens=False).ids[0] == n


def test_pack_stats_of_the_demo_config(tmp_path, capsys):
    """`python -m echo4o_jax.data.pack_stats`: per-pack segment usage with unbounded segments (the official
    policy) and with the config's budget; with the suggested budget the packer takes every sample it took
    unbounded, so training with it packs exactly what the official policy packs (same packs, no early close)."""
    from conftest import load_file

    from echo4o_jax.data import pack_stats as ps
    from echo4o_jax.train.data_sources import budget_from_config
    from echo4o_jax.train.trainer import model_config_from

    root = pathlib.Path(__file__).resolve().parent.parent
    c = load_file(root / "configs" / "demo.py", "demo_config_pack_stats").get_config()
    c.data.records.demo_dir = str(tmp_path / "demo")
    # the demo's packing limits default to its budget's total: pin them, so that only the budget changes below
    c.data.max_tokens = budget_from_config(c.data.budget).total_tokens
    c.data.expected_tokens = int(0.8 * c.data.max_tokens)
    cfg = model_config_from(c)
    s = ps.pack_stats(c, cfg, packs=24)
    free, used, b = s["unbounded"], s["budget"], budget_from_config(c.data.budget)
    assert free.shape == used.shape == (24, 5)
    caps = np.array([b.text_tokens, b.vit_tokens, b.vae_tokens, b.vae_images, b.total_tokens])
    from echo4o_jax.train.records_source import pipeline_config_from

    assert np.all(used <= caps) and np.all(free[:, 4] <= pipeline_config_from(c, b, local_packs=1).max_tokens)
    assert not pipeline_config_from(c, b, local_packs=1).drop_unfit  # data.drop_unfit reaches the pipeline
    # the default expected_tokens: 80% of the budget, at most a lower data.max_tokens (above it no pack reached it)
    pinned = c.data.expected_tokens, c.data.max_tokens
    c.data.expected_tokens, c.data.max_tokens = 0, int(0.5 * b.total_tokens)
    assert pipeline_config_from(c, b, local_packs=1).expected_num_tokens == c.data.max_tokens
    c.data.max_tokens = 0
    assert pipeline_config_from(c, b, local_packs=1).expected_num_tokens == int(0.8 * b.total_tokens)
    c.data.expected_tokens, c.data.max_tokens = pinned
    c.data.drop_unfit = True
    assert pipeline_config_from(c, b, local_packs=1).drop_unfit
    c.data.drop_unfit = False
    assert np.all(free[:, :3].sum(1) == free[:, 4]) and np.all(used[:, :3].sum(1) == used[:, 4])
    assert free[:, 4].mean() > used[:, 4].mean()  # the demo's small budget closes packs early
    assert np.any(free[:, :4] > caps[:4])

    peaks = s["unbounded_peaks"]
    assert peaks.shape == (24, 4) and np.all(peaks >= free[:, :4])  # admission needs cover the final usage
    sug = ps.suggested_budget(peaks, b, round_to=16)
    assert np.all(peaks <= [sug.text_tokens, sug.vit_tokens, sug.vae_tokens, sug.vae_images])
    c.data.budget = dataclasses.asdict(sug)
    s2 = ps.pack_stats(c, cfg, packs=24)
    np.testing.assert_array_equal(s2["budget"], s2["unbounded"])
    np.testing.assert_array_equal(s2["unbounded"], free)

    c_lat = copy.deepcopy(c)  # a training config with precomputed latents (they change no size): same packs
    c_lat.data.vae_latents = str(tmp_path / "latents_not_needed_here")
    np.testing.assert_array_equal(ps.pack_stats(c_lat, cfg, packs=24)["budget"], s2["budget"])

    report = ps.format_report(s, round_to=16)
    assert f"real tokens per pack: {used[:, 4].mean():.0f} with the config's budget, {free[:, 4].mean():.0f}" in report
    assert f"vae_images={sug.vae_images}" in report and f"vae_tokens={sug.vae_tokens}" in report
    for name in ("unbounded", "budget"):  # samples packed / skipped by each run, from the pipeline's counters
        st = s[f"{name}_stats"]
        assert st["samples_packed"] > 0 and st["skipped_too_long"] == sum(st["skipped_by"].values())
        assert f"{name} run: {st['samples_packed']} samples packed, {st['skipped_too_long']} skipped" in report


# ---------------------------------------------------------------------------------------------- bad input


def test_unreadable_record_is_a_record_error_naming_dataset_shard_and_index(data, model_cfg, tmp_path):
    """A record whose shard chunk is corrupt (its bytes flipped after writing) stops the pipeline with a
    RecordError naming the shard file, the record's index in it and the dataset, also from Grain worker
    processes (it was riegeli's bare RuntimeError, raised inside Grain, naming no file)."""
    d = _write_dataset(tmp_path / "ds", 6, 7, prefix="c", sizes=(16,))
    assert load_manifest(d)["shards"][1]["records"] == 2
    shard, index = corrupt_record(d, 3)
    assert index == 1  # the second record of the second shard
    msg = re.escape(f"{shard}: record 1: cannot read (RuntimeError: ") + ".*hash mismatch.*" + re.escape(
        ") (dataset ds)")
    for workers in (0, 2):
        pipe = DataPipeline(_cfg(data, datasets=(DatasetSpec(d),), shuffle=False, num_epochs=1,
                                 worker_count=workers), model_cfg)
        with pytest.raises(RecordError) as e:
            _run(pipe, 10)
        assert re.fullmatch(msg, str(e.value)), str(e.value)


def test_a_record_that_does_not_decode_is_told_by_its_shard_and_index(data, model_cfg, tmp_path, monkeypatch):
    """A record whose bytes are no record (no id to name it by) is skipped, and the skip names its shard file and
    its index there, after the shuffle, in every epoch and from worker processes (it was reported as record
    None)."""
    import echo4o_jax.data.records as records_mod

    real = records_mod.encode_record
    monkeypatch.setattr(records_mod, "encode_record",
                        lambda rec, **kw: b"not a record" if rec.id == "g4" else real(rec, **kw))
    d = _write_dataset(tmp_path / "g", 9, 11, prefix="g", sizes=(16,))
    monkeypatch.setattr(records_mod, "encode_record", real)
    m, k, i = load_manifest(d), 0, 4
    while i >= m["shards"][k]["records"]:
        i, k = i - m["shards"][k]["records"], k + 1
    assert k > 0  # (not the first shard: the index in the shard is not the index in the dataset)
    where = f"{os.path.join(d, m['shards'][k]['file'])}: record {i} (dataset g)"
    for workers in (0, 2):
        it = DataPipeline(_cfg(data, datasets=(DatasetSpec(d),), num_epochs=2, worker_count=workers),
                          model_cfg).iterator()
        try:
            for _ in it:
                pass
        finally:
            it.close()
        assert [(e["id"], e["where"]) for e in it.recent_errors] == [(None, where)] * 2, list(it.recent_errors)
        assert it.recent_errors[0]["error"].startswith("RecordError: ")


def test_training_names_each_record_skipped_as_undecodable(tmp_path, capsys):
    """A record whose image does not decode is skipped (the run goes on); training prints its id and the error,
    and logs a `data_skipped_errors` event: it was only a counter in log.jsonl."""
    from echo4o_jax.train.__main__ import run
    from test_latents import _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    d = _write_dataset(tmp_path / "ds", 6, 5, prefix="s", sizes=(32,), corrupt=(0, 3))
    c = _config(d, tok)
    c.train.steps, c.log.every, c.log.sample_every = 3, 1, 0
    assert run(c, str(tmp_path / "wd")) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("[data] record ")]
    assert {x.split()[2] for x in lines} == {"s0", "s3"}, out  # (read again each epoch)
    assert all(x.endswith("skipped: OSError: image file is truncated") for x in lines), out
    assert all(re.search(r"^\[data\] record s[03] \(.*/ds/.*: record \d+ \(dataset ds\)\) skipped", x) for x in lines), out
    assert "[data] 2 unreadable record(s) skipped so far" in out
    events = [json.loads(x) for x in (tmp_path / "wd" / "log.jsonl").read_text().splitlines()]
    ev = [e for e in events if e.get("event") == "data_skipped_errors"]
    assert ev and ev[0]["total"] == 2 and {r["id"] for e in ev for r in e["recent"]} == {"s0", "s3"}
    # a resume goes on counting from the checkpoint's count: only this run's skips are reported (the earlier
    # ones were reported again, as "... and N more", with an event naming none)
    c.train.steps = 6
    assert run(c, str(tmp_path / "wd")) == 0
    out = capsys.readouterr().out
    assert "more record(s) skipped" not in out
    events = [json.loads(x) for x in (tmp_path / "wd" / "log.jsonl").read_text().splitlines()]
    ev = [e for e in events if e.get("event") == "data_skipped_errors"]
    assert all(len(b["recent"]) == b["total"] - a["total"] for a, b in zip(ev, ev[1:]))


def test_train_command_reports_an_unreadable_record_in_one_line(tmp_path, capsys):
    from echo4o_jax.train.__main__ import run
    from test_latents import _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    d = _write_dataset(tmp_path / "ds", 3, 5, prefix="s", sizes=(32,))
    shard, index = corrupt_record(d, 1)
    assert run(_config(d, tok), str(tmp_path / "wd")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(re.escape(f"error: {shard}: record {index}: cannot read (RuntimeError: ")
                                          + ".*hash mismatch.*" + re.escape(") (dataset ds)"), err[0]), err


def _failed_dataset(d, n: int = 4, error: str = "2 samples failed (s7, s9); run the same command again") -> str:
    """A dataset whose writer ended with `error` after `n` records (a synthesis run with failed samples, an
    import that failed): its manifest says "complete": false and the error."""
    rng = np.random.default_rng(3)
    w = RecordWriter(d, shard_bytes=6000, name="p")
    for i in range(n):
        w.write(t2i_record(f"p{i}", _words(rng, 4), _rand_png(rng, 32, 32)))
    w.close(error=error)
    return str(d)


def test_incomplete_dataset_refused_unless_allowed(data, model_cfg, tmp_path, capsys):
    """The pipeline refuses a dataset whose manifest says it is incomplete, naming the manifest, its error and
    how to go on; `allow_incomplete` (the training config's data.records.allow_incomplete) reads it with a
    warning line. The train command prints the refusal as one line, exit status 2."""
    from echo4o_jax.train.__main__ import run
    from echo4o_jax.train.data_sources import make_source
    from test_latents import _config

    d = _failed_dataset(tmp_path / "part")
    shards = len(load_manifest(d)["shards"])
    why = (f"{d}/manifest.json says the dataset is incomplete (error: 2 samples failed (s7, s9); run the same "
           f"command again); it holds 4 records in {shards} shards")
    refused = (f"dataset part: {why}: run the command that wrote it again to complete it (an import with "
               "--overwrite; a synthesis run as it was: it goes on where it stopped), or set "
               "data.records.allow_incomplete=True "
               "(PipelineConfig.allow_incomplete) to use the records it holds")
    with pytest.raises(RecordError) as e:
        DataPipeline(_cfg(data, datasets=(DatasetSpec(d),)), model_cfg)
    assert str(e.value) == refused
    assert capsys.readouterr().err == ""
    pipe = DataPipeline(_cfg(data, datasets=(DatasetSpec(d),), num_epochs=1, allow_incomplete=True), model_cfg)
    assert capsys.readouterr().err == f"warning: dataset part: {why}; using these records (allow_incomplete)\n"
    out, _ = _run(pipe, 10)
    assert sorted(i for _, st in out for p in st["sample_ids"] for i in p) == ["p0", "p1", "p2", "p3"]

    tok = _tokenizer_json(tmp_path / "tok.json")
    c = _config(d, tok)
    assert run(c, str(tmp_path / "wd")) == 2
    assert capsys.readouterr().err == f"error: {refused}\n"
    c.data.records.allow_incomplete = True
    src = make_source(c, model_cfg, process_index=0, process_count=1, local_packs=1)
    assert capsys.readouterr().err == ""  # warned once per process (above)
    next(src)
    assert set(i for p in src.last_stats["sample_ids"] for i in p) <= {"p0", "p1", "p2", "p3"}


def test_an_incomplete_dataset_is_refused_when_named_by_a_glob_or_killed_before_its_first_manifest(
        data, model_cfg, tmp_path, monkeypatch):
    """Shards named by a glob into an incomplete dataset are refused as the folder is (they were read as a
    complete dataset). A writer writes its manifest ("complete": false) when it opens: one killed after its
    first shard's rename, before a manifest listed it, left shards and no manifest, read as complete."""
    d = _failed_dataset(tmp_path / "part")
    with pytest.raises(RecordError, match=re.escape(f"dataset part: {d}/manifest.json says the dataset is "
                                                    "incomplete")):
        DataPipeline(_cfg(data, datasets=(DatasetSpec(f"{d}/*.array_record", name="part"),)), model_cfg)
    with pytest.raises(RecordError, match="says the dataset is incomplete"):
        DataPipeline(_cfg(data, datasets=(DatasetSpec(sorted(glob.glob(f"{d}/*.array_record"))[0],
                                                      name="part"),)), model_cfg)
    monkeypatch.chdir(d)  # a glob relative to the current folder (its folder part is empty)
    with pytest.raises(RecordError, match=re.escape("dataset part: ./manifest.json says the dataset is incomplete")):
        DataPipeline(_cfg(data, datasets=(DatasetSpec("*.array_record", name="part"),)), model_cfg)
    # a reader of some shards reads those, and verifies them against the folder's manifest (which lists them all)
    first = sorted(glob.glob("*.array_record"))[0]
    r = RecordReader(first, verify=True)
    assert len(r) == load_manifest(d)["shards"][0]["records"] and list(r.manifests) == ["."]
    assert r.verification == {"shards_checked": 1, "records": len(r)}
    monkeypatch.chdir(tmp_path)
    killed = tmp_path / "killed"
    w = RecordWriter(killed, name="k")  # ("killed": never closed, no shard finished)
    m = load_manifest(killed)
    assert m["complete"] is False and m["records"] == 0 and m["shards"] == []
    del w
    with pytest.raises(RecordError, match=re.escape(f"{killed}/manifest.json says the dataset is incomplete (no "
                                                    "error recorded: its writer was interrupted)")):
        DataPipeline(_cfg(data, datasets=(DatasetSpec(str(killed)),)), model_cfg)
    bad = tmp_path / "nonutf8"
    bad.mkdir()
    (bad / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(RecordError, match=re.escape(f"{bad}/manifest.json: invalid JSON ('utf-8' codec")):
        load_manifest(bad)


def test_pack_stats_command_reports_bad_input_in_one_line(tmp_path):
    """`python -m echo4o_jax.data.pack_stats` reports bad input as the train command does: one `error:` line,
    exit status 2 (they were tracebacks): an unknown config key, a missing dataset, an unreadable record,
    transforms too large for the model, a tokenizer of other special-token ids, an incomplete dataset (read,
    with a warning, under data.records.allow_incomplete=True)."""
    from test_latents import _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    good = _write_dataset(tmp_path / "ds", 4, 5, prefix="s", sizes=(32,))

    def cmd(c, *args):
        return subprocess.run([sys.executable, "-m", "echo4o_jax.data.pack_stats", "--config",
                               config_file(tmp_path / "cfg.py", c), "--packs", "2", *args], capture_output=True,
                              text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)

    assert one_error_line(cmd(_config(good, tok), "--config.data.bogus=1")) == "error: unknown config key data.bogus"
    assert one_error_line(cmd(_config(tmp_path / "nope", tok))) == (
        f"error: {tmp_path / 'nope'}: no such dataset, shard or glob match")
    # the recipe's dataset names (relative) with data.records.root left unset: the root is named
    assert one_error_line(cmd(_config("surreal", tok))) == (
        f"error: bad config: data (records): data.records.root is not set, and dataset 'surreal' is not in the "
        f"current folder {ROOT}: set --config.data.records.root=<the folder holding the datasets>")
    assert one_error_line(cmd(_config(good, tok, records=dict(datasets=[dict(path=good, weight=1.0)],
                                                              vae_transform=(1024, 512, _DS))))) == (
        "error: bad config: data (records): dataset ds: VAE max_size 1024 exceeds the model's "
        f"{_MODEL.max_latent_size} latent positions per side")
    ids = tuple(i - 50 for i in SPECIALS)  # other special-token ids (100, 101, 102, 103)
    other = _tokenizer_json(tmp_path / "other.json", n_words=min(ids), specials=ids)
    assert one_error_line(cmd(_config(good, other))) == (
        f"error: bad config: data (records): tokenizer {other}: <|im_start|> has id {ids[0]}, the model config says "
        f"bos_token_id={_ST.bos_token_id}")
    part = _failed_dataset(tmp_path / "part")
    assert one_error_line(cmd(_config(part, tok))).startswith(
        f"error: dataset part: {part}/manifest.json says the dataset is incomplete (error: 2 samples failed")
    c = _config(part, tok)
    c.data.records.allow_incomplete = False  # the key of config_base's records defaults
    r = cmd(c, "--config.data.records.allow_incomplete=True")
    assert r.returncode == 0 and "real tokens per pack" in r.stdout, r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if "warning" in line] == [  # once, not per pipeline built
        f"warning: dataset part: {part}/manifest.json says the dataset is incomplete (error: 2 samples failed (s7, "
        f"s9); run the same command again); it holds 4 records in {len(load_manifest(part)['shards'])} shards; using "
        "these records (allow_incomplete)"]
    bad = _write_dataset(tmp_path / "bad", 3, 5, prefix="s", sizes=(32,))
    shard, index = corrupt_record(bad, 1)
    assert re.fullmatch(re.escape(f"error: {shard}: record {index}: cannot read (RuntimeError: ") + ".*" +
                        re.escape(") (dataset bad)"), one_error_line(cmd(_config(bad, tok))))


def test_state_of_other_records_under_the_same_files_is_refused(data, model_cfg, tmp_path):
    """An iterator state resumes only over the records it was saved with: a dataset rewritten in place (same
    shard file names, other records) is refused naming it, as is a reshard onto it; a state saved before states
    recorded their records ("contents" absent) is resumed as before."""
    import shutil

    from echo4o_jax.data.pipeline import DataContentsError

    d = tmp_path / "mine"
    _write_dataset(d, 8, 3, prefix="m", sizes=(16,))
    c = _cfg(data, datasets=(DatasetSpec(data["a"], 1.0), DatasetSpec(str(d), 1.0)))
    _, state = _run(DataPipeline(c, model_cfg), 2)
    shutil.rmtree(d)
    _write_dataset(d, 8, 4, prefix="m", sizes=(16,))
    pipe = DataPipeline(c, model_cfg)
    assert pipe.fingerprint == state["fingerprint"]  # (paths and settings: the same)
    with pytest.raises(DataContentsError, match=r"the records of dataset\(s\) mine differ from those the iterator "
                                                r"state was saved with"):
        pipe.iterator(state)
    with pytest.raises(DataContentsError, match="mine"):
        pipe.resharded_state([state])
    old = {k: v for k, v in state.items() if k != "contents"}
    with pytest.raises(DataContentsError, match="does not record its records"):  # (told only by its paths then)
        pipe.iterator(old)
    legacy = {**old, "fingerprint": pipe._fingerprint(paths=True)}  # (saved before contents were recorded)
    pipe.iterator(legacy).close()


def test_state_of_another_tokenizer_is_refused_and_a_moved_copy_resumes(data, model_cfg, tmp_path):
    """Another tokenizer (other token ids: other sample lengths, other packs) under the same special tokens was
    accepted on resume; it is refused naming the tokenizer (a reshard too). The same tokenizer copied elsewhere,
    and a state saved before the tokenizer was recorded, resume."""
    import shutil

    from echo4o_jax.data.pipeline import DataContentsError

    c = _cfg(data)
    ref, state = _run(DataPipeline(c, model_cfg), 2)
    other = _tokenizer_json(tmp_path / "other.json", n_words=N_WORDS - 1)  # (the same special tokens)
    pipe = DataPipeline(dataclasses.replace(c, tokenizer=other), model_cfg)
    for resume in (pipe.iterator, lambda st: pipe.resharded_state([st])):
        with pytest.raises(DataContentsError, match=rf"the tokenizer {re.escape(other)} is not the one the iterator "
                                                    r"state was saved with") as e:
            resume(state)
        assert e.value.inputs == "tokenizer"
    moved = shutil.copy(data["tok"], tmp_path / "moved.json")
    full, _ = _run(DataPipeline(c, model_cfg), 4)
    tail, _ = _run(DataPipeline(dataclasses.replace(c, tokenizer=str(moved)), model_cfg), 2, state=state)
    _assert_same(tail, full[2:])
    pipe.iterator({k: v for k, v in state.items() if k != "tokenizer"}).close()  # (an older state: as before)


def test_a_dataset_moved_elsewhere_resumes_exactly(data, model_cfg, tmp_path):
    """The same records under another path (copied to a local disk, another mount or data.records.root): the
    state resumes exactly and reshards (both refused it: the fingerprint held every shard's absolute path, so
    the only way on was train.data_resume=restart, which replays the stream from its start). A state saved with
    the paths in its fingerprint still resumes where they are the same."""
    import shutil

    c = _cfg(data, datasets=(DatasetSpec(data["a"], 2.0), DatasetSpec(data["b"], 1.0)), max_buffer_size=4)
    full, _ = _run(DataPipeline(c, model_cfg), 6)
    _, state = _run(DataPipeline(c, model_cfg), 3)
    moved = [shutil.copytree(p, tmp_path / f"moved_{i}") for i, p in enumerate((data["a"], data["b"]))]
    c2 = dataclasses.replace(c, datasets=tuple(DatasetSpec(str(m), spec.weight) for m, spec in zip(moved, c.datasets)))
    pipe = DataPipeline(c2, model_cfg)
    tail, _ = _run(pipe, 3, state=state)
    _assert_same(tail, full[3:])
    pipe.resharded_state([state])
    legacy = {**state, "fingerprint": DataPipeline(c, model_cfg)._fingerprint(paths=True)}
    _run(DataPipeline(c, model_cfg), 1, state=legacy)
    with pytest.raises(ValueError, match="another configuration"):  # (the paths it holds are not these)
        pipe.iterator(legacy)


def test_a_budget_no_sample_fits_is_an_error_not_a_hang(data, model_cfg, tmp_path):
    """With data that repeats, a budget no sample fits skipped samples forever without emitting a pack (a
    training run hung at its first step, deaf to SIGTERM): after twice the datasets' records in a row it is a
    PackBudgetError naming the skip reasons and the budget; `pack_stats` adds the budget that fits."""
    import subprocess
    import sys

    from echo4o_jax.data.pipeline import PackBudgetError

    tiny = dataclasses.replace(BUDGET, text_tokens=4)
    it = DataPipeline(_cfg(data, budget=tiny), model_cfg).iterator()
    with pytest.raises(PackBudgetError, match=r"^\d+ samples in a row were skipped as too long \(\d+ x t2i/"
                                              r"text_tokens, .*\): no sample of the data fits the pack budget "
                                              r"\(text_tokens=4, "):
        next(it)
    it.close()
    assert it.counters["skipped_too_long"] == 2 * 60 + 101  # (dataset "a": 60 records)
    from test_latents import _config

    c = _config(_write_dataset(tmp_path / "ds", 4, 5, prefix="s", sizes=(32,)), _tokenizer_json(tmp_path / "t.json"))
    c.data.budget.text_tokens = 4
    r = subprocess.run([sys.executable, "-m", "echo4o_jax.data.pack_stats", "--config",
                        config_file(tmp_path / "cfg.py", c), "--packs", "2"], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    line = one_error_line(r)
    assert "no sample of the data fits the pack budget (text_tokens=4" in line
    assert re.search(r"; on this data: --config.data.budget.text_tokens=\d+ --config.data.budget.vit_tokens=\d+ "
                     r"--config.data.budget.vae_tokens=\d+ --config.data.budget.vae_images=\d+$", line), line


def test_a_data_error_mid_run_saves_the_steps_trained_first(tmp_path, capsys, monkeypatch):
    """A record that cannot be read after some steps (a corrupt shard hours into a run) ended the run without
    saving what it had trained since the last checkpoint; they are saved first and the error line says so (on
    a line of its own, not glued to the progress bar)."""
    from echo4o_jax.data.records import RecordError
    from echo4o_jax.train import records_source
    from echo4o_jax.train.__main__ import run
    from test_latents import _config

    tok = _tokenizer_json(tmp_path / "tok.json")
    d = _write_dataset(tmp_path / "ds", 12, 5, prefix="s", sizes=(32,))
    real, calls = records_source.RecordsSource.__next__, []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:
            raise RecordError(f"{d}/s-00001.array_record: record 1: cannot read (RuntimeError: hash mismatch)")
        return real(self)

    monkeypatch.setattr(records_source.RecordsSource, "__next__", failing)
    c = _config(d, tok)
    c.train.steps = 10
    c.checkpoint.update(every=1000, async_save=False)
    wd = tmp_path / "wd"
    assert run(c, str(wd)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"error: {d}/s-00001.array_record: record 1: cannot read (RuntimeError: hash mismatch) [the 2 "
                   f"step(s) this run trained were saved: checkpoint 2 in {wd / 'checkpoints'}; the same command "
                   "resumes from it once the data is fixed]"]
    assert (wd / "checkpoints" / "2").is_dir()


def test_a_failed_step_leaves_the_state_before_it(data, model_cfg, monkeypatch):
    """A step that fails part-way (a record that cannot be read while its second pack fills) had already taken
    samples from the stream and the buffer into its first pack, in no buffer or carry: the state a trainer saves
    then skipped them on resume. get_state() now gives the state before that step, and a resume from it yields
    what an uninterrupted run does."""
    from echo4o_jax.data.pipeline import PackIterator
    from echo4o_jax.data.records import RecordError

    c = _cfg(data, packs_per_step=2, max_buffer_size=4)
    ref, _ = _run(DataPipeline(c, model_cfg), 5)
    it = DataPipeline(c, model_cfg).iterator()
    head = [(batch_arrays(b), st) for b, st in (next(it) for _ in range(2))]
    before = json.loads(json.dumps(it.get_state()))
    real, calls = PackIterator._fill_pack, []

    def failing(self):
        calls.append(1)
        if len(calls) == 2:  # the step's second pack
            raise RecordError("x.array_record: record 3: cannot read")
        return real(self)

    monkeypatch.setattr(PackIterator, "_fill_pack", failing)
    with pytest.raises(RecordError):
        next(it)
    monkeypatch.undo()
    assert it.get_state() == before
    with pytest.raises(RuntimeError, match="failed in an earlier step"):
        next(it)
    it.close()
    tail, _ = _run(DataPipeline(c, model_cfg), 3, state=it.get_state())
    _assert_same(head + tail, ref)
