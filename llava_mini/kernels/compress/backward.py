"""The fused compressor's backward: gradients to x and to every weight, through both forms.

Absorbed form (see ``triton.py``): with ``xhat_n`` the normalised rows, base-2 scores
``s(n) = A . xhat_n + bias(n)``, ``p = exp2(s - lse)`` and ``y = sum_n p(n) xhat_n``, the incoming
gradient reaches ``y`` (and the value / output projections) through a small differentiable torch
graph; then one Triton pass over x per (image, split of its rows) recomputes each tile's scores from
the saved log-sum-exp and forms, with ``dp(n) = dy . xhat_n`` and ``delta = dy . y``:

    ds(n)    = ln2 p(n) (dp(n) - delta)           gradient of the base-2 scores
    dxhat_n  = sum_hq p(n) dy + ds(n) A           dx by LayerNorm's backward (gamma is folded into A)
    dA      += ds(n) xhat_n                       per program, summed after
    dbias(n) = ds(n)                              kept only when a key position table needs it

Nothing of size [N, D] beyond dx itself is written. The weight-derived tensors (``derive_weights``),
the value projection and out_proj are small torch ops around the kernels: autograd carries their
gradients back to the weights. The projected form is matmuls and SDPA, whose autograd is torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llava_mini.kernels.compress import triton as fused
from llava_mini.kernels.gpus import device_limits


def _configs(tiles):
    return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages) for block_n, warps, stages in tiles]


# (BLOCK_N, warps, stages), for fp16/bf16 x. Each program holds the x tile, dxhat, dy and the dA
# accumulator as rows of D: at D=1024, H*Q=16, 8 warps, ptxas reports ~300 B of spills per thread
# when dx and the score gradients are written (bench/results/kernel_resources.md); re-reading dy per
# tile instead collapses the kernel (32 registers, 8 KB of spills), as does 4 warps. fp32 x has no
# config: its FMA dots collapse it at every width tried (> 5 KB of spills), so fp32 training runs
# the projected form on a GPU. The interpreter runs one config, any dtype.
HALF_CONFIGS = _configs([(16, 8, 1), (16, 8, 2)])
INTERPRETER_CONFIGS = _configs([(16, 4, 1)])
# Spill stores (bytes per thread) a kept config may have: the ~300 B above (a known cost, to work
# off), not a collapsed kernel.
MAX_SPILL_BYTES = 320


def shared_memory_bytes(config, block_hq: int, block_d: int, dtype: torch.dtype) -> int:
    """Shared memory the compiled backward kernel uses (fp16/bf16): the rule configs are kept by.

    Read off Triton's compiles for sm_80-sm_90 at BLOCK_N=16: the dots stage the absorbed queries
    and dy in both orientations and x's tile ([3 * BLOCK_HQ + 1.5 * BLOCK_N] rows of BLOCK_D), each
    further pipeline stage one more x tile; exact at H*Q 16 and 32, D 1024 (147,456 and 245,760 B
    for one stage; the latter is what an H200 refused at C=2). The ahead-of-time check holds the
    rule to real compiles.
    """
    block_n, size = config.kwargs["BLOCK_N"], dtype.itemsize
    return ((3 * block_hq + 3 * block_n // 2) + (config.num_stages - 1) * block_n) * block_d * size


def backward_configs(dtype: torch.dtype, block_hq: int, block_d: int, shared_limit: int | None = None) -> list:
    """The backward kernel's configs for x of ``dtype`` on a GPU allowing ``shared_limit`` bytes per
    program (None: no limit): none for fp32."""
    if dtype == torch.float32:
        return []
    return [c for c in HALF_CONFIGS
            if shared_limit is None or shared_memory_bytes(c, block_hq, block_d, dtype) <= shared_limit]


def backward_runs(num_heads: int, num_queries: int, dim: int, dtype: torch.dtype, device) -> bool:
    """Whether the absorbed form's backward kernel runs for these shapes on ``device`` (always under
    the interpreter); where it does not, training runs the projected form."""
    limits = device_limits(torch.device(device))
    if limits is None:
        return True
    block_hq, block_d = fused.block_sizes(num_heads * num_queries, dim)
    return bool(backward_configs(dtype, block_hq, block_d, limits[1]))


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: keep the configs that fit this GPU (``backward_configs``)."""
    x = named_args["x_ptr"]
    limits = device_limits(x.device)
    if limits is None:
        return configs
    kept = backward_configs(x.dtype, kwargs["BLOCK_HQ"], kwargs["BLOCK_D"], limits[1])
    return [c for c in configs if c in kept]


