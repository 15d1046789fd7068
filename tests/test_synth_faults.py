"""Synthesis robustness against the fake OpenAI server: 429 / 500 / time-outs retried, failures leave an
incomplete dataset that a rerun completes without repeating paid calls, content-policy refusals
journaled and skipped, fatal errors, malformed answers, the journal's torn-line recovery, and the API
key never written or logged."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
from pathlib import Path

import pytest
from synth_fakes import (API_KEY, Reply, _api_key, all_file_bytes, data_gen, dataset_contents,  # noqa: F401
                         fast_cli_args, fast_config, message_text, one_line_error, request_body_key, server,
                         small_image_folder, solid_png)

from echo4o_jax.data.records import RecordError, RecordReader, load_manifest, probe_image
from echo4o_jax.synth import Journal, JournalError, SynthConfig, SynthError, make_track, run_track
from echo4o_jax.synth.client import image_cost

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


def test_rerun_after_a_run_whose_every_call_failed(server, tmp_path):
    """The first run journals nothing (every call failed): its journal file exists and is empty. The rerun
    opens it once (an empty journal once counted as "none" and was opened a second time: 'in use by
    another run') and completes the dataset."""
    cfg = make_cfg(server, max_retries=0)
    server.push(CHAT, Reply.status(500))  # the sample's first call
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=1, progress=False)
    assert s.failed == 1 and s.written == 0 and len(server.requests) == 1
    assert journal_entries(tmp_path / "ds") == []
    s2 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=1, progress=False)
    assert s2.complete and s2.written == 1


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
    server.push(GEN, Reply.raw(json.dumps({"error": {"message": "Billing hard limit has been reached",
                                                     "type": "invalid_request_error",
                                                     "code": "billing_hard_limit_reached"}}).encode(), status=400))
    with pytest.raises(SynthError, match="billing_hard_limit_reached"):  # the account's cap: not one sample's fault
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "b2", limit=3, progress=False)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SynthError, match="no API key"):
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "c", limit=1, progress=False)
    assert not (tmp_path / "c").exists()  # a new dataset: the key is checked before any file is made
    # a dataset with a journal may need no call (a rebuild from it): the key is asked for at the first call
    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(SynthError, match="no API key"):
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "a", limit=3, progress=False)


def test_bad_base_url_is_refused_before_anything(server, tmp_path):
    """A --base-url that is no http(s) URL, has a bad port, or carries a query (the client would append its
    endpoint paths after the query: every call a 404) is one error line naming it, exit status 2, before any
    file is made; credentials in it are never shown (a URL without a scheme parses with its userinfo as the
    path, which went into the manifest as it was)."""
    secret = "AUDITSECRET-9"
    e = "error: command line: base_url:"
    cases = [
        (f"user:{secret}@127.0.0.1:8000/v1", f"{e} expected an http(s) URL with a host, such as "
         "http://127.0.0.1:8000/v1, got '***@127.0.0.1:8000/v1'"),
        ("ftp://127.0.0.1/v1", f"{e} expected an http(s) URL with a host, such as http://127.0.0.1:8000/v1, got "
         "'ftp://127.0.0.1/v1'"),
        ("http://127.0.0.1:99999/v1", f"{e} the port of 'http://127.0.0.1:99999/v1' is not a number in 0-65535"),
        (f"{server.base_url}?api-key={secret}", f"{e} '{server.base_url}' carries a query or fragment ('?...' / "
         "'#...'), which the client would put before its endpoint paths; give the base URL alone (an API key is "
         "read from the environment: --api-key-env)"),
    ]
    for url, want in cases:
        for dry in ([], ["--dry-run"]):
            args = [*fast_cli_args(server), "--base-url", url]  # (the last --base-url counts)
            rc, out, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 2, *args, *dry)
            assert rc == 2 and not out and one_line_error(err) == want and secret not in err, (url, err)
    assert not list(tmp_path.iterdir()) and not server.requests


