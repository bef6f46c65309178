"""Hugging Face transformers continuous batching (ContinuousBatchingManager) as a batchrun engine.

transformers' CB API moves between releases; this file is the only place that touches it
(transformers/generation/continuous_batching/continuous_api.py: init_continuous_batching, add_request,
get_result; GenerationOutput in requests.py).
"""

from __future__ import annotations

import logging

from batchrun.engines.base import Completion, Engine, Request, Sampling, apply_stop

log = logging.getLogger(__name__)

# On a CPU the manager cannot size its KV cache from GPU memory: give it a small paged cache that holds the window.
CPU_CB_DEFAULTS = {"num_blocks": 256, "max_batch_tokens": 512}


class EngineDead(RuntimeError):
    """The engine's generation loop died: the worker must be restarted, the in-flight shards go back to the queue."""


class HFEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, max_in_flight: int = 64, **options):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16,
                       "bfloat16": torch.bfloat16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(device).eval()
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.max_in_flight = max_in_flight
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        gen = GenerationConfig(
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature or None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k or None,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
        )
        cb_options = dict(CPU_CB_DEFAULTS) if device == "cpu" else {}
        cb_options.update(options)
        if sampling.seed is not None:
            cb_options.setdefault("seed", sampling.seed)
        self.manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb_options)
        )
        self.manager.start()
        self._stop = {}  # request_id -> stop strings, applied to the text when it finishes

    def encode(self, texts: list[str]) -> list[list[int]]:
        # Batch encoding in the fast tokenizer's Rust code: one call per shard, not one per row.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def submit(self, request: Request) -> None:
        if request.sampling.stop:
            self._stop[request.request_id] = request.sampling.stop
        rid = self.manager.add_request(
            input_ids=request.prompt_token_ids,
            request_id=request.request_id,
            max_new_tokens=request.sampling.max_tokens,
        )
        if rid is None:
            raise EngineDead("the continuous batching manager refused a request (its loop is stopping or dead)")

    def poll(self, timeout: float) -> list[Completion]:
        out = []
        result = self.manager.get_result(timeout=timeout)
        while result is not None:
            if result.is_finished():
                out.append(self._completion(result))
            result = self.manager.get_result(timeout=0)
        if not out and not self.manager.is_running():
            raise EngineDead(f"the generation loop stopped: {self.manager.background_thread_status.fatal_error!r}")
        return out

    def _completion(self, result) -> Completion:
        rid = result.request_id
        stop = self._stop.pop(rid, ())
        if result.error is not None:
            return Completion(rid, finish_reason="error", error=str(result.error),
                              num_prompt_tokens=len(result.prompt_ids))
        tokens = list(result.generated_tokens)
        ended = bool(tokens) and tokens[-1] in self.eos_ids
        if ended:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit_stop = apply_stop(text, stop)
        return Completion(
            request_id=rid,
            text=text,
            token_ids=tokens,
            finish_reason="stop" if ended or hit_stop else "length",
            num_prompt_tokens=len(result.prompt_ids),
            num_generated_tokens=len(tokens),
            logprobs=list(result.logprobs) or None,
        )

    def close(self) -> None:
        manager, self.manager = getattr(self, "manager", None), None
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()
