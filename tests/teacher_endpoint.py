"""A local, rule-based teacher behind an OpenAI-compatible endpoint on loopback: the teacher
policy's tests (tests/data/test_teacher.py, tests/data/test_pipeline.py) talk to it over real
sockets. Import it as `from teacher_endpoint import serve_local_teacher` (tests/ is on sys.path).

It reads back the prompt `ms_ray.data.teacher.build_messages` writes (`parse_prompt`), so a
change to that prompt shows up here as failing teacher tests.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ms_ray.data.teacher import SILENT


def parse_prompt(content: str) -> dict:
    """Inverse of `build_messages` for the user message."""
    def section(tag):
        m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", content, re.S)
        return m.group(1) if m else ""
    return {"input": section("input"), "reply_so_far": section("reply_so_far"),
            "reference": section("reference"), "final": "<status>input complete</status>" in content}


def local_teacher_answer(content: str, mode: str = "pace", ratio: float = 0.5) -> str:
    """Deterministic teacher: copies the reference reply's words in order, about `ratio` reply
    words per input word seen, and everything left once the input is complete. It only reads
    what the request shows it. mode "eager" writes the whole reference at once: a teacher that
    leaks whatever of later input the reference mentions (the causality check must catch it)."""
    p = parse_prompt(content)
    ref, done = p["reference"].split(), len(p["reply_so_far"].split())
    if p["final"] or mode == "eager":
        return " ".join(ref[done:]) or SILENT
    target = min(len(ref), int(ratio * len(p["input"].split())))
    return " ".join(ref[done:target]) or SILENT


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, payload: bytes, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (its timeout); nothing to report

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, b'{"error": "not found"}')
        models = {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]}
        self._send(200, json.dumps(models).encode())

    def do_POST(self):
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"unparsed": raw.decode("utf-8", "replace")}
        with srv.lock:
            srv.requests.append(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        if srv.api_key and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            return self._send(401, b'{"error": "bad api key"}')
        if srv.mode == "error":
            return self._send(500, b'{"error": "teacher exploded"}')
        if srv.mode == "malformed":
            return self._send(200, b'{"choices": [ this is not json')
        if srv.mode == "slow":
            time.sleep(srv.delay_s)  # bounded: tests set a delay above the client timeout
        try:
            content = body["messages"][-1]["content"]
        except (KeyError, IndexError, TypeError):
            return self._send(400, b'{"error": "expected OpenAI chat messages"}')
        text = local_teacher_answer(content, srv.mode, srv.ratio)
        answer = {"id": f"local-{len(srv.requests)}", "object": "chat.completion", "model": body.get("model"),
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}]}
        self._send(200, json.dumps(answer).encode())


def serve_local_teacher(host: str = "127.0.0.1", port: int = 0, mode: str = "pace", ratio: float = 0.5,
                        api_key: str | None = None, delay_s: float = 1.0):
    """Start the local teacher in a daemon thread; returns (server, base_url). Modes: "pace",
    "eager" (leaks), "error" (HTTP 500), "malformed" (bad JSON), "slow" (sleeps delay_s).
    `server.requests` holds every request body received; `server.shutdown()` stops it."""
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the local teacher binds loopback only, not {host!r}")
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.requests, server.lock = [], threading.Lock()
    server.mode, server.ratio, server.api_key, server.delay_s = mode, ratio, api_key, delay_s
    server.model_name = "local-rule-teacher"
    # A short poll interval keeps shutdown() quick (it waits for the serving loop to notice).
    threading.Thread(target=server.serve_forever, args=(0.05,), name="local-teacher", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
