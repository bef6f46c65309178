"""The worker's data path as pure steps, each testable without Ray (tests/test_datapath.py):

    a leased shard:   read_shard -> key_columns -> render -> row_samplings -> to_requests -> ShardTask
    its completions:  ShardTask.fill (one per row and sample) -> ShardTask.table -> the Parquet part

Every request carries a RequestKey (shard, row), which engines pass through unchanged: a completion finds its row
again whatever order it finishes in.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from batchrun.engines.base import Completion, Request, RequestKey, Sampling, row_seed
from batchrun.loglikelihood import Likelihoods, encode_pair, rolling_pairs, row_problem
from batchrun.prompts import PromptBuilder, Prompts, fit_to_context
from batchrun.shards import Shard
from batchrun.spec import per_row_value

ROW_INDEX = "row_index"  # the generated id column when the input names none
INPUT_ROW = "__batchrun_row"  # a grouped copy's column: each row's position in the input (group.py)


OUTPUT_SCHEMA = [
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("error", pa.string()),
]

TOP_LOGPROBS_TYPE = pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))


@dataclass
class ShardTask:
    """One leased shard between reading and commit. Results are slotted by (row, sample): exactly one per slot."""

    shard: Shard
    attempt: int
    keep: pa.Table  # id + passthrough columns, in input order
    score_inputs: pa.Table  # the columns the scorer reads (reference column, or the whole row for a hook)
    n: int  # samples per row: slot = row * n + sample_index
    logprobs: bool  # keep each sample's token logprobs for a `logprobs` column
    top_logprobs: int = 0  # > 0: a `top_logprobs` column, the k likeliest tokens per generated token
    requests: list[Request] = field(default_factory=list)  # rows that reached the engine, in submission order
    started_at: float = field(default_factory=time.time)
    base: pa.Table | None = None  # `run --retry-errors`: the committed part whose error rows this task redoes
    redo: list[int] | None = None  # ... those rows' offsets in the shard (this task's rows, in order)
    # a scoring job (loglikelihood.py): what makes its columns, each row's choices (or labels), and (words, bytes)
    likelihoods: Likelihoods | None = None
    choices: list | None = None
    counts: list | None = None
    copies: dict[int, list[int]] = field(default_factory=dict)  # a row sent to the engine -> its duplicates (dedupe)

    def __post_init__(self):
        slots = self.keep.num_rows * self.n
        self.text: list[str | None] = [None] * slots
        self.finish: list[str | None] = [None] * slots
        self.prompt_tokens, self.gen_tokens = [0] * slots, [0] * slots
        self.cached_tokens = [0] * slots  # prompt tokens the engine reused from an earlier request's blocks
        self.error: list[str | None] = [None] * slots
        self.token_logprobs: list[list[float] | None] = [None] * slots
        self.top: list[list[list[dict]] | None] = [None] * slots
        self.pair_lls: list[list[float] | None] = [None] * slots  # a scoring job's log-likelihoods, per pair
        self.pair_greedy: list[list[bool] | None] = [None] * slots
        self.pair_tokens: list[list[int] | None] = [None] * slots
        self.score_totals: dict | None = None  # a scoring job's per-shard sums (set by table())
        self.remaining = slots

    def fill(self, offset: int, c: Completion) -> None:
        slot = offset * self.n + c.sample_index
        if self.finish[slot] is not None:
            raise RuntimeError(f"shard {self.shard.shard_id} row {offset} sample {c.sample_index}: "
                               "a second completion arrived")
        self.text[slot] = c.text if c.error is None else None
        self.finish[slot] = c.finish_reason if c.error is None else "error"
        self.prompt_tokens[slot] = c.num_prompt_tokens
        self.gen_tokens[slot] = c.num_generated_tokens
        self.cached_tokens[slot] = c.num_cached_prompt_tokens or 0
        self.error[slot] = c.error
        self.token_logprobs[slot] = c.logprobs
        self.pair_lls[slot], self.pair_greedy[slot], self.pair_tokens[slot] = (
            c.pair_logprobs, c.pair_greedy, c.pair_tokens) if c.error is None else (None, None, None)
        if self.top_logprobs and c.top_logprobs is not None:
            self.top[slot] = [[{"token_id": t, "logprob": lp} for t, lp in step.items()] for step in c.top_logprobs]
        self.remaining -= 1

    def fail_row(self, offset: int, error: str, prompt_tokens: int = 0) -> None:
        """A row that never reaches the engine: every one of its samples is an error row."""
        for k in range(self.n):
            self.fill(offset, Completion(RequestKey(self.shard.shard_id, offset), finish_reason="error", error=error,
                                         num_prompt_tokens=prompt_tokens, sample_index=k))

    def table(self, parser=None, scorer=None) -> pa.Table:
        if self.remaining or any(f is None for f in self.finish):  # a real check: `python -O` drops asserts
            raise RuntimeError(f"shard {self.shard.shard_id} written before every row finished "
                               f"({self.remaining} of {len(self.finish)} slots open)")
        scored, self.score_totals = {}, None
        if self.likelihoods is not None:  # nothing generated: the text is the predicted choice or label
            self.text, scored, self.score_totals = self.likelihoods.columns(
                self.pair_lls, self.pair_greedy, self.pair_tokens, self.choices,
                self.score_inputs.column(0).to_pylist() if self.score_inputs.num_columns else None, self.counts)
        cols = [self.text, self.finish, self.prompt_tokens, self.gen_tokens, self.error]
        out, inputs = self.keep, self.score_inputs
        if self.n > 1:  # one output row per sample, in (row, sample) order
            rows = pa.array([i for i in range(self.keep.num_rows) for _ in range(self.n)], pa.int64())
            out, inputs = out.take(rows), inputs.take(rows)
            out = out.append_column("sample_index", pa.array(list(range(self.n)) * self.keep.num_rows, pa.int32()))
        for (name, typ), values in zip(OUTPUT_SCHEMA, cols):
            out = out.append_column(pa.field(name, typ), pa.array(values, type=typ))
        if self.logprobs:
            out = out.append_column("logprobs", pa.array(self.token_logprobs, pa.list_(pa.float32())))
        if self.top_logprobs:
            out = out.append_column("top_logprobs", pa.array(self.top, TOP_LOGPROBS_TYPE))
        for name, column in scored.items():
            out = out.append_column(name, column)
        parsed = None
        if parser is not None:
            for name, column in parser.columns(self.text).items():
                out = out.append_column(name, column)
            parsed = out.column("parsed").to_pylist()
        if scorer is not None:
            out = out.append_column("score", scorer.column(self.text, parsed, inputs))
        return out


# ---------------------------------------------------------------- a leased shard -> requests


def read_shard(source, units: tuple[str, ...], shard: Shard, columns: list[str]) -> pa.Table:
    """The shard's rows, only `columns`, in input order; a row count that differs from the plan fails the attempt."""
    table = source.read(units, shard.fragments, columns)
    if table.num_rows != shard.num_rows:
        raise RuntimeError(f"read {table.num_rows} rows, the plan says {shard.num_rows}: did the input change?")
    return table


