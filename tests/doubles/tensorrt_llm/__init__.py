"""A strict test double of tensorrt_llm's LLM API (TensorRT-LLM cannot be installed here), one release at a time
(_release.py). Every rule follows upstream's source, fact by fact, in UPSTREAM.md, with the releases it holds for;
it is never more permissive than the release it plays. Kept in tests/ only."""

import os

from tensorrt_llm._release import TENSORRT_BACKEND, VERSION

if TENSORRT_BACKEND:  # V6: tensorrt_llm._tensorrt_engine exists only in releases with the TensorRT backend
    __path__.append(os.path.join(os.path.dirname(os.path.dirname(__file__)), "_trt_backend"))  # noqa: F821

from tensorrt_llm._common import LLM, CompletionOutput, RequestOutput  # noqa: E402, F401  (L12: top-level exports)
from tensorrt_llm.sampling_params import SamplingParams  # noqa: E402, F401

__version__ = VERSION
