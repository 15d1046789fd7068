"""Defaults shared by every training config (configs/*.py start from `base_config()`).

Sources of the defaults: the official BAGEL training code (`train/pretrain_unified_navit.py`,
`data/dataset_base.py`) as summarised in ../shared/docs/bagel_architecture.md §4.
"""

from __future__ import annotations

from ml_collections import ConfigDict

__all__ = ["base_config", "tiny_geometry"]


def tiny_geometry(vocab_size: int = 256) -> ConfigDict:
    """A small random BAGEL for CPU runs and tests."""
    return ConfigDict(dict(
        llm=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
        vit=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14, image_size=98),
        vae=dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, downsample=8),
        special_tokens=dict(bos_token_id=vocab_size - 4, eos_token_id=vocab_size - 3,
                            start_of_image=vocab_size - 2, end_of_image=vocab_size - 1),
        max_latent_size=16,
        vit_max_num_patch_per_side=7,
    ))


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = ""
    c.multihost = False
    c.model = ConfigDict(dict(
        init="random",            # random | checkpoint
        ckpt="",                  # official BAGEL folder, converted Orbax folder or training workdir
        geometry=tiny_geometry(),  # used when init == random
        compute_dtype="float32",  # bfloat16 on accelerators (fp32 master weights stay in param_dtype)
        param_dtype="float32",
        remat="none",             # none | full | dots | dots_no_batch
        attention_impl="xla_blockwise",  # | xla_dense | pallas_gpu | pallas_tpu | pallas_interpret
        attention_block_q=512,
        attention_block_kv=512,
        attention_tuning="",      # pallas_gpu launch shapes per kernel, e.g. "fwd=128x64:w8:s3,dkv=64x128:w8:s2"
        attention_chunk=0,        # xla_blockwise block pairs per loop step (0: q blocks; smaller: less memory)
        timestep_shift=1.0,       # official training default (BagelConfig.timestep_shift)
        vae_posterior="sample",   # sample (official: z = mean + std * N(0, 1)) | mean (deterministic)
    ))
    c.data = ConfigDict(dict(
        kind="synthetic",         # synthetic | records
        seed=0,
        packs_per_step=1,         # global packed sequences per step (one per data-parallel device is typical)
        tokenizer="",
        budget=dict(text_tokens=128, vit_tokens=64, vae_tokens=64, vae_images=4, vae_image_size=(32, 32)),
        synthetic=dict(image_size=(32, 32), text_len=8, t2i=1, edit=1, und=1),
        # records source (echo4o_jax.data): paths / weights / transforms / dropout. allow_incomplete: train on a
        # dataset whose manifest says it is incomplete (a failed or interrupted import / synthesis run: its
        # "error" says what failed; rerunning that command completes it); False refuses it, naming the manifest
        records=dict(datasets=[], demo_dir="", workers=0, allow_incomplete=False),
        vae_latents="",           # folder of precomputed VAE posterior moments (python -m echo4o_jax.data.latents):
                                  # the pipeline loads them instead of decoding VAE images; "" = encode in the step
        drop_unfit=False,         # records: drop a sample that fits neither the pack nor the buffer, as the official
                                  # loop does (True: the official data mix), instead of starting the next pack with it
        text_dropout=0.1,         # ModelArguments values (override DataConfig defaults 0.1 / 0.4 / 0.1)
        vit_dropout=0.3,
        vae_dropout=0.3,
    ))
    # weight_decay: not an official setting (its AdamW hard-codes 0); a non-zero value decays every parameter,
    # norms, biases and embeddings included (optax.adamw without a mask)
    c.optim = ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, warmup_steps=2000, schedule="constant",
        min_lr=1e-7, grad_clip=1.0,
    ))
    c.train = ConfigDict(dict(
        steps=500_000, seed=4396, ema_decay=0.9999, ce_weight=1.0, mse_weight=1.0,
        # allow_replicated: train although the mesh's fsdp / tensor leave parameters whole on every device (a
        # width they do not divide) at more than 1 GiB per device (else refused before the weights load, naming
        # a data x fsdp split that divides them)
        allow_replicated=False,
        ce_loss_reweighting=False,  # official option: each CE token weighted 1/sqrt(its text segment's length)
        # as the official flags: freeze_vit / freeze_llm = requires_grad False on the SigLIP ViT / the whole
        # language model (no gradient, no update); freeze_und detaches the understanding tokens' paths in the model
        freeze_und=False, freeze_vit=False, freeze_llm=False, skip_nonfinite=False,
        # the official flag: True, the ViT features of the references condition the target and the ViT + connector
        # train (a pack without any ViT image trains too; the official loop skips it, or fails on it in its first
        # version); False, the ViT and connector are not run nor trained, the ViT tokens' slots are zero vectors
        # (as the official model without a ViT), and the checkpoint keeps the base model's ViT and connector
        visual_und=True,
        debug_step_delay=0.0,     # seconds slept after each step (tests of kill / resume only)
        # persistent XLA compilation cache: a folder (local or gs://) where compiled steps are kept, so that a
        # rerun or resume of the same step skips its compile; "" = none. JAX_COMPILATION_CACHE_DIR, when set,
        # takes precedence (it is JAX's own setting).
        compilation_cache="",
        # a records checkpoint's data position on another process count or packs per process: "exact" refuses it
        # (the error names what changed); "reshard" goes on, per dataset, from the first sample past those the old
        # processes had read, in the same shuffled order (their buffered samples are handed over; their uneven
        # reads give a few samples read twice or not at all: log.jsonl's data_resharded record counts them).
        # Synthetic data resumes exactly either way. "restart": a data state that cannot resume exactly (other data
        # settings, or other records under a dataset's path, which "exact" refuses, naming them) is dropped: the
        # weights, optimizer and step resume, the data stream starts from its beginning (a state that can resume
        # still does).
        data_resume="exact",
    ))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ConfigDict(dict(every=1000, keep=3, async_save=True))
    c.log = ConfigDict(dict(
        every=10, tensorboard=True, sample_every=0, sample_prompts=[], sample_size=(32, 32), sample_steps=10,
        sample_cfg=4.0, sample_max_context=256, peak_flops=0.0,
        # profile_start > 0: trace steps profile_start+1 .. profile_start+profile_steps (jax.profiler; the
        # trace in <workdir>/profile/ opens in Perfetto / TensorBoard) and print their device time by the
        # model's named scopes (attention, mlp, qkv, ..., optimizer), also written to profile/summary.json
        profile_start=0, profile_steps=3,
    ))
    return c
