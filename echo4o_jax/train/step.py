"""The sharded train step: VAE encoding (frozen) inside the step, or posterior moments precomputed by the
data pipeline (`data.vae_latents`); the posterior sampled (official) or taken at its mean
(`model.vae_posterior`); flow-matching + CE loss normalised by global token counts, AdamW with clipping,
EMA, and a guard that never applies a non-finite update."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..model.bagel import latent_tokens_from_latents, packed_loss
from ..model.vae import latent_from_moments
from ..packing import normalize_images
from .optim import ema_update, schedule_count

__all__ = ["VAE_POSTERIORS", "check_vae_posterior", "encode_batch_latents", "make_loss_and_grads",
           "apply_update", "make_train_step", "trainable_mask", "init_train_state"]

# "sample": z = mean + std * N(0, 1), as the official training (its DiagonalGaussian samples);
# "mean": the posterior mean (deterministic; the golden recordings use it).
VAE_POSTERIORS = ("sample", "mean")


def check_vae_posterior(value: str, name: str = "vae_posterior") -> str:
    if value not in VAE_POSTERIORS:
        raise ValueError(f"{name}={value!r}: expected one of {'|'.join(VAE_POSTERIORS)}")
    return value


def image_moments(vae, batch) -> jax.Array:
    """Posterior moments [B, N, H/8, W/8, 2z] of a stacked batch's `vae_images` canvases, each image encoded on
    its pack's official canvas (see `encode_batch_latents`)."""
    imgs = normalize_images({k: batch[k] for k in ("vae_images", "vae_image_hw")})["vae_images"]
    B, N, H, W, C = imgs.shape
    if N == 0:
        f = vae.cfg.downsample
        return jnp.zeros((B, 0, H // f, W // f, 2 * vae.cfg.z_channels), jnp.float32)
    # the official code pads a pack's images to their max height / width, not to our static canvas
    pack_hw = jnp.broadcast_to(jnp.max(batch["vae_image_hw"], axis=1, keepdims=True), (B, N, 2))
    m = vae.encode_moments(imgs.reshape(B * N, H, W, C).astype(vae.dtype), valid_hw=pack_hw.reshape(B * N, 2))
    return m.reshape(B, N, *m.shape[1:])


def encode_batch_latents(vae, batch, patch: int, rng: jax.Array | None = None) -> jax.Array:
    """Clean latent tokens x0 [B, Cg, p*p*z] of a stacked batch. The posterior moments of every VAE image
    come from the batch's `vae_moments` canvases (precomputed by the data pipeline: the VAE encoder is not
    run) or from encoding its padded `vae_images` canvases together (uint8 pixels normalised first,
    `packing.normalize_images`: bit-identical to float packs), each image on its pack's official canvas
    (the max height / width of the pack's images, `AutoEncoder.encode_moments(valid_hw=...)`), whatever
    the static canvas size. Both paths then take the same moments -> latent step
    (`vae.latent_from_moments`: the mean, or a sample drawn with `rng` over the [B * N, h, w, z] canvases)
    and gather each token from its image's latent grid."""
    moments = batch["vae_moments"] if "vae_moments" in batch else image_moments(vae, batch)
    B, N = moments.shape[:2]
    if N == 0:
        return jnp.zeros(batch["latent_pos_ids"].shape + (patch * patch * vae.cfg.z_channels,), jnp.float32)
    lat = latent_from_moments(moments.reshape(B * N, *moments.shape[2:]), vae.cfg, rng=rng)
    lat = lat.reshape(B, N, *lat.shape[1:])
    gather = jax.vmap(lambda l, i, hw: latent_tokens_from_latents(l, i, hw, patch))
    return jax.lax.stop_gradient(gather(lat, batch["vae_image_index"], batch["vae_token_hw"]))


def trainable_mask(params: dict, *, freeze_vit: bool = False, freeze_llm: bool = False,
                   visual_und: bool = True) -> dict:
    """Bool tree over the Param pure dict: False = frozen, as the official `requires_grad = False`: no
    gradient (the loss sees it through `stop_gradient`, so it adds nothing to the clipped norm and its
    backward is not computed), no update and no EMA update. `freeze_vit`: the SigLIP ViT (the connector still
    trains); `freeze_llm`: the whole language model, both experts; `visual_und=False`: the ViT and the
    connector, which the step does not run (the official model has none then: its checkpoint lacks them and
    Echo-4o's merge_safetensors.py takes them from the base model, as they stay here). (`freeze_und` is not a
    mask: as the official, it detaches the understanding tokens' paths inside the model.)"""
    frozen_tops = (({"vit"} if freeze_vit else set()) | ({"llm"} if freeze_llm else set())
                   | (set() if visual_und else {"vit", "connector_fc1", "connector_fc2"}))
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", path[0]) not in frozen_tops,
                                            params)


def init_train_state(params: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    return dict(params=params, ema=jax.tree.map(lambda x: x.astype(jnp.float32), params), opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed))


def make_loss_and_grads(graphdef, buffers, vae_graphdef, *, patch: int, ce_weight: float, mse_weight: float,
                        vae_posterior: str = "sample", ce_reweighting: bool = False,
                        trainable: dict | None = None, visual_und: bool = True) -> Callable:
    """f(params, vae_state, batch, noise | None, rng) -> ((loss, aux), grads). The frozen VAE encodes the
    batch's images (or the batch carries precomputed `vae_moments`); the latent is the posterior mean or,
    with `vae_posterior="sample"`, a sample drawn with its own key: `rng` is split into (noise key,
    posterior key). With "mean", `rng` is the noise key as it is (and may be None when `noise` is given);
    noise is drawn unless given ([B, Cg, p*p*z]). `trainable` (`trainable_mask`): frozen parameters get
    exactly zero gradients. `visual_und=False`: the ViT tokens are zero vectors (`bagel.forward_packed`)."""
    sample = check_vae_posterior(vae_posterior) == "sample"

    def loss_of(params, batch, noise, x0):
        if trainable is not None:
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
        model = nnx.merge(graphdef, params, buffers)
        return packed_loss(model, batch, noise, x0, ce_weight=ce_weight, mse_weight=mse_weight,
                           ce_reweighting=ce_reweighting, visual_und=visual_und)

    def f(params, vae_state, batch, noise, rng):
        # uint8 pixel batches (the data pipeline's) -> the float32 [-1, 1] arrays of a float pack, on device
        batch = normalize_images(batch)
        vae = nnx.merge(vae_graphdef, vae_state)
        k_post = None
        if sample:
            if rng is None:
                raise ValueError("vae_posterior='sample' needs an rng key (the posterior sample's key is split from it)")
            rng, k_post = jax.random.split(rng)
        with jax.named_scope("vae_encode"):
            x0 = encode_batch_latents(vae, batch, patch, rng=k_post)
        if noise is None:
            noise = jax.random.normal(rng, x0.shape, jnp.float32)
        return jax.value_and_grad(loss_of, has_aux=True)(params, batch, noise, x0)

    return f


def apply_update(state: dict, grads, tx: optax.GradientTransformation, ema_decay: float,
                 trainable: dict | None = None) -> dict:
    """The optimizer and EMA part of a step: dict(params, ema, opt_state) after `grads` (fp32, per param).
    Frozen parameters (`trainable` False) keep their EMA as it is, as the official `fsdp_ema_update` skips
    them (the EMA's rounding would drift it from the weights it equals)."""
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(params=params, ema=ema_update(state["ema"], params, ema_decay, trainable), opt_state=opt_state)


def make_train_step(graphdef, buffers, vae_graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    *, patch: int, ce_weight: float, mse_weight: float, ema_decay: float,
                    vae_posterior: str = "sample", ce_reweighting: bool = False,
                    trainable: dict | None = None, visual_und: bool = True) -> Callable:
    """step(state, vae_state, batch) -> (state, metrics). `state` = dict(params, ema, opt_state, step, rng).
    A non-finite loss or gradient norm leaves params / EMA / optimizer state untouched (metrics['ok'] = 0).
    The step's key (split from `state["rng"]`) draws the noise and, with `vae_posterior="sample"`, the
    posterior sample (`make_loss_and_grads`). `trainable`: the frozen parameters' gradients are zero; `tx`
    leaves them unchanged and the EMA too (`optimizer_from_config` builds both from one mask). `visual_und`:
    see `make_loss_and_grads`."""
    loss_and_grads = make_loss_and_grads(graphdef, buffers, vae_graphdef, patch=patch, ce_weight=ce_weight,
                                         mse_weight=mse_weight, vae_posterior=vae_posterior,
                                         ce_reweighting=ce_reweighting, trainable=trainable, visual_und=visual_und)

    def step(state: dict, vae_state, batch: dict[str, jax.Array]):
        rng, k_step = jax.random.split(state["rng"])
        (loss, aux), grads = loss_and_grads(state["params"], vae_state, batch, None, k_step)

        def apply(_):
            return dict(apply_update(state, grads, tx, ema_decay, trainable), step=state["step"] + 1, rng=rng)

        def keep(_):
            return dict(state, step=state["step"] + 1, rng=rng)

        # the whole update under "optimizer", the cond too: a GPU compile turns the cond into selects fused with
        # the update (`loop_select_fusion`), named after the cond: outside the scope, the profile showed the
        # update's 33 ms as "other" and "optimizer" as 2 ms (H200, 4-layer 7B-width step)
        with jax.named_scope("optimizer"):
            gnorm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            new = jax.lax.cond(ok, apply, keep, None)
        lr = schedule(schedule_count(state["opt_state"], state["step"]))  # (what this step applies)
        metrics = dict(loss=loss, grad_norm=gnorm, ok=ok, lr=jnp.asarray(lr, jnp.float32), **aux)
        return new, metrics

    return step
