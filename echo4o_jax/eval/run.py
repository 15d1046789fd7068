r"""Generate the benchmark images with a checkpoint, then judge them.

    python -m echo4o_jax.eval.run --ckpt DIR [--step N] --bench geneval_pp,imagine_bench --out DIR \
        [--benchmarks-dir DIR | --geneval-pp-prompts F --imagine-bench-prompts F --geneval-prompts F] [--fetch] \
        [--omnicontext-data F [--omnicontext-data-root DIR]] [--num-images N] [--seed 42] [--size HxW] \
        [--gen-arg KEY=VALUE ...] [--judge-only | --generate-only] [--regenerate] [--geneval-results F] \
        [judge options]

Benchmarks: ``geneval_pp``, ``imagine_bench`` and ``omnicontext`` are judged by the VLM judge (1 image per
prompt by default); ``geneval`` (the original GenEval) is scored by its official object detector, which runs
outside this tool: its images (4 per prompt, no image CFG, cfg_interval [0, 1], as BAGEL's GenEval script) are
laid out for the official evaluator in ``<out>/geneval/layout`` and its output is read back from
``<out>/geneval/detector_results.jsonl`` (or ``--geneval-results F``) when the run is repeated (see
``python -m echo4o_jax.eval.geneval -h``); it needs no API key. OmniContext is generated with Echo-4o's
script settings (image scale 1.5, ViT transform (980, 378), the output size of the first input image: see
``python -m echo4o_jax.eval.omnicontext -h``). Every benchmark's images are saved cropped to their non-black content,
as the official generation scripts (``crop_to_bbox``: a no-op unless an image has black border rows or columns);
``--size`` and ``--gen-arg`` override a benchmark's settings (e.g. ``--gen-arg crop_to_bbox=false``).

For each benchmark B the images go to ``<out>/B/images/<stem>_<k>.png`` (the naming every
``python -m echo4o_jax.eval.B --images`` reads) and the results to ``<out>/B/`` (results.json,
summary.md, gallery.html); ``<out>/summary.md`` / ``summary.json`` collect the headline numbers (a later run
of fewer benchmarks into the same ``--out`` keeps the others' entries, marked ``from_earlier_run``; those
not fully judged are listed as ``earlier_incomplete``), and
``<out>/judge_cache`` is shared. ``results.json`` holds each benchmark's own judge counters;
``summary.json`` the run's totals.

Resuming: ``<out>/B/images/generation.json`` records what generated each request's images (checkpoint
path, training-workdir step -- ``--step N``, default the workdir's latest, resolved once per run -- and
the size and modification time of its weight files; seed, ``--gen-arg`` settings, size, number of images, prompt and reference images); written when
generation starts and settled when it stops (images of a run killed outright are told apart by their
modification times). Images that already exist and decode fully are not generated again when that record
matches this run (an image cut short by a kill is generated again), so an interrupted run resumes. A
rerun with another checkpoint (or step, or weights rewritten in place), seed, generation setting, size, number of images or prompt in the same
``--out`` is refused before anything is generated, with an error naming what differs -- judging those
images would report another generation's scores under this run's name: use another ``--out``, or pass
``--regenerate`` to generate those images again with this run's settings (images without a record, e.g.
from an older version, are refused the same way; images already made with this run's settings are kept, so
an interrupted ``--regenerate`` run resumes). A larger ``--num-images`` is refused as well: a request's images
are generated together, so adding one generates the request again, replacing the images there.
``--judge-only`` judges the images as they are (images made another way are fine), but refuses ones whose
record names another prompt, or another ``--ckpt`` / ``--step`` / ``--seed`` / ``--size`` / ``--gen-arg``
when those are given.

Generation uses ``echo4o_jax.generate.generate_batch(ckpt, requests, out_dir, regenerate=..., **overrides)``
(one call per benchmark, after one call per benchmark with ``check_only=True`` that checks every request
against the checkpoint before any is generated; ``--gen-arg KEY=VALUE`` become the overrides, VALUE
parsed as JSON when it parses; a training workdir's resolved step is passed as ``step``). A request is ``{"id": <stem>, "prompt", "seed": seed + index, "num_images", "size"?, "images"?}``.
A generation error (``GenerateError``: e.g. an output size the checkpoint cannot make, or an image that cannot be
written: a full disk) stops the run with a one-line ``error: ...``; images written before it are kept (a rerun
resumes).

Before anything is generated: every prompt file is loaded and checked, the templates and ``--gen-arg``
values parsed, the output folders checked against their records, the API key checked when judging
follows and there is something to generate (``--no-api-key`` for a server without one), and every request
to generate checked by the generator (sizes, settings, reference images, prompt length), so that a
mistake fails in seconds, not after hours of generation.

Prompt files: ``--benchmarks-dir`` (default ``$ECHO4O_BENCHMARKS_DIR`` or ``./benchmarks``; no other
folder is searched, e.g. ``--benchmarks-dir ../shared/benchmarks``) holds ``geneval_pp.jsonl``,
``imagine_bench.jsonl`` and ``geneval_metadata.jsonl``; ``--fetch`` downloads the public files there when
absent. OmniContext needs a local copy (``--omnicontext-data``).

Judge prompts (``--judge-prompts``): ``official`` (default) reads the GenEval++, Imagine-Bench and OmniContext
prompts from the benchmarks' official evaluation scripts at run time (``--official-scripts DIR``, default
``<benchmarks-dir>/official``; ``--fetch`` downloads them there; OmniContext's is OmniGen2's
``prompt_generator.py``, whose image transport is unverified; see ``echo4o_jax.eval.official``): a missing
script is an error naming both. ``ours`` uses echo4o_jax's own templates: the results, summary.json and
summary.md then say that the scores are not the official protocol's wording and not directly comparable with
the paper's. A ``--template NAME=FILE`` replaces either (for OmniContext, one of its three replaces all three
official prompts: the others are ours).

The exit status (below) is that of this run's benchmarks; GenEval without detector results yet is incomplete (1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

from ..interrupts import exit_process
from ..paths import folder_problem
from ..sampling_defaults import DEFAULT_SIZE, SETTING_FLAGS, default_settings
from . import common, geneval, geneval_pp, imagine_bench, omnicontext
from .judge import JudgeConfigError, api_key_from_env, load_template

BENCHES = {"geneval_pp": geneval_pp, "imagine_bench": imagine_bench, "omnicontext": omnicontext, "geneval": geneval}
OFFICIAL_PROMPTS = ("geneval_pp", "imagine_bench", "omnicontext")  # those --judge-prompts official reads a script for
TEMPLATE_NAMES = ("geneval_pp", "imagine_bench") + tuple(omnicontext.TEMPLATES.values())
GENERATION_RECORD = "generation.json"  # in <out>/<bench>/images: what generated each request's images
DEFAULT_SEED = 42


def _replaced(name: str, templates: dict) -> bool:
    """Whether a --template replaces benchmark `name`'s judge prompts (OmniContext: any of its three)."""
    return any(t in templates for t in (omnicontext.TEMPLATES.values() if name == "omnicontext" else (name,)))


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
    generate_batch: Callable  # (ckpt, requests, out_dir, *, regenerate=False, progress=True, **overrides)
    error: type[Exception]  # what generate_batch raises for bad input (GenerateError)
    image_complete: Callable[[Path], bool]  # does an existing image decode fully
    # (paths, what) -> every image exists and decodes fully (broken ones reported): generate_batch's resume check
    outputs_finished: Callable[[list[Path], str], bool]
    # (ckpt, step) -> {"ckpt", "ckpt_step", "ckpt_weights"}: which weights generate_batch loads
    checkpoint_identity: Callable[[str, int | None], dict]


