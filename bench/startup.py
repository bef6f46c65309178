"""Whole process, shell to shell: `batchrun run` (defaults; a local cluster it starts, and, with --running-cluster,
also submitted to a Ray cluster started beforehand, as `ray job submit` jobs are on a GPU cluster) against the same
work written by hand with transformers (import, load, continuous batching with batchrun's engine settings, write
Parquet), interleaved, side by side in one call. Then, on the same model, the scoring engine (score.method
loglikelihood) on the device against a plain full-sequence computation of the same log-likelihoods.

    python bench/startup.py --model llama-1b --dtype bfloat16 --n 512 --repeats 2 --json out.json

The job: n prompts of 64-512 tokens, budgets 16-512 (bench/hf_engine.py's workload and random-init models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HAND = r"""
import sys, time
import torch, pyarrow as pa, pyarrow.parquet as pq
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from batchrun.engines.hf_attention import apply_attention
from batchrun.engines.hf_backend import cuda_cb_defaults
model_dir, data, out, dtype = sys.argv[1:5]
rows = pq.read_table(data).to_pylist()
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map="cuda").eval()
opts = cuda_cb_defaults(torch.cuda.mem_get_info()[0])
apply_attention(model, "auto")  # batchrun's engine settings: the comparison is the runner, not the configuration
eos = model.generation_config.eos_token_id
gen = GenerationConfig(do_sample=False, max_new_tokens=max(r["budget"] for r in rows),
                       eos_token_id=-1 if eos is None else eos, pad_token_id=0)
manager = model.init_continuous_batching(generation_config=gen,
                                         continuous_batching_config=ContinuousBatchingConfig(**opts))
manager.start()
for r, i in zip(rows, ids):
    manager.add_request(input_ids=i, request_id=str(r["id"]), max_new_tokens=r["budget"])
done = {}
while len(done) < len(rows):
    res = manager.get_result(timeout=1.0)
    if res is not None and res.is_finished():
        done[res.request_id] = tok.decode(res.generated_tokens, skip_special_tokens=True)
