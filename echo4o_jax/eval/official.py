"""The official judge prompts, read at run time from the benchmarks' own evaluation scripts.

The official scripts' text is never part of this repository (what the project contains, we write): the user
points ``--official-scripts DIR`` at a folder holding them, or ``--fetch`` downloads the public files there
(``reference.ECHO4O_RAW``, the folder the prompt files come from). This module parses a script with
:mod:`ast` -- it is never imported or run as a whole -- and turns what the judge needs into
:class:`~echo4o_jax.eval.judge.JudgeTemplate` objects:

* **GenEval++** (``Eval-gpt-4.1-geneval++.py``): the module-level ``SYSTEM_PROMPT`` string; the user text, the
  f-string of ``process_sample`` holding ``{instruction}`` and ``{explanation}`` (they become our ``{{prompt}}``
  and ``{{checklist}}``); the checklist, made by the script's own ``metadata_to_explanation(metadata)``:
  that one function definition is compiled alone and called with each prompt record (see
  :func:`checked_function`: its syntax tree is checked to hold plain expressions only, and it runs with no
  builtins), so the checklist is the official one to the character without its phrases being written here.
* **Imagine-Bench** (``Eval-gpt-4.1-Imagine.py``): the system text and the user f-string of ``build_messages``
  (``prompt_data['instruction']`` / ``prompt_data['note']`` become ``{{prompt}}`` / ``{{note}}``); its
  ``Label: <score>`` answers are read by our ``dimension_scores`` parser.
* Both: ``max_tokens`` (and the temperature and model, recorded) from the script's ``.create(...)`` call, the
  ``data:`` URL's MIME type from its image part, and the script's image encoding (a full-size JPEG re-encode
  at PIL's default quality; the template option ``image_encoding: official_jpeg``).
* **OmniContext** (OmniGen2's ``omnicontext/prompt_generator.py``): the ``__call__`` method of its
  ``PromptGenerator`` (a preamble string plus one of four rule strings, the instruction marker replaced by the
  instruction) is compiled alone and run with the module-level strings (and the class's string attributes) as
  its only names (:func:`checked_function`), with our ``{{instruction}}`` as the instruction: once per judge
  call, with the keywords OmniGen2's ``OmniContextScore.evaluate`` passes (:data:`OMNICONTEXT_CALLS`): prompt
  following always without the scene rule (scene_* tasks too), subject consistency with it for scene_* tasks.
  Each text is a user message with no system message, answered as ``{"score": ..., "reasoning": ...}`` (our
  ``score_json`` parser). The images: the input images resized as Echo-4o's ``test_omnicontext_score.py``
  (area <= 1024^2, sides floored to multiples of 16), the output image at full size (``image_encoding:
  official_omnicontext``). **Unverified**: the transport, OmniGen2's ``openai_util.ask_gpt4o``, could not be
  read; we send the text first, then the input images and the output image, each a JPEG at PIL's default
  quality, ``max_tokens`` 1400 (``shared/docs/echo4o.md`` 6.3), at the judge's temperature (0) -- recorded as
  ``unverified`` in results.json's ``judge_prompts``.

A template's name is ``<benchmark>_official`` (OmniContext: ``omnicontext_<call>_official``) and its version the
script's sha256 prefix, so cached answers of another script (or of our own prompts) are never reused.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable

from . import common
from .judge import JudgeTemplate, _PLACEHOLDER
from .reference import GENEVAL_PP_SCRIPT_URL, IMAGINE_BENCH_SCRIPT_URL, OMNICONTEXT_SCRIPT_URL

OFFICIAL_DIR = common.OFFICIAL_SCRIPTS_DIR  # default folder of the scripts: under --benchmarks-dir, beside --prompts
EXTRACTOR_VERSION = 1  # bump when what is taken from a script changes (it keys the judge cache)
SCRIPTS = {  # benchmark -> (file name in the folder, public URL)
    "geneval_pp": ("Eval-gpt-4.1-geneval++.py", GENEVAL_PP_SCRIPT_URL),
    "imagine_bench": ("Eval-gpt-4.1-Imagine.py", IMAGINE_BENCH_SCRIPT_URL),
    "omnicontext": ("prompt_generator.py", OMNICONTEXT_SCRIPT_URL),
}
# the scripts' values, when not a constant (OmniContext: shared/docs/echo4o.md 6.3; its transport is not read)
DEFAULT_MAX_TOKENS = {"geneval_pp": 200, "imagine_bench": 1024, "omnicontext": 1400}
# OmniContext: our template key -> the keywords OmniContextScore.evaluate passes to PromptGenerator (after the
# instruction): prompt following without with_scene (so never the scene rule, scene_* tasks too), subject
# consistency with with_scene = the task is a scene_* one (test_omnicontext_score.py)
OMNICONTEXT_CALLS = {
    "pf": {"task_type": "prompt_following"},
    "sc": {"task_type": "subject_consistency", "with_scene": False},
    "sc_scene": {"task_type": "subject_consistency", "with_scene": True},
}
OMNICONTEXT_UNVERIFIED = (
    "the transport (OmniGen2's openai_util.ask_gpt4o) could not be read: one user message, the prompt text then the "
    "input images (resized as test_omnicontext_score.py: area <= 1024^2, sides floored to multiples of 16) and the "
    "output image (full size), each a JPEG at PIL's default quality; max_tokens 1400; the judge's temperature "
    "(0). Known besides: the official scorer asks each question 3 times and keeps the last parsed answer (a random "
    "score when none parses); we ask once and list a failure")


class OfficialScriptError(common.UsageError):
    """An official script that cannot be used (its message names the file and what is missing)."""


@dataclasses.dataclass(frozen=True)
class OfficialPrompts:
    """What a benchmark judges with in ``--judge-prompts official`` mode."""
    benchmark: str
    template: JudgeTemplate
    path: str
    sha256: str
    url: str
    request: dict  # the script's constant .create() keywords (model, temperature, max_tokens)
    checklist: Callable[[dict], str] | None = None  # GenEval++: metadata_to_explanation
    templates: dict[str, JudgeTemplate] | None = None  # OmniContext: one per judge call ("pf", "sc", "sc_scene")
    unverified: str | None = None  # what of the protocol could not be read from an official source

    def describe(self) -> dict:
        d = {"kind": "official", "script": self.path, "sha256": self.sha256, "url": self.url,
             "script_request": self.request,
             "template": ({k: t.ident for k, t in self.templates.items()} if self.templates
                          else self.template.ident)}
        if self.unverified:
            d["unverified"] = self.unverified
        return d


# ------------------------------------------------------------------------------------------------
# finding the scripts
# ------------------------------------------------------------------------------------------------

def script_path(benchmark: str, folder: str | Path) -> Path:
    return Path(folder) / SCRIPTS[benchmark][0]


def resolve_script(benchmark: str, folder: str | Path, do_fetch: bool, *, folder_flag: str = "--official-scripts DIR",
                   mode_flag: str = "--judge-prompts ours") -> Path:
    """The official script of `benchmark` in `folder`, or (``--fetch``, absent) downloaded there. Absent without
    ``--fetch``: a FileNotFoundError naming the file, ``--fetch``, the folder flag and the way to our prompts."""
    name, url = SCRIPTS[benchmark]
    p = Path(folder) / name
    if p.is_file():
        return p
    if not do_fetch:
        raise FileNotFoundError(
            f"official judge prompts: {p} not found; pass --fetch to download the official script from {url} to "
            f"{p}, point {folder_flag} at a folder holding {name}, or pass {mode_flag} (our own wording: scores not "
            "comparable with the paper's)")
    print(f"fetching {url} -> {p}", file=sys.stderr)
    return common.fetch(url, p)


def load(benchmark: str, path: str | Path, url: str | None = None) -> OfficialPrompts:
    """The judge template (and GenEval++'s checklist) extracted from the official script at `path`."""
    return {"geneval_pp": geneval_pp_prompts, "imagine_bench": imagine_bench_prompts,
            "omnicontext": omnicontext_prompts}[benchmark](path, url or SCRIPTS[benchmark][1])


# ------------------------------------------------------------------------------------------------
# syntax-tree helpers
# ------------------------------------------------------------------------------------------------

def _read(path: str | Path) -> tuple[ast.Module, str, str]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise OfficialScriptError(f"{p}: cannot read the official script: {e.strerror or e}") from None
    try:
        tree = ast.parse(data.decode("utf-8"), filename=str(p))
    except (UnicodeDecodeError, SyntaxError, ValueError) as e:
        raise OfficialScriptError(f"{p}: not a Python script this version can read ({type(e).__name__}: {e})") from None
    return tree, hashlib.sha256(data).hexdigest(), str(p)


def _err(where: str, what: str) -> OfficialScriptError:
    return OfficialScriptError(f"{where}: {what} (is this the official script? its layout may have changed)")


def _module_string(tree: ast.Module, name: str, where: str) -> str:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
            raise _err(where, f"{name} is not a plain string")
    raise _err(where, f"no module-level string {name}")


def _function(tree: ast.Module, name: str, where: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise _err(where, f"no function {name}()")


def _template_text(node: ast.JoinedStr, names: Callable[[ast.expr], str | None], where: str) -> str:
    """An f-string as template text: literal parts as they are, each ``{value}`` our ``{{placeholder}}``
    (``names(value)``; any other value, a conversion or a format spec is an error)."""
    out = []
    for part in node.values:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            if _PLACEHOLDER.search(part.value):
                raise _err(where, f"its text holds {_PLACEHOLDER.search(part.value).group(0)!r}, which reads as one "
                                  "of our template placeholders")
            out.append(part.value)
        elif isinstance(part, ast.FormattedValue) and part.conversion == -1 and part.format_spec is None \
                and names(part.value):
            out.append("{{" + names(part.value) + "}}")
        else:
            raise _err(where, f"unexpected value {ast.unparse(part)!r} in the message f-string (line {node.lineno})")
    return "".join(out)


def _fstrings_with(func: ast.AST, names: Callable[[ast.expr], str | None], need: set[str]) -> list[ast.JoinedStr]:
    """The f-strings in `func` whose values include every placeholder in `need`."""
    found = []
    for node in ast.walk(func):
        if isinstance(node, ast.JoinedStr):
            got = {names(v.value) for v in node.values if isinstance(v, ast.FormattedValue)}
            if need <= got:
                found.append(node)
    return found


def _one_fstring(func: ast.AST, names, need: set[str], where: str) -> str:
    found = _fstrings_with(func, names, need)
    if len(found) != 1:
        raise _err(where, f"expected one message f-string with {sorted(need)}, found {len(found)}")
    return _template_text(found[0], names, where)


def _request(tree: ast.Module, where: str) -> dict:
    """The constant keywords (model, temperature, max_tokens) of the script's one ``.create(messages=...)`` call."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "create" and any(k.arg == "messages" for k in n.keywords)]
    if len(calls) != 1:
        raise _err(where, f"expected one .create(messages=...) call, found {len(calls)}")
    return {k.arg: k.value.value for k in calls[0].keywords
            if k.arg in ("model", "temperature", "max_tokens") and isinstance(k.value, ast.Constant)}


_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,")


def _image_mime(func: ast.AST, where: str) -> str:
    """The MIME type the script writes in its image ``data:`` URL (f"data:<mime>;base64,{...}")."""
    mimes = {m.group(1) for node in ast.walk(func) if isinstance(node, ast.JoinedStr)
             for part in node.values if isinstance(part, ast.Constant) and isinstance(part.value, str)
             for m in [_DATA_URL.fullmatch(part.value)] if m}
    if len(mimes) != 1:
        raise _err(where, f"expected one image data: URL, found {sorted(mimes) or 'none'}")
    return mimes.pop()


def _encodes_jpeg(tree: ast.Module, where: str) -> None:
    """The script's ``encode_image`` re-encodes as ``save(..., format="JPEG")`` with no quality given (PIL's
    default, 75) and no resize: what the ``official_jpeg`` image option does."""
    fn = _function(tree, "encode_image", where)
    saves = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "save"]
    kws = [{k.arg: k.value.value for k in n.keywords if isinstance(k.value, ast.Constant)} for n in saves]
    resized = any(isinstance(n, ast.Attribute) and n.attr in ("resize", "thumbnail") for n in ast.walk(fn))
    if len(kws) != 1 or kws[0].get("format") != "JPEG" or set(kws[0]) - {"format"} or resized:
        raise _err(where, "encode_image() no longer saves a full-size JPEG at the default quality")


def _template(name: str, sha: str, path: str, *, system: str, user: str, parser: str, max_tokens: int,
              dimensions=(), options: dict) -> JudgeTemplate:
    return JudgeTemplate(name=f"{name}_official", version=sha[:16], parser=parser, system=system, user=user,
                         max_tokens=max_tokens, dimensions=tuple(dimensions),
                         options={"extractor": EXTRACTOR_VERSION, **options}, path=path)


def _max_tokens(request: dict, benchmark: str) -> int:
    v = request.get("max_tokens")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else DEFAULT_MAX_TOKENS[benchmark]


# ------------------------------------------------------------------------------------------------
# running one function of a script
# ------------------------------------------------------------------------------------------------

_ALLOWED = (ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Raise, ast.Assign, ast.AugAssign, ast.Expr,
            ast.For, ast.If, ast.IfExp, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Call, ast.keyword,
            ast.Attribute, ast.Name, ast.Constant, ast.JoinedStr, ast.FormattedValue, ast.Subscript, ast.Slice,
            ast.List, ast.Tuple, ast.Dict, ast.ListComp, ast.GeneratorExp, ast.comprehension, ast.Pass,
            ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
_BANNED_ATTRS = {"format", "format_map", "mro"}
_EXCEPTIONS = {"ValueError": ValueError, "KeyError": KeyError, "TypeError": TypeError}  # what a function may raise


def checked_function(tree: ast.Module, name: str, where: str, *, func: ast.FunctionDef | None = None,
                     env: dict[str, str] | None = None, attrs: set[str] = frozenset()) -> Callable:
    """The module-level function `name` of a script (or the function definition `func`, e.g. a method), compiled
    alone (nothing else of the script runs) and run in a namespace without builtins. Its syntax tree must hold
    only plain statements and expressions: no import, global, while, try, with, class, lambda, no name it neither
    takes nor assigns (no builtin, no global) but those of `env` (strings of the script) and ValueError / KeyError
    / TypeError (to raise), no attribute starting with ``_`` (but those in `attrs`, never a dunder) and no
    ``str.format`` (the ways out of an empty namespace). This makes a changed or odd file fail with a clear
    error; it is not a sandbox for a hostile file (run only scripts from the benchmark's public source)."""
    fn = func if func is not None else _function(tree, name, where)
    if any(a.startswith("__") for a in [*attrs, *(env or {})]) or not all(isinstance(v, str)
                                                                           for v in (env or {}).values()):
        raise ValueError("checked_function: env holds strings only; no dunder name in env or attrs")
    env = {**(env or {}), **_EXCEPTIONS}
    local: set[str] = set()
    for node in ast.walk(fn):
        if not isinstance(node, _ALLOWED):
            raise _err(where, f"{name}() uses {type(node).__name__} (line {getattr(node, 'lineno', '?')}), which is "
                              "not run here")
        if isinstance(node, ast.Attribute) and ((node.attr.startswith("_") and node.attr not in attrs)
                                                or node.attr in _BANNED_ATTRS):
            raise _err(where, f"{name}() reads attribute {node.attr!r} (line {node.lineno}), which is not run here")
        if isinstance(node, ast.FunctionDef):
            local.add(node.name)
            if node.decorator_list:
                raise _err(where, f"{name}() has a decorated function, which is not run here")
            node.returns = None  # (annotations name types: not evaluated, dropped)
        elif isinstance(node, ast.arg):
            local.add(node.arg)
            node.annotation = None  # (annotations name types: not evaluated, dropped)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local \
                and node.id not in env:
            raise _err(where, f"{name}() reads the name {node.id!r} (line {node.lineno}), a builtin or global, which "
                              "is not run here")
    module = ast.Module(body=[fn], type_ignores=[])
    namespace: dict[str, Any] = {**env, "__builtins__": {}}
    exec(compile(module, where, "exec"), namespace)  # noqa: S102 -- one checked function, no builtins
    f = namespace[fn.name]

    def call(*args, **kw):
        try:
            out = f(*args, **kw)
        except Exception as e:  # noqa: BLE001 -- the script's own error, named with the file
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kw.items())])
            raise OfficialScriptError(f"{where}: {name}() failed on ({shown}): {type(e).__name__}: {e}") from None
        if not isinstance(out, str):
            raise OfficialScriptError(f"{where}: {name}() returned {type(out).__name__}, not text")
        return out

    return call


