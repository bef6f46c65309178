"""Tensor-parallel start-up and close of the HF engine on GPUs, with stacks of every process when close stalls.

    python bench/tp_close.py --tp 2 --model llama-1b [--spy .devwheels/py-spy] [--out DIR]

Prints one line per phase (start, generate, close) and, if close() is not done within --stall-s, py-spy dumps of
the worker process and each rank into DIR (what each thread waits on)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def dump_stacks(spy: str, pids: list[int], out: Path, tag: str) -> None:
    for pid in pids:
        try:
            text = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
        except Exception as e:  # a rank that exited meanwhile
            text = f"py-spy failed: {e}"
        (out / f"{tag}-{pid}.txt").write_text(text)
        print(f"== {tag} pid {pid}\n" + "\n".join(text.splitlines()[:60]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--spy", default=None)
    ap.add_argument("--stall-s", type=float, default=8.0)
    ap.add_argument("--out", default="/tmp/tp-close")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from hf_engine import make_model, workload

    from batchrun.bench import drive
    from batchrun.engines.base import Request, Sampling
    from batchrun.engines.hf import HFEngine

    path = make_model(args.model, Path(f"/tmp/batchrun-{args.model}"), args.dtype)
    prompts, budgets = workload(args.n, (64, 128), (16, 64))
    t0 = time.monotonic()
    engine = HFEngine(str(path), Sampling(max_tokens=max(budgets)), dtype=args.dtype, tensor_parallel_size=args.tp,
                      attn_implementation="varlen", use_cuda_graph=True)
    t_start = time.monotonic() - t0
    ids = engine.encode(prompts)
    requests = [Request(f"0:{i}", "", x, Sampling(max_tokens=b)) for i, (x, b) in enumerate(zip(ids, budgets))]
    tokens, elapsed, _ = drive(engine, requests, window=len(requests))
    pool = getattr(engine.backend, "pool", None)
    ranks = list(pool.pids) if pool is not None else []
    done = threading.Event()

    def watch():
        if not done.wait(args.stall_s) and args.spy:
            dump_stacks(args.spy, [__import__("os").getpid(), *ranks], out, "stall")

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.monotonic()
    engine.close()
    t_close = time.monotonic() - t0
    done.set()
    result = {"killed": getattr(pool, "killed", None), "tp": args.tp, "start_s": round(t_start, 2), "tokens": tokens,
              "generate_s": round(elapsed, 2),
              "close_s": round(t_close, 2), "ranks": ranks}
    (out / f"tp{args.tp}.json").write_text(json.dumps(result))
    print("result", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
