"""Pre-fusion attention in plain PyTorch: the specification the Triton kernel is tested against.

Semantics (shared by every backend of ``llava_mini.kernels.prefusion``):

- layouts: padded ``q [B, Lq, H, d]``, ``k, v [B, Lk, Hkv, d]`` (flash-attention layout), or packed
  ``q [total_q, H, d]``, ``k, v [total_k, Hkv, d]`` with ``cu_seqlens_q/k`` (int32 [B + 1]);
- grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``;
- causal masking aligned bottom-right: query ``i`` of ``Lq`` sees keys ``j <= i + Lk - Lq``, so the
  queries can be the last ``Lq`` positions after a cached prefix of ``Lk - Lq`` keys;
- ``key_padding_mask [B, Lk]`` (bool, True = keep) drops padded keys;
- a query row that sees no key outputs zeros.
"""

from __future__ import annotations

import math

import torch


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [q_len, k_len], True where query ``i`` may see key ``j`` (bottom-right: ``j <= i + k_len - q_len``)."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + (k_len - q_len)


def _attention_padded(q, k, v, causal, key_padding_mask, scale):
    """Padded layout: q [B, Lq, H, d], k/v [B, Lk, Hkv, d] -> [B, Lq, H, d]."""
    batch, q_len, heads, _ = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, d]
    k_ = k_.repeat_interleave(group, dim=1)
    v_ = v_.repeat_interleave(group, dim=1)
    # Matmuls in the input dtype, softmax in fp32 (fp64 stays fp64): what a careful eager path does.
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    keep = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & causal_mask(q_len, k_len, q.device)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].to(torch.bool)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    probs = torch.where(keep.any(dim=-1, keepdim=True), probs, 0.0)  # no visible key: zeros, not NaN
    out = torch.matmul(probs.to(v_.dtype), v_)
    return out.transpose(1, 2)


def prefusion_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference pre-fusion attention (see the module docstring for the semantics).

    Returns a tensor shaped like ``q`` in ``q``'s dtype. ``scale`` defaults to ``1 / sqrt(d)``.
    Packed (varlen) inputs run one sequence at a time.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens_q is None:
        return _attention_padded(q, k, v, causal, key_padding_mask, scale)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b]:starts_q[b + 1]].unsqueeze(0)
        k_b = k[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        v_b = v[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        outs.append(_attention_padded(q_b, k_b, v_b, causal, None, scale)[0])
    return torch.cat(outs, dim=0)
