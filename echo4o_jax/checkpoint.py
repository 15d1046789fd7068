"""Checkpoint folders: converted (Orbax) model folders, training workdirs, and their readers.

Converted model folder (written by `tools.convert_weights.to_jax`, see `echo4o_jax.convert`)::

    OUT/llm_config.json, vit_config.json   HF configs, copied from the official folder
    OUT/meta.json                          cfg.meta_dict(): AE + BAGEL fields incl. special token ids
    OUT/tokenizer.json ...                 tokenizer files, copied as-is (those that exist)
    OUT/manifest.json                      provenance: source files (size, sha256), dtype, counts, version
    OUT/params/                            Orbax PyTree: nnx.to_pure_dict(nnx.state(Bagel))
    OUT/vae/                               Orbax PyTree: nnx.to_pure_dict(nnx.state(AutoEncoder))

Training workdir (written by the trainer)::

    WORKDIR/model_config/                  the same json + tokenizer files + manifest.json
    WORKDIR/vae/                           Orbax PyTree of the frozen VAE, copied at start
    WORKDIR/checkpoints/<step>/            orbax CheckpointManager, Composite items
        params/, ema/                      Bagel pure dict (same structure as OUT/params)
        opt_state/                         optimizer state
        meta/                              JSON: {"step": ..., ...}

Stacked layer arrays ([num_layers, ...]) are stored in zarr chunks that never span two layers
(`train_save_args` gives the trainer the same layout), so a reader can stream them layer by layer.

Everything restores onto any mesh: the module is built abstractly (`nnx.eval_shape`), the target
leaves are `jax.ShapeDtypeStruct`s carrying the requested shardings, and the restored arrays are
merged in (nothing is initialised at random first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from .config import BagelConfig, VAEConfig
from .model import keymap
from .model.bagel import Bagel, bagel_key_rules
from .model.layers import sincos_2d_table
from .model.vae import AutoEncoder
from .paths import atomic_write, write_json

__all__ = [
    "CheckpointError",
    "CONFIG_FILES",
    "TOKENIZER_FILES",
    "META_FILE",
    "MANIFEST_FILE",
    "PARAMS_ITEM",
    "VAE_ITEM",
    "MODEL_CONFIG_DIR",
    "is_official_dir",
    "is_converted_dir",
    "is_train_workdir",
    "is_orbax_dir",
    "config_dir",
    "load_config",
    "RESUMABLE_MODEL_FIELDS",
    "model_geometry",
    "geometry_diff",
    "abstract_bagel",
    "abstract_vae",
    "stacked_paths",
    "fixed_tables",
    "OrbaxItem",
    "save_pytree",
    "restore_module",
    "restore_bagel",
    "restore_vae",
    "load_any_bagel",
    "load_any_vae",
    "copy_model_files",
    "write_model_config",
    "meta_of",
    "save_vae",
    "train_checkpoint_manager",
    "train_save_args",
    "list_train_steps",
    "train_step_dir",
    "read_train_meta",
    "restore_train_weights",
]

CONFIG_FILES = ("llm_config.json", "vit_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PARAMS_ITEM = "params"
EMA_ITEM = "ema"
VAE_ITEM = "vae"
MODEL_CONFIG_DIR = "model_config"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_ITEMS = ("params", "ema")


class CheckpointError(ValueError):
    """A checkpoint folder has the wrong layout (not Orbax, missing item, unknown step ...)."""


# ------------------------------------------------------------------------------------------ layouts


def _p(path) -> pathlib.Path:
    """The path, absolute (Orbax / tensorstore refuse relative checkpoint paths: `--ckpt ckpt/bagel7b` must work)."""
    return pathlib.Path(os.path.abspath(os.fspath(path)))


def is_official_dir(path) -> bool:
    """An official PyTorch folder: llm_config.json and ema.safetensors (or its sharded index)."""
    p = _p(path)
    return (p / "llm_config.json").is_file() and (
        (p / "ema.safetensors").is_file() or (p / "ema.safetensors.index.json").is_file())


def is_converted_dir(path) -> bool:
    p = _p(path)
    return (p / "llm_config.json").is_file() and (p / PARAMS_ITEM / "_METADATA").is_file()


def is_train_workdir(path) -> bool:
    p = _p(path)
    return (p / MODEL_CONFIG_DIR / "llm_config.json").is_file() and (p / CHECKPOINTS_DIR).is_dir()


def is_orbax_dir(path) -> bool:
    """A converted Orbax model folder or a training workdir."""
    return is_converted_dir(path) or is_train_workdir(path)


def config_dir(path) -> pathlib.Path:
    """Where the json configs live: WORKDIR/model_config for a training workdir, else the folder."""
    p = _p(path)
    return p / MODEL_CONFIG_DIR if (p / MODEL_CONFIG_DIR / "llm_config.json").is_file() else p


def load_config(path, **overrides) -> BagelConfig:
    return BagelConfig.from_checkpoint_dir(config_dir(path), **overrides)


# BagelConfig fields a training checkpoint does not depend on: a resumed run may change them
RESUMABLE_MODEL_FIELDS = ("param_dtype", "compute_dtype", "remat", "attention_impl", "attention_block_q",
                          "attention_block_kv", "attention_tuning", "attention_chunk", "timestep_shift", "freeze_und")


def model_geometry(cfg: BagelConfig) -> dict[str, Any]:
    """Every other BagelConfig field, flat ('llm.hidden_size', 'vae.ch_mult', 'special_tokens.bos_token_id',
    'max_latent_size' ...; model.geometry's key names): the parameters' shapes and the token ids' meaning."""
    tree = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_MODEL_FIELDS}
    return {".".join(path): v for path, v in flatten_dict(tree)}


