"""The one table of `bench/gpu_check.sh`: its train-step runs (OUT/train_*.json from bench/train_throughput.py:
MFU by the official formula and full-model MFU) with the attention share of each step (from
OUT/attention.json, bench/attention_bench.py), then where each run's device memory went (in use / peak so
far after setup, compile, the first step and the timed steps), the device time per step by the model's
named scopes (runs with --profile-steps), then the cost of one decoder layer (by scope, where both runs of
the pair were traced).

Why the per-layer rows: the official formula counts 6 x 2 x vocab x hidden per token (the embedding and
the LM head, for every token, although the LM head runs on the loss tokens only and the embedding is a
lookup). With the 4-layer geometry of `configs/bagel_7b_geometry_small.py` that term is half the counted
FLOPs, so its MFU says little about the 28 layers of the real model. Runs that differ only in their number
of decoder layers give the time and FLOPs of one layer (the difference over the difference), its MFU, and
the step extrapolated to BAGEL-7B-MoT's 28 layers on this one GPU (which could not hold that state); with
the runs' `update_seconds`, the layer's share of the optimizer update (AdamW + EMA, memory-bound, divided
among the chips by FSDP) is split from its compute.

    python bench/gpu_summary.py OUT
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # echo4o_jax from a checkout
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from train_throughput import INTERPRET_NOTE  # noqa: E402

GIB = 2**30


def attention_seconds(a: dict, r: dict) -> float | None:
    """Decoder attention time of one train step (forward + recomputed forward + backward, x layers) for the
    run `r`, from the attention bench `a` (measured with a["layers"] layers; a run with fewer layers scales)."""
    n = num_layers(r)  # (the layers the run had: after an out-of-memory fallback, the last override, not the first)
    scale = n / a["layers"] if n else 1.0
    sw, tuning = a.get("sweep") or {}, r.get("attention_tuning") or ""
    if tuning and tuning == sw.get("best") and sw.get("best_fwd_bwd_s"):
        t = (sw["best_fwd_bwd_s"] + sw["best_fwd_s"]) * a["layers"]
    else:
        at = [x for x in a["results"] if x["impl"] == r["attention_impl"] and "decoder_attention_s" in x]
        t = at[0]["decoder_attention_s"] if at else None
    return t * scale if t else None


REAL_DEPTH = 28  # BAGEL-7B-MoT (Qwen2.5-7B) decoder layers
# overrides whose effect a run records itself (its group key below), or that the per-layer rows vary
RECORDED = tuple(f"model.{k}=" for k in ("geometry.llm.num_layers", "attention_tuning", "attention_impl", "remat",
                                         "compute_dtype"))


def num_layers(r: dict) -> int | None:
    """A run's decoder layers: recorded by train_throughput (older runs: the override, else the config's)."""
    if r.get("num_layers"):
        return int(r["num_layers"])
    for o in reversed(r.get("overrides", [])):
        if o.startswith("model.geometry.llm.num_layers="):
            return int(o.split("=")[1])
    try:
        here = pathlib.Path(__file__).resolve().parent
        from train_throughput import load_config

        path = pathlib.Path(r["config"])  # older runs: as given on the command line, relative to the repo root
        path = path if path.is_absolute() or path.is_file() else here.parent / path
        return int(load_config(str(path)).model.geometry.llm.num_layers)
    except Exception:  # noqa: BLE001 - a config this checkout cannot load: the run joins no per-layer row
        return None


HIDDEN_LIMIT = 0.05  # a traced run with more of its time in command buffers gives no per-layer scopes


def hidden_scopes(profile: dict) -> tuple[float, str | None]:
    """(share of the device time that ran in XLA command buffers, whose kernels' scopes a trace does not show;
    why, or None when none did): from `note` / the COMMAND_BUFFER scope, or, in runs from before
    train_throughput traced a step compiled without them, the command buffers among their top ops."""
    from echo4o_jax.train.profile import COMMAND_BUFFER, is_command_buffer

    total = profile.get("device_seconds_per_step") or 0.0
    if profile.get("note"):
        return (profile.get("by_scope") or {}).get(COMMAND_BUFFER, 0.0) / (total or 1.0), profile["note"]
    cb = sum(sec for op, _, sec in profile.get("top_ops") or [] if is_command_buffer(str(op)))
    if cb:
        return cb / (total or 1.0), (f"at least {cb / (total or 1.0):.0%} of its device time ran in XLA command "
                                     "buffers (CUDA graphs), which hide their kernels' scopes (traced before "
                                     "train_throughput compiled the traced steps without them)")
    return 0.0, None


def layer_scopes(a: dict, b: dict, layers: int) -> dict[str, float] | None:
    """One decoder layer's device seconds by named scope: the difference of two profiled runs (`b` with
    `layers` more layers) over `layers`; None unless both were traced with (almost) every scope attributed
    (at most HIDDEN_LIMIT of the time in command buffers)."""
    pa, pb = a.get("profile") or {}, b.get("profile") or {}
    if not (pa.get("by_scope") and pb.get("by_scope")) or \
            max(hidden_scopes(pa)[0], hidden_scopes(pb)[0]) > HIDDEN_LIMIT:
        return None
    keys = sorted(set(pa["by_scope"]) | set(pb["by_scope"]))
    d = {k: (pb["by_scope"].get(k, 0.0) - pa["by_scope"].get(k, 0.0)) / layers for k in keys}
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def layer_fits(runs: list[tuple[str, dict]]) -> list[dict]:
    """Per group of runs equal but for their decoder layers (same attention, tuning, remat, dtype, other
    overrides): one decoder layer's time `dt` and FLOPs `df` (deepest minus shallowest run, `lo` / `hi` layers),
    the device `peak` FLOP/s, the layer's share `update` of the optimizer update (or None), and the step
    extrapolated to REAL_DEPTH layers (`t28` seconds, `f28` FLOPs, `mfu28` official MFU); `run`: the deepest."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for _, r in runs:
        n = num_layers(r) if "error" not in r and r.get("mfu") else None
        if n:
            other = tuple(sorted(o for o in r.get("overrides", []) if not o.startswith(RECORDED)))
            key = (r["attention_impl"], r.get("attention_tuning") or "", r.get("remat"), r.get("compute_dtype"), other)
            groups.setdefault(key, []).append((n, r))
    fits = []
    for (impl, tuning, remat, dtype, other), rs in groups.items():
        (lo, a), (hi, b) = min(rs, key=lambda x: x[0]), max(rs, key=lambda x: x[0])
        if hi == lo or a["tokens_per_step"] != b["tokens_per_step"]:
            continue
        peak = b["model_flops_per_step"] / (b["step_seconds"] * b["devices"] * b["mfu"])
        dt = (b["step_seconds"] - a["step_seconds"]) / (hi - lo)
        df = (b["model_flops_per_step"] - a["model_flops_per_step"]) / (hi - lo)
        t28 = b["step_seconds"] + (REAL_DEPTH - hi) * dt
        f28 = b["model_flops_per_step"] + (REAL_DEPTH - hi) * df
        u = b["update_seconds"] * b["layer_param_fraction"] if b.get("update_seconds") and b.get("layer_param_fraction") \
            else None
        name = f"{impl} remat {remat}" + (f" {tuning}" if tuning else "") + (f" {' '.join(other)}" if other else "")
        fits.append(dict(name=name, impl=impl, remat=remat, tuning=tuning, lo=lo, hi=hi, dt=dt, df=df, peak=peak,
                         update=u, t28=t28, f28=f28, mfu28=f28 / (t28 * b["devices"] * peak), run=b,
                         scopes=layer_scopes(a, b, hi - lo)))
    return fits


