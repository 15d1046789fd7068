"""Configuration of the GPT-4o data synthesis: models, image parameters, limits, prices, track weights.

Every field has a default; ``--config FILE.json`` overrides any subset (unknown keys are an error) and
the command line overrides the file. Every value is checked for its type (the field's annotation; a JSON
list for a tuple) and range when it is set: a bad one is a ValueError naming the file, the key, what it
expects and what it got, before any call is made. Nothing secret lives here: the API key is read from the
environment variable named by ``api_key_env`` when the first call is made, and never stored.

Prices are USD estimates (public list prices, mid 2025) used for ``--dry-run`` and for the spend shown
while running; edit ``prices`` when they change or for another provider. Per chat/vision model:
``input_per_1m`` / ``output_per_1m`` (per million tokens). Per image model: ``per_image``
(``{size: {quality: USD}}``, used when a response carries no token usage, and for estimates),
``per_input_image`` (edit calls, per reference image sent) and, optionally, token prices
``text_input_per_1m`` / ``image_input_per_1m`` / ``output_per_1m`` used when a response reports usage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from typing import Any

from echo4o_jax.eval.judge import _public_url, check_api_key_env, check_base_url, effective_base_url

__all__ = ["SynthConfig", "DEFAULT_PRICES", "load_config"]

_GPT_IMAGE_1_PER_IMAGE = {
    "1024x1024": {"low": 0.011, "medium": 0.042, "high": 0.167},
    "1024x1536": {"low": 0.016, "medium": 0.063, "high": 0.25},
    "1536x1024": {"low": 0.016, "medium": 0.063, "high": 0.25},
}

DEFAULT_PRICES: dict[str, dict[str, Any]] = {
    "gpt-4o": {"input_per_1m": 2.50, "output_per_1m": 10.00},
    "gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60},
    "gpt-4.1": {"input_per_1m": 2.00, "output_per_1m": 8.00},
    "gpt-4.1-mini": {"input_per_1m": 0.40, "output_per_1m": 1.60},
    "gpt-image-1": {"per_image": _GPT_IMAGE_1_PER_IMAGE, "per_input_image": 0.0065,
                    "text_input_per_1m": 5.00, "image_input_per_1m": 10.00, "output_per_1m": 40.00},
}


@dataclasses.dataclass
class SynthConfig:
    # models and server
    chat_model: str = "gpt-4o"
    vision_model: str = "gpt-4o"
    image_model: str = "gpt-image-1"
    edit_model: str | None = None  # None: image_model
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    require_api_key: bool = True
    # images
    image_size: str = "1024x1024"
    image_quality: str = "high"
    image_output_format: str | None = None  # None: the server's default (png for gpt-image-1)
    max_image_pixels: int | None = 1024 * 1024  # images sent to the vision model above this are downscaled
    # throughput, retries
    concurrency: int = 4  # samples in flight (threads) = HTTP calls in flight at most
    chat_rpm: float = 300.0  # requests per minute to the chat/vision model (0: unlimited)
    image_rpm: float = 30.0  # requests per minute to the image model (0: unlimited)
    max_retries: int = 6  # per call, on 429 / 408 / 409 / 5xx / time-outs / connection errors
    backoff_base: float = 2.0
    backoff_max: float = 120.0
    timeout: float = 300.0  # seconds per HTTP request (image generation is slow)
    malformed_retries: int = 2  # new chat calls after an answer that does not parse
    max_failures: int = 50  # abort the run after this many failed samples (not refusals)
    refusal_patterns: tuple[str, ...] = (
        r"^\s*(i['\u2019]m|i am)\s+(sorry|unable|not able)",
        r"^\s*i\s+(can['\u2019]?t|cannot|won['\u2019]t)\s+(help|assist|comply|create|provide|do that|fulfil)",
        r"^\s*sorry,\s+(but\s+)?i",
    )
    # sampling
    seed: int = 0
    surreal_classes: str = "coco+openimages"  # coco | openimages | coco+openimages | a file path
    instruction_classes: str = "coco"
    surreal_types: dict[str, float] = dataclasses.field(default_factory=lambda: {
        # Echo-4o's published mix: hybridization 11,977; multi-object 8,881; spatiotemporal 8,401;
        # attribute shift 8,282.
        "hybridization": 11977.0, "multi_object": 8881.0, "spatiotemporal_anomaly": 8401.0,
        "attribute_shift": 8282.0})
    instruction_bins: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {
        # name: [min constraints, max constraints, min objects, max objects, weight]; Echo-4o's mix:
        # easy (1-3) 14,137; medium (3-5) 21,016; hard (>= 6) 32,805.
        "easy": [1, 3, 1, 2, 14137.0], "medium": [4, 5, 2, 3, 21016.0], "hard": [6, 9, 3, 4, 32805.0]})
    multiref_combos: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: {
        # name: [categories, weight]; "entity" = human or object. Echo-4o's mix: object-object 24,001;
        # any two entities 19,174; human-object-scene 13,566; human-human 11,084; others 4,904.
        "obj_obj": [["object", "object"], 24001.0],
        "any_two": [["entity", "entity"], 19174.0],
        "hum_obj_sce": [["human", "object", "scene"], 13566.0],
        "hum_hum": [["human", "human"], 11084.0],
        "hum_sce": [["human", "scene"], 1500.0],
        "hum_obj": [["human", "object"], 1500.0],
        "hum_hum_obj_sce": [["human", "human", "object", "scene"], 1000.0],
        "obj_obj_obj_sce": [["object", "object", "object", "scene"], 904.0]})
    generated_refs_per_category: int = 12  # multi-reference without --refs: references generated per category
    # files
    template_dir: str | None = None  # templates here override the built-in ones (same file names)
    data_dir: str | None = None  # word lists here (humans.txt, scenes.txt, ...) override the built-in ones
    shard_bytes: int = 256 << 20
    # cost
    prices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: json.loads(
        json.dumps(DEFAULT_PRICES)))
    est_output_tokens: int = 250  # dry-run estimate per chat answer
    est_image_tokens: int = 765  # dry-run estimate per image sent to a vision model (1024x1024, high detail)

    def __post_init__(self) -> None:
        self.check()
        self.refusal_patterns = tuple(self.refusal_patterns)

    @property
    def edit_model_name(self) -> str:
        return self.edit_model or self.image_model

    def update(self, values: dict[str, Any]) -> "SynthConfig":
        """Sets the fields in `values` (checked first: a ValueError names a bad key and what it expects)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (known: {sorted(names)})")
        for k, v in values.items():
            _check_field(k, v)
        for k, v in values.items():
            if k == "refusal_patterns":
                v = tuple(v)
            if k == "prices":
                merged = json.loads(json.dumps(self.prices))
                merged.update(v)
                v = merged
            setattr(self, k, v)
        self.check()
        return self

    def check(self) -> None:
        """Every field's type and range (ValueError naming the key, what it expects and what it got)."""
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name))
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*|auto", self.image_size):
            raise ValueError(f"image_size: expected WIDTHxHEIGHT (e.g. 1024x1024) or auto, "
                             f"got {_got(self.image_size)}")
        check_base_url(self.base_url, flag="base_url")
        check_api_key_env(self.api_key_env, flag="api_key_env")
        for model in dict.fromkeys((self.image_model, self.edit_model_name)):  # (a typo cost a 400 per sample)
            table = (self.prices.get(model) or {}).get("per_image")
            known = {q for row in table.values() for q in row} | {"auto"} if isinstance(table, dict) else None
            if known and self.image_quality and self.image_quality not in known:
                raise ValueError(f"image_quality: {model} knows {sorted(known)}, got {_got(self.image_quality)} "
                                 f"(the qualities of prices[{model!r}]['per_image']: add one there if your server "
                                 "takes it)")
        for k in ("chat_model", "vision_model", "image_model"):
            if not getattr(self, k).strip():
                raise ValueError(f"{k}: expected a model name, got an empty string")
        for i, p in enumerate(self.refusal_patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"refusal_patterns[{i}]: not a regular expression ({e}): {p!r}") from None
        for name, w in self.surreal_types.items():
            if w < 0:
                raise ValueError(f"surreal_types[{name!r}]: expected a weight >= 0, got {_got(w)}")
        for name, b in self.instruction_bins.items():
            if len(b) != 5:
                raise ValueError(f"instruction_bins[{name!r}]: expected [min constraints, max constraints, min objects, "
                                 f"max objects, weight], got a list of {len(b)}")
        for name, spec in self.multiref_combos.items():
            if not (len(spec) == 2 and isinstance(spec[0], (list, tuple)) and all(isinstance(c, str) for c in spec[0])
                    and _is_number(spec[1]) and spec[1] >= 0):
                raise ValueError(f"multiref_combos[{name!r}]: expected [list of categories, weight >= 0], "
                                 f"got {_got(spec)}")
        for model, p in self.prices.items():
            for k, v in p.items():
                if k == "per_image":
                    ok = _is_price(v) or (isinstance(v, dict) and all(
                        isinstance(row, dict) and all(_is_price(x) for x in row.values()) for row in v.values()))
                    if not ok:
                        raise ValueError(f"prices[{model!r}]['per_image']: expected a number >= 0 or "
                                         f"{{size: {{quality: number >= 0}}}}, got {_got(v)}")
                elif k not in _PRICE_KEYS:
                    raise ValueError(f"prices[{model!r}]: unknown key {k!r} "
                                     f"(known: {sorted(_PRICE_KEYS | {'per_image'})})")
                elif not _is_price(v):
                    raise ValueError(f"prices[{model!r}][{k!r}]: expected a number >= 0 (USD), got {_got(v)}")

    def endpoint(self) -> str | None:
        """The base URL called (the environment's OPENAI_BASE_URL when none is given; None: OpenAI's own),
        without credentials, query or a key-shaped path segment: what journals and manifests record."""
        return _public_url(effective_base_url(self.base_url))

    def to_public_dict(self) -> dict[str, Any]:
        """Everything that shapes the data, for manifests (no secrets: there are none in here; the
        base URL, the environment's OPENAI_BASE_URL when none is given, is stored without credentials or
        query)."""
        d = dataclasses.asdict(self)
        d["base_url"] = self.endpoint()
        d["refusal_patterns"] = list(self.refusal_patterns)
        return d


