"""The trtllm adapter against the double playing each supported TensorRT-LLM release (UPSTREAM.md V1-V9, E6-E7,
P5, R5): one test per defect a release showed, run on every release where it can show.

Each of these failed on the adapter before the release table: sampled jobs were greedy on 1.0, seeds were ignored on
1.1-1.2, a failed step became error rows, scoring passed cache_salt to 1.0 and read stale, padded rows on the TensorRT
backend, several samples with a stop string lost their finish reason, and the plan did not know the release."""

from __future__ import annotations

import dataclasses
import time

import pytest

from batchrun.engines.base import EngineDead, Request, Sampling, row_seed
from tests.test_trtllm import collect, load_double, make_engine, model_with_knobs, plan, score_all

RELEASES = ["1.0.0", "1.1.0", "1.2.1", "1.3.0rc29", "1.4.0rc1"]
WITH_TENSORRT_BACKEND = ["1.0.0", "1.1.0", "1.2.1"]


@pytest.fixture(params=RELEASES)
def release(request, monkeypatch, tmp_path):
    """The double playing one release; returns its module (tensorrt_llm)."""
    return load_double(monkeypatch, tmp_path, request.param)


@pytest.fixture
def tllm(monkeypatch):
    return load_double(monkeypatch)  # the default: 1.2.1


def texts_and_ids(engine, n: int) -> tuple[list[str], list[list[int]]]:
    texts = [f"{i}+{3 * i}=" for i in range(n)]
    return texts, engine.encode(texts)


def generate(engine, texts, ids, sampling: Sampling, seed: int | None) -> dict[str, list[int]]:
    reqs = [Request(f"0:{i}", t, x, sampling if seed is None else
                    dataclasses.replace(sampling, seed=row_seed(seed, i))) for i, (t, x) in
            enumerate(zip(texts, ids))]
    got = collect(engine, reqs, expect=len(reqs) * sampling.n)
    assert len(got) == len(reqs) * sampling.n and all(c.error is None for c in got)
    return {f"{c.request_id}/{c.sample_index}": c.token_ids for c in got}


# ---------------------------------------------------------------- V1-V3: sampled jobs sample, seeded jobs reproduce


PER_BACKEND = [(v, "pytorch") for v in RELEASES] + [(v, "tensorrt") for v in WITH_TENSORRT_BACKEND]


@pytest.mark.parametrize("version,backend", PER_BACKEND)
def test_sampled_jobs_sample(monkeypatch, tmp_path, demo_model, version, backend):
    """1.0's TorchSampler decoded every request greedily unless told otherwise (V1: temperature 0.8 gave 20/20
    greedy rows): the adapter picks the sampler per release, and no sampled row comes back greedy."""
    load_double(monkeypatch, tmp_path, version)
    sampled = Sampling(max_tokens=6, temperature=0.8, top_p=0.95)
    engine = make_engine(demo_model, sampled, backend=backend)
    texts, ids = texts_and_ids(engine, 20)
    for seed in (11, None):
        got = generate(engine, texts, ids, sampled, seed)
        greedy = [k for k, x in enumerate(ids) if got[f"0:{k}/0"] == list(reversed(x))[:6]]
        assert greedy == [], f"{len(greedy)}/20 sampled rows came back greedy (seed {seed})"
    engine.close()


def test_a_seeded_job_run_twice_gives_the_same_rows(release, demo_model):
    """Same rows, same seeds, two engines: equal tokens on every release (V1-V3); unseeded sampling differs."""
    sampled = Sampling(max_tokens=6, temperature=0.8, top_p=0.95)
    outs = []
    for _ in range(2):
        engine = make_engine(demo_model, dataclasses.replace(sampled, seed=11))  # the job's seed: rows get their own
        texts, ids = texts_and_ids(engine, 20)
        outs.append((generate(engine, texts, ids, sampled, seed=11), generate(engine, texts, ids, sampled, None)))
        engine.close()
    (seeded_a, unseeded_a), (seeded_b, unseeded_b) = outs
    assert seeded_a == seeded_b
    assert unseeded_a != unseeded_b  # without a seed a sampler draws from its own generator


def test_the_sampler_each_release_is_given(release, demo_model):
    """V1-V3 as keywords: 1.0 enable_trtllm_sampler for sampled jobs; 1.1-1.3 sampler_type TRTLLMSampler for seeded
    ones (TorchSampler samples and keeps top-k logprobs, but ignores seeds); newest: TorchSampler honours seeds, no
    keyword. Greedy jobs never change the sampler; gather_generation_logits is never set on the PyTorch backend."""
    from batchrun.engines.trtllm import TRTLLMOptions, llm_class_and_kwargs
    from batchrun.engines.trtllm.options import JobNeeds

    def kwargs(samples, seeded, logprobs=False):
        needs = JobNeeds("pytorch", False, 0, samples, seeded)
        return llm_class_and_kwargs(release, str(demo_model), 1, "auto", False, TRTLLMOptions(), logprobs,
                                    needs=needs)[1]

    sampler_keys = {"enable_trtllm_sampler", "enable_mixed_sampler", "sampler_type"}
    seeded = {k: v for k, v in kwargs(True, True).items() if k in sampler_keys}
    unseeded = {k: v for k, v in kwargs(True, False).items() if k in sampler_keys}
    want = {"1.0.0": ({"enable_trtllm_sampler": True}, {"enable_trtllm_sampler": True}),
            "1.4.0rc1": ({}, {})}.get(release.__version__, ({"sampler_type": "TRTLLMSampler"}, {}))
    assert (seeded, unseeded) == want
    assert not sampler_keys & set(kwargs(False, False)) and "gather_generation_logits" not in kwargs(True, True, True)


