"""TensorRT-LLM through its LLM API (tensorrt_llm >= 1.0): the production engine.

Every upstream fact this adapter relies on is recorded, with the file, symbol and version read, in
tests/doubles/tensorrt_llm/UPSTREAM.md; the ids below (S3, L9, ...) point there. The strict test double in that
folder implements exactly those rules. What upstream would refuse at run time, `check()` refuses at plan time.

- Backends (L2): `tensorrt_llm.LLM` is the PyTorch backend; `tensorrt_llm._tensorrt_engine.LLM` builds or loads
  TensorRT engines and takes build_config / quant_config / calib_config (TRT-only: the PyTorch backend refuses
  them, L3). Unknown LLM keywords raise (L1).
- `generate_async(inputs, sampling_params)` returns at once; `await output.aresult()` finishes it (L7, R3).
- Greedy decoding is top_k=1 (S3: top_k / top_p decide it, not temperature). Upstream refuses n > 1 when greedy, so
  a greedy row is generated once and handed out as its n identical samples.
- logprobs on the TensorRT backend need `LLM(gather_generation_logits=True)` (L9); the engine is built with it too.
- KV cache dtypes (A3, A4): PyTorch backend: KvCacheConfig.dtype "fp8" only (1.0; nvfp4 later); TensorRT backend:
  QuantConfig.kv_cache_quant_algo FP8 / INT8 / NVFP4, with KvCacheConfig.dtype left at "auto".
- Calibration (A6, A7, L5): building a TensorRT engine from an HF checkpoint calibrates for every algorithm but
  W8A16 / W4A16 / FP8_PER_CHANNEL_PER_TOKEN and for any quantized KV cache, loading `CalibConfig.calib_dataset`
  ('cnn_dailymail' from the hub unless it is a local path). NO_QUANT is never sent (it calibrates too).
- Context (A1, A8, A9, L9): max_seq_len comes from the option, the built engine's config.json, or the checkpoint's
  max_position_embeddings; TensorRT engines also cap the prompt at max_input_len (BuildConfig default 1024, set
  here to the context), the PyTorch backend at max_num_tokens (default 8192) without chunked prefill.
- shutdown() can wait forever on its MPI ranks (L11); close() bounds it and then ends the ranks itself.
- Whose failure (E1-E4): a request's own failure is `RequestError` (a response carrying an error message), or an
  argument check of generate_async (ValueError/TypeError): an error row. Anything else an awaited result raises is
  the executor's background error, raised once after the executor shut itself down; from then on generate_async
  raises "LLM is shutting down" and the requests it held are aborted ('cancelled') or raise. All of that is the
  engine's death (EngineDead), never error rows.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import queue
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batchrun.engines.base import Completion, Engine, EngineDead, Request, Sampling, apply_stop
from batchrun.engines.common import model_args, require_model_dir, sampling_from_spec
from batchrun.engines.mpi import abandon_mpi_manager_threads, actor_gpu_ids, descendants, kill_all, prepare_mpi_process
from batchrun.fingerprint import fingerprint, model_files
from batchrun.loglikelihood import model_input, pair_problem, prefix_token, tok_encode
from batchrun.spec import ParseSpec

log = logging.getLogger(__name__)

QUANT_ALGOS = (  # A5 (NO_QUANT is accepted in the job file and means no quantization: it is never sent)
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "NVFP4", "NO_QUANT",
)
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")  # A5 KV_CACHE_QUANT_ALGO_LIST
NO_CALIBRATION = ("W8A16", "W4A16", "FP8_PER_CHANNEL_PER_TOKEN")  # A6
TORCH_KV_CACHE_DTYPES = ("FP8",)  # A4, 1.0: "fp8" | "auto"
DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_NUM_TOKENS = 2048, 8192  # A1


class Quantization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    algo: Literal[QUANT_ALGOS] | None = None  # weights/activations: W8A8_SQ_PER_CHANNEL (SmoothQuant), W4A16_AWQ...
    kv_cache: Literal[KV_CACHE_QUANT_ALGOS] | None = None  # INT8 / FP8 / NVFP4 KV cache
    calib_dataset: str | None = None  # a local dataset path for the calibration TensorRT-LLM runs while building

    @property
    def weights(self) -> str | None:
        return None if self.algo in (None, "NO_QUANT") else self.algo

    @property
    def calibrates(self) -> bool:
        """QuantConfig._requires_calibration for what the adapter sends (A6)."""
        return (self.weights is not None and self.weights not in NO_CALIBRATION) or self.kv_cache is not None


class KvCache(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    enable_block_reuse: bool = True


class TRTLLMOptions(BaseModel):
    """engine.options for engine trtllm. Validated in the driver so a typo fails before any GPU is touched."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["pytorch", "tensorrt"] = "pytorch"
    pipeline_parallel_size: int = Field(1, ge=1)
    quantization: Quantization = Field(default_factory=Quantization)
    kv_cache: KvCache = Field(default_factory=KvCache)
    max_batch_size: int | None = Field(None, ge=1)
    max_num_tokens: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    max_input_len: int | None = Field(None, ge=1)  # tensorrt backend: the longest prompt (default: the context)
    enable_chunked_prefill: bool = False
    engine_cache: str | None = None  # tensorrt backend: where `batchrun build` keeps engines, keyed by fingerprint
    shutdown_timeout_s: float = Field(30.0, gt=0)  # LLM.shutdown() is given this long, then the ranks are ended
    # scoring jobs: the context logits of the pairs in flight, at most this much host memory (each pair's request
    # returns [prompt tokens x vocabulary] float32 logits)
    score_logits_gib: float = Field(4.0, gt=0)


