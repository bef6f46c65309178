"""Hugging Face transformers continuous batching (ContinuousBatchingManager) as a batchrun engine.

transformers' CB API moves between releases; this file and hf_tp.py are the only places that touch it
(transformers/generation/continuous_batching/continuous_api.py: init_continuous_batching, add_request,
get_result; GenerationOutput in requests.py).

The engine is split in two: a *backend* that owns the model and the CB manager (in this process, or on rank 0 of a
tensor-parallel group spawned through mpi4py, see hf_tp.py), and the engine itself, which tokenizes, submits and
turns raw results into Completions in the worker's process.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from batchrun.engines.base import Completion, Engine, Request, Sampling, apply_stop

log = logging.getLogger(__name__)

# On a CPU the manager cannot size its KV cache from GPU memory: give it a small paged cache that holds the window.
# No CUDA graphs or async batching either: transformers decides those from the machine's accelerator, not from the
# model's device, and a model kept on the CPU of a GPU machine would fail ("Async batching requires a device type in
# ('cuda', 'xpu')", continuous_batching/initialization.py).
CPU_CB_DEFAULTS = {"num_blocks": 256, "max_batch_tokens": 512, "use_cuda_graph": False, "use_async_batching": False}


class EngineDead(RuntimeError):
    """The engine's generation loop died: the worker must be restarted, the in-flight shards go back to the queue."""


@dataclass(frozen=True, slots=True)
class RawResult:
    request_id: str
    prompt_len: int
    tokens: list[int]
    logprobs: list[float]
    error: str | None


