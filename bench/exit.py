"""From the job's summary to the shell prompt, on a local cluster the command starts itself: `batchrun` (the entry
point, which stops that cluster without waiting: runner.end_local_cluster) against the same main() exiting the
usual way (Ray's atexit ray.shutdown, which waits for each of its processes in turn), interleaved, side by side.

    .venv/bin/python bench/exit.py [--repeats 3] [--job jobs/eval.yaml]

Prints a table: seconds from _summary.json's write to the process's end, and from the command's start to its end.
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

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "batchrun (entry)": ["-m", "batchrun.cli"],
    "main() + ray.shutdown at exit": ["-c", "import sys; from batchrun.cli import main; sys.exit(main())"],
}


def once(args: list[str], job: str, out: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    started = time.time()
    subprocess.run([sys.executable, *args, "run", job, "--overwrite", "--no-progress", "--set", f"output.dir={out}"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended = time.time()
    return ended - os.path.getmtime(Path(out) / "_summary.json"), ended - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--job", default="jobs/eval.yaml")
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, cmd in VARIANTS.items():  # interleaved: the machine's drift hits both alike
                results[name].append(once(cmd, args.job, f"{tmp}/out"))
                time.sleep(2)  # the previous cluster's processes are gone
    print(f"| variant ({args.job}, {args.repeats} runs each) | summary -> exit, s (median; all) | whole command, s |")
    print("| --- | --- | --- |")
    for name, runs in results.items():
        tails = [round(t, 3) for t, _ in runs]
        print(f"| {name} | {statistics.median(tails):.3f}; {tails} | {statistics.median(w for _, w in runs):.1f} |")


if __name__ == "__main__":
    main()
