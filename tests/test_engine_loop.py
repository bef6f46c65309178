"""The worker's engine loop, step by step, without Ray: admit (window across shard boundaries), poll, route
(duplicates), commit (finished shards, in the order they finish), and an engine's death."""

from __future__ import annotations

import queue
import threading

import pyarrow as pa
import pytest

from batchrun.datapath import ShardTask
from batchrun.engine_loop import EngineLoop
from batchrun.engines.base import Completion, EngineDead, Request, RequestKey, Sampling
from batchrun.engines.echo import EchoEngine
from batchrun.shards import Shard

pytestmark = pytest.mark.fast


class Recording(EchoEngine):
    """Echo that records how many requests it held at most, and can fail one request with an engine-wide error."""

    def __init__(self, fail_row: int | None = None):
        super().__init__()
        self.most, self.fail_row = 0, fail_row

    def submit(self, request: Request) -> None:
        if request.request_id.row == self.fail_row:
            self._done.append(Completion(request.request_id, finish_reason="error",
                                         error="RuntimeError: CUDA error: an illegal memory access was encountered"))
            return
        super().submit(request)
        self.most = max(self.most, len(self._done))


def task(shard_id: int, rows: int, copies: dict | None = None) -> ShardTask:
    keep = pa.table({"id": [f"{shard_id}-{r}" for r in range(rows)]})
    t = ShardTask(Shard(shard_id, 0, rows, ()), 1, keep, keep, n=1, logprobs=False)
    sent = [r for r in range(rows) if not any(r in c for c in (copies or {}).values())]
    t.requests = [Request(RequestKey(shard_id, r), f"w{shard_id} r{r} x y", None, Sampling(max_tokens=2))
                  for r in sent]
    t.copies = copies or {}
    return t


def loop_over(tasks: list[ShardTask], engine, **kw) -> tuple[EngineLoop, list[ShardTask], dict]:
    ready: queue.Queue = queue.Queue()
    for t in [*tasks, None]:
        ready.put(t)
    committed, stats = [], {}

    def add(**deltas):
        for k, v in deltas.items():
            stats[k] = stats.get(k, 0) + v

    loop = EngineLoop(engine, ready, committed.append, set_stats=lambda **kw: stats.update(kw), add_stats=add, **kw)
    return loop, committed, stats


def test_the_window_stays_full_across_shards_and_every_shard_is_committed_once():
    engine = Recording()
    tasks = [task(0, 5), task(1, 3), task(2, 6)]
    loop, committed, stats = loop_over(tasks, engine, max_in_flight=4)
    loop.run(threading.Event(), threading.Event(), lambda: float("inf"))
    assert [t.shard.shard_id for t in committed] == [0, 1, 2]
    assert all(t.remaining == 0 and t.error == [None] * t.keep.num_rows for t in committed)
    assert committed[2].text[5] == "w2 r5"  # echo: the prompt's first max_tokens words
    assert engine.most == 4 and stats["max_in_flight"] == 4 and stats["max_in_flight_why"] == "engine.max_in_flight"
    assert stats["generated_tokens"] == 2 * 14 and loop.in_flight == 0 and loop.running == set()


def test_admit_takes_the_next_shard_before_the_current_one_finishes():
    loop, committed, _ = loop_over([task(0, 2), task(1, 2)], Recording(), max_in_flight=3)
    loop.admit()
    assert loop.in_flight == 3 and loop.running == {0, 1}  # shard 1's first row fills the window's third slot
    loop.route(loop.poll())
    assert [t.shard.shard_id for t in committed] == [0]  # shard 0 is done; shard 1 still has a row to submit


def test_route_fills_duplicate_rows_from_one_completion():
    loop, committed, stats = loop_over([task(0, 4, copies={0: [2, 3]})], Recording())
    loop.run(threading.Event(), threading.Event(), lambda: float("inf"))
    assert committed[0].text == ["w0 r0", "w0 r1", "w0 r0", "w0 r0"] and stats["duplicate_rows"] == 2


def test_an_engine_wide_error_is_the_engines_death_and_nothing_is_committed():
    loop, committed, _ = loop_over([task(0, 3)], Recording(fail_row=1))
    with pytest.raises(EngineDead, match="engine-wide error"):
        loop.run(threading.Event(), threading.Event(), lambda: float("inf"))
    assert committed == [] and loop.running == {0}  # what the death is charged to


def test_draining_admits_no_new_shard():
    drain = threading.Event()
    drain.set()
    loop, committed, _ = loop_over([task(0, 3)], Recording())
    loop.run(threading.Event(), drain, lambda: float("inf"))
    assert committed == [] and loop.in_flight == 0 and not loop.ready.empty()
