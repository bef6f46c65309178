"""`ray job submit` against a real 2-node Ray cluster started here (loopback only): exact outputs, shards on both
nodes, `ray job stop` then resubmit, and the metrics on the nodes' Prometheus endpoints.

The cluster is its own (ray start --head / ray start --address, each with --block in its own process group), apart
from the session's in-process cluster, and is torn down by killing those process groups, never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from tests.conftest import ROOT, read_output, write_parquet

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Cluster:
    def __init__(self, tmp: Path):
        self.procs: list[subprocess.Popen] = []
        try:
            self._start_nodes(tmp)
        except BaseException:
            self.close()  # never leave a half-started cluster behind
            raise

    def _start_nodes(self, tmp: Path) -> None:
        # A short path: Ray's unix sockets live under it, and AF_UNIX paths are limited to 107 bytes.
        self.ray_tmp = tempfile.mkdtemp(prefix="brc", dir="/tmp")
        gcs, dash, m1, m2, a1, a2 = free_ports(6)
        self.gcs, self.dashboard, self.metrics_ports = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", (m1, m2)
        # Ray's token authentication, with a token of this cluster's own (every ray process and CLI call gets it)
        self.env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                        RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env.pop("RAY_ADDRESS")
        common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--disable-usage-stats"]
        self.procs.append(
            self._start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         "--include-dashboard=true", f"--metrics-export-port={m1}",
                         f"--dashboard-agent-listen-port={a1}", f"--temp-dir={self.ray_tmp}",
                         '--resources={"node_head": 1}', *common], tmp / "head.log"))
        wait_for(self._api_up, 120, "the head's job API")
        for attempt in range(2):  # a port picked free may be taken by the time Ray binds it: once more, fresh ones
            log = tmp / f"node_b{attempt}.log"
            self.procs.append(self._start([f"--address={self.gcs}", f"--metrics-export-port={m2}",
                                           f"--dashboard-agent-listen-port={a2}", '--resources={"node_b": 1}',
                                           *common], log))
            try:
                wait_for(lambda: self.alive_nodes() == 2, 90, "2 alive nodes")
                break
            except TimeoutError as e:
                os.killpg(self.procs.pop().pid, signal.SIGKILL)
                if attempt:
                    raise TimeoutError(f"{e}; the second node's last output: {log.read_text()[-1500:]}") from None
                m2, a2 = free_ports(2)
                self.metrics_ports = (m1, m2)

    def _start(self, args, log: Path):
        return subprocess.Popen([str(BIN / "ray"), "start", *args], env=self.env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _api_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and refusing requests without the token, as it should
        except OSError:
            return False

    def alive_nodes(self) -> int:
        code = f"import ray; ray.init(address='{self.gcs}', logging_level='ERROR'); " \
               "print(sum(n['Alive'] for n in ray.nodes()))"
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def job(self, command: str, *args, check=True) -> str:
        out = subprocess.run([str(BIN / "ray"), "job", command, "--address", self.dashboard, *args], env=self.env,
                             capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(out.stdout + out.stderr)
        return out.stdout + out.stderr

    def submit(self, job_file: Path, sid: str) -> None:
        self.job("submit", "--no-wait", "--submission-id", sid, "--",
                 sys.executable, "-m", "batchrun.cli", "run", str(job_file))

    def status(self, sid: str) -> str:
        # "Status for job 'x': RUNNING" while it runs; "Job 'x' succeeded" / "Job 'x' was stopped" once it ended
        lines = [ln.lower() for ln in self.job("status", sid).splitlines() if f"job '{sid}'" in ln.lower()]
        for state in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            if lines and (f": {state.lower()}" in lines[-1] or f" {state.lower()}" in lines[-1]):
                return state
        return "UNKNOWN"

    def scrape(self) -> str:
        text = ""
        for port in self.metrics_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text += r.read().decode()
            except OSError:
                pass
        return text

    def close(self) -> None:
        for p in reversed(self.procs):  # ray start --block tears its node down on SIGTERM
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(getattr(self, "ray_tmp", ""), ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


def make_job(tmp: Path, rows: int, delay_s: float, name: str) -> Path:
    prompts = [f"w{i} x y z" for i in range(rows)]
    write_parquet(tmp / f"{name}.parquet", pa.table({"id": list(range(rows)), "prompt": prompts}))
    job = {"engine": {"name": "echo", "options": {"delay_s": delay_s}, "max_in_flight": 64},
           "input": {"path": str(tmp / f"{name}.parquet"), "id_column": "id"},
           "sampling": {"max_tokens": 2}, "output": {"dir": str(tmp / f"{name}-out")},
           "resources": {"num_workers": 2, "placement": "spread"}, "shards": {"rows_per_shard": 25}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_submit_spreads_over_both_nodes_and_exports_metrics(cluster, tmp_path):
    job_file = make_job(tmp_path, 1500, 0.05, "a")
    cluster.submit(job_file, "batchrun-a")
    seen = {"metrics": ""}

    def done():
        text = cluster.scrape()
        if "batchrun_rows_done" in text:
            seen["metrics"] = text
        return cluster.status("batchrun-a") in ("SUCCEEDED", "FAILED", "STOPPED")

    wait_for(done, 240, "job a to end", interval=1.0)
    logs = cluster.job("logs", "batchrun-a")
    assert cluster.status("batchrun-a") == "SUCCEEDED", logs[-3000:]
    out = read_output(tmp_path / "a-out")
    assert sorted(out.column("id").to_pylist()) == list(range(1500))
    summary = json.loads((tmp_path / "a-out" / "_summary.json").read_text())
    nodes = {w["node"] for w in summary["workers"].values()}
    assert len(nodes) == 2, summary["workers"]  # which node ran which shards is in the summary
    assert "succeeded: 1500 rows" in logs
    progress = [line for line in logs.splitlines() if "[batchrun] rows" in line]
    assert progress and progress[-1].startswith("[batchrun] rows 1500/1500")
    assert not any("\x1b" in line or "\r" in line for line in progress)  # plain lines under `ray job logs`, no bar
    assert "row/s]" not in logs and "█" not in logs
    assert "batchrun_rows_done" in seen["metrics"] and "batchrun_generated_tokens" in seen["metrics"], \
        "no batchrun metric on the Prometheus endpoints during the run"


def test_job_stop_then_resubmit_completes_exactly_once(cluster, tmp_path):
    job_file = make_job(tmp_path, 4000, 0.1, "b")
    cluster.submit(job_file, "batchrun-b1")
    wait_for(lambda: len(list((tmp_path / "b-out").glob("part-*.parquet"))) >= 10, 180, "10 committed shards")
    # progress from the manifest while the job runs (its segments trail the commits by a second at most)
    wait_for(lambda: batchrun_status(tmp_path / "b-out")["shards_committed"] >= 10, 30, "10 shards in the manifest")
    during = batchrun_status(tmp_path / "b-out")
    assert during["running"] is True and 10 <= during["shards_committed"] < 160 and during["rows_total"] == 4000
    assert during["rows_committed"] == 25 * during["shards_committed"] and during["rows_per_s"] > 0
    cluster.job("stop", "batchrun-b1")
    wait_for(lambda: cluster.status("batchrun-b1") in ("STOPPED", "FAILED"), 120, "the stop")
    time.sleep(3)  # the driver's actors die with it
    parts = sorted((tmp_path / "b-out").glob("part-*.parquet"))
    committed = read_output(tmp_path / "b-out")  # every visible part is whole and readable
    assert 10 <= len(parts) < 160 and committed.num_rows == 25 * len(parts)
    assert len(set(committed.column("id").to_pylist())) == committed.num_rows

    cluster.submit(job_file, "batchrun-b2")
    wait_for(lambda: cluster.status("batchrun-b2") in ("SUCCEEDED", "FAILED", "STOPPED"), 300, "the resubmit")
    assert cluster.status("batchrun-b2") == "SUCCEEDED", cluster.job("logs", "batchrun-b2")[-3000:]
    out = read_output(tmp_path / "b-out")
    assert sorted(out.column("id").to_pylist()) == list(range(4000))
    summary = json.loads((tmp_path / "b-out" / "_summary.json").read_text())
    assert summary["shards_skipped"] >= len(parts)
    after = batchrun_status(tmp_path / "b-out")
    assert (after["running"], after["shards_committed"], after["rows_committed"]) == (False, 160, 4000)


def batchrun_status(out_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "batchrun.cli", "status", str(out_dir), "--json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sigterm_to_every_worker_of_one_node_drains_them_and_the_job_finishes(cluster, tmp_path):
    """A node's preemption notice reaches each of its workers as SIGTERM: they drain (commit what finishes within
    faults.drain_s, hand the rest back at once) and are replaced uncharged; the other node's workers take the handed
    back shards within seconds, not after the lease timeout; every row once."""
    import psutil

    rows, lease_s = 800, 300
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(rows)),
                                                     "prompt": [f"w{i} x y" for i in range(rows)]}))
    job = {"engine": {"name": "tests.engines:SlowEcho", "max_in_flight": 4,
                      "options": {"log_path": str(tmp_path / "calls"), "per_poll": 1, "delay_s": 0.05}},
           "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"}, "sampling": {"max_tokens": 2},
           "output": {"dir": str(tmp_path / "out")}, "resources": {"num_workers": 4, "placement": "spread"},
           "shards": {"rows_per_shard": 10}, "faults": {"drain_s": 0.5, "lease_timeout_s": lease_s, "heartbeat_s": 0.5}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    cluster.submit(tmp_path / "job.yaml", "batchrun-node-term")
    wait_for(lambda: len(list((tmp_path / "out").glob("part-*.parquet"))) >= 4, 180, "4 committed shards")

    def workers(node: int) -> list[psutil.Process]:  # this job's workers on a node (its `ray start` tree)
        tree = psutil.Process(cluster.procs[node].pid).children(recursive=True)
        # in their run() (Ray titles the process by the method it runs): not an earlier test's lingering process
        return [p for p in tree if " ".join(p.cmdline()).startswith("ray::Worker.run")]

    wait_for(lambda: len(workers(0)) + len(workers(1)) == 4, 60, "the job's four workers")
    victims = workers(1)
    assert victims, "placement spread put no worker on node_b"
    signalled = time.time()
    for p in victims:
        p.send_signal(signal.SIGTERM)
    wait_for(lambda: cluster.status("batchrun-node-term") in ("SUCCEEDED", "FAILED", "STOPPED"), 300, "the job")
    assert cluster.status("batchrun-node-term") == "SUCCEEDED", cluster.job("logs", "batchrun-node-term")[-3000:]
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == list(range(rows))  # every row exactly once
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    drained = summary["drains"]
    assert len(drained) == len(victims) and summary["worker_restarts"] == 0 and summary["engine_deaths"] == 0, summary
    assert all(d["why"] == "SIGTERM" for d in drained.values())
    handed = [sid for d in drained.values() for sid in d["handed_back"]]
    from batchrun.store.output import OutputDir

    entries = OutputDir(tmp_path / "out").manifest.entries()
    relet = sorted(round(entries[sid].started_at - signalled, 2) for sid in handed)
    print(f"node SIGTERM -> re-lease of {len(relet)} handed-back shard(s): {relet} s")
    assert handed and all(0 < x < lease_s / 2 for x in relet), relet  # handed back, not expired
    assert not set(drained) & {entries[sid].worker for sid in handed}  # another worker took each one
