"""Shared pieces of the benchmark CLIs: image naming, prompt files, judge options, output writers.

Image naming inside ``--images DIR`` (the same for every benchmark, and what
``echo4o_jax.generate.generate_batch`` writes for a request ``id``)::

    <DIR>/<stem>_<k>.<ext>        k = 0 .. num_images-1, ext in png | jpg | jpeg | webp

with ``<stem>`` given by each benchmark (GenEval++: ``{line:05d}``, the 1-based line number in the
prompt file; Imagine-Bench: ``{id:05d}``; OmniContext: ``{task_type}__{key}``). For k = 0 the official
scripts' names are accepted as well (GenEval++ ``<line>.jpg``, Imagine-Bench ``<id>.png``, OmniContext
``<task_type>/<key>.png``), so images made for the official evaluators can be judged as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import http.client
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..interrupts import keep_ctrl_c
from ..jsonl import jsonl_lines
from ..paths import atomic_write
from .judge import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MODEL, Judge, JudgeError, JudgeRequest, JudgeResult,
                    JudgeTemplate, check_base_url, load_template)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# The text-to-image generation settings of the benchmarks without input images (GenEval, GenEval++, Imagine-Bench):
# BAGEL's / Echo-4o's GenEval script (eval/gen/gen_images_mp.py; echo4o.md §3.5, the one text-to-image setting of
# Echo-4o's evals): text scale 4, no image CFG, cfg_interval [0, 1]. The generator's own text-to-image defaults (the
# Gradio app's: image scale 1.5, interval [0.4, 1]) differ: with no input image an image scale s > 1 strengthens the
# text guidance (effective text scale 1 + s (4 - 1) = 5.5, bagel_architecture.md §5.3). Echo-4o does not publish
# the settings it generated GenEval++ / Imagine-Bench images with; --gen-arg overrides these. The script saves each
# sample cropped to its non-black content (``sample.crop(sample.getbbox())``): crop_to_bbox (a no-op unless an image
# has black border rows or columns).
T2I_EVAL_GEN_DEFAULTS = {"cfg_img_scale": 1.0, "cfg_interval": [0.0, 1.0], "crop_to_bbox": True}


class UsageError(ValueError):
    """A user-facing error (bad arguments or input files): the CLIs print it without a traceback. An input
    file's error names the file, the line (or record) and the key."""


def number_arg(kind: type, low: float, *, above: bool = False):
    """An argparse type: a `kind` (int or float, finite) of at least `low` (greater than `low` when `above`).
    Judge options out of range used to be clamped without a word, or to fail every call (--timeout 0) or
    crash in a retry (a negative backoff)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if v < low or (above and v == low):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {low:g}, got {text}")
        return v
    return parse


# --limit / --num-images: 0 or -1 would judge nothing, or one prompt, without a word
positive_int = number_arg(int, 1)


class Taken(list):
    """The items a prompt file's `--limit` kept; `of`: how many the file holds."""
    of: int


def take(items: list, limit: int | None) -> Taken:
    """The first `limit` items (all with None), knowing how many there were; a limit below 1 is an error."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit {limit!r}: must be a positive integer (or None for all)")
    out = Taken(items if limit is None else items[:limit])
    out.of = len(items)
    return out


def subset_note(items) -> str | None:
    """What a --limit left out, for a benchmark's results (`source.subset` of results.json, a banner in its
    summary.md; None when every prompt is there): its score is then a smoke test's, not comparable with the
    benchmark's published scores beside it."""
    total = getattr(items, "of", len(items))
    if len(items) >= total:
        return None
    return (f"SUBSET: the first {len(items)} of {total} prompts (--limit): a smoke test, not comparable with the "
            "benchmark's scores")


def subset_source(items) -> dict:
    """{"subset": subset_note(items)} for a results document's `source` ({} for a whole benchmark)."""
    note = subset_note(items)
    return {"subset": note} if note else {}


