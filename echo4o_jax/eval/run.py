r"""Generate the benchmark images with a checkpoint, then judge them.

    python -m echo4o_jax.eval.run --ckpt DIR --bench geneval_pp,imagine_bench --out DIR \
        [--benchmarks-dir DIR | --geneval-pp-prompts F --imagine-bench-prompts F] [--fetch] \
        [--omnicontext-data F [--omnicontext-data-root DIR]] [--num-images 1] [--seed 42] [--size H W] \
        [--gen-arg KEY=VALUE ...] [--judge-only | --generate-only] [--regenerate] [judge options]

For each benchmark B the images go to ``<out>/B/images/<stem>_<k>.png`` (the naming every
``python -m echo4o_jax.eval.B --images`` reads) and the results to ``<out>/B/`` (results.json,
summary.md, gallery.html); ``<out>/summary.md`` / ``summary.json`` collect the headline numbers, and
``<out>/judge_cache`` is shared. Images that already exist and decode fully are not generated again
(``--regenerate`` forces it; an image cut short by a kill is generated again), so an interrupted run
resumes. ``results.json`` holds each benchmark's own judge counters; ``summary.json`` the run's totals.

Generation uses ``echo4o_jax.generate.generate_batch(ckpt, requests, out_dir, regenerate=..., **overrides)``
(one call per benchmark; ``--gen-arg KEY=VALUE`` become the overrides, VALUE parsed as JSON when it
parses). A request is ``{"id": <stem>, "prompt", "seed": seed + index, "num_images", "size"?, "images"?}``.
A generation error (``GenerateError``: e.g. an output size the checkpoint cannot make) stops the run
with a one-line ``error: ...``; images written before it are kept.

Prompt files: ``--benchmarks-dir`` (default ``$ECHO4O_BENCHMARKS_DIR`` or ``./benchmarks``; no other
folder is searched, e.g. ``--benchmarks-dir ../shared/benchmarks``) holds ``geneval_pp.jsonl`` and
``imagine_bench.jsonl``; ``--fetch`` downloads the public files there when absent. OmniContext needs a
local copy (``--omnicontext-data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

from . import common, geneval_pp, imagine_bench, omnicontext
from .judge import load_template

BENCHES = {"geneval_pp": geneval_pp, "imagine_bench": imagine_bench, "omnicontext": omnicontext}
TEMPLATE_NAMES = ("geneval_pp", "imagine_bench") + tuple(omnicontext.TEMPLATES.values())


def _templates(pairs) -> dict:
    out = {}
    for p in pairs or []:
        name, _, path = p.partition("=")
        if name not in TEMPLATE_NAMES or not path:
            raise common.UsageError(f"--template expects NAME=FILE with NAME in {TEMPLATE_NAMES}, got {p!r}")
        out[name] = load_template(path)
    return out


@dataclasses.dataclass(frozen=True)
class _GenerationAPI:
    generate_batch: Callable  # (ckpt, requests, out_dir, *, regenerate=False, **overrides)
    error: type[Exception]  # what generate_batch raises for bad input (GenerateError)
    image_complete: Callable[[Path], bool]  # does an existing image decode fully
    # (paths, what) -> every image exists and decodes fully (broken ones reported): generate_batch's resume check
    outputs_finished: Callable[[list[Path], str], bool]


def _load_generation_api() -> _GenerationAPI:
    try:
        from echo4o_jax.generate import GenerateError, generate_batch, image_complete, outputs_finished
    except ImportError as e:
        raise common.UsageError(
            "image generation needs echo4o_jax.generate (generate_batch, GenerateError, image_complete, "
            f"outputs_finished), which could not be imported ({type(e).__name__}: {e}). Generate the images "
            "another way as <stem>_<k>.png in <out>/<bench>/images and re-run with --judge-only.") from None
    return _GenerationAPI(generate_batch, GenerateError, image_complete, outputs_finished)


def _parse_gen_args(pairs) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise common.UsageError(f"--gen-arg expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        if k.strip() == "regenerate":
            raise common.UsageError("--gen-arg regenerate=...: use --regenerate")
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def _prompt_path(args, name: str) -> Path:
    mod = BENCHES[name]
    explicit = getattr(args, f"{name}_prompts", None)
    if name == "omnicontext":
        if not args.omnicontext_data:
            raise FileNotFoundError("--bench omnicontext needs --omnicontext-data (a local copy of OmniContext; "
                                    f"see python -m echo4o_jax.eval.omnicontext -h; data: {mod.PUBLIC_URL})")
        return Path(args.omnicontext_data)
    flag = f"--{name.replace('_', '-')}-prompts"
    if explicit:
        path, how = Path(explicit), f"{flag} FILE at a local copy"
    else:
        path = Path(args.benchmarks_dir) / mod.PROMPTS_FILE
        how = (f"--benchmarks-dir DIR at the folder holding {mod.PROMPTS_FILE} (e.g. ../shared/benchmarks) "
               f"or {flag} FILE at the file")
    return common.resolve_prompts(path, mod.PUBLIC_URL, mod.PUBLIC_MD5, args.fetch, how_to_point=how)


def _load(name: str, path: Path, args):
    mod = BENCHES[name]
    if name == "omnicontext":
        return mod.load_items(path, args.limit, args.omnicontext_data_root)
    return mod.load_items(path, args.limit)


def _expected(images_dir: Path, req: dict) -> list[Path]:
    return [images_dir / common.image_name(req["id"], k) for k in range(req["num_images"])]


def generate(name: str, items, images_dir: Path, args, api: _GenerationAPI) -> dict:
    """Generate the images of the requests that lack one (absent, or not decoding fully: a write cut
    short); all of them with --regenerate. A GenerateError becomes a UsageError naming the benchmark
    (images written before it are kept; a re-run resumes)."""
    mod = BENCHES[name]
    reqs = mod.generation_requests(items, num_images=args.num_images, seed=args.seed,
                                   size=tuple(args.size) if args.size else None)
    todo = list(reqs) if args.regenerate else [
        r for r in reqs if not api.outputs_finished(_expected(images_dir, r), f"{name} request {r['id']!r}")]
    info = {"requests": len(reqs), "generated": len(todo)}
    if todo:
        # generate_batch writes atomically: an image absent before is complete once it exists; one there before
        # (cut short, or beside an absent one) may be left as it was, so only those are decoded again
        existed = {p for r in todo for p in _expected(images_dir, r) if p.is_file()}
        images_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] generating {len(todo)} of {len(reqs)} requests -> {images_dir}", file=sys.stderr)
        try:
            api.generate_batch(str(args.ckpt), todo, str(images_dir), regenerate=args.regenerate,
                               **_parse_gen_args(args.gen_arg))
        except api.error as e:
            raise common.UsageError(f"[{name}] generation failed: {e}") from None
        absent = [str(p) for r in todo for p in _expected(images_dir, r)
                  if not p.is_file() or (p in existed and not api.image_complete(p))]
        info["not_written"] = absent
        if absent:
            print(f"[{name}] warning: generate_batch did not write {len(absent)} images (they count as "
                  "failures), e.g. " + ", ".join(absent[:3]), file=sys.stderr)
    return info


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.eval.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder passed to generate_batch")
    ap.add_argument("--bench", default="geneval_pp,imagine_bench",
                    help=f"comma-separated, from {','.join(BENCHES)} (default %(default)s)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--benchmarks-dir", default=os.environ.get("ECHO4O_BENCHMARKS_DIR", "benchmarks"),
                    help="folder with geneval_pp.jsonl / imagine_bench.jsonl (default $ECHO4O_BENCHMARKS_DIR "
                         "or ./benchmarks)")
    ap.add_argument("--geneval-pp-prompts", default=None, help="GenEval++ jsonl (overrides --benchmarks-dir)")
    ap.add_argument("--imagine-bench-prompts", default=None, help="Imagine-Bench jsonl (overrides --benchmarks-dir)")
    ap.add_argument("--omnicontext-data", default=None, help="OmniContext manifest or folder (see eval.omnicontext)")
    ap.add_argument("--omnicontext-data-root", default=None, help="folder OmniContext input paths are relative to")
    ap.add_argument("--fetch", action="store_true", help="download absent public prompt files")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of each benchmark")
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt (official: 1)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the first prompt; prompt i gets seed + i")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="output size (default: generate_batch's own default)")
    ap.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra keyword for generate_batch (repeatable), e.g. cfg_text_scale=4.0")
    ap.add_argument("--regenerate", action="store_true", help="generate even when the images exist")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--judge-only", action="store_true", help="skip generation (images already there)")
    mode.add_argument("--generate-only", action="store_true", help="skip judging")
    ap.add_argument("--label", default=None, help="row name in the summaries (default: the checkpoint folder name)")
    ap.add_argument("--template", action="append", default=[], metavar="NAME=FILE",
                    help="replace a built-in judge template (repeatable); NAME in " + ", ".join(TEMPLATE_NAMES))
    common.add_judge_args(ap)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    names = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHES]
    if unknown or not names:
        raise common.UsageError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    if not args.judge_only and not args.ckpt:
        raise common.UsageError("--ckpt is required unless --judge-only")
    templates = _templates(args.template)
    label = args.label or (Path(args.ckpt).name if args.ckpt else "ours")
    out = Path(args.out)
    # Load every prompt file first, so that a missing file fails before hours of generation.
    loaded = {}
    for name in names:
        path = _prompt_path(args, name)
        loaded[name] = (path, _load(name, path, args))
    gen_api = None if args.judge_only else _load_generation_api()
    judge = None if args.generate_only else common.judge_from_args(args, out)
    report = {"ckpt": args.ckpt, "label": label, "benchmarks": {}}
    for name in names:
        mod = BENCHES[name]
        path, items = loaded[name]
        images_dir = out / name / "images"
        entry = {"prompts": str(path), "items": len(items), "images_dir": str(images_dir)}
        if gen_api is not None:
            entry["generation"] = generate(name, items, images_dir, args, gen_api)
        if judge is not None:
            kw = dict(num_images=args.num_images, label=label, progress=not args.no_progress,
                      source={"prompts": str(path), "ckpt": args.ckpt})
            if name == "omnicontext":
                kw["templates"] = {k: templates[v] for k, v in omnicontext.TEMPLATES.items() if v in templates}
            elif name in templates:
                kw["template"] = templates[name]
            doc = mod.evaluate(items, images_dir, judge, out / name, **kw)
            entry["summary"] = {k: v for k, v in doc["summary"].items() if not isinstance(v, dict)}
            entry["judge_stats"] = doc["judge_stats"]  # this benchmark's; report["judge_stats"]: the run's
            entry["results"] = str(out / name / "results.json")
            entry["markdown"] = (out / name / "summary.md").read_text(encoding="utf-8")
        report["benchmarks"][name] = entry
    if judge is not None:
        report["judge_stats"] = dict(judge.stats)
        md = [f"# Evaluation of {label}", ""] + [report["benchmarks"][n].pop("markdown") for n in names]
        (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    common.write_json(out / "summary.json", report)
    for name in names:
        s = report["benchmarks"][name].get("summary")
        if s:
            head = {k: v for k, v in s.items() if k in ("score", "overall", "overall_official_script", "overall_8",
                                                        "echo4o_avg", "n_missing", "n_judge_failures")}
            print(f"{name}: " + ", ".join(f"{k}={common.fmt(v, 4)}" for k, v in head.items()))
    return report


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
