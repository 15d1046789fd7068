"""CPU: our XLA train step vs a NAIVE per-sample dense-mask implementation of the same model, in one run.

    python bench/cpu_baseline.py [--steps 5] [--hidden 256 --layers 4] [--image 192] [--out cpu_baseline.json]

The naive variant is the shape the official PyTorch BAGEL takes on CPU (no flex attention): for every sample
of the pack, a dense float [len, len] mask (0 / -inf, the official `prepare_attention_mask_per_sample`)
is built on the host, K/V are repeated to the query heads (`repeat_kv`) and attention runs per sample as
softmax(q k^T * scale + mask) v (SDPA with a float mask); the per-sample outputs are scattered back.
Everything else is identical: same model, same parameters (same seed), same pack, same dtype, same train
step (VAE encode, loss, backward, AdamW, EMA). It is swapped in by replacing the attention function the
decoder calls (`echo4o_jax.model.qwen2_mot.attention`) while the naive step is traced.

Variants, all compiled with jit: `xla_blockwise` (default impl), `xla_dense` (one masked L x L attention over
the whole pack) and `naive_per_sample`; `no_attention` (attention replaced by its query input) times
everything else in the step, the floor any attention implementation adds to. `xla_blockwise+latents` is our
step on the same pack with precomputed VAE latents (`data.vae_latents`: the batch carries the posterior
moments of its images, computed here with the same VAE, and the frozen encoder leaves the step; same loss):
not the same work as the naive step, which encodes in the step as the official code does, but what our
train step costs when the data pipeline option is used. Steps of the variants are interleaved (round-robin) so that load from
other processes on the machine hits them alike; the table reports the median step time and tokens/s over
real (non-padding) tokens, and the losses of the first step (they must agree: same math).

Bounds printed with the table (why the XLA path cannot be 2x the naive one at these shapes): the naive
attention computes sum(len_i^2) scores per head, the mask allows A of them, and no exact attention computes
fewer than A, so at the naive's efficiency per score attention can at best get sum(len_i^2) / A faster
(BAGEL's mask is mostly dense inside a sample: images attend fully, the noisy target sees everything before
it). With `naive_per_sample` and `no_attention` both run, the step bounds follow (Amdahl): with free
attention, T_naive / T_floor; with attention at that score-count bound, T_naive / (T_floor + (T_naive -
T_floor) * A / sum(len_i^2)).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench_common import UsageError, check_at_least, check_out, usage_error  # noqa: E402


VARIANTS = ("xla_blockwise", "xla_dense", "naive_per_sample", "no_attention")


def make_config(args):
    from echo4o_jax.train.config_base import base_config

    c = base_config()
    g = c.model.geometry
    V = args.vocab
    H = args.hidden
    g.llm = dict(vocab_size=V, hidden_size=H, intermediate_size=4 * H, num_layers=args.layers, num_heads=H // 32,
                 num_kv_heads=max(1, H // 128), head_dim=32, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    g.vit = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, patch_size=14, image_size=364)
    g.vae = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, downsample=8)
    g.special_tokens = dict(bos_token_id=V - 4, eos_token_id=V - 3, start_of_image=V - 2, end_of_image=V - 1)
    g.max_latent_size = 32
    g.vit_max_num_patch_per_side = 26
    c.model.compute_dtype = args.dtype
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.data.kind = "synthetic"
    c.data.packs_per_step = 1
    s = args.image
    c.data.synthetic = dict(image_size=(s, s), text_len=args.text_len, t2i=args.t2i, edit=args.edit, und=args.und)
    c.data.budget = dict(text_tokens=args.text_budget, vit_tokens=args.vit_budget, vae_tokens=args.vae_budget,
                         vae_images=args.t2i + 2 * args.edit, vae_image_size=(s, s))
    c.log.tensorboard = False
    c.log.sample_every = 0
    c.optim.warmup_steps = 0
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def naive_attention_for(batch):
    """An attention function with the same signature as `echo4o_jax.model.attention.attention`, doing the
    naive per-sample dense-mask computation for the (host-known) single pack `batch`."""
    import numpy as np

    from echo4o_jax.model.attention import TokenMeta

    return naive_attention_from_meta(
        TokenMeta(*(np.asarray(getattr(batch, k))[0] for k in ("sample_id", "split_id", "split_mode", "order"))))


def naive_attention_from_meta(meta):
    """`naive_attention_for` from one pack's numpy TokenMeta: (attention function, sample lengths)."""
    import jax.numpy as jnp
    import numpy as np

    from echo4o_jax.model.attention import TokenMeta

    sid = np.asarray(meta.sample)
    samples = []
    for s in range(int(sid.max()) + 1):
        idx = np.nonzero(sid == s)[0]
        m = TokenMeta(*(np.asarray(x)[idx] for x in meta))
        allowed = _np_mask(m)
        samples.append((idx, np.where(allowed, 0.0, -np.inf).astype(np.float32)))  # official float mask

    def attention(q, k, v, q_meta, k_meta, *, scale, **_):  # impl / block / tuning arguments: unused
        L, H, D = q.shape
        KVH = k.shape[1]
        k_r = jnp.repeat(k, H // KVH, axis=1)  # repeat_kv
        v_r = jnp.repeat(v, H // KVH, axis=1)
        out = jnp.zeros((L, H, D), q.dtype)  # padding rows: unused (no sample attends to them)
        for idx, mask in samples:
            qs, ks, vs = q[idx], k_r[idx], v_r[idx]
            s = jnp.einsum("qhd,khd->hqk", qs, ks, preferred_element_type=jnp.float32) * scale + mask[None]
            p = jax_softmax(s)
            o = jnp.einsum("hqk,khd->qhd", p.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
            out = out.at[idx].set(o.astype(q.dtype))
        return out

    return attention, [len(i) for i, _ in samples]


def with_moments(tr, batch):
    """`batch` with its VAE images replaced by their posterior moments (the trainer's VAE, each image on its
    pack's official canvas, `train.step.image_moments`), as the data pipeline's `vae_latents` option gives."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from echo4o_jax.packing import batch_arrays
    from echo4o_jax.train.step import image_moments

    f = tr.cfg.vae.downsample
    m = jax.jit(lambda st, b: image_moments(nnx.merge(tr.vae_graphdef, st), b))(tr.vae_state, batch_arrays(batch))
    return dataclasses.replace(batch, vae_images=None, vae_moments=np.asarray(m),
                               vae_image_hw=np.asarray(batch.vae_image_hw) // f)


def jax_softmax(s):
    import jax

    return jax.nn.softmax(s, axis=-1)


def score_counts(batch) -> tuple[int, int]:
    """(sum over samples of len^2, number of (query, key) pairs the mask allows) for the single pack `batch`."""
    import numpy as np

    from echo4o_jax.model.attention import TokenMeta

    meta = TokenMeta(*(np.asarray(getattr(batch, k))[0] for k in ("sample_id", "split_id", "split_mode", "order")))
    naive = allowed = 0
    for s in range(int(meta.sample.max()) + 1):
        idx = np.nonzero(meta.sample == s)[0]
        naive += len(idx) ** 2
        allowed += int(_np_mask(TokenMeta(*(x[idx] for x in meta))).sum())
    return naive, allowed


def _np_mask(m):
    """numpy copy of `mask_from_meta` for one sample's tokens (no padding)."""
    import numpy as np

    from echo4o_jax.model.attention import CAUSAL, NOISE

    same_split = m.split[:, None] == m.split[None, :]
    causal = m.order[None, :] <= m.order[:, None]
    bidir = same_split & (m.mode[:, None] != CAUSAL)
    hidden_noise = (m.mode[None, :] == NOISE) & ~same_split
    return (causal | bidir) & ~hidden_noise & np.ones_like(same_split)


def check_args(args) -> dict[str, tuple[str, int]]:
    """{variant: (its base, its attention block)}; UsageError for bad input, found before anything is compiled
    (the model's and the data's settings checked as the Trainer checks them, and the pack built once)."""
    from echo4o_jax.packing import PackOverflowError
    from echo4o_jax.train.data_sources import make_source
    from echo4o_jax.train.trainer import ConfigValueError, model_config_from, validate_config

    check_at_least(steps=(args.steps, 1), hidden=(args.hidden, 32), layers=(args.layers, 1), vocab=(args.vocab, 1),
                   block=(args.block, 1), text_len=(args.text_len, 1), t2i=(args.t2i, 0), edit=(args.edit, 0),
                   und=(args.und, 0))
    if args.hidden % 32:  # make_config's heads are 32 wide
        raise UsageError(f"--hidden {args.hidden}: must be a multiple of 32 (the attention heads' width)")
    if args.image < 16 or args.image % 16:  # the VAE's 8x downsampling, then 2x2 latent patches
        raise UsageError(f"--image {args.image}: must be a positive multiple of 16")
    if not args.t2i + args.edit + args.und:
        raise UsageError("--t2i, --edit and --und are all 0: the pack needs at least one sample")
    check_out("--out", args.out)
    parsed = {}
    for name in [v for v in args.variants.split(",") if v]:
        base, _, block = name.removesuffix("+latents").partition(":")
        if base not in VARIANTS or (block and not block.isdigit()):
            raise UsageError(f"--variants: unknown variant {name!r} (one of {', '.join(VARIANTS)}, optionally with "
                             ":BLOCK and / or +latents)")
        parsed[name] = (base, int(block) if block else args.block)
    if not parsed:
        raise UsageError(f"--variants {args.variants!r}: no variant given")
    c = make_config(args)
    try:
        validate_config(c)
        cfg = model_config_from(c)
    except ConfigValueError as e:
        raise UsageError(f"{e} (from --hidden / --layers / --vocab / the budgets)") from None
    for name, (base, block) in parsed.items():
        c.model.attention_block_q = c.model.attention_block_kv = block
        try:
            validate_config(c)
        except ConfigValueError as e:
            raise UsageError(f"--variants {name}: {e}") from None
    try:
        next(make_source(c, cfg, process_index=0, process_count=1, local_packs=1))
    except PackOverflowError as e:  # budgets the samples do not fit in
        raise UsageError(f"--text-budget / --vit-budget / --vae-budget: {e}") from None
    return parsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--image", type=int, default=192, help="image side (px) of the synthetic samples")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--t2i", type=int, default=2)
    ap.add_argument("--edit", type=int, default=2)
    ap.add_argument("--und", type=int, default=1)
    ap.add_argument("--text-budget", type=int, default=512)
    ap.add_argument("--vit-budget", type=int, default=512)
    ap.add_argument("--vae-budget", type=int, default=1024)
    ap.add_argument("--variants", default="xla_blockwise,xla_dense,naive_per_sample",
                    help="comma-separated, of " + ", ".join(VARIANTS) + "; NAME:B sets attention_block_q = "
                         "attention_block_kv = B; NAME+latents runs on precomputed latents")
    ap.add_argument("--block", type=int, default=32, help="attention block (q and kv) of xla_blockwise")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:
        parsed = check_args(args)
    except UsageError as e:
        return usage_error(str(e))

    import jax
    import numpy as np

    import echo4o_jax.model.qwen2_mot as qmot
    from echo4o_jax.train.trainer import Trainer

    c = make_config(args)
    variants = list(parsed)
    trainers, batch, lens = {}, None, None
    orig_attention = qmot.attention
    with tempfile.TemporaryDirectory() as wd:
        for name in variants:
            base, block = parsed[name]
            # naive_per_sample / no_attention replace the attention function of an xla_blockwise model
            c.model.attention_impl = "xla_dense" if base == "xla_dense" else "xla_blockwise"
            c.model.attention_block_q = c.model.attention_block_kv = block
            tr = Trainer(c, os.path.join(wd, name))
            if batch is None:
                batch = next(tr.source)  # one fixed pack for every variant and step
            b = with_moments(tr, batch) if name.endswith("+latents") else batch
            if base == "naive_per_sample":
                naive, lens = naive_attention_for(batch)
                qmot.attention = naive
            if base == "no_attention":  # a floor: every other part of the step, attention output = q
                qmot.attention = lambda q, k, v, q_meta, k_meta, **_: q
            try:
                compile_s = tr.compile(b)
            finally:
                qmot.attention = orig_attention
            trainers[name] = dict(tr=tr, compile_s=compile_s, times=[], loss=None, batch=b)
            print(f"[cpu_baseline] {name}: compiled in {compile_s:.1f}s", flush=True)
        if lens is None:
            sid = np.asarray(batch.sample_id)[0]
            lens = [int(np.sum(sid == s)) for s in range(int(np.asarray(batch.num_samples)[0]))]
        tokens = int(np.sum(batch.num_tokens))
        for name, d in trainers.items():  # warm-up step; its loss (same params, same pack) must agree
            d["loss"] = d["tr"].train_step(d["batch"])["loss"]
        for _ in range(args.steps):
            for name, d in trainers.items():
                t = time.perf_counter()
                d["tr"].train_step(d["batch"])
                d["times"].append(time.perf_counter() - t)
    cap = int(np.asarray(batch.sample_id).shape[-1])
    print(f"\nCPU train step (fwd + bwd + AdamW + EMA), {jax.devices()[0].device_kind} x{len(jax.devices())}, "
          f"{os.cpu_count()} cores; hidden {args.hidden}, {args.layers} layers, {args.dtype}; one pack of {tokens} "
          f"real tokens (capacity {cap}), {len(lens)} samples of lengths {lens}; median of {args.steps} steps")
    ref = trainers.get("naive_per_sample")
    ref_s = statistics.median(ref["times"]) if ref else None
    print(f"{'variant':>22} {'compile s':>9} {'step s':>8} {'tokens/s':>9} {'vs naive':>8} {'loss step 1':>12}")
    rows = []
    for name, d in trainers.items():
        s = statistics.median(d["times"])
        row = dict(variant=name, compile_seconds=round(d["compile_s"], 2), step_seconds=s, step_seconds_all=d["times"],
                   tokens_per_second=tokens / s, speedup_vs_naive=(ref_s / s) if ref_s else None,
                   loss_step1=d["loss"])
        rows.append(row)
        sp = f"{ref_s / s:7.2f}x" if ref_s else "     n/a"
        print(f"{name:>22} {d['compile_s']:9.1f} {s:8.3f} {tokens / s:9.0f} {sp} {d['loss']:12.6f}")
    naive_scores, allowed = score_counts(batch)
    bounds = dict(naive_scores_per_head=naive_scores, allowed_scores_per_head=allowed,
                  attention_bound=naive_scores / allowed)
    print(f"\nscores per head: naive per-sample dense {naive_scores:,}, allowed by the mask {allowed:,} -> an exact "
          f"attention does at least {allowed / naive_scores:.0%} of the naive's work (at most "
          f"{naive_scores / allowed:.2f}x faster at equal cost per score)")
    if ref_s and "no_attention" in trainers:
        floor = statistics.median(trainers["no_attention"]["times"])
        bounds.update(step_bound_free_attention=ref_s / floor,
                      step_bound_score_count=ref_s / (floor + (ref_s - floor) * allowed / naive_scores))
        print(f"step bounds vs naive: free attention {bounds['step_bound_free_attention']:.2f}x; attention at the "
              f"score-count bound {bounds['step_bound_score_count']:.2f}x")
    out = dict(args=vars(args), tokens=tokens, capacity=cap, sample_lengths=lens, rows=rows, bounds=bounds)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