def test_max_failures_aborts(server, tmp_path, caplog):
    server.push(GEN, *[Reply.status(400, "bad request") for _ in range(4)])
    s = run_track(make_track("surreal", make_cfg(server, max_failures=1)), tmp_path / "ds", limit=6, progress=False)
    assert s.failed == 2 and "max_failures" in s.aborted and not s.complete
    assert len(server.calls(GEN)) == 2
    caplog.clear()  # samples in flight that fail after the abort: it is said once (it was, per such sample)
    server.push(GEN, *[Reply.status(400, "bad request") for _ in range(6)])
    s = run_track(make_track("surreal", make_cfg(server, max_failures=1, concurrency=4)), tmp_path / "ds2", limit=6,
                  progress=False)
    assert s.failed > 2 and "max_failures" in s.aborted
    assert [r.message for r in caplog.records if "max_failures" in r.message] == [s.aborted]


def test_a_rejected_call_is_named_and_its_rerun_not_promised_to_help(server, tmp_path):
    """A non-retryable 4xx (a prompt too long for the image model) fails the sample as `call_rejected`; the
    error no longer only says that a rerun retries it: the same request is rejected again."""
    server.push(GEN, Reply.raw(json.dumps({"error": {"message": "string too long", "type": "invalid_request_error",
                                                     "code": "string_above_max_length"}}).encode(), status=400))
    s = run_track(make_track("surreal", make_cfg(server)), tmp_path / "ds", limit=2, progress=False)
    assert s.failed == 1 and s.written == 1 and s.failures == ["gpt4o/surreal/0000000: call_rejected:image"]
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and m["skipped"]["by_reason"] == {"call_rejected:image": 1}
    assert ("1 of them were rejected by the server with a non-retryable error (HTTP 4xx, call_rejected): a rerun "
            "sends the same requests, which fail again unless their cause is fixed") in m["error"]
    assert len(server.calls(GEN)) == 2  # not retried


def test_base_url_from_the_environment_is_recorded(server, tmp_path, monkeypatch):
    """Without --base-url the openai client calls OPENAI_BASE_URL: the manifest records it (it said null,
    i.e. OpenAI's own, for data made elsewhere)."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    s = run_track(make_track("surreal", make_cfg(server, base_url=None)), tmp_path / "ds", limit=1, progress=False)
    assert s.complete and server.requests
    assert load_manifest(tmp_path / "ds")["info"]["synth"]["config"]["base_url"] == server.base_url


def test_api_key_env_given_the_key_itself(server, tmp_path, monkeypatch):
    """`--api-key-env "$OPENAI_API_KEY"`: one error line that does not show the key, exit status 2, and the
    complete dataset in --out stays as it was (the key went into its manifest's settings, and the dataset
    was marked incomplete)."""
    rc, _, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 1, *fast_cli_args(server))
    assert rc == 0, err
    before = all_file_bytes(tmp_path)
    rc, out, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 2, *fast_cli_args(server),
                            "--api-key-env", API_KEY)
    assert rc == 2 and not out and API_KEY not in err
    assert one_line_error(err).startswith("error: command line: api_key_env: expected the name of an environment "
                                          "variable")
    assert all_file_bytes(tmp_path) == before


def test_full_disk_is_one_error_line_and_the_rerun_completes(server, tmp_path, monkeypatch):
    """The shard writer fails (disk full) at the second record: one error line naming the shard, exit status 2,
    the manifest marked incomplete; the same command later completes the dataset without paying again for
    the calls made (it was a traceback, exit status 1, and no manifest)."""
    from array_record.python import array_record_module

    real = array_record_module.ArrayRecordWriter
    writes = [0]

    class FullDisk:
        def __init__(self, path, options):
            self.w = real(path, options)

        def write(self, b):
            writes[0] += 1
            if writes[0] == 2:
                raise RuntimeError("write() failed: No space left on device")
            self.w.write(b)

        def close(self):
            self.w.close()

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
    args = ["surreal", "--out", tmp_path / "ds", "--limit", 3, *fast_cli_args(server)]
    rc, out, err = data_gen(*args)
    assert rc == 2 and not out
    line = one_line_error(err)
    assert "cannot write the shard" in line and "No space left on device" in line and "run the same command" in line
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and "No space left on device" in m["error"]
    paid = {request_body_key(r) for r in server.requests}
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", real)
    n = len(server.requests)
    rc, out, err = data_gen(*args)
    assert rc == 0, err
    assert json.loads(out)["written"] == 3 and load_manifest(tmp_path / "ds")["complete"]
    assert not paid & {request_body_key(r) for r in server.requests[n:]}  # nothing paid for twice


def test_a_lone_surrogate_in_an_answer_is_replaced(server, tmp_path):
    """Half an emoji in a chat answer's JSON ("\\ud83d") used to be journaled as it was and then fail the
    image call locally on every run (an HTTP body cannot hold it): it becomes U+FFFD."""
    server.push(CHAT, Reply.text('{"prompt": "Two red apples \\ud83d on a table."}'))
    s = run_track(make_track("instruction", make_cfg(server)), tmp_path / "ds", limit=1, progress=False)
    assert s.complete and s.written == 1
    assert server.calls(GEN)[0].json["prompt"].startswith("Two red apples \ufffd on a table.")


def test_answers_lose_the_key_only(server, tmp_path):
    """A chat answer that repeats the API key loses it; words that merely look like the generic key patterns
    ("a flag bearer holding ...", "sk-shaped") are kept: prompts are data."""
    prompt = f"A flag bearer holding a sk-shaped banner, key {API_KEY}."
    server.push(CHAT, Reply.text(json.dumps({"prompt": prompt})))
    s = run_track(make_track("instruction", make_cfg(server)), tmp_path / "ds", limit=1, progress=False)
    assert s.complete
    assert server.calls(GEN)[0].json["prompt"].startswith(
        "A flag bearer holding a sk-shaped banner, key [REDACTED].")


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


def test_an_unknown_client_exception_reaches_neither_manifest_nor_traceback_with_the_key(server, tmp_path,
                                                                                         monkeypatch):
    """An exception of the openai client that classify_error does not know, whose text holds the request's
    headers (as an unwrapped transport error may): it was raised as it was, printed in a traceback and written
    into the dataset's manifest ("aborted: RuntimeError: ...Bearer <key>"). Now redacted, without its chain."""
    from openai.resources.chat.completions import Completions

    from echo4o_jax.eval.judge import ClientCallError

    def boom(self, **kw):
        raise RuntimeError(f"send failed: {{'authorization': 'Bearer {API_KEY}'}}")

    monkeypatch.setattr(Completions, "create", boom)
    with pytest.raises(ClientCallError) as ei:
        run_track(make_track("surreal", make_cfg(server)), tmp_path / "ds", limit=1)
    assert str(ei.value).startswith("RuntimeError: send failed") and API_KEY not in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__
    assert "send failed" in load_manifest(str(tmp_path / "ds"))["error"]
    for p, data in all_file_bytes(tmp_path).items():
        assert API_KEY.encode() not in data, p


