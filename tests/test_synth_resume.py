"""Killed / crashed synthesis runs resume without repeating any paid call and yield the dataset an
uninterrupted run makes; extending a finished dataset; changed settings; the CLI (python -m data_gen)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from synth_fakes import (fast_config, API_KEY, FakeOpenAIServer, Reply, all_file_bytes, chat_answer, data_gen,
                         dataset_contents, fast_cli_args, image_answer, one_line_error, request_body_key, synth_server)

from echo4o_jax.data.records import load_manifest
from echo4o_jax.synth import Journal, SynthConfig, SynthError, dry_run, make_track, run_track

REPO = Path(__file__).resolve().parent.parent
GEN = "/v1/images/generations"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)


def make_cfg(server, **kw) -> SynthConfig:
    return fast_config(server, **{"shard_bytes": 3000, **kw})


def cli(args, **kw):
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "data_gen", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def calls(requests) -> collections.Counter:
    return collections.Counter(request_body_key(r) for r in requests)


def same_dataset(a, b) -> None:
    ca, cb = dataset_contents(a), dataset_contents(b)
    assert sorted(ca) == sorted(cb)
    assert ca == cb  # headers (texts, plan, meta incl. call keys) and image bytes
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma["complete"] and mb["complete"]
    for k in ("records", "images", "image_bytes", "counts"):
        assert ma[k] == mb[k], k
    assert ma["skipped"]["by_reason"] == mb["skipped"]["by_reason"]


def test_killed_cli_run_resumes_without_repeated_calls(tmp_path):
    lock = threading.Lock()
    n_images = [0]
    reached, release = threading.Event(), threading.Event()

    def images(req):
        with lock:
            n_images[0] += 1
            n = n_images[0]
        if n == 6:  # the 6th image call never gets an answer: the run is killed while waiting for it
            reached.set()
            release.wait(30)
        return image_answer(req)

    out, ref = tmp_path / "ds", tmp_path / "ref"
    with FakeOpenAIServer(chat_handler=chat_answer, image_handler=images) as srv:
        args = ["surreal", "--limit", "10", "--base-url", srv.base_url, "--image-size", "32x32", "--concurrency",
                "1", "--chat-rpm", "0", "--image-rpm", "0", "--shard-bytes", "3000", "--no-progress", "-v"]
        p = cli(["--out", str(out), *args])
        try:
            assert reached.wait(60), "the run never reached the 6th image call"
        finally:
            p.kill()  # SIGKILL: no cleanup of any kind
            o1, e1 = p.communicate(timeout=30)
            release.set()
        run1 = list(srv.requests)
        m = load_manifest(out)
        assert m["complete"] is False and 0 < m["records"] < 10  # finished shards survived the kill
        assert run1[-1].path == GEN  # the unanswered call

        p2 = cli(["--out", str(out), *args])
        o2, e2 = p2.communicate(timeout=120)
        assert p2.returncode == 0, e2
        summary = json.loads(o2.strip().splitlines()[-1])
        assert summary["mode"] == "rebuild" and summary["complete"] and summary["written"] == 10
        run2 = srv.requests[len(run1):]
        answered1 = {request_body_key(r) for r in run1[:-1]}
        keys2 = [request_body_key(r) for r in run2]
        assert not answered1 & set(keys2), "a paid call was repeated"
        assert request_body_key(run1[-1]) in keys2  # the unanswered call was made again
        assert summary["stats"]["replayed"] >= len(answered1)

        n_before_ref = len(srv.requests)
        p3 = cli(["--out", str(ref), *args])
        o3, e3 = p3.communicate(timeout=120)
        assert p3.returncode == 0, e3
        # killed + resumed runs made exactly the calls of one uninterrupted run
        assert calls(run1[:-1]) + calls(run2) == calls(srv.requests[n_before_ref:])
    same_dataset(out, ref)
    for path, data in all_file_bytes(tmp_path).items():
        assert API_KEY.encode() not in data, path
    for text in (o1, e1, o2, e2, o3, e3):
        assert API_KEY not in text


def test_ctrl_c_twice_keeps_the_answer_in_flight(tmp_path):
    """Ctrl-C while an image call is in flight, then Ctrl-C again: the run says that it waits for that call,
    keeps waiting, and journals its answer (paid for) before exiting 130. The second Ctrl-C used to close the
    journal while the call was still running, so its answer was dropped, and the exit still waited for it."""
    import signal
    import time

    reached, release, images = blocking_images()

    out = tmp_path / "ds"
    with FakeOpenAIServer(chat_handler=chat_answer, image_handler=images) as srv:
        p = cli(["surreal", "--out", str(out), "--limit", "2", "--base-url", srv.base_url, "--image-size", "32x32",
                 "--concurrency", "1", "--chat-rpm", "0", "--image-rpm", "0", "--no-progress"])
        try:
            assert reached.wait(60), "the run never reached its image call"
            p.send_signal(signal.SIGINT)
            time.sleep(1.0)
            p.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert p.poll() is None, p.communicate()  # still waiting for the call in flight
        finally:
            release.set()
            o, e = p.communicate(timeout=60)
    assert p.returncode == 130, e
    assert "stopping: waiting for the calls in flight of 1 sample(s)" in e
    assert "still waiting for the calls in flight" in e and "Traceback" not in e
    entries = [json.loads(line) for line in (out / "journal" / "journal.jsonl").read_text().splitlines()]
    assert [x["status"] for x in entries if x["kind"] == "image"] == ["ok"]  # the answer in flight was kept


def blocking_images():
    """(reached, release, handler): an image handler that sets `reached` and answers once `release` is set."""
    reached, release = threading.Event(), threading.Event()

    def images(req):
        reached.set()
        release.wait(30)
        return image_answer(req)

    return reached, release, images


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("track_name,crash_after", [("instruction", 7), ("multiref", 9)])
def test_crash_after_n_paid_calls_resumes(tmp_path, monkeypatch, track_name, crash_after):
    orig = Journal.append
    counter = [0]

    def crashing(self, entry):
        orig(self, entry)
        counter[0] += 1
        if counter[0] == crash_after:
            raise _Crash(f"simulated crash after {crash_after} paid calls")

    with synth_server() as srv:
        cfg = make_cfg(srv, concurrency=3, generated_refs_per_category=3)
        monkeypatch.setattr(Journal, "append", crashing)
        with pytest.raises(_Crash):
            run_track(make_track(track_name, cfg), tmp_path / "ds", limit=8, progress=False)
        monkeypatch.setattr(Journal, "append", orig)
        assert load_manifest(tmp_path / "ds")["complete"] is False
        run1 = list(srv.requests)
        s = run_track(make_track(track_name, cfg), tmp_path / "ds", limit=8, progress=False)
        assert s.mode == "rebuild" and s.complete and s.written == 8
        run2 = srv.requests[len(run1):]
        n = len(srv.requests)
        assert run_track(make_track(track_name, cfg), tmp_path / "ref", limit=8, progress=False).complete
        # crashed + resumed runs made exactly the calls of one uninterrupted run: none repeated
        # (two samples may send identical requests, e.g. the same references: hence multisets)
        assert calls(run1) + calls(run2) == calls(srv.requests[n:])
    same_dataset(tmp_path / "ds", tmp_path / "ref")


def test_extend_finished_dataset(tmp_path):
    with synth_server() as srv:
        cfg = make_cfg(srv, concurrency=2)
        s1 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=4, progress=False)
        assert s1.mode == "new" and s1.complete
        n = len(srv.requests)
        s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=4, progress=False)
        assert s.mode == "nothing-to-do" and len(srv.requests) == n
        s2 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=7, progress=False)
        assert (s2.mode, s2.start, s2.written) == ("append", 4, 3) and s2.complete
        assert load_manifest(tmp_path / "ds")["info"]["synth"]["items"] == 7
        assert run_track(make_track("surreal", cfg), tmp_path / "ref", limit=7, progress=False).complete
    same_dataset(tmp_path / "ds", tmp_path / "ref")


def test_changed_settings_need_overwrite_and_reuse_journal(tmp_path):
    with synth_server() as srv:
        run_track(make_track("surreal", make_cfg(srv)), tmp_path / "ds", limit=3, progress=False)
        other = make_cfg(srv, image_quality="medium")
        with pytest.raises(SynthError, match="other settings"):
            run_track(make_track("surreal", other), tmp_path / "ds", limit=3, progress=False)
        n = len(srv.requests)
        s = run_track(make_track("surreal", other), tmp_path / "ds", limit=3, progress=False, overwrite=True)
        assert s.mode == "rebuild" and s.complete
        # the chat answers are replayed; only the image calls (new quality) are made
        assert [r.path for r in srv.requests[n:]] == [GEN] * 3
        assert all(r.json["quality"] == "medium" for r in srv.requests[n:])


def test_another_endpoint_needs_overwrite_and_is_asked_again(tmp_path):
    """The server answering is part of what made a dataset: another base URL was appended to it without a word,
    and --overwrite replayed the first server's journaled answers as the new one's (no call made)."""
    from echo4o_jax.synth.journal import answered_here
    from echo4o_jax.synth.runner import fingerprint

    with synth_server() as a, synth_server() as b:
        run_track(make_track("surreal", make_cfg(a)), tmp_path / "ds", limit=3, progress=False)
        paid = len(a.requests)
        other = make_track("surreal", make_cfg(b))
        with pytest.raises(SynthError, match=r"other settings .*endpoint \(base URL\)"):
            run_track(other, tmp_path / "ds", limit=4, progress=False)
        assert dry_run(other, tmp_path / "ds", limit=3, overwrite=True)["journaled_calls_skipped"] == 0
        s = run_track(other, tmp_path / "ds", limit=3, progress=False, overwrite=True)
        assert s.mode == "rebuild" and s.complete and len(b.requests) == paid
        assert load_manifest(tmp_path / "ds")["info"]["synth"]["config"]["base_url"] == b.base_url
        # a dataset made before the endpoint was fingerprinted: its manifest's endpoint decides
        mpath = tmp_path / "ds" / "manifest.json"
        m = json.loads(mpath.read_text())
        m["info"]["synth"]["fingerprint"] = fingerprint(other, endpoint=False)
        mpath.write_text(json.dumps(m))
        assert run_track(other, tmp_path / "ds", limit=3, progress=False).mode == "nothing-to-do"
        with pytest.raises(SynthError, match="other settings"):
            run_track(make_track("surreal", make_cfg(a)), tmp_path / "ds", limit=4, progress=False)
        # journal entries of that time name no endpoint: replayed (which server answered is unknown)
        assert answered_here({"key": "k"}, b.base_url) and not answered_here({"endpoint": a.base_url}, b.base_url)


def test_cli_dry_run_and_errors(tmp_path):
    p = cli(["instruction", "--out", str(tmp_path / "ds"), "--limit", "12", "--dry-run"])
    o, e = p.communicate(timeout=60)
    assert p.returncode == 0, e
    est = json.loads(o.strip().splitlines()[-1])
    rows = {(r["model"], r["kind"]): r["calls"] for r in est["calls"]}
    assert rows == {("gpt-4o", "chat"): 24, ("gpt-image-1", "image"): 12}
    assert "est. USD" in o and not (tmp_path / "ds").exists()
    p = cli(["multiref", "--out", str(tmp_path / "x"), "--limit", "2", "--refs", str(tmp_path / "missing"),
             "--dry-run"])
    o, e = p.communicate(timeout=60)
    assert p.returncode == 2 and "does not exist" in e


def test_cli_rerun_without_its_journal_dir_is_refused(tmp_path):
    """A rerun that forgets --journal-dir must not delete the records and pay for them again; -v logs
    the retries but not the HTTP stack's per-request lines."""
    out, j1 = tmp_path / "S10", tmp_path / "J1"
    with synth_server() as srv:
        srv.push(GEN, Reply.status(503), Reply.status(503))  # sample 0's image fails (1 retry)
        args = ["surreal", "--out", str(out), "--limit", "3", "--max-retries", "1", "--base-url", srv.base_url,
                "--image-size", "32x32", "--concurrency", "1", "--chat-rpm", "0", "--image-rpm", "0",
                "--backoff-max", "0.05", "--no-progress", "-v"]
        p = cli([*args, "--journal-dir", str(j1)])
        o, e = p.communicate(timeout=120)
        assert p.returncode == 1, e
        assert "retry 1/1" in e  # -v is on ...
        assert "HTTP Request" not in e  # ... without one line per HTTP request
        records = dataset_contents(out)
        manifest = load_manifest(out)
        assert len(records) == 2 and manifest["info"]["synth"]["journal"] == str(j1.resolve())

        n = len(srv.requests)
        p = cli(args)  # --journal-dir forgotten
        o, e = p.communicate(timeout=120)
        assert p.returncode == 2, e
        assert str(j1.resolve()) in e and str(out / "journal") in e and "--journal-dir" in e
        assert len(srv.requests) == n  # no call
        assert dataset_contents(out) == records and load_manifest(out) == manifest  # nothing lost
        assert not (out / "journal").exists()
        p = cli([*args, "--dry-run"])
        o, e = p.communicate(timeout=120)
        assert p.returncode == 2 and str(j1.resolve()) in e

        p = cli([*args, "--journal-dir", str(j1)])
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        assert [r.path for r in srv.requests[n:]] == [GEN]  # only the call that failed


