r"""GenEval (djghosh13/geneval): 553 prompts in 6 tasks, scored by the official object detector.

    python -m echo4o_jax.eval.geneval --images DIR --prompts geneval_metadata.jsonl --out DIR \
        [--num-images 4] [--detector-results FILE] [--fetch]

GenEval is not judged by a VLM: its score comes from a Mask2Former detector (mmdet 2.x) and CLIP, which
run in the official evaluator's own environment. This module does the two ends around it:

1. **Layout.** The images (``<images>/<index:05d>_<k>.png``, index = 0-based among the prompt file's
   non-blank lines, as ``eval.run --bench geneval`` writes them; also .jpg/.jpeg/.webp, converted) are laid out
   as the official evaluator reads them, in ``<out>/layout/``::

       <index:05d>/metadata.jsonl       the prompt file's line (one JSON object), plus "echo4o_samples":
                                        {sample name: sha256 of its PNG} (the evaluator reads only tag,
                                        include, exclude and prompt, and copies the whole object into its
                                        results: how a result is matched to the image it scored)
       <index:05d>/samples/<k:04d>.png  hard links to the images (copies across file systems)

   Every image must decode fully (the evaluator would stop its whole run at a broken one): one that does not
   is left out and listed as unreadable. The layout is rebuilt on every run (built beside it, then swapped
   in), so it always holds exactly the images there are now; other files in it (the evaluator's output, say)
   are carried over.
2. **Score.** Run the official evaluator on it (in its environment, with the detector downloaded)::

       python evaluation/evaluate_images.py <out>/layout --outfile <out>/detector_results.jsonl \
           --model-path <DETECTOR_FOLDER>

   then run this command again: it reads ``<out>/detector_results.jsonl`` (or ``--detector-results FILE``) and
   writes ``results.json`` and ``summary.md``. A result counts for an image laid out now only when it was
   scored against that prompt's line and that very image (its sha256); lines for images outside this run's
   selection (``--limit``, ``--num-images``) are ignored; any other line (another prompt file, an image
   generated again since, a line scored twice, not the evaluator's format) is listed as a problem and leaves
   its image unscored. Task score = share of correct images; **overall = mean of the task scores** (the
   official ``summary_scores.py``). A missing, unreadable or unscored image counts as incorrect and is listed:
   the run is then INCOMPLETE (exit status 1), as is a run without detector results yet (no score).

Protocol (GenEval, BAGEL's / Echo-4o's scripts): 4 images per prompt, 1024x1024, text scale 4 without image
CFG (cfg_img_scale 1), cfg_interval [0, 1], global renorm with min 0, shift 3, 50 steps, each image saved cropped to
its non-black content as the script's ``sample.crop(sample.getbbox())`` (``eval.run`` uses these for this benchmark;
``--gen-arg`` / ``--num-images`` override them, e.g. ``--gen-arg crop_to_bbox=false``). Echo-4o's run
script defaults to LLM-rewritten long prompts (``evaluation_metadata_long.jsonl``, the same 553 items): pass
that file as the prompt file to compare with its 0.89. ``results.json`` (``prompt_variant``) and ``summary.md`` say
which kind of prompts a run used (``short``: GenEval's templated "a photo of ..." prompts, comparable with BAGEL's
0.82; ``rewritten``: with the 0.88 / 0.89 rows).

Prompt file: one JSON object per line with ``tag``, ``prompt`` and ``include`` (a non-empty list of
``{"class", "count"[, "color", "position": [relation, index of an earlier include]]}``), optional
``exclude`` (``{"class", "count"}``); every line is checked when the file loads (an error names
``FILE:LINE`` and the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..jsonl import jsonl_lines
from . import common
from .reference import GENEVAL_REPORTED, GENEVAL_TASKS, GENEVAL_URL

NAME = "geneval"
TITLE = "GenEval"
PROMPTS_FILE = "geneval_metadata.jsonl"  # name used under --benchmarks-dir by eval.run
PUBLIC_URL, PUBLIC_MD5 = GENEVAL_URL, None
JUDGED = False  # scored by the official detector, not by the judge: eval.run needs no API key for it
NUM_IMAGES = 4  # images per prompt (GenEval protocol)
GEN_DEFAULTS = common.T2I_EVAL_GEN_DEFAULTS  # BAGEL's / Echo-4o's GenEval script's settings
LAYOUT = "layout"  # <out>/layout: what the official evaluator reads
DETECTOR_RESULTS = "detector_results.jsonl"  # <out>/...: where the commands above put its output
SAMPLES_KEY = "echo4o_samples"  # added to each metadata.jsonl: {sample name: sha256} (export_layout)
RELATIONS = ("left of", "right of", "above", "below")  # the evaluator's relative positions


@dataclasses.dataclass
class Item:
    index: int  # 0-based line index among the prompt file's objects (the official folder name)
    tag: str
    prompt: str
    metadata: dict  # the line as read: the evaluator's metadata.jsonl

    @property
    def stem(self) -> str:
        return f"{self.index:05d}"


def _count(where: str, key: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise common.UsageError(f"{where}: {key}: expected a count >= 1, got {v!r}")
    return v


def _check_line(where: str, r: dict) -> None:
    for key in ("tag", "prompt"):
        if not isinstance(r.get(key), str) or not r[key].strip():
            raise common.UsageError(f"{where}: no {key!r} string (is this GenEval's evaluation_metadata.jsonl?)")
    include = r.get("include")
    if not isinstance(include, list) or not include:
        raise common.UsageError(f"{where}: 'include' must be a non-empty list of objects")
    if "exclude" in r and not isinstance(r["exclude"], list):
        raise common.UsageError(f"{where}: 'exclude' must be a list of objects")
    for field in ("include", "exclude"):
        for j, e in enumerate(r.get(field) or []):
            at = f"{field}[{j}]"
            if not isinstance(e, dict) or not isinstance(e.get("class"), str) or not e["class"]:
                raise common.UsageError(f"{where}: {at}: expected an object with a 'class' name")
            _count(where, f"{at}.count", e.get("count"))
            if "color" in e and (field == "exclude" or not isinstance(e["color"], str)):
                raise common.UsageError(f"{where}: {at}.color: expected a colour name in an include entry")
            if "position" in e:
                pos = e["position"]
                if (field == "exclude" or not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                        or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < j):
                    raise common.UsageError(f"{where}: {at}.position: expected [relation, index of an earlier "
                                            f"include entry] with relation in {list(RELATIONS)}, got {pos!r}")


def load_items(path, limit: int | None = None) -> list[Item]:
    """The prompts of a GenEval metadata jsonl, every line checked (the first `limit` kept)."""
    items = []
    for i, (line, r) in enumerate(common.jsonl_records(path)):
        _check_line(f"{path}:{line}", r)
        items.append(Item(i, r["tag"], r["prompt"], r))
    if not items:
        raise common.UsageError(f"{path}: no prompts")
    return common.take(items, limit)


def generation_requests(items: Sequence[Item], num_images: int = NUM_IMAGES, seed: int = 42,
                        size: tuple[int, int] | None = None) -> list[dict]:
    return common.generation_requests(items, prompt=lambda it: it.prompt, seed=lambda it: seed + it.index,
                                      num_images=num_images, size=size)


# ------------------------------------------------------------------------------------------------
# layout for the official evaluator
# ------------------------------------------------------------------------------------------------

def sample_name(k: int) -> str:
    return f"{k:04d}.png"


def sample_path(layout: Path, stem: str, k: int) -> Path:
    return layout / stem / "samples" / sample_name(k)


def _sample(src: Path) -> tuple[bytes, bool, str | None, str | None]:
    """(PNG bytes, whether they are `src`'s own (a PNG: hard-linked), sha256 of the bytes, error) of one image: it
    must decode fully (the official evaluator stops its whole run at an image it cannot read); another format is
    converted to PNG."""
    import hashlib
    import io

    from echo4o_jax.data.records import RecordError, probe_image

    try:
        data = src.read_bytes()
        own = probe_image(data, check="decode").format == "png"
        if not own:
            buf = io.BytesIO()
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB").save(buf, format="PNG")
            data = buf.getvalue()
        return data, own, hashlib.sha256(data).hexdigest(), None
    except (OSError, RecordError) as e:
        return b"", False, None, f"{type(e).__name__}: {e}"


def _ours(entry: Path) -> bool:
    """A prompt folder of a layout (the tool's own, rebuilt each run); anything else in a layout is carried over."""
    return entry.is_dir() and not entry.is_symlink() and entry.name.isdigit()


def _carry_over(old: Path, layout: Path) -> None:
    """Move what is not a prompt folder from `old` into `layout` (a name taken there gets a `.kept<N>` suffix)."""
    for entry in sorted(old.iterdir()):
        if _ours(entry):
            continue
        target, n = layout / entry.name, 0
        while target.exists() or target.is_symlink():
            n += 1
            target = layout / f"{entry.name}.kept{n}"
        entry.rename(target)


def _finish_swap(layout: Path, staging: Path, old: Path) -> None:
    """Complete (or undo) a layout swap an earlier run left half done. `staging` holds only prompt folders (the
    new layout being built: dropped); `old` the previous layout: put back when no layout took its place, else
    its carried-over files are moved on and it is dropped once nothing but prompt folders is left."""
    if staging.exists():
        shutil.rmtree(staging)
    if old.exists():
        if not layout.exists():
            old.rename(layout)
        else:
            _carry_over(old, layout)
            if all(_ours(e) for e in old.iterdir()):
                shutil.rmtree(old)


def export_layout(items: Sequence[Item], images_dir, out_dir, num_images: int) -> tuple[Path, list[dict]]:
    """Lay the images out for the official evaluator in ``<out_dir>/layout`` (module docstring); returns the
    layout folder and one unit per (item, k): ``{"item", "k", "image"`` (found, or None), ``"error"`` (why it
    cannot be read, or None: then it is laid out), ``"sha"`` (of the laid-out PNG)}. Each prompt folder's
    metadata.jsonl is the prompt file's line plus ``"echo4o_samples"``: {sample name: sha256 of its PNG}, which
    the evaluator copies into its results (it reads only tag / include / exclude / prompt), so that results are
    matched to the very images they scored.

    The new prompt folders are built beside the layout (``.layout.new``) and swapped in (the old layout goes to
    ``.layout.old``); whatever else the old layout held (the evaluator's output, say) is then moved into the new
    one, and only then is the old one deleted: an interruption at any point loses nothing the user put there
    (the next run completes or undoes the swap). One run at a time per folder (a lock file)."""
    import fcntl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout, staging, old = out / LAYOUT, out / f".{LAYOUT}.new", out / f".{LAYOUT}.old"
    if layout.exists() and not layout.is_dir():
        raise common.UsageError(f"{layout} is a file: it is where the GenEval layout goes; move it away")
    lock = open(out / f".{LAYOUT}.lock", "w")  # noqa: SIM115 - held until the swap is done
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise common.UsageError(f"another run is laying out GenEval images in {out}: wait for it to finish "
                                    "(or use another --out)") from None
        _finish_swap(layout, staging, old)
        units = []
        for it in items:
            folder = staging / it.stem
            (folder / "samples").mkdir(parents=True)
            shas = {}
            for k in range(num_images):
                src = common.find_image(images_dir, [f"{it.stem}_{k}"])
                unit = {"item": it, "k": k, "image": src, "error": None, "sha": None}
                if src is not None:
                    data, own, sha, unit["error"] = _sample(src)
                    if unit["error"] is None:
                        dst = sample_path(staging, it.stem, k)
                        try:
                            if not own:
                                raise OSError("converted")
                            os.link(src, dst)
                        except OSError:  # converted, or another file system: the bytes checked and hashed
                            dst.write_bytes(data)
                        unit["sha"] = shas[sample_name(k)] = sha
                units.append(unit)
            (folder / "metadata.jsonl").write_text(json.dumps({**it.metadata, SAMPLES_KEY: shas}) + "\n",
                                                   encoding="utf-8")
        if layout.exists():
            layout.rename(old)
        staging.rename(layout)
        _finish_swap(layout, staging, old)
    finally:
        if old.exists() and not layout.exists():  # the second rename failed: the old layout back as it was
            old.rename(layout)
        if staging.exists():  # a build or swap cut short: it holds only prompt folders of this run
            shutil.rmtree(staging)
        lock.close()
    return layout, units


def check_results_path(results: Path, out_dir) -> None:
    """A UsageError when the detector results would sit where a run rebuilds the layout (inside a prompt folder,
    or the staging folders), which would delete them."""
    out, p = Path(os.path.abspath(out_dir)), Path(os.path.abspath(results))
    if not p.is_relative_to(out):
        return
    parts = p.relative_to(out).parts
    if len(parts) > 2 and parts[0] == LAYOUT and parts[1].isdigit():
        rebuilt = out / LAYOUT / parts[1]
    elif len(parts) > 1 and parts[0] in (f".{LAYOUT}.new", f".{LAYOUT}.old"):
        rebuilt = out / parts[0]
    else:
        return
    raise common.UsageError(f"detector results {results} lie in {rebuilt}, which every run rebuilds: move them "
                            f"elsewhere, e.g. {out / DETECTOR_RESULTS}")


def evaluator_commands(layout: Path, results: Path) -> str:
    return (f"python evaluation/evaluate_images.py {layout} --outfile {results} --model-path <DETECTOR_FOLDER>  "
            f"(in a checkout of github.com/djghosh13/geneval, its environment and detector; see its README)")


# ------------------------------------------------------------------------------------------------
# the detector's results
# ------------------------------------------------------------------------------------------------

def read_detector_results(path: Path, items: Sequence[Item],
                          units: Sequence[dict]) -> tuple[dict[tuple[str, int], bool], list[str], int]:
    """({(stem, k): correct}, problems, ignored) from the official evaluator's results.jsonl. A result counts
    for an image of the layout when it names ``<stem>/samples/<k>.png`` and was scored against that prompt's
    metadata and that very image (its ``echo4o_samples`` sha256); `ignored` counts lines for images outside
    this run's selection (another --limit / --num-images). Anything else (a line that is not the evaluator's,
    another prompt or image, an image scored twice) is a problem, `FILE:LINE: why`, and gives no verdict:
    the image stays unscored."""
    by_stem = {it.stem: it for it in items}
    sha = {(u["item"].stem, u["k"]): u["sha"] for u in units if u["sha"] is not None}
    out: dict[tuple[str, int], bool] = {}
    problems, ignored, seen = [], 0, {}
    try:
        with open(path, "rb") as fh:
            rows = list(jsonl_lines(fh))
    except OSError as e:
        return {}, [f"{path}: cannot be read ({type(e).__name__}: {e})"], 0
    for line, r, why in rows:
        where = f"{path}:{line}"
        if why:
            problems.append(f"{where}: {why}")
            continue
        try:
            f = Path(r["filename"])
            stem, k, correct, meta = f.parent.parent.name, int(f.stem), r["correct"], json.loads(r["metadata"])
            if f.parent.name != "samples" or not isinstance(correct, bool) or not isinstance(meta, dict):
                raise ValueError("expected <index>/samples/<k>.png, a true/false 'correct' and object metadata")
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            problems.append(f"{where}: not a line of GenEval's evaluate_images.py output ({type(e).__name__}: {e})")
            continue
        it = by_stem.get(stem)
        if it is None or (stem, k) not in sha:
            ignored += 1
            continue
        scored = meta.pop(SAMPLES_KEY, {})
        if meta != it.metadata:
            problems.append(f"{where}: {f} was scored against other metadata than prompt {it.index} of this prompt "
                            f"file ({meta.get('prompt')!r} vs {it.prompt!r})")
        elif not isinstance(scored, dict) or scored.get(f.name) != sha[(stem, k)]:
            problems.append(f"{where}: {f} was scored on another image than the one laid out now (generated again "
                            "since, or another layout's results)")
        elif (stem, k) in seen:
            problems.append(f"{where}: {f} is scored again (first at line {seen[(stem, k)]})")
            out.pop((stem, k), None)
        else:
            seen[(stem, k)] = line
            out[(stem, k)] = correct
    return out, problems, ignored


def tag_order(tags) -> list[str]:
    known = [t for t, _ in GENEVAL_TASKS]
    return [t for t in known if t in tags] + sorted(t for t in set(tags) if t not in known)


NOT_SCORED = ("missing", "unreadable", "unscored")  # statuses of images without a verdict (count as incorrect)


def aggregate(records: Sequence[dict]) -> dict:
    """records: dicts with 'tag', 'index', 'status' (correct / incorrect / NOT_SCORED) -> per-task accuracy
    (images without a verdict count as incorrect) and overall = mean of the task accuracies (None when no image
    was scored)."""
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)

    def counts(rs) -> dict:
        return {f"n_{s}": sum(r["status"] == s for r in rs) for s in NOT_SCORED}

    n = len(records)
    scored = sum(r["status"] in ("correct", "incorrect") for r in records)
    tasks = {}
    for t in tag_order(by_tag):
        rs = by_tag[t]
        ok = sum(r["status"] == "correct" for r in rs)
        tasks[t] = {"n": len(rs), "n_correct": ok, "accuracy": ok / len(rs) if scored else None, **counts(rs)}
    prompts: dict[int, bool] = {}
    for r in records:
        prompts[r["index"]] = prompts.get(r["index"], False) or r["status"] == "correct"
    return {
        "overall": sum(v["accuracy"] for v in tasks.values()) / len(tasks) if tasks and scored else None,
        "tasks": tasks,
        "correct_images": sum(r["status"] == "correct" for r in records) / n if n and scored else None,
        "correct_prompts": sum(prompts.values()) / len(prompts) if prompts and scored else None,
        "n_images": n, "n_scored": scored, "n_correct": sum(r["status"] == "correct" for r in records),
        **counts(records),
    }


def incomplete_note(doc: dict) -> str | None:
    """None when every image was scored; else what was not and how to go on."""
    if doc["complete"]:
        return None
    s = doc["summary"]
    cmd = doc["evaluator_command"]
    problems = (f" The detector results have {len(doc['results_problems'])} problem(s), e.g. "
                f"{doc['results_problems'][0]}." if doc["results_problems"] else "")
    if not Path(doc["images_dir"]).is_dir():
        return (f"the images folder {doc['images_dir']} does not exist: all {s['n_images']} images are missing "
                "(a mistyped --images?)")
    if not s["n_scored"]:
        laid = s["n_images"] - s["n_missing"] - s["n_unreadable"]
        return (f"not scored: {laid} of {s['n_images']} images laid out in {doc['layout']} and no detector result "
                f"for them.{problems} Run the official evaluator: {cmd}, then this command again")
    return (f"{s['n_missing']} images missing, {s['n_unreadable']} unreadable, {s['n_unscored']} laid out but without "
            f"a detector result; they count as incorrect in the numbers below, which are therefore not final."
            f"{problems} Once the images are in place, run the evaluator again ({cmd}), then this command.")


def evaluate(items: Sequence[Item], images_dir, judge, out_dir, *, num_images: int = NUM_IMAGES,
             label: str = "ours", progress: bool = False, source: dict | None = None,
             detector_results=None) -> dict:
    """Lay the images out and score the detector results there are (``<out_dir>/detector_results.jsonl``, or
    `detector_results`); `judge` is not used (the signature of the judged benchmarks, for eval.run). Results that
    do not belong to the images laid out now leave those images unscored (listed), never an error: eval.run
    calls this after hours of generation."""
    del judge, progress
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise common.UsageError(f"num_images {num_images!r}: must be a positive integer")
    out = Path(out_dir)
    results = Path(detector_results) if detector_results is not None else out / DETECTOR_RESULTS
    if detector_results is not None and not results.is_file():
        raise common.UsageError(f"--detector-results {results}: no such file")
    check_results_path(results, out)
    layout, units = export_layout(items, images_dir, out, num_images)
    if results.is_file():
        verdicts, problems, ignored = read_detector_results(results, items, units)
    else:
        verdicts, problems, ignored = None, [], 0
    records = []
    for u in units:
        it, k, image = u["item"], u["k"], u["image"]
        if image is None:
            status = "missing"
        elif u["error"] is not None:
            status = "unreadable"
        elif verdicts is None or (it.stem, k) not in verdicts:
            status = "unscored"
        else:
            status = "correct" if verdicts[(it.stem, k)] else "incorrect"
        records.append({"id": f"{it.stem}_{k}", "index": it.index, "k": k, "tag": it.tag, "prompt": it.prompt,
                        "image": common.rel(image, out) if image else None,
                        "layout_image": common.rel(sample_path(layout, it.stem, k), out) if u["sha"] else None,
                        "sha256": u["sha"], "expected_image": common.image_name(it.stem, k), "status": status,
                        "error": u["error"]})
    summary = aggregate(records)
    doc = {
        "benchmark": NAME, "label": label, "source": source or {}, "images_dir": str(images_dir),
        "num_images": num_images, "layout": str(layout), "prompt_variant": prompt_variant(items),
        "detector_results": str(results) if verdicts is not None else None,
        "evaluator_command": evaluator_commands(layout, results),
        "formula": "overall = mean over tasks of the share of correct images (official summary_scores.py); "
                   "missing, unreadable and unscored images count as incorrect",
        "summary": summary,
        "complete": summary["n_scored"] == summary["n_images"],
        "results_problems": problems, "results_lines_ignored": ignored,
        "missing_images": [r["expected_image"] for r in records if r["status"] == "missing"],
        "unreadable_images": [{"id": r["id"], "image": r["image"], "error": r["error"]}
                              for r in records if r["status"] == "unreadable"],
        "unscored_images": [r["layout_image"] for r in records if r["status"] == "unscored"],
        "items": records,
    }
    doc["incomplete"] = incomplete_note(doc)
    common.write_json(out / "results.json", doc)
    (out / "summary.md").write_text(markdown(doc), encoding="utf-8")
    return doc


SHORT_PROMPT_PREFIX = "a photo of "  # GenEval's own prompts are templated: "a photo of a bench", ...


def prompt_variant(items: Sequence[Item]) -> str:
    """Which prompts were generated from: ``short`` (GenEval's own templated prompts, every one "a photo of ..."),
    ``rewritten`` (none of them: e.g. the LLM-rewritten ``evaluation_metadata_long.jsonl`` Echo-4o's run script
    passes) or ``mixed``. The published overalls differ by it (BAGEL 0.82 short, 0.88 rewritten)."""
    short = sum(it.prompt.lower().startswith(SHORT_PROMPT_PREFIX) for it in items)
    return "short" if short == len(items) else "rewritten" if short == 0 else "mixed"


VARIANT_NOTES = {
    "short": "GenEval's own templated prompts ('a photo of ...'): the comparable paper row is BAGEL (paper) 0.82; "
             "the 0.88 / 0.89 rows were measured with LLM-rewritten prompts",
    "rewritten": "not GenEval's templated prompts (rewritten ones, as Echo-4o's run script passes): the comparable "
                 "paper rows are the rewritten-prompt ones (0.88, 0.89), not BAGEL (paper) 0.82",
    "mixed": "some GenEval templated prompts and some others: comparable with no paper row",
}


def not_scored(s: dict) -> str:
    return (f"{s['n_scored']} scored, {s['n_missing']} missing, {s['n_unreadable']} unreadable, {s['n_unscored']} "
            "without a detector result")


def markdown(doc: dict) -> str:
    s = doc["summary"]
    tags = [t for t, _ in GENEVAL_TASKS]
    rows = [[f"**{doc['label']}** (this run)"] + [s["tasks"].get(t, {}).get("accuracy") for t in tags]
            + [s["overall"]]]
    rows += [[name] + [vals.get(t) for t in tags] + [vals.get("overall")] for name, vals in GENEVAL_REPORTED.items()]
    banner = common.subset_banner(doc)
    parts = [f"# {TITLE}: {doc['label']}", ""] + ([banner, ""] if banner else [])
    if doc["incomplete"]:
        parts += [f"**INCOMPLETE: {doc['incomplete']}**", ""]
    parts += [
        f"Official object detector (results: `{doc['detector_results']}`); {s['n_images']} images "
        f"({doc['num_images']} per prompt): {not_scored(s)}. Layout for the evaluator: `{doc['layout']}`.", "",
        f"Prompts: **{doc['prompt_variant']}**: {VARIANT_NOTES[doc['prompt_variant']]}.", "",
        common.markdown_table(["Model"] + [c for _, c in GENEVAL_TASKS] + ["Overall"], rows), "",
        "Overall = mean of the task scores (share of correct images), as the official summary_scores.py. Paper "
        "rows: overall only.", "",
        f"Correct images: {common.fmt(s['correct_images'])}; prompts with a correct image: "
        f"{common.fmt(s['correct_prompts'])}", "",
        "## Per task", "",
        common.markdown_table(["task", "images", "correct", "accuracy", "missing", "unreadable", "unscored"],
                              [[t, v["n"], v["n_correct"], v["accuracy"], v["n_missing"], v["n_unreadable"],
                                v["n_unscored"]] for t, v in s["tasks"].items()]),
    ]
    for title, rows in (("Missing images", [f"`{p}`" for p in doc["missing_images"]]),
                        ("Unreadable images", [f"`{u['image']}`: {u['error']}" for u in doc["unreadable_images"]]),
                        ("Problems in the detector results", doc["results_problems"])):
        if rows:
            parts += ["", f"## {title} ({len(rows)})", ""] + [f"- {r}" for r in rows]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m echo4o_jax.eval.geneval", description=__doc__ + "\n"
                                 + common.EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of generated images (<index:05d>_<k>.png)")
    ap.add_argument("--prompts", required=True, help=f"GenEval metadata jsonl (public file: {PUBLIC_URL})")
    ap.add_argument("--fetch", action="store_true", help="download the public prompt file to --prompts if absent")
    ap.add_argument("--out", required=True, help="output folder (layout/, results.json, summary.md)")
    ap.add_argument("--num-images", type=common.positive_int, default=NUM_IMAGES,
                    help=f"images per prompt (GenEval: {NUM_IMAGES})")
    ap.add_argument("--limit", type=common.positive_int, default=None, help="only the first N prompts")
    ap.add_argument("--detector-results", default=None,
                    help=f"the official evaluator's output (default: <out>/{DETECTOR_RESULTS} when it exists)")
    ap.add_argument("--label", default="ours", help="row name for this run in summary.md")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    prompts = common.resolve_prompts(args.prompts, PUBLIC_URL, PUBLIC_MD5, args.fetch)
    items = load_items(prompts, args.limit)
    doc = evaluate(items, args.images, None, args.out, num_images=args.num_images, label=args.label,
                   source={"prompts": str(prompts), "prompts_md5": common.md5sum(prompts),
                           **common.subset_source(items)},
                   detector_results=args.detector_results)
    s = doc["summary"]
    print(f"{TITLE} overall {common.fmt(s['overall'], 4)} (mean of {len(s['tasks'])} task scores)"
          f"{'' if doc['complete'] else ' INCOMPLETE'}; images {s['n_images']}: {not_scored(s)} -> {args.out}")
    return doc


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
