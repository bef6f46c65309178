"""TensorRT-LLM through its LLM API (tensorrt_llm >= 1.0): the production engine.

Facts this adapter relies on, from NVIDIA/TensorRT-LLM:
- `tensorrt_llm.LLM` is the PyTorch backend; `tensorrt_llm._tensorrt_engine.LLM` builds or loads TensorRT engines
  and takes `build_config=BuildConfig(...)` and `quant_config=QuantConfig(...)` (llmapi/llm.py, llmapi/llm_args.py).
- `LLM.generate_async(inputs, sampling_params)` returns a RequestOutput at once; `await output.aresult()` finishes
  it. Inputs may be token ids (a list of ints) (llmapi/llm.py; examples/llm-api/llm_inference_async.py).
- CompletionOutput has `text`, `token_ids`, `logprobs`, `finish_reason` in {'stop', 'length', 'timeout',
  'cancelled'}; RequestOutput has `prompt_token_ids` and `outputs` (executor/result.py).
- SamplingParams takes max_tokens, temperature, top_p, top_k, seed, stop, n, logprobs, include_stop_str_in_output
  (sampling_params.py).
- With tensor_parallel_size > 1 the LLM spawns its ranks through mpi4py's MPIPoolExecutor (llmapi/mpi_session.py,
  MpiPoolSession); engines/mpi.py prepares that spawn inside the Ray actor.
- QuantAlgo names and the KV cache algorithms FP8 / INT8 / NVFP4 (quantization/mode.py, KV_CACHE_QUANT_ALGO_LIST).
- `KvCacheConfig(free_gpu_memory_fraction=..., enable_block_reuse=..., dtype=...)`: the PyTorch backend takes the KV
  cache dtype here, the TensorRT backend through `QuantConfig.kv_cache_quant_algo` (llmapi/llm_args.py).
- Guided decoding: `SamplingParams(guided_decoding=GuidedDecodingParams(json=... | regex=... | json_object=True))`,
  one guide per request, no `choice` field (sampling_params.py); it needs `LLM(guided_decoding_backend="xgrammar")`
  (llm_args.py: Optional[Literal["xgrammar", "llguidance"]], default None: no backend enforces the guide).
- `SamplingParams(logprobs=k)`: CompletionOutput.logprobs is one {token_id: Logprob} dict per generated token, the k
  likeliest plus the sampled one (executor/result.py TokenLogprobs); `seed` seeds that request alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batchrun.engines.base import Completion, Engine, Request, Sampling, apply_stop
from batchrun.engines.mpi import actor_gpu_ids, mpi_environment
from batchrun.spec import ParseSpec, model_files

QUANT_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "NVFP4", "NO_QUANT",
)
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")


class Quantization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    algo: Literal[QUANT_ALGOS] | None = None  # weights/activations: W8A8_SQ_PER_CHANNEL (SmoothQuant), W4A16_AWQ, FP8...
    kv_cache: Literal[KV_CACHE_QUANT_ALGOS] | None = None  # INT8 / FP8 KV cache


class KvCache(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    enable_block_reuse: bool = True


class TRTLLMOptions(BaseModel):
    """engine.options for engine trtllm. Validated here so a typo fails before any GPU is touched."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["pytorch", "tensorrt"] = "pytorch"
    pipeline_parallel_size: int = Field(1, ge=1)
    quantization: Quantization = Field(default_factory=Quantization)
    kv_cache: KvCache = Field(default_factory=KvCache)
    max_batch_size: int | None = Field(None, ge=1)
    max_num_tokens: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool = False
    engine_cache: str | None = None  # tensorrt backend: where `batchrun build` keeps engines, keyed by fingerprint


# ---------------------------------------------------------------- translation (pure: testable with the double)


def guided_decoding(guide: ParseSpec | None):
    """output.parse with guided: true -> GuidedDecodingParams (choices become an alternation regex)."""
    if guide is None:
        return None
    from tensorrt_llm.sampling_params import GuidedDecodingParams

    if guide.kind == "choice":
        return GuidedDecodingParams(regex="(" + "|".join(re.escape(c) for c in guide.choices) + ")")
    if guide.kind == "regex":
        return GuidedDecodingParams(regex=guide.pattern)
    if guide.json_schema is not None:
        return GuidedDecodingParams(json=guide.json_schema)
    return GuidedDecodingParams(json_object=True)


def sampling_params(tllm, s: Sampling, n: int = 1, logprobs: int | None = None, guide=None):
    """Always set max_tokens: the engine's own default would silently cut outputs."""
    kwargs: dict[str, Any] = {"max_tokens": s.max_tokens, "n": n, "temperature": s.temperature,
                              "include_stop_str_in_output": False}
    if s.temperature > 0:
        kwargs["top_p"] = s.top_p
        if s.top_k:
            kwargs["top_k"] = s.top_k
    else:
        kwargs["top_k"] = 1  # greedy, stated explicitly
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.stop:
        kwargs["stop"] = list(s.stop)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    if guide is not None:
        kwargs["guided_decoding"] = guide
    return tllm.SamplingParams(**kwargs)