def test_api_key_with_a_trailing_newline_is_a_fatal_error(server, tmp_path, monkeypatch):
    """A pasted key with a newline: one line naming the variable (never the key), exit status 2 (a fatal
    API error), no call made; with the key fixed the same command completes the dataset."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY + "\n")
    args = ["surreal", "--out", tmp_path / "ds", "--limit", 2, *fast_cli_args(server)]
    rc, out, err = data_gen(*args)
    assert rc == 2 and not out
    line = one_line_error(err)
    assert "environment variable OPENAI_API_KEY holds a newline" in line and API_KEY not in err
    assert not server.requests and not (tmp_path / "ds").exists()
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    rc, out, err = data_gen(*args)
    assert rc == 0, err
    assert json.loads(out)["complete"] and len(dataset_contents(tmp_path / "ds")) == 2


def test_out_or_journal_dir_that_is_a_file(server, tmp_path):
    """One line naming the path, exit status 2, nothing made (dry run or not), the file left alone."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    cases = [(["--out", f], f"the dataset folder (--out) {f} is a file, not a folder"),
             (["--out", f / "ds"],
              f"the dataset folder (--out) {f / 'ds'} cannot be made: {f} is a file, not a folder"),
             (["--out", tmp_path / "ds", "--journal-dir", f],
              f"the journal folder (--journal-dir) {f} is a file, not a folder")]
    for args, expected in cases:
        for dry in ([], ["--dry-run"]):
            rc, out, err = data_gen("surreal", *args, "--limit", 1, *fast_cli_args(server), *dry)
            assert rc == 2 and one_line_error(err) == f"error: {expected}", (args, dry)
    assert f.read_text() == "keep me" and not (tmp_path / "ds").exists() and not server.requests