def geometry_diff(stored: BagelConfig, cfg: BagelConfig) -> list[tuple[str, Any, Any]]:
    """[(field, stored value, cfg value)] where the two geometries (`model_geometry`) differ."""
    a, b = model_geometry(stored), model_geometry(cfg)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def abstract_bagel(cfg: BagelConfig) -> Bagel:
    return nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))


def abstract_vae(vae_cfg: VAEConfig, dtype=jnp.float32, precision=None) -> AutoEncoder:
    return nnx.eval_shape(lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                              precision=precision))


def stacked_paths(cfg: BagelConfig) -> set[tuple[str, ...]]:
    """Bagel state paths that hold stacked layers ([num_layers, ...])."""
    return {r.path for r in bagel_key_rules(cfg) if r.stacked is not None}


def fixed_tables(cfg: BagelConfig) -> dict[tuple[str, ...], Callable[[], np.ndarray]]:
    """The fixed sin-cos tables (Buffers): recomputed when a training checkpoint does not store them."""
    H = cfg.llm.hidden_size
    return {
        ("latent_pos_embed",): lambda: np.asarray(sincos_2d_table(cfg.max_latent_size, H), np.float32),
        ("vit_pos_embed",): lambda: np.asarray(sincos_2d_table(cfg.vit_max_num_patch_per_side, H), np.float32),
    }


def _name(path) -> str:
    """Orbax's parameter name of a tree path (keys joined by '.')."""
    return ".".join(str(k) for k in path)


def _flat_abstract(module: nnx.Module) -> dict[tuple, Any]:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module))}


# ------------------------------------------------------------------------------------------ reading


