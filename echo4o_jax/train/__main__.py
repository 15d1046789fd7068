"""python -m echo4o_jax.train --config configs/<name>.py [--config.key=value ...] --workdir DIR

Multi-host: launch the same command on every host; `jax.distributed.initialize()` runs when the
environment says so (TPU pod slices; GPU clusters with SLURM or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), or with --config.multihost=True.

Rerunning the command on the same workdir resumes from its latest checkpoint (see `trainer`: what may
change on resume). Exit status:

    0    trained to train.steps (or the workdir was already there: it says so)
    2    bad input, one `error:` line: an unknown flag or config key, a bad value, a workdir of another
         model geometry, an unreadable checkpoint, records, precomputed latents
    3    non-finite loss (the last good checkpoint is kept)
    128 + N   stopped by signal N (130: SIGINT, 143: SIGTERM) after finishing and saving the current
         step; rerun the same command to resume
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys

from absl import app, flags
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and samples go (re-use to resume)")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _config_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config file, the --config.<key> override keys) of a command line."""
    path, keys = None, []
    for i, a in enumerate(argv):
        m = re.match(r"^--?config(?:=(.*))?$", a)
        if m:
            path = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
        m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
        if m:
            keys.append(m.group(1))
    return path, keys


def unknown_config_key(config: ConfigDict, key: str) -> str | None:
    """Why the override `key` ('train.steps') names no field of `config` (with the closest field name when
    there is one), or None when it does."""
    node, done = config, []
    for part in key.split("."):
        if not isinstance(node, ConfigDict):
            return f"unknown config key {key}: {'.'.join(done)} is a value, not a group of keys"
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            hint = f" (did you mean {'.'.join(done + [close[0]])}?)" if close else ""
            return f"unknown config key {key}{hint}"
        node, done = node[part], done + [part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors (unknown flags, bad values, config keys the config lacks) as one
    `error:` line and exit status 2."""
    def fail(msg: str):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    path, keys = _config_args(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        fail(f"--config {path}: no such file")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError):  # ml_collections, on an override of a key the config lacks
        config = flags.FLAGS[_CONFIG.name].parser.parse(path) if path is not None else None
        why = next((w for w in (unknown_config_key(config, k) for k in keys) if w), None) \
            if isinstance(config, ConfigDict) else None
        if why is None:
            raise
        fail(why)


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
        return EXIT_BAD_INPUT
    workdir = _WORKDIR.value or config.get("workdir", "")
    if not workdir:
        print("error: --workdir is required (or set config.workdir)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(config, workdir)


def run(config, workdir: str) -> int:
    """Train (or resume) in `workdir`; the exit status of the module docstring."""
    from ..checkpoint import CheckpointError
    from ..data.latents import LatentStoreError
    from ..data.records import RecordError
    from .trainer import ConfigValueError, NonFiniteLossError, Trainer

    try:
        trainer = Trainer(config, workdir)
        out = trainer.run()
    except ConfigValueError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (CheckpointError, RecordError, LatentStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    step, total, hist = out["step"], out["total"], out["history"]
    if out["stopped_by"] is not None:
        sig = out["stopped_by"]
        print(f"[train] stopped by {signal.Signals(sig).name} at step {step} of {total} (checkpoint saved); "
              f"rerun the same command to resume (workdir {workdir})", flush=True)
        return 128 + sig
    if not hist:
        print(f"[train] already complete: workdir {workdir} is at step {step} (train.steps={total}); nothing to "
              "train (a larger --config.train.steps trains further)")
        return 0
    print(f"[train] step {step}: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
          f"({len(hist)} steps this run); workdir {workdir}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
