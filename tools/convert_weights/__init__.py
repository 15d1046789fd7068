"""Weight conversion entry points (run from a checkout):

    python -m tools.convert_weights.to_jax   --src OFFICIAL_DIR --out DIR [--dtype bfloat16|float32]
    python -m tools.convert_weights.to_torch --ckpt DIR [--step N] [--weights ema|params] --out DIR
                                             [--dtype bfloat16|float32] [--max-shard-size SIZE]

The logic lives in `echo4o_jax.convert`; these modules only parse flags and report errors.
"""

from __future__ import annotations

import os
import signal
import sys

# the conversion is host I/O: JAX on the CPU, unless asked otherwise (Orbax's save queries the process index and
# devices, which started the default backend: on a GPU host it took ~75% of the memory of each GPU, beside a
# training job; on a TPU VM another process holds, it failed)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_cli(fn) -> int:
    """Call fn(); a known input error prints one clear message (exit 2); the output folder is untouched."""
    from echo4o_jax.checkpoint import CheckpointError
    from echo4o_jax.config import ConfigError
    from echo4o_jax.model.keymap import CheckpointMismatchError
    from echo4o_jax.interrupts import Terminated, keep_ctrl_c, raise_terminated
    from echo4o_jax.safetensors_io import SafetensorsError

    keep_ctrl_c()
    signal.signal(signal.SIGTERM, raise_terminated)  # as a Ctrl-C: the partial output is removed (it was left)
    try:
        fn()
    except (CheckpointMismatchError, SafetensorsError, ConfigError, CheckpointError, ValueError,
            OSError) as e:  # OSError: a disk that is full or read-only while writing (it names the file)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): nothing was written to the output folder", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0

