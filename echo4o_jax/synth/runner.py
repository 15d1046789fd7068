"""Running a track: samples in parallel, records written in sample order, resume, dry run.

Resume rules (the journal makes every rebuild free of paid calls):

* no dataset in ``out`` yet -> a new one;
* a *complete* dataset (``manifest.json`` with ``"complete": true``) made with the same settings
  (``info.synth.fingerprint``) -> appended to: samples ``info.synth.items`` .. ``limit - 1`` are added;
* an *incomplete* dataset (a killed run, failed samples, an abort) -> rebuilt from sample 0: every
  answer already paid for is replayed from the journal, only missing calls are made, so the result is
  the dataset an uninterrupted run would have written;
* a dataset made with other settings or by another endpoint (``base_url``) -> refused unless
  ``overwrite`` (then rebuilt; journaled answers to identical requests from the same endpoint are still
  reused: another server's answers are asked again);
* the manifest records the journal a dataset was built with (``info.synth.journal``: relative to
  ``out`` when inside it). A run with another journal that holds none of the dataset's calls (a
  forgotten ``--journal-dir``), or a rebuild whose journal holds none of the calls of the records it
  would replace, is refused unless ``overwrite``: it would delete records and pay for them again.

One run at a time per dataset folder and per journal: a run holds an exclusive ``flock`` on
``<out>/synth.lock`` and on ``<journal>/lock`` (each holding its pid); a second run into either is refused.

Records are written in sample order whatever the completion order, so the dataset does not depend on
timing. A sample whose call was refused on content-policy grounds, or whose chat answers stayed
malformed, is skipped (``RecordWriter.skip``, listed in the manifest). A sample whose call failed after
its retries (an image answer that never decoded included), or whose record is invalid (every image is
fully decoded, once, before it is written), is skipped too and leaves the dataset incomplete (the run exits
non-zero, the manifest's error names the samples; the next run retries just the failed calls). A call the
server rejected with a non-retryable 4xx (``call_rejected``) is retried too, and the error says that it is
likely to fail again.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from echo4o_jax.data.records import MANIFEST_NAME, RecordError, RecordReader, RecordWriter, load_manifest
from echo4o_jax.eval.judge import MalformedAnswer, api_key_from_env
from echo4o_jax.synth.client import (Aborted, CallFailed, Refused, SynthClient, SynthFatalError, chat_cost,
                                     image_cost)
from echo4o_jax.synth.journal import JOURNAL_NAME, Journal, answered_here, hold_lock
from echo4o_jax.synth.tracks import SampleContext, Track

log = logging.getLogger(__name__)

__all__ = ["run_track", "dry_run", "fingerprint", "SynthError", "RunSummary", "DEFAULT_JOURNAL_SUBDIR"]

DEFAULT_JOURNAL_SUBDIR = "journal"
DATASET_LOCK = "synth.lock"  # in the dataset folder: flock'd while a run writes it
# config fields that shape the data (the others: throughput, retries, prices, paths)
_SHAPING = ("chat_model", "vision_model", "image_model", "edit_model", "image_size", "image_quality",
            "image_output_format", "max_image_pixels", "malformed_retries", "refusal_patterns", "seed",
            "surreal_classes", "instruction_classes", "surreal_types", "instruction_bins", "multiref_combos",
            "generated_refs_per_category")  # word lists, templates, references: by content (fingerprint_parts)


class SynthError(RuntimeError):
    """A run that cannot start or went wrong as a whole (settings, dataset state, fatal API error)."""


@dataclasses.dataclass
class _Outcome:
    index: int
    record: Any = None
    skip: str | None = None
    failed: str | None = None
    aborted: bool = False


@dataclasses.dataclass
class RunSummary:
    track: str
    out: str
    limit: int
    start: int
    mode: str  # new | append | rebuild | nothing-to-do
    written: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)
    failed: int = 0
    failures: list = dataclasses.field(default_factory=list)  # "<sample id>: <reason>" of each failed sample
    complete: bool = False
    aborted: str | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fingerprint(track: Track, *, endpoint: bool = True) -> str:
    """What the data depends on, the endpoint (the server answering) included; `endpoint=False`: the
    fingerprint of datasets made before it was (accepted when their manifest names the same endpoint)."""
    cfg = dataclasses.asdict(track.cfg)
    shaping = {k: cfg[k] for k in _SHAPING}
    shaping["refusal_patterns"] = list(shaping["refusal_patterns"])
    doc = {"track": track.name, "config": shaping, "parts": track.fingerprint_parts()}
    if endpoint:
        doc["endpoint"] = track.cfg.endpoint()
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _made_with(synth: dict, track: Track) -> bool:
    """Whether a dataset's manifest (`synth`: its info.synth) was made with these settings and endpoint."""
    fp = synth.get("fingerprint")
    if fp == fingerprint(track):
        return True
    config = synth.get("config") if isinstance(synth.get("config"), dict) else {}
    return (fp == fingerprint(track, endpoint=False) and "base_url" in config
            and config["base_url"] == track.cfg.endpoint())