def subset_banner(doc: dict) -> str | None:
    """summary.md's line on a --limit run (`subset_note`), for under its title; None for a whole benchmark."""
    note = (doc.get("source") or {}).get("subset")
    return f"**{note}.**" if note else None


def image_name(stem: str, k: int, ext: str = "png") -> str:
    return f"{stem}_{k}.{ext}"


def find_image(images_dir: str | os.PathLike, names: Iterable[str]) -> Path | None:
    """The first existing ``<images_dir>/<name>.<ext>`` over `names` (without extension) and IMAGE_EXTS."""
    d = Path(images_dir)
    for n in names:
        for ext in IMAGE_EXTS:
            for e in (ext, ext.upper()):
                p = d / f"{n}.{e}"
                if p.is_file():
                    return p
    return None


# ------------------------------------------------------------------------------------------------
# prompt files
# ------------------------------------------------------------------------------------------------

def jsonl_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(1-based line number, object) per non-blank line of a JSON-lines file. A line that is not UTF-8 text or
    not a JSON object is a UsageError naming the file and the line."""
    rows = []
    with open(path, "rb") as f:
        for i, r, why in jsonl_lines(f):
            if why:
                raise UsageError(f"{path}:{i}: {why}")
            rows.append((i, r))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [r for _, r in jsonl_records(path)]


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:  # (in pieces: an OmniContext data file can be large)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: str | os.PathLike, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download a public file (no credentials) to `dest`, checking its md5 when given. A download that fails (no
    network, an HTTP error, another md5) is a UsageError naming the URL and the cause; nothing is written then
    (not even `dest`'s folder)."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https URLs)
            data = r.read()
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, time-outs, connections cut
        why = e.reason if type(e) is urllib.error.URLError else e  # (an HTTPError's str has its status)
        raise UsageError(f"cannot download {url}: {why}; nothing was written to {dest}") from None
    got = hashlib.md5(data).hexdigest()
    if md5 and got != md5:
        raise UsageError(f"cannot use {url}: md5 {got} != expected {md5} (the upstream file changed?); nothing was "
                         f"written to {dest}")
    write_bytes(dest, data)
    return dest


def resolve_prompts(path: str | os.PathLike, url: str, md5: str | None, do_fetch: bool, *,
                    how_to_point: str = "--prompts FILE at a local copy") -> Path:
    """`path` itself, or (with ``--fetch`` and no file there) the public file downloaded to `path`.
    A missing file without ``--fetch`` is an error naming both ways out: `how_to_point` (the CLI's flag
    for another location) and ``--fetch``; no other folder is searched."""
    p = Path(path)
    if p.is_file():
        if md5 and md5sum(p) != md5:
            print(f"note: {p} differs from the released file (md5 {md5sum(p)} != {md5})", file=sys.stderr)
        return p
    if not do_fetch:
        raise FileNotFoundError(f"{p} not found; point {how_to_point}, or pass --fetch to download the public "
                                f"file from {url} to {p}")
    print(f"fetching {url} -> {p}", file=sys.stderr)
    return fetch(url, p, md5)


# ------------------------------------------------------------------------------------------------
# judge options
# ------------------------------------------------------------------------------------------------

def add_judge_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("judge")
    g.add_argument("--judge-model", default=DEFAULT_MODEL, help="judge model name (default %(default)s)")
    g.add_argument("--base-url", default=None,
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default %(default)s); the key is "
                        "never taken from the command line")
    g.add_argument("--no-api-key", action="store_true",
                   help="allow a missing key (a local server without authentication)")
    g.add_argument("--concurrency", type=number_arg(int, 1), default=8, help="parallel judge requests (threads)")
    g.add_argument("--max-retries", type=number_arg(int, 0), default=5,
                   help="retries on 429 / 5xx / time-outs, with exponential backoff and jitter")
    g.add_argument("--malformed-retries", type=number_arg(int, 0), default=2,
                   help="new requests after an answer that does not parse, before a judge failure")
    g.add_argument("--timeout", type=number_arg(float, 0, above=True), default=120.0, help="seconds per request")
    g.add_argument("--backoff-base", type=number_arg(float, 0), default=1.0, help="first backoff delay, seconds")
    g.add_argument("--backoff-max", type=number_arg(float, 0), default=60.0, help="largest backoff delay, seconds")
    g.add_argument("--client-max-retries", type=number_arg(int, 0), default=0,
                   help="retries inside the openai client itself (default 0: ours only)")
    g.add_argument("--max-image-pixels", type=number_arg(int, 0), default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images above this area are downscaled (JPEG) before sending; 0 = never. Our templates "
                        "only (--judge-prompts ours, --template): the official prompts send images as the official "
                        "scripts do (full size)")
    g.add_argument("--cache-dir", default=None, help="judge answer cache (default: <out>/judge_cache)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def judge_from_args(args: argparse.Namespace, out_dir: str | os.PathLike) -> Judge:
    try:
        check_base_url(args.base_url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cache_dir = None if args.no_cache else (args.cache_dir or str(Path(out_dir) / "judge_cache"))
    return Judge(model=args.judge_model, base_url=args.base_url, api_key_env=args.api_key_env,
                 require_api_key=not args.no_api_key, cache_dir=cache_dir, concurrency=args.concurrency,
                 max_retries=args.max_retries, malformed_retries=args.malformed_retries,
                 timeout=args.timeout, backoff_base=args.backoff_base, backoff_max=args.backoff_max,
                 client_max_retries=args.client_max_retries,
                 max_image_pixels=args.max_image_pixels or None)


def template_arg(value: str | None, default: str):
    return load_template(value or default)  # a bad file: TemplateError (a JudgeError), named by run_cli


# ------------------------------------------------------------------------------------------------
# which judge prompts: the official scripts' (read at run time) or ours
# ------------------------------------------------------------------------------------------------

JUDGE_PROMPTS = ("official", "ours")
DEFAULT_JUDGE_PROMPTS = "official"  # (read when a parser is built: the tests of our own prompts set "ours")
OURS_CAVEAT = ("the judge prompts are not the official scripts' wording (echo4o_jax's own templates, or a --template "
               "file): the scores are not the official protocol's and are not directly comparable with the paper "
               "rows")


def add_judge_prompts_args(ap: argparse.ArgumentParser, *, folder_default: str) -> None:
    g = ap.add_argument_group("judge prompts")
    g.add_argument("--judge-prompts", choices=JUDGE_PROMPTS, default=DEFAULT_JUDGE_PROMPTS,
                   help="official (default): the prompts of the benchmark's official evaluation script, read from "
                        "it at run time (--official-scripts; --fetch downloads it); ours: echo4o_jax's own "
                        "templates (scores then not comparable with the paper's); a --template file replaces both")
    g.add_argument("--official-scripts", default=None, metavar="DIR",
                   help=f"folder holding the official evaluation scripts (default: {folder_default})")


def official_prompts(name: str, args, default_folder: str | os.PathLike):
    """The official prompts of benchmark `name` (an OfficialPrompts), or None with ``--judge-prompts ours`` or
    a ``--template`` file for it (which replaces them). The script is looked up in ``--official-scripts`` (or
    `default_folder`), downloaded there with ``--fetch``; absent, a FileNotFoundError names both ways and
    ``--judge-prompts ours``. A script that cannot be read is a UsageError naming it."""
    from . import official

    if args.judge_prompts != "official":
        return None
    folder = args.official_scripts or default_folder
    path = official.resolve_script(name, folder, args.fetch)
    try:
        return official.load(name, path)
    except official.OfficialScriptError as e:
        raise UsageError(f"{e}; or pass --judge-prompts ours") from None


def judge_prompts_info(templates: JudgeTemplate | dict[str, JudgeTemplate], official=None) -> dict:
    """results.json's ``judge_prompts``: the official script used (path, sha256, URL), or, for our templates or a
    template file, which ones and the caveat (OURS_CAVEAT)."""
    if official is not None:
        return official.describe()
    tpls = templates.values() if isinstance(templates, dict) else [templates]
    from .judge import TEMPLATE_DIR

    ours = all(Path(t.path).resolve().parent == TEMPLATE_DIR for t in tpls)
    return {"kind": "ours" if ours else "custom", "templates": [t.ident for t in tpls], "note": OURS_CAVEAT}


def judge_prompts_line(info: dict | None) -> str | None:
    """summary.md's line on the judge prompts used (None for a benchmark without a judge)."""
    if not info:
        return None
    if info["kind"] == "official":
        return (f"Judge prompts: **official**, read from `{info['script']}` (sha256 {info['sha256'][:16]}...; "
                f"{info['url']})." + (f" Unverified: {info['unverified']}." if info.get("unverified") else ""))
    return f"**Judge prompts: {info['kind']} ({', '.join(info['templates'])}): {info['note']}.**"


