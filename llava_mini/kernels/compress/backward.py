"""The fused compressor's backward: gradients to x and to every weight, through both forms.

Absorbed form (see ``triton.py``): with ``xhat_n`` the normalised rows, base-2 scores
``s(n) = A . xhat_n + bias(n)``, ``p = exp2(s - lse)`` and ``y = sum_n p(n) xhat_n``, the incoming
gradient reaches ``y`` (and the value / output projections) through a small differentiable torch
graph; then two Triton kernels, with ``dp(n) = dy . xhat_n`` and ``delta = dy . y``:

    ds(n)    = ln2 p(n) (dp(n) - delta)           gradient of the base-2 scores
    dxhat_n  = sum_hq p(n) dy + ds(n) A           dx by LayerNorm's backward (gamma is folded into A)
    dA      += ds(n) xhat_n                       per program, summed after
    dbias(n) = ds(n)                              the key position tables' gradient

- the scores kernel, per (image, split of its rows), recomputes each row's LayerNorm statistics and
  its scores from the saved log-sum-exp, and writes p and ds [B, N, H*Q] and four numbers per row:
  mean, rstd, and the two row means LayerNorm's backward needs, mean(dxhat) and mean(dxhat * xhat),
  which reduce to [H*Q] terms (``sum_d dy``, ``sum_d A``, ``dp``, ``A . xhat``), so no row of dxhat
  is needed for them;
- the rows kernel, per (image, split, chunk of channels), forms dxhat, dx and its share of dA on
  its channels.
Both walk the channels in chunks: a program holds a [BLOCK_N, BLOCK_D] tile, never a row of D, so
they run on every GPU in every dtype with at most a few spilled registers. x is read twice; p, ds
and the statistics are written and read back, 8 H*Q + 16 bytes per row (80 B at H*Q=8: 4% of a
bf16 row at D=1024). Nothing of size [N, D] beyond dx is written. The weight-derived tensors
(``derive_weights``), the value projection and out_proj are small torch ops around the kernels:
autograd carries their gradients back to the weights. The projected form is matmuls and SDPA,
whose autograd is torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llava_mini.kernels.compress import triton as fused


def _configs(tiles):
    return [triton.Config({"BLOCK_N": block_n, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)
            for block_n, block_d, warps, stages in tiles]


# (BLOCK_N, BLOCK_D, warps, stages) of the two kernels, per dtype of x. Both walk the channels in
# chunks of BLOCK_D, so a program holds [BLOCK_N, BLOCK_D] tiles and [BLOCK_N, H*Q] score rows,
# never a row of D: at most 40 KB of shared memory (every GPU since sm_80), a few spilled registers
# at most, 1-6 programs per SM (ptxas, C = 1 and 2, D = 1024). fp32's FMA dots need more
# registers: its rows kernel runs one stage (two collapse it to 32 registers and KBs of spills).
# What each compiles to: bench/results/kernel_resources.md (python -m llava_mini.kernels.aot).
SCORES_CONFIGS = {"half": _configs([(16, 128, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2)]),
                  "fp32": _configs([(16, 128, 4, 1), (32, 64, 4, 1), (32, 64, 8, 2), (64, 64, 8, 2)])}
ROWS_CONFIGS = {"half": _configs([(16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2)]),
                "fp32": _configs([(16, 64, 4, 1), (16, 128, 4, 1), (32, 32, 4, 1), (32, 64, 4, 1)])}
# Under the interpreter autotuning is pointless: one config, 16-channel chunks (several chunks, one
# partial, at the tests' odd widths).
INTERPRETER_CONFIGS = _configs([(16, 16, 4, 1)])
# Spill stores (bytes per thread) a config may have: a few registers' worth (ptxas spills 4-24 B at
# some configs on sm_80-89), never a collapsed kernel (KBs).
MAX_SPILL_BYTES = 32


def configs_for(kernel: str, dtype: torch.dtype) -> list:
    """The autotune configs of the backward's ``"scores"`` or ``"rows"`` kernel for x of ``dtype``."""
    table = {"scores": SCORES_CONFIGS, "rows": ROWS_CONFIGS}[kernel]
    return table["fp32" if dtype == torch.float32 else "half"]


