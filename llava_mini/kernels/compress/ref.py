"""Reference (plain PyTorch) query-compression cross-attention: the spec the kernel must match.

The compressor is a Qwen-VL style resampler: Q learned queries attend over the vision tokens of
each image.

    q   = LN_q(query) [+ PE_q]                      [Q, D]      (PE_q: the query position table)
    k   = LN_kv(x) [+ PE_k]                         [B, N, D]   (PE_k: the key position term)
    v   = LN_kv(x)                                  [B, N, D]
    out = MHA(q, k, v) with nn.MultiheadAttention's weights and biases   -> [B, Q, D]

Every variant the resamplers of Qwen-VL, OmniLMM, MiniCPM-V 2.0 / 2.5 / 2.6 and LLaVA-Mini compute
is a choice of options here:

- ``query_pos``: whether ``pos_embed`` is added to the queries (all but MiniCPM-V 2.5 / 2.6);
- ``key_pos``: the key position term of an image with an h x w patch grid:
  ``"resize"``: ``pos_embed`` resized bicubically (in float32) to h x w (Qwen-VL, OmniLMM, LLaVA-Mini,
  MiniCPM-V 2.0 with ``adaptive=False``); ``"sincos"``: the 2-D sin-cos table of h x w (MiniCPM-V 2.0
  with ``adaptive=True``, 2.5, 2.6); ``"none"``;
- ragged batches: ``grid_sizes`` [B, 2] gives each image's (h, w) (its first h*w rows are its tokens,
  row-major, the rest padding), ``cu_seqlens`` packs images in a [T, D] tensor, ``key_padding_mask``
  [B, N] (True = ignore, nn.MultiheadAttention's convention) drops any tokens;
- ``attn_mask``: nn.MultiheadAttention's ``attn_mask``, [Q, N] or [B*H, Q, N], bool (True = not
  allowed) or float (added to the scores).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

KEY_POS_MODES = ("resize", "sincos", "none")


def sincos_1d(channels: int, positions: int) -> torch.Tensor:
    """MAE's 1-D sin-cos table [positions, channels], float32: [sin(p w_c) ; cos(p w_c)].

    Computed with numpy in float32, step by step as the resamplers of MAE, Qwen-VL and MiniCPM-V
    build it, so the values are bit-identical to theirs (a float64 table rounded to float32 differs
    by up to an ulp of the argument: ~4e-6 absolute at position 70).
    """
    if channels % 2:
        raise ValueError(f"channels: the sin-cos table needs an even number of channels, got {channels}")
    omega = np.arange(channels // 2, dtype=np.float32)
    omega /= channels / 2.0
    omega = 1.0 / 10000 ** omega
    angles = np.multiply.outer(np.arange(positions, dtype=np.float32), omega)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))


def sincos_grid(dim: int, height: int, width: int) -> torch.Tensor:
    """The 2-D sin-cos table of an h x w grid, row-major: [h*w, dim], float32.

    Half the channels encode the column, half the row (MAE's meshgrid puts w first):
    ``table[i*w + j] = [sincos_1d(j) ; sincos_1d(i)]``.
    """
    if dim % 4:
        raise ValueError(f"dim: the 2-D sin-cos table needs a multiple of 4, got {dim}")
    table = sincos_1d(dim // 2, max(height, width))
    # explicit device: under a `with torch.device("cuda")` block the indices would follow it, the table not
    rows = torch.arange(height, device=table.device).repeat_interleave(width)
    cols = torch.arange(width, device=table.device).repeat(height)
    return torch.cat([table[cols], table[rows]], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The square 2-D sin-cos table of MAE / Qwen-VL / LLaVA-Mini: [grid*grid, dim], float32."""
    return sincos_grid(dim, grid, grid)


def side_of(n: int, argument: str = "x") -> int:
    """sqrt(n) for a square token grid; a clear error otherwise (the position table is 2-D)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{argument}: expected a square number of vision tokens (the position table is 2-D), "
                         f"got {n}; give the patch grid (h, w) of a non-square image")
    return side


def key_pos_embed(pos_embed: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """The square position table [S*S, D] resized bicubically (in float32) to the key grid.

    ``grid`` is a square token count n (grid sqrt(n) x sqrt(n)) or a patch grid (h, w). Returns
    [h*w, D] in pos_embed's dtype, or ``pos_embed`` itself when the grid is the same.
    """
    src = side_of(pos_embed.shape[0], "pos_embed")
    if isinstance(grid, int):
        side = side_of(grid)
        grid = (side, side)
    height, width = grid
    if (height, width) == (src, src):
        return pos_embed
    table = pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(height * width, -1).to(pos_embed.dtype)


def image_layout(x: torch.Tensor, grid_sizes: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 need_grids: bool = True) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Per image: its number of tokens and its (h, w) key grid, from the batch's layout.

    Dense x [B, N, D]: every image has N tokens on a square grid unless ``grid_sizes`` [B, 2] gives
    its (h, w) (then its first h*w rows are its tokens). Packed x [T, D]: ``cu_seqlens`` [B+1] gives
    the images' rows; their grids are ``grid_sizes`` or square. Grids are None unless needed.
    """
    if cu_seqlens is not None:
        lengths = torch.diff(cu_seqlens.cpu()).tolist()
    else:
        lengths = [x.shape[1]] * x.shape[0]
    if grid_sizes is None:
        grids = [(side_of(n), side_of(n)) for n in lengths] if need_grids else None
        return lengths, grids
    grids = [tuple(g) for g in grid_sizes.cpu().tolist()]
    if cu_seqlens is not None:
        for b, (n, (h, w)) in enumerate(zip(lengths, grids)):
            if n != h * w:
                raise ValueError(f"grid_sizes: image {b} has a {h} x {w} grid but cu_seqlens gives it {n} tokens")
        return lengths, grids
    return [h * w for h, w in grids], grids


def key_position_term(key_pos: str, pos_embed: torch.Tensor | None, dim: int,
                      grids: list[tuple[int, int]], rows: int) -> torch.Tensor | None:
    """PE_k for each image: [B, rows, D] (zero beyond an image's h*w tokens), or None.

    The sin-cos table is float32 (as the released code builds it); the resized table keeps
    pos_embed's dtype and device (and its autograd)."""
    if key_pos == "none":
        return None
    tables = []
    for height, width in grids:
        if key_pos == "sincos":
            table = sincos_grid(dim, height, width)
        else:
            table = key_pos_embed(pos_embed, (height, width))
        tables.append(F.pad(table, (0, 0, 0, rows - height * width)))
    return torch.stack(tables)


def to_dense(x: torch.Tensor, lengths: list[int], cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Packed [T, D] -> zero-padded [B, max(lengths), D]; dense x unchanged."""
    if cu_seqlens is None:
        return x
    starts = cu_seqlens.cpu().tolist()
    dense = x.new_zeros(len(lengths), max(lengths), x.shape[-1])
    for b, n in enumerate(lengths):
        dense[b, :n] = x[starts[b]:starts[b] + n]
    return dense


def score_mask(batch: int, rows: int, lengths: list[int], key_padding_mask: torch.Tensor | None,
               attn_mask: torch.Tensor | None, num_heads: int, num_queries: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """What is added to the scores [B, H, Q, rows]: -inf where a key is padding, masked by
    ``key_padding_mask`` or by a bool ``attn_mask``; a float ``attn_mask``'s values. None if nothing."""
    bias = torch.zeros(batch, 1, 1, rows, dtype=dtype, device=device)
    ignored = torch.arange(rows, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    if key_padding_mask is not None:
        ignored = ignored | key_padding_mask.to(device)
    masked = bool(ignored.any())
    bias = bias.masked_fill(ignored[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        extra = attn_mask.to(device)
        extra = extra.view(batch, num_heads, num_queries, rows) if extra.dim() == 3 else extra[None, None]
        if extra.dtype == torch.bool:
            extra = torch.zeros(extra.shape, dtype=dtype, device=device).masked_fill(extra, float("-inf"))
        bias = bias + extra.to(dtype)
        masked = True
    return bias if masked else None


def compress_ref(
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
    """Compress each image's tokens to [Q, D], exactly as the released resamplers compute it.

    x is [B, N, D] (or packed [T, D] with ``cu_seqlens``); returns [B, Q, D]. The options are in the
    module docstring. Plain PyTorch, written out (no ``nn.MultiheadAttention``) so every step is
    visible; an image whose every key is masked gives NaN, as nn.MultiheadAttention does.
    """
    dtype = x.dtype
    dim = x.shape[-1]
    num_queries = query.shape[0]
    head_dim = dim // num_heads
    lengths, grids = image_layout(x, grid_sizes, cu_seqlens, need_grids=key_pos != "none")
    x = to_dense(x, lengths, cu_seqlens)
    batch, rows, _ = x.shape
    kv = F.layer_norm(x, (dim,), ln_kv_weight.to(dtype), ln_kv_bias.to(dtype), eps)
    q_in = F.layer_norm(query.to(dtype), (dim,), ln_q_weight.to(dtype), ln_q_bias.to(dtype), eps)
    if query_pos:
        q_in = q_in + pos_embed.to(dtype)
    k_in = kv
    position = key_position_term(key_pos, pos_embed, dim, grids, rows)
    if position is not None:
        k_in = kv + position.to(device=x.device, dtype=dtype)
    w_q, w_k, w_v = in_proj_weight.to(dtype).chunk(3)
    b_q, b_k, b_v = in_proj_bias.to(dtype).chunk(3)
    q = F.linear(q_in, w_q, b_q).view(num_queries, num_heads, head_dim).transpose(0, 1)  # [H, Q, hd]
    k = F.linear(k_in, w_k, b_k).view(batch, rows, num_heads, head_dim).transpose(1, 2)  # [B, H, N, hd]
    v = F.linear(kv, w_v, b_v).view(batch, rows, num_heads, head_dim).transpose(1, 2)
    # softmax in fp32 for 16-bit inputs; fp64 stays fp64 (the fp64 reference and gradcheck need it)
    score_dtype = torch.promote_types(dtype, torch.float32)
    scores = (torch.matmul(q.unsqueeze(0), k.transpose(-1, -2)) / math.sqrt(head_dim)).to(score_dtype)
    bias = score_mask(batch, rows, lengths, key_padding_mask, attn_mask, num_heads, num_queries,
                      score_dtype, x.device)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1).to(dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, num_queries, dim)
    return F.linear(out, out_proj_weight.to(dtype), out_proj_bias.to(dtype))
