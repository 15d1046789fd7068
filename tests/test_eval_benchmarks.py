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
from fake_openai import FakeOpenAIServer, message_images, message_text, solid_png

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
        assert (sc_scene if is_sc else pf_scene) == task.startswith("scene")
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

    def generate_batch(ckpt, requests, out_dir, *, regenerate=False, **overrides):
        calls.append({"ckpt": ckpt, "requests": requests, "out_dir": out_dir, "overrides": overrides,
                      "regenerate": regenerate})
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
        g = calls[0]
        assert g["out_dir"] == str(out / "geneval_pp" / "images") and g["overrides"] == {"cfg_text_scale": 4.0,
                                                                                           "note": "plain"}
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

        # --regenerate reaches generate_batch (which otherwise skips its finished requests)
        calls.clear()
        eval_run.main(argv + ["--regenerate", "--generate-only"])
        assert [(len(c["requests"]), c["regenerate"]) for c in calls] == [(3, True), (3, True)]
        assert calls[0]["overrides"] == {"cfg_text_scale": 4.0, "note": "plain"}
    assert_no_secret(out)


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
    msg = ("output size 1024x1024 exceeds the model's position table (8 x 16 = 128 px per side); lower the "
           "size / the resize transform")
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate",
                        _fake_generate_module(calls, error=real_generate.GenerateError(msg)))
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:1])
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(tmp_path / "o"),
            "--geneval-pp-prompts", str(gpp), "--generate-only"]
    capsys.readouterr()
    assert common.run_cli(eval_run.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [geneval_pp] generation failed: {msg}"
    assert not any("Traceback" in line for line in err) and len(calls) == 1


def test_run_generation_error_from_the_real_generator(golden_dir, tmp_path, capsys):
    """The real generate_batch on the tiny golden checkpoint (it has no tokenizer: text prompts fail)."""
    gpp = write_jsonl(tmp_path / "geneval_pp.jsonl", _gpp_rows()[:1])
    capsys.readouterr()
    rc = common.run_cli(eval_run.main, ["--ckpt", str(golden_dir), "--bench", "geneval_pp", "--out",
                                        str(tmp_path / "o"), "--geneval-pp-prompts", str(gpp), "--generate-only"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: [geneval_pp] generation failed: ") and "tokenizer" in err


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
