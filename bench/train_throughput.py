r"""Train-step throughput on the current backend (CPU, GPU or TPU), written as JSON.

    python bench/train_throughput.py --config configs/bagel_7b_geometry_small.py --steps 5 \
        [--impls xla_blockwise,pallas_gpu] [--set model.remat=dots ...] [--out bench_train.json]

Prints and writes: compile seconds, step seconds (median of the timed steps, after one warm-up step),
real tokens per step, tokens/s, MFU by the official BAGEL FLOP formula (when the device's peak is known
or --peak-flops is given; the language model only) and a full-model MFU (`flops.full_step_flops`: + the
ViT, connector, time embedder / latent projections and the VAE encoder when the step encodes), peak device
memory (where the backend reports it) and the compiled step's memory analysis. `memory_phases` has the
device memory in use and the peak so far after setup (weights, optimizer state, EMA), compile, the first
step and the timed steps, so a peak above the compiled step's arguments + temporaries can be placed
(GPU/TPU; CPU reports none). The allocator's peak cannot be reset: with several --impls in one run, an
implementation whose steps stay below the peak an earlier one reached has no peak of its own to report
(`peak_device_memory_bytes` null, `peak_device_memory_note` says at most what; measure it alone for its figure).
`update_seconds` times the step's optimizer part alone (AdamW + EMA + gradient
norm) and `layer_param_fraction` is one decoder layer's share of the parameters, so that
bench/gpu_summary.py can split one layer's time into compute and optimizer work. `interpret_mode` is true
where the attention is a Pallas kernel run in interpret mode (pallas_gpu / pallas_tpu on the CPU,
pallas_interpret): its times are not kernel timings, and the table says so.

Exit status: 0; 1 when an implementation failed (its JSON row holds the error); 2 for bad input (one
`error:` line, before anything is measured); 130 on Ctrl-C, after writing the implementations measured.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench_common import INTERRUPTED, UsageError, check_at_least, check_out, usage_error  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def apply_override(c, kv: str):
    """`--set key=value` on the config `c` (value a Python literal as the train command's list overrides read
    them, `config_cli.parse_literal`: dict(key=value) too; else the string). A key the config lacks,
    or a value it refuses, is a ValueError starting `--set key=value: ` (a missing key named with the closest
    one, as the train command's --config.key refuses it: a typo must not measure the config's own value under
    the typo's name)."""
    from echo4o_jax.train.config_cli import parse_literal, unknown_config_key

    if "=" not in kv:
        raise ValueError(f"--set {kv}: expected key=value")
    key, value = kv.split("=", 1)
    why = unknown_config_key(c, key)
    if why:
        raise ValueError(f"--set {kv}: {why}")
    try:
        value = parse_literal(value)
    except ValueError:
        pass
    node = c
    *parents, leaf = key.split(".")
    try:
        for p in parents:
            node = node[p]
        node[leaf] = value
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # e.g. a value of another type than the field's
        raise ValueError(f"--set {kv}: {type(e).__name__}: {e}") from None


def bench_config(args, impl: str | None):
    """The config `measure` trains: --config with --set applied, `impl` as the attention (None: the config's)."""
    c = load_config(args.config)
    c.log.tensorboard = False
    c.log.sample_every = 0
    for kv in args.set:
        apply_override(c, kv)
    if impl:
        c.model.attention_impl = impl
    return c


def check_args(args) -> list[str | None]:
    """The implementations to measure (None: the config's), each one's config checked as the Trainer checks it;
    UsageError for any bad input: found here, before the first compile, not as an error row (or a traceback)
    after the others were measured."""
    from echo4o_jax.model.attention import IMPLS
    from echo4o_jax.paths import folder_problem
    from echo4o_jax.train.trainer import ConfigValueError, model_config_from, validate_config

    check_at_least(steps=(args.steps, 1), profile_steps=(args.profile_steps, 0), peak_flops=(args.peak_flops, 0))
    check_out("--out", args.out)
    why = folder_problem(args.profile_dir) if args.profile_dir else None
    if why:
        raise UsageError(f"--profile-dir {args.profile_dir}: {why}")
    if not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config}: no such file")
    impls = [x for x in args.impls.split(",") if x] or [None]
    bad = [x for x in impls if x and x not in IMPLS]
    if bad:
        raise UsageError(f"--impls {args.impls}: unknown {', '.join(bad)} (known: {', '.join(IMPLS)})")
    for impl in impls:
        try:
            c = bench_config(args, impl)
            validate_config(c)
            model_config_from(c)  # (the geometry: every size >= 1)
        except ConfigValueError as e:
            raise UsageError(f"--impls {impl}: {e}" if impl else str(e)) from None
        except ValueError as e:  # apply_override's, naming the --set
            raise UsageError(str(e)) from None
    return impls


