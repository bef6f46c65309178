from __future__ import annotations

import asyncio
import itertools
import os
import random
from dataclasses import dataclass, field

from tensorrt_llm.sampling_params import SamplingParams

# Keyword arguments of LLM(...) per backend (llmapi/llm_args.py: TorchLlmArgs / TrtLlmArgs), the subset used here.
COMMON_ARGS = {"model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
               "tensor_parallel_size", "pipeline_parallel_size", "dtype", "revision", "kv_cache_config",
               "max_batch_size", "max_num_tokens", "max_seq_len", "enable_chunked_prefill", "backend",
               "guided_decoding_backend"}
TRT_ONLY_ARGS = {"build_config", "quant_config", "enable_build_cache"}
POISON = "FAILREQ"  # a prompt containing this fails, as a per-request engine error would


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, compute):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs: list[CompletionOutput] = []
        self.finished = False
        self._compute = compute

    async def aresult(self) -> RequestOutput:
        await self._compute(self)
        self.finished = True
        return self

    def __await__(self):
        return self.aresult().__await__()


class _Tokenizer:
    """The LLM API exposes the HF tokenizer it loaded (llmapi/tokenizer.py: TransformersTokenizer)."""

    def __init__(self, path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)

    def encode(self, text, add_special_tokens=True):
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


class LLM:
    instances: list = []
    allowed = COMMON_ARGS

    def __init__(self, model, **kwargs):
        unknown = set(kwargs) - self.allowed
        if unknown:
            raise TypeError(f"LLM.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if not os.path.exists(model):
            raise ValueError(f"model {model} not found")
        self.model, self.args = model, kwargs
        tok_dir = kwargs.get("tokenizer") or model
        self.tokenizer = _Tokenizer(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None
        self._ids = itertools.count()
        self.is_shutdown = False
        self.in_flight = 0
        self.max_in_flight_seen = 0
        LLM.instances.append(self)

    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, streaming=False, **kw):
        if self.is_shutdown:
            raise RuntimeError("LLM is shut down")
        asyncio.get_running_loop()  # the documented async path needs a running loop
        sp = sampling_params or SamplingParams()
        if sp.guided_decoding is not None:
            sp.guided_decoding._validate()
            if self.args.get("guided_decoding_backend") not in ("xgrammar", "llguidance"):
                raise ValueError("guided decoding needs LLM(guided_decoding_backend=...)")
        if isinstance(inputs, str):
            prompt, ids = inputs, (self.tokenizer.encode(inputs, add_special_tokens=False) if self.tokenizer else [])
        else:
            prompt, ids = None, list(inputs)
        rid = next(self._ids)
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

        async def compute(out: RequestOutput):
            try:
                await asyncio.sleep(random.Random(rid * 7919).uniform(0, 0.02))  # finish out of order
                text_in = prompt if prompt is not None else (self.tokenizer.decode(ids) if self.tokenizer else "")
                if POISON in text_in:
                    raise RuntimeError("RequestError: the engine rejected this request")
                gen = list(reversed(ids))[: sp.max_tokens]
                text = self.tokenizer.decode(gen) if self.tokenizer else ""
                reason = "length" if len(gen) == sp.max_tokens else "stop"
                for s in ([sp.stop] if isinstance(sp.stop, str) else (sp.stop or [])):
                    if s in text:
                        text, reason = text[: text.index(s)], "stop"
                # TokenLogprobs: per token, the k likeliest (here: ids t+1.. with falling logprobs) plus the sampled one
                logprobs = [{**{t + j + 1: Logprob(-1.0 - j, j + 2) for j in range(sp.logprobs)}, t: Logprob(-0.5, 1)}
                            for t in gen] if sp.logprobs is not None else []
                out.outputs = [CompletionOutput(i, text, gen, None, logprobs, reason) for i in range(sp.n)]
            finally:
                self.in_flight -= 1

        return RequestOutput(rid, prompt, ids, compute)

    def save(self, engine_dir):
        os.makedirs(engine_dir, exist_ok=True)
        with open(os.path.join(engine_dir, "config.json"), "w") as fh:
            fh.write('{"built_by": "tensorrt_llm double"}')

    def shutdown(self):
        self.is_shutdown = True
