"""Exactly-once under failure, on a real local Ray cluster: worker kills, driver kill, poison shards, stalls,
bad rows, fingerprints and the run lock."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from batchrun.errors import JobFailed, OutputLocked, SpecError
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from batchrun.store.output import OutputDir
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet
from tests.procs import pids_where

pytestmark = pytest.mark.slow


def job(tmp_path, inp, engine, **extra):
    raw = {"engine": engine, "input": {"id_column": "id", **inp}, "output": {"dir": str(tmp_path / "out")},
           "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 10}}
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def actor_pids(prefixes=("ray::Worker", "ray::ShardQueue")) -> list[int]:
    """Processes of batchrun's actors (Ray titles an actor's process ray::<Class>[.method])."""
    return pids_where(lambda cmd: cmd.startswith(prefixes))


def worker_pids() -> list[int]:
    return actor_pids(("ray::Worker",))


def run_killing_workers(runner: JobRunner, max_kills: int, seed: int, pause=(0.2, 1.0)) -> tuple[dict, int]:
    """Run the job in a thread and SIGKILL a random worker process every `pause` seconds, up to max_kills times.
    Returns the job's summary and how many workers were killed."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("summary", runner.run().summary))
    t.start()
    kills, rng = 0, random.Random(seed)
    while t.is_alive() and kills < max_kills:
        time.sleep(rng.uniform(*pause))
        if pids := worker_pids():
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
    t.join(timeout=600)
    return result["summary"], kills


def arithmetic_table(n: int) -> pa.Table:
    rng = random.Random(11)
    return pa.table({"id": list(range(n)), "prompt": [f"{rng.randrange(100)}+{rng.randrange(100)}=" for _ in range(n)]})


def test_random_worker_kills_lose_and_duplicate_nothing(tmp_path, ray_cluster, demo_model):
    write_parquet(tmp_path / "in.parquet", arithmetic_table(400))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")},
              {"name": "hf", "model": str(demo_model), "dtype": "float32", "max_in_flight": 8},
              sampling={"max_tokens": 12}, faults={"max_attempts": 100, "max_worker_restarts": 60})
    clean = validate_spec({**raw, "output": {"dir": str(tmp_path / "clean")}})
    JobRunner(clean, show_progress=False).run()

    summary, kills = run_killing_workers(JobRunner(validate_spec(raw), show_progress=False), 12, seed=5)
    assert kills >= 10, f"the job finished after only {kills} kills"
    assert summary["worker_restarts"] >= 10 and summary["rows"] == 400
    got = read_output(tmp_path / "out")
    assert sorted(got.column("id").to_pylist()) == list(range(400))  # every row, exactly once
    want = {r["id"]: r["generated_text"] for r in read_output(tmp_path / "clean").to_pylist()}
    assert {r["id"]: r["generated_text"] for r in got.to_pylist()} == want


def run_cli(job_file, *args, timeout=300):
    return subprocess.run([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress", *args], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_driver_sigkill_then_rerun_resumes_without_recomputing(tmp_path, ray_cluster):
    n = 3000
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(n)), "prompt": [f"w{i} x y" for i in range(n)]}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")},
              {"name": "tests.engines:CountingEcho", "options": {"log_path": str(tmp_path / "calls"), "delay_s": 0.1}},
              shards={"rows_per_shard": 50})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out").glob("part-*.parquet"))) < 8:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # The dead driver's queue and workers die with it (they are not detached): nothing can commit after this.
    deadline = time.time() + 60
    while time.time() < deadline:
        alive = actor_pids()
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, alive
    out = OutputDir(tmp_path / "out")
    # What is committed is what has a part: the manifest may lag by its last segment (the re-run reconciles it)
    committed_before = {int(p.rsplit("-", 1)[1].split(".")[0]) for p in out.parts.names()}
    assert 8 <= len(committed_before) < n // 50
    assert set(out.manifest.entries()) <= committed_before
    # left behind by the killed driver: stale, broken by the re-run
    assert os.path.exists(out.join("_batchrun", "lock.json"))

    proc2 = run_cli(job_file)  # the same command, unchanged
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    got = read_output(tmp_path / "out")
    assert sorted(got.column("id").to_pylist()) == list(range(n))
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["shards_skipped"] >= len(committed_before)
    # Engine calls of the re-run: none for a shard committed before it started.
    entries = out.manifest.entries()
    for sid in committed_before:
        assert entries[sid].run_id != summary["run_id"]  # never re-committed
    rerun_shards = {sid for sid, e in entries.items() if e.run_id == summary["run_id"]}
    assert rerun_shards and not rerun_shards & committed_before
    # Engine calls, logged by the counting engine: each shard committed before the re-run was sent to the engine
    # exactly once per request, all of them in the first run (whose log files were written before the kill).
    calls = collections.Counter(line for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().split())
    for sid in committed_before:
        assert all(calls[f"{sid}:{i}"] == 1 for i in range(50)), sid
    assert not out.list(out.tmp)  # temp files of dead attempts were cleaned


