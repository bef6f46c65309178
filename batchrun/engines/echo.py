"""The echo engine: no model, deterministic synthetic completions at (almost) zero cost.

Use it to dry-run a job's input -> output path on a cluster before spending GPU hours, and to measure the runner.
A completion is the prompt's first `max_tokens` whitespace-separated words; "tokens" are words.
"""

from __future__ import annotations

import collections
import time

from pydantic import BaseModel, ConfigDict, Field

from batchrun.engines.base import Completion, Engine, Request


def options_model():
    return Options


class Options(BaseModel):
    """engine.options for engine echo."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    delay_s: float = Field(0.0, ge=0)  # simulated latency per poll, for benchmarks


def check(spec) -> None:
    """The echo engine runs any job: it needs no model and takes every sampling key (it ignores them)."""


def create(spec, sampling, parse=None) -> EchoEngine:
    return EchoEngine(**spec.options)


class EchoEngine(Engine):
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = float(delay_s)
        self._done: collections.deque[Completion] = collections.deque()

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        return ["\n".join(f"{m['role']}: {m['content']}" for m in c) for c in conversations]

    def submit(self, request: Request) -> None:
        words = request.prompt.split()
        out = words[: request.sampling.max_tokens]
        for k in range(request.sampling.n):
            self._done.append(
                Completion(
                    request_id=request.request_id,
                    text=" ".join(out),
                    finish_reason="length" if len(words) > len(out) else "stop",
                    num_prompt_tokens=len(words),
                    num_generated_tokens=len(out),
                    logprobs=[0.0] * len(out) if request.sampling.logprobs else None,
                    sample_index=k,
                )
            )

    def poll(self, timeout: float) -> list[Completion]:
        if self.delay_s and self._done:
            time.sleep(self.delay_s)
        done, self._done = list(self._done), collections.deque()
        return done

    def close(self) -> None:
        self._done.clear()
