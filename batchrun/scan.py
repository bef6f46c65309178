"""The input scan at plan time: what must hold for every row, checked in one streaming pass before the cluster
starts.

- Ids are unique. An id that repeats would put several output rows under one id: a join back to the input, or
  OpenAI's own batch API (custom_id), would refuse that output. The check is exact: integer ids are compared as
  they are; other ids by an 8-byte hash, and a repeated hash is confirmed on the values themselves (a second pass
  over the input, reading only the ids whose hash repeated). Memory: 8 bytes a row, up to ID_CHECK_MAX_ROWS rows
  (1 GiB); past that the check is skipped and the plan says so.
- Every line of a JSON Lines input is a JSON object in UTF-8 (the source refuses others, naming file and line).
- A prompt template renders: a sample of the first rows is rendered, and a template that fails on all of them (a
  missing variable, a sandbox refusal) is refused with the first row's reason, not discovered shard by shard.

The pass reads the id column only (Parquet, HF datasets) in chunks of SCAN_ROWS rows through the job's own source,
so its memory does not grow with the input beyond the ids it keeps.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from batchrun.errors import SpecError
from batchrun.plan import Plan
from batchrun.shards import Fragment
from batchrun.spec import JobSpec

log = logging.getLogger("batchrun")

SCAN_ROWS = 65_536
ID_CHECK_MAX_ROWS = 1 << 27  # 8-byte keys: 1 GiB
TEMPLATE_SAMPLE_ROWS = 64


def _chunks(plan: Plan):
    for unit, rows in enumerate(plan.unit_rows):
        for start in range(0, rows, SCAN_ROWS):
            yield unit, Fragment(unit, start, min(start + SCAN_ROWS, rows))


def _keys(col: pa.ChunkedArray) -> np.ndarray:
    """int64 keys of the ids: the values themselves for integer ids (exact), else an 8-byte hash."""
    if pat.is_integer(col.type):
        return col.to_numpy().astype(np.int64, copy=False)
    from pandas.util import hash_array

    return hash_array(np.asarray(col.to_pylist(), dtype=object)).view(np.int64)


def scan_input(spec: JobSpec, plan: Plan, source) -> None:
    """Raises SpecError (exit 2) for repeated or null ids and for JSON Lines that do not parse."""
    id_col = spec.input.id_column
    jsonl = spec.input.format in ("jsonl", "openai-batch")
    check_ids = bool(id_col) and plan.total_rows <= ID_CHECK_MAX_ROWS
    if id_col and not check_ids:
        log.warning("input.id_column %r: %d rows is past the duplicate check's budget of %d rows (1 GiB); ids are "
                    "not checked for repeats", id_col, plan.total_rows, ID_CHECK_MAX_ROWS)
    if not check_ids and not jsonl:
        return
    columns = [id_col] if check_ids else []
    keys, integer = [], True
    for unit, frag in _chunks(plan):
        table = source.read_fragment(plan.units[unit], frag, columns)  # JSON Lines: parses (and checks) every line
        if not check_ids:
            continue
        col = table.column(id_col)
        if col.null_count:
            offset = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise SpecError(f"key 'input.id_column': column {id_col!r} is null in {col.null_count} row(s) of "
                            f"{plan.units[unit]} (first: row {frag.start + offset + 1} of that file); every row needs "
                            "an id")
        integer = integer and pat.is_integer(col.type)
        keys.append(_keys(col))
    if not check_ids or not keys:
        return
    repeated = _repeated(np.concatenate(keys)).tolist()
    if repeated and not integer:
        repeated = _confirm(plan, source, id_col, set(repeated))
    if repeated:
        shown = ", ".join(repr(v) for v in repeated[:5])
        raise SpecError(f"key 'input.id_column': column {id_col!r} repeats {len(repeated)} id(s), e.g. {shown}; ids "
                        "must be unique (each becomes one output row: a join back to the input, or OpenAI's batch "
                        "API for custom_id, would refuse repeats)")


def _repeated(keys: np.ndarray) -> np.ndarray:
    keys.sort()
    return np.unique(keys[1:][keys[1:] == keys[:-1]])


def _confirm(plan: Plan, source, id_col: str, hashes: set) -> list:
    """The ids whose hash repeated, compared by value: the ones that really repeat (a hash collision is not)."""
    seen, repeats = set(), []
    for unit, frag in _chunks(plan):
        col = source.read_fragment(plan.units[unit], frag, [id_col]).column(id_col)
        for value, key in zip(col.to_pylist(), _keys(col).tolist()):
            if key in hashes:
                if value in seen and value not in repeats:
                    repeats.append(value)
                seen.add(value)
    return repeats


def check_template_renders(spec: JobSpec, plan: Plan, source, builder) -> None:
    """Render the first rows: a template that fails on every one of them fails on the job."""
    if spec.input.prompt_template is None or not plan.shards:
        return
    rows = min(TEMPLATE_SAMPLE_ROWS, plan.unit_rows[0]) if plan.unit_rows[0] else 0
    if not rows:
        return
    table = source.read(plan.units[:1], (Fragment(0, 0, rows),), builder.variables)
    errors = builder.build(table).errors
    if all(e is not None for e in errors):
        raise SpecError(f"key 'input.prompt_template': the template failed on all of the first {rows} rows; "
                        f"first row: {errors[0]}")


def check_choices_column(spec: JobSpec, plan: Plan, source) -> None:
    """score.method loglikelihood: the choices column must hold lists of strings (its type, from the first rows);
    a row whose list is null or empty, or whose reference is not among its choices, is an error row at run time."""
    score = spec.score
    if spec.scoring != "loglikelihood" or not plan.shards or not plan.unit_rows[0]:
        return
    rows = min(TEMPLATE_SAMPLE_ROWS, plan.unit_rows[0])
    column = source.read(plan.units[:1], (Fragment(0, 0, rows),), [score.choices_column]).column(0)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not (
            pa.types.is_string(column.type.value_type) or pa.types.is_large_string(column.type.value_type)
            or pa.types.is_null(column.type.value_type)):
        raise SpecError(f"key 'score.choices_column': column {score.choices_column!r} is {column.type}, expected a "
                        "list of strings per row (list<string>)")