# ---------------------------------------------------------------- E6, E7: a failed step is the engine's death


def test_a_failed_step_is_engine_dead_never_error_rows(release, demo_model, tmp_path):
    """E6: a step that raises fails every request it held with the exception's own text (no engine word in it) and
    the executor goes on; E7 (newest) the same, and over its error budget the executor dies and broadcasts. Either
    way: EngineDead, no error row, and a request failing alone is still that row's error."""
    for knobs in ({"fail_step": [2, 5]}, {"fail_step": [2, 5], "fatal": True}):
        (tmp_path / str(len(knobs))).mkdir()
        engine = make_engine(model_with_knobs(tmp_path / str(len(knobs)), demo_model, **knobs))
        texts, ids = texts_and_ids(engine, 10)
        for i, x in enumerate(ids):
            engine.submit(Request(f"0:{i}", texts[i], x, Sampling(max_tokens=3)))
        got, deadline = [], time.time() + 20
        with pytest.raises(EngineDead, match="TensorRT-LLM executor died"):
            while time.time() < deadline:
                got += engine.poll(0.05)
        assert all(c.error is None for c in got), [c.error for c in got]
        engine.close()
    engine = make_engine(demo_model)
    texts = ["1+1=", "FAILREQ", "2+2="]
    got = {c.request_id: c for c in collect(engine, [Request(f"0:{i}", t, x, Sampling(max_tokens=3)) for i, (t, x)
                                                     in enumerate(zip(texts, engine.encode(texts)))], expect=3)}
    engine.close()
    assert got["0:1"].finish_reason == "error" and got["0:0"].error is None and got["0:2"].error is None


def test_a_prompt_past_max_num_tokens_is_that_rows_error(release, demo_model):
    """L9: refused by generate_async itself (ValueError, RequestError on newest): the row's error, not a death."""
    engine = make_engine(demo_model, max_num_tokens=4, enable_chunked_prefill=False)
    texts = ["1+1=", "12345+67890=123"]
    got = {c.request_id: c for c in collect(engine, [Request(f"0:{i}", t, x, Sampling(max_tokens=2)) for i, (t, x)
                                                     in enumerate(zip(texts, engine.encode(texts)))], expect=2)}
    engine.close()
    assert got["0:0"].error is None and "max_num_tokens" in got["0:1"].error


# ---------------------------------------------------------------- V4, P5: scoring on every release and backend


def scoring_rows(trt):
    from batchrun.loglikelihood import encode_pair

    boundary = "Sum:"  # a context of 31 tokens: choices sharing a first token share a whole 32-token block
    while len(trt.tok_encode(boundary)) < 31:
        boundary += "9"
    cases = [("Question: 2+2=?\nAnswer:", ["4", "5", "22"]), ("12+30=" * 8, ["42", "43", "7"]),
             (boundary, ["12", "13"])]
    return [(f"r{i}", [encode_pair(trt.tok_encode, trt.prefix_token_id, ctx, " " + c) for c in choices])
            for i, (ctx, choices) in enumerate(cases)]


@pytest.mark.parametrize("version,backend", PER_BACKEND)
def test_scoring_equals_the_hf_scorer_on_every_release(monkeypatch, tmp_path, demo_model, version, backend):
    """1.0 has no cache_salt (V4): scoring there runs with block reuse off instead of passing it. The TensorRT
    backend returns prompt_len rows whatever was reused, the reused ones never written, over the padded vocabulary
    (P5; the double pads to a multiple of TP, as pad_vocab_size): only written rows and the real vocabulary count."""
    from batchrun.engines.hf_score import HFScoreEngine
    from batchrun.engines.trtllm import TRTScoreEngine
    from batchrun.engines.trtllm.releases import running

    release = load_double(monkeypatch, tmp_path, version)
    tp = 3 if backend == "tensorrt" else 1  # 3 does not divide the demo vocabulary (91): the TensorRT rows are padded
    trt = TRTScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32", backend=backend,
                         tensor_parallel_size=tp)
    hf = HFScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32", device="cpu")
    assert tp == 1 or trt.vocab % tp, "the demo vocabulary must not divide by TP, or nothing is padded"
    rows = scoring_rows(trt)
    try:
        want, got = score_all(hf, rows), score_all(trt, rows)
        for key, _ in rows:
            assert got[key].error is None, got[key].error
            assert got[key].pair_greedy == want[key].pair_greedy
            assert all(abs(a - b) < 1e-4 for a, b in zip(got[key].pair_logprobs, want[key].pair_logprobs)), key
        reuse = running(release).cache_salt
        assert trt.prefix_reuse is reuse and (got["r1"].num_cached_prompt_tokens >= 32) is reuse
    finally:
        trt.close()
        hf.close()


