"""The hf engine for scoring jobs: log P(continuation | context) of each of a request's pairs, no generation.

Used when the job scores instead of generating (`score.method: loglikelihood | loglikelihood_rolling`, `output.parse:
{kind: choice, probabilities: true}`; the rules are in batchrun/loglikelihood.py). No continuous batching manager is
started: its paged KV cache would take the memory the forward passes need, and nothing is decoded.

A row's choices share its prompt: the prompt is computed once, and its KV cache is repeated for the choices, which go
through the model as one batch (right-padded; a causal model's padding after a sequence changes nothing before it).
Pairs that do not share a context (perplexity windows), or that do not fit the context together, go through whole,
in padded batches across requests, as lm-eval runs them. Requests are computed in `poll`, on the worker's main loop:
submit only queues them.

Batches are sized for the device and cut from the queue sorted by length, longest first (as lm-eval's Collator
does): padding is what a batch wastes, and on a GPU a forward pass of a few thousand tokens is mostly launch and
Python time (bench/RESULTS.md, scoring against lm-eval). `engine.options.score_batch_tokens` / `score_batch_rows`
override the sizes.
"""

from __future__ import annotations

import inspect
import logging
import time

from batchrun.engines.base import Completion, Engine, EngineDead, Request, Sampling
from batchrun.engines.common import render_chat_template
from batchrun.engines.hf_backend import LaunchConfig, load_model
from batchrun.loglikelihood import model_input, pair_problem, prefix_token, tok_encode

log = logging.getLogger(__name__)
SEQ_LEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval resolve_max_length, in its order
# Per forward pass, padded: prompt tokens of rows sharing their prompts (their choices' KV copies are bounded by the
# same budget times KV_PER_PROMPT_TOKEN), and rows. Whole pairs' passes return tokens x vocabulary logits: half.
BATCH_TOKENS, BATCH_ROWS = 2048, 32  # a CPU
CUDA_BATCH_TOKENS, CUDA_BATCH_ROWS = 32768, 256  # a GPU with room (cuda_batch below)
KV_PER_PROMPT_TOKEN = 4  # a batch's choices may hold this many KV copies of its prompts


def cuda_batch(free_bytes: int) -> tuple[int, int]:
    """What a GPU's free memory (after the load) allows: the 32k-token batch from 24 GiB free, less below."""
    gib = free_bytes / 2**30
    tokens = CUDA_BATCH_TOKENS if gib >= 24 else 16384 if gib >= 8 else 4096
    return tokens, CUDA_BATCH_ROWS


