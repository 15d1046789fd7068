"""The training loop: mesh, model init (random or from a checkpoint), sharded jit step with donation,
Orbax checkpoints (async, keep K, exact resume), logging (progress bar, TensorBoard, JSONL), sample
grids, failure handling (non-finite loss, SIGTERM / SIGINT).

Resume: a workdir that holds checkpoints is resumed from its latest one. The model geometry must be the
workdir's (`checkpoint.model_geometry`, compared with WORKDIR/model_config before anything is built or
written); the execution settings may change (`checkpoint.RESUMABLE_MODEL_FIELDS`: dtypes, remat, attention
implementation and blocks, timestep_shift, freeze_und), and so may the optimizer / schedule / logging
settings. The data settings must let the data iterator resume (a records pipeline refuses other settings;
the error names the data settings that differ from the checkpoint's run, which its meta records). Another
process count or packs per process (another slice) is refused too unless `train.data_resume="reshard"`:
then each process goes on from where the old processes had read (`DataPipeline.resharded_state`), logged
as a `{"step": s, "event": "data_resharded", ...}` record (this process's start `offsets` per dataset,
`read_twice`, `handed_over`; the main process's). So are other records under the same dataset paths (a
dataset rewritten or completed in place: `DataPipeline.check_contents`). With `train.data_resume="restart"`
a data state that cannot resume exactly (other data settings or records) is not an error: the weights,
optimizer and step resume and the data stream starts from its beginning, logged as a `{"step": s, "event":
"data_restarted", "why": ...}` record (a state that can resume still does: the setting may stay set).
WORKDIR/model_config/ and WORKDIR/config.json are written after a successful restore (or, in a new workdir,
before the first step), never before: a refused run leaves the workdir as it was. A checkpoint that cannot
be read is a `CheckpointError` naming the earlier steps to resume from instead. A data error after the first
step (a record that cannot be read, a corrupt precomputed latent) saves the steps trained since the last
checkpoint before the run ends (on one process: several would each have to join the save).

log.jsonl is append-only (strict JSON: a non-finite metric, a skipped step's loss, is null): one record per
logged step, a `{"step": s, "compile_seconds": ...,
"compile_cache_hit": ...}` record per run (a hit: the step came from the persistent compilation cache,
`train.compilation_cache`), and on resume a marker `{"step": s, "event": "resumed", ...}` (s = the restored
step). A run that died after its last checkpoint (a hard kill) has logged steps after s: the resumed run
logs them again after the marker (`superseded_steps` [first, last] names them), so readers keep, for each
step, the last record holding its metrics ("loss"; markers and compile records carry the step they follow). A run killed before its first checkpoint finished is started again from step 0 under a
`{"step": 0, "event": "restarted", "superseded_steps": ...}` marker. TensorBoard hides those steps' earlier
events (`purge_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .. import sharding as shd
from ..checkpoint import CheckpointError, config_dir, flatten_dict, unflatten_dict
from ..config import BagelConfig, ConfigError, LLMConfig, SpecialTokens, VAEConfig, ViTConfig
from ..data.records import RecordError
from ..model.bagel import Bagel
from ..paths import atomic_write, folder_problem
from ..model.vae import AutoEncoder
from . import flops as flops_lib
from .data_sources import make_source
from .optim import lr_schedule, make_optimizer
from .step import check_vae_posterior, init_train_state, make_train_step, trainable_mask

__all__ = ["ConfigValueError", "NonFiniteLossError", "Trainer", "init_vae_state", "model_config_from", "validate_config"]


class ConfigValueError(ValueError):
    """A config value is invalid (raised before anything is compiled)."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became non-finite; the update was not applied."""


_MAX_SKIPPED_IN_A_ROW = 20  # train.skip_nonfinite: more non-finite steps in a row stop the run


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota): training stops at once, naming the last
    complete checkpoint (the train command prints it on one line, exit 2)."""


class DataFailedElsewhereError(RecordError):
    """Multi-host: another process could not read its next batch (its own log names the record / error); this one
    stops with it, after the steps trained were saved by every process (one line, exit 2)."""


class LogWriteError(CheckpointSaveError):
    """log.jsonl could not be written (a full disk): reported as a failed save (one line, exit 2), the steps
    trained since the last checkpoint saved first when the disk allows."""


# ---------------------------------------------------------------------------------------------- config


def model_config_from(config) -> BagelConfig:
    """The BagelConfig of a training config: the geometry of `model.ckpt` (model.init='checkpoint') or of
    `model.geometry`, with the execution settings of `model` / `train.freeze_und`. Invalid values are a
    `ConfigValueError` naming where they came from."""
    m = config.model
    exec_kw = dict(compute_dtype=m.compute_dtype, param_dtype=m.param_dtype, remat=m.remat,
                   attention_impl=m.attention_impl, attention_block_q=int(m.attention_block_q),
                   attention_block_kv=int(m.attention_block_kv),
                   attention_tuning=str(m.get("attention_tuning", "")),
                   attention_chunk=int(m.get("attention_chunk", 0)), timestep_shift=float(m.timestep_shift),
                   freeze_und=bool(config.train.freeze_und))
    if m.init == "checkpoint" and not m.ckpt:
        raise ConfigValueError("model.init='checkpoint' needs model.ckpt (an official or converted checkpoint folder)")
    if m.init == "random" and m.ckpt:
        raise ConfigValueError(f"model.ckpt={m.ckpt!r} is set but model.init='random': the checkpoint would be ignored "
                               "and a random model of model.geometry trained. Add --config.model.init=checkpoint to "
                               "start from it, or leave model.ckpt empty")
    where = f"model.ckpt={m.ckpt!r}" if m.init == "checkpoint" else "model.geometry"
    if m.init == "checkpoint" and not os.path.isdir(m.ckpt):
        raise ConfigValueError(f"{where}: {'no such folder' if not os.path.exists(m.ckpt) else 'not a folder'} "
                               f"(an official or converted checkpoint folder)")
    try:
        if m.init == "checkpoint":
            geometry = BagelConfig.from_checkpoint_dir(config_dir(m.ckpt))
        else:
            g = m.geometry
            llm = LLMConfig(**{k: g.llm[k] for k in g.llm})
            vit = ViTConfig(**{k: g.vit[k] for k in g.vit})
            vae_kw = {k: g.vae[k] for k in g.vae}
            vae_kw["ch_mult"] = tuple(vae_kw.get("ch_mult", (1, 2, 4, 4)))
            vae = VAEConfig(**vae_kw)
            tok = SpecialTokens(**{k: int(g.special_tokens[k]) for k in g.special_tokens})
            geometry = BagelConfig(llm=llm, vit=vit, vae=vae, special_tokens=tok,
                                   max_latent_size=int(g.max_latent_size),
                                   vit_max_num_patch_per_side=int(g.vit_max_num_patch_per_side))
            geometry.validate()
    except ConfigError as e:
        raise ConfigValueError(f"{where}: {e}") from None
    cfg = geometry.replace(**exec_kw)
    try:
        cfg.validate()  # the geometry passed: what fails is an execution setting of config.model
    except ConfigError as e:
        raise ConfigValueError(f"model.{e}") from None
    return cfg


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_vae_state(vae_cfg: VAEConfig, seed: int) -> dict:
    # one compilation per (geometry, seed) and process: the frozen VAE is the same every time
    return nnx.to_pure_dict(nnx.state(AutoEncoder(vae_cfg, rngs=nnx.Rngs(seed))))


def init_vae_state(config, cfg: BagelConfig, shardings=None) -> dict:
    """The frozen VAE's state (pure dict) as the trainer uses it: loaded from `model.ckpt`
    (model.init='checkpoint'), or random with seed `train.seed + 1` (also what
    `echo4o_jax.data.latents` encodes with); placed with `shardings` when given."""
    if config.model.init == "checkpoint":
        from ..checkpoint import load_any_vae

        vae = _loading(config.model.ckpt, "VAE", lambda: load_any_vae(config.model.ckpt, cfg, shardings=shardings))
        return nnx.to_pure_dict(nnx.state(vae))
    vae = _random_vae_state(cfg.vae, int(config.train.seed) + 1)
    return vae if shardings is None else shd.put_global(vae, shardings)


def optimizer_from_config(config, params) -> tuple[Any, Any, dict | None]:
    """(lr schedule, AdamW `tx`, trainable mask or None) from `config.optim` / `config.train`: the mask
    (`train.freeze_vit` / `freeze_llm`) goes to both the optimizer (frozen: no update) and the train step
    (frozen: zero gradient), so they cannot disagree."""
    o, t = config.optim, config.train
    schedule = lr_schedule(float(o.lr), int(o.warmup_steps), int(t.steps), o.schedule, float(o.min_lr))
    mask = trainable_mask(params, freeze_vit=bool(t.freeze_vit), freeze_llm=bool(t.freeze_llm),
                          visual_und=bool(t.visual_und))
    trainable = None if all(jax.tree.leaves(mask)) else mask
    tx = make_optimizer(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay),
                        grad_clip=float(o.grad_clip), trainable_mask=trainable)
    return schedule, tx, trainable


def _optimizer_layout(config) -> dict:
    """The settings that shape the optimizer state's tree (`optimizer_from_config`): a clip step or none, the
    frozen parts (a masked optimizer). `config`: a training config, or one as a dict (a run's config.json)."""
    o, t = (config["optim"], config["train"]) if isinstance(config, dict) else (config.optim, config.train)
    return {"optim.grad_clip > 0": float(o["grad_clip"]) > 0, "train.freeze_vit": bool(t.get("freeze_vit", False)),
            "train.freeze_llm": bool(t.get("freeze_llm", False)), "train.visual_und": bool(t.get("visual_und", True))}


def opt_state_shardings(abs_opt, param_sh, mesh):
    """Optimizer moments follow the params' shardings (`param_sh`); scalars are replicated over `mesh`."""
    flat_p = {tuple(getattr(k, "key", k) for k in path): s for path, s in
              jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        for n in range(len(keys)):
            if keys[n:] in flat_p and flat_p[keys[n:]] is not None:
                return flat_p[keys[n:]]
        return shd.replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, abs_opt)


def train_step_from_config(config, cfg: BagelConfig, graphdef, buffers, vae_graphdef, tx, schedule, trainable):
    """The train step (`step.make_train_step`) with the settings of a training config, as the Trainer runs it
    (also what bench/tpu_compile.py compiles ahead of time)."""
    t = config.train
    return make_train_step(graphdef, buffers, vae_graphdef, tx, schedule, patch=cfg.latent_patch_size,
                           ce_weight=float(t.ce_weight), mse_weight=float(t.mse_weight),
                           ema_decay=float(t.ema_decay), vae_posterior=str(config.model.vae_posterior),
                           ce_reweighting=bool(t.ce_loss_reweighting), trainable=trainable,
                           visual_und=bool(t.visual_und))


def _error_summary(e: BaseException) -> str:
    """One readable line for an error from reading a checkpoint: tensorstore's own (innermost) error, without
    the read spec Orbax appends; other errors (safetensors, key mismatches) keep their whole message."""
    from ..checkpoint import TENSORSTORE_SPEC_MARKERS, tensorstore_error

    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e)
    if any(m in text for m in TENSORSTORE_SPEC_MARKERS) or type(e) is Exception:  # orbax / tensorstore
        return tensorstore_error(e).rstrip(".")
    return text or type(e).__name__