def options_model():
    return TRTLLMOptions


# ---------------------------------------------------------------- plan-time rules (no tensorrt_llm needed)


def check(spec) -> None:
    """Combinations TensorRT-LLM refuses, or that cannot finish on an offline cluster, named by their keys."""
    require_model_dir(spec)
    opts = TRTLLMOptions(**spec.engine.options)
    q = opts.quantization
    if opts.backend == "pytorch":
        if q.weights:
            raise ValueError(f"key 'engine.options.quantization.algo' ({q.weights}) needs engine.options.backend: "
                             "tensorrt: the PyTorch backend ignores QuantConfig and only loads pre-quantized "
                             "checkpoints (TensorRT-LLM llmapi/llm_utils.py, CachedModelLoader)")
        if q.kv_cache and q.kv_cache not in TORCH_KV_CACHE_DTYPES:
            raise ValueError(f"key 'engine.options.quantization.kv_cache' ({q.kv_cache}) is not a KV cache dtype of "
                             f"the PyTorch backend (engine.options.backend: pytorch), which accepts "
                             f"{', '.join(TORCH_KV_CACHE_DTYPES)} (TensorRT-LLM _torch/pyexecutor "
                             "_VALID_KV_CACHE_DTYPES: every worker would fail at load); use FP8 or backend: tensorrt")
        if q.calib_dataset:
            raise ValueError("key 'engine.options.quantization.calib_dataset' is for engine.options.backend: "
                             "tensorrt (the PyTorch backend does not calibrate)")
        if spec.sampling.top_logprobs > 1:  # UPSTREAM.md I1
            raise ValueError("key 'sampling.top_logprobs' above 1 needs engine.options.backend: tensorrt: the PyTorch "
                             "backend of the pinned TensorRT-LLM 1.0 returns the sampled token's logprob only")
    elif q.calibrates and not _no_build_needed(spec.engine.model, spec.engine.tensor_parallel_size, opts,
                                               _wants_logprobs(spec.sampling), bool(spec.scoring)):
        if not q.calib_dataset:
            raise ValueError(
                f"keys 'engine.options.quantization.algo' ({q.algo}) / 'engine.options.quantization.kv_cache' "
                f"({q.kv_cache}): TensorRT-LLM calibrates the model while building this engine "
                "(QuantConfig._requires_calibration), and without a dataset it downloads 'cnn_dailymail' from the "
                "Hugging Face hub, which fails or hangs on an offline cluster. Set "
                "engine.options.quantization.calib_dataset to a local dataset path, or use a pre-quantized checkpoint")
    if q.calib_dataset and not os.path.exists(q.calib_dataset):
        raise ValueError(f"key 'engine.options.quantization.calib_dataset': {q.calib_dataset} does not exist "
                         "(expected a local dataset path)")
    if spec.scoring and opts.backend == "tensorrt" and _is_engine_dir(spec.engine.model) and not \
            _config(spec.engine.model)["build_config"].get("gather_context_logits"):
        raise ValueError(f"key 'engine.model': the TensorRT engine {spec.engine.model} was built without "
                         "gather_context_logits, which a scoring job needs (its log-likelihoods come from the context "
                         "logits, UPSTREAM.md P1-P4); give the HF checkpoint (batchrun builds the engine with it), or "
                         "rebuild with BuildConfig(gather_context_logits=True)")
    max_batch = opts.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if spec.sampling.n > max_batch:
        raise ValueError(f"key 'sampling.n' ({spec.sampling.n}) exceeds engine.options.max_batch_size ({max_batch}): "
                         "TensorRT-LLM refuses a request with more samples than its batch holds")


