"""Test helpers of the synthesis tests: a FakeOpenAIServer (tests/fake_openai.py) whose chat and image
answers are deterministic functions of the request, shaped like the answers the synthesis templates ask
for, plus dataset comparison helpers."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re

import pytest

from fake_openai import FakeOpenAIServer, Reply, Request, message_images, message_text, solid_png  # noqa: F401

__all__ = ["API_KEY", "FakeOpenAIServer", "Reply", "Request", "message_images", "message_text", "solid_png",
           "chat_answer", "image_answer", "synth_server", "path_counts", "request_body_key", "dataset_contents",
           "all_file_bytes", "small_image_folder", "fast_config", "fast_cli_args", "data_gen", "one_line_error"]

API_KEY = "sk-test-SYNTHSECRET-0123456789abcdef"


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def chat_answer(req: Request) -> str:
    """The answer a cooperative model would give to each synthesis template."""
    text = message_text(req)
    h = _h(text + "".join(message_images(req)))
    if "List the normal attributes" in text:
        obj = re.search(r"Object: (.*)", text).group(1).strip()
        return json.dumps({"object": obj, "color": "usual", "shape": "usual", "size": "usual",
                           "material": "usual", "structure": "parts", "setting": "home"})
    if "Deflection type:" in text:
        typ = re.search(r"Deflection type: (\S+)", text).group(1)
        return "```json\n" + json.dumps({"deflection": f"{typ} {h}", "prompt": f"A surreal photo {h} ({typ})."}) + "\n```"
    if "reference images (" in text:
        k = len(message_images(req))
        return json.dumps({"uses": [f"thing {i + 1}" for i in range(k)],
                           "instruction": f"Combine all {k} references {h}."})
    if "Constraint list:" in text:
        return json.dumps({"prompt": f"A natural prompt {h}."})
    if "The generated image follows." in text:
        prompt = re.search(r"Prompt: (.*)", text).group(1).strip()
        return json.dumps({"matches": False, "mismatches": ["count"], "rewritten_prompt": f"{prompt} (rewritten {h})"})
    return '{"ok": true}'


def image_answer(req: Request) -> list[bytes]:
    params = req.json if req.json is not None else (req.form or {})
    prompt = str(params.get("prompt", ""))
    extra = ""
    if req.files:
        extra = "".join(_h(hashlib.sha256(d).hexdigest()) for fl in req.files.values() for _, d in fl)
    digest = hashlib.sha256((prompt + extra).encode()).digest()
    size = str(params.get("size") or "16x16")
    w, h = (int(v) for v in size.split("x"))
    return [solid_png(w, h, (digest[0], digest[1], digest[2]))]


def synth_server() -> FakeOpenAIServer:
    return FakeOpenAIServer(chat_handler=chat_answer, image_handler=image_answer)


def path_counts(server: FakeOpenAIServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in list(server.requests):
        out[r.path] = out.get(r.path, 0) + 1
    return out


def request_body_key(r: Request) -> str:
    """A stable identity of a request's content (for 'was this call repeated?')."""
    if r.json is not None:
        return r.path + ":" + json.dumps(r.json, sort_keys=True)
    form = {k: (v if isinstance(v, str) else ["file", hashlib.sha256(v[1]).hexdigest()])
            for k, v in (r.form or {}).items()}
    files = {k: [hashlib.sha256(d).hexdigest() for _, d in v] for k, v in (r.files or {}).items()}
    return r.path + ":" + json.dumps({"form": form, "files": files}, sort_keys=True)


def dataset_contents(path) -> dict[str, tuple]:
    """id -> (header JSON, image bytes) of every record, read back with RecordReader (verified)."""
    from echo4o_jax.data.records import RecordReader

    r = RecordReader(path, verify=True)
    out = {}
    for i in range(len(r)):
        h = r.header(i)
        rec = r[i]
        rec.validate()
        assert h["id"] not in out, f"duplicate id {h['id']}"
        out[h["id"]] = (json.dumps(h, sort_keys=True), tuple(rec.images))
    r.close()
    return out


def all_file_bytes(root) -> dict[str, bytes]:
    out = {}
    for dp, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[p] = fh.read()
    return out


def small_image_folder(root, layout: dict[str, int]) -> str:
    """A references folder: layout {subfolder: number of images} (PNG and JPEG alternating)."""
    from PIL import Image

    for sub, n in layout.items():
        d = os.path.join(root, sub)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            buf = io.BytesIO()
            fmt = "JPEG" if i % 2 else "PNG"
            Image.new("RGB", (24 + i, 20), ((40 * i) % 256, len(sub) * 20 % 256, 90)).save(buf, format=fmt)
            with open(os.path.join(d, f"{sub}_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"), "wb") as f:
                f.write(buf.getvalue())
    return str(root)


def fast_config(server, **kw):
    """A SynthConfig pointed at the fake server, with no rate limits and millisecond back-off (tests)."""
    from echo4o_jax.synth import SynthConfig

    base = dict(base_url=server.base_url, image_size="32x32", chat_rpm=0, image_rpm=0, backoff_base=0.01,
                backoff_max=0.05, timeout=10.0)
    base.update(kw)
    return SynthConfig(**base)


def fast_cli_args(server) -> list[str]:
    """The options of fast_config, for ``python -m data_gen``."""
    return ["--base-url", server.base_url, "--image-size", "32x32", "--chat-rpm", "0", "--image-rpm", "0",
            "--backoff-base", "0.01", "--backoff-max", "0.05", "--timeout", "10", "--no-progress"]


def data_gen(*args) -> tuple[int, str, str]:
    """``python -m data_gen ARGS`` in this process: (exit status, stdout, stderr)."""
    from echo4o_jax.synth.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(err: str) -> str:
    """The one 'error: ...' line of a refused run's stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# fixtures shared by the synthesis test modules (imported there by name)
@pytest.fixture
def server():
    with synth_server() as s:
        yield s


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