# ------------------------------------------------------------------------------------------------
# the per-image loop: find the image, judge it, record the outcome
# ------------------------------------------------------------------------------------------------

def locate_images(items: Sequence, images_dir, num_images: int,
                  official_name: Callable[[Any], str]) -> list[tuple[Any, int, Path | None]]:
    """One unit (item, k, image path or None) per item and k < num_images: the image is looked up as
    ``<item.stem>_<k>`` and, for k = 0, also under the official scripts' name ``official_name(item)``."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UsageError(f"num_images {num_images!r}: must be a positive integer")
    units = []
    for it in items:
        for k in range(num_images):
            names = [f"{it.stem}_{k}"] + ([official_name(it)] if k == 0 else [])
            units.append((it, k, find_image(images_dir, names)))
    return units


def judge_units(judge: Judge, units: Sequence[tuple[Any, int, Path | None]],
                requests_for: Callable[[Any, Path], dict[str, JudgeRequest]], *, progress: bool,
                desc: str) -> dict[int, dict[str, JudgeResult]]:
    """Judge every unit that has an image, all requests in one batch. requests_for(item, image) gives the
    unit's requests by name (one per judge call); returns {unit index: {name: JudgeResult}}."""
    keys, reqs = [], []
    for i, (it, _k, path) in enumerate(units):
        if path is None:
            continue
        for name, req in requests_for(it, path).items():
            keys.append((i, name))
            reqs.append(req)
    results: dict[int, dict[str, JudgeResult]] = {}
    for (i, name), res in zip(keys, judge.judge_many(reqs, progress=progress, desc=desc)):
        results.setdefault(i, {})[name] = res
    return results


