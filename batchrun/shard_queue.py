"""The shard queue: hands out shards on request (pull), with leases renewed by worker heartbeats.

It runs as one Ray actor, so every state change is serialized: this is what makes a commit happen once. Its state is
rebuilt from the output manifest at start, never held only in memory: if the driver dies, a re-run knows what is done.

Why leases: a worker that dies or is cut off stops heartbeating, its lease expires and the shard is handed out
again; the driver also releases a dead worker's shards at once when Ray reports the death, so the lease timeout only
matters for workers that hang or are partitioned.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from batchrun.metrics import record as record_metric
from batchrun.process import set_niceness
from batchrun.records import ManifestEntry, Snapshot, WorkerStats
from batchrun.shards import Shard, ShardTable
from batchrun.store.fs import Store, store_retries
from batchrun.store.manifest import Manifest

log = logging.getLogger("batchrun.queue")
MARK_STEP = 1000  # the lease mark is kept this far ahead of the hand-out order: one small write per ~500 leases
WAIT, DONE, DRAIN = "wait", "done", "drain"


@dataclass(slots=True, frozen=True)
class Grant:
    """A lease as the worker receives it: the shard, which hand-out of it this is (1 = first), and whether its
    committed part is being revised (`run --retry-errors`)."""

    shard: Shard
    attempt: int
    revise: bool = False

    @property
    def shard_id(self) -> int:
        return self.shard.shard_id


@dataclass(slots=True)
class Lease:
    worker: str
    attempt: int
    started_at: float
    expires_at: float


def _reconstructed() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False outside an actor: tests, benchmarks)."""
    ray = sys.modules.get("ray")  # an actor's process has imported Ray; elsewhere it is not imported for this
    try:
        context = ray.get_runtime_context() if ray is not None and ray.is_initialized() else None
        return bool(context and context.get_actor_id() and context.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not an actor
        return False


class IdSet:
    """A set of shard ids 0..n-1 as a bitmap: one byte a shard, where a Python set of a million ints takes ~60."""

    def __init__(self, n: int, ids: np.ndarray):
        self._bits = np.zeros(n, dtype=bool)
        self._bits[ids] = True
        self._count = int(self._bits.sum())

    def __contains__(self, sid) -> bool:
        return 0 <= sid < len(self._bits) and bool(self._bits[sid])

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return iter(np.flatnonzero(self._bits).tolist())

    def add(self, sid: int) -> None:
        if not self._bits[sid]:
            self._bits[sid] = True
            self._count += 1

    def discard(self, sid: int) -> None:
        if sid in self:
            self._bits[sid] = False
            self._count -= 1

    def remove_all(self, ids: np.ndarray) -> None:
        self._bits[ids] = False
        self._count = int(self._bits.sum())

    def next_from(self, start: int) -> int:
        """The first id >= start in the set (the caller knows one is there)."""
        step = 1 << 16  # scanned a block at a time: committed runs of shards are skipped in bulk
        while start < len(self._bits):
            hit = np.flatnonzero(self._bits[start:start + step])
            if len(hit):
                return start + int(hit[0])
            start += step
        raise RuntimeError(f"no pending shard at or after {start} (the queue's hand-out order is broken)")


@dataclass(slots=True)
class WorkerInfo:
    worker: str
    node: str = ""
    pid: int = 0
    last_heartbeat: float = field(default_factory=time.time)
    stats: WorkerStats = field(default_factory=WorkerStats)
    version: int = 0  # the queue's change counter at this worker's last update (the driver asks for newer ones)


class ShardQueue:
    def __init__(self, out_dir: str, shards: list[Shard], run_id: str, max_attempts: int, lease_timeout_s: float,
                 compression: str = "zstd", niceness: int | None = None, done: set[int] | None = None,
                 revise: set[int] | frozenset[int] = frozenset()):
        """done: the shards committed by earlier runs, where the driver has read the manifest already (it merges
        and reconciles it at start); None: read it here. revise: committed shards whose error rows are generated
        again (`run --retry-errors`), handed out like pending ones; their parts are replaced, not created."""
        # Every worker waits on this one thread for its next shard: it runs at the workers' priority
        # (resources.niceness), not behind everything else on the head node at Ray's 15
        set_niceness(niceness)
        self.manifest = Manifest(Store(out_dir))  # the queue writes the manifest, nothing else
        self.run_id = run_id
        self.max_attempts = max_attempts
        self.lease_timeout_s = lease_timeout_s
        # the plan as ranges (a ShardTable: a shard is made when it is leased); a list of shards works too (tests)
        self.shards = shards if isinstance(shards, ShardTable) else tuple(shards)
        if not isinstance(shards, ShardTable) and any(s.shard_id != i for i, s in enumerate(self.shards)):
            raise ValueError("shard ids must be 0..n-1 in order")
        self.restarted = _reconstructed()
        # segment names: a restarted actor's must not reuse its predecessor's (their numbers start again)
        self.segment_prefix = f"{run_id}-r{time.time_ns()}" if self.restarted else run_id
        if self.restarted:  # Ray restarted this actor (its process or node died): the durable state says what is done
            done = self._rebuild_done()
        self._init_plan(self.manifest.committed().ids() if done is None else done, revise)
        self._init_bookkeeping()
        self._init_segments()

    def _rebuild_done(self) -> set[int]:
        """After a restart: the shards committed are the manifest's and those whose parts carry entries the lost
        actor had not written yet (their footers: the same repair as a driver's start after a crash). Leases are
        gone: workers re-adopt the shards they hold with their next heartbeat (see heartbeat)."""
        committed = self.manifest.committed()
        rebuilt = self.manifest.reconcile(committed, self.segment_prefix, len(self.shards),
                                          below=self.manifest.lease_mark())
        log.warning("shard queue restarted: %d shards committed (%d recovered from part footers); leases are "
                    "re-adopted from the workers' heartbeats", len(committed) + len(rebuilt), len(rebuilt))
        return committed.ids() | set(rebuilt)

    def _init_plan(self, done: set[int], revise) -> None:
        """Bookkeeping of about two bytes a shard: which are done, which are still to hand out (bitmaps), and the
        hand-out order: plan order (a cursor), with shards handed back or requeued first (a short deque)."""
        n = len(self.shards)
        self.revise = set(revise)
        done_ids = np.fromiter((s for s in set(done) - self.revise if 0 <= s < n), dtype=np.int64)
        self.done = IdSet(n, done_ids)
        self.pending_ids = IdSet(n, np.arange(n, dtype=np.int64))
        self.pending_ids.remove_all(done_ids)
        self._cursor = 0  # the next shard in plan order to consider
        self._requeued: collections.deque[int] = collections.deque()  # handed out before the cursor's next
        self.skipped = len(self.done)  # committed by earlier runs: never sent to an engine again
        self.skipped_rows = self._rows(done_ids)
        self.rows_total = self._rows(np.arange(n, dtype=np.int64))
        self.rows_done = self.skipped_rows

    def _rows(self, ids: np.ndarray) -> int:
        if isinstance(self.shards, ShardTable):
            return int(self.shards.num_rows(ids).sum())
        return sum(self.shards[int(i)].num_rows for i in ids)

    def _init_bookkeeping(self) -> None:
        self.leases: dict[int, Lease] = {}
        self.held: collections.Counter[str] = collections.Counter()  # leases per worker, for the fair share
        self.attempts: collections.Counter[int] = collections.Counter()  # hand-outs in this run
        self.failures: dict[int, list[str]] = collections.defaultdict(list)  # the shard's own failed attempts
        # engines that died while running the shard: charged to the engine (its worker is replaced), and to the shard
        # only as a suspect, so that a poison shard that kills every engine it reaches still ends in quarantine
        self.engine_deaths: dict[int, list[str]] = collections.defaultdict(list)
        self.handed_back = 0  # leases handed back uncharged (a draining worker, shards a dead engine never started)
        self.quarantined: dict[int, str] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.duplicates = 0  # commits that arrived for an already-committed shard (stale workers)
        self.draining = False  # the driver is stopping the job: leases answer DRAIN, heartbeats say so
        self.worker_count = 1  # live workers, set by the driver: each holds at most its share of the open shards
        self.started_at = time.time()
        self.queue_id = uuid.uuid4().hex  # this actor's: a restarted one's change counter starts again
        self._version = 0  # bumped by every change to a worker's record: progress() sends the changed ones
        self.heartbeat_calls = 0  # calls that carried heartbeats (a node's carries all its workers')
        self.worker_beats = 0  # the workers' heartbeats they carried
        self.commit_leases = 0  # leases taken by a commit (commit_and_lease)
        self._next_expiry = 0.0  # leases are checked for expiry at most once a second
        # Every shard leased has an id below the durable lease mark (Manifest.mark_leases): a crash resume lists only
        # what lies below it. A restarted actor continues its predecessor's mark, never lowers it.
        self.lease_mark = (self.manifest.lease_mark() or 0) if self.restarted else 0
        self._mark_writer: threading.Thread | None = None

    def _init_segments(self) -> None:
        # Manifest entries of this run's commits and quarantines, appended as one segment per batch: off the commit's
        # critical path (the part is already committed; its footer holds the entry until the segment is written).
        self.unflushed: list[ManifestEntry] = []  # appended by the actor's thread, taken by the uploader: _flush_lock
        self._flush_lock = threading.Lock()
        self._uploader: threading.Thread | None = None
        self.segment_failures = 0  # segment uploads that failed and were retried
        self.segments = 0
        self._last_flush = time.monotonic()
        self._compactor: threading.Thread | None = None
        # The plan's objects live as long as the queue: keep them out of the cyclic GC's scans (a full collection
        # over a 1M-shard plan stalled every call for hundreds of ms)
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------ worker side

    def set_worker_count(self, n: int) -> None:
        self.worker_count = max(1, n)

    def drain(self) -> None:
        """The driver got a stop signal: every worker stops admitting shards and hands back what it cannot finish."""
        self.draining = True

    def lease(self, worker: str) -> Grant | str:
        if self.draining:
            return DRAIN
        self._expire()
        if not self.pending_ids:
            return DONE if not self.leases else WAIT
        held = self.held[worker]
        if held and held >= -(-(len(self.pending_ids) + len(self.leases)) // self.worker_count):
            # Fair share: a worker that loaded first must not take shards a slower-loading one could run now.
            return WAIT
        return self._hand_out(worker)

    def _next_pending(self) -> int:
        """The next shard to hand out: a requeued one, else the next in plan order; shards committed meanwhile (by a
        stale worker) are no longer pending and are skipped."""
        while self._requeued:
            if (sid := self._requeued.popleft()) in self.pending_ids:
                return sid
        self._cursor = self.pending_ids.next_from(self._cursor)
        return self._cursor

    def _hand_out(self, worker: str) -> Grant | str:
        sid = self._next_pending()
        if not self._below_mark(sid):
            self._requeued.appendleft(sid)  # handed out first next time (a requeued one never lies past the mark)
            return WAIT  # the lease mark could not be written (the store): no lease past it; the worker asks again
        self._lease_to(worker, sid)
        return Grant(self.shards[sid], self.attempts[sid], sid in self.revise)

    def _lease_to(self, worker: str, sid: int) -> None:
        self.pending_ids.discard(sid)
        self.attempts[sid] += 1
        now = time.time()
        self.leases[sid] = Lease(worker, self.attempts[sid], now, now + self.lease_timeout_s)
        self.held[worker] += 1

    def _below_mark(self, sid: int) -> bool:
        """Whether shard `sid` lies below the durable lease mark (so it may be leased), keeping the mark MARK_STEP
        ahead of the hand-out order on a thread of its own: a lease waits for the store only when the mark is behind
        (a run's first lease), and then at most 5 s."""
        writing = self._mark_writer is not None and self._mark_writer.is_alive()
        if sid + MARK_STEP // 2 >= self.lease_mark and not writing:
            target = max(self.lease_mark, sid) + MARK_STEP
            self._mark_writer = threading.Thread(target=self._write_mark, args=(target,), daemon=True,
                                                 name="lease-mark")
            self._mark_writer.start()
        if sid >= self.lease_mark:
            self._mark_writer.join(timeout=5.0)
        return sid < self.lease_mark

    def _write_mark(self, below: int) -> None:
        try:
            self.manifest.mark_leases(below)
        except Exception as e:  # noqa: BLE001 - retried with the next lease that needs it
            log.warning("lease mark not written (%s: %s); leases past it wait", type(e).__name__, e)
            return
        self.lease_mark = max(self.lease_mark, below)

    def _end_lease(self, sid: int) -> Lease | None:
        lease = self.leases.pop(sid, None)
        if lease is not None:
            self.held[lease.worker] -= 1
        return lease

    def heartbeat(self, worker: str, node: str, pid: int, stats: WorkerStats, held: tuple[int, ...] = (),
                  age_s: float = 0.0) -> bool:
        """O(1): a worker's heartbeat renews all its leases at once (a lease expires when its worker's last
        heartbeat is older than the lease timeout; see _expire). Returns whether the job is draining.
        held: the shards the worker has in hand; after a restart of this actor, those it does not know as leased
        (and not done) become this worker's leases again instead of being handed to another.
        age_s: how long ago the worker wrote it (a node's heartbeat forwards its workers' latest)."""
        self.heartbeat_calls += 1
        return self._beat(worker, node, pid, stats, held, age_s)

    def heartbeats(self, beats: list[tuple]) -> bool:
        """One node's heartbeat: its workers' latest, each (worker, (node, pid, stats, held), age_s), in one call
        (batchrun.beats: one worker of each node sends them). Returns whether the job is draining."""
        self.heartbeat_calls += 1
        for worker, payload, age_s in beats:
            self._beat(worker, *payload, age_s=age_s)
        return self.draining

    def _beat(self, worker: str, node: str, pid: int, stats: WorkerStats, held: tuple[int, ...] = (),
              age_s: float = 0.0) -> bool:
        self.worker_beats += 1
        info = self.workers.setdefault(worker, WorkerInfo(worker))
        at = time.time() - max(0.0, age_s)
        if at < info.last_heartbeat and info.version:
            return self.draining  # an older beat than one already seen (a node's forward after the worker's commit)
        self._version += 1
        info.node, info.pid, info.stats, info.last_heartbeat, info.version = node, pid, stats, at, self._version
        if self.restarted:
            for sid in held:
                if sid in self.pending_ids:
                    self._lease_to(worker, sid)
        return self.draining

    def commit(self, entry: ManifestEntry, published: bool, beat: tuple | None = None) -> bool:
        """A worker committed a shard's part (published=True), or the store refused its copy because the shard is
        committed already (False: a stale attempt). Bookkeeping only: the commit itself happened in the worker.
        `beat`: the worker's heartbeat (node, pid, stats), carried by the commit instead of a call of its own."""
        if beat is not None:
            self._beat(entry.worker, *beat)
        sid = entry.shard_id
        if not published:
            self.duplicates += 1
            if sid in self.done:
                return False
            # The winner's own report has not arrived (or never will: it died right after its commit): record the
            # winner's entry, from its part's footer.
            entry = self.manifest.parts.entry(sid) or entry
        elif sid in self.done:
            return True  # the loser reported first and recorded this entry from the footer
        with self._flush_lock:
            self.unflushed.append(entry)
        self.flush(force=False)
        self.done.add(sid)
        self.rows_done += self.shards[sid].num_rows  # one shard made from its range
        self._end_lease(sid)
        self.quarantined.pop(sid, None)
        self.pending_ids.discard(sid)  # a stale worker finished a shard that had been handed back: no need to redo it
        return published

    def commit_and_lease(self, entry: ManifestEntry, published: bool, beat: tuple | None = None
                         ) -> tuple[bool, Grant | str]:
        """A commit that also takes the worker's next lease (as lease() answers it): one call a shard instead of
        two in a steady run (the worker banks the lease for its prefetcher)."""
        published, grant = self.commit(entry, published, beat), self.lease(entry.worker)
        self.commit_leases += isinstance(grant, Grant)
        return published, grant

    def flush(self, force: bool = True) -> int:
        """Append the unflushed manifest entries as one segment: at once when forced (the end of a run, which waits
        for it and raises if the store keeps failing), else once a second or every 1,000 entries, uploaded on a
        thread so that no lease waits on the store. A failed upload keeps its entries for the next tick: a commit or
        a progress call never fails because a segment could not be written (the parts' footers hold the entries
        meanwhile)."""
        if force:
            if self._compactor is not None:
                self._compactor.join()  # the end of a run (or a test) sees the merge done
            if self._uploader is not None:
                self._uploader.join()
            if batch := self._take():
                try:
                    self.manifest.append(*batch)
                except BaseException:
                    self._put_back(batch[0])
                    raise
                self._maybe_compact()
            return self.segments
        now = time.monotonic()
        uploading = self._uploader is not None and self._uploader.is_alive()
        if self.unflushed and not uploading and (len(self.unflushed) >= 1000 or now - self._last_flush >= 1.0):
            self._last_flush = now
            self._uploader = threading.Thread(target=self._upload, args=(self._take(),), daemon=True,
                                              name="manifest-segment")
            self._uploader.start()
            self._maybe_compact()
        return self.segments

    def _maybe_compact(self) -> None:
        if self.segments % 64 == 0 and not (self._compactor and self._compactor.is_alive()):
            # a long run: its segments merged into one now and then (~1 a minute), on a thread of its own so that
            # no lease waits for it (a segment written meanwhile, or still uploading, is left for the next merge)
            self._compactor = threading.Thread(target=self.manifest.compact, args=(self.run_id,),
                                               kwargs={"only_run": True}, daemon=True)
            self._compactor.start()

    def _take(self) -> tuple[list[ManifestEntry], str, int] | None:
        with self._flush_lock:
            if not self.unflushed:
                return None
            entries, self.unflushed = self.unflushed, []
            self.segments += 1
            return entries, self.segment_prefix, self.segments - 1

    def _put_back(self, entries: list[ManifestEntry]) -> None:
        with self._flush_lock:
            self.unflushed = entries + self.unflushed
            self.segment_failures += 1

    def _upload(self, batch) -> None:
        try:
            self.manifest.append(*batch)
        except Exception as e:  # noqa: BLE001 - kept for the next tick; the footers hold the entries meanwhile
            log.warning("manifest segment not written (%s: %s); retried at the next tick", type(e).__name__, e)
            self._put_back(batch[0])

    def fail(self, shard_id: int, worker: str, error: str) -> None:
        """The shard's attempt failed (unreadable input, lost lease, a worker that died holding it)."""
        self._charge(shard_id, worker, error, self.failures)

    def _charge(self, shard_id: int, worker: str, error: str, ledger: dict[int, list[str]]) -> None:
        """End the lease and note the failed attempt in `ledger` (the shard's own failures, or engine deaths);
        quarantine at max_attempts, else lease it again at once."""
        lease = self.leases.get(shard_id)
        if lease is None or lease.worker != worker or shard_id in self.done:
            return
        self._end_lease(shard_id)
        ledger[shard_id].append(f"attempt {lease.attempt} on {worker}: {error}")
        if len(ledger[shard_id]) >= self.max_attempts:
            self._quarantine(shard_id, lease, worker, error)
        else:
            record_metric("retries", 1, run_id=self.run_id)
            self._requeue(shard_id)

    def _quarantine(self, shard_id: int, lease: Lease, worker: str, error: str) -> None:
        record_metric("quarantined", 1, run_id=self.run_id)
        self.quarantined[shard_id] = error
        with self._flush_lock:
            self.unflushed.append(ManifestEntry(shard_id, "quarantined", attempt=lease.attempt, worker=worker,
                                                run_id=self.run_id, started_at=lease.started_at,
                                                committed_at=time.time(), error=error))
        self.flush(force=False)

    def _requeue(self, shard_id: int) -> None:
        self._requeued.appendleft(shard_id)  # leased again at once (and one bad shard surfaces early)
        self.pending_ids.add(shard_id)

    def hand_back(self, worker: str, shard_ids: list[int] | None, reason: str, engine_death: bool = False) -> list[int]:
        """A live worker gives its leases back at once, instead of letting them expire after lease_timeout_s: all of
        them (shard_ids None) or these. engine_death: its engine died running them (charged as engine deaths, see
        above); otherwise uncharged (a drain before preemption, shards a dead engine had not started)."""
        held = [sid for sid, lease in self.leases.items()
                if lease.worker == worker and (shard_ids is None or sid in shard_ids)]
        for sid in held:
            if engine_death:
                self._charge(sid, worker, reason, self.engine_deaths)
            else:
                self._end_lease(sid)
                self._requeue(sid)
                self.handed_back += 1
        return held

    def release_worker(self, worker: str, error: str) -> list[int]:
        """A worker died (its process, or its engine, or it stalled): every shard it still held goes back to the
        queue at once, charged as an engine death (see engine_deaths)."""
        record_metric("restarts", 1, run_id=self.run_id)
        held = self.hand_back(worker, None, error, engine_death=True)
        if worker in self.workers:
            self.workers[worker].stats.in_flight = 0
            self.workers[worker].stats.dead = True
            self._version += 1
            self.workers[worker].version = self._version
        return held

    # ------------------------------------------------------------ driver side

    def _expire(self) -> None:
        """Hand back the leases whose worker has not heartbeated for lease_timeout_s. A scan of the open leases, so
        at most every quarter timeout (and once a second at most): lease() and progress() call it all the time."""
        now = time.time()
        if now < self._next_expiry:
            return
        self._next_expiry = now + min(1.0, self.lease_timeout_s / 4)
        for sid, lease in list(self.leases.items()):
            info = self.workers.get(lease.worker)
            renewed = info.last_heartbeat + self.lease_timeout_s if info else 0.0
            if max(lease.expires_at, renewed) < now:
                self.fail(sid, lease.worker, f"lease expired (no heartbeat for {self.lease_timeout_s:.0f}s)")

    def finished(self) -> bool:
        self._expire()
        return not self.pending_ids and not self.leases

    def progress(self, known: tuple[str, int] | None = None) -> Snapshot:
        """One snapshot per driver tick: counters, and whether the job is finished, with the workers' stats changed
        since `known` (the last snapshot's `stats_version`; None: every worker's): at 10,000 workers all of them
        each tick took the queue's thread ~80 ms (bench/RESULTS.md)."""
        self._expire()
        self.flush(force=False)
        since = known[1] if known is not None and known[0] == self.queue_id else 0
        return Snapshot(
            finished=not self.pending_ids and not self.leases,
            shards_total=len(self.shards),
            shards_done=len(self.done),
            shards_skipped=self.skipped,
            rows_skipped=self.skipped_rows,
            shards_running=len(self.leases),
            shards_pending=len(self.pending_ids),
            shards_quarantined=len(self.quarantined),
            shard_failures=sum(len(v) for v in self.failures.values()),
            engine_deaths_charged=sum(len(v) for v in self.engine_deaths.values()),
            shards_handed_back=self.handed_back,
            segment_write_failures=self.segment_failures,
            queue_restarted=self.restarted,
            store_retries=store_retries(),
            rows_total=self.rows_total,
            rows_done=self.rows_done,
            duplicates=self.duplicates,
            workers={w: dataclasses.replace(i.stats, worker=w, node=i.node, pid=i.pid, heartbeat_at=i.last_heartbeat)
                     for w, i in self.workers.items() if i.version > since},
            stats_version=(self.queue_id, self._version),
            at=time.time(),
            heartbeat_calls=self.heartbeat_calls,
            worker_beats=self.worker_beats,
            commit_leases=self.commit_leases,
        )

    def report(self) -> dict:
        self.flush()
        return {
            "quarantined": {sid: {"error": err, "attempts": self.failures.get(sid, [])
                                  + self.engine_deaths.get(sid, [])}
                            for sid, err in sorted(self.quarantined.items())},
            "failures": {sid: v for sid, v in self.failures.items()},
        }
