# L12: tensorrt_llm/llmapi/__init__.py exports (GuidedDecodingParams is exported here in every release, wherever
# its defining module is)
from tensorrt_llm._args import BuildConfig, CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig  # noqa: F401
from tensorrt_llm._common import LLM, CompletionOutput, RequestOutput  # noqa: F401
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams  # noqa: F401