def test_poison_shard_is_quarantined_and_retried_on_rerun(tmp_path, ray_cluster):
    prompts = [f"row {i}" for i in range(100)]
    prompts[37] = "POISON row"
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(100)), "prompt": prompts}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "tests.engines:PoisonEcho"},
              faults={"max_attempts": 2, "max_worker_restarts": 10})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    proc = run_cli(job_file)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 shard(s) quarantined" in proc.stderr and "shard 3" in proc.stderr
    assert "engine crashed on a poison prompt" in proc.stderr
    got = read_output(tmp_path / "out")
    assert sorted(got.column("id").to_pylist()) == [i for i in range(100) if not 30 <= i < 40]
    entries = OutputDir(tmp_path / "out").manifest.entries()
    assert entries[3].state == "quarantined" and "poison" in entries[3].error
    status = subprocess.run([PYTHON, "-m", "batchrun.cli", "status", str(tmp_path / "out"), "--json"], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True)
    assert json.loads(status.stdout)["shards_quarantined"] == {"3": entries[3].error}

    proc = run_cli(job_file)  # a re-run retries only the quarantined shard (it fails again: still poison)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["shards_skipped"] == 9 and summary["this_run"]["rows"] == 0


def test_stalled_engine_replaces_its_worker_and_the_job_ends_in_bounded_time(tmp_path, ray_cluster):
    """A stalled engine fails its worker, not the job: replaced, its shards handed back. Every engine here stalls
    after 10 rows, so the shards it stalls on end quarantined after max_attempts and the job fails in bounded time,
    keeping what each engine committed."""
    # distinct prompts: each row is a request (identical greedy rows of a shard would be one: engine.dedupe)
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(60)), "prompt": [f"a b{i}" for i in range(60)]}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "tests.engines:StallEngine"},
              resources={"num_workers": 1}, faults={"stall_timeout_s": 3, "heartbeat_s": 0.5, "max_attempts": 2})
    t0 = time.time()
    with pytest.raises(JobFailed, match=r"(?s)quarantined .*stalled: worker w00\d .* no completion for \d+s") as err:
        JobRunner(validate_spec(raw), show_progress=False).run()
    assert time.time() - t0 < 300  # bounded: two 3 s stalls and restarts, never a 600 s default timeout
    assert "stalled: worker w001" not in str(err.value)  # w001 was replaced: the job went on
    committed = read_output(tmp_path / "out").column("id").to_pylist()
    assert len(committed) >= 20 and len(committed) == len(set(committed))  # each engine's first shard is kept


