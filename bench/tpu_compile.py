"""Compile the FULL train step ahead of time for a TPU topology on a CPU-only machine ("TPU without a TPU").

    pip install "jax[tpu]==0.10.2"        # brings libtpu (the TPU compiler); no TPU needed
    JAX_PLATFORMS=cpu python bench/tpu_compile.py --config configs/echo4o_7b.py --topology v5p:4x4x4
        [--set model.remat=full --set mesh.tensor=2 ...] [--no-search] [--all] [--out result.json]

Everything is abstract (`jax.ShapeDtypeStruct` with shardings): params, optimizer state, EMA, VAE, buffers
and the packed batch of the config's budget (`data.packs_per_step=-1` = one pack per data-parallel chip).
No 7B array is ever allocated. The abstract state is built from the same public pieces the `Trainer`
uses (model_config_from, state_shardings, optimizer_from_config, init_train_state, opt_state_shardings,
train_step_from_config).

For each candidate setting (remat policy x mesh), cheapest first, it compiles the step and prints per chip:
argument / output / temporary memory, the total (args + outputs - donated aliases + temps) against the
chip's HBM, headroom and the compiled FLOPs; it stops at the first candidate with >= --headroom (10%) free
HBM and says which one it chose (`--all`: compile every candidate). `--no-search`: only the config as given.

A config with `model.init="checkpoint"` and no `model.ckpt` (configs/echo4o_7b.py) uses the released
BAGEL-7B-MoT geometry (`BagelConfig.bagel_7b_mot`), which is what such a checkpoint holds; every execution
setting (dtypes, remat, attention impl / tuning, train.freeze_und, ...) goes through the Trainer's
`model_config_from`, and the step is `train_step_from_config` with the Trainer's arguments (model.vae_posterior,
train.ce_loss_reweighting, the freeze masks). The abstract batch is the one the config's source yields:
uint8 images for records, float32 for synthetic packs; with `data.vae_latents`, `vae_moments` canvases
instead of pixels (no VAE encoder in the step), of the folder's dtype when it exists here, else
--latents-dtype (default float32).

The search sets model.remat and mesh.* itself (--set of those needs --no-search). Bad arguments or a config
the Trainer would refuse: one `error:` line, exit 2. Exit 1: no candidate fits (or every one failed to
compile: the distinct reasons are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for real TPU hosts; compiling only, several
# processes may load it at once
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from bench_common import UsageError, check_out, usage_error  # noqa: E402  (UsageError: one `error:` line, exit 2)
from train_throughput import apply_override, load_config  # noqa: E402

GiB = 1024**3
# HBM per chip
HBM_BYTES = {"v5p": 95 * GiB, "v6e": 32 * GiB, "v5e": 16 * GiB, "v4": 32 * GiB}
# remat policies from cheapest (recompute nothing) to most memory-saving
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


def chip_hbm(topology: str) -> int:
    try:
        return HBM_BYTES[parse_topology(topology)[0]]
    except UsageError as e:
        raise ValueError(str(e)) from None


def tpu_devices(topology: str):
    """The devices of a TPU topology (needs libtpu: `pip install "jax[tpu]"`), on a machine without TPUs."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    return list(topo.devices)


def released_7b_geometry():
    """`model.geometry` (a ConfigDict) of the released BAGEL-7B-MoT (`BagelConfig.bagel_7b_mot`)."""
    from ml_collections import ConfigDict

    from echo4o_jax.config import BagelConfig

    g = BagelConfig.bagel_7b_mot()
    return ConfigDict(dict(llm=dataclasses.asdict(g.llm), vit=dataclasses.asdict(g.vit), vae=dataclasses.asdict(g.vae),
                           special_tokens=dataclasses.asdict(g.special_tokens), max_latent_size=g.max_latent_size,
                           vit_max_num_patch_per_side=g.vit_max_num_patch_per_side))


def compile_config(config):
    """The config whose step is compiled: `config` itself, or, for `model.init="checkpoint"` without
    `model.ckpt` (configs/echo4o_7b.py), a copy with the released 7B-MoT geometry as `model.geometry` (what
    such a checkpoint holds), so that `model_config_from` applies every execution setting (dtypes, remat,
    attention, freeze_und, ...) exactly as the Trainer does."""
    import copy

    m = config.model
    if m.init != "checkpoint" or m.ckpt:
        return config
    c = copy.deepcopy(config)
    c.model.init = "random"
    c.model.geometry = released_7b_geometry()
    return c