INTERPRET_NOTE = "interpret mode: not a kernel timing"


def interpret_mode(impl: str | None, backend: str) -> bool:
    """Whether attention `impl` runs its Pallas kernel in interpret mode on `backend` (model.attention: the
    pallas_gpu / pallas_tpu kernels interpret on the CPU; pallas_interpret always does)."""
    return impl == "pallas_interpret" or (impl in ("pallas_gpu", "pallas_tpu") and backend == "cpu")


def impl_label(impl: str | None, backend: str) -> str:
    """`impl`, with "(interpret mode: not a kernel timing)" where `interpret_mode`."""
    return f"{impl} ({INTERPRET_NOTE})" if interpret_mode(impl, backend) else str(impl)


def build_parser() -> argparse.ArgumentParser:
    """The command line; `measure(args, impl)` reads the parsed namespace (bench/data_throughput.py builds its
    own with `build_parser().parse_args([...])`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeat)")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="per-device peak FLOP/s if not auto-detected")
    ap.add_argument("--impls", default="", help="comma-separated attention implementations, measured in one run "
                                                   "(default: the config's)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the timed steps, trace this many more (jax.profiler) and report the device time "
                         "per step by the model's named scopes (attention, mlp, qkv, ..., optimizer)")
    ap.add_argument("--profile-dir", default="", help="keep the trace here (default: a temporary folder)")
    ap.add_argument("--out", default="")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        impls = check_args(args)
    except UsageError as e:
        return usage_error(str(e))
    results, interrupted = [], False
    try:
        for impl in impls:
            try:
                results.append(measure(args, impl))
            except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
                results.append(dict(attention_impl=impl, error=f"{type(e).__name__}: {e}"[:2000]))
    except KeyboardInterrupt:  # Ctrl-C: keep (print and write) the implementations measured before it
        interrupted = True
        results += [dict(attention_impl=impl, error="interrupted (Ctrl-C): not measured", interrupted=True)
                    for impl in impls[len(results):]]
    text = json.dumps(results if len(results) > 1 else results[0], indent=1)
    print(text)
    if len(results) > 1:
        print(f"\n{'attention':<18}{'compile s':>10}{'step s':>9}{'tokens/s':>11}{'MFU':>7}{'MFU full':>9}{'peak GiB':>10}")
        for r in results:
            if "error" in r:
                print(f"{str(r['attention_impl']):<18} error: {r['error'][:80]}")
                continue
            mem = f"{r['peak_device_memory_bytes'] / 2**30:.1f}" if r.get("peak_device_memory_bytes") else "-"
            if r.get("peak_device_memory_at_most"):  # below an earlier implementation's peak: at most that
                mem = f"<={r['peak_device_memory_at_most'] / 2**30:.1f}"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            mfu_full = f"{r['mfu_full_model']:.1%}" if r.get("mfu_full_model") else "-"
            note = f"  ({INTERPRET_NOTE})" if r.get("interpret_mode") else ""
            print(f"{r['attention_impl']:<18}{r['compile_seconds']:>10.1f}{r['step_seconds']:>9.3f}"
                  f"{r['tokens_per_second']:>11.0f}{mfu:>7}{mfu_full:>9}{mem:>10}{note}")
    if args.out:
        pathlib.Path(args.out).write_text(text)
    if interrupted:
        n = sum("error" not in r for r in results)
        print(f"error: interrupted (Ctrl-C): {n} of {len(impls)} implementations measured"
              + (f", written to {args.out}" if args.out else ""), file=sys.stderr)
        return INTERRUPTED
    return 1 if any("error" in r for r in results) else 0  # (the error rows: in the JSON and the table)


def own_peak(phases: dict, end_peak: int | None) -> dict:
    """This implementation's peak device memory. The process's peak cannot be reset: when it did not rise above
    the peak reached before this implementation started (an earlier --impls entry), this one's is unknown and at
    most that."""
    start = (phases.get("start") or {}).get("peak") or 0
    if not start or end_peak is None or end_peak > start:
        return dict(peak_device_memory_bytes=end_peak)
    return dict(peak_device_memory_bytes=None, peak_device_memory_at_most=start,
                peak_device_memory_note=f"unknown: at most {start / 2**30:.1f} GiB, the peak an earlier implementation "
                                        "in this process reached (measure it alone for its own)")


def batch_work(cfg, batch, freeze_vit: bool, visual_und: bool = True) -> tuple[int, float, float]:
    """(real tokens, FLOPs by the official formula, full-model FLOPs) of one process's batch."""
    import numpy as np

    from echo4o_jax.train import flops as flops_lib

    lens = [np.bincount(s[s >= 0]) for s in np.asarray(batch.sample_id)]
    step_flops = sum(flops_lib.step_flops(cfg.llm, int(n), l) for n, l in zip(batch.num_tokens, lens))
    full_flops = sum(flops_lib.full_step_flops(
        cfg, int(n), l, np.bincount(vid[vid >= 0]), int(np.sum(vidx >= 0)),
        hw[hw[:, 0] > 0] if batch.vae_images is not None else [],  # precomputed latents: no encoder in the step
        freeze_vit=freeze_vit, visual_und=visual_und)
        for n, l, vid, vidx, hw in zip(batch.num_tokens, lens, np.asarray(batch.vit_image_id),
                                       np.asarray(batch.vae_image_index), np.asarray(batch.vae_image_hw)))
    return int(np.sum(batch.num_tokens)), step_flops, full_flops


