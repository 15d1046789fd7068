"""The three Echo-4o synthesis tracks (``../shared/docs/echo4o.md`` §2).

Each track turns a sample index into a deterministic *plan* (seeded by ``cfg.seed``, the track and the
index only, so a plan never depends on ``--limit``, on timing or on earlier answers) and runs it through
a :class:`SampleContext` (journaled API calls, see :mod:`.client`) into one record:

* :class:`SurrealTrack` (``surreal``): seed class (COCO / Open Images) -> chat: the object's normal
  attributes (one shared answer per object) -> chat: a deflection of the drawn type (attribute shift,
  hybridization, spatiotemporal anomaly, multi-object) into an image prompt -> image -> ``t2i`` record.
* :class:`MultirefTrack` (``multiref``): 2-4 references drawn per combination (human / object / scene,
  from a folder or generated once per reference) -> vision chat: an instruction using every reference ->
  image edit with all references as input images -> ``multiref`` record (references, target).
* :class:`InstructionTrack` (``instruction``): a constraint list (objects, counts, colours, sizes,
  spatial and size relations) in a difficulty bin -> chat: a natural prompt -> image -> vision chat:
  the prompt rewritten to match the image -> ``t2i`` record whose text is the rewritten prompt;
  ``meta.prompt_original`` keeps the prompt the image was made from.

Where this differs from Echo-4o's description (echo4o.md §1-2), knowingly:

* Image shapes: the released images come in 1024x1024, 1024x1536 and 1536x1024; the default
  ``image_size="1024x1024"`` makes every image square. ``--image-size auto`` lets the image model choose the
  shape per prompt (``--dry-run`` prices ``auto`` as the dearest size of the price table). Images are stored in the
  server's format (PNG for gpt-image-1; the release is JPEG): ``--image-format jpeg`` to match it.
* Multi-reference references: the paper draws *real* photos from human / scene / object pools; without
  ``--refs`` this track generates ``generated_refs_per_category`` (12) studio-style references per category
  and reuses them across samples. Pass ``--refs DIR`` with real photos for the paper's setting.
* Multi-reference instructions are written once, before the edit, from the references; the paper also
  *optimises* the instruction after the image exists (linguistic diversity, clarity): not done here.
* Instruction-following prompts are written by the chat model from the constraint list (natural, varied
  phrasing, simple backgrounds allowed); the paper renders slot templates ("A photo of two brown beehives on
  the top and four white wristwatches on the bottom") with pure backgrounds as a goal. The bins count
  constraints (easy 1-3, medium 4-5, hard 6-9: the paper's "3-5" overlaps its "1-3").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import logging
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from echo4o_jax.data.records import Record, RecordError, multiref_record, probe_image, t2i_record
from echo4o_jax.eval.judge import MalformedAnswer
from echo4o_jax.synth.client import SynthClient, _ext_of, chat_key, chat_params, image_key
from echo4o_jax.synth.config import SynthConfig
from echo4o_jax.synth.resources import (Template, chat_messages, class_list, get_template, image_mime,
                                        read_list, read_sections)

__all__ = ["SOURCE", "Track", "SurrealTrack", "MultirefTrack", "InstructionTrack", "TRACKS", "make_track",
           "SampleContext", "CallEstimate", "RefImage", "REF_CATEGORIES"]

log = logging.getLogger(__name__)

SOURCE = "gpt4o"
REF_CATEGORIES = ("human", "object", "scene")
_REF_DIR_ALIASES = {"human": ("human", "humans", "person", "people"), "object": ("object", "objects"),
                    "scene": ("scene", "scenes")}
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


@dataclasses.dataclass(frozen=True)
class CallEstimate:
    """One call a sample will make, for ``--dry-run``. `shared`: an identity shared by samples (counted
    once); `key`: the journal key when it is known before running (then a journaled call is free)."""

    model: str
    kind: str  # chat | image | edit
    input_tokens: int = 0
    n_input_images: int = 0
    shared: str | None = None
    key: str | None = None


def template_requires(tpl: Template) -> tuple[str, ...]:
    """The answer keys a synthesis template declares (``# require: key, key``): each must be a non-empty
    string, else the answer is malformed (asked again)."""
    return tuple(k.strip() for k in tpl.options.get("require", "").split(",") if k.strip())


class SampleContext:
    """The calls of one sample: parses and validates chat answers (asking again, with a new journal key,
    after a malformed answer), remembers the current step (for skip reasons), the call keys and the
    template versions used."""

    def __init__(self, track: "Track", client: SynthClient, sample_id: str):
        self.track = track
        self.cfg = track.cfg
        self.client = client
        self.sample_id = sample_id
        self.step = "plan"
        self.calls: list[str] = []
        self.templates: dict[str, str] = {}

    def _use(self, tpl: Template) -> None:
        self.templates[tpl.name] = tpl.version
        self.step = tpl.name

    def ask(self, name: str, variables: dict[str, Any], *, scope: str, images: Sequence[bytes] = (),
            require: Sequence[str] = (), check: Callable[[dict], str | None] | None = None) -> dict:
        tpl = self.track.template(name)
        self._use(tpl)
        model, messages, params = self.track.chat_request(name, variables, images)
        last: Exception | None = None
        for attempt in range(1 + self.cfg.malformed_retries):
            res = self.client.chat(messages, model=model, scope=scope, label=f"{self.sample_id}:{tpl.name}",
                                   attempt=attempt, **params)
            self.calls.append(res.key)
            try:
                parsed = tpl.parse(res.text or "")
                for k in (*template_requires(tpl), *require):
                    v = parsed.get(k)
                    if not isinstance(v, str) or not v.strip():
                        raise MalformedAnswer(f"no non-empty string {k!r} in the answer")
                problem = check(parsed) if check is not None else None
                if problem:
                    raise MalformedAnswer(problem)
                return parsed
            except MalformedAnswer as e:
                last = e
        raise MalformedAnswer(f"{tpl.name}: {last}")

    def image(self, prompt: str, *, scope: str, step: str = "image") -> bytes:
        self.step = step
        res = self.client.generate_image(prompt, scope=scope, label=f"{self.sample_id}:{step}")
        self.calls.append(res.key)
        return res.images[0]

    def edit(self, images: Sequence[bytes], prompt: str, *, scope: str, step: str = "edit") -> bytes:
        self.step = step
        files = [(f"reference_{k + 1}.{_ext_of(b)}", b, image_mime(f"x.{_ext_of(b)}", b)) for k, b in enumerate(images)]
        res = self.client.edit_image(files, prompt, scope=scope, label=f"{self.sample_id}:{step}")
        self.calls.append(res.key)
        return res.images[0]

    def base_meta(self, plan: dict) -> dict:
        cfg = self.cfg
        return {"generator": "echo4o_jax.synth", "track": self.track.name, "index": plan["index"], "seed": cfg.seed,
                "models": {"chat": cfg.chat_model, "vision": cfg.vision_model, "image": cfg.image_model,
                           "edit": cfg.edit_model_name},
                "image_params": {"size": cfg.image_size, "quality": cfg.image_quality,
                                 "output_format": cfg.image_output_format},
                "templates": dict(sorted(self.templates.items())), "calls": list(self.calls)}


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(k for k, w in weights.items() if float(w) > 0)
    if not names:
        raise ValueError(f"no positive weight in {weights}")
    return rng.choices(names, weights=[float(weights[k]) for k in names])[0]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _placeholders(names) -> str:
    return ", ".join("{{%s}}" % n for n in sorted(names))


def _temperature(tpl: Template) -> float | None:
    """A template's ``# temperature:`` option (None: not set)."""
    t = tpl.options.get("temperature")
    if t in (None, ""):
        return None
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"template file {tpl.path}: '# temperature: {t}' is not a number") from None


