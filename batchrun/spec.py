"""The job spec: pydantic models for the job file, YAML loading, `--set` overrides, and the fingerprint.

Pydantic lives only at this edge. Everything past `load_spec` reads the validated, frozen models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from batchrun.errors import SpecError

BUILTIN_ENGINES = ("hf", "trtllm", "echo")  # modules of batchrun.engines (its registry)
# An engine name may also be an explicit `module:Class` hook: the only way a job file names code.
HOOK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSpec(_Section):
    name: str = "hf"  # hf | trtllm | echo | module:Class
    model: str | None = None  # a local HF model dir (trtllm: also a built engine dir); echo: omit it
    tokenizer: str | None = None  # defaults to `model`
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    trust_remote_code: bool = False  # off unless asked for: loading a model never runs its repo's code otherwise
    # requests a worker keeps submitted to its engine at once (counted in samples when n > 1); auto: sized from the
    # engine's KV cache and the job's prompt and output lengths, so batchrun never caps the engine's batch
    max_in_flight: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # auto: where the engine reuses prompt prefixes, one row per shared prefix goes first and the rows sharing it
    # once the engine has computed it (batchrun/prefix.py); off: input order. Outputs are the same either way.
    prefix_schedule: Literal["auto", "off"] = "auto"
    # auto: rows of a shard whose prompt and sampling are the same and deterministic (greedy, or one seed) go to the
    # engine once, and the completion is written to each of them; off: every row is a request. Same outputs.
    dedupe: Literal["auto", "off"] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)  # engine-specific settings, passed to the adapter

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if self.name not in BUILTIN_ENGINES and not HOOK_RE.match(self.name):
            raise ValueError(f"engine.name must be one of {', '.join(BUILTIN_ENGINES)} or 'module:Class'; "
                             f"got {self.name!r}")
        return self  # what each engine needs (a model, option values, key combinations) is its own check()


class InputSpec(_Section):
    path: str  # file, dir or glob; a `save_to_disk` dir or a builder name (parquet/json/csv) for format hf
    format: Literal["parquet", "hf", "jsonl", "openai-batch"] = "parquet"
    prompt_column: str | None = None  # defaults to "prompt" unless prompt_template is set
    prompt_template: str | None = None  # a Jinja2 template over the row's columns, rendered in a sandbox
    messages_column: str | None = None  # a column of chat messages [{role, content}], rendered by the chat template
    chat: bool = False  # wrap the text prompt (column or template) as one user message, through the chat template
    system_prompt: str | None = None  # chat: a system message put first
    id_column: str | None = None  # absent: a stable `row_index` (position in the plan) is generated
    passthrough_columns: list[str] = Field(default_factory=list)  # input columns copied to the output
    data_files: str | list[str] | None = None  # format hf with a builder name: the files to load
    split: str = "train"  # format hf: the split to read
    config: str | None = None  # format hf: the dataset's configuration name (hub datasets)
    streaming: bool = False  # format hf: an IterableDataset, planned by its own shards (files), never loaded whole
    truncation: Literal["error", "left", "right"] = "error"  # prompt longer than the context: error row or cut

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if sum(bool(x) for x in (self.prompt_column, self.prompt_template, self.messages_column)) > 1:
            raise ValueError("set one of input.prompt_column, input.prompt_template, input.messages_column")
        if self.streaming and self.format != "hf":
            raise ValueError(f"input.streaming is for format hf (got format {self.format!r})")
        if self.format == "openai-batch" and (self.prompt_column or self.prompt_template or self.messages_column):
            raise ValueError("input.format openai-batch takes its prompts from each line's body; "
                             "do not set input.prompt_column, prompt_template or messages_column")
        return self

    @property
    def openai_batch(self) -> bool:
        return self.format == "openai-batch"

    @property
    def prompt_source(self) -> str:
        if self.openai_batch:
            return ""
        return self.prompt_column or ("" if self.prompt_template or self.messages_column else "prompt")

    @property
    def is_chat(self) -> bool:
        return bool(self.chat or self.messages_column)


# sampling keys a row may set for itself from an input column (sampling.per_row); the bounds are SamplingSpec's own
PER_ROW_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


class SamplingSpec(_Section):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    seed: int | None = Field(None, ge=0, lt=2**63)  # 63 bits: what every engine's seed type holds
    stop: list[str] = Field(default_factory=list)  # generation ends at the first of these; the text excludes it
    n: int = Field(1, ge=1)  # samples per prompt: one output row each, with sample_index
    logprobs: bool = False  # a `logprobs` column: the log probability of each generated token
    top_logprobs: int = Field(0, ge=0, le=20)  # > 0: a `top_logprobs` column, the k likeliest tokens at each step
    # sampling key -> input column: a row's own value (null: the job's); a seed column seeds that row alone
    per_row: dict[Literal[PER_ROW_KEYS], str] = Field(default_factory=dict)


def _number(x) -> str:
    return "2**63" if x == 2**63 else f"{x:g}" if isinstance(x, float) else str(x)


def _row_rule(name: str) -> tuple[TypeAdapter, str]:
    """The job-level field's type and bounds, as a strict validator for one row's value and the words for them."""
    field = SamplingSpec.model_fields[name]
    bounds = {type(m).__name__.lower(): _number(getattr(m, type(m).__name__.lower())) for m in field.metadata}
    kind = "an integer" if int in getattr(field.annotation, "__args__", (field.annotation,)) else "a number"
    lo = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
    hi = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
    if lo and hi:
        words = f"{kind} in {lo}, {hi}"
    else:
        words = f"{kind} >= {lo[1:]}" if lo and lo[0] == "[" else f"{kind} > {lo[1:]}" if lo else kind
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)]), words


PER_ROW_RULES = {name: _row_rule(name) for name in PER_ROW_KEYS}


def per_row_value(name: str, value):
    """A row's own value of sampling.<name>: (the value, None), or (None, what was expected). Strict: a bool is not a
    number, a float is not an integer."""
    adapter, expected = PER_ROW_RULES[name]
    try:
        return adapter.validate_python(value, strict=True), None
    except ValidationError:
        return None, expected


class ParseSpec(_Section):
    kind: Literal["json", "choice", "regex"]
    choices: list[str] = Field(default_factory=list)  # kind choice: the allowed labels (case-insensitive match)
    pattern: str | None = None  # kind regex: the value is group `group` of the first match
    group: int = Field(1, ge=0)
    fields: dict[str, Literal["str", "int", "float", "bool"]] = Field(default_factory=dict)  # kind json: typed columns
    # constrained decoding: the engine may only generate text that parses (choices; json/regex: engine trtllm)
    guided: bool = False
    json_schema: dict[str, Any] | None = None  # kind json, guided: the schema the output follows (default: any object)
    # kind choice: no generation; each label's probability from its log-likelihood given the prompt (`label_probs`),
    # `parsed` the likeliest (batchrun/loglikelihood.py). The label scored is target_delimiter + label
    probabilities: bool = False
    target_delimiter: str = " "

    @model_validator(mode="after")
    def _check(self) -> ParseSpec:
        if self.kind == "choice" and not self.choices:
            raise ValueError("output.parse.choices is required for kind choice")
        if self.probabilities and (self.kind != "choice" or self.guided):
            raise ValueError("output.parse.probabilities is for kind choice without guided (it scores the labels "
                             "instead of generating)")
        if self.json_schema is not None and self.kind != "json":
            raise ValueError("output.parse.json_schema is for kind json")
        if self.kind == "regex":
            _check_regex(self.pattern, "output.parse.pattern")
        return self


LOGLIKELIHOOD_METHODS = ("loglikelihood", "loglikelihood_rolling")


class ScoreSpec(_Section):
    # loglikelihood: each choice's log P(choice | prompt), no generation; loglikelihood_rolling: the whole prompt's
    # log-likelihood (perplexity). Both as lm-evaluation-harness computes them (batchrun/loglikelihood.py)
    method: Literal["exact", "last_number", "regex", "choice", "loglikelihood", "loglikelihood_rolling"] = "exact"
    reference_column: str | None = None  # the right answer, per row (loglikelihood: the choice's index or text)
    pattern: str | None = None  # method regex: extract group `group` of the completion, compare to the reference
    group: int = Field(1, ge=0)
    hook: str | None = None  # module:function(generated_text, row) -> float: a custom scorer
    choices_column: str | None = None  # method loglikelihood: list<string> of the row's choices
    target_delimiter: str = " "  # method loglikelihood: what goes between the prompt and each choice (lm-eval's)

    @model_validator(mode="after")
    def _check(self) -> ScoreSpec:
        if self.hook is not None and not HOOK_RE.match(self.hook):
            raise ValueError(f"score.hook must be 'module:function'; got {self.hook!r}")
        if self.method in LOGLIKELIHOOD_METHODS:
            if self.hook is not None:
                raise ValueError(f"score.hook does not go with score.method {self.method} (nothing is generated)")
            if (self.method == "loglikelihood") != bool(self.choices_column):
                raise ValueError("score.choices_column is required for score.method loglikelihood (and only there)"
                                 if self.method == "loglikelihood" else
                                 "score.choices_column is for score.method loglikelihood")
            if self.method == "loglikelihood_rolling" and self.reference_column:
                raise ValueError("score.reference_column does not go with score.method loglikelihood_rolling")
        elif self.choices_column:
            raise ValueError("score.choices_column is for score.method loglikelihood")
        elif self.hook is None and not self.reference_column:
            raise ValueError("score.reference_column is required unless score.hook is set")
        if self.method == "regex":
            _check_regex(self.pattern, "score.pattern")
        return self


def _check_regex(pattern: str | None, key: str) -> None:
    if not pattern:
        raise ValueError(f"{key} is required")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key} is not a valid regular expression: {e}") from None


class OutputSpec(_Section):
    dir: str
    parse: ParseSpec | None = None  # labelling: extract a typed result from each completion
    rows_per_file: int | None = Field(None, ge=1)  # caps rows per Parquet file (a file never spans two shards)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class ResourcesSpec(_Section):
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1  # auto: as many as the cluster's GPUs allow
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    placement: Literal["spread", "pack"] = "spread"  # workers over as many nodes as possible, or as few
    # CPU priority of each worker and the engine ranks it spawns. Ray starts workers at niceness 15, behind every
    # other process on the node, but a worker's engine loop is the job's critical path. null keeps Ray's.
    niceness: int | None = Field(0, ge=-20, le=19)
    # price of one GPU hour (any currency): the summary and `batchrun status` then give the job's cost and the cost
    # per 1M generated tokens. A job without GPUs counts one unit per worker.
    gpu_hour_cost: float | None = Field(None, ge=0)


class ShardsSpec(_Section):
    rows_per_shard: int = Field(1000, ge=1)
    # rows whose prompts share a prefix put next to each other across the whole input, before the plan is cut (a
    # sorted copy under the output dir; group.py): for prefix reuse when siblings are far apart in the input
    group_prefixes: bool = False
    group_key_chars: int = Field(4096, ge=1)  # rows are sorted by this many leading characters of their prompt
    group_window_rows: int = Field(262_144, ge=1)  # ... within windows of this many rows (the driver holds one)


class FaultsSpec(_Section):
    max_attempts: int = Field(4, ge=1)  # a shard failing this many times is quarantined
    # Replacement workers the job may start, relative to the fleet: in any hour, at most max_worker_restarts or
    # restarts_per_worker_hour x the job's workers, whichever is more (a throttling burst on 1,000 workers must not
    # end the job; a model that cannot run still fails it within the hour)
    max_worker_restarts: int = Field(16, ge=0)
    restarts_per_worker_hour: float = Field(0.5, ge=0)
    lease_timeout_s: float = Field(120.0, gt=0)  # a lease not renewed by a heartbeat for this long is handed out again
    heartbeat_s: float = Field(2.0, gt=0)
    stall_timeout_s: float = Field(600.0, gt=0)  # no completion while requests are in flight: the worker is replaced
    drain_s: float = Field(20.0, ge=0)  # on SIGTERM/SIGINT: commit what finishes within this, hand the rest back
    startup_timeout_s: float = Field(900.0, gt=0)  # a worker must have its engine loaded within this


_PROMPT_KEYS = ("prompt_column", "prompt_template", "messages_column", "chat", "system_prompt")


class TaskSpec(_Section):
    """One task of a suite (JobSpec.tasks): its input, and what it changes of the suite's sampling, output (parse,
    compression), score and shards. Engine, resources and faults are the suite's. Each task is validated as a whole
    job (task_specs), its keys named with the task's.

    Shorthands an eval user writes: `prompt` (a Jinja2 template, or a mapping of the input's prompt keys) and `parse`
    go to input and output; `output` may be just the task's subdirectory (default: its name) under output.dir."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    input: dict[str, Any]
    prompt: str | dict[str, Any] | None = None  # input.prompt_template, or {prompt_column: ..., chat: true, ...}
    sampling: dict[str, Any] = Field(default_factory=dict)
    parse: dict[str, Any] | None = None  # output.parse
    output: str | dict[str, Any] = Field(default_factory=dict)  # a subdirectory, or output keys (+ subdir)
    score: dict[str, Any] | None = None
    shards: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_shorthands(self) -> TaskSpec:
        if isinstance(self.prompt, dict) and (extra := sorted(set(self.prompt) - set(_PROMPT_KEYS))):
            raise ValueError(f"prompt takes {', '.join(_PROMPT_KEYS)} (got {', '.join(extra)})")
        prompt = self.prompt_keys()
        if clash := sorted(set(prompt) & set(self.input)):
            raise ValueError(f"set {clash[0]} in prompt or in input, not both")
        if self.parse is not None and "parse" in self.output_keys():
            raise ValueError("set parse or output.parse, not both")
        sub = self.subdir
        if not sub or sub.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in re.split(r"[/\\]", sub)):
            raise ValueError(f"output subdirectory {sub!r} must be a relative path inside output.dir (no '..')")
        if any(p.startswith(("_", ".")) for p in sub.split("/")):
            raise ValueError(f"output subdirectory {sub!r}: a name starting with '_' or '.' is skipped by readers")
        return self

    def prompt_keys(self) -> dict[str, Any]:
        if self.prompt is None:
            return {}
        return {"prompt_template": self.prompt} if isinstance(self.prompt, str) else dict(self.prompt)

    def output_keys(self) -> dict[str, Any]:
        return {} if isinstance(self.output, str) else {k: v for k, v in self.output.items() if k != "subdir"}

    @property
    def subdir(self) -> str:
        if isinstance(self.output, str):
            return self.output.rstrip("/")
        return str(self.output.get("subdir") or self.name).rstrip("/")


