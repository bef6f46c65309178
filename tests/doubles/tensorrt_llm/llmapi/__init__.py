# L12: tensorrt_llm/llmapi/__init__.py exports (GuidedDecodingParams is exported here in every release, wherever
# its defining module is); BuildConfig only while the TensorRT backend exists (V6)
from tensorrt_llm._args import CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig  # noqa: F401
from tensorrt_llm._common import LLM, CompletionOutput, RequestOutput  # noqa: F401
from tensorrt_llm._release import TENSORRT_BACKEND
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams  # noqa: F401

if TENSORRT_BACKEND:
    from tensorrt_llm._args import BuildConfig  # noqa: F401
