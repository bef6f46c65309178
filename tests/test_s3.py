"""Output to an object store: the same exactly-once, resume, lock and status guarantees as a local dir, against a
real S3 API server on loopback (moto), through the client a user has (s3fs, credentials from the environment)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from batchrun.errors import OutputLocked, SpecError
from batchrun.records import ManifestEntry
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from batchrun.store.fs import name_number
from batchrun.store.lock import LOCK_LEASE_S
from batchrun.store.output import OutputDir
from batchrun.store.parts import ids_digest
from tests.conftest import PYTHON, ROOT, cli_env, write_parquet
from tests.test_faults import run_killing_workers, worker_pids


def s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def url(bucket, tmp_path, name="out") -> str:
    return f"s3://{bucket}/{tmp_path.name}/{name}"


def read_s3(out_url: str) -> pa.Table:
    return ds.dataset(out_url.removeprefix("s3://"), format="parquet", filesystem=s3()).to_table()


def echo_job(tmp_path, out_url, n, engine=None, **extra):
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(n)), "prompt": [f"p {i}" for i in range(n)]}))
    raw = {"engine": engine or {"name": "echo"}, "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
           "output": {"dir": out_url}, "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 10}}
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def test_conditional_create_commits_a_shard_once(s3_bucket, tmp_path):
    """Two attempts of one shard race to publish: the store's If-None-Match decides, and the part keeps the first."""
    out = OutputDir(url(s3_bucket, tmp_path))
    out.ensure()
    tables = [pa.table({"id": [1, 2], "generated_text": [w, w]}) for w in ("first", "second")]
    entry = ManifestEntry(0, "committed", rows=2, ids_digest=ids_digest(tables[0].column("id")), worker="a")
    assert out.parts.publish(tables[0], entry, "zstd") is True
    assert out.parts.publish(tables[1], entry, "zstd") is False
    assert read_s3(out.root).column("generated_text").to_pylist() == ["first", "first"]
    assert out.parts.entry(0).worker == "a"  # the entry travels in the footer, for reconcile
    assert out.list(out.tmp) == []  # no temp objects on a store: nothing but committed parts is ever listed
    # `run --retry-errors` replaces the part with one plain PUT (visible whole); read back with its new entry
    revised = pa.table({"id": [1, 2], "generated_text": ["first", "redone"]})
    assert out.parts.publish(revised, dataclasses.replace(entry, revision=1), "zstd") is True
    assert read_s3(out.root).column("generated_text").to_pylist() == ["first", "redone"]
    assert out.parts.read(0).column("generated_text").to_pylist() == ["first", "redone"]
    assert out.parts.entry(0).revision == 1 and len(out.parts.names()) == 1


