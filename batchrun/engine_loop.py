"""The worker's main loop: keep the engine's window full across shard boundaries, and route what it finishes.

One pass of the loop is four named steps:
    admit   submit requests while fewer than the window are in flight: the scheduler's next one (prefix.py), else
            the next prepared shard's requests (the window is sized from the first shard that arrives)
    poll    the engine's completions, waiting at most a moment for the first
    route   each completion into its shard's rows (and the rows that are copies of it: dedupe)
    commit  a shard whose every row is in goes to the writer (the worker's thread that publishes its part)
No Ray here: the worker hands in the engine, the queue of prepared shards and where finished shards go, so each step
runs in a plain test (tests/test_engine_loop.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from batchrun.datapath import ShardTask
from batchrun.engines.base import Completion, Engine, EngineDead, choose_window, engine_failure
from batchrun.prefix import KEY_TOKENS, PrefixScheduler

log = logging.getLogger("batchrun.worker")


class EngineLoop:
    def __init__(self, engine: Engine, ready: queue.Queue, commit: Callable[[ShardTask], None], *,
                 max_in_flight: int | str = "auto", prefix_schedule: bool = True, default_tokens: int = 1,
                 set_stats: Callable[..., None] = lambda **kw: None, add_stats: Callable[..., None] = lambda **kw: None,
                 on_tokens: Callable[[int], None] = lambda n: None):
        self.engine, self.ready, self.commit = engine, ready, commit
        self.max_in_flight, self.default_tokens = max_in_flight, default_tokens
        self.set_stats, self.add_stats, self.on_tokens = set_stats, add_stats, on_tokens
        # the order requests go to the engine in: input order, or prefix-aware (batchrun/prefix.py)
        self.sched = PrefixScheduler(prefix_schedule and engine.prefix_reuse, engine.prefix_block_tokens or KEY_TOKENS)
        self.set_stats(prefix_schedule="on" if self.sched.enabled else "off")
        self.window = 0  # sized from the first shard that reaches the loop
        self.by_shard: dict[int, ShardTask] = {}
        self.running: set[int] = set()  # shards the engine has requests of: what an engine death is charged to
        self.in_flight, self.exhausted = 0, False
        self.first_submit = self.first_completion = 0.0  # the engine's busy window (benchmarks, start-up split)
        self.last_progress = time.monotonic()  # the last completion (or the start): the stall check's clock

    def run(self, stop: threading.Event, drain: threading.Event, drain_deadline: Callable[[], float]) -> None:
        """Until every prepared shard is done (the prefetcher's end marker), the worker stops, or a drain's time
        is up. Draining: no new shard is admitted; the admitted ones' requests still go in, to finish in time."""
        while not stop.is_set():
            draining = drain.is_set()
            if draining and time.monotonic() > drain_deadline():
                return
            self.admit(draining)
            if self.idle(draining):
                self.set_stats(prefix_leaders=self.sched.stats["leaders"], prefix_held=self.sched.stats["held"])
                return
            if self.in_flight:
                self.route(self.poll())

    def idle(self, draining: bool) -> bool:
        return (self.exhausted or draining) and self.in_flight == 0 and not len(self.sched)

    def admit(self, draining: bool = False) -> None:
        while (not self.window or self.in_flight < self.window) and not self.exhausted:
            request = self.sched.next()
            if request is None:
                if not self._take_shard(draining):
                    return
                continue
            self.running.add(request.request_id.shard_id)
            self.engine.submit(request)
            self.in_flight += request.sampling.n  # counted in samples: one completion each
            if not self.first_submit:
                self.first_submit = time.time()
                self.set_stats(first_submit_at=self.first_submit)

    def _take_shard(self, draining: bool) -> bool:
        """The next prepared shard's requests into the scheduler. False when there is nothing to take now: draining,
        the scheduler already holds a window's worth of rows waiting for their prefix (lookahead across shards stays
        bounded), no shard is ready (blocking briefly only when the engine has nothing to do), or the end marker."""
        if draining or (self.window and self.sched.held_count >= self.window):
            return False
        try:
            task = self.ready.get(timeout=0.2) if self.in_flight == 0 else self.ready.get_nowait()
        except queue.Empty:
            return False
        if task is None:  # the prefetcher's end marker
            self.exhausted = True
            return False
        self.by_shard[task.shard.shard_id] = task
        self.window = self.window or self._size_window(task)
        if task.remaining == 0:  # every row was an error row
            self.commit(self.by_shard.pop(task.shard.shard_id))
        self.sched.add(task.requests)
        task.requests = []  # the scheduler holds them until they are submitted
        return True

    def _size_window(self, task: ShardTask) -> int:
        """engine.max_in_flight, or auto from the engine's KV cache and this shard's request sizes."""
        sizes = [(len(r.prompt_token_ids) if r.prompt_token_ids is not None else len(r.prompt.split()))
                 + r.sampling.max_tokens for r in task.requests]
        window, why = choose_window(self.max_in_flight, self.engine,
                                    sum(sizes) / len(sizes) if sizes else self.default_tokens)
        self.set_stats(max_in_flight=window, max_in_flight_why=why)
        log.info("%d requests in flight (%s)", window, why)
        return window

    def poll(self) -> list[Completion]:
        done = self.engine.poll(timeout=0.05)
        for request_id in self.engine.prefilled():  # a leader's prompt is computed: its siblings can share it
            self.sched.prefilled(request_id)
        if done:
            self.last_progress = time.monotonic()
            now = time.time()
            self.first_completion = self.first_completion or now
            self.set_stats(last_completion_at=now, first_completion_at=self.first_completion)
        self.in_flight -= len(done)
        self.set_stats(in_flight=self.in_flight)
        self.on_tokens(sum(c.num_generated_tokens for c in done))
        return done

    def route(self, done: list[Completion]) -> None:
        for c in done:
            key = c.request_id  # the RequestKey the request carried
            if c.error is not None and engine_failure(c.error):  # the safety net: never an error row
                raise EngineDead(f"the engine failed request {key} with an engine-wide error: {c.error}")
            task = self.by_shard[key.shard_id]
            task.fill(key.row, c)
            for row in task.copies.get(key.row, ()):  # the same prompt and sampling: the same completion
                task.fill(row, c)
                self.add_stats(duplicate_rows=c.sample_index == 0)
            self.sched.prefilled(key)  # a finished request's prompt is computed, whether or not the engine said so
            self.add_stats(generated_tokens=c.num_generated_tokens, prompt_tokens=c.num_prompt_tokens,
                           cached_prompt_tokens=c.num_cached_prompt_tokens or 0)
            if task.remaining == 0:
                self.finish(task)

    def finish(self, task: ShardTask) -> None:
        """Every row of the shard is in: to the writer. Error rows of an engine that is dying are not the
        requests' errors: the engine is asked first (EngineDead is raised instead of committing them)."""
        if any(e is not None for e in task.error):
            self.engine.check_alive()
        self.running.discard(task.shard.shard_id)
        self.commit(self.by_shard.pop(task.shard.shard_id))
