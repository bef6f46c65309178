"""The worker: one Ray actor per engine replica. Pull a shard, build prompts, keep the engine's window full, commit.

Three threads, so the engine never waits on I/O:
- the main loop submits requests and collects completions (the engine's submit/poll: see the threading rules in
  engines/base.py);
- the prefetcher leases and reads the next shard while the current one is in flight, so there is no idle gap at a
  shard boundary (reading, prompt rendering and tokenization, through the engine's encode/render_chat, all happen
  here, off the engine's critical path);
- the writer turns a finished shard into a Parquet part and asks the queue to commit it.
A heartbeat thread renews the worker's leases and reports its counters.

Failures inside the live process (README, failure model):
- the engine dies (EngineDead from submit/poll, or the safety net below): nothing more of it is committed; shards
  already finished are committed, the ones it was running go back charged to the engine, the ones it had not started
  go back uncharged, all at once; run() raises and the driver replaces the worker.
- a stop signal (SIGTERM/SIGINT: preemption notice, `ray job stop`) or the driver's drain: stop admitting shards,
  commit what finishes within faults.drain_s, hand the rest back at once, return.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time

import pyarrow.compute as pc

from batchrun.beats import NodeBeats
from batchrun.datapath import (
    INPUT_ROW,
    ROW_INDEX,
    PromptLimits,
    ShardTask,
    dedupe,
    key_columns,
    merge_redone,
    read_shard,
    redo_rows,
    render,
    row_samplings,
    to_requests,
    to_score_requests,
)
from batchrun.engine_loop import EngineLoop
from batchrun.engines import create_engine, sampling_from_spec
from batchrun.engines.base import EngineDead
from batchrun.loglikelihood import Likelihoods, text_counts
from batchrun.memory import RssSampler, peak_rss_mb, rss_now_mb, use_steady_arrow_pool
from batchrun.metrics import record
from batchrun.postprocess import Parser, Scorer, merge_totals, totals
from batchrun.process import node_name, on_stop_signals, set_niceness
from batchrun.prompts import PromptBuilder
from batchrun.records import ManifestEntry, WorkerStats
from batchrun.shard_queue import DONE, DRAIN, WAIT, Grant
from batchrun.shards import Shard
from batchrun.sources import open_source
from batchrun.sources.parquet import ParquetSource
from batchrun.spec import LOGLIKELIHOOD_METHODS, JobSpec
from batchrun.store.fs import Store, store_retries
from batchrun.store.parts import Parts, entry_in, ids_digest

log = logging.getLogger("batchrun.worker")


def engine_key(spec: JobSpec) -> str:
    """What an engine is built from: tasks of a suite with the same key share one engine; another key loads its own
    (the model, its settings, the sampling it was started with, guided choices, scoring or generating)."""
    parse = spec.output.parse
    return json.dumps([spec.engine.model_dump(), spec.sampling.model_dump(), bool(spec.scoring),
                       parse.model_dump() if parse is not None and parse.guided else None], sort_keys=True, default=str)
class Worker:
    """Wrapped by ray.remote in the driver (so this module imports without starting Ray)."""

    def __init__(self, worker_id: str, spec_json: str, units: tuple[str, ...], shard_queue, run_id: str = "",
                 reader: str | None = None):
        self.worker_id = worker_id
        spec = JobSpec.model_validate_json(spec_json)
        self.niceness = set_niceness(spec.resources.niceness)  # before any engine thread or rank exists
        self.arrow_pool = use_steady_arrow_pool()  # before the worker reads or builds any table
        self.node = node_name()
        self.engine = None
        self.created_at = time.time()
        self._configure(spec_json, units, shard_queue, run_id, reader)
        on_stop_signals(self.drain)  # a stop signal drains the worker instead of killing it

    def _configure(self, spec_json: str, units: tuple[str, ...], shard_queue, run_id: str,
                   reader: str | None = None) -> None:
        """Everything the worker derives from its job: the input, prompts, sampling, output, parse and score, and
        fresh counters. At creation, and for each next task of a suite (retask), whose engine it may keep.
        reader: the units are the grouped copy's Parquet files there (group.py), not the input's own."""
        self.tags = {"run_id": run_id, "worker": self.worker_id}  # metric tags
        self.spec = JobSpec.model_validate_json(spec_json)
        self.units = units
        self.queue = shard_queue
        self.source = ParquetSource(reader) if reader else open_source(self.spec.input)
        self.prompts = PromptBuilder(self.spec.input)
        self.parts = Parts(Store(self.spec.output.dir))  # a worker writes parts, nothing else
        self.sampling = sampling_from_spec(self.spec.sampling)
        self.id_column = self.spec.input.id_column
        passthrough = [c for c in self.spec.input.passthrough_columns if c != self.id_column]
        self.per_row = dict(self.spec.sampling.per_row)  # sampling key -> column
        self.read_columns = list(dict.fromkeys(([self.id_column] if self.id_column else []) + passthrough
                                               + self.prompts.variables + list(self.per_row.values())))
        self.keep_columns = ([self.id_column] if self.id_column else []) + passthrough
        score = self.spec.score
        self.parser = Parser(self.spec.output.parse) if self.spec.output.parse else None
        # a scoring job (log-likelihoods instead of generation): its own columns and score (loglikelihood.py)
        self.scoring = self.spec.scoring
        self.likelihoods = Likelihoods(self.scoring, bool(score and score.reference_column)) if self.scoring else None
        self.scorer = Scorer(score) if score and score.method not in LOGLIKELIHOOD_METHODS else None
        self.score_columns = self._score_columns(score)
        choices = [score.choices_column] if self.scoring == "loglikelihood" else []
        self.read_columns = list(dict.fromkeys(self.read_columns + self.score_columns + choices
                                               + ([INPUT_ROW] if reader and not self.id_column else [])))
        # counters written by the main loop and the writer, read by the heartbeat: every access holds _stats_lock
        self._stats_lock = threading.Lock()
        self.stats = WorkerStats(created_at=self.created_at, niceness=self.niceness, arrow_pool=self.arrow_pool,
                                 worker=self.worker_id, node=self.node)
        self._last_progress = time.monotonic()  # before the engine loop runs (its own clock after that)
        self.loop: EngineLoop | None = None
        self._held: set[int] = set()  # shards leased and not yet committed or failed (a restarted queue re-adopts them)
        self._last_beat = 0.0  # when the queue last heard this worker's stats (a heartbeat or a commit)
        # the next lease, taken by the writer's last commit (commit_and_lease) for the prefetcher: one call a shard
        self._bank: queue.Queue = queue.Queue(maxsize=1)
        self._prefetching = False  # the prefetcher is running: a commit may take a lease for it
        self._bank_lock = threading.Lock()  # _prefetching's end against a commit banking a lease
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._drain = threading.Event()  # stop admitting shards; finish what can finish by _drain_deadline
        self._drain_deadline = float("inf")

    def drain(self, why: str) -> None:
        if not self._drain.is_set():
            self._drain_deadline = time.monotonic() + self.spec.faults.drain_s
            self._set(drain=why, drain_started_at=time.time())
            log.warning("worker %s: draining (%s): committing what finishes within %gs", self.worker_id, why,
                        self.spec.faults.drain_s)
            self._drain.set()

    def _score_columns(self, score) -> list[str]:
        """A built-in scorer reads the reference column; a hook sees every column the job reads, and the reference."""
        if score is None:
            return []
        ref = [score.reference_column] if score.reference_column else []
        return list(dict.fromkeys(self.read_columns + ref)) if score.hook else ref

    # ------------------------------------------------------------ lifecycle

    def retask(self, spec_json: str, units: tuple[str, ...], shard_queue, run_id: str,
               reader: str | None = None) -> dict:
        """The next task of a suite, on the engine already loaded where the task needs the same one (engine_key);
        else the engine is closed and the task's own loaded. Like start(), a failure is this call's error."""
        before = engine_key(self.spec)
        self._configure(spec_json, units, shard_queue, run_id, reader)
        if self.engine is not None and engine_key(self.spec) == before:
            self.parts.store.probe_write()
            self._set(engine_start_s=0.0, engine_ready_at=time.time(), engine_reused=True,
                      kv_cache_tokens=self.engine.kv_cache_tokens, prefix_reuse=self.engine.prefix_reuse)
            self._beat()
            return {"worker": self.worker_id, "node": self.node, "pid": os.getpid(), "engine_reused": True}
        self.close()
        return self.start()

    def start(self) -> dict:
        """Load the engine. A failure here surfaces to the driver as this call's error."""
        self.parts.store.probe_write()  # an object store: these credentials can create under the prefix, exclusively
        started = time.time()
        with RssSampler() as load_rss:  # what the load holds in memory, anonymous vs a mapped checkpoint
            self.engine = create_engine(self.spec.engine, self.spec.sampling, self.spec.output.parse,
                                        scoring=bool(self.scoring))
        self._set(engine_start_s=round(time.time() - started, 3), engine_ready_at=time.time(),
                  rss_after_load_mb=rss_now_mb(), rss_during_load_max_mb=load_rss.peaks,
                  engine_startup=dict(getattr(self.engine, "startup", {}) or {}),
                  kv_cache_tokens=self.engine.kv_cache_tokens, prefix_reuse=self.engine.prefix_reuse)
        if self.engine.kv_cache_tokens is not None:
            log.info("worker %s: the engine's KV cache holds %d tokens", self.worker_id, self.engine.kv_cache_tokens)
        self._beat()
        return {"worker": self.worker_id, "node": self.node, "pid": os.getpid()}

    def run(self) -> dict:
        if self.engine is None:
            raise RuntimeError("run() called before the engine loaded")
        ready: queue.Queue = queue.Queue(maxsize=1)  # one prepared shard ahead of the engine
        # Bounded: if the writer falls behind (slow storage), the engine loop waits instead of piling up finished
        # shards in memory; a worker holds at most ~4 shards whatever the input size.
        finished: queue.Queue = queue.Queue(maxsize=2)
        self.loop = EngineLoop(self.engine, ready, lambda task: self._put(finished, task),
                               max_in_flight=self.spec.engine.max_in_flight,
                               prefix_schedule=self.spec.engine.prefix_schedule == "auto",
                               default_tokens=self.sampling.max_tokens, set_stats=self._set, add_stats=self._add,
                               on_tokens=lambda n: record("tokens", n, **self.tags))
        threads = [
            threading.Thread(target=self._guard, args=(self._prefetch, ready), daemon=True, name="prefetch"),
            threading.Thread(target=self._guard, args=(self._write, finished), daemon=True, name="writer"),
            threading.Thread(target=self._guard, args=(self._heartbeat,), daemon=True, name="heartbeat"),
        ]
        for t in threads:
            t.start()
        dead: EngineDead | None = None
        try:
            self.loop.run(self._stop, self._drain, lambda: self._drain_deadline)
        except EngineDead as e:
            dead = e
        finally:
            self._put(finished, None)
            threads[1].join()  # shards finished before a death or within a drain are committed first
            self._stop.set()
        if dead is not None:
            self._hand_back_after_death(dead, self.loop.running)
            raise dead
        if self._error is not None:
            raise self._error
        if self._drain.is_set():
            handed = self._hand_back(None, f"drained ({self._snapshot().drain})")
            self._set(drained_shards_handed_back=handed)
        self._beat()
        return self._snapshot()

    def _hand_back(self, shard_ids, why: str, engine_death: bool = False) -> list[int]:
        import ray

        handed = ray.get(self.queue.hand_back.remote(self.worker_id, shard_ids, why, engine_death))
        for sid in handed:
            self._release(sid)
        return handed

    def _hand_back_after_death(self, dead: EngineDead, running: set[int]) -> None:
        """The dying engine's shards go back now (not when the driver notices): the ones it was running charged to
        the engine, the ones it never started uncharged."""
        log.error("worker %s: the engine died: %s", self.worker_id, dead)
        try:
            self._hand_back(sorted(running), f"engine died: {dead}", engine_death=True)
            self._hand_back(None, "its engine died before it started this shard")
        except Exception:  # noqa: BLE001 - the driver releases whatever is left when it replaces this worker
            log.exception("worker %s: could not hand back its shards", self.worker_id)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _put(self, q: queue.Queue, item) -> None:
        """Put with backpressure, giving up only if a helper thread failed (so a dead writer cannot hang us)."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # surface a helper thread's failure through the main loop
            self._error = self._error or e
            self._stop.set()

    # ------------------------------------------------------------ main loop: the engine's window

    # ------------------------------------------------------------ prefetcher: lease, read, render, tokenize

    def _prefetch(self, ready: queue.Queue) -> None:
        import ray

        self._prefetching = True
        try:
            while not self._stop.is_set() and not self._drain.is_set():
                banked = self._banked()  # held already (the writer took it)
                grant = banked or ray.get(self.queue.lease.remote(self.worker_id))
                if grant == DRAIN:
                    self.drain("the driver is draining the job")
                if grant in (DONE, DRAIN):
                    self._put(ready, None)
                    return
                if grant == WAIT:  # other workers hold the rest; one may die and hand its shards back
                    time.sleep(0.5)
                    continue
                if banked is None and not self._hold(grant.shard_id):
                    continue  # a restarted queue handed out a shard this worker is running
                try:
                    task = self._prepare(grant.shard, grant.attempt, grant.revise)
                except Exception as e:  # unreadable shard: this attempt fails, the queue retries or quarantines it
                    log.exception("shard %s: cannot prepare", grant.shard_id)
                    ray.get(self.queue.fail.remote(grant.shard_id, self.worker_id, f"{type(e).__name__}: {e}"))
                    self._release(grant.shard_id)
                    continue
                self._put(ready, task)
        finally:
            with self._bank_lock:
                self._prefetching = False
                left = self._banked()
            if isinstance(left, Grant):
                self._hand_back([left.shard_id], "the worker stopped taking shards")

    def _banked(self):
        """The lease the last commit took for the prefetcher, if any."""
        try:
            return self._bank.get_nowait()
        except queue.Empty:
            return None

    def _hold(self, shard_id: int) -> bool:
        with self._stats_lock:
            if shard_id in self._held:
                return False
            self._held.add(shard_id)
            return True

    def _commit(self, entry: ManifestEntry, published: bool) -> None:
        """Tell the queue about the commit; when the prefetcher has no lease banked, the same call takes its next
        one (a steady worker makes one queue call a shard). A banked lease is held like any other: handed back on a
        drain or a death, re-adopted by a restarted queue."""
        import ray

        if not self._prefetching or not self._bank.empty() or self._drain.is_set():
            ray.get(self.queue.commit.remote(entry, published, self._beat_payload()))
            return
        _, grant = ray.get(self.queue.commit_and_lease.remote(entry, published, self._beat_payload()))
        if grant == WAIT:
            return
        with self._bank_lock:
            if self._prefetching:
                if not isinstance(grant, Grant) or self._hold(grant.shard_id):
                    self._bank.put_nowait(grant)  # only this thread puts, and only into an empty bank
                return
        if isinstance(grant, Grant):  # the prefetcher ended meanwhile (a drain, a stop): nobody will run it
            self._hand_back([grant.shard_id], "the worker stopped taking shards")

    def _prepare(self, shard: Shard, attempt: int, revise: bool = False) -> ShardTask:
        """A leased shard -> its requests and error rows (datapath.py's steps; this runs on the prefetch thread).
        revise (`run --retry-errors`): only the rows that ended in error in its committed part."""
        table = read_shard(self.source, self.units, shard, self.read_columns)
        keep = key_columns(table, shard, self.id_column, self.keep_columns)
        base, rows = None, None
        if revise:
            base = self.parts.read(shard.shard_id)
            rows = redo_rows(base, self.sampling.n)
            table, keep = table.take(rows), keep.take(rows)
            ids = base.column(keep.column_names[0]).take([r * self.sampling.n for r in rows])
            if not ids.equals(keep.column(0)):
                raise RuntimeError(f"the input's ids of shard {shard.shard_id} differ from its committed part's: "
                                   "did the input change?")
        prompts = render(self.prompts, table, self.engine.render_chat)
        samplings = row_samplings(table, keep.column(0).to_pylist(), self.sampling, self.per_row)
        task = ShardTask(shard, attempt, keep, table.select(self.score_columns), self.sampling.n,
                         self.sampling.logprobs, self.sampling.top_logprobs, base=base, redo=rows)
        if self.scoring:
            requests, failed = self._score_requests(shard, table, prompts, samplings, task)
        else:
            limits = PromptLimits(self.engine.context_length, getattr(self.engine, "max_prompt_tokens", None),
                            self.spec.input.truncation)
            requests, failed = to_requests(shard.shard_id, prompts, samplings, self.engine.encode, limits)
        if self.spec.engine.dedupe == "auto":
            requests, task.copies = dedupe(requests)
        task.requests = requests
        for row, why, prompt_tokens in failed:
            task.fail_row(row, why, prompt_tokens)
        return task

    def _score_requests(self, shard: Shard, table, prompts, samplings, task: ShardTask) -> tuple[list, list]:
        """A scoring job's requests: each row's choices (or the labels, or its text in windows) as pairs."""
        score, parse = self.spec.score, self.spec.output.parse
        if self.scoring == "loglikelihood":
            task.choices = table.column(score.choices_column).to_pylist()
            delimiter = score.target_delimiter
        elif self.scoring == "labels":
            task.choices, delimiter = [list(parse.choices)] * table.num_rows, parse.target_delimiter
        else:
            task.counts, delimiter = [text_counts(t) if t else (0, 0) for t in prompts.texts], ""
        references = (table.column(score.reference_column).to_pylist()
                      if self.scoring == "loglikelihood" and score.reference_column else None)
        task.likelihoods = self.likelihoods
        return to_score_requests(shard.shard_id, prompts, samplings, self.engine, self.scoring, task.choices,
                                 references, delimiter)

    # ------------------------------------------------------------ writer: Parquet part, atomic commit

    def _write(self, finished: queue.Queue) -> None:
        while (task := finished.get()) is not None:
            table = task.table(self.parser, self.scorer)
            entry = self._entry(task, table)
            if task.base is not None:
                table, entry = self._revision(task, table, entry)
            # The commit happens here, not in the queue actor: the store's exclusive create decides the one winner,
            # and the queue only records it (its single thread never waits on an upload).
            published = self.parts.publish(table, entry, self.spec.output.compression)
            if not published and self.parts.entry(entry.shard_id) == entry:
                published = True  # a retried PUT whose first try landed: this attempt's own part
            self._commit(entry, published)
            self._release(entry.shard_id)
            record("rows", table.num_rows, **self.tags)
            record("shard_seconds", time.time() - task.started_at, **self.tags)
            self._add(rows=table.num_rows, shards=1)

    def _entry(self, task: ShardTask, table) -> ManifestEntry:
        return ManifestEntry(
            shard_id=task.shard.shard_id, state="committed", rows=table.num_rows,
            ids_digest=ids_digest(table.column(self.id_column or ROW_INDEX)), attempt=task.attempt,
            worker=self.worker_id, node=self.node, run_id=self.tags["run_id"], started_at=task.started_at,
            committed_at=time.time(), generated_tokens=sum(task.gen_tokens), prompt_tokens=sum(task.prompt_tokens),
            cached_prompt_tokens=sum(task.cached_tokens), error_rows=sum(e is not None for e in task.error),
            score=task.score_totals or (totals(table.column("score")) if self.scorer else None))

    def _revision(self, task: ShardTask, redone, entry: ManifestEntry) -> tuple:
        """`--retry-errors`: the committed part with its error rows replaced by `redone`, and its next entry."""
        old = entry_in(task.base.schema.metadata)
        table = merge_redone(task.base, redone, task.redo, task.n)
        revised = self._entry(task, table)
        if revised.ids_digest != old.ids_digest:
            raise RuntimeError(f"shard {entry.shard_id}: the revised part's ids differ from the committed part's")
        return table, dataclasses.replace(
            revised, generated_tokens=pc.sum(table["num_generated_tokens"]).as_py() or 0,
            prompt_tokens=pc.sum(table["num_prompt_tokens"]).as_py() or 0,
            error_rows=pc.sum(pc.equal(table["finish_reason"], "error")).as_py() or 0,
            score=merge_totals(old.score, entry.score),
            cached_prompt_tokens=old.cached_prompt_tokens + entry.cached_prompt_tokens, revision=old.revision + 1,
            retried={"rows": redone.num_rows, "still_failing": entry.error_rows,
                     "generated_tokens": entry.generated_tokens})

    # ------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        """Every heartbeat_s this worker writes its stats for its node, and the node's sender (whichever worker
        holds the node's lock: beats.py) sends every fresh one to the queue in one call; a commit carries one too.
        The queue's answer (the job is draining) reaches the node's other workers through the same directory."""
        import ray

        every, answer = self.spec.faults.heartbeat_s, None
        beats = NodeBeats(self.tags["run_id"], self.worker_id)
        try:
            while True:
                payload = self._beat_payload()
                posted = beats.post(payload)
                # the last call's answer, without waiting for it (a busy queue must not fail the worker)
                answered = answer is None or bool(ray.wait([answer], timeout=0)[0])
                if answer is not None and answered and ray.get(answer):
                    self.drain("the driver is draining the job")
                    beats.set_draining()
                if beats.draining():
                    self.drain("the driver is draining the job")
                if answered and not posted:  # the node's directory cannot be written: this worker's own heartbeat
                    answer = self.queue.heartbeat.remote(self.worker_id, *payload)
                elif answered and beats.lead():
                    answer = self.queue.heartbeats.remote(beats.collect(fresh_s=2 * every))
                if self._stop.wait(every):
                    return
        finally:
            beats.close()

    def _beat_payload(self) -> tuple:
        with self._stats_lock:
            self.stats.peak_rss_mb = peak_rss_mb()
            self.stats.store_retries = store_retries()
            idle = time.monotonic() - (self.loop.last_progress if self.loop else self._last_progress)
            self.stats.since_progress_s = idle if self.stats.in_flight else 0.0
            stats = dataclasses.replace(self.stats)
            held = tuple(self._held)
        record("in_flight", stats.in_flight, **self.tags)
        self._last_beat = time.monotonic()
        return self.node, os.getpid(), stats, held

    def _release(self, shard_id: int) -> None:
        with self._stats_lock:
            self._held.discard(shard_id)

    def _beat(self):
        """Send the worker's stats; the returned ref resolves to whether the job is draining."""
        return self.queue.heartbeat.remote(self.worker_id, *self._beat_payload())

    def _set(self, **values) -> None:
        with self._stats_lock:
            for key, value in values.items():
                setattr(self.stats, key, value)

    def _add(self, **deltas) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _snapshot(self) -> WorkerStats:
        with self._stats_lock:
            return dataclasses.replace(self.stats)
