"""python -m echo4o_jax.train --config configs/<name>.py [--config.key=value ...] --workdir DIR

Multi-host: launch the same command on every host; `jax.distributed.initialize()` runs when the
environment says so (TPU pod slices; GPU clusters with SLURM or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), or with --config.multihost=True.

Rerunning the command on the same workdir resumes from its latest checkpoint (see `trainer`: what may
change on resume). Exit status:

    0    trained to train.steps (or the workdir was already there: it says so)
    2    bad input, one `error:` line: an unknown flag or config key, a bad value, a workdir of another
         model geometry, an unreadable checkpoint, records, precomputed latents; or a checkpoint that could
         not be written (a full disk: training stops at once, naming the last complete checkpoint)
    3    non-finite loss (the last good checkpoint is kept)
    128 + N   stopped by signal N (130: SIGINT, 143: SIGTERM) after finishing and saving the current
         step; rerun the same command to resume. A Ctrl-C before the first step (model set-up, restore, compile) ends
         the process at once with 130 and one line (nothing of this run was trained or saved); a SIGTERM to the
         process group while the first batch is read (it ends the data workers too) exits 143 with one line
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from ..interrupts import end_now, keep_ctrl_c
from .config_cli import EXIT_BAD_INPUT, bad_input, flags_parser, run_reporting_bad_input

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and samples go (re-use to resume)")

EXIT_NONFINITE = 3
# a Ctrl-C before the step loop's own handler is installed ends the process without the interpreter's teardown
# (`end_now`: with an XLA compilation in flight, the teardown can crash)
_hard_exit = end_now


def main(argv):
    del argv
    keep_ctrl_c()
    config = _CONFIG.value
    if config is None:
        bad_input("--config is required, e.g. --config configs/demo.py")
    workdir = _WORKDIR.value or config.get("workdir", "")
    if not workdir:
        bad_input("--workdir is required (or set config.workdir)")
    return run(config, workdir)


def run(config, workdir: str) -> int:
    """Train (or resume) in `workdir`; the exit status of the module docstring."""
    from .trainer import CheckpointSaveError, NonFiniteLossError, Trainer

    out = {}

    def train() -> int:
        try:
            out.update(Trainer(config, workdir).run())
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        except CheckpointSaveError as e:  # ended at once: the failed save's threads would report again at exit
            print(f"error: {e}", file=sys.stderr)
            _hard_exit(EXIT_BAD_INPUT)
        return 0

    try:
        rc = run_reporting_bad_input(train)  # bad input: one error line, EXIT_BAD_INPUT
    except KeyboardInterrupt:  # the step loop stops on SIGINT itself: this is set-up or restore, nothing is written
        if out:  # (after training: the run has returned, everything is written)
            raise
        print(f"\n[train] interrupted (SIGINT) before the first step of this run started (setting up, restoring "
              f"or compiling): nothing was trained or saved; rerun the same command to start or resume "
              f"(workdir {workdir})",
              file=sys.stderr, flush=True)
        _hard_exit(128 + signal.SIGINT)
    if not out:
        return rc
    step, total, hist = out["step"], out["total"], out["history"]
    if out["stopped_by"] is not None:
        sig = out["stopped_by"]
        if not hist:  # (the data workers ended with the signal before the first batch)
            print(f"[train] stopped by {signal.Signals(sig).name} at step {step} of {total} before this run trained a "
                  f"step: nothing new to save; rerun the same command to start or resume (workdir {workdir})",
                  flush=True)
            return 128 + sig
        print(f"[train] stopped by {signal.Signals(sig).name} at step {step} of {total} (checkpoint saved); "
              f"rerun the same command to resume (workdir {workdir})", flush=True)
        return 128 + sig
    if not hist:
        cosine = ("; under optim.schedule=cosine it stretches the decay, so the learning rate rises again"
                  if config.optim.schedule == "cosine" else "")
        print(f"[train] already complete: workdir {workdir} is at step {step} (train.steps={total}); nothing to "
              f"train (a larger --config.train.steps trains further{cosine})")
        return 0
    print(f"[train] step {step}: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
          f"({len(hist)} step{'s' if len(hist) != 1 else ''} this run); workdir {workdir}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser(_CONFIG))
