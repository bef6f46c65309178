"""Engines for fault injection in tests, loaded through the `module:Class` engine hook.

They follow batchrun's engine contract (batchrun.engines.base.Engine). Each wraps the real echo engine and adds one
failure: a request log (to count engine calls), a poison prompt, an engine that stops producing, per-request errors.
"""

from __future__ import annotations

import os
import time

from batchrun.engines.base import Completion, Request
from batchrun.engines.echo import EchoEngine


class CountingEcho(EchoEngine):
    """Appends every submitted request id to `log_path` (one file per worker process), then echoes."""

    def __init__(self, log_path: str, delay_s: float = 0.0, **kw):
        super().__init__(delay_s=delay_s, **{k: v for k, v in kw.items() if k == "max_in_flight"})
        os.makedirs(log_path, exist_ok=True)
        self.log = open(os.path.join(log_path, f"{os.getpid()}.log"), "a", buffering=1)

    def submit(self, request: Request) -> None:
        self.log.write(f"{request.request_id}\n")
        super().submit(request)


class PoisonEcho(EchoEngine):
    """Crashes (as an engine crash would) on any prompt containing POISON."""

    def __init__(self, **kw):
        super().__init__(max_in_flight=kw.get("max_in_flight", 64))

    def submit(self, request: Request) -> None:
        if "POISON" in request.prompt:
            raise RuntimeError("engine crashed on a poison prompt")
        super().submit(request)


class StallEngine(EchoEngine):
    """Answers `good` requests, then accepts requests and never completes them."""

    def __init__(self, good: int = 10, **kw):
        super().__init__(max_in_flight=kw.get("max_in_flight", 8))
        self.good = good

    def submit(self, request: Request) -> None:
        if self.good > 0:
            self.good -= 1
            super().submit(request)

    def poll(self, timeout: float) -> list[Completion]:
        done = super().poll(timeout)
        if not done:
            time.sleep(timeout)
        return done


class FlakyRequestEcho(EchoEngine):
    """Fails the single request whose prompt contains BADREQ, as an engine reports a per-request error."""

    def __init__(self, **kw):
        super().__init__(max_in_flight=kw.get("max_in_flight", 64))

    def submit(self, request: Request) -> None:
        if "BADREQ" in request.prompt:
            self._done.append(Completion(request.request_id, finish_reason="error", error="engine rejected request"))
            return
        super().submit(request)


class BrokenLoad:
    """An engine whose load always fails, like a bad checkpoint or a CUDA init error."""

    def __init__(self, **kw):
        raise OSError("cannot load weights: checkpoint is corrupt")
