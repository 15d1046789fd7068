"""Full BAGEL-7B-MoT width (hidden 3584, MLP 18944, 28/4 heads, vocab 152064, SigLIP 1152/4304/16,
FLUX VAE), only a few layers, random weights, synthetic packs of ~10K tokens: for throughput runs
(bench/train_throughput.py, bench/gpu_check.sh)."""

from echo4o_jax.train.config_base import base_config


def get_config():
    c = base_config()
    g = c.model.geometry
    g.llm = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=4, num_heads=28,
                 num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    g.vit = dict(hidden_size=1152, intermediate_size=4304, num_layers=2, num_heads=16, patch_size=14,
                 image_size=980)
    g.vae = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, downsample=8)
    g.special_tokens = dict(bos_token_id=151644, eos_token_id=151645, start_of_image=151652, end_of_image=151653)
    g.max_latent_size = 64
    g.vit_max_num_patch_per_side = 70
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.data.kind = "synthetic"
    c.data.packs_per_step = -1
    # per pack (~10.7K tokens): 2 t2i 512^2 (2 x 1024 VAE), 2 edits (2 x 1024 VAE + 36^2 ViT each),
    # 1 understanding (36^2 ViT + 2 texts)
    c.data.synthetic = dict(image_size=(512, 512), text_len=64, t2i=2, edit=2, und=1)
    c.data.budget = dict(text_tokens=512, vit_tokens=4096, vae_tokens=6144, vae_images=6,
                         vae_image_size=(512, 512))
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 10
    c.train.steps = 20
    c.checkpoint.every = 10_000
    c.log.every = 1
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    return c
