"""``python -m data_gen <track> --out DIR --limit N [options]``: GPT-4o data synthesis (Echo-4o recipe).

Tracks: ``surreal`` (surreal fantasy), ``multiref`` (multi-reference composition), ``instruction``
(instruction following with text rewriting). Examples::

    export OPENAI_API_KEY=...                       # the key is read from the environment only
    python -m data_gen surreal --out data/synth/surreal --limit 1000 --dry-run
    python -m data_gen surreal --out data/synth/surreal --limit 1000
    python -m data_gen multiref --out data/synth/multiref --limit 500 --refs my_refs/   # human/ object/ scene/
    python -m data_gen instruction --out data/synth/instr --limit 2000 --base-url http://127.0.0.1:8000/v1

Run the same command again after a crash or a kill: paid calls are journaled (``<out>/journal``) and
never repeated; a larger ``--limit`` extends a finished dataset. Every setting (``--config`` file and
options) and every template is checked before any call (``--dry-run`` too). Exit status: 0 complete,
1 incomplete (failed samples: run again), 2 bad arguments / settings / templates, a dataset folder or
journal in use by another run, or a fatal API error (bad or missing key, no access, no quota),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from echo4o_jax.interrupts import keep_ctrl_c
from echo4o_jax.synth.config import SynthConfig, load_config
from echo4o_jax.synth.journal import JournalError
from echo4o_jax.synth.runner import SynthError, dry_run, format_dry_run, run_track
from echo4o_jax.synth.tracks import TRACKS, make_track

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    ap = argparse.ArgumentParser(prog="python -m data_gen", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("track", choices=sorted(TRACKS), help="which data to make")
    ap.add_argument("--out", required=True, help="dataset folder (ArrayRecord shards + manifest.json)")
    ap.add_argument("--limit", type=int, required=True, help="make samples 0 .. N-1 (a sample may be skipped)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the calls per model and the estimated cost; make no call and no file")
    ap.add_argument("--config", default=None, help="JSON file overriding SynthConfig fields (see echo4o_jax.synth.config)")
    ap.add_argument("--journal-dir", default=None, help="paid-call journal (default: <out>/journal); the manifest records it and a "
                                                  "later run with a journal lacking the dataset's calls is refused")
    ap.add_argument("--overwrite", action="store_true",
                    help="rebuild a dataset that was made with other settings (journaled answers are reused)")
    ap.add_argument("--refs", default=None,
                    help="multiref: folder with human/, object/ and scene/ subfolders of reference images "
                         "(default: generate references with the image model)")
    ap.add_argument("--seed", type=int, default=None, help=f"sampling seed (default {d.seed})")
    g = ap.add_argument_group("models and server")
    g.add_argument("--chat-model", default=None, help=f"default {d.chat_model}")
    g.add_argument("--vision-model", default=None, help=f"default {d.vision_model}")
    g.add_argument("--image-model", default=None, help=f"default {d.image_model}")
    g.add_argument("--edit-model", default=None, help="image edit/reference model (default: --image-model)")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key-env", default=None,
                   help=f"environment variable holding the API key (default {d.api_key_env}); never a flag")
    g.add_argument("--no-api-key", action="store_true", help="allow a missing key (a local server without auth)")
    g.add_argument("--image-size", default=None, help=f"default {d.image_size}")
    g.add_argument("--image-quality", default=None, help=f"default {d.image_quality}")
    g.add_argument("--image-format", default=None, help="output_format of the image API (png, jpeg, webp)")
    g.add_argument("--template-dir", default=None, help="edited templates (same file names) overriding the built-in ones")
    g.add_argument("--data-dir", default=None, help="edited word lists (same file names) overriding the built-in ones")
    g = ap.add_argument_group("throughput and retries")
    g.add_argument("--concurrency", type=int, default=None, help=f"samples in flight (default {d.concurrency})")
    g.add_argument("--chat-rpm", type=float, default=None, help=f"chat requests per minute, 0 = unlimited (default {d.chat_rpm:g})")
    g.add_argument("--image-rpm", type=float, default=None, help=f"image requests per minute, 0 = unlimited (default {d.image_rpm:g})")
    g.add_argument("--max-retries", type=int, default=None, help=f"per call on 429/5xx/time-outs (default {d.max_retries})")
    g.add_argument("--backoff-base", type=float, default=None, help=f"first backoff, seconds (default {d.backoff_base:g})")
    g.add_argument("--backoff-max", type=float, default=None, help=f"largest backoff, seconds (default {d.backoff_max:g})")
    g.add_argument("--timeout", type=float, default=None, help=f"seconds per request (default {d.timeout:g})")
    g.add_argument("--max-failures", type=int, default=None, help=f"abort after this many failed samples (default {d.max_failures})")
    g.add_argument("--shard-bytes", type=int, default=None, help=f"ArrayRecord shard size (default {d.shard_bytes})")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true", help="log retries and skips")
    return ap


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    return load_config(
        args.config, overrides_from="command line", seed=args.seed, chat_model=args.chat_model,
        vision_model=args.vision_model,
        image_model=args.image_model, edit_model=args.edit_model, base_url=args.base_url,
        api_key_env=args.api_key_env, require_api_key=False if args.no_api_key else None,
        image_size=args.image_size, image_quality=args.image_quality, image_output_format=args.image_format,
        template_dir=args.template_dir, data_dir=args.data_dir, concurrency=args.concurrency, chat_rpm=args.chat_rpm,
        image_rpm=args.image_rpm, max_retries=args.max_retries, backoff_base=args.backoff_base,
        backoff_max=args.backoff_max, timeout=args.timeout, max_failures=args.max_failures,
        shard_bytes=args.shard_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_ctrl_c()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # per-request logs of the HTTP stack (noise; could carry headers): httpx / httpcore, or the httpx2 /
    # httpcore2 forks some openai releases use instead
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.limit < 0:
        print("error: --limit must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
        track = make_track(args.track, cfg, refs_dir=args.refs)
        if args.dry_run:
            est = dry_run(track, args.out, limit=args.limit, journal_dir=args.journal_dir, overwrite=args.overwrite)
            print(format_dry_run(est))
            print(json.dumps(est, sort_keys=True))
            return 0
        summary = run_track(track, args.out, limit=args.limit, journal_dir=args.journal_dir,
                            overwrite=args.overwrite, progress=not args.no_progress)
    except (SynthError, JournalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the dataset or the journal (disk full, quota, I/O error)
        print(f"error: {e}; the dataset is left marked incomplete: once this is fixed, run the same command again "
              "(the answers paid for are in the journal)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary.to_json(), sort_keys=True))
    return 0 if summary.complete else 1