def _loading(ckpt: str, what: str, load):
    """load(), with a failure to read `model.ckpt` (a truncated or corrupt file, keys or shapes that do not
    match) as a CheckpointError naming the folder (the train CLI prints it on one line, exit 2)."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorsError, CheckpointMismatchError, ConfigError, OSError, orbax (plain Exception)
        raise CheckpointError(f"model.ckpt={ckpt!r}: cannot load the {what}: {_error_summary(e)}") from e


def check_attention_mesh(cfg: BagelConfig, tensor: int, backend: str | None = None) -> None:
    """ConfigValueError, before anything compiles, when the attention kernel is another backend's than `backend`
    (default: jax.default_backend(); `backend_problem`) or would run whole on each of `tensor` devices
    (`kernel_heads_problem`)."""
    from echo4o_jax.model.attention import model_attention_problem

    problem = model_attention_problem(cfg, tensor, backend or jax.default_backend())
    if problem:
        raise ConfigValueError(f"{problem} (model.attention_impl={cfg.attention_impl!r})")


def validate_config(config) -> None:
    """Reject bad values with a clear message before compiling anything."""
    def need(cond, msg):
        if not cond:
            raise ConfigValueError(msg)

    t, o, d, m = config.train, config.optim, config.data, config.model
    need(int(t.steps) > 0, f"train.steps={t.steps} must be > 0")
    for key, v in (("train.seed", t.seed), ("data.seed", d.seed)):  # (a negative data.seed: a traceback at the
        need(int(v) >= 0, f"{key}={v} must be >= 0")  # first batch)
    need(0.0 <= float(t.ema_decay) < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    need(float(t.ce_weight) >= 0 and float(t.mse_weight) >= 0, "train.ce_weight / mse_weight must be >= 0")
    need(0 < float(o.lr) < math.inf, f"optim.lr={o.lr} must be > 0 and finite")
    # (eps 0: mu / (sqrt(nu) + 0) is 0/0 for a parameter whose gradient is exactly 0, lm_head in the Echo-4o recipe
    # (no text targets): a non-finite loss at step 2, after the compile)
    need(float(o.eps) > 0, f"optim.eps={o.eps} must be > 0 (the official 1e-15)")
    need(float(o.weight_decay) >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    need(int(o.warmup_steps) >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    need(o.schedule in ("constant", "cosine"), f"optim.schedule={o.schedule!r}: expected constant|cosine")
    need(o.schedule != "cosine" or 0 <= float(o.min_lr) <= float(o.lr), f"optim.min_lr={o.min_lr} must be in "
         f"[0, optim.lr={o.lr}] (the cosine schedule's floor; above lr it would climb, not decay)")
    need(0 <= float(o.b1) < 1 and 0 <= float(o.b2) < 1, "optim.b1 / b2 must be in [0, 1)")
    need(float(o.grad_clip) >= 0, "optim.grad_clip must be >= 0 (0 = off)")
    need(m.init in ("random", "checkpoint"), f"model.init={m.init!r}: expected random|checkpoint")
    shift = float(m.timestep_shift)  # (0 made every training timestep 0; < 0, timesteps outside [0, 1] and -inf)
    need(0 < shift < math.inf, f"model.timestep_shift={m.timestep_shift} must be > 0 (1.0: no shift)")
    for k in ("compute_dtype", "param_dtype"):
        need(m[k] in ("float32", "bfloat16"), f"model.{k}={m[k]!r}: expected float32|bfloat16")
    try:
        check_vae_posterior(m.vae_posterior, "model.vae_posterior")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None
    need(not d.get("vae_latents") or d.kind == "records",
         f"data.vae_latents={d.get('vae_latents')!r} needs data.kind='records' (got {d.kind!r})")
    need(t.data_resume in ("exact", "reshard", "restart"),
         f"train.data_resume={t.data_resume!r}: expected exact|reshard|restart")
    need(int(d.packs_per_step) > 0 or int(d.packs_per_step) == -1,
         f"data.packs_per_step={d.packs_per_step} must be > 0 (or -1: one per data-parallel device)")
    b = d.budget
    need(min(int(b.text_tokens), int(b.vae_tokens)) > 0, "data.budget.text_tokens and vae_tokens must be > 0")
    need(int(config.checkpoint.every) > 0 and int(config.checkpoint.keep) > 0,
         "checkpoint.every and checkpoint.keep must be > 0")
    need(int(config.log.every) > 0, "log.every must be > 0")
    pf = float(config.log.get("peak_flops", 0.0))  # (negative: a negative MFU; 989: TFLOP/s, an MFU of ~5e11)
    need(pf == 0 or 1e12 <= pf < math.inf, f"log.peak_flops={config.log.get('peak_flops')} must be 0 (the device's "
         "from the table) or a device's peak in FLOP/s, e.g. 989e12")
    need(int(config.log.sample_every) >= 0, f"log.sample_every={config.log.sample_every} must be >= 0 (0 = no sample "
         "grids)")  # (a negative one was taken as "every step")
    need(not int(config.log.sample_every) or int(config.log.sample_steps) > 0,
         f"log.sample_steps={config.log.sample_steps} must be > 0 (the sampler's timesteps)")
    need(int(m.attention_block_q) >= 8 and int(m.attention_block_kv) >= 8,
         f"model.attention_block_q={m.attention_block_q} / attention_block_kv={m.attention_block_kv} must be >= 8")
    need(int(m.get("attention_chunk", 0)) >= 0, f"model.attention_chunk={m.get('attention_chunk')} must be >= 0 "
         "(0: the number of q blocks)")
    for k in ("data", "fsdp", "tensor"):
        v = int(config.mesh[k])
        need(v == -1 or v > 0, f"mesh.{k}={v} must be > 0 or -1")


# ---------------------------------------------------------------------------------------------- helpers


def _damaged_items(step_dir: pathlib.Path) -> list[str]:
    """What is visibly wrong with a training checkpoint's items (params, ema, opt_state, meta): a missing item or
    metadata file, metadata that is not JSON, empty files (as a power loss leaves unsynced writes). [] when
    nothing is (a damaged data chunk shows only in the restore's own error)."""
    out = []
    for item, meta in (("params", "_METADATA"), ("ema", "_METADATA"), ("opt_state", "_METADATA"),
                       ("meta", "metadata")):
        d = step_dir / item
        if not d.is_dir():
            out.append(f"{item}/ is missing")
            continue
        try:
            json.loads((d / meta).read_text(encoding="utf-8"))
        except FileNotFoundError:
            out.append(f"{item}/{meta} is missing")
        except (OSError, ValueError):
            out.append(f"{item}/{meta} is not valid JSON")
        empty = sorted(str(p.relative_to(step_dir)) for p in d.rglob("*") if p.is_file() and p.stat().st_size == 0
                       and p.name != "commit_success.txt")
        if empty:
            out.append(f"{len(empty)} empty file(s) in {item}/ (e.g. {empty[0]})")
    return out


def _flat(tree: dict) -> dict[tuple, Any]:
    return dict(flatten_dict(tree))


def _merge_trees(a: dict, b: dict) -> dict:
    return unflatten_dict({**_flat(a), **_flat(b)})


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class _Fetched:
    """A batch the loop fetched, with its device arrays (`dev`), the source's data state after it (`state`: what
    a checkpoint of the step trained on it saves) and the records pipeline's stats and last skipped records as of
    it (`stats`, `recent_errors`; empty for the synthetic source): the loop fetches one batch ahead."""
    batch: Any
    dev: dict | None
    state: dict
    stats: dict
    recent_errors: list


@dataclasses.dataclass
class _Timer:
    t: float = dataclasses.field(default_factory=time.perf_counter)

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ---------------------------------------------------------------------------------------------- trainer

_CACHE_HITS = [0]  # executables this process loaded from the persistent compilation cache


def _count_cache_hit(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_cache_hit)


def use_compilation_cache(setting: str) -> str | None:
    """Point this process's persistent compilation cache at `setting` (train.compilation_cache: a folder,
    "~" expanded, or gs://...) and return the folder in use, or None. JAX_COMPILATION_CACHE_DIR, when set,
    takes precedence (JAX's own setting). "" sets nothing: a cache set before in this process stays.
    Multi-host: JAX writes the cache from process 0 only, so the folder must be one every host sees."""
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or setting
    if not setting:
        return jax.config.jax_compilation_cache_dir or None
    path = setting if "://" in setting else os.path.expanduser(setting)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache as cc

        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # (the cache is set up once per process, at the first compile: set up again)
    return path


class Trainer:
    def __init__(self, config, workdir: str | os.PathLike):
        validate_config(config)
        if "://" in os.fspath(workdir):  # (pathlib would quietly make a local folder "gs:" of gs://bucket/run)
            raise ConfigValueError(f"workdir {os.fspath(workdir)!r}: a URL; the workdir is a filesystem path (every "
                                   "host of a multi-host run must see the same one: NFS, Filestore, or a bucket "
                                   "mounted with gcsfuse)")
        self.config = config
        self.workdir = pathlib.Path(workdir)
        problem = folder_problem(self.workdir)  # (a read-only one failed with a traceback after the model's set-up)
        if problem:
            raise ConfigValueError(f"workdir {self.workdir}: {problem}")
        self.compilation_cache = use_compilation_cache(str(config.train.get("compilation_cache", "")))
        self.compile_cache_hit = False
        self.data_resharded: dict | None = None  # restore(): how the data state was resharded (train.data_resume)
        self.data_restarted = ""  # restore(): why the data stream started again (train.data_resume=restart)
        try:
            self.cfg = model_config_from(config)
        except ConfigValueError as e:
            raise ConfigValueError(f"{e}{self._own_copies_hint()}") from None
        shd.maybe_initialize_distributed(bool(config.get("multihost", False)))
        self.is_main = jax.process_index() == 0
        _check_same_config(config, self.workdir)
        if config.model.param_dtype == "bfloat16" and self.is_main:
            print("[train] warning: model.param_dtype=bfloat16 keeps the master weights and the AdamW state in "
                  "bfloat16 (8 significant bits): updates below ~1/256 of a weight (lr 2e-5 steps) round away. The "
                  "official trains float32 master weights (model.compute_dtype=bfloat16 computes in bf16 with them)",
                  flush=True)
        try:
            self.mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor))
        except ValueError as e:  # sizes that do not fit the devices
            raise ConfigValueError(f"mesh.data / fsdp / tensor: {e}") from None
        check_attention_mesh(self.cfg, self.mesh.shape["tensor"])
        problem = tensor_group_problem(self.mesh)
        if problem:
            raise ConfigValueError(problem)
        try:
            P = shd.packs_per_step(int(config.data.packs_per_step), self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
        if P % jax.process_count():
            raise ConfigValueError(f"data.packs_per_step={P} must be a multiple of the process count {jax.process_count()}")
        self.local_packs = P // jax.process_count()
        self._check_sampling()
        self._check_workdir_geometry()
        self._lock_workdir(probe=True)  # a run in progress refuses this one before the weights load (minutes on 7B)
        self._build()

    def _own_copies_hint(self) -> str:
        """For a model.ckpt that is gone when this workdir has checkpoints: the workdir itself can stand for it."""
        from .. import checkpoint as ck

        m = self.config.model
        if m.init != "checkpoint" or not m.ckpt or os.path.isdir(m.ckpt) or not ck.list_train_steps(self.workdir) \
                or not (self.workdir / ck.MODEL_CONFIG_DIR / "llm_config.json").is_file():
            return ""
        return (f". To resume without it, give the workdir itself: --config.model.ckpt={self.workdir} (a resume "
                "takes the weights from its checkpoint, and the workdir keeps copies of the configs, tokenizer "
                "and frozen VAE)")

    def _check_sampling(self):
        """The sample grids' settings (log.sample_*), checked before anything is built: a bad one would
        otherwise stop the run at its first sample grid."""
        lg = self.config.log
        if not int(lg.sample_every) or not list(lg.sample_prompts):
            return
        try:
            H, W = (int(x) for x in lg.sample_size)
        except (TypeError, ValueError):
            raise ConfigValueError(f"log.sample_size={lg.sample_size!r}: expected (height, width)") from None
        ds, m = self.cfg.latent_downsample, self.cfg.max_latent_size
        if min(H, W) <= 0 or H % ds or W % ds or max(H, W) > m * ds:
            raise ConfigValueError(f"log.sample_size=({H}, {W}): each side must be a positive multiple of {ds} px "
                                   f"and at most {m * ds} px (the model's latent position table: {m} per side)")

    def _check_workdir_geometry(self):
        """A workdir with checkpoints holds a model of its model_config's geometry: refuse another one
        before anything is built or written (the workdir stays as it was)."""
        from .. import checkpoint as ck

        stored_dir = self.workdir / ck.MODEL_CONFIG_DIR
        if not ck.list_train_steps(self.workdir) or not (stored_dir / "llm_config.json").is_file():
            return  # nothing to resume, or no record of it (restore() checks the arrays' shapes)
        try:
            stored = ck.load_config(self.workdir)
        except ConfigError as e:
            raise CheckpointError(f"{stored_dir}: {e}") from None
        diff = ck.geometry_diff(stored, self.cfg)
        if diff:
            m = self.config.model
            src = f"model.ckpt={m.ckpt!r}" if m.init == "checkpoint" else "model.geometry"
            raise CheckpointError(
                f"workdir {self.workdir} holds checkpoints of another model geometry than this config's ({src}): "
                + "; ".join(f"{k}: workdir {a!r}, config {b!r}" for k, a, b in diff)
                + ". The geometry cannot change on resume; these settings may: "
                + ", ".join(("train." if f == "freeze_und" else "model.") + f for f in ck.RESUMABLE_MODEL_FIELDS)
                + ". Use the workdir's geometry or another --workdir")

    # ------------------------------------------------------------------ setup
    def _build(self):
        c, cfg, mesh = self.config, self.cfg, self.mesh
        abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abs_params, abs_buffers = nnx.split(abstract, nnx.Param, ...)
        report: list[str] = []
        self.param_sh = shd.state_shardings(abs_params, mesh, report)
        self.buffer_sh = shd.state_shardings(abs_buffers, mesh, report)
        self.sharding_report = report
        if report and not bool(c.train.allow_replicated):
            _check_replication(abs_params, mesh, report)  # before the weights load (they did not fit, unsaid)
        report += head_split_notes(cfg, int(mesh.shape["tensor"]))
        abs_vae = nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))
        self.vae_graphdef, abs_vae_state = nnx.split(abs_vae)
        self.vae_sh = shd.state_shardings(abs_vae_state, mesh)
        self.vae_state = init_vae_state(c, cfg, self.vae_sh)
        self.source = self._make_source()  # before the weights: bad data settings fail fast
        if int(c.log.sample_every):
            self._sample_prompt_ids()  # checked before training (once the data, e.g. the demo's tokenizer, exists)

        params, self.buffers = self._init_weights()

        t = c.train
        self.schedule, self.tx, trainable = optimizer_from_config(c, params)
        state_sh = dict(params=self.param_sh, ema=self.param_sh, opt_state=None, step=shd.replicated(mesh),
                        rng=shd.replicated(mesh))
        abs_opt = jax.eval_shape(self.tx.init, params)
        state_sh["opt_state"] = opt_state_shardings(abs_opt, self.param_sh, mesh)
        self.state_sh = state_sh
        # params donated: the state's params reuse them (one params-sized copy less at the init peak)
        self.state = jax.jit(lambda p: init_train_state(p, self.tx, int(t.seed)), out_shardings=state_sh,
                             donate_argnums=0)(params)
        self._step_fn = train_step_from_config(c, cfg, self.graphdef, self.buffers, self.vae_graphdef, self.tx,
                                               self.schedule, trainable)
        from .. import checkpoint as ck

        self._stacked = ck.stacked_paths(cfg)
        self.workdir.mkdir(parents=True, exist_ok=True)  # only now: a config refused above leaves no trace
        self.ckpt = ck.train_checkpoint_manager(self.workdir.absolute(), max_to_keep=int(c.checkpoint.keep),
                                                enable_async_checkpointing=bool(c.checkpoint.async_save))
        self._saving: int | None = None  # the step of the save in flight (`_save_failure`)
        # the data state after the last batch trained (what a checkpoint saves: the loop fetches the next batch
        # while the device runs a step); None: the source's own (no batch fetched since it was made / restored)
        self._data_state: dict | None = None

    def _make_source(self):
        """The batch source; its configuration errors (the data pipeline raises ValueError: no datasets,
        transforms too large for the geometry, tokenizer ids ...) are a ConfigValueError."""
        from .records_source import data_config_errors

        c = self.config
        fp = self.vae_fingerprint if c.data.get("vae_latents") else ""  # latents must come from this very VAE
        with data_config_errors(c):
            return make_source(c, self.cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                               local_packs=self.local_packs, vae_fingerprint=fp)

    @functools.cached_property
    def vae_fingerprint(self) -> str:
        """sha256 of the frozen VAE encoder (`data.latents.vae_fingerprint`): recorded with each checkpoint, so
        that a resume with another VAE (another train.seed for a random one, another model.ckpt) is refused."""
        from ..data.latents import vae_fingerprint

        return vae_fingerprint(self.vae_state)

    def _init_weights(self):
        c, cfg = self.config, self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        from ..checkpoint import list_train_steps

        # a resume overwrites the weights with its checkpoint's (restore raises rather than find none): model.ckpt's
        # are not read again (14B parameters on every restart of a 7B run); a random init only gives the shapes
        resuming = c.model.init == "checkpoint" and bool(list_train_steps(self.workdir))
        if resuming and self.is_main:
            print(f"[train] resuming in {self.workdir}: the weights come from its checkpoint (model.ckpt's are not "
                  "loaded)", flush=True)
        if c.model.init == "random" or resuming:
            seed = int(c.train.seed)

            def init():
                m = Bagel(cfg, rngs=nnx.Rngs(seed))
                _, p, b = nnx.split(m, nnx.Param, ...)
                return nnx.to_pure_dict(p), nnx.to_pure_dict(b)

            params, buffers = jax.jit(init, out_shardings=(self.param_sh, self.buffer_sh))()
        else:
            from ..checkpoint import load_any_bagel

            # restored straight into the mesh's shardings (a converted folder: each process reads its shards;
            # the 7B model never sits whole on one device)
            model = _loading(c.model.ckpt, "model", lambda: load_any_bagel(
                c.model.ckpt, shardings=_merge_trees(self.param_sh, self.buffer_sh)))
            _, p, b = nnx.split(model, nnx.Param, ...)
            params = jax.tree.map(lambda x: x.astype(pdt), nnx.to_pure_dict(p))  # (keeps each leaf's sharding)
            # the buffers are the fixed sin-cos position tables: the official trainer drops the checkpoint's
            # (bf16-rounded in a bf16 folder) and keeps its own float32 ones, and so does this one
            buffers = nnx.to_pure_dict(b)
            from ..checkpoint import fixed_tables

            tables = {path[0]: make() for path, make in fixed_tables(cfg).items()}
            if set(tables) != set(buffers):
                raise AssertionError(f"buffers {sorted(buffers)} are not the fixed tables {sorted(tables)}")
            buffers = shd.put_global(tables, {k: self.buffer_sh[k] for k in tables})
        return params, buffers

    def _write_model_config(self):
        """WORKDIR/model_config (configs, tokenizer files, manifest), WORKDIR/config.json (this run's config)
        and WORKDIR/vae (the frozen VAE), the layout `echo4o_jax.checkpoint` reads (generate, to_torch).
        `run` calls it after a successful restore (or in a new workdir), never before. Every process calls it:
        process 0 writes the files; the VAE is an Orbax save, which every process takes part in (multi-host:
        Orbax syncs the processes, so a save by process 0 alone waits for the others forever)."""
        from .. import checkpoint as ck

        vae_dir = (self.workdir / ck.VAE_ITEM).absolute()
        save_vae = not vae_dir.exists()
        if jax.process_count() > 1:  # one decision for all processes (process 0 may create it meanwhile)
            from jax.experimental import multihost_utils

            save_vae = bool(multihost_utils.broadcast_one_to_all(np.int32(save_vae)))
        if self.is_main:
            src = self.config.model.ckpt if self.config.model.init == "checkpoint" else None
            try:
                ck.write_model_config(self.workdir / "model_config", self.cfg, src_dir=src)
                tok = self.config.data.get("tokenizer", "")
                if tok and pathlib.Path(tok).is_file() and not (self.workdir / "model_config" / "tokenizer.json").exists():
                    ck.copy_file(tok, self.workdir / "model_config" / "tokenizer.json")
                atomic_write(self.workdir / "config.json", self.config.to_json_best_effort(indent=1))
            except OSError as e:
                raise CheckpointSaveError(f"cannot write the model files of workdir {self.workdir}: {e}") from e
        if save_vae:
            reports = _AbortedRestoreReports()  # (as for a failed checkpoint save: one line, see run)
            reports.install()
            try:
                ck.save_pytree(vae_dir, self.vae_state)
            except Exception as e:  # noqa: BLE001 -- orbax / tensorstore / OSError
                raise CheckpointSaveError(f"saving the frozen VAE to {vae_dir} failed: "
                                          f"{_error_summary(e).splitlines()[0]} (once the disk has room, the same "
                                          "command goes on)") from e
            reports.remove()

    # ------------------------------------------------------------------ checkpoints
    def save(self, force: bool = False):
        step = int(self.state["step"])
        # data_config / local_packs / process_count: what the data state was made with (named by restore()
        # when another data config cannot resume it)
        # data_states [process]: every process's data iterator (the JSON item is written by process 0)
        meta = dict(step=step, rng=np.asarray(jax.device_get(self.state["rng"])).tolist(),
                    data_states=_gather_process_states(self._trained_data_state()), time=time.time(),
                    data_config=json.loads(self.config.data.to_json_best_effort()),
                    local_packs=self.local_packs, process_count=jax.process_count(),
                    vae_fingerprint=self.vae_fingerprint, optimizer_layout=_optimizer_layout(self.config))
        from .. import checkpoint as ck

        full = _merge_trees(self.state["params"], self.buffers)
        save_args = ck.train_save_args(full, self._stacked)  # one chunk per layer: exports stream by layer
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(full, save_args=save_args),
            ema=ocp.args.StandardSave(_merge_trees(self.state["ema"], self.buffers), save_args=save_args),
            opt_state=ocp.args.StandardSave(self.state["opt_state"],
                                            save_args=ck.train_save_args(self.state["opt_state"], self._stacked)),
            meta=ocp.args.JsonSave(meta),
        )
        failure = self._save_failure(block=True)  # (the previous save: orbax would raise its error here)
        if failure:
            raise CheckpointSaveError(failure)
        try:
            self.ckpt.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 -- a synchronous save's error (orbax / tensorstore / OSError)
            raise CheckpointSaveError(self._save_failed(step, e)) from e
        self._saving = step

    def _save_failure(self, block: bool) -> str | None:
        """Why the last asynchronous save failed, once it has ended (`block`: wait for it), else None. Its error
        (a full disk) surfaced only at the next save, after `checkpoint.every` more steps, as thousands of lines
        of tracebacks."""
        if self._saving is None or (not block and self.ckpt.is_saving_in_progress()):
            return None
        step, self._saving = self._saving, None
        try:
            self.ckpt.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- orbax / tensorstore: ValueError, OSError, ...
            return self._save_failed(step, e)
        return None

    def _trained_data_state(self) -> dict:
        """The data state of the steps trained: after the last batch a step ran on, not after a batch fetched
        ahead of it (a checkpoint of the later one would skip that batch on resume)."""
        return self.source.get_state() if self._data_state is None else self._data_state

    def _save_failed(self, step: int, e: Exception) -> str:
        from .. import checkpoint as ck

        done = [s for s in ck.list_train_steps(self.workdir) if s != step]
        last = f"step {done[-1]}" if done else "none"
        return (f"saving the checkpoint of step {step} in {self.workdir / 'checkpoints'} failed: "
                f"{_error_summary(e).splitlines()[0]}. Training stopped; the last complete checkpoint: {last} "
                "(once the disk has room, the same command resumes from it)")

    def restore(self, step: int | None = None) -> bool:
        """Restore checkpoint `step` (None: the latest; False when there is none). A checkpoint that cannot
        be read, or whose data state this data config cannot resume, is a CheckpointError naming the step,
        the workdir and what to do."""
        from .. import checkpoint as ck

        step = self.ckpt.latest_step() if step is None else step
        if step is None:
            listed = ck.list_train_steps(self.workdir)
            if listed:  # (a resume loads no weights from model.ckpt: never go on with the random ones)
                raise CheckpointError(f"workdir {self.workdir}: checkpoints/ lists steps {listed}, none of which the "
                                      "checkpoint manager can restore")
            return False
        _, step_dir = ck.train_step_dir(self.workdir, step)  # an unknown step: CheckpointError listing the others
        full_sh = _merge_trees(self.param_sh, self.buffer_sh)
        full_abs = _abstract(_merge_trees(self.state["params"], self.buffers), full_sh)
        # the EMA is float32 whatever param_dtype is (init_train_state): restored as such (with the params'
        # dtype, a bf16 run's EMA turned bf16 at every resume, where a decay of 0.9999 barely moves it)
        ema_abs = _abstract(_merge_trees(self.state["ema"], self.buffers), full_sh)
        opt_abs = _abstract(self.state["opt_state"], self.state_sh["opt_state"])
        self._check_optimizer_layout(step)
        # the state in place only gave the shapes: freed before the restored one is allocated (a resume held both
        # at its peak, about twice the train state: a 7B run that fitted could run out of memory on its resume)
        for x in {id(x): x for x in jax.tree.leaves(self.state)}.values():
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
        quiet = _AbortedRestoreReports()
        quiet.install()
        try:
            r = self.ckpt.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(full_abs), ema=ocp.args.StandardRestore(ema_abs),
                opt_state=ocp.args.StandardRestore(opt_abs), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax / tensorstore: plain Exception (a truncated file), ValueError, OSError ...
            raise CheckpointError(self._unreadable_step_message(step, step_dir, e)) from e
        quiet.remove()
        pkeys = set(_flat(self.state["params"]))
        only = lambda tree: unflatten_dict({k: v for k, v in _flat(tree).items() if k in pkeys})
        meta = r["meta"]
        if meta.get("vae_fingerprint", self.vae_fingerprint) != self.vae_fingerprint:
            c = self.config
            how = (f"model.init=random draws it with train.seed + 1 = {int(c.train.seed) + 1}"
                   if c.model.init == "random" else f"model.ckpt={c.model.ckpt}")
            raise CheckpointError(
                f"the frozen VAE of this config differs from the one the run in workdir {self.workdir} trained "
                f"with (checkpoint of step {step}): {how}. Resume with the run's settings (its config.json), or "
                "use another --workdir")
        states = meta.get("data_states") or [meta["data_state"]]  # (data_state: one process's, older checkpoints)
        refused = resharded = None
        mode = self.config.train.data_resume
        try:
            resharded = self.source.resume(states, reshard=mode == "reshard")
            self._data_state = None  # (the source's own state again: nothing fetched from it yet)
        except ValueError as e:  # the records pipeline refuses a state made by another configuration
            if mode == "restart":  # (the source as built: its stream from the beginning)
                diff = self._data_settings_diff(meta)  # (the pipeline's own reason is a fingerprint: name the keys)
                self.data_restarted = str(e) + (f"; data settings that differ from the checkpoint's run: "
                                                f"{'; '.join(diff)}" if diff else "")
            else:
                refused = e
        # multi-host: every process learns whether any refused (one going on alone would wait in a collective),
        # and whether all resumed the same way (exactly / resharded: a mix would train from two data positions)
        every = _gather_process_states({"refused": refused is not None, "resharded": resharded is not None})
        who = [i for i, r in enumerate(every) if r["refused"]]
        if refused is not None:
            raise CheckpointError(self._data_state_message(step, meta, refused)) from refused
        if who:
            raise CheckpointError(f"process(es) {who} could not resume their data iterator from step {step} in "
                                  f"workdir {self.workdir} (their logs say why); this process stops with them")
        if len({r["resharded"] for r in every}) > 1:
            raise CheckpointError(
                f"process(es) {[i for i, r in enumerate(every) if r['resharded']]} resharded the data state of step "
                f"{step} in workdir {self.workdir}, the others resumed theirs exactly: their data settings differ "
                "(every host must run the same config)")
        if resharded is not None:  # logged by run() (this process's part: its offsets)
            self.data_resharded = dict(from_processes=len(states), from_packs_per_process=meta.get("local_packs"),
                                       processes=jax.process_count(), packs_per_process=self.local_packs,
                                       **resharded)
        self.state = dict(params=only(r["params"]), ema=only(r["ema"]), opt_state=r["opt_state"],
                          step=shd.put_global(np.asarray(meta["step"], np.int32), shd.replicated(self.mesh)),
                          rng=shd.put_global(np.asarray(meta["rng"], np.uint32), shd.replicated(self.mesh)))
        self._warn_stretched_schedule(int(meta["step"]))
        return True

    def _warn_stretched_schedule(self, step: int) -> None:
        """The learning-rate schedule of a resume that differs from the run's (its config.json, not yet rewritten):
        another train.steps under a cosine schedule (it decays over them), another schedule, lr, min_lr or
        warmup moves the learning rate at once. Said, with the jump (each schedule as its own settings give it)."""
        o = self.config.optim
        if not self.is_main:
            return
        try:
            then = json.loads((self.workdir / "config.json").read_text())
            t = then["optim"]
            was = dict(schedule=str(t["schedule"]), lr=float(t["lr"]), min_lr=float(t.get("min_lr", 0.0)),
                       warmup_steps=int(t["warmup_steps"]), steps=int(then["train"]["steps"]))
        except (OSError, ValueError, KeyError, TypeError):
            return  # (no record of the run's settings)
        now = dict(schedule=str(o.schedule), lr=float(o.lr), min_lr=float(o.min_lr), warmup_steps=int(o.warmup_steps),
                   steps=int(self.config.train.steps))
        sched = lambda s: lr_schedule(s["lr"], s["warmup_steps"], s["steps"], s["schedule"], s["min_lr"])
        try:
            old, new = float(sched(was)(step)), float(sched(now)(step))
        except ValueError:  # (a schedule name this version does not know)
            return
        changed = [k for k in ("schedule", "lr", "min_lr", "warmup_steps", "steps") if was[k] != now[k]]
        if old == new and was["schedule"] == now["schedule"]:  # (no jump: min_lr of a constant schedule, ...)
            return
        if changed == ["steps"]:
            print(f"[train] warning: optim.schedule=cosine decays over train.steps, which was {was['steps']} in this "
                  f"workdir's run and is {now['steps']} now: the learning rate at step {step} moves from {old:.3g} to "
                  f"{new:.3g}", flush=True)
            return
        what = "; ".join(f"{'train' if k == 'steps' else 'optim'}.{k}: {was[k]} -> {now[k]}" for k in changed)
        print(f"[train] warning: the learning-rate schedule differs from this workdir's run ({what}): the learning "
              f"rate at step {step} moves from {old:.3g} to {new:.3g}", flush=True)

    def _report_skipped_records(self, step: int, total: int, reported: int, recent_errors: list[dict],
                                logger) -> int:
        """Print (and log, as a `data_skipped_errors` event) the records skipped as unreadable since `reported`
        of this process's `total` (`recent_errors`: the source's last ones, as of that count): they were only a
        counter in log.jsonl, naming no record. Returns `total`."""
        from tqdm import tqdm

        new = total - reported
        recent = recent_errors[-new:]
        where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
        for e in recent:  # (a record that does not decode has no id: its shard and index tell it)
            name = e["id"] if e["id"] is not None else "(no id)"
            at = f" ({e['where']})" if e.get("where") else ""
            tqdm.write(f"[data] record {name}{at} skipped{where}: {e['error']}")
        if new > len(recent):
            tqdm.write(f"[data] ... and {new - len(recent)} more record(s) skipped{where}")
        tqdm.write(f"[data] {total} unreadable record(s) skipped so far{where}")
        logger.event(step, "data_skipped_errors", {"total": total, "recent": recent})
        return total

    def _check_optimizer_layout(self, step: int) -> None:
        """Refuse, naming the settings, a resume whose optimizer state has another layout than the checkpoint's
        (`_optimizer_layout`; recorded by the checkpoints' meta since it exists, else read from the run's
        config.json): Orbax's tree mismatch called the checkpoint broken, and so each earlier one."""
        try:
            meta = self.ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 -- an unreadable meta: the full restore names it
            return
        saved = meta.get("optimizer_layout")
        if saved is None:
            try:
                saved = _optimizer_layout(json.loads((self.workdir / "config.json").read_text()))
            except Exception:  # noqa: BLE001 -- no (readable) config.json of the run: nothing to compare with
                return
        now = _optimizer_layout(self.config)
        diff = [f"{k}: checkpoint {saved.get(k)}, config {v}" for k, v in now.items() if saved.get(k) != v]
        if diff:
            raise CheckpointError(
                f"the optimizer state of the checkpoint of step {step} in workdir {self.workdir} has another layout "
                f"than this config's ({'; '.join(diff)}): these settings cannot change on resume (a gradient clip "
                "switched on or off, or other frozen parts, change the optimizer state). Resume with the run's "
                "values (its config.json), or use another --workdir")

    def _unreadable_step_message(self, step: int, step_dir: pathlib.Path, e: Exception) -> str:
        from .. import checkpoint as ck

        why = _error_summary(e).splitlines()[0]
        damage = _damaged_items(step_dir)
        if damage:  # (Orbax's own reason may name no file: "pytree structure error", "Expecting value")
            why = f"{why} [{'; '.join(damage)}]"
        earlier = [s for s in ck.list_train_steps(self.workdir) if s < step]
        msg = f"cannot restore the checkpoint of step {step} in workdir {self.workdir} ({step_dir}): {why}. "
        moved = self.workdir / f"broken_checkpoint_{step}"
        if earlier:
            return msg + (f"Earlier checkpoints: steps {earlier}. To resume from step {earlier[-1]}, move the broken "
                          f"one out of checkpoints/ (mv {step_dir} {moved}) and rerun")
        return msg + (f"There is no earlier checkpoint: move it away (mv {step_dir} {moved}) to train from step 0, "
                      "or use another --workdir")

    def _data_settings_diff(self, meta: dict) -> list[str]:
        """The data settings (and packs per process, process count) of this run that differ from those the
        checkpoint `meta` records ("data.KEY: checkpoint A, config B"); [] when it records none."""
        if "data_config" not in meta:
            return []
        now = dict(flatten_dict(json.loads(self.config.data.to_json_best_effort())))
        then = dict(flatten_dict(meta["data_config"]))
        diff = [f"data.{'.'.join(k)}: checkpoint {then.get(k, '(unset)')!r}, config {now.get(k, '(unset)')!r}"
                for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)]
        for name, a, b in (("packs per process", meta.get("local_packs"), self.local_packs),
                           ("process count", meta.get("process_count"), jax.process_count())):
            if a != b:
                diff.append(f"{name}: checkpoint {a}, this run {b}")
        return diff

    def _data_state_message(self, step: int, meta: dict, e: Exception) -> str:
        from ..data.pipeline import DataContentsError

        msg = (f"the data iterator state of step {step} in workdir {self.workdir} cannot resume with this config's "
               f"data settings ({e}). ")
        restart = ("set train.data_resume=restart to keep the weights, optimizer and step and start the data "
                   "stream from its beginning")
        if "data_config" not in meta:
            return msg + ("The checkpoint does not record its data settings (saved by an older version): resume "
                          "with the data settings it was trained with, or use another --workdir")
        diff = self._data_settings_diff(meta)
        if diff:
            msg += (f"Settings that differ from the checkpoint's run: {'; '.join(diff)}. Resume with the "
                    "checkpoint's values, ")
            if getattr(e, "reshardable", False):  # (records: only the process count / packs per process changed)
                msg += ("set train.data_resume=reshard to go on from where the run's data had got to (each process "
                        "from its first sample past those read, in the same shuffled order, the old processes' "
                        "buffered samples handed over; a few may be read twice or skipped), ")
            return msg + f"{restart}, or use another --workdir"
        if isinstance(e, DataContentsError):
            return msg + f"Resume with the {e.inputs} the run trained on, {restart}, or use another --workdir"
        return msg + ("No data setting differs from the checkpoint's run: the pipeline's inputs did (dataset files, "
                      f"their paths relative to the current folder). Resume with the same inputs, {restart}, or use "
                      "another --workdir")

    # ------------------------------------------------------------------ step
    def _device_batch(self, batch) -> dict[str, jax.Array]:
        from ..packing import batch_arrays

        arrays = batch_arrays(batch)
        return {k: jax.make_array_from_process_local_data(shd.batch_sharding(self.mesh, max(v.ndim, 1)), v)
                for k, v in arrays.items() if v.ndim >= 1}

    def compile(self, batch, compiler_options: dict | None = None) -> float:
        """Compiles the train step for `batch`'s shapes (with XLA `compiler_options`, e.g. a profile's
        `profile.readable_compiler_options`) as the step that `train_step` runs; -> seconds taken."""
        t0 = time.perf_counter()
        dev = self._device_batch(batch)
        batch_sh = {k: v.sharding for k, v in dev.items()}
        jitted = jax.jit(self._step_fn, in_shardings=(self.state_sh, self.vae_sh, batch_sh),
                         out_shardings=(self.state_sh, shd.replicated(self.mesh)), donate_argnums=(0,))
        hits = _CACHE_HITS[0]
        with jax.set_mesh(self.mesh):  # activations pinned to the mesh inside the model (pin_activation)
            self._compiled = jitted.lower(self.state, self.vae_state, dev).compile(compiler_options)
        # multi-host: a hit on every process (JAX writes the cache from process 0 only: a folder the other hosts
        # do not see gives them misses)
        self.compile_cache_hit = all(r["hit"] for r in _gather_process_states({"hit": _CACHE_HITS[0] > hits}))
        return time.perf_counter() - t0

    def train_step(self, batch) -> dict[str, float]:
        return self._collect(self._dispatch(self._device_batch(batch)))

    def _dispatch(self, dev: dict[str, jax.Array]):
        """Starts the step on the device batch `dev` (`_device_batch`); returns its metrics, still on the device
        (JAX dispatches asynchronously: the host goes on, e.g. fetching the next batch, while the step runs)."""
        self.state, metrics = self._compiled(self.state, self.vae_state, dev)
        return metrics

    def _collect(self, metrics) -> dict[str, float]:
        """A dispatched step's metrics as floats (waits for the step to end)."""
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    # ------------------------------------------------------------------ sampling
    def sample_grid(self, step: int) -> np.ndarray | None:
        prompts = list(self.config.log.sample_prompts)
        if not prompts:
            return None
        from ..inference import Inferencer

        model = nnx.merge(self.graphdef, self.state["ema"], self.buffers)
        vae = nnx.merge(self.vae_graphdef, self.vae_state)
        inf = Inferencer(model, vae, max_context=int(self.config.log.sample_max_context))
        H, W = (int(x) for x in self.config.log.sample_size)
        imgs = []
        for i, ids in enumerate(self._sample_prompt_ids()):
            out = inf.interleave_inference([ids], image_shapes=(H, W), rng=jax.random.key(i),
                                           num_timesteps=int(self.config.log.sample_steps),
                                           cfg_text_scale=float(self.config.log.sample_cfg), cfg_img_scale=1.0,
                                           cfg_interval=(0.0, 1.0), timestep_shift=3.0)
            imgs.append(out["image"])
        return np.concatenate(imgs, axis=1)

    def _sample_prompt_ids(self) -> list[list[int]]:
        """log.sample_prompts as token ids: text through the tokenizer, or lists of ids below the vocabulary
        size; each, with its two wrapping tokens padded to the text bucket, within log.sample_max_context. A bad
        one is a ConfigValueError (it was a traceback at the first sample grid, after the steps since the last
        checkpoint)."""
        from ..inference import TEXT_BUCKET

        lg, vocab = self.config.log, self.cfg.llm.vocab_size
        prompts = list(lg.sample_prompts)
        tok = self._tokenizer() if any(isinstance(p, str) for p in prompts) else None  # (token-id prompts need none)
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = tok(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                ids = list(p)
                if any(not 0 <= x < vocab for x in ids):
                    raise ConfigValueError(f"log.sample_prompts[{i}]: token ids must be in [0, {vocab}), got {p!r}")
            else:
                raise ConfigValueError(f"log.sample_prompts[{i}]={p!r}: expected a text or a list of token ids")
            need = -(-(len(ids) + 2) // TEXT_BUCKET) * TEXT_BUCKET
            if need > int(lg.sample_max_context):
                raise ConfigValueError(f"log.sample_prompts[{i}] takes {need} context tokens (padded to "
                                       f"{TEXT_BUCKET}), more than log.sample_max_context={lg.sample_max_context}")
            out.append(ids)
        return out

    def _tokenizer(self):
        """The sample prompts' tokenizer: data.tokenizer, else the one of model.ckpt (as the records data)."""
        from ..data.pipeline import load_tokenizer

        m = self.config.model
        path = self.config.data.get("tokenizer", "") or (str(config_dir(m.ckpt)) if m.init == "checkpoint" else "")
        if not path:
            raise ConfigValueError("log.sample_prompts holds text but there is no tokenizer: set data.tokenizer "
                                   "(tokenizer.json, or a folder holding it)")
        try:
            t = load_tokenizer(path)
        except Exception as e:  # (tokenizers raises plain Exceptions for a file it cannot parse)
            raise ConfigValueError(f"log.sample_prompts holds text: cannot load the tokenizer {path} ({e})") from None
        return lambda s: t.encode(s, add_special_tokens=False).ids

    # ------------------------------------------------------------------ loop
    def _fetch(self) -> "_Fetched":
        """The source's next batch, with what belongs to it (`_Fetched`; its device arrays: `_on_device`)."""
        if self._data_state is None:  # (the state of the steps trained while this batch waits for its step)
            self._data_state = self.source.get_state()
        batch = next(self.source)
        return _Fetched(batch, None, self.source.get_state(), dict(getattr(self.source, "last_stats", None) or {}),
                        list(getattr(self.source, "recent_errors", ())))

    def _on_device(self, fetched: "_Fetched") -> "_Fetched":
        """`fetched` with its device arrays (made once). Outside the handling of the source's errors: a device
        error (out of memory) is not the data's, and is raised as it is."""
        if fetched.dev is None:
            fetched.dev = self._device_batch(fetched.batch)
        return fetched

    def _fetch_ahead(self) -> "_Fetched | Exception":
        """`_fetch` while a step runs on the device, with its device arrays (their host-to-device copy overlaps the
        step too); the source's error is returned, to be raised where the batch is taken (`_next_batch`: after
        the step in flight is logged and saved as it would have been)."""
        try:
            fetched = self._fetch()
        except Exception as e:  # noqa: BLE001 -- re-raised by _next_batch
            return e
        return self._on_device(fetched)

    def _next_batch(self, step: int, start: int, ahead: "_Fetched | Exception | None" = None) -> "_Fetched":
        """The next batch (`ahead`: the one fetched while the last step ran, or the error that fetch raised);
        a data error (a record that cannot be read, precomputed latents, a budget nothing fits) first saves the
        steps trained since the last checkpoint (`_saved_before_error`)."""
        from ..data.latents import LatentStoreError

        try:
            if isinstance(ahead, Exception):
                raise ahead
            return ahead if ahead is not None else self._fetch()
        except (RecordError, LatentStoreError) as e:
            raise _saved_before_error(self, step, start, e) from None

    def run(self) -> dict[str, Any]:
        """Train from the latest checkpoint (or step 0) to `train.steps`. Returns `step` (where it ended),
        `total` (train.steps), `history` (this run's step metrics: empty when the workdir was already at
        `total`), `resumed` and `stopped_by` (the signal number of a SIGTERM / SIGINT that stopped it before
        `total`, after saving that step; else None). One run at a time in a workdir (`_lock_workdir`)."""
        lock = self._lock_workdir()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.close()

    def _lock_workdir(self, probe: bool = False):
        """Process 0's `flock` on the workdir folder (nothing is written into it), else None: a second run on the
        workdir (two jobs, or a command run twice) is a CheckpointError on every process. Two runs used to train
        side by side, each saving over the other's checkpoints and log. A file system without locks: a warning.
        `probe`: released at once, and only if the workdir exists (the constructor's early check; run() holds the
        lock; what process 0 sees decides for all: every process takes part in the agreement)."""
        from ..paths import LockUnavailable, hold_lock

        lock = refused = None
        if self.is_main and (not probe or self.workdir.is_dir()):
            try:
                lock = hold_lock(self.workdir, f"workdir {self.workdir}", CheckpointError)  # (writes nothing)
            except CheckpointError as e:
                refused = e
            except LockUnavailable as e:  # (a file system without locks: training goes on, said once, by run())
                if not probe:
                    print(f"[train] warning: {e}: a second run on this workdir would not be refused", flush=True)
            if probe and lock is not None:
                lock.close()
                lock = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if bool(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))) and refused is None:
                refused = CheckpointError(f"workdir {self.workdir} is in use by another run (process 0's lock)")
        if refused is not None:
            raise refused
        return lock

    def _run(self) -> dict[str, Any]:
        from PIL import Image
        from tqdm import tqdm

        c = self.config
        total = int(c.train.steps)
        resumed = self.restore()
        start = int(self.state["step"])
        self._write_model_config()  # after the restore succeeded: a refused run leaves the workdir as it was
        logger = _Logger(self.workdir, self.is_main, bool(c.log.tensorboard), start)
        if self.is_main:
            for line in self.sharding_report:
                print(f"[sharding] {line}")
        # agreed: the signal all processes stop on (see _agreed_stop); started: a step of this run was dispatched (a
        # signal from then on lets it finish, saves it and stops)
        stop = {"signal": None, "agreed": None, "started": False}

        def handler(signum, frame):
            if signum == signal.SIGINT and not stop["started"]:  # set-up / compiling: nothing to save, and waiting
                raise KeyboardInterrupt  # for a 7B compile to end is not what a Ctrl-C asks (train.__main__)
            stop["signal"] = signum
            print(f"\n[train] signal {signum}: finishing the current step, saving, exiting", flush=True)

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        # a failed save is reported once, by _save_failure: not by Orbax's threads, nor by the writes it
        # abandons (hundreds of 'Event loop is closed' tracebacks)
        save_reports = _AbortedRestoreReports()
        save_reports.install()
        history = []
        bar = None  # the progress bar, closed in `finally` (an error then starts on a line of its own)
        prof = _StepProfile(self, int(c.log.profile_start), int(c.log.profile_steps))
        prof.check_reachable(start, total)
        failing = False
        try:
            if start >= total:
                return dict(step=start, total=total, history=history, resumed=resumed, stopped_by=None)
            if resumed:
                logger.marker(start, "resumed")
            elif logger.superseded:  # steps of an earlier run that finished no checkpoint (killed before it)
                logger.marker(start, "restarted")
            if self.data_restarted:
                logger.event(start, "data_restarted", {"why": self.data_restarted})
                if self.is_main:
                    print(f"[train] data stream started from its beginning (train.data_resume=restart: the data "
                          f"state of step {start} cannot resume: {self.data_restarted})", flush=True)
            if self.data_resharded is not None:
                r = self.data_resharded
                logger.event(start, "data_resharded", r)
                if self.is_main:
                    print(f"[train] data resharded (train.data_resume=reshard): {r['from_processes']} process(es) x "
                          f"{r['from_packs_per_process']} pack(s) -> {r['processes']} x {r['packs_per_process']}; "
                          f"this process starts at its records {r['offsets']} of each dataset; {r['read_twice']} "
                          f"sample(s) read twice and as many not read (the old processes' uneven reads); "
                          f"{r['handed_over']} buffered sample(s) handed over", flush=True)
            # (the records source's counters go on from the checkpoint's: only this run's skips are reported)
            errors_before = getattr(self.source, "skipped_errors", 0)
            try:
                fetched, first_error = self._fetch(), None
            except Exception as e:  # noqa: BLE001 -- raised below, once every process knows
                first_error = e
            # multi-host: a process whose first batch failed stops every process (the others waited for it in the
            # step's first collective until the distributed runtime's timeout, minutes, then aborted)
            failed = _agreed_stop(None, first_error is not None)[1]
            if isinstance(first_error, RuntimeError) and jax.process_count() == 1 and _signalled(stop):
                # a job scheduler's SIGTERM to the process group ended the data workers before the first batch:
                # stopped as asked, nothing to save (it was a traceback, exit 1)
                stop["agreed"] = stop["signal"]
                return dict(step=start, total=total, history=history, resumed=resumed, stopped_by=stop["agreed"])
            if first_error is not None:
                raise first_error
            if failed:
                raise DataFailedElsewhereError(f"process(es) {failed} could not read their first batch (their logs "
                                               "say why): this process stops with them, nothing of this run trained")
            compile_s = self.compile(fetched.batch)
            logger.log(start, dict(compile_seconds=compile_s, compile_cache_hit=self.compile_cache_hit))
            if self.is_main and self.compilation_cache:
                print(f"[train] step compiled in {compile_s:.1f} s (compilation cache {self.compilation_cache}: "
                      f"{'hit' if self.compile_cache_hit else 'miss'})", flush=True)
            n_dev = self.mesh.size
            kind = jax.devices()[0].device_kind
            peak = flops_lib.peak_flops_per_device(kind, float(c.log.get("peak_flops", 0.0)))
            if peak is None and self.is_main and jax.default_backend() != "cpu":  # (it was left out, unsaid)
                print(f"[train] no bf16 peak known for device kind {kind!r}: MFU is not logged (set "
                      "--config.log.peak_flops=<FLOP/s per device>)", flush=True)
            bar = tqdm(total=total, initial=start, disable=not self.is_main, dynamic_ncols=True)
            timer = _Timer()
            step = start
            skipped_reported = nonfinite_run = 0
            errors_reported = errors_before
            ahead = None  # the next batch, fetched while a step runs (or the error that fetch raised)
            while step < total:
                if step > start:
                    try:
                        fetched = self._next_batch(step, start, ahead)
                    except RuntimeError as e:
                        if jax.process_count() != 1:
                            raise
                        if not _signalled(stop):  # a data worker that died (the out-of-memory killer, ...): the
                            raise _saved_before_error(self, step, start, e) from None  # steps trained are saved
                        # a signal sent to the whole process group (a job scheduler's SIGTERM) ended the data
                        # workers too, so no next batch: the steps trained are saved, and the run stops as asked
                        stop["agreed"] = stop["signal"]
                        if step != self.ckpt.latest_step():
                            self.save(force=True)
                        print(f"[train] the data workers ended with signal {stop['signal']} too; saved step {step}",
                              flush=True)
                        break
                ahead = None
                batch = fetched.batch
                prof.before(step)
                metrics = self._dispatch(self._on_device(fetched).dev)
                stop["started"] = True
                self._data_state = fetched.state
                if step + 1 < total and stop["signal"] is None:  # the host packs the next batch meanwhile
                    ahead = self._fetch_ahead()
                m = self._collect(metrics)
                if float(c.train.debug_step_delay):  # tests: widen the window for an external kill
                    time.sleep(float(c.train.debug_step_delay))
                dt = timer.lap()
                if prof.after(step + 1):
                    timer.lap()  # the trace's stop and summary belong to no step's time
                step += 1
                # multi-host, `failed`: the processes whose next batch could not be read: every process logs and
                # saves this step, then stops with that error (only the failing one stopped: the others waited in
                # the next step's collectives for minutes, then aborted, the steps since the checkpoint lost)
                stop["agreed"], failed = _agreed_stop(stop["signal"], isinstance(ahead, Exception))
                # the same step on every process; a run's last step is logged whatever log.every (also when a
                # signal stops it here: the steps after the last logged one were lost from log.jsonl)
                log_now = (step % int(c.log.every) == 0 or step == total or stop["agreed"] is not None
                           or bool(failed))
                lens = [np.bincount(s[s >= 0]) for s in np.asarray(batch.sample_id)]
                fl = sum(flops_lib.step_flops(self.cfg.llm, int(n), l) for n, l in zip(batch.num_tokens, lens)) \
                    if peak else 0.0
                st = fetched.stats  # records pipeline: this process's counters (as of this step's batch)
                counters = [k for k in ("skipped_too_long", "skipped_errors", "dropped_unfit", "time_wait_s")
                            if k in st]
                # this process's real tokens, capacity tokens and FLOPs (and data counters); summed over the
                # processes at a logged step (each reads other packs), else estimated from this one's (the bar)
                work = _process_sums([float(np.sum(batch.num_tokens)), float(np.asarray(batch.sample_id).size), fl,
                                      *(float(st[k]) for k in counters)], gather=log_now)
                tokens = int(work["sum"][0])
                m.update(step=step, step_seconds=dt, tokens=tokens, tokens_per_second=tokens / dt,
                         fill=work["sum"][0] / work["sum"][1])
                if work["by_process"] is not None:
                    m["tokens_by_process"] = [int(x[0]) for x in work["by_process"]]
                for i, k in enumerate(counters):  # every process's, summed, at a logged step (the wait: the
                    by = work["by_process"]  # longest); else this process's
                    m[f"data_{k}"] = (st[k] if by is None else max(p[3 + i] for p in by) if k == "time_wait_s"
                                      else int(work["sum"][3 + i]))
                if peak:
                    m["mfu"] = work["sum"][2] / (dt * n_dev * peak)
                history.append(m)
                nonfinite_run = 0 if m["ok"] else nonfinite_run + 1
                if not m["ok"]:
                    msg = (f"non-finite loss at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
                           "the update was not applied")
                    if not c.train.skip_nonfinite or nonfinite_run > _MAX_SKIPPED_IN_A_ROW:
                        if c.train.skip_nonfinite:  # skipping for ever trains nothing (it exited 0, all NaN)
                            msg = (f"{msg}; {nonfinite_run} steps in a row were non-finite (train.skip_nonfinite "
                                   f"skips at most {_MAX_SKIPPED_IN_A_ROW} in a row)")
                        failed = self._save_failure(block=True)  # (a failed save: said, not a traceback)
                        if failed:
                            msg = f"{msg}; also, {failed}"
                        last = self.ckpt.latest_step()
                        hint = "" if c.train.skip_nonfinite else " Set train.skip_nonfinite=True to skip such steps."
                        where = f"{'step ' + str(last) if last is not None else 'none'} in {self.workdir / 'checkpoints'}"
                        if resumed and last == start and step - nonfinite_run == start:
                            # no finite step since the restore: the restored weights themselves may be damaged (a
                            # checkpoint's data carries no checksum), not "good"
                            before = [s for s in self.ckpt.all_steps() if s < start]
                            where = (f"step {start} in {self.workdir / 'checkpoints'}, which this run resumed from "
                                     "and no step after which was finite: it may be damaged"
                                     + (f" (the one before: step {max(before)})" if before else ""))
                            raise NonFiniteLossError(f"{msg}; last checkpoint: {where}.{hint}")
                        raise NonFiniteLossError(f"{msg}; last good checkpoint: {where}.{hint}")
                    print(f"[train] {msg}; skipped (train.skip_nonfinite)", flush=True)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_second']:.0f}")
                if st.get("skipped_errors", 0) > errors_reported:  # each unreadable record, named (this process's)
                    errors_reported = self._report_skipped_records(step, st["skipped_errors"], errors_reported,
                                                                   fetched.recent_errors, logger)
                if log_now:
                    try:
                        logger.log(step, {k: v for k, v in m.items() if k != "step"})
                    except LogWriteError as e:  # the steps since the last checkpoint are saved first if they can be
                        raise _saved_before_error(self, step, start, e) from None
                    if self.is_main and m.get("data_skipped_too_long", 0) > skipped_reported:
                        skipped_reported = m["data_skipped_too_long"]  # (every process's, at a logged step)
                        # (the count is the data state's, kept across resumes; the breakdown is this start's, and
                        # process 0's)
                        tqdm.write(f"[data] {skipped_reported} samples skipped as too long so far (by task / reason "
                                   f"since this start: {st.get('skipped_by')}); python -m echo4o_jax.data.pack_stats "
                                   "--config ... shows why")
                saved = step % int(c.checkpoint.every) == 0 or step == total or stop["agreed"] is not None
                if saved:
                    self.save(force=True)  # (before the sample grid)
                if int(c.log.sample_every) and (step % int(c.log.sample_every) == 0 or step == total):
                    try:
                        grid = self.sample_grid(step)
                    except Exception:
                        if not saved:  # a failure there loses no step (it lost those since the last checkpoint)
                            self.save(force=True)
                        raise
                    if grid is not None and self.is_main:
                        d = self.workdir / "samples"
                        d.mkdir(exist_ok=True)
                        Image.fromarray(grid).save(d / f"step_{step:07d}.png")
                        logger.image(step, "samples", grid)
                timer.lap()  # a save or a sample grid belongs to no step's time (nor to its tokens/s and MFU)
                # a failed asynchronous save stops the run now (every process at a logged step, when several)
                failure = self._save_failure(block=False) if jax.process_count() == 1 or log_now else None
                if jax.process_count() > 1 and log_now:
                    failure = next((x["f"] for x in _gather_process_states({"f": failure}) if x["f"]), None)
                if failure:
                    raise CheckpointSaveError(failure)
                if saved and stop["agreed"] is None:  # a signal during the save (or the grid): this step's
                    stop["agreed"] = _agreed_stop(stop["signal"])[0]  # checkpoint is the one to stop at
                if stop["agreed"] is not None:  # (before a data failure: the same command meets that again)
                    break
                if failed:
                    e = ahead if isinstance(ahead, Exception) else DataFailedElsewhereError(
                        f"process(es) {failed} could not read their next batch after step {step} (their logs say "
                        "why): this process stops with them")
                    raise _saved_before_error(self, step, start, e, together=True) from None
            failure = self._save_failure(block=True)
            if failure:
                raise CheckpointSaveError(failure)
            return dict(step=step, total=total, history=history, resumed=resumed,
                        stopped_by=stop["agreed"] if step < total else None)
        except BaseException:
            failing = True
            raise
        finally:
            try:
                if bar is not None:
                    bar.close()
                prof.close(failing=failing)
                logger.close()
                failure = self._save_failure(block=True)  # (an error of the run's own is already on its way)
                if failure:
                    print(f"note: {failure}", file=sys.stderr, flush=True)
            finally:  # only now: a signal meanwhile must not cut the last checkpoint's write
                save_reports.remove()
                for s, h in old.items():
                    signal.signal(s, h)


