"""GenEval++, Imagine-Bench, OmniContext and eval.run end to end against a local fake judge server.

Every aggregation formula is checked exactly with scripted verdicts; the public prompt files are read
from ../shared/benchmarks (skipped, with the reason, when that folder is absent).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

from echo4o_jax import generate as real_generate
from echo4o_jax.eval import common, geneval_pp, imagine_bench, omnicontext, run as eval_run
from echo4o_jax.eval.judge import JudgeConfigError
from fake_openai import FakeOpenAIServer, Reply, message_images, message_text, solid_png

BENCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_bench = pytest.mark.skipif(not BENCH_DIR.is_dir(),
                                 reason=f"public benchmark files not found at {BENCH_DIR} (not part of the repo)")
SECRET = "sk-test-0c9e8d7f6a5b4c3d2e1f0a9b8c7d6e5f"
CHAT = "/v1/chat/completions"


def judge_args(server, *extra):
    return ["--base-url", server.base_url, "--backoff-base", "0.001", "--backoff-max", "0.01", "--no-progress",
            "--concurrency", "8", *extra]


@pytest.fixture(autouse=True)
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


@pytest.fixture(autouse=True)
def our_judge_prompts(monkeypatch):
    """These tests judge with our templates (no official script here): the CLIs' --judge-prompts default is
    "ours" for them; the official prompts are tested in test_eval_official.py."""
    monkeypatch.setattr(common, "DEFAULT_JUDGE_PROMPTS", "ours")


def assert_no_secret(*dirs):
    n = 0
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                n += 1
                data = p.read_bytes()
                assert SECRET.encode() not in data and SECRET[:16].encode() not in data, p
    assert n > 0


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def gallery_images(out: Path) -> list[str]:
    p = _Imgs()
    p.feed((out / "gallery.html").read_text())
    for s in p.src:
        assert not s.startswith("/") and "://" not in s and (out / s).is_file(), s
    return p.src


def write_png(path: Path, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(solid_png(8, 8, (seed % 256, (seed * 7) % 256, (seed * 13) % 256)))


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def line_value(text: str, label: str) -> str:
    m = re.search(rf"^{label}: (.*)$", text, re.M)
    assert m, text
    return m.group(1)


# ------------------------------------------------------------------------------------------------
# GenEval++
# ------------------------------------------------------------------------------------------------

def _gpp_rows():
    inc = lambda c, n=1, **kw: {"class": c, "count": n, **kw}  # noqa: E731
    return [
        {"tag": "color_attr", "include": [inc("bus", color="brown"), inc("truck", color="green")], "prompt": "P1 <b>bus</b>"},
        {"tag": "color_attr", "include": [inc("cat", color="red")], "prompt": "P2"},
        {"tag": "color_attr", "include": [inc("dog", color="blue")], "prompt": "P3"},
        {"tag": "counting", "include": [inc("clock", 6)], "exclude": [{"class": "clock", "count": 7}], "prompt": "P4"},
        {"tag": "counting", "include": [inc("cow", 5)], "exclude": [{"class": "cow", "count": 6}], "prompt": "P5"},
        {"tag": "size_spatial_attr", "include": [inc("bench", region="above", size="larger"),
                                                 inc("spoon", region="below", size="smaller")], "prompt": "P6"},
    ]


def test_geneval_pp_official_parser_edge_cases():
    """official_correct: the official script's extract_json_from_response and `result.get("correct", 0) == 1`."""
    yes = ['{"correct": 1, "reason": "r"}', '```json\n{"correct": true}\n```', 'Here: {"correct": 1.0}',
           '{"reason": "a {nested} brace", "correct": 1}']
    no = ['{"correct": "1"}', '{"correct": 0}', '{"reason": "no verdict"}', '{"correct": 1} and {"correct": 1}',
          "no JSON here", "", None, '{"correct": 1']
    assert [geneval_pp.official_correct(a) for a in yes] == [True] * len(yes)
    assert [geneval_pp.official_correct(a) for a in no] == [False] * len(no)
    recs = [{"tag": "counting", "correct": 1, "status": "pass", "raw": '{"correct": "1"}'},  # ours: pass
            {"tag": "counting", "correct": 1, "status": "pass", "raw": '{"correct": 1}'},
            {"tag": "color_attr", "correct": 0, "status": "missing"}]
    exact = geneval_pp.aggregate(recs)["official_script_exact"]
    assert exact["tags"] == {"counting": 0.5, "color_attr": 0.0} and exact["score"] == pytest.approx(0.25)