def _wants_logprobs(s) -> bool:
    return bool(s.logprobs or s.top_logprobs)


def _config(model: str) -> dict:
    try:
        return json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _is_engine_dir(model: str) -> bool:
    config = _config(model)
    return "build_config" in config and "pretrained_config" in config  # A9


def _no_build_needed(model: str, tp: int, opts: TRTLLMOptions, logprobs: bool, scoring: bool = False) -> bool:
    """A built engine (given, or in the engine cache), or a pre-quantized checkpoint: nothing calibrates (L5)."""
    built = engine_dir_for(model, tp, opts, logprobs, scoring)
    return (_is_engine_dir(model) or (built is not None and (built / "batchrun_build.json").exists())
            or "quantization_config" in _config(model) or (Path(model) / "hf_quant_config.json").exists())


# ---------------------------------------------------------------- translation (pure: testable with the double)


def guided_decoding(guide: ParseSpec | None):
    """output.parse with guided: true -> GuidedDecodingParams (choices become an alternation regex). S4, L12."""
    if guide is None:
        return None
    from tensorrt_llm.llmapi import GuidedDecodingParams

    if guide.kind == "choice":
        return GuidedDecodingParams(regex="(" + "|".join(re.escape(c) for c in guide.choices) + ")")
    if guide.kind == "regex":
        return GuidedDecodingParams(regex=guide.pattern)
    if guide.json_schema is not None:
        return GuidedDecodingParams(json=guide.json_schema)
    return GuidedDecodingParams(json_object=True)


def is_greedy(s: Sampling) -> bool:
    return s.temperature == 0


def sampling_params(tllm, s: Sampling, logprobs: int | None = None, guide=None):
    """One request's SamplingParams. Always sets max_tokens: the engine's own default (32) would cut outputs.
    Greedy is top_k=1 with one return (S3); the caller hands that one generation out as its n samples."""
    kwargs: dict[str, Any] = {"max_tokens": s.max_tokens, "include_stop_str_in_output": False}
    if is_greedy(s):
        kwargs["top_k"] = 1
    else:
        kwargs.update(n=s.n, temperature=s.temperature, top_p=s.top_p)
        if s.top_k:
            kwargs["top_k"] = s.top_k
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.stop:
        kwargs["stop"] = list(s.stop)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    if guide is not None:
        kwargs["guided_decoding"] = guide
    return tllm.SamplingParams(**kwargs)


@dataclass(frozen=True)
class EngineLimits:
    """The engine's context and its longest prompt, in tokens (None: unknown)."""

    context: int | None
    prompt: int | None


def limits(model: str, opts: TRTLLMOptions) -> EngineLimits:
    config = _config(model)
    if "build_config" in config:  # a built engine carries its own (A9)
        build = config["build_config"]
        return EngineLimits(build.get("max_seq_len"), build.get("max_input_len"))
    context = opts.max_seq_len or config.get("max_position_embeddings")  # A1: max_seq_len None -> the model's
    if opts.backend == "tensorrt":
        return EngineLimits(context, opts.max_input_len or context)
    if opts.enable_chunked_prefill:
        return EngineLimits(context, None)
    return EngineLimits(context, min(filter(None, (context, opts.max_num_tokens or DEFAULT_MAX_NUM_TOKENS))))


def build_fingerprint(model: str, tp: int, opts: TRTLLMOptions, logprobs: bool = False, scoring: bool = False) -> str:
    """What makes a built engine reusable: weights, parallel layout, quantization, sizes, gathered logits."""
    key = {"model": os.path.abspath(model) if os.path.isdir(model) else model, "files": model_files(model), "tp": tp,
           "pp": opts.pipeline_parallel_size, "quant": opts.quantization.model_dump(exclude={"calib_dataset"}),
           "max": [opts.max_batch_size, opts.max_num_tokens, opts.max_seq_len, opts.max_input_len]}
    if logprobs:  # added only when set, so engines built before this key existed keep their fingerprint
        key["gather_generation_logits"] = True
    if scoring:
        key["gather_context_logits"] = True
    return fingerprint(key)


