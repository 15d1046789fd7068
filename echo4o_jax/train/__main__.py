"""python -m echo4o_jax.train --config configs/<name>.py [--config.key=value ...] --workdir DIR

Multi-host: launch the same command on every host; `jax.distributed.initialize()` runs when the
environment says so (TPU pod slices; GPU clusters with SLURM or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), or with --config.multihost=True.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and samples go (re-use to resume)")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
        return 2
    workdir = _WORKDIR.value or config.get("workdir", "")
    if not workdir:
        print("error: --workdir is required (or set config.workdir)", file=sys.stderr)
        return 2
    return run(config, workdir)


def run(config, workdir: str) -> int:
    """Train (or resume) in `workdir`; bad input (config, checkpoint, records, precomputed latents) is one
    `error:` line and exit status 2, a non-finite loss 3 (the last good checkpoint is kept)."""
    from ..checkpoint import CheckpointError
    from ..data.latents import LatentStoreError
    from ..data.records import RecordError
    from .trainer import ConfigValueError, NonFiniteLossError, Trainer

    try:
        trainer = Trainer(config, workdir)
        out = trainer.run()
    except ConfigValueError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, RecordError, LatentStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    hist = out["history"]
    if hist:
        print(f"[train] step {out['step']}: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
              f"({len(hist)} steps this run); workdir {workdir}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