def test_geneval_pp_formula_missing_failures_outputs(tmp_path):
    prompts = write_jsonl(tmp_path / "gpp.jsonl", _gpp_rows())
    images, out = tmp_path / "images", tmp_path / "out"
    for line in (1, 2, 3, 4, 6):  # line 5 is missing
        write_png(images / f"{line:05d}_0.png", line)
    verdict = {"P1 <b>bus</b>": 1, "P2": 0, "P3": 1, "P4": 1}
    seen = []

    def handler(req):
        text = message_text(req)
        p = line_value(text, "Instruction")
        seen.append(text)
        if p == "P6":
            return "The picture shows a bench above a spoon, I think it passes."  # never JSON
        return f'Verdict below.\n```json\n{{"correct": {verdict[p]}, "reason": "because {p}"}}\n```'

    with FakeOpenAIServer(chat_handler=handler) as s:
        doc = geneval_pp.main(["--images", str(images), "--prompts", str(prompts), "--out", str(out),
                               *judge_args(s, "--malformed-retries", "2")])
        n_calls = len(s.calls(CHAT))
    # 4 judged once + P6 asked 3 times (malformed), P5 never (missing)
    assert n_calls == 4 + 3
    sm = doc["summary"]
    assert sm["tags"]["color_attr"]["accuracy"] == pytest.approx(2 / 3)
    assert sm["tags"]["counting"]["accuracy"] == pytest.approx(1 / 2)
    assert sm["tags"]["size_spatial_attr"]["accuracy"] == 0.0
    assert sm["score"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert sm["accuracy_all_samples"] == pytest.approx(3 / 6)
    # these answers read the same with the official script's parser (P6's prose: wrong there too)
    assert sm["official_script_exact"]["score"] == pytest.approx(sm["score"])
    assert sm["official_script_exact"]["tags"]["color_attr"] == pytest.approx(2 / 3)
    assert (sm["n_missing"], sm["n_judge_failures"], sm["n_images"]) == (1, 1, 6)
    st = {r["id"]: r["status"] for r in doc["items"]}
    assert st == {"00001_0": "pass", "00002_0": "fail", "00003_0": "pass", "00004_0": "pass", "00005_0": "missing",
                  "00006_0": "judge_failure"}
    # the checklist reached the judge
    p4 = next(t for t in seen if "Instruction: P4" in t)
    assert "- exactly 6 clocks, present in the image" in p4 and "- no more than 6 clocks" in p4
    p6 = next(t for t in seen if "Instruction: P6" in t)
    assert "exactly 1 bench, clearly larger than the other object, in the upper part of the image" in p6

    res = json.loads((out / "results.json").read_text())
    assert res["missing_images"] == ["00005_0.png"]
    assert [f["id"] for f in res["judge_failures"]] == ["00006_0"] and "malformed" in res["judge_failures"][0]["error"]
    fail = next(r for r in res["items"] if r["id"] == "00006_0")
    assert fail["correct"] == 0 and fail["raw"].startswith("The picture shows")
    ok = next(r for r in res["items"] if r["id"] == "00001_0")
    assert ok["reason"] == "because P1 <b>bus</b>" and '"correct": 1' in ok["raw"]

    md = (out / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    assert header == "| Model | Color | Count | Color/Count | Color/Pos | Pos/Count | Pos/Size | Multi-Count | Overall |"
    ours = next(line for line in md.splitlines() if line.startswith("| **ours**"))
    assert ours.endswith(f"| {sm['score']:.3f} |") and "| 0.667 | 0.500 |" in ours
    assert "| BAGEL (paper) |" in md and "0.371" in md and "0.679" in md
    assert "## Missing images (1)" in md and "`00005_0.png`" in md and "## Judge failures (1)" in md

    page = (out / "gallery.html").read_text()
    assert len(gallery_images(out)) == 5 and "MISSING" in page and "JUDGE FAILURE" in page
    assert "P1 &lt;b&gt;bus&lt;/b&gt;" in page and "<b>bus</b>" not in page  # escaped
    assert_no_secret(out)


@needs_bench
def test_geneval_pp_full_file_and_cache(tmp_path):
    prompts = BENCH_DIR / "geneval_pp.jsonl"
    items = geneval_pp.load_items(prompts)
    images, out = tmp_path / "images", tmp_path / "out"
    for it in items:  # every 10th image under the official name <line>.jpg
        if it.line % 10 == 0:
            from PIL import Image
            Image.new("RGB", (8, 8), (it.line % 256, 0, 0)).save(images / f"{it.line}.jpg")
        else:
            write_png(images / f"{it.stem}_0.png", it.line)

    def passes(prompt):
        return hashlib.sha256(prompt.encode()).digest()[0] % 3 != 0

    handler = lambda r: json.dumps({"correct": int(passes(line_value(message_text(r), "Instruction"))),  # noqa: E731
                                    "reason": "scripted"})
    tags = {}
    for it in items:
        tags.setdefault(it.tag, []).append(passes(it.prompt))
    expect = sum(sum(v) / len(v) for v in tags.values()) / len(tags)

    with FakeOpenAIServer(chat_handler=handler) as s:
        args = ["--images", str(images), "--prompts", str(prompts), "--out", str(out), *judge_args(s)]
        doc = geneval_pp.main(args)
        assert len(s.calls(CHAT)) == 280
        assert doc["summary"]["score"] == pytest.approx(expect)
        assert doc["summary"]["n_missing"] == 0 and len(doc["summary"]["tags"]) == 7
        first = json.loads((out / "results.json").read_text())
        doc2 = geneval_pp.main(args)  # second run: everything from the cache
        assert len(s.calls(CHAT)) == 280
        assert doc2["judge_stats"]["api_calls"] == 0 and doc2["judge_stats"]["cache_hits"] == 280
    assert doc2["summary"] == doc["summary"]
    assert [r["correct"] for r in doc2["items"]] == [r["correct"] for r in first["items"]]
    assert_no_secret(out)


@needs_bench
def test_public_files_structure():
    from echo4o_jax.eval import common, reference

    gpp = geneval_pp.load_items(BENCH_DIR / "geneval_pp.jsonl")
    assert len(gpp) == 280 and {t for t, _ in reference.GENEVAL_PP_TAGS} == {it.tag for it in gpp}
    assert all(sum(it.tag == t for it in gpp) == 40 for t, _ in reference.GENEVAL_PP_TAGS)
    for it in gpp:
        assert len(geneval_pp.checklist(it)) == len(it.include) + len(it.exclude)
    ib = imagine_bench.load_items(BENCH_DIR / "imagine_bench.jsonl")
    assert len(ib) == 270 and [it.id for it in ib] == list(range(1, 271))
    cats = {c: sum(it.category == c for it in ib) for c in reference.IMAGINE_CATEGORIES}
    assert cats == {"Attribute shift": 90, "Hybridization": 60, "Spatiotemporal": 60, "Multi-Object": 60}
    assert common.md5sum(BENCH_DIR / "geneval_pp.jsonl") == reference.GENEVAL_PP_MD5
    assert common.md5sum(BENCH_DIR / "imagine_bench.jsonl") == reference.IMAGINE_BENCH_MD5


def test_missing_prompt_file_mentions_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="--fetch.*githubusercontent"):
        geneval_pp.main(["--images", str(tmp_path), "--prompts", str(tmp_path / "nope.jsonl"),
                         "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------------------
# Imagine-Bench
# ------------------------------------------------------------------------------------------------

def _imagine_answer(ff, ip, aq):
    return (f"My assessment:\nFantasy Fulfillment: {ff} - reason f\nIdentity Preservation: {ip} - reason i\n"
            f"Aesthetic Quality: {aq} - reason a\n")


def test_imagine_bench_official_script_exact_reads_answers_as_the_official_parser():
    """official_script_exact scores each answer as the official extract_scores + formula: integers only (9.5 reads
    9), the last occurrence of a label wins, above 10 clipped, Markdown-bolded labels not read (-1), rounded to 3
    decimals; a judge failure with an answer is re-read too, one without an answer is 0."""
    ans = "Fantasy Fulfillment: {}\nReason: r\nIdentity Preservation: {}\nAesthetic Quality: {}".format
    assert imagine_bench.official_image_score(ans(10, "9.5", 5)) == pytest.approx(8.2)  # ours: 8.6
    assert imagine_bench.official_image_score(ans(3, 7, 7) + "\nFantasy Fulfillment: 8") == pytest.approx(7.0)
    assert imagine_bench.official_image_score(ans(12, 10, 10)) == pytest.approx(10.0)
    bold = "**Fantasy Fulfillment:** 9\nIdentity Preservation: 8\nAesthetic Quality: 6"
    assert imagine_bench.official_image_score(bold) == pytest.approx(0.8 * -1 + 0.2 * 6)
    assert imagine_bench.official_image_score("Fantasy Fulfillment: 7\nIdentity Preservation: 7\nAesthetic "
                                              "Quality: 8 and more text 1/3") == pytest.approx(7.2)
    assert imagine_bench.official_image_score(ans(1, 1, 2)) == 1.2  # (0.8 + 0.4 = 1.2000000000000002 unrounded)
    rec = lambda cat, score, status, raw: {"type": "T", "category": cat, "score": score, "status": status, "raw": raw,
                                           "FF": 1.0, "IP": 1.0, "AQ": 1.0}  # (the dimensions' means: not here)
    records = [rec("Attribute shift", 8.6, "scored", ans(10, "9.5", 5)),
               rec("Attribute shift", 0.0, "judge_failure", "Fantasy Fulfillment: 5\nIdentity Preservation: 5"),
               rec("Hybridization", 0.0, "judge_failure", None), rec("Spatiotemporal", 5.0, "scored", ans(5, 5, 5)),
               rec("Spatiotemporal", 0.0, "missing", None), rec("Multi-Object", 9.0, "scored", ans(9, 9, 9))]
    exact = imagine_bench.aggregate(records)["official_script_exact"]
    a = (8.2 + (0.8 * 5 - 0.2)) / 2  # the failure's answer: AQ -1
    assert exact["categories"] == pytest.approx({"Attribute shift": a, "Hybridization": 0.0, "Spatiotemporal": 5.0,
                                                 "Multi-Object": 9.0})
    assert exact["overall"] == pytest.approx((3 * a + 2 * 0.0 + 2 * 5.0) / 7) and exact["n_scored"] == 5


def test_imagine_bench_formula_by_hand(tmp_path):
    rows = [
        {"id": 1, "instruction": "I1", "note": "N1", "type": "COLOR"},
        {"id": 2, "instruction": "I2", "note": "N2", "type": "MATERIAL"},
        {"id": 3, "instruction": "I3", "note": "N3", "type": "TIME"},
        {"id": 4, "instruction": "I4", "note": "N4", "type": "Multi-Object"},
        {"id": 5, "instruction": "I5", "note": "N5", "type": "SHAPE"},  # image missing
    ]
    prompts = write_jsonl(tmp_path / "ib.jsonl", rows)
    images, out = tmp_path / "images", tmp_path / "out"
    for i in (1, 2, 3):
        write_png(images / f"{i:05d}_0.png", i)
    write_png(images / "4.png", 4)  # the official name is accepted too
    scores = {"I1": (8, 6, 9), "I2": (10, 10, 5), "I3": (2, 9, 10), "I4": (7, 7, 7)}
    with FakeOpenAIServer(chat_handler=lambda r: _imagine_answer(*scores[line_value(message_text(r), "INSTRUCTION")])) as s:
        doc = imagine_bench.main(["--images", str(images), "--prompts", str(prompts), "--out", str(out), *judge_args(s)])
        assert len(s.calls(CHAT)) == 4
        assert "CHECKLIST: N3" in message_text(s.calls(CHAT)[0]) or any("CHECKLIST: N3" in message_text(c) for c in s.calls(CHAT))
    per = {r["item_id"]: r["score"] for r in doc["items"]}
    assert per == pytest.approx({1: 6.6, 2: 9.0, 3: 3.6, 4: 7.0, 5: 0.0})
    sm = doc["summary"]
    assert sm["categories"]["Attribute shift"]["score"] == pytest.approx(3.3)
    assert sm["overall"] == pytest.approx((3 * 3.3 + 2 * 9.0 + 2 * 3.6 + 2 * 7.0) / 9)
    assert sm["overall_official_script"] == pytest.approx((3 * 3.3 + 2 * 9.0 + 2 * 3.6) / 7)
    assert sm["official_script_exact"]["overall"] == pytest.approx((3 * 6.6 + 2 * 9.0 + 2 * 3.6) / 7)
    assert sm["types"]["SHAPE"]["score"] == 0.0 and sm["n_missing"] == 1
    assert sm["dimensions"] == pytest.approx({"FF": 27 / 4, "IP": 32 / 4, "AQ": 31 / 4})
    r1 = next(r for r in doc["items"] if r["item_id"] == 1)
    assert r1["reasons"] == {"FF": "reason f", "IP": "reason i", "AQ": "reason a"} and "Fantasy" in r1["raw"]
    md = (out / "summary.md").read_text()
    assert "| Model | Attribute shift | Hybridization | Spatiotemporal | Multi-Object | Overall (all 4 categories) | Overall (official script) |" in md
    assert "TWO_OBJECT" in md and "6.20" in md and "7.80" in md and "`00005_0.png`" in md
    assert len(gallery_images(out)) == 4 and "MISSING (0)" in (out / "gallery.html").read_text()
    assert_no_secret(out)


@needs_bench
def test_imagine_bench_full_file(tmp_path):
    prompts = BENCH_DIR / "imagine_bench.jsonl"
    items = imagine_bench.load_items(prompts)
    by_instr = {it.instruction: it for it in items}
    assert len(by_instr) == 270
    images, out = tmp_path / "images", tmp_path / "out"
    for it in items:
        write_png(images / f"{it.stem}_0.png", it.id)

    def sc(i):
        return (i % 11, (i * 3) % 11, (i * 7) % 11)

    handler = lambda r: _imagine_answer(*sc(by_instr[line_value(message_text(r), "INSTRUCTION")].id))  # noqa: E731
    with FakeOpenAIServer(chat_handler=handler) as s:
        doc = imagine_bench.main(["--images", str(images), "--prompts", str(prompts), "--out", str(out),
                                  *judge_args(s)])
    per = {it.id: 0.8 * min(sc(it.id)[0], sc(it.id)[1]) + 0.2 * sc(it.id)[2] for it in items}
    cat = {}
    for it in items:
        cat.setdefault(it.category, []).append(per[it.id])
    cat = {c: sum(v) / len(v) for c, v in cat.items()}
    sm = doc["summary"]
    assert sm["overall"] == pytest.approx((3 * cat["Attribute shift"] + 2 * cat["Hybridization"]
                                           + 2 * cat["Spatiotemporal"] + 2 * cat["Multi-Object"]) / 9)
    assert sm["overall"] == pytest.approx(sum(per.values()) / 270)  # 90/60/60/60: the plain mean
    assert sm["overall_official_script"] == pytest.approx((3 * cat["Attribute shift"] + 2 * cat["Hybridization"]
                                                           + 2 * cat["Spatiotemporal"]) / 7)
    assert len(sm["types"]) == 8 and sm["n_judge_failures"] == 0


# ------------------------------------------------------------------------------------------------
# OmniContext
# ------------------------------------------------------------------------------------------------

def test_omnicontext_formula_and_scene_templates(tmp_path):
    assert "pf_scene" not in omnicontext.TEMPLATES
    from echo4o_jax.eval.reference import OMNICONTEXT_TASKS

    data = tmp_path / "oc"
    rows, pf, sc = [], {}, {}
    for ti, task in enumerate(OMNICONTEXT_TASKS):
        for j in range(2):
            key = f"k{j}"
            refs = [f"images/{task}/{key}_ref{r}.jpg" for r in range(1 + (ti % 3))]
            for r in refs:
                write_png(data / r, ti)
            instr = f"instr {task} {j}"
            rows.append({"key": key, "task_type": task, "instruction": instr, "input_images": refs})
            pf[instr], sc[instr] = (ti + j + 2) % 11, (2 * ti + 3 * j + 1) % 11
    write_jsonl(data / "metadata.jsonl", rows)
    images, out = tmp_path / "gen", tmp_path / "out"
    for r in rows:
        if (r["task_type"], r["key"]) == ("scene_object", "k1"):
            continue  # missing
        if r["task_type"] == "single_object" and r["key"] == "k0":
            write_png(images / r["task_type"] / f"{r['key']}.png")  # official layout
        else:
            write_png(images / f"{r['task_type']}__{r['key']}_0.png")
    seen = []

    def handler(req):
        text = message_text(req)
        instr = line_value(text, "Instruction")
        is_sc = "Task: score how faithfully" in text
        seen.append((instr, is_sc, "AND the scene" in text, "placed in the given scene" in text,
                     len(message_images(req))))
        return json.dumps({"score": (sc if is_sc else pf)[instr], "reasoning": "r"})

    with FakeOpenAIServer(chat_handler=handler) as s:
        doc = omnicontext.main(["--images", str(images), "--data", str(data), "--out", str(out), *judge_args(s)])
        assert len(s.calls(CHAT)) == 2 * 15
    for instr, is_sc, sc_scene, pf_scene, n_img in seen:
        task = instr.split()[1]
        row = next(r for r in rows if r["instruction"] == instr)
        assert n_img == len(row["input_images"]) + 1
        # SC checks the scene for scene_* tasks; PF never does (the official scorer's PF rule has no scene variant)
        assert (sc_scene if is_sc else pf_scene) == (is_sc and task.startswith("scene"))
    expect_task = {}
    for r in rows:
        s_ = 0.0 if (r["task_type"], r["key"]) == ("scene_object", "k1") else math.sqrt(pf[r["instruction"]] * sc[r["instruction"]])
        expect_task.setdefault(r["task_type"], []).append(s_)
    expect_task = {t: sum(v) / 2 for t, v in expect_task.items()}
    sm = doc["summary"]
    assert {t: v["score"] for t, v in sm["tasks"].items()} == pytest.approx(expect_task)
    assert sm["overall_8"] == pytest.approx(sum(expect_task.values()) / 8)
    mult = sum(expect_task[t] for t in ("multiple_character", "multiple_object", "multiple_character_object")) / 3
    scene = sum(expect_task[t] for t in ("scene_character", "scene_object", "scene_character_object")) / 3
    assert sm["echo4o_avg"] == pytest.approx((mult + scene) / 2)
    assert sm["complete_8_tasks"] and sm["n_missing"] == 1
    md = (out / "summary.md").read_text()
    assert "Echo-4o avg (MULTIPLE, SCENE)" in md and "7.94" in md and "8.23" in md and "scene_object__k1_0.png" in md
    # the 8-task overall mixes OmniGen2's aggregation with Echo-4o's output size: said beside the table
    assert "OmniGen2's protocol fixes the outputs at 1024x1024 (eval.run --size 1024x1024)" in md
    srcs = gallery_images(out)
    assert any("images/multiple_object" in x for x in srcs)  # reference images shown too
    assert_no_secret(out)


# ------------------------------------------------------------------------------------------------
# eval.run: generation (fake generate_batch) then judging
# ------------------------------------------------------------------------------------------------

def _fake_generate_module(calls, skip_prompts=(), error=None):
    """A stand-in for echo4o_jax.generate: generate_batch writes solid PNGs (or raises `error`); the
    error class and the completeness checks are the real ones."""
    mod = types.ModuleType("echo4o_jax.generate")

    def generate_batch(ckpt, requests, out_dir, *, regenerate=False, check_only=False, progress=True, **overrides):
        if check_only:  # eval.run's check of every benchmark's requests before any is generated
            assert out_dir is None and not regenerate
            return []
        calls.append({"ckpt": ckpt, "requests": requests, "out_dir": out_dir, "overrides": overrides,
                      "regenerate": regenerate, "progress": progress})
        if error is not None:
            raise error
        recs = []
        for r in requests:
            paths = []
            for k in range(r["num_images"]):
                if r["prompt"] in skip_prompts:
                    continue
                p = Path(out_dir) / f"{r['id']}_{k}.png"
                # a distinct picture per image: identical ones would share one judge cache entry, and whether
                # the second is a cache hit or a second call would depend on the judge threads' timing
                write_png(p, 2 * r["seed"] + k)
                paths.append(str(p))
            recs.append({"id": r["id"], "paths": paths})
        return recs

    mod.generate_batch = generate_batch
    mod.GenerateError = real_generate.GenerateError
    mod.image_complete = real_generate.image_complete
    mod.outputs_finished = real_generate.outputs_finished
    mod.checkpoint_identity = real_generate.checkpoint_identity
    return mod


def test_run_generates_then_judges(tmp_path, monkeypatch):
    calls, decoded = [], []  # decoded: the images eval.run checks again after generate_batch
    fake = _fake_generate_module(calls, skip_prompts={"I2"})
    fake.image_complete = lambda p: decoded.append(Path(p).name) or real_generate.image_complete(p)
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", fake)
    gpp = write_jsonl(tmp_path / "bench" / "geneval_pp.jsonl", _gpp_rows()[:3])
    write_jsonl(tmp_path / "bench" / "imagine_bench.jsonl",
                [{"id": i, "instruction": f"I{i}", "note": "n", "type": t} for i, t in
                 [(1, "COLOR"), (2, "MATERIAL"), (3, "Multi-Object")]])

    def handler(req):
        text = message_text(req)
        if "Instruction:" in text:
            return '{"correct": 1, "reason": "ok"}'
        return _imagine_answer(5, 6, 10)

    out = tmp_path / "out"
    with FakeOpenAIServer(chat_handler=handler) as s:
        argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp,imagine_bench", "--out", str(out),
                "--benchmarks-dir", str(tmp_path / "bench"), "--geneval-pp-prompts", str(gpp), "--seed", "100",
                "--num-images", "2", "--gen-arg", "cfg_text_scale=4.0", "--gen-arg", "note=plain",
                "--label", "tiny", *judge_args(s)]
        rep = eval_run.main(argv)
        assert len(s.calls(CHAT)) == 3 * 2 + 2 * 2  # 3 geneval x 2 images, imagine id 2 not written
        assert len(calls) == 2 and decoded == []  # images written by generate_batch are not decoded again
        assert [c["progress"] for c in calls] == [False, False]  # --no-progress (judge_args): no bar of its own
        g = calls[0]
        # the GenEval script's text-to-image settings (no image CFG, interval [0, 1]) under --gen-arg, both benches
        t2i = {"cfg_img_scale": 1.0, "cfg_interval": [0.0, 1.0], "crop_to_bbox": True}
        assert g["out_dir"] == str(out / "geneval_pp" / "images") and g["overrides"] == {**t2i, "cfg_text_scale": 4.0,
                                                                                           "note": "plain"}
        assert calls[1]["overrides"] == g["overrides"]
        assert [(r["id"], r["prompt"], r["seed"], r["num_images"]) for r in g["requests"]] == [
            ("00001", "P1 <b>bus</b>", 100, 2), ("00002", "P2", 101, 2), ("00003", "P3", 102, 2)]
        assert [r["id"] for r in calls[1]["requests"]] == ["00001", "00002", "00003"]
        gb = rep["benchmarks"]["geneval_pp"]
        assert gb["summary"]["score"] == 1.0 and gb["summary"]["n_images"] == 6
        ib = rep["benchmarks"]["imagine_bench"]
        assert ib["generation"]["not_written"] and ib["summary"]["n_missing"] == 2
        per = 0.8 * 5 + 0.2 * 10
        assert ib["summary"]["overall"] == pytest.approx((3 * per + 2 * 0 + 2 * per) / 7)
        md = (out / "summary.md").read_text()
        assert md.startswith("# Evaluation of tiny") and "# GenEval++: tiny" in md and "# Imagine-Bench: tiny" in md
        assert "SUBSET" not in md and "subset" not in gb and "subset" not in ib  # every prompt: no --limit

        # judge counters: each results.json has its own benchmark's; summary.json the run's total
        res_g = json.loads((out / "geneval_pp" / "results.json").read_text())["judge_stats"]
        res_i = json.loads((out / "imagine_bench" / "results.json").read_text())["judge_stats"]
        assert (res_g["requests"], res_g["api_calls"], res_g["cache_hits"]) == (6, 6, 0)
        assert (res_i["requests"], res_i["api_calls"], res_i["cache_hits"]) == (4, 4, 0)
        assert gb["judge_stats"] == res_g and ib["judge_stats"] == res_i
        assert (rep["judge_stats"]["requests"], rep["judge_stats"]["api_calls"]) == (10, 10)
        assert json.loads((out / "summary.json").read_text())["judge_stats"] == rep["judge_stats"]

        # second run: nothing to generate but the absent images, nothing to judge again
        calls.clear()
        rep2 = eval_run.main(argv)
        assert [len(c["requests"]) for c in calls] == [1]  # imagine 00002 retried, geneval complete
        assert len(s.calls(CHAT)) == 10 and rep2["judge_stats"]["api_calls"] == 0
        res_i = json.loads((out / "imagine_bench" / "results.json").read_text())["judge_stats"]
        assert (res_i["requests"], res_i["api_calls"], res_i["cache_hits"]) == (4, 0, 4)
        assert rep2["benchmarks"]["geneval_pp"]["judge_stats"]["cache_hits"] == 6

        # an image cut short (a kill mid-write) is generated again, not judged as it is
        img = out / "geneval_pp" / "images" / "00002_1.png"
        img.write_bytes(img.read_bytes()[:40])
        calls.clear()
        eval_run.main(argv)
        assert [[r["id"] for r in c["requests"]] for c in calls] == [["00002"], ["00002"]]
        assert sorted(decoded) == ["00002_0.png", "00002_1.png"]  # there before generate_batch: checked again
        assert real_generate.image_complete(img)

        # --regenerate (other settings) reaches generate_batch (which otherwise refuses its finished requests made
        # otherwise); images made with this run's settings are kept (an interrupted --regenerate run resumes)
        calls.clear()
        eval_run.main(argv + ["--gen-arg", "cfg_text_scale=5.0", "--regenerate", "--generate-only"])
        assert [(len(c["requests"]), c["regenerate"]) for c in calls] == [(3, True), (3, True)]
        assert calls[0]["overrides"] == {**t2i, "cfg_text_scale": 5.0, "note": "plain"}
        calls.clear()
        eval_run.main(argv + ["--gen-arg", "cfg_text_scale=5.0", "--regenerate", "--generate-only"])
        assert [[r["id"] for r in c["requests"]] for c in calls] == [["00002"]]  # imagine 00002: never written
    assert_no_secret(out)


def test_run_checks_every_benchmarks_requests_before_generating_any(tmp_path, monkeypatch, capsys):
    """A request the generator refuses in a later benchmark stops the run before the first benchmark's hours of
    generation, naming the prompt file; a bad --out and a blank Imagine-Bench instruction fail at once too."""
    calls, checked = [], []
    fake = _fake_generate_module(calls)
    real_batch = fake.generate_batch

    def batch(ckpt, requests, out_dir, **kw):
        if kw.get("check_only"):
            checked.append([r["prompt"] for r in requests])
            if any(r["prompt"] == "I2" for r in requests):
                raise real_generate.GenerateError("request 2 (id=00002): size 7x7: not a multiple of 16")
        return real_batch(ckpt, requests, out_dir, **kw)

    fake.generate_batch = batch
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", fake)
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    ib = write_jsonl(tmp_path / "imagine_bench.jsonl", [{"id": i, "instruction": f"I{i}", "note": "n", "type": "COLOR"}
                                                        for i in (1, 2)])
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp,imagine_bench", "--out", str(tmp_path / "o"),
            "--geneval-pp-prompts", str(gpp), "--imagine-bench-prompts", str(ib), "--generate-only"]
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: [imagine_bench] {ib}: request 2 (id=00002): size 7x7: not a multiple of 16 "
                       "(nothing was generated)")
    assert checked == [["P1 <b>bus</b>", "P2"], ["I1", "I2"]] and calls == []
    assert not (tmp_path / "o" / "geneval_pp" / "images").exists()
    # --out that is a file, or under one: one line, before anything
    (tmp_path / "f").write_text("x")
    for bad, why in ((tmp_path / "f", "exists and is not a folder"), (tmp_path / "f" / "o", "is a file, not a folder")):
        argv_out = argv[:argv.index("--out") + 1] + [str(bad)] + argv[argv.index("--out") + 2:]
        assert common.run_cli(eval_run.main, argv_out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {bad}: ") and why in err[0], err
    # check_only is eval.run's own argument, not a setting
    with pytest.raises(common.UsageError, match="--gen-arg check_only=...: not a generation setting"):
        eval_run.main(argv + ["--gen-arg", "check_only=true"])
    # an instruction of spaces would be an empty prompt: refused when the file loads
    write_jsonl(ib, [{"id": 1, "instruction": "   ", "note": "n", "type": "COLOR"}])
    with pytest.raises(common.UsageError, match=rf"{re.escape(str(ib))}:1: 'instruction' must be a non-empty"):
        eval_run.main(argv)


def _two_bench_prompts(tmp_path, out) -> list[str]:
    """eval.run's prompt and --out flags for a GenEval++ file of 2 prompts and an Imagine-Bench file of 1."""
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    ib = write_jsonl(tmp_path / "imagine_bench.jsonl", [{"id": 1, "instruction": "I1", "note": "n", "type": "COLOR"}])
    return ["--geneval-pp-prompts", str(gpp), "--imagine-bench-prompts", str(ib), "--out", str(out)]


def _two_bench_answers(req):
    """A judge of both: GenEval++ passes, Imagine-Bench 5 / 6 / 10."""
    return '{"correct": 1}' if "Instruction:" in message_text(req) else _imagine_answer(5, 6, 10)


def test_run_of_fewer_benchmarks_keeps_the_others_in_the_summary(tmp_path, monkeypatch):
    """A later run of one benchmark into the same --out (a re-judge, say) rewrites summary.json / summary.md
    with that benchmark's new entry and keeps the others' (marked from_earlier_run); --judge-only without
    --ckpt names the checkpoint the images' records name."""
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    out = tmp_path / "o"
    prompts = _two_bench_prompts(tmp_path, out)
    handler = _two_bench_answers

    with FakeOpenAIServer(chat_handler=handler) as s:
        eval_run.main(["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp,imagine_bench", *prompts,
                       *judge_args(s)])
        first = json.loads((out / "summary.json").read_text())
        rep = eval_run.main(["--judge-only", "--bench", "geneval_pp", *prompts, *judge_args(s)])
    assert list(rep["benchmarks"]) == ["geneval_pp", "imagine_bench"]
    kept = rep["benchmarks"]["imagine_bench"]
    assert kept == {**first["benchmarks"]["imagine_bench"], "from_earlier_run": True}
    assert "from_earlier_run" not in rep["benchmarks"]["geneval_pp"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(rep))
    md = (out / "summary.md").read_text()
    assert md.startswith("# Evaluation of ckpt") and "# GenEval++: ckpt" in md and "# Imagine-Bench: ckpt" in md
    assert (rep["ckpt"], rep["ckpt_from"]) == (str((tmp_path / "ckpt").resolve()), "generation records")
    res = json.loads((out / "geneval_pp" / "results.json").read_text())
    assert res["source"]["ckpt"] == str((tmp_path / "ckpt").resolve())  # results.json names it too
    # another checkpoint's run of one benchmark: the earlier benchmark's scores are not credited to it
    with FakeOpenAIServer(chat_handler=handler) as s:
        rep = eval_run.main(["--ckpt", str(tmp_path / "other"), "--bench", "geneval_pp", "--regenerate", *prompts,
                             *judge_args(s)])
    assert list(rep["benchmarks"]) == ["geneval_pp"] and rep["label"] == "other"
    assert "# Imagine-Bench" not in (out / "summary.md").read_text()
    assert (out / "imagine_bench" / "results.json").is_file()  # its own results stay


def test_run_complete_and_exit_status_are_this_runs(tmp_path, monkeypatch, capsys):
    """An earlier run's benchmark in the same --out decided `complete` and the exit status: one only generated
    counted as judged (exit 0, complete), one incomplete made every later run of another benchmark exit 1 (its
    "run the same command again" never touched it). Now they are listed apart (earlier_incomplete)."""
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module([]))
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    ib = write_jsonl(tmp_path / "imagine_bench.jsonl", [{"id": 1, "instruction": "I1", "note": "n", "type": "COLOR"}])
    out = tmp_path / "o"
    base = ["--ckpt", str(tmp_path / "ckpt"), "--geneval-pp-prompts", str(gpp), "--imagine-bench-prompts", str(ib),
            "--out", str(out)]
    assert common.run_cli(eval_run.main, [*base, "--bench", "geneval_pp,imagine_bench", "--generate-only"]) == 0
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1}') as s:
        assert common.run_cli(eval_run.main, [*base, "--bench", "geneval_pp", *judge_args(s)]) == 0
    rep = json.loads((out / "summary.json").read_text())
    assert rep["complete"] and rep["earlier_incomplete"] == ["imagine_bench"]  # (generated, never judged)
    assert "Not (fully) judged by an earlier run in this folder: imagine_bench" in (out / "summary.md").read_text()


