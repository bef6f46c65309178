"""Engine adapters behind one interface (base.Engine), and the registry that maps `engine.name` to what each engine
owns: its `options` model, its cross-key `check(spec)` and how it is built. The spec, runner and worker hold no
engine-specific rule: `check_engine` runs an engine's rules in the driver before Ray starts (exit 2 on a mistake),
and `create_engine` builds it in the worker.

An engine module (or a `module:Class` hook) provides:
- `options_model()`: the pydantic model of its `engine.options` (extra keys forbidden);
- `check(spec)`: raises ValueError naming the job-file keys of a combination the engine cannot run;
- `create(engine_spec, sampling_spec, parse)`: the Engine;
- `create_scorer(engine_spec, sampling_spec)`, where the engine can score (log-likelihoods instead of generation:
  batchrun/loglikelihood.py): the Engine a scoring job runs on. A job that scores on an engine without it is refused
  at plan time.
A hook class may define `Options` and a `check` classmethod; it is built as `Class(model=, sampling=, ...)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from batchrun.engines.base import Completion, Engine, Request, Sampling
from batchrun.engines.common import model_args, require_model_dir, sampling_from_spec
from batchrun.errors import SpecError
from batchrun.hooks import load_hook
from batchrun.spec import BUILTIN_ENGINES, EngineSpec, JobSpec, ParseSpec, SamplingSpec, describe_errors


@dataclass(frozen=True)
class EngineKind:
    name: str
    options: type[BaseModel] | None  # engine.options, validated at plan time
    check: Callable[[JobSpec], None]  # cross-key rules; raises ValueError naming the keys
    create: Callable[[EngineSpec, SamplingSpec, ParseSpec | None], Engine]
    create_scorer: Callable[[EngineSpec, SamplingSpec], Engine] | None = None


def engine_kind(name: str) -> EngineKind:
    """The registry: a built-in engine module, or an explicit `module:Class` hook (the one place a job file names
    code), imported here so that a typo fails in the driver, before any worker starts."""
    if name in BUILTIN_ENGINES:
        module = importlib.import_module(f"batchrun.engines.{name}")
        return EngineKind(name, module.options_model(), module.check, module.create,
                          getattr(module, "create_scorer", None))
    factory: Any = load_hook(name, "engine.name")
    if not callable(factory):
        raise SpecError(f"key 'engine.name': {name!r} is not a class or function (got {type(factory).__name__})")

    def create(spec: EngineSpec, sampling: SamplingSpec, parse: ParseSpec | None) -> Engine:
        return factory(model=spec.model, sampling=sampling_from_spec(sampling), **model_args(spec, spec.options))

    return EngineKind(name, getattr(factory, "Options", None), getattr(factory, "check", lambda spec: None), create)


def validate_options(kind: EngineKind, options: dict) -> dict:
    """engine.options through the engine's model: a typo or a wrong type names its key (as the job spec's own)."""
    if kind.options is None:
        return dict(options)
    try:
        return kind.options(**options).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise SpecError(describe_errors(e, f"job file (engine {kind.name!r})", kind.options,
                                        ("engine", "options"))) from None


def check_engine(spec: JobSpec) -> EngineKind:
    """Everything about the engine that can be known before Ray starts: the hook imports, the options validate, the
    engine's cross-key rules hold. Raises SpecError (exit 2) naming the keys."""
    kind = engine_kind(spec.engine.name)
    validate_options(kind, spec.engine.options)
    if spec.scoring and kind.create_scorer is None:
        key = "output.parse.probabilities" if spec.scoring == "labels" else f"score.method ({spec.scoring})"
        raise SpecError(f"key '{key}' scores log-likelihoods, which engine {spec.engine.name!r} cannot do here; "
                        "use engine hf or trtllm")
    try:
        kind.check(spec)
    except ValueError as e:
        raise SpecError(str(e)) from None
    return kind


def create_engine(spec: EngineSpec, sampling: SamplingSpec, parse: ParseSpec | None = None,
                  scoring: bool = False) -> Engine:
    """Build the engine the spec names (in the worker). `parse`, when guided, constrains what it may generate;
    scoring: the job scores log-likelihoods instead of generating."""
    kind = engine_kind(spec.name)
    if scoring:
        return kind.create_scorer(spec, sampling)
    return kind.create(spec, sampling, parse if parse is not None and parse.guided else None)


__all__ = ["Completion", "Engine", "EngineKind", "Request", "Sampling", "check_engine", "create_engine",
           "engine_kind", "model_args", "require_model_dir", "sampling_from_spec", "validate_options"]