class OrbaxItem:
    """Leaf-by-leaf (and slice-by-slice) reader of one Orbax PyTree item directory, through
    tensorstore with Orbax's own read spec. Used for streaming exports; `restore_module` restores."""

    def __init__(self, item_dir):
        import orbax.checkpoint as ocp

        self.path = _p(item_dir)
        meta_file = self.path / "_METADATA"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.path}: not an Orbax PyTree checkpoint (no _METADATA)")
        self.leaves: dict[str, tuple[str, ...]] = {}
        try:
            meta = json.loads(meta_file.read_text())
            tree = meta["tree_metadata"]
            self.use_ocdbt = bool(meta.get("use_ocdbt", True))
            self.use_zarr3 = bool(meta.get("use_zarr3", False))
            for entry in tree.values():  # (a damaged entry: this error, not a KeyError traceback)
                keys = tuple(str(k["key"]) for k in entry["key_metadata"])
                self.leaves[_name(keys)] = keys
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{meta_file}: corrupt Orbax metadata ({e!r})") from None
        self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
        self._stores: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self.leaves)

    def __contains__(self, name: str) -> bool:
        return name in self.leaves

    def open(self, name: str):
        import orbax.checkpoint as ocp
        import tensorstore as ts

        if name not in self._stores:
            if name not in self.leaves:
                raise CheckpointError(f"{self.path}: no array {name!r}")
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.path),
                                               is_ocdbt_checkpoint=self.use_ocdbt, use_zarr3=self.use_zarr3,
                                               ts_context=self._ctx)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
            try:
                self._stores[name] = ts.open(ts.Spec(spec), open=True, read=True, context=self._ctx).result()
            except Exception as e:  # tensorstore raises ValueError with its own message
                raise CheckpointError(f"{self.path}: cannot open array {name!r}: {tensorstore_error(e)}") from None
        return self._stores[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.open(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.open(name).dtype.numpy_dtype)

    def chunks(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.open(name).chunk_layout.read_chunk.shape)

    def info(self) -> dict[str, tuple[tuple, str]]:
        return {n: (self.shape(n), self.dtype(n).name) for n in self.leaves}

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        t = self.open(name)
        return np.asarray((t[index] if index != () else t).read().result())

    def close(self) -> None:
        self._stores.clear()


def _check_item(item: OrbaxItem, abstract_flat: Mapping[tuple, Any], fillable=(), *, source: str) -> list[tuple]:
    """Key set and shapes of an Orbax item against the abstract module; returns the paths to fill."""
    expected = {_name(p): p for p in abstract_flat}
    missing = sorted(n for n in expected if n not in item and expected[n] not in fillable)
    unexpected = sorted(n for n in item.names() if n not in expected)
    bad_shape = []
    for n, p in expected.items():
        if n in item:
            want = tuple(abstract_flat[p].shape)
            got = item.shape(n)
            if got != want:
                bad_shape.append(f"{n}: got {list(got)}, expected {list(want)}")
    if missing or unexpected or bad_shape:
        msg = f"checkpoint {source} does not match the model config:"
        msg += keymap._fmt_list("missing arrays", missing)
        msg += keymap._fmt_list("unexpected arrays", unexpected)
        msg += keymap._fmt_list("wrong shapes", bad_shape)
        raise keymap.CheckpointMismatchError(msg)
    return [p for n, p in expected.items() if n not in item]


def _sharding_fn(shardings) -> Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # (multi-process: this process's own)
    if shardings is None:
        return lambda path, leaf: default
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda path, leaf: shardings
    if callable(shardings):
        return shardings
    tree = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
    flat = {tuple(str(k) for k in p): s for p, s in flatten_dict(tree)}

    def lookup(path, leaf):
        s = flat.get(tuple(str(k) for k in path))
        if s is None:
            raise KeyError(f"no sharding given for {_name(path)}")
        return s

    return lookup


def flatten_dict(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from flatten_dict(v, prefix + (k,))
    else:
        yield prefix, tree


def unflatten_dict(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def restore_module(abstract: nnx.Module, item_dir, *, dtype=None, shardings=None,
                   fill: Mapping[tuple, Callable[[], np.ndarray]] | None = None) -> nnx.Module:
    """Restore an Orbax PyTree item (an `nnx.to_pure_dict` of the module state) into the abstract
    module `abstract` (from `nnx.eval_shape`). `dtype`: cast every leaf (None: the module's dtypes);
    `shardings`: None (default device), one Sharding for all leaves, a pure-dict / nnx.State of
    Shardings, or a callable (path, ShapeDtypeStruct) -> Sharding. `fill`: leaves that may be absent
    from the item, computed instead (the fixed sin-cos tables)."""
    import orbax.checkpoint as ocp

    item_dir = _p(item_dir)
    item = OrbaxItem(item_dir)
    flat = _flat_abstract(abstract)
    to_fill = _check_item(item, flat, fillable=set(fill or ()), source=str(item_dir))
    shard_of = _sharding_fn(shardings)
    target_flat = {}
    for path, leaf in flat.items():
        dt = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        sds = jax.ShapeDtypeStruct(tuple(leaf.shape), dt)
        target_flat[path] = jax.ShapeDtypeStruct(sds.shape, dt, sharding=shard_of(path, sds))
    present = {p: v for p, v in target_flat.items() if p not in to_fill}
    target = unflatten_dict(present)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                     partial_restore=True))
    except Exception as e:
        # what tensorstore / Orbax raise for unreadable chunks: ValueError, or Orbax's bare Exception around it
        # (a TensorStore spec in the text); anything else (device memory, XLA, sharding) passes as it is
        if not (isinstance(e, ValueError) or type(e) is Exception):
            raise
        raise CheckpointError(f"{item_dir}: cannot read its arrays (a chunk file missing, truncated or corrupt?): "
                              f"{tensorstore_error(e)}") from None
    restored_flat = {tuple(p): v for p, v in flatten_dict(restored)}
    graphdef, state = nnx.split(abstract)
    values = {}
    for path in flat:
        key = tuple(path)
        if key in to_fill:
            t = target_flat[key]
            values[key] = jax.device_put(np.asarray(fill[key]()).astype(t.dtype), t.sharding)
        else:
            values[key] = restored_flat[key]
    nnx.replace_by_pure_dict(state, unflatten_dict(values))
    return nnx.merge(graphdef, state)


TENSORSTORE_SPEC_MARKERS = (" See full TensorStore details", " [tensorstore_spec")  # (also "[tensorstore_spec[1]=")


def tensorstore_error(e: BaseException) -> str:
    """The first line of a tensorstore error (its own message: which array, what is wrong), without the
    TensorStore spec that Orbax or tensorstore append (2,000 characters of JSON); for Orbax's wrapper
    ("Encountered error while reading array index"), that of the error it wraps. Over 400 characters, the
    middle is cut."""
    while e.__cause__ is not None and "Encountered error while reading" in str(e):
        e = e.__cause__
    text = str(e)
    for marker in TENSORSTORE_SPEC_MARKERS:
        text = text.split(marker)[0]
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    # a long line loses its middle, not its end: a write error names the OCDBT folder and then the file (two
    # long paths) before its cause ("File too large [os_error_code='27']")
    return first if len(first) <= 400 else first[:200] + " ... " + first[-200:]


def _stored_dtype(item_dir, name="llm.embed") -> str:
    item = OrbaxItem(item_dir)
    if name not in item:
        name = item.names()[0]
    return item.dtype(name).name


def _restore_bagel_item(item_dir, cfg: BagelConfig, dtype, shardings) -> Bagel:
    item_dir = _p(item_dir)
    if not (item_dir / "_METADATA").is_file():
        raise CheckpointError(f"{item_dir}: not an Orbax PyTree checkpoint (no _METADATA)")
    pdt = np.dtype(dtype).name if dtype is not None else _stored_dtype(item_dir)
    cfg = cfg.replace(param_dtype=pdt)
    return restore_module(abstract_bagel(cfg), item_dir, dtype=pdt, shardings=shardings, fill=fixed_tables(cfg))


def restore_bagel(ckpt_dir, *, item: str = PARAMS_ITEM, dtype=None, shardings=None,
                  cfg: BagelConfig | None = None, **cfg_overrides) -> Bagel:
    """A Bagel from a converted folder (`ckpt_dir/item`, configs beside it). dtype None: the stored
    dtype (also set as cfg.param_dtype). `cfg_overrides` go to BagelConfig (compute_dtype, remat ...)."""
    cfg = cfg or load_config(ckpt_dir, **cfg_overrides)
    return _restore_bagel_item(_p(ckpt_dir) / item, cfg, dtype, shardings)


def restore_vae(ckpt_dir, *, item: str = VAE_ITEM, dtype=jnp.float32, shardings=None,
                cfg: BagelConfig | None = None, precision=None) -> AutoEncoder:
    """The AutoEncoder of a converted folder or training workdir (`ckpt_dir/vae`), in `dtype`."""
    cfg = cfg or load_config(ckpt_dir)
    item_dir = _p(ckpt_dir) / item
    if not (item_dir / "_METADATA").is_file():
        raise CheckpointError(f"{item_dir}: not an Orbax PyTree checkpoint (no _METADATA)")
    return restore_module(abstract_vae(cfg.vae, dtype, precision), item_dir, dtype=dtype, shardings=shardings)


def _placer(shardings):
    """`place(path, host array)` for `echo4o_jax.model.loading.load_into`: each variable straight into its
    sharding (each device gets its shard only; the shardings may span several processes), or None (whole, on
    the default device) without `shardings`. An official 7B folder used to be loaded whole onto one device
    before it was resharded."""
    if shardings is None:
        return None
    fn = _sharding_fn(shardings)
    from .sharding import put_global

    return lambda path, host: put_global(host, fn(path, jax.ShapeDtypeStruct(host.shape, host.dtype)))


def load_any_bagel(path, *, dtype=None, shardings=None, weights: str = "ema", step: int | None = None,
                   **cfg_overrides) -> Bagel:
    """A Bagel from an official PyTorch folder, a converted Orbax folder or a training workdir
    (`weights` ema|params, `step` default latest)."""
    from .model.loading import load_bagel

    if is_train_workdir(path):
        return restore_train_weights(path, step=step, weights=weights, dtype=dtype, shardings=shardings,
                                     **cfg_overrides)
    if is_converted_dir(path):
        return restore_bagel(path, dtype=dtype, shardings=shardings, **cfg_overrides)
    if is_official_dir(path):
        cfg = BagelConfig.from_checkpoint_dir(path, **cfg_overrides)
        return load_bagel(path, cfg, dtype=dtype, place=_placer(shardings))
    raise CheckpointError(f"{path}: neither an official checkpoint folder (llm_config.json + ema.safetensors), "
                          f"a converted Orbax folder (params/) nor a training workdir (model_config/ + checkpoints/)")


def load_any_vae(path, cfg: BagelConfig | None = None, *, dtype=jnp.float32, shardings=None) -> AutoEncoder:
    from .model.loading import load_vae

    cfg = cfg or load_config(path)
    if (_p(path) / VAE_ITEM / "_METADATA").is_file():
        return restore_vae(path, dtype=dtype, shardings=shardings, cfg=cfg)
    if (_p(path) / "ae.safetensors").is_file() or (_p(path) / "ae.safetensors.index.json").is_file():
        return load_vae(path, cfg, dtype=dtype, place=_placer(shardings))
    raise CheckpointError(f"{path}: no VAE (neither vae/ nor ae.safetensors)")


# ------------------------------------------------------------------------------------------ writing


def save_pytree(item_dir, tree, *, save_args=None) -> None:
    """Save a pytree (e.g. a pure dict of arrays) as an Orbax PyTree item (synchronously)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ckptr.save(epath.Path(os.fspath(item_dir)), args=ocp.args.StandardSave(tree, save_args=save_args))


def copy_file(src, dst) -> None:
    """`src`'s bytes into `dst` (through a temporary name beside it): not its permission bits (a read-only
    source made read-only copies, which the next copy, a training resume's, could not replace), and a copy
    that an earlier version made read-only is replaced."""
    with open(src, "rb") as f:
        atomic_write(_p(dst), lambda out: shutil.copyfileobj(f, out), fsync=False)


def copy_model_files(src_dir, dst_dir) -> list[str]:
    """Copy the json configs and tokenizer files that exist in `src_dir`; returns their names."""
    src, dst = _p(src_dir), _p(dst_dir)
    copied = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        if (src / name).is_file():
            copy_file(src / name, dst / name)
            copied.append(name)
    return copied


def meta_of(cfg: BagelConfig, src_dir=None) -> dict:
    """meta.json's content for `cfg` (`meta_dict`), with the other top-level keys of `src_dir`'s meta.json
    (provenance notes a release or a tool added) carried over."""
    meta = cfg.meta_dict()
    src = None if src_dir is None else config_dir(src_dir) / META_FILE
    if src is not None and src.is_file():
        extra = json.loads(src.read_text(encoding="utf-8"))  # (a JSON object: the config was read from it)
        meta = {**{k: v for k, v in extra.items() if k not in meta}, **meta}
    return meta


def write_model_config(dst, cfg: BagelConfig, src_dir=None, manifest: Mapping | None = None) -> pathlib.Path:
    """The config part of a model folder (OUT/ or WORKDIR/model_config/): llm/vit json (copied from
    `src_dir` when present there, else generated from `cfg`), meta.json, tokenizer files, and
    manifest.json (`manifest`, or the one in `src_dir`)."""
    dst = _p(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if src_dir is not None and config_dir(src_dir).resolve() != dst.resolve():  # (a workdir's own: already there)
        src = config_dir(src_dir)
        copy_model_files(src, dst)
        if manifest is None and (src / MANIFEST_FILE).is_file():
            copy_file(src / MANIFEST_FILE, dst / MANIFEST_FILE)
    for name, d in (("llm_config.json", cfg.llm.to_hf()), ("vit_config.json", cfg.vit.to_hf())):
        if not _parses(dst / name):  # (missing, or cut short by an earlier version's non-atomic write)
            write_json(dst / name, d, indent=2)
    write_json(dst / META_FILE, meta_of(cfg, src_dir), indent=2)
    if manifest is not None:
        write_json(dst / MANIFEST_FILE, manifest, indent=2)
    return dst


def save_vae(item_dir, vae: AutoEncoder) -> None:
    """The VAE item (WORKDIR/vae or OUT/vae) from a module."""
    save_pytree(item_dir, nnx.to_pure_dict(nnx.state(vae)))


def _parses(path) -> bool:
    try:
        json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------ training


def train_checkpoint_manager(workdir, *, read_only: bool = False, **options):
    """The CheckpointManager of WORKDIR/checkpoints (items params, ema, opt_state, meta)."""
    import orbax.checkpoint as ocp

    root = _p(workdir) / CHECKPOINTS_DIR
    if read_only and not root.is_dir():
        raise CheckpointError(f"{workdir}: no {CHECKPOINTS_DIR}/ folder (not a training workdir)")
    opts = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only, **options)
    return ocp.CheckpointManager(epath.Path(root), options=opts)


def train_save_args(tree, stacked: set[tuple[str, ...]]):
    """SaveArgs for a Bagel pure dict (or any tree containing it, e.g. optimizer moments): stacked
    layer leaves are chunked one layer per chunk (`shard_axes=(0,)`), so exports stream by layer."""
    import orbax.checkpoint as ocp

    suffixes = {tuple(s) for s in stacked}

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        hit = any(keys[-len(s):] == s for s in suffixes if len(keys) >= len(s)) and np.ndim(leaf) >= 2
        return ocp.SaveArgs(shard_axes=(0,)) if hit else ocp.SaveArgs()

    return jax.tree_util.tree_map_with_path(one, tree)


def drop_orbax_thread_errors(record) -> bool:
    """A `logging` filter (of the "absl" logger) for the reports Orbax's background threads log, with a
    traceback each, of the error that ends a save: the save (or `wait_until_finished`) raises that error, which
    the commands report in one line."""
    msg = record.getMessage()
    return not any(m in msg for m in ("_SignalingThread.run() raised an exception", "Checkpointer failed",
                                      "Handler Commit operations", "Save Finalize thread"))


def list_train_steps(workdir) -> list[int]:
    """The finalized checkpoint steps of a training workdir (no CheckpointManager: it logs warnings): the
    folders the train command's CheckpointManager writes and reads, named by the step alone. (Orbax's listing
    also counts any `<name>_<digits>` folder: a `backup_5` put there counted as step 5, and a model.init=checkpoint
    run then took itself for a resume, loaded no weights, restored none and trained random ones.)"""
    import orbax.checkpoint as ocp

    root = _p(workdir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted({s for s in ocp.step.checkpoint_steps(epath.Path(root)) if (root / str(s)).is_dir()})


def train_step_dir(workdir, step: int | None = None) -> tuple[int, pathlib.Path]:
    """(step, WORKDIR/checkpoints/<step>) for `step` (None: the latest)."""
    import orbax.checkpoint as ocp

    steps = list_train_steps(workdir)
    if not steps:
        raise CheckpointError(f"{workdir}: no training checkpoint under {CHECKPOINTS_DIR}/")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"{workdir}: no checkpoint for step {step} (available: {steps})")
    path = ocp.step.find_step_path(epath.Path(_p(workdir) / CHECKPOINTS_DIR), ocp.step.standard_name_format(),
                                   step=step)
    return step, _p(path)


def read_train_meta(workdir, step: int | None = None) -> dict:
    import orbax.checkpoint as ocp

    step, path = train_step_dir(workdir, step)
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(epath.Path(path / "meta"),
                                                                  args=ocp.args.JsonRestore())


def restore_train_weights(workdir, step: int | None = None, weights: str = "ema", *, dtype=None, shardings=None,
                          cfg: BagelConfig | None = None, **cfg_overrides) -> Bagel:
    """The Bagel of one training checkpoint: only the `weights` item (ema | params) is read, never the
    optimizer state. `step` None: the latest."""
    if weights not in TRAIN_ITEMS:
        raise ValueError(f"weights={weights!r}: expected one of {TRAIN_ITEMS}")
    cfg = cfg or load_config(workdir, **cfg_overrides)
    _, path = train_step_dir(workdir, step)
    return _restore_bagel_item(path / weights, cfg, dtype, shardings)