def head_split_notes(cfg: BagelConfig, tensor: int) -> list[str]:
    """Sharding-report lines when `tensor` splits attention heads: the q / k / v widths (heads x head_dim) divide,
    so nothing is replicated, but a device then holds part of a head (the 7B at tensor=8: 3.5 query heads, half a
    KV head) and attention reshards them (slower). Heads for the LLM and the ViT."""
    out = []
    for what, heads in (("LLM query", cfg.llm.num_heads), ("LLM key/value", cfg.llm.num_kv_heads),
                        ("ViT", cfg.vit.num_heads)):
        if tensor > 1 and heads % tensor:
            out.append(f"{what} heads {heads} not divisible by tensor={tensor}: each device holds part of a head "
                       "(attention reshards them: slower); a tensor size that divides the heads keeps them whole")
    return out


_REPLICATED_LIMIT = 1 << 30  # bytes per device of train state left whole by the mesh: more is refused


def _check_replication(abs_params, mesh, report: list[str]) -> None:
    """A ConfigValueError when the widths that `mesh`'s fsdp / tensor do not divide leave more than
    _REPLICATED_LIMIT bytes of train state (weights, EMA, two AdamW moments) whole on every device, naming a
    data x fsdp split of the same devices that shards everything. FSDP over 24, 48 or 96 GPUs (which do not
    divide the 7B's width 3584) kept the whole 14.6B model on each: out of memory during set-up, the sharding
    report (printed later) never seen."""
    leaves = jax.tree.leaves(abs_params)
    total = sum(x.size for x in leaves)
    shape = dict(mesh.shape)
    per_device = shd.elements_per_device(abs_params, shape)
    extra = per_device - total / (shape["fsdp"] * shape["tensor"])
    itemsize = max(np.dtype(x.dtype).itemsize for x in leaves)
    if extra * itemsize * 4 <= _REPLICATED_LIMIT:
        return
    data, fsdp = shd.data_fsdp_split(abs_params, shape["data"] * shape["fsdp"], shape["tensor"])
    split = (f"e.g. --config.mesh.data={data} --config.mesh.fsdp={fsdp}" if fsdp != shape["fsdp"] else
             "no data x fsdp split of these devices holds less")
    count = f"{extra / 1e9:.2f}B" if extra >= 1e8 else f"{extra:,.0f}"
    more = f" (and {len(report) - 1} more)" if len(report) > 1 else ""
    raise ConfigValueError(
        f"mesh data={shape['data']} fsdp={shape['fsdp']} tensor={shape['tensor']} leaves {count} parameters whole "
        f"on every device (widths it does not divide), about {extra * itemsize * 4 / 2**30:.1f} GiB more per device "
        f"with the EMA and AdamW state: {report[0]}{more}. Use a split that divides them ({split}), or "
        "--config.train.allow_replicated=True to run anyway")