def test_bad_rows_become_error_rows_and_good_rows_are_unaffected(tmp_path, ray_cluster, demo_model):
    good = [f"{a}+{b}=" for a, b in [(1, 2), (30, 45), (99, 1), (7, 70), (12, 12)]]
    bad = {  # prompt, budget -> words expected in the error
        "null prompt": (None, 4, "is null"),
        "empty prompt": ("", 4, "empty"),
        "too long for the context": ("1" * 200, 4, "exceeds the model's context of 128"),
        "budget exceeds the context": ("1+1=", 200, "exceeds the model's context"),
        "zero budget": ("1+1=", 0, "expected an integer >= 1"),
        "repeated prompt past the context": ("1+1=" * 40, None, "exceeds the model's context of 128"),
        "negative budget": ("1+1=", -3, "expected an integer >= 1"),
        "prompt of 125 tokens with budget 4": ("2" * 125, 4, "exceeds"),
        "huge budget": ("3+3=", 10**9, "exceeds"),
        "whitespace budget column wrong type": ("4+4=", 2**40, "exceeds"),
    }
    prompts = good + [p for p, _, _ in bad.values()]
    budgets = [4] * len(good) + [b for _, b, _ in bad.values()]
    ids = list(range(len(prompts)))
    write_parquet(tmp_path / "in.parquet", pa.table({"id": ids, "prompt": pa.array(prompts, pa.string()),
                                                     "budget": pa.array(budgets, pa.int64())}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")},
              {"name": "hf", "model": str(demo_model), "dtype": "float32"},
              sampling={"max_tokens": 4, "per_row": {"max_tokens": "budget"}}, shards={"rows_per_shard": 4})
    JobRunner(validate_spec(raw), show_progress=False).run()
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ids
    for i, (name, (_, _, words)) in enumerate(bad.items(), start=len(good)):
        assert rows[i]["finish_reason"] == "error" and words in rows[i]["error"], (name, rows[i])
        assert rows[i]["generated_text"] is None
    # the good rows: the same as a run over the good rows alone
    write_parquet(tmp_path / "good.parquet", pa.table({"id": list(range(len(good))), "prompt": good,
                                                       "budget": [4] * len(good)}))
    clean = {**raw, "input": {**raw["input"], "path": str(tmp_path / "good.parquet")},
             "output": {"dir": str(tmp_path / "good_out")}}
    JobRunner(validate_spec(clean), show_progress=False).run()
    for r in read_output(tmp_path / "good_out").to_pylist():
        assert rows[r["id"]]["generated_text"] == r["generated_text"] and rows[r["id"]]["error"] is None


def test_template_truncation_and_engine_errors_per_row(tmp_path, ray_cluster, demo_model):
    lines = [{"id": 0, "a": "12", "b": "+3="}, {"id": 1, "a": None, "b": "x"}, {"id": 2, "b": "only b"},
             {"id": 3, "a": "5", "b": "+5="}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    raw = job(tmp_path, {"path": str(tmp_path / "in.jsonl"), "format": "jsonl", "prompt_template": "{{ a }}{{ b }}"},
              {"name": "hf", "model": str(demo_model), "dtype": "float32"}, sampling={"max_tokens": 3})
    JobRunner(validate_spec(raw), show_progress=False).run()
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert rows[0]["generated_text"] == "15" and rows[3]["generated_text"] == "10"
    assert "'a' is missing" in rows[1]["error"] and "'a' is missing" in rows[2]["error"]

    # truncation policies: a prompt longer than the context is cut instead of failing
    long_prompt = "9" * 300 + "+1="
    for policy, expect_error in [("left", False), ("right", False), ("error", True)]:
        write_parquet(tmp_path / "long.parquet", pa.table({"id": [0], "prompt": [long_prompt]}))
        r = {**raw, "input": {"path": str(tmp_path / "long.parquet"), "id_column": "id", "truncation": policy},
             "output": {"dir": str(tmp_path / f"trunc_{policy}")}}
        JobRunner(validate_spec(r), show_progress=False).run()
        row = read_output(tmp_path / f"trunc_{policy}").to_pylist()[0]
        assert (row["error"] is not None) == expect_error, (policy, row)
        if not expect_error:
            assert row["num_prompt_tokens"] == 128 - 3

    # an engine error on one request: that row only
    prompts = ["a b", "BADREQ c", "d e f"]
    write_parquet(tmp_path / "e.parquet", pa.table({"id": [0, 1, 2], "prompt": prompts}))
    r = job(tmp_path / "flaky", {"path": str(tmp_path / "e.parquet")}, {"name": "tests.engines:FlakyRequestEcho"})
    JobRunner(validate_spec(r), show_progress=False).run()
    rows = {x["id"]: x for x in read_output(tmp_path / "flaky" / "out").to_pylist()}
    assert rows[1]["error"] == "engine rejected request" and rows[1]["finish_reason"] == "error"
    assert rows[0]["generated_text"] == "a b" and rows[2]["error"] is None

    # a non-text prompt column: every row is an error row naming the column
    write_parquet(tmp_path / "ints.parquet", pa.table({"id": [0, 1], "prompt": [5, 6]}))
    r = job(tmp_path / "ints", {"path": str(tmp_path / "ints.parquet")}, {"name": "echo"})
    JobRunner(validate_spec(r), show_progress=False).run()
    assert all("not text" in x["error"] for x in read_output(tmp_path / "ints" / "out").to_pylist())


def test_fingerprint_change_is_refused_and_overwrite_restarts(tmp_path, ray_cluster):
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(30)), "prompt": ["a b c d e f"] * 30}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "echo"}, sampling={"max_tokens": 2})
    JobRunner(validate_spec(raw), show_progress=False).run()
    again = JobRunner(validate_spec(raw), show_progress=False).run().summary
    assert again["shards_skipped"] == 3 and again["this_run"]["rows"] == 0
    changed = {**raw, "sampling": {"max_tokens": 3}}
    with pytest.raises(SpecError, match=r"sampling.max_tokens: 2 -> 3[\s\S]*--overwrite"):
        JobRunner(validate_spec(changed), show_progress=False).run()
    JobRunner(validate_spec(changed), overwrite=True, show_progress=False).run()
    assert {r["generated_text"] for r in read_output(tmp_path / "out").to_pylist()} == {"a b c"}
    # resources do not change outputs: a different worker count resumes the same job
    more = {**changed, "resources": {"num_workers": 1}}
    assert JobRunner(validate_spec(more), show_progress=False).run().summary["shards_skipped"] == 3


