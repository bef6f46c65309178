"""The LLM classes of tensorrt_llm/llmapi/llm.py and the result types of executor/result.py, with upstream's rules
(UPSTREAM.md L1-L12, R1-R3, P2-P4). Generation itself is a deterministic toy: the prompt's tokens reversed, finishing
after a per-request delay so completions come back out of order. Context logits (P3) are real: the checkpoint's own,
computed with transformers, for the positions the modelled block reuse did not cover.

Test knobs (what a real cluster would make happen, set by a test through the model directory it passes):
- a prompt containing FAILREQ fails, as a per-request engine error would;
- `tllm_double.json` in the model dir with {"shutdown_hangs": true}: shutdown() never returns, as upstream's
  executor/proxy.py waits on its MPI futures with no timeout when a rank does not answer (L11);
- {"die_after": N, "die_once": PATH}: the executor's worker dies while generating request N (a rank exits, a CUDA
  error). With die_once, only the first LLM to create PATH when it gets there dies (one bad GPU in a fleet).
Executor death, as upstream (UPSTREAM.md E1-E3): the worker's exception goes to the executor's error queue (E3
mpi_done_callback); the handler that runs after the next response raises it, once, after shutdown() (E1, E2); shutdown
aborts every result still held (E3 `_abort_all_requests`: they end 'cancelled'); later generate_async calls raise
"LLM is shutting down" (L7).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field

from tensorrt_llm._args import (
    SAMPLER_TYPES,
    TORCH_LLM_ARGS,
    TRT_LLM_ARGS,
    TRT_ONLY_ARGS,
    VALID_TORCH_KV_CACHE_DTYPES,
    BuildConfig,
    CalibConfig,
    KvCacheConfig,
    QuantConfig,
)
from tensorrt_llm._release import (
    CACHE_SALT,
    CACHED_TOKENS,
    ERROR_BUDGET,
    GREEDY_BY_TEMPERATURE,
    HEALTH_CHECK,
    KV_CACHE_CAPACITY,
    NEWEST,
    REQUEST_ERROR_AT_SUBMIT,
    SAMPLER_FLAGS,
    SAMPLER_TYPE,
    TORCH_TOP_LOGPROBS,
)
from tensorrt_llm.executor.utils import RequestError
from tensorrt_llm.sampling_params import SamplingParams

POISON = "FAILREQ"
RANK_MARK = "tllm-double-rank"  # on the command line of each rank process the double starts


@dataclass(slots=True)
class Logprob:  # R2: executor/result.py
    logprob: float
    rank: int | None = None


@dataclass(slots=True)
class CompletionOutput:  # R1: executor/result.py
    index: int
    text: str = ""
    token_ids: list[int] | None = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list | None = field(default_factory=list)
    prompt_logprobs: list | None = field(default_factory=list)
    finish_reason: str | None = None  # Literal['stop', 'length', 'timeout', 'cancelled']
    stop_reason: int | str | None = None


class GenerationResult:  # R3: executor/result.py (the part the adapter reads)
    def __init__(self, request_id: int, prompt_token_ids: list[int], compute):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs: list[CompletionOutput] = []
        self.finished = False
        if CACHED_TOKENS:
            self.cached_tokens = 0  # R4: prompt tokens the runtime took from reused KV blocks (set per response)
        self._context_logits = None  # P3: set when SamplingParams.return_context_logits
        self._compute = compute
        self._streaming = False

    @property
    def context_logits(self):  # P3: executor/result.py GenerationResultBase.context_logits
        return self._context_logits

    async def aresult(self):
        if self._compute is not None:
            await self._compute(self)
        self.finished = True
        return self

    def __await__(self):
        return self.aresult().__await__()


class RequestOutput(GenerationResult):  # L10: llmapi/llm.py; only the executor makes them
    def __init__(self) -> None:
        raise RuntimeError(f"{self.__class__.__name__} is designed to be instantiated using "
                           f"{self.__class__.__name__}._from_generation_result by GenerationExecutor. "
                           f"Users are not expected to create {self.__class__.__name__} directly.")

    @classmethod
    def _from_generation_result(cls, generation_result: GenerationResult, prompt=None, tokenizer=None):
        inst = cls.__new__(cls)
        inst.__dict__.update(generation_result.__dict__)
        inst.tokenizer = tokenizer
        inst._prompt = prompt
        return inst

    @property
    def prompt(self):
        return self._prompt


class _Tokenizer:
    """llmapi/tokenizer.py TransformersTokenizer: wraps the HF tokenizer as `.tokenizer`, forwards encode/decode."""

    def __init__(self, path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_token_id = self.tokenizer.eos_token_id

    def encode(self, text, *args, **kwargs):
        return self.tokenizer.encode(text, *args, **kwargs)

    def decode(self, token_ids, *args, **kwargs):
        return self.tokenizer.decode(token_ids, *args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, *args, **kwargs)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class BaseLLM:
    instances: list = []
    calibrations: list = []  # calibration datasets loaded (checkpoint, dataset), in order
    _valid_args = TORCH_LLM_ARGS

    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
                 trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
                 tokenizer_revision=None, **kwargs):
        for key in kwargs:  # L1: unknown keywords are a ValueError, before anything is built
            if key not in self._valid_args | {"_mpi_session", "backend"}:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        self.args = dict(kwargs, model=str(model), tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size,
                         dtype=dtype, trust_remote_code=trust_remote_code)
        for key, cls in (("kv_cache_config", KvCacheConfig), ("quant_config", QuantConfig),
                         ("calib_config", CalibConfig), ("build_config", BuildConfig)):
            if key in kwargs and not isinstance(kwargs[key], cls):
                raise ValueError(f"{key} must be a {cls.__name__}, got {type(kwargs[key]).__name__}")
        if not os.path.isdir(model):
            raise ValueError(f"model {model} is not a local directory (this double never reaches the hub)")
        self.model = str(model)
        self.kv_cache_config = kwargs.get("kv_cache_config") or KvCacheConfig()
        self.knobs = _read_json(os.path.join(self.model, "tllm_double.json"))
        self._ranks = self._spawn_ranks(tensor_parallel_size * kwargs.get("pipeline_parallel_size", 1))
        try:
            self._build_model()
        except BaseException:
            self._stop_ranks()  # L6: a failed constructor shuts its MPI session down
            raise
        tok_dir = tokenizer or model
        self.tokenizer = (_Tokenizer(tok_dir) if not skip_tokenizer_init
                          and os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None)
        self._ids = itertools.count()
        self._shutdown = False
        self._error_queue: list[BaseException] = []  # E1: background errors, raised once each
        self._dead = False  # shut down after a background error: results still in flight are aborted (E3)
        self.in_flight = 0
        self.max_in_flight_seen = 0
        BaseLLM.instances.append(self)
        atexit.register(BaseLLM._shutdown_wrapper, weakref.ref(self))  # L11: upstream does the same

    # ------------------------------------------------------------ ranks and shutdown

    def _spawn_ranks(self, world_size: int) -> list[subprocess.Popen]:
        """L6: world_size > 1 spawns that many MPI ranks (MpiPoolSession); here, idle child processes."""
        if world_size <= 1:
            return []
        return [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", RANK_MARK])
                for _ in range(world_size)]

    def _stop_ranks(self) -> None:
        for p in self._ranks:
            p.terminate()
            p.wait()

    def shutdown(self) -> None:
        """L11: proxy.shutdown() waits on every rank's future with no timeout."""
        if self.knobs.get("shutdown_hangs"):
            threading.Event().wait()
        self._shutdown = True
        self._stop_ranks()

    @staticmethod
    def _shutdown_wrapper(self_ref):
        instance = self_ref()
        if instance is not None:
            instance.shutdown()

    def __del__(self):
        pass  # upstream calls shutdown() here too; a hanging one would hang the test process's collector

    # ------------------------------------------------------------ generation

    def _config_json(self) -> dict:
        return _read_json(os.path.join(self.model, "config.json"))

    # L7, V4: generate_async's fixed signature (no **kwargs), per release
    if NEWEST:
        def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False, kv_cache_retention_config=None, disaggregated_params=None,
                           trace_headers=None, _postproc_params=None, scheduling_params=None, cache_salt=None,
                           conversation_params=None, priority=None):
            return self._submit(inputs, sampling_params, cache_salt)
    elif CACHE_SALT:
        def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False, kv_cache_retention_config=None, disaggregated_params=None,
                           _postproc_params=None, scheduling_params=None, cache_salt=None):
            return self._submit(inputs, sampling_params, cache_salt)
    else:  # 1.0: no scheduling_params, no cache_salt (a TypeError)
        def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False, kv_cache_retention_config=None, disaggregated_params=None,
                           _postproc_params=None):
            return self._submit(inputs, sampling_params, None)

    if HEALTH_CHECK:
        def _check_health(self) -> bool:  # V8: the executor is running and healthy
            return not self._dead and not self._shutdown

    if KV_CACHE_CAPACITY:
        def get_kv_cache_capacity(self) -> dict:  # V9: the primary (GPU) pool only
            blocks = int(4096 * (self.kv_cache_config.free_gpu_memory_fraction or 0.9))
            return {"maxNumBlocks": blocks, "tokensPerBlock": 32, "maxNumTokens": blocks * 32}

    def _submit(self, inputs, sampling_params, cache_salt):
        if self._shutdown:
            raise RuntimeError("LLM is shutting down")
        asyncio.get_running_loop()  # R3: aresult() needs the loop the request was submitted from
        sp = self._prepare_sampling_params(sampling_params)
        if isinstance(inputs, str):
            prompt, ids = inputs, (self.tokenizer.encode(inputs, add_special_tokens=sp.add_special_tokens)
                                   if self.tokenizer else [])
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            prompt, ids = None, list(inputs)
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        self._check_arguments(len(ids), sp)
        rid = next(self._ids)
        self._step_submitted(rid)
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        out = RequestOutput._from_generation_result(
            GenerationResult(rid, ids, self._compute(rid, prompt, ids, sp, cache_salt)), prompt, self.tokenizer)
        self._handle_background_error()  # E3: submit surfaces a queued background error
        return out

    def _maybe_die(self, rid: int) -> None:
        """The knob die_after: the executor's worker process dies while generating request `rid` (proxy.py
        mpi_done_callback puts its exception on the error queue, E3)."""
        n = self.knobs.get("die_after")
        if n is None or rid != n or self._dead:
            return
        once = self.knobs.get("die_once")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another engine died already: this one is healthy
        self._error_queue.append(RuntimeError("Executor worker died: rank 0 exited with CUDA error 700 (double)"))

    def _handle_background_error(self, error=None) -> None:
        """E1: a str is a per-request error (RequestError); otherwise the first queued background error is raised
        once, after the executor shut down."""
        if isinstance(error, str):
            raise RequestError(error)
        if self._error_queue:
            e = self._error_queue.pop(0)
            self._dead = True  # shutdown(): aborts the results still held (E3)
            self._shutdown = True  # later generate_async calls raise "LLM is shutting down" (L7)
            raise e

    def _prepare_sampling_params(self, sp):  # L8
        if sp is None:
            sp = SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got {type(sp)}")
        if sp.end_id is None and self.tokenizer is None:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly specify "
                             "the end_id for sampling_params")
        return sp

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:
        raise NotImplementedError

    REUSE_BLOCK = 32  # the double's model of block reuse: whole blocks of this many tokens, never the last token

    def _reuse(self, ids: list[int], salt: str | None = None) -> int:
        """R4's value, modelled: with KvCacheConfig.enable_block_reuse (A3, on by default), the longest run of whole
        blocks this prompt shares with one computed before under the same cache salt (P3: `cache_salt` limits reuse
        to requests with the same string); the prompt's own blocks are then kept for later ones."""
        if not self.kv_cache_config.enable_block_reuse:
            return 0
        seen = self.__dict__.setdefault("_blocks", set())
        b, cached = self.REUSE_BLOCK, 0
        while cached + b < len(ids) and (salt, tuple(ids[: cached + b])) in seen:
            cached += b
        seen.update((salt, tuple(ids[:k])) for k in range(b, len(ids) + 1, b))
        return cached

    def _hf_logits(self, ids: list[int]):
        """The checkpoint's own logits for the prompt's positions, [len(ids), vocab], in float32 (transformers; a
        model directory without HF weights has none to give)."""
        import torch
        from transformers import AutoModelForCausalLM

        model = self.__dict__.get("_hf")
        if model is None:
            model = self.__dict__["_hf"] = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32)
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0]

    def _context_logits(self, ids: list[int], cached: int):
        """P3, PyTorch backend: the logits of the prompt positions the runtime computed, [len(ids) - cached, vocab]:
        with KV cache reuse, the reused positions have none (handle_logits.py)."""
        return self._hf_logits(ids)[cached:]

    # ------------------------------------------------------------ the sampler (V1-V3)

    def _sampler(self) -> str:
        """greedy | mixed (top-k/top-p, no temperature, no seed) | unseeded | seeded."""
        raise NotImplementedError

    def _greedy(self, sp: SamplingParams) -> bool:
        """S3 (and S5 from 1.2: temperature 0 is greedy too), or a sampler that decodes everything greedily."""
        sampler = self._sampler()
        if sampler == "greedy" or sp._greedy_decoding or (GREEDY_BY_TEMPERATURE and sp.temperature == 0):
            return True
        return sampler == "mixed" and sp.top_k is None and sp.top_p is None

    def _tokens(self, ids: list[int], sp: SamplingParams, sample: int) -> list[int]:
        """Greedy: the prompt's tokens reversed. Sampled: random tokens, from the request's seed where the sampler
        honours it, else from the process's own generator (so they change from run to run and with batching)."""
        if self._greedy(sp):
            return list(reversed(ids))[: sp.max_tokens]
        seeded = self._sampler() == "seeded" and sp.seed is not None
        rng = random.Random(f"{sp.seed}:{sample}") if seeded else self.__dict__.setdefault("_rng", random.Random())
        vocab = len(self.tokenizer.tokenizer) if self.tokenizer else 100
        return [rng.randrange(vocab) for _ in range(sp.max_tokens)]

    def _logprobs(self, gen: list[int], k: int) -> list:
        """R2 TokenLogprobs: per token, the k likeliest (here: ids t+1.. with falling logprobs) + the sampled one."""
        return [{**{t + j + 1: Logprob(-1.0 - j, j + 2) for j in range(k)}, t: Logprob(-0.5, 1)} for t in gen]

    def _outputs(self, ids: list[int], sp: SamplingParams) -> list[CompletionOutput]:
        stops = [sp.stop] if isinstance(sp.stop, str) else (sp.stop or [])
        outs = []
        for i in range(sp.n):
            gen = self._tokens(ids, sp, i)
            text = self.tokenizer.decode(gen) if self.tokenizer else ""
            reason = "length" if len(gen) == sp.max_tokens else "stop"
            for s in stops:
                if s in text:
                    text, reason = text[: text.index(s)], "stop"
            logprobs = self._logprobs(gen, self._logprobs_k(sp)) if sp.logprobs else []
            outs.append(CompletionOutput(i, text, gen, None, logprobs, [], reason))
        if len(outs) > 1 and any(o.finish_reason == "stop" and stops for o in outs):
            # R5: a stop string found in one sample's detokenized text aborts the whole request; its other samples
            # end with no finish reason
            for o in outs:
                if not any(s in self.tokenizer.decode(o.token_ids) for s in stops):
                    o.finish_reason = None
        return outs

    def _logprobs_k(self, sp: SamplingParams) -> int:
        return sp.logprobs

    # ------------------------------------------------------------ a step that raises (E6, E7)

    def _step_submitted(self, rid: int) -> None:
        """The knob fail_step: [first, last]: the executor's step holding requests first..last raises; they are
        held together until the last is submitted (one batch), then each gets the exception's text."""
        if rid == self.knobs.get("fail_step", (None, None))[1]:
            self.__dict__.setdefault("_step", asyncio.Event()).set()

    async def _in_failing_step(self, rid: int) -> str | None:
        first, last = self.knobs.get("fail_step", (None, None))
        if first is None or not first <= rid <= last:
            return None
        await self.__dict__.setdefault("_step", asyncio.Event()).wait()
        text = self.knobs.get("step_error", "total_num_tokens (9000) should be less than or equal to "
                                            "max_num_tokens (8192)")
        if ERROR_BUDGET and self.knobs.get("fatal"):  # E7: over the error budget: fatal, broadcast to every result
            self._dead = self._shutdown = True
            return f"Event loop terminated with error: {text}"
        return text  # E6: _handle_errors(str(e)) for every active request; the loop goes on

    def _compute(self, rid, prompt, ids, sp, salt=None):
        async def compute(out):
            try:
                failed = await self._in_failing_step(rid)
                if failed is not None:
                    self._handle_background_error(failed)  # E2: each gets RequestError(str(e))
                await asyncio.sleep(random.Random(rid * 7919).uniform(0, 0.02))  # finish out of order
                if self._dead:  # E3: shutdown aborted this request
                    out.outputs = [CompletionOutput(i, "", [], None, [], [], "cancelled") for i in range(sp.n)]
                    return
                text_in = prompt if prompt is not None else (self.tokenizer.decode(ids) if self.tokenizer else "")
                if POISON in text_in:  # E2: a response with an error message reaches the awaiter as RequestError
                    self._handle_background_error("the engine rejected this request")
                out.outputs = self._outputs(ids, sp)
                cached = self._reuse(ids, salt)
                if CACHED_TOKENS:
                    out.cached_tokens = cached
                if sp.return_context_logits:
                    out._context_logits = self._context_logits(ids, cached)
                self._maybe_die(rid)
                self._handle_background_error()  # E2: after every response, the first background error surfaces
            finally:
                self.in_flight -= 1
        return compute