def new_gradient(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer the kernels write (one place, so tests can poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


_AUTOTUNE_KEY = ["rows_per_split", "D", "BLOCK_HQ", "VARLEN"]


@triton.jit(do_not_specialize=["B", "num_splits"])
def _scores_backward_kernel(
    x_ptr, queries_ptr, key_table_ptr, key_grid_ptr, starts_ptr, lengths_ptr, widths_ptr, mask_ptr,
    lse_ptr, dy_ptr, delta_ptr, dy_sum_ptr, queries_sum_ptr,
    probs_ptr, dscores_ptr, row_stats_ptr,
    B, N, D, HQ, rows_per_split, num_splits, grid_positions,
    stride_xb, stride_xn, stride_xd, stride_tb, stride_mb,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
    VARLEN: tl.constexpr, KEY_TABLE: tl.constexpr, KEY_GRID: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per (image, split of its rows): each row's p and ds [H*Q] and its four row statistics."""
    image = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    x_image = x_ptr + image * stride_xb
    length = N
    if VARLEN:
        x_image += tl.load(starts_ptr + image) * stride_xn
        length = tl.load(lengths_ptr + image).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, length)
    if KEY_GRID:
        width = tl.load(widths_ptr + image).to(tl.int64)

    offs_hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    mask_hq = offs_hq < HQ
    # Per (head, query) of this image: lse (+inf on padded columns: their p is 0), delta, sum_d dy, sum_d A.
    column = offs_hq * B + image
    lse = tl.load(lse_ptr + column, mask=mask_hq, other=float("inf"))
    delta = tl.load(delta_ptr + column, mask=mask_hq, other=0.0)
    dy_sum = tl.load(dy_sum_ptr + column, mask=mask_hq, other=0.0)
    queries_sum = tl.load(queries_sum_ptr + offs_hq, mask=mask_hq, other=0.0)

    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        rows = x_image + offs_n[:, None] * stride_xn
        # LayerNorm statistics in the forward's two passes (mean, then the centred squares).
        total = tl.zeros([BLOCK_N], tl.float32)
        for d in range(0, D, BLOCK_D):
            offs_d = d + tl.arange(0, BLOCK_D).to(tl.int64)
            x = tl.load(rows + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
            total += tl.sum(x.to(tl.float32), axis=1)
        mean = total / D
        squares = tl.zeros([BLOCK_N], tl.float32)
        for d in range(0, D, BLOCK_D):
            offs_d = d + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            x = tl.load(rows + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            centered = tl.where(mask_d[None, :], x.to(tl.float32) - mean[:, None], 0.0)
            squares += tl.sum(centered * centered, axis=1)
        rstd = 1.0 / tl.sqrt(squares / D + eps)
        # A . xhat and dy . xhat over the channels, with xhat rounded as the forward's dot operand.
        raw = tl.zeros([BLOCK_N, BLOCK_HQ], tl.float32)
        dprobs = tl.zeros([BLOCK_N, BLOCK_HQ], tl.float32)
        for d in range(0, D, BLOCK_D):
            offs_d = d + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            x = tl.load(rows + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            xhat = tl.where(mask_d[None, :], (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            xhat_low = xhat.to(queries_ptr.dtype.element_ty)
            chunk_mask = mask_d[:, None] & mask_hq[None, :]
            queries = tl.load(queries_ptr + offs_hq[None, :] * D + offs_d[:, None], mask=chunk_mask, other=0.0)
            dy = tl.load(dy_ptr + column[None, :] * D + offs_d[:, None], mask=chunk_mask, other=0.0)  # [BLOCK_D, H*Q]
            raw += tl.dot(xhat_low, queries, input_precision=DOT_PRECISION)
            dprobs += tl.dot(xhat_low, dy, input_precision=DOT_PRECISION)

        scores = raw
        tile_mask = mask_n[:, None] & mask_hq[None, :]
        if KEY_TABLE:
            scores += tl.load(key_table_ptr + image * stride_tb + offs_n[:, None] * HQ + offs_hq[None, :],
                              mask=tile_mask, other=0.0)
        if KEY_GRID:
            col = offs_n % width
            row = offs_n // width
            scores += tl.load(key_grid_ptr + col[:, None] * HQ + offs_hq[None, :], mask=tile_mask, other=0.0)
            scores += tl.load(key_grid_ptr + (grid_positions + row)[:, None] * HQ + offs_hq[None, :],
                              mask=tile_mask, other=0.0)
        valid = mask_n
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + image * stride_mb + offs_n, mask=mask_n, other=1) == 0)
        probs = tl.where(valid[:, None] & mask_hq[None, :], tl.exp2(scores - lse[None, :]), 0.0)
        dscores = probs * (dprobs - delta[None, :]) * 0.6931471805599453  # ln 2: the scores are base 2
        # LayerNorm's backward needs two row means of dxhat = sum_hq p dy + ds A (the rows kernel
        # forms dxhat itself, a chunk at a time): over the channels they reduce to [H*Q] terms.
        mean_dxhat = tl.sum(probs * dy_sum[None, :] + dscores * queries_sum[None, :], axis=1) / D
        mean_dxhat_xhat = tl.sum(probs * dprobs + dscores * raw, axis=1) / D

        tile = (image * N + offs_n[:, None]) * HQ + offs_hq[None, :]
        tl.store(probs_ptr + tile, probs, mask=tile_mask)
        tl.store(dscores_ptr + tile, dscores, mask=tile_mask)
        stats = row_stats_ptr + image * N + offs_n  # [4, B, N]: mean, rstd, mean dxhat, mean dxhat*xhat
        tl.store(stats, mean, mask=mask_n)
        tl.store(stats + B * N, rstd, mask=mask_n)
        tl.store(stats + 2 * B * N, mean_dxhat, mask=mask_n)
        tl.store(stats + 3 * B * N, mean_dxhat_xhat, mask=mask_n)


@triton.jit(do_not_specialize=["B", "num_splits"])
def _rows_backward_kernel(
    x_ptr, queries_ptr, starts_ptr, lengths_ptr, dy_ptr, probs_ptr, dscores_ptr, row_stats_ptr,
    dx_ptr, dqueries_ptr,
    B, N, D, HQ, rows_per_split, num_splits,
    stride_xb, stride_xn, stride_xd, stride_dxb, stride_dxn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, VARLEN: tl.constexpr,
    STORE_DX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (image, split of its rows, chunk of channels): dx of those rows and channels, and the
    program's share of dA on those channels."""
    image = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    x_image = x_ptr + image * stride_xb
    dx_image = dx_ptr + image * stride_dxb
    length = N
    if VARLEN:
        first_row = tl.load(starts_ptr + image)
        x_image += first_row * stride_xn
        dx_image += first_row * stride_dxn
        length = tl.load(lengths_ptr + image).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, length)

    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    offs_hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    mask_d = offs_d < D
    mask_hq = offs_hq < HQ
    chunk_mask = mask_hq[:, None] & mask_d[None, :]
    column = offs_hq * B + image
    dy = tl.load(dy_ptr + column[:, None] * D + offs_d[None, :], mask=chunk_mask, other=0.0)  # [H*Q, BLOCK_D]
    queries = tl.load(queries_ptr + offs_hq[:, None] * D + offs_d[None, :], mask=chunk_mask, other=0.0)

    dqueries = tl.zeros([BLOCK_HQ, BLOCK_D], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        tile = (image * N + offs_n[:, None]) * HQ + offs_hq[None, :]
        tile_mask = mask_n[:, None] & mask_hq[None, :]
        probs = tl.load(probs_ptr + tile, mask=tile_mask, other=0.0)
        dscores = tl.load(dscores_ptr + tile, mask=tile_mask, other=0.0)
        stats = row_stats_ptr + image * N + offs_n
        mean = tl.load(stats, mask=mask_n, other=0.0)
        rstd = tl.load(stats + B * N, mask=mask_n, other=0.0)
        x = tl.load(x_image + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        xhat = tl.where(mask_d[None, :], (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        xhat_low = xhat.to(queries_ptr.dtype.element_ty)
        dscores_low = dscores.to(xhat_low.dtype)
        dqueries += tl.dot(tl.trans(dscores_low), xhat_low, input_precision=DOT_PRECISION)
        if STORE_DX:
            mean_dxhat = tl.load(stats + 2 * B * N, mask=mask_n, other=0.0)
            mean_dxhat_xhat = tl.load(stats + 3 * B * N, mask=mask_n, other=0.0)
            dxhat = tl.dot(probs.to(xhat_low.dtype), dy, input_precision=DOT_PRECISION)
            dxhat += tl.dot(dscores_low, queries, input_precision=DOT_PRECISION)
            # LayerNorm's backward (no affine: gamma lives in A and in the value weights)
            dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_image + offs_n[:, None] * stride_dxn + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_d[None, :])

    program = image * num_splits + split
    tl.store(dqueries_ptr + (program * HQ + offs_hq[:, None]) * D + offs_d[None, :], dqueries, mask=chunk_mask)


def _autotuned(kernel, name: str, dtype: torch.dtype, key: list):
    """``kernel`` autotuned over ``dtype``'s configs (one config under the interpreter)."""
    return triton.autotune(INTERPRETER_CONFIGS if fused.interpreting() else configs_for(name, dtype), key=key)(kernel)


# Module attributes (the ahead-of-time check records launches by swapping them).
_SCORES_KEY = _AUTOTUNE_KEY + ["KEY_TABLE", "KEY_GRID", "HAS_MASK"]
_scores_half = _autotuned(_scores_backward_kernel, "scores", torch.float16, _SCORES_KEY)
_scores_fp32 = _autotuned(_scores_backward_kernel, "scores", torch.float32, _SCORES_KEY)
_rows_half = _autotuned(_rows_backward_kernel, "rows", torch.float16, _AUTOTUNE_KEY + ["STORE_DX"])
_rows_fp32 = _autotuned(_rows_backward_kernel, "rows", torch.float32, _AUTOTUNE_KEY + ["STORE_DX"])


def autotuned_kernels(dtype: torch.dtype) -> tuple:
    """(scores kernel, rows kernel), autotuned, that the launcher runs for x of ``dtype``."""
    if dtype == torch.float32:
        return _scores_fp32, _rows_fp32
    return _scores_half, _rows_half


def _key_grid_gradient(dscores, layout, positions: int) -> torch.Tensor:
    """d key_grid [2, P, H*Q] from the score gradients [B, N, H*Q]: bias(i, j) = col[j] + row[i]."""
    index = torch.arange(dscores.shape[1], device=dscores.device)
    widths = torch.tensor([w for _, w in layout.grids], device=dscores.device)[:, None]
    lengths = torch.tensor([h * w for h, w in layout.grids], device=dscores.device)[:, None]
    valid = index[None, :] < lengths
    rows = dscores[valid]
    grid = dscores.new_zeros(2, positions, dscores.shape[-1])
    grid[0].index_add_(0, (index[None, :] % widths)[valid], rows)
    grid[1].index_add_(0, (index[None, :] // widths)[valid], rows)
    return grid


def absorbed_attention_backward(dy, x, queries, key_table, key_grid, grid_sizes, cu_seqlens, key_padding_mask,
                                eps, y, lse, need_dx=True, need_key_table=True, need_key_grid=True, splits=None):
    """Gradients of ``absorbed_attention``'s y [H*Q, B, D] (its lse gets none): (dx or None, dqueries
    [H*Q, D], dkey_table shaped like key_table or None, dkey_grid [2, P, H*Q] or None).

    ``key_table`` (fp32 base-2 score biases, [N, H*Q] or [1 or B, N, H*Q]) and ``key_grid`` are what
    the kernel adds to the scores (either may be None); the ``need_*`` flags say which gradients to form.
    """
    need_key_table = need_key_table and key_table is not None
    need_key_grid = need_key_grid and key_grid is not None
    dim = x.shape[-1]
    hq = queries.shape[0]
    layout = fused.Layout.of(x, "sincos" if key_grid is not None else "none", grid_sizes, cu_seqlens)
    batch = layout.batch
    rows = layout.rows if x.dim() == 2 else x.shape[1]
    scores = fused.score_inputs(layout, key_table, key_grid, key_padding_mask, x.device)
    splits, rows_per_split = fused.absorbed_splits(x, layout, splits)
    dx = new_gradient(x.shape, x.dtype, x.device) if need_dx else None
    dqueries = new_gradient((batch * splits, hq, dim), torch.float32, x.device)
    probs = new_gradient((batch, rows, hq), torch.float32, x.device)
    dscores = new_gradient((batch, rows, hq), torch.float32, x.device)
    row_stats = new_gradient((4, batch, rows), torch.float32, x.device)
    dy = dy.to(x.dtype).contiguous()  # the dots' operand, as the forward's queries
    delta = (dy.float() * y.float()).sum(-1).contiguous()  # [H*Q, B]: dy . y = sum_n p(n) dp(n)
    dy_sum = dy.float().sum(-1).contiguous()  # [H*Q, B]
    queries_sum = queries.float().sum(-1).contiguous()  # [H*Q]
    starts, lengths, varlen, (stride_xb, stride_xn, stride_xd) = fused.launch_layout(x, layout)
    stride_dxb, stride_dxn, _ = fused.row_strides(dx) if dx is not None else (0, 0, 1)
    block_hq = fused.block_sizes(hq, dim)[0]
    flags = dict(BLOCK_HQ=block_hq, VARLEN=varlen, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    scores_kernel, rows_kernel = autotuned_kernels(x.dtype)
    if batch and rows:
        scores_kernel[(batch, splits)](
            x, queries,
            key_table if key_table is not None else x, key_grid if key_grid is not None else x,
            starts, lengths, scores.widths if scores.widths is not None else x,
            scores.mask if scores.mask is not None else x,
            lse.contiguous(), dy, delta, dy_sum, queries_sum, probs, dscores, row_stats,
            batch, rows, dim, hq, rows_per_split, splits, key_grid.shape[1] if key_grid is not None else 0,
            stride_xb, stride_xn, stride_xd, fused.key_table_stride(key_table, hq),
            scores.mask.stride(0) if scores.mask is not None else 0,
            eps, KEY_TABLE=key_table is not None, KEY_GRID=key_grid is not None, HAS_MASK=scores.mask is not None,
            **flags,
        )
        rows_kernel[lambda meta: (batch, splits, triton.cdiv(dim, meta["BLOCK_D"]))](
            x, queries, starts, lengths, dy, probs, dscores, row_stats,
            dx if dx is not None else x, dqueries,
            batch, rows, dim, hq, rows_per_split, splits,
            stride_xb, stride_xn, stride_xd, stride_dxb, stride_dxn,
            STORE_DX=dx is not None, **flags,
        )
    dqueries = dqueries.sum(0).to(queries.dtype)
    dkey_table = dkey_grid = None
    if need_key_table or need_key_grid:  # the kernel visits an image's rows below its length: the rest get no gradient
        lengths_b = torch.tensor(layout.lengths or [rows] * batch, device=x.device)[:, None]
        dscores = dscores.masked_fill((torch.arange(rows, device=x.device)[None, :] >= lengths_b)[..., None], 0.0)
        if need_key_table:
            table_rows = key_table.shape[-2]
            summed = dscores[:, :table_rows] if key_table.dim() == 3 and key_table.shape[0] > 1 else dscores.sum(0)[:table_rows]
            dkey_table = summed.reshape(key_table.shape)
        if need_key_grid:
            dkey_grid = _key_grid_gradient(dscores, layout, key_grid.shape[1])
    if dx is not None and x.dim() == 3 and layout.lengths is not None:  # rows past an image's tokens
        beyond = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.tensor(layout.lengths, device=x.device)[:, None]
        dx.masked_fill_(beyond[..., None], 0.0)
    return dx, dqueries, dkey_table, dkey_grid


def backward_flops(rows: int, dim: int, hq: int, need_dx: bool = True) -> int:
    """FLOPs (2 per multiply-add) of ``absorbed_attention_backward`` over ``rows`` rows of x for ``hq``
    (head, query) columns: per row and column the recomputed scores, dp and dA (3 x 2*D) and, with dx,
    p dy and ds A (2 x 2*D)."""
    return rows * (6 + (4 if need_dx else 0)) * dim * hq
