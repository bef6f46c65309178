"""The generation engine on TensorRT-LLM's LLM API, its bounded shutdown, and `batchrun build`.

- `generate_async(inputs, sampling_params)` returns at once; `await output.aresult()` finishes it (L7, R3): each
  request is a coroutine on a private asyncio loop, and completions go to a queue the worker polls.
- shutdown() can wait forever on its MPI ranks (L11); close() bounds it and then ends the ranks itself.
- Whose failure (E1-E7), classified by how upstream delivered it, never by words in a message:
  - the request's own: an argument check of generate_async (ValueError / TypeError, or RequestError on newest
    releases, L9), or a RequestError that reaches this request alone: an error row;
  - the engine's: a step that raised (forward, decode, sampling) fails every request it held with the exception's
    text, and the loop keeps going (E6: `PyExecutor._handle_errors`); newer releases broadcast an event-loop death
    the same way (E7). So one error text reaching two or more requests within STEP_SETTLE_S is a failed step;
    `_check_health()` false (where the release has it, V8), a background error, a shut-down executor and a
    cancelled request are the executor gone (E1-E5). All of these raise EngineDead: never error rows.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchrun.engines.base import Completion, Engine, EngineDead, Request, Sampling
from batchrun.engines.common import model_args, sampling_from_spec
from batchrun.engines.mpi import abandon_mpi_manager_threads, actor_gpu_ids, descendants, kill_all, prepare_mpi_process
from batchrun.engines.trtllm.options import (
    DEFAULT_MAX_BATCH_SIZE,
    JobNeeds,
    TRTLLMOptions,
    engine_dir_for,
    limits,
    release_problem,
)
from batchrun.engines.trtllm.releases import running
from batchrun.engines.trtllm.translate import (
    guided_decoding,
    is_greedy,
    llm_class_and_kwargs,
    sampling_params,
    to_completions,
)
from batchrun.spec import ParseSpec

log = logging.getLogger(__name__)

# A failed step reaches every request it held in one pass of the executor's response handling (E6); their awaits
# resume on this engine's loop one after another. A second request failing with the same text within this long is
# that step, not its own failure. Loop time, not wall time: a slow machine delays the timer with the awaits.
STEP_SETTLE_S = 1.0
HEALTH_EVERY_S = 1.0  # how often poll() asks _check_health() (V8) where the release has it


@dataclass
class _Loop:
    """A private asyncio loop in a thread: generate_async must be called from inside a running loop (R3)."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def __post_init__(self):
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="trtllm-asyncio")
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def create(spec, sampling, parse=None) -> TRTLLMEngine:
    needs = JobNeeds.from_parts(spec.model, TRTLLMOptions(**spec.options), sampling)
    return TRTLLMEngine(spec.model, sampling_from_spec(sampling), guide=parse, needs=needs,
                        **model_args(spec, spec.options))


class TRTLLMEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 guide: ParseSpec | None = None, scoring: bool = False, needs: JobNeeds | None = None, **options):
        # Before tensorrt_llm (and so mpi4py.MPI) is imported: its TP ranks are spawned through MPI from this actor.
        prepare_mpi_process(actor_gpu_ids())
        import tensorrt_llm as tllm
        from tensorrt_llm.executor.utils import RequestError

        self.tllm = tllm
        self.request_error = RequestError  # E2, E4: how a response's own error reaches its awaiter
        self.opts = TRTLLMOptions(**options)
        self.release = running(tllm)  # the rules of the release that runs, checked again here (V1-V9)
        needs = needs or JobNeeds.from_parts(model, self.opts, sampling)
        if (problem := release_problem(self.release, needs)) is not None:
            raise ValueError(problem)  # the driver could not read the release (not installed there)
        self.logprobs = sampling.logprobs or bool(sampling.top_logprobs)
        built = engine_dir_for(model, tensor_parallel_size, self.opts, self.logprobs, scoring)
        if built is not None and (built / "batchrun_build.json").exists():
            model = str(built)  # load the engine `batchrun build` made instead of building one per worker
        cls, kwargs = llm_class_and_kwargs(tllm, model, tensor_parallel_size, dtype, trust_remote_code, self.opts,
                                           self.logprobs, scoring, self.release, needs)
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        self.guide = guided_decoding(guide)
        if self.guide is not None:
            kwargs["guided_decoding_backend"] = "xgrammar"  # A1: both backends take it; default None enforces nothing
        before = {p.pid for p in descendants()}
        self.llm = cls(**kwargs)
        self._ranks = [p for p in descendants() if p.pid not in before]  # what close() must leave no trace of
        self.model = model
        self.tokenizer = getattr(self.llm, "tokenizer", None)
        self.prefix_reuse = kwargs["kv_cache_config"].enable_block_reuse  # KvCacheConfig (A3): on by default
        self.batch_limit = self.opts.max_batch_size or DEFAULT_MAX_BATCH_SIZE  # A1
        self.kv_cache_tokens = self._kv_cache_capacity()  # sizes the worker's window where the release says (V9)
        lim = limits(model, self.opts)
        self.context_length, self.max_prompt_tokens = lim.context, lim.prompt
        # rows mostly share settings: each SamplingParams is built once; per-row seeds make every row's distinct,
        # so the cache is bounded
        self._sampling_params = functools.lru_cache(maxsize=4096)(self._build_params)
        self._done: queue.Queue[Completion] = queue.Queue()
        self._dead: str | None = None  # set by the asyncio thread when the executor dies or a step failed
        self._failing: dict[str, list[tuple[Request, Exception]]] = {}  # RequestError text -> who got it (loop only)
        self._health_at = 0.0
        self._loop = _Loop()

    def _kv_cache_capacity(self) -> int | None:
        if not self.release.kv_cache_capacity:
            return None
        try:  # beta API (V9): {"maxNumBlocks", "tokensPerBlock", "maxNumTokens"}, or {} before the executor has one
            return int(self.llm.get_kv_cache_capacity().get("maxNumTokens") or 0) or None
        except Exception as e:  # a sizing hint only: the window falls back to the batch limit
            log.warning("TensorRT-LLM's get_kv_cache_capacity() failed: %s", e)
            return None

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        if self.tokenizer is None:
            return None
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        # The LLM API's tokenizer wraps the HF tokenizer as `.tokenizer` (llmapi/tokenizer.py TransformersTokenizer)
        hf = getattr(self.tokenizer, "tokenizer", None) or self.tokenizer
        return [hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    def _build_params(self, s: Sampling):
        want = max(s.top_logprobs, 1) if s.logprobs or s.top_logprobs else None
        return sampling_params(self.tllm, s, logprobs=want, guide=self.guide)

    def submit(self, request: Request) -> None:
        """Never raises for one request: whatever upstream refuses becomes that request's error rows."""
        try:
            inputs = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
            params = self._sampling_params(request.sampling)
        except Exception as e:
            self._fail(request, e)
            return
        self._loop.submit(self._generate(request, inputs, params))

    async def _generate(self, request: Request, inputs, params) -> None:
        s = request.sampling
        try:
            pending = self.llm.generate_async(inputs, sampling_params=params)
        except (ValueError, TypeError, self.request_error) as e:  # L7-L9: argument checks refuse this request alone
            return self._fail(request, e)
        except Exception as e:  # "LLM is shutting down" (L7), or a background error raised at submit (E3)
            return self._died(e)
        try:
            output = await pending.aresult()
            completions = to_completions(request.request_id, output, s.stop, s.top_logprobs,
                                         copies=s.n if is_greedy(s) else 1)
        except Exception as e:
            return self._request_failed(request, e) if isinstance(e, self.request_error) else self._died(e)
        for c in completions:
            self._done.put(c)

    def _request_failed(self, request: Request, e: Exception) -> None:
        """A RequestError from a result (on the loop thread): the request's own, or a step that failed (E6, E7).
        Held for STEP_SETTLE_S to see whether the same text reaches other requests."""
        if not self._healthy():
            return self._died(e)
        text = str(e)
        group = self._failing.setdefault(text, [])
        group.append((request, e))
        if len(group) == 1:
            self._loop.loop.call_later(STEP_SETTLE_S, self._settle, text)

    def _settle(self, text: str) -> None:
        group = self._failing.pop(text, [])
        if len(group) > 1 or not self._healthy():
            self._died(RuntimeError(f"one step failed {len(group)} requests at once with: {text}"))
        else:
            for request, e in group:
                self._fail(request, e)

    def _healthy(self) -> bool:
        if not self.release.health_check or self.llm is None:
            return True
        try:
            return bool(self.llm._check_health())  # V8
        except Exception:
            return False

    def _died(self, e: Exception) -> None:
        """The executor is gone (E1) or a step failed (E6): the first error wins. The next poll raises EngineDead;
        nothing from this engine is committed after it."""
        self._dead = self._dead or f"TensorRT-LLM executor died: {type(e).__name__}: {str(e).splitlines()[0][:300]}"

    def check_alive(self) -> None:
        now = time.monotonic()
        if not self._dead and self.release.health_check and now - self._health_at >= HEALTH_EVERY_S:
            self._health_at = now
            if not self._healthy():
                self._dead = "TensorRT-LLM executor died: LLM._check_health() is False"
        if self._dead:
            raise EngineDead(self._dead)

    def _fail(self, request: Request, e: Exception) -> None:
        for k in range(request.sampling.n):
            self._done.put(Completion(request.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}",
                                      sample_index=k))

    def poll(self, timeout: float) -> list[Completion]:
        self.check_alive()
        out = []
        try:
            out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self.check_alive()  # completions taken with the death are dropped with it: their shards are retried
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm, self._ranks, self.opts.shutdown_timeout_s)
        if getattr(self, "_loop", None) is not None:
            self._loop.stop()
            self._loop = None