def llm_class_and_kwargs(tllm, model: str, tp: int, dtype: str, trust_remote_code: bool, opts: TRTLLMOptions,
                         logprobs: bool = False, scoring: bool = False):
    """The LLM class to use and its constructor arguments (L1-L3, A1-A8). scoring: the engine returns context
    logits (TensorRT backend: built with BuildConfig.gather_context_logits, P2)."""
    from tensorrt_llm.llmapi import KvCacheConfig

    q = opts.quantization
    kwargs: dict[str, Any] = {
        "model": model, "tensor_parallel_size": tp, "pipeline_parallel_size": opts.pipeline_parallel_size,
        "dtype": dtype, "trust_remote_code": trust_remote_code, "enable_chunked_prefill": opts.enable_chunked_prefill,
    }
    sizes = {k: getattr(opts, k) for k in ("max_batch_size", "max_num_tokens", "max_seq_len") if getattr(opts, k)}
    if logprobs:
        kwargs["gather_generation_logits"] = True  # L9: checked per request on the TensorRT backend
    kv = opts.kv_cache.model_dump()
    if opts.backend == "pytorch":
        if q.kv_cache:
            kv["dtype"] = q.kv_cache.lower()  # A3/A4: the PyTorch backend takes the KV dtype on KvCacheConfig
        return tllm.LLM, {**kwargs, **sizes, "kv_cache_config": KvCacheConfig(**kv)}
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM
    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, QuantAlgo, QuantConfig

    kwargs["kv_cache_config"] = KvCacheConfig(**kv)  # dtype stays "auto" (A3)
    if q.weights or q.kv_cache:  # NO_QUANT is never sent: it would calibrate (A6)
        kwargs["quant_config"] = QuantConfig(quant_algo=QuantAlgo[q.weights] if q.weights else None,
                                             kv_cache_quant_algo=QuantAlgo[q.kv_cache] if q.kv_cache else None)
    if q.calib_dataset:
        kwargs["calib_config"] = CalibConfig(calib_dataset=q.calib_dataset)
    build = dict(sizes)
    prompt = limits(model, opts).prompt
    if prompt and not _is_engine_dir(model):
        build["max_input_len"] = prompt  # BuildConfig's 1024 would refuse longer prompts the context has room for
    if logprobs:
        build["gather_generation_logits"] = True
    if scoring:
        build["gather_context_logits"] = True
    kwargs["build_config"] = BuildConfig(**build)
    return TrtLLM, kwargs


def engine_dir_for(model: str, tp: int, opts: TRTLLMOptions, logprobs: bool = False,
                   scoring: bool = False) -> Path | None:
    if opts.backend != "tensorrt" or not opts.engine_cache:
        return None
    return Path(opts.engine_cache) / build_fingerprint(model, tp, opts, logprobs, scoring)


def build_engine(model: str, tp: int, dtype: str, trust_remote_code: bool, options: dict,
                 logprobs: bool = False, scoring: bool = False) -> tuple[Path, bool]:
    """`batchrun build`: build the TensorRT engine once into the cache. Returns (dir, built_now). The process is set
    up for MPI as a worker is, and LLM.shutdown() is bounded: a build that is done never hangs on its ranks."""
    opts = TRTLLMOptions(**options)
    target = engine_dir_for(model, tp, opts, logprobs, scoring)
    if target is None:
        raise ValueError("batchrun build needs engine.options.backend: tensorrt and engine.options.engine_cache")
    if (target / "batchrun_build.json").exists():
        return target, False  # same fingerprint: already built
    prepare_mpi_process(actor_gpu_ids())
    import tensorrt_llm as tllm

    cls, kwargs = llm_class_and_kwargs(tllm, model, tp, dtype, trust_remote_code, opts, logprobs, scoring)
    before = {p.pid for p in descendants()}
    llm = cls(**kwargs)
    ranks = [p for p in descendants() if p.pid not in before]
    try:
        tmp = target.with_name(target.name + ".partial")
        llm.save(str(tmp))
        (tmp / "batchrun_build.json").write_text(json.dumps({"model": model, "tp": tp, **opts.model_dump()}))
        os.replace(tmp, target)  # concurrent builders: one rename wins, the engine dir is never half-written
    finally:
        shutdown_llm(llm, ranks, opts.shutdown_timeout_s)
    return target, True


