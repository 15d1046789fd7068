"""The judge client against a local fake OpenAI server: parsing, retries, malformed answers, cache, secrets."""

from __future__ import annotations

import base64
import json
import time

import pytest

from echo4o_jax.eval import judge as J
from fake_openai import FakeOpenAIServer, Reply, message_images, message_text, solid_png

SECRET = "sk-test-7f3a9c1e5b2d4f60a8e1c3b5d7f9a1b3"
CHAT = "/v1/chat/completions"
VERDICT_TPL = J.load_template("geneval_pp")


@pytest.fixture
def server():
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 1, "reason": "all good"}') as s:
        yield s


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def make_judge(server, tmp_path=None, **kw):
    opts = dict(base_url=server.base_url, cache_dir=(tmp_path / "cache") if tmp_path else None,
                concurrency=4, max_retries=3, malformed_retries=2, timeout=5.0, backoff_base=0.001,
                backoff_max=0.01)
    opts.update(kw)
    return J.Judge(**opts)


def image(tmp_path, name="a.png", color=(1, 2, 3)):
    p = tmp_path / name
    p.write_bytes(solid_png(8, 8, color))
    return p


def request(img, prompt="a photo of a cat"):
    return J.JudgeRequest(VERDICT_TPL, {"prompt": prompt, "checklist": "- exactly 1 cat"}, [img])


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,correct", [
    ('{"correct": 1, "reason": "ok"}', 1),
    ('Sure! Here is my verdict:\n```json\n{"correct": 0, "reason": "two cats"}\n```\nHope it helps.', 0),
    ('The image {mostly} works. {"correct": true, "reason": "x"} trailing words', 1),
    ('{"Correct": "0", "reasoning": "no"}', 0),
    ('Answer -> {"correct": 1}', 1),
])
def test_verdict_parser_tolerates_prose(text, correct):
    assert J.parse_verdict_json(text)["correct"] == correct


@pytest.mark.parametrize("text", ["", "I think it is correct.", '{"correct": 2}', '{"correct": "maybe"}',
                                  '{"reason": "no verdict"}', '{"correct": 1', "```json\n[1, 0]\n```"])
def test_verdict_parser_rejects_malformed(text):
    with pytest.raises(J.MalformedAnswer):
        J.parse_verdict_json(text)


def test_score_json_parser():
    assert J.parse_score_json('Reasoning first. {"score": 7, "reasoning": "fine"}') == {"score": 7.0, "reason": "fine"}
    assert J.parse_score_json('{"score": [8.5], "reasoning": "list"}')["score"] == 8.5
    assert J.parse_score_json('{"score": "6/10"}')["score"] == 6.0
    for bad in ('{"score": 11}', '{"score": -1}', '{"score": null}', '{"reasoning": "x"}', "score: 5"):
        with pytest.raises(J.MalformedAnswer):
            J.parse_score_json(bad)


def test_dimension_scores_parser():
    tpl = J.load_template("imagine_bench")
    text = ("Here is my evaluation.\n\n**Fantasy Fulfillment**: 8 - the fur is blue.\n"
            "Identity Preservation: 6/10 — face slightly off\n"
            "- Aesthetic Quality: **9**\n  Sharp and well lit.\n")
    got = J.parse_dimension_scores(text, tpl)
    assert got["scores"] == {"FF": 8.0, "IP": 6.0, "AQ": 9.0}
    assert got["reasons"]["FF"] == "the fur is blue."
    assert got["reasons"]["AQ"] == "Sharp and well lit."
    js = '{"Fantasy Fulfillment": 3, "Identity Preservation": {"score": 4, "reason": "r"}, "AQ": 5}'
    assert J.parse_dimension_scores(js, tpl)["scores"] == {"FF": 3.0, "IP": 4.0, "AQ": 5.0}
    for bad in ("Fantasy Fulfillment: 8\nIdentity Preservation: 6", "Fantasy Fulfillment: 12\n"
                "Identity Preservation: 6\nAesthetic Quality: 1", "no scores at all"):
        with pytest.raises(J.MalformedAnswer):
            J.parse_dimension_scores(bad, tpl)


