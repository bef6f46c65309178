"""The HF engine's backend: the model and transformers' ContinuousBatchingManager, in the worker's process
(LocalBackend) or on rank 0 of a tensor-parallel group (hf_tp.py). Both hf.py and hf_tp.py build on this module.

transformers' CB API moves between releases; this file, hf.py and hf_tp.py are the only places that touch it
(transformers/generation/continuous_batching/continuous_api.py: init_continuous_batching, add_request,
get_result; GenerationOutput in requests.py).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from batchrun.engines.base import EngineDead, Sampling, engine_failure

log = logging.getLogger(__name__)

# On a CPU the manager cannot size its KV cache from GPU memory: give it a small paged cache that holds the window.
# No CUDA graphs or async batching either: transformers decides those from the machine's accelerator, not from the
# model's device, and a model kept on the CPU of a GPU machine would fail ("Async batching requires a device type in
# ('cuda', 'xpu')", continuous_batching/initialization.py).
# Pages of 16 tokens (transformers' default is 256): prefixes are shared in whole pages, and the small models run on
# a CPU have short contexts (the demo model: 128 tokens), where a 256-token page would share nothing.
CPU_CB_DEFAULTS = {"num_blocks": 1024, "page_size": 16, "max_batch_tokens": 512, "use_cuda_graph": False,
                   "use_async_batching": False}


@dataclass(frozen=True, slots=True)
class RawResult:
    request_id: str
    prompt_len: int
    tokens: list[int]
    logprobs: list[float]
    error: str | None
    cached_tokens: int = 0  # prompt tokens served from shared blocks (prefix reuse)
    prefilled: bool = False  # not a result: the request's prompt is computed (its blocks can be shared now)


class PrefixTracker:
    """What the CB manager's cache does with prefixes, which its results do not carry (transformers 5.24,
    continuous_batching/cache.py, PagedAttentionCache):
    - `search_prefix_match(request_id, prompt_ids)` returns how many prompt tokens a new request takes from shared
      blocks (called once, when the scheduler first takes the request: scheduler.py _infer_request_tokens);
    - `mark_complete_blocks(state, complete_blocks)` runs after each forward pass that completed blocks of a request
      (continuous_api.py, the update loop), which makes them shareable; once the request has no prompt tokens left to
      prefill, every block of its prompt is shareable: the signal that its siblings can now reuse it.
    Both run on the generation thread; the worker reads the counts and events through collect_results()."""

    def __init__(self, manager):
        self.cached: dict[str, int] = {}
        self.events: collections.deque[str] = collections.deque()
        self._prefilled: set[str] = set()
        try:
            cache = manager.batch_processor.cache
            self.page_size = int(manager.continuous_batching_config.page_size)
            search, mark = cache.search_prefix_match, cache.mark_complete_blocks
        except AttributeError as e:  # another transformers release: no reuse figures, input order; jobs still run
            log.warning("prefix reuse cannot be tracked on this transformers version (%s): no reuse figures, "
                        "requests go in input order", e)
            self.enabled, self.page_size = False, None
            return
        self.enabled = bool(getattr(cache, "use_prefix_sharing", False))

        def search_prefix_match(request_id, prompt_ids):
            matched = search(request_id, prompt_ids)
            if matched:
                self.cached[request_id] = matched
            return matched

        def mark_complete_blocks(state, complete_blocks):
            mark(state, complete_blocks)
            if not state.remaining_prefill_tokens and state.request_id not in self._prefilled:
                self._prefilled.add(state.request_id)
                self.events.append(state.request_id)

        cache.search_prefix_match = search_prefix_match
        cache.mark_complete_blocks = mark_complete_blocks

    def info(self) -> dict:
        return {"reuse": self.enabled, "block_tokens": self.page_size}

    def take(self, request_id: str) -> int:
        self._prefilled.discard(request_id)
        return self.cached.pop(request_id, 0)


@dataclass(frozen=True)
class LaunchConfig:
    """Everything a process needs to load the model and start its CB manager (picklable, sent to TP ranks)."""

    model: str
    sampling: Sampling
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    options: tuple = ()  # ContinuousBatchingConfig fields, as (key, value) pairs
    pad_token_id: int = 0
    row_keys: tuple = ()  # sampling keys that rows may override (sampling.per_row)
    choices: tuple = ()  # guided choices, as token id tuples: generation may only produce one of them
    base_seed: int = 0  # unseeded rows: their noise derives from this (the same on every tensor-parallel rank)

    @property
    def may_sample(self) -> bool:
        return self.sampling.temperature > 0 or "temperature" in self.row_keys

    @property
    def row_sampler_needed(self) -> bool:
        return self.may_sample or bool(self.choices)

    @property
    def results_per_request(self) -> int:
        return self.sampling.n if self.may_sample else 1  # sampled n > 1: one result per child request


def cuda_cb_defaults(free_bytes: int) -> dict:
    """What measured fastest on GPUs, unless the job's engine.options say otherwise: CUDA graphs, and a large batch
    token budget where free memory allows (bench/RESULTS.md: varlen attention, graphs and a 32k batch token budget,
    against transformers' defaults).
    The KV cache takes 75% of the memory free after the load, not transformers' 90%: transformers sizes it before any
    CUDA graph is captured, and the graphs' private pools grow with the batch shapes a job brings: with the cache at
    90%, long prompts all in flight ran out of memory in the attention's cache read (bench/RESULTS.md, shared
    prefixes)."""
    gib = free_bytes / 2**30
    tokens = 32768 if gib >= 24 else 16384 if gib >= 8 else None
    return {"use_cuda_graph": True, "max_memory_percent": 0.75, **({"max_batch_tokens": tokens} if tokens else {})}


def load_model(cfg: LaunchConfig, tp_plan: str | None = None):
    """The model, on its device, in eval mode. Returns (model, eos ids, timings)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # In a worker (or a rank), the "Loading weights" bar reaches the driver's terminal late, after the job's summary
    hf_logging.disable_progress_bar()

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if tp_plan:
        kwargs["tp_plan"] = tp_plan  # the process group and device are set up by the TP launcher (hf_tp.py)
    else:
        kwargs["device_map"] = device  # weights go straight to the device, not through a full copy in host memory
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    model.eval()
    timings = {"model_load_s": round(time.monotonic() - started, 3)}
    eos = model.generation_config.eos_token_id
    return model, sorted(set(eos if isinstance(eos, list) else [eos]) - {None}), timings


