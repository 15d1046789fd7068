"""Peak host memory and throughput of the weight converters at full 7B-MoT width (not a timed test).

Builds a synthetic official checkpoint with the released 7B-MoT widths (hidden 3584, vocab 152064,
MLP 18944, 28/4 heads, ViT 1152/4304/16 heads, the FLUX VAE) but only a few layers, in bfloat16,
then converts it to Orbax and back, each direction in a fresh child process, and prints the child's
peak RSS (VmHWM; getrusage ru_maxrss alongside, which also counts this parent) as a ratio to the largest
tensor, against the budget 3 x largest tensor + 1 GiB, and the GB/s. `within` (and the exit status) is
peak RSS (VmHWM) < budget. The round trip is checked tensor by tensor (hashes).

    python bench/convert_memory.py [--llm-layers 2] [--vit-layers 2] [--dtype bfloat16|float32]
                                   [--workdir DIR] [--keep]

Disk: source ~4.2 GB, Orbax ~4.2 GB, export ~4.2 GB at 2+2 layers in bf16; the source is deleted
after the first direction (its per-tensor hashes are kept), so about 8.5 GB at most. Without --keep every
file the run wrote is deleted at the end (with --workdir: its official / orbax / official_back folders).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import INTERRUPTED, usage_error  # noqa: E402


def _status_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak of this process image: reset by exec, unlike ru_maxrss, which
    Linux carries over from the parent through fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    """One conversion in this (fresh) process; prints a JSON line with timings and peak RSS."""
    from echo4o_jax import convert  # noqa: F401  (imports counted in the baseline)
    import jax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if args.child == "to_jax":
        convert.convert_to_orbax(args.src, args.out, dtype=args.out_dtype, progress=not args.quiet,
                                 compress=not args.no_compression)
    else:
        convert.convert_to_official(args.src, args.out, dtype=args.out_dtype, progress=not args.quiet)
    dt = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": dt, "peak_rss": _status_kb("VmHWM") * 1024,
                                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                  "baseline_rss": base_kb * 1024}))


def synth_checkpoint(folder: pathlib.Path, n_llm: int, n_vit: int, dtype: str) -> dict[str, str]:
    """Random official checkpoint at 7B width; returns key -> sha256 of the tensor bytes."""
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from echo4o_jax.config import BagelConfig
    from echo4o_jax.model.bagel import Bagel, bagel_key_rules
    from echo4o_jax.model.keymap import expand_rules, official_shape
    from echo4o_jax.model.loading import flax_shapes
    from echo4o_jax.model.vae import AutoEncoder, vae_key_rules
    from echo4o_jax.safetensors_io import write_safetensors_stream

    base = BagelConfig.bagel_7b_mot()
    cfg = base.replace(llm=dataclasses.replace(base.llm, num_layers=n_llm),
                       vit=dataclasses.replace(base.vit, num_layers=n_vit))
    folder.mkdir(parents=True)
    for name, d in (("llm_config.json", cfg.llm.to_hf()), ("vit_config.json", cfg.vit.to_hf()),
                    ("meta.json", cfg.meta_dict())):
        (folder / name).write_text(json.dumps(d, indent=2))
    rng = np.random.default_rng(0)
    hashes: dict[str, str] = {}

    def specs_of(ctor, rules, dt):
        shapes = flax_shapes(nnx.eval_shape(ctor))
        return [(e.key, official_shape(e, shapes[e.path]), dt) for e in expand_rules(rules)]

    def produce_fn(specs):
        by_key = {k: (s, d) for k, s, d in specs}

        def produce(key):
            shape, dt = by_key[key]
            # Gaussian weights (std 0.02) like trained ones: as compressible as real checkpoints
            x = (rng.standard_normal(int(np.prod(shape)), np.float32) * 0.02).reshape(shape).astype(dt)
            hashes[key] = hashlib.sha256(x.tobytes()).hexdigest()
            return x
        return produce

    bdt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    sb = specs_of(lambda: Bagel(cfg, rngs=nnx.Rngs(0)), bagel_key_rules(cfg), bdt)
    write_safetensors_stream(folder / "ema.safetensors", sb, produce_fn(sb), {"format": "pt"})
    sv = specs_of(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)), vae_key_rules(cfg.vae), np.dtype(np.float32))
    write_safetensors_stream(folder / "ae.safetensors", sv, produce_fn(sv), {"format": "pt"})
    return hashes


def run_child(direction: str, src: pathlib.Path, out: pathlib.Path, args, pids: list[int]) -> dict:
    """One conversion in a child process (its pid appended to `pids`: `remove_run_files` finds its leftovers)."""
    cmd = [sys.executable, __file__, "--child", direction, "--src", str(src), "--out", str(out)]
    cmd += ["--quiet"] if args.quiet else []
    cmd += ["--no-compression"] if args.no_compression else []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    pids.append(p.pid)
    try:
        stdout, _ = p.communicate()
    except KeyboardInterrupt:
        # the child got the Ctrl-C too: the converter ends its Orbax save in order and removes its partial
        # output; killing it here (as subprocess.run does) left that output (hundreds of MB) in the workdir
        print("interrupted: waiting for the conversion to stop in order", file=sys.stderr, flush=True)
        p.communicate()
        raise
    if p.returncode != 0:
        raise SystemExit(f"{direction} failed (exit {p.returncode})")
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def remove_run_files(folders: list[pathlib.Path], pids: list[int], keep: bool) -> None:
    """Remove `folders` (unless `keep`) and, always, the converters' temporary siblings of them that the child
    processes `pids` left (`.NAME.tmp-PID-*` / `.NAME.old-PID-*`, echo4o_jax.convert's naming: a partial output)."""
    for f in folders:
        if not keep:
            shutil.rmtree(f, ignore_errors=True)
        for pid in pids:
            for kind in ("tmp", "old"):
                for left in f.parent.glob(f".{f.name}.{kind}-{pid}-*"):
                    shutil.rmtree(left, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="source dtype")
    ap.add_argument("--workdir", type=pathlib.Path, default=None, help="default: a temp dir under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the files the run writes (default: delete them, "
                                                         "--workdir's included)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--no-compression", action="store_true", help="uncompressed Orbax chunks")
    ap.add_argument("--child", choices=["synth", "to_jax", "to_torch"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--out-dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "synth":
        hashes = synth_checkpoint(pathlib.Path(args.out), args.llm_layers, args.vit_layers, args.dtype)
        pathlib.Path(args.out, "hashes.json").write_text(json.dumps(hashes))
        return 0
    if args.child:
        child(args)
        return 0

    for name in ("llm_layers", "vit_layers"):  # checked before gigabytes are written (the model needs >= 1 of each)
        if getattr(args, name) < 1:
            return usage_error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    try:
        work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="convert_bench_", dir="/tmp"))
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return usage_error(f"--workdir {args.workdir}: cannot be made ({e.strerror or e})")

    from echo4o_jax.safetensors_io import SafetensorsFile

    pids: list[int] = []  # the conversion children
    src, mid, back = work / "official", work / "orbax", work / "official_back"
    for p in (src, mid, back):
        if p.exists():
            shutil.rmtree(p)
    try:
        t0 = time.perf_counter()
        # built in a child too: this process stays small (ru_maxrss is inherited through fork + exec)
        subprocess.run([sys.executable, __file__, "--child", "synth", "--out", str(src), "--llm-layers",
                        str(args.llm_layers), "--vit-layers", str(args.vit_layers), "--dtype", args.dtype], check=True)
        hashes = json.loads((src / "hashes.json").read_text())
        (src / "hashes.json").unlink()
        ema = SafetensorsFile(src / "ema.safetensors")
        ae = SafetensorsFile(src / "ae.safetensors")
        largest_key = max(ema.keys(), key=ema.nbytes)
        largest = ema.nbytes(largest_key)
        src_bytes = sum(ema.nbytes(k) for k in ema.keys()) + sum(ae.nbytes(k) for k in ae.keys())
        print(f"synthetic checkpoint: {args.llm_layers} LLM + {args.vit_layers} ViT layers at 7B-MoT width, "
              f"{args.dtype}; {len(ema.keys())} + {len(ae.keys())} tensors, {src_bytes / 1e9:.2f} GB "
              f"(built in {time.perf_counter() - t0:.0f} s); largest tensor {largest_key} {largest / 1e9:.3f} GB")
        budget = 3 * largest + 2**30
        rows = []
        r = run_child("to_jax", src, mid, args, pids)
        rows.append(("to_jax", r))
        if not args.keep:
            shutil.rmtree(src)
        orbax_bytes = sum(p.stat().st_size for p in mid.rglob("*") if p.is_file())
        r = run_child("to_torch", mid, back, args, pids)
        rows.append(("to_torch", r))
        # round trip: every tensor identical (keys, shapes, dtypes via the header; bytes via hashes)
        got = {}
        for name in ("ema.safetensors", "ae.safetensors"):
            f = SafetensorsFile(back / name)
            for k in f.keys():
                got[k] = hashlib.sha256(f.read(k).tobytes()).hexdigest()
        exact = got == hashes
        print(f"\nbudget 3 x largest + 1 GiB = {budget / 1e9:.2f} GB")
        print(f"{'direction':<10}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}{'x largest':>11}"
              f"{'ru_maxrss GB':>14}{'baseline GB':>13}{'(peak-base)/largest':>21}{'within':>8}")
        for name, r in rows:
            peak, base = r["peak_rss"], r["baseline_rss"]  # (the exit status' test)
            print(f"{name:<10}{r['seconds']:>9.1f}{src_bytes / r['seconds'] / 1e9:>8.2f}{r['peak_rss'] / 1e9:>13.2f}"
                  f"{r['peak_rss'] / largest:>11.2f}{r['ru_maxrss'] / 1e9:>14.2f}{base / 1e9:>13.2f}"
                  f"{(r['peak_rss'] - base) / largest:>21.2f}{'yes' if peak < budget else 'NO':>8}")
        print("peak RSS = VmHWM of the converting child (its whole life, imports included); ru_maxrss = "
              "getrusage in that child (also counts this small parent, inherited through fork)")
        print(f"round trip bit-exact: {exact} ({len(hashes)} tensors); Orbax folder {orbax_bytes / 1e9:.2f} GB "
              f"({'zstd-1' if not args.no_compression else 'uncompressed'})")
        return 0 if exact and all(r["peak_rss"] < budget for _, r in rows) else 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)" + ("" if args.keep else "; the files this run wrote are removed"),
              file=sys.stderr)
        return INTERRUPTED
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:  # only what this run wrote: the workdir may hold other files
            remove_run_files([src, mid, back], pids, args.keep)


if __name__ == "__main__":
    sys.exit(main())