def bagel_config(config):
    """The Trainer's `model_config_from` of `compile_config(config)`."""
    from echo4o_jax.train.trainer import model_config_from

    return model_config_from(compile_config(config))


def latents_dtype(config, given: str | None = None) -> str | None:
    """dtype of the `vae_moments` canvases the records pipeline yields for `data.vae_latents` (None when unset):
    the folder's manifest's when the folder exists (`given`, i.e. --latents-dtype, must then agree), else
    `given` or float32 (`python -m echo4o_jax.data.latents`'s default). ValueError on a mismatch."""
    from echo4o_jax.data.latents import LatentStore

    path = str(config.data.get("vae_latents", "") or "")
    if not path:
        if given:
            raise ValueError(f"--latents-dtype {given} needs data.vae_latents (precomputed latents) to be set")
        return None
    if not os.path.exists(path):
        return given or "float32"
    stored = LatentStore(path).dtype  # LatentStoreError (a ValueError) for a folder that is not one
    if given and given != stored:
        raise ValueError(f"--latents-dtype {given}: data.vae_latents={path!r} holds {stored} moments")
    return stored


def source_image_dtype(config) -> str:
    """dtype of the images the config's batch source yields: the records pipeline's (`PipelineConfig`'s
    default image_dtype, uint8, normalised on device), the synthetic source's float32 (`pack_samples`')."""
    from echo4o_jax.data.pipeline import PipelineConfig

    if config.data.kind == "records":
        return PipelineConfig.__dataclass_fields__["image_dtype"].default
    return "float32"


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(cfg, budget, packs: int, mesh, *, image_dtype: str = "float32", vae_moments: str | None = None):
    """ShapeDtypeStructs of a stacked batch of `packs` packs of `budget`, sharded over (data, fsdp), as the batch
    source yields it: images of `image_dtype`; with `vae_moments` (precomputed latents, a `MOMENT_DTYPES` name)
    `vae_moments` canvases instead of `vae_images` (the step then has no VAE encoder)."""
    import jax
    import numpy as np

    from echo4o_jax import packing
    from echo4o_jax import sharding as shd

    # one empty pack of the budget gives every field's shape and dtype (the images are the largest: a few MB)
    empty = packing.batch_arrays(packing.pack_samples([], cfg, budget, rng=np.random.default_rng(0),
                                                      image_dtype=image_dtype, vae_moments=vae_moments))
    return {k: jax.ShapeDtypeStruct((packs, *v.shape), v.dtype, sharding=shd.batch_sharding(mesh, v.ndim + 1))
            for k, v in empty.items()}


@dataclasses.dataclass
class Built:
    cfg: object
    mesh: object
    packs: int
    vae_moments: str | None  # dtype of the batch's precomputed latents (data.vae_latents), None: pixels
    fn: object  # step(state, vae_state, buffers, batch)
    in_shardings: tuple
    out_shardings: tuple
    args: tuple  # abstract
    sharding_report: list