def test_corrupt_journal_blob_is_asked_again(server, tmp_path, caplog):
    """A journaled image whose blob no longer matches its sha256 (a flipped byte, same size) is not
    replayed: a warning names the blob and the call, that call alone is asked again and journaled, the
    run completes, and the corrupt bytes never reach the dataset."""
    cfg = make_cfg(server)
    ds = tmp_path / "ds"
    assert run_track(make_track("surreal", cfg), ds, limit=2, progress=False).complete
    good = dataset_contents(ds)
    j = Journal(ds / "journal", read_only=True)
    ref = next(e for e in j.entries() if e["label"] == "gpt4o/surreal/0000000:image")["blobs"][0]
    blob = ds / "journal" / "blobs" / ref["sha256"][:2] / f"{ref['sha256']}.{ref['ext']}"
    image_call = request_body_key(server.calls(GEN)[0])  # sample 0's (one sample at a time)

    def corrupt_and_rebuild() -> list:
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        (ds / "manifest.json").unlink()
        for p in ds.glob("*.array_record"):
            p.unlink()
        caplog.clear()
        n = len(server.requests)
        with caplog.at_level(logging.WARNING):
            s = run_track(make_track("surreal", cfg), ds, limit=2, progress=False)
        assert s.complete and s.written == 2 and not s.skipped
        assert f"gpt4o/surreal/0000000:image: journaled answer not replayed: blob {blob} is corrupt" in caplog.text
        return [request_body_key(r) for r in server.requests[n:]]

    # the same answer comes back: the blob file is repaired, and the dataset is the one made before
    assert corrupt_and_rebuild() == [image_call]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == ref["sha256"]
    assert dataset_contents(ds) == good
    # another answer comes back: it is journaled and written; the corrupt bytes are not
    other = solid_png(32, 32, (1, 2, 3))
    server.push(GEN, Reply.text([other]))
    assert corrupt_and_rebuild() == [image_call]
    written = {rec.id: rec.images[0] for rec in RecordReader(ds, verify=True)}
    assert written["gpt4o/surreal/0000000"] == other and blob.read_bytes() not in written.values()
    (ds / "manifest.json").unlink()  # a rebuild now replays every answer, the new one included
    n = len(server.requests)
    assert run_track(make_track("surreal", cfg), ds, limit=2, progress=False, overwrite=True).complete
    assert len(server.requests) == n
    assert {rec.id: rec.images[0] for rec in RecordReader(ds)} == written


def test_journal_torn_line_and_lock(tmp_path):
    j = Journal(tmp_path / "j")
    ref = j.put_blob(b"\x89PNG\r\n\x1a\nfake", "png")
    j.append({"key": "a", "status": "ok", "text": "x", "blobs": [ref]})
    in_use = f"the journal {tmp_path / 'j'} is in use by another run \\(pid {os.getpid()};"
    with pytest.raises(JournalError, match=in_use):
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


# ------------------------------------------------------------------------------ answers that are not images


def _truncated(fmt: str) -> bytes:
    """The first half of a noisy image: its header reads fine, its pixels do not decode."""
    from PIL import Image

    rng = random.Random(fmt)
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3)).save(buf, format=fmt)
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    assert probe_image(data).format == fmt.lower()  # the header check alone lets it through
    with pytest.raises(RecordError, match="truncated"):
        probe_image(data, check="decode")
    return data


def _journal_blobs(ds) -> list[bytes]:
    return [p.read_bytes() for p in (Path(ds) / "journal" / "blobs").rglob("*") if p.is_file()]


def _decodes(data: bytes) -> bool:
    try:
        probe_image(data, check="decode")
        return True
    except RecordError:
        return False


NOT_AN_IMAGE = b"hello this is not an image"


