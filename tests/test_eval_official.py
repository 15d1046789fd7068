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
import types
from pathlib import Path

import pytest

from echo4o_jax.eval import common, geneval_pp, imagine_bench, official, omnicontext, run as eval_run
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


@pytest.fixture(autouse=True)
def _key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def write_scripts(folder: Path, gpp: str = GPP_STANDIN, imagine: str = IMAGINE_STANDIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / official.SCRIPTS["geneval_pp"][0]).write_text(gpp, encoding="utf-8")
    (folder / official.SCRIPTS["imagine_bench"][0]).write_text(imagine, encoding="utf-8")
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
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1}') as s:
        geneval_pp.main([*base, "--out", str(tmp_path / "o1"), "--judge-prompts", "ours", *judge_args(s)])
        assert len(s.calls(CHAT)) == 2
        geneval_pp.main([*base, "--out", str(tmp_path / "o2"), *judge_args(s)])  # official: none from the cache
        assert len(s.calls(CHAT)) == 4
        geneval_pp.main([*base, "--out", str(tmp_path / "o3"), *judge_args(s)])  # the same again: all cached
        assert len(s.calls(CHAT)) == 4


# ------------------------------------------------------------------------------------------------
# CLI: the flag, the default, a missing script, --fetch
# ------------------------------------------------------------------------------------------------

def test_flag_and_default():
    for mod in (geneval_pp, imagine_bench, eval_run):
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
        return _Resp((GPP_STANDIN if "geneval" in url else IMAGINE_STANDIN).encode())

    monkeypatch.setattr(common.urllib.request, "urlopen", urlopen)
    folder = tmp_path / "bench" / "official"
    p = official.resolve_script("geneval_pp", folder, True)
    assert p.read_text() == GPP_STANDIN and got == [f"{ECHO4O_RAW}/Eval-gpt-4.1-geneval%2B%2B.py"]
    official.resolve_script("imagine_bench", folder, True)
    assert got[-1] == f"{ECHO4O_RAW}/Eval-gpt-4.1-Imagine.py"
    official.resolve_script("geneval_pp", folder, True)  # there: not downloaded again
    assert len(got) == 2


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


def test_omnicontext_is_judged_with_ours_and_says_so(tmp_path):
    assert set(omnicontext.TEMPLATES) == {"pf", "sc", "sc_scene"}
    info = common.judge_prompts_info({k: __import__("echo4o_jax.eval.judge", fromlist=["x"]).load_template(v)
                                      for k, v in omnicontext.TEMPLATES.items()})
    assert info["kind"] == "ours" and "not directly comparable" in info["note"]
