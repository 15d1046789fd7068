"""The command-line contract of the commands that take a training config (`--config configs/X.py
[--config.key=value ...]`: `echo4o_jax.train`, `echo4o_jax.data.pack_stats`, `echo4o_jax.data.latents`):
bad input is one `error: ...` line on stderr and exit status 2 (`EXIT_BAD_INPUT`), never a traceback. Bad
input: an unknown flag or config key, a bad flag value, a missing --config file (`flags_parser`); a bad
config value (`ConfigValueError`, printed as `error: bad config: ...`), an unreadable checkpoint, records or
precomputed latents (`CheckpointError`, `RecordError`, `LatentStoreError`)
(`run_reporting_bad_input`, which also sets absl logging to WARNING: Orbax logs every read at INFO).
A Ctrl-C is one `PROG: interrupted (Ctrl-C): <what is kept>` line and exit status 130 (`reporting_main`).

    config = config_flags.DEFINE_config_file("config", None, "...", lock_config=True)
    app.run(reporting_main("pack_stats", main, interrupted="nothing was written"),
            flags_parser=flags_parser(config))
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, NoReturn

from absl import flags
from ml_collections import ConfigDict

__all__ = ["EXIT_BAD_INPUT", "bad_input", "config_args", "flags_parser", "reporting_main", "run_reporting_bad_input",
           "unknown_config_key"]

EXIT_BAD_INPUT = 2


def bad_input(msg: str) -> NoReturn:
    """Prints `error: msg` on stderr and exits with status 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def config_args(argv: list[str]) -> tuple[str | None, list[str]]:
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


def flags_parser(config_flag) -> Callable[[list[str]], list[str]]:
    """The `flags_parser` of `absl.app.run` for a command with the config file flag `config_flag` (the holder
    `config_flags.DEFINE_config_file` returns): absl's flag parsing, with its errors (unknown flags, bad
    values, a missing config file, config keys the config lacks) as one `error:` line and exit status 2."""
    def parse(argv: list[str]) -> list[str]:
        path, keys = config_args(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            bad_input(f"--config {path}: no such file")
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            bad_input(str(e))
        except (AttributeError, KeyError, ValueError) as e:  # ml_collections, on an override of a key the config
            # lacks (AttributeError, KeyError) or that it cannot parse (ValueError: "Could not parse 'a.0.b'")
            config = flags.FLAGS[config_flag.name].parser.parse(path) if path is not None else None
            why = next((w for w in (unknown_config_key(config, k) for k in keys) if w), None) \
                if isinstance(config, ConfigDict) else None
            if why is None and isinstance(e, ValueError):
                why = str(e)
            if why is None:
                raise
            bad_input(why)
        if path is not None:
            default = flags.FLAGS[config_flag.name].parser.parse(path)
            why = next((w for w in (replaced_group(default, flags.FLAGS[config_flag.name].value, k) for k in keys)
                        if w), None)
            if why:
                bad_input(why)
        return rest

    return parse


def replaced_group(default: ConfigDict, config: ConfigDict, key: str) -> str | None:
    """Why the override `key` of `config`, when it replaces a whole group of keys (`--config.mesh={"data": 2}`),
    does not give exactly the keys of `default`'s group (recursively), or None. ml_collections replaces the group:
    a missing key failed later with a traceback, an unknown one was silently ignored. An empty group (free-form)
    takes any keys."""
    old, new = default, config
    for part in key.split("."):
        old, new = old.get(part), new.get(part) if isinstance(new, ConfigDict) else None
    if not isinstance(old, ConfigDict) or not isinstance(new, ConfigDict):
        return None

    def diff(o: ConfigDict, n: ConfigDict, where: str) -> str | None:
        if not len(o):
            return None
        missing, unknown = sorted(set(o.keys()) - set(n.keys())), sorted(set(n.keys()) - set(o.keys()))
        if missing or unknown:
            return (f"--config.{key} replaces the whole group {where} and needs exactly its keys {sorted(o.keys())}"
                    + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else "")
                    + f" (set single keys instead, e.g. --config.{where}.{sorted(o.keys())[0]}=...)")
        return next((w for w in (diff(o[k], n[k], f"{where}.{k}") for k in o.keys()
                                 if isinstance(o[k], ConfigDict) and isinstance(n[k], ConfigDict)) if w), None)

    return diff(old, new, key)


def run_reporting_bad_input(main: Callable[[], int]) -> int:
    """`main()`'s exit status; its bad-input errors (module docstring) are one `error:` line and status 2."""
    from absl import logging

    from echo4o_jax.checkpoint import CheckpointError
    from echo4o_jax.data.latents import LatentStoreError
    from echo4o_jax.data.records import RecordError
    from echo4o_jax.train.trainer import ConfigValueError

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    try:
        return main()
    except ConfigValueError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
    except (CheckpointError, RecordError, LatentStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT


def reporting_main(prog: str, main: Callable[[list[str]], int], *, interrupted: str) -> Callable[[list[str]], None]:
    """The `absl.app.run` main of a command (not train, whose step loop handles SIGINT itself): `main(argv)` under
    `run_reporting_bad_input`; a Ctrl-C (`keep_ctrl_c`: also one Python would swallow) is one line saying
    `interrupted` (what is kept), status 130; the process ends without the interpreter's teardown
    (`interrupts.exit_process`: a compilation may still be in flight)."""
    from echo4o_jax.data._import_common import cli_interrupted
    from echo4o_jax.interrupts import exit_process, keep_ctrl_c

    def run(argv: list[str]) -> None:
        keep_ctrl_c()
        try:
            rc = run_reporting_bad_input(lambda: main(argv))
        except KeyboardInterrupt:
            rc = cli_interrupted(prog, interrupted)
        exit_process(rc)

    return run