def profile_steps(tr, steps: int, log_dir: str) -> dict:
    """`steps` train steps under jax.profiler.trace: device time per step by named scope
    (echo4o_jax.train.profile), with the wall time per step of the traced steps for comparison. On a GPU the
    traced steps run the step compiled again without command buffers (CUDA graphs hide their kernels'
    scopes; `profile.readable_compiler_options`); the timed steps before them ran the step as trained."""
    import jax

    from echo4o_jax.train import profile as prof

    options = prof.readable_compiler_options(jax.default_backend())
    timed, hit = tr._compiled, getattr(tr, "compile_cache_hit", None)  # the timed step's, kept for the results
    try:  # a profiler that fails (no CUPTI, ...) must not lose the measurements above
        with tempfile.TemporaryDirectory() as tmp:
            d = log_dir or tmp
            pathlib.Path(d).mkdir(parents=True, exist_ok=True)
            batches = [next(tr.source) for _ in range(steps)]
            compile_s = 0.0
            if options:
                compile_s = tr.compile(batches[0], options)
                tr.train_step(batches[0])  # its first run outside the trace
            with jax.profiler.trace(d, create_perfetto_trace=True):
                t = time.perf_counter()  # the steps alone: not the trace's start, stop and dump
                for b in batches:
                    tr.train_step(b)
                jax.block_until_ready(tr.state)
                wall = (time.perf_counter() - t) / steps
            out = prof.summarize_compiled_trace(d, tr._compiled, steps)
    except Exception as e:  # noqa: BLE001
        return dict(error=f"{type(e).__name__}: {e}"[:1000])
    finally:
        tr._compiled, tr.compile_cache_hit = timed, hit
    return dict(out, wall_seconds_per_step=wall, trace_dir=log_dir or None, compiler_options=options,
                compile_seconds=round(compile_s, 2))


