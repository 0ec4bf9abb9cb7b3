"""The public pre-fusion attention op: input checks, the ``torch.library`` custom op, its FLOP formula.

``torch.ops.llava_mini.prefusion_attention`` returns the output and each row's log-sum-exp; its
autograd formula is ``torch.ops.llava_mini.prefusion_attention_backward`` (two Triton kernels that
recompute the probabilities from that log-sum-exp, ``backward.py``). Both ops have fake
implementations (``torch.compile`` traces them) and FLOP formulas that count only the (query, key)
pairs the causal mask leaves visible, so ``FlopCounterMode`` reports the work actually done,
forward and backward.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from llava_mini.kernels.prefusion.backward import prefusion_attention_backward_triton
from llava_mini.kernels.prefusion.ref import prefusion_attention_ref
from llava_mini.kernels.prefusion.triton import lse_shape, prefusion_attention_triton

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PREFUSION_BACKENDS = ("triton", "torch", "flash_attn")


@torch.library.custom_op("llava_mini::prefusion_attention", mutates_args=())
def _prefusion_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    lse = q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    out = prefusion_attention_triton(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, scale=scale, lse=lse,
    )
    return out, lse


@_prefusion_attention_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale):
    return q.new_empty(q.shape), q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("llava_mini::prefusion_attention_backward", mutates_args=())
def _prefusion_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return prefusion_attention_backward_triton(
        grad_out, q, k, v, out, lse, causal=causal, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, scale=scale,
    )


@_prefusion_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.causal, ctx.scale = max_seqlen_q, causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _prefusion_attention_backward_op(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q,
                                                  cu_seqlens_k, ctx.max_seqlen_q, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_prefusion_attention_op.register_autograd(_backward, setup_context=_setup_context)


def causal_pairs(q_len: int, k_len: int) -> int:
    """Visible (query, key) pairs of one sequence under bottom-right causal masking.

    Query ``i`` sees ``clamp(i + k_len - q_len + 1, 0, k_len)`` keys: the counts run up to ``k_len``,
    so the total is ``T(k_len) - T(max(k_len - q_len, 0))`` with ``T(n) = n (n + 1) / 2``.
    """
    hidden = max(k_len - q_len, 0)
    return k_len * (k_len + 1) // 2 - hidden * (hidden + 1) // 2


def _computed_pairs(q, k, cu_seqlens_q, cu_seqlens_k, causal) -> int:
    """(query, key) pairs the kernels compute, per head: every pair a causal mask leaves visible.

    Key-padding-masked keys are computed (then discarded), so they count; causally hidden pairs are
    skipped, so they do not. Packed inputs read ``cu_seqlens`` (real tensors only).
    """
    if cu_seqlens_q is not None:
        lengths_q = torch.diff(cu_seqlens_q).tolist()
        lengths_k = torch.diff(cu_seqlens_k).tolist()
    else:
        lengths_q, lengths_k = [q.shape[1]] * q.shape[0], [k.shape[1]] * k.shape[0]
    return sum(causal_pairs(lq, lk) if causal else lq * lk for lq, lk in zip(lengths_q, lengths_k))


@register_flop_formula(torch.ops.llava_mini.prefusion_attention, get_raw=True)
def _prefusion_attention_flops(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale,
                               out_val=None, **kwargs) -> int:
    """2 FLOPs per multiply-add in QK^T and in PV: 4 * d * heads per computed (query, key) pair."""
    return 4 * q.shape[-1] * q.shape[-2] * _computed_pairs(q, k, cu_seqlens_q, cu_seqlens_k, causal)


@register_flop_formula(torch.ops.llava_mini.prefusion_attention_backward, get_raw=True)
def _prefusion_attention_backward_flops(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                        max_seqlen_q, causal, scale, out_val=None, **kwargs) -> int:
    """The backward's seven matmuls per computed pair, 2 FLOPs per multiply-add: 14 * d * heads per pair.

    The dK/dV kernel recomputes QK^T and runs P^T dO, dO V^T and dS^T Q; the dQ kernel recomputes
    QK^T and dO V^T and runs dS K (flash-attention-2 runs five by keeping dS for dQ; this pays two
    recomputations to need no atomics). 3.5x the forward's count.
    """
    return 14 * q.shape[-1] * q.shape[-2] * _computed_pairs(q, k, cu_seqlens_q, cu_seqlens_k, causal)


def _check_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k):
    """Raise a ValueError/TypeError naming the argument and what was expected."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in ATTENTION_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    for name, t in (("k", k), ("v", v), ("key_padding_mask", key_padding_mask),
                    ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device {q.device}, got {t.device}")

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "[total, heads, head_dim] (packed, with cu_seqlens)" if varlen else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: expected head_dim {q.shape[-1]} (q's), got {k.shape[-1]}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"k: expected a number of kv heads dividing q's {q.shape[-2]} heads, got {k.shape[-2]}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (q's), got {k.shape[0]}")

    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q, cu_seqlens_k: expected both or neither")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask: packed (cu_seqlens) inputs have no padding; expected None")
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
                raise ValueError(f"{name}: expected int32 [batch + 1], got {cu.dtype} {tuple(cu.shape)}")
            if cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{name}: expected non-decreasing offsets from 0 to the packed length {total}, "
                                 f"got {cu.tolist()}")
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_k: expected the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)}, "
                             f"got {tuple(cu_seqlens_k.shape)}")
    elif key_padding_mask is not None:
        expected = (k.shape[0], k.shape[1])
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask: expected bool {list(expected)} [batch, Lk] (True = keep), "
                             f"got {key_padding_mask.dtype} {list(key_padding_mask.shape)}")