def test_undecodable_image_answers_are_retried_and_never_journaled(server, tmp_path, caplog):
    truncated = _truncated("PNG")
    # sample 0's image: not an image, then a truncated PNG, then a good one: two retries, one entry
    server.push(GEN, Reply.text([NOT_AN_IMAGE]), Reply.text([truncated]))
    s = run_track(make_track("surreal", make_cfg(server, max_retries=2)), tmp_path / "ok", limit=2, progress=False)
    assert s.complete and s.written == 2 and not s.skipped and s.stats["retries"] == 2
    assert len(server.calls(GEN)) == 4
    images = [e for e in journal_entries(tmp_path / "ok") if e["kind"] == "image"]
    assert sorted(e["attempts"] for e in images) == [1, 3]
    assert all(_decodes(b) for b in _journal_blobs(tmp_path / "ok"))

    # the answer stays undecodable: the sample fails (named), the run is incomplete, nothing is journaled
    caplog.set_level(logging.WARNING)
    cfg = make_cfg(server, max_retries=1)
    server.push(GEN, Reply.text([NOT_AN_IMAGE]), Reply.text([truncated]))
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert not s.complete and s.failed == 1 and s.written == 1
    assert s.failures == ["gpt4o/surreal/0000000: call_failed:image"]
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and "gpt4o/surreal/0000000: call_failed:image" in m["error"]
    assert "gpt4o/surreal/0000000" in caplog.text and "not a decodable image" in caplog.text
    assert [e["kind"] for e in journal_entries(tmp_path / "ds")].count("image") == 1  # sample 1's only
    assert all(_decodes(b) for b in _journal_blobs(tmp_path / "ds"))
    # the next run asks for that image again (and only for it) and completes the dataset
    n = len(server.requests)
    s2 = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert s2.complete and s2.written == 2 and [r.path for r in server.requests[n:]] == [GEN]
    assert all(_decodes(rec.images[0]) for rec in RecordReader(tmp_path / "ds", verify=True))


def test_image_answers_of_another_size_are_retried(server, tmp_path, caplog):
    """An image of another size than the requested one (a misbehaving server or proxy) is a bad answer like
    an undecodable one: retried, never journaled, and the sample fails if it stays wrong (it was written, while
    the record's metadata stated the requested size); "auto" takes any size. Such answers are paid for: in the
    spend (it showed $0.00), and asked once more only (a server answering another size keeps doing so: up to
    max_retries + 1 images were bought per sample, on every rerun)."""
    caplog.set_level(logging.INFO)
    cfg = make_cfg(server, max_retries=3)  # image_size 32x32
    wrong = solid_png(7, 5)
    server.push(GEN, Reply.text([wrong]), Reply.text([wrong]))
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert not s.complete and s.failures == ["gpt4o/surreal/0000000: call_rejected:image"]
    assert len(server.calls(GEN)) == 3  # sample 0's two, sample 1's one
    price = image_cost(cfg.prices, cfg.image_model, cfg.image_size, cfg.image_quality, 0, None)
    assert price > 0 and s.stats["paid_calls_per_model"][cfg.image_model] == 3
    journaled = sum(e["cost"] for e in journal_entries(tmp_path / "ds"))  # (sample 1's image, the chats)
    assert s.stats["spend_usd"] == pytest.approx(journaled + 2 * price, rel=1e-6)  # + the two thrown away
    assert "an image of 7x5 pixels, not the requested size 32x32" in caplog.text
    assert [e["kind"] for e in journal_entries(tmp_path / "ds")].count("image") == 1  # sample 1's only
    server.push(GEN, Reply.text([wrong]))  # the rerun: retried once, then the server's 32x32 answer
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=2, progress=False)
    assert s.complete and s.stats["retries"] == 1
    assert {(probe_image(r.images[0]).width, probe_image(r.images[0]).height)
            for r in RecordReader(tmp_path / "ds")} == {(32, 32)}
    server.push(GEN, Reply.text([wrong]))
    s = run_track(make_track("surreal", make_cfg(server, image_size="auto")), tmp_path / "auto", limit=1,
                  progress=False)
    assert s.complete and s.stats["retries"] == 0
    assert probe_image(next(iter(RecordReader(tmp_path / "auto"))).images[0]).width == 7