# ------------------------------------------------------------------------------------------------
# the benchmarks
# ------------------------------------------------------------------------------------------------

def geneval_pp_prompts(path: str | Path, url: str = GENEVAL_PP_SCRIPT_URL) -> OfficialPrompts:
    tree, sha, where = _read(path)
    system = _module_string(tree, "SYSTEM_PROMPT", where)
    names = {"instruction": "prompt", "explanation": "checklist"}
    sample = _function(tree, "process_sample", where)
    user = _one_fstring(sample, lambda v: names.get(v.id) if isinstance(v, ast.Name) else None,
                        {"prompt", "checklist"}, where)
    explain = checked_function(tree, "metadata_to_explanation", where)
    explain({"prompt": "p", "include": [{"class": "c", "count": 2, "color": "k", "size": "s", "region": "r"}],
             "exclude": [{"class": "c", "count": 3}]})  # (fails here, not on the first image)
    _encodes_jpeg(tree, where)
    request = _request(tree, where)
    tpl = _template("geneval_pp", sha, where, system=system, user=user, parser="verdict_json",
                    max_tokens=_max_tokens(request, "geneval_pp"),
                    options={"image_encoding": "official_jpeg", "image_mime": _image_mime(sample, where)})
    return OfficialPrompts("geneval_pp", tpl, where, sha, url, request, checklist=explain)


