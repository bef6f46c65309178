"""Shared prompt prefixes grouped across the whole input (shards.group_prefixes, group.py)."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import SpecError
from batchrun.group import ROW, grouped_plan
from batchrun.plan import make_plan
from batchrun.spec import validate_spec
from batchrun.store.output import OutputDir
from tests.conftest import read_output, write_parquet


def documents_table(docs: int = 60, questions: int = 4, seed: int = 3) -> pa.Table:
    """Questions about documents, shuffled: rows that share a long prefix lie far apart."""
    rng = random.Random(seed)
    rows = [(d, q) for d in range(docs) for q in range(questions)]
    rng.shuffle(rows)
    return pa.table({"id": [f"d{d}-q{q}" for d, q in rows], "doc": [f"document {d}: " + "lorem " * 20 for d, _ in rows],
                     "question": [f"question {q} about {d}?" for d, q in rows]})


def job(tmp_path, **shards) -> dict:
    return {"engine": {"name": "echo"},
            "input": {"path": str(tmp_path / "in"), "prompt_template": "{{ doc }}\nQ: {{ question }}"},
            "output": {"dir": str(tmp_path / "out")}, "resources": {"num_workers": 2},
            "shards": {"rows_per_shard": 8, "group_prefixes": True, **shards}}


def write_input(tmp_path, table: pa.Table, files: int = 3) -> None:
    step = -(-table.num_rows // files)
    for i in range(files):
        write_parquet(tmp_path / "in" / f"part-{i}.parquet", table.slice(i * step, step), row_group_size=17)


def doc_of(prompt_or_doc: str) -> str:
    return prompt_or_doc.split(":")[0]


@pytest.mark.fast
@pytest.mark.parametrize("window", [1000, 64])
def test_grouping_puts_siblings_together_and_keeps_every_row_once(tmp_path, window):
    table = documents_table()
    write_input(tmp_path, table)
    spec = validate_spec(job(tmp_path, group_window_rows=window))
    plan, out = make_plan(spec), OutputDir(tmp_path / "out")
    out.ensure()
    grouped, info = grouped_plan(spec, plan, out)
    assert info["built"] and len(grouped.shards) == len(plan.shards)  # the same shard count, the same ids
    copy = pa.concat_tables(pq.read_table(u) for u in grouped.units)
    assert sorted(copy.column(ROW).to_pylist()) == list(range(table.num_rows))  # every input row once
    original = {r: i for r, i in enumerate(table.column("id").to_pylist())}
    assert [original[r] for r in copy.column(ROW).to_pylist()] == copy.column("id").to_pylist()  # its own position
    docs, rows = [doc_of(d) for d in copy.column("doc").to_pylist()], copy.column(ROW).to_pylist()
    for start in range(0, copy.num_rows, window):  # each window: the input's rows, each document's one after another
        assert sorted(rows[start:start + window]) == list(range(start, min(start + window, table.num_rows)))
        part = docs[start:start + window]
        runs = [d for i, d in enumerate(part) if i == 0 or part[i - 1] != d]
        assert len(runs) == len(set(part))
    again, info = grouped_plan(spec, plan, out)
    assert not info["built"] and again == grouped  # a rerun reuses the copy


@pytest.mark.fast
def test_grouping_is_part_of_the_fingerprint_and_refused_for_streamed_datasets(tmp_path):
    write_input(tmp_path, documents_table(4))
    plain = validate_spec(job(tmp_path, group_prefixes=False))
    grouped = validate_spec(job(tmp_path))
    assert "grouped" not in plain.output_affecting()  # jobs written before the key resume as they did
    assert grouped.output_affecting() != plain.output_affecting()
    streamed = validate_spec({**job(tmp_path), "input": {"path": "x", "format": "hf", "streaming": True}})
    with pytest.raises(SpecError, match="shards.group_prefixes"):
        grouped_plan(streamed, make_plan(grouped), OutputDir(tmp_path / "out"))


@pytest.mark.slow
def test_a_grouped_job_writes_the_same_rows_as_input_order_with_siblings_in_the_same_shards(tmp_path, ray_cluster):
    """No id column: each row keeps its input position as row_index. The grouped job's output equals the input-order
    job's row for row; its shards hold 2 documents each instead of ~8; a rerun recomputes nothing and reuses the
    copy; switching grouping on an output dir is refused (shards would hold other rows)."""
    from batchrun.errors import SpecError as Refused
    from batchrun.runner import JobRunner

    table = documents_table().drop(["id"])
    write_input(tmp_path, table)
    raw = job(tmp_path)
    plain = {**raw, "output": {"dir": str(tmp_path / "plain")}, "shards": {"rows_per_shard": 8}}
    JobRunner(validate_spec(plain), show_progress=False).run()
    summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
    assert summary["grouped_input"]["built"] and summary["rows"] == table.num_rows
    cols = ["row_index", "generated_text", "finish_reason", "num_prompt_tokens"]
    got = read_output(tmp_path / "out").select(cols).sort_by("row_index")
    want = read_output(tmp_path / "plain").select(cols).sort_by("row_index")
    assert got.equals(want) and got.column("row_index").to_pylist() == list(range(table.num_rows))
    prompts = table.column("doc").to_pylist()

    def docs_per_part(root):
        return [len({doc_of(prompts[i]) for i in pq.read_table(p).column("row_index").to_pylist()})
                for p in sorted(root.glob("part-*.parquet"))]

    assert max(docs_per_part(tmp_path / "out")) <= 3 < max(docs_per_part(tmp_path / "plain"))
    again = JobRunner(validate_spec(raw), show_progress=False).run().summary
    assert again["shards_skipped"] == len(list((tmp_path / "out").glob("part-*.parquet")))
    assert again["grouped_input"]["built"] is False
    with pytest.raises(Refused):
        JobRunner(validate_spec({**plain, "output": raw["output"]}), show_progress=False).run()
    # windows of 64 rows: each window grouped by a Ray task of its own; the same rows and outputs again
    windows = {**raw, "output": {"dir": str(tmp_path / "windows")},
               "shards": {**raw["shards"], "group_window_rows": 64}}
    summary = JobRunner(validate_spec(windows), show_progress=False).run().summary
    assert summary["grouped_input"]["windows"] == 4
    assert read_output(tmp_path / "windows").select(cols).sort_by("row_index").equals(want)
