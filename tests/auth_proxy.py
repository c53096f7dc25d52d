"""A reverse proxy on 127.0.0.1 that forwards to a Chroma server only requests carrying a bearer token
(what an auth gateway in front of a shared Chroma server does); 401 otherwise."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "host", "content-length"}


def start_proxy(upstream_port: int, token: str) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Authorization") != f"Bearer {token}":
                out, status, headers = b'{"error":"unauthorized"}', 401, {"Content-Type": "application/json"}
            else:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                fwd = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body or None, headers=fwd)
                resp = conn.getresponse()
                out, status = resp.read(), resp.status
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in HOP}
                conn.close()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]
