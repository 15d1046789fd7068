"""--judge-prompts official: the judge prompts read at run time from the official evaluation scripts.

The official scripts are not part of the repository (nor of these tests): STAND-IN scripts of our own are written
here in their layout (the same module-level names, functions and message structure, our own placeholder
wording), and the test checks that what the judge sends is what the stand-in's own code would send.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import math
import types
from pathlib import Path

import pytest

from echo4o_jax.eval import common, geneval_pp, imagine_bench, judge, official, omnicontext, reference
from echo4o_jax.eval import run as eval_run
from echo4o_jax.eval.judge import encode_image
from echo4o_jax.eval.reference import ECHO4O_RAW
from fake_openai import FakeOpenAIServer
from test_eval_benchmarks import CHAT, SECRET, _gpp_rows, assert_no_secret, judge_args, write_jsonl

# the stand-ins' image encoding: the official scripts' layout (a JPEG at PIL's default quality, full size)
ENCODE = '''def encode_image(image_path) -> str:
    with Image.open(image_path) as img:
        img = img.convert("RGB")
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG")
        return base64.b64encode(buffer.getvalue()).decode("utf-8")
'''

GPP_STANDIN = '''import base64
import io
import json
from pathlib import Path

from PIL import Image

client = None  # made in main()
image_dir = Path("image")

SYSTEM_PROMPT = """Stand-in judge text (not any benchmark's wording).

Look at the picture; answer with JSON like {"correct": 0 or 1, "reason": "..."}
"""


''' + ENCODE + '''

def metadata_to_explanation(metadata: dict) -> str:
    lines = []

    def one(item: dict) -> str:
        n = item.get("count", 1)
        what = f"{n} x {item['class'] + '(s)' if n > 1 else item['class']}"
        extra = []
        if item.get("color", None):
            extra.append(f"[{item['color']}]")
        if item.get("size", None):
            extra.append(item["size"])
        if extra:
            what = f"{what} {' '.join(extra)}"
        region = item.get("region", None)
        if region:
            return f"{what} @ {region}"
        return what

    for item in metadata.get("include", []):
        lines.append(f"+ {one(item)};")
    for item in metadata.get("exclude", []):
        lines.append(f"+ fewer than {item.get('count', 1)} x {item['class']};")
    return "STAND-IN LIST\\n" + "\\n".join(lines)


def process_sample(idx: int, metadata: dict, max_retries: int = 3) -> dict:
    instruction = metadata.get("prompt", "").strip()
    explanation = metadata_to_explanation(metadata)
    image_path = image_dir / f"{idx + 1}.jpg"
    image_b64 = encode_image(image_path)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": f"<<stand-in>> do: {instruction} || list:\\n{explanation}"},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image_b64}"}}
        ]}
    ]
    response = client.chat.completions.create(
        model="gpt-4.1",
        messages=messages,
        max_tokens=200,
        temperature=0.0
    )
    return json.loads(response.choices[0].message.content)


def main():
    raise SystemExit("a stand-in")
'''

IMAGINE_STANDIN = '''import base64
import io
import re
from typing import Any, Dict

from PIL import Image


''' + ENCODE + '''

def build_messages(prompt_data: Dict, image_base64: str) -> list:
    return [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Stand-in auditor text, not any benchmark's wording."}]
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": f"""Stand-in rubric.

Answer as:
Fantasy Fulfillment: <score>
Reason: <why>

Identity Preservation: <score>
Reason: <why>

Aesthetic Quality: <score>
Reason: <why>

WHAT: "{prompt_data['instruction']}"
WHY: "{prompt_data['note']}"
(braces stay: {{"not": "a placeholder"}})
"""
                },
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_base64}"}}
            ]
        }
    ]


def evaluate_image(prompt_data: Dict, image_path: str, config: Dict, max_retries: int = 3) -> Dict[str, Any]:
    image_b64 = encode_image(image_path)
    messages = build_messages(prompt_data, image_b64)
    response = client.chat.completions.create(
        model=config["model"],
        messages=messages,
        temperature=0.0,
        max_tokens=1024,
    )
    return {"evaluation": response.choices[0].message.content.strip()}
'''


OC_SCRIPT = "prompt_generator.py"  # OmniGen2's omnicontext/ file of the judge prompts
# OmniContext: OmniGen2's prompt_generator.py layout (a preamble and four rule strings at module level, a
# PromptGenerator whose __call__ joins them and puts the instruction in), with our own wording
OC_STANDIN = '''_context_no_delimit = """Stand-in preamble: not any benchmark's wording.

Answer with JSON only:
{
  "score": <0-10>,
  "reasoning": "..."
}
"""

_prompts_0shot_in_context_generation_rule_PF_Single_and_Multiple = """
[stand-in PF] Does the last picture do this? <instruction>
"""

_prompts_0shot_in_context_generation_rule_PF_Scene = """
[stand-in PF, scene: never asked by the scorer] Does the last picture do this? <instruction>
"""

_prompts_0shot_in_context_generation_rule_SC_Single_and_Multiple = """
[stand-in SC] Are they the same subjects as in the first pictures? (asked: <instruction>)
"""

_prompts_0shot_in_context_generation_rule_SC_Scene = """
[stand-in SC, scene] Same subjects and the same place? (asked: <instruction>; again: <instruction>)
"""


class PromptGenerator:
    def __init__(self):
        pass
    def __call__(self, input_instruction: str, task_type: str, with_scene=False) -> str:
        prompt = _context_no_delimit
        if task_type == "prompt_following":
            if with_scene:
                prompt += _prompts_0shot_in_context_generation_rule_PF_Scene
            else:
                prompt += _prompts_0shot_in_context_generation_rule_PF_Single_and_Multiple
        elif task_type == "subject_consistency":
            if with_scene:
                prompt += _prompts_0shot_in_context_generation_rule_SC_Scene
            else:
                prompt += _prompts_0shot_in_context_generation_rule_SC_Single_and_Multiple
        else:
            raise ValueError(f"Invalid task type: {task_type}")

        prompt = prompt.replace("<instruction>", input_instruction)
        return prompt
'''


def oc_standin_prompt(mod: types.ModuleType, instruction: str, task_type: str) -> dict:
    """The stand-in's PF and SC texts for a sample, asked as OmniGen2's OmniContextScore.evaluate asks them (PF
    without with_scene; SC with with_scene for scene_* tasks, as Echo-4o's test_omnicontext_score.py sets it)."""
    gen = mod.PromptGenerator()
    return {"PF": gen(instruction, task_type="prompt_following"),
            "SC": gen(instruction, task_type="subject_consistency", with_scene=task_type.find("scene") != -1)}


@pytest.fixture(autouse=True)
def _key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def write_scripts(folder: Path, gpp: str = GPP_STANDIN, imagine: str = IMAGINE_STANDIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / official.SCRIPTS["geneval_pp"][0]).write_text(gpp, encoding="utf-8")
    (folder / official.SCRIPTS["imagine_bench"][0]).write_text(imagine, encoding="utf-8")
    (folder / OC_SCRIPT).write_text(OC_STANDIN, encoding="utf-8")
    return folder


def standin_module(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"standin_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Recorder:
    """A stand-in's `client`: records the keywords of each create() call and answers `answer`."""

    def __init__(self, answer: str):
        self.calls = []
        msg = types.SimpleNamespace(content=answer)
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self._create))
        self._resp = types.SimpleNamespace(choices=[types.SimpleNamespace(message=msg)])

    def _create(self, **kw):
        self.calls.append(kw)
        return self._resp


def write_jpeg(path: Path, seed: int, size=(40, 24)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120))
    img.putpixel((3, 4), (255, 255, 255))
    img.save(path, format="JPEG", quality=95)


