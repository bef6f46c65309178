"""A test double of the documented tensorrt_llm LLM API surface (TensorRT-LLM cannot be installed here).

It follows the documented API: LLM(model, **llm_args) validates its keyword arguments; generate_async() returns a
RequestOutput at once, finished with `await output.aresult()`; RequestOutput carries request_id, prompt_token_ids,
outputs[CompletionOutput(index, text, token_ids, logprobs, finish_reason)]; shutdown() stops it. Generation is a
deterministic toy (the prompt's tokens reversed), finishing after a per-request delay so completions come back out
of order. Kept in tests/ only.
"""

from tensorrt_llm._common import LLM, CompletionOutput, RequestOutput  # noqa: F401
from tensorrt_llm.sampling_params import SamplingParams  # noqa: F401

__version__ = "1.0.0+double"