IMAGINE_TPL = J.load_template("imagine_bench")
_IP_AQ = "\nIdentity Preservation: 6 - fine\nAesthetic Quality: 7 - sharp\n"


@pytest.mark.parametrize("ff_line,score,reason", [
    ("Fantasy Fulfillment: 8 - the fur is blue", 8.0, "the fur is blue"),  # the template's own format
    ("Fantasy Fulfillment: 8.5 - nearly", 8.5, "nearly"),
    ("Fantasy Fulfillment: 8/10. Clear.", 8.0, "Clear."),
    ("**Fantasy Fulfillment:** **10/10** — exact", 10.0, "exact"),
    ("1. Fantasy Fulfillment (FF): 9, blue fur", 9.0, "blue fur"),
    ("Fantasy Fulfillment: 8 - 3 of 4 traits changed", 8.0, "3 of 4 traits changed"),  # a reason may hold numbers
    ("Fantasy Fulfillment: 3/10 - 8 of the traits are missing", 3.0, "8 of the traits are missing"),
    ("Fantasy Fulfillment: **8**/10 - good", 8.0, "good"),  # bold score, then out of 10 (was "ambiguous")
    ("- **Fantasy Fulfillment**: __8__ / 10 — good", 8.0, "good"),
])
def test_dimension_scores_accepts_one_number(ff_line, score, reason):
    got = J.parse_dimension_scores(ff_line + _IP_AQ, IMAGINE_TPL)
    assert got["scores"] == {"FF": score, "IP": 6.0, "AQ": 7.0} and got["reasons"]["FF"] == reason


@pytest.mark.parametrize("ff_line", [
    "Fantasy Fulfillment: 1,5 - decimal comma",
    "Fantasy Fulfillment - 1-3 faint attempt",  # the rubric's range
    "Fantasy Fulfillment: 1–3",
    "Fantasy Fulfillment: 1 - 3 faint attempt",  # the rubric's band, spaced
    "Fantasy Fulfillment: **7** – 9 clearly realised",
    "Fantasy Fulfillment: 9 - 10 details right",  # a range or a reason: asked again
    "Fantasy Fulfillment: 7 - 9/10 clearly realised",
    "Fantasy Fulfillment: 1 - 3/10 faint",
    "Fantasy Fulfillment: 7 or 8 - between",
    "Fantasy Fulfillment: 1 to 3",
    "Fantasy Fulfillment: 7/8",
    "Fantasy Fulfillment: 8/100",
    "Fantasy Fulfillment: **8**,5",
    "Fantasy Fulfillment: 8.5.1",
    "Fantasy Fulfillment: 8 - good\nFantasy Fulfillment: 3 - on reflection, weak",  # two different scores
])
def test_dimension_scores_rejects_ambiguous_numbers(ff_line):
    with pytest.raises(J.MalformedAnswer, match="FF: (ambiguous score|two different scores)"):
        J.parse_dimension_scores(ff_line + _IP_AQ, IMAGINE_TPL)


def test_dimension_scores_reasons_of_a_numbered_list():
    """Each reason on the line under its score: the next numbered label line is not taken as the reason of a
    score line without one (it was, for each label but the last)."""
    labels = [label for _, label in IMAGINE_TPL.dimensions]
    text = "\n".join(f"{i + 1}. {label}: {8 - i}\n   why {i}" for i, label in enumerate(labels))
    got = J.parse_dimension_scores(text, IMAGINE_TPL)
    assert got["reasons"] == {k: f"why {i}" for i, (k, _) in enumerate(IMAGINE_TPL.dimensions)}
    bare = "\n".join(f"{i + 1}. {label}: {8 - i}" for i, label in enumerate(labels))  # no reasons at all
    assert set(J.parse_dimension_scores(bare, IMAGINE_TPL)["reasons"].values()) == {""}