def _signalled(stop: dict, wait_s: float = 1.0) -> bool:
    """Whether the run's signal handler has seen a SIGTERM / SIGINT (`stop["signal"]`), waiting up to `wait_s`
    for it: the data workers that the same signal ended may be seen dead before the handler has run."""
    end = time.monotonic() + wait_s
    while stop["signal"] is None and time.monotonic() < end:
        time.sleep(0.05)
    return stop["signal"] is not None


def _saved_before_error(trainer: "Trainer", step: int, start: int, e: Exception, together: bool = False) -> Exception:
    """`e` (a data error at `step`) with the steps this run trained saved first when they can be: on one process,
    or on several when every process calls this `together` (the save is collective: one process alone cannot),
    and when a step was trained since the last checkpoint; the message then says so (for an error that is not
    the data's own, a RuntimeError of a data worker that died, in a note). A corrupt record read after hours of
    training lost them."""
    if (jax.process_count() != 1 and not together) or step <= start or step == trainer.ckpt.latest_step():
        return e
    from ..data.latents import LatentStoreError

    try:  # (a save that fails too is said with the data error, not raised over it as a traceback)
        trainer.save(force=True)
        failed = trainer._save_failure(block=True)
    except CheckpointSaveError as se:
        failed = str(se)
    if failed:
        said = f"[the {step - start} step(s) this run trained could not be saved: {failed}]"
    else:
        fix = "the disk has room" if isinstance(e, LogWriteError) else "the data is fixed"
        said = (f"[the {step - start} step(s) this run trained were saved: checkpoint {step} in "
                f"{trainer.workdir / 'checkpoints'}; the same command resumes from it once {fix}]")
    if not isinstance(e, (RecordError, LatentStoreError, LogWriteError)):
        e.add_note(said)
        return e
    cls = next(c for c in (RecordError, LatentStoreError, LogWriteError) if isinstance(e, c))  # (reported in one line)
    return cls(f"{e} {said}")


