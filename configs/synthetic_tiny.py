"""Tiny random BAGEL on synthetic packs: the fastest end-to-end run (tests, smoke checks)."""

from echo4o_jax.train.config_base import base_config


def get_config():
    c = base_config()
    c.train.steps = 6
    c.train.ema_decay = 0.9
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.checkpoint.every = 3
    c.log.every = 1
    c.data.packs_per_step = 1
    return c
