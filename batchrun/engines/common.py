"""What every engine module needs to build itself from the job spec (no engine-specific rule here)."""

from __future__ import annotations

import os

from batchrun.engines.base import Sampling
from batchrun.spec import EngineSpec, JobSpec, SamplingSpec


def sampling_from_spec(s: SamplingSpec) -> Sampling:
    return Sampling(s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, tuple(s.stop), s.n, s.logprobs,
                    s.top_logprobs)


def model_args(spec: EngineSpec, options: dict) -> dict:
    """The constructor arguments every model-backed engine takes."""
    return dict(tokenizer=spec.tokenizer, dtype=spec.dtype, device=spec.device,
                trust_remote_code=spec.trust_remote_code, tensor_parallel_size=spec.tensor_parallel_size, **options)


def require_model_dir(spec: JobSpec) -> None:
    """For engines that load a local model: engine.model must name a directory (a URL is left to the engine)."""
    model = spec.engine.model
    if not model:
        raise ValueError(f"engine.model is required for engine {spec.engine.name!r} (a local model directory)")
    if "://" not in model and not os.path.isdir(model):
        raise ValueError(f"key 'engine.model': {model} is not a directory (expected a local model dir)")


def render_chat_template(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Each conversation through a Hugging Face tokenizer's chat template, ready for the model's reply."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template (input.chat / messages need one)")
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
