"""Shared test fixtures.

Golden folders (recorded from the official PyTorch BAGEL) come from ECHO4O_GOLDEN_DIRS
(os.pathsep-separated); by default every folder under tests/golden/ (the bundled copy bagel_tiny_a) and
every folder under the checkout's ../shared/golden/ that is not a byte-identical copy of a bundled one
(a folder of the same layout with other sizes dropped into either place is run through the same tests).
Every size is read from the folder's configs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_GOLDEN = HERE / "golden" / "bagel_tiny_a"
SHARED_BENCHMARKS = HERE.parent.parent / "shared" / "benchmarks"
SHARED_GOLDEN = HERE.parent.parent / "shared" / "golden"

# The suite runs on CPU (its float32 tolerances are the CPU's: GPU matmuls default to TF32) unless JAX_PLATFORMS
# says otherwise; the TPU tests compile for a topology description without a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's CPU code generation at LLVM optimisation level 0: compiling is most of the suite's time (a train step of
# the tiny models compiles in seconds and runs in milliseconds), and level 0 compiles it about a third faster (the
# `.ci/run` of 2026-11-29: 23:53 -> 18:43 with the file order below). The code tested is the same; results differ
# from the default level's in float rounding only (the golden tolerances hold), and every process a test starts
# inherits the flag (`xla_env`), so that values compared across processes (resumed runs, a random frozen VAE's
# fingerprint) come from one setting. A caller's XLA_FLAGS naming a level is kept.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()


def xla_env(env: dict | None = None, devices: int | None = None) -> dict:
    """`env` (default os.environ) for a JAX process a test starts on the CPU: its XLA_FLAGS kept (the level above)
    except a host device count, `devices` CPU devices when given (else the default one)."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**env, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}

# One persistent XLA compilation cache for the test session: its worker processes (pytest-xdist starts them
# from this process, with its environment) and every training / bench process a test starts. Dozens of tests
# compile the same tiny train step, in-process and in subprocesses; loading it from the cache saves about a
# third of a training test's time. A cache the caller set (JAX_COMPILATION_CACHE_DIR) is used as it is. The
# size limit turns on JAX's file lock, so that processes writing the same entry at once do not read a
# half-written one. Tests of the cache itself unset the variable for the processes they start.
# Made when pytest configures (not on import: tests/variant_golden.py imports test modules outside pytest).
_SESSION_CACHE: str | None = None


# The slowest test files first (seconds per file in `.ci/run` on 2 cores, 2026-11-29: 477, 442, 345, 199, 163, 159,
# 126, 126, 118, 95, 80, 49, 49; the other 21 files: 194 together). `-n 2 --dist loadfile` runs each file whole on
# one worker and hands the files out in their order; xdist's own order (most tests first) put the few long tests of
# test_train_processes.py last, one worker idle meanwhile: 1433 s for that run, 1310 s in this order (simulated).
SLOWEST_FILES = ("test_train.py", "test_train_processes.py", "test_train_cli.py", "test_model_units.py",
                 "test_latents.py", "test_generate.py", "test_kernels.py", "test_data_pipeline.py", "test_convert.py",
                 "test_golden.py", "test_tpu_compile.py", "test_train_faults.py", "test_bench_scripts.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's tests keep their order)


def pytest_configure(config):
    global _SESSION_CACHE
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: the files in the order above, not by test count
        config.option.loadscopereorder = False
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the caller's, or (an xdist worker) the session's
        return
    _SESSION_CACHE = tempfile.mkdtemp(prefix="echo4o_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    if "jax" in sys.modules:  # (imported before by a plugin: its settings were read already)
        sys.modules["jax"].config.update("jax_compilation_cache_dir", _SESSION_CACHE)
        sys.modules["jax"].config.update("jax_compilation_cache_max_size", 4 << 30)


def without_compilation_cache(env: dict) -> dict:
    """`env` without the session's compilation cache: for a process under a file size limit, whose cache
    entries would be written cut short (and then fail to load in every later process)."""
    return {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE")}


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def load_file(path: pathlib.Path, name: str):
    """Import a file that is not part of a package (bench/*.py, configs/*.py) as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _golden_folders(parent: pathlib.Path) -> list[pathlib.Path]:
    if not parent.is_dir():
        return []
    return sorted(d for d in parent.iterdir() if d.is_dir() and (d / "llm_config.json").exists())


def _same_files(a: pathlib.Path, b: pathlib.Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def golden_dirs() -> list[pathlib.Path]:
    env = os.environ.get("ECHO4O_GOLDEN_DIRS")
    if env:
        dirs = [pathlib.Path(p) for p in env.split(os.pathsep) if p]
    else:
        dirs = _golden_folders(DEFAULT_GOLDEN.parent)
        for d in _golden_folders(SHARED_GOLDEN):
            if not any(d.name == b.name and _same_files(d, b) for b in dirs):
                dirs.append(d)
    if not dirs:  # (an empty parameter set would skip every golden test: a green run that checked nothing)
        raise FileNotFoundError(f"no golden folder: ECHO4O_GOLDEN_DIRS={env!r} names none" if env else
                                f"no golden folder under {DEFAULT_GOLDEN.parent} or {SHARED_GOLDEN}")
    for d in dirs:
        if not (d / "llm_config.json").exists():
            raise FileNotFoundError(f"golden folder {d} has no llm_config.json")
    return dirs


def golden_ids(dirs: list[pathlib.Path]) -> list[str]:
    """Test ids: the folder names, with the parent's name added where two folders share a name."""
    names = [d.name for d in dirs]
    return [d.name if names.count(d.name) == 1 else f"{d.parent.parent.name}-{d.parent.name}-{d.name}" for d in dirs]


_COLLECTED: list[pathlib.Path] | None = None  # golden_dirs() once per session (it compares folders byte by byte)


def pytest_generate_tests(metafunc):
    global _COLLECTED
    if "golden_dir" in metafunc.fixturenames:
        if _COLLECTED is None:
            _COLLECTED = golden_dirs()
        dirs = _COLLECTED
        metafunc.parametrize("golden_dir", dirs, ids=golden_ids(dirs), scope="module")


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def npz_json(arr) -> object:
    return json.loads(str(arr))
