"""Synthesis robustness against the fake OpenAI server: 429 / 500 / time-outs retried, failures leave an
incomplete dataset that a rerun completes without repeating paid calls, content-policy refusals
journaled and skipped, fatal errors, malformed answers, the journal's torn-line recovery, and the API
key never written or logged."""

from __future__ import annotations

import json
import logging
import time

import pytest
from synth_fakes import (API_KEY, Reply, _api_key, all_file_bytes, dataset_contents, fast_config,  # noqa: F401
                         request_body_key, server)

from echo4o_jax.data.records import load_manifest
from echo4o_jax.synth import Journal, JournalError, SynthConfig, SynthError, make_track, run_track

CHAT = "/v1/chat/completions"
GEN = "/v1/images/generations"


def make_cfg(server, **kw) -> SynthConfig:
    return fast_config(server, **{"concurrency": 1, **kw})


def journal_entries(path) -> list[dict]:
    return [json.loads(line) for line in (path / "journal" / "journal.jsonl").read_text().splitlines()]


def test_429_500_and_timeout_are_retried(server, tmp_path):
    server.push(GEN, Reply.status(429, retry_after_ms=1), Reply.status(500), Reply.status(503, retry_after_ms=1))
    server.push(CHAT, Reply.delay(2.0), Reply.status(502))
    t0 = time.monotonic()
    s = run_track(make_track("instruction", make_cfg(server, timeout=0.5)), tmp_path / "ds", limit=2,
                  progress=False)
    assert time.monotonic() - t0 < 15
    assert s.complete and s.written == 2
    assert s.stats["retries"] == 5
    assert len(server.calls(GEN)) == 2 + 3
    entries = journal_entries(tmp_path / "ds")
    assert len(entries) == 6 and len({e["key"] for e in entries}) == 6  # one entry per paid call
    assert sorted(e["attempts"] for e in entries) == [1, 1, 1, 1, 3, 4]


def test_failed_sample_then_rerun_repeats_no_paid_call(server, tmp_path):
    cfg = make_cfg(server, max_retries=1)
    # sample 0's image call fails twice (attempt + 1 retry): the sample fails, sample 1 is made
    server.push(GEN, Reply.status(500), Reply.status(500))
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert s.failed == 1 and s.written == 1 and not s.complete
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and "failed" in m["error"] and m["skipped"]["by_reason"] == {"call_failed:image": 1}
    first = {request_body_key(r) for r in server.requests}
    n_first = len(server.requests)
    s2 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert s2.mode == "rebuild" and s2.complete and s2.written == 2
    again = server.requests[n_first:]
    assert [r.path for r in again] == [GEN]  # only the image call that never succeeded
    assert request_body_key(again[0]) in first  # (the same request as the failed one)
    # same dataset as an uninterrupted run
    s3 = run_track(make_track("surreal", cfg), tmp_path / "ref", limit=2, progress=False)
    assert s3.complete
    assert dataset_contents(tmp_path / "ds") == dataset_contents(tmp_path / "ref")


@pytest.mark.parametrize("reply", [
    Reply.raw(json.dumps({"error": {"message": "Your request was rejected by the safety system.",
                                    "type": "image_generation_user_error", "code": "moderation_blocked"}}).encode(),
              status=400),
    Reply.status(400, "Your request was rejected as a result of our safety system."),
], ids=["moderation_blocked", "safety_message"])
def test_image_refusal_is_journaled_and_skipped(server, tmp_path, reply):
    cfg = make_cfg(server)
    server.push(GEN, reply)
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=3, progress=False)
    assert s.complete and s.written == 2 and s.skipped == {"refused:image": 1}
    m = load_manifest(tmp_path / "ds")
    assert m["skipped"]["by_reason"] == {"refused:image": 1}
    assert m["skipped"]["examples"] == [{"where": "gpt4o/surreal/0000000", "reason": "refused:image"}]
    refused = [e for e in journal_entries(tmp_path / "ds") if e["status"] == "refused"]
    assert len(refused) == 1 and refused[0]["kind"] == "image" and "safety" in refused[0]["error"]
    # extend the dataset: the refused prompt is not sent again, the refusal is not counted twice
    refused_request = request_body_key(server.calls(GEN)[0])
    n = len(server.requests)
    s2 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=5, progress=False)
    assert s2.mode == "append" and s2.complete and s2.written == 2
    assert refused_request not in {request_body_key(r) for r in server.requests[n:]}
    assert load_manifest(tmp_path / "ds")["skipped"]["count"] == 1


