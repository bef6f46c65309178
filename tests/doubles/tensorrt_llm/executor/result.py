# R1-R3: where the real package defines its output types (tensorrt_llm/executor/result.py)
from tensorrt_llm._common import CompletionOutput, GenerationResult, Logprob  # noqa: F401