def shutdown_llm(llm, ranks: list, timeout_s: float) -> bool:
    """LLM.shutdown() within timeout_s, then no rank left. Returns whether shutdown() returned by itself.

    Upstream's proxy waits on every rank with no timeout (L11), so a rank that never answers would hold this process
    forever. After the timeout: the ranks are ended, the LLM's own later calls to shutdown() (from __del__ and the
    atexit hook it registered, L11) become no-ops, and mpi4py's manager thread no longer blocks the exit."""
    closer = threading.Thread(target=llm.shutdown, daemon=True, name="trtllm-shutdown")
    closer.start()
    closer.join(timeout_s)
    clean = not closer.is_alive()
    if not clean:
        log.warning("TensorRT-LLM's shutdown() did not return within %gs; ending its %d rank process(es)",
                    timeout_s, len(ranks))
        llm.shutdown = lambda: None
        atexit.unregister(type(llm)._shutdown_wrapper)
    kill_all(ranks, grace_s=5.0 if clean else 0.5)  # after a clean shutdown they are exiting already
    if not clean:
        abandon_mpi_manager_threads()
    return clean


def to_completions(request_id, output, stop: tuple[str, ...], top_k: int = 0, copies: int = 1) -> list[Completion]:
    """RequestOutput -> one Completion per sample (outputs[i].index); a greedy request's single output is handed out
    as `copies` identical samples. timeout (R1): an error row. cancelled: batchrun never aborts a request, so the
    executor did, as it shuts down (E3): the engine's death, not the request's."""
    if any(c.finish_reason == "cancelled" for c in output.outputs):
        raise EngineDead("TensorRT-LLM cancelled a request: the executor is shutting down")
    prompt_len = len(output.prompt_token_ids or [])
    cached = getattr(output, "cached_tokens", None)  # R4: reused prompt tokens, on releases that report them
    out = [dataclasses.replace(_one(request_id, c, prompt_len, stop, top_k), num_cached_prompt_tokens=cached)
           for c in output.outputs]
    if copies > 1 and len(out) == 1:
        out = [_with_index(out[0], k) for k in range(copies)]
    return out


def _with_index(c: Completion, k: int) -> Completion:
    return dataclasses.replace(c, sample_index=k)