def batching_options(cfg: LaunchConfig, model) -> dict:
    """ContinuousBatchingConfig's keywords: the device's defaults, then engine.options, then what the job needs
    (its seed, logprobs, a choice mask). Applies the attention implementation named there to the model."""
    import torch

    from batchrun.engines.hf_attention import apply_attention

    if model.device.type == "cpu":
        cb_options = dict(CPU_CB_DEFAULTS)
    else:
        cb_options = cuda_cb_defaults(torch.cuda.mem_get_info(model.device)[0]) if model.device.type == "cuda" else {}
    cb_options.update(dict(cfg.options))
    attention = apply_attention(model, cb_options.pop("attn_implementation", "auto"))
    log.info("HF engine: attention %s, continuous batching %s", attention, cb_options)
    if cfg.sampling.seed is not None:
        cb_options.setdefault("seed", cfg.sampling.seed)
    if cfg.sampling.logprobs:
        cb_options.setdefault("return_logprobs", True)
    if cfg.choices:  # the choice mask reads each request's tokens so far: no double-buffered (async) batches
        cb_options["use_async_batching"] = False
    return cb_options


def start_manager(cfg: LaunchConfig, tp_plan: str | None = None):
    """Load the model and start a ContinuousBatchingManager on it. Returns (model, manager, eos ids, timings)."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from batchrun.engines.hf_sampling import ChoiceTrie, RowSampler

    model, eos_ids, timings = load_model(cfg, tp_plan)
    s = cfg.sampling
    # Logprobs of sampled tokens come from the manager's own multinomial draw (the Gumbel draw would perturb them):
    # then rows sample from the seeded global generator, reproducible for the same batching only.
    multinomial = cfg.may_sample and s.logprobs
    gen = GenerationConfig(do_sample=multinomial, max_new_tokens=s.max_tokens, eos_token_id=eos_ids or None,
                           pad_token_id=cfg.pad_token_id)
    # each extra sample is a child request "<id>__child#k" (continuous_api.py); greedy samples are identical, so
    # HFEngine copies the one result instead. Set after construction: validate() refuses n > 1 with do_sample off,
    # which is how RowSampler's Gumbel-max sampling runs (the noise is in the scores, the argmax picks).
    gen.num_return_sequences = cfg.results_per_request
    cb_options = batching_options(cfg, model)
    started = time.monotonic()
    manager = model.init_continuous_batching(
        generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb_options)
    )
    timings["batching_init_s"] = round(time.monotonic() - started, 3)
    if cfg.row_sampler_needed:  # before start(): the batch processor takes the list when the loop starts
        manager.logit_processor = RowSampler(
            s, noise=cfg.may_sample and not multinomial, base_seed=cfg.base_seed,
            trie=ChoiceTrie([list(c) for c in cfg.choices], eos_ids) if cfg.choices else None,
            use_top_k=bool(s.top_k) or "top_k" in cfg.row_keys, use_top_p=s.top_p < 1 or "top_p" in cfg.row_keys)
    started = time.monotonic()
    manager.start()
    if not tp_plan:  # under tensor parallelism only rank 0 takes requests: it warms up in hf_tp._drive
        warm_up(manager, cfg.results_per_request)
    timings["warmup_s"] = round(time.monotonic() - started, 3)  # cache allocation, graph capture, first request
    return model, manager, eos_ids, timings


def warm_up(manager, results: int, timeout_s: float = 600.0) -> None:
    """One tiny request through the whole loop before any real one: CUDA graph capture, kernel selection and lazy
    initialisation happen at start, outside the job's first shard, and an engine that cannot generate at all fails
    here, in the worker's start(), rather than on every shard it is handed."""
    # 8 prompt tokens: a 1-token warm-up prompt with n > 1 failed inside transformers 5.24 ("cannot reshape tensor of
    # 0 elements"), though 1-token rows of a job did not
    manager.add_request(input_ids=[0] * 8, request_id="batchrun-warmup", max_new_tokens=2)
    deadline = time.monotonic() + timeout_s
    while results:
        r = manager.get_result(timeout=1.0)
        if r is None:
            if not manager.is_running():
                raise EngineDead(f"the generation loop stopped during warm-up: "
                                 f"{manager.background_thread_status.fatal_error!r}")
            if time.monotonic() > deadline:
                raise EngineDead(f"the engine did not finish a 2-token warm-up request in {timeout_s:g}s")
        elif r.is_finished():
            if r.error is not None:
                raise EngineDead(f"the engine's warm-up request failed: {r.error}")
            results -= 1


