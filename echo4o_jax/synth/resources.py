"""Prompt templates and word lists of the synthesis tracks (package data, editable).

Templates (``templates/*.txt``) use the judge's template format (:mod:`echo4o_jax.eval.judge`): a header
of ``# key: value`` lines (``name``, ``version``, ``parser``, ``max_tokens`` and free options such as
``temperature`` and ``response_format``) and ``[system]`` / ``[user]`` sections with ``{{name}}``
placeholders. Two parsers are added for them: ``synth_json`` (the first JSON object of the answer) and
``synth_text`` (the stripped text). A template's ``version`` is recorded in every record made with it.
``SynthConfig.template_dir`` may hold edited copies (same file names) that override the built-in ones.

Word lists (``data/*.txt``): one entry per line, ``#`` comments and blank lines ignored; a file may be
split into ``[section]`` blocks (``instruction_vocab.txt``). ``SynthConfig.data_dir`` may hold edited
copies (same file names) that override the built-in ones.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from pathlib import Path
from typing import Any, Sequence

from echo4o_jax.eval import judge as _judge
from echo4o_jax.eval.judge import JudgeTemplate, encode_image, extract_json_object, load_template

__all__ = ["TEMPLATE_DIR", "DATA_DIR", "get_template", "chat_messages", "read_list", "read_sections",
           "class_list", "file_digest", "image_mime", "data_url_digest", "Template"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DATA_DIR = Path(__file__).resolve().parent / "data"
Template = JudgeTemplate

_judge.PARSERS.setdefault("synth_json", lambda text, tpl: extract_json_object(text))
_judge.PARSERS.setdefault("synth_text", lambda text, tpl: {"text": (text or "").strip()})


def get_template(name: str, template_dir: str | os.PathLike | None = None) -> JudgeTemplate:
    """The template `name` from `template_dir` (which must exist) when it holds ``<name>.txt``, else the
    built-in one. A file that cannot be read or parsed is a ValueError naming it."""
    p = TEMPLATE_DIR / f"{name}.txt"
    if template_dir:
        if not Path(template_dir).is_dir():
            raise FileNotFoundError(f"template folder {template_dir} does not exist (or is not a folder)")
        if (Path(template_dir) / f"{name}.txt").is_file():
            p = Path(template_dir) / f"{name}.txt"
    if not p.is_file():
        raise FileNotFoundError(f"synthesis template {name!r} not found in {TEMPLATE_DIR}")
    try:
        return load_template(p)  # (a file that does not parse: a ValueError naming it)
    except OSError as e:
        raise ValueError(f"template file {p}: cannot read it ({e.strerror or e})") from None


def chat_messages(tpl: JudgeTemplate, variables: dict[str, Any], images: Sequence[bytes] = (),
                  max_image_pixels: int | None = None) -> list[dict]:
    """Chat messages of a template: the system section, then the user text followed by the images
    (``data:`` URLs of the bytes, downscaled to JPEG above `max_image_pixels`)."""
    system, user = tpl.render(variables)
    if images:
        content: Any = [{"type": "text", "text": user}]
        for b in images:
            content.append({"type": "image_url", "image_url": {"url": encode_image(b, max_image_pixels)}})
    else:
        content = user
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def _lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    return out


def _data_path(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"word list folder {data_dir} does not exist (or is not a folder)")
    p = Path(name_or_path)
    if p.is_file():
        return p
    if data_dir:
        q = Path(data_dir) / (str(name_or_path) if p.suffix else f"{name_or_path}.txt")
        if q.is_file():
            return q
    q = DATA_DIR / (str(name_or_path) if p.suffix else f"{name_or_path}.txt")
    if q.is_file():
        return q
    raise FileNotFoundError(f"word list {name_or_path!r} not found (built-in: "
                            f"{sorted(x.stem for x in DATA_DIR.glob('*.txt'))})")


def read_list(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Entries of a list (``coco_classes``, ``humans``, ...: `data_dir`, then the built-in folder) or a file."""
    return _lines(_data_path(name_or_path, data_dir))


def read_sections(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for s in _lines(_data_path(name_or_path, data_dir)):
        if s.startswith("[") and s.endswith("]"):
            cur = out.setdefault(s[1:-1].strip(), [])
        elif cur is None:
            raise ValueError(f"{name_or_path}: entry {s!r} before the first [section]")
        else:
            cur.append(s)
    return out


def class_list(spec: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """``coco``, ``openimages``, ``coco+openimages`` (merged, first spelling kept) or a file path."""
    names: list[str] = []
    seen: set[str] = set()
    for part in spec.split("+") if not Path(spec).is_file() else [spec]:
        part = part.strip()
        src = {"coco": "coco_classes", "openimages": "openimages_classes"}.get(part, part)
        for n in read_list(src, data_dir):
            k = n.lower()
            if k not in seen:
                seen.add(k)
                names.append(n)
    if not names:
        raise ValueError(f"class list {spec!r} is empty")
    return names


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_mime(name: str, data: bytes) -> str:
    from echo4o_jax.data.records import probe_image

    try:
        fmt = probe_image(data).format
    except Exception:
        fmt = ""
    return {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}.get(
        fmt, mimetypes.guess_type(name)[0] or "application/octet-stream")


def data_url_digest(url: str) -> str:
    """A short stand-in for a ``data:`` URL in journal keys."""
    return "sha256:" + hashlib.sha256(url.encode("ascii", "replace")).hexdigest()

