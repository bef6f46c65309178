# L2: tensorrt_llm/_tensorrt_engine/__init__.py: `from tensorrt_llm.llmapi.llm import _TrtLLM as LLM`
from tensorrt_llm._common import _TrtLLM as LLM  # noqa: F401
