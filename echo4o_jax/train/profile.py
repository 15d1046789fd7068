"""Where a compiled step's device time goes, by the model's named scopes.

The model names its parts with `jax.named_scope` (per decoder layer: norm, qkv, rope, attention, o_proj,
mlp; then vit, lm_head_ce, velocity_mse, vae_encode, optimizer). XLA keeps those names in each HLO
instruction's `op_name` metadata, and the profiler (`jax.profiler.trace`, Perfetto JSON) records each
executed op or kernel with its HLO instruction name (`hlo_op`). `hlo_op_scopes` maps instruction names to
op_name paths from the compiled module's text; `summarize_trace` sums a trace's op times per scope.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        ... run n steps of `compiled` ...
    summary = summarize_compiled_trace(log_dir, compiled, steps=n)

Backward ops (op_name under `transpose(`) count towards the scope they differentiate; recomputed
forwards (remat) likewise. Ops outside every named scope are "other" (embeddings, the latent and time
embedders, data movement between the parts).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

__all__ = ["SCOPES", "COMMAND_BUFFER", "hlo_op_scopes", "scope_of", "find_trace", "device_op_events",
           "summarize_trace", "summarize_compiled_trace", "readable_compiler_options", "is_command_buffer"]

# the named scopes of the model and the step
SCOPES = ("attention", "qkv", "rope", "o_proj", "mlp", "norm", "vit", "lm_head_ce", "velocity_mse", "vae_encode",
          "optimizer")

# On a GPU, XLA runs runs of kernels as CUDA graphs ("command buffers"); a trace records each graph as one
# event named after its command buffer, whose kernels, and so their named scopes, it does not show.
COMMAND_BUFFER = "command buffer (unattributed)"
_COMMAND_BUFFER_OP = re.compile(r"^command_buffer")


def is_command_buffer(op: str) -> bool:
    """Whether a trace event's op is a whole command buffer (a CUDA graph of kernels)."""
    return bool(_COMMAND_BUFFER_OP.match(op))


def readable_compiler_options(backend: str) -> dict[str, str]:
    """Compiler options for a step compiled to be traced: on a GPU no command buffers, so that every kernel
    is an event of its own, named by its HLO op (each kernel is then launched alone: maybe slower)."""
    return {"xla_gpu_enable_command_buffer": ""} if backend in ("gpu", "cuda", "rocm") else {}


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONTROL_FLOW = re.compile(r"\s(?:while|conditional|call)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")


def hlo_op_scopes(hlo_text: str) -> dict[str, str | None]:
    """{HLO instruction name: op_name path} of a compiled module's text (`compiled.as_text()`). An
    instruction without metadata takes the op_name of the computation it calls (its root's: a fusion), or
    else of the instruction that calls its own computation (the body of a loop: its while's).
    Control flow (while, conditional, call) maps to None: its time is that of the ops it runs, which the
    trace also records (a CPU trace does; a GPU trace records kernels only)."""
    own: dict[str, str] = {}
    containers: set[str] = set()
    calls: dict[str, list[str]] = {}  # instruction -> computations it calls
    comp_of: dict[str, str] = {}  # instruction -> its computation
    roots: dict[str, str] = {}  # computation -> op_name of its ROOT (or of its first instruction with one)
    comp = None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None:
            c = _COMPUTATION.match(line)
            if c is not None and line.rstrip().endswith("{"):
                comp = c.group(1)
            continue
        name, rest = m.groups()
        head = rest.split(", metadata=")[0]
        if _CONTROL_FLOW.search(head):
            containers.add(name)
        if comp is not None:
            comp_of[name] = comp
        op = _OP_NAME.search(rest)
        if op is not None:
            own[name] = op.group(1)
            if comp is not None and (line.lstrip().startswith("ROOT") or comp not in roots):
                roots[comp] = op.group(1)
        called = _CALLED.findall(head)
        for group in _BRANCHES.findall(head):
            called += [x.strip().lstrip("%") for x in group.split(",")]
        if called:
            calls[name] = called
    caller = {c: name for name, cs in calls.items() for c in cs}

    def resolve(name: str, depth: int = 0) -> str | None:
        if name in own:
            return own[name]
        for c in calls.get(name, ()):
            if c in roots:
                return roots[c]
        up = caller.get(comp_of.get(name, ""))
        return resolve(up, depth + 1) if up is not None and depth < 32 else None

    out: dict[str, str | None] = {}
    for name in set(comp_of) | set(own):
        r = resolve(name)
        if r is not None:
            out[name] = r
    out.update(dict.fromkeys(containers))
    return out


