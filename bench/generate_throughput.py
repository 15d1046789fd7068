r"""Generation speed on the current backend: compile time and seconds per image.

    python bench/generate_throughput.py [--ckpt DIR] [--size 1024x1024] [--steps 50] [--images 4] \
        [--requests 3] [--dtype float32|bfloat16]

Without --ckpt it uses the bundled tiny checkpoint (tests/golden/bagel_tiny_a) at 32x48 and 8 steps (with
--ckpt: 1024x1024, 50 steps). Runs --requests (>= 2) requests of the same shape and prints JSON:
first-request seconds (includes compilation), then seconds per request / per image over the later requests
only (no recompilation: the compile counts are reported too). Bad input (a size, a checkpoint, a count):
one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (default: the bundled tiny one)")
    ap.add_argument("--size", default=None, help="HxW (default 32x48 for the tiny checkpoint, else 1024x1024)")
    ap.add_argument("--steps", type=int, default=None, help="sampler timesteps, >= 2 (default 8 tiny / 50)")
    ap.add_argument("--images", type=int, default=1, help="images per request (batched)")
    ap.add_argument("--requests", type=int, default=3, help="requests of the same shape, >= 2: the first "
                                                            "compiles, the later ones are timed")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: generate's (bfloat16 on a GPU / TPU, float32 on the CPU)")
    args = ap.parse_args(argv)
    if args.requests < 2:
        ap.error(f"--requests {args.requests}: at least 2 (the first request compiles; per-request figures "
                 "come from the later ones)")
    if args.images < 1:
        ap.error(f"--images {args.images}: at least 1")
    if args.steps is not None and args.steps < 2:
        ap.error(f"--steps {args.steps}: at least 2 (the sampler makes steps - 1 denoising steps)")

    import jax

    from echo4o_jax import generate as G
    from echo4o_jax import inference

    demo = args.ckpt is None
    size = args.size or ("32x48" if demo else "1024x1024")
    steps = args.steps if args.steps is not None else (8 if demo else 50)
    prompts = [G.DEMO_PROMPT_IDS[: 3 + i] for i in range(args.requests)]
    times = []
    try:
        gen = G.Generator(args.ckpt or G.DEMO_CKPT, dtype=args.dtype, demo=demo)
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            out = gen.generate(prompt_ids=ids, size=size, seed=i, num_images=args.images, num_timesteps=steps)
            jax.block_until_ready(out["images"])
            times.append(time.perf_counter() - t)
    except G.GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    later = times[1:]
    res = dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, ckpt=str(gen.ckpt),
               size=size, steps=steps, dtype=gen.dtype, images_per_request=args.images,
               first_request_seconds=times[0], timed_requests=len(later),
               seconds_per_request=sum(later) / len(later), seconds_per_image=sum(later) / len(later) / args.images,
               sampler_compilations=inference._guided_velocity._cache_size(),
               text_prefill_compilations=inference._append_text._cache_size(), all_seconds=times)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