def _process_sums(values: list[float], gather: bool) -> dict:
    """{"sum": per value, the sum over the processes, "by_process": [process][value] or None}: gathered from
    every process when `gather` (all must call it at the same step), else this process's values x the process
    count (an estimate: each process reads other packs)."""
    v = np.asarray(values, np.float64)
    if jax.process_count() == 1 or not gather:
        return {"sum": v * jax.process_count(), "by_process": None}
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)
    return {"sum": every.sum(0), "by_process": every.tolist()}


def _check_same_config(config, workdir) -> None:
    """Every process of a multi-host run must run the same config and workdir: a host started with another
    optim.lr trained its copy of the replicated weights apart, another data.seed read overlapping slices; both
    silently. A ConfigValueError naming the processes that differ from process 0 (one process: nothing)."""
    import hashlib

    mine = hashlib.sha256((config.to_json_best_effort(sort_keys=True) + "\0" +
                           os.path.abspath(workdir)).encode()).hexdigest()[:16]
    every = [s["config"] for s in _gather_process_states({"config": mine})]
    other = [i for i, h in enumerate(every) if h != every[0]]
    if other:
        raise ConfigValueError(f"process(es) {other} run another config or workdir than process 0 (config hashes "
                               f"{sorted(set(every))}): every host must run the same command")