def _journal_dir(out_dir: str | os.PathLike, journal_dir: str | os.PathLike | None) -> Path:
    return Path(journal_dir) if journal_dir else Path(out_dir) / DEFAULT_JOURNAL_SUBDIR


def _journal_ref(out_dir: Path, journal_dir: Path) -> str:
    """How the manifest records a journal: relative to the dataset when inside it (the two move
    together), else absolute."""
    jd, out = journal_dir.resolve(), out_dir.resolve()
    try:
        return jd.relative_to(out).as_posix()
    except ValueError:
        return str(jd)


def _check_folders(out_dir: Path, journal_dir: Path) -> None:
    """Refuse a dataset or journal folder that is a file, or lies under one (before anything is made)."""
    for p, what in ((out_dir, "dataset folder (--out)"), (journal_dir, "journal folder (--journal-dir)")):
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        if q.exists() and not q.is_dir():
            raise SynthError(f"the {what} {p} is a file, not a folder" if q == p else
                             f"the {what} {p} cannot be made: {q} is a file, not a folder")


def _open_journal_if_any(journal_dir: Path, **kw) -> Journal | None:
    """The journal in `journal_dir` when it has one (nothing is created), else None."""
    return Journal(journal_dir, **kw) if (journal_dir / JOURNAL_NAME).exists() else None


def _check_journal(out_dir: Path, mode: str, journal_dir: Path, journal: Journal | None, overwrite: bool) -> None:
    """Refuse to run the dataset in `out_dir` against a journal that holds none of its paid answers
    (see the module docstring). `journal`: the journal in `journal_dir` (None: there is none)."""
    mpath = out_dir / MANIFEST_NAME
    if overwrite or mode not in ("append", "rebuild") or not mpath.exists():
        return
    m = load_manifest(mpath)
    recorded = ((m.get("info") or {}).get("synth") or {}).get("journal")
    recorded_dir = out_dir / recorded if recorded else None  # (an absolute path stays itself)
    moved = recorded_dir is not None and recorded_dir.resolve() != journal_dir.resolve()
    n_records = int(m.get("records") or 0)
    if not moved and not (mode == "rebuild" and n_records):
        return
    if n_records and journal is not None and len(journal) and _holds_any_call(out_dir, journal):
        return
    if moved:
        raise SynthError(f"the dataset in {out_dir} was built with the journal {recorded_dir} (its paid answers), "
                         f"but this run uses {journal_dir}, which holds none of the dataset's calls: pass "
                         f"--journal-dir {recorded_dir} to reuse them (or --overwrite to go on with {journal_dir} "
                         f"and pay for every call again)")
    raise SynthError(f"the dataset in {out_dir} has {n_records} records but the journal {journal_dir} holds none "
                     f"of their calls (moved or deleted?): rebuilding would delete them and pay for every call "
                     f"again; pass --journal-dir with the journal it was built with (or --overwrite to rebuild it "
                     f"with {journal_dir})")


def _holds_any_call(out_dir: Path, journal: Journal) -> bool:
    """Whether `journal` holds a call of any record of the dataset in `out_dir` (``meta.calls``)."""
    try:
        reader = RecordReader(out_dir)
        try:
            for i in range(len(reader)):
                if any(k in journal for k in (reader.header(i).get("meta") or {}).get("calls") or ()):
                    return True
        finally:
            reader.close()
    except RecordError as e:
        raise SynthError(f"cannot check that the journal {journal.root} holds the calls of the dataset in {out_dir} "
                         f"(its records are unreadable: {e}); pass --overwrite to rebuild it anyway") from None
    return False


