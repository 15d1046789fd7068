r"""OmniContext (in-context / multi-reference generation) with a VLM judge, for a user-supplied copy.

    python -m echo4o_jax.eval.omnicontext --images DIR --data metadata.jsonl --out DIR \
        [--data-root DIR] [--judge-prompts official|ours] [--official-scripts DIR] [--fetch] \
        [--judge-model gpt-4.1] [--base-url URL] [--num-images 1]

Data: the benchmark is ``OmniGen2/OmniContext`` on the Hugging Face Hub (not bundled, not fetched
here). Give a JSON-lines (or JSON list) manifest with one record per sample::

    {"key": "...", "task_type": "multiple_object", "instruction": "...", "input_images": ["a.jpg", ...]}

(aliases accepted: ``id`` for key, ``task`` for task_type, ``prompt`` for instruction,
``input_image_paths`` / ``images`` for input_images). Relative image paths are resolved against
``--data-root`` (default: the manifest's folder). ``--data`` may also be a folder holding
``metadata.jsonl`` (the layout of Echo-4o's ``arrow2json.py`` conversion: ``images/<task_type>/*.jpg``).

* Two judge calls per image: prompt following (PF) and subject consistency (SC), each 0-10 with a JSON
  answer; the reference images are sent first, the generated image last. ``scene_*`` tasks use the
  scene variant of the SC prompt (it also checks the background); PF uses one prompt for every task, as
  the official scorer does.
* Judge prompts: ``--judge-prompts official`` (default) takes the three prompts from OmniGen2's
  ``omnicontext/prompt_generator.py``, read at run time from ``--official-scripts`` (default: the folder
  ``official`` beside the manifest; ``--fetch`` downloads it; see ``echo4o_jax.eval.official``), and sends the
  images as the official scorer does (the input images resized to at most 1024^2 pixels, sides floored to
  multiples of 16; the output at full size); how OmniGen2 sends them (its ``openai_util.py``) could not be read:
  the JPEG encoding, the message layout and max_tokens 1400 are unverified (results.json says so). A missing
  script is an error naming ``--fetch``. ``--judge-prompts ours`` uses our own templates
  (``templates/omnicontext_*.txt``, other wording and bands): the scores are then not directly comparable with
  published ones (results.json and summary.md say so); a ``--template-*`` file replaces the official prompts.
* **Per sample: sqrt(PF * SC)**; task score = mean over its samples; ``overall_8`` = mean over the 8
  task scores (OmniGen2's number); ``echo4o_avg`` = mean of the MULTIPLE and SCENE group scores (each
  the mean of its 3 tasks), i.e. the 6-task average Echo-4o reported (its statistics script skips the
  two single_* tasks). A missing or unreadable image or a judge failure of either call scores 0 and is
  listed (the original scorer substituted a random score for an unparsable answer; we do not); the run
  is then INCOMPLETE (exit status 1; with nothing judged there is no overall). With fewer than the 8
  tasks in the manifest, the overall is the mean over the tasks present (it says how many).
* Images: ``<images>/<task_type>__<key>_<k>.png`` (also .jpg/.jpeg/.webp); the official
  ``<task_type>/<key>.png`` is accepted for k = 0.
* Generation (``eval.run --bench omnicontext``) follows Echo-4o's OmniContext script: text scale 4, image
  scale 1.5, cfg_interval [0, 1], text_channel renorm (the generator's reference-image defaults apart from the
  image scale, 2.0 there), the ViT transform (980, 378), and the output size of the FIRST input image resized
  by the VAE rule (max side 1024, min 512, multiples of 16), where the generator's own default takes the last
  image's. ``--size`` / ``--gen-arg`` override them.

Outputs in --out: ``results.json``, ``summary.md``, ``gallery.html``, ``judge_cache/``.
Exit status: 0 every image judged, 1 incomplete, 2 bad input, 130 interrupted (see -h).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Sequence

from ..image_transform import ImageTransform, resize_shape, valid_sides
from . import common
from .judge import Judge, JudgeRequest, JudgeTemplate, load_template
from .official import OfficialPrompts
from .reference import OMNICONTEXT_GROUPS, OMNICONTEXT_REPORTED, OMNICONTEXT_TASKS, OMNICONTEXT_URL

NAME = "omnicontext"
TITLE = "OmniContext"
PROMPTS_FILE = "omnicontext/metadata.jsonl"
PUBLIC_URL, PUBLIC_MD5 = OMNICONTEXT_URL, None
# PF uses one template for every task type, SC its scene variant for scene_* tasks: as the official scorer
# (OmniGen2's OmniContextScore asks prompt following without the scene rule, subject consistency with it)
TEMPLATES = {"pf": "omnicontext_pf", "sc": "omnicontext_sc", "sc_scene": "omnicontext_sc_scene"}


@dataclasses.dataclass
class Item:
    key: str
    task_type: str
    instruction: str
    input_images: list[str]
    index: int = 0

    @property
    def stem(self) -> str:
        return f"{self.task_type}__{self.key}"

    @property
    def is_scene(self) -> bool:
        return self.task_type.startswith("scene")


def _pick(r: dict, *names):
    for n in names:
        if n in r and r[n] is not None:
            return r[n]
    return None


def _manifest_rows(p: Path) -> list[tuple[str, dict]]:
    """(where, record) per sample of a JSON-lines manifest (where: ``FILE:LINE``) or a JSON list (``FILE: record
    N``); a syntax error or a record that is not an object is a UsageError naming the file and the line."""
    try:
        text = p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise common.UsageError(f"{p}: not UTF-8 text ({e.reason})") from None
    if not text.startswith("["):
        return [(f"{p}:{i}", r) for i, r in common.jsonl_records(p)]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{p}:{e.lineno}: not JSON (column {e.colno}): {e.msg}") from None
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise common.UsageError(f"{p}: record {bad} of the JSON list must be an object, got "
                                f"{type(rows[bad - 1]).__name__}")
    return [(f"{p}: record {i}", r) for i, r in enumerate(rows, 1)]


def load_items(path, limit: int | None = None, data_root=None) -> list[Item]:
    """The samples of a manifest, every record checked; the input images of the first `limit` must exist."""
    p = Path(path)
    if p.is_dir():
        p = p / "metadata.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"OmniContext manifest {p} not found (see `python -m echo4o_jax.eval.omnicontext -h`;"
                                f" data: {OMNICONTEXT_URL})")
    root = Path(data_root) if data_root else p.parent
    items, stems = [], {}
    for i, (where, r) in enumerate(_manifest_rows(p)):
        key, task, instr = _pick(r, "key", "id"), _pick(r, "task_type", "task"), _pick(r, "instruction", "prompt")
        imgs = _pick(r, "input_images", "input_image_paths", "images")
        absent = [n for n, v in (("key", key), ("task_type", task), ("instruction", instr), ("input_images", imgs))
                  if v is None]
        if absent:
            raise common.UsageError(f"{where}: no {', '.join(map(repr, absent))} (a record needs key, task_type, "
                                    "instruction and input_images)")
        if str(task) not in OMNICONTEXT_TASKS:  # (it would count in the 8-task overall and in no group)
            raise common.UsageError(f"{where}: task_type {task!r} is not one of OmniContext's tasks "
                                    f"{', '.join(OMNICONTEXT_TASKS)}")
        if isinstance(imgs, str):
            imgs = [imgs]
        if not isinstance(imgs, list) or not imgs or not all(isinstance(s, str) and s for s in imgs):
            raise common.UsageError(f"{where}: 'input_images' must be a non-empty list of image paths, got {imgs!r}")
        item = Item(key=str(key), task_type=str(task), instruction=str(instr),
                    input_images=[str(q if q.is_absolute() else root / q) for q in map(Path, imgs)], index=i)
        if item.stem in stems:
            raise common.UsageError(f"{where}: (task_type, key) = ({item.task_type!r}, {item.key!r}) is already "
                                    f"used by {stems[item.stem]}; they name the images, so each pair must be unique")
        stems[item.stem] = where
        items.append(item)
    if not items:
        raise common.UsageError(f"{p}: no samples")
    items = common.take(items, limit)
    missing = [q for it in items for q in it.input_images if not Path(q).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input images of {p} not found, e.g. {missing[:3]} "
                                f"(set --data-root to the folder they are relative to)")
    from echo4o_jax.data.records import RecordError, probe_image

    for it in items:  # decoded: a broken input was reported as the generated image being unreadable
        for q in it.input_images:
            try:
                probe_image(Path(q).read_bytes(), check="decode")
            except (RecordError, OSError) as e:
                raise common.UsageError(f"{p}: input image {q} of sample {it.key!r} ({it.task_type}): {e}") from None
    return items


def sample_score(pf: float, sc: float) -> float:
    return math.sqrt(pf * sc)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(records: Sequence[dict]) -> dict:
    """records: dicts with 'task_type', 'score' (+ 'PF', 'SC' when judged) and 'status'. The overall numbers
    are None when no image was judged (there is no score to give)."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task_type"], []).append(r)
    order = [t for t in OMNICONTEXT_TASKS if t in by_task] + sorted(t for t in by_task if t not in OMNICONTEXT_TASKS)
    tasks = {}
    for t in order:
        rs = by_task[t]
        judged = [r for r in rs if r["status"] == "scored"]
        c = common.status_counts(rs)
        tasks[t] = {"n": len(rs), "score": _mean(r["score"] for r in rs),
                    "PF": _mean(r["PF"] for r in judged), "SC": _mean(r["SC"] for r in judged),
                    **{k: v for k, v in c.items() if k != "n_images"}}
    counts = common.status_counts(records)
    scored = counts["n_judged"] > 0  # nothing judged: no overall numbers
    groups = {g: _mean(tasks[t]["score"] for t in ts if t in tasks) if scored else None
              for g, ts in OMNICONTEXT_GROUPS.items()}
    two = [groups[g] for g in ("MULTIPLE", "SCENE") if groups[g] is not None]
    return {
        "overall_8": _mean(v["score"] for v in tasks.values()) if scored else None,
        "echo4o_avg": sum(two) / len(two) if two else None,
        "groups": groups,
        "tasks": tasks,
        "n_tasks": len(tasks),
        "complete_8_tasks": all(t in tasks for t in OMNICONTEXT_TASKS),
        **counts,
    }


