"""Generation from the command line: text-to-image, multi-reference / editing, understanding.

    python -m echo4o_jax.generate --ckpt DIR --prompt "a red cube left of a blue ball" --out outputs/gen
    python -m echo4o_jax.generate --ckpt DIR --image a.png --image b.png --prompt "put them together"
    python -m echo4o_jax.generate --ckpt DIR --image a.png --prompt "What is shown?" --understand

With no arguments it runs the offline demo: text-to-image with the bundled tiny random checkpoint
(tests/golden/bagel_tiny_a), writing a PNG. Per-task defaults are the official ones (text-to-image:
text scale 4.0, image scale 1.5, cfg_interval [0.4, 1.0], renorm global; with reference images:
text scale 4.0, image scale 2.0, cfg_interval [0.0, 1.0], renorm text_channel; shift 3.0, 50 steps);
every one is overridable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

DEMO_CKPT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "bagel_tiny_a"
DEMO_PROMPT_IDS = [13, 60, 2, 38, 77, 23, 87, 59, 101]


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    num_timesteps: int = 50


T2I_DEFAULTS = TaskDefaults(4.0, 1.5, (0.4, 1.0), "global")
EDIT_DEFAULTS = TaskDefaults(4.0, 2.0, (0.0, 1.0), "text_channel")


class GenerateError(ValueError):
    """Bad generation input (missing file, bad size, incomplete checkpoint ...)."""


def parse_size(s: str, stride: int) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise GenerateError(f"--size {s!r}: expected HxW, e.g. 1024x1024") from None
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise GenerateError(f"--size {s!r}: height and width must be positive multiples of {stride}")
    return h, w


def _load_tokenizer(ckpt: pathlib.Path):
    path = ckpt / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise GenerateError("this checkpoint folder has no tokenizer.json: pass --prompt-ids instead of --prompt")
    return tokenizer.encode(text, add_special_tokens=False).ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m echo4o_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=pathlib.Path, default=None,
                   help="official BAGEL folder (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--image", action="append", default=[], type=pathlib.Path, help="reference / input image (repeat)")
    p.add_argument("--understand", action="store_true", help="answer in text about the image(s)")
    p.add_argument("--size", default=None, help="HxW of the generated image (default 1024x1024, or the last input image's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/generate"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg-text-scale", type=float, default=None)
    p.add_argument("--cfg-img-scale", type=float, default=None)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None)
    p.add_argument("--cfg-renorm-type", choices=["global", "channel", "text_channel"], default=None)
    p.add_argument("--cfg-renorm-min", type=float, default=None)
    p.add_argument("--timestep-shift", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--max-context", type=int, default=None, help="KV-cache capacity (tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = args.ckpt is None
    ckpt = DEMO_CKPT if demo else args.ckpt
    try:
        return _run(args, ckpt, demo)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, ckpt: pathlib.Path, demo: bool) -> int:
    from PIL import Image, UnidentifiedImageError

    for name in ("llm_config.json", "vit_config.json"):
        if not (ckpt / name).exists():
            raise GenerateError(f"checkpoint folder {ckpt} is incomplete: {name} is missing")
    images = []
    for path in args.image:
        if not path.exists():
            raise GenerateError(f"input image not found: {path}")
        try:
            images.append(Image.open(path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise GenerateError(f"cannot read image {path}: {e}") from None

    import jax

    from .config import BagelConfig
    from .inference import Inferencer
    from .model.loading import load_bagel, load_vae

    cfg = BagelConfig.from_checkpoint_dir(ckpt, compute_dtype=args.dtype)
    tokenizer = _load_tokenizer(ckpt)
    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",")]
    elif args.prompt is not None:
        prompt = _encode(tokenizer, args.prompt)
    elif demo:
        prompt = DEMO_PROMPT_IDS
    else:
        raise GenerateError("give --prompt (or --prompt-ids)")
    bad = [i for i in prompt if not 0 <= i < cfg.llm.vocab_size]
    if bad:
        raise GenerateError(f"prompt token ids out of the vocabulary (size {cfg.llm.vocab_size}): {bad[:10]}")

    defaults = EDIT_DEFAULTS if images else T2I_DEFAULTS
    size = parse_size(args.size, cfg.latent_downsample) if args.size else ((32, 48) if demo else (1024, 1024))
    steps = args.steps or (8 if demo else defaults.num_timesteps)
    kw = dict(
        cfg_text_scale=args.cfg_text_scale if args.cfg_text_scale is not None else defaults.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale if args.cfg_img_scale is not None else defaults.cfg_img_scale,
        cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else defaults.cfg_interval,
        cfg_renorm_type=args.cfg_renorm_type or defaults.cfg_renorm_type,
        cfg_renorm_min=args.cfg_renorm_min if args.cfg_renorm_min is not None else defaults.cfg_renorm_min,
        timestep_shift=args.timestep_shift if args.timestep_shift is not None else defaults.timestep_shift,
        num_timesteps=steps,
    )
    t0 = time.time()
    model = load_bagel(ckpt, cfg)
    vae = load_vae(ckpt, cfg)
    n_ref_tokens = sum((im.size[0] // 14 + 1) * (im.size[1] // 14 + 1) * 3 for im in images)
    max_context = args.max_context or max(256, len(prompt) + 16 + n_ref_tokens + args.max_new_tokens)
    inf = Inferencer(model, vae, max_context=max_context)
    if demo:  # the tiny checkpoint's images are tiny: no upscaling to 512 px
        from .image_transform import ImageTransform

        inf.vae_transform = ImageTransform(1024, 16, cfg.latent_downsample)
        inf.vit_transform = ImageTransform(980, 14, cfg.vit.patch_size)
    rng = jax.random.key(args.seed)
    inputs: list[Any] = [*images, prompt]
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dict(ckpt=str(ckpt), prompt=args.prompt, prompt_ids=prompt,
                                  images=[str(p) for p in args.image], seed=args.seed)
    if args.understand:
        if not images:
            raise GenerateError("--understand needs at least one --image")
        out = inf.interleave_inference(inputs, understanding_output=True, max_think_token_n=args.max_new_tokens)
        ids = out["text_ids"][1:]
        text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        record.update(answer=text, answer_ids=ids)
        print(text)
    else:
        # official: the output takes the last input image's shape unless a size is asked for
        out = inf.interleave_inference(inputs, image_shapes=size, output_shape=size if args.size else None,
                                       rng=rng, **kw)
        path = args.out / f"image_seed{args.seed}.png"
        Image.fromarray(out["image"]).save(path)
        record.update(output=str(path), size=list(out["image"].shape[:2]), **{k: v for k, v in kw.items()})
        print(f"wrote {path} ({out['image'].shape[0]}x{out['image'].shape[1]}) in {time.time() - t0:.1f}s")
    with open(args.out / "generation.json", "w") as f:
        json.dump(record, f, indent=1, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