class JobSpec(_Section):
    @model_validator(mode="before")
    @classmethod
    def _openai_batch_defaults(cls, raw):
        """OpenAI Batch API files run unchanged: custom_id is the id, body.max_tokens the per-row budget."""
        inp = raw.get("input") if isinstance(raw, dict) else None
        if isinstance(inp, dict) and inp.get("format") == "openai-batch":
            raw = dict(raw, input=dict(inp))
            raw["input"].setdefault("id_column", "custom_id")
            raw["input"]["passthrough_columns"] = list(dict.fromkeys(
                list(inp.get("passthrough_columns") or []) + ["url", "model"]))
            sampling = dict(raw.get("sampling") or {})
            sampling["per_row"] = {"max_tokens": "max_tokens", **(sampling.get("per_row") or {})}
            raw["sampling"] = sampling
        return raw

    engine: EngineSpec = Field(default_factory=EngineSpec)
    input: InputSpec | None = None  # a job's input; a suite has tasks instead, each with its own
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    shards: ShardsSpec = Field(default_factory=ShardsSpec)
    faults: FaultsSpec = Field(default_factory=FaultsSpec)
    score: ScoreSpec | None = None  # evals: a score column per row and the job's mean score
    # a suite: tasks that share the engine (started once) and resources, each with its own input and output subdir
    tasks: list[TaskSpec] | None = None

    @model_validator(mode="after")
    def _check_tasks(self) -> JobSpec:
        if (self.input is None) == (self.tasks is None):
            raise ValueError("a job file needs 'input' (one job) or 'tasks' (a suite), not both" if self.input
                             else "input is required (or 'tasks' for a suite)")
        if self.tasks is not None:
            names = [t.name for t in self.tasks]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"tasks need distinct names (got {names})")
            subdirs = [t.subdir for t in self.tasks]
            if len(set(subdirs)) != len(subdirs):
                raise ValueError(f"tasks need distinct output subdirectories (got {subdirs})")
        return self

    def task_specs(self) -> list[tuple[str, JobSpec]]:
        """A suite's tasks as jobs: the suite's keys, the task's over them (section by section; score replaced),
        output.dir = <output.dir>/<name>. A mistake names the task and the key."""
        base = self.model_dump(exclude={"tasks", "input"}, exclude_unset=True)
        out = []
        for task in self.tasks or []:
            output = {**base.get("output", {}), **task.output_keys(),
                      "dir": f"{self.output.dir.rstrip('/')}/{task.subdir}"}
            if task.parse is not None:
                output["parse"] = task.parse
            raw = {**base, "input": {**task.input, **task.prompt_keys()},
                   "sampling": {**base.get("sampling", {}), **task.sampling}, "output": output,
                   "shards": {**base.get("shards", {}), **task.shards}}
            if task.score is not None:
                raw["score"] = task.score
            out.append((task.name, validate_spec(raw, source=f"task {task.name!r}")))
        return out

    @model_validator(mode="after")
    def _check_scoring(self) -> JobSpec:
        """A scoring job generates nothing: the sampling keys that shape a generation have nothing to act on."""
        if (mode := self.scoring) is None:
            return self
        s = self.sampling
        if s.n > 1 or s.logprobs or s.top_logprobs:
            key = "n" if s.n > 1 else "logprobs" if s.logprobs else "top_logprobs"
            raise ValueError(f"sampling.{key} does not go with a scoring job ({mode}: nothing is generated)")
        if mode != "labels" and self.output.parse is not None:
            raise ValueError(f"output.parse does not go with score.method {mode} (nothing is generated to parse)")
        return self

    @property
    def scoring(self) -> str | None:
        """The job scores, not generates: loglikelihood | loglikelihood_rolling | labels (parse.probabilities)."""
        if self.score is not None and self.score.method in LOGLIKELIHOOD_METHODS:
            return self.score.method
        if self.output.parse is not None and self.output.parse.probabilities:
            return "labels"
        return None

    @property
    def rows_per_shard(self) -> int:
        """The shard is the unit of commit, so a file cap is also a shard cap."""
        cap = self.output.rows_per_file
        return min(self.shards.rows_per_shard, cap) if cap else self.shards.rows_per_shard

    def output_affecting(self) -> dict[str, Any]:
        """The parts of the spec that change what lands in the output (resources and output.dir do not).

        Defaults are left out, so a later batchrun that adds a key (at a default that keeps outputs as they were)
        still resumes jobs started by an earlier one."""
        dump = {"exclude_defaults": True}
        return {
            "engine": self.engine.model_dump(exclude={"max_in_flight", "prefix_schedule", "dedupe"}, **dump),
            "input": self.input.model_dump(**dump),
            "sampling": self.sampling.model_dump(**dump),
            "rows_per_shard": self.rows_per_shard,
            **({"grouped": self.shards.model_dump(exclude={"rows_per_shard"})} if self.shards.group_prefixes else {}),
            "output": self.output.model_dump(exclude={"dir"}, **dump),
            "score": self.score.model_dump(**dump) if self.score else None,
        }


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job file. Every mistake is one SpecError naming the key."""
    return validate_spec(load_raw(path, overrides), source=str(path))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A job file's sections, overridden, not yet validated (batchrun eval fills in the input)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"job file {path}: cannot read it ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)  # safe_load: YAML tags never construct Python objects
    except yaml.YAMLError as e:
        raise SpecError(f"job file {path}: not valid YAML: {e}") from None
    if raw is None:
        raise SpecError(f"job file {path} is empty: expected the sections engine, input, sampling, output, ...")
    if not isinstance(raw, dict):
        raise SpecError(f"job file {path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML, so numbers, booleans and lists keep their types."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set output.dir=/tmp/out")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {item!r}: key '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def validate_spec(raw: dict, source: str = "job file") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(describe_errors(e, source)) from None


_UNION_TAGS = {"int", "str", "float", "bool", "dict", "list", "none"}


def _key(loc: tuple) -> str:
    """The dotted key, without the tags pydantic adds for each member of a union (e.g. "literal['auto']")."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or "(top level)"


def describe_errors(err: ValidationError, source: str, root: type[BaseModel] | None = None,
                    prefix: tuple = ()) -> str:
    """One line per mistake, naming the dotted key. `root` is the model validated (the job spec unless given) and
    `prefix` where it sits in the job file (engine.options for an engine's options model)."""
    lines: list[str] = []
    merged: dict[str, int] = {}  # a union's alternatives become one line: "... or Input should be 'auto'"
    for item in err.errors():
        key = _key((*prefix, *item["loc"]))
        if key in merged and item["type"] not in ("extra_forbidden", "missing"):
            lines[merged[key]] = lines[merged[key]].replace(" (given:", f", or {item['msg']} (given:", 1)
            continue
        given = item.get("input")
        if item["type"] == "extra_forbidden":
            section = _section_for(item["loc"][:-1], root or JobSpec)
            allowed = ", ".join(section.model_fields) if section else ""
            lines.append(f"{source}: unknown key '{key}'; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{source}: key '{key}' is required")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            merged[key] = len(lines)
            lines.append(f"{source}: key '{key}': {msg} (given: {given!r})")
    return "\n".join(lines)


def _section_for(loc: tuple, model: type[BaseModel]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
