"""engine.options for engine trtllm, and every rule batchrun can check before a GPU is touched (no tensorrt_llm
import here: the installed release is read from its metadata, releases.installed()).

What upstream would refuse at run time, `check()` refuses at plan time, naming the key, the release and the release
that can (UPSTREAM.md ids in brackets)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from batchrun.engines.common import require_model_dir
from batchrun.engines.trtllm.releases import NO_TENSORRT_BACKEND_FROM, PINNED, Release, installed
from batchrun.fingerprint import fingerprint, model_files

QUANT_ALGOS = (  # A5 (NO_QUANT is accepted in the job file and means no quantization: it is never sent)
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "NVFP4", "NO_QUANT",
)
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")  # A5 KV_CACHE_QUANT_ALGO_LIST
NO_CALIBRATION = ("W8A16", "W4A16", "FP8_PER_CHANNEL_PER_TOKEN")  # A6
TORCH_KV_CACHE_DTYPES = ("FP8",)  # A4, 1.0: "fp8" | "auto" (the stricter list: nvfp4 came later)
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
    # KV blocks evicted from the GPU are kept in this much host memory and brought back when a later prompt shares
    # them (KvCacheConfig.host_cache_size, A3): long shared prefixes that do not all fit on the GPU
    host_cache_gib: float | None = Field(None, gt=0)


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


@dataclass(frozen=True)
class JobNeeds:
    """What a job asks of the release (the keys the release rules name)."""

    backend: str
    engine_dir: bool  # engine.model is a built TensorRT engine
    top_logprobs: int
    samples: bool  # a temperature above 0, job-wide or in a per-row column
    seeded: bool  # sampling.seed, or a per-row seed column

    @classmethod
    def of(cls, spec) -> JobNeeds:
        return cls.from_parts(spec.engine.model, TRTLLMOptions(**spec.engine.options), spec.sampling)

    @classmethod
    def from_parts(cls, model: str, opts: TRTLLMOptions, sampling) -> JobNeeds:
        per_row = getattr(sampling, "per_row", {}) or {}
        return cls(backend=opts.backend, engine_dir=_is_engine_dir(model), top_logprobs=sampling.top_logprobs,
                   samples=sampling.temperature > 0 or "temperature" in per_row,
                   seeded=sampling.seed is not None or "seed" in per_row)


def release_problem(release: Release, needs: JobNeeds) -> str | None:
    """What this release cannot do of what the job asks (V1-V6), as one message naming the key; None if it can."""
    v = f"TensorRT-LLM {release.version}"
    if (needs.backend == "tensorrt" or needs.engine_dir) and not release.tensorrt_backend:
        key = "engine.options.backend' (tensorrt" if needs.backend == "tensorrt" else "engine.model' (a TensorRT engine"
        return (f"key '{key}'): {v} has no TensorRT backend (removed from {NO_TENSORRT_BACKEND_FROM} on: "
                "docs/source/legacy/tensorrt-backend-removal.md), so TensorRT engines, `batchrun build`, QuantConfig "
                f"and calibration are gone; use backend: pytorch with an HF checkpoint, or the {PINNED} image (the "
                "last release with both backends)")
    if needs.backend != "pytorch" or needs.top_logprobs <= 1:
        return None
    if not release.torch_top_logprobs:
        return (f"key 'sampling.top_logprobs' ({needs.top_logprobs}) above 1: {v}'s PyTorch backend returns the "
                "sampled token's logprob only (top-k logprobs arrived in 1.1); use TensorRT-LLM 1.1 or later, or "
                "engine.options.backend: tensorrt")
    if needs.samples and needs.seeded and not release.seeds_with_top_logprobs:
        return (f"keys 'sampling.top_logprobs' ({needs.top_logprobs}) and 'sampling.seed': on {v}'s PyTorch backend "
                "the sampler that honours per-request seeds (TRTLLMSampler) returns the sampled token's logprob only, "
                "and the one with top-k logprobs (TorchSampler) ignores seeds; drop the seed or top_logprobs, or use "
                "engine.options.backend: tensorrt")
    return None


def check(spec) -> None:
    """Combinations TensorRT-LLM refuses, or that cannot finish on an offline cluster, named by their keys."""
    require_model_dir(spec)
    opts = TRTLLMOptions(**spec.engine.options)
    release = installed()  # None: not installed in the driver; the worker checks the same rules at engine start
    if release is not None and (problem := release_problem(release, JobNeeds.of(spec))):
        raise ValueError(problem)
    q = opts.quantization
    if opts.backend == "pytorch":
        if _is_engine_dir(spec.engine.model):
            raise ValueError(f"key 'engine.model': {spec.engine.model} is a built TensorRT engine, which only "
                             "engine.options.backend: tensorrt loads (A9)")
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
            config_json(spec.engine.model)["build_config"].get("gather_context_logits"):
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


def config_json(model: str) -> dict:
    try:
        return json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _is_engine_dir(model: str | None) -> bool:
    config = config_json(model) if model else {}
    return "build_config" in config and "pretrained_config" in config  # A9


def vocab_size(model: str) -> int | None:
    """The model's own vocabulary: the width of its logits before TensorRT-LLM pads them (P5)."""
    config = config_json(model)
    return (config.get("pretrained_config") or config).get("vocab_size")


def _no_build_needed(model: str, tp: int, opts: TRTLLMOptions, logprobs: bool, scoring: bool = False) -> bool:
    """A built engine (given, or in the engine cache), or a pre-quantized checkpoint: nothing calibrates (L5)."""
    built = engine_dir_for(model, tp, opts, logprobs, scoring)
    return (_is_engine_dir(model) or (built is not None and (built / "batchrun_build.json").exists())
            or "quantization_config" in config_json(model) or (Path(model) / "hf_quant_config.json").exists())


@dataclass(frozen=True)
class EngineLimits:
    """The engine's context and its longest prompt, in tokens (None: unknown)."""

    context: int | None
    prompt: int | None


def limits(model: str, opts: TRTLLMOptions) -> EngineLimits:
    config = config_json(model)
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


def engine_dir_for(model: str, tp: int, opts: TRTLLMOptions, logprobs: bool = False,
                   scoring: bool = False) -> Path | None:
    if opts.backend != "tensorrt" or not opts.engine_cache:
        return None
    return Path(opts.engine_cache) / build_fingerprint(model, tp, opts, logprobs, scoring)