def unit_outcome(path: Path | None, results: dict[str, JudgeResult] | None) -> tuple[str, str | None]:
    """(status, error) of one unit: ``missing`` without an image, ``unreadable`` when the image exists but
    could not be read or decoded (error: why), ``judge_failure`` when a judge call failed after its retries
    (with several calls the errors read ``<name>: <error>; ...``), else ``judged`` (error None)."""
    if path is None:
        return "missing", "image not found"
    unreadable = [r for r in results.values() if r.image_error]
    if unreadable:
        return "unreadable", unreadable[0].error
    failed = [(name, r) for name, r in results.items() if not r.ok]
    if not failed:
        return "judged", None
    if len(results) == 1:
        return "judge_failure", failed[0][1].error
    return "judge_failure", "; ".join(f"{name}: {r.error}" for name, r in failed)


NOT_JUDGED = ("missing", "unreadable", "judge_failure")  # the record statuses of images that were not judged
NOT_JUDGED_LABEL = {"missing": "MISSING", "unreadable": "UNREADABLE", "judge_failure": "JUDGE FAILURE"}


def status_counts(records: Sequence[dict]) -> dict[str, int]:
    """The counts every summary (and each of its groups) holds: images, judged, missing, unreadable, judge
    failures."""
    n = {s: sum(r["status"] == s for r in records) for s in NOT_JUDGED}
    return {"n_images": len(records), "n_judged": len(records) - sum(n.values()), "n_missing": n["missing"],
            "n_unreadable": n["unreadable"], "n_judge_failures": n["judge_failure"]}


