"""Offline demo dataset: rendered scenes of coloured shapes with exact compositional captions.

    python -m echo4o_jax.data.demo --out DIR [--size 64] [--t2i 512] [--multiref 128] [--understanding 128]

writes three record datasets and a tokenizer:

    DIR/t2i/            caption -> image; GenEval++'s seven tags in miniature (color_attr, counting,
                        color_count_attr, color_spatial_attr, spatial_count_attr, size_spatial_attr,
                        multi_object_count_attr) plus single_object
    DIR/multiref/       2-3 references (one object each) + an instruction naming "image 1", "image 2", ...
                        -> the target composition
    DIR/understanding/  image -> question -> caption (loss on the answer)
    DIR/tokenizer/tokenizer.json, DIR/tokenizer/special_tokens.json   (WordLevel over the demo vocabulary,
                        built from code, not from the data: same ids for any sample count / seed)
    DIR/demo.json       settings, counts, the suggested transforms

Classes are shapes (circle, square, triangle, diamond, star, hexagon), colours GenEval's ten, regions
left / right / top / bottom, sizes small / large / larger / smaller, counts one..six. Every record's `meta`
holds the ground truth: `tag`, `include` (GenEval++ schema: class, count, color, region, size) and
`objects` (class, color, size in px, exact bbox [x0, y0, x1, y1) in pixels), `canvas` and `background`.
Images are PNG (lossless: colours are exact). Deterministic for a given seed; no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from echo4o_jax.data._import_common import ArgumentError, WRITER_INTERRUPTED, cli_error, cli_interrupted
from echo4o_jax.interrupts import exit_process, keep_ctrl_c
from echo4o_jax.paths import write_json
from echo4o_jax.data.records import (
    RecordError,
    RecordWriter,
    check_writable,
    multiref_record,
    t2i_record,
    understanding_record,
)

__all__ = [
    "SHAPES",
    "COLORS",
    "TAGS",
    "Scene",
    "render",
    "make_t2i",
    "make_multiref",
    "make_understanding",
    "demo_vocabulary",
    "build_tokenizer",
    "write_demo",
    "demo_pipeline_config",
]

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS = {
    "black": (0, 0, 0),
    "blue": (30, 70, 230),
    "brown": (130, 80, 30),
    "green": (20, 170, 40),
    "orange": (250, 140, 0),
    "pink": (250, 140, 200),
    "purple": (130, 40, 180),
    "red": (225, 20, 20),
    "white": (255, 255, 255),
    "yellow": (245, 225, 20),
}
BACKGROUND = (150, 150, 150)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TAGS = ("single_object", "color_attr", "counting", "color_count_attr", "color_spatial_attr",
        "spatial_count_attr", "size_spatial_attr", "multi_object_count_attr")
REGION_WORDS = {"left": "on the left", "right": "on the right", "above": "on the top", "below": "on the bottom"}
QUESTIONS = ("describe the image.", "what is in the image?", "what do you see in this picture?")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# relative object sizes (fraction of the canvas side)
_SIZE = {"small": 0.2, "large": 0.36, "larger": 0.4, "smaller": 0.18, "count": 0.17, "ref": 0.6}


@dataclasses.dataclass
class Obj:
    cls: str
    color: str
    size: int  # px (bbox side)
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive)

    def as_dict(self) -> dict:
        return {"class": self.cls, "color": self.color, "size_px": self.size, "bbox": list(self.bbox)}


@dataclasses.dataclass
class Scene:
    objects: list[Obj]
    width: int
    height: int

    def png(self) -> bytes:
        return _png(render(self))


def _plural(cls: str, n: int) -> str:
    return cls if n == 1 else cls + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_points(cls: str, x0: int, y0: int, x1: int, y1: int):
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    rx, ry = (x1 - x0 - 1) / 2, (y1 - y0 - 1) / 2
    if cls == "triangle":
        return [(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    if cls == "diamond":
        return [(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)]
    if cls == "hexagon":
        return [(cx + rx * math.cos(math.pi / 3 * k), cy + ry * math.sin(math.pi / 3 * k)) for k in range(6)]
    if cls == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + math.pi / 5 * k
            pts.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
        return pts
    raise ValueError(cls)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        col = COLORS[o.color]
        if o.cls == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=col)
        elif o.cls == "square":
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=col)
        else:
            d.polygon(_shape_points(o.cls, x0, y0, x1, y1), fill=col)
    return img


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG", optimize=False)
    return b.getvalue()


def _region_box(region: str | None, w: int, h: int) -> tuple[int, int, int, int]:
    return {None: (0, 0, w, h), "left": (0, 0, w // 2, h), "right": (w - w // 2, 0, w, h),
            "above": (0, 0, w, h // 2), "below": (0, h - h // 2, w, h),
            "middle": (w // 3, 0, w - w // 3, h)}[region]


def _place(objs: list[Obj], box, rng: np.random.Generator, placed: list[Obj], margin: int = 2) -> None:
    """Non-overlapping positions for `objs` fully inside `box`, avoiding `placed` (mutates bboxes)."""
    bx0, by0, bx1, by1 = box
    for _ in range(100):
        done: list[Obj] = []
        ok = True
        for o in objs:
            for _ in range(200):
                if bx1 - bx0 < o.size or by1 - by0 < o.size:
                    raise ValueError(f"object of {o.size}px does not fit region {box}")
                x = int(rng.integers(bx0, bx1 - o.size + 1))
                y = int(rng.integers(by0, by1 - o.size + 1))
                bb = (x, y, x + o.size, y + o.size)
                if all(bb[2] + margin <= q.bbox[0] or q.bbox[2] + margin <= bb[0] or bb[3] + margin <= q.bbox[1]
                       or q.bbox[3] + margin <= bb[1] for q in placed + done):
                    o.bbox = bb
                    done.append(o)
                    break
            else:
                ok = False
                break
        if ok:
            placed.extend(done)
            return
    raise RuntimeError(f"could not place {len(objs)} objects in {box}")


def _px(kind: str, w: int, h: int) -> int:
    return max(4, int(round(_SIZE[kind] * min(w, h))))


def make_t2i(rng: np.random.Generator, w: int = 64, h: int = 64, tag: str | None = None):
    """(caption, Scene, meta) for one of TAGS (random when None)."""
    tag = tag or TAGS[int(rng.integers(len(TAGS)))]
    colors = list(COLORS)
    pick = lambda seq, k: [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]  # noqa: E731
    objects: list[Obj] = []
    include: list[dict] = []
    if tag == "single_object":
        (cls,), (col,) = pick(SHAPES, 1), pick(colors, 1)
        size = "small" if rng.random() < 0.5 else "large"
        groups = [([Obj(cls, col, _px(size, w, h))], None)]
        include.append({"class": cls, "count": 1, "color": col, "size": size})
        caption = f"a photo of {_article(size)} {size} {col} {cls}"
    elif tag == "color_attr":
        k = int(rng.integers(2, 4))
        classes, cols = pick(SHAPES, k), pick(colors, k)
        groups = [([Obj(c, col, _px("small", w, h))], None) for c, col in zip(classes, cols)]
        include += [{"class": c, "count": 1, "color": col} for c, col in zip(classes, cols)]
        parts = [f"{_article(col)} {col} {c}" for c, col in zip(classes, cols)]
        caption = "a photo of " + (", ".join(parts[:-1]) + " and " + parts[-1])
    elif tag == "counting":
        (cls,), (col,) = pick(SHAPES, 1), pick(colors, 1)
        n = int(rng.integers(2, 7))
        groups = [([Obj(cls, col, _px("count", w, h)) for _ in range(n)], None)]
        include.append({"class": cls, "count": n})
        caption = f"a photo of {NUMBERS[n]} {_plural(cls, n)}"
    elif tag in ("color_count_attr", "spatial_count_attr", "multi_object_count_attr"):
        k = 2 if tag != "multi_object_count_attr" else int(rng.integers(2, 4))
        classes, cols = pick(SHAPES, k), pick(colors, k)
        counts = [int(rng.integers(1, 4)) for _ in range(k)]
        regions = [None] * k
        if tag == "spatial_count_attr":
            regions = ["left", "right"] if rng.random() < 0.5 else ["above", "below"]
        groups, parts = [], []
        for c, col, n, reg in zip(classes, cols, counts, regions):
            groups.append(([Obj(c, col, _px("count", w, h)) for _ in range(n)], reg))
            item = {"class": c, "count": n}
            phrase = f"{NUMBERS[n]} {_plural(c, n)}"
            if tag == "color_count_attr":
                item["color"] = col
                phrase = f"{NUMBERS[n]} {col} {_plural(c, n)}"
            if reg is not None:
                item["region"] = reg
                phrase += " " + REGION_WORDS[reg]
            include.append(item)
            parts.append(phrase)
        caption = "a photo of " + (", ".join(parts[:-1]) + " and " + parts[-1])
    elif tag in ("color_spatial_attr", "size_spatial_attr"):
        classes, cols = pick(SHAPES, 2), pick(colors, 2)
        regions = ["left", "right"] if rng.random() < 0.5 else ["above", "below"]
        sizes = ["small", "small"] if tag == "color_spatial_attr" else (
            ["larger", "smaller"] if rng.random() < 0.5 else ["smaller", "larger"])
        groups, parts = [], []
        for c, col, reg, sz in zip(classes, cols, regions, sizes):
            groups.append(([Obj(c, col, _px(sz, w, h))], reg))
            if tag == "color_spatial_attr":
                include.append({"class": c, "count": 1, "color": col, "region": reg})
                parts.append(f"{_article(col)} {col} {c} {REGION_WORDS[reg]}")
            else:
                include.append({"class": c, "count": 1, "region": reg, "size": sz})
                parts.append(f"{_article(sz)} {sz} {c} {REGION_WORDS[reg]}")
        caption = "a photo of " + parts[0] + " and " + parts[1]
    else:
        raise ValueError(f"unknown tag {tag!r}")
    placed: list[Obj] = []
    for objs, reg in groups:
        _place(objs, _region_box(reg, w, h), rng, placed)
        objects += objs
    scene = Scene(objects, w, h)
    meta = {"tag": tag, "include": include, "objects": [o.as_dict() for o in objects], "canvas": [w, h],
            "background": list(BACKGROUND)}
    return caption, scene, meta


def make_multiref(rng: np.random.Generator, w: int = 64, h: int = 64):
    """(reference Scenes, instruction, target Scene, meta): each reference shows one object (centred,
    large); the target places exactly those objects in the named regions."""
    k = int(rng.integers(2, 4))
    classes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=k, replace=False)]
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=k, replace=False)]
    refs = []
    for c, col in zip(classes, colors):
        s = _px("ref", w, h)
        x0, y0 = (w - s) // 2, (h - s) // 2
        refs.append(Scene([Obj(c, col, s, (x0, y0, x0 + s, y0 + s))], w, h))
    if k == 2:
        regions = ["left", "right"] if rng.random() < 0.5 else ["above", "below"]
    else:
        regions = ["left", "middle", "right"]
    order = [int(i) for i in rng.permutation(k)]  # which reference goes to which region
    placed: list[Obj] = []
    target_objs = []
    parts = []
    include = []
    for reg, r in zip(regions, order):
        o = Obj(classes[r], colors[r], _px("small", w, h))
        _place([o], _region_box(reg, w, h), rng, placed)
        target_objs.append(o)
        where = "in the middle" if reg == "middle" else REGION_WORDS[reg]
        parts.append(f"the {colors[r]} {classes[r]} from image {r + 1} {where}")
        include.append({"class": classes[r], "count": 1, "color": colors[r], "region": reg, "reference": r + 1})
    instruction = "place " + (", ".join(parts[:-1]) + " and " + parts[-1]) + "."
    target = Scene(target_objs, w, h)
    meta = {"tag": "multiref", "include": include, "objects": [o.as_dict() for o in target_objs],
            "references": [[o.as_dict() for o in s.objects] for s in refs], "canvas": [w, h],
            "background": list(BACKGROUND)}
    return refs, instruction, target, meta


def make_understanding(rng: np.random.Generator, w: int = 64, h: int = 64):
    caption, scene, meta = make_t2i(rng, w, h)
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    return scene, question, caption, meta


# ---------------------------------------------------------------------------------------------- tokenizer


def demo_vocabulary() -> list[str]:
    """Every word the demo texts use, in a fixed order (specials first)."""
    words = ["a", "an", "photo", "of", "and", "on", "the", "in", "left", "right", "top", "bottom", "middle",
             "small", "large", "larger", "smaller", "place", "from", "image", "describe", "what", "is", "do",
             "you", "see", "this", "picture", ",", ".", "?"]
    words += list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBERS)
    words += [str(i) for i in range(10)]
    out, seen = list(SPECIAL_TOKENS), set(SPECIAL_TOKENS)
    for wd in words:
        if wd not in seen:
            seen.add(wd)
            out.append(wd)
    return out


def build_tokenizer():
    """The demo `tokenizers.Tokenizer` (WordLevel, lower-case, whitespace/punctuation split)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def special_tokens_info(tok) -> dict:
    return {
        "bos_token_id": tok.token_to_id("<|im_start|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "start_of_image": tok.token_to_id("<|vision_start|>"),
        "end_of_image": tok.token_to_id("<|vision_end|>"),
        "pad_token_id": tok.token_to_id("<pad>"),
        "unk_token_id": tok.token_to_id("<unk>"),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
    }


# ---------------------------------------------------------------------------------------------- writer


DEMO_DATASETS = ("t2i", "multiref", "understanding")  # the folders write_demo writes under `out`
MIN_SIZE = 32  # the smallest canvas side (px) write_demo accepts: every scene kind fits it (tests)


def write_demo(out: str, *, size: int = 64, n_t2i: int = 512, n_multiref: int = 128,
               n_understanding: int = 128, seed: int = 0, shard_bytes: int = 8 << 20,
               overwrite: bool = False) -> dict:
    """Writes the demo datasets and tokenizer under `out`; returns the demo.json content. A dataset already
    there is refused (`records.check_writable`) before anything is written, unless `overwrite`; so is a bad
    argument (ArgumentError)."""
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ArgumentError("size", size, f"must be >= {MIN_SIZE} pixels (the scenes' smallest objects are 4 px)")
    for name, n in (("t2i", n_t2i), ("multiref", n_multiref), ("understanding", n_understanding)):
        if not isinstance(n, int) or n < 0:
            raise ArgumentError(name, n, "must be a number of samples >= 0")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ArgumentError("shard_bytes", shard_bytes, "must be a positive number of bytes")
    for name in DEMO_DATASETS:
        check_writable(os.path.join(out, name), overwrite=overwrite)
    os.makedirs(out, exist_ok=True)
    demo_json = os.path.join(out, "demo.json")
    if os.path.exists(demo_json):  # (overwrite) written last: an interrupted rewrite leaves none, never the old one
        os.remove(demo_json)
    t0 = time.time()
    w = h = int(size)
    tok = build_tokenizer()
    tok_dir = os.path.join(out, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok.save(os.path.join(tok_dir, "tokenizer.json"))
    info = special_tokens_info(tok)
    with open(os.path.join(tok_dir, "special_tokens.json"), "w") as f:
        json.dump(info, f, indent=1)
    unk = info["unk_token_id"]

    def check_text(t: str, rid: str):
        if unk in tok.encode(t, add_special_tokens=False).ids:
            raise AssertionError(f"demo text of {rid} has words outside the demo vocabulary: {t!r}")

    counts = {}
    common = dict(shard_bytes=shard_bytes, overwrite=overwrite, info={"generator": "echo4o_jax.data.demo",
                                                                       "seed": seed, "size": size})
    rng = np.random.default_rng([seed, 1])
    with RecordWriter(os.path.join(out, "t2i"), name="t2i", **common) as wr:
        for i in range(n_t2i):
            cap, scene, meta = make_t2i(rng, w, h)
            rid = f"demo/t2i/{i:06d}"
            check_text(cap, rid)
            wr.write(t2i_record(rid, cap, scene.png(), source="demo", subset=meta["tag"], meta=meta))
        counts["t2i"] = wr.num_records
    rng = np.random.default_rng([seed, 2])
    with RecordWriter(os.path.join(out, "multiref"), name="multiref", **common) as wr:
        for i in range(n_multiref):
            refs, instr, target, meta = make_multiref(rng, w, h)
            rid = f"demo/multiref/{i:06d}"
            check_text(instr, rid)
            wr.write(multiref_record(rid, [r.png() for r in refs], instr, target.png(), source="demo",
                                     subset="multiref", meta=meta))
        counts["multiref"] = wr.num_records
    rng = np.random.default_rng([seed, 3])
    with RecordWriter(os.path.join(out, "understanding"), name="understanding", **common) as wr:
        for i in range(n_understanding):
            scene, q, cap, meta = make_understanding(rng, w, h)
            rid = f"demo/understanding/{i:06d}"
            check_text(q, rid)
            check_text(cap, rid)
            wr.write(understanding_record(rid, scene.png(), q, cap, source="demo", subset=meta["tag"],
                                          meta=meta))
        counts["understanding"] = wr.num_records
    # transforms that keep the demo images at their size (VAE stride 16, ViT stride 14)
    vae = [size, max(16, size // 2), 16]
    vit_side = max(14, (size // 14) * 14)
    demo = {
        "format": "echo4o-demo",
        "seed": seed,
        "size": size,
        "counts": counts,
        "datasets": {k: os.path.join(out, k) for k in counts},
        "tokenizer": os.path.join(tok_dir, "tokenizer.json"),
        "special_tokens": info,
        "vae_transform": vae,  # ImageTransform(max_size, min_size, stride)
        "vit_transform": [vit_side, max(14, vit_side // 2), 14],
        "seconds": round(time.time() - t0, 2),
    }
    write_json(demo_json, demo)  # whole or absent: its presence says the demo is complete
    return demo


def demo_pipeline_config(out: str, budget, *, expected_num_tokens: int | None = None,
                         weights: dict | None = None, **overrides):
    """A `PipelineConfig` over a written demo folder (transforms from demo.json)."""
    from echo4o_jax.data.pipeline import DatasetSpec, PipelineConfig
    from echo4o_jax.image_transform import ImageTransform

    with open(os.path.join(out, "demo.json")) as f:
        demo = json.load(f)
    weights = weights or {"t2i": 4.0, "multiref": 1.0, "understanding": 1.0}
    datasets = tuple(DatasetSpec(os.path.join(out, k), weight=float(wt), name=k) for k, wt in weights.items()
                     if demo["counts"].get(k))
    kw = dict(
        datasets=datasets,
        tokenizer=os.path.join(out, "tokenizer", "tokenizer.json"),
        budget=budget,
        expected_num_tokens=expected_num_tokens or int(budget.total_tokens * 0.8),
        vae_transform=ImageTransform(*demo["vae_transform"]),
        vit_transform=ImageTransform(*demo["vit_transform"]),
    )
    kw.update(overrides)
    return PipelineConfig(**kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.data.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--t2i", type=int, default=512)
    ap.add_argument("--multiref", type=int, default=128)
    ap.add_argument("--understanding", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=8 << 20)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    keep_ctrl_c()
    try:
        demo = write_demo(a.out, size=a.size, n_t2i=a.t2i, n_multiref=a.multiref, n_understanding=a.understanding,
                          seed=a.seed, shard_bytes=a.shard_bytes, overwrite=a.overwrite)
    except (ArgumentError, RecordError, OSError) as e:
        return cli_error("demo", e)
    except KeyboardInterrupt:
        return cli_interrupted("demo", WRITER_INTERRUPTED)
    print(json.dumps({k: demo[k] for k in ("counts", "special_tokens", "vae_transform", "vit_transform",
                                          "seconds")}))
    return 0


if __name__ == "__main__":
    exit_process(main())
