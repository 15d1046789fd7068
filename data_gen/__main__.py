"""``python -m data_gen <surreal|multiref|instruction> --out DIR --limit N ...`` from a checkout.

A thin entry point: the logic lives in :mod:`echo4o_jax.synth` (see :mod:`echo4o_jax.synth.cli`).
"""

import os
import sys

if __package__ in (None, ""):  # `python data_gen` / `python data_gen/__main__.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from echo4o_jax.synth.cli import main  # noqa: E402

sys.exit(main())
