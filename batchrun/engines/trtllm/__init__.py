"""TensorRT-LLM through its LLM API (releases 1.0 and later): the production engine.

Every upstream fact this adapter relies on is recorded, with the file, symbol, version read and the releases it
holds for, in tests/doubles/tensorrt_llm/UPSTREAM.md; the ids in comments (S3, L9, V1, ...) point there. The strict
test double in that folder models each supported release where they differ (tests select the release).

- `releases`: which release is installed (plan time: its metadata; in the worker: the module, with feature
  checks) and what it can do: the sampler that honours seeds, cache_salt, top-k logprobs, the TensorRT backend.
- `options`: engine.options and every rule checked before a GPU is touched (`check`, run by `batchrun plan`).
- `translate`: requests and options in TensorRT-LLM's terms (SamplingParams, LLM keywords) and results back.
- `engine`: the generation engine (whose failure is whose), bounded shutdown, `batchrun build`.
- `score`: log-likelihood scoring from context logits.

Backends (L2): `tensorrt_llm.LLM` is the PyTorch backend; `tensorrt_llm._tensorrt_engine.LLM` builds or loads
TensorRT engines (gone from 1.3.0rc22 on, V6).
"""

from batchrun.engines.trtllm.engine import TRTLLMEngine, build_engine, create, shutdown_llm
from batchrun.engines.trtllm.options import (
    TRTLLMOptions,
    build_fingerprint,
    check,
    engine_dir_for,
    limits,
    options_model,
)
from batchrun.engines.trtllm.score import TRTScoreEngine, create_scorer
from batchrun.engines.trtllm.translate import guided_decoding, llm_class_and_kwargs, sampling_params, to_completions

__all__ = [
    "TRTLLMEngine", "TRTLLMOptions", "TRTScoreEngine", "build_engine", "build_fingerprint", "check", "create",
    "create_scorer", "engine_dir_for", "guided_decoding", "limits", "llm_class_and_kwargs", "options_model",
    "sampling_params", "shutdown_llm", "to_completions",
]