def unit_records(units: Sequence[tuple[Any, int, Path | None]], results: dict[int, dict[str, JudgeResult]], *,
                 record: Callable[[Any, int, Path | None], dict], zero: dict,
                 failure: Callable[[dict[str, JudgeResult]], dict],
                 judged: Callable[[dict[str, JudgeResult]], dict]) -> list[dict]:
    """One record per unit: record(item, k, image) holds the fixed fields; then ``status``, and
    - missing / unreadable image, judge failure: the `zero` score fields, ``raw`` None and ``error`` (a judge
      failure then gets failure(results) on top: its raw answer(s), any partial scores);
    - judged: judged(results), which sets the status (pass, fail, scored...) and the score fields."""
    records = []
    for i, (it, k, path) in enumerate(units):
        rec = record(it, k, path)
        res = results.get(i)
        status, error = unit_outcome(path, res)
        if status == "judged":
            rec.update(judged(res))
        else:
            rec.update(status=status, **zero, raw=None, error=error)
            if status == "judge_failure":
                rec.update(failure(res))
        records.append(rec)
    return records


@dataclasses.dataclass(frozen=True)
class Start:
    """When a benchmark's judging began: the clock and a snapshot of the judge's counters (one Judge may
    serve several benchmarks in a run, so its counters hold the whole run's totals)."""
    t0: float
    stats: dict[str, int]


def start(judge: Judge) -> Start:
    return Start(time.time(), judge.stats_snapshot())


def results_document(name: str, *, label: str, source: dict | None, images_dir, num_images: int, judge: Judge,
                     templates: JudgeTemplate | dict[str, JudgeTemplate], started: Start, summary: dict,
                     records: list[dict], formula: str | None = None, official=None) -> dict:
    """The ``results.json`` document of a benchmark run (judge template(s), stats, summary, problems, items).
    ``judge_stats`` and ``seconds`` cover this benchmark only (since `started`); ``judge_prompts`` says which
    prompts judged (`official`: the OfficialPrompts used, else our templates or a file, with the caveat)."""
    if isinstance(templates, dict):
        tpl_info = {"template": {k: t.ident for k, t in templates.items()},
                    "template_path": {k: t.path for k, t in templates.items()}}
    else:
        tpl_info = {"template": templates.ident, "template_path": templates.path}
    doc = {
        "benchmark": name, "label": label, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": source or {}, "images_dir": str(images_dir), "num_images": num_images,
        "judge": {**judge.describe(), **tpl_info},
        "judge_prompts": judge_prompts_info(templates, official),
        "judge_stats": judge.stats_since(started.stats), "seconds": round(time.time() - started.t0, 2),
    }
    if formula is not None:
        doc["formula"] = formula
    doc.update({
        "summary": summary,
        "complete": all(r["status"] not in NOT_JUDGED for r in records),
        "missing_images": [r["expected_image"] for r in records if r["status"] == "missing"],
        "unreadable_images": [{"id": r["id"], "image": r["image"], "error": r["error"]}
                              for r in records if r["status"] == "unreadable"],
        "judge_failures": [{"id": r["id"], "error": r["error"]} for r in records if r["status"] == "judge_failure"],
        "items": records,
    })
    return doc


def not_judged(s: dict) -> str:
    """``1 missing, 2 unreadable, 0 judge failures`` of a summary (status_counts)."""
    return f"{s['n_missing']} missing, {s['n_unreadable']} unreadable, {s['n_judge_failures']} judge failures"