@dataclass(frozen=True)
class ModelConfig:
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
    token budget where free memory allows (bench/RESULTS.md: varlen + graphs + 32k batch tokens ran 5.7x
    transformers' defaults on an H100)."""
    gib = free_bytes / 2**30
    tokens = 32768 if gib >= 24 else 16384 if gib >= 8 else None
    return {"use_cuda_graph": True, **({"max_batch_tokens": tokens} if tokens else {})}


def start_manager(cfg: ModelConfig, tp_plan: str | None = None):
    """Load the model and start a ContinuousBatchingManager on it. Returns (model, manager, eos ids, timings)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    from transformers.utils import logging as hf_logging

    from batchrun.engines.hf_attention import apply_attention
    from batchrun.engines.hf_sampling import ChoiceTrie, RowSampler

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
    eos_ids = sorted(set(eos if isinstance(eos, list) else [eos]) - {None})
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
    if model.device.type == "cpu":
        cb_options = dict(CPU_CB_DEFAULTS)
    else:
        cb_options = cuda_cb_defaults(torch.cuda.mem_get_info(model.device)[0]) if model.device.type == "cuda" else {}
    cb_options.update(dict(cfg.options))
    attention = apply_attention(model, cb_options.pop("attn_implementation", "auto"))
    log.info("HF engine: attention %s, continuous batching %s", attention, cb_options)
    if s.seed is not None:
        cb_options.setdefault("seed", s.seed)
    if s.logprobs:
        cb_options.setdefault("return_logprobs", True)
    if cfg.choices:  # the choice mask reads each request's tokens so far: no double-buffered (async) batches
        cb_options["use_async_batching"] = False
    manager = model.init_continuous_batching(
        generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb_options)
    )
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


def drain(manager, timeout: float) -> list[RawResult]:
    """Finished results from the manager: wait up to `timeout` for the first, then take what is ready."""
    out = []
    result = manager.get_result(timeout=timeout)
    while result is not None:
        if result.is_finished():
            out.append(RawResult(result.request_id, len(result.prompt_ids), list(result.generated_tokens),
                                 list(result.logprobs), None if result.error is None else str(result.error)))
        result = manager.get_result(timeout=0)
    return out


class LocalBackend:
    """The model and its CB manager in this process."""

    def __init__(self, cfg: ModelConfig):
        self.model, self.manager, self.eos_ids, self.timings = start_manager(cfg)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.kv_cache_tokens = kv_cache_tokens(self.manager)

    def add(self, request_id: str, ids: list[int], max_new_tokens: int, row_sampling: dict) -> None:
        if self.manager.add_request(input_ids=ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                    **row_sampling) is None:
            raise EngineDead("the continuous batching manager refused a request (its loop is stopping or dead)")

    def results(self, timeout: float) -> list[RawResult]:
        out = drain(self.manager, timeout)
        if not out and not self.manager.is_running():
            raise EngineDead(f"the generation loop stopped: {self.manager.background_thread_status.fatal_error!r}")
        return out

    def close(self) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()


class HFEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, max_in_flight: int | None = None,
                 tensor_parallel_size: int = 1, row_keys: tuple[str, ...] = (), choices: list[str] | None = None,
                 **options):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
        pad = self.tokenizer.pad_token_id
        choice_ids = tuple(tuple(ids) for ids in self.encode(list(choices))) if choices else ()
        cfg = ModelConfig(model, sampling, dtype, device, trust_remote_code, tuple(sorted(options.items())),
                          pad if pad is not None else 0, tuple(row_keys), choice_ids, random.getrandbits(31))
        if tensor_parallel_size > 1:
            from batchrun.engines.hf_tp import TPBackend

            self.backend = TPBackend(cfg, tensor_parallel_size)
        else:
            self.backend = LocalBackend(cfg)
        self.context_length = self.backend.context_length
        self.kv_cache_tokens = getattr(self.backend, "kv_cache_tokens", None)
        self.startup = dict(getattr(self.backend, "timings", {}))
        self.eos_ids = set(self.backend.eos_ids)
        self.max_in_flight = max_in_flight
        self.stop = sampling.stop  # job-level stop strings, cut from the text when a request finishes
        self.copies = 1 if cfg.may_sample else sampling.n  # greedy n > 1: n copies of one generation
        # per-request settings go to RowSampler (hf_sampling.py) as add_request kwargs; the stock path takes none
        self.row_sampling = cfg.row_sampler_needed
        self.logprobs = sampling.logprobs

    def encode(self, texts: list[str]) -> list[list[int]]:
        # Batch encoding in the fast tokenizer's Rust code: one call per shard, not one per row.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        if not self.tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template (input.chat / messages need one)")
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                for c in conversations]

    def submit(self, request: Request) -> None:
        s = request.sampling
        row = {}
        if self.row_sampling:
            row = {"temperature": float(s.temperature), "top_p": float(s.top_p), "top_k": s.top_k}
            if s.seed is not None:
                row["seed"] = s.seed
        self.backend.add(request.request_id, request.prompt_token_ids, s.max_tokens, row)

    def poll(self, timeout: float) -> list[Completion]:
        done = [self._completion(r) for r in self.backend.results(timeout)]
        if self.copies > 1:
            done = [dataclasses.replace(c, sample_index=k) for c in done for k in range(self.copies)]
        return done

    def _completion(self, r: RawResult) -> Completion:
        request_id, _, child = r.request_id.partition("__child#")
        sample = int(child) + 1 if child else 0
        if r.error is not None:
            return Completion(request_id, finish_reason="error", error=r.error, num_prompt_tokens=r.prompt_len,
                              sample_index=sample)
        tokens = r.tokens
        ended = bool(tokens) and tokens[-1] in self.eos_ids
        if ended:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit_stop = apply_stop(text, self.stop)
        return Completion(
            request_id=request_id,
            sample_index=sample,
            text=text,
            token_ids=tokens,
            finish_reason="stop" if ended or hit_stop else "length",
            num_prompt_tokens=r.prompt_len,
            num_generated_tokens=len(tokens),
            logprobs=r.logprobs[: len(tokens)] if self.logprobs else None,
        )

    def close(self) -> None:
        backend, self.backend = getattr(self, "backend", None), None
        if backend is not None:
            backend.close()


# ---------------------------------------------------------------- what the hf engine owns: options, rules, build


def options_model():
    """engine.options for engine hf: `attn_implementation` (hf_attention.py) and the fields of transformers'
    ContinuousBatchingConfig, whose values transformers itself checks at load. A key that is neither fails at plan
    time, naming it, instead of in every worker's load."""
    from pydantic import ConfigDict, create_model
    from transformers.generation import ContinuousBatchingConfig

    cb_fields = {f.name: (Any, None) for f in dataclasses.fields(ContinuousBatchingConfig)}
    return create_model("HFOptions", __config__=ConfigDict(extra="forbid"), attn_implementation=(str, "auto"),
                        **cb_fields)


def check(spec) -> None:
    """What transformers' continuous batching cannot do is refused here, before any work, rather than ignored."""
    from batchrun.engines import require_model_dir

    require_model_dir(spec)
    s, parse = spec.sampling, spec.output.parse
    if s.top_logprobs:
        raise ValueError("key 'sampling.top_logprobs' needs engine trtllm: transformers' continuous batching returns "
                         "only the chosen token's logprob (use sampling.logprobs)")
    if parse is not None and parse.guided and parse.kind != "choice":
        raise ValueError(f"key 'output.parse.guided' with kind {parse.kind!r} needs engine trtllm "
                         "(engine hf constrains to choices only)")
    per_row_sampling = {"temperature", "seed"} & set(s.per_row)
    if s.logprobs and per_row_sampling:
        raise ValueError(f"key 'sampling.per_row.{sorted(per_row_sampling)[0]}' with sampling.logprobs needs engine "
                         "trtllm: engine hf samples batch-invariantly (per-row seeds) only without logprobs")


def create(spec, sampling, parse=None) -> HFEngine:
    from batchrun.engines import model_args, sampling_from_spec

    cpus = _reserved_cpus()
    if cpus and spec.device != "cuda":
        import torch

        if spec.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(cpus)  # Ray sets OMP_NUM_THREADS=1; use the CPUs this actor reserved
    return HFEngine(spec.model, sampling_from_spec(sampling), row_keys=tuple(sampling.per_row),
                    choices=parse.choices if parse else None, **model_args(spec, spec.options))


def _reserved_cpus() -> int | None:
    """The CPUs Ray reserved for this actor (None outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)) or None
    except Exception:
        return None
    return None