@pytest.mark.slow
def test_s3_job_exactly_once_resume_status_and_export(s3_bucket, tmp_path, ray_cluster):
    out_url = url(s3_bucket, tmp_path)
    raw = echo_job(tmp_path, out_url, 95)
    summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
    assert summary["rows"] == 95 and summary["output_dir"] == out_url
    got = read_s3(out_url)
    assert sorted(got.column("id").to_pylist()) == list(range(95))
    fs = s3()
    assert json.loads(fs.cat(f"{out_url}/_summary.json"))["rows"] == 95
    assert len(fs.ls(f"{out_url}/_batchrun/manifest")) == 1  # the run's segments compacted into one
    assert not [p for p in fs.ls(f"{out_url}/_batchrun") if "lock-" in p]  # released

    again = JobRunner(validate_spec(raw), show_progress=False).run().summary  # a re-run resumes: nothing to do
    assert again["shards_skipped"] == 10 and again["this_run"]["rows"] == 0 and again["rows"] == 95

    status = subprocess.run([PYTHON, "-m", "batchrun.cli", "status", out_url, "--json"], cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["shards_committed"] == 10 and st["rows_committed"] == 95 and st["running"] is False
    export = subprocess.run([PYTHON, "-m", "batchrun.cli", "export", out_url, "-o", "-"], cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 2 and "has no custom_id column" in export.stderr  # read from the store's parts
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in status.stdout + status.stderr + export.stderr


@pytest.mark.slow
def test_s3_driver_sigkill_then_rerun_loses_and_duplicates_nothing(s3_bucket, tmp_path, ray_cluster):
    n = 2000
    out_url = url(s3_bucket, tmp_path)
    raw = echo_job(tmp_path, out_url, n, {"name": "tests.engines:CountingEcho",
                                          "options": {"log_path": str(tmp_path / "calls"), "delay_s": 0.05}},
                   shards={"rows_per_shard": 50})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    cmd = [PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = OutputDir(out_url)
    deadline = time.time() + 120
    while time.time() < deadline and len(out.parts.names()) < 6:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: commits and manifest segments in flight
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and worker_pids():
        time.sleep(0.5)
    committed_before = {int(p.rsplit("-", 1)[1].split(".")[0]) for p in out.parts.names()}
    assert 6 <= len(committed_before) < n // 50
    holder = out.lock.holder()
    assert holder is not None and holder["lease_s"] == LOCK_LEASE_S  # the dead driver's lease has not lapsed
    # (a plain re-run would watch that lease for LOCK_LEASE_S and take it over: test_s3_lock_lease_takeover_is_won_once)
    rerun = subprocess.run(cmd + ["--break-lock"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(read_s3(out_url).column("id").to_pylist()) == list(range(n))  # every row, exactly once
    entries = out.manifest.entries()
    summary = json.loads(s3().cat(f"{out_url}/_summary.json"))
    assert sorted(entries) == list(range(n // 50)) and summary["shards_skipped"] >= len(committed_before)
    for sid in committed_before:
        assert entries[sid].run_id != summary["run_id"]  # never recomputed, its entry rebuilt if it was missing
    calls = collections.Counter(line for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().split())
    for sid in committed_before:
        assert all(calls[f"{sid}:{i}"] == 1 for i in range(50)), sid


@pytest.mark.slow
def test_s3_random_worker_kills_lose_and_duplicate_nothing(s3_bucket, tmp_path, ray_cluster):
    out_url = url(s3_bucket, tmp_path)
    raw = echo_job(tmp_path, out_url, 600, {"name": "tests.engines:CountingEcho",
                                            "options": {"log_path": str(tmp_path / "calls"), "delay_s": 0.02}},
                   faults={"max_attempts": 100, "max_worker_restarts": 60})
    summary, kills = run_killing_workers(JobRunner(validate_spec(raw), show_progress=False), 6, seed=7,
                                         pause=(0.3, 1.0))
    assert kills >= 3 and summary["rows"] == 600
    assert sorted(read_s3(out_url).column("id").to_pylist()) == list(range(600))


def test_s3_lock_lease_takeover_is_won_once(s3_bucket, tmp_path, monkeypatch):
    """A driver taking the lock watches the lease on its own clock: refused as soon as it sees a renewal; taken over
    once the lock object stays unchanged for a whole lease, even when the holder's clock runs an hour ahead (its
    `renewed_at` in the future); of two drivers taking over, one wins."""
    import batchrun.store.lock as lock

    monkeypatch.setattr(lock, "LOCK_LEASE_S", 1.2)  # renewed every 0.2 s
    out = OutputDir(url(s3_bucket, tmp_path))
    out.ensure()
    out.lock.acquire("first")
    started = time.monotonic()
    with pytest.raises(OutputLocked, match="renewed while this driver watched it"):
        OutputDir(out.root).lock.acquire("second")
    assert time.monotonic() - started < 1.2  # a live holder is seen renewing well within a lease
    # the first driver stops renewing (it is gone), and its clock was an hour ahead
    out.lock._stop_renew.set()
    time.sleep(0.3)  # a renewal already under way lands
    stale = json.loads(out.read_bytes(out.lock._lock_path))
    stale["renewed_at"] += 3600
    out.write_bytes(out.lock._lock_path, json.dumps(stale).encode())
    assert out.lock.holder() is not None  # by comparing clocks (status only) it still looks held
    takers, results = {"a": OutputDir(out.root), "b": OutputDir(out.root)}, {}

    def take(name):
        try:
            takers[name].lock.acquire(name)
            results[name] = time.monotonic() - started
        except OutputLocked as e:
            results[name] = e

    started = time.monotonic()
    threads = [threading.Thread(target=take, args=(n,)) for n in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, r in results.items() if not isinstance(r, OutputLocked)]
    assert len(won) == 1 and results[won[0]] >= 1.2  # one wins, after watching for a whole lease
    a = takers[won[0]]
    assert a.lock.holder()["run_id"] == won[0]
    assert len(a.lock._remote()) == 1  # the lapsed lease object is gone
    a.lock.release(won[0])
    assert a.lock.holder() is None and a.lock._remote() == []


def test_output_dir_on_a_store_without_exclusive_create_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"key 'output.dir': memory://x/out: .*no atomic create-if-absent"):
        OutputDir("memory://x/out").ensure()


def test_missing_bucket_names_the_key(s3_bucket):
    with pytest.raises(SpecError, match=r"key 'output.dir': bucket s3://no-such-bucket-4 does not exist"):
        OutputDir("s3://no-such-bucket-4/out").ensure()


def test_a_throttled_store_loses_nothing_and_commits_once(s3_bucket, s3_faults, tmp_path, monkeypatch):
    """A fault injector between batchrun and the S3 server fails 20% of GETs (reads and LISTs), PUTs, HEADs and
    DELETEs (503 SlowDown or a reset connection); botocore's and s3fs's own retries are off, so batchrun's are
    what hold: the exclusive-create probe passes, every part is published once (a second publish says "exists"),
    every manifest entry is written and read back (none dropped), and the queue's commits never fail on a segment
    upload."""
    import s3fs

    from batchrun.plan import cut_shards
    from batchrun.shard_queue import ShardQueue

    s3_faults.set_share({"GET": 0.2, "PUT": 0.2, "HEAD": 0.2, "DELETE": 0.2})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retry loop off too: batchrun's must hold
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        out = OutputDir(url(s3_bucket, tmp_path))
        out.ensure()  # the bucket check and the exclusive-create probe, under faults
        q = ShardQueue(str(out.root), list(cut_shards((300,), 10)), "run1", max_attempts=2, lease_timeout_s=60)
        for sid in range(30):
            assert q.lease("w").shard_id == sid
            table = pa.table({"id": list(range(sid * 10, sid * 10 + 10)), "generated_text": ["x"] * 10})
            entry = ManifestEntry(sid, "committed", rows=10, ids_digest=ids_digest(table.column("id")), attempt=1,
                                  worker="w", run_id="run1")
            assert out.parts.publish(table, entry, "zstd") is True
            assert out.parts.publish(table, entry, "zstd") is False  # the commit point still refuses a second copy
            assert q.commit(entry, True) is True
            q.progress()  # segment uploads on their thread; a failed one is kept for the next tick
        q.flush()
        from batchrun.store.fs import store_retries

        assert store_retries() > 0  # batchrun's own retries held (botocore's are off)
        assert sorted(out.manifest.entries()) == list(range(30))
        assert sorted(out.manifest.committed()) == list(range(30))
        assert sum(s3_faults.injected.values()) > 10, s3_faults.injected
    finally:
        s3_faults.set_share({})
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
    clean = OutputDir(url(s3_bucket, tmp_path))
    assert read_s3(clean.root).num_rows == 300 and sorted(clean.manifest.entries()) == list(range(30))


@pytest.mark.slow
def test_a_throttled_store_under_a_real_job_with_worker_kills(s3_bucket, s3_faults, tmp_path, ray_cluster):
    """The same faults on every process of a real job (driver, queue actor, workers: their S3 traffic goes through
    the injector), while workers are SIGKILLed: every row once, the manifest complete, the summary's counts right."""
    out_url = url(s3_bucket, tmp_path)
    raw = echo_job(tmp_path, out_url, 600, {"name": "tests.engines:CountingEcho",
                                            "options": {"log_path": str(tmp_path / "calls"), "delay_s": 0.02}},
                   faults={"max_attempts": 100, "max_worker_restarts": 60})
    s3_faults.set_share({"GET": 0.2, "PUT": 0.2, "HEAD": 0.2, "DELETE": 0.2, "POST": 0.2})
    try:
        summary, kills = run_killing_workers(JobRunner(validate_spec(raw), show_progress=False), 4, seed=11,
                                             pause=(0.3, 1.0))
    finally:
        injected = s3_faults.set_share({})
    assert kills >= 2 and sum(injected.values()) > 5, (kills, injected)  # ~20% of 100+ requests
    ids = read_s3(out_url).column("id").to_pylist()
    assert sorted(ids) == list(range(600))  # every row, exactly once
    out = OutputDir(out_url)
    entries = out.manifest.entries()
    assert sorted(entries) == list(range(60)) and all(e.state == "committed" for e in entries.values())
    assert {name_number(p) for p in out.parts.names()} == set(entries)  # the manifest names every part, and only those
    assert (summary["rows"], summary["shards_committed"], summary["error_rows"]) == (600, 60, 0)
    assert summary["worker_restarts"] >= 1 and set(summary["store_retries"]) == {
        "driver", "queue", "workers", "segment_write_failures"}
    calls = collections.Counter(line for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().split())
    assert set(calls) == {f"{sid}:{i}" for sid in range(60) for i in range(10)}  # rows a kill cut short: redone


def test_parts_are_listed_by_key_prefix_many_at_once(s3_bucket, tmp_path):
    """A crash resume on a store lists the parts by shard-id key prefix (a thousand ids each), many listings at once:
    the same names as one listing of the whole prefix, across prefix boundaries and 7-digit ids."""
    out = OutputDir(url(s3_bucket, tmp_path))
    out.ensure()
    ids = [0, 999, 1000, 1999, 2000, 2499, 1_000_000, 1_000_999]
    for sid in ids:
        out.create(out.parts.path(sid), b"PAR1")
    out.create(out.join("part-notes.txt"), b"x")  # not a part
    plain = out.parts.names()
    assert [name_number(p) for p in plain] == ids
    assert out.parts.names(shards=1_001_000) == plain  # 1,001 prefixes, listed 32 at a time
    assert out.parts.names(shards=2500) == [p for p in plain if name_number(p) < 2500]  # the plan's prefixes only


def test_a_crash_resume_lists_only_what_lies_below_the_lease_mark(s3_bucket, tmp_path, monkeypatch):
    """A run's queue writes a lease mark before it leases past it; after a crash, only shards below it that the
    manifest lacks can have parts without entries, so only their key prefixes are listed, and those parts are
    found (from their footers) as a full listing finds them."""
    import pyarrow as pa

    from batchrun.records import ManifestEntry
    from batchrun.store.fs import Store

    out = OutputDir(url(s3_bucket, tmp_path))
    out.ensure()
    n = 5000
    out.manifest.append([ManifestEntry(sid, "committed", rows=1, run_id="r0") for sid in range(2990)], "r0", 0)
    for sid in (0, 1500, 2990, 2995):  # 0, 1500: in the manifest; 2990, 2995: committed, their segment never written
        out.parts.publish(pa.table({"id": [sid]}), ManifestEntry(sid, "committed", rows=1, run_id="r0"), "zstd")
    out.manifest.mark_leases(3500)  # the crashed run leased nothing at or past 3,500
    listed = []
    real = Store.list_prefixes
    monkeypatch.setattr(Store, "list_prefixes", lambda self, path, prefixes, suffix="": listed.extend(prefixes)
                        or real(self, path, prefixes, suffix))
    committed = out.manifest.committed()
    rebuilt = out.manifest.reconcile(committed, "r1", n, below=out.manifest.lease_mark())
    assert sorted(rebuilt) == [2990, 2995] and listed == ["part-002", "part-003"]  # not the other 3 prefixes
    assert sorted(out.manifest.committed()) == list(range(2990)) + [2990, 2995]


def test_the_grouped_copy_of_the_input_lives_in_the_output_dir_on_a_store(s3_bucket, tmp_path):
    """shards.group_prefixes with the output on a store: the copy is written there, read back by the workers' reader
    (the plan's URL), every row once, and found again by the next start."""
    from batchrun.datapath import INPUT_ROW, read_shard
    from batchrun.group import grouped_plan
    from batchrun.plan import make_plan
    from batchrun.sources.parquet import ParquetSource

    rows = [(d, q) for q in range(3) for d in range(20)]  # documents interleaved
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(60)), "doc": [f"doc {d} " * 8 for d, _ in rows],
                                                     "q": [f"q{q}" for _, q in rows]}))
    spec = validate_spec({"engine": {"name": "echo"}, "output": {"dir": url(s3_bucket, tmp_path)},
                          "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id",
                                    "prompt_template": "{{ doc }} {{ q }}"},
                          "shards": {"rows_per_shard": 6, "group_prefixes": True, "group_window_rows": 30}})
    out = OutputDir(spec.output.dir)
    out.ensure()
    plan, info = grouped_plan(spec, make_plan(spec), out)
    assert info["built"] and plan.reader.startswith("s3://") and len(plan.shards) == 10
    reader = ParquetSource(plan.reader)
    got = pa.concat_tables(read_shard(reader, plan.units, shard, ["id", "doc", INPUT_ROW]) for shard in plan.shards)
    assert sorted(got.column("id").to_pylist()) == list(range(60)) == sorted(got.column(INPUT_ROW).to_pylist())
    assert grouped_plan(spec, make_plan(spec), out)[1]["built"] is False
