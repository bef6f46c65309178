"""Scoring jobs (batchrun/loglikelihood.py) on TensorRT-LLM: log-likelihoods from context logits.

Each pair's log P(continuation | context) comes from the context logits of one request per pair (P1: prompt logprobs
are top-k only, so they cannot give it; P3: the logits of the prompt's positions). The request is what lm-eval's HF
backend feeds its model, (context + continuation)[-(window + 1):][:-1], generating one token; the last
len(continuation) positions' logits give the sum and is_greedy, over the model's own vocabulary (P5: the TensorRT
backend pads it).

A row's pairs share its prompt: with block reuse (on by default) the context's KV blocks are computed once and
reused by the row's other choices, and those positions have no logits. Which rows of the tensor are real depends on
the backend: the PyTorch backend returns only the positions it computed (P3); the TensorRT backend always returns
`prompt_len` rows, of which the first `cached_tokens` were never written (P5). A pair whose continuation fell into
reused blocks is asked again under a cache salt of its own, which reuses nothing (P3); a release without cache_salt
(1.0, V4) scores with block reuse off instead (translate.llm_class_and_kwargs), and on the TensorRT backend a result
that does not say how many tokens it reused is asked again too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from batchrun.engines.base import Completion, Request, Sampling
from batchrun.engines.common import model_args, sampling_from_spec
from batchrun.engines.trtllm.engine import TRTLLMEngine
from batchrun.engines.trtllm.options import vocab_size
from batchrun.loglikelihood import model_input, pair_problem, prefix_token, tok_encode


def create_scorer(spec, sampling) -> TRTScoreEngine:
    return TRTScoreEngine(spec.model, sampling_from_spec(sampling), **model_args(spec, spec.options))


class TRTScoreEngine(TRTLLMEngine):
    scores = True

    def __init__(self, model: str, sampling: Sampling, **kwargs):
        super().__init__(model, sampling, scoring=True, **kwargs)
        self.hf_tokenizer = getattr(self.tokenizer, "tokenizer", None) or self.tokenizer
        self.prefix_token_id, self._bos_text = prefix_token(self.hf_tokenizer)
        self.vocab = vocab_size(self.model)  # logits past it are the engine's padding (P5)
        # the request generates one token after its prompt (L9: prompt + max_tokens <= max_seq_len on the TensorRT
        # backend; the PyTorch backend caps the prompt at max_num_tokens): the window is what a prompt may hold
        windows = [n for n in (self.context_length - 1 if self.context_length else None, self.max_prompt_tokens) if n]
        self.context_length = min(windows) if windows else 2048  # lm-eval's default max_length
        self._params = self.tllm.SamplingParams(max_tokens=1, top_k=1, return_context_logits=True, detokenize=False)
        self.batch_limit = 32  # rows; their pairs wait for room in the logits budget
        width = self.vocab or getattr(self.hf_tokenizer, "vocab_size", None) or len(self.hf_tokenizer)
        budget = max(int(self.opts.score_logits_gib * 2**30 / (4 * width)), self.context_length)
        self._budget = _TokenBudget(budget)  # prompt tokens whose logits may be in flight at once
        self.resubmitted = 0  # pairs asked again without reuse (their continuation's logits were not computed)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return tok_encode(self.hf_tokenizer, self._bos_text, text, add_special_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok_encode(t) for t in texts]

    def submit(self, request: Request) -> None:
        if (why := pair_problem(request.pairs, self.context_length)) is not None:
            self._done.put(Completion(request.request_id, finish_reason="error", error=why))
            return
        self._loop.submit(self._score(request))

    async def _score(self, request: Request) -> None:
        try:
            scored = await asyncio.gather(*(self._pair(pair) for pair in request.pairs))
        except _Refused as e:  # the request's own failure (argument checks): an error row
            return self._fail(request, e.__cause__)
        except _Failed as e:  # a RequestError: the request's own, or a failed step (engine.py)
            return self._request_failed(request, e.__cause__)
        except Exception as e:
            return self._died(e)
        lls, greedy, computed, cached = zip(*scored)
        self._done.put(Completion(request.request_id, finish_reason="stop", num_prompt_tokens=sum(computed),
                                  num_cached_prompt_tokens=sum(cached), pair_logprobs=list(lls),
                                  pair_greedy=list(greedy), pair_tokens=[len(c) for _, c in request.pairs]))

    async def _pair(self, pair) -> tuple[float, bool, int, int]:
        tokens, n = model_input(pair, self.context_length)
        async with self._budget.hold(len(tokens)):
            logits = await self._context_logits(tokens, None)
            if logits.shape[0] < n and self.release.cache_salt:  # reused blocks cover the continuation: unshared
                self.resubmitted += 1
                logits = await self._context_logits(tokens, f"batchrun-{uuid.uuid4().hex}")
            if logits.shape[0] < n:
                raise RuntimeError(f"the engine returned {logits.shape[0]} context logits for a {len(tokens)}-token "
                                   f"prompt, fewer than the {n} the continuation needs")
            import torch

            logp = logits[-n:, : self.vocab].float().log_softmax(-1)
            target = torch.tensor(pair[1][-n:], device=logp.device)
            ll = float(logp.gather(-1, target[:, None]).sum())
            return ll, bool((logp.argmax(-1) == target).all()), logits.shape[0], len(tokens) - logits.shape[0]

    async def _context_logits(self, tokens: list[int], salt: str | None):
        """The logits of the positions the engine computed (the last ones: reused blocks come first)."""
        try:
            if salt is None:  # 1.0 has no cache_salt keyword (V4): never passed where it is not needed
                pending = self.llm.generate_async(tokens, sampling_params=self._params)
            else:
                pending = self.llm.generate_async(tokens, sampling_params=self._params, cache_salt=salt)
        except (ValueError, TypeError, self.request_error) as e:  # L7-L9 (L16: RequestError on newest)
            raise _Refused() from e
        try:
            output = await pending.aresult()
        except self.request_error as e:
            raise _Failed() from e
        logits = output.context_logits
        if logits is None:
            raise RuntimeError("the engine returned no context logits (SamplingParams.return_context_logits)")
        if self.opts.backend == "pytorch":
            return logits  # only the computed positions (P3)
        return logits[len(tokens) - self._computed_on_trt(output, len(tokens), salt):]

    def _computed_on_trt(self, output, prompt_len: int, salt: str | None) -> int:
        """How many of the TensorRT backend's prompt_len rows hold logits (P5): a salted request or one without
        block reuse computed every position; otherwise the result's cached_tokens (R4) says how many were reused,
        and a release that does not say gets the pair asked again."""
        if salt is not None or not self.prefix_reuse:
            return prompt_len
        cached = getattr(output, "cached_tokens", None)
        return 0 if cached is None else prompt_len - cached


class _Refused(Exception):
    """A pair's request was refused on its own: the row is an error row."""


class _Failed(Exception):
    """A pair's result raised RequestError: the request's own failure, or a step that failed."""


class _TokenBudget:
    """At most `limit` prompt tokens held at once (a request larger than the limit runs alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._freed: asyncio.Condition | None = None  # made on the engine's loop, where it is used

    @contextlib.asynccontextmanager
    async def hold(self, tokens: int):
        self._freed = self._freed or asyncio.Condition()
        async with self._freed:
            await self._freed.wait_for(lambda: self.used == 0 or self.used + tokens <= self.limit)
            self.used += tokens
        try:
            yield
        finally:
            async with self._freed:
                self.used -= tokens
                self._freed.notify_all()