def test_judge_only_names_the_checkpoint_its_records_name(tmp_path, monkeypatch, capsys):
    """--judge-only --ckpt <training workdir> (the README's GenEval step) left the step unresolved: the other
    benchmarks of that workdir's latest step were dropped from the summary as "another checkpoint". Without
    --ckpt, images of two checkpoints (an interrupted --regenerate) were scored as one model."""
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module([]))
    wd = _fake_workdir(tmp_path / "runs" / "echo4o", [100, 200])
    out = tmp_path / "o"
    prompts = _two_bench_prompts(tmp_path, out)
    handler = _two_bench_answers

    with FakeOpenAIServer(chat_handler=handler) as s:
        eval_run.main(["--ckpt", str(wd), "--bench", "geneval_pp,imagine_bench", *prompts, *judge_args(s)])
        capsys.readouterr()
        rep = eval_run.main(["--ckpt", str(wd), "--judge-only", "--bench", "geneval_pp", *prompts, *judge_args(s)])
    assert "another checkpoint" not in capsys.readouterr().err
    assert list(rep["benchmarks"]) == ["geneval_pp", "imagine_bench"] and rep["ckpt_step"] == 200
    # images of two checkpoints in one benchmark: --judge-only without --ckpt refuses to score them as one
    rec_path = out / "imagine_bench" / "images" / eval_run.GENERATION_RECORD
    rec = json.loads(rec_path.read_text())
    rid = next(iter(rec["requests"]))
    rec["requests"][rid]["ckpt"] = str(tmp_path / "other")
    rec_path.write_text(json.dumps(rec))
    msg = _one_error_line(capsys, eval_run.main, ["--judge-only", "--bench", "geneval_pp,imagine_bench", *prompts])
    assert msg.startswith(f"--judge-only: the images in {out} were made by 2 checkpoints (") and "--ckpt" in msg


