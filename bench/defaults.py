"""The job file with nothing tuned against the best hand-tuned settings, through `batchrun run` as a user runs it.

    python bench/defaults.py --models llama-1b,mistral-7b [--old-src DIR] [--json OUT]

Per model, side by side in one process: `default` (engine: name, model, dtype, device; one GPU), `best` (varlen
attention, CUDA graphs, 32k batch tokens, every prompt in flight) and, with --old-src (a checkout of an earlier
batchrun's package dir), that code's default job in a subprocess. Workload: 512 prompts of 64-512 tokens, per-row
budgets of 16-512 (random-init models have no EOS: every row runs its budget). Prints tok/s in the engine window,
tok/s over the whole command, the ratio to best, the start-up split and the worker's peak RSS."""

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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BEST = {"attn_implementation": "varlen", "use_cuda_graph": True, "max_batch_tokens": 32768}


def job(model: Path, work: Path, n: int, tuned: bool) -> dict:
    engine = {"name": "hf", "model": str(model), "dtype": "bfloat16", "device": "cuda"}
    if tuned:
        engine.update(max_in_flight=n, options=BEST)
    return {"engine": engine, "input": {"path": str(work / "in.parquet"), "id_column": "id"},
            "sampling": {"max_tokens": 512, "per_row": {"max_tokens": "budget"}}, "output": {"dir": str(work / "out")},
            "resources": {"num_workers": 1, "gpus_per_worker": 1}}


def run(spec_dict: dict, work: Path, python_path: str | None = None) -> dict:
    """`batchrun run` in a subprocess (its own Ray cluster, as a user's command), the summary back."""
    (work / "job.json").write_text(json.dumps(spec_dict))
    path = [python_path, str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    code = ("import json,sys; import yaml; from batchrun.cli import main; "
            f"open('{work}/job.yaml','w').write(yaml.safe_dump(json.load(open('{work}/job.json')))); "
            f"sys.exit(main(['run', '{work}/job.yaml', '--no-progress', '--overwrite']))")
    t0 = time.perf_counter()  # cwd: `python -c` puts it first on sys.path, so it decides which batchrun runs
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          cwd=python_path or ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    s = json.loads((work / "out" / "_summary.json").read_text())
    engine_window = max(s["worker_engine_window_s"].values())
    tokens = s["generated_tokens"]
    return {"tok_s": round(tokens / engine_window), "tok_s_command": round(tokens / wall), "wall_s": round(wall, 1),
            "engine_window_s": round(engine_window, 1), "tokens": tokens,
            "worker_peak_rss_mb": max(v for v in s["worker_peak_rss_mb"].values() if v),
            "in_flight": s.get("worker_max_in_flight"), "startup": s.get("startup"),
            "kv_cache_tokens": list(s.get("worker_kv_cache_tokens", {}).values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-1b,mistral-7b")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--old-src", default=None, help="a directory holding an earlier batchrun package to compare")
    ap.add_argument("--runs", default="default,best,old")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hf_engine import make_model, workload

    results = {}
    for kind in args.models.split(","):
        model = make_model(kind, Path(f"/tmp/batchrun-{kind}"), "bfloat16")
        prompts, budgets = workload(args.n, (64, 512), (16, 512))
        runs = [("default", False, None), ("best", True, None)] + (
            [("old default", False, args.old_src)] if args.old_src else [])
        for name, tuned, src in [r for r in runs if r[0].split()[0] in args.runs.split(",")]:
            work = Path(tempfile.mkdtemp(prefix="defaults-"))
            pq.write_table(pa.table({"id": list(range(args.n)), "prompt": prompts, "budget": budgets}),
                           work / "in.parquet")
            results[(kind, name)] = r = run(job(model, work, args.n, tuned), work, src)
            print(kind, name, json.dumps(r), flush=True)
    print("\n| model | run | tok/s (engine window) | vs best | tok/s (whole command) | command s | peak RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (kind, name), r in results.items():
        best = results.get((kind, "best"), {}).get("tok_s")
        if "error" in r:
            print(f"| {kind} | {name} | failed | | | | |")
            continue
        ratio = f"{r['tok_s'] / best:.3f}" if best else ""
        print(f"| {kind} | {name} | {r['tok_s']:,} | {ratio} | {r['tok_s_command']:,} | {r['wall_s']} | "
              f"{r['worker_peak_rss_mb']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k}|{n}": r for (k, n), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
