"""Scale simulation of the shard queue and the output dir (issue 16), on this machine: the real ShardQueue actor and
a real output dir, driven by up to 1,000 simulated workers that lease, heartbeat and commit 1-row shards, as fast as
the queue lets them (--rates 0: its capacity) or together at a set rate of commits/s (the latency a worker sees at
that load).

    python bench/scale.py --shards 10000,100000,1000000 --workers 1000 --seconds 20 --rates 0,500 --resume 100000 --s3

Simulated workers run as asyncio tasks in a few client actors (processes). Each task makes a real worker's calls
(worker.py): per shard a lease, then the commit (the exclusive create of its part, then the report to the queue,
carrying its heartbeat), and a heartbeat of its own when it has said nothing for the interval batchrun gives that
many workers; the bench's process makes the driver's calls (a progress snapshot, then up to 0.5 s of waiting).
Reported per plan size: leases/s and commits/s sustained, p50/p99 lease, commit and snapshot latency, the queue
actor's RSS, and the driver's RSS after building the plan. --resume: a driver's start on an output dir of that many
committed shards (merge the manifest segments, list the parts, rebuild the queue), on local disk and with --s3 on a
loopback S3 server (moto).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import ray  # noqa: E402

from batchrun.memory import peak_rss_mb  # noqa: E402
from batchrun.plan import cut_shards  # noqa: E402
from batchrun.pool import HEARTBEATS_PER_S  # noqa: E402
from batchrun.records import ManifestEntry, WorkerStats  # noqa: E402
from batchrun.shard_queue import DONE, WAIT, ShardQueue  # noqa: E402
from batchrun.store.output import OutputDir  # noqa: E402


@ray.remote(num_cpus=0)
class SimClients:
    """`tasks` simulated workers in one process."""

    async def run(self, queue, first: int, tasks: int, seconds: float, out_dir: str, period: float = 0.0,
                  every: float = 2.0) -> dict:
        """period > 0: each simulated worker takes one shard every `period` seconds (a GPU finishing a shard at a
        set rate; latency then is what a worker waits at that load); 0: as fast as the queue answers (capacity)."""
        import random

        od = OutputDir(out_dir)
        stop = time.time() + seconds
        lease_lat, commit_lat, commits, waits = [], [], [0], [0]

        stats = WorkerStats(in_flight=64, rows=1000, shards=1, generated_tokens=200_000, max_in_flight=64,
                            max_in_flight_why="the engine's KV cache", engine_start_s=41.0, kv_cache_tokens=1 << 20,
                            engine_startup={"import": 4.5, "load": 1.8}, rss_after_load_mb={"anon": 900, "file": 2})
        banked_leases = [0]

        async def node_beat(wids: list[str]):  # beats.py: one call a node every `every` s, its workers' latest
            await asyncio.sleep(random.uniform(0, every))
            while time.time() < stop:
                await queue.heartbeats.remote([(w, ("sim", os.getpid(), stats, ()), 0.0) for w in wids])
                await asyncio.sleep(every)

        async def worker(k: int):
            wid = f"sim{first + k:04d}"
            due = time.time() + random.uniform(0, period)
            grant = None  # banked by the last commit (worker.py: the writer takes the prefetcher's next lease)
            while time.time() < stop:
                if period:
                    await asyncio.sleep(max(0.0, due - time.time()))
                    due += period
                # a real worker's calls per shard (worker.py): a lease unless its last commit took one, then the
                # commit with its heartbeat, taking the next lease
                if grant is None:
                    t0 = time.perf_counter()
                    grant = await queue.lease.remote(wid)
                    lease_lat.append(time.perf_counter() - t0)
                else:
                    banked_leases[0] += 1
                if grant == DONE:
                    break
                if grant == WAIT:
                    grant = None
                    waits[0] += 1
                    await asyncio.sleep(0.05)
                    continue
                sid = grant.shard_id
                entry = ManifestEntry(sid, "committed", rows=1, worker=wid, node="sim", started_at=time.time(),
                                      committed_at=time.time())
                t1 = time.perf_counter()
                # the worker's own commit (exclusive create of the part), then the queue's bookkeeping
                published = od.create(od.parts.path(sid), b"PAR1")
                _, grant = await queue.commit_and_lease.remote(entry, published, ("sim", os.getpid(), stats, (sid,)))
                commit_lat.append(time.perf_counter() - t1)
                commits[0] += 1
                if grant == WAIT:
                    grant = None

        node_size = 8  # workers a node: one heartbeat call each
        beats = [asyncio.ensure_future(node_beat([f"sim{first + k:04d}" for k in range(i, min(tasks, i + node_size))]))
                 for i in range(0, tasks, node_size)]
        await asyncio.gather(*(worker(k) for k in range(tasks)))
        for b in beats:
            b.cancel()
        return {"lease": lease_lat, "commit": commit_lat, "commits": commits[0], "waits": waits[0],
                "banked": banked_leases[0]}


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def queue_procs() -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if "ShardQueue" in " ".join(p.info["cmdline"] or [])]


def queue_rss_mb() -> float:
    procs = queue_procs()
    return round(max(p.memory_info().rss for p in procs) / 2**20, 1) if procs else float("nan")


def queue_cpu_s() -> float:
    """CPU seconds the queue actor's process has used (user + system): how busy its one thread is."""
    return sum(sum(p.cpu_times()[:2]) for p in queue_procs())