def incomplete_note(doc: dict) -> str | None:
    """None when every image was judged; else what was not, that the numbers are not final, and how to go on."""
    if doc["complete"]:
        return None
    s = doc["summary"]
    if not s["n_judged"]:
        what = f"none of the {s['n_images']} images could be judged ({not_judged(s)}): there is no score"
    else:
        what = (f"{s['n_images'] - s['n_judged']} of {s['n_images']} images could not be judged ({not_judged(s)}); "
                "they count as failures (score 0) in the numbers below, which are therefore not final")
    images = " once the missing or unreadable images are in place" if s["n_missing"] or s["n_unreadable"] else ""
    return (f"{what}. Run the same command again{images}: judge failures are asked again, answers already judged "
            "come from the judge cache.")


def incomplete_html(doc: dict) -> str:
    """The gallery's banner for an incomplete run ('' when complete)."""
    note = incomplete_note(doc)
    return f'<p class="incomplete"><b>INCOMPLETE: {html.escape(note)}</b></p>' if note else ""


def write_outputs(out_dir, doc: dict, markdown: Callable[[dict], str],
                  write_html: Callable[[dict, Path], None]) -> None:
    """``results.json``, ``summary.md`` and ``gallery.html`` in `out_dir`."""
    out = Path(out_dir)
    write_json(out / "results.json", doc)
    write_bytes(out / "summary.md", markdown(doc).encode("utf-8"))
    write_html(doc, out / "gallery.html")


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole or not at all (`paths.atomic_write`). A failure (a full disk ...) leaves `path` as it
    was and is a UsageError naming the file and the cause."""
    p = Path(path)
    try:
        atomic_write(p, data)
    except OSError as e:
        raise UsageError(f"cannot write {p}: {e.strerror or e}; what was written before is kept: rerun the same "
                         "command to continue") from None


def rel(path: str | os.PathLike | None, start: str | os.PathLike) -> str | None:
    if path is None:
        return None
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    def cell(v):
        return fmt(v, digits).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(parts: list[str], doc: dict) -> str:
    """``summary.md``: the benchmark's `parts` (lines; the first is the title), an INCOMPLETE banner under the
    title when some images were not judged, then the lists of missing / unreadable images and judge failures."""
    prompts = judge_prompts_line(doc.get("judge_prompts"))
    if prompts:
        parts = parts[:1] + ["", prompts] + parts[1:]
    note = incomplete_note(doc)
    if note:
        parts = parts[:1] + ["", f"**INCOMPLETE: {note}**"] + parts[1:]
    banner = subset_banner(doc)
    if banner:
        parts = parts[:1] + ["", banner] + parts[1:]
    return "\n".join(parts + problem_lists(doc)) + "\n"


def generation_requests(items: Sequence, *, prompt: Callable[[Any], str], seed: Callable[[Any], int],
                        num_images: int, size: tuple[int, int] | None,
                        images: Callable[[Any], list[str]] | None = None) -> list[dict]:
    """Requests for ``echo4o_jax.generate.generate_batch``, one per item, named by ``item.stem``:
    prompt(item), reference images(item) for in-context tasks, seed(item)."""
    reqs = []
    for it in items:
        r = {"id": it.stem, "prompt": prompt(it)}
        if images is not None:
            r["images"] = list(images(it))
        r.update(seed=seed(it), num_images=num_images)
        if size:
            r["size"] = tuple(size)
        reqs.append(r)
    return reqs


def problem_lists(doc: dict) -> list[str]:
    """Markdown lines listing the missing and unreadable images and the judge failures of a results document."""
    out = []
    if doc["missing_images"]:
        out += ["", f"## Missing images ({len(doc['missing_images'])})", "",
                f"Expected in `{doc['images_dir']}`:", ""]
        out += [f"- `{m}`" for m in doc["missing_images"]]
    if doc["unreadable_images"]:
        out += ["", f"## Unreadable images ({len(doc['unreadable_images'])})", "",
                "They exist but could not be read or decoded (a write cut short? regenerate them):", ""]
        out += [f"- `{u['image']}` (`{u['id']}`): {u['error']}" for u in doc["unreadable_images"]]
    if doc["judge_failures"]:
        out += ["", f"## Judge failures ({len(doc['judge_failures'])})", ""]
        out += [f"- `{f['id']}`: {f['error']}" for f in doc["judge_failures"]]
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.g{border-collapse:collapse;width:100%}
table.g td,table.g th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}
td.img img{max-width:256px;max-height:256px}
td.refs img{max-width:96px;max-height:96px;margin:2px}
tr.pass td.v{background:#dff5df} tr.fail td.v{background:#f8dede}
tr.missing td.v,tr.unreadable td.v,tr.judge_failure td.v{background:#fff1c7}
p.incomplete{background:#fff1c7;padding:.5em}
.small{font-size:.85em;color:#555} pre{white-space:pre-wrap;margin:0}
"""


