"""Memory benchmark: driver and worker peak RSS for 10k, 100k and 1M input rows (echo engine, 1 worker).

The driver holds shard descriptors only, and a worker holds at most a few shards, so both must stay flat as the
input grows. Prints a table; run with `make bench` or `.venv/bin/python bench/memory.py [--rows 10000 100000 ...]`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()


def write_input(path: Path, rows: int, seed: int = 0, row_group_size: int = 20_000) -> Path:
    """Ids and prompts of 1-40 words, written in row groups of `row_group_size` rows (pyarrow's own default is 1Mi)."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows \
            and pq.ParquetFile(path).metadata.row_group(0).num_rows == min(rows, row_group_size):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chunk = max(100_000, row_group_size)  # one write per row group at most: a group never spans two writes
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("prompt", pa.string())])) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            prompts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(n)]
            w.write_table(pa.table({"id": pa.array(range(start, start + n), pa.int64()), "prompt": prompts}),
                          row_group_size=row_group_size)
    return path


def run_job(inp: Path, out: Path, rows_per_shard: int, workers: int = 1) -> dict:
    job = {
        "engine": {"name": "echo", "max_in_flight": 4096},
        "input": {"path": str(inp), "id_column": "id"},
        "sampling": {"max_tokens": 16},
        "output": {"dir": str(out)},
        "resources": {"num_workers": workers},
        "shards": {"rows_per_shard": rows_per_shard},
    }
    job_file = out.parent / f"{out.name}.yaml"
    job_file.write_text(json.dumps(job))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "batchrun.cli", "run", str(job_file), "--overwrite", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "_summary.json").read_text())
    summary["wall_incl_startup_s"] = time.time() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--rows-per-shard", type=int, default=1000, help="default: the job's own default shard size")
    ap.add_argument("--row-group-size", type=int, default=20_000)
    args = ap.parse_args()
    results = []
    for n in args.rows:
        inp = write_input(HERE / "out" / f"input-{n}-rg{args.row_group_size}.parquet", n,
                          row_group_size=args.row_group_size)
        s = run_job(inp, HERE / "out" / f"mem-{n}", args.rows_per_shard)
        workers = [v for v in s["worker_peak_rss_mb"].values() if v]
        results.append((n, s["driver_peak_rss_mb"], max(workers) if workers else float("nan"),
                        s["this_run"]["rows_per_s"], s["wall_incl_startup_s"]))
    base_d, base_w = results[0][1], results[0][2]
    print(f"\n{'rows':>10} {'driver MB':>10} {'x first':>8} {'worker MB':>10} {'x first':>8} {'rows/s':>10} "
          f"{'wall s':>8}")
    for n, d, w, rate, wall in results:
        print(f"{n:>10,} {d:>10.0f} {d / base_d:>8.2f} {w:>10.0f} {w / base_w:>8.2f} {rate:>10,.0f} {wall:>8.1f}")


if __name__ == "__main__":
    main()
