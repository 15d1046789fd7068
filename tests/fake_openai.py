"""A scriptable, OpenAI-compatible HTTP server on 127.0.0.1 for tests (no network, stdlib only).

Endpoints (all under ``/v1``):

* ``POST /v1/chat/completions``: answers with ``chat_handler(request) -> str`` (the assistant message
  content) unless a scripted reply is queued;
* ``POST /v1/images/generations`` (JSON body) and ``POST /v1/images/edits`` (multipart form): answer
  ``{"created", "data": [{"b64_json": ...}] * n}``; the images come from ``image_handler(request)``
  (default: solid-colour PNGs of the requested ``size``);
* ``GET /v1/models``: a one-model list.

Faults and scripted answers are queued per path with :meth:`FakeOpenAIServer.push` and are consumed
first-in first-out, one per request; each is a :class:`Reply`:

    Reply.text("...")                      # a normal answer with this content (chat) / these images
    Reply.status(429, retry_after_ms=1)    # an HTTP error with an OpenAI-shaped error body
    Reply.delay(2.0)                       # stall before answering (a client timeout)
    Reply.raw(b"not json", status=200)     # a broken HTTP body

Every request is recorded in ``server.requests`` (:class:`Request`: path, headers, parsed JSON or form)
so that tests can count calls and look at what was sent. Use as a context manager; the server thread is
a daemon and ``close()`` interrupts pending delays, so no test can hang on it.
"""

from __future__ import annotations

import base64
import dataclasses
import email.parser
import email.policy
import io
import json
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["FakeOpenAIServer", "Reply", "Request", "solid_png", "message_text", "message_images"]


@dataclasses.dataclass
class Reply:
    kind: str = "text"  # text | status | delay | raw
    content: Any = None  # text: str (chat) or list[bytes] (images); raw: bytes
    status_code: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    then: "Reply | None" = None  # delay: what to answer after the stall (default: the handler)

    @classmethod
    def text(cls, content: Any) -> "Reply":
        return cls(kind="text", content=content)

    @classmethod
    def status(cls, code: int, message: str | None = None, retry_after_ms: int | None = None,
               headers: dict[str, str] | None = None) -> "Reply":
        h = dict(headers or {})
        if retry_after_ms is not None:
            h["retry-after-ms"] = str(retry_after_ms)
        return cls(kind="status", status_code=code, content=message or f"fake error {code}", headers=h)

    @classmethod
    def delay(cls, seconds: float, then: "Reply | None" = None) -> "Reply":
        return cls(kind="delay", seconds=seconds, then=then)

    @classmethod
    def raw(cls, body: bytes, status: int = 200, content_type: str = "application/json") -> "Reply":
        return cls(kind="raw", content=body, status_code=status, headers={"Content-Type": content_type})


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, Any] | None = None  # multipart: name -> str, or (filename, bytes) for files
    files: dict[str, list[tuple[str, bytes]]] | None = None


def solid_png(width: int = 8, height: int = 8, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def message_text(request: Request) -> str:
    """All text parts of all messages of a chat request, joined by newlines."""
    out = []
    for m in (request.json or {}).get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(p.get("text", "") for p in c if p.get("type") == "text")
    return "\n".join(out)


def message_images(request: Request) -> list[str]:
    """The image URLs (data URLs) of a chat request, in order."""
    out = []
    for m in (request.json or {}).get("messages", []):
        c = m.get("content")
        if isinstance(c, list):
            for p in c:
                if p.get("type") == "image_url":
                    out.append(p["image_url"]["url"])
    return out


class FakeOpenAIServer:
    def __init__(self, chat_handler: Callable[[Request], str] | None = None,
                 image_handler: Callable[[Request], list[bytes]] | None = None,
                 model: str = "fake-model"):
        self.chat_handler = chat_handler or (lambda req: '{"ok": true}')
        self.image_handler = image_handler or self._default_images
        self.model = model
        self.requests: list[Request] = []
        self._queues: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -------------------------------------------------------------------------------
    def push(self, path: str, *replies: Reply) -> None:
        """Queue replies for the next requests to `path` (e.g. '/v1/chat/completions')."""
        with self._lock:
            self._queues[path].extend(replies)

    def pending(self, path: str) -> int:
        with self._lock:
            return len(self._queues[path])

    def calls(self, path: str = "/v1/chat/completions") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queues.clear()

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _default_images(request: Request) -> list[bytes]:
        params = request.json if request.json is not None else (request.form or {})
        n = int(params.get("n") or 1)
        size = str(params.get("size") or "16x16")
        try:
            w, h = (int(v) for v in size.split("x"))
        except ValueError:
            w, h = 16, 16
        return [solid_png(w, h, (10 * i % 256, 100, 200)) for i in range(n)]

    def _parse(self, h: BaseHTTPRequestHandler, method: str) -> Request:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        req = Request(method=method, path=h.path.split("?")[0], headers=headers)
        ctype = headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            form: dict[str, Any] = {}
            files: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                filename = part.get_filename()
                data = part.get_payload(decode=True) or b""
                if filename is not None:
                    files[name].append((filename, data))
                    form[name] = (filename, data)
                else:
                    form[name] = data.decode("utf-8", "replace")
            req.form, req.files = form, dict(files)
        elif body:
            try:
                req.json = json.loads(body)
            except ValueError:
                req.json = None
        return req

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(status)
        hdrs = {"Content-Type": "application/json", **headers}
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        req = self._parse(h, method)
        with self._lock:
            self.requests.append(req)
            queue = self._queues.get(req.path)
            reply = queue.popleft() if queue else None
        while reply is not None and reply.kind == "delay":
            if self._stop.wait(reply.seconds):
                return
            reply = reply.then
        try:
            status, body, headers = self._answer(req, reply)
        except Exception as e:  # a broken handler in a test -> a 500 the test will see
            status, body, headers = 500, json.dumps({"error": {"message": f"handler error: {e!r}"}}).encode(), {}
        self._send(h, status, body, headers)

    def _answer(self, req: Request, reply: Reply | None) -> tuple[int, bytes, dict[str, str]]:
        if reply is not None and reply.kind == "status":
            err = {"error": {"message": reply.content, "type": "fake_error", "code": reply.status_code}}
            return reply.status_code, json.dumps(err).encode(), reply.headers
        if reply is not None and reply.kind == "raw":
            return reply.status_code, reply.content, reply.headers
        created = int(time.time())
        if req.path == "/v1/chat/completions":
            content = reply.content if reply is not None else self.chat_handler(req)
            body = {
                "id": f"chatcmpl-fake-{len(self.requests)}",
                "object": "chat.completion",
                "created": created,
                "model": (req.json or {}).get("model", self.model),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            return 200, json.dumps(body).encode(), {}
        if req.path in ("/v1/images/generations", "/v1/images/edits"):
            images = reply.content if reply is not None else self.image_handler(req)
            data = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in images]
            return 200, json.dumps({"created": created, "data": data}).encode(), {}
        if req.path == "/v1/models" and req.method == "GET":
            body = {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "fake"}]}
            return 200, json.dumps(body).encode(), {}
        return 404, json.dumps({"error": {"message": f"no route {req.method} {req.path}"}}).encode(), {}
