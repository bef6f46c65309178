"""batchrun's requests and options in TensorRT-LLM's terms, and its results back (pure: testable with the double).

Greedy is top_k=1 (S3: top_k / top_p decide it, not temperature). Upstream refuses n > 1 when greedy, so a greedy
row is generated once and handed out as its n identical samples. With n > 1 sampled, a stop string found in one
sample's text aborts the whole request (R5), so the engine is given no stop strings then and batchrun cuts each
sample at its own (apply_stop)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from batchrun.engines.base import Completion, EngineDead, Sampling, apply_stop
from batchrun.engines.trtllm.options import JobNeeds, TRTLLMOptions, _is_engine_dir, limits
from batchrun.engines.trtllm.releases import Release, running, sampler_kwargs
from batchrun.spec import ParseSpec


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


def engine_stops(s: Sampling) -> bool:
    """Whether the engine applies the stop strings itself: not for several sampled returns (R5)."""
    return bool(s.stop) and (is_greedy(s) or s.n == 1)


def sampling_params(tllm, s: Sampling, logprobs: int | None = None, guide=None):
    """One request's SamplingParams. Always sets max_tokens: the engine's own default (32) would cut outputs.
    logprobs is always an int >= 1 here: newest releases read `True` as 0 (S5), older ones 0 as none."""
    kwargs: dict[str, Any] = {"max_tokens": s.max_tokens, "include_stop_str_in_output": False}
    if is_greedy(s):
        kwargs["top_k"] = 1
    else:
        kwargs.update(n=s.n, temperature=s.temperature, top_p=s.top_p)
        if s.top_k:
            kwargs["top_k"] = s.top_k
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if engine_stops(s):
        kwargs["stop"] = list(s.stop)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    if guide is not None:
        kwargs["guided_decoding"] = guide
    return tllm.SamplingParams(**kwargs)


def llm_class_and_kwargs(tllm, model: str, tp: int, dtype: str, trust_remote_code: bool, opts: TRTLLMOptions,
                         logprobs: bool = False, scoring: bool = False, release: Release | None = None,
                         needs: JobNeeds | None = None):
    """The LLM class to use and its constructor arguments (L1-L3, A1-A8, V1-V4). scoring: the engine returns context
    logits (TensorRT backend: built with BuildConfig.gather_context_logits, P2)."""
    from tensorrt_llm.llmapi import KvCacheConfig

    release = release or running(tllm)
    q = opts.quantization
    kwargs: dict[str, Any] = {
        "model": model, "tensor_parallel_size": tp, "pipeline_parallel_size": opts.pipeline_parallel_size,
        "dtype": dtype, "trust_remote_code": trust_remote_code, "enable_chunked_prefill": opts.enable_chunked_prefill,
    }
    sizes = {k: getattr(opts, k) for k in ("max_batch_size", "max_num_tokens", "max_seq_len") if getattr(opts, k)}
    kv = opts.kv_cache.model_dump(exclude={"host_cache_gib"})
    if opts.kv_cache.host_cache_gib:
        kv["host_cache_size"] = int(opts.kv_cache.host_cache_gib * 2**30)  # A3: bytes of host memory
    if scoring and not release.cache_salt:
        # a pair whose continuation fell into reused blocks has no logits there, and without cache_salt (V4) it
        # cannot be asked again without reuse: score with block reuse off, every position computed
        kv["enable_block_reuse"] = False
    if opts.backend == "pytorch":
        if q.kv_cache:
            kv["dtype"] = q.kv_cache.lower()  # A3/A4: the PyTorch backend takes the KV dtype on KvCacheConfig
        if needs is not None:
            kwargs.update(sampler_kwargs(release, needs.samples, needs.seeded))  # V1-V3
        # no gather_generation_logits: the PyTorch backend's logprobs do not need it (L9), and it would force the
        # in-process executor at TP=1 (L15)
        return tllm.LLM, {**kwargs, **sizes, "kv_cache_config": KvCacheConfig(**kv)}
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM
    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, QuantAlgo, QuantConfig

    if logprobs:
        kwargs["gather_generation_logits"] = True  # L9: checked per request on the TensorRT backend
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
        out = [dataclasses.replace(out[0], sample_index=k) for k in range(copies)]
    return out


def _one(request_id, c, prompt_len: int, stop: tuple[str, ...], top_k: int = 0) -> Completion:
    if c.finish_reason in ("timeout", "cancelled", None):
        # None: the sample was ended with its request before it finished (R5: a sibling's stop string aborts the
        # request); its text is cut short by neither a stop nor the length, so it is not a result
        why = f"request {c.finish_reason} in TensorRT-LLM" if c.finish_reason else \
            "TensorRT-LLM ended this sample without a finish reason (its request was aborted)"
        return Completion(request_id, finish_reason="error", error=why, num_prompt_tokens=prompt_len,
                          num_generated_tokens=len(c.token_ids or []), sample_index=c.index)
    text, hit = apply_stop(c.text, stop)  # the engine's own stop (n = 1), or batchrun's for several samples (R5)
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