class HFScoreEngine(Engine):
    scores = True

    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 score_batch_tokens: int | None = None, score_batch_rows: int | None = None, **options):
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
        tokens, rows = self._batch_size()
        self.batch_tokens, self.batch_rows = score_batch_tokens or tokens, score_batch_rows or rows
        self.batch_limit = self.batch_rows  # rows in one batch: the worker keeps twice that queued (across shards)
        self._queue: list[Request] = []
        self._longest_first = True  # False: input order (bench/score.py's "old" configuration)

    def _batch_size(self) -> tuple[int, int]:
        import torch

        dev = self.model.device
        if dev.type != "cuda":
            return BATCH_TOKENS, BATCH_ROWS
        return cuda_batch(torch.cuda.mem_get_info(dev)[0])

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return tok_encode(self.tokenizer, self._bos_text, text, add_special_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok_encode(t) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        return render_chat_template(self.tokenizer, conversations)

    def submit(self, request: Request) -> None:
        self._queue.append(request)

    def poll(self, timeout: float) -> list[Completion]:
        """Score queued requests, longest first: rows whose choices share their prompt in batches of similar
        lengths (batch_rows, within batch_tokens padded), the others' pairs whole, in padded batches of their own."""
        done, deadline = [], time.monotonic() + timeout
        if self._longest_first:
            self._queue.sort(key=lambda r: -len(r.pairs[0][0]) if r.pairs else 0)
        while self._queue and (not done or time.monotonic() < deadline):
            request = self._queue[0]
            if (why := pair_problem(request.pairs, self.context_length)) is not None:
                self._queue.pop(0)
                done.append(Completion(request.request_id, finish_reason="error", error=why))
            elif self._shares_its_prompt(request):
                batch = self._take(self._fits_shared)
                results = self._forward(self._shared_rows, [r.pairs for r in batch])
                done += [self._completion(r, res) for r, res in zip(batch, results)]
            else:
                batch = self._take(self._fits_whole)
                results = self._forward(self._whole_requests, [r.pairs for r in batch])
                done += [self._completion(r, res) for r, res in zip(batch, results)]
        return done

    def _take(self, fits) -> list[Request]:
        """The first queued request and the next ones of its kind that fit with it (the queue is sorted longest
        first, so the first one's width is the batch's)."""
        batch, rest = [self._queue[0]], []
        for r in self._queue[1:]:
            if len(batch) < self.batch_rows and fits(batch, r):
                batch.append(r)
            else:
                rest.append(r)
        self._queue = rest
        return batch

    def _fits_shared(self, batch: list[Request], request: Request) -> bool:
        if pair_problem(request.pairs, self.context_length) is not None or not self._shares_its_prompt(request):
            return False
        width = len(batch[0].pairs[0][0])  # the longest prompt: the queue is sorted
        kv = sum(len(r.pairs[0][0]) * len(r.pairs) for r in batch) + len(request.pairs[0][0]) * len(request.pairs)
        return (len(batch) + 1) * width <= self.batch_tokens and kv <= self.batch_tokens * KV_PER_PROMPT_TOKEN

    def _fits_whole(self, batch: list[Request], request: Request) -> bool:
        if pair_problem(request.pairs, self.context_length) is not None or self._shares_its_prompt(request):
            return False
        return sum(len(c) + len(x) for r in (*batch, request) for c, x in r.pairs) <= self.batch_tokens // 2

    def _shares_its_prompt(self, request: Request) -> bool:
        """One context for every pair, and context + longest continuation within the model's context."""
        pairs = request.pairs
        return len({ctx for ctx, _ in pairs}) == 1 and \
            len(pairs[0][0]) + max(len(c) for _, c in pairs) <= self.context_length + 1

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

    def _whole_requests(self, requests) -> list[tuple[list[float], list[bool], int]]:
        """Several requests' pairs through the model whole together; each request's results back."""
        lls, greedy, tokens = self._whole_pairs([p for pairs in requests for p in pairs])
        out, start = [], 0
        for pairs in requests:
            end = start + len(pairs)
            out.append((lls[start:end], greedy[start:end], sum(tokens[start:end])))
            start = end
        return out

    def _whole_pairs(self, pairs) -> tuple[list[float], list[bool], list[int]]:
        """Each pair through the model whole, (context + continuation)[-(max_length + 1):][:-1], in padded batches
        of similar lengths (longest first); results and each pair's input tokens in the pairs' order."""
        import torch

        inputs = [model_input(p, self.context_length) for p in pairs]
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        sums_by, hits_by = [0.0] * len(inputs), [False] * len(inputs)
        dev, start, budget = self.model.device, 0, self.batch_tokens // 2
        while start < len(order):
            end, longest = start, 0
            while end < len(order) and (end == start or max(longest, len(inputs[order[end]][0])) * (end - start + 1)
                                        <= budget):
                longest = max(longest, len(inputs[order[end]][0]))
                end += 1
            rows = order[start:end]
            chunk = [inputs[i] for i in rows]
            ids = torch.tensor([t + [0] * (longest - len(t)) for t, _ in chunk], device=dev)
            mask = torch.tensor([[1] * len(t) + [0] * (longest - len(t)) for t, _ in chunk], device=dev)
            with torch.inference_mode():
                logp = self.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
                sums, hits = [], []
                for row, ((tokens, n), i) in enumerate(zip(chunk, rows)):
                    picked = logp[row, len(tokens) - n: len(tokens)]
                    target = torch.tensor(pairs[i][1], device=dev)
                    sums.append(picked.gather(-1, target[:, None]).sum())
                    hits.append((picked.argmax(-1) == target).all())
                for i, ll, hit in zip(rows, torch.stack(sums).tolist(), torch.stack(hits).tolist()):
                    sums_by[i], hits_by[i] = ll, hit  # one transfer per batch, not one per pair
            start = end
        return sums_by, hits_by, [len(t) for t, _ in inputs]

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
