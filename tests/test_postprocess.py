"""Parsing completions into typed columns and scoring them (no Ray), plus one run through the runner."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchrun.errors import SpecError
from batchrun.hooks import load_hook
from batchrun.postprocess import Parser, Scorer, totals
from batchrun.spec import ParseSpec, ScoreSpec, validate_spec
from tests.conftest import read_output, write_parquet


def test_parse_json_into_typed_fields():
    p = Parser(ParseSpec(kind="json", fields={"label": "str", "confidence": "float", "n": "int"}))
    cols = p.columns(['{"label": "spam", "confidence": 0.9, "n": 3}', "```json\n{\"label\": \"ham\"}\n```",
                      "not json", None])
    assert cols["label"].to_pylist() == ["spam", "ham", None, None]
    assert cols["confidence"].type == pa.float64() and cols["confidence"].to_pylist() == [0.9, None, None, None]
    assert cols["n"].type == pa.int64()
    errors = cols["parse_error"].to_pylist()
    assert errors[0] is None and "lacks field(s) confidence, n" in errors[1]
    assert errors[2].startswith("not JSON") and "error row" in errors[3]
    assert json.loads(cols["parsed"].to_pylist()[0])["label"] == "spam"


def test_parse_choice_and_regex():
    c = Parser(ParseSpec(kind="choice", choices=["Positive", "Negative"])).columns([" positive\n", "maybe"])
    assert c["parsed"].to_pylist() == ["Positive", None] and "not one of" in c["parse_error"].to_pylist()[1]
    r = Parser(ParseSpec(kind="regex", pattern=r"answer: (\d+)")).columns(["the answer: 42.", "no idea"])
    assert r["parsed"].to_pylist() == ["42", None] and "not found" in r["parse_error"].to_pylist()[1]


@pytest.mark.parametrize("spec,texts,refs,want", [
    ({"method": "exact", "reference_column": "ref"}, ["46", " 46 ", "47", None], ["46"] * 4, [1, 1, 0, None]),
    ({"method": "last_number", "reference_column": "ref"}, ["so it is 12, no 13", "13.0", "x"], ["13"] * 3, [1, 1, 0]),
    ({"method": "regex", "pattern": r"#### (\w+)", "reference_column": "ref"},
     ["work #### 7", "7"], ["7", "7"], [1, 0]),
])
def test_scores(spec, texts, refs, want):
    s = Scorer(ScoreSpec(**spec))
    col = s.column(texts, None, pa.table({"ref": refs}))
    assert col.to_pylist() == want
    t = totals(col)
    assert t == {"sum": float(sum(w for w in want if w)), "rows": len(want), "scored": sum(w is not None for w in want)}


def test_choice_score_uses_the_parsed_label_and_hooks_see_the_row():
    s = Scorer(ScoreSpec(method="choice", reference_column="label"))
    column = s.column(["POSITIVE", "neg"], ["Positive", None], pa.table({"label": ["positive", "negative"]}))
    assert column.to_pylist() == [1, 0]
    h = Scorer(ScoreSpec(hook="tests.hooks:length_ratio"))
    assert h.column(["abcd", None], None, pa.table({"answer": ["ab", "c"]})).to_pylist() == [2.0, None]
    with pytest.raises(SpecError, match="key 'score.hook': cannot load the hook 'tests.hooks:nope'"):
        load_hook("tests.hooks:nope", "score.hook")


def test_spec_checks():
    base = {"engine": {"name": "echo"}, "input": {"path": "x"}, "output": {"dir": "y"}}
    for bad, words in [({"output": {"dir": "y", "parse": {"kind": "choice"}}}, "choices is required"),
                       ({"output": {"dir": "y", "parse": {"kind": "regex", "pattern": "("}}}, "not a valid regular"),
                       ({"score": {"method": "exact"}}, "reference_column is required"),
                       ({"score": {"hook": "os.system"}}, "module:function")]:
        with pytest.raises(SpecError, match=words):
            validate_spec({**base, **bad})


@pytest.mark.slow
def test_parse_and_score_through_the_runner(tmp_path, ray_cluster):
    """Echo engine: the completion is the prompt's first word, parsed as a choice and scored against the label."""
    words = ["positive", "negative", "unsure", "Positive"]
    labels = ["positive", "positive", "negative", "positive"]
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(40)), "prompt": [w + " text" for w in words] * 10,
                                                     "label": labels * 10}))
    from batchrun.runner import JobRunner

    spec = validate_spec({"engine": {"name": "echo"}, "sampling": {"max_tokens": 1},
                          "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
                          "output": {"dir": str(tmp_path / "out"),
                                     "parse": {"kind": "choice", "choices": ["positive", "negative"]}},
                          "score": {"method": "choice", "reference_column": "label"},
                          "shards": {"rows_per_shard": 7}})
    summary = JobRunner(spec, show_progress=False).run().summary
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert [rows[i]["parsed"] for i in range(4)] == ["positive", "negative", None, "positive"]
    assert "not one of" in rows[2]["parse_error"]
    assert [rows[i]["score"] for i in range(4)] == [1.0, 0.0, 0.0, 1.0]
    assert summary["metrics"] == {"score_mean": 0.5, "score_sum": 20.0, "rows": 40, "rows_scored": 40}