def _one(request_id, c, prompt_len: int, stop: tuple[str, ...], top_k: int = 0) -> Completion:
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
    """CompletionOutput.logprobs: floats, or one {token_id: Logprob} dict per generated token (R2; the sampled
    token's entry is the value; it need not be the likeliest one when sampling)."""
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
    """A private asyncio loop in a thread: generate_async must be called from inside a running loop (R3)."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def __post_init__(self):
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="trtllm-asyncio")
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def create(spec, sampling, parse=None) -> TRTLLMEngine:
    return TRTLLMEngine(spec.model, sampling_from_spec(sampling), guide=parse, **model_args(spec, spec.options))


class TRTLLMEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, guide: ParseSpec | None = None, scoring: bool = False, **options):
        # Before tensorrt_llm (and so mpi4py.MPI) is imported: its TP ranks are spawned through MPI from this actor.
        prepare_mpi_process(actor_gpu_ids())
        import tensorrt_llm as tllm
        from tensorrt_llm.executor.utils import RequestError

        self.tllm = tllm
        self.request_error = RequestError  # E2, E4: how a response's own error reaches its awaiter
        self.opts = TRTLLMOptions(**options)
        self.logprobs = sampling.logprobs or bool(sampling.top_logprobs)
        built = engine_dir_for(model, tensor_parallel_size, self.opts, self.logprobs, scoring)
        if built is not None and (built / "batchrun_build.json").exists():
            model = str(built)  # load the engine `batchrun build` made instead of building one per worker
        cls, kwargs = llm_class_and_kwargs(tllm, model, tensor_parallel_size, dtype, trust_remote_code, self.opts,
                                           self.logprobs, scoring)
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        self.guide = guided_decoding(guide)
        if self.guide is not None:
            kwargs["guided_decoding_backend"] = "xgrammar"  # A1: both backends take it; default None enforces nothing
        before = {p.pid for p in descendants()}
        self.llm = cls(**kwargs)
        self._ranks = [p for p in descendants() if p.pid not in before]  # what close() must leave no trace of
        self.tokenizer = getattr(self.llm, "tokenizer", None)
        self.prefix_reuse = self.opts.kv_cache.enable_block_reuse  # KvCacheConfig (A3): on by default
        self.batch_limit = self.opts.max_batch_size or DEFAULT_MAX_BATCH_SIZE  # A1; its KV cache size is not exposed
        lim = limits(model, self.opts)
        self.context_length, self.max_prompt_tokens = lim.context, lim.prompt
        # rows mostly share settings: each SamplingParams is built once; per-row seeds make every row's distinct,
        # so the cache is bounded
        self._sampling_params = functools.lru_cache(maxsize=4096)(self._build_params)
        self._done: queue.Queue[Completion] = queue.Queue()
        self._dead: str | None = None  # set by the asyncio thread when the executor dies (E1)
        self._loop = _Loop()

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        if self.tokenizer is None:
            return None
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        # The LLM API's tokenizer wraps the HF tokenizer as `.tokenizer` (llmapi/tokenizer.py TransformersTokenizer)
        hf = getattr(self.tokenizer, "tokenizer", None) or self.tokenizer
        return [hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    def _build_params(self, s: Sampling):
        want = max(s.top_logprobs, 1) if s.logprobs or s.top_logprobs else None
        return sampling_params(self.tllm, s, logprobs=want, guide=self.guide)

    def submit(self, request: Request) -> None:
        """Never raises for one request: whatever upstream refuses becomes that request's error rows."""
        try:
            inputs = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
            params = self._sampling_params(request.sampling)
        except Exception as e:
            self._fail(request, e)
            return
        self._loop.submit(self._generate(request, inputs, params))

    async def _generate(self, request: Request, inputs, params) -> None:
        s = request.sampling
        try:
            pending = self.llm.generate_async(inputs, sampling_params=params)
        except (ValueError, TypeError) as e:  # L7-L9: argument checks refuse this request alone
            return self._fail(request, e)
        except Exception as e:  # "LLM is shutting down" (L7), or a background error raised at submit (E3)
            return self._died(e)
        try:
            output = await pending.aresult()
            completions = to_completions(request.request_id, output, s.stop, s.top_logprobs,
                                         copies=s.n if is_greedy(s) else 1)
        except Exception as e:
            return self._fail(request, e) if isinstance(e, self.request_error) else self._died(e)
        for c in completions:
            self._done.put(c)

    def _died(self, e: Exception) -> None:
        """The executor is gone (E1): the first background error, then every result it still held. The next poll
        raises EngineDead; nothing from this engine is committed after it."""
        self._dead = self._dead or f"TensorRT-LLM executor died: {type(e).__name__}: {str(e).splitlines()[0][:300]}"

    def check_alive(self) -> None:
        if self._dead:
            raise EngineDead(self._dead)

    def _fail(self, request: Request, e: Exception) -> None:
        for k in range(request.sampling.n):
            self._done.put(Completion(request.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}",
                                      sample_index=k))

    def poll(self, timeout: float) -> list[Completion]:
        self.check_alive()
        out = []
        try:
            out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self.check_alive()  # completions taken with the death are dropped with it: their shards are retried
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm, self._ranks, self.opts.shutdown_timeout_s)
        if getattr(self, "_loop", None) is not None:
            self._loop.stop()
            self._loop = None


# ---------------------------------------------------------------- scoring: log-likelihoods from context logits


def create_scorer(spec, sampling) -> TRTScoreEngine:
    return TRTScoreEngine(spec.model, sampling_from_spec(sampling), **model_args(spec, spec.options))