def test_concurrent_run_refused_and_stale_lock_broken(tmp_path, ray_cluster):
    write_parquet(tmp_path / "in.parquet", pa.table({"id": [1, 2], "prompt": ["a", "b"]}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "echo"})
    out = OutputDir(tmp_path / "out")
    out.ensure()
    lock = Path(out.meta) / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time() - 5,
                                "run_id": "other"}))
    with pytest.raises(OutputLocked, match=f"in use by another run .*pid {os.getpid()}"):
        JobRunner(validate_spec(raw), show_progress=False).run()
    assert not list((tmp_path / "out").glob("*.parquet"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started_at": time.time() - 5,
                                "run_id": "dead"}))
    JobRunner(validate_spec(raw), show_progress=False).run()
    assert read_output(tmp_path / "out").num_rows == 2 and not lock.exists()


def test_engine_load_failure_fails_fast_with_the_error(tmp_path, ray_cluster):
    write_parquet(tmp_path / "in.parquet", pa.table({"id": [1, 2], "prompt": ["a", "b"]}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "tests.engines:BrokenLoad"})
    t0 = time.time()
    with pytest.raises(JobFailed, match="failed to load on 3 workers.*checkpoint is corrupt"):
        JobRunner(validate_spec(raw), show_progress=False).run()
    assert time.time() - t0 < 300  # bounded: two 3 s stalls and restarts, never a 600 s default timeout