def driver_ticks(queue, refs: list) -> list[float]:
    """The driver's loop while the workers run (runner._watch): one progress snapshot, then up to 0.5 s waiting on
    the workers (pool.watch); returns each snapshot's latency."""
    latencies, known, seen = [], None, {}
    while True:
        t0 = time.perf_counter()
        snap = ray.get(queue.progress.remote(known))
        seen = snap.merge_workers(seen, known)
        known = snap.stats_version
        latencies.append(time.perf_counter() - t0)
        if ray.wait(refs, num_returns=len(refs), timeout=0.5)[0] == refs:
            return latencies


def simulate(n_shards: int, workers: int, seconds: float, clients: int, rate: float = 0.0) -> dict:
    out = Path(tempfile.mkdtemp(prefix="scale-"))
    od = OutputDir(out)
    od.ensure()
    t0 = time.perf_counter()
    shards = cut_shards((n_shards,), 1)
    plan_s = time.perf_counter() - t0
    driver_rss = peak_rss_mb()
    t0 = time.perf_counter()
    queue = ray.remote(ShardQueue).options(num_cpus=0, max_concurrency=1).remote(
        str(out), shards, "sim", 4, 120.0, "zstd", 0)  # at batchrun's default niceness, as a job runs it
    ray.get(queue.set_worker_count.remote(workers))
    start_s = time.perf_counter() - t0
    actors = [SimClients.remote() for _ in range(clients)]
    per = workers // clients
    cpu0 = queue_cpu_s()
    t0 = time.perf_counter()
    period = workers / rate if rate else 0.0
    every = max(2.0, workers / 8 / HEARTBEATS_PER_S)  # what batchrun gives this many nodes of 8 (pool.heartbeat_for)
    refs = [a.run.remote(queue, i * per, per, seconds, od.root, period, every) for i, a in enumerate(actors)]
    snapshots = driver_ticks(queue, refs)
    results = ray.get(refs)
    wall = time.perf_counter() - t0
    cpu = queue_cpu_s() - cpu0
    lease = [x for r in results for x in r["lease"]]
    commit = [x for r in results for x in r["commit"]]
    rss = queue_rss_mb()
    for a in actors:
        ray.kill(a)
    ray.kill(queue)
    return {"shards": n_shards, "workers": workers, "rate": rate or "max", "plan_s": round(plan_s, 2),
            "queue_start_s": round(start_s, 2),
            "leases_per_s": round((len(lease) + sum(r["banked"] for r in results)) / wall),
            "lease_calls_per_s": round(len(lease) / wall),
            "commits_per_s": round(sum(r["commits"] for r in results) / wall),
            "lease_p50_ms": round(pct(lease, 0.5), 1), "lease_p99_ms": round(pct(lease, 0.99), 1),
            "commit_p50_ms": round(pct(commit, 0.5), 1), "commit_p99_ms": round(pct(commit, 0.99), 1),
            "waits": sum(r["waits"] for r in results),
            "snapshot_p50_ms": round(pct(snapshots, 0.5), 1), "snapshot_p99_ms": round(pct(snapshots, 0.99), 1),
            "queue_cpu_busy": round(cpu / wall, 3), "queue_rss_mb": rss, "driver_peak_rss_mb": driver_rss}


