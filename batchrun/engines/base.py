"""The engine contract: submit without blocking, take completions in the order they finish, close frees everything.

Every third-party inference API lives behind this interface, inside its own adapter file.

Threads. A worker calls its engine from two threads at once:
- the main loop: `submit`, `poll`, `window`, `close` (and nothing else calls these);
- the prefetch thread: `encode` and `render_chat`, for the next shard, while the main loop polls.
An engine whose `poll` and `encode` share state must make that safe. The HF engine decodes with its own copy of the
tokenizer (a Hugging Face fast tokenizer is a Rust object that refuses to be borrowed by two threads at once when one
of them changes its settings: huggingface/tokenizers#537). `__init__` runs before either thread starts.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int  # always set: an engine's own default would make outputs depend on the engine
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per request, so a row samples the same way whatever it is batched with
    stop: tuple[str, ...] = ()
    n: int = 1  # samples of this prompt, each its own Completion (sample_index 0..n-1)
    logprobs: bool = False  # return the log probability of each generated token
    top_logprobs: int = 0  # > 0: also the k likeliest tokens at each step, as {token_id: logprob}


class RequestKey(NamedTuple):
    """Which row of which shard a request is: how its completions find their row again, in whatever order they
    finish. Engines pass it through unchanged."""

    shard_id: int
    row: int

    def __str__(self) -> str:
        return f"{self.shard_id}:{self.row}"


@dataclass(frozen=True, slots=True)
class Request:
    request_id: Hashable  # the worker's RequestKey; engines hand it back unchanged on each Completion
    prompt: str  # the rendered prompt text
    prompt_token_ids: list[int] | None  # set when the worker tokenized (engines with a tokenizer); echo: None
    sampling: Sampling
    # a scoring request (Engine.scores): (context ids, continuation ids) pairs whose log-likelihoods the engine
    # returns instead of generating (batchrun/loglikelihood.py)
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] | None = None


@dataclass(slots=True)
class Completion:
    request_id: Hashable  # the Request's, unchanged
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # stop | length | error
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per generated token: the k likeliest tokens' logprobs
    error: str | None = None  # set for a failure of this request alone; the job goes on
    sample_index: int = 0  # which of the request's n samples this is
    # prompt tokens the engine served from KV blocks it had computed for an earlier request (prefix reuse); None
    # where the engine cannot tell
    num_cached_prompt_tokens: int | None = None
    # a scoring request's answer, one value per pair: sum of the continuation's token log-probabilities given the
    # context, whether every continuation token is the argmax, and the continuation's length in tokens
    pair_logprobs: list[float] | None = None
    pair_greedy: list[bool] | None = None
    pair_tokens: list[int] | None = None


class EngineDead(RuntimeError):
    """The engine itself is gone (its loop or executor stopped, a rank died, a CUDA/NCCL error, the whole engine timed
    out), not one request. Nothing it still has in flight may be committed: the worker hands its shards back at once
    and is replaced, and the attempt is charged to the engine, not to the shards."""


# Words in an error that only an engine-wide failure produces, whichever engine reports it. The worker's safety net:
# a completion whose error says one of these is never committed as an error row, even from an engine that (wrongly)
# reports its own death per request. Upstream sources: TensorRT-LLM's "LLM is shutting down" (llmapi/llm.py
# generate_async) and "Executor worker died/returned error" (executor/proxy.py); transformers' continuous batching
# loop failing every request with the loop's own exception (continuous_api.py _handle_critical_error); CUDA/NCCL;
# "CUDA out of memory" (torch) has no "CUDA error" in it.
ENGINE_FAILURE_MARKERS = ("llm is shutting down", "executor is shut down", "executor worker", "shutting down",
                          "shut down", "cuda error", "cudaerror", "cuda failure", "illegal memory access",
                          "device-side assert", "out of memory", "nccl", "generation loop", "enginedead", "rank died",
                          "mpi_err")


def engine_failure(error: str | None) -> bool:
    """Whether an error text is the engine's (see ENGINE_FAILURE_MARKERS), not one request's."""
    return bool(error) and any(m in error.lower() for m in ENGINE_FAILURE_MARKERS)


class Engine(ABC):
    """One inference engine replica, owned by one worker actor.

    Failures: a request's own failure (bad input, too long, refused parameters) is a Completion with `error` set; a
    failure of the engine itself is EngineDead, raised from `submit` or `poll`, never an error row."""

    #: the most requests the engine batches at once, where it has such a limit (TensorRT-LLM's max_batch_size)
    batch_limit: int | None = None
    #: seconds its start took, by phase (rank spawn, process group, model load, warm-up), where it can tell
    startup: dict = {}
    #: the model's context in tokens (prompt + generated), or None when unbounded (echo)
    context_length: int | None = None
    #: the longest prompt the engine takes, where that is less than the context allows (None: no such limit)
    max_prompt_tokens: int | None = None
    #: tokens of KV cache the engine holds for the whole batch (prompts + outputs), where it can tell; None otherwise
    kv_cache_tokens: int | None = None
    #: the engine reuses the KV blocks of a prompt prefix it has computed before (block sharing / block reuse)
    prefix_reuse: bool = False
    #: tokens per KV block, the unit a prefix is reused in (prompts sharing less than one block share nothing)
    prefix_block_tokens: int | None = None
    #: the engine scores (Request.pairs: log-likelihoods, no generation) instead of generating
    scores: bool = False
    #: scoring engines: the token an empty context becomes (BOS, else EOS), as lm-eval's prefix_token_id
    prefix_token_id: int | None = None

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Scoring engines: one text's token ids as lm-eval's HF backend encodes it (batchrun/loglikelihood.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not score")

    def prefilled(self) -> list[Hashable]:
        """Request ids whose prompt the engine has computed since the last call: from now on their prefix blocks
        can be reused. Engines that cannot tell return [] (the worker then takes a completion as that signal)."""
        return []

    def check_alive(self) -> None:
        """Raise EngineDead if the engine knows it is gone. The worker asks before it commits a shard that has error
        rows, so that rows failed by a dying engine are never committed as the request's errors."""
        return None

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        """Token ids of each prompt, or None if the engine takes text. Called off the engine's critical path."""
        return None

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        """Prompt text of each conversation through the model's chat template, ready for a reply."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @abstractmethod
    def submit(self, request: Request) -> None:
        """Queue one request; never waits for it to finish."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Completion]:
        """Completions finished since the last call, waiting at most `timeout` seconds for the first."""

    @abstractmethod
    def close(self) -> None:
        """Free the device memory and every child process. Safe to call twice."""


