"""Reference (plain PyTorch) query-compression cross-attention: the spec the kernel must match.

The compressor is a Qwen-VL style resampler: C x C learned queries attend over N vision tokens.

    q   = LN_q(query) + PE                          [C^2, D]
    k   = LN_kv(x) + PE_k(N)                        [B, N, D]   (PE bicubically resized to sqrt(N)^2)
    v   = LN_kv(x)                                  [B, N, D]
    out = MHA(q, k, v) with nn.MultiheadAttention's weights and biases   -> [B, C^2, D]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The 2-D sin-cos table of MAE / Qwen-VL: [grid*grid, dim], float32.

    Half the channels encode the column index, half the row index (MAE's meshgrid puts w first).
    """
    if dim % 4:
        raise ValueError(f"dim: the 2-D sin-cos table needs a multiple of 4, got {dim}")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):  # [grid*grid] -> [grid*grid, dim/2]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def side_of(n: int, argument: str = "x") -> int:
    """sqrt(n) for a square token grid; a clear error otherwise (the position table is 2-D)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{argument}: expected a square number of vision tokens (the position table is 2-D), got {n}")
    return side


def key_pos_embed(pos_embed: torch.Tensor, n: int) -> torch.Tensor:
    """The query position table [C^2, D] resized bicubically to the key grid: [n, D] (float32 math)."""
    src = side_of(pos_embed.shape[0], "pos_embed")
    dst = side_of(n)
    if src == dst:
        return pos_embed
    grid = pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(pos_embed.dtype)


def compress_ref(
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
    """Compress x [B, N, D] to [B, C^2, D], exactly as the released resampler computes it.

    Plain PyTorch, written out (no ``nn.MultiheadAttention``) so every step is visible.
    """
    B, N, D = x.shape
    Q = query.shape[0]
    dtype = x.dtype
    hd = D // num_heads
    kv = F.layer_norm(x, (D,), ln_kv_weight.to(dtype), ln_kv_bias.to(dtype), eps)
    q_in = F.layer_norm(query.to(dtype), (D,), ln_q_weight.to(dtype), ln_q_bias.to(dtype), eps)
    q_in = q_in + pos_embed.to(dtype)
    k_in = kv + key_pos_embed(pos_embed, N).to(dtype)
    w_q, w_k, w_v = in_proj_weight.to(dtype).chunk(3)
    b_q, b_k, b_v = in_proj_bias.to(dtype).chunk(3)
    q = F.linear(q_in, w_q, b_q).view(Q, num_heads, hd).transpose(0, 1)  # [H, Q, hd]
    k = F.linear(k_in, w_k, b_k).view(B, N, num_heads, hd).transpose(1, 2)  # [B, H, N, hd]
    v = F.linear(kv, w_v, b_v).view(B, N, num_heads, hd).transpose(1, 2)
    scores = torch.matmul(q.unsqueeze(0), k.transpose(-1, -2)) / math.sqrt(hd)  # [B, H, Q, N]
    # softmax in fp32 for 16-bit inputs; fp64 stays fp64 (the fp64 reference and gradcheck need it)
    probs = scores.to(torch.promote_types(dtype, torch.float32)).softmax(dim=-1).to(dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(B, Q, D)
    return F.linear(out, out_proj_weight.to(dtype), out_proj_bias.to(dtype))