def test_run_without_generate_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", None)  # import raises ImportError
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:1])
    with pytest.raises(ValueError, match="generate_batch.*--judge-only"):
        eval_run.main(["--ckpt", "x", "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
                       "--geneval-pp-prompts", str(gpp)])
    assert eval_run.main.__module__ == "echo4o_jax.eval.run"
    from echo4o_jax.eval import common
    assert common.run_cli(eval_run.main, ["--ckpt", "x", "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
                                          "--geneval-pp-prompts", str(gpp)]) == 2


def test_run_generation_error_is_one_line(tmp_path, monkeypatch, capsys):
    """A generation error is one line, its advice in eval.run's flags (generate's name its own CLI's)."""
    msg = ("output size 1024x1024 exceeds the model's position table (8 x 16 = 128 px per side); give a size of at "
           "most 128x128 (--size HxW, or `size` in a --prompts request); lower the VAE resize (--vae-transform MAX "
           "MIN)")
    ours = ("output size 1024x1024 exceeds the model's position table (8 x 16 = 128 px per side); give a size of "
            "at most 128x128 (--size HxW); lower the VAE resize (--gen-arg vae_transform=[MAX,MIN])")
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate",
                        _fake_generate_module(calls, error=real_generate.GenerateError(msg)))
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:1])
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
            "--geneval-pp-prompts", str(gpp), "--generate-only"]
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [geneval_pp] generation failed: {ours}"
    assert not any("Traceback" in line for line in err) and len(calls) == 1


