from dataclasses import dataclass, field


@dataclass
class GuidedDecodingParams:
    json: object = None
    regex: str | None = None
    choice: list | None = None


@dataclass
class SamplingParams:
    # the documented fields the adapter uses (tensorrt_llm/sampling_params.py)
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    guided_decoding: GuidedDecodingParams | None = None
    end_id: int | None = None
    pad_id: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.n < 1:
            raise ValueError("n must be >= 1")