def build_abstract_step(config, devices, latents: str | None = None) -> Built:
    """The Trainer's state / shardings / step, all abstract, over `devices` (e.g. a TPU topology's).
    `latents`: --latents-dtype (see `latents_dtype`)."""
    import jax
    from flax import nnx

    from echo4o_jax import sharding as shd
    from echo4o_jax.model.bagel import Bagel
    from echo4o_jax.model.vae import AutoEncoder
    from echo4o_jax.train.data_sources import budget_from_config
    from echo4o_jax.train.step import init_train_state
    from echo4o_jax.train.trainer import (check_attention_mesh, opt_state_shardings, optimizer_from_config,
                                          train_step_from_config, validate_config)

    config = compile_config(config)
    validate_config(config)
    cfg = bagel_config(config)
    moments = latents_dtype(config, latents)
    mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor), devices=devices)
    check_attention_mesh(cfg, mesh.shape["tensor"], backend="tpu")  # (the kernel is chosen by the lowering: TPU)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    packs = shd.packs_per_step(int(config.data.packs_per_step), dp)

    abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_buffers = nnx.split(abstract, nnx.Param, ...)
    report: list[str] = []
    param_sh = shd.state_shardings(abs_params, mesh, report)
    buffer_sh = shd.state_shardings(abs_buffers, mesh, report)
    abs_vae = nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))
    vae_graphdef, abs_vae_state = nnx.split(abs_vae)
    vae_sh = shd.state_shardings(abs_vae_state, mesh)

    pdt = jax.numpy.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, pdt if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
                                                         else x.dtype), nnx.to_pure_dict(abs_params))
    buffers = _abstract(nnx.to_pure_dict(abs_buffers), buffer_sh)
    vae_state = _abstract(nnx.to_pure_dict(abs_vae_state), vae_sh)

    t = config.train
    schedule, tx, trainable = optimizer_from_config(config, params)
    abs_state = jax.eval_shape(lambda p: init_train_state(p, tx, int(t.seed)), params)
    opt_sh = opt_state_shardings(abs_state["opt_state"], param_sh, mesh)
    state_sh = dict(params=param_sh, ema=param_sh, opt_state=opt_sh, step=shd.replicated(mesh),
                    rng=shd.replicated(mesh))
    state = _abstract(abs_state, state_sh)
    batch = abstract_batch(cfg, budget_from_config(config.data.budget), packs, mesh,
                           image_dtype=source_image_dtype(config), vae_moments=moments)
    batch_sh = {k: v.sharding for k, v in batch.items()}

    def step(state, vae_state, buffers, batch):
        # buffers travel as an argument (the Trainer closes over concrete ones; here they are abstract)
        fn = train_step_from_config(config, cfg, graphdef, buffers, vae_graphdef, tx, schedule, trainable)
        return fn(state, vae_state, batch)

    return Built(cfg=cfg, mesh=mesh, packs=packs, vae_moments=moments, fn=step, in_shardings=(state_sh, vae_sh, buffer_sh, batch_sh),
                 out_shardings=(state_sh, shd.replicated(mesh)), args=(state, vae_state, buffers, batch),
                 sharding_report=report)


def lower_step(config, devices, latents: str | None = None):
    """(Built, lowered): the abstract train step lowered exactly as `Trainer.compile` does (under `jax.set_mesh`,
    so the model pins its activations' batch axis and runs Pallas kernels per shard)."""
    import jax

    b = build_abstract_step(config, devices, latents)
    jitted = jax.jit(b.fn, in_shardings=b.in_shardings, out_shardings=b.out_shardings, donate_argnums=(0,))
    with jax.set_mesh(b.mesh):
        return b, jitted.lower(*b.args)


def compile_step(config, devices, hbm_bytes: int | None = None, latents: str | None = None) -> dict:
    """Lower + compile the abstract train step (`lower_step`); memory per chip, FLOPs, time."""
    t0 = time.perf_counter()
    b, lowered = lower_step(config, devices, latents)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    g = lambda k: int(getattr(mem, k, 0) or 0)
    arg, out, tmp, alias = (g("argument_size_in_bytes"), g("output_size_in_bytes"), g("temp_size_in_bytes"),
                            g("alias_size_in_bytes"))
    total = arg + out - alias + tmp
    tokens = b.packs * (config.data.budget.text_tokens + config.data.budget.vit_tokens + config.data.budget.vae_tokens)
    res = dict(
        remat=b.cfg.remat, mesh=dict(b.mesh.shape), freeze_und=b.cfg.freeze_und, vae_latents_dtype=b.vae_moments, devices=len(devices), device_kind=devices[0].device_kind,
        packs=b.packs, tokens_per_step=int(tokens),
        argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=tmp,
        generated_code_bytes=g("generated_code_size_in_bytes"), total_bytes=total,
        flops_per_chip=float(cost.get("flops", 0.0)), bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
        lower_seconds=round(t1 - t0, 1), compile_seconds=round(t2 - t1, 1),
        replicated=list(b.sharding_report),  # parameters the mesh axis does not divide (kept whole per chip)
        # Mosaic kernels in the lowered step (pallas_tpu: the attention's forward, dq and dkv per stack of layers;
        # 0 would be the kernel's interpreted emulation, which an earlier version compiled here)
        tpu_custom_calls=lowered.as_text().count("tpu_custom_call"),
    )
    # XLA's cost_analysis counts a while-loop body once (the scanned decoder / ViT layers, the blockwise
    # attention loops): a lower bound. The official formula (train/flops.py) for the same step, with each
    # pack counted as one sample for the attention term (an upper bound on it):
    from echo4o_jax.train import flops as flops_lib

    per_pack = tokens // b.packs
    res["formula_flops_per_chip"] = flops_lib.step_flops(b.cfg.llm, per_pack, [per_pack]) * b.packs / len(devices)
    if hbm_bytes:
        res.update(hbm_bytes=hbm_bytes, headroom=1.0 - total / hbm_bytes)
    return res