def test_dimension_scores_same_score_twice_is_fine():
    text = "Fantasy Fulfillment: 8 - good" + _IP_AQ + "Summary:\nFantasy Fulfillment: 8\n"
    assert J.parse_dimension_scores(text, IMAGINE_TPL)["scores"]["FF"] == 8.0


def test_ambiguous_score_is_asked_again(server, key_env, tmp_path):
    server.push(CHAT, Reply.text("Fantasy Fulfillment: 1,5 - faint" + _IP_AQ),
                Reply.text("Fantasy Fulfillment: 2 - faint" + _IP_AQ))
    j = make_judge(server)
    res = j.judge(J.JudgeRequest(IMAGINE_TPL, {"prompt": "p", "note": "n"}, [image(tmp_path)]))
    assert res.ok and res.parsed["scores"]["FF"] == 2.0 and res.calls == 2 and j.stats["malformed"] == 1


def test_stats_since_is_one_batch_share(server, key_env, tmp_path):
    j = make_judge(server)
    j.judge(request(image(tmp_path)))
    snap = j.stats_snapshot()
    server.push(CHAT, Reply.status(500, retry_after_ms=1))
    j.judge_many([request(image(tmp_path, "b.png", (9, 9, 9)), prompt="b")])
    assert j.stats_since(snap) == {"requests": 1, "api_calls": 2, "cache_hits": 0, "failures": 0, "retries": 1,
                                   "malformed": 0}
    assert (j.stats["requests"], j.stats["api_calls"]) == (2, 3)


# ------------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------------

def test_builtin_templates_have_versions_and_placeholders():
    for name, ph in [("geneval_pp", {"prompt", "checklist"}), ("imagine_bench", {"prompt", "note"}),
                     ("omnicontext_pf", {"instruction", "n_inputs"}), ("omnicontext_sc", {"instruction", "n_inputs"}),
                     ("omnicontext_sc_scene", {"instruction", "n_inputs"})]:
        t = J.load_template(name)
        assert t.version.startswith(name + "/") and t.placeholders() == ph and t.system and t.user


