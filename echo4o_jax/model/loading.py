"""Build NNX modules from official safetensors (and back) through the key tables.

    model = load_bagel("path/to/BAGEL-7B-MoT")          # ema.safetensors + llm/vit configs
    vae = load_vae("path/to/BAGEL-7B-MoT", model.cfg)     # ae.safetensors

Validation runs first: every missing, unexpected, mis-shaped or wrongly-typed key is listed in one
`CheckpointMismatchError`; a truncated or corrupt file raises `SafetensorsError` naming it.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import BagelConfig, VAEConfig
from ..safetensors_io import SafetensorsFile, open_checkpoint_file
from . import keymap
from .bagel import Bagel, bagel_key_rules
from .vae import AutoEncoder, vae_key_rules

__all__ = ["LOADABLE_DTYPES", "flax_shapes", "load_into", "export_official", "load_bagel", "load_vae",
           "load_vae_file"]

LOADABLE_DTYPES = ("float32", "bfloat16", "float16")


def flax_shapes(abstract: nnx.Module) -> dict[tuple, tuple]:
    return {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}


def load_into(ctor: Callable[[], nnx.Module], rules: list[keymap.Rule], source, *, dtype=None,
              place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> nnx.Module:
    """Validate `source` (a SafetensorsFile / ShardedSafetensors) against `rules`, then build the module
    abstractly and fill every variable from the official tensors (nothing is initialised at random).
    `place(path, host array)`: how each variable goes to the devices (default: whole, on the default device;
    `echo4o_jax.checkpoint.load_any_bagel` places each straight into its sharding)."""
    abstract = nnx.eval_shape(ctor)
    shapes = flax_shapes(abstract)
    entries = keymap.expand_rules(rules)
    covered = {e.path for e in entries}
    uncovered = sorted(set(shapes) - covered)
    if uncovered:
        raise RuntimeError(f"key table does not cover model variables: {uncovered[:10]}")
    keymap.check_tensors(entries, shapes, source.info(), source=source.path, allowed_dtypes=LOADABLE_DTYPES)
    arrays = keymap.official_to_flax(entries, shapes, source.get, dtype=None)
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        arr = arrays[tuple(path)]
        want = np.dtype(dtype) if dtype is not None else np.dtype(var.dtype)
        host = np.asarray(arr).astype(want, copy=False)
        flat.append((path, var.replace(place(tuple(path), host) if place is not None else jnp.asarray(host))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_official(module: nnx.Module, rules: list[keymap.Rule], dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(official key, numpy tensor) pairs in PyTorch layout, one at a time."""
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module))}
    for key, arr in keymap.flax_to_official(keymap.expand_rules(rules), lambda p: np.asarray(flat[p][...])):
        yield key, (arr if dtype is None else arr.astype(dtype))


def load_bagel(ckpt_dir: str | os.PathLike, cfg: BagelConfig | None = None, *, dtype=None, place=None) -> Bagel:
    cfg = cfg or BagelConfig.from_checkpoint_dir(ckpt_dir)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
    src = open_checkpoint_file(ckpt_dir, "ema.safetensors")
    return load_into(lambda: Bagel(cfg, rngs=nnx.Rngs(0)), bagel_key_rules(cfg), src,
                     dtype=np.dtype(cfg.param_dtype), place=place)


def load_vae_file(path: str | os.PathLike, vae_cfg: VAEConfig, *, dtype=jnp.float32, precision=None) -> AutoEncoder:
    """An AutoEncoder from one official `ae.safetensors` file (dtype: compute and parameter dtype)."""
    return load_into(lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, precision=precision),
                     vae_key_rules(vae_cfg), SafetensorsFile(path), dtype=np.dtype(dtype))


def load_vae(ckpt_dir: str | os.PathLike, cfg: BagelConfig, *, dtype=jnp.float32, place=None) -> AutoEncoder:
    src = open_checkpoint_file(ckpt_dir, "ae.safetensors")
    return load_into(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
                     vae_key_rules(cfg.vae), src, dtype=np.dtype(dtype), place=place)