def test_run_generation_error_from_the_real_generator(golden_dir, tmp_path, capsys):
    """The real generate_batch on the tiny golden checkpoint (it has no tokenizer: text prompts fail)."""
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:1])
    capsys.readouterr()
    rc = common.run_cli(eval_run.main, ["--ckpt", str(golden_dir), "--bench", "geneval_pp", "--out",
                                        str(tmp_path / "o"), "--geneval-pp-prompts", str(gpp), "--generate-only"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: [geneval_pp] {gpp}: ") and "tokenizer" in last
    assert last.endswith("(nothing was generated)") and not (tmp_path / "o" / "geneval_pp" / "images").exists()
    # the loader's settings are checked then too, as generate's flags (before any record is written)
    for dtype in ("foo", "int8", "float16"):
        msg = _one_error_line(capsys, eval_run.main, ["--ckpt", str(golden_dir), "--bench", "geneval_pp", "--out",
                                                      str(tmp_path / "o"), "--geneval-pp-prompts", str(gpp),
                                                      "--generate-only", "--gen-arg", f"dtype={dtype}"])
        assert msg == (f"[geneval_pp] {gpp}: dtype (--gen-arg dtype=...) {dtype!r}: expected one of float32, "
                       "bfloat16 (nothing was generated)"), msg
    msg = _one_error_line(capsys, eval_run.main, ["--ckpt", str(golden_dir), "--bench", "geneval_pp", "--out",
                                                  str(tmp_path / "o"), "--geneval-pp-prompts", str(gpp),
                                                  "--generate-only", "--gen-arg", "max_context=-1"])
    assert msg == (f"[geneval_pp] {gpp}: max_context (--gen-arg max_context) -1: must be at least 0 (nothing was "
                   "generated)"), msg  # (it named generate's --max-context)
    assert not (tmp_path / "o").exists()


def test_run_maps_every_flag_generate_names():
    """generate's messages take a setting's flag from sampling_defaults.SETTING_FLAGS; eval.run has its own form of
    each, and maps both message forms ("(FLAG" and "FLAG=")."""
    from echo4o_jax.sampling_defaults import SETTING_FLAGS

    assert set(eval_run.EVAL_FLAGS) == set(SETTING_FLAGS)
    for key, flag in SETTING_FLAGS.items():
        got = eval_run._generation_error(ValueError(f"x ({flag}) y; {flag}=3"))
        assert got == f"x ({eval_run.EVAL_FLAGS[key]}) y; {eval_run.EVAL_FLAGS[key]}=3", got


def test_run_missing_prompt_file_names_the_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ECHO4O_BENCHMARKS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./benchmarks here
    argv = ["--judge-only", "--bench", "geneval_pp", "--out", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError) as ei:
        eval_run.main(argv)
    msg = str(ei.value)
    assert msg.startswith("benchmarks/geneval_pp.jsonl not found; ")
    for part in ("--benchmarks-dir DIR", "../shared/benchmarks", "--geneval-pp-prompts FILE", "--fetch",
                 "githubusercontent"):
        assert part in msg, part
    assert common.run_cli(eval_run.main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {msg}"]
    # an explicit file names its own flag
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl not found; point --imagine-bench-prompts FILE.*--fetch"):
        eval_run.main(["--judge-only", "--bench", "imagine_bench", "--out", str(tmp_path / "o"),
                       "--imagine-bench-prompts", str(tmp_path / "nope.jsonl")])


@needs_bench
def test_run_readme_command_reads_shared_benchmarks(tmp_path, monkeypatch):
    """README's eval command (run from the repository root, prompt files from ../shared/benchmarks)."""
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repository root; BENCH_DIR is ../shared/benchmarks
    rep = eval_run.main(["--ckpt", "runs/echo4o", "--bench", "geneval_pp,imagine_bench",
                         "--benchmarks-dir", "../shared/benchmarks", "--out", str(tmp_path / "eval"),
                         "--generate-only", "--limit", "2"])
    assert {n: b["items"] for n, b in rep["benchmarks"].items()} == {"geneval_pp": 2, "imagine_bench": 2}
    assert [len(c["requests"]) for c in calls] == [2, 2]


def test_run_template_override(tmp_path):
    t = tmp_path / "my.txt"
    t.write_text("# version: mine-2\n# parser: verdict_json\n[user]\nCheck {{prompt}}\n{{checklist}}\n")
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    (tmp_path / "out" / "geneval_pp" / "images").mkdir(parents=True)
    write_png(tmp_path / "out" / "geneval_pp" / "images" / "00001_0.png")
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1}') as s:
        rep = eval_run.main(["--judge-only", "--bench", "geneval_pp", "--out", str(tmp_path / "out"),
                             "--geneval-pp-prompts", str(gpp), "--template", f"geneval_pp={t}", *judge_args(s)])
        assert message_text(s.calls(CHAT)[0]).startswith("Check P1")
    res = json.loads((tmp_path / "out" / "geneval_pp" / "results.json").read_text())
    assert res["judge"]["template"] == "my@mine-2" and rep["benchmarks"]["geneval_pp"]["summary"]["score"] == 0.5 / 1


# ------------------------------------------------------------------------------------------------
# eval.run: the images' generation record (a rerun with other settings is refused)
# ------------------------------------------------------------------------------------------------

def _two_benches(tmp_path, gpp_rows=None):
    bench = tmp_path / "bench"
    write_jsonl(bench / "geneval_pp.jsonl", gpp_rows or _gpp_rows()[:2])
    write_jsonl(bench / "imagine_bench.jsonl", [{"id": 1, "instruction": "I1", "note": "n", "type": "COLOR"}])
    return bench


def _image_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_a_limited_run_is_marked_as_a_subset_not_a_benchmark_score(tmp_path, monkeypatch, capsys):
    """--limit N (a smoke test, or capped API spend): the results say which prompts of how many they hold, in
    summary.json, results.json and above the score table that sets the score beside the published ones."""
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module([]))
    gpp = write_jsonl(tmp_path / "bench" / "geneval_pp.jsonl", _gpp_rows()[:3])
    out = tmp_path / "out"
    with FakeOpenAIServer(chat_handler=lambda req: '{"correct": 1, "reason": "ok"}') as s:
        rep = eval_run.main(["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(out),
                             "--geneval-pp-prompts", str(gpp), "--limit", "2", *judge_args(s)])
    note = "SUBSET: the first 2 of 3 prompts (--limit): a smoke test, not comparable with the benchmark's scores"
    assert rep["complete"] and rep["benchmarks"]["geneval_pp"]["subset"] == note
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["geneval_pp"]["subset"] == note
    assert json.loads((out / "geneval_pp" / "results.json").read_text())["source"]["subset"] == note
    for md in ((out / "summary.md").read_text(), (out / "geneval_pp" / "summary.md").read_text()):
        assert md.index(f"**{note}.**") < md.index("| Model")
    assert f"n_judge_failures=0 ({note})\n" in capsys.readouterr().out


def test_run_refuses_images_of_another_generation(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    bench = _two_benches(tmp_path)
    out = tmp_path / "out"
    ckpt_a, ckpt_b = tmp_path / "ckpt_a", tmp_path / "ckpt_b"
    base = ["--bench", "geneval_pp,imagine_bench", "--out", str(out), "--benchmarks-dir", str(bench),
            "--generate-only"]
    first = ["--ckpt", str(ckpt_a), "--seed", "100", "--gen-arg", "cfg_text_scale=4.0"]
    eval_run.main(base + first)
    assert [len(c["requests"]) for c in calls] == [2, 1]
    rec = json.loads((out / "geneval_pp" / "images" / eval_run.GENERATION_RECORD).read_text())["requests"]
    assert rec["00002"] == {"ckpt": str(ckpt_a.resolve()), "ckpt_step": None, "ckpt_weights": None, "seed": 101,
                            "gen_args": {"cfg_img_scale": 1.0, "cfg_interval": [0.0, 1.0], "cfg_text_scale": 4.0,
                                         "crop_to_bbox": True},
                            "size": None, "num_images": 1, "prompt": "P2", "images": []}
    images = _image_bytes(out)

    # the same settings: resumes (nothing to generate); so do settings spelled out at the generator's defaults
    # (the text-to-image sampler's, the dtype, the 1024x1024 size), on their own or with --judge-only
    calls.clear()
    assert common.run_cli(eval_run.main, base + first) == 0 and calls == []
    defaults = ["--gen-arg", "num_timesteps=50", "--gen-arg", "timestep_shift=3", "--gen-arg", "dtype=float32",
                "--gen-arg", "cfg_renorm_type=global", "--size", "1024x1024"]
    assert common.run_cli(eval_run.main, base + first + defaults) == 0 and calls == []
    # settings that make no other images resume too (as generate): the attention kernel, the cache capacity, and
    # vae_posterior where no image is VAE-encoded (it was "another generation", leaving only --regenerate)
    same = ["--gen-arg", "attention_impl=xla_dense", "--gen-arg", "max_context=4096", "--gen-arg", "vae_posterior=mean"]
    assert common.run_cli(eval_run.main, base + first + same) == 0 and calls == []
    judge_only = [a for a in base if a != "--generate-only"] + ["--judge-only"]
    with pytest.raises(common.UsageError, match="the output size .* differs"):  # (the check runs before the judge)
        eval_run.main(judge_only + first + ["--size", "512x512"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):  # past the settings check: the judge's key
        eval_run.main(judge_only + first + defaults)

    # images recorded before crop_to_bbox (a default now, as the official scripts) were saved whole: refused as
    # another --gen-arg, accepted with crop_to_bbox=false
    record = out / "geneval_pp" / "images" / eval_run.GENERATION_RECORD
    kept = record.read_text()
    older = json.loads(kept)
    for entry in older["requests"].values():
        del entry["gen_args"]["crop_to_bbox"]
    record.write_text(json.dumps(older))
    with pytest.raises(common.UsageError, match=r"^\[geneval_pp\] .*--gen-arg.*crop_to_bbox"):
        eval_run.main(base + first)
    calls.clear()
    eval_run.main(base + first + ["--gen-arg", "crop_to_bbox=false", "--bench", "geneval_pp"])
    assert calls == []
    record.write_text(kept)

    # each setting that makes other pictures is refused, naming it; nothing generated, no image touched
    changed = {
        "--ckpt": ["--ckpt", str(ckpt_b), "--seed", "100", "--gen-arg", "cfg_text_scale=4.0"],
        "--seed": ["--ckpt", str(ckpt_a), "--seed", "7", "--gen-arg", "cfg_text_scale=4.0"],
        "--gen-arg": ["--ckpt", str(ckpt_a), "--seed", "100", "--gen-arg", "cfg_text_scale=5.0"],
        "--size": first + ["--size", "64", "64"],
        # more images per prompt: the request would be generated again, replacing the images there
        "--num-images": first + ["--num-images", "2"],
    }
    for flag, argv in changed.items():
        capsys.readouterr()
        assert common.run_cli(eval_run.main, base + argv) == 2, flag
        err = _stderr_lines(capsys)
        assert len(err) == 1 and err[0].startswith("error: [geneval_pp] ") and "Traceback" not in err[0]
        assert f"{flag}" in err[0] and "--regenerate" in err[0] and "another --out" in err[0], err[0]
        assert calls == [] and _image_bytes(out) == images
    # a setting the generator does not take (a typo) is said as that, not as another generation
    fake, checked = sys.modules["echo4o_jax.generate"], []

    def typo_refused(ckpt, requests, out_dir, **kw):
        checked.append(kw.get("check_only"))
        if "num_timestep" in kw:
            raise real_generate.GenerateError("unknown setting 'num_timestep'; known: ..., num_timesteps")
        return generate_batch(ckpt, requests, out_dir, **kw)

    generate_batch, fake.generate_batch = fake.generate_batch, typo_refused
    with pytest.raises(common.UsageError, match=r"^\[geneval_pp\] --gen-arg: unknown setting 'num_timestep'"):
        eval_run.main(base + first + ["--gen-arg", "num_timestep=4"])
    assert checked == [True] and calls == [] and _image_bytes(out) == images
    fake.generate_batch = generate_batch
    with pytest.raises(common.UsageError) as ei:
        eval_run.main(base + changed["--ckpt"])
    assert f"made with {str(ckpt_a.resolve())!r}, this run has {str(ckpt_b.resolve())!r}" in str(ei.value)
    assert "for 2 request(s)" in str(ei.value)

    # another prompt under the same id (the prompt file changed)
    rows = _gpp_rows()[:2]
    rows[1] = {**rows[1], "prompt": "P2 edited"}
    write_jsonl(bench / "geneval_pp.jsonl", rows)
    with pytest.raises(common.UsageError, match=r"the prompt differs for 1 request\(s\), e.g. 00002: the images were "
                                                r"made with 'P2', this run has 'P2 edited'"):
        eval_run.main(base + first)
    assert calls == []
    write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])

    # --regenerate: every image again with the new settings, and the record says so; then that resumes
    eval_run.main(base + changed["--ckpt"] + ["--regenerate"])
    assert [(len(c["requests"]), c["ckpt"]) for c in calls] == [(2, str(ckpt_b)), (1, str(ckpt_b))]
    rec = json.loads((out / "imagine_bench" / "images" / eval_run.GENERATION_RECORD).read_text())["requests"]
    assert rec["00001"]["ckpt"] == str(ckpt_b.resolve())
    calls.clear()
    eval_run.main(base + changed["--ckpt"])
    assert calls == []

    # images without a record (an older eval.run, or made by hand) are refused too
    (out / "geneval_pp" / "images" / eval_run.GENERATION_RECORD).unlink()
    with pytest.raises(common.UsageError, match=r"2 request\(s\) have images but no record of what made them"):
        eval_run.main(base + changed["--ckpt"])
    assert calls == []


def test_run_full_disk_is_one_error_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    """A full disk during generation (generate_batch's one-line error) and then while settling the images' record:
    one error line (exit 2), no temporary file beside the record, which still says what made the images written:
    the rerun resumes. A record that cannot be written as generation begins: one line naming it, nothing made."""
    import errno
    import os

    calls, full = [], []
    fake = _fake_generate_module(calls)
    real_batch = fake.generate_batch
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", fake)
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    images = tmp_path / "o" / "geneval_pp" / "images"
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
            "--geneval-pp-prompts", str(gpp), "--generate-only"]
    for method in ("write_bytes", "write_text"):
        def write(self, data, *a, _real=getattr(Path, method), **kw):  # once the disk is full: nothing fits
            if full:
                _real(self, data[:0], *a, **kw)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real(self, data, *a, **kw)

        monkeypatch.setattr(Path, method, write)
    real_fsync = os.fsync

    def fsync(fd):  # (the record is written through paths.atomic_write: the full disk shows when it is synced)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    image_error = (f"cannot write {images / '00002_0.png'}: No space left on device; 1 of 2 requests finished and "
                   "kept: rerun the same command to resume")  # as the real generate_batch says it

    def filling(ckpt, requests, out_dir, **kw):
        if kw.get("check_only"):
            return []
        real_batch(ckpt, requests[:1], out_dir, **kw)
        full.append(True)
        raise real_generate.GenerateError(image_error)

    monkeypatch.setattr(fake, "generate_batch", filling)
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    err = _stderr_lines(capsys)
    assert err[-1] == f"error: [geneval_pp] generation failed: {image_error}" and "Traceback" not in "".join(err)
    assert sorted(p.name for p in images.iterdir()) == ["00001_0.png", eval_run.GENERATION_RECORD]
    full.clear()  # space freed: the rerun makes the rest
    monkeypatch.setattr(fake, "generate_batch", real_batch)
    calls.clear()
    assert common.run_cli(eval_run.main, argv) == 0
    assert [[r["id"] for r in c["requests"]] for c in calls] == [["00002"]]
    (images / "00002_0.png").unlink()
    full.append(True)
    calls.clear()
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    assert _stderr_lines(capsys) == [f"error: cannot write {images / eval_run.GENERATION_RECORD}: No space left on "
                                     "device; what was written before is kept: rerun the same command to continue"]
    assert calls == [] and sorted(p.name for p in images.iterdir()) == ["00001_0.png", eval_run.GENERATION_RECORD]


def test_run_fetch_that_cannot_download_is_one_error_line(tmp_path, monkeypatch, capsys):
    """--fetch without network, or a file upstream that is not the released one: one error line naming the URL and
    the cause (exit 2); nothing is written, not even the benchmarks folder."""
    import io
    import socket
    import urllib.error
    import urllib.request

    bench = tmp_path / "nobench"
    dest = bench / imagine_bench.PROMPTS_FILE
    argv = ["--judge-only", "--bench", "imagine_bench", "--benchmarks-dir", str(bench), "--fetch",
            "--out", str(tmp_path / "evf")]

    def offline(url, timeout=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    err = _stderr_lines(capsys)
    assert err[-1] == (f"error: cannot download {imagine_bench.PUBLIC_URL}: [Errno -3] Temporary failure in name "
                       f"resolution; nothing was written to {dest}") and "Traceback" not in "".join(err)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"{}\n"))
    assert common.run_cli(eval_run.main, argv) == 2
    assert _stderr_lines(capsys)[-1] == (
        f"error: cannot use {imagine_bench.PUBLIC_URL}: md5 {hashlib.md5(b'{}' + bytes([10])).hexdigest()} != "
        f"expected {imagine_bench.PUBLIC_MD5} (the upstream file changed?); nothing was written to {dest}")
    assert not bench.exists() and not (tmp_path / "evf").exists()


def _fake_workdir(d: Path, steps) -> Path:
    """A training workdir's layout (model_config/, vae/, checkpoints/<step>/ema/): enough to name its steps."""
    (d / "model_config").mkdir(parents=True)
    (d / "model_config" / "llm_config.json").write_text("{}")
    (d / "vae").mkdir()
    (d / "vae" / "_METADATA").write_text("{}")
    for s in steps:
        (d / "checkpoints" / str(s) / "ema").mkdir(parents=True)
        (d / "checkpoints" / str(s) / "ema" / "_METADATA").write_text(f'{{"step": {s}}}')
    return d