def layer_rows(runs: list[tuple[str, dict]], a: dict | None = None) -> list[str]:
    """One line per `layer_fits` group: one decoder layer's time and FLOPs, its MFU, and the official MFU of
    the step extrapolated to REAL_DEPTH layers (with the attention bench `a`: attention's share of it)."""
    lines = []
    for f in layer_fits(runs):
        dt, df, u, n_dev, peak = f["dt"], f["df"], f["update"], f["run"]["devices"], f["peak"]
        line = (f"{f['name']}: one decoder layer ({f['lo']} vs {f['hi']} layers) {dt * 1e3:.1f} ms, "
                f"{df / 1e12:.1f} TFLOP, MFU {df / (dt * n_dev * peak):.1%}")
        if u is not None:
            line += (f" (optimizer update {u * 1e3:.1f} ms, which FSDP divides among the chips; compute alone "
                     f"{(dt - u) * 1e3:.1f} ms, MFU {df / ((dt - u) * n_dev * peak):.1%})")
        line += f"; step at {REAL_DEPTH} layers {f['t28']:.3f} s, MFU {f['mfu28']:.1%}"
        t = attention_seconds(a, f["run"]) if a else None
        if t:  # the bench's attention per layer (forward, recomputed forward, backward) x REAL_DEPTH
            line += f", attention {t / f['hi'] * REAL_DEPTH / f['t28']:.0%} of it"
        lines.append(line)
        if f["scopes"]:
            tot = sum(f["scopes"].values())
            lines.append(f"{f['name']}: one decoder layer's device time by scope (traced runs; {tot * 1e3:.1f} ms): "
                         + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in f["scopes"].items() if abs(v) >= 5e-5))
    return lines


