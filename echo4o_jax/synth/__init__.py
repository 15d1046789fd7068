"""GPT-4o data synthesis after the Echo-4o recipe: surreal-fantasy, multi-reference and
instruction-following tracks (with text rewriting), written as ArrayRecord datasets
(:mod:`echo4o_jax.data.records`, source ``gpt4o``).

Command line: ``python -m data_gen <surreal|multiref|instruction> --out DIR --limit N`` (see
:mod:`.cli`). Modules: :mod:`.config` (models, limits, price table, track weights), :mod:`.resources`
(editable prompt templates ``templates/*.txt`` and word lists ``data/*.txt``), :mod:`.client`
(rate-limited, retrying, journaled ``openai`` calls, refusal handling, cost), :mod:`.journal`
(append-only fsync'd JSONL + content-addressed image blobs), :mod:`.tracks` (the three tracks),
:mod:`.runner` (ordered writing, resume, dry run).

    from echo4o_jax.synth import SynthConfig, make_track, run_track
    cfg = SynthConfig(base_url="http://127.0.0.1:8000/v1")
    summary = run_track(make_track("surreal", cfg), "out/surreal", limit=100)
"""

from echo4o_jax.synth.client import (Aborted, CallFailed, CallResult, Refused, SynthClient, SynthFatalError,
                                     chat_cost, image_cost)
from echo4o_jax.synth.config import DEFAULT_PRICES, SynthConfig, load_config
from echo4o_jax.synth.journal import Journal, JournalError
from echo4o_jax.synth.resources import class_list, get_template, read_list, read_sections
from echo4o_jax.synth.runner import RunSummary, SynthError, dry_run, fingerprint, format_dry_run, run_track
from echo4o_jax.synth.tracks import (TRACKS, InstructionTrack, MultirefTrack, SampleContext, SurrealTrack, Track,
                                     make_track)

__all__ = [
    "SynthConfig", "load_config", "DEFAULT_PRICES", "SynthClient", "CallResult", "Refused", "CallFailed",
    "SynthFatalError", "Aborted", "chat_cost", "image_cost", "Journal", "JournalError", "get_template",
    "read_list", "read_sections", "class_list", "run_track", "dry_run", "format_dry_run", "fingerprint",
    "RunSummary", "SynthError", "Track", "SurrealTrack", "MultirefTrack", "InstructionTrack", "TRACKS",
    "make_track", "SampleContext",
]
