"""Shared test fixtures.

Golden folders (recorded from the official PyTorch BAGEL) come from ECHO4O_GOLDEN_DIRS
(os.pathsep-separated); by default the bundled copy tests/golden/bagel_tiny_a. Every size is read
from the folder's configs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_GOLDEN = HERE / "golden" / "bagel_tiny_a"
SHARED_BENCHMARKS = HERE.parent.parent / "shared" / "benchmarks"


def load_file(path: pathlib.Path, name: str):
    """Import a file that is not part of a package (bench/*.py, configs/*.py) as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def golden_dirs() -> list[pathlib.Path]:
    env = os.environ.get("ECHO4O_GOLDEN_DIRS")
    if env:
        dirs = [pathlib.Path(p) for p in env.split(os.pathsep) if p]
    else:
        dirs = [DEFAULT_GOLDEN]
    for d in dirs:
        if not (d / "llm_config.json").exists():
            raise FileNotFoundError(f"golden folder {d} has no llm_config.json")
    return dirs


def pytest_generate_tests(metafunc):
    if "golden_dir" in metafunc.fixturenames:
        dirs = golden_dirs()
        metafunc.parametrize("golden_dir", dirs, ids=[d.name for d in dirs], scope="module")


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def npz_json(arr) -> object:
    return json.loads(str(arr))
