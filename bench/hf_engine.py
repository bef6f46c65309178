"""HF engine benchmarks, side by side in one run (issue: performance), on CPU or GPU:

  bare      the engine alone: every prompt submitted to one ContinuousBatchingManager in a loop, results collected
  bare-ray  the bare engine inside a Ray task: what running under Ray costs, apart from batchrun's code
  batchrun  the same prompts end to end through batchrun (Parquet in -> Ray worker -> engine -> Parquet out)
  static    the usual approach: padded `model.generate` batches in input order, each batch running to its longest
  tp        the same engine with tensor_parallel_size ranks spawned through batchrun's mpi4py launcher
  workers   batchrun with N workers (one GPU each) against 1 worker

Output lengths vary per row (uniform in --out-len). The random-init llama-1b has no EOS, so every row generates
exactly its budget and tokens/s compare like for like (the demo model stops at its EOS in every run alike).
Prints a table of tokens/s and ratios; --json writes the raw numbers.

  python bench/hf_engine.py --model demo --n 64                        # CPU smoke run on the demo model
  python bench/hf_engine.py --model llama-1b --n 256 --dtype bfloat16  # the GPU benchmark (random-init 1.1B Llama)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Engine settings to compare: ContinuousBatchingConfig fields plus attn_implementation (engines/hf_attention.py).
# "default" is transformers as shipped on a machine without the flash-attn package: SDPA, its own CB choices.
GRAPHS = {"use_cuda_graph": True}
BIG = {"max_batch_tokens": 32768, "max_memory_percent": 0.9}
CONFIGS_BASE = {
    "default": {"attn_implementation": "sdpa"},
    "graphs16k": {"attn_implementation": "sdpa", **GRAPHS, "max_batch_tokens": 16384},
    "graphs32k": {"attn_implementation": "sdpa", **GRAPHS, **BIG},
    "varlen": {"attn_implementation": "varlen"},
    "varlen-graphs": {"attn_implementation": "varlen", **GRAPHS},
    "varlen-graphs16k": {"attn_implementation": "varlen", **GRAPHS, "max_batch_tokens": 16384},
    "varlen-graphs32k": {"attn_implementation": "varlen", **GRAPHS, **BIG},
}
CONFIGS = {
    **CONFIGS_BASE,
    # torch.compile of the forward passes (ContinuousBatchingConfig.default_compile_level: 1-3, longer warm-ups).
    # With varlen (flash-style) attention transformers 5.24 compiles neither path (initialization.py,
    # resolve_compile_configs: no varlen compile for flash attention; the decode fast path needs
    # flash_attn_with_kvcache)
    **{f"{base}-c{level}": {**CONFIGS_BASE[base], "default_compile_level": level}
       for base in ("graphs32k", "varlen-graphs32k") for level in (1, 2, 3)},
}


def make_model(kind: str, path: Path, dtype: str) -> Path:
    from batchrun.demo import build_model, build_tokenizer

    if kind == "demo":
        return build_model(ROOT / "build" / "demo-model", quiet=True)
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama-tiny":  # a CPU stand-in with the 1B's shape of work (no EOS: every row runs its budget)
        cfg = LlamaConfig(vocab_size=len(build_tokenizer()), hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048)
    elif kind == "mistral-7b":  # Mistral-7B's shape (GQA 32/8 heads, 14336 MLP), random weights
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)  # character-level: a prompt of k characters is k tokens
    return path


def workload(n: int, prompt_len: tuple[int, int], out_len: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    alphabet = "0123456789+-= abcdefghijklmnopqrstuvwxyz"
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(*prompt_len))) for _ in range(n)]
    budgets = [rng.randint(*out_len) for _ in range(n)]
    return prompts, budgets


def no_eos_generation_config(model, budget_default: int):
    from transformers import GenerationConfig

    # The model's own EOS, as batchrun uses it. The random-init llama-1b has none (-1: never stops early), so each row
    # generates exactly its budget there.
    eos = model.generation_config.eos_token_id
    return GenerationConfig(do_sample=False, max_new_tokens=budget_default, eos_token_id=-1 if eos is None else eos,
                            pad_token_id=0)


def load(model_path: Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    return tok, model


def run_bare(model, ids, budgets, options: dict, keep_gpu_cache: bool = False) -> dict:
    """The engine driven directly: all prompts submitted to one manager in a loop, outputs only collected."""
    import torch
    from transformers.generation import ContinuousBatchingConfig

    from batchrun.engines.hf_attention import apply_attention
    from batchrun.engines.hf_backend import CPU_CB_DEFAULTS, kv_cache_tokens, warm_up

    cb = dict(options)
    if model.device.type == "cpu":
        cb = {**CPU_CB_DEFAULTS, **cb}  # the same paged cache batchrun's engine gets on a CPU
    apply_attention(model, cb.pop("attn_implementation", "auto"))  # as batchrun's engine chooses it
    manager = model.init_continuous_batching(generation_config=no_eos_generation_config(model, max(budgets)),
                                             continuous_batching_config=ContinuousBatchingConfig(**cb))
    manager.start()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    warm_up(manager, 1)  # the same warm-up a batchrun worker's engine runs at start
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, (x, b) in enumerate(zip(ids, budgets)):
        manager.add_request(input_ids=x, request_id=f"r{i}", max_new_tokens=b)
    done, tokens = 0, 0
    while done < len(ids):
        r = manager.get_result(timeout=60)
        if r is None:
            raise RuntimeError("bare engine stalled")
        if r.is_finished():
            done += 1
            gen = r.generated_tokens
            tokens += len(gen) - (bool(gen) and gen[-1] in eos)  # batchrun counts tokens without the EOS
    elapsed = time.perf_counter() - t0
    kv = kv_cache_tokens(manager)
    manager.stop(block=True)
    manager.destroy()
    del manager
    if not keep_gpu_cache:
        free_gpu()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "kv_cache_tokens": kv}


def free_gpu() -> None:
    """Hand this process's cached GPU memory back. transformers sizes a manager's KV cache from the memory free on
    the device when it starts, so memory a finished run left in this process's caching allocator would shrink the
    next engine's cache, most of all a batchrun worker's, which lives in another process."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_bare(model, ids, budgets, options: dict, top: int = 12) -> dict:
    """The bare engine under torch.profiler: where device time goes, and how busy the GPU is over the run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run_bare(model, ids, budgets, options)
    kernels = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    kernels.sort(key=lambda x: -x[1])
    busy = sum(t for _, t, _ in kernels)
    words = ("flash", "fmha", "attention", "efficient")
    attn = sum(t for name, t, _ in kernels if any(w in name.lower() for w in words))
    r.update(gpu_busy_s=busy, gpu_busy_frac=busy / r["seconds"], attention_frac=attn / max(busy, 1e-9),
             top_kernels=[{"name": n[:90], "s": round(t, 3), "calls": c} for n, t, c in kernels[:top]])
    return r


def run_static(model, ids, budgets, batch: int) -> dict:
    """Padded static batches in input order; each batch runs until its longest budget (the usual generate loop)."""
    import torch

    from batchrun.engines.hf_attention import apply_attention

    apply_attention(model, "sdpa")  # padded batches with a mask: the usual generate path
    gen = no_eos_generation_config(model, max(budgets))
    t0 = time.perf_counter()
    useful = 0
    for start in range(0, len(ids), batch):
        chunk, bud = ids[start:start + batch], budgets[start:start + batch]
        width = max(map(len, chunk))
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, seq in enumerate(chunk):  # left padding, as decoder-only batch generation needs
            x[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        with torch.no_grad():
            model.generate(input_ids=x.to(model.device), attention_mask=mask.to(model.device),
                           max_new_tokens=max(bud), generation_config=gen)
        useful += sum(bud)  # tokens past a row's own budget are wasted work, not output
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"tokens": useful, "seconds": elapsed, "tok_s": useful / elapsed}


def run_bare_in_ray(model_path, ids, budgets, options: dict, dtype: str, gpus: float) -> dict:
    """The bare engine, but inside a Ray actor process like a batchrun worker's (same niceness, threads, neighbours):
    batchrun vs this is the cost of batchrun's own code; this vs bare is the cost of running under Ray at all."""
    import ray

    from batchrun.process import set_niceness

    def task(model_path, ids, budgets, options, dtype):
        import torch

        set_niceness(0)  # as a batchrun worker with the default resources.niceness
        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)  # as the bench's batchrun worker (cpus_per_worker)
        _, model = load(Path(model_path), dtype, "cuda" if torch.cuda.is_available() else "cpu")
        return run_bare(model, ids, budgets, options)

    cpus = 1 if gpus else (os.cpu_count() or 1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(task)
        return ray.get(remote.remote(str(model_path), ids, budgets, options, dtype))
    finally:
        if started:
            ray.shutdown()


def run_tp(model_path, ids, budgets, tp: int, dtype: str, options: dict) -> dict:
    """batchrun's HF engine in this process; tp > 1 spawns the ranks through the mpi4py launcher."""
    from batchrun.bench import drive
    from batchrun.engines.base import Request, Sampling
    from batchrun.engines.hf import HFEngine

    engine = HFEngine(str(model_path), Sampling(max_tokens=max(budgets)), dtype=dtype, tensor_parallel_size=tp,
                      **options)
    try:  # every prompt submitted at once, as the bare run does
        requests = [Request(f"0:{i}", "", x, Sampling(max_tokens=b)) for i, (x, b) in enumerate(zip(ids, budgets))]
        tokens, elapsed, _ = drive(engine, requests, window=len(requests))
    finally:
        engine.close()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def run_batchrun(model_path, prompts, budgets, dtype, options, workers: int, gpus: float, window: int,
                 rows_per_shard: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec

    work = Path(tempfile.mkdtemp(prefix="batchrun-bench-"))
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts, "budget": budgets}),
                   work / "in.parquet")
    spec = validate_spec({
        "engine": {"name": "hf", "model": str(model_path), "dtype": dtype, "max_in_flight": window,
                   "options": dict(options)},
        "input": {"path": str(work / "in.parquet"), "id_column": "id"},
        "sampling": {"max_tokens": max(budgets), "per_row": {"max_tokens": "budget"}},
        "output": {"dir": str(work / "out")},
        # on a CPU the worker gets the threads the bare engine gets (Ray would otherwise give it one)
        "resources": {"num_workers": workers, "gpus_per_worker": gpus,
                      "cpus_per_worker": 1 if gpus else (os.cpu_count() or 1)},
        "shards": {"rows_per_shard": rows_per_shard},
    })
    t0 = time.perf_counter()
    s = JobRunner(spec, show_progress=False).run().summary
    wall = time.perf_counter() - t0
    windows = s["worker_engine_window_s"].values()
    engine_window = max(windows) if windows else wall
    tokens = s["generated_tokens"]
    return {"tokens": tokens, "seconds": engine_window, "tok_s": tokens / engine_window,
            "wall_s": wall, "tok_s_wall": tokens / wall, "workers": len(s["workers"]),
            "kv_cache_tokens": list(s["worker_kv_cache_tokens"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo | llama-1b | mistral-7b | llama-tiny (CPU) | a model dir")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(4, 60))
    ap.add_argument("--out-len", type=int, nargs=2, default=(4, 60))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--static-batch", type=int, default=64)
    ap.add_argument("--configs", default="default", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--runs", default="bare,batchrun,static",
                    help="comma list of bare,bare-ray,batchrun,static,tp,workers")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=int, default=None,
                    help="batchrun's max_in_flight (default: --n, every prompt in flight as in the bare run)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate bare/batchrun runs this many times; report medians")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--batchrun-configs", default=None, help="configs to run batchrun with (default: all of --configs)")
    ap.add_argument("--profile", default="",
                    help="comma list of configs to profile (bare engine, first --profile-n prompts)")
    ap.add_argument("--profile-n", type=int, default=96)
    ap.add_argument("--keep-gpu-cache", action="store_true",
                    help="leave the bare run's cached GPU memory in this process (how sessions 1-3 measured batchrun)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.window = args.window or args.n

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = 1 if device == "cuda" else 0
    path = make_model(args.model, Path(tempfile.gettempdir()) / f"batchrun-{args.model}", args.dtype) \
        if args.model in ("demo", "llama-1b", "mistral-7b", "llama-tiny") else Path(args.model)
    prompts, budgets = workload(args.n, tuple(args.prompt_len), tuple(args.out_len))
    tok, model = load(path, args.dtype, device)
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    runs = args.runs.split(",")
    results: dict[str, dict] = {}
    repeats: dict[str, list] = {}
    for rep in range(args.repeat):  # bare and batchrun alternate, so drift on a shared machine hits both alike
        for name in args.configs.split(","):
            opts = CONFIGS[name] if device == "cuda" else {}
            if "bare" in runs:
                try:
                    result = run_bare(model, ids, budgets, opts, args.keep_gpu_cache)
                except Exception as e:  # a config this machine cannot run (e.g. a compile level) must not end the rest
                    print("bare", name, rep, "FAILED", repr(e)[:500], flush=True)
                    free_gpu()
                    continue
                repeats.setdefault(f"bare[{name}]", []).append(result)
                print("bare", name, rep, result, flush=True)
            if "bare-ray" in runs:
                r = repeats.setdefault(f"bare in Ray[{name}]", [])
                r.append(run_bare_in_ray(path, ids, budgets, opts, args.dtype, gpus))
                print("bare-ray", name, rep, r[-1], flush=True)
            if "batchrun" in runs and name in (args.batchrun_configs or args.configs).split(","):
                r = repeats.setdefault(f"batchrun[{name}]", [])
                r.append(run_batchrun(path, prompts, budgets, args.dtype, opts, 1, gpus, args.window,
                                      args.rows_per_shard))
                print("batchrun", name, rep, r[-1], flush=True)
    for key, runs_of in repeats.items():  # the median run by tok/s, with every run's tok/s beside it
        results[key] = dict(sorted(runs_of, key=lambda r: r["tok_s"])[len(runs_of) // 2],
                            all_tok_s=[round(r["tok_s"], 1) for r in runs_of])
    best = args.configs.split(",")[-1]
    opts = CONFIGS[best] if device == "cuda" else {}
    profiles = {}
    for name in filter(None, args.profile.split(",")):
        n = args.profile_n
        profiles[name] = profile_bare(model, ids[:n], budgets[:n], CONFIGS[name] if device == "cuda" else {})
        print("profile", name, json.dumps(profiles[name]), flush=True)
    if "static" in runs:
        results[f"static[batch {args.static_batch}]"] = run_static(model, ids, budgets, args.static_batch)
        print("static", results[f"static[batch {args.static_batch}]"], flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if "tp" in runs:
        for tp in (1, args.tp):
            results[f"engine tp={tp}[{best}]"] = run_tp(path, ids, budgets, tp, args.dtype, opts)
            print("tp", tp, results[f"engine tp={tp}[{best}]"], flush=True)
    if "workers" in runs:
        for w in (1, args.workers):
            results[f"batchrun {w} workers[{best}]"] = run_batchrun(path, prompts, budgets, args.dtype, opts, w,
                                                                    gpus, args.window, args.rows_per_shard)
            print("workers", w, results[f"batchrun {w} workers[{best}]"], flush=True)

    base = results.get("bare[default]") or next(iter(results.values()))
    print(f"\n{device} {torch.cuda.get_device_name() if device == 'cuda' else ''} model={args.model} n={args.n} "
          f"prompt_len={tuple(args.prompt_len)} out_len={tuple(args.out_len)} dtype={args.dtype}")
    print(f"{'run':<34} {'tokens':>9} {'seconds':>8} {'tok/s':>9} {'x first':>8}")
    for name, r in results.items():
        print(f"{name:<34} {r['tokens']:>9} {r['seconds']:>8.2f} {r['tok_s']:>9.1f} {r['tok_s'] / base['tok_s']:>8.2f}")
    for name, p in profiles.items():
        print(f"profile {name} (bare, {args.profile_n} prompts): {p['tok_s']:.0f} tok/s under the profiler, GPU busy "
              f"{p['gpu_busy_frac']:.0%} of the wall, attention kernels {p['attention_frac']:.0%} of GPU time")
        for k in p["top_kernels"][:6]:
            print(f"    {k['s']:>8.3f} s {k['calls']:>7} calls  {k['name']}")
    pairs = [(f"batchrun[{c}]", f"bare[{c}]") for c in args.configs.split(",")]
    pairs += [(f"batchrun[{c}]", f"bare in Ray[{c}]") for c in args.configs.split(",")]
    pairs += [(f"bare in Ray[{c}]", f"bare[{c}]") for c in args.configs.split(",")]
    pairs += [(f"batchrun[{best}]", f"static[batch {args.static_batch}]"), (f"bare[{best}]", "bare[default]"),
              (f"engine tp={args.tp}[{best}]", f"engine tp=1[{best}]"),
              (f"batchrun {args.workers} workers[{best}]", f"batchrun 1 workers[{best}]")]
    for a, b in pairs:
        if a in results and b in results and a != b:
            print(f"ratio {a} / {b} = {results[a]['tok_s'] / results[b]['tok_s']:.3f}")
            if a in repeats and b in repeats and args.repeat > 1:
                each = [x["tok_s"] / y["tok_s"] for x, y in zip(repeats[a], repeats[b])]
                print(f"    per repeat: {', '.join(f'{r:.3f}' for r in each)}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
