"""A real S3 API server on loopback for the tests and the scale bench: moto's standalone server (`moto[server]`).

It implements the conditional writes batchrun commits with (moto/s3/responses.py, put_object: `If-None-Match: *`
raises PreconditionFailed when the key exists; complete_multipart_upload the same), and s3fs turns that 412 into
FileExistsError (s3fs/errors.py translate_boto_error), as it does against AWS. Clients reach it the way a user's
would: through the standard AWS environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), never a job-file key.
"""

from __future__ import annotations

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
