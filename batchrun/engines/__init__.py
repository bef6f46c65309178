"""Engine adapters behind one interface (base.Engine). `create_engine` picks one from the job spec."""

from __future__ import annotations

import importlib

from batchrun.engines.base import Completion, Engine, Request, Sampling
from batchrun.spec import EngineSpec, ParseSpec, SamplingSpec


def sampling_from_spec(s: SamplingSpec) -> Sampling:
    return Sampling(s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, tuple(s.stop), s.n, s.logprobs,
                    s.top_logprobs)


def create_engine(spec: EngineSpec, sampling: SamplingSpec, parse: ParseSpec | None = None) -> Engine:
    """`parse`, when guided, constrains what the engine may generate (built-in engines only)."""
    guide = parse if parse is not None and parse.guided else None
    common = dict(max_in_flight=spec.max_in_flight, **spec.options)
    if spec.name == "echo":
        from batchrun.engines.echo import EchoEngine

        return EchoEngine(**common)
    model_args = dict(tokenizer=spec.tokenizer, dtype=spec.dtype, device=spec.device,
                      trust_remote_code=spec.trust_remote_code, tensor_parallel_size=spec.tensor_parallel_size, **common)
    if spec.name == "hf":
        from batchrun.engines.hf import HFEngine

        return HFEngine(spec.model, sampling_from_spec(sampling), row_keys=tuple(sampling.per_row),
                        choices=guide.choices if guide else None, **model_args)
    if spec.name == "trtllm":
        from batchrun.engines.trtllm import TRTLLMEngine

        return TRTLLMEngine(spec.model, sampling_from_spec(sampling), guide=guide, **model_args)
    # An explicit `module:Class` hook, the one place a job file names code.
    module, _, attr = spec.name.partition(":")
    factory = importlib.import_module(module)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(model=spec.model, sampling=sampling_from_spec(sampling), **model_args)


__all__ = ["Completion", "Engine", "Request", "Sampling", "create_engine", "sampling_from_spec"]