manager.stop(block=True)
pq.write_table(pa.table({"id": [int(k) for k in done], "generated_text": list(done.values())}), out)
"""


def whole(cmd: list[str], env: dict) -> float:
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - started


def scoring_check(model_dir: Path, dtype: str) -> dict:
    """HFScoreEngine on the device: 256 rows of 4 choices, batched and one row at a time, against each (prompt +
    choice) through the model whole."""
    import random

    import torch

    from batchrun.engines.base import Request, Sampling
    from batchrun.engines.hf_score import HFScoreEngine
    from batchrun.loglikelihood import encode_pair

    eng = HFScoreEngine(str(model_dir), Sampling(max_tokens=1), dtype=dtype, device="cuda")
    rng, worst, rows = random.Random(3), 0.0, []
    for _ in range(256):
        ctx = "".join(rng.choice("abcdefgh +=") for _ in range(rng.randint(64, 400)))
        rows.append((ctx, ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))) for _ in range(4)]))

    def score_all():
        for i, (ctx, choices) in enumerate(rows):
            eng.submit(Request(i, ctx, None, Sampling(max_tokens=1), pairs=tuple(
                encode_pair(eng.tok_encode, eng.prefix_token_id, ctx, " " + c) for c in choices)))
        got = []
        while len(got) < len(rows):
            got += eng.poll(1.0)
        return got

    def one_at_a_time():
        for i, (ctx, choices) in enumerate(rows):
            eng.submit(Request(i, ctx, None, Sampling(max_tokens=1), pairs=tuple(
                encode_pair(eng.tok_encode, eng.prefix_token_id, ctx, " " + c) for c in choices)))
            eng.poll(1.0)

    score_all()  # warm: CUDA context, kernels and allocator, out of the timing
    started = time.perf_counter()
    one_at_a_time()  # each row alone: its prompt pass and its choices pass
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    got = score_all()  # all queued: rows batched (engines/hf_score.py BATCH_ROWS)
    shared_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        for c, (ctx, choices) in zip(sorted(got, key=lambda c: c.request_id), rows):
            for j, ch in enumerate(choices):
                a, b = encode_pair(eng.tok_encode, eng.prefix_token_id, ctx, " " + ch)
                ids = torch.tensor([list(a + b)[:-1]], device="cuda")
                logp = eng.model(input_ids=ids).logits[0, -len(b):].float().log_softmax(-1)
                ll = float(logp.gather(-1, torch.tensor(b, device="cuda")[:, None]).sum())
                worst = max(worst, abs(ll - c.pair_logprobs[j]))
    whole_s = time.perf_counter() - started
    eng.close()
    return {"dtype": dtype, "rows": len(rows), "choices": 4, "max_abs_diff": worst, "engine_s": round(shared_s, 3),
            "engine_one_row_at_a_time_s": round(alone_s, 3),
            "one_pass_per_choice_s": round(whole_s, 3)}


def main() -> None:
    from bench.hf_engine import make_model, workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only-scoring", action="store_true", help="skip the whole-process runs")
    ap.add_argument("--running-cluster", action="store_true",
                    help="also time batchrun run on a Ray cluster started before the timing (RAY_ADDRESS)")
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    work = Path(tempfile.mkdtemp(prefix="batchrun-startup-"))
    model = make_model(args.model, Path(f"/tmp/batchrun-{args.model}"), args.dtype)
    if args.only_scoring:  # the shared-prompt path against one pass per choice, in float32 and in the job's dtype
        for dtype in ("float32", args.dtype):
            print("scoring on the device:", json.dumps(scoring_check(model, dtype)))
        return
    prompts, budgets = workload(args.n, (64, 512), (16, 512))
    pq.write_table(pa.table({"id": list(range(args.n)), "prompt": prompts, "budget": budgets}), work / "in.parquet")
    (work / "hand.py").write_text(HAND)
    job = {"engine": {"name": "hf", "model": str(model), "dtype": args.dtype},
           "input": {"path": str(work / "in.parquet"), "id_column": "id"},
           "sampling": {"max_tokens": max(budgets), "per_row": {"max_tokens": "budget"}},
           "output": {"dir": str(work / "out")}, "resources": {"num_workers": 1, "gpus_per_worker": 1}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = {
        "batchrun run": [sys.executable, "-m", "batchrun.cli", "run", str(work / "job.yaml"), "--overwrite",
                         "--no-progress"],
        "hand-written script": [sys.executable, str(work / "hand.py"), str(model), str(work / "in.parquet"),
                                str(work / "hand.parquet"), args.dtype],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    splits = {}

    def interleaved(names: dict[str, str], run_env: dict) -> None:  # timed name -> command name
        for _ in range(args.repeats):
            for name, cmd in names.items():
                times.setdefault(name, []).append(round(whole(runs[cmd], run_env), 2))
                if cmd == "batchrun run":
                    splits[name] = json.loads((work / "out" / "_summary.json").read_text())["startup"]

    interleaved({k: k for k in runs}, env)  # first, with no cluster on the machine: batchrun starts its own
    if args.running_cluster:  # then a cluster up before the timing: each run joins it and leaves it running
        ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
        subprocess.run([*ray_cli, "start", "--head", "--num-gpus", "1", "--include-dashboard", "false",
                        "--disable-usage-stats"], check=True, stdout=subprocess.DEVNULL, env=env)
        try:
            interleaved({"batchrun run, running cluster": "batchrun run",
                         "hand-written script, second round": "hand-written script"},
                        {**env, "RAY_ADDRESS": "auto"})
        finally:
            subprocess.run([*ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = {"startup": splits}
    result = {"times_s": times, "batchrun_startup": summary["startup"],
              "ratio_hand_over_batchrun": {name: round(statistics.median(
                  times["hand-written script" + (", second round" if "running" in name else "")])
                  / statistics.median(t), 3) for name, t in times.items() if name.startswith("batchrun")},
              "scoring": scoring_check(model, args.dtype)}
    print(f"| run ({args.n} prompts, {args.model} {args.dtype}) | whole process, s (each run) | median |")
    print("| --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {t} | {statistics.median(t):.2f} |")
    print(f"hand / batchrun = {result['ratio_hand_over_batchrun']} (>= 0.9 is the goal)")
    for name, split in splits.items():
        print(f"start-up split, {name} (last run):", json.dumps(split)[:700])
    print("scoring on the device:", json.dumps(result["scoring"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
