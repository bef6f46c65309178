"""Stop signals drain instead of dropping work (README, failure model): a worker or a driver that gets SIGTERM stops
admitting shards, commits what finishes within faults.drain_s and hands the rest back at once (not after
lease_timeout_s); the output stays resumable and every row is written once. On a real local Ray cluster."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pytest
import yaml

from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from batchrun.store.output import OutputDir
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet

pytestmark = pytest.mark.slow
LEASE_S = 300  # far longer than any test here: a shard re-leased sooner was handed back, not expired


def slow_job(tmp_path, rows: int, workers: int = 2, drain_s: float = 0.5) -> dict:
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(rows)),
                                                     "prompt": [f"w{i} x y" for i in range(rows)]}))
    return {"engine": {"name": "tests.engines:SlowEcho", "max_in_flight": 4,
                       "options": {"log_path": str(tmp_path / "calls"), "per_poll": 1, "delay_s": 0.05}},
            "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
            "sampling": {"max_tokens": 2}, "output": {"dir": str(tmp_path / "out")},
            "resources": {"num_workers": workers}, "shards": {"rows_per_shard": 10},
            "faults": {"drain_s": drain_s, "lease_timeout_s": LEASE_S, "heartbeat_s": 0.5}}


def wait_for_parts(tmp_path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(list((tmp_path / "out").glob("part-*.parquet"))) < n:
        assert time.time() < deadline, "the job committed too little"
        time.sleep(0.05)


def assert_every_row_once(tmp_path, rows: int) -> None:
    counts = collections.Counter(read_output(tmp_path / "out").column("id").to_pylist())
    assert sorted(counts) == list(range(rows)) and set(counts.values()) == {1}


def test_sigterm_to_a_worker_drains_and_its_shards_are_leased_again_at_once(tmp_path, ray_cluster):
    rows = 200
    spec = validate_spec(slow_job(tmp_path, rows))
    box: dict = {}
    runner = JobRunner(spec, show_progress=False)
    t = threading.Thread(target=lambda: box.setdefault("summary", runner.run().summary))
    t.start()
    wait_for_parts(tmp_path, 2)
    deadline = time.time() + 60
    while not (running := [w.pid for w in runner._workers_seen.values() if w.shards]):
        assert time.time() < deadline  # a worker that has committed a shard: past its start, in its run
        time.sleep(0.05)
    victim = running[0]
    signalled = time.time()
    os.kill(victim, signal.SIGTERM)
    t.join(timeout=300)
    summary = box["summary"]
    assert summary["status"] == "succeeded" and summary["error_rows"] == 0
    assert len(summary["workers_drained"]) == 1 and summary["worker_restarts"] == 0, (  # a drain is not a failure
        summary["workers_drained"], summary["worker_restarts"], summary["engine_deaths"])
    assert_every_row_once(tmp_path, rows)
    drained = summary["drains"][summary["workers_drained"][0]]
    # at least the shard its prefetcher had leased ahead and not started is handed back
    assert drained["why"] == "SIGTERM" and drained["handed_back"]
    entries = OutputDir(tmp_path / "out").manifest.entries()
    # the shards it handed back were leased again (by another worker) within seconds, not after the lease timeout
    relet = [entries[sid].started_at - signalled for sid in drained["handed_back"]]
    print(f"signal -> re-lease of {len(relet)} handed-back shard(s): {[round(x, 2) for x in relet]} s")
    assert relet and all(0 < x < LEASE_S / 2 for x in relet), relet  # handed back, not expired
    assert all(entries[sid].worker != summary["workers_drained"][0] for sid in drained["handed_back"])


def test_sigterm_to_the_driver_drains_then_a_rerun_finishes_without_recomputing(tmp_path, ray_cluster):
    rows = 600
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(slow_job(tmp_path, rows, drain_s=1.0)))
    proc = subprocess.Popen([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_parts(tmp_path, 4)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    stopped_in = time.time() - signalled
    assert proc.returncode == 143, stderr[-2000:]
    assert "drained" in stderr and "Re-run the same command to resume" in stderr
    assert stopped_in < 200, stopped_in  # drain_s, a heartbeat and closing: never the 300 s lease timeout
    out = OutputDir(tmp_path / "out")
    committed = {e.shard_id for e in out.manifest.entries().values() if e.state == "committed"}
    assert committed == {int(p.rsplit("-", 1)[1].split(".")[0]) for p in out.parts.names()}  # manifest flushed
    assert 4 <= len(committed) < rows // 10
    calls_before = collections.Counter(line for f in (tmp_path / "calls").glob("*.log")
                                       for line in f.read_text().split())

    rerun = subprocess.run([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"], cwd=ROOT,
                           env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_every_row_once(tmp_path, rows)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["shards_skipped"] == len(committed)
    calls = collections.Counter(line for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().split())
    for sid in committed:  # nothing committed before the signal went to an engine again
        assert all(calls[f"{sid}:{i}"] == calls_before[f"{sid}:{i}"] == 1 for i in range(10)), sid
