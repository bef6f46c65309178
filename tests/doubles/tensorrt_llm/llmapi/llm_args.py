"""llmapi/llm_args.py: the argument models' field sets, per release (A1, A2, V1, V2). Upstream's are pydantic
models; the adapter reads only `model_fields` (to tell the sampler flags of 1.0 from sampler_type)."""

from tensorrt_llm._args import TORCH_LLM_ARGS, TRT_LLM_ARGS
from tensorrt_llm._release import TENSORRT_BACKEND


class TorchLlmArgs:
    model_fields = dict.fromkeys(sorted(TORCH_LLM_ARGS))


if TENSORRT_BACKEND:
    class TrtLlmArgs:
        model_fields = dict.fromkeys(sorted(TRT_LLM_ARGS))