class Track:
    name = ""
    # template name -> the placeholders the track fills in it: a template (an edited copy in
    # cfg.template_dir, typically) using another one is refused when the track is built
    template_variables: dict[str, tuple[str, ...]] = {}

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self._templates: dict[str, Template] = {}
        for n in self.template_names:
            self.template(n)  # fail early (--dry-run included) on a broken template, before any call

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(self.template_variables)

    # ----------------------------------------------------------------------------------------- helpers
    def template(self, name: str) -> Template:
        t = self._templates.get(name)
        if t is None:
            t = get_template(name, self.cfg.template_dir)
            unknown = t.placeholders() - set(self.template_variables[name])
            if unknown:
                raise ValueError(f"template file {t.path} uses {_placeholders(unknown)}, which the {self.name} track "
                                 f"does not fill in {name} (it fills {_placeholders(self.template_variables[name])})")
            _temperature(t)
            self._templates[name] = t
        return t

    def chat_request(self, name: str, variables: dict[str, Any], images: Sequence[bytes] = ()):
        """(model, messages, keyword arguments of SynthClient.chat) of a template's chat call."""
        tpl = self.template(name)
        model = self.cfg.vision_model if images else self.cfg.chat_model
        messages = chat_messages(tpl, variables, images, self.cfg.max_image_pixels)
        params = {"temperature": _temperature(tpl), "max_tokens": tpl.max_tokens,
                  "response_format": tpl.options.get("response_format") or None}
        return model, messages, params

    def chat_request_key(self, name: str, variables: dict[str, Any], scope: str) -> str:
        """The journal key of the first attempt of a text-only chat call (known before running)."""
        model, messages, params = self.chat_request(name, variables)
        return chat_key(model, scope, messages, chat_params(**params), 0)

    def rng(self, *parts: Any) -> random.Random:
        return random.Random(":".join(str(p) for p in (self.cfg.seed, self.name, *parts)))

    def sample_id(self, index: int) -> str:
        return f"{SOURCE}/{self.name}/{index:07d}"

    def _chat_tokens(self, name: str, extra_chars: int = 400, n_images: int = 0) -> int:
        t = self.template(name)
        return (len(t.system) + len(t.user) + extra_chars) // 4 + n_images * self.cfg.est_image_tokens

    # ----------------------------------------------------------------------------------------- API
    def fingerprint_parts(self) -> dict:
        """What shapes this track's data besides the config (templates, word lists, references)."""
        def shape(t: Template) -> list:  # ('require' only rejects answers: a dataset made before a template
            return [t.system, t.user, {k: v for k, v in t.options.items() if k != "require"}]  # declared it goes on)

        return {"templates": {n: [self.template(n).version, _sha(shape(self.template(n)))] for n in self.template_names}}

    def plan(self, index: int) -> dict:
        raise NotImplementedError

    def run(self, plan: dict, ctx: SampleContext) -> Record:
        raise NotImplementedError

    def estimate(self, plan: dict) -> list[CallEstimate]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


# ------------------------------------------------------------------------------------------------ surreal


class SurrealTrack(Track):
    name = "surreal"
    template_variables = {"surreal_attributes": ("object",),
                          "surreal_deflect": ("deflection_type", "objects", "hint")}

    def __init__(self, cfg: SynthConfig):
        super().__init__(cfg)
        self.classes = class_list(cfg.surreal_classes, cfg.data_dir)
        self.hints = read_sections("surreal_hints", cfg.data_dir)
        for t in cfg.surreal_types:
            if t not in self.hints or not self.hints[t]:
                raise ValueError(f"surreal type {t!r} has no [section] in surreal_hints.txt")

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "classes": _sha(self.classes), "hints": _sha(self.hints)}

    def plan(self, index: int) -> dict:
        rng = self.rng(index)
        typ = _weighted(rng, self.cfg.surreal_types)
        objects = rng.sample(self.classes, 2 if typ == "multi_object" else 1)
        return {"index": index, "type": typ, "objects": objects, "hint": rng.choice(self.hints[typ])}

    def _attributes(self, ctx: SampleContext, obj: str) -> dict:
        # the keys are the template's ('# require:'): an answer without one is malformed (asked again),
        # never stored as the shared answer every later sample of the object reuses
        return ctx.ask("surreal_attributes", {"object": obj}, scope="shared")

    def run(self, plan: dict, ctx: SampleContext) -> Record:
        attrs = [self._attributes(ctx, o) for o in plan["objects"]]
        d = ctx.ask("surreal_deflect", {"deflection_type": plan["type"],
                                        "objects": json.dumps(attrs, ensure_ascii=False, indent=1),
                                        "hint": plan["hint"]}, scope=ctx.sample_id, require=["prompt"])
        prompt = d["prompt"].strip()
        image = ctx.image(prompt, scope=ctx.sample_id)
        meta = {**ctx.base_meta(plan), "type": plan["type"], "objects": plan["objects"], "hint": plan["hint"],
                "attributes": attrs, "deflection": str(d.get("deflection", ""))}
        return t2i_record(ctx.sample_id, prompt, image, source=SOURCE, subset=self.name, meta=meta)

    def estimate(self, plan: dict) -> list[CallEstimate]:
        cfg = self.cfg
        out = [CallEstimate(cfg.chat_model, "chat", self._chat_tokens("surreal_attributes", 40), shared=f"attr:{o}",
                            key=self.chat_request_key("surreal_attributes", {"object": o}, "shared"))
               for o in plan["objects"]]
        out.append(CallEstimate(cfg.chat_model, "chat", self._chat_tokens("surreal_deflect", 500 * len(plan["objects"]))))
        out.append(CallEstimate(cfg.image_model, "image", 0))
        return out


