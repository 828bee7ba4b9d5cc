"""A server that trickles: an HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto's)
that forwards every request and its answer, but sends the body of each answer whose
request line matches ``slow`` one byte every ``interval`` seconds. Each byte resets a
client's read timeout, so only a total deadline ends such a transfer.

``hangups`` counts the trickled answers the client closed before their end; ``close()``
stops the trickles still running and the server. Standard library only.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import time
import urllib.parse
from typing import Any

#: Headers not forwarded as they came (the body is sent with its length instead).
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class TrickleProxy:
    def __init__(self, upstream: str, slow: str, *, interval: float = 0.05) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.slow = re.compile(slow)
        self.interval = interval
        self.hangups = 0
        self.trickled = 0
        self.stopping = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(proxy.upstream.hostname or "127.0.0.1",
                                                      proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_HEADERS}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if not proxy.slow.search(f"{self.command} {self.path}"):
                    self.wfile.write(data)
                    return
                proxy.trickled += 1
                self.close_connection = True
                try:
                    for i in range(len(data)):
                        if proxy.stopping.is_set():
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(proxy.interval)  # the server's pace, not a wait for an event
                except OSError:  # the client hung up
                    proxy.hangups += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()
