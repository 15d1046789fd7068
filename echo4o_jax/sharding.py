"""One mesh (data, fsdp, tensor) and one table of logical-axis rules.

Every parameter carries `logical_axes` metadata (see `model.layers.param`); `LOGICAL_RULES` maps
each logical name to a mesh axis (or None = replicated). A dimension that the mesh axis does not
divide is replicated instead (reported by `param_shardings(..., report=...)`). Batches are sharded
over (data, fsdp) on their leading axis.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["MESH_AXES", "LOGICAL_RULES", "make_mesh", "packs_per_step", "logical_to_spec", "state_shardings",
           "elements_per_device", "batch_sharding", "replicated", "maybe_initialize_distributed"]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis. Keep this the one table (<= ~20 names).
LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,       # scanned layer axis
    "embed": "fsdp",      # LLM hidden (weights' input side)
    "embed_out": "tensor",  # LLM hidden on the output side of square matmuls (connector, time MLP)
    "q_heads": "tensor",  # num_heads * head_dim
    "kv_heads": "tensor",  # num_kv_heads * head_dim
    "head_dim": None,
    "mlp": "tensor",      # intermediate size
    "vocab": "tensor",
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    "patch": None,
}


def packs_per_step(packs: int, data_parallel: int) -> int:
    """The packs of a step: `packs` (data.packs_per_step; -1 = one per data-parallel device), which must be a
    multiple of data x fsdp = `data_parallel` (ValueError naming both)."""
    packs = data_parallel if packs == -1 else packs
    if packs % data_parallel:
        raise ValueError(f"data.packs_per_step={packs} must be a multiple of data x fsdp = {data_parallel}")
    return packs


def maybe_initialize_distributed(force: bool = False) -> None:
    """`jax.distributed.initialize()` on multi-host launches (TPU pod slices set their own env;
    GPU clusters: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or SLURM)."""
    import os

    multi = force or any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                                     "MEGASCALE_COORDINATOR_ADDRESS"))
    if multi and not jax.distributed.is_initialized():
        # jax reads JAX_COORDINATOR_ADDRESS itself, but not the process count / id (only cluster detection)
        kw = {k: int(os.environ[e]) for k, e in (("num_processes", "JAX_NUM_PROCESSES"),
                                                 ("process_id", "JAX_PROCESS_ID")) if e in os.environ}
        jax.distributed.initialize(**kw)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one of the sizes may be -1 (= what is left)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} spans {math.prod(sizes)} devices; it must span all "
                         f"{n} (the product of the sizes; one of them may be -1: what is left)")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES, report: list | None = None, name: str = "") -> P:
    if not axes:
        return P()
    out, used = [], set()
    for dim, ax in zip(shape, axes):
        m = rules.get(ax) if ax is not None else None
        if ax is not None and ax not in rules:
            raise KeyError(f"logical axis {ax!r} of {name} has no sharding rule")
        if m is None or m in used or mesh.shape[m] == 1:
            out.append(None)
            continue
        if dim % mesh.shape[m]:
            if report is not None:
                report.append(f"{name}: dim {dim} ({ax}) not divisible by {m}={mesh.shape[m]}: replicated")
            out.append(None)
            continue
        out.append(m)
        used.add(m)
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, report: list | None = None) -> Any:
    """NamedShardings for every variable of an NNX state (same tree structure, as a pure dict)."""
    def one(path, var):
        axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
        shape = var.shape if hasattr(var, "shape") else np.shape(var[...])
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, report=report, name="/".join(map(str, path))))

    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = one(path, var)
    return out


def elements_per_device(state: nnx.State, mesh_shape: Mapping[str, int]) -> int:
    """Elements of `state` (abstract or concrete) one device holds under a mesh of `mesh_shape` (axis -> size)
    with `LOGICAL_RULES`; dims the mesh axis does not divide count whole (they are replicated). Compares
    mesh shapes without devices, e.g. FSDP over 256 chips vs (data 2, fsdp 128)."""
    class _Shape:  # logical_to_spec only reads `.shape`
        shape = dict(mesh_shape)

    total = 0
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
        shape = tuple(var.shape)
        spec = logical_to_spec(axes, shape, _Shape, name="/".join(map(str, path)))
        n = 1
        for dim, m in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            n *= dim // (mesh_shape[m] if m else 1)
        total += n
    return total


def data_fsdp_split(state: nnx.State, n: int, tensor: int = 1) -> tuple[int, int]:
    """(data, fsdp) with data x fsdp = n holding the fewest elements of `state` per device, the largest FSDP
    group on ties. FSDP over every device replicates parameters whose dims that size does not divide (256
    chips: the SigLIP ViT, 1152 / 4304 wide; 24 GPUs: the whole 7B LLM, 3584 wide); a smaller FSDP group with
    data parallelism over the rest shards them."""
    best = None
    for fsdp in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        e = elements_per_device(state, dict(data=n // fsdp, fsdp=fsdp, tensor=tensor))
        if best is None or e < best[0]:
            best = (e, n // fsdp, fsdp)
    return best[1], best[2]


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(tree, shardings):
    """Place values that every process holds alike (a loaded or seeded model, a restored step counter) with
    `shardings`, which may span several processes: each process fills only its own shards, from a host copy,
    with no collective. (`jax.device_put` of an array committed to a local device onto a multi-process
    sharding made arrays that Orbax could not save; of a host array, it first all-gathers the whole value
    onto every device to check that the processes agree: a copy per process of each leaf.)"""
    def one(x, s):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)
