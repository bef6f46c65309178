"""A suite against the same tasks as separate jobs, whole process each, interleaved, on this machine's CPU with the
demo model (issue 22: 5 tasks of 64 rows; goal >= 2.5x).

    .venv/bin/python bench/suite.py [--tasks 5] [--rows 64] [--repeats 2]

Each task: arithmetic prompts of its own (build/demo-data style), greedy, 4 tokens, scored by exact match. The
separate jobs are what a user without suites runs: one `batchrun run` per task, each starting Ray, its workers and
their engines; the suite starts them once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from batchrun.demo import write_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchrun-suite-"))
    engine = {"name": "hf", "model": str(ROOT / "build" / "demo-model"), "dtype": "float32"}
    tasks = []
    for k in range(args.tasks):
        data = write_prompts(work / f"t{k}.parquet", n=args.rows, seed=100 + k)
        tasks.append({"name": f"t{k}", "input": {"path": str(data), "prompt_column": "prompt", "id_column": "id"},
                      "score": {"method": "exact", "reference_column": "answer"}})
    common = {"engine": engine, "sampling": {"max_tokens": 4}, "resources": {"num_workers": 1}}
    (work / "suite.yaml").write_text(yaml.safe_dump({**common, "output": {"dir": str(work / "suite")},
                                                      "tasks": tasks}))
    for t in tasks:
        (work / f"{t['name']}.yaml").write_text(yaml.safe_dump({**common, "input": t["input"], "score": t["score"],
                                                                 "output": {"dir": str(work / t["name"])}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = [sys.executable, "-m", "batchrun.cli", "run"]

    def timed(files: list[str]) -> float:
        started = time.time()
        for f in files:
            subprocess.run([*cli, str(work / f), "--overwrite", "--no-progress"], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return round(time.time() - started, 2)

    results = {"suite (one command)": [], f"{args.tasks} separate jobs": []}
    for _ in range(args.repeats):
        results["suite (one command)"].append(timed(["suite.yaml"]))
        results[f"{args.tasks} separate jobs"].append(timed([f"{t['name']}.yaml" for t in tasks]))
    print(f"| {args.tasks} tasks of {args.rows} rows, demo model, CPU | whole process, s (each run) | median |")
    print("| --- | --- | --- |")
    for name, t in results.items():
        print(f"| {name} | {t} | {statistics.median(t):.2f} |")
    suite, jobs = (statistics.median(v) for v in results.values())
    print(f"separate / suite = {jobs / suite:.2f}x (goal >= 2.5x)")


if __name__ == "__main__":
    main()