def build_fingerprint(model: str, tp: int, opts: TRTLLMOptions) -> str:
    """What makes a built engine reusable: the weights, the parallel layout, the quantization and the max sizes."""
    key = {"model": os.path.abspath(model) if os.path.isdir(model) else model, "files": model_files(model), "tp": tp,
           "pp": opts.pipeline_parallel_size, "quant": opts.quantization.model_dump(),
           "max": [opts.max_batch_size, opts.max_num_tokens, opts.max_seq_len]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def llm_class_and_kwargs(tllm, model: str, tp: int, dtype: str, trust_remote_code: bool, opts: TRTLLMOptions):
    """The LLM class to use and its constructor arguments, from the job file's options."""
    from tensorrt_llm.llmapi import KvCacheConfig

    kv_kwargs = opts.kv_cache.model_dump()
    kwargs: dict[str, Any] = {
        "model": model, "tensor_parallel_size": tp, "pipeline_parallel_size": opts.pipeline_parallel_size,
        "dtype": dtype, "trust_remote_code": trust_remote_code,
    }
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    if opts.backend == "pytorch":
        if opts.quantization.kv_cache:
            kv_kwargs["dtype"] = opts.quantization.kv_cache.lower()  # PyTorch backend: KV dtype on KvCacheConfig
        kwargs["kv_cache_config"] = KvCacheConfig(**kv_kwargs)
        kwargs["enable_chunked_prefill"] = opts.enable_chunked_prefill
        if opts.quantization.algo not in (None, "NO_QUANT"):
            # The PyTorch backend reads pre-quantized checkpoints (ModelOpt); on-the-fly quantization is the
            # TensorRT backend's job.
            raise ValueError("engine.options.quantization.algo needs backend: tensorrt (or a pre-quantized checkpoint)")
        return tllm.LLM, kwargs
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM
    from tensorrt_llm.llmapi import BuildConfig, QuantAlgo, QuantConfig

    kwargs["kv_cache_config"] = KvCacheConfig(**kv_kwargs)
    kwargs["enable_chunked_prefill"] = opts.enable_chunked_prefill
    q = opts.quantization
    if q.algo or q.kv_cache:
        kwargs["quant_config"] = QuantConfig(
            quant_algo=QuantAlgo[q.algo] if q.algo else None,
            kv_cache_quant_algo=QuantAlgo[q.kv_cache] if q.kv_cache else None,
        )
    build = {k: kwargs.pop(k) for k in ("max_batch_size", "max_num_tokens", "max_seq_len") if k in kwargs}
    kwargs["build_config"] = BuildConfig(**build)
    return TrtLLM, kwargs


def engine_dir_for(model: str, tp: int, opts: TRTLLMOptions) -> Path | None:
    if opts.backend != "tensorrt" or not opts.engine_cache:
        return None
    return Path(opts.engine_cache) / build_fingerprint(model, tp, opts)


def build_engine(model: str, tp: int, dtype: str, trust_remote_code: bool, options: dict) -> tuple[Path, bool]:
    """`batchrun build`: build the TensorRT engine once into the cache. Returns (dir, built_now)."""
    import tensorrt_llm as tllm

    opts = TRTLLMOptions(**options)
    target = engine_dir_for(model, tp, opts)
    if target is None:
        raise ValueError("batchrun build needs engine.options.backend: tensorrt and engine.options.engine_cache")
    if (target / "batchrun_build.json").exists():
        return target, False  # same fingerprint: already built
    cls, kwargs = llm_class_and_kwargs(tllm, model, tp, dtype, trust_remote_code, opts)
    llm = cls(**kwargs)
    try:
        tmp = target.with_name(target.name + ".partial")
        llm.save(str(tmp))
        (tmp / "batchrun_build.json").write_text(json.dumps({"model": model, "tp": tp, **opts.model_dump()}))
        os.replace(tmp, target)  # concurrent builders: one rename wins, the engine dir is never half-written
    finally:
        llm.shutdown()
    return target, True


def to_completions(request_id: str, output, stop: tuple[str, ...], top_k: int = 0) -> list[Completion]:
    """RequestOutput -> one Completion per sample (outputs[i].index). timeout/cancelled: error rows."""
    return [_one(request_id, c, len(output.prompt_token_ids or []), stop, top_k) for c in output.outputs]


def to_completion(request_id: str, output, stop: tuple[str, ...]) -> Completion:
    return to_completions(request_id, output, stop)[0]


def _one(request_id: str, c, prompt_len: int, stop: tuple[str, ...], top_k: int = 0) -> Completion:
    if c.finish_reason in ("timeout", "cancelled"):
        return Completion(request_id, finish_reason="error", error=f"request {c.finish_reason} in TensorRT-LLM",
                          num_prompt_tokens=prompt_len, num_generated_tokens=len(c.token_ids or []),
                          sample_index=c.index)
    text, hit = apply_stop(c.text, stop)  # the engine already excludes stop strings; this is a no-op safeguard
    return Completion(
        request_id=request_id, text=text, token_ids=list(c.token_ids or []),
        finish_reason="stop" if c.finish_reason == "stop" or hit else "length",
        num_prompt_tokens=prompt_len, num_generated_tokens=len(c.token_ids or []),
        logprobs=_logprob_values(c.logprobs, c.token_ids) or None, sample_index=c.index,
        top_logprobs=_top_logprobs(c.logprobs, top_k) if top_k else None,
    )


def _logprob_values(logprobs, token_ids) -> list[float]:
    """CompletionOutput.logprobs: floats, or one {token_id: Logprob} dict per generated token (the sampled token's
    entry is the value; it need not be the likeliest one when sampling)."""
    out = []
    for i, item in enumerate(logprobs or []):
        if isinstance(item, dict):
            chosen = item.get(token_ids[i]) if token_ids and i < len(token_ids) else None
            out.append(chosen.logprob if chosen is not None else float("nan"))
        else:
            out.append(float(item))
    return out


def _top_logprobs(logprobs, k: int) -> list[dict[int, float]]:
    """The k likeliest tokens at each step (the sampled token's entry is dropped unless it is among them)."""
    out = []
    for item in logprobs or []:
        ranked = sorted(item.items(), key=lambda kv: -kv[1].logprob) if isinstance(item, dict) else []
        out.append({int(t): float(lp.logprob) for t, lp in ranked[:k]})
    return out


# ---------------------------------------------------------------- the engine


@dataclass
class _Loop:
    """A private asyncio loop in a thread: generate_async must be called from inside a running loop."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def __post_init__(self):
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="trtllm-asyncio")
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class TRTLLMEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, max_in_flight: int = 256,
                 tensor_parallel_size: int = 1, guide: ParseSpec | None = None, **options):
        # Before tensorrt_llm (and so mpi4py) is imported: its TP ranks are spawned through MPI from this actor.
        os.environ.update(mpi_environment(actor_gpu_ids()))
        import tensorrt_llm as tllm

        self.tllm = tllm
        self.opts = TRTLLMOptions(**options)
        built = engine_dir_for(model, tensor_parallel_size, self.opts)
        if built is not None and (built / "batchrun_build.json").exists():
            model = str(built)  # load the engine `batchrun build` made instead of building one per worker
        cls, kwargs = llm_class_and_kwargs(tllm, model, tensor_parallel_size, dtype, trust_remote_code, self.opts)
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        self.guide = guided_decoding(guide)
        if self.guide is not None:
            kwargs["guided_decoding_backend"] = "xgrammar"  # both backends implement it; default None enforces nothing
        self.llm = cls(**kwargs)
        self.tokenizer = getattr(self.llm, "tokenizer", None)
        self.max_in_flight = max_in_flight
        self.context_length = self.opts.max_seq_len
        self.default_sampling = sampling
        self._params: dict[Sampling, Any] = {}
        self._done: queue.Queue[Completion] = queue.Queue()
        self._loop = _Loop()

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        if self.tokenizer is None:
            return None
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        # The LLM API's tokenizer wraps the HF tokenizer (llmapi/tokenizer.py: TransformersTokenizer)
        hf = getattr(self.tokenizer, "tokenizer", None) or getattr(self.tokenizer, "hf", None) or self.tokenizer
        return [hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    def _sampling_params(self, s: Sampling):
        params = self._params.get(s)
        if params is None:  # rows mostly share settings: build each SamplingParams once
            want = max(s.top_logprobs, 1) if s.logprobs or s.top_logprobs else None
            params = sampling_params(self.tllm, s, n=s.n, logprobs=want, guide=self.guide)
            if len(self._params) >= 4096:  # per-row seeds make every row's settings distinct: keep the cache bounded
                self._params.clear()
            self._params[s] = params
        return params

    def submit(self, request: Request) -> None:
        inputs = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        params = self._sampling_params(request.sampling)
        self._loop.submit(self._generate(request, inputs, params))

    async def _generate(self, request: Request, inputs, params) -> None:
        try:
            output = await self.llm.generate_async(inputs, sampling_params=params).aresult()
            for c in to_completions(request.request_id, output, request.sampling.stop, request.sampling.top_logprobs):
                self._done.put(c)
        except Exception as e:  # a failure of this request alone (bad input, per-request engine error)
            for k in range(request.sampling.n):
                self._done.put(Completion(request.request_id, finish_reason="error",
                                          error=f"{type(e).__name__}: {e}", sample_index=k))

    def poll(self, timeout: float) -> list[Completion]:
        out = []
        try:
            out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()  # stops the executor and its MPI ranks
        if getattr(self, "_loop", None) is not None:
            self._loop.stop()
            self._loop = None
