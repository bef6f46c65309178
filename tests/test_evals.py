"""Evals as lm-evaluation-harness runs them: each choice's log-likelihood given the prompt (no generation), label
probabilities, and perplexity, on the demo model, checked against lm-eval's own HF backend (a dev dependency) with
its defaults: |difference| <= 1e-3 per choice in float32 on CPU, the same is_greedy and the same predictions."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import yaml

from batchrun.cli import main
from batchrun.engines.base import Request, Sampling
from batchrun.errors import SpecError
from batchrun.loglikelihood import encode_pair, predictions, rolling_pairs
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import read_output, write_parquet

# contexts that exercise lm-eval's rules: trailing spaces move to the continuation, an empty context becomes the
# prefix token, a context longer than the model's 128 tokens is cut from the left, choices of several tokens
CASES = [("Question: 2+2=?\nAnswer:", ["4", "5", "22"]), ("The sky is  ", ["blue", "green and grey", " red "]),
         ("", ["hello world", "x"]), ("word " * 60 + "end:", ["alpha", "beta gamma"]),
         ("Réponse :", ["été", "hiver"])]
TEXTS = ["the quick brown fox jumps over the lazy dog " * 30, "short text", "Ünïcödé — text. " * 5]


@pytest.fixture(scope="module")
def lm(demo_model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(demo_model), device="cpu", dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def engine(demo_model):
    from batchrun.engines.hf_score import HFScoreEngine

    eng = HFScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32", device="cpu")
    yield eng
    eng.close()


def lm_eval_loglikelihoods(lm, context: str, choices: list[str]) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    return lm.loglikelihood([Instance("loglikelihood", {}, (context, " " + c), i) for i, c in enumerate(choices)],
                            disable_tqdm=True)


def scored(engine, pairs):
    engine.submit(Request("k", "", None, Sampling(max_tokens=1), pairs=tuple(pairs)))
    (c,) = engine.poll(5.0)
    assert c.error is None, c.error
    return c


def test_choice_loglikelihoods_equal_lm_eval(lm, engine):
    """Each row alone, then all rows at once (the engine batches the rows that share their prompt, left-padded, and
    scores the long one whole): the same numbers as lm-eval either way."""
    wants, pairs = [], []
    for context, choices in CASES:
        wants.append(lm_eval_loglikelihoods(lm, context, choices))
        pairs.append([encode_pair(engine.tok_encode, engine.prefix_token_id, context, " " + c) for c in choices])
    alone = [scored(engine, p) for p in pairs]
    for i, p in enumerate(pairs):
        engine.submit(Request(i, "", None, Sampling(max_tokens=1), pairs=tuple(p)))
    together = sorted(engine.poll(5.0), key=lambda c: c.request_id)
    assert len(together) == len(CASES)
    for (context, choices), want, one, batched in zip(CASES, wants, alone, together):
        for got in (one, batched):
            for (ll, greedy), mine, mine_greedy in zip(want, got.pair_logprobs, got.pair_greedy):
                assert abs(ll - mine) <= 1e-3, (context[:20], ll, mine)
                assert greedy == mine_greedy
            assert predictions(got.pair_logprobs, choices) == predictions([ll for ll, _ in want], choices)


def test_a_greedy_continuation_is_seen_as_greedy(engine):
    """The demo model is random: build a continuation from its own argmax tokens, so is_greedy is true somewhere."""
    import torch

    ctx = engine.tok_encode("Once upon a time")
    ids = list(ctx)
    with torch.inference_mode():
        for _ in range(3):
            ids.append(int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    got = scored(engine, [(tuple(ctx), tuple(ids[len(ctx):])), (tuple(ctx), (ids[-1], ids[-2]))])
    assert got.pair_greedy[0] is True


def test_rolling_loglikelihood_equals_lm_eval(lm, engine):
    from lm_eval.api.instance import Instance

    want = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)],
                                    disable_tqdm=True)
    for text, ll in zip(TEXTS, want):
        pairs = rolling_pairs(engine.tok_encode(text), engine.prefix_token_id, engine.context_length)
        assert abs(sum(scored(engine, pairs).pair_logprobs) - ll) <= 1e-3 * max(1, len(pairs))


MC = [  # id, question, choices, answer (index; text in the `answer_text` column)
    (0, "2+2=", ["4", "5", "22"], 0), (1, "The sky is", ["blue", "green"], 1), (2, "Cats say", ["meow", "woof"], 0),
    (3, "Dogs say", [], 0), (4, "Birds", None, 0), (5, "Fish", ["swim", "fly"], 7), (6, "Ice is", ["cold"], 0),
]


def mc_job(tmp_path, **score) -> dict:
    write_parquet(tmp_path / "mc.parquet", pa.table({
        "id": [r[0] for r in MC], "q": [r[1] for r in MC],
        "choices": pa.array([r[2] for r in MC], pa.list_(pa.string())), "answer": [r[3] for r in MC],
        "answer_text": [r[2][r[3]] if r[2] and r[3] < len(r[2]) else "nope" for r in MC]}))
    return {"engine": {"name": "hf", "model": "build/demo-model", "dtype": "float32"},
            "input": {"path": str(tmp_path / "mc.parquet"), "id_column": "id",
                      "prompt_template": "Question: {{ q }}\nAnswer:"},
            "score": {"method": "loglikelihood", "choices_column": "choices", "reference_column": "answer",
                      **score},
            "output": {"dir": str(tmp_path / "out")}, "resources": {"num_workers": 1},
            "shards": {"rows_per_shard": 3}}


@pytest.mark.slow
def test_multiple_choice_job_writes_lm_eval_numbers_and_error_rows(tmp_path, ray_cluster, lm, demo_model):
    raw = mc_job(tmp_path)
    raw["engine"]["model"] = str(demo_model)
    summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == [r[0] for r in MC]  # every row once, bad ones as error rows
    assert rows[3]["error"] == "choices are empty" and rows[4]["error"] == "choices are null"
    assert "reference index 7 is outside the 2 choices" in rows[5]["error"]
    right = norm_right = 0
    for rid, q, choices, answer in MC:
        row = rows[rid]
        if row["error"] is not None:
            assert row["finish_reason"] == "error" and row["score"] is None
            continue
        want = lm_eval_loglikelihoods(lm, f"Question: {q}\nAnswer:", choices)
        assert [abs(a - b) <= 1e-3 for a, b in zip(row["choice_logprobs"], [ll for ll, _ in want])] == \
            [True] * len(choices)
        assert row["choice_greedy"] == [g for _, g in want]
        pred, pred_norm, _ = predictions([ll for ll, _ in want], choices)
        assert (row["prediction"], row["prediction_norm"]) == (pred, pred_norm)
        assert row["generated_text"] == choices[pred] and row["num_generated_tokens"] == 0
        assert row["choice_tokens"] == [len(encode_pair_len(lm, q, c)) for c in choices]
        assert row["score"] == float(pred == answer)
        right, norm_right = right + (pred == answer), norm_right + (pred_norm == answer)
    m = summary["metrics"]
    assert m["acc"] == round(right / len(MC), 6) and m["acc_norm"] == round(norm_right / len(MC), 6)
    assert summary["error_rows"] == 3 and m["rows_scored"] == 4

    # the reference as the choice's text: the same scores
    raw2 = {**raw, "score": {**raw["score"], "reference_column": "answer_text"},
            "output": {"dir": str(tmp_path / "o2")}}
    JobRunner(validate_spec(raw2), show_progress=False).run()
    texts = {r["id"]: r for r in read_output(tmp_path / "o2").to_pylist()}
    assert "the reference 'nope' is not one of the choices" in texts[5]["error"]
    assert all(texts[i]["score"] == rows[i]["score"] for i in (0, 1, 2, 6))


def encode_pair_len(lm, q, choice):
    return lm._encode_pair(f"Question: {q}\nAnswer:", " " + choice)[1]


@pytest.mark.slow
def test_label_probabilities_and_perplexity_jobs(tmp_path, ray_cluster, lm, demo_model):
    labels = ["positive", "negative", "neutral"]
    reviews = ["great film", "awful plot", "it was fine", "loved it"]
    gold = labels + ["positive"]
    write_parquet(tmp_path / "r.parquet", pa.table({"id": list(range(4)), "text": reviews, "gold": gold}))
    raw = {"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
           "input": {"path": str(tmp_path / "r.parquet"), "id_column": "id",
                     "prompt_template": "Review: {{ text }}\nSentiment:"},
           "output": {"dir": str(tmp_path / "labels"), "parse": {"kind": "choice", "choices": labels,
                                                                  "probabilities": True}},
           "score": {"method": "choice", "reference_column": "gold"}, "resources": {"num_workers": 1}}
    summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
    for row in read_output(tmp_path / "labels").to_pylist():
        want = [ll for ll, _ in lm_eval_loglikelihoods(lm, f"Review: {reviews[row['id']]}\nSentiment:", labels)]
        top = max(want)
        probs = [math.exp(ll - top) / sum(math.exp(x - top) for x in want) for ll in want]
        assert abs(sum(row["label_probs"]) - 1) < 1e-9
        assert all(abs(a - b) < 1e-4 for a, b in zip(row["label_probs"], probs))
        assert row["parsed"] == labels[max(range(3), key=lambda i: probs[i])] == row["generated_text"]
        assert row["score"] == float(row["parsed"] == gold[row["id"]])  # score.method choice reads `parsed`
    assert summary["metrics"]["rows"] == 4

    # perplexity: the whole text's log-likelihood, windowed at the model's context
    from lm_eval.api.instance import Instance

    write_parquet(tmp_path / "t.parquet", pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}))
    job = {"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
           "input": {"path": str(tmp_path / "t.parquet"), "id_column": "id", "prompt_column": "text"},
           "score": {"method": "loglikelihood_rolling"}, "output": {"dir": str(tmp_path / "ppl")},
           "resources": {"num_workers": 1}}
    (tmp_path / "ppl.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "ppl.yaml"), "--no-progress"]) == 0
    want = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)],
                                    disable_tqdm=True)
    rows = sorted(read_output(tmp_path / "ppl").to_pylist(), key=lambda r: r["id"])
    assert all(abs(r["loglikelihood"] - ll) < 1e-2 for r, ll in zip(rows, want))
    m = json.loads((tmp_path / "ppl" / "_summary.json").read_text())["metrics"]
    words = sum(len(t.split()) for t in TEXTS)  # lm-eval: len(re.split(r"\s+", text)); TEXTS[0] ends in a space
    words += sum(t.endswith(" ") for t in TEXTS)
    assert math.isclose(m["word_perplexity"], math.exp(-sum(want) / words), rel_tol=1e-4)
    assert math.isclose(m["bits_per_byte"], -sum(want) / sum(len(t.encode()) for t in TEXTS) / math.log(2),
                        rel_tol=1e-4)


def test_bad_scoring_jobs_are_refused_at_plan_time(tmp_path, demo_model):
    raw = mc_job(tmp_path)
    raw["engine"]["model"] = str(demo_model)

    def refused(change: dict, match: str):
        bad = json.loads(json.dumps(raw))
        for key, value in change.items():
            section, name = key.split(".", 1)
            bad.setdefault(section, {})[name] = value
        with pytest.raises((SpecError, ValueError), match=match):
            JobRunner(validate_spec(bad), show_progress=False).prepare()

    refused({"score.choices_column": "nope"}, r"score.choices_column.*'nope' not in the input")
    refused({"score.choices_column": "q"}, r"score.choices_column.*'q' is string, expected a list of strings")
    refused({"score.choices_column": None}, r"choices_column is required for score.method loglikelihood")
    refused({"score.hook": "tests.hooks:score"}, "score.hook does not go with")
    refused({"sampling.n": 2}, "sampling.n does not go with a scoring job")
    refused({"engine.name": "echo"}, r"key 'score.method \(loglikelihood\)'.*engine 'echo' cannot")
    refused({"engine.tensor_parallel_size": 2}, "a scoring job .* runs on one device")


@pytest.mark.slow
def test_duplicate_requests_are_generated_once_with_the_same_outputs(tmp_path, ray_cluster):
    """Rows whose prompt and sampling repeat another row's in the shard go to the engine once (CountingEcho logs
    each request it gets); every row gets the output it would have had; sampled rows without a seed are never
    merged; engine.dedupe: off sends every row."""
    import collections

    prompts = [f"w{i % 7} x y z" for i in range(30)]
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(30)), "prompt": prompts,
                                                     "t": [0.0] * 20 + [0.7] * 10}))

    def run(name, **engine):
        raw = {"engine": {"name": "tests.engines:CountingEcho", "options": {"log_path": str(tmp_path / f"{name}-log")},
                          **engine},
               "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
               "sampling": {"max_tokens": 3, "per_row": {"temperature": "t"}}, "output": {"dir": str(tmp_path / name)},
               "resources": {"num_workers": 1}, "shards": {"rows_per_shard": 10}}
        summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
        sent = collections.Counter(line for f in (tmp_path / f"{name}-log").glob("*.log")
                                   for line in f.read_text().split())
        rows = sorted(read_output(tmp_path / name).to_pylist(), key=lambda r: r["id"])
        return summary, sent, rows

    summary, sent, rows = run("dedup")
    # greedy shards 0-1: 7 distinct prompts in each; shard 2 samples without a seed: every row is its own request
    assert sum(sent.values()) == 7 + 7 + 10 and set(sent.values()) == {1}
    assert summary["duplicate_rows"] == 3 + 3
    assert [r["generated_text"] for r in rows] == [" ".join(p.split()[:3]) for p in prompts]
    off_summary, off_sent, off_rows = run("plain", dedupe="off")
    assert sum(off_sent.values()) == 30 and off_summary["duplicate_rows"] == 0
    assert rows == off_rows  # the same outputs, row for row


@pytest.mark.slow
def test_the_example_eval_jobs_run_on_the_demo_model(tmp_path, ray_cluster, demo_model):
    """jobs/multiple-choice.yaml, jobs/label-probs.yaml and jobs/perplexity.yaml as the README shows them."""
    from batchrun.demo import write_choices, write_prompts
    from batchrun.spec import load_spec
    from tests.conftest import ROOT

    choices, prompts = write_choices(tmp_path / "choices.parquet", n=64), write_prompts(tmp_path / "p.parquet", 64)

    def run(job, data):
        spec = load_spec(ROOT / "jobs" / f"{job}.yaml", [f"output.dir={tmp_path / job}", f"input.path={data}",
                                                         f"engine.model={demo_model}"])
        summary = JobRunner(spec, show_progress=False).run().summary
        return summary, read_output(tmp_path / job).to_pylist()

    summary, rows = run("multiple-choice", choices)
    assert summary["error_rows"] == 0 and summary["metrics"]["acc"] >= 0.9  # the demo model learned arithmetic
    import pyarrow.parquet as pq

    source = {r["id"]: r for r in pq.read_table(choices).to_pylist()}
    assert all(r["generated_text"] == source[r["id"]]["choices"][r["prediction"]] for r in rows)
    summary, rows = run("label-probs", prompts)
    assert all(abs(sum(r["label_probs"]) - 1) < 1e-9 and r["parsed"] == r["generated_text"] for r in rows)
    assert sum(r["parsed"] == r["answer"][0] for r in rows) >= 0.9 * len(rows)
    summary, rows = run("perplexity", prompts)
    assert all(r["loglikelihood"] < 0 and r["loglikelihood_tokens"] > 0 for r in rows)
    assert summary["metrics"]["bits_per_byte"] > 0 and summary["metrics"]["rows_scored"] == 64