def kv_cache_tokens(manager) -> int | None:
    """The paged cache's capacity in tokens, once the loop has built it (cache.py: num_blocks of page_size tokens).
    Sized from the GPU memory free at start: another process on the same GPU shrinks it, and with it the batch."""
    try:
        return int(manager.batch_processor.cache.num_blocks) * int(manager.continuous_batching_config.page_size)
    except (AttributeError, TypeError, ValueError):
        return None


def collect_results(manager, timeout: float, tracker: PrefixTracker | None = None) -> list[RawResult]:
    """Finished results from the manager: wait up to `timeout` for the first, then take what is ready; and the
    requests whose prompt was computed since the last call (prefilled events), where a tracker watches the cache."""
    out = []
    result = manager.get_result(timeout=timeout)
    while result is not None:
        if result.is_finished():
            out.append(RawResult(result.request_id, len(result.prompt_ids), list(result.generated_tokens),
                                 list(result.logprobs), None if result.error is None else str(result.error),
                                 cached_tokens=tracker.take(result.request_id) if tracker else 0))
        result = manager.get_result(timeout=0)
    while tracker is not None and tracker.events:
        out.append(RawResult(tracker.events.popleft(), 0, [], [], None, prefilled=True))
    return out


def loop_failure(manager, out: list[RawResult]) -> str | None:
    """Why these results are the engine's failure, not their requests' (None: they are the requests' own).

    When the generation loop dies, transformers fails every request it holds with the loop's own exception
    (transformers 5.24 continuous_api.py `_handle_critical_error`: it requests HARD_STOP first, then fails the
    remaining requests, then records `fatal_error`). So a failed result delivered while the loop is stopping, or by a
    loop that is gone, belongs to the engine and must never become an error row; a request's own failure
    (`_handle_request_error` on a bad request) comes while the loop goes on (`can_accept_new_requests()` is None)."""
    failed = [r.error for r in out if r.error is not None]
    status = getattr(manager, "background_thread_status", None)
    stopping = getattr(status, "can_accept_new_requests", lambda: None)()  # None while the loop goes on
    if not stopping and not manager.is_running():
        stopping = "the generation loop is not running"
    if stopping:
        fatal = getattr(status, "fatal_error", None)
        return f"{stopping} ({fatal or (failed[0] if failed else 'no result')!r})"
    return next((e for e in failed if engine_failure(e)), None)  # an engine-wide error reported per request


class LocalBackend:
    """The model and its CB manager in this process."""

    def __init__(self, cfg: LaunchConfig):
        self.model, self.manager, self.eos_ids, self.timings = start_manager(cfg)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.kv_cache_tokens = kv_cache_tokens(self.manager)
        self.tracker = PrefixTracker(self.manager)
        self.prefix = self.tracker.info()

    def add(self, request_id: str, ids: list[int], max_new_tokens: int, row_sampling: dict) -> None:
        if self.manager.add_request(input_ids=ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                    **row_sampling) is None:
            raise EngineDead("the continuous batching manager refused a request (its loop is stopping or dead)")

    def check_alive(self) -> None:
        if (why := loop_failure(self.manager, [])) is not None:
            raise EngineDead(f"the generation loop stopped: {why}")

    def results(self, timeout: float) -> list[RawResult]:
        out = collect_results(self.manager, timeout, self.tracker)
        if (why := loop_failure(self.manager, out)) is not None:
            raise EngineDead(f"the generation loop stopped: {why}")
        return out

    def close(self) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()
