"""Official PyTorch BAGEL / Echo-4o folder -> Orbax checkpoint folder (streaming, validated first).

    python -m tools.convert_weights.to_jax --src BAGEL-7B-MoT --out bagel_jax [--dtype bfloat16]

Output: llm_config.json, vit_config.json, meta.json, tokenizer files, manifest.json, params/ (Orbax,
the Bagel state) and vae/ (Orbax, the FLUX VAE). See `echo4o_jax.checkpoint` for the layout.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert_weights.to_jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="official checkpoint folder (llm_config.json, vit_config.json, "
                   "ema.safetensors or shards + index, ae.safetensors, tokenizer files)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; never the source, a "
                   "folder holding it or one inside it)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the model weights (default: the source's)")
    p.add_argument("--vae-dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the VAE weights (default: the source's)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="ema.safetensors (default: what the official inference and fine-tuning load) or the "
                        "non-EMA model.safetensors of an official training checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command in --out (a folder holding other files is "
                        "refused)")
    p.add_argument("--no-compression", action="store_true",
                   help="store uncompressed zarr chunks (faster; zstd is Orbax's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        from echo4o_jax.convert import convert_to_orbax

        m = convert_to_orbax(args.src, args.out, dtype=args.dtype, vae_dtype=args.vae_dtype,
                             overwrite=args.overwrite, progress=not args.no_progress,
                             compress=not args.no_compression, weights=args.weights)
        print(json.dumps({"out": args.out, "dtype": m["dtype"], "vae_dtype": m["vae_dtype"],
                          "parameters": m["parameter_count"], "keys": m["key_counts"]}))

    return run_cli(go)


if __name__ == "__main__":
    from echo4o_jax.interrupts import exit_process

    exit_process(main())