# ------------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------------

def test_geneval_pp_extraction_matches_the_scripts_own_functions(tmp_path):
    d = write_scripts(tmp_path / "official")
    path = d / official.SCRIPTS["geneval_pp"][0]
    op = official.load("geneval_pp", path)
    mod = standin_module(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    tpl = op.template
    assert tpl.system == mod.SYSTEM_PROMPT and tpl.placeholders() == {"prompt", "checklist"}
    assert tpl.render({"prompt": "P", "checklist": "C"})[1] == "<<stand-in>> do: P || list:\nC"
    assert tpl.ident == f"geneval_pp_official@{sha[:16]}" and op.sha256 == sha
    assert tpl.parser == "verdict_json" and tpl.max_tokens == 200
    assert tpl.options["image_encoding"] == "official_jpeg" and tpl.options["image_mime"] == "image/jpeg"
    assert op.request == {"model": "gpt-4.1", "max_tokens": 200, "temperature": 0.0}
    for row in _gpp_rows():  # the checklist: the script's function, character for character
        item = geneval_pp.Item(line=1, tag=row["tag"], prompt=row["prompt"], include=row["include"],
                               exclude=row.get("exclude", []))
        assert op.checklist(item.metadata()) == mod.metadata_to_explanation(row)
    # max_tokens is the script's
    op2 = official.geneval_pp_prompts(_variant(tmp_path, GPP_STANDIN.replace("max_tokens=200", "max_tokens=77")))
    assert op2.template.max_tokens == 77 and op2.template.ident != tpl.ident


def _variant(tmp_path: Path, text: str, name: str = "variant.py") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_imagine_extraction_matches_build_messages(tmp_path):
    d = write_scripts(tmp_path / "official")
    path = d / official.SCRIPTS["imagine_bench"][0]
    op = official.load("imagine_bench", path)
    mod = standin_module(path)
    data = {"instruction": "a glass {tiger}", "note": "it is \"glass\""}
    msgs = mod.build_messages(data, "B64")
    tpl = op.template
    system, user = tpl.render({"prompt": data["instruction"], "note": data["note"]})
    assert system == msgs[0]["content"][0]["text"] and user == msgs[1]["content"][0]["text"]
    assert '{"not": "a placeholder"}' in user
    assert tpl.max_tokens == 1024 and tpl.parser == "dimension_scores"
    assert tpl.options["image_mime"] == "image/png" and tpl.options["system_content"] == "parts"
    assert tpl.ident.startswith("imagine_bench_official@")
    # the official answer format is read by our parser
    parsed = tpl.parse("Fantasy Fulfillment: 8  \nReason: glass.  \n\nIdentity Preservation: 7  \nReason: a tiger."
                       "  \n\nAesthetic Quality: 9  \nReason: sharp.")
    assert parsed["scores"] == {"FF": 8.0, "IP": 7.0, "AQ": 9.0}
    assert parsed["reasons"] == {"FF": "glass.", "IP": "a tiger.", "AQ": "sharp."}


@pytest.mark.parametrize("body, why", [
    ("    return 'x' + str(len(metadata))\n", "reads the name '(str|len)'"),
    ("    return metadata.__class__.__name__\n", "reads attribute '__"),
    ("    import os\n    return 'x'\n", "Import"),
    ("    return '{0.__class__}'.format(metadata)\n", "'format'"),
    ("    while True:\n        pass\n", "While"),
])
def test_checklist_function_runs_only_plain_code(tmp_path, body, why):
    text = GPP_STANDIN.split("def metadata_to_explanation")[0] + "def metadata_to_explanation(metadata):\n" + body \
        + "\n\ndef process_sample" + GPP_STANDIN.split("def process_sample", 1)[1]
    with pytest.raises(official.OfficialScriptError, match=why):
        official.geneval_pp_prompts(_variant(tmp_path, text))


def test_changed_layout_is_a_clear_error(tmp_path):
    with pytest.raises(official.OfficialScriptError, match="SYSTEM_PROMPT"):
        official.geneval_pp_prompts(_variant(tmp_path, GPP_STANDIN.replace("SYSTEM_PROMPT", "SYS")))
    with pytest.raises(official.OfficialScriptError, match="build_messages"):
        official.imagine_bench_prompts(_variant(tmp_path, IMAGINE_STANDIN.replace("build_messages", "msgs")))
    with pytest.raises(official.OfficialScriptError, match="JPEG"):
        official.imagine_bench_prompts(_variant(tmp_path, IMAGINE_STANDIN.replace('format="JPEG"',
                                                                                  'format="JPEG", quality=95')))


# ------------------------------------------------------------------------------------------------
# image encoding
# ------------------------------------------------------------------------------------------------

def test_official_jpeg_encoding_is_the_scripts():
    from PIL import Image

    img = Image.new("RGBA", (1500, 900), (10, 200, 30, 128))
    img.putpixel((5, 5), (250, 0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    url = encode_image(png, 1024 * 1024, "official_jpeg", "image/png")
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"  # labelled as the script labels it
    want = io.BytesIO()
    img.convert("RGB").save(want, format="JPEG")  # PIL's default quality, full size
    assert base64.b64decode(b64) == want.getvalue()
    with Image.open(io.BytesIO(base64.b64decode(b64))) as got:
        assert got.format == "JPEG" and got.size == (1500, 900)
    assert encode_image(png, 1024 * 1024, "official_jpeg").startswith("data:image/jpeg;base64,")
    assert encode_image(png, None).startswith("data:image/png;base64,")  # ours: the file's own bytes


# ------------------------------------------------------------------------------------------------
# end to end: what the judge sends is what the stand-in sends
# ------------------------------------------------------------------------------------------------

def test_geneval_pp_official_sends_what_the_script_sends(tmp_path, capsys):
    rows = _gpp_rows()
    rows[1]["prompt"] = "  P2 with spaces  "
    bench = tmp_path / "bench"
    prompts = write_jsonl(bench / "geneval_pp.jsonl", rows)
    scripts = write_scripts(bench / "official")  # the default folder: beside --prompts
    images, out = tmp_path / "images", tmp_path / "out"
    for line in range(1, len(rows) + 1):
        write_jpeg(images / f"{line}.jpg", line)  # the official names, read by both
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "ok"}') as s:
        doc = geneval_pp.main(["--images", str(images), "--prompts", str(prompts), "--out", str(out),
                               *judge_args(s, "--concurrency", "1")])
        sent = [r.json for r in s.calls(CHAT)]
    mod = standin_module(scripts / official.SCRIPTS["geneval_pp"][0])
    mod.client, mod.image_dir = _Recorder('{"correct": 1}'), images
    for i, row in enumerate(rows):
        mod.process_sample(i, row)
    expected = sorted(mod.client.calls, key=lambda c: json.dumps(c, sort_keys=True))
    got = sorted(({k: r[k] for k in ("model", "messages", "max_tokens", "temperature")} for r in sent),
                 key=lambda c: json.dumps(c, sort_keys=True))
    assert got == expected
    sha = hashlib.sha256((scripts / official.SCRIPTS["geneval_pp"][0]).read_bytes()).hexdigest()
    res = json.loads((out / "results.json").read_text())
    assert res["judge_prompts"]["kind"] == "official" and res["judge_prompts"]["sha256"] == sha
    assert res["judge"]["template"] == f"geneval_pp_official@{sha[:16]}" and doc["summary"]["score"] == 1.0
    assert res["items"][0]["checklist"][0] == "STAND-IN LIST"
    md = (out / "summary.md").read_text()
    assert "Judge prompts: **official**" in md and sha[:16] in md and "not directly comparable" not in md
    assert_no_secret(out)


def test_imagine_official_sends_what_the_script_sends(tmp_path):
    rows = [{"id": 1, "instruction": "a glass tiger", "note": "glass body", "type": "MATERIAL"},
            {"id": 2, "instruction": "a cube apple", "note": "cube", "type": "SHAPE"}]
    bench = tmp_path / "bench"
    prompts = write_jsonl(bench / "imagine_bench.jsonl", rows)
    scripts = write_scripts(tmp_path / "elsewhere")
    images, out = tmp_path / "images", tmp_path / "out"
    for r in rows:
        write_jpeg(images / f"{r['id']}.png", r["id"])  # (a JPEG named .png: the scripts re-encode anyway)
    answer = ("Fantasy Fulfillment: 8  \nReason: a.  \n\nIdentity Preservation: 6  \nReason: b.  \n\n"
              "Aesthetic Quality: 9  \nReason: c.")
    with FakeOpenAIServer(chat_handler=lambda r: answer) as s:
        doc = imagine_bench.main(["--images", str(images), "--prompts", str(prompts), "--out", str(out),
                                  "--official-scripts", str(scripts), *judge_args(s)])
        sent = [r.json for r in s.calls(CHAT)]
    mod = standin_module(scripts / official.SCRIPTS["imagine_bench"][0])
    mod.client = _Recorder(answer)
    for r in rows:
        mod.evaluate_image(r, str(images / f"{r['id']}.png"), {"model": "gpt-4.1"})
    key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    got = sorted(({k: r[k] for k in ("model", "messages", "max_tokens", "temperature")} for r in sent), key=key)
    assert got == sorted(mod.client.calls, key=key)
    assert doc["summary"]["mean_over_images"] == pytest.approx(0.8 * 6 + 0.2 * 9)
    assert doc["judge_prompts"]["kind"] == "official"


def test_cache_keys_differ_between_our_prompts_and_the_official(tmp_path):
    bench = tmp_path / "bench"
    prompts = write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])
    write_scripts(bench / "official")
    images, cache = tmp_path / "images", tmp_path / "cache"
    for line in (1, 2):
        write_jpeg(images / f"{line}.jpg", line)
    base = ["--images", str(images), "--prompts", str(prompts), "--cache-dir", str(cache)]
    _ours_then_official_twice(tmp_path, geneval_pp.main, base, '{"correct": 1}', calls_per_run=2)