def test_rebuild_with_an_emptied_or_moved_journal(tmp_path):
    ds, j2 = tmp_path / "ds", tmp_path / "moved_journal"
    with synth_server() as srv:
        cfg = make_cfg(srv, max_retries=0)
        srv.push(GEN, Reply.status(503))
        s = run_track(make_track("surreal", cfg), ds, limit=3, progress=False)
        assert s.failed == 1 and s.written == 2 and load_manifest(ds)["info"]["synth"]["journal"] == "journal"
        records = dataset_contents(ds)
        shutil.move(ds / "journal", j2)
        n = len(srv.requests)
        for attempt in (lambda: run_track(make_track("surreal", cfg), ds, limit=3, progress=False),
                        lambda: dry_run(make_track("surreal", cfg), ds, limit=3)):
            with pytest.raises(SynthError, match=r"has 2 records but the journal .* holds none of their calls"):
                attempt()
        assert len(srv.requests) == n and dataset_contents(ds) == records
        # the moved journal holds the dataset's calls: accepted, and remembered
        s = run_track(make_track("surreal", cfg), ds, limit=3, progress=False, journal_dir=j2)
        assert s.mode == "rebuild" and s.complete and s.written == 3
        assert [r.path for r in srv.requests[n:]] == [GEN]
        assert load_manifest(ds)["info"]["synth"]["journal"] == str(j2.resolve())
        # extending it without that journal is refused too (it would pay again for shared answers)
        with pytest.raises(SynthError, match="--journal-dir"):
            run_track(make_track("surreal", cfg), ds, limit=5, progress=False)
        # --overwrite: the user accepts paying again; the records are kept, the new journal remembered
        s = run_track(make_track("surreal", cfg), ds, limit=5, progress=False, overwrite=True)
        assert (s.mode, s.written, s.complete) == ("append", 2, True)
        assert load_manifest(ds)["info"]["synth"]["journal"] == "journal"
        assert records.items() < dataset_contents(ds).items()


