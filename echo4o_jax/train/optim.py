"""Optimizer, learning-rate schedule and EMA (official defaults: AdamW (0.9, 0.95), eps 1e-15, weight
decay 0, linear warm-up then constant or cosine, global-norm clip 1.0, EMA 0.9999 after every step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["lr_schedule", "make_optimizer", "ema_update"]


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, kind: str = "constant", min_lr: float = 0.0):
    """HF `get_constant_schedule_with_warmup` / cosine with warm-up: lr(step) for the update at `step`
    (0-based), i.e. lr * step / warmup during warm-up (0 at the first update, as the official LambdaLR)."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={kind!r}: expected constant|cosine")
    warm = optax.linear_schedule(0.0, lr, max(warmup_steps, 1)) if warmup_steps > 0 else optax.constant_schedule(lr)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=min_lr / lr if lr else 0.0)
    return optax.join_schedules([warm, after], [warmup_steps]) if warmup_steps > 0 else after


def make_optimizer(schedule, *, b1: float, b2: float, eps: float, weight_decay: float, grad_clip: float,
                   trainable_mask=None) -> optax.GradientTransformation:
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if trainable_mask is not None:
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                   jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask))
    return tx


def schedule_count(opt_state, default):
    """The step count the optimizer's learning-rate schedule reads (its `ScaleByScheduleState`), or `default`
    when there is none. It lags the train step by the steps skipped as non-finite (train.skip_nonfinite: the
    optimizer state is kept as it was), so the lr logged is `schedule(schedule_count(...))`, the one applied."""
    states = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(x, optax.ScaleByScheduleState)]
    return states[0].count if states else default


def ema_update(ema, params, decay: float, trainable=None):
    """ema <- decay * ema + (1 - decay) * params (in the EMA's dtype); where `trainable` (a bool tree like
    params) is False, the EMA is kept as it is."""
    def one(e, p, t=True):
        return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype) if t else e
    return jax.tree.map(one, ema, params) if trainable is None else jax.tree.map(one, ema, params, trainable)