def test_the_restart_budget_is_per_hour_and_fits_the_fleet(tmp_path, ray_cluster, monkeypatch):
    """The budget is a rolling hour, sized to the fleet: max(faults.max_worker_restarts, restarts_per_worker_hour x
    workers). Spent: no replacement while others live, the job fails once none does; an hour later it is back. Real
    worker actors and queue; only the pool's clock is moved."""
    import ray

    import batchrun.pool as pool_module
    from batchrun.errors import JobFailed
    from batchrun.plan import make_plan
    from batchrun.pool import WorkerPool
    from batchrun.shard_queue import ShardQueue

    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(40)), "prompt": ["a b"] * 40}))
    raw = job(tmp_path, {"path": str(tmp_path / "in.parquet")}, {"name": "echo"},
              faults={"max_worker_restarts": 1, "restarts_per_worker_hour": 0.5}, resources={"num_workers": 4})
    spec = validate_spec(raw)
    plan = make_plan(spec)
    clock = [time.time()]
    monkeypatch.setattr(pool_module, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    queue = ray.remote(ShardQueue).options(num_cpus=0).remote(str(tmp_path / "out"), list(plan.shards), "r", 4, 60.0)
    pool = WorkerPool(spec, plan, queue, "r")
    try:
        pool.start(4)
        assert pool.restart_budget() == {"per_hour": 2, "used_last_hour": 0, "restarts": 0}  # 0.5 x 4 workers > 1
        pool._respawn(), pool._respawn()
        assert len(pool.live) == 6 and pool.restart_budget()["used_last_hour"] == 2
        clock[0] += 1800
        pool._respawn()  # spent: no replacement while other workers live
        assert len(pool.live) == 6 and pool.restarts == 2
        for wid, w in list(pool.live.items()):
            pool._kill(wid, w)
        pool.live.clear()
        with pytest.raises(JobFailed, match=r"restart budget \(2 an hour"):
            pool._respawn()
        clock[0] += 1801  # the first two replacements are more than an hour old
        pool._respawn()
        assert len(pool.live) == 1 and pool.restart_budget() == {"per_hour": 2, "used_last_hour": 1, "restarts": 3}
    finally:
        pool.shutdown()
        ray.kill(queue)


def slow_echo_job_started(tmp_path, rows: int, delay_s: float, parts: int, **extra) -> tuple[threading.Thread, dict]:
    """A SlowEcho job of `rows` rows (10 a shard, 2 workers unless `extra` says) run in a thread; returns once `parts`
    parts are committed: the thread, and the dict its summary lands in."""
    write_parquet(tmp_path / "in.parquet",
                  pa.table({"id": list(range(rows)), "prompt": [f"r{i} x" for i in range(rows)]}))
    spec = validate_spec(job(tmp_path, {"path": str(tmp_path / "in.parquet")},
                             {"name": "tests.engines:SlowEcho", "max_in_flight": 4,
                              "options": {"log_path": str(tmp_path / "calls"), "per_poll": 1, "delay_s": delay_s}},
                             **extra))
    runner = JobRunner(spec, show_progress=False)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", runner.run().summary))
    t.start()
    deadline = time.time() + 120
    while len(list((tmp_path / "out").glob("part-*.parquet"))) < parts:
        assert time.time() < deadline and t.is_alive(), "the job committed too little"
        time.sleep(0.05)
    return t, box


def test_the_queue_actor_killed_mid_run_is_restarted_and_no_engine_reloads(tmp_path, ray_cluster):
    """SIGKILL to the shard queue's process while shards are in flight: Ray restarts it, it rebuilds what is done
    from the manifest and the parts' footers (entries it had not written yet included), the workers re-adopt the
    shards they hold with their next heartbeat and retry their calls; the job ends with every row once, with the
    same engines (no worker replaced, no engine loaded again)."""
    rows = 300
    t, box = slow_echo_job_started(tmp_path, rows, 0.05, 5, faults={"heartbeat_s": 0.3})
    (queue,) = actor_pids(("ray::ShardQueue",))
    os.kill(queue, signal.SIGKILL)
    t.join(timeout=300)
    summary = box["summary"]
    assert summary["status"] == "succeeded" and summary["queue_restarted"] is True
    assert summary["worker_restarts"] == 0 and summary["engine_deaths"] == 0
    counts = collections.Counter(read_output(tmp_path / "out").column("id").to_pylist())
    assert sorted(counts) == list(range(rows)) and set(counts.values()) == {1}  # every row once
    assert len(list((tmp_path / "calls").glob("*.log"))) == 2  # the same two engine processes, none loaded again
    assert sorted(OutputDir(tmp_path / "out").manifest.committed()) == list(range(rows // 10))
    assert actor_pids(("ray::ShardQueue",)) == []  # the restarted queue is gone with the job


def beat_sender_pid(run_root: Path) -> int | None:
    """The process holding a node's heartbeat lock (beats.py), from the kernel's lock table."""
    for lock in run_root.glob("batchrun-beats-*/*/sender.lock"):
        inode = os.stat(lock).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and fields[-3].split(":")[-1] == str(inode):
                return int(fields[fields.index("FLOCK") + 3])
    return None


def test_one_heartbeat_a_node_and_its_sender_killed_costs_no_other_workers_lease(tmp_path, ray_cluster):
    """Three workers on this node: one of them sends the node's heartbeats (theirs, in one call), and commits take
    the next lease. SIGKILL to the sender mid-run: another worker takes the node's lock and no other worker's lease
    lapses (lease timeout 2.5 s, 12x the heartbeat interval; a shard's 10 rows take >= 3 s, so commits alone would
    not keep them: a gap shows as expired leases); every row once."""
    import tempfile

    rows = 240  # 24 shards: more than 3 workers hold at once, so commits take leases
    t, box = slow_echo_job_started(tmp_path, rows, 0.3, 3, resources={"num_workers": 3},
                                   faults={"heartbeat_s": 0.2, "lease_timeout_s": 2.5, "max_attempts": 10})
    sender = beat_sender_pid(Path(tempfile.gettempdir()))
    assert sender in worker_pids()
    os.kill(sender, signal.SIGKILL)
    t.join(timeout=300)
    summary = box["summary"]
    assert summary["status"] == "succeeded" and summary["worker_restarts"] == 1
    assert summary["shard_failures"] == 0  # no lease expired: the killed one's shards went back as its death's
    calls = summary["queue_calls"]
    assert calls["heartbeat_calls"] < calls["worker_heartbeats"]  # a call carried more than one worker's
    assert calls["leases_taken_by_commits"] > 0
    counts = collections.Counter(read_output(tmp_path / "out").column("id").to_pylist())
    assert sorted(counts) == list(range(rows)) and set(counts.values()) == {1}  # every row once