def resume_time(n: int, url: str) -> dict:
    """A driver's start on an output dir of n committed shards, as a crashed run leaves it: one manifest segment per
    1,000 commits except the last 1,000 (their segment never written: their parts carry the entries in their
    footers), and the run's lease mark 500 past its last shard. Merge the segments, find the parts without entries
    (by a listing of every part, as before the lease mark, and below the mark), rebuild the queue's state."""
    import pyarrow as pa

    od = OutputDir(url)
    od.ensure()
    t0 = time.perf_counter()
    unflushed = min(1000, n)
    for first in range(0, n - unflushed, 1000):
        od.manifest.append([ManifestEntry(sid, "committed", rows=1, worker="w", node="n", run_id="r0")
                           for sid in range(first, min(n - unflushed, first + 1000))], "r0", first // 1000)
    parts = {od.parts.path(sid): b"PAR1" for sid in range(n - unflushed)}  # never read: in the manifest
    if od.local:
        for path, data in parts.items():
            od.create(path, data)
    else:
        od.fs.pipe(parts)  # concurrent PUTs
    for sid in range(n - unflushed, n):  # real parts: their footers are read
        od.parts.publish(pa.table({"id": [sid]}), ManifestEntry(sid, "committed", rows=1, run_id="r0"), "zstd")
    od.manifest.mark_leases(n + 500)
    setup_s = time.perf_counter() - t0
    shards = cut_shards((n,), 1)
    out = {"resume_shards": n, "store": "local" if od.local else od.protocol, "setup_s": round(setup_s, 1)}
    committed = od.manifest.committed()
    append, od.manifest.append = od.manifest.append, lambda *a, **k: None  # the same state for both
    for case, below in (("full listing", None), ("below the lease mark", n + 500)):
        t0 = time.perf_counter()
        assert len(od.manifest.reconcile(committed, "bench", n, below=below)) == unflushed
        out[f"find parts without entries, {case} s"] = round(time.perf_counter() - t0, 2)
    od.manifest.append = append
    for case in ("after a crash", "after a clean end"):  # the start of runner.run: the same calls
        t0 = time.perf_counter()
        complete = od.manifest.take_complete_mark()
        committed = od.manifest.compact("resume", keep_quarantined=False)
        compact_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if complete != len(committed):
            committed = committed.replace(od.manifest.reconcile(committed, "resume", n,
                                                                below=od.manifest.lease_mark()))
        reconcile_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        q = ShardQueue(od.root, shards, "resume", 4, 120.0, done=committed.ids())  # as the runner starts it
        queue_s = time.perf_counter() - t1
        assert len(committed) == n and not q.pending_ids
        out[case] = {"resume_s": round(time.perf_counter() - t0, 2), "merge_segments_s": round(compact_s, 2),
                     "list_parts_s": round(reconcile_s, 2), "queue_rebuild_s": round(queue_s, 2)}
        od.manifest.mark_complete(len(committed))
    return out


def footer_reads(n: int, url: str) -> dict:
    """A crash that left n parts without manifest entries (their segment never written): the next start rebuilds
    the entries from the parts' footers (Manifest.reconcile), reading them one at a time against FOOTER_READS at once
    (the same calls, side by side)."""
    import pyarrow as pa

    import batchrun.store.manifest as manifest

    od = OutputDir(url)
    od.ensure()
    for sid in range(n):
        table = pa.table({"id": [sid], "generated_text": ["x"]})
        od.parts.publish(table, ManifestEntry(sid, "committed", rows=1, worker="w", run_id="r0"), "zstd")
    out = {"footers": n, "store": "local" if od.local else od.protocol}
    for reads in (1, manifest.FOOTER_READS):
        manifest.FOOTER_READS = reads
        t0 = time.perf_counter()
        rebuilt = od.manifest.reconcile(set(), f"bench{reads}")
        out[f"{reads} at a time s"] = round(time.perf_counter() - t0, 2)
        assert len(rebuilt) == n
        od.remove(od.list(od.manifest_dir))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="10000,100000")
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--resume", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--s3", action="store_true", help="--resume also on a loopback S3 server (moto)")
    ap.add_argument("--footers", type=int, default=0, help="with --s3: reconcile this many parts without entries")
    ap.add_argument("--rates", default="0", help="commits/s the workers aim at together, per run; 0: as fast as the "
                    "queue answers (capacity); e.g. 0,500")
    args = ap.parse_args()
    ray.init(num_cpus=max(8, args.clients), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = [simulate(int(n), args.workers, args.seconds, args.clients, float(rate))
            for n in args.shards.split(",") if n for rate in args.rates.split(",")]
    for r in rows:
        print(json.dumps(r), flush=True)
    resume = []
    if args.resume:
        resume.append(resume_time(args.resume, tempfile.mkdtemp(prefix="resume-")))
        print(json.dumps(resume[-1]), flush=True)
    if args.resume and args.s3:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from s3server import free_port, make_bucket, s3_env, start_server

        port = free_port()
        os.environ.update(s3_env(port))
        server = start_server(port)
        try:
            make_bucket("scale")
            resume.append(resume_time(args.resume, "s3://scale/resume"))
            print(json.dumps(resume[-1]), flush=True)
            if args.footers:
                print(json.dumps(footer_reads(args.footers, "s3://scale/footers")), flush=True)
        finally:
            server.terminate()
    print("\n| shards | workers | target commits/s | leases/s (lease calls/s) | commits/s | lease p50 / p99 ms | "
          "commit p50 / p99 ms | "
          "snapshot p50 / p99 ms | queue thread busy | queue RSS MB | "
          "driver RSS MB | plan + queue start s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shards']:,} | {r['workers']} | {r['rate']} | "
              f"{r['leases_per_s']:,} ({r.get('lease_calls_per_s', '-')}) | "
              f"{r['commits_per_s']:,} | "
              f"{r['lease_p50_ms']} / {r['lease_p99_ms']} | {r['commit_p50_ms']} / {r['commit_p99_ms']} | "
              f"{r['snapshot_p50_ms']} / {r['snapshot_p99_ms']} | {r['queue_cpu_busy']:.0%} | "
              f"{r['queue_rss_mb']} | {r['driver_peak_rss_mb']} | {r['plan_s']} + {r['queue_start_s']} |")
    if resume:
        print("\n| store | shards | start | resume s | merge segments s | list parts s | queue rebuild s |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for r in resume:
            for case in ("after a crash", "after a clean end"):
                c = r[case]
                print(f"| {r['store']} | {r['resume_shards']:,} | {case} | {c['resume_s']} | {c['merge_segments_s']} | "
                      f"{c['list_parts_s']} | {c['queue_rebuild_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "resume": resume}, indent=1))


if __name__ == "__main__":
    main()