def _dataset_state(out_dir: Path, track: Track, overwrite: bool) -> tuple[str, int]:
    """(mode, first sample index) for a run into `out_dir`."""
    mpath = out_dir / MANIFEST_NAME
    if not mpath.exists():
        shards = list(out_dir.glob("*.array_record")) if out_dir.exists() else []
        if shards and not overwrite:
            raise SynthError(f"{out_dir} holds shards but no manifest: not a synthesis dataset? "
                             f"(--overwrite replaces it)")
        return ("rebuild" if shards else "new"), 0
    m = load_manifest(mpath)
    synth = (m.get("info") or {}).get("synth") or {}
    if not _made_with(synth, track):
        if not overwrite:
            what = "was not made by this tool" if not synth else "was made with other settings (models, seed, " \
                   "templates, word lists, references, endpoint (base URL), ...)"
            raise SynthError(f"the dataset in {out_dir} {what}; pass --overwrite to rebuild it with these settings "
                             f"(journaled answers to identical requests from the same endpoint are reused)")
        return "rebuild", 0
    if m.get("complete"):
        return "append", int(synth.get("items", 0))
    return "rebuild", 0


def _run_sample(track: Track, client: SynthClient, index: int) -> _Outcome:
    sid = track.sample_id(index)
    ctx = SampleContext(track, client, sid)
    try:
        plan = track.plan(index)
        return _Outcome(index, record=track.run(plan, ctx))
    except Refused as e:
        log.info("%s: refused at %s (%s)", sid, ctx.step, e)
        return _Outcome(index, skip=f"refused:{ctx.step}")
    except MalformedAnswer as e:
        log.warning("%s: %s", sid, client.redact(str(e)))
        return _Outcome(index, skip=f"malformed_answer:{ctx.step}")
    except CallFailed as e:
        log.warning("%s: call %s at %s: %s", sid, "rejected" if e.rejected else "failed", ctx.step, e)
        return _Outcome(index, failed=f"call_{'rejected' if e.rejected else 'failed'}:{ctx.step}")
    except RecordError as e:
        log.warning("%s: invalid record at %s (not written): %s", sid, ctx.step, e)
        return _Outcome(index, failed=f"invalid_record:{ctx.step}")
    except Aborted:
        return _Outcome(index, aborted=True)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool, stream: TextIO):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="sample", file=stream, dynamic_ncols=True,
                                mininterval=0.5)
            except ImportError:
                self.bar = None

    def update(self, n: int, stats: dict, failed: int, skipped: int) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(calls=stats["paid_calls"], replayed=stats["replayed"], retries=stats["retries"],
                             refused=stats["refusals"], skipped=skipped, failed=failed,
                             usd=f"{stats['spend_usd']:.2f}", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_track(track: Track, out_dir: str | os.PathLike, *, limit: int, journal_dir: str | os.PathLike | None = None,
              overwrite: bool = False, progress: bool = True, stream: TextIO | None = None,
              client: Any = None) -> RunSummary:
    """Make samples ``0 .. limit-1`` of `track` into the dataset `out_dir` (see the module docstring).
    `client`: an ``openai.OpenAI``-like object to use instead of one built from the config."""
    out = Path(out_dir)
    jd = _journal_dir(out, journal_dir)
    _check_folders(out, jd)
    if client is None and not (jd / JOURNAL_NAME).exists() and not (out / MANIFEST_NAME).exists():
        # a new dataset: every sample needs calls, so the key is checked before any file is made
        api_key_from_env(track.cfg.api_key_env, require=track.cfg.require_api_key, error=SynthError)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot create the dataset folder {out}: {e.strerror or e}") from None
    lock = hold_lock(out / DATASET_LOCK, f"the dataset folder {out}")  # before its state is read
    try:
        return _run_locked(track, out, jd, limit=limit, overwrite=overwrite, progress=progress,
                           stream=stream or sys.stderr, client=client)
    finally:
        lock.close()


def _run_locked(track: Track, out: Path, jd: Path, *, limit: int, overwrite: bool, progress: bool, stream: TextIO,
                client: Any) -> RunSummary:
    t0 = time.monotonic()
    cfg = track.cfg
    fp = fingerprint(track)
    mode, start = _dataset_state(out, track, overwrite)
    summary = RunSummary(track=track.name, out=str(out), limit=limit, start=start, mode=mode)
    if mode == "append" and start >= limit:
        summary.mode = "nothing-to-do"
        summary.complete = True
        print(f"{track.name}: {out} already holds samples 0..{start - 1} (complete); nothing to do for --limit {limit}",
              file=stream)
        return summary
    journal = _open_journal_if_any(jd)
    try:
        _check_journal(out, mode, jd, journal, overwrite)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    if journal is None:  # (an open journal with no entries is falsy: it has __len__)
        journal = Journal(jd)
    writer = None
    try:
        info = {"synth": {"tool": "echo4o_jax.synth", "track": track.name, "items": limit, "fingerprint": fp,
                          "journal": _journal_ref(out, jd), "config": cfg.to_public_dict(), **track.describe(),
                          "templates": {n: track.template(n).version for n in track.template_names}}}
        if mode == "rebuild" and (out / MANIFEST_NAME).exists():
            print(f"{track.name}: rebuilding {out} from the journal ({len(journal)} journaled calls; "
                  f"only missing calls are made)", file=stream)
        # Every image of a record was fully decoded once already: an answer by the client (fresh or
        # replayed: an undecodable one is asked again), a folder reference by its track. The writer reads
        # the headers only (a second full decode per image doubled the cost of a rebuild from the journal).
        writer = RecordWriter(out, shard_bytes=cfg.shard_bytes, name=track.name, append=(mode == "append"),
                              overwrite=(mode == "rebuild"), check_images="header", info=info)
        sc = SynthClient(cfg, journal, client=client)
        _loop(track, sc, writer, summary, start, limit, progress, stream)
        summary.stats = sc.stats.snapshot()
    except BaseException as e:
        if writer is not None:
            try:
                writer.close(error=summary.aborted or f"{type(e).__name__}: {e}")
            except Exception as e2:  # keep the original error
                log.error("closing the dataset failed: %s", e2)
        journal.close()
        raise
    err = None
    if summary.failed:
        shown = "; ".join(summary.failures[:5]) + (f"; and {summary.failed - 5} more" if summary.failed > 5 else "")
        rejected = sum(": call_rejected:" in f for f in summary.failures)
        err = (f"{summary.failed} samples failed ({shown}; the log has each error); run the same command again to "
               f"retry their failed calls: journaled calls are not repeated")
        if rejected:
            err += (f". {rejected} of them were rejected by the server with a non-retryable error (HTTP 4xx, "
                    "call_rejected): a rerun sends the same requests, which fail again unless their cause is "
                    "fixed (the settings, or the server's limits); to train on the records made, pass "
                    "--config.data.records.allow_incomplete=True")
    if summary.aborted:
        err = summary.aborted
    # a rebuild that ends incomplete still replaces the old dataset (as an append leaves its partial
    # dataset): the next run continues it, and every paid answer of both is in the journal
    m = writer.close(error=err, keep_partial=True)
    summary.complete = bool(m.get("complete"))
    summary.seconds = round(time.monotonic() - t0, 3)
    with open(journal.root / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary.to_json()}, sort_keys=True) + "\n")
    journal.close()
    return summary


