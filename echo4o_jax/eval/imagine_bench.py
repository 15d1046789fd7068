r"""Imagine-Bench with a VLM judge (Echo-4o's benchmark): 270 fantasy prompts in 8 types / 4 categories.

    python -m echo4o_jax.eval.imagine_bench --images DIR --prompts imagine_bench.jsonl --out DIR \
        [--judge-prompts official|ours] [--official-scripts DIR] [--judge-model gpt-4.1] [--base-url URL] \
        [--num-images 1] [--fetch]

* The judge scores Fantasy Fulfillment (FF), Identity Preservation (IP) and Aesthetic Quality (AQ),
  0-10, against the record's ``note`` checklist, temperature 0.
* Judge prompts: ``--judge-prompts official`` (default) takes the system and user text of ``build_messages`` in
  the official script ``Eval-gpt-4.1-Imagine.py``, read at run time from ``--official-scripts`` (default: the
  folder ``official`` beside --prompts; ``--fetch`` downloads it; see ``echo4o_jax.eval.official``), and sends
  the image as that script does (a full-size JPEG); its ``Label: <score>`` / ``Reason: ...`` answers are read
  by our parser. ``--judge-prompts ours`` uses our own template (``templates/imagine_bench.txt``): its scores
  are not the official protocol's and not directly comparable with the paper's (results.json and summary.md
  say so).
* **Per image: 0.8 * min(FF, IP) + 0.2 * AQ.** Type and category score = mean over their images
  (types COLOR/SHAPE/SIZE -> Attribute shift, MATERIAL/COMBINATION -> Hybridization,
  TIME/ENVIRONMENT -> Spatiotemporal, Multi-Object -> Multi-Object).
* Two overall numbers are reported:
    - ``overall`` (headline): weighted mean of the category scores with weights Attribute shift 3,
      Hybridization 2, Spatiotemporal 2, Multi-Object 2 -- the official weights with every category
      counted (equal to the plain mean over the 270 images: the categories hold 90/60/60/60 prompts);
    - ``overall_official_script``: what the official script computes on the released jsonl. Its
      weight table names the last category ``TWO_OBJECT`` while the data says ``Multi-Object``, so
      Multi-Object gets no weight and drops out: (3*A + 2*H + 2*S) / 7. It ignores 60 of the 270 prompts;
      the paper's overall includes Multi-Object (Echo-4o's ``Eval.md`` example: 8.613 = (3*8.821 + 2*9.339 +
      2*8.377 + 2*7.813) / 9, the authors' data naming it TWO_OBJECT), i.e. ``overall`` is the comparable one.
  Missing or unreadable images and judge failures score 0 in both (the official script skips missing
  images; that variant is in results.json as ``official_script_exact``); the run is then INCOMPLETE
  (exit status 1; with nothing judged there is no overall).
* Images: ``<images>/<id:05d>_<k>.png`` (also .jpg/.jpeg/.webp); the official ``<id>.png`` is
  accepted for k = 0.

* Prompt file: one JSON object per line with an integer ``id`` (unique) and the strings ``instruction``,
  ``note``, ``type`` (one of the 8 types above); every line is checked when the file loads (an error names
  ``FILE:LINE`` and the key).

Outputs in --out: ``results.json``, ``summary.md``, ``gallery.html``, ``judge_cache/``.
Exit status: 0 every image judged, 1 incomplete, 2 bad input, 130 interrupted (see -h).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import re
from pathlib import Path
from typing import Sequence

from . import common
from .judge import Judge, JudgeRequest, JudgeTemplate, load_template
from .official import OfficialPrompts
from .reference import (IMAGINE_BENCH_MD5, IMAGINE_BENCH_URL, IMAGINE_CATEGORIES, IMAGINE_OFFICIAL_SCRIPT_WEIGHTS,
                        IMAGINE_REPORTED, IMAGINE_TYPE_TO_CATEGORY, IMAGINE_WEIGHTS)

NAME = "imagine_bench"
TITLE = "Imagine-Bench"
PROMPTS_FILE = "imagine_bench.jsonl"
PUBLIC_URL, PUBLIC_MD5 = IMAGINE_BENCH_URL, IMAGINE_BENCH_MD5
DEFAULT_TEMPLATE = "imagine_bench"
GEN_DEFAULTS = common.T2I_EVAL_GEN_DEFAULTS  # generation settings (eval.run): the GenEval script's, see there
TYPES = ("COLOR", "SHAPE", "SIZE", "MATERIAL", "COMBINATION", "TIME", "ENVIRONMENT", "Multi-Object")


@dataclasses.dataclass
class Item:
    id: int
    instruction: str
    note: str
    type: str

    @property
    def stem(self) -> str:
        return f"{self.id:05d}"

    @property
    def category(self) -> str:
        return IMAGINE_TYPE_TO_CATEGORY.get(self.type, self.type)


def load_items(path, limit: int | None = None) -> list[Item]:
    """The prompts of an Imagine-Bench jsonl, every line checked (the first `limit` kept)."""
    items, lines = [], {}
    for i, r in common.jsonl_records(path):
        where = f"{path}:{i}"
        for req in ("id", "instruction", "note", "type"):
            if req not in r:
                raise common.UsageError(f"{where}: no {req!r} field (is this the Imagine-Bench jsonl?)")
        rid = r["id"]
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise common.UsageError(f"{where}: 'id' must be an integer (it names the image <id:05d>_<k>.png), "
                                    f"got {rid!r}")
        for key in ("instruction", "note", "type"):
            if not isinstance(r[key], str):
                raise common.UsageError(f"{where}: {key!r} must be a string, got {r[key]!r}")
        if not r["instruction"].strip():  # the prompt of the image: one of spaces would fail only at generation
            raise common.UsageError(f"{where}: 'instruction' must be a non-empty string, got {r['instruction']!r}")
        if r["type"] not in TYPES:  # it would count in no category weight: dropped from the overall score
            raise common.UsageError(f"{where}: unknown type {r['type']!r} (Imagine-Bench's: {', '.join(TYPES)})")
        if rid in lines:
            raise common.UsageError(f"{where}: duplicate id {rid} (also on line {lines[rid]}); ids name the images, "
                                    "so each must be unique")
        lines[rid] = i
        items.append(Item(id=rid, instruction=r["instruction"], note=r["note"], type=r["type"]))
    if not items:
        raise common.UsageError(f"{path}: no prompts (one JSON object per line)")
    return common.take(items, limit)


def image_score(ff: float, ip: float, aq: float) -> float:
    return 0.8 * min(ff, ip) + 0.2 * aq


# The official script's extract_scores: the last "<label>[:：] <1-2 digits>" of each label wins (integers only:
# "8.5" reads 8; Markdown such as "**Fantasy Fulfillment:** 8" does not match), clipped to at most 10; a label never
# matched stays -1 (and goes into the formula so). official_script_exact re-reads the judge's answers so.
OFFICIAL_SCORE_PATTERN = re.compile(r"(Fantasy Fulfillment|Identity Preservation|Aesthetic Quality)\s*[:：]?\s*(\d{1,2})")
OFFICIAL_LABELS = {"Fantasy Fulfillment": "FF", "Identity Preservation": "IP", "Aesthetic Quality": "AQ"}


def official_image_score(answer: str) -> float:
    """An image's score as the official script computes it from the judge's answer text: its extract_scores,
    then round(0.8 * min(FF, IP) + 0.2 * AQ, 3)."""
    scores = {"FF": -1.0, "IP": -1.0, "AQ": -1.0}
    for label, value in OFFICIAL_SCORE_PATTERN.findall(answer):
        scores[OFFICIAL_LABELS[label]] = max(0.0, min(float(value), 10.0))
    return round(image_score(scores["FF"], scores["IP"], scores["AQ"]), 3)


def _official_score(r: dict) -> float:
    """A judged record's score as the official script would give it (a malformed answer too): its answer re-read
    by the official parser; a judge failure without an answer: 0 (the script's after 3 failed calls)."""
    return official_image_score(r["raw"]) if r.get("raw") else 0.0


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _weighted(cat_scores: dict[str, float], weights: dict[str, float]) -> float | None:
    num = sum(weights[c] * v for c, v in cat_scores.items() if c in weights)
    den = sum(weights[c] for c in cat_scores if c in weights)
    return num / den if den else None


def aggregate(records: Sequence[dict]) -> dict:
    """records: dicts with 'type', 'category', 'score', 'status' (+ FF/IP/AQ when judged). The overall numbers
    are None when no image was judged (there is no score to give)."""
    by_type: dict[str, list[float]] = {}
    by_cat: dict[str, list[float]] = {}
    for r in records:
        by_type.setdefault(r["type"], []).append(r["score"])
        by_cat.setdefault(r["category"], []).append(r["score"])
    order_t = [t for t in TYPES if t in by_type] + sorted(t for t in by_type if t not in TYPES)
    order_c = [c for c in IMAGINE_CATEGORIES if c in by_cat] + sorted(c for c in by_cat if c not in IMAGINE_CATEGORIES)
    judged = [r for r in records if r["status"] == "scored"]
    # (nothing judged: no score, per category or type either, as the overall)
    types = {t: {"n": len(by_type[t]), "score": _mean(by_type[t]) if judged else None} for t in order_t}
    cats = {c: {"n": len(by_cat[c]), "score": _mean(by_cat[c]) if judged else None} for c in order_c}
    cat_scores = {c: v["score"] for c, v in cats.items()} if judged else {}  # nothing judged: no overall

    # As the official script: missing (and unreadable) images skipped, failures 0, Multi-Object without a weight.
    kept = [r for r in records if r["status"] not in ("missing", "unreadable")] if judged else []
    exact_cats: dict[str, list[float]] = {}
    for r in kept:
        exact_cats.setdefault(r["category"], []).append(_official_score(r))
    exact_scores = {c: _mean(v) for c, v in exact_cats.items()}
    return {
        "overall": _weighted(cat_scores, IMAGINE_WEIGHTS),
        "overall_official_script": _weighted(cat_scores, IMAGINE_OFFICIAL_SCRIPT_WEIGHTS),
        "official_script_exact": {
            "note": "as the official script scores: each judge answer re-read by its extract_scores (the last "
                    "integer of each label, clipped to 10, a missing one -1) and rounded to 3 decimals, missing "
                    "and unreadable images skipped (not scored), judge failures without an answer 0, Multi-Object "
                    "dropped (an answer our parser asked again is the last one received)",
            "categories": exact_scores,
            "overall": _weighted(exact_scores, IMAGINE_OFFICIAL_SCRIPT_WEIGHTS),
            "n_scored": len(kept),
        },
        "mean_over_images": _mean(r["score"] for r in records) if judged else None,
        "categories": cats,
        "types": types,
        "dimensions": {d: _mean(r[d] for r in judged) for d in ("FF", "IP", "AQ")},
        **common.status_counts(records),
    }


def generation_requests(items: Sequence[Item], num_images: int = 1, seed: int = 42,
                        size: tuple[int, int] | None = None) -> list[dict]:
    return common.generation_requests(items, prompt=lambda it: it.instruction, seed=lambda it: seed + it.id - 1,
                                      num_images=num_images, size=size)


def evaluate(items: Sequence[Item], images_dir, judge: Judge, out_dir, *, num_images: int = 1,
             template: JudgeTemplate | None = None, label: str = "ours", progress: bool = False,
             source: dict | None = None, official: OfficialPrompts | None = None) -> dict:
    """Judge the images of `items`. The prompts: `official` (read from the official script) when given, else
    `template`, else our built-in one (results and summary.md then say they are not the official wording)."""
    if official is not None and template is not None:
        raise common.UsageError("give either the official prompts or a template, not both")
    tpl = official.template if official is not None else template or load_template(DEFAULT_TEMPLATE)
    keys = {k for k, _ in tpl.dimensions}
    if not {"FF", "IP", "AQ"} <= keys:
        raise common.UsageError(f"template {tpl.path} must define dimensions FF, IP and AQ (has {sorted(keys)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = common.locate_images(items, images_dir, num_images, official_name=lambda it: str(it.id))

    def requests_for(it: Item, path) -> dict:
        return {"scores": JudgeRequest(tpl, {"prompt": it.instruction, "note": it.note}, [path])}

    started = common.start(judge)
    results = common.judge_units(judge, units, requests_for, progress=progress, desc=TITLE)

    def record(it: Item, k: int, path) -> dict:
        return {"id": f"{it.stem}_{k}", "item_id": it.id, "k": k, "type": it.type, "category": it.category,
                "prompt": it.instruction, "note": it.note, "image": common.rel(path, out) if path else None,
                "expected_image": common.image_name(it.stem, k), "FF": None, "IP": None, "AQ": None}

    def judged(res) -> dict:
        r = res["scores"]
        sc = r.parsed["scores"]
        return dict(status="scored", FF=sc["FF"], IP=sc["IP"], AQ=sc["AQ"],
                    score=image_score(sc["FF"], sc["IP"], sc["AQ"]), reasons=r.parsed.get("reasons", {}),
                    raw=r.raw, error=None, cached=r.cached)

    records = common.unit_records(units, results, record=record, zero={"score": 0.0, "reasons": None},
                                  failure=lambda res: {"raw": res["scores"].raw}, judged=judged)
    doc = common.results_document(
        NAME, label=label, source=source, images_dir=images_dir, num_images=num_images, judge=judge,
        templates=tpl, started=started, summary=aggregate(records), records=records, official=official,
        formula="per image 0.8*min(FF, IP) + 0.2*AQ; overall = weighted mean of categories (3/2/2/2)")
    common.write_outputs(out, doc, markdown, write_html)
    return doc


def markdown(doc: dict) -> str:
    s = doc["summary"]
    cats = list(IMAGINE_CATEGORIES)
    rows = [[f"**{doc['label']}** (this run)"] + [s["categories"].get(c, {}).get("score") for c in cats]
            + [s["overall"], s["overall_official_script"]]]
    for name, vals in IMAGINE_REPORTED.items():
        rows.append([name] + [vals.get(c) for c in cats] + [vals.get("overall"), None])
    j = doc["judge"]
    parts = [
        f"# {TITLE}: {doc['label']}", "",
        f"Judge `{j['model']}`, template `{j['template']}`; {s['n_images']} images ({doc['num_images']} per "
        f"prompt), {common.not_judged(s)}.", "",
        common.markdown_table(["Model"] + cats + ["Overall (all 4 categories)", "Overall (official script)"],
                              rows), "",
        "Per image 0.8·min(FF, IP) + 0.2·AQ; category = mean over its images; missing or unreadable images and "
        "judge failures score 0.", "",
        "**Overall (all 4 categories)** weights Attribute shift 3, Hybridization 2, Spatiotemporal 2, "
        "Multi-Object 2 (on the full benchmark, 90/60/60/60 prompts, this is the mean over all 270 images).", "",
        "**Overall (official script)** is what the released evaluation script computes on the released "
        "jsonl: its weight table calls the last category `TWO_OBJECT` while the data calls it `Multi-Object`, so "
        "the 60 Multi-Object prompts get no weight and drop out ((3·A + 2·H + 2·S) / 7). The paper's overall "
        "includes Multi-Object: Echo-4o's Eval.md shows the authors' own output, 8.613 = (3·8.821 + 2·9.339 + "
        "2·8.377 + 2·7.813) / 9 (their data named the category TWO_OBJECT), so **Overall (all 4 categories)** "
        "is the one to set beside the paper's numbers (overall only, from the Echo-4o figures).", "",
        f"Scored as the official script (its answer parser and rounding, missing images skipped instead of 0, "
        f"Multi-Object dropped): "
        f"{common.fmt(s['official_script_exact']['overall'])}", "",
        "## Per type", "",
        common.markdown_table(["type", "category", "images", "score"],
                              [[t, IMAGINE_TYPE_TO_CATEGORY.get(t, t), v["n"], v["score"]]
                               for t, v in s["types"].items()]), "",
        "## Mean judge scores (judged images)", "",
        common.markdown_table(["Fantasy Fulfillment", "Identity Preservation", "Aesthetic Quality"],
                              [[s["dimensions"]["FF"], s["dimensions"]["IP"], s["dimensions"]["AQ"]]]),
    ]
    return common.summary_markdown(parts, doc)


def write_html(doc: dict, path) -> None:
    s = doc["summary"]
    summary_html = common.incomplete_html(doc) + (
        f"<p>Overall (all 4 categories): <b>{common.fmt(s['overall'])}</b>; overall as the "
        f"official script (Multi-Object dropped): {common.fmt(s['overall_official_script'])}; "
        f"images {s['n_images']}, {html.escape(common.not_judged(s))}. "
        f"Judge {html.escape(doc['judge']['model'])}, template {html.escape(doc['judge']['template'])}.</p>")
    entries = [common.gallery_entry(r, group=f"{r['type']} / {r['category']}",
                                    **common.scored_verdict(r, ("FF", "IP", "AQ"))) for r in doc["items"]]
    common.write_gallery(path, f"{TITLE}: {doc['label']}", summary_html, entries)


def build_parser() -> argparse.ArgumentParser:
    return common.benchmark_parser("python -m echo4o_jax.eval.imagine_bench", __doc__, images_help="folder of generated images (<id:05d>_<k>.png)",
                                   prompts_help=f"Imagine-Bench jsonl (public file: {PUBLIC_URL})",
                                   template_help="judge template file (default: built-in imagine_bench)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    doc, judge = common.run_benchmark(args, name=NAME, public_url=PUBLIC_URL, public_md5=PUBLIC_MD5, load_items=load_items,
                                      evaluate=evaluate, default_template=DEFAULT_TEMPLATE)
    s = doc["summary"]
    print(f"{TITLE} overall {common.fmt(s['overall'])} (all categories), {common.fmt(s['overall_official_script'])} "
          f"(official script, Multi-Object dropped){'' if doc['complete'] else ' INCOMPLETE'}; images "
          f"{s['n_images']}, {common.not_judged(s)}; API calls {judge.stats['api_calls']}, "
          f"cache hits {judge.stats['cache_hits']} -> {args.out}")
    return doc


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
