"""The worker: one Ray actor per engine replica. Pull a shard, build prompts, keep the engine's window full, commit.

Three threads, so the engine never waits on I/O:
- the main loop submits requests and collects completions (the only thread that touches the engine);
- the prefetcher leases and reads the next shard while the current one is in flight, so there is no idle gap at a
  shard boundary (reading, prompt rendering and tokenization all happen here, off the engine's critical path);
- the writer turns a finished shard into a Parquet part and asks the queue to commit it.
A heartbeat thread renews the worker's leases and reports its counters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa

from batchrun.engines import Completion, Request, create_engine, sampling_from_spec
from batchrun.engines.base import row_seed
from batchrun.metrics import record
from batchrun.postprocess import Parser, Scorer, totals
from batchrun.process import node_name, peak_rss_mb, set_niceness, use_steady_arrow_pool
from batchrun.prompts import PromptBuilder, fit_to_context
from batchrun.shard_queue import DONE, WAIT
from batchrun.shards import Shard
from batchrun.sink import ManifestEntry, OutputDir, ids_digest
from batchrun.sources import open_source
from batchrun.spec import JobSpec, per_row_value

log = logging.getLogger("batchrun.worker")
ROW_INDEX = "row_index"  # the generated id column when the input names none


OUTPUT_SCHEMA = [
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("error", pa.string()),
]

TOP_LOGPROBS_TYPE = pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))


@dataclass
class ShardTask:
    """One leased shard between reading and commit. Results are slotted by (row, sample): exactly one per slot."""

    shard: Shard
    attempt: int
    keep: pa.Table  # id + passthrough columns, in input order
    refs: pa.Table  # the columns the scorer reads (reference column, or the whole row for a hook)
    n: int  # samples per row: slot = row * n + sample_index
    logprobs: bool  # keep each sample's token logprobs for a `logprobs` column
    top_logprobs: int = 0  # > 0: a `top_logprobs` column, the k likeliest tokens per generated token
    requests: list[Request] = field(default_factory=list)  # rows that reached the engine, in submission order
    started_at: float = field(default_factory=time.time)

    def __post_init__(self):
        slots = self.keep.num_rows * self.n
        self.text: list[str | None] = [None] * slots
        self.finish: list[str | None] = [None] * slots
        self.prompt_tokens, self.gen_tokens = [0] * slots, [0] * slots
        self.error: list[str | None] = [None] * slots
        self.token_logprobs: list[list[float] | None] = [None] * slots
        self.top: list[list[list[dict]] | None] = [None] * slots
        self.remaining = slots

    def fill(self, offset: int, c: Completion) -> None:
        slot = offset * self.n + c.sample_index
        if self.finish[slot] is not None:
            raise RuntimeError(f"shard {self.shard.shard_id} row {offset} sample {c.sample_index}: "
                               "a second completion arrived")
        self.text[slot] = c.text if c.error is None else None
        self.finish[slot] = c.finish_reason if c.error is None else "error"
        self.prompt_tokens[slot] = c.num_prompt_tokens
        self.gen_tokens[slot] = c.num_generated_tokens
        self.error[slot] = c.error
        self.token_logprobs[slot] = c.logprobs
        if self.top_logprobs and c.top_logprobs is not None:
            self.top[slot] = [[{"token_id": t, "logprob": lp} for t, lp in step.items()] for step in c.top_logprobs]
        self.remaining -= 1

    def fail_row(self, offset: int, error: str, prompt_tokens: int = 0) -> None:
        """A row that never reaches the engine: every one of its samples is an error row."""
        for k in range(self.n):
            self.fill(offset, Completion(f"{self.shard.shard_id}:{offset}", finish_reason="error", error=error,
                                         num_prompt_tokens=prompt_tokens, sample_index=k))

    def table(self, parser=None, scorer=None) -> pa.Table:
        assert self.remaining == 0 and all(f is not None for f in self.finish), \
            "shard written before every row finished"
        cols = [self.text, self.finish, self.prompt_tokens, self.gen_tokens, self.error]
        out, refs = self.keep, self.refs
        if self.n > 1:  # one output row per sample, in (row, sample) order
            rows = pa.array([i for i in range(self.keep.num_rows) for _ in range(self.n)], pa.int64())
            out, refs = out.take(rows), refs.take(rows)
            out = out.append_column("sample_index", pa.array(list(range(self.n)) * self.keep.num_rows, pa.int32()))
        for (name, typ), values in zip(OUTPUT_SCHEMA, cols):
            out = out.append_column(pa.field(name, typ), pa.array(values, type=typ))
        if self.logprobs:
            out = out.append_column("logprobs", pa.array(self.token_logprobs, pa.list_(pa.float32())))
        if self.top_logprobs:
            out = out.append_column("top_logprobs", pa.array(self.top, TOP_LOGPROBS_TYPE))
        parsed = None
        if parser is not None:
            for name, column in parser.columns(self.text).items():
                out = out.append_column(name, column)
            parsed = out.column("parsed").to_pylist()
        if scorer is not None:
            out = out.append_column("score", scorer.column(self.text, parsed, refs))
        return out


class Worker:
    """Wrapped by ray.remote in the driver (so this module imports without starting Ray)."""

    def __init__(self, worker_id: str, spec_json: str, units: tuple[str, ...], shard_queue, run_id: str = ""):
        self.worker_id = worker_id
        self.tags = {"run_id": run_id, "worker": worker_id}  # metric tags
        self.spec = JobSpec.model_validate_json(spec_json)
        niceness = set_niceness(self.spec.resources.niceness)  # before any engine thread or rank exists
        arrow_pool = use_steady_arrow_pool()  # before the worker reads or builds any table
        self.units = units
        self.queue = shard_queue
        self.node = node_name()
        self.source = open_source(self.spec.input)
        self.prompts = PromptBuilder(self.spec.input)
        self.out = OutputDir(self.spec.output.dir)
        self.sampling = sampling_from_spec(self.spec.sampling)
        self.id_column = self.spec.input.id_column
        passthrough = [c for c in self.spec.input.passthrough_columns if c != self.id_column]
        self.per_row = dict(self.spec.sampling.per_row)  # sampling key -> column
        self.read_columns = list(dict.fromkeys(([self.id_column] if self.id_column else []) + passthrough
                                               + self.prompts.variables + list(self.per_row.values())))
        self.keep_columns = ([self.id_column] if self.id_column else []) + passthrough
        score = self.spec.score
        self.parser = Parser(self.spec.output.parse) if self.spec.output.parse else None
        self.scorer = Scorer(score) if score else None
        self.score_columns = self._score_columns(score)
        self.read_columns = list(dict.fromkeys(self.read_columns + self.score_columns))
        self.engine = None
        self.stats = {"rows": 0, "shards": 0, "generated_tokens": 0, "prompt_tokens": 0, "in_flight": 0,
                      "since_progress_s": 0.0, "niceness": niceness, "arrow_pool": arrow_pool,
                      "first_submit_at": 0.0, "first_completion_at": 0.0,  # the engine's busy window, for benchmarks
                      "last_completion_at": 0.0, "created_at": time.time()}
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _score_columns(self, score) -> list[str]:
        """A built-in scorer reads the reference column; a hook sees every column the job reads, and the reference."""
        if score is None:
            return []
        ref = [score.reference_column] if score.reference_column else []
        return list(dict.fromkeys(self.read_columns + ref)) if score.hook else ref

    # ------------------------------------------------------------ lifecycle

    def start(self) -> dict:
        """Load the engine. A failure here surfaces to the driver as this call's error."""
        started = time.time()
        self.engine = create_engine(self.spec.engine, self.spec.sampling, self.spec.output.parse)
        self.stats["engine_start_s"] = round(time.time() - started, 3)
        self.stats["engine_startup"] = dict(getattr(self.engine, "startup", {}) or {})
        self.stats["engine_ready_at"] = time.time()
        self.stats["kv_cache_tokens"] = self.engine.kv_cache_tokens
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
        threads = [
            threading.Thread(target=self._guard, args=(self._prefetch, ready), daemon=True, name="prefetch"),
            threading.Thread(target=self._guard, args=(self._write, finished), daemon=True, name="writer"),
            threading.Thread(target=self._guard, args=(self._heartbeat,), daemon=True, name="heartbeat"),
        ]
        for t in threads:
            t.start()
        try:
            self._generate(ready, finished)
        finally:
            self._put(finished, None)
            threads[1].join()
            self._stop.set()
        if self._error is not None:
            raise self._error
        self._beat()
        return dict(self.stats, worker=self.worker_id, node=self.node)

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

    def _generate(self, ready: queue.Queue, finished: queue.Queue) -> None:
        engine, window = self.engine, 0  # 0: sized from the first shard that reaches the loop
        by_shard: dict[int, ShardTask] = {}
        current: ShardTask | None = None
        cursor, in_flight, exhausted = 0, 0, False
        while not self._stop.is_set():
            while (not window or in_flight < window) and not exhausted:
                if current is None or cursor == len(current.requests):
                    try:  # block only when the engine has nothing to do
                        current = ready.get(timeout=0.2) if in_flight == 0 else ready.get_nowait()
                    except queue.Empty:
                        current = None
                        break
                    if current is None:  # the prefetcher's end marker
                        exhausted = True
                        break
                    cursor = 0
                    by_shard[current.shard.shard_id] = current
                    window = window or self._window(current)
                    if current.remaining == 0:  # every row was an error row
                        self._put(finished, by_shard.pop(current.shard.shard_id))
                    continue
                engine.submit(current.requests[cursor])
                in_flight += current.requests[cursor].sampling.n  # counted in samples: one completion each
                cursor += 1
                if cursor == len(current.requests):  # all submitted: the engine holds them now, drop our copies
                    current.requests, cursor = [], 0
                self.stats["first_submit_at"] = self.stats["first_submit_at"] or time.time()
            if exhausted and in_flight == 0:
                return
            if in_flight == 0:
                continue
            done = engine.poll(timeout=0.05)
            if done:
                self._last_progress = time.monotonic()
                self.stats["last_completion_at"] = time.time()
                self.stats["first_completion_at"] = self.stats["first_completion_at"] or time.time()
            in_flight -= len(done)
            self.stats["in_flight"] = in_flight
            record("tokens", sum(c.num_generated_tokens for c in done), **self.tags)
            for c in done:
                sid, offset = map(int, c.request_id.split(":"))
                task = by_shard[sid]
                task.fill(offset, c)
                self.stats["generated_tokens"] += c.num_generated_tokens
                self.stats["prompt_tokens"] += c.num_prompt_tokens
                if task.remaining == 0:
                    self._put(finished, by_shard.pop(sid))

    def _window(self, task: ShardTask) -> int:
        """The engine's window (engine.max_in_flight, or auto from its KV cache and this shard's request sizes)."""
        reqs = task.requests
        sizes = [(len(r.prompt_token_ids) if r.prompt_token_ids is not None else len(r.prompt.split()))
                 + r.sampling.max_tokens for r in reqs]
        window, why = self.engine.window(sum(sizes) / len(sizes) if sizes else self.sampling.max_tokens)
        self.stats["max_in_flight"], self.stats["max_in_flight_why"] = window, why
        log.info("worker %s: %d requests in flight (%s)", self.worker_id, window, why)
        return window

    # ------------------------------------------------------------ prefetcher: lease, read, render, tokenize

    def _prefetch(self, ready: queue.Queue) -> None:
        import ray

        while not self._stop.is_set():
            shard = ray.get(self.queue.lease.remote(self.worker_id))
            if shard == DONE:
                self._put(ready, None)
                return
            if shard == WAIT:  # other workers hold the rest; one may die and hand its shards back
                time.sleep(0.5)
                continue
            attempt = ray.get(self.queue.attempt_of.remote(shard.shard_id))
            try:
                task = self._prepare(shard, attempt)
            except Exception as e:  # unreadable shard: this attempt fails, the queue retries or quarantines it
                log.exception("shard %s: cannot prepare", shard.shard_id)
                ray.get(self.queue.fail.remote(shard.shard_id, self.worker_id, f"{type(e).__name__}: {e}"))
                continue
            self._put(ready, task)

    def _prepare(self, shard: Shard, attempt: int) -> ShardTask:
        table = self.source.read(self.units, shard.fragments, self.read_columns)
        if table.num_rows != shard.num_rows:
            raise RuntimeError(f"read {table.num_rows} rows, the plan says {shard.num_rows}: did the input change?")
        keep = table.select(self.keep_columns)
        if not self.id_column:
            keep = keep.add_column(0, ROW_INDEX, pa.array(range(shard.row_start, shard.row_start + shard.num_rows),
                                                          pa.int64()))
        prompts = self.prompts.build(table)
        task = ShardTask(shard, attempt, keep, table.select(self.score_columns), self.sampling.n,
                         self.sampling.logprobs, self.sampling.top_logprobs)
        if prompts.chat:
            prompts = self._render_chat(prompts)
        samplings, errors = self._row_sampling(table, keep.column(0)), list(prompts.errors)
        for i, s in enumerate(samplings):
            if isinstance(s, str) and errors[i] is None:
                errors[i] = s
        ok = [i for i, t in enumerate(prompts.texts) if t is not None and errors[i] is None]
        token_ids = self.engine.encode([prompts.texts[i] for i in ok]) if ok else []
        context = self.engine.context_length
        for j, i in enumerate(ok):
            sampling, ids = samplings[i], token_ids[j] if token_ids is not None else None
            if ids is not None:
                ids, errors[i] = fit_to_context(ids, sampling.max_tokens, context, self.spec.input.truncation,
                                                getattr(self.engine, "max_prompt_tokens", None))
                if errors[i] is None and not ids:
                    errors[i] = "prompt is empty (0 tokens)"
                if errors[i] is not None:
                    task.fail_row(i, errors[i], len(token_ids[j]))
                    continue
            task.requests.append(Request(f"{shard.shard_id}:{i}", prompts.texts[i], ids, sampling))
        sent_or_failed = set(ok)  # rows in `ok` either went to the engine or were failed above
        for i, err in enumerate(errors):
            if err is not None and i not in sent_or_failed:
                task.fail_row(i, err)
        return task

    def _render_chat(self, prompts):
        """Message lists -> prompt text through the engine's chat template (one call per shard)."""
        ok = [i for i, m in enumerate(prompts.texts) if isinstance(m, list)]  # plain text rows stay as they are
        texts, errors = [m if isinstance(m, str) else None for m in prompts.texts], list(prompts.errors)
        try:
            for i, text in zip(ok, self.engine.render_chat([prompts.texts[i] for i in ok])):
                texts[i] = text
        except Exception as e:  # one template failure must not fail the shard: render row by row
            for i in ok:
                try:
                    texts[i] = self.engine.render_chat([prompts.texts[i]])[0]
                except Exception as row_error:
                    errors[i] = f"chat template failed for this row: {row_error or e}"
        return type(prompts)(texts, errors)

    def _row_sampling(self, table: pa.Table, row_ids: pa.ChunkedArray) -> list:
        """Per-row sampling: the job's settings, overridden by the columns named in sampling.per_row.

        A job seed becomes one seed per row, derived from the row's id: a row samples the same way whatever shard,
        worker or batch it lands in. A row whose override is unusable gets the error message instead, and becomes an
        error row."""
        base = self.sampling
        if not self.per_row and base.seed is None:
            return [base] * table.num_rows
        ids = row_ids.to_pylist()
        columns = {key: table.column(col).to_pylist() for key, col in self.per_row.items()}
        out = []
        for i in range(table.num_rows):
            changes, error = {}, None
            for key, values in columns.items():
                if values[i] is None:  # no override in this row: the job's setting
                    continue
                value, expected = per_row_value(key, values[i])
                if expected is not None:
                    error = (f"column {self.per_row[key]!r} (sampling.per_row.{key}): expected {expected}, "
                             f"got {values[i]!r}")
                    break
                changes[key] = value
            if error is not None:
                out.append(error)
                continue
            if "seed" not in changes and base.seed is not None:
                changes["seed"] = row_seed(base.seed, ids[i])
            out.append(dataclasses.replace(base, **changes) if changes else base)
        return out

    # ------------------------------------------------------------ writer: Parquet part, atomic commit

    def _write(self, finished: queue.Queue) -> None:
        import ray

        while (task := finished.get()) is not None:
            table = task.table(self.parser, self.scorer)
            id_col = table.column(self.id_column or ROW_INDEX)
            entry = ManifestEntry(
                shard_id=task.shard.shard_id, state="committed", rows=table.num_rows, ids_digest=ids_digest(id_col),
                attempt=task.attempt, worker=self.worker_id, node=self.node, started_at=task.started_at,
                committed_at=time.time(), generated_tokens=sum(task.gen_tokens), prompt_tokens=sum(task.prompt_tokens),
                error_rows=sum(e is not None for e in task.error),
                score=totals(table.column("score")) if self.scorer else None,
            )
            tmp = self.out.write_temp(table, entry, self.spec.output.compression)
            ray.get(self.queue.commit.remote(str(tmp), entry))
            record("rows", table.num_rows, **self.tags)
            record("shard_seconds", time.time() - task.started_at, **self.tags)
            self.stats["rows"] += table.num_rows
            self.stats["shards"] += 1

    # ------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.spec.faults.heartbeat_s):
            self._beat()

    def _beat(self) -> None:
        self.stats["peak_rss_mb"] = peak_rss_mb()
        record("in_flight", self.stats["in_flight"], **self.tags)
        self.stats["since_progress_s"] = time.monotonic() - self._last_progress if self.stats["in_flight"] else 0.0
        self.queue.heartbeat.remote(self.worker_id, self.node, os.getpid(), dict(self.stats))