def _flash_attn(q, k, v, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale):
    """Route to the optional flash-attn package (bottom-right causal, as here)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ValueError("backend: 'flash_attn' needs the flash-attn package "
                         "(pip install 'llava-mini[flash]')") from err
    if cu_seqlens_q is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    max_seqlen_k = int(torch.diff(cu_seqlens_k).max())
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale=scale, causal=causal)


def prefusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    scale: float | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Fused attention for the pre-fusion layers: causal (bottom-right), GQA, key padding, varlen.

    Args:
        q: ``[B, Lq, H, d]``, or packed ``[total_q, H, d]`` with ``cu_seqlens_q``. Any strides.
        k, v: ``[B, Lk, Hkv, d]``, or packed ``[total_k, Hkv, d]``; ``H`` a multiple of ``Hkv``.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (the queries are the last ``Lq`` positions).
        key_padding_mask: bool ``[B, Lk]``, True = keep (padded layout only).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` sequence offsets into the packed tensors.
        max_seqlen_q: longest packed query sequence (computed from ``cu_seqlens_q`` if omitted,
            which syncs with the device).
        scale: softmax scale, default ``1 / sqrt(d)``.
        backend: ``"triton"`` (the fused kernel), ``"torch"`` (the reference) or ``"flash_attn"``
            (the optional flash-attn package; no ``key_padding_mask``).

    Returns:
        A tensor shaped like ``q``, in ``q``'s dtype; query rows that see no key are zeros.
        Differentiable in q, k and v on every backend: ``"triton"`` runs the fused backward
        kernels (the forward keeps only each row's log-sum-exp, O(L) memory); their gradient
        for a row that sees no key is zero.
    """
    _check_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is not None and max_seqlen_q is None:
        max_seqlen_q = int(torch.diff(cu_seqlens_q).max())
    if backend == "triton":
        out, _ = _prefusion_attention_op(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q or 0, causal, scale)
        return out
    if backend == "torch":
        return prefusion_attention_ref(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, scale=scale)
    if backend == "flash_attn":
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask: not supported by backend 'flash_attn'; pack the batch with cu_seqlens")
        return _flash_attn(q, k, v, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale)
    raise ValueError(f"backend: expected one of {', '.join(PREFUSION_BACKENDS)}, got {backend!r}")
