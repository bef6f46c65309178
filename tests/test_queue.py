"""The shard queue's state machine and the commit of parts, without Ray (the queue is a plain class)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.plan import cut_shards
from batchrun.records import ManifestEntry, WorkerStats
from batchrun.shard_queue import DONE, WAIT, ShardQueue
from batchrun.store.output import OutputDir
from batchrun.store.parts import ids_digest

pytestmark = pytest.mark.fast


def make_queue(tmp_path, n_shards=3, **kw):
    out = OutputDir(tmp_path / "out")
    out.ensure()
    shards = cut_shards((n_shards * 10,), 10)
    args = dict(max_attempts=2, lease_timeout_s=60.0) | kw
    return ShardQueue(str(out.root), list(shards), "run1", **args), out


def commit(q, out, shard_id, worker, ids, attempt=1):
    table = pa.table({"id": ids, "generated_text": [worker] * len(ids)})
    entry = ManifestEntry(shard_id, "committed", rows=len(ids), ids_digest=ids_digest(table.column("id")),
                          attempt=attempt, worker=worker)
    return q.commit(entry, out.parts.publish(table, entry, "zstd"))


def test_stale_worker_commit_is_a_noop(tmp_path):
    q, out = make_queue(tmp_path, lease_timeout_s=0.05)
    s = q.lease("w1")
    assert s.shard_id == 0
    time.sleep(0.1)  # w1 stops heartbeating: its lease expires and the shard goes to w2
    assert q.lease("w2").shard_id == 0
    assert commit(q, out, 0, "w2", list(range(10)), attempt=2) is True
    assert commit(q, out, 0, "w1", list(range(10)), attempt=1) is False  # the stale worker comes back
    assert pq.read_table(out.parts.path(0)).column("generated_text").to_pylist() == ["w2"] * 10
    q.flush()
    assert out.manifest.entries()[0].worker == "w2" and out.manifest.entries()[0].attempt == 2
    assert q.progress().duplicates == 1
    assert not out.list(out.tmp)


def test_loser_reporting_first_records_the_winners_entry(tmp_path):
    """The store decides the winner; if the winner dies right after its commit (or its report is slower), the
    loser's report must record the winner's entry, from the part's footer, and end the shard."""
    q, out = make_queue(tmp_path, lease_timeout_s=0.05)
    q.lease("w1")
    time.sleep(0.1)
    q.lease("w2")
    table = pa.table({"id": list(range(10)), "generated_text": ["w1"] * 10})
    won = ManifestEntry(0, "committed", rows=10, ids_digest=ids_digest(table.column("id")), attempt=1, worker="w1")
    assert out.parts.publish(table, won, "zstd") is True  # w1 commits, then dies before telling the queue
    assert commit(q, out, 0, "w2", list(range(10)), attempt=2) is False
    q.flush()
    assert out.manifest.entries()[0].worker == "w1" and 0 in q.done and 0 not in q.leases
    assert q.commit(won, True) is True  # w1's report arriving late changes nothing
    assert q.progress().duplicates == 1 and q.progress().shards_done == 1


def test_commit_is_no_clobber_even_across_queues(tmp_path):
    """Two queues (a dead driver's leftover and a new run) cannot both publish a shard: the link refuses."""
    q1, out = make_queue(tmp_path)
    q2, _ = make_queue(tmp_path)
    q1.lease("a"), q2.lease("b")
    assert commit(q1, out, 0, "a", list(range(10))) is True
    assert commit(q2, out, 0, "b", list(range(10))) is False
    assert pq.read_table(out.parts.path(0)).column("generated_text").to_pylist() == ["a"] * 10


def test_failures_quarantine_after_max_attempts_and_rerun_retries(tmp_path):
    q, out = make_queue(tmp_path)
    for attempt in range(2):
        s = q.lease("w")
        assert s.shard_id == 0  # a failed shard goes to the front of the queue
        q.fail(0, "w", f"boom {attempt}")
    assert q.report()["quarantined"][0]["error"] == "boom 1"
    assert out.manifest.entries()[0].state == "quarantined"
    assert [q.lease("w").shard_id, q.lease("w").shard_id] == [1, 2]
    assert q.lease("w") == WAIT
    commit(q, out, 1, "w", list(range(10, 20)))
    commit(q, out, 2, "w", list(range(20, 30)))
    assert q.finished() and q.lease("w") == DONE
    q.report()  # the end of a run writes the last manifest segment
    q2, _ = make_queue(tmp_path)  # a re-run: state comes from the manifest; the quarantined shard is retried
    assert q2.lease("w").shard_id == 0 and q2.lease("w") == WAIT
    assert q2.progress().shards_skipped == 2