# Echo-4o's OmniContext script (shared/docs/echo4o.md 3.5); the other settings are the generator's reference-image
# defaults (text scale 4, cfg_interval [0, 1], text_channel renorm, shift 3, 50 steps); it saves the output cropped
# to its non-black content (``tmpimage.crop(tmpimage.getbbox())``): crop_to_bbox
GEN_DEFAULTS = {"cfg_img_scale": 1.5, "vit_transform": [980, 378], "crop_to_bbox": True}
OUTPUT_TRANSFORM = ImageTransform.vae_default()  # the output size: the first input image's, resized by this rule


def output_size(item: Item, transform: ImageTransform = OUTPUT_TRANSFORM) -> tuple[int, int]:
    """[height, width] of the generated image: the first input image's size under `transform` (read from its
    header; a UsageError names an image that cannot be read)."""
    from PIL import Image

    path = item.input_images[0]
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as e:
        raise common.UsageError(f"OmniContext sample {item.stem}: input image {path} cannot be read "
                                f"({type(e).__name__}: {e})") from None
    t = transform
    w, h = resize_shape(w, h, t.max_size, t.min_size, t.stride, t.max_pixels)
    return h, w


def generation_requests(items: Sequence[Item], num_images: int = 1, seed: int = 42,
                        size: tuple[int, int] | None = None, vae_transform=None) -> list[dict]:
    """`vae_transform` ([max, min] side, the generation's --gen-arg): the rule that sizes the output (default
    OUTPUT_TRANSFORM); `size` (--size) replaces it."""
    reqs = common.generation_requests(items, prompt=lambda it: it.instruction, images=lambda it: it.input_images,
                                      seed=lambda it: seed + it.index, num_images=num_images, size=size)
    if size is None:
        t = OUTPUT_TRANSFORM
        if vae_transform is not None:
            if not valid_sides(vae_transform):
                raise common.UsageError(f"--gen-arg vae_transform={json.dumps(vae_transform)}: expected [MAX, MIN] "
                                        "image sides with 0 < MIN <= MAX")
            t = ImageTransform(*vae_transform, OUTPUT_TRANSFORM.stride)
        for r, it in zip(reqs, items):
            r["size"] = output_size(it, t)
    return reqs