class TRTScoreEngine(TRTLLMEngine):
    """Scoring jobs (batchrun/loglikelihood.py) on TensorRT-LLM: each pair's log P(continuation | context) from the
    context logits of one request per pair (P1: prompt logprobs are top-k only, so they cannot give it; P3: the
    logits of the prompt's positions). The request is what lm-eval's HF backend feeds its model, (context +
    continuation)[-(window + 1):][:-1], generating one token; the last len(continuation) positions' logits give the
    sum and is_greedy.

    A row's pairs share its prompt: with block reuse (on by default) the context's KV blocks are computed once and
    reused by the row's other choices, and those positions have no logits (P3). The continuation's positions are
    never among them unless choices share their first tokens across a block boundary; such a pair is asked again
    under a cache salt of its own (P3), which reuses nothing."""

    scores = True

    def __init__(self, model: str, sampling: Sampling, **kwargs):
        super().__init__(model, sampling, scoring=True, **kwargs)
        self.hf_tokenizer = getattr(self.tokenizer, "tokenizer", None) or self.tokenizer
        self.prefix_token_id, self._bos_text = prefix_token(self.hf_tokenizer)
        # the request generates one token after its prompt (L9: prompt + max_tokens <= max_seq_len on the TensorRT
        # backend; the PyTorch backend caps the prompt at max_num_tokens): the window is what a prompt may hold
        windows = [n for n in (self.context_length - 1 if self.context_length else None, self.max_prompt_tokens) if n]
        self.context_length = min(windows) if windows else 2048  # lm-eval's default max_length
        self._params = self.tllm.SamplingParams(max_tokens=1, top_k=1, return_context_logits=True, detokenize=False)
        self.batch_limit = 32  # rows; their pairs wait for room in the logits budget
        vocab = getattr(self.hf_tokenizer, "vocab_size", None) or len(self.hf_tokenizer)
        budget = max(int(self.opts.score_logits_gib * 2**30 / (4 * vocab)), self.context_length)
        self._budget = _TokenBudget(budget)  # prompt tokens whose logits may be in flight at once
        self.resubmitted = 0  # pairs asked again without reuse (their continuation's logits were not computed)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return tok_encode(self.hf_tokenizer, self._bos_text, text, add_special_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok_encode(t) for t in texts]

    def submit(self, request: Request) -> None:
        if (why := pair_problem(request.pairs, self.context_length)) is not None:
            self._done.put(Completion(request.request_id, finish_reason="error", error=why))
            return
        self._loop.submit(self._score(request))

    async def _score(self, request: Request) -> None:
        try:
            scored = await asyncio.gather(*(self._pair(pair) for pair in request.pairs))
        except _Refused as e:  # the request's own failure (argument checks, RequestError): an error row
            return self._fail(request, e.__cause__)
        except Exception as e:
            return self._died(e)
        lls, greedy, computed, cached = zip(*scored)
        self._done.put(Completion(request.request_id, finish_reason="stop", num_prompt_tokens=sum(computed),
                                  num_cached_prompt_tokens=sum(cached), pair_logprobs=list(lls),
                                  pair_greedy=list(greedy), pair_tokens=[len(c) for _, c in request.pairs]))

    async def _pair(self, pair) -> tuple[float, bool, int, int]:
        tokens, n = model_input(pair, self.context_length)
        async with self._budget.hold(len(tokens)):
            logits = await self._context_logits(tokens, None)
            if logits.shape[0] < n:  # reused blocks cover positions the continuation needs: once more, unshared
                self.resubmitted += 1
                logits = await self._context_logits(tokens, f"batchrun-{uuid.uuid4().hex}")
            if logits.shape[0] < n:
                raise RuntimeError(f"the engine returned {logits.shape[0]} context logits for a {len(tokens)}-token "
                                   f"prompt, fewer than the {n} the continuation needs")
            import torch

            logp = logits[-n:].float().log_softmax(-1)
            target = torch.tensor(pair[1][-n:], device=logp.device)
            ll = float(logp.gather(-1, target[:, None]).sum())
            return ll, bool((logp.argmax(-1) == target).all()), logits.shape[0], len(tokens) - logits.shape[0]

    async def _context_logits(self, tokens: list[int], salt: str | None):
        """The logits of the positions the engine computed (the last ones: reused blocks come first)."""
        try:
            pending = self.llm.generate_async(tokens, sampling_params=self._params, cache_salt=salt)
        except (ValueError, TypeError) as e:  # L7-L9: argument checks refuse this request alone
            raise _Refused() from e
        try:
            output = await pending.aresult()
        except self.request_error as e:
            raise _Refused() from e
        if output.context_logits is None:
            raise RuntimeError("the engine returned no context logits (SamplingParams.return_context_logits)")
        return output.context_logits


class _Refused(Exception):
    """A pair's request was refused or failed on its own: the row is an error row."""


class _TokenBudget:
    """At most `limit` prompt tokens held at once (a request larger than the limit runs alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._freed: asyncio.Condition | None = None  # made on the engine's loop, where it is used

    @contextlib.asynccontextmanager
    async def hold(self, tokens: int):
        self._freed = self._freed or asyncio.Condition()
        async with self._freed:
            await self._freed.wait_for(lambda: self.used == 0 or self.used + tokens <= self.limit)
            self.used += tokens
        try:
            yield
        finally:
            async with self._freed:
                self.used -= tokens
                self._freed.notify_all()
