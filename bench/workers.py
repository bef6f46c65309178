"""Worker scaling with the echo engine on this machine: the same job with 1, 2, ... workers, and where the CPU goes.

Each run is `batchrun run` in a fresh process with its own local Ray. Rows/s is the summary's `this_run` rate (Ray
start-up excluded). While a run goes, every process's CPU time is sampled, so the table also says how many cores the
workers, the shard queue, the driver and Ray's daemons used: once they add up to the machine's cores, more workers
cannot help. Usage: .venv/bin/python bench/workers.py [--rows 1000000] [--workers 1 2] [--rows-per-shard 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import run_job, write_input  # noqa: E402  (bench/ is not a package)

GROUPS = (("ray::Worker", "workers"), ("ray::ShardQueue", "queue actor"), ("batchrun.cli", "driver"),
          ("raylet", "raylet"), ("gcs_server", "gcs"))


def cpu_by_group(stop: threading.Event, out: Counter) -> None:
    """CPU seconds per process group over the run, from each process's own counters (first and last sighting)."""
    first, last = {}, {}
    while not stop.is_set():
        for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                t = p.info["cpu_times"].user + p.info["cpu_times"].system
            except (psutil.Error, AttributeError):
                continue
            group = next((g for key, g in GROUPS if key in cmd), "other")
            first.setdefault(p.info["pid"], t)
            last[p.info["pid"]] = (group, t)  # the last title counts: an actor starts as ray::IDLE
        stop.wait(0.5)  # psutil over every process costs CPU too: sample sparingly
    for pid, (group, t) in last.items():
        out[group] += t - first[pid]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    args = ap.parse_args()
    inp = write_input(HERE / "out" / f"input-{args.rows}.parquet", args.rows)
    rows = []
    for w in args.workers:
        stop, cpu = threading.Event(), Counter()
        sampler = threading.Thread(target=cpu_by_group, args=(stop, cpu))
        sampler.start()
        t0 = time.perf_counter()
        s = run_job(inp, HERE / "out" / f"workers-{w}", args.rows_per_shard, workers=w)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rows.append((w, s["this_run"]["rows_per_s"], s["this_run"]["wall_s"], wall, dict(cpu)))
    base = rows[0][1]
    groups = [g for _, g in GROUPS] + ["other"]
    print(f"\n{os.cpu_count()} cores, {args.rows:,} rows, {args.rows_per_shard:,} rows per shard, echo engine")
    print("CPU seconds per process group over the whole command (start-up included); 'worker cores' = the workers'")
    print("CPU seconds over the job's run time (the summary's this_run wall), i.e. cores the workers kept busy")
    print(f"{'workers':>7} {'rows/s':>9} {'x 1st':>6} {'run s':>6} {'wall s':>7} {'worker cores':>12}  "
          + " | ".join(groups))
    for w, rate, run_s, wall, cpu in rows:
        used = " | ".join(f"{cpu.get(g, 0):.1f}" for g in groups)
        worker_cpu = cpu.get("workers", 0) / run_s
        print(f"{w:>7} {rate:>9,.0f} {rate / base:>6.2f} {run_s:>6.1f} {wall:>7.1f} {worker_cpu:>12.2f}  "
              f"{used}")


if __name__ == "__main__":
    main()