def tensor_group_problem(mesh) -> str | None:
    """Why the mesh's tensor groups (the devices that share one (data, fsdp) place, and so one batch row) span
    processes, or None. Each process puts its own packs on its devices' rows; a row shared by two processes got
    two different packs (silently: losses differ by process). `tensor` must divide the devices per process."""
    devs = np.asarray(mesh.devices)
    shared = {(d, f) for d in range(devs.shape[0]) for f in range(devs.shape[1])
              if len({x.process_index for x in devs[d, f, :]}) > 1}
    if not shared:
        return None
    per = max(1, mesh.size // max(1, len({x.process_index for x in devs.flat})))
    return (f"mesh.tensor={devs.shape[2]} spans processes: a tensor group's devices must be one process's (each "
            f"process loads its own packs), and a process has {per} device(s): use a mesh.tensor that divides "
            f"{per}")


def _gather_process_states(state: dict) -> list[dict]:
    """[process]: every process's JSON-able `state` (its data iterator's state, a flag), on every process."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    b = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(b.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:b.size] = b
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(every[i, :n])) for i, n in enumerate(sizes)]


def _agreed_stop(local: int | None, data_failed: bool = False) -> tuple[int | None, list[int]]:
    """(The signal that stops training after this step, the same on every process: a SIGTERM / SIGINT that
    reached any of them (a preemption may signal some hosts only, or a step apart; the save is collective, so
    every process must stop at the same step); the processes whose next batch could not be read (`data_failed`
    on each)). One process: its own signal, and no list (its data error is raised where the batch is taken)."""
    if jax.process_count() == 1:
        return local, []
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.asarray([local or 0, int(data_failed)], np.int32)))
    return int(np.max(got[:, 0])) or None, [int(i) for i in np.flatnonzero(got[:, 1])]


class _StepProfile:
    """`log.profile_start` / `log.profile_steps`: traces those steps into <workdir>/profile/ and prints (main
    process) their device time by named scope (`train.profile`), also written to profile/summary.json."""

    def __init__(self, trainer: "Trainer", start: int, steps: int):
        self.tr, self.start, self.steps = trainer, start, max(int(steps), 1)
        self.dir = trainer.workdir / "profile"
        self.active = False

    def before(self, step: int) -> None:  # `step`: steps done so far
        if self.start > 0 and step == self.start and not self.active:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.active, self.traced = True, 0

    def after(self, step: int) -> bool:
        """Counts a traced step; True when that ended the trace (stopped and summarised now)."""
        if self.active:
            self.traced += 1
            if self.traced == self.steps:
                self.close()
                return True
        return False

    def check_reachable(self, first: int, total: int) -> None:
        """A profile_start this run never reaches (past its steps, or before a resumed run's first step) would
        trace nothing: say so."""
        if self.start > 0 and not first <= self.start < total and self.tr.is_main:
            why = (f"this run starts after step {first}" if self.start < first else f"train.steps is {total}")
            print(f"[profile] log.profile_start={self.start} is never reached ({why}): nothing will be traced",
                  flush=True)

    def close(self, failing: bool = False) -> None:
        """Stops the trace; summarised unless the run is `failing` (then its own error is the one raised: the
        state may be deleted, a donated step having failed, and the trace incomplete)."""
        if not self.active:
            return
        self.active = False
        if failing:
            try:
                jax.profiler.stop_trace()
            except Exception as e:  # (the run's own error is on its way)
                print(f"[profile] stopping the trace failed too: {e}", file=sys.stderr, flush=True)
            else:
                if self.tr.is_main:
                    print(f"[profile] the run failed after {self.traced} traced step(s): partial trace in {self.dir}, "
                          "not summarised", file=sys.stderr, flush=True)
            return
        jax.block_until_ready(self.tr.state)
        jax.profiler.stop_trace()
        if not self.tr.is_main:
            return
        from tqdm import tqdm

        from . import profile as prof

        s = prof.summarize_compiled_trace(self.dir, self.tr._compiled, self.traced)
        (self.dir / "summary.json").write_text(json.dumps(s, indent=1))
        tot = s["device_seconds_per_step"] or 1.0
        a, b = self.start + 1, self.start + self.traced
        # (tqdm.write: on a line of its own, not after the progress bar's)
        tqdm.write(f"[profile] {f'step {a}' if a == b else f'steps {a}-{b}'}, device time per step "
                   f"{s['device_seconds_per_step'] * 1e3:.1f} ms ({s['source']}): "
                   + ", ".join(f"{k} {v / tot:.0%}" for k, v in s["by_scope"].items())
                   + f"; trace and summary.json in {self.dir}")
        if s["note"]:
            tqdm.write(f"[profile] {s['note']}")


class _AbortedRestoreReports(logging.Filter):
    """Silences what an aborted Orbax restore (or save) leaves behind once its error is raised: when one array
    cannot be read (written), the operation's other reads (writes) are abandoned; tensorstore completes them
    into the closed asyncio loop (RuntimeError 'Event loop is closed'), and Orbax's coroutines and futures
    raise again when they are collected, each reported with a traceback of hundreds of lines (thousands in
    all, after the one error line) through sys.unraisablehook or the `asyncio` logger; Orbax's background threads
    log the error itself once more each (`checkpoint.drop_orbax_thread_errors`). `install()` before a
    restore; `remove()` after a successful one (after a failed one the reports come later: it stays). The
    step loop installs one for its saves."""

    def __init__(self):
        super().__init__()
        self.prev_hook = sys.unraisablehook

    @staticmethod
    def _from_orbax(tb) -> bool:
        orbax_dir = f"{os.sep}orbax{os.sep}"
        while tb is not None:
            if orbax_dir in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    def filter(self, record: logging.LogRecord) -> bool:  # the asyncio logger's "exception was never retrieved"
        # (a tensorstore future's error has no Orbax frame: a 3-line report after the one error line)
        return not ((record.exc_info and self._from_orbax(record.exc_info[2]))
                    or "exception was never retrieved" in record.getMessage())

    def unraisablehook(self, unraisable) -> None:
        e = unraisable.exc_value
        closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        if not (closed_loop or self._from_orbax(unraisable.exc_traceback)):
            self.prev_hook(unraisable)

    def install(self) -> None:
        from ..checkpoint import drop_orbax_thread_errors

        sys.unraisablehook = self.unraisablehook
        logging.getLogger("asyncio").addFilter(self)
        logging.getLogger("absl").addFilter(drop_orbax_thread_errors)  # Orbax's threads' own reports

    def remove(self) -> None:
        from ..checkpoint import drop_orbax_thread_errors

        sys.unraisablehook = self.prev_hook
        logging.getLogger("asyncio").removeFilter(self)
        logging.getLogger("absl").removeFilter(drop_orbax_thread_errors)


class _Logger:
    """JSONL log + TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool, tensorboard: bool, start: int = 0):
        """`start`: the step this run starts from; steps after it that log.jsonl already holds (`superseded`:
        [first, last] or None; an earlier run that died after its last checkpoint, or before its first) are
        logged again, and TensorBoard hides their earlier events (`purge_step`)."""
        self.enabled = enabled
        self.path = workdir / "log.jsonl"
        self.superseded = self._steps_after(start) if enabled else None
        self.f = open(self.path, "a") if enabled else None
        if enabled and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            if cut:  # the last line was cut by a hard kill: the next record starts on a line of its own
                self.f.write("\n")
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"),
                                    purge_step=start + 1 if start or self.superseded else None)

    def _steps_after(self, step: int) -> list[int] | None:
        """[first, last] of the steps after `step` in log.jsonl, or None."""
        later = []
        if self.path.is_file():
            with open(self.path) as f:
                for line in f:
                    try:
                        s = json.loads(line).get("step")
                    except (json.JSONDecodeError, AttributeError):
                        continue  # a line cut by a hard kill
                    if isinstance(s, int) and s > step:
                        later.append(s)
        return [min(later), max(later)] if later else None

    def marker(self, step: int, name: str):
        """The "resumed" (from the checkpoint of `step`) or "restarted" (no checkpoint: from the start) marker
        (module docstring), with `superseded_steps` [first, last] when log.jsonl already holds steps after
        `step`, which are logged again below it."""
        self.event(step, name, dict(time=time.time(), **(
            {"superseded_steps": self.superseded} if self.superseded else {})))

    def event(self, step: int, name: str, fields: dict[str, Any]):
        """A `{"step": step, "event": name, ...}` record in log.jsonl only (no TensorBoard scalars)."""
        if self.enabled:
            self._write(json.dumps({"step": step, "event": name, **fields}) + "\n")

    def _write(self, line: str) -> None:
        try:
            self.f.write(line)
            self.f.flush()
        except OSError as e:  # (a full disk: one line, as a failed checkpoint save; not chained tracebacks)
            raise LogWriteError(f"cannot write the training log {self.path}: {e.strerror or e}") from None

    def log(self, step: int, values: dict[str, Any]):
        if not self.enabled:
            return
        rec = {"step": step, **{k: (v if not isinstance(v, (np.floating, np.integer)) else v.item()) for k, v in values.items()}}
        # a non-finite value (a skipped step's loss) is null: bare NaN / Infinity are not JSON (jq and other
        # strict readers refused the whole file)
        rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
        self._write(json.dumps(rec, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), step)

    def image(self, step: int, tag: str, img: np.ndarray):
        if self.tb is not None:
            self.tb.add_image(tag, np.transpose(img, (2, 0, 1)), step)

    def close(self):
        if self.f:
            try:
                self.f.close()
            except OSError:  # (its last write failed: already reported by _write, and what is flushed is kept)
                pass
        if self.tb is not None:
            self.tb.close()