def build_engine(model: str, tp: int, dtype: str, trust_remote_code: bool, options: dict,
                 logprobs: bool = False, scoring: bool = False) -> tuple[Path, bool]:
    """`batchrun build`: build the TensorRT engine once into the cache. Returns (dir, built_now). The process is set
    up for MPI as a worker is, and LLM.shutdown() is bounded: a build that is done never hangs on its ranks."""
    opts = TRTLLMOptions(**options)
    target = engine_dir_for(model, tp, opts, logprobs, scoring)
    if target is None:
        raise ValueError("batchrun build needs engine.options.backend: tensorrt and engine.options.engine_cache")
    if (target / "batchrun_build.json").exists():
        return target, False  # same fingerprint: already built
    prepare_mpi_process(actor_gpu_ids())
    import tensorrt_llm as tllm

    release = running(tllm)
    if (problem := release_problem(release, JobNeeds("tensorrt", False, 0, False, False))) is not None:
        raise ValueError(problem)
    cls, kwargs = llm_class_and_kwargs(tllm, model, tp, dtype, trust_remote_code, opts, logprobs, scoring, release)
    before = {p.pid for p in descendants()}
    llm = cls(**kwargs)
    ranks = [p for p in descendants() if p.pid not in before]
    try:
        tmp = target.with_name(target.name + ".partial")
        llm.save(str(tmp))
        (tmp / "batchrun_build.json").write_text(json.dumps({"model": model, "tp": tp, **opts.model_dump()}))
        os.replace(tmp, target)  # concurrent builders: one rename wins, the engine dir is never half-written
    finally:
        shutdown_llm(llm, ranks, opts.shutdown_timeout_s)
    return target, True


def shutdown_llm(llm, ranks: list, timeout_s: float) -> bool:
    """LLM.shutdown() within timeout_s, then no rank left. Returns whether shutdown() returned by itself.

    Upstream's proxy waits on every rank with no timeout (L11), so a rank that never answers would hold this process
    forever. After the timeout: the ranks are ended, the LLM's own later calls to shutdown() (from __del__ and the
    atexit hook it registered, L11) become no-ops, and mpi4py's manager thread no longer blocks the exit."""
    closer = threading.Thread(target=llm.shutdown, daemon=True, name="trtllm-shutdown")
    closer.start()
    closer.join(timeout_s)
    clean = not closer.is_alive()
    if not clean:
        log.warning("TensorRT-LLM's shutdown() did not return within %gs; ending its %d rank process(es)",
                    timeout_s, len(ranks))
        llm.shutdown = lambda: None
        atexit.unregister(type(llm)._shutdown_wrapper)
    kill_all(ranks, grace_s=5.0 if clean else 0.5)  # after a clean shutdown they are exiting already
    if not clean:
        abandon_mpi_manager_threads()
    return clean