def test_run_records_and_passes_the_workdir_step(tmp_path, monkeypatch, capsys):
    """A training workdir's step (--step, default its latest, resolved once) is recorded and passed to
    generate_batch; a newer checkpoint in the same workdir is other weights: refused on resume."""
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    bench = _two_benches(tmp_path)
    wd = _fake_workdir(tmp_path / "wd", [2, 4])
    base = ["--bench", "geneval_pp", "--out", str(tmp_path / "out"), "--benchmarks-dir", str(bench),
            "--generate-only", "--ckpt", str(wd)]
    eval_run.main(base)
    assert [c["overrides"] for c in calls] == [{"cfg_img_scale": 1.0, "cfg_interval": [0.0, 1.0], "crop_to_bbox": True,
                                                "step": 4}]
    rec = json.loads((tmp_path / "out" / "geneval_pp" / "images" / eval_run.GENERATION_RECORD).read_text())
    entry = rec["requests"]["00001"]
    assert (entry["ckpt"], entry["ckpt_step"]) == (str(wd.resolve()), 4)
    assert set(entry["ckpt_weights"]) == {"checkpoints/4/ema/_METADATA", "vae/_METADATA"}
    calls.clear()
    (wd / "checkpoints" / "6" / "ema").mkdir(parents=True)  # the training went on
    (wd / "checkpoints" / "6" / "ema" / "_METADATA").write_text("{}")
    msg = _one_error_line(capsys, eval_run.main, base)
    assert "--step (the training workdir's checkpoint; default its latest) differs for 2 request(s)" in msg, msg
    assert "made with 4, this run has 6" in msg and calls == []
    eval_run.main(base + ["--step", "4"])  # the step the images were made with: resumed
    assert calls == []
    msg = _one_error_line(capsys, eval_run.main, base + ["--step", "3"])
    assert msg == f"--step: {wd}: no checkpoint for step 3 (available: [2, 4, 6])"
    # --step needs a workdir; it is a flag of its own (not --gen-arg step=..., no prefix matching)
    other = ["--bench", "geneval_pp", "--out", str(tmp_path / "o2"), "--benchmarks-dir", str(bench), "--generate-only"]
    msg = _one_error_line(capsys, eval_run.main, other + ["--ckpt", str(tmp_path), "--step", "4"])
    assert msg.startswith(f"--step 4: {tmp_path} is not a training workdir"), msg
    msg = _one_error_line(capsys, eval_run.main, other + ["--ckpt", str(wd), "--gen-arg", "step=4"])
    assert msg == "--gen-arg step=...: use --step"
    msg = _one_error_line(capsys, eval_run.main, other + ["--ckpt", str(wd), "--gen-arg", "max_new_tokens=5"])
    assert msg == ("--gen-arg max_new_tokens=... would be ignored: it limits the think text of think requests, and "
                   "no benchmark request thinks")
    msg = _one_error_line(capsys, eval_run.main, other + ["--ckpt", str(wd), "--gen-arg", "progress=false"])
    assert msg == "--gen-arg progress=...: not a generation setting"
    with pytest.raises(SystemExit):
        eval_run.build_parser().parse_args(other + ["--ckpt", str(wd), "--regen"])
    assert calls == []


def test_run_record_survives_an_interrupted_generation(tmp_path, monkeypatch):
    """The record is written before generate_batch: the images a killed run leaves resume, not refused."""
    calls = []
    fake = _fake_generate_module(calls)
    real_batch = fake.generate_batch

    def dying_batch(ckpt, requests, out_dir, **kw):
        if kw.get("check_only"):  # the check before generation passes
            return real_batch(ckpt, requests, out_dir, **kw)
        real_batch(ckpt, requests[:1], out_dir, **kw)  # the first request's images, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", fake)
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:3])
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
            "--geneval-pp-prompts", str(gpp), "--generate-only"]
    monkeypatch.setattr(fake, "generate_batch", dying_batch)
    assert common.run_cli(eval_run.main, argv) == 130
    monkeypatch.setattr(fake, "generate_batch", real_batch)
    calls.clear()
    eval_run.main(argv)
    assert [[r["id"] for r in c["requests"]] for c in calls] == [["00002", "00003"]]


def test_a_stopped_regenerate_leaves_no_results_saying_complete(tmp_path, monkeypatch):
    """A --regenerate run that stops (an error, Ctrl-C) after replacing images: the benchmark's results.json and
    summary.json still said complete, of images partly gone. They are marked incomplete before any is replaced."""
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module([]))
    out = tmp_path / "o"
    base = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", *_two_bench_prompts(tmp_path, out)]
    with FakeOpenAIServer(chat_handler=_two_bench_answers) as s:
        assert eval_run.main([*base, *judge_args(s)])["complete"]

    def failing(*args_, **kw):
        if kw.get("check_only"):
            return []
        raise real_generate.GenerateError("the disk is full")

    monkeypatch.setattr(sys.modules["echo4o_jax.generate"], "generate_batch", failing)
    with pytest.raises(common.UsageError, match="generation failed"):
        eval_run.main([*base, "--seed", "7", "--regenerate", "--generate-only"])
    res = json.loads((out / "geneval_pp" / "results.json").read_text())
    summ = json.loads((out / "summary.json").read_text())
    assert res["complete"] is False and res["incomplete"].startswith("its images are being generated again")
    assert summ["complete"] is False and summ["benchmarks"]["geneval_pp"]["complete"] is False


