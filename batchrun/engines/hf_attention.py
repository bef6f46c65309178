"""Attention for the HF engine's continuous batching: which implementation, and a built-in varlen one.

Without the flash-attn package (or a hub kernel, which needs network access), transformers' continuous batching runs
attention through SDPA with one block-diagonal mask over the whole batch (continuous_batching/utils.py,
attn_mask_is_needed): every query token is scored against every key of every request in the batch, so attention
grows with the square of the batch. PyTorch ships FlashAttention-2's variable-length kernel itself
(`torch.nn.attention.varlen.varlen_attn`, CUDA, fp16/bf16): each request attends to its own keys only.

`engine.options.attn_implementation`:
  auto      (default) flash_attention_3/2 when that package is installed (transformers switches to it and to its
            paged decode path); else "varlen" on a CUDA device in fp16/bf16 where PyTorch has varlen_attn; else sdpa
  varlen    PyTorch's varlen FlashAttention through the function below
  other     handed to transformers as is: sdpa, paged|eager, flash_attention_2, a hub kernel "org/repo", ...

How the function plugs in (transformers 5.24):
- It is registered in the AttentionInterface under a name that contains "flash": continuous batching then builds no
  attention mask and passes cu_seq_lens_q/k and max_length_q/k (utils.is_flash_attention_requested,
  continuous_batching/input_outputs.py), and PagedAttentionCache.update hands the layer the batch's keys and values
  gathered per request, [1, kv_heads, total_k, head_dim] (continuous_batching/cache.py). The name has no 2 or 3 in it,
  so the paged decode path, which needs flash_attn_with_kvcache, stays off (continuous_batching/initialization.py).
- It is set on the config directly: `set_attn_implementation` would try to import a flash package for any name that
  contains "flash" (modeling_utils._check_and_adjust_attn_implementation).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

log = logging.getLogger(__name__)

VARLEN = "batchrun_flash_varlen"


@functools.cache
def _varlen_kwargs() -> tuple | None:
    """(varlen_attn, its causal keywords, how it takes grouped KV heads, whether it takes a scale), or None where
    PyTorch has no varlen_attn. Grouped heads: "flag" (enable_gqa=True), "native" (fewer KV heads accepted as they
    are, as FlashAttention-2's kernel does) or "repeat" (KV heads repeated first: one extra copy of the batch's keys
    and values per layer and step)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.9-2.10 take is_causal; later releases take window_size=(-1, 0) for causal
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "flag" if "enable_gqa" in params else _probe_native_gqa(varlen_attn, causal)
    return varlen_attn, causal, gqa, "scale" in params


def _probe_native_gqa(varlen_attn, causal: dict) -> str:
    """torch 2.11's varlen_attn has no enable_gqa: see once whether the kernel takes fewer KV heads as they are."""
    if not torch.cuda.is_available():
        return "repeat"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(8, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
    try:
        native = varlen_attn(q, k, v, cu, cu, 5, 5, **causal)
    except (RuntimeError, ValueError):
        return "repeat"
    repeated = varlen_attn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 5, 5, **causal)
    return "native" if torch.allclose(native.float(), repeated.float(), atol=1e-2) else "repeat"


def varlen_available(device_type: str, dtype) -> bool:
    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _varlen_kwargs() is not None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """AttentionInterface function: query [1, heads, total_q, dim], key/value [1, kv_heads, total_k, dim] (the
    batch's requests packed one after another), cumulative lengths per request. Returns [1, total_q, heads, dim]."""
    varlen_attn, causal, gqa, takes_scale = _varlen_kwargs()
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim], as FlashAttention takes
    extra = dict(causal)
    if q.shape[1] != k.shape[1]:
        if gqa == "flag":
            extra["enable_gqa"] = True
        elif gqa == "repeat":
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if takes_scale:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:
        raise ValueError("this PyTorch's varlen_attn takes no scale, and the model's is not 1/sqrt(head_dim)")
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q.to(torch.int32),
                      cu_seq_lens_k.to(torch.int32), int(max_length_q), int(max_length_k), **extra)
    return out.unsqueeze(0), None


def _varlen_refusal(model) -> str | None:
    """Why the varlen function cannot serve this model here, as the end of a sentence; None if it can."""
    if not varlen_available(model.device.type, model.dtype):
        return "needs a CUDA device, dtype float16 or bfloat16 and a PyTorch with torch.nn.attention.varlen"
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        return "does not support sliding-window attention"
    if getattr(model.config, "attn_logit_softcapping", None):
        return "does not support attention logit soft-capping"
    return None


def apply_attention(model, choice: str = "auto") -> str:
    """Set the model's attention implementation for continuous batching; returns what was chosen."""
    import transformers
    from transformers import AttentionInterface

    if choice in ("auto", "varlen"):
        if choice == "auto" and model.device.type == "cuda" and (transformers.utils.is_flash_attn_3_available()
                                                                 or transformers.utils.is_flash_attn_2_available()):
            return model.config._attn_implementation  # transformers switches to flash on its own (auto_switch_to_flash)
        why = _varlen_refusal(model)
        if why is None:
            AttentionInterface.register(VARLEN, varlen_attention)
            model.config._attn_implementation = VARLEN
            return VARLEN
        if choice == "varlen":
            raise ValueError(f"engine.options.attn_implementation 'varlen' {why}")
        log.info("attn_implementation auto: varlen %s, so the model keeps %s", why, model.config._attn_implementation)
        return model.config._attn_implementation
    try:
        model.set_attn_implementation(choice)
    except (ValueError, ImportError) as e:
        raise ValueError(f"engine.options.attn_implementation {choice!r}: {e}") from None
    return choice
