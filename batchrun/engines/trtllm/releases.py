"""Which TensorRT-LLM release is installed, and what that release can do (UPSTREAM.md V1-V9).

Two readings of the same table:
- `installed()`, in the driver at plan time: the distribution's metadata (`importlib.metadata`), never an import
  (importing tensorrt_llm loads CUDA libraries and mpi4py.MPI, which must not happen before the process is set up for
  MPI, and `batchrun plan` must not touch a GPU);
- `running(tllm)`, in the worker: the imported module's `__version__`, then feature checks of the signatures and
  fields the adapter relies on, which win over the version where they can be read.

A release the table cannot place (older than 1.0) is refused; one newer than the newest read is run with its
feature checks, never with rules assumed from an older release.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass, replace
from typing import Literal

from packaging.version import InvalidVersion, Version

OLDEST = Version("1.0.0rc0")
SAMPLER_TYPE_FROM = Version("1.1.0rc0")  # V2: enable_mixed_sampler / enable_trtllm_sampler replaced by sampler_type
CACHE_SALT_FROM = Version("1.1.0rc0")  # V4: generate_async(cache_salt=) (PR #7106)
TORCH_TOP_LOGPROBS_FROM = Version("1.1.0rc0")  # V5: top-k logprobs on the PyTorch backend (PR #7756)
NO_TENSORRT_BACKEND_FROM = Version("1.3.0rc22")  # V6: _tensorrt_engine, builder.py, BuildConfig removed
PINNED = "1.2.1"  # the Dockerfile's base image: the newest stable, the last with both backends

# How the PyTorch backend is told to honour each request's temperature and seed (V1-V3):
#   flags         1.0: TorchSampler decodes every request greedily unless enable_trtllm_sampler (or
#                 enable_mixed_sampler: top-k/top-p only); batchrun sets enable_trtllm_sampler for sampled jobs
#   sampler_type  1.1+: TorchSampler samples but ignores per-request seeds; sampler_type="TRTLLMSampler" honours them
#   torch         no sampler choice left (sampler_type removed): TorchSampler honours per-request seeds (PR #17172)
#   unknown       from the version alone, 1.3 and later: which of the last two was not established by release; the
#                 worker's feature check (running) decides, and plan-time rules that depend on it wait for it
SamplerChoice = Literal["flags", "sampler_type", "torch", "unknown"]
SAMPLER_KNOWN_BEFORE = Version("1.3.0rc0")


@dataclass(frozen=True)
class Release:
    """What one TensorRT-LLM release does where the adapter depends on it."""

    version: str
    sampler: SamplerChoice
    cache_salt: bool  # generate_async takes cache_salt (else scoring turns block reuse off: no re-ask can bypass it)
    torch_top_logprobs: bool  # the PyTorch backend's TorchSampler returns top-k logprobs (k > 1)
    tensorrt_backend: bool  # tensorrt_llm._tensorrt_engine (TensorRT engines, BuildConfig, calibration) exists
    health_check: bool = False  # LLM._check_health() (V8): read in the worker, False where unknown
    kv_cache_capacity: bool = False  # LLM.get_kv_cache_capacity() (V9): read in the worker

    @classmethod
    def of(cls, version: str) -> Release:
        v = parse(version)
        if v < OLDEST:
            raise ValueError(f"TensorRT-LLM {version} is older than 1.0, the oldest release batchrun supports "
                             f"(the image pins {PINNED})")
        sampler = "flags" if v < SAMPLER_TYPE_FROM else "sampler_type" if v < SAMPLER_KNOWN_BEFORE else "unknown"
        return cls(version=version, sampler=sampler,
                   cache_salt=v >= CACHE_SALT_FROM, torch_top_logprobs=v >= TORCH_TOP_LOGPROBS_FROM,
                   tensorrt_backend=v < NO_TENSORRT_BACKEND_FROM)

    @property
    def seeds_with_top_logprobs(self) -> bool:
        """Whether one PyTorch-backend sampler gives both per-request seeds and top-k logprobs: TRTLLMSampler (the
        seeded one on 1.0-1.2) returns the sampled token's logprob only (V3). Unknown: not refused before the worker
        reads the release's fields."""
        return self.sampler in ("torch", "unknown")


def parse(version: str) -> Version:
    try:
        return Version(version)
    except InvalidVersion:
        raise ValueError(f"cannot read TensorRT-LLM's version {version!r}") from None


def installed() -> Release | None:
    """The release in this environment, from its metadata (no import); None where tensorrt_llm is not installed."""
    try:
        dist = importlib.metadata.distribution("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None
    release = Release.of(dist.version)
    files = dist.files  # RECORD: what the wheel installed; absent for some installs, then the version decides
    if files:
        names = {str(f).replace("\\", "/") for f in files}
        release = replace(release, tensorrt_backend="tensorrt_llm/_tensorrt_engine/__init__.py" in names)
    return release


def running(tllm) -> Release:
    """The imported release, its features checked where they can be (V2, V4, V6, V8, V9)."""
    release = Release.of(tllm.__version__)
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

    fields = set(TorchLlmArgs.model_fields)
    sampler: SamplerChoice = ("flags" if "enable_trtllm_sampler" in fields
                              else "sampler_type" if "sampler_type" in fields else "torch")
    params = inspect.signature(tllm.LLM.generate_async).parameters
    return replace(release, sampler=sampler, cache_salt="cache_salt" in params,
                   tensorrt_backend=importlib.util.find_spec("tensorrt_llm._tensorrt_engine") is not None,
                   health_check=callable(getattr(tllm.LLM, "_check_health", None)),
                   kv_cache_capacity=callable(getattr(tllm.LLM, "get_kv_cache_capacity", None)))


def sampler_kwargs(release: Release, samples: bool, seeded: bool) -> dict:
    """LLM(...) keywords that make the PyTorch backend sample each request as asked (V1-V3). samples: the job may
    sample (a temperature above 0, or a per-row temperature column); seeded: it gives seeds (sampling.seed or a
    per-row seed column). 1.0 needs TRTLLMSampler to sample at all; 1.1-1.2 need it only for seeds (TorchSampler
    samples, and keeps top-k logprobs, which TRTLLMSampler lacks)."""
    if release.sampler == "flags" and samples:
        return {"enable_trtllm_sampler": True}
    if release.sampler == "sampler_type" and samples and seeded:
        return {"sampler_type": "TRTLLMSampler"}
    return {}