def key_columns(table: pa.Table, shard: Shard, id_column: str | None, keep: list[str]) -> pa.Table:
    """The columns each output row carries from its input row: the id (or a generated row_index) and passthrough."""
    out = table.select(keep)
    if not id_column:  # its position in the input: the plan's, or the one a grouped copy carries
        index = (table.column(INPUT_ROW) if INPUT_ROW in table.column_names
                 else pa.array(range(shard.row_start, shard.row_start + shard.num_rows), pa.int64()))
        out = out.add_column(0, ROW_INDEX, index)
    return out


def render(builder: PromptBuilder, table: pa.Table, render_chat: Callable[[list[list[dict]]], list[str]]) -> Prompts:
    """Prompt text per row (template or column), through the engine's chat template where the job is a chat. A row
    whose template fails becomes an error; one failure never fails the shard."""
    prompts = builder.build(table)
    if not prompts.chat:
        return prompts
    ok = [i for i, m in enumerate(prompts.texts) if isinstance(m, list)]  # plain text rows stay as they are
    texts, errors = [m if isinstance(m, str) else None for m in prompts.texts], list(prompts.errors)
    try:
        for i, text in zip(ok, render_chat([prompts.texts[i] for i in ok])):
            texts[i] = text
    except Exception as e:  # render row by row to find the rows that fail
        for i in ok:
            try:
                texts[i] = render_chat([prompts.texts[i]])[0]
            except Exception as row_error:
                errors[i] = f"chat template failed for this row: {row_error or e}"
    return Prompts(texts, errors)


