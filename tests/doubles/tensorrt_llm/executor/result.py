# where the real package defines its output types (tensorrt_llm/executor/result.py)
from tensorrt_llm._common import CompletionOutput, Logprob  # noqa: F401
