"""A reference for PyTorch's varlen FlashAttention (CUDA only, so it cannot run on the CI machine).

Follows the documented contract of `torch.nn.attention.varlen.varlen_attn`: packed [tokens, heads, dim] inputs,
cumulative sequence offsets, causal masking aligned to the end of each sequence (FlashAttention >= 2.1: query i of a
sequence with q queries and k keys sees keys 0 .. k - q + i), grouped KV heads. Written with one SDPA call per
sequence, in the inputs' dtype (pass float64 inputs for a high-precision reference).
"""

from __future__ import annotations

import torch


def varlen_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, window_size=None,
                     enable_gqa=False, scale=None):
    causal = is_causal or tuple(window_size or ()) == (-1, 0)
    out = torch.empty_like(q)
    for i in range(len(cu_seq_q) - 1):
        qs, qe, ks, ke = int(cu_seq_q[i]), int(cu_seq_q[i + 1]), int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        if qe == qs:
            continue
        qi, ki, vi = (x.transpose(0, 1) for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        if ki.shape[0] != qi.shape[0]:  # grouped KV heads, read as FlashAttention-2 reads them
            ki = ki.repeat_interleave(qi.shape[0] // ki.shape[0], dim=0)
            vi = vi.repeat_interleave(qi.shape[0] // vi.shape[0], dim=0)
        mask = None
        if causal:
            nq, nk = qe - qs, ke - ks
            mask = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
            mask = mask.to(q.device)
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out
