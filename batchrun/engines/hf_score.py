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
from batchrun.engines.common import render_chat_template
from batchrun.engines.hf_backend import LaunchConfig, load_model
from batchrun.loglikelihood import model_input, pair_problem, prefix_token, tok_encode

log = logging.getLogger(__name__)
SEQ_LEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval resolve_max_length, in its order
BATCH_TOKENS = 2048  # tokens per forward pass (the logits of whole pairs are tokens x vocabulary)
BATCH_ROWS = 32  # rows whose choices share their prompt, scored in one batch


class HFScoreEngine(Engine):
    scores = True
    batch_limit = BATCH_ROWS  # rows scored in one batch: the worker keeps twice that queued (across shard ends)

    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False,
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
        self.prefix_token_id, self._bos_text = prefix_token(self.tokenizer)
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns); earlier ones have only it
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # the prompt pass needs each row's last logits only (left-padded: the last position), not tokens x vocabulary
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._queue: collections.deque[Request] = collections.deque()

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return tok_encode(self.tokenizer, self._bos_text, text, add_special_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok_encode(t) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        return render_chat_template(self.tokenizer, conversations)

    def submit(self, request: Request) -> None:
        self._queue.append(request)

    def poll(self, timeout: float) -> list[Completion]:
        """Score queued requests: rows whose choices share their prompt go through in batches (BATCH_ROWS, within
        BATCH_TOKENS), the others one by one."""
        done, deadline = [], time.monotonic() + timeout
        while self._queue and (not done or time.monotonic() < deadline):
            request = self._queue.popleft()
            if (why := pair_problem(request.pairs, self.context_length)) is not None:
                done.append(Completion(request.request_id, finish_reason="error", error=why))
                continue
            if not self._shares_its_prompt(request):
                done.append(self._completion(request, self._forward(self._whole, request.pairs)))
                continue
            batch, tokens = [request], self._tokens(request)
            while self._queue and len(batch) < BATCH_ROWS and self._batches_with(self._queue[0], tokens):
                tokens += self._tokens(self._queue[0])
                batch.append(self._queue.popleft())
            results = self._forward(self._shared_rows, [r.pairs for r in batch])
            done += [self._completion(r, res) for r, res in zip(batch, results)]
        return done

    def _shares_its_prompt(self, request: Request) -> bool:
        """One context for every pair, and context + longest continuation within the model's context."""
        pairs = request.pairs
        return len({ctx for ctx, _ in pairs}) == 1 and \
            len(pairs[0][0]) + max(len(c) for _, c in pairs) <= self.context_length + 1

    def _batches_with(self, request: Request, tokens: int) -> bool:
        return (pair_problem(request.pairs, self.context_length) is None and self._shares_its_prompt(request)
                and tokens + self._tokens(request) <= BATCH_TOKENS)

    @staticmethod
    def _tokens(request: Request) -> int:
        return len(request.pairs[0][0]) + sum(len(c) for _, c in request.pairs)

    @staticmethod
    def _forward(fn, arg):
        try:
            return fn(arg)
        except Exception as e:  # a failed forward pass is the engine's (out of memory, CUDA error), never the row's
            raise EngineDead(f"the model's forward pass failed: {type(e).__name__}: {e}") from e

    @staticmethod
    def _completion(request: Request, result) -> Completion:
        lls, greedy, computed = result
        return Completion(request.request_id, finish_reason="stop", num_prompt_tokens=computed,
                          pair_logprobs=lls, pair_greedy=greedy, pair_tokens=[len(c) for _, c in request.pairs])

    def _shared_rows(self, rows) -> list[tuple[list[float], list[bool], int]]:
        """Rows whose pairs share their prompt: the prompts in one pass (left-padded, so that each one's last token
        is the batch's last position), then every row's choices in one more pass, each on its own row's KV cache
        (cache rows selected per choice; positions continue each prompt's own)."""
        import torch

        ctxs, conts = [p[0][0] for p in rows], [[c for _, c in p] for p in rows]
        dev, width_ctx = self.model.device, max(len(c) for c in ctxs)
        mask = torch.tensor([[0] * (width_ctx - len(c)) + [1] * len(c) for c in ctxs], device=dev)
        ids = torch.tensor([[0] * (width_ctx - len(c)) + list(c) for c in ctxs], device=dev)
        owner = torch.tensor([i for i, cs in enumerate(conts) for _ in cs], device=dev)
        flat = [c for cs in conts for c in cs]
        width = max(len(c) for c in flat)
        targets = torch.tensor([list(c) + [0] * (width - len(c)) for c in flat], device=dev)
        valid = torch.tensor([[j < len(c) for j in range(width)] for c in flat], device=dev)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             use_cache=True, **self._last_logits_only)
            logp = out.logits[:, -1:].log_softmax(-1)[owner]  # predicts the first token of every continuation
            if width > 1:
                cache = getattr(out, self._cache_kwarg)
                cache.batch_select_indices(owner)
                lens = mask.sum(1)[owner]
                rest = self.model(input_ids=targets[:, :-1], use_cache=False, **{self._cache_kwarg: cache},
                                  attention_mask=torch.cat([mask[owner], valid[:, :-1].long()], 1),
                                  position_ids=lens[:, None] + torch.arange(width - 1, device=dev)[None]
                                  ).logits.log_softmax(-1)
                logp = torch.cat([logp, rest], 1)
            picked = logp.gather(-1, targets[..., None])[..., 0]
            lls = (picked * valid).sum(-1).tolist()
            greedy = ((logp.argmax(-1) == targets) | ~valid).all(-1).tolist()
        out, start = [], 0
        for ctx, cs in zip(ctxs, conts):
            out.append((lls[start:start + len(cs)], greedy[start:start + len(cs)],
                        len(ctx) + sum(len(c) - 1 for c in cs)))
            start += len(cs)
        return out

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
