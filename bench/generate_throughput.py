"""Generation speed on the current backend: compile time and seconds per image.

    python bench/generate_throughput.py [--ckpt DIR] [--size 1024x1024] [--steps 50] [--images 4] [--dtype bfloat16]

Without --ckpt it uses the bundled tiny checkpoint (tests/golden/bagel_tiny_a) at 32x48. Prints JSON:
first-request seconds (includes compilation), then seconds per request / per image for later requests
of the same shape (no recompilation: the compile counts are reported too).
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
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--images", type=int, default=1, help="images per request (batched)")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    import jax

    from echo4o_jax import generate as G
    from echo4o_jax import inference

    demo = args.ckpt is None
    gen = G.Generator(args.ckpt or G.DEMO_CKPT, dtype=args.dtype, demo=demo)
    size = args.size or ("32x48" if demo else "1024x1024")
    steps = args.steps or (8 if demo else 50)
    prompts = [G.DEMO_PROMPT_IDS[: 3 + i] for i in range(args.requests)]
    times = []
    for i, ids in enumerate(prompts):
        t = time.perf_counter()
        out = gen.generate(prompt_ids=ids, size=size, seed=i, num_images=args.images, num_timesteps=steps)
        jax.block_until_ready(out["images"])
        times.append(time.perf_counter() - t)
    later = times[1:] or times
    res = dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, ckpt=str(gen.ckpt),
               size=size, steps=steps, images_per_request=args.images, first_request_seconds=times[0],
               seconds_per_request=sum(later) / len(later), seconds_per_image=sum(later) / len(later) / args.images,
               sampler_compilations=inference._guided_velocity._cache_size(),
               text_prefill_compilations=inference._append_text._cache_size(), all_seconds=times)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
