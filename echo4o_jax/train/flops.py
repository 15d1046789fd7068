"""FLOP accounting identical to the official BAGEL MFU formula, so MFU compares with the PyTorch side:

    dense FLOPs per token = 6 * N_active,  N_active = L * (3 H I + H (q + k + v + o dims)) + 2 V H
    attention FLOPs       = 12 * head_dim * heads * L * sum(sample_len ** 2)
(one expert per token; ViT / VAE not counted, as in the official code).
"""

from __future__ import annotations

import numpy as np

from ..config import LLMConfig

__all__ = ["active_params", "step_flops", "PEAK_FLOPS", "peak_flops_per_device"]

# bf16 dense peak per device (official table where it has one)
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "MI300X": 1336e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def active_params(c: LLMConfig) -> int:
    q = c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    return c.num_layers * (3 * c.hidden_size * c.intermediate_size + c.hidden_size * (2 * q + 2 * kv)) \
        + 2 * c.vocab_size * c.hidden_size


def step_flops(c: LLMConfig, num_tokens: int, sample_lens) -> float:
    sl = np.asarray(sample_lens, np.float64)
    return 6.0 * active_params(c) * num_tokens + 12.0 * c.head_dim * c.num_heads * c.num_layers * float(np.sum(sl ** 2))


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    if override:
        return override
    for name, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return v
    return None