def test_user_template_file_and_errors(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("# name: mine\n# version: 7\n# parser: verdict_json\n# max_tokens: 50\n"
                 "[system]\nJudge {\"json\"} strictly.\n[user]\nPrompt={{prompt}} list={{ checklist }}\n")
    t = J.load_template(p)
    assert (t.ident, t.max_tokens) == ("mine@7", 50)
    assert t.render({"prompt": "P", "checklist": "C", "unused": 1}) == ('Judge {"json"} strictly.', "Prompt=P list=C")
    with pytest.raises(J.JudgeConfigError, match="checklist"):
        t.render({"prompt": "P"})
    p.write_text("# parser: verdict_json\n[user]\nx\n")
    with pytest.raises(ValueError, match="version"):
        J.load_template(p)
    p.write_text("# version: 1\n# parser: nope\n[user]\nx\n")
    with pytest.raises(ValueError, match="unknown parser"):
        J.load_template(p)
    # every bad file is a TemplateError: a JudgeConfigError (the CLIs print it as one line) and a ValueError
    for text, msg in [("# parser: verdict_json\n[user]\nx\n", "header line '# version: ...' is required"),
                      ("# version: 1\n# parser: verdict_json\n# max_tokens: many\n[user]\nx\n",
                       "'# max_tokens: many' must be a positive integer"),
                      ("# version: 1\n# parser: verdict_json\n", "a [user] section is required")]:
        p.write_text(text)
        with pytest.raises(J.TemplateError) as ei:
            J.load_template(p)
        assert isinstance(ei.value, J.JudgeConfigError) and str(ei.value) == f"{p}: {msg}"
    p.write_bytes(b"# version: 1\n\xff\xfe\n")
    with pytest.raises(J.TemplateError, match="not UTF-8"):
        J.load_template(p)
    with pytest.raises(FileNotFoundError):
        J.load_template("no_such_template")


# ------------------------------------------------------------------------------------------------
# the client against the fake server
# ------------------------------------------------------------------------------------------------

def test_request_shape(server, key_env, tmp_path):
    img = image(tmp_path)
    res = make_judge(server).judge(request(img))
    assert res.ok and res.parsed == {"correct": 1, "reason": "all good"} and res.calls == 1
    (call,) = server.calls(CHAT)
    body = call.json
    assert body["model"] == "gpt-4.1" and body["temperature"] == 0 and body["max_tokens"] == VERDICT_TPL.max_tokens
    assert body["messages"][0]["role"] == "system"
    assert "Instruction: a photo of a cat" in message_text(call)
    (url,) = message_images(call)
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == img.read_bytes()
    assert call.headers["authorization"] == f"Bearer {SECRET}"


def test_retries_on_429_500_and_timeout(server, key_env, tmp_path):
    img = image(tmp_path)
    server.push(CHAT, Reply.status(429, retry_after_ms=1), Reply.status(500, retry_after_ms=1),
                Reply.status(503), Reply.delay(2.0))
    j = make_judge(server, timeout=0.3, max_retries=4)
    t0 = time.time()
    res = j.judge(request(img))
    assert res.ok and res.parsed["correct"] == 1
    assert res.calls == 5 and len(server.calls(CHAT)) == 5
    assert j.stats["retries"] == 4 and time.time() - t0 < 3.0


def test_retries_exhausted_is_a_judge_failure(server, key_env, tmp_path):
    img = image(tmp_path)
    server.push(CHAT, *[Reply.status(429, retry_after_ms=1)] * 4)
    res = make_judge(server, max_retries=3).judge(request(img))
    assert not res.ok and res.parsed is None and "429" in res.error and res.calls == 4
    assert server.pending(CHAT) == 0


def test_garbage_http_body_is_retried(server, key_env, tmp_path):
    server.push(CHAT, Reply.raw(b"<html>proxy error</html>"))
    res = make_judge(server).judge(request(image(tmp_path)))
    assert res.ok and res.calls == 2


def test_backoff_is_exponential_with_jitter():
    j = J.Judge(backoff_base=1.0, backoff_max=5.0)
    for attempt, hi in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        ds = [j._backoff(attempt) for _ in range(50)]
        assert all(hi * 0.5 <= d <= hi for d in ds) and len(set(ds)) > 1
    assert j._backoff(3, {"retry-after-ms": "250"}) == 0.25
    assert j._backoff(3, {"retry-after": "100"}) == 5.0  # capped


def test_malformed_answers_retried_then_failure(server, key_env, tmp_path):
    img = image(tmp_path)
    server.push(CHAT, Reply.text("It looks right to me."), Reply.text('{"correct": 0, "reason": "wrong color"}'))
    res = make_judge(server, cache_dir=tmp_path / "c").judge(request(img))
    assert res.ok and res.parsed["correct"] == 0 and res.calls == 2

    server.reset()
    server.push(CHAT, *[Reply.text("I cannot decide.")] * 3)
    j = make_judge(server, cache_dir=tmp_path / "c", malformed_retries=2)
    res = j.judge(request(img, prompt="another prompt"))
    assert not res.ok and res.calls == 3 and "malformed" in res.error and res.raw == "I cannot decide."
    assert j.stats["failures"] == 1 and j.stats["malformed"] == 3
    # a failure is not cached: the next run asks again
    res2 = j.judge(request(img, prompt="another prompt"))
    assert res2.ok and res2.calls == 1


def test_cache_second_run_makes_no_call(server, key_env, tmp_path):
    imgs = [image(tmp_path, f"{i}.png", (i, i, i)) for i in range(6)]
    reqs = [request(p, prompt=f"prompt {i}") for i, p in enumerate(imgs)]
    first = make_judge(server, tmp_path).judge_many(reqs)
    assert all(r.ok and not r.cached for r in first) and len(server.calls(CHAT)) == 6
    j2 = make_judge(server, tmp_path)
    second = j2.judge_many(reqs)
    assert len(server.calls(CHAT)) == 6 and j2.stats["api_calls"] == 0 and j2.stats["cache_hits"] == 6
    assert [r.parsed for r in second] == [r.parsed for r in first] and all(r.cached for r in second)
    # a cached run needs no key at all
    # key = (image hash, prompt, model, template version, ...): each change means a new call
    imgs[0].write_bytes(solid_png(8, 8, (250, 0, 0)))
    other_tpl = J.JudgeTemplate(**{**VERDICT_TPL.__dict__, "version": "geneval_pp/999"})
    j3 = make_judge(server, tmp_path)
    j3.judge_many([reqs[0], request(imgs[1], prompt="changed"), J.JudgeRequest(other_tpl, reqs[2].variables, reqs[2].images)])
    assert j3.stats["api_calls"] == 3
    make_judge(server, tmp_path, model="gpt-4.1-mini").judge(reqs[3])
    assert len(server.calls(CHAT)) == 10
    # another endpoint or request settings: answered by the judge called, not from another's answers
    make_judge(server, tmp_path, temperature=0.5).judge(reqs[4])
    low = J.JudgeTemplate(**{**VERDICT_TPL.__dict__, "options": {"image_detail": "low"}})
    make_judge(server, tmp_path).judge(J.JudgeRequest(low, reqs[4].variables, reqs[4].images))
    short = J.JudgeTemplate(**{**VERDICT_TPL.__dict__, "max_tokens": 100})
    make_judge(server, tmp_path).judge(J.JudgeRequest(short, reqs[4].variables, reqs[4].images))
    assert len(server.calls(CHAT)) == 13
    with FakeOpenAIServer(chat_handler=lambda r: '{"correct": 0, "reason": "another server"}') as other:
        res = make_judge(other, tmp_path).judge(reqs[5])
        assert not res.cached and res.parsed["reason"] == "another server" and len(other.calls(CHAT)) == 1
    assert SECRET not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_cache_hit_needs_no_key(server, key_env, tmp_path, monkeypatch):
    img = image(tmp_path)
    make_judge(server, tmp_path).judge(request(img))
    monkeypatch.delenv("OPENAI_API_KEY")
    assert make_judge(server, tmp_path).judge(request(img)).cached
    with pytest.raises(J.JudgeConfigError, match="OPENAI_API_KEY"):
        make_judge(server, tmp_path).judge(request(img, prompt="not cached"))


def test_base_url_is_checked():
    for bad in ("127.0.0.1:8000/v1", "ftp://h/v1", "http://h:70000/v1", "http://h/v1?api-key=k", "http://h/v1#x", ""):
        with pytest.raises(ValueError, match="^base_url: "):
            J.Judge(base_url=bad)
    assert J.Judge(base_url="https://h:8443/v1").base_url == "https://h:8443/v1"


def test_api_key_env_and_no_key(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MY_LOCAL_KEY", "local-123456")
    img = image(tmp_path)
    assert make_judge(server, api_key_env="MY_LOCAL_KEY").judge(request(img)).ok
    assert server.calls(CHAT)[-1].headers["authorization"] == "Bearer local-123456"
    assert make_judge(server, require_api_key=False).judge(request(img)).ok


def test_fatal_errors_abort_and_are_redacted(server, key_env, tmp_path):
    server.push(CHAT, Reply.status(401, message=f"Incorrect API key provided: {SECRET}."))
    j = make_judge(server)
    with pytest.raises(J.JudgeFatalError) as ei:
        j.judge_many([request(image(tmp_path))])
    assert SECRET not in str(ei.value) and "401" in str(ei.value)


def test_no_quota_aborts_the_run_at_once(server, key_env, tmp_path):
    """429 insufficient_quota and 400 billing_hard_limit_reached: every further call would fail the same way,
    so the run aborts at the first (as synthesis does), instead of retrying and failing every item."""
    for status, code in ((429, "insufficient_quota"), (400, "billing_hard_limit_reached")):
        body = {"error": {"message": "You exceeded your current quota", "type": code, "code": code}}
        server.push(CHAT, Reply.raw(json.dumps(body).encode(), status=status))
        n = len(server.calls(CHAT))
        with pytest.raises(J.JudgeFatalError, match=code):
            make_judge(server).judge_many([request(image(tmp_path))])
        assert len(server.calls(CHAT)) == n + 1


def test_lone_surrogate_in_an_answer_is_cached(server, key_env, tmp_path):
    """Half an emoji in the answer's JSON ("\\ud83d"): the reason keeps U+FFFD in its place; writing the
    cache used to crash the whole run (UnicodeEncodeError)."""
    server.chat_handler = lambda r: '{"correct": 1, "reason": "nice \\ud83d cat"}'
    res = make_judge(server, tmp_path).judge(request(image(tmp_path)))
    assert res.ok and res.parsed == {"correct": 1, "reason": "nice \ufffd cat"}
    again = make_judge(server, tmp_path).judge(request(image(tmp_path)))
    assert again.cached and again.parsed == res.parsed


def test_api_key_env_holding_a_key_is_refused_without_showing_it(monkeypatch):
    """`--api-key-env "$OPENAI_API_KEY"` (the key instead of the variable's name): refused, and the message
    does not repeat it (it said "the environment variable sk-... is not set")."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # (a key that is a valid identifier too: Groq's gsk_..., mixed case, or a long random run)
    for bad in (SECRET, "MY KEY", "1ABC", "", "gsk_AUDITSECRET123456", "A1B2C3D4E5F60718293A4B5C6D7E8F90"):
        with pytest.raises(J.JudgeConfigError, match="^api_key_env: expected the name of an environment variable") as ei:
            J.Judge(api_key_env=bad)
        assert SECRET not in str(ei.value)
        with pytest.raises(J.JudgeConfigError, match="^api_key_env: ") if bad else pytest.raises(J.JudgeConfigError, match="no API key"):
            J.api_key_from_env(bad, require=True, error=J.JudgeConfigError)
    assert J.Judge(api_key_env="MY_KEY_2").api_key_env == "MY_KEY_2"


def test_an_unknown_client_exception_is_redacted_and_unchained(server, tmp_path, monkeypatch):
    """An exception of the API call that classify_error does not know (here one whose text holds the request's
    headers and a URL with credentials, as an unwrapped transport error may) was raised as it was: printed with
    the key in a traceback. It is raised again redacted, without its chain."""
    key = "plainkey-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    j = make_judge(server, tmp_path)
    client = j._get_client()

    def boom(**kw):
        raise RuntimeError(f"send failed: {{'authorization': 'Bearer {key}'}} via http://user:{key}@proxy/v1")

    monkeypatch.setattr(client.chat.completions, "create", boom)
    with pytest.raises(J.ClientCallError) as ei:
        j.judge(request(image(tmp_path)))
    assert str(ei.value).startswith("RuntimeError: send failed: ") and key not in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_base_url_with_credentials_or_not_a_url_is_refused_without_showing_it():
    """A key given as --base-url was echoed ("got 'sk-...'"); credentials in the URL (user:key@host) were
    accepted and sent as Basic auth instead of the environment's key."""
    for bad in ("plainkey-0123456789abcdef", "gsk_0123456789abcdefABCDEF"):
        with pytest.raises(ValueError) as ei:
            J.check_base_url(bad)
        assert bad not in str(ei.value) and "not shown: it is not a URL and may be a key" in str(ei.value)
    with pytest.raises(ValueError) as ei:
        J.check_base_url("http://user:plainkey-0123456789abcdef@127.0.0.1:8000/v1")
    assert str(ei.value) == ("--base-url: 'http://127.0.0.1:8000/v1' carries credentials (user:password@ before the "
                             "host, not shown); give the URL without them (the API key is read from the environment: "
                             "--api-key-env)")
    with pytest.raises(ValueError, match="got 'htp://host/v1'"):  # a URL typo is still shown
        J.check_base_url("htp://host/v1")


def test_the_environments_base_url_is_checked_when_none_is_given(monkeypatch):
    """Without a base URL the client calls OPENAI_BASE_URL, which was not checked: credentials in it were sent
    as Basic auth, a key put there by mistake went unnoticed. It is checked as --base-url is, and named."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    J.check_base_url(None)  # OpenAI's own
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:plainkey-0123456789abcdef@127.0.0.1:8000/v1")
    with pytest.raises(ValueError) as ei:
        J.Judge(base_url=None)
    assert str(ei.value).startswith("the environment variable OPENAI_BASE_URL (the client's base URL when none is "
                                    "given): 'http://127.0.0.1:8000/v1' carries credentials")
    assert "plainkey" not in str(ei.value)
    monkeypatch.setenv("OPENAI_BASE_URL", "plainkey-0123456789abcdef")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL.*not shown: it is not a URL") as ei:
        J.check_base_url(None)
    assert "plainkey" not in str(ei.value)
    J.check_base_url("http://127.0.0.1:8000/v1")  # a base URL given is the one checked (and called)


def test_key_in_the_answer_is_redacted_from_parsed_and_cache(server, tmp_path, monkeypatch):
    """A judge that repeats the key (not shaped like sk-...: only the Judge knows it) in its reason: neither the
    parsed answer, the cache nor a cached rerun holds it; nor the error of an answer that does not parse."""
    key = "plainkey-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server.chat_handler = lambda r: json.dumps({"correct": 1, "reason": f"you sent {key}"})
    res = make_judge(server, tmp_path).judge(request(image(tmp_path)))
    assert res.ok and res.parsed == {"correct": 1, "reason": "you sent [REDACTED]"} and key not in res.raw
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 1 and key not in cached[0].read_text()
    again = make_judge(server, tmp_path).judge(request(image(tmp_path)))
    assert again.cached and again.parsed == res.parsed
    server.push(CHAT, *[Reply.text(f"Fantasy Fulfillment: 1,5 {key}" + _IP_AQ)] * 3)
    bad = make_judge(server).judge(J.JudgeRequest(IMAGINE_TPL, {"prompt": "p", "note": "n"}, [image(tmp_path)]))
    assert not bad.ok and "ambiguous score" in bad.error and key not in bad.error and key not in bad.raw


def test_client_error_is_item_failure_and_redacted(server, key_env, tmp_path):
    server.push(CHAT, Reply.status(400, message=f"bad image (key {SECRET[:20]}...)"))
    res = make_judge(server).judge(request(image(tmp_path)))
    assert not res.ok and "400" in res.error and SECRET[:12] not in res.error and res.calls == 1


def test_unreadable_image(server, key_env, tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"not a png")
    res = make_judge(server).judge(request(p))
    assert not res.ok and res.image_error and "cannot read image" in res.error and not server.calls(CHAT)


def test_an_answer_with_a_key_shaped_word_is_kept_whole(server, key_env, tmp_path):
    """Only the key is taken out of an answer: the key-shaped patterns ("Bearer ...") cut "a flag bearer too"}
    at its end, and the answer, unreadable, was a judge failure after 3 paid calls (and on every rerun)."""
    reason = "All four items hold; the person is a flag bearer too"
    server.chat_handler = lambda r: json.dumps({"correct": 1, "reason": reason})
    res = make_judge(server).judge(request(image(tmp_path)))
    assert res.ok and res.parsed == {"correct": 1, "reason": reason} and len(server.calls(CHAT)) == 1


def test_a_jpeg_cut_short_is_unreadable(server, key_env, tmp_path):
    """verify() reads no JPEG data: a JPEG cut short (an interrupted copy) was sent and judged as it was."""
    from PIL import Image
    import io
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, format="JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 3])
    res = make_judge(server).judge(request(p))
    assert not res.ok and res.image_error and "cannot read image" in res.error and not server.calls(CHAT)


def test_a_key_in_the_base_urls_path_is_not_recorded(monkeypatch):
    """A gateway URL with the key in its path: refused nowhere, it was written whole into manifests and
    results (`describe`)."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    d = J.Judge(base_url="https://gw.example.com/sk-proj-PATHSECRET12345/v1").describe()
    assert d["base_url"] == "https://gw.example.com/sk-[REDACTED]/v1"


def test_large_image_is_downscaled(tmp_path):
    from PIL import Image
    import io

    url = J.encode_image(solid_png(300, 200), max_pixels=100 * 100)
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size[0] * im.size[1] <= 100 * 100 and abs(im.size[0] / im.size[1] - 1.5) < 0.05


def test_an_interrupt_stops_the_retries_of_the_calls_in_flight(server, key_env, tmp_path, capsys):
    """A Ctrl-C while judging: the requests in flight are not retried, nothing new is sent (their retries went
    on, each a new paid request, for minutes, silently)."""
    import os
    import signal
    import threading

    server.push(CHAT, *[Reply.status(500)] * 400)  # a server down: every call retried
    j = make_judge(server, concurrency=2, max_retries=100, backoff_base=0.2, backoff_max=0.2)
    imgs = [image(tmp_path, f"{i}.png", (i, i, i)) for i in range(4)]
    sent = []

    def interrupt():  # once calls are being retried
        deadline = time.monotonic() + 60
        while len(server.calls(CHAT)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent.append(len(server.calls(CHAT)))
        os.kill(os.getpid(), signal.SIGINT)  # (a real signal: it interrupts the main thread's wait)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        j.judge_many([request(p) for p in imgs])
    stopped = time.monotonic()
    time.sleep(0.6)  # (retries that went on would be sent meanwhile)
    assert len(server.calls(CHAT)) <= sent[0] + 2, (sent, len(server.calls(CHAT)))
    assert time.monotonic() - stopped < 2.0
    assert "nothing new is sent" in capsys.readouterr().err


def test_concurrency_and_order(server, key_env, tmp_path):
    """Up to `concurrency` requests in flight at once (the server counts them), answers in request order."""
    import threading
    import time

    lock, flight = threading.Lock(), {"now": 0, "peak": 0}

    def answer(r):
        with lock:
            flight["now"] += 1
            flight["peak"] = max(flight["peak"], flight["now"])
        time.sleep(0.05)  # (long enough for the others to arrive)
        with lock:
            flight["now"] -= 1
        return json.dumps({"correct": int("odd" in message_text(r)), "reason": ""})

    server.chat_handler = answer
    reqs = [request(image(tmp_path, f"{i}.png", (i, 0, 0)), prompt=("odd" if i % 2 else "even") + f" {i}")
            for i in range(16)]
    res = make_judge(server, concurrency=8).judge_many(reqs)
    assert [r.parsed["correct"] for r in res] == [i % 2 for i in range(16)]
    assert 1 < flight["peak"] <= 8, flight


def test_redact():
    assert J.redact(f"x {SECRET} y", [SECRET]) == "x [REDACTED] y"
    assert "sk-proj-abc" not in J.redact("key sk-proj-abcdef****wxyz here")
    assert J.redact("Authorization: Bearer abc.def") == "Authorization: Bearer [REDACTED]"


def test_fake_server_image_endpoints():
    """The fake server also speaks /v1/images/generations and /v1/images/edits (b64_json)."""
    import openai

    with FakeOpenAIServer() as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0, timeout=5)
        g = c.images.generate(model="gpt-image-1", prompt="a cat", size="32x16", n=2)
        assert len(g.data) == 2
        from PIL import Image
        import io

        with Image.open(io.BytesIO(base64.b64decode(g.data[0].b64_json))) as im:
            assert im.size == (32, 16)
        e = c.images.edit(model="gpt-image-1", prompt="make it blue",
                          image=[("a.png", solid_png(), "image/png"), ("b.png", solid_png(), "image/png")])
        assert len(e.data) == 1
        (req,) = s.calls("/v1/images/edits")
        assert req.form["prompt"] == "make it blue" and sum(len(v) for v in req.files.values()) == 2
        s.push("/v1/images/generations", Reply.status(429, retry_after_ms=1))
        with pytest.raises(openai.RateLimitError):
            c.images.generate(model="gpt-image-1", prompt="x")