def test_release_worker_returns_all_its_shards(tmp_path):
    q, _ = make_queue(tmp_path, max_attempts=5)
    q.lease("w1"), q.lease("w1"), q.lease("w2")
    assert sorted(q.release_worker("w1", "killed")) == [0, 1]
    assert sorted(q.pending_ids) == [0, 1] and list(q.leases) == [2]


class Clock:
    """The queue's clock, moved by the test: lease expiry checked without depending on the machine's speed."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def expire_at(q, clock: Clock, now: float) -> None:
    clock.now = now
    q._next_expiry = 0.0  # the expiry scan is rate-limited; run it now
    q._expire()


def test_heartbeat_renews_leases(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("batchrun.shard_queue.time", clock)
    q, _ = make_queue(tmp_path, lease_timeout_s=0.3)
    t0 = clock.now
    q.lease("w1")
    q.lease("w2")
    for k in range(1, 5):
        clock.now = t0 + 0.1 * k
        q.heartbeat("w1", "node", 1, WorkerStats())  # w2 never heartbeats
    expire_at(q, clock, t0 + 0.45)
    assert 0 in q.leases  # 0.45 s after the lease, still held thanks to the heartbeats
    assert 1 not in q.leases and 1 in q.pending_ids  # the same expiry took w2's lease back
    expire_at(q, clock, t0 + 0.75)
    assert 0 not in q.leases  # 0.35 s after w1's last heartbeat


def test_reconcile_rebuilds_entry_of_a_part_committed_before_a_crash(tmp_path):
    q, out = make_queue(tmp_path)
    q.lease("w")
    commit(q, out, 0, "w", list(range(10)))
    assert q.unflushed and out.manifest.entries() == {}  # crash after the commit, before the queue wrote its segment
    assert list(out.manifest.reconcile(set(), "run2")) == [0]
    assert out.manifest.entries()[0].ids_digest == q.unflushed[0].ids_digest
    assert out.manifest.reconcile(set(out.manifest.entries()), "run3") == {}


def test_a_long_run_merges_its_own_segments_as_it_goes(tmp_path):
    q, out = make_queue(tmp_path, n_shards=200)
    out.manifest.append([ManifestEntry(199, "committed", rows=10)], "earlier", 0)  # another run's segment stays
    for sid in range(130):
        q.lease("w")
        commit(q, out, sid, "w", list(range(sid * 10, sid * 10 + 10)))
        q.flush()  # one segment per commit here: the queue merges its own every 64
    segments = out.list(out.manifest_dir)
    assert len(segments) == 1 + 1 + 2  # the earlier run's, one merged of 128, and the last 2
    assert sorted(out.manifest.entries()) == list(range(130)) + [199]


def test_fair_share_leaves_shards_for_workers_still_loading(tmp_path):
    q, _ = make_queue(tmp_path, n_shards=4)
    q.set_worker_count(2)
    assert [q.lease("w1").shard_id, q.lease("w1").shard_id] == [0, 1]
    assert q.lease("w1") == WAIT  # its share of 4 open shards over 2 workers is 2
    assert q.lease("w2").shard_id == 2
    q.set_worker_count(1)  # w2 died: w1 may take the rest
    assert q.lease("w1").shard_id == 3


def test_fingerprint_ignores_keys_left_at_their_defaults():
    """A newer batchrun adding a key at its default must still resume a job started by an older one."""
    from batchrun.spec import validate_spec

    base = {"engine": {"name": "echo"}, "input": {"path": "x"}, "output": {"dir": "y"}}
    plain = validate_spec(base).output_affecting()
    explicit = validate_spec({**base, "sampling": {"n": 1, "logprobs": False}}).output_affecting()
    assert plain == explicit and "n" not in plain["sampling"]
    assert validate_spec({**base, "sampling": {"n": 2}}).output_affecting() != plain


def test_bookkeeping_stays_exact_through_stale_commits_and_expiry(tmp_path):
    """The O(1) bookkeeping (pending ids, per-worker lease counts, expiry by last heartbeat) against the slow truth."""
    q, out = make_queue(tmp_path, n_shards=4, lease_timeout_s=0.2)
    q.set_worker_count(2)
    a, b = q.lease("w1"), q.lease("w1")
    assert (a.shard_id, b.shard_id) == (0, 1) and q.held["w1"] == 2
    assert q.lease("w1") == WAIT  # its fair share of 4 open shards over 2 workers
    q.heartbeat("w2", "n", 2, WorkerStats())
    time.sleep(0.3)  # w1 never heartbeated: both its leases expire and go back, in order
    q.heartbeat("w2", "n", 2, WorkerStats())
    c = q.lease("w2")
    assert q.held["w1"] == 0 and c.shard_id == 1 and sorted(q.pending_ids) == [0, 2, 3]
    assert commit(q, out, 0, "w1", list(range(10)))  # w1's late commit of a shard handed back: it counts, once
    assert 0 not in q.pending_ids and q.progress().shards_pending == 2
    assert [q.lease("w2").shard_id] == [2]  # shard 0 is skipped in the hand-out order
    assert commit(q, out, 1, "w2", list(range(10, 20))) and q.held["w2"] == 1
    q.fail(2, "w2", "boom")
    assert q.held["w2"] == 0 and sorted(q.pending_ids) == [2, 3]


def test_a_commit_carries_the_workers_heartbeat(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("batchrun.shard_queue.time", clock)
    q, out = make_queue(tmp_path, lease_timeout_s=0.3)
    t0 = clock.now
    q.lease("w")
    q.lease("w")
    clock.now = t0 + 0.2
    table = pa.table({"id": list(range(10)), "generated_text": ["w"] * 10})
    entry = ManifestEntry(0, "committed", rows=10, ids_digest=ids_digest(table.column("id")), attempt=1, worker="w")
    assert q.commit(entry, out.parts.publish(table, entry, "zstd"), ("node-a", 42, WorkerStats(in_flight=7))) is True
    expire_at(q, clock, t0 + 0.4)  # 0.4 s after the lease: shard 1 is still held, renewed by the commit's heartbeat
    assert 1 in q.leases
    expire_at(q, clock, t0 + 0.55)  # and lost once the commit's heartbeat is older than the timeout
    assert 1 not in q.leases
    worker = q.progress().workers["w"]
    assert worker.node == "node-a" and worker.in_flight == 7


def test_heartbeat_interval_grows_with_the_worker_count():
    from batchrun.pool import heartbeat_for
    from batchrun.spec import validate_spec

    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": "x.parquet"}, "output": {"dir": "o"}})
    assert heartbeat_for(spec, 8) is spec  # the job's 2 s
    assert heartbeat_for(spec, 1000).faults.heartbeat_s == 4.0  # 1,000 workers: 250 heartbeats/s in all
    assert heartbeat_for(spec, 10_000).faults.heartbeat_s == 40.0  # a third of the 120 s lease timeout
    assert heartbeat_for(spec, 100_000).faults.heartbeat_s == 40.0
    # one heartbeat a node (beats.py): 10,000 workers on 1,250 nodes of 8 send 250 calls/s at 5 s
    assert heartbeat_for(spec, 10_000, nodes=1250).faults.heartbeat_s == 5.0
    assert heartbeat_for(spec, 1000, nodes=125) is spec


def test_a_revision_replaces_the_part_and_readers_see_every_row_once_at_every_instant(tmp_path):
    """`run --retry-errors` replaces a committed part (os.replace of a whole file): a reader listing and reading the
    output meanwhile sees the old part or the new one, never both or neither; the newest revision's entry wins in
    whatever order the segments merge, and wins over a later quarantine."""
    import threading

    import pyarrow.dataset as ds

    q, out = make_queue(tmp_path)
    q.lease("w")
    commit(q, out, 0, "w", list(range(10)))
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(sorted(ds.dataset(out.root, format="parquet").to_table().column("id").to_pylist()))

    reader = threading.Thread(target=read)
    reader.start()
    entries = []
    for revision in range(1, 40):
        table = pa.table({"id": list(range(10)), "generated_text": [f"r{revision}"] * 10})
        entry = ManifestEntry(0, "committed", rows=10, ids_digest=ids_digest(table.column("id")), revision=revision,
                              retried={"rows": 1, "still_failing": 0, "generated_tokens": 3})
        assert out.parts.publish(table, entry, "zstd") is True  # a revision is a replacement, never refused
        entries.append(entry)
    stop.set()
    reader.join()
    assert seen and all(ids == list(range(10)) for ids in seen)
    assert pq.read_table(out.parts.path(0)).column("generated_text").to_pylist() == ["r39"] * 10
    assert out.parts.entry(0).revision == 39 and out.parts.entry(0).retried["generated_tokens"] == 3
    quarantined = ManifestEntry(0, "quarantined", committed_at=time.time() + 60, error="a failed retry")
    for k, order in enumerate([entries, entries[::-1]]):
        out.manifest.append([*order[:20], quarantined, *order[20:]], f"r{k}", 0)
        assert out.manifest.entries()[0].revision == 39 and out.manifest.entries()[0].retried["rows"] == 1


def test_a_lease_says_its_attempt_and_a_commit_can_take_the_next_lease(tmp_path):
    q, out = make_queue(tmp_path, n_shards=3)
    grant = q.lease("w")
    assert (grant.shard_id, grant.attempt, grant.revise) == (0, 1, False)
    q.fail(0, "w", "unreadable")
    again = q.lease("w")
    assert (again.shard_id, again.attempt) == (0, 2)  # the second hand-out of shard 0
    table = pa.table({"id": list(range(10)), "generated_text": ["w"] * 10})
    entry = ManifestEntry(0, "committed", rows=10, ids_digest=ids_digest(table.column("id")), attempt=2, worker="w")
    published, following = q.commit_and_lease(entry, out.parts.publish(table, entry, "zstd"))
    assert published is True and following.shard_id == 1 and 1 in q.leases and q.leases[1].worker == "w"
    assert 0 in q.done and q.progress().commit_leases == 1
    q.lease("w")
    entry1 = ManifestEntry(1, "committed", rows=10, worker="w")
    assert q.commit_and_lease(entry1, True) == (True, WAIT)  # shard 2 is still running: nothing left to hand out
    assert q.progress().commit_leases == 1


def test_a_nodes_heartbeat_renews_each_worker_from_when_it_wrote(tmp_path, monkeypatch):
    """One call carries a node's workers (beats.py); each is dated by its age, so a worker that stopped writing
    loses its leases on time even though its node's sender forwarded its last heartbeat later."""
    clock = Clock()
    monkeypatch.setattr("batchrun.shard_queue.time", clock)
    q, out = make_queue(tmp_path, lease_timeout_s=1.0)
    t0 = clock.now
    q.set_worker_count(2)
    q.lease("a"), q.lease("b")
    clock.now = t0 + 0.8
    payload = ("node-1", 7, WorkerStats(in_flight=3), ())
    assert q.heartbeats([("a", payload, 0.0), ("b", payload, 0.7)]) is False  # b wrote at t0 + 0.1
    expire_at(q, clock, t0 + 1.3)
    assert 0 in q.leases and 1 not in q.leases  # b's lease lapsed 1 s after it wrote, a's is renewed
    snap = q.progress()
    assert (snap.heartbeat_calls, snap.worker_beats) == (1, 2)
    assert snap.workers["a"].heartbeat_at == t0 + 0.8 and snap.workers["b"].in_flight == 3
    q.heartbeats([("a", ("node-1", 7, WorkerStats(in_flight=1), ()), 0.6)])  # older than a's last: ignored
    assert q.progress().workers["a"].in_flight == 3
    q.drain()
    assert q.heartbeats([]) is True