def test_journaled_undecodable_image_is_asked_again(server, tmp_path, caplog):
    """A journal written before image answers were decoded may hold a bad image: it is not replayed."""
    cfg = make_cfg(server)
    ds = tmp_path / "ds"
    assert run_track(make_track("surreal", cfg), ds, limit=2, progress=False).complete
    good = dataset_contents(ds)
    first_image_call = request_body_key(server.calls(GEN)[0])
    j = Journal(ds / "journal")
    entry = next(e for e in j.entries() if e["label"] == "gpt4o/surreal/0000000:image")
    j.append({**entry, "blobs": [j.put_blob(NOT_AN_IMAGE, "bin")]})  # the later line wins
    j.close()
    (ds / "manifest.json").unlink()
    for p in ds.glob("*.array_record"):
        p.unlink()
    caplog.set_level(logging.WARNING)
    n = len(server.requests)
    s = run_track(make_track("surreal", cfg), ds, limit=2, progress=False)
    assert s.complete and s.written == 2 and not s.skipped
    assert [request_body_key(r) for r in server.requests[n:]] == [first_image_call]  # asked again, only it
    assert "gpt4o/surreal/0000000:image: journaled image 0" in caplog.text and "asking again" in caplog.text
    assert dataset_contents(ds) == good
    # the new answer superseded the bad entry: a rebuild now replays everything
    (ds / "manifest.json").unlink()
    n = len(server.requests)
    assert run_track(make_track("surreal", cfg), ds, limit=2, progress=False, overwrite=True).complete
    assert len(server.requests) == n


@pytest.mark.parametrize("track_name,refs", [("surreal", False), ("multiref", True), ("multiref", False)])
def test_each_image_is_fully_decoded_once_per_run(server, tmp_path, monkeypatch, track_name, refs):
    """Every image of every record is fully decoded before it is written, once per run: an answer by the
    client (fresh, or replayed from the journal by a rebuild; a generated reference shared by samples
    once), a folder reference by its track; the writer checks headers only."""
    import hashlib

    import echo4o_jax.data.records as records_mod
    import echo4o_jax.synth.client as client_mod
    import echo4o_jax.synth.tracks as tracks_mod

    decoded: list[str] = []

    def counting_probe(data, *, check="header"):
        if check == "decode":
            decoded.append(hashlib.sha256(data).hexdigest())
        return probe_image(data, check=check)

    for mod in (records_mod, client_mod, tracks_mod):
        monkeypatch.setattr(mod, "probe_image", counting_probe)
    kw = {}
    if refs:
        kw["refs_dir"] = small_image_folder(tmp_path / "refs", {"humans": 2, "object": 3, "scenes": 2})
    ds = tmp_path / "ds"
    for replay in (False, True):  # a fresh run, then a rebuild that replays every answer
        decoded.clear()
        n = len(server.requests)
        s = run_track(make_track(track_name, make_cfg(server), **kw), ds, limit=4, progress=False)
        assert s.complete and s.written == 4
        assert (len(server.requests) == n) == replay
        in_run = list(decoded)
        written = {hashlib.sha256(b).hexdigest() for rec in RecordReader(ds) for b in rec.images}
        assert written <= set(in_run)  # every written image was decoded...
        assert len(in_run) == len(set(in_run))  # ...and none twice
        (ds / "manifest.json").unlink()  # the next run rebuilds the dataset from the journal
        for p in ds.glob("*.array_record"):
            p.unlink()


def test_truncated_reference_image_fails_its_samples(server, tmp_path, caplog):
    """Its samples fail before any paid call, and the log names the file; the other samples are written."""
    refs = Path(small_image_folder(tmp_path / "refs", {"humans": 2, "object": 3, "scenes": 2}))
    (refs / "object" / "object_1.jpg").write_bytes(_truncated("JPEG"))
    track = make_track("multiref", make_cfg(server), refs_dir=refs)
    limit = 8
    bad = [i for i in range(limit) if "folder/object/object_1.jpg" in track.plan(i)["refs"]]
    assert 0 < len(bad) < limit
    with caplog.at_level(logging.WARNING):
        s = run_track(track, tmp_path / "ds", limit=limit, progress=False)
    assert not s.complete and s.failed == len(bad) and s.written == limit - len(bad)
    assert s.failures == [f"gpt4o/multiref/{i:07d}: invalid_record:ref_object" for i in bad]
    logged = [r.getMessage() for r in caplog.records if "object_1.jpg" in r.getMessage()]
    assert len(logged) == len(bad) and all("reference file" in m and "cannot read image" in m for m in logged)
    # none of their calls was paid for: one chat call per written sample, none for the failed ones
    assert len(server.calls(CHAT)) == limit - len(bad)
    m = load_manifest(tmp_path / "ds")
    assert m["complete"] is False and f"gpt4o/multiref/{bad[0]:07d}: invalid_record:ref_object" in m["error"]
    for rec in RecordReader(tmp_path / "ds", verify=True):
        assert int(rec.id.rsplit("/", 1)[1]) not in bad
        assert all(_decodes(b) for b in rec.images)