def update_seconds(tr, ema_decay: float, steps: int) -> float:
    """Median seconds of the step's optimizer part alone (`step.apply_update`: AdamW, clipping, EMA, and the
    gradient norm), on zero gradients: memory-bound work in proportion to the parameters, which FSDP divides
    among the chips while every chip still runs the whole model on its own tokens."""
    import jax
    import jax.numpy as jnp
    import optax

    from echo4o_jax.train.step import apply_update

    def update(state, grads):
        return dict(state, **apply_update(state, grads, tr.tx, ema_decay)), optax.tree.norm(grads)

    fn = jax.jit(update, in_shardings=(tr.state_sh, tr.param_sh), donate_argnums=0)
    grads = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=tr.param_sh)(tr.state["params"])
    times = []
    for i in range(steps + 1):  # the first call compiles
        t = time.perf_counter()
        tr.state, gnorm = fn(tr.state, grads)
        jax.block_until_ready((tr.state, gnorm))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def measure(args, impl: str | None) -> dict:

    import jax
    import numpy as np

    from echo4o_jax.train import flops as flops_lib
    from echo4o_jax.train.trainer import Trainer

    c = bench_config(args, impl)
    dev = jax.devices()[0]
    phases = {}

    def phase(name):  # device memory in use now / peak so far, per phase: tells where a peak comes from
        stats = dev.memory_stats()
        if stats:
            phases[name] = dict(in_use=stats.get("bytes_in_use"), peak=stats.get("peak_bytes_in_use"))

    phase("start")
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        tr = Trainer(c, wd)
        setup_s = time.perf_counter() - t0
        phase("setup")
        batch = next(tr.source)
        compile_s = tr.compile(batch)
        mem = tr._compiled.memory_analysis()
        phase("compile")
        tr.train_step(batch)  # warm-up
        phase("first_step")
        times, work = [], []
        for _ in range(args.steps):
            batch = next(tr.source)
            t = time.perf_counter()
            tr.train_step(batch)
            times.append(time.perf_counter() - t)
            work.append(batch_work(tr.cfg, batch, bool(c.train.freeze_vit), bool(c.train.visual_und)))
        phase("timed_steps")
        profile = profile_steps(tr, args.profile_steps, args.profile_dir) if args.profile_steps > 0 else None
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.state))
        update_s = update_seconds(tr, float(c.train.ema_decay), args.steps)
        n_all = sum(x.size for x in jax.tree.leaves(tr.state["params"]))
        n_layers = sum(x.size for e in ("und", "gen") for x in jax.tree.leaves(tr.state["params"]["llm"][e]))
    step_s = statistics.median(times)
    # per step: the mean over the timed batches (real data varies from pack to pack); other processes' packs
    # are taken to be like this one's
    tokens, step_flops, full_flops = (float(np.mean(x)) * jax.process_count() for x in zip(*work))
    peak = flops_lib.peak_flops_per_device(dev.device_kind, args.peak_flops)
    stats = dev.memory_stats() or {}
    out = dict(
        config=args.config, overrides=args.set, backend=jax.default_backend(), device_kind=dev.device_kind,
        devices=len(jax.devices()), mesh=dict(tr.mesh.shape), setup_seconds=round(setup_s, 2),
        compile_seconds=round(compile_s, 2), compile_cache_hit=tr.compile_cache_hit,  # (JAX_COMPILATION_CACHE_DIR)
        step_seconds=step_s, step_seconds_all=times,
        packs_per_step=int(np.asarray(batch.num_tokens).shape[0]) * jax.process_count(),
        tokens_per_step=tokens, tokens_per_second=tokens / step_s,
        model_flops_per_step=step_flops,
        mfu=(step_flops / (step_s * len(jax.devices()) * peak)) if peak else None,
        model_flops_full_per_step=full_flops,
        mfu_full_model=(full_flops / (step_s * len(jax.devices()) * peak)) if peak else None,
        update_seconds=update_s, layer_param_fraction=n_layers / tr.cfg.llm.num_layers / n_all,
        profile=profile, **own_peak(phases, stats.get("peak_bytes_in_use")),
        memory_phases=phases or None, train_state_bytes=state_bytes,
        compiled_memory=dict(argument=getattr(mem, "argument_size_in_bytes", None),
                             output=getattr(mem, "output_size_in_bytes", None),
                             temp=getattr(mem, "temp_size_in_bytes", None),
                             alias=getattr(mem, "alias_size_in_bytes", None)) if mem is not None else None,
        num_layers=tr.cfg.llm.num_layers, attention_impl=tr.cfg.attention_impl,
        interpret_mode=interpret_mode(tr.cfg.attention_impl, jax.default_backend()),
        attention_tuning=tr.cfg.attention_tuning, remat=tr.cfg.remat, compute_dtype=tr.cfg.compute_dtype,
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