def test_progress_sends_the_workers_changed_since_the_drivers_last_snapshot(tmp_path):
    q, out = make_queue(tmp_path)
    for w in ("a", "b", "c"):
        q.heartbeat(w, "n", 1, WorkerStats(rows=1))
    first = q.progress()
    seen = first.merge_workers({}, None)
    assert sorted(seen) == ["a", "b", "c"]
    q.heartbeat("b", "n", 1, WorkerStats(rows=2))
    second = q.progress(first.stats_version)
    assert list(second.workers) == ["b"]  # only b changed
    seen = second.merge_workers(seen, first.stats_version)
    assert sorted(seen) == ["a", "b", "c"] and seen["b"].rows == 2 and second.workers is seen
    assert list(q.progress(second.stats_version).workers) == []
    q.release_worker("c", "died")
    assert list(q.progress(second.stats_version).workers) == ["c"]
    other, _ = make_queue(tmp_path / "restarted")  # a restarted queue actor: another id, every worker again
    other.heartbeat("a", "n", 1, WorkerStats(rows=5))
    snap = other.progress(second.stats_version)
    assert list(snap.workers) == ["a"]
    assert list(snap.merge_workers(seen, second.stats_version)) == ["a"]  # the old actor's view is dropped


def test_the_lease_mark_is_written_ahead_of_every_lease(tmp_path):
    """Every shard handed out lies below the durable lease mark (a crash resume lists only below it)."""
    from batchrun.shard_queue import MARK_STEP

    q, out = make_queue(tmp_path, n_shards=3 * MARK_STEP)
    assert out.manifest.lease_mark() is None  # nothing leased, nothing promised
    for _ in range(int(1.7 * MARK_STEP)):
        grant = q.lease("w")
        assert grant.shard_id < out.manifest.lease_mark()
    assert out.manifest.lease_mark() <= grant.shard_id + 2 * MARK_STEP  # ahead, not far ahead
    rerun, _ = make_queue(tmp_path, n_shards=3 * MARK_STEP)  # the next run's queue promises anew from its own leases
    assert rerun.lease("w").shard_id == 0 and out.manifest.lease_mark() == MARK_STEP


def test_no_lease_past_a_lease_mark_the_store_would_not_take(tmp_path, monkeypatch):
    q, out = make_queue(tmp_path, n_shards=5)
    monkeypatch.setattr(q.manifest, "mark_leases", lambda below: (_ for _ in ()).throw(OSError("503 SlowDown")))
    assert q.lease("w") == WAIT and 0 in q.pending_ids and not q.leases  # the worker asks again later
    monkeypatch.undo()
    assert q.lease("w").shard_id == 0 and out.manifest.lease_mark() > 0