def data_fsdp_split(config, n: int) -> tuple[int, int]:
    """`echo4o_jax.sharding.data_fsdp_split` of the config's model over n chips."""
    from flax import nnx

    from echo4o_jax import sharding as shd
    from echo4o_jax.model.bagel import Bagel

    abstract = nnx.eval_shape(lambda: Bagel(bagel_config(config), rngs=nnx.Rngs(0)))
    return shd.data_fsdp_split(nnx.state(abstract, nnx.Param), n, int(config.mesh.tensor))


def candidates(config, n_devices: int, search: bool):
    """(remat, tensor) settings, cheapest first: less recompute before more, pure FSDP before tensor parallel.
    Pure FSDP is tried with every remat policy before any tensor-parallel mesh (FSDP all-gathers overlap;
    tensor parallelism adds per-layer all-reduces of activations)."""
    if not search:
        return [(config.model.remat, int(config.mesh.tensor))]
    out = []
    tensors = [t for t in (1, 2, 4, 8) if n_devices % t == 0]
    for tp in tensors:
        for r in REMAT_ORDER:
            out.append((r, tp))
    return out


def fmt_gib(b: float) -> str:
    return f"{b / GiB:7.2f}"


def print_row(r: dict, file=sys.stdout):
    head = f"{r['headroom'] * 100:6.1f}%" if "headroom" in r else "    n/a"
    print(f"{r['remat']:>13} {r['mesh']['data']:>4} {r['mesh']['fsdp']:>4} {r['mesh']['tensor']:>4} "
          f"{fmt_gib(r['argument_bytes'])} {fmt_gib(r['output_bytes'])} {fmt_gib(r['alias_bytes'])} "
          f"{fmt_gib(r['temp_bytes'])} {fmt_gib(r['total_bytes'])} {head} {r['flops_per_chip'] / 1e12:9.1f} "
          f"{r['compile_seconds']:8.1f} {r.get('formula_flops_per_chip', 0) / 1e12:9.1f}", file=file, flush=True)


HEADER = (f"{'remat':>13} {'data':>4} {'fsdp':>4} {'tp':>4} {'arg GiB':>7} {'out GiB':>7} {'alias':>7} "
          f"{'temp GiB':>7} {'total':>7} {'headroom':>7} {'TFLOP/chip':>9} {'compile s':>8} {'formulaTF':>9}")
# TFLOP/chip: compiled (cost_analysis; loop bodies counted once, so a lower bound for scanned layers);
# formulaTF: official MFU formula per chip (6 x active params x tokens + attention, pack = one sample)


SEARCHED_KEYS = ("model.remat", "mesh.data", "mesh.fsdp", "mesh.tensor")  # set by the search itself


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """("v5p", (2, 2, 1)) of "v5p:2x2x1"; UsageError for a malformed name or an unknown generation."""
    gen, sep, dims = topology.partition(":")
    gen = gen.lower()
    if not sep or not dims or not all(d.isdigit() and int(d) > 0 for d in dims.split("x")):
        raise UsageError(f"--topology {topology!r}: expected GENERATION:AxB[xC] with positive sizes, e.g. v5p:2x2x1")
    if gen not in HBM_BYTES:
        raise UsageError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: {', '.join(sorted(HBM_BYTES))}")
    return gen, tuple(int(d) for d in dims.split("x"))


def check_args(args) -> None:
    """Everything about the arguments that can be checked before a config is loaded or libtpu asked."""
    parse_topology(args.topology)
    if not 0.0 <= args.headroom < 1.0:
        raise UsageError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
    remats = [x for x in args.remat.split(",") if x]
    bad = [x for x in remats if x not in REMAT_ORDER]
    if bad or (args.remat and not remats):
        raise UsageError(f"--remat {args.remat!r}: expected a comma list of {', '.join(REMAT_ORDER)}")
    tensors = [x for x in args.tensor.split(",") if x]
    if (args.tensor and not tensors) or not all(x.isdigit() and int(x) > 0 for x in tensors):
        raise UsageError(f"--tensor {args.tensor!r}: expected a comma list of positive integers")
    if args.no_search and (remats or tensors):
        raise UsageError("--remat / --tensor restrict the search; with --no-search set them in the config "
                         "(--set model.remat=... --set mesh.tensor=...)")
    if args.no_search and args.all:
        raise UsageError("--all compiles every searched candidate; with --no-search there is one")
    check_out("--out", args.out)
    for kv in args.set:
        if "=" not in kv:
            raise UsageError(f"--set {kv!r}: expected key=value")
        if not args.no_search and kv.split("=", 1)[0] in SEARCHED_KEYS:
            raise UsageError(f"--set {kv}: the search sets {', '.join(SEARCHED_KEYS)} itself; add --no-search to "
                             "compile the config as given, or restrict the search with --remat / --tensor")


