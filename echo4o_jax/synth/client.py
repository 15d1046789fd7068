"""The journaled, rate-limited, retrying API client of the synthesis tracks (official ``openai`` client).

Every call goes through :meth:`SynthClient._call`:

1. its **key** (sha256 of the canonical request and a scope, see :mod:`.journal`) is looked up in the
   journal: a journaled answer is *replayed* (no HTTP call, no cost); a journaled refusal raises
   :class:`Refused` again. Two samples asking the same shared question at once make one call.
2. otherwise the call waits for its model's **rate limiter** (requests per minute, evenly spaced) and a
   slot of the **concurrency** semaphore, and is made with the client's own retries off;
3. 429 / 408 / 409 / 5xx, time-outs, connection errors and unreadable bodies (an image answer whose
   bytes do not fully decode as an image, or of another size than the requested one, included: such an
   answer is paid for, and counted in the spend; another size is asked once more only, then the call is
   ``rejected``: a server that answers another size keeps doing so) are **retried** with
   exponential backoff and full jitter, or after the server's ``retry-after-ms`` / ``retry-after``
   (:func:`echo4o_jax.eval.judge._retry_after`), up to ``max_retries`` times, then :class:`CallFailed`
   (not journaled: a later run tries again). 429 ``insufficient_quota``, 400 ``billing_hard_limit_reached``,
   401, 403 and 404 abort the run (:class:`SynthFatalError`): every further call would fail the same way.
   Another 4xx fails the call at once (:class:`CallFailed` with ``rejected``): the same request would be
   rejected again;
4. a **content-policy refusal** (an HTTP 400 whose code or message names the safety system / content
   policy / moderation, ``finish_reason == "content_filter"``, a ``refusal`` message, or an answer
   matching ``refusal_patterns``) is journaled with status ``refused`` and raised as :class:`Refused`;
5. a successful answer is journaled (images first, as blobs) with its usage and estimated cost. A
   journaled image answer with a missing or corrupt blob (sha256 mismatch), or whose blobs do not decode
   or are not of the requested size (written by an older version), is not replayed: it is asked again
   (with a warning naming the blob and the call), and the new answer's entry supersedes it (a corrupt blob
   file is rewritten when the same bytes come back).

The API key is read from the environment variable ``cfg.api_key_env`` when the first HTTP call is
made; it is passed to the ``openai`` client only, and removed (:func:`echo4o_jax.eval.judge.redact`)
from every error text this module logs, raises or journals.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Sequence

from echo4o_jax.data.records import RecordError, probe_image
from echo4o_jax.eval.judge import ClientCallError, _retry_after, api_key_from_env, clean_text, redact
from echo4o_jax.synth.config import SynthConfig
from echo4o_jax.synth.journal import BlobError, Journal, answered_here
from echo4o_jax.synth.resources import data_url_digest

log = logging.getLogger(__name__)

__all__ = ["SynthClient", "CallResult", "Refused", "CallFailed", "SynthFatalError", "Aborted",
           "classify_error", "request_key", "chat_key", "chat_params", "image_key", "image_params", "chat_cost", "image_cost",
           "CallStats"]


class SynthFatalError(RuntimeError):
    """Every further call would fail the same way (bad key, no access, unknown model, no quota)."""


class CallFailed(RuntimeError):
    """A call that failed after its retries, or (`rejected`) with a non-retryable 4xx; not journaled."""

    def __init__(self, message: str, rejected: bool = False):
        super().__init__(message)
        self.rejected = rejected


class Refused(RuntimeError):
    """The model or the server refused on content-policy grounds (journaled: never asked again)."""


class Aborted(RuntimeError):
    """The run is stopping; no new call is started."""


@dataclasses.dataclass
class CallResult:
    key: str
    text: str | None = None
    images: list[bytes] = dataclasses.field(default_factory=list)
    cost: float = 0.0
    replayed: bool = False


# ------------------------------------------------------------------------------------------- prices


def _usage_dict(usage: Any) -> dict | None:
    if usage is None:
        return None
    if hasattr(usage, "model_dump"):
        try:
            return usage.model_dump(exclude_none=True)
        except Exception:  # a non-pydantic stand-in
            pass
    return dict(usage) if isinstance(usage, dict) else None


def chat_cost(prices: dict, model: str, input_tokens: float, output_tokens: float) -> float:
    p = prices.get(model) or {}
    return (input_tokens * float(p.get("input_per_1m", 0.0)) + output_tokens * float(p.get("output_per_1m", 0.0))) / 1e6


def image_cost(prices: dict, model: str, size: str, quality: str, n_inputs: int = 0,
               usage: dict | None = None) -> float:
    """USD of one image call: from token usage when the response has it and token prices are set,
    else the per-image table (+ per reference image for edits)."""
    p = prices.get(model) or {}
    if usage and "output_per_1m" in p and usage.get("output_tokens") is not None:
        det = usage.get("input_tokens_details") or {}
        text_in = det.get("text_tokens", usage.get("input_tokens", 0) if not det else 0) or 0
        image_in = det.get("image_tokens", 0) or 0
        return (text_in * float(p.get("text_input_per_1m", 0.0)) + image_in * float(p.get("image_input_per_1m", 0.0))
                + usage["output_tokens"] * float(p["output_per_1m"])) / 1e6
    table = p.get("per_image") or {}

    def per_row(row: dict) -> float:
        q = quality if quality in row else "high"
        return float(row.get(q, max(row.values()) if row else 0.0))

    if isinstance(table, (int, float)):
        per = float(table)
    elif size == "auto" and table:  # the model picks the shape: the dearest one, so an estimate is not short
        per = max(per_row(r) for r in table.values())
    else:
        per = per_row(table.get(size) or table.get("1024x1024") or (next(iter(table.values())) if table else {}))
    return per + n_inputs * float(p.get("per_input_image", 0.0))


# ------------------------------------------------------------------------------------------- keys


def _canonical_messages(messages: Sequence[dict]) -> list:
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = [{**part, "image_url": {**part["image_url"], "url": data_url_digest(part["image_url"]["url"])}}
                 if part.get("type") == "image_url" else part for part in c]
        out.append({**m, "content": c})
    return out


def request_key(kind: str, model: str, scope: str, payload: dict) -> str:
    """The journal key of a call: sha256 of the canonical request and its scope."""
    blob = json.dumps({"kind": kind, "model": model, "scope": scope, "payload": payload}, sort_keys=True,
                      ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def chat_params(temperature: float | None, max_tokens: int | None, response_format: str | None) -> dict:
    params: dict[str, Any] = {}
    if temperature is not None:
        params["temperature"] = float(temperature)
    if max_tokens:
        params["max_tokens"] = int(max_tokens)
    if response_format:
        params["response_format"] = {"type": response_format}
    return params


def chat_key(model: str, scope: str, messages: Sequence[dict], params: dict, attempt: int = 0) -> str:
    return request_key("chat", model, scope, {"messages": _canonical_messages(messages), "params": params,
                                              "attempt": attempt})


def image_params(cfg: SynthConfig, model: str) -> dict:
    """The parameters of an image generation / edit call (besides prompt, images and n)."""
    p: dict[str, Any] = {"size": cfg.image_size}
    if cfg.image_quality:
        p["quality"] = cfg.image_quality
    if cfg.image_output_format:
        p["output_format"] = cfg.image_output_format
    if model.startswith("dall-e"):
        p["response_format"] = "b64_json"
    return p


def image_key(cfg: SynthConfig, prompt: str, scope: str) -> str:
    model = cfg.image_model
    return request_key("image", model, scope, {"prompt": prompt, "params": image_params(cfg, model)})


# ------------------------------------------------------------------------------------------- limiter


class _RateLimiter:
    """At most `per_minute` starts per minute, evenly spaced (0: unlimited)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            t = max(now, self._next)
            self._next = t + self.interval
        if t > now and stop.wait(t - now):
            raise Aborted("stopping")


