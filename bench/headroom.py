"""Runner headroom: batchrun with the echo engine against Ray Data doing the same work on the same input.

Both read the same Parquet (ids, prompts of 1-40 words), add the same output columns and write Parquet, each in a
fresh process that starts its own local Ray (start-up included, as a user would time it). Prints rows/s and the
ratio. Usage: .venv/bin/python bench/headroom.py [--rows 300000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import write_input  # noqa: E402

RAY_DATA = r"""
import sys, pyarrow as pa, pyarrow.compute as pc, ray
src, dst = sys.argv[1], sys.argv[2]
ray.init(include_dashboard=False, logging_level="ERROR")

def complete(batch: pa.Table) -> pa.Table:
    # identity plus the columns batchrun writes (the echo engine's answer: the prompt's first 16 words)
    words = pc.split_pattern(batch["prompt"], " ", max_splits=None)
    n = pc.list_value_length(words)
    text = pc.binary_join(pc.list_slice(words, 0, 16), " ")
    return (batch.select(["id"])
            .append_column("generated_text", text)
            .append_column("finish_reason", pc.if_else(pc.greater(n, 16), "length", "stop"))
            .append_column("num_prompt_tokens", pc.cast(n, pa.int32()))
            .append_column("num_generated_tokens", pc.cast(pc.min_element_wise(n, 16), pa.int32()))
            .append_column("error", pa.nulls(len(batch), pa.string())))

ray.data.read_parquet(src).map_batches(complete, batch_format="pyarrow").write_parquet(dst)
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rows-per-shard", type=int, default=50_000)
    args = ap.parse_args()
    out = HERE / "out"
    inp = write_input(out / f"input-{args.rows}.parquet", args.rows)
    job = out / "headroom.yaml"
    job.write_text(json.dumps({
        "engine": {"name": "echo", "max_in_flight": 100_000}, "input": {"path": str(inp), "id_column": "id"},
        "sampling": {"max_tokens": 16}, "output": {"dir": str(out / "headroom-batchrun")},
        "resources": {"num_workers": 1}, "shards": {"rows_per_shard": args.rows_per_shard}}))
    results = {"ray_data": [], "batchrun": []}
    for _ in range(args.repeat):  # alternate, so drift hits both alike
        shutil.rmtree(out / "headroom-raydata", ignore_errors=True)
        results["ray_data"].append(timed([sys.executable, "-c", RAY_DATA, str(inp), str(out / "headroom-raydata")]))
        results["batchrun"].append(timed([sys.executable, "-m", "batchrun.cli", "run", str(job), "--overwrite",
                                          "--no-progress"]))
    best = {k: min(v) for k, v in results.items()}
    print(f"\n{'runner':<10} {'best wall s':>11} {'rows/s':>10}   (runs: {args.repeat}, rows: {args.rows:,})")
    for k in ("ray_data", "batchrun"):
        runs = ", ".join(f"{t:.2f}" for t in results[k])
        print(f"{k:<10} {best[k]:>11.2f} {args.rows / best[k]:>10,.0f}   all: {runs}")
    print(f"ratio batchrun / ray_data (rows/s) = {best['ray_data'] / best['batchrun']:.2f}")


if __name__ == "__main__":
    main()