def test_run_record_after_a_failed_or_killed_regenerate(tmp_path, monkeypatch):
    """--regenerate with new settings that stops early: the record names, per request, what made the images
    that are there (a generation error, or a kill before the record was settled: told apart by mtimes)."""
    import os

    calls = []
    fake = _fake_generate_module(calls)
    real_batch = fake.generate_batch
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", fake)
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    images = tmp_path / "o" / "geneval_pp" / "images"
    base = ["--bench", "geneval_pp", "--out", str(tmp_path / "o"), "--geneval-pp-prompts", str(gpp), "--generate-only"]
    a, b = ["--ckpt", str(tmp_path / "a")], ["--ckpt", str(tmp_path / "b")]
    eval_run.main(base + a)
    for p in images.glob("*.png"):  # made well before the next runs
        os.utime(p, (p.stat().st_atime - 100, p.stat().st_mtime - 100))

    def failing(*args_, **kw):  # during generation (the check before it passes)
        if kw.get("check_only"):
            return []
        raise real_generate.GenerateError("size 7x7: not a multiple of 16")

    monkeypatch.setattr(fake, "generate_batch", failing)
    with pytest.raises(common.UsageError, match="generation failed"):
        eval_run.main(base + b + ["--regenerate"])
    monkeypatch.setattr(fake, "generate_batch", real_batch)
    calls.clear()
    eval_run.main(base + a)  # the images are still the first checkpoint's
    assert calls == []
    with pytest.raises(common.UsageError, match=r"--ckpt differs for 2 request"):
        eval_run.main(base + b)

    # killed outright after the first request's images: the record was never settled
    def killed(ckpt, requests, out_dir, **kw):
        if kw.get("check_only"):
            return real_batch(ckpt, requests, out_dir, **kw)
        real_batch(ckpt, requests[:1], out_dir, **kw)
        raise KeyboardInterrupt

    writes = []
    real_write = eval_run._write_record

    def pending_record_only(d, record):  # the process dies before it settles the record
        if not writes:
            real_write(d, record)
        writes.append(record)

    monkeypatch.setattr(eval_run, "_write_record", pending_record_only)
    monkeypatch.setattr(fake, "generate_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        eval_run.main(base + b + ["--regenerate"])
    monkeypatch.setattr(eval_run, "_write_record", real_write)
    monkeypatch.setattr(fake, "generate_batch", real_batch)
    assert "pending_since" in json.loads((images / eval_run.GENERATION_RECORD).read_text())["requests"]["00001"]
    with pytest.raises(common.UsageError, match=r"--ckpt differs for 1 request\(s\), e.g. 00001: the images were "
                                                rf"made with {re.escape(repr(str((tmp_path / 'b').resolve())))}"):
        eval_run.main(base + a)
    with pytest.raises(common.UsageError, match=r"--ckpt differs for 1 request\(s\), e.g. 00002: the images were "
                                                rf"made with {re.escape(repr(str((tmp_path / 'a').resolve())))}"):
        eval_run.main(base + b)
    # --regenerate resumes: 00001, already made with b's settings, is kept
    calls.clear()
    eval_run.main(base + b + ["--regenerate"])
    assert [[r["id"] for r in c["requests"]] for c in calls] == [["00002"]]
    with pytest.raises(common.UsageError, match="cannot go with --judge-only"):
        eval_run.main(base[:-1] + ["--judge-only", "--regenerate"])


def test_run_judge_only_checks_the_record(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    out = tmp_path / "out"
    common_args = ["--bench", "geneval_pp", "--out", str(out), "--geneval-pp-prompts", str(gpp)]
    eval_run.main(common_args + ["--ckpt", str(tmp_path / "a"), "--generate-only"])
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as s:
        # another --ckpt named: refused (the scores would be reported under it)
        with pytest.raises(common.UsageError, match=r"--ckpt differs.*use --regenerate \(without --judge-only\)"):
            eval_run.main(common_args + ["--judge-only", "--ckpt", str(tmp_path / "b"), *judge_args(s)])
        assert s.calls(CHAT) == []
        # settings not given are not checked; the judged results name the record
        rep = eval_run.main(common_args + ["--judge-only", *judge_args(s)])
        assert rep["complete"] and rep["benchmarks"]["geneval_pp"]["summary"]["score"] == 1.0
    res = json.loads((out / "geneval_pp" / "results.json").read_text())
    assert res["source"]["generation_record"] == str(out / "geneval_pp" / "images" / eval_run.GENERATION_RECORD)


# ------------------------------------------------------------------------------------------------
# incomplete runs: exit status 1, marked INCOMPLETE, no score when nothing was judged
# ------------------------------------------------------------------------------------------------

def _down(req):
    raise RuntimeError("judge server down")  # the fake server answers HTTP 500


def test_every_judge_call_failing_is_incomplete_without_a_score(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "gpp.jsonl", _gpp_rows()[:3])
    images, out = tmp_path / "images", tmp_path / "out"
    for line in (1, 2, 3):
        write_png(images / f"{line:05d}_0.png", line)
    with FakeOpenAIServer(chat_handler=_down) as s:
        argv = ["--images", str(images), "--prompts", str(prompts), "--out", str(out),
                *judge_args(s, "--max-retries", "1")]
        capsys.readouterr()
        assert common.run_cli(geneval_pp.main, argv) == 1
        cap = capsys.readouterr()
        assert len(s.calls(CHAT)) == 3 * 2
    assert "score – " in cap.out and "INCOMPLETE" in cap.out and "3 judge failures" in cap.out
    err = [x for x in cap.err.strip().splitlines() if not x.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("incomplete: none of the 3 images could be judged (0 missing, 0 "
                                               "unreadable, 3 judge failures): there is no score. Run the same "
                                               "command again: judge failures are asked again")
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and res["summary"]["score"] is None and res["summary"]["n_judged"] == 0
    md = (out / "summary.md").read_text()
    assert md.splitlines()[2].startswith("**INCOMPLETE: none of the 3 images could be judged")
    ours = next(line for line in md.splitlines() if line.startswith("| **ours**"))
    assert ours.endswith("| – |")  # no overall
    # nor per tag (it showed 0.000 beside the overall's "–")
    assert "0.000" not in ours and all(v["accuracy"] is None for v in res["summary"]["tags"].values())
    assert "INCOMPLETE" in (out / "gallery.html").read_text()

    # the server is back: the rerun judges the failed images (nothing was cached), then exits 0
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as s:
        argv = ["--images", str(images), "--prompts", str(prompts), "--out", str(out), *judge_args(s)]
        assert common.run_cli(geneval_pp.main, argv) == 0
        assert len(s.calls(CHAT)) == 3
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and res["summary"]["score"] == 1.0
    assert "INCOMPLETE" not in (out / "summary.md").read_text()


@pytest.mark.parametrize("fault", ["http400", "http429", "bad_base_url"])
def test_judge_faults_give_exit_status_1(tmp_path, fault, capsys):
    prompts = write_jsonl(tmp_path / "ib.jsonl", [{"id": i, "instruction": f"I{i}", "note": "n", "type": "COLOR"}
                                                  for i in (1, 2)])
    images, out = tmp_path / "images", tmp_path / "out"
    for i in (1, 2):
        write_png(images / f"{i:05d}_0.png", i)
    with FakeOpenAIServer(chat_handler=lambda r: _imagine_answer(5, 5, 5)) as s:
        extra = ["--max-retries", "1"]
        if fault == "http400":
            s.push(CHAT, Reply.status(400))  # one image: a partial result
        elif fault == "http429":
            s.push(CHAT, *[Reply.status(429, retry_after_ms=1)] * 4)
        args = judge_args(s, *extra)
        if fault == "bad_base_url":
            args[1] = "http://127.0.0.1:9/v1"  # nothing listens there
        assert common.run_cli(imagine_bench.main, ["--images", str(images), "--prompts", str(prompts), "--out",
                                                   str(out), *args]) == 1
    res = json.loads((out / "results.json").read_text())
    sm = res["summary"]
    if fault == "http400":
        assert sm["n_judge_failures"] == 1 and sm["overall"] == pytest.approx(5.0 / 2)  # judged one, failure 0
        assert "**INCOMPLETE: 1 of 2 images could not be judged" in (out / "summary.md").read_text()
    else:
        assert sm["n_judge_failures"] == 2 and sm["overall"] is None and sm["overall_official_script"] is None
        assert sm["categories"]["Attribute shift"]["score"] is None and sm["types"]["COLOR"]["score"] is None
    assert "incomplete: " in capsys.readouterr().err


def test_mistyped_images_folder_exits_1_and_run_marks_it(tmp_path, capsys):
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1}') as s:
        assert common.run_cli(geneval_pp.main, ["--images", str(tmp_path / "imgaes"), "--prompts", str(gpp),
                                                "--out", str(tmp_path / "o1"), *judge_args(s)]) == 1
        res = json.loads((tmp_path / "o1" / "results.json").read_text())
        assert res["summary"]["score"] is None and res["missing_images"] == ["00001_0.png", "00002_0.png"]
        # eval.run --judge-only on an output folder without images
        capsys.readouterr()
        argv = ["--judge-only", "--bench", "geneval_pp", "--out", str(tmp_path / "o2"),
                "--geneval-pp-prompts", str(gpp), *judge_args(s)]
        assert common.run_cli(eval_run.main, argv) == 1
        assert s.calls(CHAT) == []
    cap = capsys.readouterr()
    assert "geneval_pp: score=–" in cap.out and cap.out.rstrip().endswith("INCOMPLETE")
    assert cap.err.strip().splitlines()[-1].startswith(
        "incomplete: geneval_pp: none of the 2 images could be judged (2 missing, 0 unreadable, 0 judge failures): "
        "there is no score. Run the same command again once the missing or unreadable images are in place")
    md = (tmp_path / "o2" / "summary.md").read_text()
    assert "**INCOMPLETE: geneval_pp (see below)" in md
    rep = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert rep["complete"] is False and rep["benchmarks"]["geneval_pp"]["complete"] is False


def test_unreadable_image_is_listed_as_unreadable(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "gpp.jsonl", _gpp_rows()[:2])
    images, out = tmp_path / "images", tmp_path / "out"
    write_png(images / "00001_0.png", 1)
    images.joinpath("00002_0.png").write_bytes(solid_png()[:30])  # a write cut short
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as s:
        assert common.run_cli(geneval_pp.main, ["--images", str(images), "--prompts", str(prompts), "--out",
                                                str(out), *judge_args(s)]) == 1
        assert len(s.calls(CHAT)) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["missing_images"] == [] and [u["id"] for u in res["unreadable_images"]] == ["00002_0"]
    assert res["unreadable_images"][0]["error"].startswith("cannot read image")
    sm = res["summary"]
    assert (sm["n_missing"], sm["n_unreadable"], sm["n_judged"]) == (0, 1, 1)
    assert sm["score"] == pytest.approx(0.5)  # counted as a failure
    md = (out / "summary.md").read_text()
    assert "## Missing images" not in md and "## Unreadable images (1)" in md
    line = next(x for x in md.splitlines() if "00002_0" in x and x.startswith("- "))
    assert line.startswith("- `../images/00002_0.png` (`00002_0`): cannot read image"), line
    assert "UNREADABLE" in (out / "gallery.html").read_text()


def test_interrupt_while_judging_is_one_line(tmp_path, monkeypatch, capsys):
    prompts = write_jsonl(tmp_path / "gpp.jsonl", _gpp_rows()[:1])
    write_png(tmp_path / "images" / "00001_0.png")

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Judge, "judge_many", interrupted)
    capsys.readouterr()
    rc = common.run_cli(geneval_pp.main, ["--images", str(tmp_path / "images"), "--prompts", str(prompts),
                                          "--out", str(tmp_path / "o"), "--no-progress"])
    err = _stderr_lines(capsys)
    assert rc == 130 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("interrupted: ") and "judge cache" in err[0] and "run the same command again" in err[0]


# ------------------------------------------------------------------------------------------------
# bad input files and arguments: one line naming file, line and key; exit status 2
# ------------------------------------------------------------------------------------------------

def _stderr_lines(capsys) -> list[str]:
    """stderr without the notes that a prompt file differs from the released one (test files do)."""
    return [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("note: ")]


def _one_error_line(capsys, main_fn, argv) -> str:
    capsys.readouterr()
    rc = common.run_cli(main_fn, argv)
    err = _stderr_lines(capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0][len("error: "):]


@pytest.mark.parametrize("bad,message", [
    ("{not json", r"gpp.jsonl:2: not JSON: "),
    ({"tag": "counting", "prompt": "P", "include": [{"class": "cow"}]}, r"gpp.jsonl:2: include\[0\] has no 'count'"),
    ({"tag": "counting", "prompt": "P", "include": "cow"}, r"gpp.jsonl:2: 'include' must be a non-empty list"),
    ({"tag": "counting", "prompt": "P", "include": [{"class": "cow", "count": "two"}]},
     r"gpp.jsonl:2: include\[0\].count must be an integer >= 1, got 'two'"),
    ({"tag": "counting", "prompt": "P", "include": [{"class": "cow", "count": 2}], "exclude": [{"count": 3}]},
     r"gpp.jsonl:2: exclude\[0\] has no 'class'"),
    ([1, 2], r"gpp.jsonl:2: expected a JSON object, got list"),
    ({"tag": "counting", "prompt": "P", "include": [{"class": "cow", "count": 2, "colour": "red"}]},
     r"gpp.jsonl:2: include\[0\] has unknown key\(s\) \['colour'\]; expected class, count, color, size, region"),
])
def test_geneval_pp_bad_prompt_file(tmp_path, capsys, bad, message):
    p = tmp_path / "gpp.jsonl"
    p.write_text(json.dumps(_gpp_rows()[0]) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    msg = _one_error_line(capsys, geneval_pp.main, ["--images", str(tmp_path), "--prompts", str(p),
                                                    "--out", str(tmp_path / "o")])
    assert re.search(message, msg) and str(p) in msg, msg
    assert not (tmp_path / "o").exists()


def test_geneval_pp_tags_not_its_own_are_noted(tmp_path, capsys):
    """A misspelt tag counts as one more tag in the mean of tag accuracies: loaded, with a note naming it."""
    p = write_jsonl(tmp_path / "gpp.jsonl", [_gpp_rows()[0], {**_gpp_rows()[1], "tag": "colour_attr"}])
    items = geneval_pp.load_items(p)
    assert [i.tag for i in items] == ["color_attr", "colour_attr"]
    assert capsys.readouterr().err.startswith(f"note: {p}: tag(s) ['colour_attr'] are not GenEval++'s (color_attr, ")


def test_run_checks_every_prompt_file_before_generating(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    bench = _two_benches(tmp_path, gpp_rows=[{"tag": "counting", "prompt": "P", "include": [{"class": "cow"}]}])
    msg = _one_error_line(capsys, eval_run.main, ["--ckpt", str(tmp_path / "c"), "--bench", "imagine_bench,geneval_pp",
                                                  "--out", str(tmp_path / "o"), "--benchmarks-dir", str(bench)])
    assert msg == f"{bench / 'geneval_pp.jsonl'}:1: include[0] has no 'count'" and calls == []


@pytest.mark.parametrize("lines,message", [
    (['{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}', '', '{"id": 2, "instr'],
     r"ib.jsonl:3: not JSON: "),
    (['{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}', '{"id": "three", "instruction": "I", '
      '"note": "n", "type": "COLOR"}'], r"ib.jsonl:2: 'id' must be an integer .*got 'three'"),
    (['{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}', '', '',
      '{"id": 2, "note": "n", "type": "COLOR"}'], r"ib.jsonl:4: no 'instruction' field"),
    (['{"id": 7, "instruction": "I", "note": "n", "type": "COLOR"}', '',
      '{"id": 7, "instruction": "J", "note": "n", "type": "COLOR"}'], r"ib.jsonl:3: duplicate id 7 \(also on line 1\)"),
    # a type outside the 8 would count in no category weight: silently dropped from the overall score
    (['{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}', '{"id": 31, "instruction": "I", "note": "n", '
      '"type": "Shape"}'], r"ib.jsonl:2: unknown type 'Shape' \(Imagine-Bench's: COLOR, SHAPE, SIZE, MATERIAL, "
     r"COMBINATION, TIME, ENVIRONMENT, Multi-Object\)$"),
])
def test_imagine_bench_bad_prompt_file(tmp_path, capsys, lines, message):
    p = tmp_path / "ib.jsonl"
    p.write_text("\n".join(lines) + "\n")
    msg = _one_error_line(capsys, imagine_bench.main, ["--images", str(tmp_path), "--prompts", str(p),
                                                       "--out", str(tmp_path / "o")])
    assert re.search(message, msg) and msg.startswith(str(p)), msg


def test_bad_base_url_is_one_line_before_anything(tmp_path, capsys):
    """eval.run and the benchmark commands refuse a --base-url that is no http(s) URL or carries a query
    (the client would append its paths after it: every call a 404), before any file is made and without
    showing credentials: a URL without a scheme went into results.json with its userinfo."""
    prompts = write_jsonl(tmp_path / "ib.jsonl", [{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}])
    for url, want in [("user:SECRET-1@127.0.0.1:8000/v1", "--base-url: expected an http(s) URL with a host, such "
                       "as http://127.0.0.1:8000/v1, got '***@127.0.0.1:8000/v1'"),
                      ("http://127.0.0.1:8000/v1?api-key=SECRET-1", "--base-url: 'http://127.0.0.1:8000/v1' carries "
                       "a query or fragment ('?...' / '#...'), which the client would put before its endpoint "
                       "paths; give the base URL alone (an API key is read from the environment: --api-key-env)")]:
        out = tmp_path / "o"
        assert _one_error_line(capsys, eval_run.main, [
            "--judge-only", "--bench", "imagine_bench", "--out", str(out), "--imagine-bench-prompts", str(prompts),
            "--base-url", url, "--no-api-key"]) == want
        assert _one_error_line(capsys, imagine_bench.main, [
            "--images", str(tmp_path), "--prompts", str(prompts), "--out", str(out), "--base-url", url]) == want
        assert not out.exists()


def test_bad_template_file_is_one_line(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "ib.jsonl", [{"id": 1, "instruction": "I", "note": "n", "type": "COLOR"}])
    t = tmp_path / "mine.txt"
    t.write_text("# parser: dimension_scores\n[user]\n{{prompt}}\n")
    msg = _one_error_line(capsys, imagine_bench.main, ["--images", str(tmp_path), "--prompts", str(prompts),
                                                       "--out", str(tmp_path / "o"), "--template", str(t)])
    assert msg == f"{t}: header line '# version: ...' is required"
    t.write_text("# version: 1\n# parser: verdict_json\n# max_tokens: lots\n[user]\nx\n")
    msg = _one_error_line(capsys, eval_run.main, ["--judge-only", "--bench", "imagine_bench", "--out",
                                                  str(tmp_path / "o"), "--imagine-bench-prompts", str(prompts),
                                                  "--template", f"imagine_bench={t}"])
    assert msg == f"{t}: '# max_tokens: lots' must be a positive integer"


def test_omnicontext_bad_manifest(tmp_path, capsys):
    data = tmp_path / "oc"
    write_png(data / "a.png")
    rec = {"key": "k", "task_type": "multiple_object", "instruction": "i", "input_images": ["a.png"]}
    manifest = data / "manifest.json"
    manifest.write_text("[\n" + json.dumps(rec) + ",\n" + json.dumps(rec)[:-1] + "\n]\n")  # second record unclosed
    argv = ["--images", str(tmp_path), "--data", str(manifest), "--out", str(tmp_path / "o")]
    msg = _one_error_line(capsys, omnicontext.main, argv)
    assert msg.startswith(f"{manifest}:4: not JSON (column "), msg
    manifest.write_text(json.dumps([rec, {**rec, "key": "k2", "input_images": None}]))
    assert _one_error_line(capsys, omnicontext.main, argv) == (
        f"{manifest}: record 2: no 'input_images' (a record needs key, task_type, instruction and input_images)")
    manifest.write_text(json.dumps([rec, {**rec, "task_type": "multi_object"}]))  # a misspelt task: in no group
    assert _one_error_line(capsys, omnicontext.main, argv) == (
        f"{manifest}: record 2: task_type 'multi_object' is not one of OmniContext's tasks single_character, "
        "single_object, multiple_character, multiple_object, multiple_character_object, scene_character, "
        "scene_object, scene_character_object")
    jl = write_jsonl(data / "metadata.jsonl", [rec, {**rec, "instruction": "other"}])
    assert re.fullmatch(rf"{re.escape(str(jl))}:2: \(task_type, key\) = \('multiple_object', 'k'\) is already used "
                        rf"by {re.escape(str(jl))}:1; .*", _one_error_line(capsys, omnicontext.main,
                                                                          argv[:2] + ["--data", str(data)] + argv[4:]))
    # an input image cut short: named with its sample (it was reported as the generated image being unreadable,
    # with the advice to regenerate it)
    (data / "b.png").write_bytes((data / "a.png").read_bytes()[:30])
    manifest.write_text(json.dumps([rec, {**rec, "key": "k2", "input_images": ["a.png", "b.png"]}]))
    assert _one_error_line(capsys, omnicontext.main, argv).startswith(
        f"{manifest}: input image {data / 'b.png'} of sample 'k2' (multiple_object): cannot read image")


@pytest.mark.parametrize("flag,value,why", [
    ("--limit", "-1", "must be at least 1"), ("--limit", "0", "must be at least 1"),
    ("--num-images", "0", "must be at least 1"), ("--limit", "2.5", "expected an integer"),
    # judge options: once clamped without a word (--concurrency 0, --max-retries -3), failing every call
    # (--timeout 0), crashing in a retry (a negative backoff) or calling every image unreadable
    ("--concurrency", "0", "must be at least 1"), ("--max-retries", "-3", "must be at least 0"),
    ("--malformed-retries", "-1", "must be at least 0"), ("--client-max-retries", "-1", "must be at least 0"),
    ("--timeout", "0", "must be greater than 0"), ("--timeout", "nan", "expected a number"),
    ("--backoff-base", "-1", "must be at least 0"), ("--backoff-max", "-1", "must be at least 0"),
    ("--max-image-pixels", "-5", "must be at least 0")])
def test_out_of_range_options_are_refused(tmp_path, capsys, flag, value, why):
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:3])
    data = tmp_path / "oc"
    write_png(data / "a.png")
    write_jsonl(data / "metadata.jsonl", [{"key": "k", "task_type": "single_object", "instruction": "i",
                                           "input_images": ["a.png"]}])
    for main_fn, argv in [(geneval_pp.main, ["--images", str(tmp_path), "--prompts", str(gpp)]),
                          (imagine_bench.main, ["--images", str(tmp_path), "--prompts", str(gpp)]),
                          (omnicontext.main, ["--images", str(tmp_path), "--data", str(data)]),
                          (eval_run.main, ["--judge-only", "--bench", "geneval_pp", "--geneval-pp-prompts", str(gpp)])]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as ei:
            main_fn(argv + ["--out", str(tmp_path / "o"), flag, value])
        assert ei.value.code == 2
        assert f"argument {flag}: {why}, got {value if why.startswith('must') else repr(value)}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(common.UsageError, match="limit -1: must be a positive integer"):
        geneval_pp.load_items(gpp, -1)
    assert len(geneval_pp.load_items(gpp, 2)) == 2


# ------------------------------------------------------------------------------------------------
# the API key: never in outputs (also when the judge repeats it); checked before generation
# ------------------------------------------------------------------------------------------------

def test_key_in_the_judge_answer_reaches_no_output(tmp_path):
    prompts = write_jsonl(tmp_path / "gpp.jsonl", _gpp_rows()[:1])
    write_png(tmp_path / "images" / "00001_0.png")
    out = tmp_path / "out"
    answer = json.dumps({"correct": 1, "reason": f"the request said Bearer {SECRET}, key {SECRET}"})
    with FakeOpenAIServer(chat_handler=lambda r: answer) as s:
        doc = geneval_pp.main(["--images", str(tmp_path / "images"), "--prompts", str(prompts), "--out", str(out),
                               *judge_args(s)])
    assert doc["items"][0]["status"] == "pass" and "[REDACTED]" in doc["items"][0]["reason"]
    assert SECRET not in json.dumps(doc)
    assert_no_secret(out)


def test_run_checks_the_key_before_generating(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:2])
    out = tmp_path / "out"
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as s:
        argv = ["--ckpt", str(tmp_path / "c"), "--bench", "geneval_pp", "--out", str(out),
                "--geneval-pp-prompts", str(gpp), *judge_args(s)]
        monkeypatch.delenv("OPENAI_API_KEY")
        assert "OPENAI_API_KEY is not set" in _one_error_line(capsys, eval_run.main, argv)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET + "\n")  # pasted with its newline
        msg = _one_error_line(capsys, eval_run.main, argv)
        assert "holds a newline" in msg and SECRET not in msg
        assert calls == [] and not out.exists()
        # generating only needs no key; nor does judging against a server without authentication
        monkeypatch.delenv("OPENAI_API_KEY")
        eval_run.main(argv + ["--generate-only"])
        assert len(calls) == 1
        rep = eval_run.main(argv + ["--no-api-key"])
        assert rep["complete"] and len(s.calls(CHAT)) == 2 and len(calls) == 1
        # nothing to generate, every answer cached: no key needed either
        assert eval_run.main(argv)["judge_stats"]["cache_hits"] == 2


