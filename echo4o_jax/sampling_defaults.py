"""The generation defaults of a request that names none: the sampler's (text-to-image or editing, as the
official inferencer's examples), the output size of text-to-image and the weights' dtype. Plain data, no JAX:
`generate` applies them, `eval.run` compares generations by them (a setting spelled out at its default is the
same generation). And how generate's error messages name a setting's flag (`SETTING_FLAGS`), which eval.run
maps to its own."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    # how reference images are VAE-encoded (VAE_POSTERIORS); None: a setting text-to-image does not have
    vae_posterior: str | None = None

    def settings(self) -> dict[str, Any]:
        """The settings a request gets, by name (those the task does not have left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# "sample": mean + std * N(0, 1), drawn from the request's seed (the official: its AutoEncoder's DiagonalGaussian
# samples, also for the context images of inference); "mean": the posterior mean (the golden recordings')
VAE_POSTERIORS = ("sample", "mean")
T2I_DEFAULTS = TaskDefaults(4.0, 1.5, (0.4, 1.0), "global")
EDIT_DEFAULTS = TaskDefaults(4.0, 2.0, (0.0, 1.0), "text_channel", vae_posterior="sample")
DEFAULT_SIZE = (1024, 1024)  # output size of text-to-image without a size


def default_dtype() -> str:
    """The weights' and compute dtype of a generation that names none (generate --dtype, generate_batch's `dtype`,
    eval.run): bfloat16 on a GPU / TPU, as the official inference (the 7B-MoT's 14B weights take 29 GB, where
    float32's 58 GB leave an 80 GB GPU no room for a benchmark batch's KV caches, and run at TF32's half the bf16
    rate); float32 on the CPU (bfloat16 matmuls are slow there; the golden recordings' tolerances are float32's)."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# How a GenerateError's advice names a setting: generate's CLI flag. Every generate message that names one of these
# settings takes its flag from here, and eval.run (which sets them by --gen-arg or its own flags) maps these strings.
SETTING_FLAGS = {"vae_transform": "--vae-transform MAX MIN", "vit_transform": "--vit-transform MAX MIN",
                 "size": "--size HxW, or `size` in a --prompts request", "max_context": "--max-context",
                 "dtype": "--dtype", "step": "--step", "attention_impl": "--attention-impl"}


def task_defaults(has_images: bool) -> TaskDefaults:
    """The sampler defaults of a request with reference images (editing) or without (text-to-image)."""
    return EDIT_DEFAULTS if has_images else T2I_DEFAULTS


def default_settings(has_images: bool) -> dict[str, Any]:
    """The sampler settings and dtype a request with (or without) reference images gets when it names none,
    as JSON values (the interval a list)."""
    d = task_defaults(has_images).settings()
    return {**d, "cfg_interval": list(d["cfg_interval"]), "dtype": default_dtype()}