def _ours_then_official_twice(tmp_path: Path, main, base: list[str], answer: str, calls_per_run: int) -> None:
    """`main` run with our prompts, then the official ones (no answer from the cache), then the same again (all
    cached), with one judge cache."""
    with FakeOpenAIServer(chat_handler=lambda r: answer) as s:
        main([*base, "--out", str(tmp_path / "o1"), "--judge-prompts", "ours", *judge_args(s)])
        assert len(s.calls(CHAT)) == calls_per_run
        main([*base, "--out", str(tmp_path / "o2"), *judge_args(s)])  # official: none from the cache
        assert len(s.calls(CHAT)) == 2 * calls_per_run
        main([*base, "--out", str(tmp_path / "o3"), *judge_args(s)])  # the same again: all cached
        assert len(s.calls(CHAT)) == 2 * calls_per_run
    assert json.loads((tmp_path / "o1" / "results.json").read_text())["judge_prompts"]["kind"] == "ours"
    assert json.loads((tmp_path / "o3" / "results.json").read_text())["judge_prompts"]["kind"] == "official"


# ------------------------------------------------------------------------------------------------
# CLI: the flag, the default, a missing script, --fetch
# ------------------------------------------------------------------------------------------------

def test_flag_and_default():
    for mod in (geneval_pp, imagine_bench, omnicontext, eval_run):
        ap = mod.build_parser()
        args = ap.parse_args(["--images", "i", "--prompts", "p", "--out", "o"] if mod is not eval_run else
                             ["--out", "o"])
        assert args.judge_prompts == "official" and args.official_scripts is None
        assert "--judge-prompts" in ap.format_help() and "--official-scripts" in ap.format_help()
        with pytest.raises(SystemExit):
            ap.parse_args(["--out", "o", "--judge-prompts", "theirs"])


def _one_error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_official_script_is_a_clear_error(tmp_path, capsys):
    bench = tmp_path / "bench"
    prompts = write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])
    write_jsonl(bench / "imagine_bench.jsonl", [{"id": 1, "instruction": "x", "note": "y", "type": "SIZE"}])
    with FakeOpenAIServer() as s:
        rc = common.run_cli(geneval_pp.main, ["--images", str(tmp_path), "--prompts", str(prompts),
                                              "--out", str(tmp_path / "o"), *judge_args(s)])
        assert rc == 2
        e = _one_error(capsys)
        assert str(bench / "official" / official.SCRIPTS["geneval_pp"][0]) in e
        for flag in ("--fetch", "--official-scripts", "--judge-prompts ours"):
            assert flag in e
        # eval.run: before anything is generated or judged, for each benchmark that needs one
        rc = common.run_cli(eval_run.main, ["--judge-only", "--bench", "imagine_bench,geneval_pp", "--out",
                                            str(tmp_path / "o2"), "--benchmarks-dir", str(bench), *judge_args(s)])
        assert rc == 2 and s.calls(CHAT) == []
        e = _one_error(capsys)
        assert str(bench / "official" / official.SCRIPTS["imagine_bench"][0]) in e and "--fetch" in e
        assert not (tmp_path / "o2" / "summary.json").exists()


