"""The fused compressor as a ``torch.library`` custom op, and the public function ``compress``.

``torch.ops.llava_mini.compress`` has a fake implementation (so ``torch.compile`` traces through it)
and a FLOP formula (so ``torch.utils.flop_counter.FlopCounterMode`` counts it). It has no autograd
formula: ``compress`` routes calls that need gradients to the reference path instead.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from llava_mini.kernels.compress.ref import compress_ref
from llava_mini.kernels.compress.triton import check_inputs, choose_form, compress_triton


@torch.library.custom_op("llava_mini::compress", mutates_args=())
def compress_op(
    x: torch.Tensor,
    query: torch.Tensor,
    pos_embed: torch.Tensor,
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
) -> torch.Tensor:
    """The fused forward (``compress_triton`` with the shape-picked form); no autograd."""
    return compress_triton(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight,
                           out_proj_bias, ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads, eps)


@compress_op.register_fake
def _compress_fake(x, query, *args):
    return x.new_empty((x.shape[0], query.shape[0], x.shape[2]))


def compress_flops(batch: int, n: int, dim: int, num_queries: int, num_heads: int, form: str | None = None) -> int:
    """FLOPs (2 per multiply-add) of what the fused op runs in ``form``, weight-only work excluded.

    ``form`` defaults to ``choose_form``'s shape rule (no device limit); the registered FLOP
    formula passes the form the op picks for the actual dtype and device.

    Absorbed form: scores and weighted sum (2 x 2*B*N*D*H*Q), the per-head value projection
    (2*B*H*Q*D*hd) and out_proj (2*B*Q*D*D).
    Projected form: K and V projections (2 x 2*B*N*D*D), attention (2 x 2*B*H*Q*N*hd), out_proj.
    """
    head_dim = dim // num_heads
    out_proj = 2 * batch * num_queries * dim * dim
    if (form or choose_form(num_heads, num_queries, dim)) == "absorbed":
        hq = num_heads * num_queries
        return 4 * batch * n * dim * hq + 2 * batch * hq * dim * head_dim + out_proj
    return 4 * batch * n * dim * dim + 4 * batch * num_heads * num_queries * n * head_dim + out_proj


@register_flop_formula(torch.ops.llava_mini.compress, get_raw=True)
def _compress_flop_formula(x, query, *weights_and_scalars, out_val=None, **kwargs) -> int:
    num_heads = weights_and_scalars[-2]  # (..., num_heads, eps)
    batch, n, dim = x.shape
    form = choose_form(num_heads, query.shape[0], dim, x.dtype, x.device)
    return compress_flops(batch, n, dim, query.shape[0], num_heads, form)


def compress(
    x: torch.Tensor,
    query: torch.Tensor,
    pos_embed: torch.Tensor,
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
) -> torch.Tensor:
    """Compress x [B, N, D] to [B, C^2, D]: same signature and result as ``compress_ref``, fused.

    x is fp16, bf16 or fp32 (any strides), N a square number; the weights are the released
    resampler's (``query``/``pos_embed`` [C^2, D], ``nn.MultiheadAttention``'s in/out projections,
    ``ln_q``/``ln_kv``). When gradients are needed (grad mode on and any input requires grad) it
    runs the reference path, whose autograd is exact; otherwise the fused op.
    """
    tensors = (x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias)
    check_inputs(*tensors, num_heads)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return compress_ref(*tensors, num_heads, eps)
    return compress_op(*tensors, num_heads, float(eps))
