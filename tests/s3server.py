"""A real S3 API server on loopback for the tests and the scale bench: moto's standalone server (`moto[server]`).

It implements the conditional writes batchrun commits with (moto/s3/responses.py, put_object: `If-None-Match: *`
raises PreconditionFailed when the key exists; complete_multipart_upload the same), and s3fs turns that 412 into
FileExistsError (s3fs/errors.py translate_boto_error), as it does against AWS. Clients reach it the way a user's
would: through the standard AWS environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), never a job-file key.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(port: int) -> dict:
    return {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "batchrun-test",
            "AWS_SECRET_ACCESS_KEY": "batchrun-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, MOTO_ALLOW_NONEXISTENT_REGION="true"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start (is moto[server] installed?)") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start in 60 s")


def make_bucket(name: str) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists(name):
        fs.mkdir(name)


class FaultProxy:
    """A loopback HTTP proxy in front of the S3 server that fails a share of the requests of each method the way a
    throttled or flaky store does: 503 SlowDown (the S3 error body), or a connection reset with no answer. Transient,
    as throttling is: the same request fails at most `streak` times in a row, so a client that retries enough always
    gets through and a test's outcome does not depend on chance or timing. Bounded: loopback only, stops with the
    test."""

    SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream_port: int, share: dict[str, float], seed: int = 7, streak: int = 2, port: int = 0):
        import http.server
        import random
        import threading

        self.upstream, self.share, self.rng = upstream_port, share, random.Random(seed)
        self.injected: dict[str, int] = {}
        self.streak, self.failing = streak, collections.Counter()  # (method, path) -> faults in a row
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set_share(self, share: dict[str, float]) -> dict[str, int]:
        """Fail this share of each method from now on; returns the faults injected since the last call."""
        with self.lock:
            injected, self.injected, self.share = self.injected, {}, share
            self.failing.clear()
            return injected

    def fault(self, method: str, path: str) -> str | None:
        with self.lock:
            if self.failing[method, path] >= self.streak or self.rng.random() >= self.share.get(method, 0.0):
                self.failing.pop((method, path), None)
                return None
            self.failing[method, path] += 1
            kind = "reset" if self.rng.random() < 0.3 else "503"
            self.injected[f"{method} {kind}"] = self.injected.get(f"{method} {kind}", 0) + 1
            return kind

    def handle(self, req) -> None:
        import http.client

        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        kind = self.fault(req.command, req.path)
        if kind == "reset":
            req.close_connection = True
            req.connection.shutdown(2)
            return
        if kind == "503":
            req.send_response(503)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(self.SLOWDOWN)))
            req.end_headers()
            req.wfile.write(self.SLOWDOWN if req.command != "HEAD" else b"")
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("connection", "host")}
        conn.request(req.command, req.path, body=body, headers=dict(headers, Host=f"127.0.0.1:{self.upstream}"))
        resp = conn.getresponse()
        data = resp.read()
        req.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                req.send_header(k, v)
        # a HEAD's Content-Length is the object's size (its body is empty): pass it through
        req.send_header("Content-Length", resp.getheader("Content-Length", "0") if req.command == "HEAD"
                        else str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
        conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
