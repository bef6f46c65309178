"""The worker's data path, step by step, without Ray: read -> render -> sampling -> requests, completions -> rows.
Real Parquet, the real echo engine and the demo model's tokenizer."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from batchrun.datapath import (
    PromptLimits,
    ShardTask,
    key_columns,
    merge_redone,
    read_shard,
    redo_rows,
    render,
    row_samplings,
    to_requests,
)
from batchrun.engines.base import Completion, RequestKey, Sampling, row_seed
from batchrun.engines.echo import EchoEngine
from batchrun.plan import make_plan
from batchrun.prompts import PromptBuilder
from batchrun.sources import open_source
from batchrun.spec import validate_spec
from tests.conftest import write_parquet


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def encode_with(tok):
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]


def job(tmp_path, rows: int, **inp):
    table = pa.table({"id": [100 + i for i in range(rows)], "q": [f"{i}+{i}" for i in range(rows)],
                      "budget": [None if i % 3 else i + 1 for i in range(rows)]})
    write_parquet(tmp_path / "in.parquet", table)
    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": str(tmp_path / "in.parquet"), **inp},
                          "sampling": {"max_tokens": 4, "seed": 7, "per_row": {"max_tokens": "budget"}},
                          "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 4}})
    return spec, make_plan(spec), open_source(spec.input)


def test_read_and_key_columns(tmp_path):
    spec, plan, source = job(tmp_path, 10, id_column="id", prompt_template="Q: {{ q }}=")
    shard = plan.shards[1]
    table = read_shard(source, plan.units, shard, ["id", "q", "budget"])
    assert table.column("id").to_pylist() == [104, 105, 106, 107]
    assert key_columns(table, shard, "id", ["id"]).column_names == ["id"]
    generated = key_columns(table, shard, None, [])
    assert generated.column("row_index").to_pylist() == [4, 5, 6, 7]  # the row's position in the plan
    with pytest.raises(RuntimeError, match="plan says"):
        read_shard(source, plan.units, type(shard)(shard.shard_id, 0, 5, shard.fragments), ["id"])


def test_render_template_and_chat_rows(tmp_path, tokenizer):
    spec, plan, source = job(tmp_path, 4, prompt_template="{{ q }}=", chat=True)
    table = read_shard(source, plan.units, plan.shards[0], ["q"])

    def chat(conversations):  # the demo tokenizer's chat template; one conversation refuses, as a template can
        if any("2+2" in c[-1]["content"] for c in conversations):
            raise ValueError("template refused")
        return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    prompts = render(PromptBuilder(spec.input), table, chat)
    assert prompts.texts[2] is None and "chat template failed for this row: template refused" in prompts.errors[2]
    assert all(t and "1+1=" in prompts.texts[1] for t in prompts.texts[:2]) and prompts.errors[0] is None
    echo = render(PromptBuilder(spec.input), table, EchoEngine().render_chat)
    assert echo.texts[0] == "user: 0+0="


def test_row_samplings_per_row_values_and_seeds(tmp_path):
    spec, plan, source = job(tmp_path, 12, id_column="id", prompt_template="{{ q }}=")
    base = Sampling(max_tokens=4, seed=7)
    per_row = {"max_tokens": "budget"}
    seeds = {}
    for shard in plan.shards:
        table = read_shard(source, plan.units, shard, ["id", "budget"])
        ids = table.column("id").to_pylist()
        for i, s in zip(ids, row_samplings(table, ids, base, per_row)):
            seeds[i] = s.seed
            assert s.max_tokens == (i - 100 + 1 if (i - 100) % 3 == 0 else 4)
    assert seeds == {i: row_seed(7, i) for i in range(100, 112)}  # from the id: shard size never matters
    bad = pa.table({"budget": [0, 5]})
    got = row_samplings(bad, [1, 2], base, per_row)
    assert got[0] == "column 'budget' (sampling.per_row.max_tokens): expected an integer >= 1, got 0"
    assert got[1].max_tokens == 5


def test_to_requests_fits_the_context_and_names_the_rows_that_do_not(tokenizer):
    from batchrun.prompts import Prompts

    texts = ["1+1=", "12+34=" * 30, "", None, "5+5="]
    prompts = Prompts(texts, [None, None, None, "template variable 'q' is missing (null) in this row", None])
    samplings = [Sampling(max_tokens=4)] * 4 + ["column 'b' (sampling.per_row.max_tokens): expected ..."]
    encode = encode_with(tokenizer)
    limits = PromptLimits(context=32, max_prompt=None, truncation="error")
    reqs, failed = to_requests(9, prompts, samplings, encode, limits)
    assert [r.request_id for r in reqs] == [RequestKey(9, 0)] and str(reqs[0].request_id) == "9:0"
    assert reqs[0].prompt_token_ids == encode(["1+1="])[0]
    rows = {row: (why, n) for row, why, n in failed}
    assert "exceeds the model's context of 32" in rows[1][0] and rows[1][1] == len(encode([texts[1]])[0])
    assert rows[2][0] == "prompt is empty (0 tokens)" and "missing" in rows[3][0] and "per_row" in rows[4][0]
    reqs, failed = to_requests(9, prompts, samplings, encode, PromptLimits(32, max_prompt=16, truncation="left"))
    cut = next(r for r in reqs if r.request_id.row == 1)
    assert cut.prompt_token_ids == encode([texts[1]])[0][-16:]  # the engine's longest prompt binds before the context
    text_only, _ = to_requests(9, prompts, samplings, EchoEngine().encode, PromptLimits(None, None, "error"))
    assert [r.prompt_token_ids for r in text_only] == [None, None, None]  # echo takes text: no token check


def test_shard_task_slots_completions_back_in_row_and_sample_order():
    from batchrun.shards import Shard

    keep = pa.table({"id": ["a", "b", "c"]})
    task = ShardTask(Shard(4, 0, 3, ()), 1, keep, keep, n=2, logprobs=False)
    done = [Completion(RequestKey(4, r), text=f"{r}.{k}", finish_reason="length", sample_index=k)
            for r in (0, 2) for k in (0, 1)]
    random.Random(3).shuffle(done)
    for c in done:
        task.fill(c.request_id.row, c)
    task.fail_row(1, "too long", prompt_tokens=99)
    with pytest.raises(RuntimeError, match="a second completion"):
        task.fill(0, done[0] if done[0].request_id.row == 0 else done[1])
    out = task.table().to_pylist()
    assert [(r["id"], r["sample_index"], r["generated_text"], r["finish_reason"]) for r in out] == [
        ("a", 0, "0.0", "length"), ("a", 1, "0.1", "length"), ("b", 0, None, "error"), ("b", 1, None, "error"),
        ("c", 0, "2.0", "length"), ("c", 1, "2.1", "length")]
    assert out[2]["error"] == "too long" and out[2]["num_prompt_tokens"] == 99


def test_a_constant_template_renders_one_prompt_per_row_with_no_column_read(tmp_path):
    """A template that names no column and no id column: nothing is read but the rows are still counted (plan, the
    template check and the worker's read), each row gets the prompt."""
    from batchrun.runner import JobRunner

    spec, plan, source = job(tmp_path, 10, prompt_template="Write a haiku about the sea")
    JobRunner(spec, show_progress=False).prepare()  # the template check renders the first rows
    shard = plan.shards[1]
    table = read_shard(source, plan.units, shard, [])
    assert table.num_columns == 0 and table.num_rows == shard.num_rows == 4
    assert render(PromptBuilder(spec.input), table, None).texts == ["Write a haiku about the sea"] * 4
    assert key_columns(table, shard, None, []).column(0).to_pylist() == [4, 5, 6, 7]


def test_redone_rows_replace_the_error_rows_of_a_part_in_place():
    """n=2: a row with one failed sample is redone whole; the other rows keep their values; order and columns kept."""
    part = pa.table({"id": ["a", "a", "b", "b", "c", "c"], "sample_index": pa.array([0, 1] * 3, pa.int32()),
                     "generated_text": ["a0", "a1", "b0", None, None, None],
                     "finish_reason": ["stop", "stop", "stop", "error", "error", "error"]},
                    metadata={b"batchrun": b"{}"})
    assert redo_rows(part, 2) == [1, 2]
    redone = pa.table({"generated_text": ["B0", "B1", "C0", None], "id": ["b", "b", "c", "c"],
                       "sample_index": pa.array([0, 1, 0, 1], pa.int64()),
                       "finish_reason": ["stop", "length", "stop", "error"]})
    merged = merge_redone(part, redone, [1, 2], 2)
    assert merged.schema == part.schema.remove_metadata()  # the part's columns, in its order and types
    assert merged.column("generated_text").to_pylist() == ["a0", "a1", "B0", "B1", "C0", None]
    assert merged.column("finish_reason").to_pylist() == ["stop", "stop", "stop", "length", "stop", "error"]
    assert merged.column("id").to_pylist() == part.column("id").to_pylist()
    with pytest.raises(ValueError, match="do not fit"):
        merge_redone(part, redone.set_column(0, "generated_text", pa.array([[1]] * 4)), [1, 2], 2)
