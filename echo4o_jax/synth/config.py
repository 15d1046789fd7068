"""Configuration of the GPT-4o data synthesis: models, image parameters, limits, prices, track weights.

Every field has a default; ``--config FILE.json`` overrides any subset (unknown keys are an error) and
the command line overrides the file. Nothing secret lives here: the API key is read from the
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
import os
from typing import Any

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
        self.refusal_patterns = tuple(self.refusal_patterns)
        self.check()

    @property
    def edit_model_name(self) -> str:
        return self.edit_model or self.image_model

    def update(self, values: dict[str, Any]) -> "SynthConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (known: {sorted(names)})")
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
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")
        if self.max_retries < 0 or self.malformed_retries < 0:
            raise ValueError("max_retries and malformed_retries must be >= 0")
        if self.chat_rpm < 0 or self.image_rpm < 0:
            raise ValueError("chat_rpm and image_rpm must be >= 0 (0 = unlimited)")
        if "x" not in self.image_size and self.image_size != "auto":
            raise ValueError(f"image_size={self.image_size!r}: expected WIDTHxHEIGHT or auto")

    def to_public_dict(self) -> dict[str, Any]:
        """Everything that shapes the data, for manifests (no secrets: there are none in here; the
        base URL is stored without credentials or query)."""
        from echo4o_jax.eval.judge import _public_url

        d = dataclasses.asdict(self)
        d["base_url"] = _public_url(self.base_url)
        d["refusal_patterns"] = list(self.refusal_patterns)
        return d


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> SynthConfig:
    """Defaults, then the JSON file at `path`, then `overrides` whose value is not None."""
    cfg = SynthConfig()
    if path:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the config must be a JSON object")
        cfg.update(values)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg
