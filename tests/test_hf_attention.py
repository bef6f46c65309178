"""The HF engine's attention choice, and batchrun's varlen FlashAttention path (engines/hf_attention.py).

PyTorch's varlen_attn kernel runs on CUDA only. On the CI machine, the wiring (what continuous batching hands the
function, packing, grouped heads, causal alignment) runs end to end with tests/varlen_ref.py standing in for the
kernel; the GPU tests at the bottom check the real kernel against the same reference and run on the device machine.
"""

from __future__ import annotations

import pytest
import torch

from batchrun.engines import hf_attention
from batchrun.engines.base import Request, Sampling
from batchrun.engines.hf import HFEngine
from tests.test_e2e import varied_prompts
from tests.varlen_ref import varlen_reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def generate(model_dir, prompts, dtype="float32", device="auto", **options):
    engine = HFEngine(str(model_dir), Sampling(max_tokens=12), dtype=dtype, device=device, **options)
    try:
        ids = engine.encode(prompts)
        for i, x in enumerate(ids):
            engine.submit(Request(f"0:{i}", prompts[i], x, Sampling(max_tokens=12)))
        done = {}
        while len(done) < len(prompts):
            done.update({c.request_id: c.text for c in engine.poll(30)})
        return [done[f"0:{i}"] for i in range(len(prompts))]
    finally:
        engine.close()


def test_auto_keeps_sdpa_on_a_cpu_and_varlen_is_refused_there(demo_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model)  # on the CPU
    assert hf_attention.apply_attention(model, "auto") == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation 'varlen' needs a CUDA device"):
        hf_attention.apply_attention(model, "varlen")
    with pytest.raises(ValueError, match="engine.options.attn_implementation 'varlne': .*not supported"):
        hf_attention.apply_attention(model, "varlne")


@pytest.mark.parametrize("gqa", ["flag", "native", "repeat"])
def test_varlen_path_generates_what_sdpa_generates(demo_model, monkeypatch, gqa):
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((len(cu_q) - 1, int(max_q), int(max_k), q.shape[1], k.shape[1]))
        return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    prompts = varied_prompts(24, seed=11)
    # on the CPU: the reference syncs with the host, which no CUDA graph capture allows
    expected = generate(demo_model, prompts, device="cpu", attn_implementation="sdpa")
    monkeypatch.setattr(hf_attention, "varlen_available", lambda device, dtype: True)
    # what _varlen_kwargs returns for a PyTorch whose varlen_attn takes window_size and scale
    monkeypatch.setattr(hf_attention, "_varlen_kwargs", lambda: (kernel, {"window_size": (-1, 0)}, gqa, True))
    assert generate(demo_model, prompts, device="cpu", attn_implementation="varlen") == expected
    assert any(n > 1 for n, *_ in calls), "never saw a batch of several requests"
    assert any(mq == 1 and mk > 1 for _, mq, mk, *_ in calls), "never saw a decode step"
    heads = {(hq, hk) for *_, hq, hk in calls}
    assert heads == ({(4, 4)} if gqa == "repeat" else {(4, 2)})  # the demo model has 4 query heads over 2 KV heads


def test_varlen_refuses_sliding_window_models(demo_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model)
    model.config.sliding_window = 64
    monkeypatch.setattr(hf_attention, "varlen_available", lambda device, dtype: True)
    with pytest.raises(ValueError, match="does not support sliding-window attention"):
        hf_attention.apply_attention(model, "varlen")
    assert hf_attention.apply_attention(model, "auto") == "sdpa"


@gpu
@pytest.mark.parametrize("lengths", [[(7, 7), (1, 300), (1, 1), (64, 64), (5, 133)],
                                     [(1, n) for n in range(3, 300, 11)]])
def test_varlen_kernel_matches_the_reference_on_gpu(lengths):
    torch.manual_seed(0)
    heads, kv_heads, dim = 32, 4, 64
    cu_q = torch.tensor([0] + [q for q, _ in lengths], device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [k for _, k in lengths], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(int(cu_k[-1]), kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    query, key, value = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # as continuous batching hands them over

    class Layer:
        pass

    out, _ = hf_attention.varlen_attention(Layer(), query, key, value, None, scaling=dim ** -0.5,
                                           cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
                                           max_length_q=max(a for a, _ in lengths),
                                           max_length_k=max(b for _, b in lengths))
    ref = varlen_reference(q.double(), k.double(), v.double(), cu_q.cpu(), cu_k.cpu(), 0, 0, is_causal=True)
    err = ((out[0].double() - ref).norm() / ref.norm()).item()
    print("varlen kernel", hf_attention._varlen_kwargs()[2], "relative error", err)
    assert out.shape == (1, q.shape[0], heads, dim), out.shape
    assert err < 1e-2, err


@gpu
def test_varlen_engine_on_gpu_generates_what_sdpa_generates(demo_model):
    prompts = varied_prompts(64, seed=12)
    sdpa = generate(demo_model, prompts, dtype="bfloat16", attn_implementation="sdpa")
    varlen = generate(demo_model, prompts, dtype="bfloat16", attn_implementation="varlen")
    same = sum(a == b for a, b in zip(sdpa, varlen))
    assert same >= 0.9 * len(prompts), (same, list(zip(sdpa, varlen))[:5])  # bf16 kernels may break a near tie