def _load_generation_api() -> _GenerationAPI:
    try:
        from echo4o_jax.generate import (GenerateError, checkpoint_identity, generate_batch, image_complete,
                                         outputs_finished)
    except ImportError as e:
        raise common.UsageError(
            "image generation needs echo4o_jax.generate (generate_batch, GenerateError, image_complete, "
            f"outputs_finished, checkpoint_identity), which could not be imported ({type(e).__name__}: {e}). "
            "Generate the images another way as <stem>_<k>.png in <out>/<bench>/images and re-run with "
            "--judge-only.") from None
    return _GenerationAPI(generate_batch, GenerateError, image_complete, outputs_finished, checkpoint_identity)


def _parse_gen_args(pairs) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise common.UsageError(f"--gen-arg expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        if k.strip() in ("regenerate", "step"):
            raise common.UsageError(f"--gen-arg {k.strip()}=...: use --{k.strip()}")
        if k.strip() in ("check_only", "progress"):  # eval.run's own (its check before generating, --no-progress)
            raise common.UsageError(f"--gen-arg {k.strip()}=...: not a generation setting")
        if k.strip() == "max_new_tokens":
            raise common.UsageError("--gen-arg max_new_tokens=... would be ignored: it limits the think text of "
                                    "think requests, and no benchmark request thinks")
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


def _images_of(images_dir: Path, rid: str, num_images: int) -> list[Path]:
    return [images_dir / common.image_name(rid, k) for k in range(num_images)]


def _expected(images_dir: Path, req: dict) -> list[Path]:
    return _images_of(images_dir, req["id"], req["num_images"])


# What generated a request's images (one entry per request id in GENERATION_RECORD), and the flag that sets each.
_SETTINGS = {"ckpt": "--ckpt", "ckpt_step": "--step (the training workdir's checkpoint; default its latest)",
             "ckpt_weights": "the checkpoint's weight files (size, modification time: trained on or replaced in place)",
             "seed": "--seed (request seed = --seed + its index)",
             "gen_args": "the generation settings (--gen-arg over the benchmark's own, e.g. GenEval's cfg_interval)",
             "size": "the output size (--size, else the benchmark's own, e.g. OmniContext's first input image's)",
             "num_images": "--num-images", "prompt": "the prompt", "images": "the reference images"}


def _checkpoint(args, api: _GenerationAPI | None) -> dict:
    """Which weights this run names: {"ckpt", "ckpt_step", "ckpt_weights"} (generate.checkpoint_identity; the
    step of a training workdir resolved once, so that every benchmark uses it). --judge-only (no generation API):
    the folder and --step as given."""
    if api is None or args.ckpt is None:
        return {"ckpt": None if args.ckpt is None else str(Path(args.ckpt).resolve()), "ckpt_step": args.step,
                "ckpt_weights": None}
    try:
        return api.checkpoint_identity(args.ckpt, args.step)
    except api.error as e:
        raise common.UsageError(str(e)) from None


def _provenance(req: dict, ckpt: dict, gen_args: dict) -> dict:
    return {**ckpt, "seed": req["seed"], "gen_args": gen_args,
            "size": list(req["size"]) if req.get("size") else None, "num_images": req["num_images"],
            "prompt": req["prompt"], "images": [str(Path(p).resolve()) for p in req.get("images", [])]}


# --gen-arg keys that do not make other images, left out when records are compared (generate does not record them
# either): the attention implementation (float rounding at most, as a batch's composition) and the KV-cache capacity
UNCOMPARED_GEN_ARGS = ("attention_impl", "max_context")


def _as_run(field: str, value, req: dict):
    """A recorded or current setting as the generation used it: the generator's defaults filled in, so that a
    --gen-arg or --size naming a default (cfg_text_scale=4.0, num_timesteps=50, 1024x1024) is the same generation;
    the settings that change nothing left out (UNCOMPARED_GEN_ARGS, and vae_posterior without input images:
    nothing is VAE-encoded)."""
    if field == "gen_args" and isinstance(value, dict):  # (crop_to_bbox: False in records older than it)
        has_images = bool(req.get("images"))
        out = {**default_settings(has_images), "crop_to_bbox": False, **value}
        for k in UNCOMPARED_GEN_ARGS + (() if has_images else ("vae_posterior",)):
            out.pop(k, None)
        return out
    if field == "size" and value is None and not req.get("images"):
        return list(DEFAULT_SIZE)
    return value


def _resolved(images_dir: Path, rid: str, entry: dict | None) -> dict | None:
    """The settings that made request `rid`'s images per its record entry. An entry written as generation began
    (``pending_since``: the folder's clock then; a run killed before it settled its record leaves one) holds
    for images written since then; images all older are those of the entry it replaced (``previous``); a mix
    (a kill in the middle of a request) is of unknown origin: None."""
    while entry is not None and "pending_since" in entry:
        times = [p.stat().st_mtime for p in _images_of(images_dir, rid, entry.get("num_images", 0)) if p.is_file()]
        if all(t >= entry["pending_since"] for t in times):
            return {k: v for k, v in entry.items() if k not in ("pending_since", "previous")}
        if any(t >= entry["pending_since"] for t in times):
            return None
        entry = entry.get("previous")
    return entry


def _read_record(images_dir: Path) -> dict[str, dict]:
    """{request id: provenance} of a benchmark's images folder ({} when there is no record)."""
    p = images_dir / GENERATION_RECORD
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        reqs = doc["requests"]
        if not isinstance(reqs, dict) or not all(isinstance(v, dict) for v in reqs.values()):
            raise ValueError("'requests' must map request ids to objects")
        resolved = {rid: _resolved(images_dir, rid, e) for rid, e in reqs.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise common.UsageError(f"{p}: not a generation record ({type(e).__name__}: {e}); it says what made the "
                                "images beside it: restore it, or pass --regenerate to generate them again") from None
    return {rid: e for rid, e in resolved.items() if e is not None}


def _write_record(images_dir: Path, record: dict[str, dict]) -> None:
    common.write_json(images_dir / GENERATION_RECORD, {
        "about": "what generated each request's images (python -m echo4o_jax.eval.run); a rerun with other "
                 "settings in this folder is refused", "requests": record})


def _folder_clock(d: Path) -> float:
    """Now, by the clock of the file system holding `d` (the one that stamps the images' mtimes)."""
    p = d / f".clock.{os.getpid()}"
    p.touch()
    try:
        return p.stat().st_mtime
    finally:
        p.unlink()


def _settled(plan: "_Plan", since: float, made=()) -> dict[str, dict]:
    """The record once generation stopped (finished, failed or interrupted): a request in `made` (generate_batch
    returned, every image of it there: generated now, or found made with exactly these settings by
    generate_batch's own record under --regenerate) or whose images were all written since `since` was made
    with this run's settings; one with none written keeps its old entry; a mix has no entry (unknown origin)."""
    record = dict(plan.record)
    for r in plan.todo:
        times = [p.stat().st_mtime for p in _expected(plan.images_dir, r) if p.is_file()]
        if r["id"] in made or (times and all(t >= since for t in times)):
            record[r["id"]] = plan.current[r["id"]]
        elif any(t >= since for t in times):
            record.pop(r["id"], None)
    return record


def _refuse_mismatches(name: str, images_dir: Path, mismatched: dict[str, list], unrecorded: list[str], *,
                       judge_only: bool) -> None:
    """A UsageError naming each setting that differs between the images' record and this run (an example
    request and how many), and the images without a record; nothing when both are empty."""
    if not mismatched and not unrecorded:
        return
    parts = []
    for field, rows in mismatched.items():
        rid, was, now = rows[0]
        parts.append(f"{_SETTINGS[field]} differs for {len(rows)} request(s), e.g. {rid}: the images were made "
                     f"with {was!r}, this run has {now!r}")
    if unrecorded:
        parts.append(f"{len(unrecorded)} request(s) have images but no record of what made them (e.g. "
                     f"{unrecorded[0]}; an older eval.run or another tool)")
    how = ("use --regenerate (without --judge-only) to generate them again with these settings, or another --out"
           if judge_only else "use another --out for this run, or pass --regenerate to generate those images again "
           "with these settings (or --judge-only to judge them as they are)")
    raise common.UsageError(f"[{name}] {images_dir} holds images from another generation, which would be judged "
                            f"as this run's: {'; '.join(parts)}. Nothing was generated; {how}")


@dataclasses.dataclass
class _Plan:
    """What eval.run generates for one benchmark: its requests, those to generate, the images' record."""
    name: str
    images_dir: Path
    reqs: list[dict]
    todo: list[dict]
    record: dict[str, dict]
    current: dict[str, dict]  # this run's provenance per request id


def _num_images(args, name: str) -> int:
    """--num-images, else the benchmark's protocol (GenEval: 4; the judged ones: 1)."""
    return args.num_images or getattr(BENCHES[name], "NUM_IMAGES", 1)


def _gen_args(gen_args: dict, name: str) -> dict:
    """The generation settings of a benchmark: its GEN_DEFAULTS (text-to-image ones:
    common.T2I_EVAL_GEN_DEFAULTS; OmniContext: its script's) under --gen-arg."""
    return {**getattr(BENCHES[name], "GEN_DEFAULTS", {}), **gen_args}


def _parse_size(values: list[str] | None) -> tuple[int, int] | None:
    """--size HxW (generate's form) or H W -> (H, W)."""
    if values is None:
        return None
    parts = values[0].lower().split("x") if len(values) == 1 else values
    try:
        h, w = (common.positive_int(v) for v in parts)
    except (ValueError, argparse.ArgumentTypeError):
        raise common.UsageError(f"--size {' '.join(values)}: expected HxW (or H W), positive integers, e.g. "
                                "1024x1024") from None
    return h, w


def _judged(name: str) -> bool:
    return getattr(BENCHES[name], "JUDGED", True)


def _requests(name: str, items, args, gen_args: dict) -> list[dict]:
    # OmniContext's default output size follows the VAE resize rule: a --gen-arg vae_transform changes it too
    kw = {"vae_transform": gen_args["vae_transform"]} if name == "omnicontext" and "vae_transform" in gen_args else {}
    return BENCHES[name].generation_requests(items, num_images=_num_images(args, name), **kw,
                                             seed=DEFAULT_SEED if args.seed is None else args.seed,
                                             size=tuple(args.size) if args.size else None)


def plan_generation(name: str, items, images_dir: Path, args, ckpt: dict, gen_args: dict,
                    api: _GenerationAPI) -> _Plan:
    """The requests that lack an image (absent, or not decoding fully: a write cut short). A request whose images
    are kept must have been generated with this run's settings (its entry in the images' record), and so must a
    request with some of its images there (more images now: generating it would replace them); otherwise
    nothing is generated and the error names what differs. With --regenerate those are generated again, and a
    request made with exactly this run's settings is still kept (an interrupted --regenerate run resumes)."""
    reqs = _requests(name, items, args, gen_args)
    record = _read_record(images_dir)
    current = {r["id"]: _provenance(r, ckpt, gen_args) for r in reqs}
    todo, mismatched, unrecorded = [], {}, []
    for r in reqs:
        paths = _expected(images_dir, r)
        finished = api.outputs_finished(paths, f"{name} request {r['id']!r}")
        was = record.get(r["id"])
        if not finished and (was is None or not any(p.is_file() for p in paths)):
            todo.append(r)  # nothing of it to keep
            continue
        diff = [] if was is None else [(f, was.get(f), now) for f, now in current[r["id"]].items()
                                       if _as_run(f, was.get(f), r) != _as_run(f, now, r)]
        if was is not None and not diff:
            if not finished:  # this run's settings: the rest of its images
                todo.append(r)
        elif args.regenerate:
            todo.append(r)
        elif was is None:
            unrecorded.append(r["id"])
        else:
            for field, old, now in diff:
                mismatched.setdefault(field, []).append((r["id"], old, now))
    if "gen_args" in mismatched:  # a setting the generator does not take (a typo) is said as that, not as
        r0 = reqs[0]              # another generation: the first request checked with this run's settings
        try:
            api.generate_batch(str(args.ckpt), [r0], None, check_only=True,
                               **_overrides(gen_args, current[r0["id"]]["ckpt_step"]))
        except api.error as e:
            raise common.UsageError(f"[{name}] --gen-arg: {_generation_error(e)} (nothing was generated)") from None
    _refuse_mismatches(name, images_dir, mismatched, unrecorded, judge_only=False)
    return _Plan(name, images_dir, reqs, todo, record, current)


def check_judge_only(name: str, items, images_dir: Path, args, ckpt: dict, gen_args: dict) -> None:
    """--judge-only: images whose record names another prompt or reference images, or another --ckpt / --step /
    --seed / --size / --gen-arg than those given, are refused (images without a record are judged as they are)."""
    record = _read_record(images_dir)
    if not record:
        return
    fields = ["prompt", "images"] + [f for f, given in (("ckpt", args.ckpt), ("ckpt_step", args.step is not None),
                                                         ("seed", args.seed is not None),
                                                         ("size", args.size), ("gen_args", args.gen_arg)) if given]
    mismatched: dict[str, list] = {}
    for r in _requests(name, items, args, gen_args):
        was = record.get(r["id"])
        if was is None or not any(p.is_file() for p in _expected(images_dir, r)):
            continue
        now = _provenance(r, ckpt, gen_args)
        for field in fields:
            if _as_run(field, was.get(field), r) != _as_run(field, now[field], r):
                mismatched.setdefault(field, []).append((r["id"], was.get(field), now[field]))
    _refuse_mismatches(name, images_dir, mismatched, [], judge_only=True)


# eval.run's form of each setting's flag that generate's advice names (sampling_defaults.SETTING_FLAGS' keys)
EVAL_FLAGS = {"vae_transform": "--gen-arg vae_transform=[MAX,MIN]", "vit_transform": "--gen-arg vit_transform=[MAX,MIN]",
              "size": "--size HxW", "max_context": "--gen-arg max_context", "dtype": "--gen-arg dtype=...",
              "step": "--step", "attention_impl": "--gen-arg attention_impl=..."}


def _generation_error(e: Exception) -> str:
    """A generation error's text with eval.run's flags in its advice (generate names its own CLI's)."""
    msg = str(e)
    for key, theirs in sorted(SETTING_FLAGS.items(), key=lambda kv: -len(kv[1])):  # (a longer form first)
        msg = msg.replace(f"({theirs}", f"({EVAL_FLAGS[key]}").replace(f"{theirs}=", f"{EVAL_FLAGS[key]}=")
    return msg


def _overrides(gen_args: dict, step: int | None) -> dict:
    """generate_batch's keyword arguments: the settings, and a training workdir's step resolved once."""
    return {**gen_args, **({} if step is None else {"step": step})}


def _batch_overrides(plan: _Plan, gen_args: dict) -> dict:
    """`_overrides` for the plan's requests (the step the record names)."""
    return _overrides(gen_args, plan.current[plan.todo[0]["id"]]["ckpt_step"] if plan.todo else None)


def check_generation(plan: _Plan, prompts: Path, args, gen_args: dict, api: _GenerationAPI) -> None:
    """The plan's requests checked by the generator (sizes, settings, reference images, prompt length against
    the checkpoint) without generating anything: every benchmark's are checked before any is generated."""
    if not plan.todo:
        return
    try:
        api.generate_batch(str(args.ckpt), plan.todo, None, check_only=True, **_batch_overrides(plan, gen_args))
    except api.error as e:
        raise common.UsageError(f"[{plan.name}] {prompts}: {_generation_error(e)} (nothing was generated)") from None


def generate(plan: _Plan, args, gen_args: dict, api: _GenerationAPI) -> dict:
    """Generate the plan's requests to do. Their record entries are written first as pending (so that the
    images of a run killed outright are attributed by their mtimes), and settled when generation stops, also on
    an error or Ctrl-C. A GenerateError becomes a UsageError naming the benchmark (images written before it are
    kept; a re-run resumes)."""
    name, images_dir, todo = plan.name, plan.images_dir, plan.todo
    info = {"requests": len(plan.reqs), "generated": len(todo)}
    if todo:
        # generate_batch writes atomically: an image absent before is complete once it exists; one there before
        # (cut short, or beside an absent one) may be left as it was, so only those are decoded again
        existed = {p for r in todo for p in _expected(images_dir, r) if p.is_file()}
        if existed:  # images judged before are replaced: their results no longer hold (until judged again)
            _mark_stale(images_dir.parent.parent, name)
        images_dir.mkdir(parents=True, exist_ok=True)
        since = _folder_clock(images_dir)
        _write_record(images_dir, {**plan.record, **{
            r["id"]: {**plan.current[r["id"]], "pending_since": since, "previous": plan.record.get(r["id"])}
            for r in todo}})
        print(f"[{name}] generating {len(todo)} of {len(plan.reqs)} requests -> {images_dir}", file=sys.stderr)
        made = None  # the requests generate_batch finished, once it returns
        try:
            api.generate_batch(str(args.ckpt), todo, str(images_dir), regenerate=args.regenerate,
                               progress=not args.no_progress, **_batch_overrides(plan, gen_args))
            absent = [str(p) for r in todo for p in _expected(images_dir, r)
                      if not p.is_file() or (p in existed and not api.image_complete(p))]
            made = {r["id"] for r in todo if not any(str(p) in absent for p in _expected(images_dir, r))}
        except api.error as e:
            raise common.UsageError(f"[{name}] generation failed: {_generation_error(e)}") from None
        finally:
            try:
                _write_record(images_dir, _settled(plan, since, made or ()))
            except common.UsageError:  # e.g. the disk is full
                if made is not None:
                    raise
                # the generation's own error (or Ctrl-C) is the one to report; the record written as generation
                # began stays, which a rerun settles by the images' times
        info["not_written"] = absent
        if absent:
            print(f"[{name}] warning: generate_batch did not write {len(absent)} images (they count as "
                  "missing), e.g. " + ", ".join(absent[:3]), file=sys.stderr)
    return info


_STALE = ("its images are being generated again: these results are of the images they replace (until judged "
          "again)")


def _mark_stale(out: Path, name: str) -> None:
    """Benchmark `name`'s results.json and its summary.json entry marked incomplete before its images are
    replaced: a run stopped meanwhile (Ctrl-C, an error) left them saying complete, of images partly gone."""
    for path, pick in ((out / name / "results.json", lambda d: d),
                       (out / "summary.json", lambda d: (d.get("benchmarks") or {}).get(name))):
        try:
            doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError:
            continue
        entry = pick(doc) if isinstance(doc, dict) else None
        if isinstance(entry, dict) and entry.get("complete"):
            entry.update(complete=False, incomplete=_STALE)
            doc["complete"] = False
            common.write_json(path, doc)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.eval.run", description=__doc__ + "\n" + common.EXIT_STATUS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder passed to generate_batch")
    ap.add_argument("--step", type=int, default=None,
                    help="a training workdir's checkpoint step (default: its latest); refused for other folders")
    ap.add_argument("--bench", default="geneval_pp,imagine_bench",
                    help=f"comma-separated, from {','.join(BENCHES)} (default %(default)s)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--benchmarks-dir", default=os.environ.get("ECHO4O_BENCHMARKS_DIR", "benchmarks"),
                    help="folder with geneval_pp.jsonl / imagine_bench.jsonl (default $ECHO4O_BENCHMARKS_DIR "
                         "or ./benchmarks)")
    ap.add_argument("--geneval-pp-prompts", default=None, help="GenEval++ jsonl (overrides --benchmarks-dir)")
    ap.add_argument("--imagine-bench-prompts", default=None, help="Imagine-Bench jsonl (overrides --benchmarks-dir)")
    ap.add_argument("--geneval-prompts", default=None,
                    help="GenEval metadata jsonl (overrides --benchmarks-dir; e.g. the rewritten-prompt file)")
    ap.add_argument("--geneval-results", default=None,
                    help="the official GenEval evaluator's output (default: <out>/geneval/detector_results.jsonl "
                         "when it exists; see python -m echo4o_jax.eval.geneval -h)")
    ap.add_argument("--omnicontext-data", default=None, help="OmniContext manifest or folder (see eval.omnicontext)")
    ap.add_argument("--omnicontext-data-root", default=None, help="folder OmniContext input paths are relative to")
    ap.add_argument("--fetch", action="store_true",
                    help="download absent public prompt files and official evaluation scripts")
    ap.add_argument("--limit", type=common.positive_int, default=None,
                    help="only the first N prompts of each benchmark")
    ap.add_argument("--num-images", type=common.positive_int, default=None,
                    help="images per prompt (default: each benchmark's protocol: GenEval 4, the others 1)")
    ap.add_argument("--seed", type=int, default=None,
                    help=f"seed of the first prompt; prompt i gets seed + i (default {DEFAULT_SEED})")
    ap.add_argument("--size", nargs="+", metavar="HxW", default=None,
                    help="output size, HxW as generate's --size (or H W), e.g. 1024x1024 (default: each benchmark's "
                         "own, else generate_batch's)")
    ap.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra keyword for generate_batch (repeatable), e.g. cfg_text_scale=4.0")
    ap.add_argument("--regenerate", action="store_true",
                    help="generate again the images made with other settings (otherwise refused); those made with "
                         "this run's settings are kept, so an interrupted --regenerate run resumes")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--judge-only", action="store_true", help="skip generation (images already there)")
    mode.add_argument("--generate-only", action="store_true", help="skip judging")
    ap.add_argument("--label", default=None, help="row name in the summaries (default: the checkpoint folder name)")
    ap.add_argument("--template", action="append", default=[], metavar="NAME=FILE",
                    help="replace a judge template (repeatable; it replaces the official prompts too); NAME in "
                         + ", ".join(TEMPLATE_NAMES))
    common.add_judge_prompts_args(ap, folder_default=f"<benchmarks-dir>/{common.OFFICIAL_SCRIPTS_DIR}")
    common.add_judge_args(ap)
    return ap


def _earlier_benchmarks(out: Path, names: list[str], ckpt: tuple) -> dict[str, dict]:
    """The entries of an earlier summary.json in `out` for benchmarks this run does not do (their images and
    results are still there), each marked with `from_earlier_run`: only those of the same (checkpoint, step,
    label) as this run (`ckpt`); another checkpoint's results are dropped from the summary, with a warning
    (their own results.json stays)."""
    p = out / "summary.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except ValueError:
        print(f"warning: {p} is not JSON: it is replaced by this run's benchmarks only", file=sys.stderr)
        return {}
    earlier = doc.get("benchmarks") if isinstance(doc, dict) else None
    kept = {n: e for n, e in (earlier or {}).items()
            if n in BENCHES and n not in names and isinstance(e, dict) and "complete" in e}
    same = {n: e for n, e in kept.items() if (e.get("ckpt"), e.get("ckpt_step"), e.get("label")) == ckpt}
    if len(same) < len(kept):
        print(f"warning: {p}: {', '.join(sorted(set(kept) - set(same)))} evaluated another checkpoint (or label) "
              f"than this run's: left out of the summary (its results.json stays)", file=sys.stderr)
    return {n: {**e, "from_earlier_run": True} for n, e in same.items()}


def _markdown_of(out: Path, name: str) -> str:
    """An earlier benchmark's section of summary.md: its own summary.md, as that run wrote it."""
    p = out / name / "summary.md"
    return p.read_text(encoding="utf-8") if p.is_file() else f"## {name}\n\n(no results: generated only)\n"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    names = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHES]
    if unknown or not names:
        raise common.UsageError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    if not args.judge_only and not args.ckpt:
        raise common.UsageError("--ckpt is required unless --judge-only")
    if args.step is not None and not args.ckpt:
        raise common.UsageError("--step picks a checkpoint of the --ckpt workdir: give --ckpt")
    args.size = _parse_size(args.size)
    if args.geneval_results and "geneval" not in names:
        raise common.UsageError("--geneval-results is the GenEval detector's output: it needs --bench geneval")
    if args.geneval_results and not Path(args.geneval_results).is_file():
        raise common.UsageError(f"--geneval-results {args.geneval_results}: no such file")
    if args.geneval_results:
        geneval.check_results_path(Path(args.geneval_results), Path(args.out) / "geneval")
    if args.judge_only and args.regenerate:
        raise common.UsageError("--regenerate generates images again; it cannot go with --judge-only")
    templates = _templates(args.template)
    gen_args = _parse_gen_args(args.gen_arg)
    out = Path(args.out)
    why = folder_problem(out)
    if why:
        raise common.UsageError(f"--out {out}: {why}")
    recorded = None  # --judge-only: (checkpoint, step) the images' records name, when just one
    if args.judge_only:
        named = {(e.get("ckpt"), e.get("ckpt_step")) for n in names
                 for e in _read_record(out / n / "images").values() if e}
        if args.ckpt is None and len(named) > 1:  # (an interrupted --regenerate with another checkpoint: scored as
            # one model under the label "ours", exit 0)
            raise common.UsageError(
                f"--judge-only: the images in {out} were made by {len(named)} checkpoints ("
                + ", ".join(f"{c} step {st}" if st is not None else str(c) for c, st in sorted(named, key=str))
                + "); name the one to judge with --ckpt (and --step), or generate the others again with it")
        if len(named) == 1 and next(iter(named))[0]:
            (recorded,) = named
            if args.ckpt is not None and (str(Path(args.ckpt).resolve()) != recorded[0] or args.step is not None):
                recorded = None  # (--ckpt / --step given: check_judge_only compares them with the records)
    ckpt_name = args.ckpt or (recorded[0] if recorded else None)
    label = args.label or (Path(ckpt_name).name if ckpt_name else "ours")
    # Everything that can fail on bad input fails before hours of generation: every prompt file loaded and
    # checked, each output folder's images checked against their record, the API key when judging follows.
    loaded = {}
    for name in names:
        path = _prompt_path(args, name)
        loaded[name] = (path, _load(name, path, args))
    officials = {}  # the official judge prompts (read and checked before anything is generated)
    for name in names:
        if name in OFFICIAL_PROMPTS and not args.generate_only and not _replaced(name, templates):
            officials[name] = common.official_prompts(
                name, args, Path(args.benchmarks_dir) / common.OFFICIAL_SCRIPTS_DIR)
    gen_api = None if args.judge_only else _load_generation_api()
    ckpt = _checkpoint(args, gen_api)
    plans = {}
    for name in names:
        images_dir = out / name / "images"
        if gen_api is not None:
            plans[name] = plan_generation(name, loaded[name][1], images_dir, args, ckpt, _gen_args(gen_args, name),
                                          gen_api)
        else:
            check_judge_only(name, loaded[name][1], images_dir, args, ckpt, _gen_args(gen_args, name))
    evaluating = not args.generate_only  # judging, and GenEval's layout and detector results
    judged = [n for n in names if _judged(n)]
    judge = common.judge_from_args(args, out) if evaluating and judged else None
    if judge is not None and any(plans[n].todo for n in judged if n in plans):
        api_key_from_env(args.api_key_env, require=not args.no_api_key, error=JudgeConfigError)
    for name in plans:
        check_generation(plans[name], loaded[name][0], args, _gen_args(gen_args, name), gen_api)
    report = {"ckpt": args.ckpt, "ckpt_step": ckpt["ckpt_step"], "label": label, "benchmarks": {}}
    if recorded:
        (report["ckpt"], report["ckpt_step"]), report["ckpt_from"] = recorded, "generation records"
    ident = recorded or (ckpt["ckpt"], ckpt["ckpt_step"])  # the checkpoint (resolved) and step evaluated
    for name in names:
        mod = BENCHES[name]
        path, items = loaded[name]
        images_dir = out / name / "images"
        entry = {"prompts": str(path), "items": len(items), "images_dir": str(images_dir), "ckpt": ident[0],
                 "ckpt_step": ident[1], "label": label}
        subset = common.subset_source(items)  # {"subset": what --limit left out} or {}
        entry.update(subset)
        if gen_api is not None:
            entry["generation"] = generate(plans[name], args, _gen_args(gen_args, name), gen_api)
            entry["complete"] = not entry["generation"].get("not_written")
        if evaluating:
            record = images_dir / GENERATION_RECORD
            kw = dict(num_images=_num_images(args, name), label=label, progress=not args.no_progress,
                      source={"prompts": str(path),
                              "prompts_md5": common.md5sum(path) if Path(path).is_file() else None,
                              "ckpt": ident[0], "ckpt_step": ident[1],
                              "generation_record": str(record) if record.is_file() else None,
                              **subset})
            if name in officials:
                kw["official"] = officials[name]
            elif name == "omnicontext":
                kw["templates"] = {k: templates[v] for k, v in omnicontext.TEMPLATES.items() if v in templates}
            elif name == "geneval":
                kw["detector_results"] = args.geneval_results
            elif name in templates:
                kw["template"] = templates[name]
            doc = mod.evaluate(items, images_dir, judge, out / name, **kw)
            for k in ("judge_prompts", "prompt_variant"):  # (GenEval: short or rewritten prompts)
                if doc.get(k):
                    entry[k] = doc[k]
            entry["summary"] = {k: v for k, v in doc["summary"].items() if not isinstance(v, dict)}
            entry["complete"] = doc["complete"]
            entry["incomplete"] = getattr(mod, "incomplete_note", common.incomplete_note)(doc)
            if _judged(name):
                entry["judge_stats"] = doc["judge_stats"]  # this benchmark's; report["judge_stats"]: the run's
            entry["results"] = str(out / name / "results.json")
            entry["markdown"] = (out / name / "summary.md").read_text(encoding="utf-8")
        elif entry["generation"].get("not_written"):
            entry["incomplete"] = f"{len(entry['generation']['not_written'])} images were not written"
        report["benchmarks"][name] = entry
    # a run of fewer benchmarks into the same --out keeps the others' rows (of the same checkpoint)
    kept = _earlier_benchmarks(out, names, (*ident, label))
    report["benchmarks"] = {n: report["benchmarks"].get(n) or kept[n] for n in BENCHES
                            if n in report["benchmarks"] or n in kept}
    # complete: this run's benchmarks (an earlier run's incomplete one, which this command does not touch, made
    # every later run exit 1; one only generated counted as judged); the earlier ones' state is listed apart
    report["complete"] = all(report["benchmarks"][n]["complete"] for n in names)
    report["incomplete"] = None if report["complete"] else "; ".join(
        f"{n}: {report['benchmarks'][n]['incomplete']}" for n in names if not report["benchmarks"][n]["complete"])
    earlier_open = [n for n, e in kept.items() if not e["complete"] or (evaluating and not e.get("summary"))]
    if earlier_open:
        report["earlier_incomplete"] = earlier_open  # (with --bench NAME they are done)
    if evaluating:
        if judge is not None:
            report["judge_stats"] = dict(judge.stats)
        md = [f"# Evaluation of {label}", ""]
        if not report["complete"]:
            md += [f"**INCOMPLETE: {', '.join(n for n in names if not report['benchmarks'][n]['complete'])} "
                   "(see below); rerun the same command to retry (GenEval: once its evaluator has scored the "
                   "images).**", ""]
        if earlier_open:
            md += [f"**Not (fully) judged by an earlier run in this folder: {', '.join(earlier_open)} (run with "
                   "--bench for them).**", ""]
        md += [report["benchmarks"][n].pop("markdown") if n in names else _markdown_of(out, n)
               for n in report["benchmarks"]]
        common.write_bytes(out / "summary.md", "\n".join(md).encode("utf-8"))
    common.write_json(out / "summary.json", report)
    for name in names:
        s = report["benchmarks"][name].get("summary")
        if not s and "generation" in report["benchmarks"][name]:  # --generate-only
            e = report["benchmarks"][name]
            g = e["generation"]
            print(f"{name}: {g['generated']} of {g['requests']} requests generated -> {e['images_dir']}"
                  + ("" if e["complete"] else " INCOMPLETE") + (" (SUBSET: --limit)" if e.get("subset") else ""))
        if s:
            head = {k: v for k, v in s.items() if k in ("score", "overall", "overall_official_script", "overall_8",
                                                        "echo4o_avg", "n_missing", "n_unreadable",
                                                        "n_judge_failures", "n_unscored")}
            print(f"{name}: " + ", ".join(f"{k}={common.fmt(v, 4)}" for k, v in head.items())
                  + ("" if report["benchmarks"][name]["complete"] else " INCOMPLETE")
                  + (f" ({report['benchmarks'][name]['subset']})" if report["benchmarks"][name].get("subset") else ""))
            jp = report["benchmarks"][name].get("judge_prompts") or {}
            if jp.get("kind") in ("ours", "custom"):
                print(f"note: {name}: judge prompts {jp['kind']}: {jp['note']}", file=sys.stderr)
    return report


if __name__ == "__main__":
    exit_process(common.run_cli(main))
