"""Pre-fusion attention as one Triton kernel (flash-attention-2 style forward).

One program computes one BLOCK_M tile of queries for one (sequence, head): it streams BLOCK_N tiles
of K and V through SRAM with an online softmax, so the [Lq, Lk] score matrix never reaches memory.
Causal tiles that are fully masked are never visited; tiles fully visible skip the causal mask.
Semantics are those of ``ref.py``; inputs are validated by ``op.py``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from llava_mini.kernels.gpus import device_limits

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


if _INTERPRET:
    # The CPU interpreter runs every config; one small config keeps tests fast and still crosses tiles.
    HALF_CONFIGS = FP32_CONFIGS = _configs([(16, 32, 4, 1)])
else:
    # (BLOCK_M, BLOCK_N, warps, stages). Every one of these compiles without (or with a few bytes of)
    # spills on sm_80/86/89/90 at the product shapes, and those that fit a GPU's shared memory are kept
    # there: see bench/results/kernel_resources.md (python -m llava_mini.kernels.aot).
    HALF_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)])
    # fp32 runs its dots in full precision on the FMA units, whose operands sit in registers: small
    # tiles over 8 warps (4 warps or wider tiles spill hundreds of bytes to kilobytes per thread).
    FP32_CONFIGS = _configs([(32, 32, 8, 2), (16, 64, 8, 2), (32, 16, 8, 2)])


def configs_for(dtype: torch.dtype) -> list:
    """The autotune configs for inputs of ``dtype``."""
    return FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS


_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    acc, row_max, row_sum, q, k_ptrs, v_ptrs, keep_ptrs, offs_m, offs_n, offs_d,
    start, stop, k_len, causal_shift, stride_kn, stride_vn, stride_keep_n, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    EDGE_TILES: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key tiles [start, stop) into the running (acc, row_max, row_sum) of one query tile.

    EDGE_TILES: these tiles may straddle the causal diagonal or the sequence end, so mask per element.
    """
    d_mask = offs_d[None, :] < HEAD_DIM
    for tile_start in range(start, stop, BLOCK_N):
        cols = tile_start + offs_n
        col_offsets = cols.to(tl.int64)
        if EDGE_TILES:
            in_range = cols < k_len
            k_tile = tl.load(k_ptrs + col_offsets[:, None] * stride_kn, mask=in_range[:, None] & d_mask, other=0.0)
            v_tile = tl.load(v_ptrs + col_offsets[:, None] * stride_vn, mask=in_range[:, None] & d_mask, other=0.0)
        else:
            k_tile = tl.load(k_ptrs + col_offsets[:, None] * stride_kn, mask=d_mask, other=0.0)
            v_tile = tl.load(v_ptrs + col_offsets[:, None] * stride_vn, mask=d_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        if EDGE_TILES:
            visible = in_range[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            scores = tl.where(visible, scores, float("-inf"))
        if HAS_KEEP:
            keep = tl.load(keep_ptrs + col_offsets * stride_keep_n, mask=cols < k_len, other=0)
            scores = tl.where(keep[None, :] != 0, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row that has seen only masked keys keeps max = -inf; subtract 0 there so exp2 gives 0, not NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _prefusion_attention_kernel(
    Q, K, V, Out, Keep, CuSeqlensQ, CuSeqlensK, Lse,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_keep_b, stride_keep_n, stride_lse_b, stride_lse_h, stride_lse_m,
    seqlen_q, seqlen_k, num_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Heaviest causal tiles (the last queries) first: shorter tail when the grid does not fit in one wave.
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    kv_head = head // GROUP_SIZE

    if VARLEN:
        # Packed sequences: rows [start, end) of the [total, H, d] tensors; the batch stride is unused.
        q_start = tl.load(CuSeqlensQ + batch).to(tl.int64)
        q_len = (tl.load(CuSeqlensQ + batch + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuSeqlensK + batch).to(tl.int64)
        k_len = (tl.load(CuSeqlensK + batch + 1) - k_start).to(tl.int32)
        q_base = q_start * stride_qm
        o_base = q_start * stride_om
        k_base = k_start * stride_kn
        v_base = k_start * stride_vn
        lse_base = q_start * stride_lse_m
    else:
        q_len = seqlen_q
        k_len = seqlen_k
        q_base = batch * stride_qb
        o_base = batch * stride_ob
        k_base = batch * stride_kb
        v_base = batch * stride_vb
        lse_base = batch * stride_lse_b
    if tile_m * BLOCK_M >= q_len:
        return  # the grid covers the longest sequence of the batch

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    row_offsets = offs_m.to(tl.int64)

    q_ptrs = Q + q_base + head * stride_qh + row_offsets[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    # Bases of this head's K/V rows and of this sequence's keep flags; key offsets are added per tile.
    k_ptrs = K + k_base + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + v_base + kv_head * stride_vh + offs_d[None, :] * stride_vd
    keep_ptrs = Keep + batch * stride_keep_b

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Query i sees keys j <= i + causal_shift (bottom-right alignment).
    causal_shift = k_len - q_len
    if CAUSAL:
        # Keys every row of this tile sees: j <= first_row + shift; keys no row sees: j > last_row + shift.
        visible_end = tl.minimum(tile_m * BLOCK_M + causal_shift + 1, k_len)
        stop = tl.minimum((tile_m + 1) * BLOCK_M + causal_shift, k_len)
    else:
        visible_end = k_len
        stop = k_len
    full_end = tl.maximum(visible_end, 0) // BLOCK_N * BLOCK_N
    stop = tl.maximum(stop, 0)

    acc, row_max, row_sum = _attend_tiles(
        acc, row_max, row_sum, q, k_ptrs, v_ptrs, keep_ptrs, offs_m, offs_n, offs_d,
        0, full_end, k_len, causal_shift, stride_kn, stride_vn, stride_keep_n, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_KEEP, DOT_PRECISION,
    )
    acc, row_max, row_sum = _attend_tiles(
        acc, row_max, row_sum, q, k_ptrs, v_ptrs, keep_ptrs, offs_m, offs_n, offs_d,
        full_end, stop, k_len, causal_shift, stride_kn, stride_vn, stride_keep_n, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KEEP, DOT_PRECISION,
    )

    # Rows that saw no key have row_sum = 0 and acc = 0: write zeros.
    out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
    o_ptrs = Out + o_base + head * stride_oh + row_offsets[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        # The row's log2-sum-exp2 of its scaled scores, for the backward; +inf where no key was seen,
        # so the backward's exp2(score - lse) is 0 there.
        lse = tl.where(row_sum > 0.0, row_max + tl.log2(tl.where(row_sum > 0.0, row_sum, 1.0)), float("inf"))
        tl.store(Lse + lse_base + head * stride_lse_h + row_offsets * stride_lse_m, lse, mask=row_mask)


def block_d_for(head_dim: int) -> int:
    """The head-dim width of the kernel's tiles: ``tl.arange`` wants a power of 2, ``tl.dot`` at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def shared_memory_bytes(config: triton.Config, block_d: int, dtype: torch.dtype, capability: int) -> int:
    """Shared memory the compiled kernel uses: the rule configs are pruned by before any compile.

    How Triton lays the kernel out in shared memory (read off its compiles for sm_80-sm_90):
    - the K and V tiles are multi-buffered by the software pipeline: ``num_stages`` buffers on
      sm_90 (wgmma reads its operands from shared memory), ``num_stages - 1`` before;
    - the Q tile stays in shared memory for the whole key loop;
    - the probabilities tile P is staged through shared memory on its way to the second dot for
      fp32 (FMA dots), and for tensor-core dots before sm_90 when BLOCK_M < BLOCK_D;
    - FMA dots add a scratch of 4 B per query row for the row maximum and sum.
    The ahead-of-time check (``python -m llava_mini.kernels.aot``) holds the rule to real compiles
    at the product shapes on sm_80/86/89/90: every config it keeps fits, every config it drops
    does not. Elsewhere a wrong guess costs compile time only (the autotuner skips a config that
    fails with OutOfResources).
    """
    block_m, block_n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    size = dtype.itemsize
    kv_tiles = 2 * block_n * block_d * size
    q_tile = block_m * block_d * size
    p_tile = block_m * block_n * size
    if dtype == torch.float32:
        return max(stages - 1, 1) * kv_tiles + q_tile + p_tile + 4 * block_m
    if capability >= 90:
        return stages * kv_tiles + q_tile
    return (stages - 1) * kv_tiles + q_tile + (p_tile if block_m < block_d else 0)


def fitting_configs(configs: list, dtype: torch.dtype, block_d: int, capability: int, shared_limit: int) -> list:
    """The configs whose shared memory (``shared_memory_bytes``) fits ``shared_limit`` bytes."""
    return [c for c in configs if shared_memory_bytes(c, block_d, dtype, capability) <= shared_limit]


def select_configs(dtype: torch.dtype, head_dim: int, capability: int, shared_limit: int) -> list:
    """The configs of ``dtype`` that fit a GPU of ``capability`` allowing ``shared_limit`` bytes per
    program; a ValueError naming the arch, dtype and what to use instead when none does."""
    block_d = block_d_for(head_dim)
    kept = fitting_configs(configs_for(dtype), dtype, block_d, capability, shared_limit)
    if kept:
        return kept
    need = min(shared_memory_bytes(c, block_d, dtype, capability) for c in configs_for(dtype))
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    instead = "backend='torch'"
    if fitting_configs(configs_for(other), other, block_d, capability, shared_limit):
        instead = ("bfloat16 or float16" if other == torch.bfloat16 else "float32") + f" inputs or {instead}"
    raise ValueError(
        f"q: no pre-fusion attention kernel config fits sm_{capability}'s {shared_limit} B of shared memory "
        f"per program for {str(dtype).removeprefix('torch.')} at head_dim {head_dim} (the smallest needs {need} B); "
        f"use {instead}"
    )


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: drop the configs that cannot fit this GPU's shared memory before any compile."""
    q = named_args["Q"]
    limits = device_limits(q.device)
    if limits is None:
        return configs
    kept = select_configs(q.dtype, kwargs["HEAD_DIM"], *limits)
    return [c for c in configs if c in kept]


_AUTOTUNE_KEY = ["HEAD_DIM", "BLOCK_D", "CAUSAL", "HAS_KEEP", "VARLEN", "GROUP_SIZE", "STORE_LSE"]
_half_kernel = triton.autotune(HALF_CONFIGS, key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_configs})(_prefusion_attention_kernel)
_fp32_kernel = triton.autotune(FP32_CONFIGS, key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_configs})(_prefusion_attention_kernel)


def autotuned_kernel(dtype: torch.dtype):
    """The autotuned kernel the launcher runs for inputs of ``dtype`` (its configs: ``configs_for``)."""
    return _fp32_kernel if dtype == torch.float32 else _half_kernel


MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis
# Triton marks an integer argument divisible by 16 (and a pointer 16-byte aligned) when it is: only
# then are a row's loads vectorised (16-byte cp.async / ld.v4). Head dims are padded to a multiple.
ALIGNMENT = 16


def _zero_padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` copied into contiguous rows of ``width`` elements, the extra columns zero."""
    buffer = t.new_empty(*t.shape[:-1], width)
    buffer[..., : t.shape[-1]] = t
    buffer[..., t.shape[-1]:] = 0
    return buffer


def prefusion_attention_triton(
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
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel on already-validated inputs (see ``op.prefusion_attention`` for the contract).

    Padded layout: q [B, Lq, H, d], k/v [B, Lk, Hkv, d]. Packed layout: q [total_q, H, d],
    k/v [total_k, Hkv, d] with int32 ``cu_seqlens_q/k`` [B + 1] and ``max_seqlen_q``.
    Any strides. ``out`` (shaped like q, any strides) is written in full when given.
    ``lse`` (float32 ``[B, H, Lq]``, packed ``[H, total_q]``; see ``lse_shape``), when given, receives
    each row's log2-sum-exp2 of its scores times ``scale * log2(e)`` (+inf for rows that see no key),
    what the backward recomputes the probabilities from.

    A head_dim that is not a multiple of 16 (72, say) leaves rows off 16-element boundaries, and the
    kernel's loads would go one element at a time: q, k and v are then copied into rows zero-padded
    to the next multiple of 16. Zero columns add nothing to q.k and give output columns that are
    dropped, so results are exactly those of the unpadded inputs (``scale`` stays 1/sqrt(head_dim)).
    """
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # A contiguous output whatever q's strides: callers reshape it to [..., H * d] without a copy.
    out = q.new_empty(q.shape) if out is None else out
    if head_dim % ALIGNMENT:
        width = triton.cdiv(head_dim, ALIGNMENT) * ALIGNMENT
        q, k, v = (_zero_padded(t, width) for t in (q, k, v))
        padded_out = q.new_empty(q.shape)
        _launch_in_slices(q, k, v, padded_out, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          scale, lse)
        out.copy_(padded_out[..., :head_dim])
    else:
        _launch_in_slices(q, k, v, out, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale,
                          lse)
    return out


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """The shape of the forward's saved log-sum-exp: ``[B, H, Lq]``, or ``[H, total_q]`` when packed."""
    return (q.shape[-2], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _launch_in_slices(q, k, v, out, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale,
                      lse=None):
    """Launch over slices of the batch: the grid's second axis holds batch x heads, at most MAX_GRID_Y."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    step = max(1, MAX_GRID_Y // q.shape[-2])
    for start in range(0, batch, step):
        if varlen:  # packed rows stay where they are: slicing cu_seqlens picks the sequences
            part = slice(start, start + step + 1)
            _launch(q, k, v, out, causal, None, cu_seqlens_q[part], cu_seqlens_k[part], max_seqlen_q, scale, lse)
        else:
            part = slice(start, start + step)
            mask = None if key_padding_mask is None else key_padding_mask[part]
            _launch(q[part], k[part], v[part], out[part], causal, mask, None, None, None, scale,
                    None if lse is None else lse[part])


def _launch(q, k, v, out, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, lse=None):
    varlen = cu_seqlens_q is not None
    if varlen:
        # View packed tensors as one "batch" row of the padded layout: only strides 1..3 are read.
        q4, k4, v4, o4 = (t.unsqueeze(0) for t in (q, k, v, out))
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen_q, 0
    else:
        q4, k4, v4, o4 = q, k, v, out
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if batch * heads == 0 or seqlen_q == 0:
        return
    if key_padding_mask is not None:
        keep = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        keep_strides = keep.stride()
    else:
        keep, keep_strides = q, (0, 0)  # never read (HAS_KEEP=False)
    cu_q = cu_seqlens_q if varlen else q  # never read when VARLEN=False
    cu_k = cu_seqlens_k if varlen else q
    if lse is None:
        lse_arg, lse_strides = q, (0, 0, 0)  # never written (STORE_LSE=False)
    else:  # packed [H, total]: the batch stride is unused, the row stride is the last
        lse_arg, lse_strides = lse, ((0, *lse.stride()) if varlen else lse.stride())

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)

    autotuned_kernel(q.dtype)[grid](
        q4, k4, v4, o4, keep, cu_q, cu_k, lse_arg,
        *q4.stride(), *k4.stride(), *v4.stride(), *o4.stride(), *keep_strides, *lse_strides,
        seqlen_q, seqlen_k, heads, scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d_for(head_dim),
        GROUP_SIZE=heads // kv_heads,
        CAUSAL=causal,
        HAS_KEEP=key_padding_mask is not None,
        VARLEN=varlen,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STORE_LSE=lse is not None,
    )