def test_chat_refusal_and_malformed_answers(server, tmp_path):
    cfg = make_cfg(server, malformed_retries=1)
    # instruction sample 0: the prompt answer is prose twice (malformed, retried once, then skipped);
    # sample 1: a refusal; sample 2: a fenced / chatty but parseable answer
    server.push(CHAT, Reply.text("Here is a nice prompt, no JSON."), Reply.text("Still no JSON."),
                Reply.text("I'm sorry, but I can't help with that."),
                Reply.text('Sure! ```json\n{"prompt": "Two red apples."}\n```'))
    s = run_track(make_track("instruction", cfg), tmp_path / "ds", limit=3, progress=False)
    assert s.complete and s.written == 1
    assert s.skipped == {"malformed_answer:instruction_prompt": 1, "refused:instruction_prompt": 1}
    e = journal_entries(tmp_path / "ds")
    assert sum(x["status"] == "refused" for x in e) == 1
    assert sum(x["status"] == "ok" and x["kind"] == "chat" and "JSON" in (x["text"] or "") for x in e) == 2
    from echo4o_jax.data.records import RecordReader

    rec = RecordReader(tmp_path / "ds")[0]
    assert rec.meta["prompt_original"] == "Two red apples."
    # a rebuild replays the malformed answers and the refusal: no call at all
    n = len(server.requests)
    (tmp_path / "ds" / "manifest.json").unlink()
    for p in (tmp_path / "ds").glob("*.array_record"):
        p.unlink()
    s2 = run_track(make_track("instruction", cfg), tmp_path / "ds", limit=3, progress=False)
    assert s2.written == 1 and s2.skipped == s.skipped and len(server.requests) == n


def test_fatal_errors_abort(server, tmp_path, monkeypatch):
    server.push(CHAT, Reply.status(401, f"Incorrect API key provided: {API_KEY}"))
    with pytest.raises(SynthError) as ei:
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "a", limit=3, progress=False)
    assert API_KEY not in str(ei.value) and "401" in str(ei.value)
    assert load_manifest(tmp_path / "a")["complete"] is False
    server.push(GEN, Reply.raw(json.dumps({"error": {"message": "You exceeded your current quota",
                                                     "type": "insufficient_quota",
                                                     "code": "insufficient_quota"}}).encode(), status=429))
    with pytest.raises(SynthError, match="insufficient_quota"):
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "b", limit=3, progress=False)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SynthError, match="no API key"):
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "c", limit=1, progress=False)


def test_max_failures_aborts(server, tmp_path):
    server.push(GEN, *[Reply.status(400, "bad request") for _ in range(4)])
    s = run_track(make_track("surreal", make_cfg(server, max_failures=1)), tmp_path / "ds", limit=6, progress=False)
    assert s.failed == 2 and "max_failures" in s.aborted and not s.complete
    assert len(server.calls(GEN)) == 2


def test_api_key_never_written_or_logged(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    # error bodies that echo the key: retried (logged), then a non-retryable one (a failed sample)
    server.push(GEN, Reply.status(500, f"upstream said: key={API_KEY}"),
                Reply.status(400, f"bad request for Bearer {API_KEY}"))
    s = run_track(make_track("surreal", make_cfg(server, max_retries=2)), tmp_path / "ds", limit=3)
    assert s.failed == 1
    run_track(make_track("multiref", make_cfg(server, generated_refs_per_category=2)), tmp_path / "mr", limit=2)
    assert server.calls(CHAT)[0].headers["authorization"] == f"Bearer {API_KEY}"  # the key was used
    key = API_KEY.encode()
    for p, data in all_file_bytes(tmp_path).items():
        assert key not in data, p
    out = capsys.readouterr()
    assert API_KEY not in out.out + out.err
    assert API_KEY not in caplog.text
    assert "[REDACTED]" in caplog.text  # the echoed key was there, and was redacted


def test_journal_torn_line_and_lock(tmp_path):
    j = Journal(tmp_path / "j")
    ref = j.put_blob(b"\x89PNG\r\n\x1a\nfake", "png")
    j.append({"key": "a", "status": "ok", "text": "x", "blobs": [ref]})
    with pytest.raises(JournalError, match="in use"):
        Journal(tmp_path / "j")
    j.close()
    with open(tmp_path / "j" / "journal.jsonl", "ab") as f:
        f.write(b'{"key": "b", "status": "o')  # killed while appending
    j2 = Journal(tmp_path / "j")
    assert "a" in j2 and "b" not in j2 and j2.read_blob(j2.get("a")["blobs"][0]) == b"\x89PNG\r\n\x1a\nfake"
    j2.append({"key": "c", "status": "ok", "text": "y", "blobs": []})
    j2.close()
    lines = (tmp_path / "j" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "c"]