def test_fetch_downloads_the_official_scripts(tmp_path, monkeypatch):
    got = []

    class _Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def urlopen(url, timeout=None):
        got.append(url)
        return _Resp((GPP_STANDIN if "geneval" in url else OC_STANDIN if "OmniGen2" in url else
                      IMAGINE_STANDIN).encode())

    monkeypatch.setattr(common.urllib.request, "urlopen", urlopen)
    folder = tmp_path / "bench" / "official"
    p = official.resolve_script("geneval_pp", folder, True)
    assert p.read_text() == GPP_STANDIN and got == [f"{ECHO4O_RAW}/Eval-gpt-4.1-geneval%2B%2B.py"]
    official.resolve_script("imagine_bench", folder, True)
    assert got[-1] == f"{ECHO4O_RAW}/Eval-gpt-4.1-Imagine.py"
    official.resolve_script("geneval_pp", folder, True)  # there: not downloaded again
    assert len(got) == 2
    p = official.resolve_script("omnicontext", folder, True)
    assert got[-1] == reference.OMNICONTEXT_SCRIPT_URL == (
        "https://raw.githubusercontent.com/VectorSpaceLab/OmniGen2/main/omnicontext/prompt_generator.py")
    assert p == folder / OC_SCRIPT and p.read_text() == OC_STANDIN


# ------------------------------------------------------------------------------------------------
# our prompts: the caveat everywhere the scores are reported
# ------------------------------------------------------------------------------------------------

def test_our_prompts_are_marked_not_comparable(tmp_path, monkeypatch):
    from test_eval_benchmarks import _fake_generate_module

    bench = tmp_path / "bench"
    write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])
    write_jsonl(bench / "imagine_bench.jsonl", [{"id": 1, "instruction": "x", "note": "y", "type": "SIZE"}])
    calls = []
    monkeypatch.setitem(__import__("sys").modules, "echo4o_jax.generate", _fake_generate_module(calls))
    out = tmp_path / "out"

    def handler(req):
        text = json.dumps(req.json)
        return ('{"correct": 1}' if "Checklist" in text else
                "Fantasy Fulfillment: 5\nIdentity Preservation: 5\nAesthetic Quality: 5")

    with FakeOpenAIServer(chat_handler=handler) as s:
        rep = eval_run.main(["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp,imagine_bench", "--out",
                             str(out), "--benchmarks-dir", str(bench), "--judge-prompts", "ours", *judge_args(s)])
    summary = json.loads((out / "summary.json").read_text())
    for name in ("geneval_pp", "imagine_bench"):
        jp = summary["benchmarks"][name]["judge_prompts"]
        assert jp["kind"] == "ours" and "not directly comparable with the paper" in jp["note"]
        assert rep["benchmarks"][name]["judge_prompts"] == jp
        res = json.loads((out / name / "results.json").read_text())
        assert res["judge_prompts"] == jp
        md = (out / name / "summary.md").read_text()
        line = next(x for x in md.splitlines() if x.startswith("**Judge prompts: ours"))
        assert "not the official scripts' wording" in line and md.index(line) < md.index("| Model")
    assert (out / "summary.md").read_text().count("**Judge prompts: ours") == 2
    # Imagine-Bench: the paper's overall includes Multi-Object (Echo-4o's Eval.md)
    md = (out / "imagine_bench" / "summary.md").read_text()
    assert "8.613" in md and "not known" not in md


