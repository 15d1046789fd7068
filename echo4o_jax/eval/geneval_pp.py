r"""GenEval++ with a VLM judge (Echo-4o's benchmark): 280 prompts in 7 tags, one verdict per image.

    python -m echo4o_jax.eval.geneval_pp --images DIR --prompts geneval_pp.jsonl --out DIR \
        [--judge-prompts official|ours] [--official-scripts DIR] [--judge-model gpt-4.1] [--base-url URL] \
        [--num-images 1] [--fetch]

* The judge sees the image and a checklist built from the prompt's ``include`` items (class, count,
  colour, region, size) and ``exclude`` items ("no more than count-1"), temperature 0.
* Judge prompts: ``--judge-prompts official`` (default) takes the system prompt, the user message and the
  checklist from the official script ``Eval-gpt-4.1-geneval++.py``, read at run time from ``--official-scripts``
  (default: the folder ``official`` beside --prompts; ``--fetch`` downloads it; see ``echo4o_jax.eval.official``),
  and sends the image as that script does (a full-size JPEG). ``--judge-prompts ours`` uses our own template
  (``templates/geneval_pp.txt``, stricter wording): its scores are not the official protocol's and not directly
  comparable with the paper's (results.json and summary.md say so).
* An image passes only if every checklist item holds (the judge's ``correct == 1``). A missing or
  unreadable image or a judge failure (API errors or malformed answers after the retries) counts as a
  failure and is listed separately -- never mixed up with a judged fail; the run is then INCOMPLETE
  (exit status 1; with nothing judged there is no score).
* Tag accuracy = passes / images of the tag; **score = mean over tags of the tag accuracy** (equal to
  the plain accuracy when all tags are complete: 7 x 40).
* Images: ``<images>/<line:05d>_<k>.png`` (line = 1-based line number in the prompt file,
  k < --num-images; also .jpg/.jpeg/.webp); the official ``<line>.jpg`` is accepted for k = 0.

* Prompt file: one JSON object per line with ``tag``, ``prompt`` and ``include`` (a non-empty list of
  ``{"class", "count"[, "color", "size", "region"]}``), optional ``exclude`` (``{"class", "count"}``);
  every line is checked when the file loads (an error names ``FILE:LINE`` and the key).

Outputs in --out: ``results.json`` (summary + per image: verdict, reason, raw judge answer),
``summary.md`` (per-tag table beside the paper's numbers), ``gallery.html``, ``judge_cache/``.
Exit status: 0 every image judged, 1 incomplete, 2 bad input, 130 interrupted (see -h).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from . import common
from .judge import Judge, JudgeRequest, JudgeTemplate, load_template
from .official import OfficialPrompts
from .reference import GENEVAL_PP_MD5, GENEVAL_PP_REPORTED, GENEVAL_PP_TAGS, GENEVAL_PP_URL

NAME = "geneval_pp"
TITLE = "GenEval++"
PROMPTS_FILE = "geneval_pp.jsonl"  # name used under --benchmarks-dir by eval.run
PUBLIC_URL, PUBLIC_MD5 = GENEVAL_PP_URL, GENEVAL_PP_MD5
DEFAULT_TEMPLATE = "geneval_pp"
GEN_DEFAULTS = common.T2I_EVAL_GEN_DEFAULTS  # generation settings (eval.run): the GenEval script's, see there


@dataclasses.dataclass
class Item:
    line: int  # 1-based line number in the prompt file (the official image name)
    tag: str
    prompt: str
    include: list[dict]
    exclude: list[dict]

    @property
    def stem(self) -> str:
        return f"{self.line:05d}"

    def metadata(self) -> dict:
        """The prompt record as the official script reads it (its checklist function takes it)."""
        return {"tag": self.tag, "prompt": self.prompt, "include": self.include, "exclude": self.exclude}


_TAGS = [t for t, _ in GENEVAL_PP_TAGS]
_ENTRY_KEYS = {"include": ("class", "count", "color", "size", "region"), "exclude": ("class", "count")}


def _entries(where: str, r: dict, field: str) -> list[dict]:
    """The checked ``include`` / ``exclude`` list of a prompt record: objects with a non-empty string
    ``class``, an integer ``count`` >= 1 and (include only) optional string color / size / region."""
    v = r.get(field, [])
    if field == "exclude" and v is None:
        return []
    if not isinstance(v, list) or (field == "include" and not v):
        raise common.UsageError(f"{where}: {field!r} must be a {'non-empty ' if field == 'include' else ''}list "
                                f"of objects like {{\"class\": \"cat\", \"count\": 1}}, got {v!r}")
    for j, e in enumerate(v):
        key = f"{field}[{j}]"
        if not isinstance(e, dict):
            raise common.UsageError(f"{where}: {key} must be an object with 'class' and 'count', got {e!r}")
        for req in ("class", "count"):
            if req not in e:
                raise common.UsageError(f"{where}: {key} has no {req!r}")
        unknown = sorted(set(e) - set(_ENTRY_KEYS[field]))
        if unknown:  # (a misspelt constraint, "colour", was left out of the judge's checklist: a higher score)
            raise common.UsageError(f"{where}: {key} has unknown key(s) {unknown}; expected "
                                    f"{', '.join(_ENTRY_KEYS[field])}")
        if not isinstance(e["class"], str) or not e["class"].strip():
            raise common.UsageError(f"{where}: {key}.class must be a non-empty string, got {e['class']!r}")
        if isinstance(e["count"], bool) or not isinstance(e["count"], int) or e["count"] < 1:
            raise common.UsageError(f"{where}: {key}.count must be an integer >= 1, got {e['count']!r}")
        for opt in _ENTRY_KEYS[field][2:]:
            if e.get(opt) is not None and not isinstance(e[opt], str):
                raise common.UsageError(f"{where}: {key}.{opt} must be a string, got {e[opt]!r}")
    return list(v)


def load_items(path, limit: int | None = None) -> list[Item]:
    """The prompts of a GenEval++ jsonl, every line checked (the first `limit` kept)."""
    items, unknown_tags = [], []
    for i, r in common.jsonl_records(path):
        where = f"{path}:{i}"
        for req in ("tag", "prompt", "include"):
            if req not in r:
                raise common.UsageError(f"{where}: no {req!r} field (is this the GenEval++ jsonl?)")
        for key in ("tag", "prompt"):
            if not isinstance(r[key], str) or not r[key].strip():
                raise common.UsageError(f"{where}: {key!r} must be a non-empty string, got {r[key]!r}")
        if r["tag"] not in _TAGS and r["tag"] not in unknown_tags:
            unknown_tags.append(r["tag"])
        items.append(Item(line=i, tag=r["tag"], prompt=r["prompt"], include=_entries(where, r, "include"),
                          exclude=_entries(where, r, "exclude")))
    if not items:
        raise common.UsageError(f"{path}: no prompts (one JSON object per line)")
    if unknown_tags:  # (each is one more tag in the score's mean of tag accuracies)
        print(f"note: {path}: tag(s) {unknown_tags} are not GenEval++'s ({', '.join(_TAGS)}): each counts as one "
              "more tag in the score", file=sys.stderr)
    return common.take(items, limit)


# ------------------------------------------------------------------------------------------------
# checklist
# ------------------------------------------------------------------------------------------------

_SINGULAR = {"skis": "pair of skis", "scissors": "pair of scissors"}
_PLURAL = {"person": "people", "mouse": "mice", "computer mouse": "computer mice", "knife": "knives",
           "sheep": "sheep", "skis": "pairs of skis", "scissors": "pairs of scissors",
           "broccoli": "heads of broccoli", "bus": "buses", "wine glass": "wine glasses"}
_REGION = {"left": "in the left part of the image", "right": "in the right part of the image",
           "above": "in the upper part of the image", "below": "in the lower part of the image"}


def noun(cls: str, n: int) -> str:
    if n == 1:
        return _SINGULAR.get(cls, cls)
    if cls in _PLURAL:
        return _PLURAL[cls]
    if cls.endswith(("s", "x", "ch", "sh")):
        return cls + "es"
    if cls.endswith("y") and cls[-2:-1] not in "aeiou":
        return cls[:-1] + "ies"
    return cls + "s"


def checklist(item: Item) -> list[str]:
    out = []
    for inc in item.include:
        n = int(inc["count"])
        words = f"exactly {n} " + (f"{inc['color']} " if inc.get("color") else "") + noun(inc["class"], n)
        if inc.get("size") == "larger":
            words += ", clearly larger than the other object"
        elif inc.get("size") == "smaller":
            words += ", clearly smaller than the other object"
        elif inc.get("size"):
            words += f", {inc['size']} in size"
        if inc.get("region"):
            words += ", " + _REGION.get(inc["region"], f"in the {inc['region']} part of the image")
        else:
            words += ", present in the image"
        out.append(words)
    for exc in item.exclude:
        m = int(exc["count"]) - 1
        out.append(f"no more than {m} {noun(exc['class'], m)} anywhere in the image")
    return out


def checklist_text(item: Item) -> str:
    return "\n".join(f"- {c}" for c in checklist(item))


# ------------------------------------------------------------------------------------------------
# aggregation (pure; tested with scripted verdicts)
# ------------------------------------------------------------------------------------------------

def tag_order(tags) -> list[str]:
    known = [t for t, _ in GENEVAL_PP_TAGS]
    return [t for t in known if t in tags] + sorted(t for t in set(tags) if t not in known)


def official_correct(answer: str | None) -> bool:
    """The official script's verdict on a judge answer (its extract_json_from_response and pass rule): the text
    stripped, a leading ```json and a trailing ``` dropped, the greedy ``{...}`` match parsed as JSON; correct iff
    its "correct" == 1 (1, 1.0 and true pass; "1" does not). An answer that does not parse (the script asks again,
    then records -1) or none (a failed call) is not correct."""
    if not answer:
        return False
    text = re.sub(r"\s*```$", "", re.sub(r"^```json\s*", "", answer.strip()))
    m = re.search(r"\{[\s\S]*\}", text)
    try:
        obj = json.loads(m.group(0)) if m else None
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("correct", 0) == 1


def aggregate(records: Sequence[dict]) -> dict:
    """records: dicts with 'tag', 'correct' (0/1) and 'status' -> per-tag accuracy and the score (None, with
    the accuracies, when no image was judged: there is no score to give)."""
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    counts = common.status_counts(records)
    judged = counts["n_judged"] > 0
    tags = {}
    for t in tag_order(by_tag):
        rs = by_tag[t]
        n_ok = sum(int(r["correct"] == 1) for r in rs)
        c = common.status_counts(rs)
        tags[t] = {"n": len(rs), "n_correct": n_ok, "accuracy": n_ok / len(rs) if judged else None,
                   **{k: v for k, v in c.items() if k != "n_images"}}
    n = len(records)
    # the official script's numbers from the same answers: each re-read by its parser (missing images: wrong)
    official = {t: sum(official_correct(r.get("raw")) for r in rs) / len(rs) for t, rs in by_tag.items()}
    return {
        "score": sum(v["accuracy"] for v in tags.values()) / len(tags) if tags and judged else None,
        "accuracy_all_samples": sum(int(r["correct"] == 1) for r in records) / n if n and judged else None,
        "tags": tags,
        "n_correct": sum(int(r["correct"] == 1) for r in records),
        "official_script_exact": {
            "note": "the official script's numbers from the same judge answers, each re-read by its parser (the "
                    "greedy {...} match, correct iff \"correct\" == 1; an answer that does not parse: wrong; an "
                    "answer our parser asked again is the last one received)",
            "score": sum(official.values()) / len(official) if official and judged else None,
            "tags": official if judged else {},
        },
        **counts,
    }


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def generation_requests(items: Sequence[Item], num_images: int = 1, seed: int = 42,
                        size: tuple[int, int] | None = None) -> list[dict]:
    return common.generation_requests(items, prompt=lambda it: it.prompt, seed=lambda it: seed + it.line - 1,
                                      num_images=num_images, size=size)


def evaluate(items: Sequence[Item], images_dir, judge: Judge, out_dir, *, num_images: int = 1,
             template: JudgeTemplate | None = None, label: str = "ours", progress: bool = False,
             source: dict | None = None, official: OfficialPrompts | None = None) -> dict:
    """Judge the images of `items`. The prompts: `official` (read from the official script) when given, else
    `template`, else our built-in one (results and summary.md then say they are not the official wording)."""
    if official is not None and template is not None:
        raise common.UsageError("give either the official prompts or a template, not both")
    tpl = official.template if official is not None else template or load_template(DEFAULT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = common.locate_images(items, images_dir, num_images, official_name=lambda it: str(it.line))

    def requests_for(it: Item, path) -> dict:
        if official is not None:  # the script's own instruction (the prompt, stripped) and checklist
            v = {"prompt": it.prompt.strip(), "checklist": official.checklist(it.metadata())}
        else:
            v = {"prompt": it.prompt, "checklist": checklist_text(it)}
        return {"verdict": JudgeRequest(tpl, v, [path])}

    started = common.start(judge)
    results = common.judge_units(judge, units, requests_for, progress=progress, desc=TITLE)

    def record(it: Item, k: int, path) -> dict:
        return {"id": f"{it.stem}_{k}", "line": it.line, "k": k, "tag": it.tag, "prompt": it.prompt,
                "checklist": checklist(it) if official is None else official.checklist(it.metadata()).splitlines(),
                "image": common.rel(path, out) if path else None,
                "expected_image": common.image_name(it.stem, k)}

    def judged(res) -> dict:
        r = res["verdict"]
        c = int(r.parsed["correct"])
        return dict(status="pass" if c else "fail", correct=c, reason=r.parsed.get("reason", ""), raw=r.raw,
                    error=None, cached=r.cached)

    records = common.unit_records(units, results, record=record, zero={"correct": 0, "reason": None},
                                  failure=lambda res: {"raw": res["verdict"].raw}, judged=judged)
    doc = common.results_document(NAME, label=label, source=source, images_dir=images_dir, num_images=num_images,
                                  judge=judge, templates=tpl, started=started, summary=aggregate(records),
                                  records=records, official=official)
    common.write_outputs(out, doc, markdown, write_html)
    return doc


def markdown(doc: dict) -> str:
    s = doc["summary"]
    cols = [c for _, c in GENEVAL_PP_TAGS]
    tags = [t for t, _ in GENEVAL_PP_TAGS]
    rows = [[f"**{doc['label']}** (this run)"] + [s["tags"].get(t, {}).get("accuracy") for t in tags]
            + [s["score"]]]
    for name, vals in GENEVAL_PP_REPORTED.items():
        rows.append([name] + [vals.get(t) for t in tags] + [vals.get("overall")])
    j = doc["judge"]
    parts = [
        f"# {TITLE}: {doc['label']}", "",
        f"Judge `{j['model']}`, template `{j['template']}`; {s['n_images']} images "
        f"({doc['num_images']} per prompt), {common.not_judged(s)}.",
        "",
        common.markdown_table(["Model"] + cols + ["Overall"], rows), "",
        "Overall = mean of the tag accuracies; an image passes only if every checklist item holds; missing "
        "or unreadable images and judge failures count as failures. Paper rows: Echo-4o figures (overall only); GPT-4o "
        "per-tag row from a third-party paper (Mind-Brush).", "",
        f"Accuracy over all images: {common.fmt(s['accuracy_all_samples'])}", "",
        f"Scored as the official script (its answer parser on the same answers): "
        f"{common.fmt(s['official_script_exact']['score'])}", "",
        "## Per tag", "",
        common.markdown_table(
            ["tag", "column", "images", "pass", "accuracy", "missing", "unreadable", "judge failures"],
            [[t, dict(GENEVAL_PP_TAGS).get(t, t), v["n"], v["n_correct"], v["accuracy"], v["n_missing"],
              v["n_unreadable"], v["n_judge_failures"]] for t, v in s["tags"].items()]),
    ]
    return common.summary_markdown(parts, doc)


_VERDICT = {"pass": "PASS", "fail": "FAIL", **common.NOT_JUDGED_LABEL}


def write_html(doc: dict, path) -> None:
    s = doc["summary"]
    summary_html = common.incomplete_html(doc) + (
        f"<p>Score (mean of tag accuracies): <b>{common.fmt(s['score'])}</b>; images {s['n_images']}, "
        f"{html.escape(common.not_judged(s))}. Judge "
        f"{html.escape(doc['judge']['model'])}, template {html.escape(doc['judge']['template'])}.</p>")
    entries = [common.gallery_entry(r, group=r["tag"], verdict=_VERDICT[r["status"]],
                                    reasons=r.get("reason") or r.get("error") or "",
                                    prompt=r["prompt"] + "\n" + "\n".join(f"• {c}" for c in r["checklist"]))
               for r in doc["items"]]
    common.write_gallery(path, f"{TITLE}: {doc['label']}", summary_html, entries)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    return common.benchmark_parser("python -m echo4o_jax.eval.geneval_pp", __doc__, images_help="folder of generated images (<line:05d>_<k>.png)",
                                   prompts_help=f"GenEval++ jsonl (public file: {PUBLIC_URL})",
                                   template_help="judge template file (default: built-in geneval_pp)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    doc, judge = common.run_benchmark(args, name=NAME, public_url=PUBLIC_URL, public_md5=PUBLIC_MD5, load_items=load_items,
                                      evaluate=evaluate, default_template=DEFAULT_TEMPLATE)
    s = doc["summary"]
    print(f"{TITLE} score {common.fmt(s['score'], 4)} (mean of {len(s['tags'])} tag accuracies)"
          f"{'' if doc['complete'] else ' INCOMPLETE'}; images {s['n_images']}, {common.not_judged(s)}; "
          f"API calls {judge.stats['api_calls']}, cache hits {judge.stats['cache_hits']} -> {args.out}")
    return doc


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
