"""The fused compressor as a ``torch.library`` custom op, and the public function ``compress``.

``torch.ops.llava_mini.compress`` has a fake implementation (so ``torch.compile`` traces through it)
and a FLOP formula (so ``torch.utils.flop_counter.FlopCounterMode`` counts it). It has no autograd
formula: ``compress`` routes calls that need gradients (and float64 calls) to the reference path.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from llava_mini.kernels.compress.ref import compress_ref
from llava_mini.kernels.compress.triton import check_inputs, choose_form, compress_triton


@torch.library.custom_op("llava_mini::compress", mutates_args=())
def compress_op(
    x: torch.Tensor,
    query: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    ln_q_weight: torch.Tensor,
    ln_q_bias: torch.Tensor,
    ln_kv_weight: torch.Tensor,
    ln_kv_bias: torch.Tensor,
    num_heads: int,
    eps: float,
    query_pos: bool = True,
    key_pos: str = "resize",
    grid_sizes: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The fused forward (``compress_triton`` with the shape-picked form); no autograd."""
    return compress_triton(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                           ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads, eps, query_pos=query_pos,
                           key_pos=key_pos, grid_sizes=grid_sizes, cu_seqlens=cu_seqlens,
                           key_padding_mask=key_padding_mask, attn_mask=attn_mask)


@compress_op.register_fake
def _compress_fake(*args, **kwargs):
    arguments = _op_arguments(*args, **kwargs)
    x, query, cu_seqlens = arguments["x"], arguments["query"], arguments["cu_seqlens"]
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty((batch, query.shape[0], x.shape[-1]))


def _op_arguments(*args, **kwargs) -> dict:
    """The op's arguments by name, defaults filled in (however the op was called)."""
    bound = inspect.signature(compress_op._init_fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def compress_flops(batch: int, n: int, dim: int, num_queries: int, num_heads: int, form: str | None = None,
                   rows: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of what the fused op runs in ``form``, weight-only work excluded.

    ``batch`` images of ``n`` tokens each; ``rows`` overrides the total token rows (B*N), e.g. the
    T rows of a packed batch. Every row of x counts (padding rows of a ragged batch included: the
    projected form computes them; the absorbed form reads only valid rows, so this is its upper bound).
    ``form`` defaults to ``choose_form``'s shape rule (no device limit); the registered FLOP
    formula passes the form the op picks for the actual dtype and device.

    Absorbed form: scores and weighted sum (2 x 2*rows*D*H*Q), the per-head value projection
    (2*B*H*Q*D*hd) and out_proj (2*B*Q*D*D).
    Projected form: K and V projections (2 x 2*rows*D*D), attention (2 x 2*H*Q*rows*hd), out_proj.
    """
    rows = batch * n if rows is None else rows
    head_dim = dim // num_heads
    out_proj = 2 * batch * num_queries * dim * dim
    if (form or choose_form(num_heads, num_queries, dim)) == "absorbed":
        hq = num_heads * num_queries
        return 4 * rows * dim * hq + 2 * batch * hq * dim * head_dim + out_proj
    return 4 * rows * dim * dim + 4 * num_heads * num_queries * rows * head_dim + out_proj


@register_flop_formula(torch.ops.llava_mini.compress, get_raw=True)
def _compress_flop_formula(*args, out_val=None, **kwargs) -> int:
    arguments = _op_arguments(*args, **kwargs)
    x, query, num_heads = arguments["x"], arguments["query"], arguments["num_heads"]
    dim = x.shape[-1]
    form = choose_form(num_heads, query.shape[0], dim, x.dtype, x.device)
    if arguments["cu_seqlens"] is not None:
        return compress_flops(arguments["cu_seqlens"].shape[0] - 1, 0, dim, query.shape[0], num_heads, form,
                              rows=x.shape[0])
    return compress_flops(x.shape[0], x.shape[1], dim, query.shape[0], num_heads, form)


def compress(
    x: torch.Tensor,
    query: torch.Tensor,
    pos_embed: torch.Tensor | None,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    ln_q_weight: torch.Tensor,
    ln_q_bias: torch.Tensor,
    ln_kv_weight: torch.Tensor,
    ln_kv_bias: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    *,
    query_pos: bool = True,
    key_pos: str = "resize",
    grid_sizes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compress each image's tokens to [Q, D]: same arguments and result as ``compress_ref``, fused.

    x is [B, N, D] (any strides), or packed [T, D] with ``cu_seqlens``; fp16, bf16 or fp32 run the
    fused op, fp64 the reference. The weights are the released resampler's (``query`` [Q, D],
    ``pos_embed`` [S*S, D], ``nn.MultiheadAttention``'s in/out projections, ``ln_q``/``ln_kv``).
    Defaults (``query_pos=True, key_pos="resize"``) are LLaVA-Mini's / Qwen-VL's compressor; the
    options for the other resamplers are in ``ref.py``'s docstring. When gradients are needed (grad
    mode on and any input requires grad) it runs the reference path, whose autograd is exact.
    """
    tensors = (x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias)
    options = dict(query_pos=query_pos, key_pos=key_pos, grid_sizes=grid_sizes, cu_seqlens=cu_seqlens,
                   key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    check_inputs(*tensors, num_heads, **options, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad or x.dtype == torch.float64:
        return compress_ref(*tensors, num_heads, eps, **options)
    return compress_op(*tensors, num_heads, float(eps), query_pos, key_pos, grid_sizes, cu_seqlens,
                       key_padding_mask, attn_mask)
