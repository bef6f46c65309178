"""The hf engine for scoring jobs: log P(continuation | context) of each of a request's pairs, no generation.

Used when the job scores instead of generating (`score.method: loglikelihood | loglikelihood_rolling`, `output.parse:
{kind: choice, probabilities: true}`; the rules are in batchrun/loglikelihood.py). No continuous batching manager is
started: its paged KV cache would take the memory the forward passes need, and nothing is decoded.

A row's choices share its prompt: the prompt is computed once, and its KV cache is repeated for the choices, which go
through the model as one batch (right-padded; a causal model's padding after a sequence changes nothing before it).
Pairs that do not share a context (perplexity windows), or that do not fit the context together, go through whole,
one padded batch each, as lm-eval runs them. Requests are computed in `poll`, on the worker's main loop: submit only
queues them.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time

from batchrun.engines.base import Completion, Engine, EngineDead, Request, Sampling
from batchrun.engines.build import render_chat_template
from batchrun.engines.hf_backend import LaunchConfig, load_model
from batchrun.loglikelihood import model_input

log = logging.getLogger(__name__)
SEQ_LEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval resolve_max_length, in its order
BATCH_TOKENS = 8192  # tokens per forward pass of whole pairs


class HFScoreEngine(Engine):
    scores = True

    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, max_in_flight: int | None = None,
                 tensor_parallel_size: int = 1, **options):
        started = time.monotonic()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
        tokenizer_s = round(time.monotonic() - started, 3)
        self.model, _, timings = load_model(LaunchConfig(model, sampling, dtype, device, trust_remote_code))
        self.startup = {"tokenizer_s": tokenizer_s, **timings}
        cfg = getattr(self.model.config, "text_config", None) or self.model.config
        length = next((getattr(cfg, a) for a in SEQ_LEN_ATTRS if getattr(cfg, a, None) is not None), None)
        if length is None:
            tml = getattr(self.tokenizer, "model_max_length", None)
            length = tml if tml is not None and tml < 1e29 else 2048
        self.context_length = int(length)
        tok = self.tokenizer
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._bos_text = tok.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self.max_in_flight = max_in_flight
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns); earlier ones have only it
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._queue: collections.deque[Request] = collections.deque()

    def window(self, tokens_per_request: float) -> tuple[int, str]:
        if self.max_in_flight:
            return self.max_in_flight, "engine.max_in_flight"
        return 64, "scoring: poll computes the queued rows one by one; 64 keep it busy across shard boundaries"

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """lm-eval's HFLM.tok_encode with its defaults: the tokenizer's own special tokens unless told, none when the
        text already starts with the BOS text."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(text, **kwargs)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok_encode(t) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        return render_chat_template(self.tokenizer, conversations)

    def submit(self, request: Request) -> None:
        self._queue.append(request)

    def poll(self, timeout: float) -> list[Completion]:
        done, deadline = [], time.monotonic() + timeout
        while self._queue and (not done or time.monotonic() < deadline):
            done.append(self._score(self._queue.popleft()))
        return done

    def _score(self, request: Request) -> Completion:
        pairs = request.pairs or ()
        too_long = [i for i, (_, cont) in enumerate(pairs) if len(cont) > self.context_length]
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if not pairs or too_long or empty:
            why = ("no choice to score" if not pairs else
                   f"choice {empty[0]} encodes to no tokens" if empty else
                   f"choice {too_long[0]} is longer than the model's context ({self.context_length} tokens)")
            return Completion(request.request_id, finish_reason="error", error=why)
        try:
            shared = len({ctx for ctx, _ in pairs}) == 1 and \
                len(pairs[0][0]) + max(len(c) for _, c in pairs) <= self.context_length + 1
            lls, greedy, computed = self._shared(pairs) if shared else self._whole(pairs)
        except Exception as e:  # a failed forward pass is the engine's (out of memory, CUDA error), never the row's
            raise EngineDead(f"the model's forward pass failed: {type(e).__name__}: {e}") from e
        return Completion(request.request_id, finish_reason="stop", num_prompt_tokens=computed,
                          pair_logprobs=lls, pair_greedy=greedy, pair_tokens=[len(c) for _, c in pairs])

    def _shared(self, pairs) -> tuple[list[float], list[bool], int]:
        """One pass over the shared context, then every continuation at once on its repeated KV cache."""
        import torch

        ctx, conts = pairs[0][0], [c for _, c in pairs]
        dev, k, width = self.model.device, len(conts), max(len(c) for c in conts)
        # targets[i, j]: continuation i's token j (0-padded); logp[i, j] the distribution that predicts it
        targets = torch.tensor([list(c) + [0] * (width - len(c)) for c in conts], device=dev)
        valid = torch.tensor([[j < len(c) for j in range(width)] for c in conts], device=dev)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ctx)], device=dev), use_cache=True)
            logp = out.logits[:, -1:].log_softmax(-1).expand(k, 1, -1)  # the first token of every continuation
            if width > 1:
                cache = getattr(out, self._cache_kwarg)
                cache.batch_repeat_interleave(k)
                mask = torch.cat([torch.ones(k, len(ctx), dtype=torch.long, device=dev), valid[:, :-1].long()], 1)
                rest = self.model(input_ids=targets[:, :-1], attention_mask=mask, use_cache=False,
                                  **{self._cache_kwarg: cache}).logits.log_softmax(-1)
                logp = torch.cat([logp, rest], 1)
            picked = logp.gather(-1, targets[..., None])[..., 0]
            lls = (picked * valid).sum(-1).tolist()
            greedy = ((logp.argmax(-1) == targets) | ~valid).all(-1).tolist()
        return lls, greedy, len(ctx) + sum(len(c) - 1 for c in conts)

    def _whole(self, pairs) -> tuple[list[float], list[bool], int]:
        """Each pair through the model whole, (context + continuation)[-(max_length + 1):][:-1], in padded batches."""
        import torch

        inputs = [model_input(p, self.context_length) for p in pairs]
        lls, greedy, dev, start = [], [], self.model.device, 0
        while start < len(inputs):
            end, longest = start, 0
            while end < len(inputs) and (end == start or max(longest, len(inputs[end][0])) * (end - start + 1)
                                         <= BATCH_TOKENS):
                longest = max(longest, len(inputs[end][0]))
                end += 1
            chunk = inputs[start:end]
            ids = torch.tensor([t + [0] * (longest - len(t)) for t, _ in chunk], device=dev)
            mask = torch.tensor([[1] * len(t) + [0] * (longest - len(t)) for t, _ in chunk], device=dev)
            with torch.inference_mode():
                logp = self.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
                sums, hits = [], []
                for row, ((tokens, n), (_, cont)) in enumerate(zip(chunk, pairs[start:end])):
                    picked = logp[row, len(tokens) - n: len(tokens)]
                    target = torch.tensor(cont, device=dev)
                    sums.append(picked.gather(-1, target[:, None]).sum())
                    hits.append((picked.argmax(-1) == target).all())
                lls += torch.stack(sums).tolist()  # one transfer per batch, not one per pair
                greedy += torch.stack(hits).tolist()
            start = end
        return lls, greedy, sum(len(t) for t, _ in inputs)

    def close(self) -> None:
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            del model
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
