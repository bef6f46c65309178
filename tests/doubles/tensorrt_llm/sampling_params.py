from dataclasses import dataclass, field


@dataclass(kw_only=True)
class GuidedDecodingParams:
    # the documented fields (tensorrt_llm/sampling_params.py): one guide per request, no `choice`
    json: object = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self):
        if sum(bool(getattr(self, f)) for f in ("json", "regex", "grammar", "json_object", "structural_tag")) > 1:
            raise ValueError("Only one guide can be used for a request")


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
