"""Tensor parallelism through `batchrun run`, as a user runs it: TP=1 on one GPU against TP=2 (one worker, two GPUs)
on the same model, side by side in one call; optionally an earlier checkout's TP=2 job for the before.

    python bench/tp.py --model mistral-7b [--old-src DIR] [--json OUT]

Per job: tok/s in the engine window and over the command, the start-up split (_summary.json `startup`: Ray, actor,
rank spawn, process group, model load, warm-up, first completion), the time from the last commit to the command's
exit, whether Open MPI reported a rank killed, the worker's peak RSS and its resident memory after the load
(anonymous vs file-backed). Workload: 512 prompts of 64-512 tokens, per-row budgets 16-512."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def run_job(model: Path, tp: int, n: int, src: str | None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from hf_engine import workload

    work = Path(tempfile.mkdtemp(prefix=f"tp{tp}-"))
    prompts, budgets = workload(n, (64, 512), (16, 512))
    pq.write_table(pa.table({"id": list(range(n)), "prompt": prompts, "budget": budgets}), work / "in.parquet")
    job = {"engine": {"name": "hf", "model": str(model), "dtype": "bfloat16", "device": "cuda",
                      "tensor_parallel_size": tp},
           "input": {"path": str(work / "in.parquet"), "id_column": "id"},
           "sampling": {"max_tokens": 512, "per_row": {"max_tokens": "budget"}}, "output": {"dir": str(work / "out")},
           "resources": {"num_workers": 1, "gpus_per_worker": tp}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.time()  # cwd decides which batchrun runs (`-m` puts it first on sys.path)
    proc = subprocess.run([sys.executable, "-m", "batchrun.cli", "run", str(work / "job.yaml"), "--no-progress"],
                          env=env, cwd=src or ROOT, capture_output=True, text=True, timeout=560)
    exited = time.time()
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    s = json.loads((work / "out" / "_summary.json").read_text())
    from batchrun.store.output import OutputDir

    last_commit = max((e.committed_at for e in OutputDir(work / "out").manifest.entries().values()), default=exited)
    window = max(s["worker_engine_window_s"].values())
    return {"tok_s": round(s["generated_tokens"] / window), "tok_s_command": round(s["generated_tokens"] /
                                                                                   (exited - t0)),
            "command_s": round(exited - t0, 1), "last_commit_to_exit_s": round(exited - last_commit, 1),
            "rank_killed": "signal 9" in proc.stderr or "Killed" in proc.stderr,
            "close_wait_s": s.get("close_wait_s"), "startup": s.get("startup"),
            "worker_peak_rss_mb": max(v for v in s["worker_peak_rss_mb"].values() if v),
            "worker_rss_after_load_mb": s.get("worker_rss_after_load_mb"),
            "worker_rss_during_load_max_mb": s.get("worker_rss_during_load_max_mb")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mistral-7b")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--old-src", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from hf_engine import make_model

    model = make_model(args.model, Path(f"/tmp/batchrun-{args.model}"), "bfloat16")
    size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    results = {}
    for name, tp, src in [("TP=1", 1, None), ("TP=2", 2, None)] + ([("TP=2 old", 2, args.old_src)]
                                                                 if args.old_src else []):
        results[name] = r = run_job(model, tp, args.n, src)
        print(name, json.dumps(r), flush=True)
    print(f"\ncheckpoint {size_mb:,.0f} MB")
    print("| job | tok/s (engine) | tok/s (command) | command s | first completion s | last commit -> exit s | "
          "rank killed | worker peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][-200:]!r} |")
            continue
        first = (r["startup"] or {}).get("first_completion_s")
        print(f"| {name} | {r['tok_s']:,} | {r['tok_s_command']:,} | {r['command_s']} | {first} | "
              f"{r['last_commit_to_exit_s']} | {r['rank_killed']} | {r['worker_peak_rss_mb']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
