"""The step profile's parts (echo4o_jax.train.profile) on hand-made inputs: HLO instruction names to the
model's named scopes, and which trace events count as device time (a GPU trace's kernels, not its derived
lines). The end-to-end run on a real trace is in test_bench_scripts."""

from __future__ import annotations

import gzip
import json

from echo4o_jax.train import profile as prof

HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_mlp (p: bf16[8,16]) -> bf16[8,16] {
  %p = bf16[8,16]{1,0} parameter(0)
  ROOT %m = bf16[8,16]{1,0} multiply(%p, %p), metadata={op_name="jit(step)/while/body/checkpoint/mlp/mul"}
}

%body (arg: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %arg = (s32[], bf16[8,16]) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%arg), index=1
  %dot.7 = bf16[8,16]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %fusion.3 = bf16[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_mlp
  %attn = bf16[8,16]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(jvp(while))/body/attention/pallas_call"}
  ROOT %t = (s32[], bf16[8,16]) tuple(%i, %fusion.3), metadata={op_name="jit(step)/while/body"}
}

%cond (arg: (s32[], bf16[8,16])) -> pred[] {
  %arg = (s32[], bf16[8,16]) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %while.1 = (s32[], bf16[8,16]) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/while"}
  ROOT %adam = f32[4]{0} add(%a, %a), metadata={op_name="jit(step)/optimizer/add"}
}
"""


def test_hlo_instruction_names_map_to_named_scopes():
    sc = prof.hlo_op_scopes(HLO)
    assert sc["while.1"] is None  # control flow: its time is that of the ops it runs
    assert prof.scope_of(sc["fusion.3"]) == "mlp"  # no metadata of its own: its fused root's
    assert prof.scope_of(sc["attn"]) == "attention"  # backward (transpose) counts towards its scope
    assert prof.scope_of(sc["adam"]) == "optimizer"
    assert sc["dot.7"] == "jit(step)/while"  # no metadata, calls nothing: its loop's
    assert prof.scope_of(sc["dot.7"]) == "other"
    assert prof.scope_of("jit(step)/transpose(jvp(mlp))/dot_general") == "mlp"
    assert prof.scope_of("jit(step)/rms_norm_like/normalize") == "other"  # whole words only
    assert prof.scope_of("jit(step)/optimizer/jit(norm)/reduce_sum") == "optimizer"  # the outermost scope
    assert prof.scope_of("jit(step)/vit/attention/dot_general") == "vit"


def _trace(tmp_path, events):
    meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
            dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #7(Compute)")),
            dict(ph="M", pid=1, tid=9, name="thread_name", args=dict(name="XLA Ops")),
            dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU")),
            dict(ph="M", pid=2, tid=1, name="thread_name", args=dict(name="python"))]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(dict(traceEvents=meta + events), f)
    return path


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
    def ev(tid, op, dur, pid=1):
        return dict(ph="X", pid=pid, tid=tid, name=f"kernel_{op}", ts=0, dur=dur, args=dict(hlo_op=op))

    events = [ev(7, "fusion.3", 300.0), ev(7, "attn", 500.0), ev(7, "attn", 100.0), ev(7, "adam", 50.0),
              ev(7, "dot.7", 40.0), ev(7, "unknown.1", 10.0), ev(7, "while.1", 5000.0),
              ev(9, "attn", 600.0), ev(9, "fusion.3", 300.0),  # the derived per-op line: not counted again
              ev(1, "adam", 999.0, pid=2)]  # host work: not device time
    s = prof.summarize_trace(_trace(tmp_path, events), prof.hlo_op_scopes(HLO), steps=2)
    assert s["source"].startswith("device Stream") and s["events"] == 7
    ms = {k: round(v * 1e3, 6) for k, v in s["by_scope"].items()}
    assert ms == {"attention": 0.3, "mlp": 0.15, "optimizer": 0.025, "other": 0.025}
    assert abs(s["device_seconds_per_step"] - 0.0005) < 1e-12
    assert s["unmapped_events"] == 1 and s["top_ops"][0][:2] == ["attn", "attention"]
    assert prof.find_trace(tmp_path) == tmp_path / "perfetto_trace.json.gz"


def test_gpu_trace_without_hlo_ops_is_attributed_by_kernel_name(tmp_path):
    def ev(name, dur):
        return dict(ph="X", pid=1, tid=7, name=name, ts=0, dur=dur, args=dict(correlation_id=1))

    events = [ev("bagel_flash_dkv", 400.0), ev("sm90_xmma_gemm_bf16bf16_bf16f32", 300.0), ev("fusion.3", 100.0),
              ev("loop_multiply_fusion_2", 50.0)]
    s = prof.summarize_trace(_trace(tmp_path, events), prof.hlo_op_scopes(HLO), steps=1)
    assert s["source"].startswith("device kernels without hlo_op")
    ms = {k: round(v * 1e3, 6) for k, v in s["by_scope"].items()}
    assert ms == {"attention": 0.4, "gemm (unattributed)": 0.3, "mlp": 0.1, "other": 0.05}


def test_command_buffer_time_is_named_and_explained(tmp_path):
    """A GPU step's CUDA graphs are one event each, with the command buffer's name as their op (the module
    may call it a `call`): their time is counted, as COMMAND_BUFFER, and the summary says how to see it."""
    def ev(op, dur):
        return dict(ph="X", pid=1, tid=7, name=op, ts=0, dur=dur, args=dict(hlo_op=op))

    hlo = HLO.replace("  ROOT %adam", "  %command_buffer_5 = f32[4]{0} call(%a), to_apply=%body\n  ROOT %adam")
    sc = prof.hlo_op_scopes(hlo)
    assert "command_buffer_5" in sc and sc["command_buffer_5"] is None  # a container to the module
    events = [ev("command_buffer_5", 600.0), ev("command_buffer_633", 200.0), ev("fusion.3", 200.0)]
    s = prof.summarize_trace(_trace(tmp_path, events), sc, steps=1)
    ms = {k: round(v * 1e3, 6) for k, v in s["by_scope"].items()}
    assert ms == {prof.COMMAND_BUFFER: 0.8, "mlp": 0.2}
    assert s["note"].startswith("80% of the device time ran in XLA command buffers")
    assert "--xla_gpu_enable_command_buffer=" in s["note"]
    s = prof.summarize_trace(_trace(tmp_path, [ev("fusion.3", 200.0)]), sc, steps=1)
    assert s["note"] is None