def scope_of(op_name: str) -> str:
    """The outermost of SCOPES that names an element of the `op_name` path ("other" if none): the ViT's own
    attention is "vit", the gradient norm's `jit(norm)` inside "optimizer" is "optimizer"."""
    for part in op_name.split("/"):
        for word in re.findall(r"\w+", part):  # transpose(jvp(mlp)) -> transpose, jvp, mlp
            if word in SCOPES:
                return word
    return "other"


def _scope_of_kernel(name: str) -> str:
    """A kernel or op that the module does not name: our flash kernels by their name, matrix multiplies
    (cuBLAS / CUTLASS / Triton GEMMs) as "gemm (unattributed)", a CUDA graph as COMMAND_BUFFER, the rest
    "other"."""
    if is_command_buffer(name):
        return COMMAND_BUFFER
    if "bagel_flash" in name:
        return "attention"
    if re.search(r"gemm|cublas|cutlass|xmma|matmul", name, re.I):
        return "gemm (unattributed)"
    return "other"


def find_trace(log_dir: str | pathlib.Path) -> pathlib.Path:
    """The newest perfetto_trace.json.gz under a `jax.profiler.trace` log dir."""
    found = sorted(pathlib.Path(log_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir} (jax.profiler.trace with "
                                f"create_perfetto_trace=True)")
    return found[-1]


def device_op_events(trace: dict | list) -> tuple[list[dict], str]:
    """The complete events that are executed HLO ops or kernels (they carry `args.hlo_op`), without the
    double counting of a device's derived lines: on a GPU the kernels of its `Stream` threads, on a TPU
    its "XLA Ops" line, on a CPU the host's XLA threads. -> (events, where they came from)."""
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M"
             and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M"
               and e.get("name") == "thread_name"}
    on_device = [e for e in ev if e.get("ph") == "X" and procs.get(e["pid"], "").startswith("/device:")
                 and not procs.get(e["pid"], "").startswith("/device:CUSTOM")]
    ops = [e for e in ev if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
    dev = [e for e in on_device if (e.get("args") or {}).get("hlo_op")]
    if not dev and on_device:  # kernels without their HLO op: attributed by kernel name (summarize_trace)
        streams = [e for e in on_device if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
        return streams or on_device, "device kernels without hlo_op (attributed by kernel name)"
    if not dev:
        return ops, "host (no device lines in the trace)"
    streams = [e for e in dev if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
    if streams:
        return streams, "device Stream threads (kernels)"
    xla_ops = [e for e in dev if threads.get((e["pid"], e.get("tid")), "") == "XLA Ops"]
    if xla_ops:
        return xla_ops, "device 'XLA Ops' line"
    return dev, "device lines"


def summarize_compiled_trace(log_dir: str | pathlib.Path, compiled, steps: int) -> dict:
    """`summarize_trace` of the newest trace under `log_dir`, its ops named by `compiled`'s module (the
    `jax.stages.Compiled` that ran the `steps` traced steps)."""
    return summarize_trace(find_trace(log_dir), hlo_op_scopes(compiled.as_text()), steps)


def summarize_trace(path: str | pathlib.Path, op_scopes: dict[str, str | None], steps: int, top: int = 12) -> dict:
    """Seconds per step by scope (SCOPES + "other"; op times summed, so overlapping streams add up), the
    top ops, and how many op events had no op_name in the module (`unmapped`, counted as "other", or by
    kernel name). When command buffers hide the scopes of part of the time, `note` says how much and how to
    see them."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events, source = device_op_events(trace)
    by_scope: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    unmapped = 0
    for e in events:
        op = (e.get("args") or {}).get("hlo_op") or e.get("name", "")
        graph = is_command_buffer(op)  # one event for its kernels, whatever the module calls it
        if op in op_scopes and op_scopes[op] is None and not graph:
            continue  # control flow: its ops are events of their own
        name = None if graph else op_scopes.get(op)
        if name is None:
            unmapped += 1
        scope = scope_of(name) if name is not None else _scope_of_kernel(op)
        sec = float(e.get("dur", 0.0)) * 1e-6 / steps  # trace times are microseconds
        by_scope[scope] += sec
        by_op[(op, scope)] += sec
    total = sum(by_scope.values())
    hidden = by_scope.get(COMMAND_BUFFER, 0.0)
    note = (f"{hidden / total:.0%} of the device time ran in XLA command buffers (CUDA graphs), whose kernels and "
            "scopes the trace does not show: trace a step compiled without them (XLA_FLAGS="
            "--xla_gpu_enable_command_buffer= ; train_throughput --profile-steps does this)" if hidden else None)
    return dict(steps=steps, source=source, events=len(events), unmapped_events=unmapped, note=note,
                device_seconds_per_step=total,
                by_scope={k: v for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])},
                top_ops=[[op, scope, sec] for (op, scope), sec in by_op.most_common(top)])
