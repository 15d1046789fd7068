"""Model geometry, read from an official checkpoint folder or built for the released 7B-MoT.

Every size used by the model comes from these dataclasses; nothing is hard-coded elsewhere.
`BagelConfig.from_checkpoint_dir` reads `llm_config.json` / `vit_config.json` (HF field names, as
shipped) and the optional `meta.json` (AE and BAGEL fields; absent from the released folder, where the
defaults below are the release's values).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

__all__ = [
    "LLMConfig",
    "ViTConfig",
    "VAEConfig",
    "SpecialTokens",
    "BagelConfig",
    "ConfigError",
]


class ConfigError(ValueError):
    """A checkpoint config file is missing, unreadable or inconsistent."""


_REQUIRED = object()


def _field(d: dict[str, Any], key: str, where: str, kind: type = int, default: Any = _REQUIRED,
           minimum: float = 1) -> Any:
    """`d[key]` of a config file, checked (`default` when absent or null): for `kind` int a JSON integer (not a
    bool) >= `minimum`, else a finite number > `minimum`. A ConfigError names the file (`where`), the key and
    the value: a string, a fraction for a size or a negative layer count used to end in a TypeError deep inside
    JAX, or to be cut silently (4.9 -> 4)."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: no {key!r}")
        return default
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: {key!r} must be an integer, got {v!r}")
        if v < minimum:
            raise ConfigError(f"{where}: {key}={v} must be >= {minimum}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: {key!r} must be a number, got {v!r}")
    if not v > minimum:
        raise ConfigError(f"{where}: {key}={v} must be > {minimum}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "llm_config.json") -> "LLMConfig":
        hidden = _field(d, "hidden_size", where)
        heads = _field(d, "num_attention_heads", where)
        if d.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=True is not supported by BAGEL")
        return cls(
            vocab_size=_field(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_field(d, "intermediate_size", where),
            num_layers=_field(d, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=_field(d, "num_key_value_heads", where, default=heads),
            head_dim=_field(d, "head_dim", where, default=hidden // heads),
            rope_theta=_field(d, "rope_theta", where, float, 10000.0, minimum=0.0),
            rms_norm_eps=_field(d, "rms_norm_eps", where, float, 1e-6, minimum=0.0),
            max_position_embeddings=_field(d, "max_position_embeddings", where, default=32768),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,  # read back by from_hf (it may differ from hidden_size / heads)
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
        }


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int  # layers actually instantiated: vit_config.json's num_hidden_layers - 1
    num_heads: int
    patch_size: int = 14
    num_channels: int = 3
    image_size: int = 980
    layer_norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "vit_config.json") -> "ViTConfig":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"{where}: hidden_act={act!r}; only gelu_pytorch_tanh is supported")
        return cls(
            hidden_size=_field(d, "hidden_size", where),
            intermediate_size=_field(d, "intermediate_size", where),
            # The official loaders drop the last SigLIP layer.
            num_layers=_field(d, "num_hidden_layers", where, minimum=2) - 1,
            num_heads=_field(d, "num_attention_heads", where),
            patch_size=_field(d, "patch_size", where, default=14),
            num_channels=_field(d, "num_channels", where, default=3),
            image_size=_field(d, "image_size", where, default=980),
            layer_norm_eps=_field(d, "layer_norm_eps", where, float, 1e-6, minimum=0.0),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers + 1,
            "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
        }


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder (defaults: the FLUX.1 `ae.safetensors` shipped with BAGEL)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    downsample: int = 8

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "meta.json") -> "VAEConfig":
        where = f"{where} 'ae'"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k in d:
            if k == "ch_mult":
                m = d[k]
                if not isinstance(m, list) or not m or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                           for x in m):
                    raise ConfigError(f"{where}: 'ch_mult' must be a list of positive integers, got {m!r}")
                kw[k] = tuple(m)
            elif isinstance(fields[k], float):  # scale and shift: any finite number
                kw[k] = _field(d, k, where, float, minimum=-math.inf)
            else:
                kw[k] = _field(d, k, where)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int = 151644  # <|im_start|>
    eos_token_id: int = 151645  # <|im_end|>
    start_of_image: int = 151652  # <|vision_start|>
    end_of_image: int = 151653  # <|vision_end|>

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig
    special_tokens: SpecialTokens = SpecialTokens()
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    timestep_embed_dim: int = 256
    # Numerics / execution.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention_impl: str = "xla_blockwise"  # xla_blockwise | xla_dense | pallas_gpu | pallas_tpu | pallas_interpret
    attention_block_q: int = 512  # xla_blockwise / pallas_tpu blocks; pallas_gpu's tiles: attention_tuning
    attention_block_kv: int = 512
    attention_tuning: str = ""  # pallas_gpu launch shapes, e.g. "fwd=128x64:w8:s3" (kernels.pallas_flash.parse_tuning)
    # xla_blockwise: block pairs per loop step (0: the number of q blocks). Its score tensors are chunk x heads x
    # block_q x block_kv float32 (0.9 GiB each at the 7B's 16K-token pack): a smaller chunk, less memory, more steps
    attention_chunk: int = 0
    freeze_und: bool = False  # training: detach every understanding-token path (official `freeze_und`)

    # ------------------------------------------------------------------ derived sizes
    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    def replace(self, **kw) -> "BagelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_checkpoint_dir(cls, path: str | os.PathLike, **overrides) -> "BagelConfig":
        path = os.fspath(path)
        llm_path, vit_path = os.path.join(path, "llm_config.json"), os.path.join(path, "vit_config.json")
        llm = LLMConfig.from_hf(_read_json(llm_path), llm_path)
        vit = ViTConfig.from_hf(_read_json(vit_path), vit_path)
        meta_path = os.path.join(path, "meta.json")
        kw: dict[str, Any] = {}
        vae = VAEConfig()
        if os.path.exists(meta_path):
            meta = _read_json(meta_path)
            if "ae" in meta:
                vae = VAEConfig.from_dict(meta["ae"], meta_path)
            b = meta.get("bagel", {})
            if not isinstance(b, dict):
                raise ConfigError(f"{meta_path}: 'bagel' must be a JSON object, got {type(b).__name__}")
            b = dict(b)
            if "special_token_ids" in b:
                ids = b.pop("special_token_ids")
                names = {f.name for f in dataclasses.fields(SpecialTokens)}
                if not isinstance(ids, dict) or set(ids) - names:
                    raise ConfigError(f"{meta_path}: 'special_token_ids' must map {sorted(names)} to token ids, "
                                      f"got {ids!r}")
                kw["special_tokens"] = SpecialTokens(**{k: _field(ids, k, f"{meta_path} 'special_token_ids'",
                                                                  minimum=0) for k in ids})
            if b.pop("interpolate_pos", False):
                raise ConfigError(f"{meta_path}: interpolate_pos=True is not supported (the release uses False)")
            for k in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "timestep_shift"):
                if k in b:
                    kind = type(getattr(cls, k))
                    kw[k] = _field(b, k, f"{meta_path} 'bagel'", kind, minimum=1 if kind is int else 0.0)
                    b.pop(k)
            if "connector_act" in b:
                kw["connector_act"] = b.pop("connector_act")
        kw.update(overrides)
        cfg = cls(llm=llm, vit=vit, vae=vae, **kw)
        cfg.validate()
        return cfg

    def meta_dict(self) -> dict[str, Any]:
        ae = dataclasses.asdict(self.vae)
        ae["ch_mult"] = list(ae["ch_mult"])
        return {
            "ae": ae,
            "bagel": {
                "latent_patch_size": self.latent_patch_size,
                "max_latent_size": self.max_latent_size,
                "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side,
                "connector_act": self.connector_act,
                "interpolate_pos": False,
                "timestep_shift": self.timestep_shift,
                "special_token_ids": self.special_tokens.as_dict(),
            },
        }

    def validate(self) -> None:
        for part in ("llm", "vit", "vae"):  # (a geometry from model.geometry is not read through _field: 0 layers or
            sub = getattr(self, part)  # heads trained, or failed at the first checkpoint)
            for f in dataclasses.fields(sub):
                v = getattr(sub, f.name)
                if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                    raise ConfigError(f"{part}.{f.name}={v} must be >= 1")
        l = self.llm
        if l.num_heads % l.num_kv_heads:
            raise ConfigError(f"num_attention_heads={l.num_heads} is not a multiple of num_key_value_heads={l.num_kv_heads}")
        if l.head_dim % 2:
            raise ConfigError(f"head_dim={l.head_dim} must be even for rotate-half RoPE")
        if l.hidden_size % 4:
            raise ConfigError(f"hidden_size={l.hidden_size} must be a multiple of 4 for the 2-D sin-cos tables")
        if self.vit.hidden_size % self.vit.num_heads:
            raise ConfigError("vit hidden_size must be a multiple of num_attention_heads")
        side = self.vit.image_size // self.vit.patch_size
        if self.vit_max_num_patch_per_side > side:  # (ids row * max_side + col index SigLIP's table of side^2 rows:
            # past it, the lookup gives NaN silently; the official's nn.Embedding raises)
            raise ConfigError(f"vit_max_num_patch_per_side={self.vit_max_num_patch_per_side} exceeds SigLIP's position "
                              f"table: vit image_size {self.vit.image_size} / patch_size {self.vit.patch_size} = {side} "
                              "patches per side")
        if self.connector_act != "gelu_pytorch_tanh":
            raise ConfigError(f"connector_act={self.connector_act!r} is not supported")
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise ConfigError(f"remat={self.remat!r}: expected none|full|dots|dots_no_batch")
        if self.attention_impl not in ("xla_blockwise", "xla_dense", "pallas_gpu", "pallas_tpu", "pallas_interpret"):
            raise ConfigError(f"attention_impl={self.attention_impl!r}: "
                              "expected xla_blockwise|xla_dense|pallas_gpu|pallas_tpu|pallas_interpret")
        for k in ("attention_block_q", "attention_block_kv"):  # (0 divided by zero in xla_blockwise)
            if int(getattr(self, k)) < 8:
                raise ConfigError(f"{k}={getattr(self, k)} must be >= 8")
        if int(self.attention_chunk) < 0:
            raise ConfigError(f"attention_chunk={self.attention_chunk} must be >= 0 (0: the number of q blocks)")
        if self.attention_tuning:
            from .model.kernels.pallas_flash import parse_tuning

            try:
                parse_tuning(self.attention_tuning)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    @classmethod
    def bagel_7b_mot(cls, **overrides) -> "BagelConfig":
        """The released BAGEL-7B-MoT geometry (Qwen2.5-7B x2 experts, SigLIP so400m 26 layers, FLUX VAE)."""
        llm = LLMConfig(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
            num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        )
        vit = ViTConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                        patch_size=14, image_size=980, layer_norm_eps=1e-6)
        return cls(llm=llm, vit=vit, vae=VAEConfig(), max_latent_size=64, vit_max_num_patch_per_side=70,
                   **overrides)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing config file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