def load_config(path: str | os.PathLike | None = None, *, overrides_from: str = "overrides",
                **overrides: Any) -> SynthConfig:
    """Defaults, then the JSON file at `path`, then `overrides` whose value is not None. A bad value is a
    ValueError naming the file (or `overrides_from`, e.g. "command line"), the key and what it expects."""
    cfg = SynthConfig()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except OSError as e:
            raise ValueError(f"config file {path}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:  # not JSON, not UTF-8
            raise ValueError(f"config file {path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: expected a JSON object, got {_got(values)}")
        try:
            cfg.update(values)
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from None
    try:
        cfg.update({k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        raise ValueError(f"{overrides_from}: {e}") from None
    return cfg


# ------------------------------------------------------------------------------------------------ checks

# lower bounds of numeric fields: (operator, bound)
_RANGES: dict[str, tuple[str, float]] = {
    "max_image_pixels": (">=", 1), "concurrency": (">=", 1), "chat_rpm": (">=", 0), "image_rpm": (">=", 0),
    "max_retries": (">=", 0), "backoff_base": (">=", 0), "backoff_max": (">=", 0), "timeout": (">", 0),
    "malformed_retries": (">=", 0), "max_failures": (">=", 0), "generated_refs_per_category": (">=", 0),
    "shard_bytes": (">=", 1), "est_output_tokens": (">=", 0), "est_image_tokens": (">=", 0)}
_PRICE_KEYS = frozenset({"input_per_1m", "output_per_1m", "per_input_image", "text_input_per_1m",
                         "image_input_per_1m"})  # besides per_image
_SINGULAR = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             Any: "any value"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings", Any: "values"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_price(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _type_ok(v: Any, hint: Any) -> bool:
    """Whether `v` (as read from JSON: lists for tuples) is of the annotated type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if origin in (list, tuple):
        return isinstance(v, (list, tuple)) and all(_type_ok(x, args[0]) for x in v)
    if origin is dict:
        return isinstance(v, dict) and all(_type_ok(k, args[0]) and _type_ok(x, args[1]) for k, x in v.items())
    if hint is Any:
        return True
    if hint is float:
        return _is_number(v)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, hint)  # bool, str, NoneType


def _describe(hint: Any, plural: bool = False) -> str:
    """`hint` in words, as a JSON value ("an integer", "an object of lists of numbers", ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin in (list, tuple):
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}"
    if origin is dict:
        return f"{'objects' if plural else 'an object'} of {_describe(args[1], True)}"
    return (_PLURAL if plural else _SINGULAR)[hint]


def _got(v: Any) -> str:
    """The JSON type of `v`, with the value when it is a short scalar."""
    kind = ("null" if v is None else "boolean" if isinstance(v, bool) else "integer" if isinstance(v, int) else
            "number" if isinstance(v, float) else "string" if isinstance(v, str) else
            "list" if isinstance(v, (list, tuple)) else "object" if isinstance(v, dict) else type(v).__name__)
    if v is None or not isinstance(v, (bool, int, float, str)):
        return kind
    text = json.dumps(v)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(SynthConfig)


def _check_field(name: str, value: Any) -> None:
    """The type (the field's annotation) and range (`_RANGES`) of one config value."""
    hint = _FIELD_TYPES[name]
    op, bound = _RANGES.get(name, ("", 0))
    ok = _type_ok(value, hint) and (not op or value is None or (value >= bound if op == ">=" else value > bound))
    if not ok:
        expected = _describe(hint)
        if op:  # "an integer >= 1 or null"
            args = typing.get_args(hint)
            core = [a for a in args if a is not type(None)] or [hint]
            expected = " or ".join(f"{_describe(a)} {op} {bound:g}" for a in core) + (
                " or null" if len(core) < len(args) else "")
        raise ValueError(f"{name}: expected {expected}, got {_got(value)}")