def test_run_with_official_scripts_records_them(tmp_path, monkeypatch):
    from test_eval_benchmarks import _fake_generate_module

    bench = tmp_path / "bench"
    write_jsonl(bench / "geneval_pp.jsonl", _gpp_rows()[:2])
    write_scripts(bench / "official")
    monkeypatch.setitem(__import__("sys").modules, "echo4o_jax.generate", _fake_generate_module([]))
    out = tmp_path / "out"
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1}') as s:
        eval_run.main(["--ckpt", str(tmp_path / "ckpt"), "--bench", "geneval_pp", "--out", str(out),
                       "--benchmarks-dir", str(bench), *judge_args(s)])
        assert "<<stand-in>> do: P1" in json.dumps([r.json for r in s.calls(CHAT)])
    jp = json.loads((out / "summary.json").read_text())["benchmarks"]["geneval_pp"]["judge_prompts"]
    sha = hashlib.sha256((bench / "official" / official.SCRIPTS["geneval_pp"][0]).read_bytes()).hexdigest()
    assert jp["kind"] == "official" and jp["sha256"] == sha and jp["url"].startswith(ECHO4O_RAW)
    md = (out / "summary.md").read_text()
    assert "Judge prompts: **official**" in md and "not directly comparable" not in md


def test_omnicontext_ours_says_so(tmp_path):
    assert set(omnicontext.TEMPLATES) == {"pf", "sc", "sc_scene"}
    info = common.judge_prompts_info({k: __import__("echo4o_jax.eval.judge", fromlist=["x"]).load_template(v)
                                      for k, v in omnicontext.TEMPLATES.items()})
    assert info["kind"] == "ours" and "not directly comparable" in info["note"]


# ------------------------------------------------------------------------------------------------
# OmniContext: OmniGen2's prompt_generator.py
# ------------------------------------------------------------------------------------------------