def _imagine_name(v: ast.expr) -> str | None:
    if isinstance(v, ast.Subscript) and isinstance(v.value, ast.Name) and v.value.id == "prompt_data" \
            and isinstance(v.slice, ast.Constant):
        return {"instruction": "prompt", "note": "note"}.get(v.slice.value)
    return None


def _role_content(func: ast.FunctionDef, role: str, where: str) -> ast.expr:
    found = []
    for node in ast.walk(func):
        if isinstance(node, ast.Dict):
            d = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
            r = d.get("role")
            if isinstance(r, ast.Constant) and r.value == role and "content" in d:
                found.append(d["content"])
    if len(found) != 1:
        raise _err(where, f"expected one {role!r} message in {func.name}(), found {len(found)}")
    return found[0]


def _text_parts(content: ast.expr) -> list[ast.expr]:
    """A message content's text: the content itself, or the "text" values of its list of parts."""
    if not isinstance(content, ast.List):
        return [content]
    out = []
    for part in content.elts:
        if isinstance(part, ast.Dict):
            d = {k.value: v for k, v in zip(part.keys, part.values) if isinstance(k, ast.Constant)}
            if isinstance(d.get("type"), ast.Constant) and d["type"].value == "text":
                out.append(d["text"])
    return out


def imagine_bench_prompts(path: str | Path, url: str = IMAGINE_BENCH_SCRIPT_URL) -> OfficialPrompts:
    tree, sha, where = _read(path)
    build = _function(tree, "build_messages", where)
    sys_content = _role_content(build, "system", where)
    sys_parts = _text_parts(sys_content)
    if len(sys_parts) != 1 or not (isinstance(sys_parts[0], ast.Constant) and isinstance(sys_parts[0].value, str)):
        raise _err(where, "the system message of build_messages() is not one plain text")
    system = sys_parts[0].value
    if _PLACEHOLDER.search(system):
        raise _err(where, "the system text holds what reads as one of our template placeholders")
    user_parts = [p for p in _text_parts(_role_content(build, "user", where)) if isinstance(p, ast.JoinedStr)]
    if len(user_parts) != 1:
        raise _err(where, f"expected one user text f-string in build_messages(), found {len(user_parts)}")
    user = _template_text(user_parts[0], _imagine_name, where)
    if {"prompt", "note"} - set(_PLACEHOLDER.findall(user)):
        raise _err(where, "the user text lacks prompt_data['instruction'] or prompt_data['note']")
    _encodes_jpeg(tree, where)
    request = _request(tree, where)
    options = {"image_encoding": "official_jpeg", "image_mime": _image_mime(build, where)}
    if isinstance(sys_content, ast.List):
        options["system_content"] = "parts"  # sent as [{"type": "text", "text": ...}], as the script does
    tpl = _template("imagine_bench", sha, where, system=system, user=user, parser="dimension_scores",
                    max_tokens=_max_tokens(request, "imagine_bench"),
                    dimensions=(("FF", "Fantasy Fulfillment"), ("IP", "Identity Preservation"),
                                ("AQ", "Aesthetic Quality")), options=options)
    return OfficialPrompts("imagine_bench", tpl, where, sha, url, request)