class CallStats:
    """Thread-safe counters shown by the progress bar and returned by a run."""

    FIELDS = ("http_calls", "paid_calls", "replayed", "retries", "refusals", "call_failures")

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {f: 0 for f in self.FIELDS}
        self.spend = 0.0  # USD of the paid calls made by this run
        self.replayed_spend = 0.0  # USD of the answers replayed from the journal
        self.per_model: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def paid(self, model: str, cost: float) -> None:
        with self._lock:
            self.counts["paid_calls"] += 1
            self.spend += cost
            self.per_model[model] = self.per_model.get(model, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {**self.counts, "spend_usd": round(self.spend, 6),
                    "replayed_spend_usd": round(self.replayed_spend, 6), "paid_calls_per_model": dict(self.per_model)}


_REFUSAL_CODES = {"moderation_blocked", "content_policy_violation", "content_filter", "safety_violation"}
_REFUSAL_TEXT = re.compile(r"safety system|content[ _]policy|content[ _]filter|safety[ _]violation|moderation[ _]blocked",
                           re.I)


class SynthClient:
    """Thread-safe; see the module docstring."""

    def __init__(self, cfg: SynthConfig, journal: Journal, *, client: Any = None,
                 on_event: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.journal = journal
        self.endpoint = cfg.endpoint()  # (journaled with each answer: another server's are not replayed)
        self.stats = CallStats()
        self.stop = threading.Event()
        self._client = client
        self._secrets: list[str] = []
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._slots = threading.BoundedSemaphore(max(1, cfg.concurrency))
        self._limiters = {"chat": _RateLimiter(cfg.chat_rpm), "image": _RateLimiter(cfg.image_rpm)}
        self._fatal: str | None = None
        self._on_event = on_event or (lambda name: None)
        self._refusal_res = [re.compile(p, re.I) for p in cfg.refusal_patterns]
        self._warned_prices: set[str] = set()
        self._decoded: set[str] = set()  # sha256 of the image answers fully decoded in this run

    # ------------------------------------------------------------------------------------------ API
    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def chat(self, messages: list[dict], *, model: str, scope: str, label: str, temperature: float | None = None,
             max_tokens: int | None = None, response_format: str | None = None, attempt: int = 0) -> CallResult:
        params = chat_params(temperature, max_tokens, response_format)
        key = chat_key(model, scope, messages, params, attempt)

        def do(client):
            resp = client.chat.completions.create(model=model, messages=messages, **params)
            choices = getattr(resp, "choices", None)
            if not choices:
                raise ValueError("response without choices")
            ch = choices[0]
            msg = ch.message
            usage = _usage_dict(getattr(resp, "usage", None))
            refusal = getattr(msg, "refusal", None)
            # no key echoed back (the key itself only: the generic patterns rewrite ordinary words of a prompt), no
            # lone surrogate, which no later request can send
            text = redact(clean_text(msg.content or ""), self._secrets, patterns=False)
            if refusal or getattr(ch, "finish_reason", None) == "content_filter" or self._looks_refused(text):
                raise _RefusedAnswer(refusal or text or "content_filter", usage)
            return {"text": text}, usage

        def cost(usage):
            if model not in self.cfg.prices:
                self._warn_price(model)
            u = usage or {}
            return chat_cost(self.cfg.prices, model, u.get("prompt_tokens", 0) or 0, u.get("completion_tokens", 0) or 0)

        return self._call(key, "chat", model, label, do, cost)

    def generate_image(self, prompt: str, *, scope: str, label: str) -> CallResult:
        model = self.cfg.image_model
        params = image_params(self.cfg, model)
        key = image_key(self.cfg, prompt, scope)

        def do(client):
            resp = client.images.generate(model=model, prompt=prompt, n=1, **params)
            return self._images_of(resp, params["size"])

        return self._call(key, "image", model, label, do,
                          lambda usage: self._image_cost(model, 0, usage))

    def edit_image(self, images: Sequence[tuple[str, bytes, str]], prompt: str, *, scope: str,
                   label: str) -> CallResult:
        """`images`: (file name, bytes, mime type) of each reference, in order."""
        model = self.cfg.edit_model_name
        params = image_params(self.cfg, model)
        digests = [hashlib.sha256(b).hexdigest() for _, b, _ in images]
        key = request_key("edit", model, scope, {"prompt": prompt, "params": params, "images": digests})

        def do(client):
            resp = client.images.edit(model=model, image=[tuple(x) for x in images], prompt=prompt, n=1, **params)
            return self._images_of(resp, params["size"])

        return self._call(key, "edit", model, label, do,
                          lambda usage: self._image_cost(model, len(images), usage))

    # ------------------------------------------------------------------------------------------ internals
    def _image_cost(self, model: str, n_inputs: int, usage: dict | None) -> float:
        if model not in self.cfg.prices:
            self._warn_price(model)
        return image_cost(self.cfg.prices, model, self.cfg.image_size, self.cfg.image_quality, n_inputs, usage)

    def _warn_price(self, model: str) -> None:
        if model not in self._warned_prices:
            self._warned_prices.add(model)
            log.warning("no price for model %r in the config's price table: its spend counts as 0", model)

    @staticmethod
    def _images_of(resp, size: str) -> tuple[dict, dict | None]:
        """(the answer's images, its usage); an image that is not one to keep is an _UnusableAnswer."""
        usage = _usage_dict(getattr(resp, "usage", None))
        data = getattr(resp, "data", None) or []
        out = []
        for d in data:
            b64 = getattr(d, "b64_json", None)
            if not b64:
                raise ValueError("image response without b64_json (a URL answer is not supported)")
            try:
                img = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"image response with bad base64: {e}") from None
            problem, wrong_size = _image_problem(img, size)
            if problem:  # never journaled: retried like any unreadable answer
                raise _UnusableAnswer(f"image response {len(out)}: {problem}", usage, wrong_size)
            out.append(img)
        if not out:
            raise ValueError("image response without images")
        return {"images": out}, usage

    def _looks_refused(self, text: str) -> bool:
        head = (text or "").strip()[:300]
        if head.startswith("{") or head.startswith("```"):
            return False
        return any(r.search(head) for r in self._refusal_res)

    def _api_key(self) -> str:
        value = api_key_from_env(self.cfg.api_key_env, require=self.cfg.require_api_key, error=SynthFatalError)
        if value is None:
            return "no-key"
        self._secrets.append(value)  # redacted from every text we keep
        return value

    def _get_client(self):
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                self._client = OpenAI(api_key=self._api_key(), base_url=self.cfg.base_url, max_retries=0,
                                      timeout=self.cfg.timeout)
            return self._client

    def _backoff(self, attempt: int, headers) -> float:
        """The server's retry-after when given, else exponential backoff with full jitter."""
        server_says = _retry_after(headers)
        cap = self.cfg.backoff_max
        if server_says is None:
            return random.uniform(0.0, min(cap, self.cfg.backoff_base * 2.0 ** (attempt - 1)))
        return min(server_says, cap)

    def _replayable_images(self, entry: dict, label: str) -> list[bytes] | None:
        """The images of a journaled answer, or None when it cannot be replayed (asked again, with a
        warning): a missing blob, a corrupt one (its bytes do not match its sha256: a disk or a copy went
        wrong), or an image that does not decode (a bad answer journaled by an older version)."""
        refs = entry.get("blobs") or []
        try:
            images = [self.journal.read_blob(ref) for ref in refs]  # (each checked against its sha256)
        except BlobError as e:
            log.warning("%s: journaled answer not replayed: %s; asking again", label, e)
            return None
        for i, (ref, img) in enumerate(zip(refs, images)):
            if ref["sha256"] in self._decoded:  # decoded once per run (a shared answer is replayed per use)
                continue
            problem, _ = _image_problem(img, self.cfg.image_size)
            if problem:
                log.warning("%s: journaled image %d (%s): %s; asking again", label, i, ref["sha256"][:12], problem)
                return None
            self._decoded.add(ref["sha256"])
        return images

    def _replay(self, entry: dict, images: list[bytes]) -> CallResult:
        self.stats.add("replayed")
        with self.stats._lock:
            self.stats.replayed_spend += float(entry.get("cost") or 0.0)
        self._on_event("replayed")
        if entry.get("status") == "refused":
            raise Refused(entry.get("error") or "refused (journaled)")
        text = entry.get("text")
        return CallResult(key=entry["key"], text=clean_text(text) if isinstance(text, str) else text, images=images,
                          cost=float(entry.get("cost") or 0.0), replayed=True)

    def _call(self, key: str, kind: str, model: str, label: str, do, cost_of) -> CallResult:
        while True:
            e = self.journal.get(key)
            images = self._replayable_images(e, label) if answered_here(e, self.endpoint) else None
            if images is not None:
                return self._replay(e, images)
            with self._lock:
                if self.journal.get(key) is not e:
                    continue  # an answer was journaled meanwhile: look at it
                ev = self._inflight.get(key)
                owner = ev is None
                if owner:
                    ev = self._inflight[key] = threading.Event()
            if owner:
                break
            ev.wait()  # another thread makes this call; then replay its answer (or try ourselves)
        try:
            return self._call_owned(key, kind, model, label, do, cost_of)
        finally:
            with self._lock:
                self._inflight.pop(key).set()

    def _call_owned(self, key: str, kind: str, model: str, label: str, do, cost_of) -> CallResult:
        limiter = self._limiters["chat" if kind == "chat" else "image"]
        attempts = 0
        while True:
            if self._fatal:
                raise SynthFatalError(self._fatal)
            if self.stop.is_set():
                raise Aborted("stopping")
            client = self._get_client()
            limiter.wait(self.stop)
            attempts += 1
            with self._slots:
                self.stats.add("http_calls")
                try:
                    out, usage = do(client)
                except _RefusedAnswer as r:
                    return self._refused(key, kind, model, label, r.reason, attempts, cost_of(r.usage), r.usage)
                except _UnusableAnswer as u:  # paid for, thrown away: in the spend (it showed $0.00)
                    self.stats.paid(model, cost_of(u.usage))
                    verdict = ("fail" if u.wrong_size and attempts >= 2 else "retry", f"unusable answer: {u}", None)
                except Exception as e:  # noqa: BLE001 -- sorted by classify_error; unknown kinds re-raised
                    verdict = classify_error(e)
                    if verdict is None:
                        raise ClientCallError(self.redact(f"{type(e).__name__}: {e}")) from None
                else:
                    return self._succeeded(key, kind, model, label, out, usage, attempts, cost_of(usage))
            action, err, headers = verdict
            if action == "refused":
                return self._refused(key, kind, model, label, err, attempts, 0.0, None)
            if action == "fatal":
                self._fatal = self.redact(f"{model}: {err}")
                raise SynthFatalError(self._fatal)
            if action == "fail" or attempts > self.cfg.max_retries:
                self.stats.add("call_failures")
                why = err if action == "fail" else f"gave up after {attempts} attempts; last error: {err}"
                raise CallFailed(self.redact(f"{label}: {why}"), rejected=action == "fail")
            self.stats.add("retries")
            self._on_event("retry")
            delay = self._backoff(attempts, headers)
            log.info("%s: %s; retry %d/%d in %.2fs", label, self.redact(err), attempts, self.cfg.max_retries, delay)
            if self.stop.wait(delay):
                raise Aborted("stopping")

    def _succeeded(self, key, kind, model, label, out, usage, attempts, cost) -> CallResult:
        blobs = []
        for b in out.get("images", []):  # (each fully decoded and its size checked by _images_of)
            blobs.append(self.journal.put_blob(b, _ext_of(b)))
            self._decoded.add(blobs[-1]["sha256"])
        entry = {"key": key, "kind": kind, "model": model, "label": label, "status": "ok", "text": out.get("text"),
                 "blobs": blobs, "usage": usage, "cost": round(cost, 8), "attempts": attempts,
                 "endpoint": self.endpoint}
        self.journal.append(entry)
        self.stats.paid(model, cost)
        self._on_event("paid")
        return CallResult(key=key, text=out.get("text"), images=list(out.get("images", [])), cost=cost)

    def _refused(self, key, kind, model, label, reason, attempts, cost, usage) -> CallResult:
        reason = self.redact(str(reason))[:500]
        self.journal.append({"key": key, "kind": kind, "model": model, "label": label, "status": "refused",
                             "error": reason, "blobs": [], "usage": usage, "cost": round(cost, 8),
                             "attempts": attempts, "endpoint": self.endpoint})
        self.stats.paid(model, cost)
        self.stats.add("refusals")
        self._on_event("refused")
        raise Refused(reason)


class _UnusableAnswer(ValueError):
    """An image answer received (and paid for) but not kept: undecodable, or of another size (`wrong_size`)."""

    def __init__(self, problem: str, usage: dict | None, wrong_size: bool):
        super().__init__(problem)
        self.usage = usage
        self.wrong_size = wrong_size


class _RefusedAnswer(Exception):
    def __init__(self, reason: str, usage: dict | None):
        super().__init__(reason)
        self.reason = reason
        self.usage = usage


def classify_error(e: BaseException) -> tuple[str, str, Any] | None:
    """What to do after an exception of one call: (action, message, response headers), action one of
    ``retry`` (429 / 408 / 409 / 5xx, time-out, connection error, unreadable answer), ``refused``
    (content policy), ``fatal`` (401 / 403 / 404, no quota, billing cap) or ``fail`` (another 4xx); None for an
    exception that is not about the call (a bug: re-raised)."""
    import openai

    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        code, etype, text = _error_fields(e)
        desc = f"HTTP {status}" + (f" {code or etype}" if (code or etype) else "") + f": {text or e}"
        hdrs = e.response.headers if getattr(e, "response", None) is not None else None
        if status == 400 and (code in _REFUSAL_CODES or etype in _REFUSAL_CODES or _REFUSAL_TEXT.search(text or "")):
            return "refused", desc, hdrs
        if status in (401, 403, 404) or (status in (400, 429) and _NO_QUOTA & {code, etype}):
            return "fatal", f"the server refused ({type(e).__name__}): {desc}", hdrs
        transient = status in (408, 409, 429) or status >= 500
        return ("retry" if transient else "fail"), desc, hdrs
    if isinstance(e, openai.APIConnectionError):  # time-outs included
        return "retry", f"{type(e).__name__}: {e}", None
    if isinstance(e, (openai.OpenAIError, ValueError, KeyError, AttributeError, TypeError)):
        return "retry", f"unreadable answer ({type(e).__name__}): {e}", None
    return None


# 429 insufficient_quota (no credit) and 400 billing_hard_limit_reached (the account's spending cap): every
# further call fails the same way until the account changes
_NO_QUOTA = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


def _error_fields(e) -> tuple[str | None, str | None, str | None]:
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        err = {}
    code = err.get("code", getattr(e, "code", None))
    etype = err.get("type", getattr(e, "type", None))
    msg = err.get("message") or getattr(e, "message", None)
    return (str(code) if code is not None else None, str(etype) if etype is not None else None,
            str(msg) if msg is not None else None)


def _image_problem(data: bytes, size: str) -> tuple[str | None, bool]:
    """(why `data` is not an image answer to keep, None when it is; whether that is its size): it does not
    fully decode (the pixels are decoded, so a truncated file is caught, not only a bad header), or it is not
    of the requested `size` (WIDTHxHEIGHT; "auto": any), which the record's metadata states."""
    try:
        info = probe_image(data, check="decode")
    except RecordError as e:
        return f"not a decodable image ({e})", False
    if size != "auto" and f"{info.width}x{info.height}" != size:
        return f"an image of {info.width}x{info.height} pixels, not the requested size {size}", True
    return None, False


def _ext_of(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"