def row_samplings(table: pa.Table, row_ids: list, base: Sampling, per_row: dict[str, str]) -> list[Sampling | str]:
    """Per-row sampling: the job's settings, overridden by the columns named in sampling.per_row.

    A job seed becomes one seed per row, derived from the row's id: a row samples the same way whatever shard,
    worker or batch it lands in. A row whose override is unusable gets the error message instead."""
    if not per_row and base.seed is None:
        return [base] * table.num_rows
    columns = {key: table.column(col).to_pylist() for key, col in per_row.items()}
    out: list[Sampling | str] = []
    for i in range(table.num_rows):
        changes, error = {}, None
        for key, values in columns.items():
            if values[i] is None:  # no override in this row: the job's setting
                continue
            value, expected = per_row_value(key, values[i])
            if expected is not None:
                error = f"column {per_row[key]!r} (sampling.per_row.{key}): expected {expected}, got {values[i]!r}"
                break
            changes[key] = value
        if error is not None:
            out.append(error)
            continue
        if "seed" not in changes and base.seed is not None:
            changes["seed"] = row_seed(base.seed, row_ids[i])
        out.append(dataclasses.replace(base, **changes) if changes else base)
    return out


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt must fit: the engine's context and longest prompt, and the job's truncation policy."""

    context: int | None
    max_prompt: int | None
    truncation: str  # error | left | right


def to_requests(shard_id: int, prompts: Prompts, samplings: list[Sampling | str],
                encode: Callable[[list[str]], list[list[int]] | None], limits: PromptLimits
                ) -> tuple[list[Request], list[tuple[int, str, int]]]:
    """The rows that reach the engine, as requests in row order, and the rows that do not: (row, why, prompt tokens).
    Text is tokenized in one call per shard (engines that take text return None: no token ids, no length check)."""
    errors = list(prompts.errors)
    for i, s in enumerate(samplings):
        if isinstance(s, str) and errors[i] is None:
            errors[i] = s
    ok = [i for i, t in enumerate(prompts.texts) if t is not None and errors[i] is None]
    token_ids = encode([prompts.texts[i] for i in ok]) if ok else []
    requests, failed = [], []
    for j, i in enumerate(ok):
        sampling, ids = samplings[i], token_ids[j] if token_ids is not None else None
        if ids is not None:
            fitted, why = fit_to_context(ids, sampling.max_tokens, limits.context, limits.truncation,
                                         limits.max_prompt)
            why = why or (None if fitted else "prompt is empty (0 tokens)")
            if why is not None:
                failed.append((i, why, len(ids)))
                continue
            ids = fitted
        requests.append(Request(RequestKey(shard_id, i), prompts.texts[i], ids, sampling))
    sent = set(ok)
    failed += [(i, err, 0) for i, err in enumerate(errors) if err is not None and i not in sent]
    return requests, sorted(failed)


def dedupe(requests: list[Request]) -> tuple[list[Request], dict[int, list[int]]]:
    """The requests to send, and for each one the rows that repeat it: the same prompt (token ids, or text), the
    same scoring pairs and the same sampling, where that sampling is deterministic (greedy, or a seed). The first row
    of each group goes to the engine; its completion is written to the others too."""
    first: dict = {}
    sent, copies = [], {}
    for r in requests:
        s = r.sampling
        if s.temperature > 0 and s.seed is None:
            sent.append(r)
            continue
        key = (tuple(r.prompt_token_ids) if r.prompt_token_ids is not None else r.prompt, r.pairs, s)
        lead = first.setdefault(key, r.request_id.row)
        if lead == r.request_id.row:
            sent.append(r)
        else:
            copies.setdefault(lead, []).append(r.request_id.row)
    return sent, copies


def to_score_requests(shard_id: int, prompts: Prompts, samplings: list[Sampling | str], engine, mode: str,
                      choices: list | None, references: list | None, delimiter: str) -> tuple[list[Request], list]:
    """A scoring job's rows as requests of (context, continuation) pairs (loglikelihood.py), and the rows that
    cannot be scored: (row, why, 0). mode: loglikelihood | labels (one pair per choice) | loglikelihood_rolling."""
    requests, failed = [], []
    for i, text in enumerate(prompts.texts):
        why = prompts.errors[i] or (samplings[i] if isinstance(samplings[i], str) else None)
        if why is None and mode != "loglikelihood_rolling":
            ref = references[i] if references is not None else None
            why = row_problem(choices[i], ref, check_ref=references is not None)
        if why is not None or text is None:
            failed.append((i, why or "no prompt", 0))
            continue
        if mode == "loglikelihood_rolling":
            pairs = rolling_pairs(engine.tok_encode(text), engine.prefix_token_id, engine.context_length)
        else:
            pairs = [encode_pair(engine.tok_encode, engine.prefix_token_id, text, delimiter + c) for c in choices[i]]
        if not pairs:
            failed.append((i, "the text encodes to no tokens", 0))
            continue
        requests.append(Request(RequestKey(shard_id, i), text, None, samplings[i], pairs=tuple(pairs)))
    return requests, failed


# ---------------------------------------------------------------- `run --retry-errors`: a committed part's error rows


def redo_rows(part: pa.Table, n: int) -> list[int]:
    """The input rows (offsets in the shard) of a committed part that have an error row: each is generated again,
    every sample of it (a row's samples are one request)."""
    errors = part.column("finish_reason").to_pylist()
    return sorted({i // n for i, reason in enumerate(errors) if reason == "error"})


def merge_redone(part: pa.Table, redone: pa.Table, rows: list[int], n: int) -> pa.Table:
    """The part with the output rows of input rows `rows` replaced by `redone` (their rows, in the same (row, sample)
    order), every other row as it was: the same rows in the same order, one revision newer."""
    redone = redone.select(part.column_names)
    try:
        redone = redone.cast(part.schema.remove_metadata())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ValueError(f"the redone rows do not fit the committed part's columns: {e}") from None
    where = {r: j for j, r in enumerate(rows)}
    take = [part.num_rows + where[i // n] * n + i % n if i // n in where else i for i in range(part.num_rows)]
    return pa.concat_tables([part.replace_schema_metadata(None), redone]).take(pa.array(take, pa.int64()))