def evaluate(items: Sequence[Item], images_dir, judge: Judge, out_dir, *, num_images: int = 1,
             templates: dict[str, JudgeTemplate] | None = None, label: str = "ours", progress: bool = False,
             source: dict | None = None, official: OfficialPrompts | None = None) -> dict:
    """Judge the images of `items`. The prompts: `official` (read from OmniGen2's prompt_generator.py) when
    given, else our built-in templates with those of `templates` replacing theirs (results and summary.md then
    say they are not the official wording)."""
    if official is not None and templates:
        raise common.UsageError("give either the official prompts or templates, not both")
    if official is not None:
        tpls = dict(official.templates)
    else:
        tpls = {k: (templates or {}).get(k) or load_template(v) for k, v in TEMPLATES.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = common.locate_images(items, images_dir, num_images, official_name=lambda it: f"{it.task_type}/{it.key}")

    def requests_for(it: Item, path) -> dict:
        v = {"instruction": it.instruction, "n_inputs": len(it.input_images)}
        imgs = list(it.input_images) + [path]
        return {"PF": JudgeRequest(tpls["pf"], v, imgs),
                "SC": JudgeRequest(tpls["sc_scene" if it.is_scene else "sc"], v, imgs)}

    started = common.start(judge)
    results = common.judge_units(judge, units, requests_for, progress=progress, desc=TITLE)

    def record(it: Item, k: int, path) -> dict:
        return {"id": f"{it.stem}_{k}", "key": it.key, "k": k, "task_type": it.task_type, "prompt": it.instruction,
                "input_images": [common.rel(p, out) for p in it.input_images],
                "image": common.rel(path, out) if path else None,
                "expected_image": common.image_name(it.stem, k), "PF": None, "SC": None}

    def failure(res) -> dict:  # keeps the score of the call that succeeded, if any
        pf, sc = res["PF"], res["SC"]
        return dict(raw={"PF": pf.raw, "SC": sc.raw}, PF=pf.parsed["score"] if pf.ok else None,
                    SC=sc.parsed["score"] if sc.ok else None)

    def judged(res) -> dict:
        pf, sc = res["PF"], res["SC"]
        p, s = pf.parsed["score"], sc.parsed["score"]
        return dict(status="scored", PF=p, SC=s, score=sample_score(p, s),
                    reasons={"PF": pf.parsed.get("reason", ""), "SC": sc.parsed.get("reason", "")},
                    raw={"PF": pf.raw, "SC": sc.raw}, error=None, cached=pf.cached and sc.cached)

    records = common.unit_records(units, results, record=record, zero={"score": 0.0, "reasons": None},
                                  failure=failure, judged=judged)
    doc = common.results_document(
        NAME, label=label, source=source, images_dir=images_dir, num_images=num_images, judge=judge,
        templates=tpls, started=started, summary=aggregate(records), records=records, official=official,
        formula="per sample sqrt(PF*SC); task = mean; overall_8 = mean of tasks; echo4o_avg = mean(MULTIPLE, SCENE)")
    common.write_outputs(out, doc, markdown, write_html)
    return doc


def markdown(doc: dict) -> str:
    s = doc["summary"]
    rows = [[f"**{doc['label']}** (this run)", s["groups"]["SINGLE"], s["groups"]["MULTIPLE"], s["groups"]["SCENE"],
             s["overall_8"], s["echo4o_avg"]]]
    for name, v in OMNICONTEXT_REPORTED.items():
        rows.append([name, v.get("SINGLE"), v.get("MULTIPLE"), v.get("SCENE"), v.get("overall_8"), v.get("echo4o_avg")])
    j = doc["judge"]
    parts = [
        f"# {TITLE}: {doc['label']}", "",
        f"Judge `{j['model']}`, templates {', '.join(f'`{t}`' for t in j['template'].values())}; "
        f"{s['n_images']} images, {common.not_judged(s)}"
        + ("" if s["complete_8_tasks"] else f"; **not all 8 task types present (this run has {s['n_tasks']})**")
        + ".", "",
        common.markdown_table(["Model", "SINGLE", "MULTIPLE", "SCENE", _overall_label(s),
                               "Echo-4o avg (MULTIPLE, SCENE)"], rows, digits=2), "",
        "Per sample sqrt(PF·SC); task = mean over samples; group = mean of its tasks; Overall (8 tasks) = mean "
        "of the task scores (OmniGen2's protocol); Echo-4o avg = mean of the MULTIPLE and SCENE groups (Echo-4o's "
        "statistics skip the single_* tasks). Missing or unreadable images and judge failures score 0. BAGEL's "
        "Echo-4o avg is "
        "computed from its two group numbers; 8-task rows are third-party measurements (their protocol is not "
        "known). Echo-4o avg is the number comparable with the Echo-4o paper. Overall (8 tasks) takes OmniGen2's "
        "aggregation, but eval.run generates at Echo-4o's output size (the first input image's, resized as the VAE "
        "input), while OmniGen2's protocol fixes the outputs at 1024x1024 (eval.run --size 1024x1024).", "",
        "## Per task", "",
        common.markdown_table(["task", "images", "PF", "SC", "score", "missing", "unreadable", "judge failures"],
                              [[t, v["n"], v["PF"], v["SC"], v["score"], v["n_missing"], v["n_unreadable"],
                                v["n_judge_failures"]] for t, v in s["tasks"].items()], digits=2),
    ]
    return common.summary_markdown(parts, doc)


def _overall_label(s: dict) -> str:
    """The overall's column name: ``Overall (8 tasks)``, or with fewer tasks how many this run has."""
    return "Overall (8 tasks)" if s["complete_8_tasks"] else f"Overall (8 tasks; this run: {s['n_tasks']})"


def _details(r: dict) -> str | None:
    """The gallery's judge answers of a record: both raw answers, or the error."""
    raw = r.get("raw")
    return "\n\n".join(f"{k}: {v}" for k, v in raw.items()) if isinstance(raw, dict) else (raw or r.get("error"))


def write_html(doc: dict, path) -> None:
    s = doc["summary"]
    summary_html = common.incomplete_html(doc) + (
        f"<p>Overall ({s['n_tasks']} tasks): <b>{common.fmt(s['overall_8'], 2)}</b>; Echo-4o average (MULTIPLE, "
        f"SCENE): <b>{common.fmt(s['echo4o_avg'], 2)}</b>; images {s['n_images']}, "
        f"{html.escape(common.not_judged(s))}. Judge {html.escape(doc['judge']['model'])}.</p>")
    entries = [common.gallery_entry(r, group=r["task_type"], details=_details(r), refs=r["input_images"],
                                    **common.scored_verdict(r, ("PF", "SC"))) for r in doc["items"]]
    common.write_gallery(path, f"{TITLE}: {doc['label']}", summary_html, entries)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.eval.omnicontext",
                                 description=__doc__ + "\n" + common.EXIT_STATUS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of generated images (<task_type>__<key>_<k>.png)")
    ap.add_argument("--data", "--prompts", dest="data", required=True,
                    help="OmniContext manifest (jsonl/json) or a folder with metadata.jsonl")
    ap.add_argument("--data-root", default=None, help="folder the input image paths are relative to")
    ap.add_argument("--fetch", action="store_true",
                    help="download the official prompt_generator.py to --official-scripts, if absent (the data is "
                         "never fetched)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-images", type=common.positive_int, default=1, help="images per sample (official: 1)")
    ap.add_argument("--limit", type=common.positive_int, default=None, help="only the first N samples")
    for k in TEMPLATES:
        ap.add_argument(f"--template-{k.replace('_', '-')}", default=None,
                        help=f"judge template file for {k} (default: the official prompt, or with --judge-prompts "
                             f"ours the built-in {TEMPLATES[k]}; it replaces the official prompts)")
    ap.add_argument("--label", default="ours", help="row name for this run in summary.md")
    common.add_judge_prompts_args(ap, folder_default=f"the folder '{common.OFFICIAL_SCRIPTS_DIR}' beside the "
                                                     "manifest")
    common.add_judge_args(ap)
    return ap


def templates_from_args(args) -> dict[str, JudgeTemplate]:
    return {k: common.template_arg(getattr(args, f"template_{k}", None), v) for k, v in TEMPLATES.items()}


def manifest_folder(data) -> Path:
    """The folder of the manifest `data` names (`data` itself when it is a folder holding metadata.jsonl)."""
    p = Path(data)
    return p if p.is_dir() else p.parent


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    items = load_items(args.data, args.limit, args.data_root)
    replaced = any(getattr(args, f"template_{k}", None) for k in TEMPLATES)  # a template file replaces the official
    official = None if replaced else common.official_prompts(
        NAME, args, manifest_folder(args.data) / common.OFFICIAL_SCRIPTS_DIR)
    templates = templates_from_args(args) if official is None else None
    judge = common.judge_from_args(args, args.out)
    doc = evaluate(items, args.images, judge, args.out, num_images=args.num_images, official=official,
                   templates=templates, label=args.label, progress=not args.no_progress,
                   source={"data": str(args.data),
                           **common.subset_source(items)})
    s = doc["summary"]
    print(f"{TITLE} overall ({s['n_tasks']} tasks) {common.fmt(s['overall_8'], 3)}, Echo-4o avg (MULTIPLE, SCENE) "
          f"{common.fmt(s['echo4o_avg'], 3)}{'' if doc['complete'] else ' INCOMPLETE'}; images {s['n_images']}, "
          f"{common.not_judged(s)}; API calls {judge.stats['api_calls']}, cache hits {judge.stats['cache_hits']} "
          f"-> {args.out}")
    return doc


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