def _loop(track: Track, sc: SynthClient, writer: RecordWriter, summary: RunSummary, start: int, limit: int,
          progress: bool, stream: TextIO) -> None:
    cfg = track.cfg
    bar = _Progress(limit - start, track.name, progress, stream)
    skipped: collections.Counter = collections.Counter()
    window = max(2, 2 * cfg.concurrency)
    pool = cf.ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix=f"synth-{track.name}")
    futures: dict[int, cf.Future] = {}
    next_submit = start
    try:
        for idx in range(start, limit):
            while next_submit < limit and next_submit < idx + window and not sc.stop.is_set():
                futures[next_submit] = pool.submit(_run_sample, track, sc, next_submit)
                next_submit += 1
            fut = futures.get(idx)
            if fut is None:  # stopped before this sample was started
                break
            while True:
                try:
                    o = fut.result(timeout=0.5)
                    break
                except cf.TimeoutError:
                    bar.update(0, sc.stats.snapshot(), summary.failed, sum(skipped.values()))
            del futures[idx]
            if o.aborted:
                break
            if o.record is not None:
                try:
                    writer.write(o.record)
                    summary.written += 1
                except RecordError as e:
                    log.warning("%s: invalid record (not written): %s", o.record.id, e)
                    o.failed = "invalid_record"
            sid = track.sample_id(idx)
            if o.skip:
                writer.skip(o.skip, where=sid)
                skipped[o.skip] += 1
            if o.failed:
                writer.skip(o.failed, where=sid)
                skipped[o.failed] += 1
                summary.failed += 1
                summary.failures.append(f"{sid}: {o.failed}")
                if summary.failed > cfg.max_failures and not summary.aborted:  # (samples in flight may fail too)
                    summary.aborted = f"aborted: more than {cfg.max_failures} failed samples (max_failures)"
                    log.error("%s", summary.aborted)
                    sc.stop.set()
            bar.update(1, sc.stats.snapshot(), summary.failed, sum(skipped.values()))
    except SynthFatalError as e:
        summary.aborted = summary.aborted or f"aborted: {e}"
        sc.stop.set()
        raise SynthError(summary.aborted) from None
    except BaseException as e:
        summary.aborted = summary.aborted or ("interrupted" if isinstance(e, KeyboardInterrupt) else
                                              f"aborted: {type(e).__name__}: {e}")
        sc.stop.set()
        raise
    finally:
        for f in futures.values():
            f.cancel()
        bar.close()
        _finish_calls_in_flight(pool, futures, cfg.timeout, stream)
        summary.skipped = dict(skipped)


