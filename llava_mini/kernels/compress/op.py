"""The fused compressor as a ``torch.library`` custom op, and the public function ``compress``.

``torch.ops.llava_mini.compress`` has a fake implementation (so ``torch.compile`` traces through it),
and a FLOP formula (so ``torch.utils.flop_counter.FlopCounterMode`` counts it); it serves calls that
need no gradient, with the weight-derived tensors cached. Calls that need gradients run
``compress_differentiable``: the same math, the weight-derived tensors under autograd, and the
absorbed kernel as ``torch.ops.llava_mini.absorbed_attention``, whose autograd formula is the fused
backward ``torch.ops.llava_mini.absorbed_attention_backward`` (``backward.py``); both have fakes and
FLOP formulas. ``compress`` routes float64 calls to the reference path.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

import torch.nn.functional as F

from llava_mini.kernels.compress import triton as fused
from llava_mini.kernels.compress.backward import absorbed_attention_backward, backward_flops
from llava_mini.kernels.compress.ref import compress_ref, to_dense
from llava_mini.kernels.compress.triton import (Layout, absorbed_attention, check_inputs, choose_form, compress_triton,
                                                derive_weights, projected_heads, score_inputs, score_tables,
                                                value_projection)


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
    """The fused forward (``compress_triton`` with the shape-picked form); no autograd (``compress``
    runs ``compress_differentiable`` when gradients are needed)."""
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


@torch.library.custom_op("llava_mini::absorbed_attention", mutates_args=())
def absorbed_attention_op(
    x: torch.Tensor,
    queries: torch.Tensor,
    key_table: Optional[torch.Tensor],
    key_grid: Optional[torch.Tensor],
    grid_sizes: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The absorbed form's kernel: (y [H*Q, B, D], lse [H*Q, B]) for the absorbed queries [H*Q, D] and
    the score tables (``triton.absorbed_attention``); differentiable in x, queries and both tables."""
    layout = Layout.of(x, "sincos" if key_grid is not None else "none", grid_sizes, cu_seqlens)
    scores = score_inputs(layout, key_table, key_grid, key_padding_mask, x.device)
    return absorbed_attention(x, queries, layout, scores, eps)


@absorbed_attention_op.register_fake
def _absorbed_attention_fake(x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask, eps):
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (x.new_empty((queries.shape[0], batch, x.shape[-1])),
            x.new_empty((queries.shape[0], batch), dtype=torch.float32))


@torch.library.custom_op("llava_mini::absorbed_attention_backward", mutates_args=())
def absorbed_attention_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    queries: torch.Tensor,
    key_table: Optional[torch.Tensor],
    key_grid: Optional[torch.Tensor],
    grid_sizes: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    eps: float,
    y: torch.Tensor,
    lse: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dqueries, dkey_table, dkey_grid) of ``absorbed_attention_op`` (``backward.py``); an empty
    tensor where ``needs`` (x, queries, key_table, key_grid) leaves a gradient out."""
    dx, dqueries, dkey_table, dkey_grid = absorbed_attention_backward(
        dy, x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask, eps, y, lse,
        need_dx=needs[0], need_key_table=needs[2], need_key_grid=needs[3])
    def or_empty(t):  # a fresh empty tensor each: a custom op's outputs may not alias each other
        return t if t is not None else x.new_empty(0)
    return or_empty(dx), dqueries, or_empty(dkey_table), or_empty(dkey_grid)


@absorbed_attention_backward_op.register_fake
def _absorbed_attention_backward_fake(dy, x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask,
                                      eps, y, lse, needs):
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else x.new_empty(0)
    return like(x, needs[0]), queries.new_empty(queries.shape), like(key_table, needs[2]), like(key_grid, needs[3])


def _setup_context(ctx, inputs, output):
    x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask, eps = inputs
    ctx.save_for_backward(x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask, *output)
    ctx.eps = eps


def _backward(ctx, dy, _dlse):
    x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask, y, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = absorbed_attention_backward_op(dy.contiguous(), x, queries, key_table, key_grid, grid_sizes, cu_seqlens,
                                           key_padding_mask, ctx.eps, y, lse, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


absorbed_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.llava_mini.absorbed_attention, get_raw=True)
def _absorbed_attention_flop_formula(x, queries, *args, out_val=None, **kwargs) -> int:
    """Scores and the weighted sum over every row of x: 2 x 2*D per row and (head, query)."""
    rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    return 4 * rows * x.shape[-1] * queries.shape[0]


@register_flop_formula(torch.ops.llava_mini.absorbed_attention_backward, get_raw=True)
def _absorbed_attention_backward_flop_formula(dy, x, queries, *args, out_val=None, **kwargs) -> int:
    rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    return backward_flops(rows, x.shape[-1], queries.shape[0], need_dx=bool(args[-1][0]))


def compress_differentiable(x, weights, num_heads, eps, *, query_pos, key_pos, grid_sizes, cu_seqlens,
                            key_padding_mask, attn_mask) -> torch.Tensor:
    """``compress`` under autograd: the weight-derived tensors computed afresh (differentiable, not
    cached), the absorbed kernel as ``absorbed_attention_op`` (fused backward) where ``choose_form``
    picks the absorbed form, else the projected form's matmuls and SDPA, then the value projection
    and out_proj."""
    dim, num_queries = x.shape[-1], weights[0].shape[0]
    form = fused.choose_form(num_heads, num_queries, dim, x.dtype, x.device)
    layout = Layout.of(x, key_pos, grid_sizes, cu_seqlens)
    fused.check_kernel_device(x)
    derived = derive_weights(form, x.dtype, *weights, num_heads=num_heads, eps=eps, query_pos=query_pos,
                             key_pos=key_pos, key_extent=layout.key_extent(key_pos))
    if form == "absorbed":
        rows = layout.rows if x.dim() == 2 else x.shape[1]
        key_table, key_grid = score_tables(derived, layout, rows, attn_mask, num_heads, num_queries)
        y, _ = absorbed_attention_op(x, derived["queries"], key_table, key_grid, grid_sizes, cu_seqlens,
                                     key_padding_mask, float(eps))
        heads = value_projection(y, derived, num_heads, num_queries)
    else:
        dense = to_dense(x, layout.lengths, cu_seqlens) if cu_seqlens is not None else x
        heads = projected_heads(dense, derived, layout, 0, key_padding_mask, attn_mask, num_heads, num_queries, eps)
    return F.linear(heads, derived["out_proj_weight"], derived["out_proj_bias"])


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
    options for the other resamplers are in ``ref.py``'s docstring. Differentiable in x and every
    weight through the fused backward (``backward.py``); ``attn_mask`` gets no gradient.
    """
    tensors = (x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias)
    options = dict(query_pos=query_pos, key_pos=key_pos, grid_sizes=grid_sizes, cu_seqlens=cu_seqlens,
                   key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    check_inputs(*tensors, num_heads, **options, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if x.dtype == torch.float64:
        return compress_ref(*tensors, num_heads, eps, **options)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return compress_differentiable(x, tensors[1:], num_heads, float(eps), **options)
    return compress_op(*tensors, num_heads, float(eps), query_pos, key_pos, grid_sizes, cu_seqlens,
                       key_padding_mask, attn_mask)