def test_second_run_into_the_same_dataset_folder_is_refused(tmp_path):
    """Two runs into one --out with different journals once both paid for every call and the manifest
    listed the shards of one: the dataset folder is locked too; the second run is refused (one line naming
    the folder and the first run's pid, exit status 2) before any call or file, and the first completes."""
    reached, release, images = blocking_images()

    out = tmp_path / "ds"
    first: dict = {}

    def run_first():
        try:
            first["summary"] = run_track(make_track("surreal", make_cfg(srv, concurrency=1)), out, limit=2,
                                         progress=False, journal_dir=tmp_path / "J1")
        except BaseException as e:  # (reported by the assertions below)
            first["error"] = e

    with FakeOpenAIServer(chat_handler=chat_answer, image_handler=images) as srv:
        t = threading.Thread(target=run_first)
        t.start()
        try:
            assert reached.wait(60), "the first run never reached its first image call"
            n = len(srv.requests)
            rc, o, e = data_gen("surreal", "--out", out, "--journal-dir", tmp_path / "J2", "--limit", 2,
                                *fast_cli_args(srv))
            assert rc == 2 and not o
            assert one_line_error(e) == (f"error: the dataset folder {out} is in use by another run (pid "
                                         f"{os.getpid()}; lock file {out / 'synth.lock'}): one run at a time")
            assert len(srv.requests) == n and not (tmp_path / "J2").exists()
        finally:
            release.set()
            t.join(60)
    assert "error" not in first, first.get("error")
    assert first["summary"].complete and first["summary"].written == 2
    m = load_manifest(out)
    assert m["complete"] and m["records"] == 2 and len(dataset_contents(out)) == 2
