r"""Attention alone on a real BAGEL pack layout: exactness and forward+backward time per implementation.

    python bench/attention_bench.py [--config configs/bagel_7b_geometry_small.py] \
        [--impls pallas_gpu,xla_blockwise,xla_dense,naive_per_sample] [--iters 10] [--dtype bfloat16|float32] \
        [--block B] [--cudnn] [--sweep] [--out attention.json]

The pack comes from the config's synthetic recipe (same packer as training: [text | vit | vae] segments,
per-token metadata), the head geometry from the config's LLM (28 query / 4 KV heads of 128 for 7B).
For each implementation: compile seconds, the median seconds of one jitted forward+backward of
sum(attention(q, k, v) * w) and of the forward alone (--dtype inputs, default bf16: the train step's shape
for one layer), the fraction of (q block, kv block) pairs the block table keeps, and the max abs difference
of the loss and of the gradients against `xla_blockwise` in float32 on the same pack (the exactness check
on this backend; `xla_blockwise` itself is tested against the dense reference in tests/test_kernels.py).
`naive_per_sample` is bench/cpu_baseline.py's per-sample dense-mask attention (padding rows are left at
zero there, so its "error" against the reference is not meaningful). A Pallas kernel that runs in interpret
mode (pallas_gpu / pallas_tpu on the CPU, pallas_interpret) is labelled so in the table and has
`interpret_mode: true` in the JSON: its times are not kernel timings.

`--cudnn` adds, for scale only, cuDNN flash attention (`jax.nn.dot_product_attention(implementation=
"cudnn")`) over the same [L, H, D] with a plain causal mask: not BAGEL's mask (cuDNN takes no per-token
split/mode rule), the speed a cuDNN call over the whole pack would have.

`--sweep` (GPU only: refused elsewhere, where the kernel is interpreted and its times are noise) times the
pallas_gpu launch shapes FWD_TILES (forward alone), then BWD_TILES with the best forward, and prints the best
as a `model.attention_tuning` string. Bad input: one `error:` line, exit 2, before anything is built.

`--layers N` (default: the config's) turns the per-layer time into the attention time of a full forward +
backward of the decoder (plus the recomputed forward under remat=full), to compare with a train step's time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import UsageError, check_at_least, check_out, usage_error  # noqa: E402


def pack_meta(config_path: str):
    """(TokenMeta of one synthetic pack of the config, number of real tokens, LLMConfig, remat == full)."""
    import numpy as np

    from bench.train_throughput import load_config
    from echo4o_jax.model.attention import TokenMeta
    from echo4o_jax.train.data_sources import make_source
    from echo4o_jax.train.trainer import model_config_from

    c = load_config(config_path)
    cfg = model_config_from(c)
    b = next(make_source(c, cfg, process_index=0, process_count=1, local_packs=1))
    meta = TokenMeta(*(np.asarray(getattr(b, k))[0] for k in ("sample_id", "split_id", "split_mode", "order")))
    return meta, int(np.asarray(b.num_tokens)[0]), cfg.llm, c.model.remat == "full"


# launch shapes tried by --sweep (kernels.pallas_flash.parse_tuning syntax); the first of each is the default
# (the best of the 2026-11-26 H200 sweep, bench/results/)
FWD_TILES = ["64x64:w4:s3", "128x128:w8:s2", "128x64:w4:s3", "128x64:w8:s3", "128x128:w8:s3", "64x128:w4:s2",
             "128x32:w4:s4", "64x32:w4:s3", "32x64:w4:s3"]
BWD_TILES = [("64x64:w4:s2", "64x64:w4:s2"), ("128x128:w8:s2", "128x128:w8:s2"), ("128x64:w8:s2", "64x128:w8:s2"),
             ("128x32:w4:s3", "32x128:w4:s3"), ("64x64:w4:s3", "64x128:w8:s2"), ("128x64:w8:s3", "64x64:w4:s3"),
             ("64x32:w4:s2", "32x64:w4:s2"), ("32x32:w4:s2", "32x32:w4:s2"), ("64x64:w8:s2", "64x64:w8:s2")]


def tpu_blocks(L: int, block: int = 0) -> tuple[int, int]:
    """(block_q, block_kv) the pallas_tpu kernel runs with on an L-token pack on this backend (`--block`, else
    attention()'s default 512; capped by the padded length, lane-aligned on a TPU): its `block_sizes`."""
    from echo4o_jax.model.kernels.pallas_tpu_flash import BLOCK, block_sizes

    return block_sizes(L, L, block or BLOCK, block or BLOCK)


def _timed(build, args, iters: int) -> tuple[float | None, str | None]:
    """(median seconds of `build()(*args)` after one warm-up call, None) or (None, error): a launch shape
    the chip refuses (shared memory, registers) is reported, not fatal."""
    import jax

    try:
        f = build()
        jax.block_until_ready(f(*args))
        return _median_time(lambda: jax.block_until_ready(f(*args)), iters), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"[:300]


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


NAIVE = "naive_per_sample"


def check_args(args) -> list[str]:
    """The implementations to time; UsageError for bad input, before the pack is built or anything compiled."""
    from echo4o_jax.model.attention import IMPLS

    check_at_least(iters=(args.iters, 1), layers=(args.layers, 0), block=(args.block, 0))
    check_out("--out", args.out)
    if not pathlib.Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    impls = [x for x in args.impls.split(",") if x]
    bad = [x for x in impls if x not in IMPLS + (NAIVE,)]
    if bad:
        raise UsageError(f"--impls {args.impls}: unknown {', '.join(bad)} (known: "
                         f"{', '.join(IMPLS + (NAIVE,))})")
    if args.sweep:
        import jax

        if jax.default_backend() != "gpu":  # interpreted kernels: their times are noise, not a tuning
            raise UsageError(f"--sweep times pallas_gpu's Triton launch shapes: it needs a GPU (the backend is "
                             f"{jax.default_backend()}, where the kernel runs in interpret mode)")
    return impls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/bagel_7b_geometry_small.py"))
    ap.add_argument("--impls", default="xla_blockwise,xla_dense")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--block", type=int, default=0, help="block_q = block_kv (default: each impl's default)")
    ap.add_argument("--cudnn", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="pallas_gpu: time launch shapes (FWD_TILES, then BWD_TILES "
                                                        "with the best forward) and print the best tuning string")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 exactness check")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="inputs of the timed runs")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:
        impls = check_args(args)
    except UsageError as e:
        return usage_error(str(e))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from echo4o_jax.model.attention import attention
    from echo4o_jax.model.kernels.pallas_flash import default_tiles, prepare

    meta, n_real, llm, remat_full = pack_meta(args.config)
    L, H, KVH, D = meta.sample.shape[0], llm.num_heads, llm.num_kv_heads, llm.head_dim
    layers = args.layers or llm.num_layers
    scale = D ** -0.5
    rng = np.random.default_rng(0)
    q32, k32, v32, w32 = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                          for s in ((L, H, D), (L, KVH, D), (L, KVH, D), (L, H, D)))
    meta_j = type(meta)(*(jnp.asarray(x) for x in meta))
    lens = np.bincount(meta.sample[meta.sample >= 0])
    print(f"pack: L={L} real={n_real} samples={len(lens)} sum(len^2)/L^2={np.sum(lens.astype(float)**2) / L**2:.3f} "
          f"H={H} KVH={KVH} D={D} backend={jax.default_backend()} device={jax.devices()[0].device_kind}", flush=True)

    from bench.cpu_baseline import naive_attention_from_meta

    naive, _ = naive_attention_from_meta(meta)

    def attn(impl):  # "naive_per_sample": bench/cpu_baseline.py's per-sample dense-mask attention
        return naive if impl == "naive_per_sample" else attention

    def fb(impl, dtype, tuning=""):
        kw = dict(block_q=args.block, block_kv=args.block) if args.block else {}

        def loss(q, k, v, w):
            o = attn(impl)(q, k, v, meta_j, meta_j, scale=scale, impl=impl, tuning=tuning, **kw)
            return jnp.sum(o.astype(jnp.float32) * w)

        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        args_ = tuple(x.astype(dtype) for x in (q32, k32, v32)) + (w32,)
        return g, args_

    def fwd_only(impl, tuning=""):
        kw = dict(block_q=args.block, block_kv=args.block) if args.block else {}
        return jax.jit(lambda q, k, v: attn(impl)(q, k, v, meta_j, meta_j, scale=scale, impl=impl, tuning=tuning,
                                                  **kw))

    dt = jnp.dtype(args.dtype)
    ref = None
    if not args.no_check:
        g, a = fb("xla_blockwise", jnp.float32)
        ref = jax.block_until_ready(g(*a))

    from train_throughput import INTERPRET_NOTE, interpret_mode

    results = []
    for impl in impls:
        r = dict(impl=impl)
        if interpret_mode(impl, jax.default_backend()):
            r["interpret_mode"] = True  # the Pallas kernel interpreted: not a kernel timing
        try:
            if impl == "naive_per_sample":
                bq = bk = 0
            elif impl == "pallas_tpu":
                bq, bk = tpu_blocks(L, args.block)
            elif impl.startswith("pallas"):
                bq, bk = default_tiles(L, L, args.block or 64, args.block or 64)[0][:2]
            else:
                bq = bk = min(args.block or 512, -(-L // 8) * 8)
            if bq:
                r["blocks_kept"] = float(jnp.mean(prepare(meta_j, meta_j, L, L, bq, bk)[2]))
            g, a = fb(impl, dt)
            t0 = time.perf_counter()
            jax.block_until_ready(g(*a))
            r["compile_s"] = round(time.perf_counter() - t0, 2)
            r["fwd_bwd_s"] = _median_time(lambda: jax.block_until_ready(g(*a)), args.iters)
            f = fwd_only(impl)
            jax.block_until_ready(f(*a[:3]))
            r["fwd_s"] = _median_time(lambda: jax.block_until_ready(f(*a[:3])), args.iters)
            # the decoder's attention time in a train step: fwd + bwd per layer, + one more fwd under remat
            r["decoder_attention_s"] = (r["fwd_bwd_s"] + (r["fwd_s"] if remat_full else 0.0)) * layers
            if ref is not None:
                g32, a32 = fb(impl, jnp.float32)
                out = jax.block_until_ready(g32(*a32))
                r["max_abs_err_loss"] = float(abs(out[0] - ref[0]))
                r["max_abs_err_grads"] = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(out[1], ref[1])]
                r["max_abs_ref_grads"] = [float(jnp.max(jnp.abs(y))) for y in ref[1]]
        except Exception as e:  # noqa: BLE001 - report and go on with the next implementation
            r["error"] = f"{type(e).__name__}: {e}"[:1500]
        print(json.dumps(r), flush=True)
        results.append(r)

    sweep = None
    if args.sweep:
        sweep = dict(fwd=[], bwd=[])
        bf = (q32.astype(dt), k32.astype(dt), v32.astype(dt))
        best_fwd, best_t = "", float("inf")
        for t in FWD_TILES:  # forward alone
            sec, err = _timed(lambda: fwd_only("pallas_gpu", f"fwd={t}"), bf, args.iters)
            sweep["fwd"].append(dict(tile=t, fwd_s=sec) if err is None else dict(tile=t, error=err))
            if err:
                continue
            print(f"sweep fwd {t}: {sec * 1e3:.2f} ms", flush=True)
            if sec < best_t:
                best_fwd, best_t = t, sec
        best, best_t = f"fwd={best_fwd}", float("inf")
        for dq, dkv in BWD_TILES:  # forward + backward, with the best forward
            tuning = f"fwd={best_fwd},dq={dq},dkv={dkv}"
            sec, err = _timed(lambda: fb("pallas_gpu", dt, tuning)[0], bf + (w32,), args.iters)
            sweep["bwd"].append(dict(tuning=tuning, fwd_bwd_s=sec) if err is None else dict(tuning=tuning, error=err))
            if err:
                continue
            print(f"sweep {tuning}: fwd+bwd {sec * 1e3:.2f} ms", flush=True)
            if sec < best_t:
                best, best_t = tuning, sec
        sweep.update(best=best, default=f"fwd={FWD_TILES[0]},dq={BWD_TILES[0][0]},dkv={BWD_TILES[0][1]}",
                     best_fwd_s=min([x["fwd_s"] for x in sweep["fwd"] if "fwd_s" in x], default=None),
                     best_fwd_bwd_s=best_t if best_t < float("inf") else None)
        print(f"best tuning: {best}", flush=True)

    if args.cudnn:
        r = dict(impl="cudnn_causal_whole_pack (not BAGEL's mask)")
        try:
            def loss(q, k, v, w):
                o = jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                 implementation="cudnn")[0]
                return jnp.sum(o.astype(jnp.float32) * w)

            g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            a = (q32.astype(dt), k32.astype(dt), v32.astype(dt), w32)
            t0 = time.perf_counter()
            jax.block_until_ready(g(*a))
            r["compile_s"] = round(time.perf_counter() - t0, 2)
            r["fwd_bwd_s"] = _median_time(lambda: jax.block_until_ready(g(*a)), args.iters)
            r["decoder_attention_s"] = r["fwd_bwd_s"] * layers  # (no forward-only timing here)
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"[:1500]
        print(json.dumps(r), flush=True)
        results.append(r)

    print(f"\n{'attention':<40}{'kept':>6}{'compile s':>10}{'fwd+bwd ms':>11}{'x layers s':>11}{'grad err':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<40} error: {r['error'][:100]}")
            continue
        err = max(r["max_abs_err_grads"]) if "max_abs_err_grads" in r else float("nan")
        note = f"  ({INTERPRET_NOTE})" if r.get("interpret_mode") else ""
        print(f"{r['impl']:<40}{r.get('blocks_kept', float('nan')):>6.2f}{r['compile_s']:>10.1f}"
              f"{r['fwd_bwd_s'] * 1e3:>11.2f}{r['decoder_attention_s']:>11.3f}{err:>10.2e}{note}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(L=L, real_tokens=n_real, H=H, KVH=KVH, D=D, layers=layers,
                                                          results=results, sweep=sweep), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
