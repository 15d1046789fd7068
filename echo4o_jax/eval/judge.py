"""A vision-language judge on the official ``openai`` client: templates, parsing, retries, disk cache.

* **Templates** are text files of our own (``echo4o_jax/eval/templates/*.txt``) with a header of
  ``# key: value`` lines (``name``, ``version``, ``parser``, ``max_tokens``, ``dimensions``) and two
  sections ``[system]`` / ``[user]``; ``{{name}}`` placeholders are filled per item (an unfilled
  placeholder is an error). :func:`load_template` takes a built-in name or a path to another file.
* **Parsing** tolerates prose and Markdown around the answer: the first JSON object in the reply
  (```json fences allowed) for ``verdict_json`` / ``score_json``, ``Label: <0-10>`` lines (or a JSON
  object) for ``dimension_scores``. A reply that does not parse is asked again (``malformed_retries``),
  then reported as a *judge failure* -- never turned into a pass or a fail silently.
* **Retries**: 429, 408/409, 5xx, time-outs, connection errors and unreadable HTTP bodies are retried
  by us with exponential backoff and jitter (or the server's ``retry-after-ms`` / ``retry-after``),
  up to ``max_retries`` times; the client's own retries are off by default (``client_max_retries=0``)
  so the two do not multiply. 401/403/404 abort the run (:class:`JudgeFatalError`): a wrong key or
  model name would otherwise fail every item. Other 4xx are a judge failure of that item.
* **Cache**: one JSON file per answer under ``cache_dir``, keyed by sha256 of (image sha256s, the
  rendered prompt text, judge model, template name@version, image size limit, the endpoint (base URL
  without credentials), temperature, max_tokens and the template's request options). A re-run makes no call
  for an answer already cached. Only parsed answers are cached; judge failures are retried next run.
* **Secrets**: the API key is read from the environment (``OPENAI_API_KEY`` or ``api_key_env``) only
  when a call is needed; it is never logged and is redacted from every error text we keep and from
  the judge's answers before they are parsed (so neither the raw answer nor what is parsed from it,
  e.g. a reason, can carry it). Results and caches hold no request headers.

Images are sent as base64 ``data:`` URLs (the file's own bytes, or a JPEG re-encode when the image is
larger than ``max_image_pixels``; with the template option ``image_encoding: official_jpeg``, what the official
scripts send: a full-size JPEG at PIL's default quality; ``official_omnicontext``: the same, the reference images
first resized as the official OmniContext scorer does). Temperature is 0 unless changed.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..paths import write_json

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL", "TEMPLATE_DIR", "JudgeTemplate", "load_template", "MalformedAnswer",
    "extract_json_object", "PARSERS", "JudgeCache", "JudgeRequest", "JudgeResult", "Judge",
    "JudgeError", "JudgeFatalError", "JudgeConfigError", "ClientCallError", "TemplateError", "encode_image",
    "cache_key", "redact", "api_key_from_env", "check_api_key_env", "clean_text",
]

DEFAULT_MODEL = "gpt-4.1"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024


class JudgeError(RuntimeError):
    pass


class ClientCallError(RuntimeError):
    """An exception of one API call that `classify_error` does not know (a bug, or a kind the openai client lets
    through unwrapped), raised again with its text redacted and without its cause: the original's message, or an
    exception chained to it, may carry the request's headers (the key) or a URL with credentials."""


class JudgeConfigError(JudgeError):
    """Bad configuration found before any call (e.g. no API key in the environment)."""


class TemplateError(JudgeConfigError, ValueError):
    """A template file that cannot be used (its message names the file and what is wrong)."""


class JudgeFatalError(JudgeError):
    """An error every further call would repeat (bad key, no access, unknown model): abort the run."""


class MalformedAnswer(ValueError):
    """The judge replied, but not in the form the template asks for."""


# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SECTION = re.compile(r"^\[(system|user)\]\s*$")
_HEADER = re.compile(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    name: str
    version: str
    parser: str
    system: str
    user: str
    max_tokens: int = 512
    dimensions: tuple[tuple[str, str], ...] = ()  # (key, label) for the dimension_scores parser
    options: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    path: str = ""

    @property
    def ident(self) -> str:
        return f"{self.name}@{self.version}"

    def placeholders(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.system)) | set(_PLACEHOLDER.findall(self.user))

    def render(self, variables: dict[str, Any]) -> tuple[str, str]:
        missing = self.placeholders() - set(variables)
        if missing:
            raise JudgeConfigError(f"template {self.ident} ({self.path}) uses {sorted(missing)}, which this "
                                   f"benchmark does not provide (it provides {sorted(variables)})")

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(variables[m.group(1)]), text)

        return fill(self.system), fill(self.user)

    def parse(self, text: str) -> dict:
        return PARSERS[self.parser](text, self)