def scored_verdict(r: dict, dims: Sequence[str]) -> dict:
    """Gallery ``verdict`` and ``reasons`` of a record scored on 0-10 dimensions, e.g. ``7.20 (FF 8, IP 7,
    AQ 9)`` and one ``<dim>: <reason>`` line each; a missing or unreadable image or a judge failure scores 0
    and shows its error."""
    if r["status"] == "scored":
        verdict = f"{r['score']:.2f} (" + ", ".join(f"{d} {r[d]:g}" for d in dims) + ")"
        reasons = "\n".join(f"{k}: {v}" for k, v in (r.get("reasons") or {}).items())
    else:
        verdict = f"{NOT_JUDGED_LABEL[r['status']]} (0)"
        reasons = r.get("error") or ""
    return {"verdict": verdict, "reasons": reasons}


def gallery_entry(r: dict, *, group: str, verdict: str, reasons: str, prompt: str | None = None,
                  details: str | None = None, refs: list[str] | None = None) -> dict:
    """A write_gallery entry for a record (prompt defaults to the record's, details to its raw answer or error)."""
    entry = {"id": r["id"], "group": group, "image": r["image"],
             "prompt": r["prompt"] if prompt is None else prompt, "verdict": verdict, "status": r["status"],
             "reasons": reasons, "details": details if details is not None else (r.get("raw") or r.get("error"))}
    if refs is not None:
        entry["refs"] = refs
    return entry


def write_gallery(path: str | os.PathLike, title: str, summary_html: str, entries: Sequence[dict]) -> None:
    """An HTML page: one row per judged image. Entry keys: id, group, image (relative path or None),
    refs (list of relative paths), prompt, verdict, reasons, status (pass|fail|missing|unreadable|
    judge_failure|scored), details (raw answer / error)."""
    e = html.escape
    has_refs = any(x.get("refs") for x in entries)
    rows = []
    for it in entries:
        img = it.get("image")
        img_html = (f'<a href="{e(img)}"><img src="{e(img)}" loading="lazy" alt="{e(str(it.get("id")))}"></a>'
                    if img else "<b>missing</b>")
        refs = "".join(f'<a href="{e(r)}"><img src="{e(r)}" loading="lazy"></a>' for r in it.get("refs") or [])
        rows.append(
            f'<tr class="{e(it.get("status", ""))}"><td>{e(str(it.get("id")))}<div class="small">'
            f'{e(str(it.get("group", "")))}</div></td>'
            f'<td class="img">{img_html}</td>'
            + (f'<td class="refs">{refs}</td>' if has_refs else "")
            + f'<td>{e(str(it.get("prompt", "")))}</td>'
            f'<td class="v"><b>{e(str(it.get("verdict", "")))}</b><div class="small">{e(str(it.get("status", "")))}'
            f'</div></td><td>{e(str(it.get("reasons", "")))}'
            f'<details class="small"><summary>judge answer</summary><pre>{e(str(it.get("details") or ""))}</pre>'
            f'</details></td></tr>')
    head = ("<tr><th>id</th><th>image</th>" + ("<th>references</th>" if has_refs else "")
            + "<th>prompt</th><th>verdict</th><th>reasons</th></tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>{summary_html}"
            f"<table class='g'>{head}{''.join(rows)}</table></body></html>\n")
    write_bytes(path, page.encode("utf-8"))


