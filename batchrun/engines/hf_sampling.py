"""Sampling for the HF engine that does not depend on batching: per-row settings, per-row seeds, choice constraints.

transformers' continuous batching samples the whole batch with one `torch.multinomial` on the global generator, so a
row's sample depends on which rows share its batch, on the shard size and on the worker count. batchrun replaces the
manager's logits processor list (before `start()`) with `RowSampler`, a `ContinuousBatchingLogitsProcessorList` that:

- scales and filters each row by its own temperature, top-k and top-p (per-request kwargs of `add_request`);
- adds Gumbel noise drawn from a counter-based hash of (row seed, sample index, step, token id), then lets the
  manager take the argmax (`do_sample=False`): Gumbel-max sampling, exact for the filtered distribution, and the same
  noise for the same row whatever else is in the batch;
- optionally masks every token that does not continue one of the allowed choices (a token trie), then EOS.

Per step, Python work is a few scalars per request (`prepare_tensor_args`); the tensor work is pure and static in
shape, so it can be captured in CUDA graphs like the stock processors. Facts relied on, transformers 5.24
(generation/continuous_batching): cb_logits_processors.py (the list's interface: tensors_required, fill_defaults,
prepare_tensor_args, __call__, check_kwargs, do_processing); input_outputs.py (arg storage sized by tensors_required);
model_runner.py `_sample` (argmax when not do_sample; logprobs from the processed scores); requests.py
`create_equivalent_initial_request` (kwargs deep-copied on soft reset and fork, so per-request counters survive).
"""

from __future__ import annotations

import hashlib

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
from transformers.generation.logits_process import LogitsProcessorList