def new_gradient(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer the kernel writes (one place, so tests can poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.autotune(INTERPRETER_CONFIGS if fused.interpreting() else HALF_CONFIGS,
                 key=["rows_per_split", "BLOCK_D", "BLOCK_HQ", "VARLEN", "KEY_TABLE", "KEY_GRID", "HAS_MASK",
                      "STORE_DX", "STORE_DSCORES"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["B", "num_splits"])
def _absorbed_backward_kernel(
    x_ptr, queries_ptr, key_table_ptr, key_grid_ptr, starts_ptr, lengths_ptr, widths_ptr, mask_ptr,
    lse_ptr, dy_ptr, delta_ptr, dx_ptr, dqueries_ptr, dscores_ptr,
    B, N, D, HQ, rows_per_split, num_splits, grid_positions,
    stride_xb, stride_xn, stride_xd, stride_dxb, stride_dxn, stride_tb, stride_mb,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
    VARLEN: tl.constexpr, KEY_TABLE: tl.constexpr, KEY_GRID: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DSCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
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
    if KEY_GRID:
        width = tl.load(widths_ptr + image).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    mask_d = offs_d < D
    mask_hq = offs_hq < HQ
    queries_ptrs = queries_ptr + offs_hq[None, :] * D + offs_d[:, None]  # read as [D, H*Q]
    queries_mask = mask_d[:, None] & mask_hq[None, :]
    # Per (head, query) of this image: lse (+inf on padded columns: their p is 0), delta, dy.
    column = offs_hq * B + image
    lse = tl.load(lse_ptr + column, mask=mask_hq, other=float("inf"))
    delta = tl.load(delta_ptr + column, mask=mask_hq, other=0.0)
    dy = tl.load(dy_ptr + column[:, None] * D + offs_d[None, :], mask=mask_hq[:, None] & mask_d[None, :], other=0.0)

    dqueries = tl.zeros([BLOCK_HQ, BLOCK_D], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        x = tl.load(x_image + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        xhat = centered * rstd[:, None]
        xhat_low = xhat.to(queries_ptr.dtype.element_ty)  # the forward's dot operand

        queries = tl.load(queries_ptrs, mask=queries_mask, other=0.0)
        scores = tl.dot(xhat_low, queries, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_HQ]
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

        dprobs = tl.dot(xhat_low, tl.trans(dy), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_HQ]
        dscores = probs * (dprobs - delta[None, :]) * 0.6931471805599453  # ln 2: the scores are base 2
        if STORE_DSCORES:
            tl.store(dscores_ptr + (image * N + offs_n[:, None]) * HQ + offs_hq[None, :], dscores, mask=tile_mask)
        dscores_low = dscores.to(xhat_low.dtype)
        dqueries += tl.dot(tl.trans(dscores_low), xhat_low, input_precision=DOT_PRECISION)
        if STORE_DX:
            dxhat = tl.dot(probs.to(xhat_low.dtype), dy, input_precision=DOT_PRECISION)
            dxhat += tl.dot(dscores_low, tl.trans(queries), input_precision=DOT_PRECISION)
            # LayerNorm's backward (no affine: gamma lives in A and in the value weights)
            mean_dxhat = tl.sum(dxhat, axis=1) / D
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
            dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_image + offs_n[:, None] * stride_dxn + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_d[None, :])

    program = image * num_splits + split
    tl.store(dqueries_ptr + (program * HQ + offs_hq[:, None]) * D + offs_d[None, :], dqueries,
             mask=mask_hq[:, None] & mask_d[None, :])


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
    store_dscores = need_key_table or need_key_grid
    splits, rows_per_split = fused.absorbed_splits(x, layout, splits)
    dx = new_gradient(x.shape, x.dtype, x.device) if need_dx else None
    dqueries = new_gradient((batch * splits, hq, dim), torch.float32, x.device)
    dscores = new_gradient((batch, rows, hq), torch.float32, x.device) if store_dscores else None
    delta = (dy.float() * y.float()).sum(-1).contiguous()  # [H*Q, B]: dy . y = sum_n p(n) dp(n)
    starts, lengths, varlen, (stride_xb, stride_xn, stride_xd) = fused.launch_layout(x, layout)
    stride_dxb, stride_dxn, _ = fused.row_strides(dx) if dx is not None else (0, 0, 1)
    block_hq, block_d = fused.block_sizes(hq, dim)
    if batch and rows:
        _absorbed_backward_kernel[(batch, splits)](
            x, queries,
            key_table if key_table is not None else x, key_grid if key_grid is not None else x,
            starts, lengths, scores.widths if scores.widths is not None else x,
            scores.mask if scores.mask is not None else x,
            lse.contiguous(), dy.to(x.dtype).contiguous(), delta,
            dx if dx is not None else x, dqueries, dscores if dscores is not None else x,
            batch, rows, dim, hq, rows_per_split, splits, key_grid.shape[1] if key_grid is not None else 0,
            stride_xb, stride_xn, stride_xd, stride_dxb, stride_dxn, fused.key_table_stride(key_table, hq),
            scores.mask.stride(0) if scores.mask is not None else 0,
            eps,
            BLOCK_D=block_d, BLOCK_HQ=block_hq,
            VARLEN=varlen, KEY_TABLE=key_table is not None, KEY_GRID=key_grid is not None,
            HAS_MASK=scores.mask is not None, STORE_DX=dx is not None, STORE_DSCORES=store_dscores,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    dqueries = dqueries.sum(0).to(queries.dtype)
    dkey_table = dkey_grid = None
    if dscores is not None:  # the kernel visits an image's rows below its length: the rest get no gradient
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
