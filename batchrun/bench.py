"""`batchrun bench --engines hf,trtllm`: the seed article's "inference speed comparison", on this machine.

Each engine installed here runs the same prompts (the demo arithmetic set, repeated to --n, or a Parquet file's
prompt column) through batchrun's engine adapter directly, no Ray: the adapters are what a worker drives, so this
compares engines, not the runner. An engine that is not installed is listed as such and skipped.

Per engine: generated tokens/s, requests/s, time to the first finished request, and peak GPU memory in use during
the run (device-wide, sampled every 50 ms: TensorRT-LLM allocates outside torch's allocator), or the process's peak
RSS on a CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from dataclasses import asdict, dataclass

from batchrun.engines import create_engine
from batchrun.engines.base import Request, Sampling, choose_window
from batchrun.memory import peak_rss_mb
from batchrun.spec import EngineSpec, SamplingSpec

ENGINE_MODULES = {"hf": "transformers", "trtllm": "tensorrt_llm"}


@dataclass
class EngineResult:
    engine: str
    status: str  # ok | not installed | failed: ...
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    tok_s: float = 0.0
    req_s: float = 0.0
    first_output_s: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""


class _GpuMemoryPeak:
    """Device-wide memory in use (total - free), sampled in a thread: captures allocations outside torch too."""

    def __init__(self):
        import torch

        self.torch, self.peak, self._stop = torch, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join(1)
        return self.peak / 2**20


def installed(engine: str) -> bool:
    return importlib.util.find_spec(ENGINE_MODULES[engine]) is not None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def drive(engine, requests: list[Request], window: int | None = None) -> tuple[int, float, float]:
    """Keep up to `window` (default: the engine's own window, as a worker sizes it) requests submitted until all
    finish, as a worker
    does. Returns (generated tokens, seconds, seconds to the first finished request)."""
    if not window:
        sizes = [len(r.prompt_token_ids or r.prompt.split()) + r.sampling.max_tokens for r in requests]
        window = choose_window("auto", engine, sum(sizes) / max(len(sizes), 1))[0]
    pending = list(reversed(requests))
    done = tokens = in_flight = 0
    first = None
    t0 = time.perf_counter()
    while done < len(requests):
        while pending and in_flight < window:
            engine.submit(pending.pop())
            in_flight += 1
        out = engine.poll(0.05)
        if out and first is None:
            first = time.perf_counter() - t0
        done += len(out)
        in_flight -= len(out)
        tokens += sum(c.num_generated_tokens for c in out)
    seconds = time.perf_counter() - t0
    return tokens, seconds, first if first is not None else seconds


def run_engine(name: str, model: str, prompts: list[str], max_tokens: int, dtype: str, max_in_flight: int,
               options: dict) -> EngineResult:
    if not installed(name):
        return EngineResult(name, "not installed")
    gpu = _GpuMemoryPeak() if cuda_available() else None
    try:
        engine = create_engine(EngineSpec(name=name, model=model, dtype=dtype, options=options.get(name, {})),
                               SamplingSpec(max_tokens=max_tokens))
    except Exception as e:  # a broken install or an unsupported model: report it, compare the rest
        if gpu:
            gpu.stop()
        return EngineResult(name, f"failed: {type(e).__name__}: {e}"[:200])
    try:
        ids = engine.encode(prompts) or [None] * len(prompts)
        sampling = Sampling(max_tokens=max_tokens)
        requests = [Request(f"0:{i}", p, ids[i], sampling) for i, p in enumerate(prompts)]
        tokens, seconds, first = drive(engine, requests, max_in_flight)
    finally:
        engine.close()
    if gpu:
        peak, kind = gpu.stop(), "GPU (device-wide)"
    else:
        peak, kind = peak_rss_mb(), "process peak RSS (no GPU)"
    return EngineResult(name, "ok", len(prompts), tokens, seconds, tokens / seconds, len(prompts) / seconds,
                        first, peak, kind)


def load_prompts(path: str | None, n: int) -> list[str]:
    if path:
        import pyarrow.parquet as pq

        column = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    else:
        import random

        from batchrun.demo import arithmetic_examples

        column = [p for p, _ in arithmetic_examples(random.Random(0), n)]
    return [column[i % len(column)] for i in range(n)]


def table(results: list[EngineResult]) -> str:
    lines = ["| engine | status | requests | tokens | tokens/s | requests/s | first output (s) | peak memory (MB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.engine} | {r.status} | | | | | | |")
            continue
        lines.append(f"| {r.engine} | ok | {r.requests} | {r.tokens} | {r.tok_s:,.1f} | {r.req_s:,.2f} | "
                     f"{r.first_output_s:.3f} | {r.peak_memory_mb:,.0f} ({r.memory_kind}) |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINE_MODULES]
    if unknown:
        from batchrun.errors import SpecError

        raise SpecError(f"--engines: {unknown} not among {list(ENGINE_MODULES)}")
    prompts = load_prompts(args.prompts, args.n)
    options = json.loads(args.options) if args.options else {}
    results = [run_engine(e, args.model, prompts, args.max_tokens, args.dtype, args.max_in_flight, options)
               for e in engines]
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    return 0 if any(r.status == "ok" for r in results) else 1


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="compare the installed engines on the same model and prompts")
    b.add_argument("--engines", default="hf,trtllm", help="comma list of hf, trtllm (those not installed are skipped)")
    b.add_argument("--model", default="build/demo-model", help="a local HF model dir")
    b.add_argument("--prompts", default=None, help="a Parquet file with a prompt column (default: the demo set)")
    b.add_argument("--n", type=int, default=256, help="requests per engine")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    b.add_argument("--max-in-flight", type=int, default=256)
    b.add_argument("--options", default=None,
                   help='JSON of engine options per engine, e.g. {"hf": {"use_cuda_graph": true}}')
    b.add_argument("--json", default=None, help="write the results as JSON here")