def _max_tokens(value: str, path: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise TemplateError(f"{path}: '# max_tokens: {value}' must be a positive integer")
    return n


def _parse_template_text(text: str, path: str) -> JudgeTemplate:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            if m.group(1) in sections:
                raise TemplateError(f"{path}: section [{m.group(1)}] appears twice")
            current = sections[m.group(1)] = []
            continue
        if current is None:
            s = line.strip()
            if not s:
                continue
            if not s.startswith("#"):
                raise TemplateError(f"{path}: text before the first [system]/[user] section: {s[:60]!r}")
            m = _HEADER.match(s)
            if m:  # '# key: value'; other comment lines are ignored
                header[m.group(1).lower()] = m.group(2).strip()
            continue
        current.append(line)
    for req in ("version", "parser"):
        if not header.get(req):
            raise TemplateError(f"{path}: header line '# {req}: ...' is required")
    if "user" not in sections:
        raise TemplateError(f"{path}: a [user] section is required")
    parser = header["parser"]
    if parser not in PARSERS:
        raise TemplateError(f"{path}: unknown parser {parser!r} (known: {sorted(PARSERS)})")
    dims: list[tuple[str, str]] = []
    if header.get("dimensions"):
        for part in header["dimensions"].split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise TemplateError(f"{path}: dimensions must read 'KEY=Label; KEY=Label', got {part!r}")
            k, label = part.split("=", 1)
            dims.append((k.strip(), label.strip()))
    if parser == "dimension_scores" and not dims:
        raise TemplateError(f"{path}: parser dimension_scores needs a '# dimensions: KEY=Label; ...' line")
    if header.get("image_encoding", "file") not in IMAGE_ENCODINGS:
        raise TemplateError(f"{path}: '# image_encoding: {header['image_encoding']}' must be one of {IMAGE_ENCODINGS}")
    known = {"name", "version", "parser", "max_tokens", "dimensions"}
    return JudgeTemplate(
        name=header.get("name") or Path(path).stem,
        version=header["version"],
        parser=parser,
        system="\n".join(sections.get("system", [])).strip(),
        user="\n".join(sections["user"]).strip(),
        max_tokens=_max_tokens(header.get("max_tokens", "512"), path),
        dimensions=tuple(dims),
        options={k: v for k, v in header.items() if k not in known},
        path=str(path),
    )


def load_template(name_or_path: str | os.PathLike) -> JudgeTemplate:
    """A built-in template by name (``geneval_pp``, ``imagine_bench``, ``omnicontext_pf``, ...) or a file; a file
    that is not a usable template raises TemplateError (a JudgeConfigError and a ValueError) naming it."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not p.is_file():
        builtin = sorted(q.stem for q in TEMPLATE_DIR.glob("*.txt"))
        raise FileNotFoundError(f"judge template {name_or_path!r} not found (built-in: {builtin})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{p}: not UTF-8 text ({e.reason})") from None
    return _parse_template_text(text, str(p))


# ------------------------------------------------------------------------------------------------
# Parsers
# ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.S)


def extract_json_object(text: str) -> dict:
    """The first JSON object in `text` (inside ``` fences first), ignoring prose around it."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer("empty answer")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    for cand in candidates:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = dec.raw_decode(cand, start)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                return _clean_strings(obj)
            start = cand.find("{", start + 1)
    raise MalformedAnswer("no JSON object in the answer")


def _clean_strings(obj: Any) -> Any:
    """`obj` (parsed JSON) with :func:`clean_text` applied to every string in it: a "\\ud83d" escape in an
    answer's JSON parses to a lone surrogate, which no file or later request can hold."""
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {_clean_strings(k): _clean_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_strings(v) for v in obj]
    return obj


def _get_ci(obj: dict, *names: str):
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    for n in names:
        if n.lower() in low:
            return low[n.lower()]
    return None


def _as_score(v: Any, what: str) -> float:
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or v is None:
        raise MalformedAnswer(f"{what}: not a number: {v!r}")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", v)
        if not m:
            raise MalformedAnswer(f"{what}: not a number: {v!r}")
        v = float(m.group(1))
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MalformedAnswer(f"{what}: not a number: {v!r}") from None
    if not math.isfinite(f) or not 0.0 <= f <= 10.0:
        raise MalformedAnswer(f"{what}: {f} outside [0, 10]")
    return f


def parse_verdict_json(text: str, tpl: JudgeTemplate | None = None) -> dict:
    """``{"correct": 0|1, "reason": ...}`` -> {"correct": 0|1, "reason": str}."""
    obj = extract_json_object(text)
    v = _get_ci(obj, "correct")
    if isinstance(v, bool):
        c = int(v)
    elif isinstance(v, (int, float)) and v in (0, 1):
        c = int(v)
    elif isinstance(v, str) and v.strip().lower() in ("0", "1", "true", "false", "yes", "no"):
        c = 1 if v.strip().lower() in ("1", "true", "yes") else 0
    else:
        raise MalformedAnswer(f'"correct" must be 0 or 1, got {v!r}')
    reason = _get_ci(obj, "reason", "reasoning", "explanation")
    return {"correct": c, "reason": "" if reason is None else str(reason)}


def parse_score_json(text: str, tpl: JudgeTemplate | None = None) -> dict:
    """``{"score": 0-10, "reasoning": ...}`` -> {"score": float, "reason": str}."""
    obj = extract_json_object(text)
    v = _get_ci(obj, "score")
    if v is None:
        raise MalformedAnswer('no "score" in the JSON answer')
    reason = _get_ci(obj, "reasoning", "reason", "explanation")
    return {"score": _as_score(v, "score"), "reason": "" if reason is None else str(reason)}


def _label_regex(label: str) -> str:
    return r"[\s_\-]+".join(re.escape(w) for w in label.split())


# What may not follow a score on a ``<Label>: <score>`` line: another number glued to it (``1,5``, ``1-3``,
# ``7/8``, ``8/100``, ``1.5.2``) or joined by a word (``7 or 8``, ``1 to 3``). Such a score is ambiguous.
_AMBIGUOUS_SCORE_TAIL = re.compile(r"[*_]*(?:\d|[,.\-–—~/]\d|\s+(?:to|or)\s+\d)", re.I)
# A bare score followed by a dash and a larger number up to 10 (``1 - 3 faint``, ``7 – 9/10``) reads as a
# range (the rubric's bands, spaced): ambiguous too. A smaller number after the dash starts a reason
# (``8 - 3 of 4 traits``), and so does any number after a score written out of 10 (``3/10 - 8 traits``).
_SPACED_RANGE_TAIL = re.compile(r"[*_]*\s*[\-–—~]\s*[*_]*(\d+(?:\.\d+)?)")


def _ambiguous_tail(score: float, out_of_ten: bool, tail: str) -> bool:
    if _AMBIGUOUS_SCORE_TAIL.match(tail):
        return True
    m = None if out_of_ten else _SPACED_RANGE_TAIL.match(tail)
    return m is not None and score < float(m.group(1)) <= 10


_REASON_LABEL = re.compile(r"^(?:reason|reasoning|justification)\s*[*_]*\s*[:：]\s*[*_]*\s*", re.I)


def parse_dimension_scores(text: str, tpl: JudgeTemplate) -> dict:
    """``<Label>: <0-10>`` lines (Markdown allowed), each optionally followed by a reason; or JSON.

    A score line must hold one number (``8``, ``8.5``, ``8/10``; after it a reason, e.g. ``8 - sharp``);
    an ambiguous one (``1,5``, ``1-3``, ``1 - 3``, ``7 or 8``) or a label scored twice with different numbers makes
    the answer malformed (asked again), never a truncated score.

    -> {"scores": {KEY: float}, "reasons": {KEY: str}}.
    """
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer("empty answer")
    lines = text.splitlines()
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    label_res = {k: _label_regex(lab) for k, lab in tpl.dimensions}
    # a label line may start as a list item or a heading ("1. ", "- ", "### ", "> **")
    lead = r"^[\s>#*_\-\d.)]*"
    any_label = re.compile(lead + r"(?:" + "|".join(f"(?:{r})" for r in label_res.values()) + r")\b", re.I)
    for key, rx in label_res.items():
        pat = re.compile(lead + rx + r"[\s*_]*(?:\([^)]*\))?[\s*_]*[:：=\-][\s*_]*"
                         r"(-?\d+(?:\.\d+)?)([*_]*\s*/\s*10(?!\d))?(.*)$", re.I)
        for i, line in enumerate(lines):
            m = pat.match(line)
            if not m:
                continue
            score = _as_score(m.group(1), key)
            if _ambiguous_tail(score, m.group(2) is not None, m.group(3)):
                raise MalformedAnswer(f"{key}: ambiguous score in {line.strip()!r} (expected one number 0-10)")
            if key in scores:
                if score != scores[key]:
                    raise MalformedAnswer(f"{key}: two different scores ({scores[key]:g} and {score:g})")
                continue
            scores[key] = score
            reason = m.group(3).strip().lstrip("-–—:.;,|*_ ").strip()
            if not reason:
                for nxt in lines[i + 1:]:
                    if nxt.strip():
                        if not any_label.match(nxt):  # (a "Reason: ..." line: the official format)
                            reason = _REASON_LABEL.sub("", nxt.strip().lstrip("-–—:*_ ").strip())
                        break
            reasons[key] = reason
    if len(scores) < len(label_res):
        try:
            obj = extract_json_object(text)
        except MalformedAnswer:
            obj = None
        if obj is not None:
            for key, label in tpl.dimensions:
                if key in scores:
                    continue
                v = _get_ci(obj, label, key, label.replace(" ", "_"))
                if isinstance(v, dict):
                    r = _get_ci(v, "reason", "reasoning")
                    v = _get_ci(v, "score")
                    reasons[key] = "" if r is None else str(r)
                if v is not None:
                    scores[key] = _as_score(v, key)
                    reasons.setdefault(key, "")
    missing = [lab for k, lab in tpl.dimensions if k not in scores]
    if missing:
        raise MalformedAnswer(f"no score for {missing}")
    return {"scores": scores, "reasons": reasons}


PARSERS: dict[str, Callable[[str, JudgeTemplate], dict]] = {
    "verdict_json": parse_verdict_json,
    "score_json": parse_score_json,
    "dimension_scores": parse_dimension_scores,
}


# ------------------------------------------------------------------------------------------------
# Images, cache keys, cache
# ------------------------------------------------------------------------------------------------

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


class UnreadableImage(ValueError):
    pass


# a template's '# image_encoding:' option (default file); official_omnicontext: the official OmniContext templates'
IMAGE_ENCODINGS = ("file", "official_jpeg", "official_omnicontext")
OMNICONTEXT_INPUT_PIXELS = 1024 * 1024  # Echo-4o's test_omnicontext_score.py: the input images' area limit
OMNICONTEXT_INPUT_MULTIPLE = 16  # ... and the multiple their sides are floored to


def omnicontext_input_size(w: int, h: int) -> tuple[int, int]:
    """The size an OmniContext input (reference) image is resized to before the official scorer sends it (Echo-4o's
    ``test_omnicontext_score.py``, as OmniGen2's): scaled by sqrt(1024^2 / area) when larger than 1024^2 pixels
    (each side truncated to an integer), then each side floored to a multiple of 16 (also when it was not larger)."""
    if w * h > OMNICONTEXT_INPUT_PIXELS:
        r = math.sqrt(OMNICONTEXT_INPUT_PIXELS / (w * h))
        w, h = int(w * r), int(h * r)
    m = OMNICONTEXT_INPUT_MULTIPLE
    return w // m * m, h // m * m


def encode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, encoding: str | None = None,
                 mime: str | None = None, *, reference: bool = False) -> str:
    """A ``data:`` URL for image bytes: the bytes themselves, or a JPEG re-encode if too large/odd.

    ``encoding="official_jpeg"``: what the official GenEval++ / Imagine-Bench scripts send, whatever the file:
    ``convert("RGB")`` and a JPEG at PIL's default quality (75), full size (`max_pixels` ignored), labelled
    `mime` (default image/jpeg; the Imagine-Bench script labels its JPEG image/png).

    ``encoding="official_omnicontext"``: the official OmniContext scorer's images. A `reference` (input) image is
    first resized (PIL's default filter, in its own mode) to :func:`omnicontext_input_size`, as Echo-4o's
    ``test_omnicontext_score.py`` does; the generated image is sent at full size. Then, as ``official_jpeg``:
    ``convert("RGB")``, a JPEG at PIL's default quality. UNVERIFIED: that JPEG and its quality -- the transport
    (OmniGen2's ``openai_util.ask_gpt4o``) could not be read; ``shared/docs/echo4o.md`` 6.3 says JPEG data
    URLs, the quality is our choice (that of the other official scripts)."""
    from PIL import Image

    if encoding not in (None, *IMAGE_ENCODINGS):
        raise JudgeConfigError(f"image_encoding {encoding!r}: expected one of {IMAGE_ENCODINGS}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size
            if encoding in ("official_jpeg", "official_omnicontext"):
                if encoding == "official_omnicontext" and reference:
                    size = omnicontext_input_size(w, h)
                    if min(size) < 1:
                        raise UnreadableImage(f"a {w}x{h} input image is smaller than the official scorer's "
                                              f"{OMNICONTEXT_INPUT_MULTIPLE}-pixel multiple: it cannot be resized")
                    im = im.resize(size)
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG")
                return f"data:{mime or 'image/jpeg'};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            if fmt in _MIME and (not max_pixels or w * h <= max_pixels):
                im.load()  # (decoded: verify() reads no JPEG data, and a JPEG cut short was judged as it was)
                return f"data:{_MIME[fmt]};base64," + base64.b64encode(data).decode("ascii")
            im = im.convert("RGB")
            if max_pixels and w * h > max_pixels:
                s = math.sqrt(max_pixels / (w * h))
                im = im.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
    except UnreadableImage:
        raise
    except Exception as e:  # PIL raises many kinds for broken files
        raise UnreadableImage(f"cannot read image: {type(e).__name__}: {e}") from None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cache_key(image_sha256: Sequence[str], system: str, user: str, model: str, template_ident: str,
              max_pixels: int | None, request: dict) -> str:
    """`request`: what else makes the answer (endpoint, temperature, max_tokens, image detail): another server
    or settings must not be answered from the cache, nor credited with answers it never gave."""
    blob = json.dumps({"images": list(image_sha256), "system": system, "user": user, "model": model,
                       "template": template_ident, "max_pixels": max_pixels, "request": request}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """One JSON file per key (``<dir>/<key[:2]>/<key>.json``); safe across threads and processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        write_json(self._path(key), record, ensure_ascii=False, fsync=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0


# ------------------------------------------------------------------------------------------------
# Secrets
# ------------------------------------------------------------------------------------------------

_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")
_BEARER = re.compile(r"(?i)\bBearer\s+\S+")


def redact(text: str, secrets: Iterable[str] = (), *, patterns: bool = True) -> str:
    """`text` without the `secrets` and (`patterns`) anything shaped like a key ("sk-...", "Bearer ...": for
    error texts; not for a model's answers, where they rewrite ordinary words: "a flag bearer holding ...")."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[REDACTED]")
    if not patterns:
        return text
    text = _KEYLIKE.sub("sk-[REDACTED]", text)
    return _BEARER.sub("Bearer [REDACTED]", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with its lone surrogates (half an emoji in a JSON answer: "\\ud83d") replaced by U+FFFD: UTF-8
    files and HTTP request bodies cannot hold them (a str holds surrogates only unpaired)."""
    return _SURROGATE.sub("\ufffd", text)


# an environment variable's name as people write them: upper case, short words (OPENAI_API_KEY); a key passed by
# mistake (sk-..., gsk_..., mixed-case or long random runs) is not one, and must not be echoed or stored as a name
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_ENV_NAME_WORD_MAX = 24


def check_api_key_env(name: Any, *, flag: str = "--api-key-env", error: type[Exception] = ValueError) -> None:
    """Raise `error` unless `name` is an environment variable's name. The message never shows the value:
    a key passed by mistake (``--api-key-env "$OPENAI_API_KEY"``) would otherwise be printed, and stored
    in the manifests that record the settings."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name) \
            or max(len(w) for w in name.split("_")) > _ENV_NAME_WORD_MAX:
        raise error(f"{flag}: expected the name of an environment variable (upper-case letters, digits and "
                    f"underscores, words of at most {_ENV_NAME_WORD_MAX} characters, e.g. OPENAI_API_KEY), got "
                    "something else (not shown: it may be the key itself; the key is read from the variable named "
                    "here, never given on the command line)")


def api_key_from_env(name: str | None, *, require: bool, error: type[Exception]) -> str | None:
    """The API key in environment variable `name` (None when it is unset or empty and `require` is False).
    Raises `error` naming the variable, never its value, when the key is required but missing, or when it
    holds whitespace or control characters (a pasted key with a trailing newline or spaces: the HTTP
    client would fail every call with a bare "Connection error.")."""
    if name:
        check_api_key_env(name, flag="api_key_env", error=error)
    value = os.environ.get(name, "") if name else ""
    if not value:
        if require:
            raise error(f"no API key: the environment variable {name or '(none)'} is not set (--api-key-env NAME "
                        "reads another variable; --no-api-key for a local server without authentication)")
        return None
    bad = sorted({("a newline" if c in "\r\n" else "a space" if c == " " else "a tab" if c == "\t" else
                   f"control character {ord(c):#04x}") for c in value if c.isspace() or ord(c) < 32 or ord(c) == 127})
    if bad:
        where = "at its ends" if value.strip() and not any(c.isspace() for c in value.strip()) else "in it"
        raise error(f"the API key in the environment variable {name} holds {', '.join(bad)} {where} (its value is "
                    f"not shown): set it without them, e.g. export {name}=\"$(printf %s \"${name}\" | tr -d '[:space:]')\"")
    return value


def check_base_url(url: str | None, *, flag: str = "--base-url") -> None:
    """Raise a ValueError naming `flag` unless `url` (None: OpenAI's own) is an http(s) URL with a host and
    a valid port, and no query or fragment: the client appends its endpoint paths to the URL, so a query
    would end up before them (every call a 404), and the key belongs in the environment, not in the URL.
    The message shows the URL without its userinfo or query (`_public_url`). With `url` None the environment's
    ``OPENAI_BASE_URL``, which the client then calls, is checked the same way when it is set."""
    if url is None:
        url = os.environ.get("OPENAI_BASE_URL")
        if url is None:
            return
        flag = "the environment variable OPENAI_BASE_URL (the client's base URL when none is given)"
    from urllib.parse import urlsplit

    shown = _public_url(url) if isinstance(url, str) else url
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{flag}: expected an http(s) URL such as http://127.0.0.1:8000/v1, got {shown!r}")
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        # a value that is not even URL-shaped may be a key passed in the wrong place: not shown (one with an "@"
        # is shown without what precedes it)
        got = repr(shown) if "://" in url or "@" in url else \
            "something else (not shown: it is not a URL and may be a key)"
        raise ValueError(f"{flag}: expected an http(s) URL with a host, such as http://127.0.0.1:8000/v1, got {got}")
    if "@" in p.netloc:  # the client would send user:password as Basic auth, instead of the environment's key
        raise ValueError(f"{flag}: {shown!r} carries credentials (user:password@ before the host, not shown); give "
                         "the URL without them (the API key is read from the environment: --api-key-env)")
    try:
        p.port
    except ValueError:
        raise ValueError(f"{flag}: the port of {shown!r} is not a number in 0-65535") from None
    if p.query or p.fragment or url.rstrip().endswith(("?", "#")):
        raise ValueError(f"{flag}: {shown!r} carries a query or fragment ('?...' / '#...'), which the client "
                         "would put before its endpoint paths; give the base URL alone (an API key is read from "
                         "the environment: --api-key-env)")


def effective_base_url(url: str | None) -> str | None:
    """The base URL the ``openai`` client calls: `url`, else the environment's ``OPENAI_BASE_URL`` (which the
    client reads when given none), else None (OpenAI's own). What manifests and results record."""
    return url or os.environ.get("OPENAI_BASE_URL") or None


def _public_url(url: str | None) -> str | None:
    """A base URL without userinfo, query or a key-shaped path segment (a gateway's "/sk-.../v1"): never store
    credentials that might hide there."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    if p.scheme in ("http", "https") and p.hostname:
        host = p.netloc.rpartition("@")[2]  # (the port as written: it may be out of range)
        return urlunsplit((p.scheme, host, redact(p.path), "", ""))
    # not a URL urlsplit reads as one (no scheme: "user:key@host/v1" parses as scheme "user"): cut the query
    # and fragment, and anything before an "@"
    cut = url.split("?", 1)[0].split("#", 1)[0]
    return "***@" + redact(cut.rpartition("@")[2]) if "@" in cut else redact(cut)


# ------------------------------------------------------------------------------------------------
# The judge
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class JudgeRequest:
    template: JudgeTemplate
    variables: dict[str, Any]
    images: list[str | os.PathLike]


@dataclasses.dataclass
class JudgeResult:
    ok: bool
    parsed: dict | None = None
    raw: str | None = None  # the judge's last answer (also for a malformed one)
    error: str | None = None
    cached: bool = False
    calls: int = 0  # HTTP calls made for this request (0 when cached)
    key: str | None = None
    image_error: bool = False  # an input image could not be read (not the judge's fault)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _ItemFailure(Exception):
    def __init__(self, msg: str, calls: int):
        super().__init__(msg)
        self.calls = calls


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    for name, div in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            return max(0.0, float(v) / div)
        except ValueError:
            continue
    return None


class Judge:
    """Thread-safe judge client. See the module docstring for the policies."""

    def __init__(self, model: str = DEFAULT_MODEL, base_url: str | None = None, *,
                 api_key_env: str = "OPENAI_API_KEY", require_api_key: bool = True,
                 cache_dir: str | os.PathLike | None = None, concurrency: int = 8,
                 max_retries: int = 5, malformed_retries: int = 2, timeout: float = 120.0,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, client_max_retries: int = 0,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, temperature: float = 0.0,
                 client: Any = None, sleep: Callable[[float], None] | None = None):
        check_base_url(base_url, flag="base_url")
        check_api_key_env(api_key_env, flag="api_key_env", error=JudgeConfigError)
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.require_api_key = require_api_key
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.malformed_retries = max(0, int(malformed_retries))
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.client_max_retries = client_max_retries
        self.max_image_pixels = max_image_pixels
        self.temperature = temperature
        self._client = client
        self._stop = threading.Event()  # set by judge_many when interrupted: no new call, no retry
        self._sleep = sleep or self._stop.wait  # (a backoff ends early when stopped)
        self._secrets: list[str] = []
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "api_calls": 0, "cache_hits": 0, "failures": 0, "retries": 0,
                      "malformed": 0}

    # -- public ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"model": self.model, "base_url": _public_url(effective_base_url(self.base_url)),
                "temperature": self.temperature,
                "max_image_pixels": self.max_image_pixels, "max_retries": self.max_retries,
                "malformed_retries": self.malformed_retries}

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def stats_snapshot(self) -> dict[str, int]:
        """A copy of the counters (``stats`` totals everything this Judge did)."""
        with self._lock:
            return dict(self.stats)

    def stats_since(self, snapshot: dict[str, int]) -> dict[str, int]:
        """The counters' growth since `snapshot` (from :meth:`stats_snapshot`): one benchmark's share."""
        now = self.stats_snapshot()
        return {k: v - snapshot.get(k, 0) for k, v in now.items()}

    def judge(self, req: JudgeRequest) -> JudgeResult:
        self._count("requests")
        tpl = req.template
        try:
            blobs = [Path(p).read_bytes() for p in req.images]
        except OSError as e:
            self._count("failures")
            return JudgeResult(ok=False, error=self.redact(f"cannot read image: {e}"), image_error=True)
        digests = [hashlib.sha256(b).hexdigest() for b in blobs]
        system, user = tpl.render(req.variables)
        key = cache_key(digests, system, user, self.model, tpl.ident, self.max_image_pixels,
                        {"endpoint": _public_url(effective_base_url(self.base_url)), "temperature": self.temperature,
                         "max_tokens": tpl.max_tokens, "options": tpl.options})
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and isinstance(hit.get("raw"), str):
                try:
                    parsed = tpl.parse(hit["raw"])
                except MalformedAnswer:
                    parsed = None
                if parsed is not None:
                    self._count("cache_hits")
                    return JudgeResult(ok=True, parsed=parsed, raw=hit["raw"], cached=True, key=key)
        try:
            # (the last image is the one judged; those before it are references: official_omnicontext resizes them)
            urls = [encode_image(b, self.max_image_pixels, tpl.options.get("image_encoding"),
                                 tpl.options.get("image_mime"), reference=i < len(blobs) - 1)
                    for i, b in enumerate(blobs)]
        except UnreadableImage as e:
            self._count("failures")
            return JudgeResult(ok=False, error=str(e), key=key, image_error=True)
        content: list[dict] = [{"type": "text", "text": user}]
        detail = tpl.options.get("image_detail")
        for u in urls:
            part = {"url": u}
            if detail:
                part["detail"] = detail
            content.append({"type": "image_url", "image_url": part})
        sys_content = [{"type": "text", "text": system}] if tpl.options.get("system_content") == "parts" else system
        messages = ([{"role": "system", "content": sys_content}] if system else []) + [
            {"role": "user", "content": content}]

        calls = 0
        raw: str | None = None
        error = None
        for attempt in range(1 + self.malformed_retries):
            try:
                answer, n = self._complete(messages, tpl.max_tokens)
                calls += n
            except _ItemFailure as e:
                calls += e.calls
                self._count("failures")
                return JudgeResult(ok=False, raw=raw, error=self.redact(str(e)), calls=calls, key=key)
            # everything kept (raw, parsed: reasons are answer text) comes from the answer without the key; not
            # without key-shaped words ("a flag bearer too"], cut at "Bearer": a valid answer made unreadable)
            raw = redact(answer, self._secrets, patterns=False)
            try:
                parsed = tpl.parse(raw)
            except MalformedAnswer as e:
                self._count("malformed")
                error = f"malformed answer after {attempt + 1} tries: {e}"
                log.info("judge: malformed answer (%s), %s", e, "retrying" if attempt < self.malformed_retries
                         else "giving up")
                continue
            if self.cache is not None:
                self.cache.put(key, {"key": key, "model": self.model, "template": tpl.ident,
                                     "images_sha256": digests, "raw": raw, "parsed": parsed,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return JudgeResult(ok=True, parsed=parsed, raw=raw, calls=calls, key=key)
        self._count("failures")
        return JudgeResult(ok=False, raw=raw, error=error, calls=calls, key=key)

    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = False,
                   desc: str = "judging") -> list[JudgeResult]:
        """Judge all requests with `concurrency` threads; results in the order of `requests`."""
        if not requests:
            return []
        out: list[JudgeResult | None] = [None] * len(requests)
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(requests), desc=desc, unit="img")
            except ImportError:
                bar = None
        self._stop.clear()
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        futs: dict[cf.Future, int] = {}
        try:
            for i, r in enumerate(requests):
                futs[pool.submit(self.judge, r)] = i
            for fut in cf.as_completed(futs):
                out[futs[fut]] = fut.result()  # JudgeFatalError / JudgeConfigError propagate
                if bar is not None:
                    bar.update(1)
        except BaseException:
            # (a Ctrl-C, a fatal error): the calls in flight end, nothing new is sent (their retries went on,
            # each a new paid request, for minutes after a Ctrl-C)
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            running = sum(f.running() for f in futs)
            if running:
                print(f"stopping: waiting for {running} judge call(s) in flight (at most {self.timeout:g} s, "
                      "--timeout); nothing new is sent", file=sys.stderr, flush=True)
            pool.shutdown(wait=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        pool.shutdown(wait=True)
        return out  # type: ignore[return-value]

    # -- internals -------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def _get_client(self):
        with self._lock:
            if self._client is not None:
                return self._client
            key = api_key_from_env(self.api_key_env, require=self.require_api_key, error=JudgeConfigError)
            if key is None:
                key = "no-key"
            else:
                self._secrets.append(key)
            from openai import OpenAI

            self._client = OpenAI(api_key=key, base_url=self.base_url, max_retries=self.client_max_retries,
                                  timeout=self.timeout)
            return self._client

    def _backoff(self, attempt: int, headers=None) -> float:
        ra = _retry_after(headers)
        if ra is not None:
            return min(ra, self.backoff_max)
        base = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return base * (0.5 + 0.5 * random.random())

    def _complete(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        """One answer's text, retrying transient errors; -> (text, HTTP calls made). Errors are sorted as the
        synthesis client sorts them (:func:`echo4o_jax.synth.client.classify_error`): 401 / 403 / 404 and no
        quota abort the run, another 4xx (a content-policy refusal included) fails the item, the rest is
        retried."""
        from echo4o_jax.synth.client import classify_error

        client = self._get_client()
        calls = 0
        while True:
            if self._stop.is_set():
                raise _ItemFailure(f"stopped (the run was interrupted) after {calls} call(s)", calls)
            calls += 1
            self._count("api_calls")
            try:
                resp = client.chat.completions.create(model=self.model, messages=messages,
                                                      temperature=self.temperature, max_tokens=max_tokens)
                choices = getattr(resp, "choices", None)
                if not choices:
                    raise ValueError("response without choices")
                return clean_text(choices[0].message.content or ""), calls
            except Exception as e:  # noqa: BLE001 -- sorted by classify_error; unknown kinds re-raised
                verdict = classify_error(e)
                if verdict is None:
                    raise ClientCallError(self.redact(f"{type(e).__name__}: {e}")) from None
            action, err, headers = verdict
            if action == "fatal":
                raise JudgeFatalError(self.redact(f"judge: {err}")) from None
            if action in ("fail", "refused"):
                raise _ItemFailure(err, calls) from None
            if calls > self.max_retries:
                raise _ItemFailure(f"gave up after {calls} calls; last error: {err}", calls)
            self._count("retries")
            delay = self._backoff(calls, headers)
            log.info("judge: %s; retry %d/%d in %.2fs", self.redact(err), calls, self.max_retries, delay)
            self._sleep(delay)