def load(args):
    """The config with the overrides applied, checked as the Trainer checks it (UsageError if it is refused)."""
    from echo4o_jax.train.trainer import ConfigValueError

    if not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config}: no such file")
    c = load_config(args.config)
    for kv in args.set:
        try:
            apply_override(c, kv)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        bagel_config(c)  # validate_config's checks run with the step's build; the model's here, up front
        latents_dtype(c, args.latents_dtype or None)
    except ValueError as e:  # ConfigValueError, LatentStoreError, a --latents-dtype mismatch
        raise UsageError(str(e)) from None
    from echo4o_jax.train.trainer import validate_config

    try:
        validate_config(compile_config(c))
    except ConfigValueError as e:
        raise UsageError(str(e)) from None
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v6e:16x16, v5e:16x16, v5p:2x2x1")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeat)")
    ap.add_argument("--headroom", type=float, default=0.10, help="required free HBM fraction (default 0.10)")
    ap.add_argument("--no-search", action="store_true", help="compile the config's remat / mesh only")
    ap.add_argument("--all", action="store_true", help="compile every candidate instead of stopping at the first fit")
    ap.add_argument("--remat", default="", help=f"comma list restricting the remat candidates ({', '.join(REMAT_ORDER)})")
    ap.add_argument("--tensor", default="", help="comma list restricting the tensor-parallel candidates")
    ap.add_argument("--latents-dtype", default="", choices=("", "float32", "bfloat16"),
                    help="with data.vae_latents: dtype of the precomputed moments when that folder does not exist "
                         "here (default float32, the latents tool's default; an existing folder's manifest decides)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:
        check_args(args)
        c = load(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    hbm = chip_hbm(args.topology)
    t0 = time.perf_counter()
    try:
        devices = tpu_devices(args.topology)
    except Exception as e:  # noqa: BLE001 - no libtpu, or a topology libtpu cannot describe
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        import importlib.util

        hint = "" if importlib.util.find_spec("libtpu") else "; libtpu is not installed: pip install -e '.[tpu]'"
        print(f"error: --topology {args.topology}: libtpu cannot describe it ({type(e).__name__}: {msg}){hint}",
              file=sys.stderr)
        return 2
    print(f"[tpu_compile] {args.topology}: {len(devices)} x {devices[0].device_kind}, HBM {hbm / GiB:.0f} GiB/chip "
          f"(topology {time.perf_counter() - t0:.1f}s; jax {jax.__version__})", flush=True)
    if c.model.init == "checkpoint" and not c.model.ckpt:
        print("[tpu_compile] model.init='checkpoint' without model.ckpt: the released BAGEL-7B-MoT geometry",
              flush=True)
    moments = latents_dtype(c, args.latents_dtype or None)
    if moments:
        print(f"[tpu_compile] data.vae_latents: batches carry {moments} posterior moments (no VAE encoder in the "
              "step)", flush=True)
    cand = candidates(c, len(devices), not args.no_search)
    if args.remat:
        cand = [x for x in cand if x[0] in args.remat.split(",")]
    if args.tensor:
        cand = [x for x in cand if str(x[1]) in args.tensor.split(",")]
    if not cand:
        print(f"error: --tensor {args.tensor}: no candidate; the search tries tensor sizes 1, 2, 4, 8 that divide "
              f"the {len(devices)} chips", file=sys.stderr)
        return 2
    from echo4o_jax import sharding as shd

    if args.no_search:  # the config's own mesh must span the chips (the search makes its own): not a compile error
        try:
            shd.make_mesh(int(c.mesh.data), int(c.mesh.fsdp), int(c.mesh.tensor), devices=devices)
        except ValueError as e:
            return usage_error(f"--topology {args.topology} has {len(devices)} chips: {e}")
    packs = int(c.data.packs_per_step)

    def packs_fit(tp: int) -> bool:  # the mesh spans every chip: data x fsdp = chips / tensor
        try:
            shd.packs_per_step(packs, len(devices) // tp)
        except ValueError:
            return False
        return True

    fits = [x for x in cand if packs_fit(x[1])]
    if not fits:
        print(f"error: data.packs_per_step={packs} must be a multiple of data x fsdp (= {len(devices)} chips / "
              f"tensor: {', '.join(str(len(devices) // t) for t in sorted({t for _, t in cand}))} here); set it to "
              "-1 (one pack per data-parallel chip) or a multiple", file=sys.stderr)
        return 2
    if len(fits) < len(cand):
        print(f"[tpu_compile] skipped tensor={sorted({t for _, t in cand} - {t for _, t in fits})}: data x fsdp "
              f"would not divide data.packs_per_step={packs}", flush=True)
    cand = fits
    if not args.no_search:  # a tensor size the attention kernel cannot split its heads over: not searched
        from echo4o_jax.model.attention import kernel_heads_problem

        mc = bagel_config(c)
        heads = {"LLM": mc.llm.num_kv_heads, "ViT": mc.vit.num_heads}
        wasteful = sorted({t for _, t in cand if kernel_heads_problem(mc.attention_impl, heads, t)})
        if wasteful and len(wasteful) < len({t for _, t in cand}):
            why = kernel_heads_problem(mc.attention_impl, heads, wasteful[0])
            print(f"[tpu_compile] skipped tensor={wasteful}: {why}", flush=True)
            cand = [x for x in cand if x[1] not in wasteful]
    results, chosen = [], None
    print(HEADER, flush=True)
    for remat, tp in cand:
        c.model.remat = remat
        c.mesh.tensor = tp
        if not args.no_search:  # everything not tensor-parallel: FSDP, with data parallelism only where a
            c.mesh.data, c.mesh.fsdp = data_fsdp_split(c, len(devices) // tp)  # smaller group shards more
        try:
            r = compile_step(c, devices, hbm, args.latents_dtype or None)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{remat:>13} tensor={tp}: FAILED {msg}", flush=True)
            results.append(dict(remat=remat, tensor=tp, error=msg))
            continue
        results.append(r)
        print_row(r)
        if r["replicated"]:
            print(f"{'':>13} {len(r['replicated'])} parameters replicated (dims not divisible by the mesh axis), "
                  f"e.g. {r['replicated'][0]}", flush=True)
        if chosen is None and r["headroom"] >= args.headroom:
            chosen = r
            if not args.all:
                break
    best = chosen
    failed = [r for r in results if "error" in r]
    if best is not None:
        m = best["mesh"]
        print(f"[tpu_compile] chosen: model.remat={best['remat']} mesh=(data={m['data']}, fsdp={m['fsdp']}, "
              f"tensor={m['tensor']}): {best['total_bytes'] / GiB:.2f} of {hbm / GiB:.0f} GiB per chip, "
              f"headroom {best['headroom'] * 100:.1f}% (>= {args.headroom * 100:.0f}%), "
              f"{best['packs']} packs x {best['tokens_per_step'] // best['packs']} tokens/step, "
              f"{best['flops_per_chip'] / 1e12:.1f} TFLOP/chip/step (compiled), compile {best['compile_seconds']:.0f}s",
              flush=True)
    elif len(failed) == len(results):
        reasons = sorted({r["error"] for r in failed})
        print(f"[tpu_compile] every candidate ({len(failed)}) failed to compile; "
              f"{len(reasons)} distinct reason{'s' if len(reasons) > 1 else ''}:", flush=True)
        for why in reasons:
            print(f"  {why}", flush=True)
    else:
        print(f"[tpu_compile] no candidate fits with >= {args.headroom * 100:.0f}% headroom"
              + (f" ({len(failed)} of {len(results)} failed to compile)" if failed else ""), flush=True)
    out = dict(config=args.config, topology=args.topology, overrides=args.set, hbm_bytes=hbm,
               headroom_required=args.headroom, search=dict(searched=not args.no_search, all=args.all,
                                                            remat=args.remat or None, tensor=args.tensor or None),
               latents_dtype=args.latents_dtype or None, results=results, chosen=best)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
