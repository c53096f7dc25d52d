"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests (embeddings endpoint only).

Behaviour is configured per test: fail the first N requests with a status, delay responses,
or answer with malformed bodies. Vectors are deterministic (hashing of the input text).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from memory_distill.embeddings import HashingEmbedder


class FakeOpenAI:
    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        self.fail_first = 0
        self.fail_status = 500
        self.delay_s = 0.0
        self.mode = "ok"  # ok | short | garbage | wrong_dim | shuffled
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._emb = HashingEmbedder(dim=dim)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    nth = len(server.requests)
                try:
                    self._answer(body, nth)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict, nth: int) -> None:
                if server.delay_s:
                    time.sleep(server.delay_s)
                if nth <= server.fail_first:
                    self._send(server.fail_status, {"error": {"message": "try again", "type": "server_error"}},
                               {"retry-after-ms": "5"})
                    return
                if self.path != "/v1/embeddings":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                inputs = body["input"]
                vecs = server._emb.embed(inputs)
                data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
                if server.mode == "short":
                    data = data[:-1]
                elif server.mode == "wrong_dim":
                    data[0]["embedding"] = data[0]["embedding"][:3]
                elif server.mode == "shuffled":
                    data = data[::-1]
                if server.mode == "garbage":
                    raw = b"<html>oops</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                self._send(200, {"object": "list", "data": data, "model": body["model"],
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