def test_omnicontext_extraction_is_the_prompt_generators_text(tmp_path):
    d = write_scripts(tmp_path / "official")
    path = d / OC_SCRIPT
    assert official.SCRIPTS["omnicontext"] == (OC_SCRIPT, reference.OMNICONTEXT_SCRIPT_URL)
    op = official.load("omnicontext", path)
    mod = standin_module(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    instr = 'put the {cat} on "the" mat <b> {{x}}'
    assert set(op.templates) == set(omnicontext.TEMPLATES) == {"pf", "sc", "sc_scene"}
    for task in ("multiple_object", "single_character", "scene_character", "scene_object"):
        want = oc_standin_prompt(mod, instr, task)
        pf = op.templates["pf"]  # PF: one text for every task type (the scorer never asks the scene variant)
        sc = op.templates["sc_scene" if task.startswith("scene") else "sc"]
        assert pf.render({"instruction": instr, "n_inputs": 2}) == ("", want["PF"])
        assert sc.render({"instruction": instr, "n_inputs": 2}) == ("", want["SC"])
    assert "never asked" not in json.dumps({k: t.user for k, t in op.templates.items()})
    assert op.templates["sc_scene"].user.count("{{instruction}}") == 2
    for k, t in op.templates.items():
        assert t.ident == f"omnicontext_{k}_official@{sha[:16]}" and t.system == "" and t.parser == "score_json"
        assert t.max_tokens == 1400 and t.options["image_encoding"] == "official_omnicontext"
        assert t.options["image_mime"] == "image/jpeg" and t.placeholders() == {"instruction"}
    info = op.describe()
    assert info["kind"] == "official" and info["sha256"] == sha and info["url"] == reference.OMNICONTEXT_SCRIPT_URL
    assert info["template"] == {k: t.ident for k, t in op.templates.items()} and "openai_util" in info["unverified"]
    # the official answer format is read by the score_json parser
    assert op.templates["pf"].parse('{\n  "score": 7,\n  "reasoning": "mostly done"\n}') == {
        "score": 7.0, "reason": "mostly done"}
    # the strings as class attributes (read as self._NAME) give the same texts
    names = [n for n in vars(mod) if n.startswith("_prompts") or n == "_context_no_delimit"]
    body = OC_STANDIN.split("class PromptGenerator:")[1]
    for n in names:
        body = body.replace(f"= {n}\n", f"= self.{n}\n").replace(f"+= {n}\n", f"+= self.{n}\n")
    assert len(names) == 5 and body.count("self._") == 5
    attrs = "".join(f"    {n} = {getattr(mod, n)!r}\n" for n in names)
    op2 = official.omnicontext_prompts(_variant(tmp_path, "class PromptGenerator:\n" + attrs + body))
    assert {k: t.user for k, t in op2.templates.items()} == {k: t.user for k, t in op.templates.items()}
    # a changed layout: a clear error
    with pytest.raises(official.OfficialScriptError, match="PromptGenerator"):
        official.omnicontext_prompts(_variant(tmp_path, OC_STANDIN.replace("class PromptGenerator", "class PG")))
    with pytest.raises(official.OfficialScriptError, match="does not hold the instruction"):
        official.omnicontext_prompts(_variant(tmp_path, OC_STANDIN.replace('"<instruction>"', '"<instr>"')))
    with pytest.raises(official.OfficialScriptError, match="reads the name 'open'"):
        official.omnicontext_prompts(_variant(tmp_path, OC_STANDIN.replace("return prompt", "return open(prompt)")))


def _image_bytes(size, fmt="PNG", mode="RGB") -> bytes:
    from PIL import Image

    img = Image.new(mode, size, (40, 90, 200) if mode == "RGB" else (40, 90, 200, 128))
    for i in range(min(size)):
        img.putpixel((i, i), (250, 250, 10) if mode == "RGB" else (250, 250, 10, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _official_oc_jpeg(data: bytes, ref: bool) -> bytes:
    """What Echo-4o's test_omnicontext_score.py does to an input image (written here from its rule: area above
    1024^2 scaled down by sqrt, sides truncated, then floored to multiples of 16; the output untouched), then a
    JPEG at PIL's default quality (the unverified transport)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if ref:
        w, h = img.size
        if w * h > 1024 * 1024:
            r = math.sqrt(1024 * 1024 / (w * h))
            w, h = int(w * r), int(h * r)
        img = img.resize((w // 16 * 16, h // 16 * 16))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def test_omnicontext_input_images_are_resized_as_the_official_scorer():
    from PIL import Image

    assert judge.omnicontext_input_size(640, 480) == (640, 480)
    assert judge.omnicontext_input_size(40, 24) == (32, 16)  # floored to multiples of 16 also when small
    assert judge.omnicontext_input_size(2000, 1500) == (1168, 880)  # int(2000 * 0.5912) = 1182 -> 1168; 886 -> 880
    assert judge.omnicontext_input_size(1100, 1000) == (1072, 976)  # 1073 x 976 after the area rule
    assert judge.omnicontext_input_size(1024, 1024) == (1024, 1024)
    for size, mode in (((2000, 1500), "RGB"), ((40, 24), "RGBA"), ((640, 480), "RGB")):
        data = _image_bytes(size, mode=mode)
        for ref in (True, False):
            url = encode_image(data, 1024 * 1024, "official_omnicontext", "image/jpeg", reference=ref)
            head, b64 = url.split(",", 1)
            assert head == "data:image/jpeg;base64"
            assert base64.b64decode(b64) == _official_oc_jpeg(data, ref)
            with Image.open(io.BytesIO(base64.b64decode(b64))) as got:  # the output image: full size
                assert got.size == (judge.omnicontext_input_size(*size) if ref else size)
    assert encode_image(_image_bytes((2000, 1500)), 1024 * 1024, "official_jpeg", reference=True) == \
        encode_image(_image_bytes((2000, 1500)), 1024 * 1024, "official_jpeg")  # only OmniContext's option resizes


def _oc_data(tmp_path: Path) -> tuple[Path, list[dict]]:
    """An OmniContext manifest (a scene_* task and another) with input images of sizes the resize rule changes."""
    data = tmp_path / "oc"
    data.mkdir(parents=True)
    (data / "big.png").write_bytes(_image_bytes((1100, 1000)))
    (data / "small.jpg").write_bytes(_image_bytes((40, 24), fmt="JPEG"))
    rows = [{"key": "1", "task_type": "multiple_object", "instruction": "the {cup} beside the lamp",
             "input_images": ["big.png", "small.jpg"]},
            {"key": "2", "task_type": "scene_character", "instruction": "she sits in the kitchen",
             "input_images": ["small.jpg", "big.png"]}]
    write_jsonl(data / "metadata.jsonl", rows)
    return data, rows


def test_omnicontext_official_sends_the_prompt_generators_texts(tmp_path):
    data, rows = _oc_data(tmp_path)
    scripts = write_scripts(data / "official")  # the default folder: beside the manifest
    images, out = tmp_path / "images", tmp_path / "out"
    for r in rows:
        (images / r["task_type"]).mkdir(parents=True, exist_ok=True)
        (images / r["task_type"] / f"{r['key']}.png").write_bytes(_image_bytes((1200, 1000)))  # (official names)
    with FakeOpenAIServer(chat_handler=lambda r: '{\n  "score": 8,\n  "reasoning": "fine"\n}') as s:
        doc = omnicontext.main(["--images", str(images), "--data", str(data), "--out", str(out), *judge_args(s)])
        sent = [r.json for r in s.calls(CHAT)]
    mod = standin_module(scripts / OC_SCRIPT)
    want = {}
    for r in rows:  # (text, images) of each call
        refs = [_official_oc_jpeg((data / p).read_bytes(), True) for p in r["input_images"]]
        out_img = _official_oc_jpeg((images / r["task_type"] / f"{r['key']}.png").read_bytes(), False)
        for text in oc_standin_prompt(mod, r["instruction"], r["task_type"]).values():
            want[text] = refs + [out_img]
    assert len(sent) == 4 and len(want) == 4
    for req in sent:
        (msg,) = req["messages"]  # no system message: the whole prompt is the user's text
        assert msg["role"] == "user" and msg["content"][0]["type"] == "text"
        urls = [p["image_url"]["url"] for p in msg["content"][1:]]
        assert all(u.startswith("data:image/jpeg;base64,") for u in urls)
        assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == want.pop(msg["content"][0]["text"])
        assert req["max_tokens"] == 1400 and req["temperature"] == 0
    assert not want
    sha = hashlib.sha256((scripts / OC_SCRIPT).read_bytes()).hexdigest()
    res = json.loads((out / "results.json").read_text())
    jp = res["judge_prompts"]
    assert jp["kind"] == "official" and jp["sha256"] == sha and "unverified" in jp
    assert res["judge"]["template"] == {k: f"omnicontext_{k}_official@{sha[:16]}" for k in ("pf", "sc", "sc_scene")}
    assert doc["summary"]["overall_8"] == pytest.approx(8.0) and doc["complete"]
    md = (out / "summary.md").read_text()
    assert "Judge prompts: **official**" in md and "Unverified:" in md and "not directly comparable" not in md
    assert_no_secret(out)


def test_omnicontext_cache_keys_differ_between_ours_and_the_official(tmp_path):
    data, rows = _oc_data(tmp_path)
    write_scripts(data / "official")
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    for i, r in enumerate(rows):
        (images / f"{r['task_type']}__{r['key']}_0.png").write_bytes(_image_bytes((64, 48 + 16 * i)))
    base = ["--images", str(images), "--data", str(data), "--cache-dir", str(cache)]
    _ours_then_official_twice(tmp_path, omnicontext.main, base, '{"score": 5, "reasoning": "r"}', calls_per_run=4)


def test_omnicontext_missing_script_is_a_clear_error(tmp_path, capsys):
    data, rows = _oc_data(tmp_path)
    bench = tmp_path / "bench"
    bench.mkdir()
    with FakeOpenAIServer(chat_handler=lambda r: '{"score": 5, "reasoning": "r"}') as s:
        rc = common.run_cli(omnicontext.main, ["--images", str(tmp_path), "--data", str(data),
                                               "--out", str(tmp_path / "o"), *judge_args(s)])
        assert rc == 2
        e = _one_error(capsys)
        assert str(data / "official" / OC_SCRIPT) in e
        for flag in ("--fetch", "--official-scripts", "--judge-prompts ours"):
            assert flag in e
        # eval.run: before anything is judged
        rc = common.run_cli(eval_run.main, ["--judge-only", "--bench", "omnicontext", "--omnicontext-data", str(data),
                                            "--out", str(tmp_path / "o2"), "--benchmarks-dir", str(bench),
                                            *judge_args(s)])
        assert rc == 2 and s.calls(CHAT) == []
        e = _one_error(capsys)
        assert str(bench / "official" / OC_SCRIPT) in e and "--fetch" in e
        assert not (tmp_path / "o2" / "summary.json").exists()
        # a template file replaces the official prompts: no script needed (ours for the other two)
        tpl = tmp_path / "pf.txt"
        tpl.write_text("# version: t/1\n# parser: score_json\n[user]\nscore {{instruction}}\n")
        rc = common.run_cli(omnicontext.main, ["--images", str(tmp_path), "--data", str(data), "--template-pf",
                                               str(tpl), "--out", str(tmp_path / "o3"), *judge_args(s)])
        assert rc == 1  # (no images: incomplete, but judged with the templates)
        assert json.loads((tmp_path / "o3" / "results.json").read_text())["judge_prompts"]["kind"] == "custom"


def test_run_omnicontext_official_records_it(tmp_path, monkeypatch, capsys):
    from test_eval_benchmarks import _fake_generate_module

    data, rows = _oc_data(tmp_path)
    bench = tmp_path / "bench"
    write_scripts(bench / "official")
    monkeypatch.setitem(__import__("sys").modules, "echo4o_jax.generate", _fake_generate_module([]))
    out = tmp_path / "out"
    with FakeOpenAIServer(chat_handler=lambda r: '{"score": 6, "reasoning": "r"}') as s:
        eval_run.main(["--ckpt", str(tmp_path / "ckpt"), "--bench", "omnicontext", "--omnicontext-data", str(data),
                       "--out", str(out), "--benchmarks-dir", str(bench), *judge_args(s)])
        texts = [r.json["messages"][0]["content"][0]["text"] for r in s.calls(CHAT)]
    assert len(texts) == 4 and all(t.startswith("Stand-in preamble") for t in texts)
    assert sum("[stand-in SC, scene]" in t for t in texts) == 1 and sum("[stand-in PF]" in t for t in texts) == 2
    jp = json.loads((out / "summary.json").read_text())["benchmarks"]["omnicontext"]["judge_prompts"]
    sha = hashlib.sha256((bench / "official" / OC_SCRIPT).read_bytes()).hexdigest()
    assert jp["kind"] == "official" and jp["sha256"] == sha and jp["url"] == reference.OMNICONTEXT_SCRIPT_URL
    md = (out / "summary.md").read_text()
    assert "Judge prompts: **official**" in md and "not directly comparable" not in md
    assert "OmniContext has no" not in capsys.readouterr().err