from batchrun.engines.base import Sampling

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
# argument rows: the row's key (seed and sample), its step, temperature, top-p, top-k; then the allowed tokens
KEY, STEP, TEMPERATURE, TOP_P, TOP_K, ALLOWED = range(6)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values < 2**32 (products stay below 2**63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def gumbel_noise(key: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, vocab]; element (r, t) depends only on key[r], step[r] and t."""
    row = _mix((key & M32) ^ _mix(step & M32))
    tokens = torch.arange(vocab, device=key.device, dtype=torch.int64)
    bits = _mix((row.unsqueeze(-1) + tokens * GOLDEN) & M32)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def request_key(seed: int, salt) -> int:
    digest = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)  # an int32, as the arg storage holds


def sample_index(request_id: str) -> int:
    """transformers names the extra samples of a request `<id>__child#k` (continuous_api.py, fork)."""
    _, _, child = request_id.partition("__child#")
    return int(child) + 1 if child else 0


class ChoiceTrie:
    """Token sequences of the allowed choices; which tokens may come next after a generated prefix."""

    def __init__(self, choices: list[list[int]], eos_ids: list[int]):
        self.root: dict = {}
        for seq in choices:
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})
            node[None] = True  # a choice ends here
        self.eos_ids = list(eos_ids)
        self.width = self._width(self.root)

    def _width(self, node: dict) -> int:
        here = len([k for k in node if k is not None]) + (len(self.eos_ids) if None in node else 0)
        return max([here] + [self._width(child) for k, child in node.items() if k is not None])

    def allowed(self, generated: list[int]) -> list[int]:
        node = self.root
        for tok in generated:
            node = node.get(tok)
            if node is None:  # cannot happen while the mask holds; end the request rather than run free
                return self.eos_ids
        return [k for k in node if k is not None] + (self.eos_ids if None in node else [])


def _generated(state) -> list[int]:
    """All tokens a request generated, also after a soft reset folded some into its prompt (requests.py)."""
    true_initial = getattr(state, "_true_initial_tokens", 0)
    earlier = state.initial_tokens[true_initial:] if true_initial else []
    return earlier + state.generated_tokens


class RowSampler(ContinuousBatchingLogitsProcessorList):
    """Replaces the manager's processor list: see the module docstring."""

    def __init__(self, sampling: Sampling, *, noise: bool, trie: ChoiceTrie | None = None,
                 base_seed: int = 0, use_top_k: bool = False, use_top_p: bool = False):
        # The parent's __init__ converts stock processors; this list computes everything itself.
        self.logits_processor = LogitsProcessorList()
        self.defaults = sampling
        self.noise, self.trie, self.base_seed = noise, trie, base_seed
        self.use_top_k, self.use_top_p = use_top_k, use_top_p
        self.width = trie.width if trie is not None else 0
        self.tensors_required = ALLOWED + self.width
        self.supported_keys = {"temperature": float, "top_p": float, "top_k": int, "seed": int}
        self.ignored_keys = set()
        self.do_processing = True

    def __repr__(self) -> str:
        return f"RowSampler(noise={self.noise}, choices_width={self.width}, top_k={self.use_top_k}, " \
               f"top_p={self.use_top_p})"

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        s = self.defaults
        int32_tensor[KEY].fill_(0)
        int32_tensor[STEP].fill_(0)
        int32_tensor[TEMPERATURE].copy_(torch.tensor([s.temperature], dtype=torch.float32).view(torch.int32))
        int32_tensor[TOP_P].copy_(torch.tensor([s.top_p], dtype=torch.float32).view(torch.int32))
        int32_tensor[TOP_K].fill_(s.top_k)
        int32_tensor[ALLOWED:].fill_(-1)

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        states = [r.state for r in requests_in_batch if r.has_new_token]  # one logits row each, in this order
        if not states:
            return arg_storage
        s = self.defaults
        ints = [[0] * len(states) for _ in range(ALLOWED + self.width)]
        floats = [[s.temperature] * len(states), [s.top_p] * len(states)]
        for i, state in enumerate(states):
            kw = state.logit_processor_kwargs
            if kw.get("_for") != state.request_id:  # first step of this request (a forked child copies the kwargs)
                seed = kw.get("seed")
                if seed is None:  # unseeded: from the engine's random base, the same on every tensor-parallel rank
                    seed = request_key(self.base_seed, state.request_id.partition("__child#")[0])
                kw.update(_for=state.request_id, _key=request_key(seed, sample_index(state.request_id)), _step=0)
            ints[KEY][i], ints[STEP][i] = kw["_key"], kw["_step"] & 0x7FFFFFFF
            kw["_step"] += 1
            floats[0][i] = kw.get("temperature", s.temperature)
            floats[1][i] = kw.get("top_p", s.top_p)
            ints[TOP_K][i] = kw.get("top_k", s.top_k)
            if self.trie is not None:
                allowed = self.trie.allowed(_generated(state))
                for j in range(self.width):
                    ints[ALLOWED + j][i] = allowed[j] if j < len(allowed) else -1
        n = len(states)
        args = torch.tensor(ints, dtype=torch.int32)
        args[TEMPERATURE] = torch.tensor(floats[0], dtype=torch.float32).view(torch.int32)
        args[TOP_P] = torch.tensor(floats[1], dtype=torch.float32).view(torch.int32)
        arg_storage[:, :n] = args.to(arg_storage.device)
        return arg_storage

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape
        if self.width:  # greedy rows too: a label job is usually greedy
            scores = self._only_allowed(scores, args[ALLOWED:, :rows].T.to(torch.int64))
        temperature = args[TEMPERATURE, :rows].view(torch.float32)
        sampled = (temperature > 0).unsqueeze(-1)  # greedy rows keep the model's scores (and logprobs)
        warped = scores / torch.where(sampled, temperature.unsqueeze(-1), 1.0)
        if self.use_top_k:
            warped = self._top_k(warped, args[TOP_K, :rows].to(torch.int64), vocab)
        if self.use_top_p:
            warped = self._top_p(warped, args[TOP_P, :rows].view(torch.float32))
        if self.noise:
            warped = warped + gumbel_noise(args[KEY, :rows].to(torch.int64), args[STEP, :rows].to(torch.int64), vocab)
        return torch.where(sampled, warped, scores)

    @staticmethod
    def _only_allowed(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        valid = allowed >= 0
        constrained = valid.any(dim=-1, keepdim=True)
        # empty slots repeat the first allowed token, so the scatter never writes two values to one place
        index = torch.where(valid, allowed, allowed[:, :1]).clamp(min=0)
        mask = torch.full_like(scores, float("-inf")).scatter(-1, index, 0.0)
        return torch.where(constrained, scores + mask, scores)

    @staticmethod
    def _top_k(scores: torch.Tensor, k: torch.Tensor, vocab: int) -> torch.Tensor:
        on = k > 0
        kth = torch.sort(scores, dim=-1, descending=True)[0].gather(-1, (k.clamp(1, vocab) - 1).unsqueeze(-1))
        return scores.masked_fill(on.unsqueeze(-1) & (scores < kth), float("-inf"))

    @staticmethod
    def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(-1)
        drop[..., -1:] = False  # the likeliest token always stays
        return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
