"""Log-likelihood scoring: batchrun against lm-evaluation-harness's own HF backend, side by side on one GPU.

Workloads (the demo tokenizer is character-level: a text of k characters is k tokens):
  mc    multiple choice: contexts of 200-800 tokens, 4 choices of 5-30 tokens (issue 30's workload)
  mmlu  MMLU-shaped: 5-shot contexts of ~1,000 tokens, 4 choices " A".." D" (2 tokens each here)
Runs (each prints one line; a table of ratios at the end):
  lmeval     lm_eval.models.huggingface.HFLM(batch_size=...).loglikelihood() on the same (context, continuation)
             pairs: its time after the model load, and its values (the reference)
  engine     batchrun's HF scoring engine alone (engines/hf_score.py), the same pairs; --engine-configs picks
             batch sizes (old: the batches before issue 30, 2,048 tokens / 32 rows, input order)
  batchrun   `batchrun run` of the same rows as a job (score.method: loglikelihood): engine window and whole command
  lmeval-proc / batchrun-proc: the whole process, as a user runs it (subprocess, wall clock)
Usage (GPU machine):
  python bench/score.py --model llama-1b --dtype bfloat16 --workload mc --rows 2000 --runs lmeval,engine,batchrun
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
ALPHABET = "0123456789+-= abcdefghijklmnopqrstuvwxyz"


def workload(kind: str, rows: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """(context, choices, answer) per row."""
    rng = random.Random(seed)
    text = lambda n: "".join(rng.choice(ALPHABET) for _ in range(n))  # noqa: E731
    out = []
    for _ in range(rows):
        if kind == "mc":
            out.append((text(rng.randint(200, 800)) + "\nAnswer:", [text(rng.randint(5, 30)) for _ in range(4)],
                        rng.randrange(4)))
        else:
            shots = "".join(f"{text(170)}\nAnswer: {rng.choice('ABCD')}\n\n" for _ in range(5))
            out.append((shots + text(120) + "\nAnswer:", ["A", "B", "C", "D"], rng.randrange(4)))
    return out


def pairs_of(rows) -> list[tuple[str, str]]:
    return [(ctx, " " + c) for ctx, choices, _ in rows for c in choices]


def run_lmeval(model: Path, dtype: str, rows, batch) -> dict:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    lm = HFLM(pretrained=str(model), dtype=dtype, batch_size=batch, device="cuda" if torch.cuda.is_available()
              else "cpu")
    loaded = time.perf_counter()
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs_of(rows))]
    values = lm.loglikelihood(reqs, disable_tqdm=True)
    done = time.perf_counter()
    return {"seconds": done - loaded, "load_s": loaded - started, "values": [v[0] for v in values]}


def run_engine(model: Path, dtype: str, rows, config: str) -> dict:
    import torch

    from batchrun.engines import hf_score
    from batchrun.engines.base import Request, Sampling
    from batchrun.loglikelihood import encode_pair

    profile = config.endswith("+prof")  # the first polls under torch.profiler: where the time goes
    config = config.removesuffix("+prof")
    sizes = {"old": (2048, 32), "default": (None, None)}.get(config) or tuple(int(x) for x in config.split("x"))
    engine = hf_score.HFScoreEngine(str(model), Sampling(max_tokens=1), dtype=dtype, score_batch_tokens=sizes[0],
                                    score_batch_rows=sizes[1])
    reqs = [Request(f"0:{i}", "", None, Sampling(max_tokens=1),
                    pairs=tuple(encode_pair(engine.tok_encode, engine.prefix_token_id, ctx, " " + c) for c in ch))
            for i, (ctx, ch, _) in enumerate(rows)]
    if config == "old":  # the batches before issue 30: input order, the engine's window of 2 x 32 rows
        engine._longest_first = False
    window = 2 * engine.batch_limit
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started, got, pending = time.perf_counter(), {}, list(reqs)
    prof = None
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    polls = 0
    while len(got) < len(reqs):
        while pending and len(engine._queue) < window:
            engine.submit(pending.pop(0))
        got.update({c.request_id: c for c in engine.poll(0.05)})
        polls += 1
        if prof is not None and polls == 6:
            torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
            prof = None
    seconds = time.perf_counter() - started
    engine.close()
    values = [v for i in range(len(reqs)) for v in got[f"0:{i}"].pair_logprobs]
    return {"seconds": seconds, "values": values, "batch": [engine.batch_tokens, engine.batch_rows]}


def write_job(model: Path, dtype: str, rows, work: Path, workers: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    pq.write_table(pa.table({"id": list(range(len(rows))), "q": [r[0] for r in rows],
                             "choices": pa.array([r[1] for r in rows], pa.list_(pa.string())),
                             "answer": [r[2] for r in rows]}), work / "in.parquet")
    job = {"engine": {"name": "hf", "model": str(model), "dtype": dtype},
           "input": {"path": str(work / "in.parquet"), "id_column": "id", "prompt_column": "q"},
           "score": {"method": "loglikelihood", "choices_column": "choices", "reference_column": "answer"},
           "output": {"dir": str(work / "out")}, "resources": {"num_workers": workers, "gpus_per_worker": 1},
           "shards": {"rows_per_shard": 250}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    return work / "job.yaml"


def run_batchrun(model: Path, dtype: str, rows, workers: int) -> dict:
    import pyarrow.dataset as ds

    work = Path(tempfile.mkdtemp(prefix="batchrun-score-"))
    job = write_job(model, dtype, rows, work, workers)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batchrun.cli", "run", str(job), "--no-progress"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads((work / "out" / "_summary.json").read_text())
    out = {r["id"]: r["choice_logprobs"] for r in ds.dataset(str(work / "out"), format="parquet").to_table(
        columns=["id", "choice_logprobs"]).to_pylist()}
    window = max(summary["worker_engine_window_s"].values())
    return {"seconds": window, "wall_s": wall, "values": [v for i in range(len(rows)) for v in out[i]],
            "startup": summary.get("startup")}


def run_lmeval_process(model: Path, dtype: str, args) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--model", str(model), "--dtype", dtype, "--workload",
                           args.workload, "--rows", str(args.rows), "--runs", "lmeval", "--lmeval-batch",
                           str(args.lmeval_batch)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {"wall_s": time.perf_counter() - started}


def diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) if a and b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", help="llama-1b | demo | a model dir")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workload", default="mc", choices=["mc", "mmlu"])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--runs", default="lmeval,engine,batchrun")
    ap.add_argument("--engine-configs", default="old,default")
    ap.add_argument("--lmeval-batch", default="64")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    from hf_engine import make_model

    model = make_model(args.model, Path(tempfile.gettempdir()) / f"batchrun-{args.model}", args.dtype) \
        if args.model in ("llama-1b", "demo", "llama-tiny") else Path(args.model)
    rows = workload(args.workload, args.rows)
    results: dict[str, dict] = {}
    for run in args.runs.split(","):
        if run == "lmeval":
            for batch in args.lmeval_batch.split(","):
                results[f"lmeval-b{batch}"] = run_lmeval(model, args.dtype, rows, int(batch) if batch.isdigit()
                                                         else batch)
        elif run == "engine":
            for cfg in args.engine_configs.split(","):
                results[f"engine-{cfg}"] = run_engine(model, args.dtype, rows, cfg)
        elif run == "batchrun":
            results[f"batchrun-w{args.workers}"] = run_batchrun(model, args.dtype, rows, args.workers)
        elif run == "lmeval-proc":
            results["lmeval-proc"] = run_lmeval_process(model, args.dtype, args)
        for name, r in results.items():
            if name.startswith(run.split("-")[0]) and "printed" not in r:
                r["printed"] = True
                print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                             if k not in ("values", "printed")}, flush=True)
    ref = next((r["values"] for n, r in results.items() if n.startswith("lmeval-") and "values" in r), None)
    base = next((r["seconds"] for n, r in results.items() if n.startswith("lmeval-") and "seconds" in r), None)
    print(f"\n{args.workload}: {args.rows} rows, {len(pairs_of(rows))} pairs, {args.model} {args.dtype}")
    print(f"{'run':<22}{'seconds':>10}{'wall_s':>10}{'vs lm-eval':>12}{'max |diff|':>12}")
    for name, r in results.items():
        secs, vals = r.get("seconds"), r.get("values")
        ratio = round(base / secs, 2) if base and secs else "-"
        d = f"{diff(ref, vals):.2e}" if ref and vals else "-"
        print(f"{name:<22}{'-' if secs is None else round(secs, 2)!s:>10}{round(r.get('wall_s') or 0, 2):>10}"
              f"{ratio!s:>12}{d:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "values"}
                                               for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