# ---------------------------------------------------------------- R5: several samples and a stop string


def test_several_samples_with_a_stop_string_each_end_with_their_reason(tllm, demo_model):
    """R5: a stop string in one sample's text aborted the whole request, its siblings ending with no finish reason.
    batchrun cuts each sample at the stop string itself: every sample is its stopless text cut there, 'stop' where
    it was found, 'length' where not, never an error."""
    sampled = Sampling(max_tokens=8, temperature=0.9, n=4, seed=5)
    engine = make_engine(demo_model, sampled)
    ids = engine.encode(["7+7="])[0]
    free = {c.sample_index: c.text for c in collect(engine, [Request("0:0", "7+7=", ids, sampled)], expect=4)}
    found = sorted(set(free[0]) - set(free[1]) - {" "})
    assert found, f"no character of sample 0 missing from sample 1: {free}"
    stop = (found[0],)
    cut = dataclasses.replace(sampled, stop=stop)
    got = {c.sample_index: c for c in collect(engine, [Request("0:1", "7+7=", ids, cut)], expect=4)}
    engine.close()
    for k, c in got.items():
        assert c.error is None
        assert (c.text, c.finish_reason) == ((free[k].split(stop[0])[0], "stop") if stop[0] in free[k]
                                             else (free[k], "length"))


# ---------------------------------------------------------------- V5, V6: the plan knows the release


@pytest.mark.parametrize("version,options,sampling,words", [
    ("1.3.0rc29", {"backend": "tensorrt"}, None,
     ["engine.options.backend", "TensorRT-LLM 1.3.0rc29", "no TensorRT backend", "1.2.1"]),
    ("1.4.0rc1", {"backend": "tensorrt", "quantization": {"algo": "W8A16"}}, None, ["no TensorRT backend"]),
    ("1.0.0", {}, {"top_logprobs": 3}, ["sampling.top_logprobs", "TensorRT-LLM 1.0.0", "1.1"]),
    ("1.2.1", {}, {"top_logprobs": 3, "seed": 4, "temperature": 0.7}, ["sampling.seed", "TRTLLMSampler"]),
    ("0.21.0", {}, None, ["TensorRT-LLM 0.21.0 is older than 1.0"]),
])
def test_plan_refuses_what_the_release_cannot_do(monkeypatch, tmp_path, capsys, demo_model, version, options,
                                                 sampling, words):
    load_double(monkeypatch, tmp_path, version)
    code, err = plan(tmp_path, capsys, {"model": str(demo_model), "options": options}, sampling)
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err}"


@pytest.mark.parametrize("version,options,sampling", [
    ("1.2.1", {"backend": "tensorrt"}, {"top_logprobs": 3, "seed": 4, "temperature": 0.7}),
    ("1.2.1", {}, {"top_logprobs": 3, "temperature": 0.7}),  # TorchSampler: top-k, no seed asked
    ("1.4.0rc1", {}, {"top_logprobs": 3, "seed": 4, "temperature": 0.7}),  # newest TorchSampler does both
    ("1.0.0", {}, {"seed": 4, "temperature": 0.7}),
])
def test_plan_accepts_what_the_release_can_do(monkeypatch, tmp_path, capsys, demo_model, version, options, sampling):
    load_double(monkeypatch, tmp_path, version)
    code, err = plan(tmp_path, capsys, {"model": str(demo_model), "options": options}, sampling)
    assert code == 0, err


def test_the_release_read_at_plan_time_is_the_one_that_runs(release):
    """releases.installed() (metadata, no import) and running() (the module, feature checks) agree."""
    from batchrun.engines.trtllm.releases import installed, running

    at_plan, at_run = installed(), running(release)
    assert at_plan.version == at_run.version == release.__version__
    assert (at_plan.cache_salt, at_plan.tensorrt_backend, at_plan.torch_top_logprobs) == \
        (at_run.cache_salt, at_run.tensorrt_backend, at_run.torch_top_logprobs)
    assert at_plan.sampler in (at_run.sampler, "unknown")


# ---------------------------------------------------------------- V8, V9: what the newer releases give


def test_newer_releases_size_the_window_and_report_health(release, demo_model):
    """get_kv_cache_capacity() (V9) sizes the worker's window where the release has it; _check_health() (V8) makes
    a dead executor EngineDead at the next poll."""
    from batchrun.engines.trtllm.releases import running

    engine = make_engine(demo_model, kv_cache={"free_gpu_memory_fraction": 0.5, "host_cache_gib": 1.0})
    feats = running(release)
    assert release.LLM.instances[-1].kv_cache_config.host_cache_size == 2**30
    assert (engine.kv_cache_tokens is not None) is feats.kv_cache_capacity
    if feats.kv_cache_capacity:
        assert engine.kv_cache_tokens == 2048 * 32
    if feats.health_check:
        engine.llm._dead = True  # the executor died in the background
        engine._health_at = 0.0
        with pytest.raises(EngineDead, match="_check_health"):
            engine.poll(0.01)
    engine.close()