EXIT_STATUS = """Exit status:

    0    every image was judged (eval.run: and every image was generated)
    1    incomplete: some images are missing or unreadable, or their judge calls failed after the retries;
         the partial results are written and marked INCOMPLETE (there is no score when nothing was judged);
         run the same command again to retry them (answers already judged come from the judge cache)
    2    bad input, one `error:` line: a bad argument, prompt file, manifest or template, a missing API key,
         a key or model the judge server refuses (eval.run: a generation error), a prompt file --fetch cannot
         download, an output that cannot be written (a full disk: what was written before is kept; run the
         same command again to continue)
    130  interrupted (Ctrl-C): what was done is kept; run the same command again to continue
"""


def run_cli(main_fn, argv=None) -> int:
    """Run a benchmark main() (or eval.run's) with the exit status of EXIT_STATUS: bad input becomes a one-line
    ``error:`` (2), an incomplete result (``complete`` false in what main returns) a one-line ``incomplete:``
    (1), Ctrl-C one line (130)."""
    keep_ctrl_c()
    try:
        result = main_fn(argv)
    except (JudgeError, FileNotFoundError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written or read (one not named above)
        print(f"error: {e}; what was written before is kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the images written and the judge answers received so far are kept (judge cache); "
              "run the same command again to continue", file=sys.stderr)
        return 130
    if isinstance(result, dict) and result.get("complete") is False:
        print(f"incomplete: {result.get('incomplete') or incomplete_note(result)}", file=sys.stderr)
        return 1
    return 0


def benchmark_parser(prog: str, description: str, *, images_help: str, prompts_help: str,
                     template_help: str):
    """The CLI of a prompt-file benchmark (GenEval++, Imagine-Bench): images, prompts, judge options."""
    ap = argparse.ArgumentParser(prog=prog, description=description + "\n" + EXIT_STATUS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help=images_help)
    ap.add_argument("--prompts", required=True, help=prompts_help.replace("%", "%%"))  # URLs hold %2B
    ap.add_argument("--fetch", action="store_true",
                    help="download the public prompt file to --prompts, and the official evaluation script to "
                         "--official-scripts, if absent")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (official: 1)")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    ap.add_argument("--template", default=None, help=template_help)
    ap.add_argument("--label", default="ours", help="row name for this run in summary.md")
    add_judge_prompts_args(ap, folder_default=f"the folder '{OFFICIAL_SCRIPTS_DIR}' beside --prompts")
    add_judge_args(ap)
    return ap


OFFICIAL_SCRIPTS_DIR = "official"  # (echo4o_jax.eval.official.OFFICIAL_DIR)


def run_benchmark(args, *, name: str, public_url: str, public_md5: str, load_items, evaluate, default_template):
    """Resolve the prompt file (and the official script), load the items, judge the images: (results document,
    judge)."""
    prompts = resolve_prompts(args.prompts, public_url, public_md5, args.fetch)
    items = load_items(prompts, args.limit)
    official = None if args.template else official_prompts(name, args, Path(args.prompts).parent / OFFICIAL_SCRIPTS_DIR)
    judge = judge_from_args(args, args.out)
    doc = evaluate(items, args.images, judge, args.out, num_images=args.num_images,
                   template=template_arg(args.template, default_template) if official is None else None,
                   official=official, label=args.label,
                   progress=not args.no_progress,
                   source={"prompts": str(prompts), "prompts_md5": md5sum(prompts),
                           **subset_source(items)})
    return doc, judge