def test_template_declares_the_keys_its_answer_must_hold(server, tmp_path):
    """A template's '# require:' keys are checked (the built-in attributes template's, and a user's own
    template with other keys: the code holds no copy of them)."""
    from echo4o_jax.synth.tracks import template_requires

    builtin = make_track("surreal", make_cfg(server)).template("surreal_attributes")
    assert template_requires(builtin) == ("object", "color", "shape", "size", "material", "structure", "setting")
    tdir = tmp_path / "templates"
    tdir.mkdir()
    text = Path(builtin.path).read_text()
    text = text.replace("# require: object, color, shape, size, material, structure, setting", "# require: hue")
    (tdir / "surreal_attributes.txt").write_text(text)
    cfg = make_cfg(server, malformed_retries=1, template_dir=str(tdir))
    # the fake server's default attributes answer has no 'hue': asked again, then the sample is skipped
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=1, progress=False)
    assert s.written == 0 and s.skipped == {"malformed_answer:surreal_attributes": 1}
    track = make_track("surreal", cfg)
    n_objects = len(track.plan(0)["objects"])
    server.push(CHAT, *[Reply.text('{"hue": "yellow"}')] * n_objects)  # the attributes of each object
    s = run_track(track, tmp_path / "ds2", limit=1, progress=False)
    assert s.complete and s.written == 1
    assert next(iter(RecordReader(tmp_path / "ds2"))).meta["attributes"] == [{"hue": "yellow"}] * n_objects


def test_malformed_shared_attributes_are_asked_again(server, tmp_path):
    """The shared 'normal attributes' answer is validated like any other: a bad one is asked again,
    never stored for the other samples of the object."""
    (tmp_path / "classes.txt").write_text("banana\nteacup\nbicycle\n")  # few objects: each is shared
    cfg = make_cfg(server, malformed_retries=1, surreal_classes=str(tmp_path / "classes.txt"))
    track = make_track("surreal", cfg)
    limit = 8
    obj = track.plan(0)["objects"][0]
    users = [i for i in range(limit) if obj in track.plan(i)["objects"]]
    assert 2 <= len(users) < limit, "the test needs an object used by several (not all) samples"

    def attr_calls():
        return [c for c in server.calls(CHAT) if "List the normal attributes" in message_text(c)
                and f"Object: {obj}" in message_text(c)]

    server.push(CHAT, Reply.text('{"prompt": ""}'))  # sample 0's first call: the attributes of `obj`
    s = run_track(track, tmp_path / "ds", limit=limit, progress=False)
    assert s.complete and s.written == limit and not s.skipped
    assert len(attr_calls()) == 2
    asked = json.loads(server.calls(CHAT)[0].json["messages"][0]["content"].split("Reply with a single JSON object "
                                                                                  "and nothing else:", 1)[1])
    seen = []
    for rec in RecordReader(tmp_path / "ds"):
        for o, a in zip(rec.meta["objects"], rec.meta["attributes"]):
            if o == obj:
                assert set(a) == set(asked) and all(isinstance(v, str) and v.strip() for v in a.values())
                seen.append(a)
    assert len(seen) >= len(users) and all(a == seen[0] for a in seen)

    # still malformed after the retries: every sample of the object is skipped, none uses the bad answer
    server.push(CHAT, Reply.text('{"prompt": ""}'), Reply.text('{"object": "x", "color": ""}'))
    n = len(attr_calls())
    s = run_track(track, tmp_path / "ds2", limit=limit, progress=False)
    assert s.complete and s.written == limit - len(users)
    assert s.skipped == {"malformed_answer:surreal_attributes": len(users)}
    assert len(attr_calls()) - n == 2  # asked twice, then replayed for the other samples
