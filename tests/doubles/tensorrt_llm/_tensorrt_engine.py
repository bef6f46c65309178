import os

from tensorrt_llm._common import COMMON_ARGS, TRT_ONLY_ARGS
from tensorrt_llm._common import LLM as _Base


class LLM(_Base):
    """The TensorRT-engine backend: also takes build_config and quant_config."""

    allowed = COMMON_ARGS | TRT_ONLY_ARGS
    builds = 0

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        if not os.path.exists(os.path.join(model, "batchrun_build.json")):
            LLM.builds += 1  # a checkpoint, not a built engine: this constructor builds one
