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
        super().__init__(delay_s=delay_s)
        os.makedirs(log_path, exist_ok=True)
        self.log = open(os.path.join(log_path, f"{os.getpid()}.log"), "a", buffering=1)

    def submit(self, request: Request) -> None:
        self.log.write(f"{request.request_id}\n")
        super().submit(request)


class PoisonEcho(EchoEngine):
    """Crashes (as an engine crash would) on any prompt containing POISON."""

    batch_limit = 32  # auto: the worker keeps 64 in flight

    def __init__(self, **kw):
        super().__init__()

    def submit(self, request: Request) -> None:
        if "POISON" in request.prompt:
            raise RuntimeError("engine crashed on a poison prompt")
        super().submit(request)


class StallEngine(EchoEngine):
    """Answers `good` requests, then accepts requests and never completes them."""

    batch_limit = 4  # auto: the worker keeps 8 in flight

    def __init__(self, good: int = 10, **kw):
        super().__init__()
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

    batch_limit = 32  # auto: the worker keeps 64 in flight

    def __init__(self, **kw):
        super().__init__()

    def submit(self, request: Request) -> None:
        if "BADREQ" in request.prompt:
            self._done.append(Completion(request.request_id, finish_reason="error", error="engine rejected request"))
            return
        super().submit(request)


class BrokenLoad:
    """An engine whose load always fails, like a bad checkpoint or a CUDA init error."""

    def __init__(self, **kw):
        raise OSError("cannot load weights: checkpoint is corrupt")


def claim(path: str | None) -> bool:
    """True for the first caller across processes (an exclusive create): only one engine of a job is the bad one."""
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class DyingEcho(EchoEngine):
    """Dies after `die_after` completions, the way a worker's GPU fails mid-shard: either raising EngineDead from
    poll (an engine that knows), or (`as_error_rows`) failing every request it holds with a CUDA error as if each were
    the request's own error (an engine that does not: the worker's safety net must catch it). Only the first engine
    to get there and claim `once` dies, whichever worker it is (no test depends on which worker got the work)."""

    batch_limit = 4  # auto: the worker keeps 8 in flight

    def __init__(self, die_after: int = 15, as_error_rows: bool = False, once: str | None = None, **kw):
        super().__init__(delay_s=0.01)
        self.left, self.as_error_rows, self.once = die_after, as_error_rows, once
        self.dead = False

    def poll(self, timeout: float) -> list[Completion]:
        from batchrun.engines.base import EngineDead

        if self.dead:
            raise EngineDead("CUDA error: an illegal memory access was encountered")
        done = super().poll(timeout)
        if self.left is None or len(done) < self.left:
            self.left = None if self.left is None else self.left - len(done)
            return done
        keep, failing, self.left = done[: self.left], done[self.left:], None
        if not claim(self.once):  # another engine died already: this one is healthy
            return done
        if not self.as_error_rows:
            self.dead = True
            return keep
        # the engine flattens its own death into per-request errors, for everything it held, and does not know it
        held = failing + list(self._done)
        self._done.clear()
        return keep + [Completion(c.request_id, finish_reason="error", sample_index=c.sample_index,
                                  error="RuntimeError: CUDA error: an illegal memory access was encountered")
                       for c in held]


class DyingHF:
    """The real HF engine whose model's forward raises a CUDA error on its call `die_after` + 1, inside transformers'
    continuous batching loop: the loop dies mid-shard. Only the first engine to get there and claim `once` dies."""

    def __new__(cls, model, sampling, die_after: int = 6, once: str | None = None, **kw):
        from batchrun.engines.hf import HFEngine

        engine = HFEngine(model, sampling, **kw)
        module = engine.backend.model
        forward, calls = module.forward, [0]

        def failing_forward(*a, **k):
            calls[0] += 1
            if calls[0] == die_after + 1 and claim(once):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return forward(*a, **k)

        module.forward = failing_forward
        return engine


class SlowEcho(CountingEcho):
    """Echo at a bounded pace: at most `per_poll` completions a poll, `delay_s` apart, so shards are in flight for a
    while (a stop signal then finds work to drain and work to hand back)."""

    def __init__(self, log_path: str, per_poll: int = 1, delay_s: float = 0.1, **kw):
        super().__init__(log_path)
        self.per_poll, self.pace = per_poll, delay_s

    def poll(self, timeout: float) -> list[Completion]:
        time.sleep(self.pace)
        done = [self._done.popleft() for _ in range(min(self.per_poll, len(self._done)))]
        return done