_INSTRUCTION = "{{instruction}}"  # what PromptGenerator is given as the instruction: our template's placeholder


def _class(tree: ast.Module, name: str, where: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise _err(where, f"no class {name}")


def _plain_strings(body: list[ast.stmt]) -> dict[str, str]:
    """The ``NAME = "text"`` assignments (plain strings) among the statements `body`."""
    out = {}
    for node in body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out[node.target.id] = node.value.value
    return out


def omnicontext_prompts(path: str | Path, url: str = OMNICONTEXT_SCRIPT_URL) -> OfficialPrompts:
    """The three OmniContext judge templates (``pf``, ``sc``, ``sc_scene``: :data:`OMNICONTEXT_CALLS`), each the
    text ``PromptGenerator()(instruction, **keywords)`` of the official ``prompt_generator.py`` returns, run as
    :func:`checked_function` with the module's plain strings (and the class's, as ``self.NAME``) as its only
    names and ``{{instruction}}`` as the instruction."""
    tree, sha, where = _read(path)
    cls = _class(tree, "PromptGenerator", where)
    method = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__call__"), None)
    if method is None:
        raise _err(where, "PromptGenerator has no __call__()")
    env = {k: v for k, v in _plain_strings(tree.body).items() if not k.startswith("__")}
    own = {k: v for k, v in _plain_strings(cls.body).items() if not k.startswith("__")}  # read as self.NAME
    for k, v in {**env, **own}.items():
        if _PLACEHOLDER.search(v):
            raise _err(where, f"the string {k} holds {_PLACEHOLDER.search(v).group(0)!r}, which reads as one of our "
                              "template placeholders")
    if method.decorator_list or method.args.posonlyargs or len(method.args.args) < 2:
        raise _err(where, "PromptGenerator.__call__ is not (self, instruction, ...)")
    generate = checked_function(tree, "PromptGenerator.__call__", where, func=method, env=env, attrs=set(own))
    me = types.SimpleNamespace(**own)
    templates = {}
    for key, kw in OMNICONTEXT_CALLS.items():
        text = generate(me, _INSTRUCTION, **kw)
        if _INSTRUCTION not in text:
            raise _err(where, f"PromptGenerator()(instruction, {', '.join(f'{k}={v!r}' for k, v in kw.items())}) "
                              "does not hold the instruction")
        templates[key] = _template(f"omnicontext_{key}", sha, where, system="", user=text, parser="score_json",
                                   max_tokens=DEFAULT_MAX_TOKENS["omnicontext"],
                                   options={"image_encoding": "official_omnicontext", "image_mime": "image/jpeg"})
    return OfficialPrompts("omnicontext", templates["pf"], where, sha, url, {}, templates=templates,
                           unverified=OMNICONTEXT_UNVERIFIED)