def _finish_calls_in_flight(pool: cf.ThreadPoolExecutor, futures: dict[int, cf.Future], timeout: float,
                            stream: TextIO) -> None:
    """Wait for the samples still running (no new call starts once the run stops) so that the answers of
    their calls in flight, paid for, reach the journal before it closes. A Ctrl-C during this wait is
    ignored, with one line saying so: stopping the wait would lose those answers, not end the calls."""
    running = [f for f in futures.values() if f.running()]
    if running:
        print(f"stopping: waiting for the calls in flight of {len(running)} sample(s) (at most {timeout:g} s each, "
              "--timeout) so that their paid answers are kept", file=stream)
    told = False
    while True:
        try:  # (the futures, not the threads: a thread join interrupted once may return early the next time)
            cf.wait(running)
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except KeyboardInterrupt:
            if not told:
                print("still waiting for the calls in flight (their answers are paid for); kill -9 loses them",
                      file=stream)
                told = True


# ------------------------------------------------------------------------------------------------ dry run


def dry_run(track: Track, out_dir: str | os.PathLike | None, *, limit: int,
            journal_dir: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Calls per model and estimated USD for making samples ``start .. limit-1`` (no call, no file).

    Calls shared by several samples (an object's attributes, a generated reference) count once; those
    whose answer is already journaled count zero. Per-sample calls are counted in full (an upper bound
    when a killed run is rebuilt)."""
    cfg = track.cfg
    start = 0
    mode = "new"
    journal = None
    if out_dir is not None:
        out = Path(out_dir)
        jd = _journal_dir(out, journal_dir)
        _check_folders(out, jd)
        mode, start = _dataset_state(out, track, overwrite)
        journal = _open_journal_if_any(jd, read_only=True)
        _check_journal(out, mode, jd, journal, overwrite)
    seen: set[str] = set()
    rows: dict[tuple[str, str], dict] = {}
    journaled = 0
    endpoint = cfg.endpoint()
    for idx in range(start, limit):
        for c in track.estimate(track.plan(idx)):
            if c.shared is not None:
                if c.shared in seen:
                    continue
                seen.add(c.shared)
            if c.key is not None and journal is not None and answered_here(journal.get(c.key), endpoint):
                journaled += 1
                continue
            row = rows.setdefault((c.model, c.kind), {"model": c.model, "kind": c.kind, "calls": 0, "usd": 0.0})
            row["calls"] += 1
            if c.kind == "chat":
                row["usd"] += chat_cost(cfg.prices, c.model, c.input_tokens, cfg.est_output_tokens)
            else:
                row["usd"] += image_cost(cfg.prices, c.model, cfg.image_size, cfg.image_quality, c.n_input_images)
    table = sorted(rows.values(), key=lambda r: (r["model"], r["kind"]))
    for r in table:
        r["usd"] = round(r["usd"], 4)
    unpriced = sorted({r["model"] for r in table if r["model"] not in cfg.prices})
    return {"track": track.name, "mode": mode, "start": start, "limit": limit, "samples": max(0, limit - start),
            "calls": table, "total_calls": sum(r["calls"] for r in table),
            "total_usd": round(sum(r["usd"] for r in table), 4), "journaled_calls_skipped": journaled,
            "unpriced_models": unpriced, **track.describe()}


def format_dry_run(est: dict) -> str:
    lines = [f"dry run: {est['track']}, samples {est['start']}..{est['limit'] - 1} "
             f"({est['samples']} to make, mode {est['mode']})"]
    lines.append(f"{'model':<24} {'kind':<6} {'calls':>8} {'est. USD':>12}")
    for r in est["calls"]:
        lines.append(f"{r['model']:<24} {r['kind']:<6} {r['calls']:>8} {r['usd']:>12.4f}")
    lines.append(f"{'total':<24} {'':<6} {est['total_calls']:>8} {est['total_usd']:>12.4f}")
    if est["journaled_calls_skipped"]:
        lines.append(f"({est['journaled_calls_skipped']} shared calls already journaled: not counted)")
    if est["unpriced_models"]:
        lines.append(f"(no price in the config for {est['unpriced_models']}: counted as 0)")
    lines.append("Prices are estimates from the config's price table; chat tokens are estimated.")
    return "\n".join(lines)

