"""A strict test double of tensorrt_llm's LLM API (TensorRT-LLM cannot be installed here). Every rule follows
upstream's source, fact by fact, in UPSTREAM.md; it is never more permissive than upstream. Kept in tests/ only."""

from tensorrt_llm._common import LLM, CompletionOutput, RequestOutput  # noqa: F401  (L12: top-level exports)
from tensorrt_llm.sampling_params import SamplingParams  # noqa: F401

__version__ = "1.0.0+double"
