"""Shared-prefix labelling jobs (issue 14): prefix reuse kept through batchrun, and prefix-aware scheduling.

    python bench/prefix.py --workloads rubrics,prefixes [--n 1024] [--json OUT]

Workloads (random-init 1.1B Llama in bf16, character tokenizer: k characters = k tokens; no EOS, so every row runs
its budget of 8-64 tokens):
- rubrics: 4 rubrics of 1,500 tokens + a 30-80-token item, interleaved row by row;
- prefixes: 256 distinct 1,000-token prefixes x 4 rows each, shuffled;
- documents: n/8 documents of --doc-tokens tokens x 8 questions of 30-80 tokens, shuffled (issue 24: siblings far
  further apart than any window; the engine's KV cache is capped with --kv-tokens so that, as at 20,000 documents,
  the documents do not all stay cached).
Runs, side by side in one process on one GPU:
- engine alone (transformers' CB manager, batchrun's GPU defaults: varlen attention, CUDA graphs, 32k batch tokens),
  every prompt submitted at once in input order, block sharing off and on;
- `batchrun run` as a user runs it (a job file with nothing tuned: reuse on, engine.prefix_schedule auto), and the
  same job with prefix_schedule off (input order), with reuse off (allow_block_sharing false, schedule off), and with
  shards.group_prefixes on (run "grouped": the input sorted by prompt prefix before the plan is cut).
Time: the engine window (first submit to last completion); prompt tokens computed vs served from shared blocks.
Targets: rubrics, batchrun defaults >= 1.8x its own reuse-off run; prefixes, defaults >= 1.5x input order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GPU_DEFAULTS = {"attn_implementation": "varlen", "use_cuda_graph": True, "max_batch_tokens": 32768,
                "max_memory_percent": 0.75}  # batchrun's own GPU defaults (hf_backend.cuda_cb_defaults)
ALPHABET = "0123456789+-= abcdefghijklmnopqrstuvwxyz"


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def make_workload(kind: str, n: int, seed: int = 0, doc_tokens: int = 1000) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    if kind == "documents":
        docs = [text(rng, doc_tokens) for _ in range(n // 8)]
        prompts = [d + text(rng, rng.randint(30, 80)) for d in docs for _ in range(8)]
        rng.shuffle(prompts)
    elif kind == "rubrics":
        rubrics = [text(rng, 1500) for _ in range(4)]
        prompts = [rubrics[i % 4] + text(rng, rng.randint(30, 80)) for i in range(n)]
    else:
        prefixes = [text(rng, 1000) for _ in range(n // 4)]
        prompts = [p + text(rng, rng.randint(30, 80)) for p in prefixes for _ in range(4)]
        rng.shuffle(prompts)
    return prompts, [rng.randint(8, 64) for _ in range(n)]


def bare(model_path: Path, prompts: list[str], budgets: list[int], sharing: bool, profile: bool = False) -> dict:
    from hf_engine import free_gpu, load, profile_bare, run_bare

    tok, model = load(model_path, "bfloat16", "cuda")
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    r = (profile_bare if profile else run_bare)(model, ids, budgets, {**GPU_DEFAULTS, "allow_block_sharing": sharing})
    del model
    free_gpu()
    keep = ("gpu_busy_s", "gpu_busy_frac", "attention_frac", "top_kernels")
    return {"seconds": round(r["seconds"], 2), "tok_s": round(r["tok_s"]), "prompt_tokens": sum(map(len, ids)),
            **{k: r[k] for k in keep if k in r}}


def batchrun_job(model_path: Path, prompts, budgets, variant: str, kv_tokens: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from defaults import run

    work = Path(tempfile.mkdtemp(prefix=f"prefix-{variant}-"))
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts, "budget": budgets}),
                   work / "in.parquet")
    engine = {"name": "hf", "model": str(model_path), "dtype": "bfloat16"}  # nothing tuned
    if kv_tokens:  # the KV cache capped (pages of 256 tokens), as a job much larger than the cache sees it
        engine["options"] = {"num_blocks": kv_tokens // 256, "page_size": 256}
    shards = {"group_prefixes": True} if variant == "grouped" else {}
    if variant == "input-order":
        engine["prefix_schedule"] = "off"
    elif variant == "reuse-off":
        engine.update(prefix_schedule="off", options={**engine.get("options", {}), "allow_block_sharing": False})
    job = {"engine": engine, "input": {"path": str(work / "in.parquet"), "id_column": "id"},
           "sampling": {"max_tokens": 64, "per_row": {"max_tokens": "budget"}}, "output": {"dir": str(work / "out")},
           "resources": {"num_workers": 1, "gpus_per_worker": 1}, "shards": shards}
    r = run(job, work)
    if "error" not in r:
        s = json.loads((work / "out" / "_summary.json").read_text())
        r.update(seconds=r["engine_window_s"], prefix_reuse=s["prefix_reuse"], prompt_tokens=s["prompt_tokens"],
                 cost=s["cost"]["this_run"], grouped_input=s.get("grouped_input"))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="rubrics,prefixes")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--runs", default="bare-off,bare-on,defaults,input-order,reuse-off")
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--kv-tokens", type=int, default=0, help="documents: cap the engine's KV cache (tokens)")
    args = ap.parse_args()
    from hf_engine import make_model

    model = make_model(args.model, Path(f"/tmp/batchrun-{args.model}"), "bfloat16")
    results: dict = {}
    for kind in args.workloads.split(","):
        prompts, budgets = make_workload(kind, args.n, doc_tokens=args.doc_tokens)
        for run in args.runs.split(","):
            t0 = time.perf_counter()
            if run.startswith("bare"):  # bare-off, bare-on, bare-on-profile (torch.profiler: where GPU time goes)
                r = bare(model, prompts, budgets, sharing=run.startswith("bare-on"), profile=run.endswith("profile"))
            else:
                r = batchrun_job(model, prompts, budgets, run, args.kv_tokens if kind == "documents" else 0)
            r["call_s"] = round(time.perf_counter() - t0, 1)
            results[(kind, run)] = r
            print(kind, run, json.dumps(r, default=str), flush=True)
    print("\n| workload | run | engine window s | whole command s | prompt tokens computed / cached | vs reuse-off | "
          "vs input order | vs defaults |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (kind, run), r in results.items():
        if "error" in r:
            print(f"| {kind} | {run} | failed: {r['error'][-120:]!r} | | | | | |")
            continue
        pr = r.get("prefix_reuse")
        tokens = f"{pr['prompt_tokens_computed']:,} / {pr['prompt_tokens_cached']:,}" if pr else "(engine alone)"
        ratios = []
        for base in ("reuse-off", "input-order", "defaults"):
            b = results.get((kind, base))
            ratios.append(f"{b['seconds'] / r['seconds']:.2f}x" if b and "error" not in b and not
                          run.startswith("bare") else "")
        print(f"| {kind} | {run} | {r['seconds']} | {r.get('wall_s', '')} | {tokens} | {' | '.join(ratios)} |")
    for kind in args.workloads.split(","):
        off, on = results.get((kind, "bare-off")), results.get((kind, "bare-on"))
        if off and on:
            print(f"engine alone, {kind}: reuse on {off['seconds'] / on['seconds']:.2f}x reuse off")
        prof = results.get((kind, "bare-on-profile"))
        if prof:
            print(f"profile, {kind}, engine alone with reuse: GPU busy {prof['gpu_busy_s']:.1f} s of "
                  f"{prof['seconds']:.1f} s ({prof['gpu_busy_frac']:.0%}), attention {prof['attention_frac']:.0%}")
            for k in prof["top_kernels"][:8]:
                print(f"  {k['s']:8.3f} s {k['calls']:7d} calls  {k['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k}|{r}": v for (k, r), v in results.items()}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