def summary(out: pathlib.Path) -> str:
    a = json.loads((out / "attention.json").read_text()) if (out / "attention.json").exists() else None
    runs = [(f.stem[len("train_"):], json.loads(f.read_text())) for f in sorted(out.glob("train_*.json"))]
    lines = [f"{'run':<22}{'compile s':>10}{'step s':>9}{'tokens/s':>11}{'MFU':>7}{'MFU full':>9}{'peak GiB':>10}"
             f"{'attn share':>11}  tuning"]
    for name, r in runs:
        if "error" in r:
            lines.append(f"{name:<22} error: {r['error'][:90]}")
            continue
        t = attention_seconds(a, r) if a else None
        share = f"{t / r['step_seconds']:.0%}" if t else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mfu_full = f"{r['mfu_full_model']:.1%}" if r.get("mfu_full_model") else "-"
        peak = r.get("peak_device_memory_bytes")  # (None where the backend reports no device memory)
        peak = f"{peak / GIB:.1f}" if peak else "-"
        note = f"  ({INTERPRET_NOTE})" if r.get("interpret_mode") else ""  # a CPU run must not read as a GPU's
        lines.append(f"{name:<22}{r['compile_seconds']:>10.1f}{r['step_seconds']:>9.3f}{r['tokens_per_second']:>11.0f}"
                     f"{mfu:>7}{mfu_full:>9}{peak:>10}{share:>11}  {r.get('attention_tuning') or 'default'}{note}")
    for name, r in runs:
        ph, cm = r.get("memory_phases") or {}, r.get("compiled_memory") or {}
        if ph:
            lines.append(f"{name} memory GiB (in use / peak so far): "
                         + ", ".join(f"{k} {v['in_use'] / GIB:.1f} / {v['peak'] / GIB:.1f}" for k, v in ph.items())
                         + f"; train state {r.get('train_state_bytes', 0) / GIB:.1f}, compiled step arguments "
                         f"{(cm.get('argument') or 0) / GIB:.1f} + temporaries {(cm.get('temp') or 0) / GIB:.1f}"
                         f" (outputs {(cm.get('output') or 0) / GIB:.1f}, of which aliased to donated arguments "
                         f"{(cm.get('alias') or 0) / GIB:.1f})")
    for name, r in runs:
        pr = r.get("profile")
        if pr and pr.get("error"):
            lines.append(f"{name} profile failed: {pr['error'][:200]}")
            continue
        why = hidden_scopes(pr)[1] if pr else None
        if why:
            lines.append(f"{name} profile: {why}")
        if pr and pr.get("device_seconds_per_step"):
            tot = pr["device_seconds_per_step"]
            lines.append(f"{name} device time per step by scope ({pr['source']}; {tot * 1e3:.1f} ms in all, "
                         f"{pr['wall_seconds_per_step'] * 1e3:.1f} ms wall): "
                         + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / tot:.0%})" for k, v in pr["by_scope"].items()))
    return "\n".join(lines + layer_rows(runs, a))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1 or not pathlib.Path(argv[0]).is_dir():
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(summary(pathlib.Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