# ------------------------------------------------------------------------------------------------ multiref


@dataclasses.dataclass(frozen=True)
class RefImage:
    category: str
    id: str
    source: str  # folder | generated
    path: str | None = None  # folder: relative to the references folder
    subject: str | None = None  # generated: what the image shows
    size: int = 0

    def info(self) -> dict:
        d = {"category": self.category, "id": self.id, "source": self.source}
        if self.path is not None:
            d["file"] = self.path
        if self.subject is not None:
            d["subject"] = self.subject
        return d


def scan_refs(root: str | os.PathLike) -> dict[str, list[RefImage]]:
    """``root/<human|humans|person|people>/``, ``root/<object|objects>/``, ``root/<scene|scenes>/`` image
    files (jpg / png / webp, any depth), sorted by path. Folder names match in any case."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"references folder {root} does not exist")
    pools: dict[str, list[RefImage]] = {}
    for cat, aliases in _REF_DIR_ALIASES.items():
        files: list[Path] = []
        for d in sorted(root.iterdir()):
            if d.name.lower() in aliases and d.is_dir():  # (Scene/, Humans/, ... too)
                files += [p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS]
        rels = sorted({p.relative_to(root).as_posix(): p for p in files}.items())
        pools[cat] = [RefImage(cat, f"folder/{rel}", "folder", path=rel, size=p.stat().st_size) for rel, p in rels]
    if not any(pools.values()):
        raise ValueError(f"{root}: no images under human/, object/ or scene/ (jpg, png, webp)")
    bad = [f"{r.path} ({e})" for p in pools.values() for r in p if (e := _unreadable_header(root / r.path))]
    if bad:
        raise ValueError(f"references folder {root}: {len(bad)} image file(s) cannot be read: "
                         + "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else "") + ". Fix or remove them")
    return pools


def _unreadable_header(path: Path) -> str | None:
    """Why an image file cannot be read or its header parsed (`probe_image`), or None."""
    try:
        probe_image(path.read_bytes())
        return None
    except (OSError, RecordError) as e:
        return str(e)


class MultirefTrack(Track):
    name = "multiref"
    template_variables = {"multiref_instruction": ("num_images", "references", "combo"), "ref_human": ("subject",),
                          "ref_object": ("subject",), "ref_scene": ("subject",)}

    def __init__(self, cfg: SynthConfig, refs_dir: str | os.PathLike | None = None):
        super().__init__(cfg)
        self.refs_dir = Path(refs_dir) if refs_dir else None
        self._decoded: set[str] = set()  # sha256 of the folder references' bytes that decoded fully
        if self.refs_dir is not None:
            self.pools = scan_refs(self.refs_dir)
        else:
            self.pools = self._generated_pools()
        self.combos = {}
        dropped: list[str] = []
        for name, spec in cfg.multiref_combos.items():
            cats, weight = list(spec[0]), float(spec[1])
            if not 2 <= len(cats) <= 4 or any(c not in (*REF_CATEGORIES, "entity") for c in cats):
                raise ValueError(f"multiref combo {name!r}: {cats} must be 2-4 of {REF_CATEGORIES + ('entity',)}")
            if weight > 0 and self._feasible(cats):
                self.combos[name] = (cats, weight)
            elif weight > 0:
                dropped.append(name)
        if dropped and self.combos:
            log.warning("multiref: the reference pools (%s) are too small for the combinations %s: they are not "
                        "drawn (the others take their share)", {c: len(p) for c, p in self.pools.items()}, dropped)
        if not self.combos:
            raise ValueError(f"no multi-reference combination can be drawn from the reference pools "
                             f"({ {c: len(p) for c, p in self.pools.items()} })")

    def _generated_pools(self) -> dict[str, list[RefImage]]:
        n = self.cfg.generated_refs_per_category
        if n < 1:
            raise ValueError("generated_refs_per_category must be >= 1 without a --refs folder")
        dd = self.cfg.data_dir
        subjects = {"human": read_list("humans", dd), "scene": read_list("scenes", dd),
                    "object": [c for c in class_list(self.cfg.instruction_classes, dd) if c.lower() != "person"]}
        pools = {}
        for cat in REF_CATEGORIES:
            rng = self.rng("refs", cat)
            subj = subjects[cat]
            picks = rng.sample(subj, n) if n <= len(subj) else [rng.choice(subj) for _ in range(n)]
            pools[cat] = [RefImage(cat, f"generated/{cat}/{j:04d}", "generated", subject=s) for j, s in enumerate(picks)]
        return pools

    def _feasible(self, cats: Sequence[str]) -> bool:
        need = {c: cats.count(c) for c in REF_CATEGORIES}
        if any(len(self.pools.get(c, [])) < k for c, k in need.items()):
            return False
        rest = sum(len(self.pools.get(c, [])) - need[c] for c in ("human", "object"))
        return rest >= cats.count("entity")

    def fingerprint_parts(self) -> dict:
        pools = {c: [(r.id, r.size, r.subject) for r in p] for c, p in self.pools.items()}
        return {**super().fingerprint_parts(), "refs": _sha(pools)}

    def describe(self) -> dict:
        return {"references": {c: len(p) for c, p in self.pools.items()},
                "references_from": str(self.refs_dir) if self.refs_dir else "generated",
                "combos": sorted(self.combos)}

    def plan(self, index: int) -> dict:
        rng = self.rng(index)
        combo = _weighted(rng, {k: w for k, (_, w) in self.combos.items()})
        cats = self.combos[combo][0]
        chosen: list[RefImage] = []
        for c in sorted(cats, key=lambda c: c == "entity"):  # fixed categories first, then "entity"
            pool = self.pools["human"] + self.pools["object"] if c == "entity" else self.pools[c]
            left = [r for r in pool if r not in chosen]
            chosen.append(rng.choice(left))
        order = {c: i for i, c in enumerate(REF_CATEGORIES)}
        chosen.sort(key=lambda r: order[r.category])
        return {"index": index, "combo": combo, "refs": [r.id for r in chosen]}

    def _ref(self, ref_id: str) -> RefImage:
        for p in self.pools.values():
            for r in p:
                if r.id == ref_id:
                    return r
        raise KeyError(ref_id)

    def ref_prompt(self, ref: RefImage) -> str:
        return self.template(f"ref_{ref.category}").render({"subject": ref.subject})[1]

    def ref_bytes(self, ref: RefImage, ctx: SampleContext) -> bytes:
        if ref.source == "folder":  # a broken file fails the samples that use it, before any paid call
            ctx.step = f"ref_{ref.category}"
            path = self.refs_dir / ref.path
            try:
                data = path.read_bytes()
                # each content fully decoded once per run (the header at the scan; a file changed meanwhile is
                # decoded again)
                sha = hashlib.sha256(data).hexdigest()
                if sha not in self._decoded:
                    probe_image(data, check="decode")
                    self._decoded.add(sha)
            except (OSError, RecordError) as e:
                raise RecordError(f"reference file {path}: {e}") from None
            return data
        ctx._use(self.template(f"ref_{ref.category}"))
        return ctx.image(self.ref_prompt(ref), scope=ref.id, step=f"ref_{ref.category}")

    def run(self, plan: dict, ctx: SampleContext) -> Record:
        refs = [self._ref(i) for i in plan["refs"]]
        images = [self.ref_bytes(r, ctx) for r in refs]
        k = len(refs)
        article = {"human": "a human (person)", "object": "an object", "scene": "a scene"}
        lines = "\n".join(f"Image {j + 1}: {article.get(r.category, r.category)}" for j, r in enumerate(refs))

        def check(d: dict) -> str | None:
            uses = d.get("uses")
            if not isinstance(uses, list) or len(uses) != k:
                return f"'uses' must list what is taken from each of the {k} references"
            return None

        d = ctx.ask("multiref_instruction", {"num_images": k, "references": lines, "combo": plan["combo"]},
                    images=images, scope=ctx.sample_id, require=["instruction"], check=check)
        instruction = d["instruction"].strip()
        target = ctx.edit(images, instruction, scope=ctx.sample_id)
        meta = {**ctx.base_meta(plan), "type": plan["combo"], "references": [r.info() for r in refs],
                "uses": [str(u) for u in d["uses"]]}
        return multiref_record(ctx.sample_id, images, instruction, target, source=SOURCE, subset=self.name, meta=meta)

    def estimate(self, plan: dict) -> list[CallEstimate]:
        cfg = self.cfg
        out = []
        for rid in plan["refs"]:
            r = self._ref(rid)
            if r.source == "generated":
                key = image_key(cfg, self.ref_prompt(r), r.id)
                out.append(CallEstimate(cfg.image_model, "image", 0, shared=r.id, key=key))
        k = len(plan["refs"])
        out.append(CallEstimate(cfg.vision_model, "chat", self._chat_tokens("multiref_instruction", 200, k)))
        out.append(CallEstimate(cfg.edit_model_name, "edit", 0, n_input_images=k))
        return out


# ------------------------------------------------------------------------------------------------ instruction


class InstructionTrack(Track):
    name = "instruction"
    template_variables = {"instruction_prompt": ("constraints", "difficulty", "num_constraints"),
                          "instruction_rewrite": ("prompt",)}

    def __init__(self, cfg: SynthConfig):
        super().__init__(cfg)
        self.objects = class_list(cfg.instruction_classes, cfg.data_dir)
        self.vocab = read_sections("instruction_vocab", cfg.data_dir)
        for sec in ("colors", "counts", "spatial_relations", "size_relations", "size_adjectives"):
            if not self.vocab.get(sec):
                raise ValueError(f"instruction_vocab.txt: section [{sec}] is missing or empty")
        self.counts = [int(c) for c in self.vocab["counts"] if int(c) > 1]
        if not self.counts:
            raise ValueError("instruction_vocab.txt: [counts] needs a count above 1")
        for name, b in cfg.instruction_bins.items():
            lo, hi, kmin, kmax, w = b
            if not (1 <= lo <= hi and 1 <= kmin <= kmax and kmin <= hi and w >= 0):
                raise ValueError(f"instruction bin {name!r}: {b} is not [min_c, max_c, min_obj, max_obj, weight]")

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "objects": _sha(self.objects), "vocab": _sha(self.vocab)}

    def plan(self, index: int) -> dict:
        rng = self.rng(index)
        difficulty = _weighted(rng, {k: b[4] for k, b in self.cfg.instruction_bins.items()})
        lo, hi, kmin, kmax, _ = self.cfg.instruction_bins[difficulty]
        n = rng.randint(int(lo), int(hi))
        top = min(int(kmax), n, len(self.objects))
        k = rng.randint(min(int(kmin), top), top)
        names = rng.sample(self.objects, k)
        letters = [chr(ord("A") + i) for i in range(k)]
        constraints: list[dict] = [{"type": "object", "object": letters[i], "name": names[i]} for i in range(k)]
        options: list[tuple] = []
        for i in range(k):
            options += [("count", i), ("color", i), ("size", i)]
        for i in range(k):
            for j in range(i + 1, k):
                options += [("relation", i, j), ("size_relation", i, j)]
        rng.shuffle(options)
        for opt in options:
            if len(constraints) >= n:
                break
            kind, i = opt[0], opt[1]
            if kind == "count":
                constraints.append({"type": "count", "object": letters[i], "value": rng.choice(self.counts)})
            elif kind == "color":
                constraints.append({"type": "color", "object": letters[i], "value": rng.choice(self.vocab["colors"])})
            elif kind == "size":
                constraints.append({"type": "size", "object": letters[i], "value": rng.choice(self.vocab["size_adjectives"])})
            else:
                a, b = (opt[1], opt[2]) if rng.random() < 0.5 else (opt[2], opt[1])
                sec = "spatial_relations" if kind == "relation" else "size_relations"
                constraints.append({"type": kind, "object": letters[a], "relation": rng.choice(self.vocab[sec]),
                                    "other": letters[b]})
        return {"index": index, "difficulty": difficulty, "num_constraints": len(constraints),
                "constraints": constraints}

    @staticmethod
    def constraint_lines(plan: dict) -> str:
        names = {c["object"]: c["name"] for c in plan["constraints"] if c["type"] == "object"}
        out = []
        for c in plan["constraints"]:
            o = c["object"]
            if c["type"] == "object":
                out.append(f"- object {o}: {c['name']}")
            elif c["type"] == "count":
                out.append(f"- number of {o} ({names[o]}): exactly {c['value']}")
            elif c["type"] == "color":
                out.append(f"- colour of {o} ({names[o]}): {c['value']}")
            elif c["type"] == "size":
                out.append(f"- size of {o} ({names[o]}): {c['value']}")
            else:
                out.append(f"- {o} ({names[o]}) is {c['relation']} {c['other']} ({names[c['other']]})")
        return "\n".join(out)

    def run(self, plan: dict, ctx: SampleContext) -> Record:
        d = ctx.ask("instruction_prompt", {"constraints": self.constraint_lines(plan), "difficulty": plan["difficulty"],
                                           "num_constraints": plan["num_constraints"]},
                    scope=ctx.sample_id, require=["prompt"])
        prompt = d["prompt"].strip()
        image = ctx.image(prompt, scope=ctx.sample_id)
        r = ctx.ask("instruction_rewrite", {"prompt": prompt}, images=[image], scope=ctx.sample_id,
                    require=["rewritten_prompt"])
        rewritten = r["rewritten_prompt"].strip()
        matches = r.get("matches")
        mism = r.get("mismatches")
        meta = {**ctx.base_meta(plan), "type": plan["difficulty"], "difficulty": plan["difficulty"],
                "num_constraints": plan["num_constraints"], "constraints": plan["constraints"],
                "prompt_original": prompt,
                "rewrite": {"matches": matches if isinstance(matches, bool) else None,
                            "changed": rewritten != prompt,
                            "mismatches": [str(m) for m in mism] if isinstance(mism, list) else []}}
        return t2i_record(ctx.sample_id, rewritten, image, source=SOURCE, subset=self.name, meta=meta)

    def estimate(self, plan: dict) -> list[CallEstimate]:
        cfg = self.cfg
        return [CallEstimate(cfg.chat_model, "chat", self._chat_tokens("instruction_prompt", 60 * plan["num_constraints"])),
                CallEstimate(cfg.image_model, "image", 0),
                CallEstimate(cfg.vision_model, "chat", self._chat_tokens("instruction_rewrite", 400, 1))]


TRACKS = {"surreal": SurrealTrack, "multiref": MultirefTrack, "instruction": InstructionTrack}


def make_track(name: str, cfg: SynthConfig, *, refs_dir: str | os.PathLike | None = None) -> Track:
    if name not in TRACKS:
        raise ValueError(f"unknown track {name!r} (known: {sorted(TRACKS)})")
    if cfg.template_dir and Path(cfg.template_dir).is_dir():  # a misnamed edited copy would go unused, silently
        known = {n for t in TRACKS.values() for n in t.template_variables}
        stray = sorted(p.name for p in Path(cfg.template_dir).glob("*.txt") if p.stem not in known)
        if stray:
            raise ValueError(f"template folder {cfg.template_dir}: {', '.join(stray)} is no synthesis template "
                             f"(the templates: {', '.join(sorted(f'{n}.txt' for n in known))})")
    if name == "multiref":
        return MultirefTrack(cfg, refs_dir=refs_dir)
    if refs_dir:
        raise ValueError("--refs is only used by the multiref track")
    return TRACKS[name](cfg)
