"""The driver's manifest merges at scale (issue 24): an output dir whose manifest is N entries in segments of 1,000
(as the queue writes them), merged into one as `batchrun run` does before any work (`Manifest.compact`, quarantined
entries dropped), then again as at its end with the summary's totals over it (`summary.outputs`, `this_run`), in a
fresh process each time: the wall time of each and the process's peak RSS. With --compare-with REV the same
merge runs on the batchrun of another commit too (a git worktree), interleaved, side by side in one call.

    python bench/manifest.py --entries 1000000 --compare-with HEAD~1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
from batchrun import summary
from batchrun.store.output import OutputDir
out = OutputDir(sys.argv[1])
t0 = time.perf_counter()
n = len(out.manifest.compact("bench", keep_quarantined=False))  # a run's start
t1 = time.perf_counter()
merged = out.manifest.compact("bench-end")  # a run's end: the merge, then the summary's totals
columnar = hasattr(merged, "committed")
entries = merged.committed() if columnar else [e for e in merged.values() if e.state == "committed"]
summary.outputs(entries), summary.this_run(entries, "r1", 1.0)
t2 = time.perf_counter()
print(json.dumps({"merge_s": round(t1 - t0, 2), "end_s": round(t2 - t1, 2), "committed": n,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def build(path: Path, n: int) -> None:
    """n shards' entries as a run of 1,000 workers leaves them: one segment per 1,000 commits, 1% of the shards
    quarantined first and committed by a later run, 1% of them revised by `--retry-errors`."""
    from batchrun.records import ManifestEntry
    from batchrun.store.output import OutputDir

    out = OutputDir(path)
    out.ensure()
    rng = random.Random(0)
    batch, seq = [], 0

    def flush():
        nonlocal batch, seq
        out.manifest.append(batch, "r0", seq)
        batch, seq = [], seq + 1

    for sid in range(n):
        worker = f"w{rng.randrange(1000):04d}"
        common = dict(rows=100, ids_digest=f"{rng.getrandbits(128):032x}", worker=worker, node=f"node-{worker[:3]}",
                      run_id="r0", started_at=1e9 + sid, committed_at=1e9 + sid + 5, generated_tokens=6400,
                      prompt_tokens=12800, attempt=1)
        if sid % 100 == 7:
            batch.append(ManifestEntry(sid, "quarantined", **{**common, "rows": 0}, error="boom"))
            common["run_id"] = "r1"
        batch.append(ManifestEntry(sid, "committed", **common))
        if sid % 100 == 3:
            batch.append(ManifestEntry(sid, "committed", **common, revision=1, error_rows=0,
                                       retried={"rows": 2, "still_failing": 0, "generated_tokens": 128}))
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()


def merge_once(tree: Path, built: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-manifest-"))
    try:
        shutil.copytree(built, work / "out")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "out")], cwd=tree, capture_output=True,
                              text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--compare-with", default=None, help="a git revision whose merge runs side by side")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    built = Path(tempfile.mkdtemp(prefix="bench-manifest-src-")) / "out"
    build(built, args.entries)
    trees = {"this tree": ROOT}
    if args.compare_with:
        rev = subprocess.run(["git", "rev-parse", "--short", args.compare_with], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        other = Path(tempfile.mkdtemp(prefix="bench-manifest-wt-")) / rev
        subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=ROOT, check=True,
                       capture_output=True)
        trees[rev] = other
    results: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(args.repeats):
            for name, tree in trees.items():
                results[name].append(merge_once(tree, built))
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(built.parent, ignore_errors=True)
    print("| batchrun | entries | committed | start merge s (each run) | end merge + summary s | peak RSS MB |")
    print("| --- | ---: | ---: | --- | --- | --- |")
    for name, runs in results.items():
        print(f"| {name} | {args.entries:,} | {runs[0]['committed']:,} | {[r['merge_s'] for r in runs]} "
              f"(median {statistics.median(r['merge_s'] for r in runs):.2f}) | {[r['end_s'] for r in runs]} | "
              f"{[r['peak_rss_mb'] for r in runs]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
