"""The one table of `bench/gpu_check.sh`: its train-step runs (OUT/train_*.json from bench/train_throughput.py:
MFU by the official formula and full-model MFU) with the attention share of each step (from
OUT/attention.json, bench/attention_bench.py), then where each run's device memory went (in use / peak so
far after setup, compile, the first step and the timed steps).

    python bench/gpu_summary.py OUT
"""

from __future__ import annotations

import json
import pathlib
import sys

GIB = 2**30


def attention_seconds(a: dict, r: dict) -> float | None:
    """Decoder attention time of one train step (forward + recomputed forward + backward, x layers) for the
    run `r`, from the attention bench `a` (measured with a["layers"] layers; a run with fewer layers scales)."""
    layers = [int(o.split("=")[1]) for o in r.get("overrides", []) if o.startswith("model.geometry.llm.num_layers=")]
    scale = layers[0] / a["layers"] if layers else 1.0
    sw, tuning = a.get("sweep") or {}, r.get("attention_tuning") or ""
    if tuning and tuning == sw.get("best") and sw.get("best_fwd_bwd_s"):
        t = (sw["best_fwd_bwd_s"] + sw["best_fwd_s"]) * a["layers"]
    else:
        at = [x for x in a["results"] if x["impl"] == r["attention_impl"] and "decoder_attention_s" in x]
        t = at[0]["decoder_attention_s"] if at else None
    return t * scale if t else None


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
        lines.append(f"{name:<22}{r['compile_seconds']:>10.1f}{r['step_seconds']:>9.3f}{r['tokens_per_second']:>11.0f}"
                     f"{mfu:>7}{mfu_full:>9}{(r.get('peak_device_memory_bytes') or 0) / GIB:>10.1f}{share:>11}"
                     f"  {r.get('attention_tuning') or 'default'}")
    for name, r in runs:
        ph, cm = r.get("memory_phases") or {}, r.get("compiled_memory") or {}
        if ph:
            lines.append(f"{name} memory GiB (in use / peak so far): "
                         + ", ".join(f"{k} {v['in_use'] / GIB:.1f} / {v['peak'] / GIB:.1f}" for k, v in ph.items())
                         + f"; train state {r.get('train_state_bytes', 0) / GIB:.1f}, compiled step arguments "
                         f"{(cm.get('argument') or 0) / GIB:.1f} + temporaries {(cm.get('temp') or 0) / GIB:.1f}"
                         f" (outputs {(cm.get('output') or 0) / GIB:.1f}, of which aliased to donated arguments "
                         f"{(cm.get('alias') or 0) / GIB:.1f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not pathlib.Path(argv[0]).is_dir():
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(summary(pathlib.Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