MIN_WINDOW, MAX_WINDOW = 64, 4096


def choose_window(max_in_flight: int | str, engine: Engine, tokens_per_request: float) -> tuple[int, str]:
    """How many requests (samples) a worker keeps submitted to its engine, and why: the job's engine.max_in_flight,
    or `auto` from what the engine reports of itself (its KV cache, its batch limit). The worker's decision: no
    engine is told its window."""
    if max_in_flight != "auto":
        return int(max_in_flight), "engine.max_in_flight"
    return auto_window(engine.kv_cache_tokens, tokens_per_request, engine.batch_limit)


def auto_window(kv_cache_tokens: int | None, tokens_per_request: float, batch_limit: int | None = None
                ) -> tuple[int, str]:
    """`engine.max_in_flight: auto`: twice what the engine can run at once, so that it always has the next request
    queued when one finishes (a queued request costs the worker a few KB of host memory; a missing one costs the GPU
    a batch slot: bench/RESULTS.md, defaults). What it can
    run at once: the requests of the job's size (prompt + max_tokens, from the first shard) its KV cache holds, else
    its batch limit. Bounded to [MIN_WINDOW, MAX_WINDOW]."""
    tpr = max(tokens_per_request, 1.0)
    if kv_cache_tokens:
        fits = kv_cache_tokens / tpr
        want, why = 2 * fits, (f"2 x the {fits:,.0f} requests of ~{tpr:,.0f} tokens (prompt + max_tokens) that the "
                               f"KV cache of {kv_cache_tokens:,} tokens holds")
    elif batch_limit:
        want, why = 2 * batch_limit, f"2 x the engine's batch limit of {batch_limit:,}"
    else:
        want, why = MAX_WINDOW, "the engine reports no KV cache or batch limit"
    window = int(min(MAX_WINDOW, max(MIN_WINDOW, want)))
    if window != int(want):
        why += f", bounded to [{MIN_WINDOW}, {MAX_WINDOW}]"
    return window, f"auto: {why}"


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut the text at the earliest stop string; the stop text itself is excluded."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def row_seed(job_seed: int, row_id) -> int:
    """A row's own seed, from the job's seed and the row's id (not its position: shard size must not matter)."""
    digest = hashlib.blake2b(f"{job_seed}\0{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits every engine's seed type
