"""The CPU demo: a tiny random BAGEL trained on the offline demo dataset (coloured shapes with exact
compositional captions, multi-reference compositions, image -> caption), written on first use.
A few minutes on 2 CPU cores; the loss falls and sample grids land in <workdir>/samples/.

    python -m echo4o_jax.train --config configs/demo.py --workdir outputs/demo
"""

from echo4o_jax.data.demo import build_tokenizer, special_tokens_info
from echo4o_jax.train.config_base import base_config, tiny_geometry


def get_config():
    c = base_config()
    tok = special_tokens_info(build_tokenizer())
    g = tiny_geometry(vocab_size=tok["vocab_size"])
    g.special_tokens = dict(bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"],
                            start_of_image=tok["start_of_image"], end_of_image=tok["end_of_image"])
    g.max_latent_size = 8  # 64 px images: 4 x 4 latent tokens
    c.model.geometry = g
    c.data.kind = "records"
    c.data.records = dict(demo_dir="outputs/demo_data", demo_image_size=64, workers=0, datasets=[], root="",
                          allow_incomplete=False)
    c.data.tokenizer = "outputs/demo_data/tokenizer/tokenizer.json"
    c.data.packs_per_step = 2
    # xla_blockwise on CPU: small blocks skip more of the mask's empty area (18% faster steps than 512 here)
    c.model.attention_block_q = c.model.attention_block_kv = 32
    c.data.budget = dict(text_tokens=192, vit_tokens=96, vae_tokens=160, vae_images=8, vae_image_size=(64, 64))
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.train.steps = 300
    c.train.seed = 0
    c.train.ema_decay = 0.98
    c.checkpoint.every = 100
    c.log.every = 10
    c.log.sample_every = 150
    c.log.sample_prompts = ["a photo of a red circle", "a photo of two blue squares",
                            "a photo of a green star on the left of a yellow triangle"]
    c.log.sample_size = (64, 64)
    c.log.sample_steps = 10
    c.log.sample_max_context = 128
    return c
