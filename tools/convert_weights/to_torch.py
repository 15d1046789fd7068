"""Orbax checkpoint (converted folder or training workdir) -> official PyTorch BAGEL folder (streaming).

    python -m tools.convert_weights.to_torch --ckpt bagel_jax --out bagel_torch
    python -m tools.convert_weights.to_torch --ckpt WORKDIR [--step N] [--weights ema|params] --out DIR \\
        [--dtype bfloat16|float32] [--max-shard-size 5GB]

Output: ema.safetensors (official key names, PyTorch layouts; with --max-shard-size, shards and
ema.safetensors.index.json), ae.safetensors, llm_config.json, vit_config.json, meta.json, tokenizer
files: a folder the official BAGEL inferencer loads unchanged (without --max-shard-size: the official
inferencer and trainer open ema.safetensors by that name, so they cannot load a sharded export; this
project's tools read both).
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert_weights.to_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted Orbax folder or training workdir")
    p.add_argument("--step", type=int, default=None, help="training step (workdir only; default: latest)")
    p.add_argument("--weights", choices=["ema", "params"], default="ema",
                   help="which weights of a training checkpoint (default: ema)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; never the source, a "
                   "folder holding it or one inside it)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of ema.safetensors (default: as stored)")
    p.add_argument("--vae-dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of ae.safetensors (default: as stored)")
    p.add_argument("--max-shard-size", default=None,
                   help="split ema.safetensors into shards of at most SIZE (e.g. 5GB, 500MiB) plus an index JSON "
                        "(the official BAGEL code loads only a single ema.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command in --out (a folder holding other files is "
                        "refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        from echo4o_jax.convert import convert_to_official
        from echo4o_jax.safetensors_io import parse_size

        size = parse_size(args.max_shard_size) if args.max_shard_size is not None else None
        s = convert_to_official(args.ckpt, args.out, step=args.step, weights=args.weights, dtype=args.dtype,
                                vae_dtype=args.vae_dtype, max_shard_size=size, overwrite=args.overwrite,
                                progress=not args.no_progress)
        print(json.dumps({"out": s["out"], "ema_files": s["ema_files"], "dtype": s["dtype"], "source": s["source"]}))

    return run_cli(go)


if __name__ == "__main__":
    from echo4o_jax.interrupts import exit_process

    exit_process(main())
