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

import ast
import difflib
import os
import re
import sys
from typing import Callable, NoReturn

from absl import flags
from ml_collections import ConfigDict

__all__ = ["EXIT_BAD_INPUT", "bad_input", "config_args", "flags_parser", "list_overrides", "parse_literal",
           "reporting_main", "run_reporting_bad_input", "unknown_config_key"]

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


def parse_literal(text: str):
    """The value of a list override: a Python (or JSON) literal of lists, tuples, dicts, strings, numbers,
    booleans and None, with `dict(key=value, ...)` allowed for dicts, as the config files write them
    ('[dict(path="surreal", weight=1), dict(path="mine", weight=2)]'). ValueError naming what is not one."""
    names = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
                and not node.args and all(k.arg is not None for k in node.keywords):
            return {k.arg: value(k.value) for k in node.keywords}
        raise ValueError(f"{ast.unparse(node)!r} is not a literal (lists, dicts / dict(key=value), strings, "
                         f"numbers, True / False / None)")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a Python literal ({e.msg})") from None
    return value(tree.body)


def list_overrides(argv: list[str], default: ConfigDict) -> tuple[list[str], dict[str, list]]:
    """(`argv` without the overrides of `default`'s list fields, {key: the parsed list}): ml_collections'
    flags cannot override a list ("Type <class 'list'> ... is not supported for overriding"), so these are
    parsed here (`parse_literal`; `--config.key=value` or `--config.key value`) and set after absl's parsing.
    The list replaces the config's whole list. A value that is not a list literal is one `error:` line."""
    rest, found, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        m = re.match(r"^--?config\.([^=]+)(?:=(.*))?$", a, re.S)
        key = m.group(1) if m else None
        node = default
        for part in (key.split(".") if key else ()):
            node = node.get(part) if isinstance(node, ConfigDict) else None
        if key is None or not isinstance(node, list):
            rest.append(a)
            i += 1
            continue
        text = m.group(2)
        if text is None:
            if i + 1 >= len(argv):
                bad_input(f"--config.{key} needs a value (a list, e.g. {node!r})")
            text, i = argv[i + 1], i + 1
        try:
            v = parse_literal(text)
        except ValueError as e:
            bad_input(f"--config.{key}={text}: {e}")
        if not isinstance(v, (list, tuple)):
            bad_input(f"--config.{key}={text}: expected a list (it replaces the whole list, e.g. {node!r})")
        found[key] = list(v)
        i += 1
    return rest, found


def flags_parser(config_flag) -> Callable[[list[str]], list[str]]:
    """The `flags_parser` of `absl.app.run` for a command with the config file flag `config_flag` (the holder
    `config_flags.DEFINE_config_file` returns): absl's flag parsing, with its errors (unknown flags, bad
    values, a missing config file, config keys the config lacks) as one `error:` line and exit status 2.
    Overrides of list fields are parsed here (`list_overrides`). `--help` (and `-h`, as the argparse commands)
    exits 0 (absl's exits 1; it took -h for an unknown flag)."""
    def parse(argv: list[str]) -> list[str]:
        argv = argv[:1] + ["--help" if a == "-h" else a for a in argv[1:]]
        # a --flagfile's lines read here: its list overrides were left to ml_collections, which refuses lists
        argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
        path, keys = config_args(argv)
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            bad_input(f"--config {path}: no such file")
        # the config file's own values (ml_collections runs its get_config)
        default = flags.FLAGS[config_flag.name].parser.parse(path) if path is not None else None
        lists: dict[str, list] = {}
        if isinstance(default, ConfigDict) and keys:
            argv, lists = list_overrides(list(argv), default)
        saved_argv = sys.argv
        if lists:  # ml_collections defines its override flags from the keys in sys.argv (not from `argv`)
            sys.argv = argv
        try:
            rest = flags.FLAGS(argv)
        except SystemExit as e:  # absl's --help / --helpfull print the help and exit 1
            if e.code == 1 and any(re.match(r"^--?(help|helpshort|helpfull|helpxml|\?)$", a) for a in argv[1:]):
                sys.exit(0)
            raise
        except flags.Error as e:
            bad_input(str(e))
        except (AttributeError, KeyError, ValueError) as e:  # ml_collections, on an override of a key the config
            # lacks (AttributeError, KeyError) or that it cannot parse (ValueError: "Could not parse 'a.0.b'")
            why = next((w for w in (unknown_config_key(default, k) for k in keys) if w), None) \
                if isinstance(default, ConfigDict) else None
            if why is None and isinstance(e, ValueError):
                why = str(e)
            if why is None:
                raise
            bad_input(why)
        finally:
            sys.argv = saved_argv
        if default is not None:
            value = flags.FLAGS[config_flag.name].value
            why = next((w for w in (replaced_group(default, value, k) for k in keys) if w), None) or \
                next((w for w in (unused_override(value, k) for k in keys) if w), None)
            if why:
                bad_input(why)
        for key, v in lists.items():
            *group, last = key.split(".")
            node = flags.FLAGS[config_flag.name].value
            for part in group:
                node = node[part]
            node[last] = v
        return rest

    return parse


def unused_override(config: ConfigDict, key: str) -> str | None:
    """Why the override `key` changes nothing in a training config `config`, or None: model.geometry under
    model.init='checkpoint' (the geometry is the checkpoint's: 4 layers asked, the 28-layer model trained),
    data.records under data.kind='synthetic', data.synthetic under 'records'."""
    def under(group: str) -> bool:
        return key == group or key.startswith(group + ".")

    model, data = config.get("model"), config.get("data")
    if isinstance(model, ConfigDict) and model.get("init") == "checkpoint" and under("model.geometry"):
        return (f"--config.{key}: model.geometry is not used with model.init='checkpoint' (the geometry is "
                f"model.ckpt's, {model.get('ckpt')!r}); a smaller model needs model.init=random")
    if isinstance(data, ConfigDict):
        for kind, group in (("synthetic", "data.records"), ("records", "data.synthetic")):
            if data.get("kind") == kind and under(group):
                return f"--config.{key}: {group} is not used with data.kind={kind!r}"
    return None


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
