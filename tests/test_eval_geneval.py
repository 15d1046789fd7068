"""GenEval (the detector-scored original): prompt file checks, the layout the official evaluator reads, reading
its results back, the official summary formula, and eval.run --bench geneval (no judge, no API key).

The official evaluator (mmdet + CLIP) cannot run here; `_official_walk` follows its `main()` (how it finds the
images and their metadata, and the fields it writes), with the verdicts given by the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo4o_jax.eval import common, geneval, run as eval_run
from fake_openai import FakeOpenAIServer
from test_eval_benchmarks import BENCH_DIR, _fake_generate_module, _gpp_rows, judge_args, needs_bench, write_jsonl

ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
]


@pytest.fixture(autouse=True)
def _our_judge_prompts(monkeypatch):  # (no official script here: the judged runs use our templates)
    monkeypatch.setattr(common, "DEFAULT_JUDGE_PROMPTS", "ours")


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _official_walk(imagedir: Path, verdict) -> list[dict]:
    """What evaluation/evaluate_images.py's main() writes for `imagedir` (one dict per image; `verdict(path,
    metadata)` stands in for the detector): folders whose name is digits, `metadata.jsonl` read with json.load,
    images `samples/\\d+.png`."""
    rows = []
    for sub in os.listdir(imagedir):
        folder = os.path.join(imagedir, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for name in os.listdir(os.path.join(folder, "samples")):
            path = os.path.join(folder, "samples", name)
            if not os.path.isfile(path) or not re.match(r"\d+\.png", name):
                continue
            ok = verdict(path, metadata)
            rows.append({"filename": path, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": ok,
                         "reason": "" if ok else "expected more", "metadata": json.dumps(metadata), "details": "{}"})
    return rows


def _write_results(path: Path, rows) -> Path:
    # pandas' to_json(orient="records", lines=True) escapes '/' as '\/': so does this
    path.write_text("".join(json.dumps(r).replace("/", "\\/") + "\n" for r in rows))
    return path


def _images(d: Path, n_items: int, num_images: int, skip=()) -> None:
    for i in range(n_items):
        for k in range(num_images):
            if (i, k) not in skip:
                _png(d / f"{i:05d}_{k}.png", 10 * i + k)


def test_layout_results_and_the_official_formula(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "meta.jsonl", ROWS)
    images, out = tmp_path / "images", tmp_path / "out"
    _images(images, len(ROWS), 2, skip={(3, 1)})
    Image.open(images / "00002_1.png").convert("RGB").save(images / "00002_1.jpg")  # a JPEG is converted
    (images / "00002_1.png").unlink()
    argv = ["--images", str(images), "--prompts", str(prompts), "--out", str(out), "--num-images", "2"]

    doc = geneval.main(argv)  # no detector results yet: laid out, not scored
    assert not doc["complete"] and doc["summary"]["overall"] is None
    assert all(v["accuracy"] is None for v in doc["summary"]["tasks"].values())
    assert doc["incomplete"].startswith("not scored: 7 of 8 images laid out") and "evaluate_images.py" in \
        doc["incomplete"]
    layout = out / "layout"
    assert sorted(p.name for p in layout.iterdir()) == ["00000", "00001", "00002", "00003"]
    for i, row in enumerate(ROWS):
        meta = json.loads((layout / f"{i:05d}" / "metadata.jsonl").read_text())
        shas = meta.pop(geneval.SAMPLES_KEY)
        assert meta == row and sorted(shas) == (["0000.png"] if i == 3 else ["0000.png", "0001.png"])
        for name, sha in shas.items():
            assert sha == hashlib.sha256((layout / f"{i:05d}" / "samples" / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in (layout / "00003" / "samples").iterdir()) == ["0000.png"]
    with Image.open(layout / "00002" / "samples" / "0001.png") as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (21, 21, 21)
    assert os.path.samefile(layout / "00000" / "samples" / "0001.png", images / "00000_1.png")  # a hard link

    # the detector's verdicts (by image): the official formula computed here from the rows it wrote
    wrong = {("00001", 0), ("00002", 0), ("00002", 1), ("00003", 0)}

    def verdict(path, metadata):
        p = Path(path)
        return (p.parent.parent.name, int(p.stem)) not in wrong

    rows = _official_walk(layout, verdict)
    assert len(rows) == 7
    _write_results(out / geneval.DETECTOR_RESULTS, rows)
    capsys.readouterr()
    doc = geneval.main(argv)
    s = doc["summary"]
    # one image missing (counts as incorrect): single 2/2, two_object 1/2, counting 0/2, position 0/2
    assert [(t, v["n"], v["n_correct"]) for t, v in s["tasks"].items()] == [
        ("single_object", 2, 2), ("two_object", 2, 1), ("counting", 2, 0), ("position", 2, 0)]
    assert s["overall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert (s["n_images"], s["n_scored"], s["n_missing"], s["n_unscored"]) == (8, 7, 1, 0)
    assert s["correct_prompts"] == pytest.approx(2 / 4) and s["correct_images"] == pytest.approx(3 / 8)
    assert not doc["complete"] and doc["missing_images"] == ["00003_1.png"] and doc["results_problems"] == []
    assert "INCOMPLETE" in capsys.readouterr().out

    # the missing image generated: laid out, but without a result until the evaluator runs again
    _png(images / "00003_1.png", 99)
    doc = geneval.main(argv)
    assert (doc["summary"]["n_scored"], doc["summary"]["n_unscored"]) == (7, 1) and not doc["complete"]
    _write_results(out / geneval.DETECTOR_RESULTS, _official_walk(layout, verdict))
    doc = geneval.main(argv)
    assert doc["complete"] and doc["incomplete"] is None
    assert doc["summary"]["overall"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    md = (out / "summary.md").read_text()
    assert "| Echo-4o (paper; likely rewritten prompts)" in md and "INCOMPLETE" not in md
    # which prompts (the paper rows differ by it): GenEval's templated ones here
    assert doc["prompt_variant"] == "short" and "Prompts: **short**: GenEval's own templated prompts" in md
    assert "comparable paper row is BAGEL (paper) 0.82" in md

    # an image generated again after scoring: its old result no longer counts (the others do)
    _png(images / "00000_1.png", 123)
    doc = geneval.main(argv)
    assert doc["summary"]["n_unscored"] == 1 and doc["items"][1]["status"] == "unscored"
    assert len(doc["results_problems"]) == 1 and "scored on another image" in doc["results_problems"][0]

    # fewer images per prompt: the layout holds exactly those (no stale samples); the other results are ignored
    doc = geneval.main(argv[:-2] + ["--num-images", "1"])
    assert sorted(p.name for p in (layout / "00000" / "samples").iterdir()) == ["0000.png"]
    assert doc["complete"] and doc["results_lines_ignored"] == 4 and doc["results_problems"] == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".layout")) == [".layout.lock"]


def test_results_of_another_layout_or_prompt_file_score_nothing(tmp_path):
    prompts = write_jsonl(tmp_path / "meta.jsonl", ROWS[:2])
    items = geneval.load_items(prompts)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _images(ours, 2, 1)
    for i in range(2):
        _png(theirs / f"{i:05d}_0.png", 200 + i)  # another model's images of the same prompts
    geneval.evaluate(items, theirs, None, tmp_path / "t", num_images=1)
    foreign = _official_walk(tmp_path / "t" / "layout", lambda p, m: True)
    out = tmp_path / "out"
    results = _write_results(tmp_path / "results.jsonl", foreign)
    doc = geneval.evaluate(items, ours, None, out, num_images=1, detector_results=results)
    assert doc["summary"]["n_unscored"] == 2 and doc["summary"]["overall"] is None and not doc["complete"]
    assert len(doc["results_problems"]) == 2 and all("scored on another image" in p for p in doc["results_problems"])
    # another prompt file, a line twice, lines not in the evaluator's format: problems, never an exception
    geneval.evaluate(items, ours, None, out, num_images=1)
    rows = _official_walk(out / "layout", lambda p, m: True)
    other = [dict(r, metadata=json.dumps(dict(json.loads(r["metadata"]), prompt="another"))) for r in rows]
    for bad, why in [(other, "other metadata than prompt"), (rows + rows[:1], "is scored again (first at line"),
                     ([dict(rows[0], correct="yes"), rows[1]], "not a line of GenEval's evaluate_images.py output"),
                     ([{"tag": "x"}, rows[1]], "not a line of GenEval's evaluate_images.py output")]:
        _write_results(results, bad)
        doc = geneval.evaluate(items, ours, None, out, num_images=1, detector_results=results)
        assert any(why in p for p in doc["results_problems"]), (why, doc["results_problems"])
        assert doc["summary"]["n_scored"] < 2 and not doc["complete"]
        assert why.split(" (")[0] in (out / "summary.md").read_text()
    with pytest.raises(common.UsageError, match="--detector-results .*: no such file"):
        geneval.evaluate(items, ours, None, out, num_images=1, detector_results=tmp_path / "absent.jsonl")
    doc = geneval.evaluate(items, tmp_path / "oursx", None, out, num_images=1)  # a mistyped images folder
    assert doc["summary"]["n_missing"] == 2 and doc["incomplete"] == (
        f"the images folder {tmp_path / 'oursx'} does not exist: all 2 images are missing (a mistyped --images?)")


def test_broken_image_is_left_out_and_evaluator_output_in_the_layout_is_kept(tmp_path):
    """The evaluator stops its whole run at an image it cannot read: such an image is not laid out but listed as
    unreadable. A results file the user wrote inside the layout folder survives the layout's rebuild."""
    prompts = write_jsonl(tmp_path / "meta.jsonl", ROWS[:2])
    items = geneval.load_items(prompts)
    images, out = tmp_path / "images", tmp_path / "out"
    _images(images, 2, 1)
    good = (images / "00001_0.png").read_bytes()
    (images / "00001_0.png").write_bytes(good[: len(good) // 2])  # cut short
    geneval.evaluate(items, images, None, out, num_images=1)
    layout = out / "layout"
    inside = _write_results(layout / "results.jsonl", _official_walk(layout, lambda p, m: True))
    doc = geneval.evaluate(items, images, None, out, num_images=1, detector_results=inside)
    assert inside.is_file() and not (layout / "00001" / "samples" / "0000.png").exists()
    assert [r["status"] for r in doc["items"]] == ["correct", "unreadable"]
    assert doc["unreadable_images"][0]["error"].startswith("RecordError: cannot read image")
    assert "## Unreadable images (1)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("bad, message", [
    ({"include": [{"class": "cat", "count": 1}], "prompt": "p"}, "no 'tag' string"),
    ({"tag": "t", "include": [], "prompt": "p"}, "'include' must be a non-empty list"),
    ({"tag": "t", "include": [{"class": "cat", "count": 0}], "prompt": "p"}, r"include\[0\]\.count: expected a count"),
    ({"tag": "t", "include": [{"count": 1}], "prompt": "p"}, r"include\[0\]: expected an object with a 'class'"),
    ({"tag": "t", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}],
      "prompt": "p"}, r"include\[1\]\.position: expected \[relation"),
    ({"tag": "t", "include": [{"class": "a", "count": 1, "position": ["above", 0]}], "prompt": "p"},
     r"include\[0\]\.position"),
    ({"tag": "t", "include": [{"class": "a", "count": 1}], "exclude": [{"class": "a", "count": True}],
      "prompt": "p"}, r"exclude\[0\]\.count"),
    ({"tag": "t", "include": [{"class": "a", "count": 1}], "exclude": {"class": "a", "count": 2}, "prompt": "p"},
     "'exclude' must be a list of objects"),
])
def test_bad_prompt_lines_are_named(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "meta.jsonl", [ROWS[0], bad])
    with pytest.raises(common.UsageError, match=re.escape(f"{f}:2: ") + message):
        geneval.load_items(f)


def _variant(prompts):
    return geneval.prompt_variant([geneval.Item(i, "single_object", t, {}) for i, t in enumerate(prompts)])


def test_prompt_variant_tells_short_from_rewritten_prompts():
    """Echo-4o's 0.89 comes from LLM-rewritten prompts, BAGEL's 0.82 from GenEval's templated ones: the results
    say which kind a run used."""
    assert _variant(["a photo of a bench", "A photo of two clocks"]) == "short"
    rewritten = ["A sturdy wooden bench stands alone in a quiet park at dusk.", "Two round clocks on a wall."]
    assert _variant(rewritten) == "rewritten" and _variant(rewritten + ["a photo of a cow"]) == "mixed"
    assert set(geneval.VARIANT_NOTES) == {"short", "rewritten", "mixed"}


@needs_bench
def test_public_prompt_file():
    path = BENCH_DIR / geneval.PROMPTS_FILE
    items = geneval.load_items(path)
    assert geneval.prompt_variant(items) == "short"  # GenEval's own file (the long one is the rewritten variant)
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    assert [it.metadata for it in items] == lines and [it.stem for it in items[:2]] == ["00000", "00001"]
    assert set(geneval.tag_order(it.tag for it in items)) == {t for t, _ in geneval.GENEVAL_TASKS}


def test_run_bench_geneval_needs_no_judge(tmp_path, monkeypatch, capsys):
    """eval.run --bench geneval: 4 images per prompt without image CFG, cfg_interval [0, 1] (--gen-arg wins), laid
    out for the evaluator without a judge or an API key; a rerun with --judge-only reads the detector's results."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    calls = []
    monkeypatch.setitem(sys.modules, "echo4o_jax.generate", _fake_generate_module(calls))
    bench = tmp_path / "bench"
    write_jsonl(bench / geneval.PROMPTS_FILE, ROWS[:3])
    out = tmp_path / "out"
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval", "--out", str(out), "--benchmarks-dir",
            str(bench), "--no-progress"]
    rep = eval_run.main(argv)
    (call,) = calls
    assert call["overrides"] == {"cfg_img_scale": 1.0, "cfg_interval": [0.0, 1.0], "crop_to_bbox": True}
    assert [(r["id"], r["seed"], r["num_images"]) for r in call["requests"]] == [
        ("00000", 42, 4), ("00001", 43, 4), ("00002", 44, 4)]
    entry = rep["benchmarks"]["geneval"]
    assert not rep["complete"] and entry["incomplete"].startswith("not scored: 12 of 12 images laid out")
    assert "judge_stats" not in rep and (out / "summary.md").read_text().startswith("# Evaluation of ckpt")
    layout = out / "geneval" / "layout"
    assert len(list(layout.glob("*/samples/*.png"))) == 12

    _write_results(out / "geneval" / geneval.DETECTOR_RESULTS,
                   _official_walk(layout, lambda p, m: m["tag"] != "counting"))
    rep = eval_run.main(argv[2:] + ["--judge-only"])
    entry = rep["benchmarks"]["geneval"]
    assert rep["complete"] and entry["summary"]["overall"] == pytest.approx(2 / 3)
    assert entry["prompt_variant"] == "short"
    source = json.loads((out / "geneval" / "results.json").read_text())["source"]
    assert source["prompts_md5"] == hashlib.md5((bench / geneval.PROMPTS_FILE).read_bytes()).hexdigest()
    assert "geneval: overall=0.6667" in capsys.readouterr().out

    # generated again with another seed, beside a judged benchmark: the old detector results no longer count
    # (listed, INCOMPLETE), and the run goes on: the judged benchmark is judged, the summaries are written
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as server:
        rep = eval_run.main(argv[:3] + ["geneval,geneval_pp"] + argv[4:] + ["--seed", "7", "--regenerate",
                                                                             *judge_args(server)])
    g, gpp = rep["benchmarks"]["geneval"], rep["benchmarks"]["geneval_pp"]
    assert g["summary"]["n_unscored"] == 12 and "scored on another image" in g["incomplete"]
    assert gpp["complete"] and gpp["summary"]["score"] == 1.0 and rep["judge_stats"]["api_calls"] == 2
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["geneval"]["complete"] is False

    calls.clear()
    capsys.readouterr()
    eval_run.main(argv + ["--gen-arg", "cfg_interval=[0.4, 1.0]", "--num-images", "1", "--regenerate",
                          "--generate-only"])
    assert f"geneval: 3 of 3 requests generated -> {out / 'geneval' / 'images'}" in capsys.readouterr().out
    assert calls[0]["overrides"] == {"cfg_img_scale": 1.0, "cfg_interval": [0.4, 1.0], "crop_to_bbox": True}
    assert calls[0]["requests"][0]["num_images"] == 1
    with pytest.raises(common.UsageError, match="--geneval-results .* needs --bench geneval"):
        eval_run.main(["--judge-only", "--bench", "geneval_pp", "--out", str(out), "--geneval-results", "x"])


def _user_files(layout: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in layout.iterdir() if p.is_file()}


def test_layout_rebuild_never_loses_what_the_user_put_there(tmp_path, monkeypatch):
    """The layout is rebuilt each run; files the user put in it (the evaluator's output) survive a Ctrl-C in the
    middle of the carry-over, a failed swap, a run killed between the two renames and a name taken by a
    prompt folder; results inside a prompt folder (rebuilt) are refused; one run at a time per folder."""
    import fcntl

    items = geneval.load_items(write_jsonl(tmp_path / "meta.jsonl", ROWS[:2]))
    images, out = tmp_path / "images", tmp_path / "out"
    _images(images, 2, 1)
    layout = out / "layout"
    geneval.evaluate(items, images, None, out, num_images=1)
    mine = {"results.jsonl": "r\n", "notes.txt": "n\n", "00001x": "x\n"}
    for name, text in mine.items():
        (layout / name).write_text(text)

    def run():
        return geneval.evaluate(items, images, None, out, num_images=1)

    # Ctrl-C after the first carried file: the next run carries the rest
    real = geneval._carry_over

    def carry_one_then_ctrl_c(old, new):
        entry = next(e for e in sorted(old.iterdir()) if not geneval._ours(e))
        entry.rename(new / entry.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(geneval, "_carry_over", carry_one_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(geneval, "_carry_over", real)
    run()
    assert _user_files(layout) == mine and not (out / ".layout.old").exists()

    # the second rename fails: the old layout is put back as it was, user files included
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name == ".layout.new":
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        run()
    monkeypatch.setattr(Path, "rename", real_rename)
    assert _user_files(layout) == mine and (layout / "00000" / "metadata.jsonl").is_file()

    # killed between the two renames (no layout, the old one aside, a half-built new one): the next run recovers
    layout.rename(out / ".layout.old")
    (out / ".layout.new" / "00000").mkdir(parents=True)
    run()
    assert _user_files(layout) == mine and sorted(p.name for p in out.iterdir() if p.name.startswith(".layout")) \
        == [".layout.lock"]

    # a file named like a prompt folder is kept under another name
    (layout / "00001x").unlink()
    (layout / "00001").rename(tmp_path / "aside")
    (layout / "00001").write_text("mine\n")
    run()
    assert (layout / "00001").is_dir() and (layout / "00001.kept1").read_text() == "mine\n"

    # results inside a prompt folder would be deleted by the rebuild: refused before anything is touched
    (layout / "00000" / "res.jsonl").write_text("")
    with pytest.raises(common.UsageError, match=r"lie in .*layout/00000, which every run rebuilds"):
        geneval.evaluate(items, images, None, out, num_images=1, detector_results=layout / "00000" / "res.jsonl")
    assert (layout / "00000" / "res.jsonl").is_file()

    with open(out / ".layout.lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(common.UsageError, match="another run is laying out GenEval images"):
            run()


def test_a_bad_line_in_the_detector_results_costs_only_that_line(tmp_path):
    items = geneval.load_items(write_jsonl(tmp_path / "meta.jsonl", ROWS[:2]))
    images, out = tmp_path / "images", tmp_path / "out"
    _images(images, 2, 1)
    geneval.evaluate(items, images, None, out, num_images=1)
    rows = _official_walk(out / "layout", lambda p, m: True)
    results = _write_results(out / geneval.DETECTOR_RESULTS, rows)
    with open(results, "a") as f:
        f.write('{"filename": "00001/samples/00')  # a tail cut short
        f.write("\n" + "[" * 100000 + "\n")  # nested too deeply for json
    doc = geneval.evaluate(items, images, None, out, num_images=1)
    assert doc["summary"]["n_scored"] == 2 and doc["complete"]  # every image scored; the bad lines are listed
    assert [p.split(": ", 1)[1][:8] for p in doc["results_problems"]] == ["not JSON", "not JSON"]