# ------------------------------------------------------------------------------------------------
# OmniContext with fewer than the 8 tasks
# ------------------------------------------------------------------------------------------------

def test_omnicontext_overall_names_the_tasks_present(tmp_path, capsys):
    data, images = tmp_path / "oc", tmp_path / "gen"
    rows = []
    for task in ("multiple_object", "scene_object"):
        write_png(data / f"{task}.png")
        rows.append({"key": "k", "task_type": task, "instruction": f"i {task}", "input_images": [f"{task}.png"]})
        write_png(images / f"{task}__k_0.png")
    write_jsonl(data / "metadata.jsonl", rows)
    with FakeOpenAIServer(chat_handler=lambda r: '{"score": 4, "reasoning": "r"}') as s:
        capsys.readouterr()
        assert common.run_cli(omnicontext.main, ["--images", str(images), "--data", str(data), "--out",
                                                 str(tmp_path / "o"), *judge_args(s)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("OmniContext overall (2 tasks) 4.000, Echo-4o avg (MULTIPLE, SCENE) 4.000;"), line
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| Overall (8 tasks; this run: 2) |" in md and "not all 8 task types present (this run has 2)" in md
    assert "Overall (2 tasks)" in (tmp_path / "o" / "gallery.html").read_text()


def test_run_omnicontext_generates_as_echo4o_script(tmp_path, monkeypatch):
    """eval.run --bench omnicontext generates with Echo-4o's OmniContext settings: image scale 1.5 and the ViT
    transform (980, 378) (--gen-arg wins), output size = the FIRST input image under the VAE rule (max side
    1024, min 512, multiples of 16; --size wins)."""
    from PIL import Image

    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    data = tmp_path / "oc"
    data.mkdir()
    # first images (w x h): 300 x 200 -> min side up to 512: 768 x 512; 2048 x 1536 -> max side down to 1024:
    # 1024 x 768 (both multiples of 16); the last image, 64 x 64, is not what sizes the output
    for name, wh in (("a.png", (300, 200)), ("b.png", (2048, 1536)), ("c.png", (64, 64))):
        Image.new("RGB", wh).save(data / name)
    write_jsonl(data / "metadata.jsonl", [
        {"key": "1", "task_type": "multiple_object", "instruction": "i1", "input_images": ["a.png", "c.png"]},
        {"key": "2", "task_type": "scene_object", "instruction": "i2", "input_images": ["b.png", "c.png"]}])
    out = tmp_path / "out"
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "omnicontext", "--omnicontext-data", str(data),
            "--out", str(out), "--generate-only"]
    eval_run.main(argv)
    (call,) = calls
    assert call["overrides"] == {"cfg_img_scale": 1.5, "vit_transform": [980, 378], "crop_to_bbox": True}
    assert [tuple(r["size"]) for r in call["requests"]] == [(512, 768), (768, 1024)]
    calls.clear()
    eval_run.main(argv + ["--regenerate", "--size", "256x256", "--gen-arg", "cfg_img_scale=2.0"])  # generate's form
    assert calls[0]["overrides"] == {"cfg_img_scale": 2.0, "vit_transform": [980, 378], "crop_to_bbox": True}
    assert [tuple(r["size"]) for r in calls[0]["requests"]] == [(256, 256), (256, 256)]
    calls.clear()  # another VAE resize rule sizes the output by that rule: 300 x 200 under (512, 256) -> 384 x 256
    eval_run.main(argv + ["--regenerate", "--gen-arg", "vae_transform=[512, 256]"])
    assert [tuple(r["size"]) for r in calls[0]["requests"]] == [(256, 384), (384, 512)]
    assert calls[0]["overrides"] == {"cfg_img_scale": 1.5, "vit_transform": [980, 378], "vae_transform": [512, 256],
                                         "crop_to_bbox": True}
    with pytest.raises(common.UsageError, match=r"--gen-arg vae_transform=\[512\]: expected \[MAX, MIN\]"):
        eval_run.main(argv + ["--regenerate", "--gen-arg", "vae_transform=[512]"])


def test_run_size_takes_generates_form_and_h_w():
    assert eval_run._parse_size(["256x128"]) == eval_run._parse_size(["256", "128"]) == (256, 128)
    for bad in (["256"], ["256x0"], ["a", "b"], ["1", "2", "3"]):
        with pytest.raises(common.UsageError, match=r"--size .*: expected HxW \(or H W\)"):
            eval_run._parse_size(bad)
