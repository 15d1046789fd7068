"""FLOP accounting identical to the official BAGEL MFU formula, so MFU compares with the PyTorch side:

    dense FLOPs per token = 6 * N_active,  N_active = L * (3 H I + H (q + k + v + o dims)) + 2 V H
    attention FLOPs       = 12 * head_dim * heads * L * sum(sample_len ** 2)
(one expert per token; ViT / VAE not counted, as in the official code).

`full_step_flops` adds what that formula leaves out, for a "full-model" figure next to it: the SigLIP NaViT
(forward, and backward when trained), the connector, the time embedder and the latent in/out projections,
and the frozen VAE encoder's forward when the step encodes its images (not with precomputed latents).
Those counts are the matmul / convolution multiply-adds x 2 that the modules perform (convolutions counted
tap by tap inside the zero padding, as XLA's cost analysis counts them); tests compare them with XLA's count.
"""

from __future__ import annotations

import numpy as np

from ..config import BagelConfig, LLMConfig, VAEConfig, ViTConfig

__all__ = ["active_params", "step_flops", "vit_flops", "vae_encoder_flops", "full_step_flops", "PEAK_FLOPS",
           "peak_flops_per_device"]

# bf16 dense peak per device (official table where it has one)
# (the official's H100 / H200 / H800 entries give PCIe and NVL parts the SXM figure too, lower than theirs: kept,
# so that MFU compares with the official logs; log.peak_flops / --peak-flops set a part's own)
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "MI300X": 1336e12,
    "H20": 148e12, "L40": 181.05e12, "L40S": 362.05e12, "L20": 119.5e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
}


def active_params(c: LLMConfig) -> int:
    q = c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    return c.num_layers * (3 * c.hidden_size * c.intermediate_size + c.hidden_size * (2 * q + 2 * kv)) \
        + 2 * c.vocab_size * c.hidden_size


def step_flops(c: LLMConfig, num_tokens: int, sample_lens) -> float:
    sl = np.asarray(sample_lens, np.float64)
    return 6.0 * active_params(c) * num_tokens + 12.0 * c.head_dim * c.num_heads * c.num_layers * float(np.sum(sl ** 2))


def vit_flops(c: ViTConfig, image_patches) -> float:
    """Forward FLOPs of the SigLIP NaViT on images of n_i patches: patch embedding, per layer the q/k/v/out
    and MLP projections, and attention inside each image (QK^T and PV: 4 n_i^2 hidden)."""
    n = np.asarray(image_patches, np.float64)
    h, i = c.hidden_size, c.intermediate_size
    per_token = 2 * c.patch_dim * h + c.num_layers * 2 * (4 * h * h + 2 * h * i)
    return per_token * float(n.sum()) + c.num_layers * 4.0 * h * float(np.sum(n ** 2))


def _taps3(h: int, w: int) -> int:
    """3x3 convolution, stride 1, padding 1, on h x w: kernel taps inside the input, summed over outputs."""
    return (3 * h - 2) * (3 * w - 2)


def vae_encoder_flops(c: VAEConfig, image_hw) -> float:
    """Forward FLOPs of the VAE encoder (convolutions and the mid-block attention) on images of (H, W)
    pixels (multiples of the downsampling factor)."""
    total = 0.0
    mult = (1,) + tuple(c.ch_mult)
    for H, W in np.asarray(image_hw, np.int64).reshape(-1, 2):
        h, w = int(H), int(W)
        f = 2 * _taps3(h, w) * c.in_channels * c.ch
        ci = c.ch
        for level in range(len(c.ch_mult)):
            co = c.ch * mult[level + 1]
            for _ in range(c.num_res_blocks):  # ResnetBlock: two 3x3 convolutions, 1x1 shortcut if widths differ
                f += 2 * _taps3(h, w) * (ci * co + co * co) + (2 * h * w * ci * co if ci != co else 0)
                ci = co
            if level != len(c.ch_mult) - 1:  # Downsample: 3x3 stride 2, padding (0, 1)
                f += 2 * (3 * (h // 2) - 1) * (3 * (w // 2) - 1) * ci * ci
                h, w = h // 2, w // 2
        n = h * w  # mid: ResnetBlock, attention (q, k, v, proj_out 1x1; QK^T and PV), ResnetBlock; conv_out
        f += 2 * 2 * _taps3(h, w) * 2 * ci * ci + 4 * 2 * n * ci * ci + 4 * n * n * ci
        f += 2 * _taps3(h, w) * ci * 2 * c.z_channels
        total += f
    return total


def full_step_flops(cfg: BagelConfig, num_tokens: int, sample_lens, vit_image_patches, vae_tokens: int,
                    vae_image_hw=(), *, freeze_vit: bool = False, visual_und: bool = True) -> float:
    """`step_flops` plus the rest of the model for one pack: ViT (forward; + backward when trained), the
    connector on the ViT tokens, the time embedder and vae2llm / llm2vae on the `vae_tokens` latent tokens
    (forward + backward), and the VAE encoder's forward on `vae_image_hw` (empty when the latents were
    precomputed). `visual_und=False` (train.visual_und): the ViT and connector are not run."""
    H = cfg.llm.hidden_size
    n_vit = float(np.sum(np.asarray(vit_image_patches, np.float64)))
    connector = 2 * n_vit * (cfg.vit.hidden_size * H + H * H)
    latent = 2 * float(vae_tokens) * (cfg.timestep_embed_dim * H + H * H + 2 * cfg.patch_latent_dim * H)
    vit = vit_flops(cfg.vit, vit_image_patches)
    # frozen ViT: its forward only, and the connector needs no input gradient (forward + weight gradient);
    # trained: forward + backward (2x), less the patch embedding's input gradient (the pixels need none)
    patch_dx = 2 * n_vit * cfg.vit.patch_dim * cfg.vit.hidden_size
    vision = vit + 2 * connector if freeze_vit else 3 * (vit + connector) - patch_dx
    vision = vision if visual_und else 0.0
    return step_flops(cfg.llm, num_tokens, sample_lens) + vision + 3 * latent + vae_encoder_flops(cfg.vae, vae_image_hw)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    if override:
        return override
    for name, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return v
    return None
