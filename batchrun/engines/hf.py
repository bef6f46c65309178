"""Hugging Face transformers continuous batching (ContinuousBatchingManager) as a batchrun engine.

The engine is split in two: a *backend* that owns the model and the CB manager (hf_backend.py: in this process, or
hf_tp.py: on rank 0 of a tensor-parallel group spawned through mpi4py), and the engine itself (this file), which
tokenizes, submits and turns raw results into Completions in the worker's process. Imports run one way:
hf -> hf_tp -> hf_backend.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from typing import Any

from batchrun.engines.base import Completion, Engine, Request, Sampling, apply_stop
from batchrun.engines.common import model_args, render_chat_template, require_model_dir, sampling_from_spec
from batchrun.engines.hf_backend import LaunchConfig, LocalBackend, RawResult
from batchrun.engines.hf_tp import TPBackend
from batchrun.errors import SpecError

log = logging.getLogger(__name__)


class HFEngine(Engine):
    def __init__(self, model: str, sampling: Sampling, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, row_keys: tuple[str, ...] = (), choices: list[str] | None = None,
                 **options):
        options = {k: v for k, v in options.items() if k not in SCORE_OPTIONS}  # scoring jobs' own (hf_score.py)
        # Tensor parallel: the ranks are spawned first, so that they import torch and transformers while this
        # process does the same for the tokenizer (start-up: bench/RESULTS.md, tensor parallelism).
        ranks = TPBackend(tensor_parallel_size) if tensor_parallel_size > 1 else None
        try:
            started = time.monotonic()
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
            tokenizer_s = round(time.monotonic() - started, 3)  # with the import of transformers
            pad = self.tokenizer.pad_token_id
            choice_ids = tuple(tuple(ids) for ids in self.encode(list(choices))) if choices else ()
            cfg = LaunchConfig(model, sampling, dtype, device, trust_remote_code, tuple(sorted(options.items())),
                               pad if pad is not None else 0, tuple(row_keys), choice_ids, random.getrandbits(31))
            self.backend = ranks.start(cfg) if ranks else LocalBackend(cfg)
        except BaseException:
            if ranks is not None:
                ranks.close()
            raise
        self.context_length = self.backend.context_length
        self.kv_cache_tokens = getattr(self.backend, "kv_cache_tokens", None)
        prefix = getattr(self.backend, "prefix", {})
        self.prefix_reuse, self.prefix_block_tokens = prefix.get("reuse", False), prefix.get("block_tokens")
        self._prefilled: list = []  # request keys whose prompt the cache holds now (PrefixTracker's events)
        self.startup = {"tokenizer_s": tokenizer_s, **getattr(self.backend, "timings", {})}
        self.eos_ids = set(self.backend.eos_ids)
        self.stop = sampling.stop  # job-level stop strings, cut from the text when a request finishes
        self.copies = 1 if cfg.may_sample else sampling.n  # greedy n > 1: n copies of one generation
        self.results_per_request = cfg.results_per_request  # raw results a request comes back as (children)
        self._keys: dict[str, list] = {}  # backend request id -> [the worker's key, raw results still to come]
        # the prefetch thread encodes with self.tokenizer while the main loop decodes: one tokenizer each
        self._decoder = copy.deepcopy(self.tokenizer)
        # per-request settings go to RowSampler (hf_sampling.py) as add_request kwargs; the stock path takes none
        self.row_sampling = cfg.row_sampler_needed
        self.logprobs = sampling.logprobs

    def encode(self, texts: list[str]) -> list[list[int]]:
        # Batch encoding in the fast tokenizer's Rust code: one call per shard, not one per row.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def render_chat(self, conversations: list[list[dict]]) -> list[str]:
        return render_chat_template(self.tokenizer, conversations)

    def submit(self, request: Request) -> None:
        s = request.sampling
        row = {}
        if self.row_sampling:
            row = {"temperature": float(s.temperature), "top_p": float(s.top_p), "top_k": s.top_k}
            if s.seed is not None:
                row["seed"] = s.seed
        rid = str(request.request_id)  # transformers' ids are strings; the key comes back on the completions
        self._keys[rid] = [request.request_id, self.results_per_request]
        self.backend.add(rid, request.prompt_token_ids, s.max_tokens, row)

    def poll(self, timeout: float) -> list[Completion]:
        done = []
        for r in self.backend.results(timeout):
            if r.prefilled:
                entry = self._keys.get(r.request_id.partition("__child#")[0])
                if entry is not None:
                    self._prefilled.append(entry[0])
            else:
                done.append(self._completion(r))
        if self.copies > 1:
            done = [dataclasses.replace(c, sample_index=k) for c in done for k in range(self.copies)]
        return done

    def check_alive(self) -> None:
        self.backend.check_alive()

    def prefilled(self) -> list:
        out, self._prefilled = self._prefilled, []
        return out

    def _completion(self, r: RawResult) -> Completion:
        rid, _, child = r.request_id.partition("__child#")
        sample = int(child) + 1 if child else 0
        entry = self._keys[rid]
        request_id, entry[1] = entry[0], entry[1] - 1
        if not entry[1]:  # the request's last result: forget it
            del self._keys[rid]
        if r.error is not None:
            return Completion(request_id, finish_reason="error", error=r.error, num_prompt_tokens=r.prompt_len,
                              sample_index=sample, num_cached_prompt_tokens=r.cached_tokens)
        tokens = r.tokens
        ended = bool(tokens) and tokens[-1] in self.eos_ids
        if ended:
            tokens = tokens[:-1]
        text = self._decoder.decode(tokens, skip_special_tokens=True)  # main loop: its own copy (see base.py)
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
            num_cached_prompt_tokens=r.cached_tokens,
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
    from pydantic import ConfigDict, Field, create_model

    require_transformers()  # before the import below, which an older transformers lacks
    from transformers.generation import ContinuousBatchingConfig

    cb_fields = {f.name: (Any, None) for f in dataclasses.fields(ContinuousBatchingConfig)}
    score_fields = {k: (int | None, Field(None, ge=1)) for k in SCORE_OPTIONS}
    return create_model("HFOptions", __config__=ConfigDict(extra="forbid"), attn_implementation=(str, "auto"),
                        **cb_fields, **score_fields)


# The continuous-batching API this engine drives (hf_backend.py, hf_sampling.py, hf_attention.py). Not a core
# requirement: TensorRT-LLM's images pin older transformers (4.53-4.57 in 1.0-1.2), which batchrun must not replace
# (`pip install batchrun[hf]` brings it).
TRANSFORMERS_NEEDED = "5.20"
# scoring jobs: padded prompt tokens and rows per forward pass (default: by device, hf_score.py)
SCORE_OPTIONS = ("score_batch_tokens", "score_batch_rows")


def require_transformers() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        have = version("transformers")
    except PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(TRANSFORMERS_NEEDED):
        raise SpecError(f"key 'engine.name' (hf): the HF engine needs transformers >= {TRANSFORMERS_NEEDED} (its "
                         f"continuous batching), this environment has {have or 'none'}; install batchrun[hf] in an "
                         "environment of its own (TensorRT-LLM's images pin an older transformers: use engine trtllm "
                         "there)")


def check(spec) -> None:
    """What transformers' continuous batching cannot do is refused here, before any work, rather than ignored."""
    require_model_dir(spec)
    s, parse = spec.sampling, spec.output.parse
    if s.top_logprobs:
        raise ValueError("key 'sampling.top_logprobs' needs engine trtllm: transformers' continuous batching returns "
                         "only the chosen token's logprob (use sampling.logprobs)")
    if parse is not None and parse.guided and parse.kind != "choice":
        raise ValueError(f"key 'output.parse.guided' with kind {parse.kind!r} needs engine trtllm "
                         "(engine hf constrains to choices only)")
    if spec.scoring and spec.engine.tensor_parallel_size > 1:
        raise ValueError("key 'engine.tensor_parallel_size': a scoring job (log-likelihoods) runs on one device with "
                         "engine hf; use tensor_parallel_size: 1")
    per_row_sampling = {"temperature", "seed"} & set(s.per_row)
    if s.logprobs and per_row_sampling:
        raise ValueError(f"key 'sampling.per_row.{sorted(per_row_sampling)[0]}' with sampling.logprobs needs engine "
                         "trtllm: engine hf samples batch-invariantly (per-row seeds) only without logprobs")


def create(spec, sampling, parse=None) -> HFEngine:
    _use_reserved_cpus(spec)
    return HFEngine(spec.model, sampling_from_spec(sampling), row_keys=tuple(sampling.per_row),
                    choices=parse.choices if parse else None, **model_args(spec, spec.options))


def create_scorer(spec, sampling):
    """A scoring job's engine (no continuous batching manager: engines/hf_score.py)."""
    from batchrun.engines.hf_score import HFScoreEngine

    _use_reserved_cpus(spec)
    return HFScoreEngine(spec.model, sampling_from_spec(sampling), **model_args(spec, spec.options))


def _use_reserved_cpus(spec) -> None:
    cpus = _reserved_cpus()
    if cpus and spec.device != "cuda":
        import torch

        if spec.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(cpus)  # Ray sets OMP_NUM_THREADS=1; use the CPUs this actor reserved


def _reserved_cpus() -> int | None:
    """The CPUs Ray reserved for this actor (None outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)) or None
    except Exception:
        return None
    return None