class _TrtLLM(BaseLLM):
    """L2, L5: the TensorRT backend. An HF checkpoint is built (quantized first, calibrating where QuantConfig says
    so) when the LLM is constructed; an engine dir is loaded as it is."""

    _valid_args = TRT_LLM_ARGS
    builds = 0

    def _build_model(self):
        # A3: TrtLlmArgs.validate_kv_cache_dtype (an assert inside a pydantic validator: a ValidationError)
        if self.kv_cache_config.dtype != "auto":
            raise ValueError("KvCacheConfig.dtype is not supported by the TensorRT backend.")
        config = self._config_json()
        if "build_config" in config and "pretrained_config" in config:  # A9: a built engine
            self.build_config = BuildConfig(**{k: v for k, v in config["build_config"].items()
                                               if k in BuildConfig.__dataclass_fields__})
            return
        self.build_config = self.args.get("build_config") or BuildConfig(
            **{k: self.args[k] for k in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len")
               if self.args.get(k)})
        if self.build_config.max_seq_len is None:  # derived from the checkpoint when not given
            self.build_config.max_seq_len = config.get("max_position_embeddings")
        quant = self.args.get("quant_config") or QuantConfig()
        prequantized = "quantization_config" in config or os.path.exists(
            os.path.join(self.model, "hf_quant_config.json"))
        if quant._requires_calibration and not prequantized:  # L5: ModelLoader._load_model_from_hf
            dataset = (self.args.get("calib_config") or CalibConfig()).calib_dataset
            if not os.path.exists(dataset):  # get_calib_dataloader: datasets.load_dataset(name) from the hub
                raise ConnectionError(f"calibration: datasets.load_dataset({dataset!r}) needs the Hugging Face hub "
                                      "(no such local path, and this cluster is offline)")
            BaseLLM.calibrations.append((self.model, dataset))
        _TrtLLM.builds += 1

    def _max_seq_len(self) -> int:
        return self.build_config.max_seq_len

    def _sampler(self) -> str:
        return "seeded"  # the C++ decoder: each request's own SamplingConfig, its random seed included

    def _context_logits(self, ids: list[int], cached: int):
        """P5, TensorRT backend: the host tensor is [prompt_len, vocab_padded] whatever was reused; rows of reused
        positions are never written (here: noise, as an unwritten buffer holds), and the padded columns are the
        zero-padded lm_head's (pad_vocab_size: a multiple of the tensor-parallel size)."""
        import torch

        real = self._hf_logits(ids)
        tp = self.args.get("tensor_parallel_size") or 1
        padded = -(-real.shape[1] // tp) * tp
        out = torch.zeros(len(ids), padded)
        out[:, : real.shape[1]] = real
        out[:cached] = torch.randn(cached, padded) * 30
        return out

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:  # L9 (TensorRT backend)
        if not self.args.get("enable_chunked_prefill") and prompt_len + (sp.max_tokens or 0) > self._max_seq_len():
            raise ValueError(f"The sum of prompt length ({prompt_len}) and query length (0) max_tokens "
                             f"({sp.max_tokens}) should not exceed max_seq_len ({self._max_seq_len()})")
        max_batch_size = self.args.get("max_batch_size") or self.build_config.max_batch_size
        if not sp.use_beam_search and sp.best_of > max_batch_size:
            raise ValueError(f"sampling_params.n ({sp.n}) cannot exceed max_batch_size ({max_batch_size}) "
                             "when use_beam_search is False")
        if sp.logprobs and not self.args.get("gather_generation_logits"):
            raise ValueError(f"`sampling_params.logprobs={sp.logprobs}` requires `gather_generation_logits=True` "
                             "to be passed explicitly to the `LLM()` constructor.")
        if (sp.prompt_logprobs or sp.return_context_logits) and not self.build_config.gather_context_logits:
            # P2 for prompt_logprobs; P4: the double refuses return_context_logits the same way (stricter than the
            # Python checks read: what the C++ executor does with it on such an engine was not read)
            raise ValueError(f"`sampling_params's prompt_logprobs={sp.prompt_logprobs}` requires "
                             "`gather_context_logits=True` in the `BuildConfig` when constructing the LLM. Example: "
                             "LLM(..., build_config=BuildConfig(gather_context_logits=True)).")

    def save(self, engine_dir):  # the engine dir holds the build config the runtime reads back (A9)
        os.makedirs(engine_dir, exist_ok=True)
        build = {k: getattr(self.build_config, k) for k in BuildConfig.__dataclass_fields__
                 if k != "kv_cache_type"}
        with open(os.path.join(engine_dir, "config.json"), "w") as fh:
            json.dump({"version": "double", "pretrained_config": {"architecture": "double"},
                       "build_config": build}, fh)


class _TorchLLM(BaseLLM):
    """L3, L4: the PyTorch backend (tensorrt_llm.LLM)."""

    _valid_args = TORCH_LLM_ARGS

    def __init__(self, model, *args, **kwargs):
        given = sorted(k for k in kwargs if k in TRT_ONLY_ARGS)  # L3: _validate_args_for_torch_backend
        if given:
            raise ValueError(f"The following arguments are specific to TensorRT backend and cannot be used with "
                             f"PyTorch backend: {given}.")
        if SAMPLER_TYPE and kwargs.get("sampler_type", "auto") not in SAMPLER_TYPES:  # V2: an enum field
            raise ValueError(f"sampler_type: {kwargs['sampler_type']!r} is not one of {SAMPLER_TYPES}")
        super().__init__(model, *args, **kwargs)

    def _sampler(self) -> str:
        if SAMPLER_FLAGS:  # V1: 1.0's TorchSampler is greedy unless told otherwise
            if self.args.get("enable_trtllm_sampler"):
                return "seeded"
            return "mixed" if self.args.get("enable_mixed_sampler") else "greedy"
        if SAMPLER_TYPE:  # V2: auto is TorchSampler, which samples but ignores per-request seeds
            return "seeded" if self.args.get("sampler_type") == "TRTLLMSampler" else "unseeded"
        return "seeded"  # V3: newest TorchSampler honours per-request seeds

    def _logprobs_k(self, sp: SamplingParams) -> int:
        # V3: TRTLLMSampler returns the sampled token's logprob only (rank 1), whatever k was asked
        trtllm_sampler = self.args.get("enable_trtllm_sampler") or self.args.get("sampler_type") == "TRTLLMSampler"
        return 0 if trtllm_sampler else sp.logprobs

    def _build_model(self):
        # A4: _torch/pyexecutor validate_and_set_kv_cache_quant, at model load
        if self.kv_cache_config.dtype not in VALID_TORCH_KV_CACHE_DTYPES:
            raise ValueError(f"Overriding KV cache quantization with an invalid type "
                             f"'PyTorchConfig.kv_cache_dtype=\"{self.kv_cache_config.dtype}\"' Accepted types are "
                             f"{VALID_TORCH_KV_CACHE_DTYPES}.")

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:  # L9 (PyTorch backend)
        if sp.logprobs and sp.logprobs > 1 and not TORCH_TOP_LOGPROBS:  # I1, V5: 1.0 returns the sampled token's only
            raise ValueError(f"logprobs={sp.logprobs}: only the sampled token's logprob on the PyTorch backend")
        max_num_tokens = self.args.get("max_num_tokens") or 8192  # A1: BaseLlmArgs default
        if not self.args.get("enable_chunked_prefill") and prompt_len > max_num_tokens:
            refused = RequestError if REQUEST_ERROR_AT_SUBMIT else ValueError
            raise refused(f"The sum of prompt length ({prompt_len}), query length (0) should not exceed "
                             f"max_num_tokens ({max_num_tokens})")


class LLM(_TorchLLM):
    pass
