"""The pre-fusion attention backward as two Triton kernels (flash-attention-2 style).

The forward saved each query row's log-sum-exp (``lse``, log2 domain); the backward recomputes the
probabilities tile by tile from it, so nothing of size [Lq, Lk] reaches memory:

- ``_dkdv_kernel``: one program per (key tile, sequence, kv head) walks the query tiles that see
  its keys, for every query head of the kv head's group, and accumulates dK and dV in registers
  (GQA's sum over the group needs no atomics);
- ``_dq_kernel``: one program per (query tile, sequence, head) walks the key tiles its rows see.

With ``delta = rowsum(dO * O)``: ``P = exp2(S * scale * log2 e - lse)``, ``dV = P^T dO``,
``dP = dO V^T``, ``dS = P (dP - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``.
Masks are those of the forward (bottom-right causal, key padding, packed sequences); rows that
see no key have lse = +inf, so their P, and their gradients, are zero.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llava_mini.kernels.prefusion.triton import ALIGNMENT, MAX_GRID_Y, _LOG2E, _zero_padded, block_d_for

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def backward_config(dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, warps, stages) of both backward kernels for inputs of ``dtype``: small tiles,
    since each program holds two accumulators and recomputes the score tile."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32's FMA dots: 32 x 32 tiles spilled 228-264 B per thread (d=128), 16 x 16 none
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    # 8 warps: at 4 the dK/dV kernel spilled 160-376 B per thread at d=128 (ptxas, sm_80-90); at 8
    # neither kernel spills more than 24 B (the ahead-of-time check's table). Not yet timed on a GPU.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


@triton.jit
def _sequence(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first packed query row, query length, first packed key row, key length) of one sequence."""
    if VARLEN:
        q_start = tl.load(CuSeqlensQ + batch).to(tl.int64)
        q_len = (tl.load(CuSeqlensQ + batch + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuSeqlensK + batch).to(tl.int64)
        k_len = (tl.load(CuSeqlensK + batch + 1) - k_start).to(tl.int32)
    else:
        q_start = batch * 0
        k_start = batch * 0
        q_len = seqlen_q
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _probabilities_t(k, q, lse, offs_n, offs_m, q_len, k_len, keep, causal_shift, qk_scale,
                     CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P^T [BLOCK_N, BLOCK_M] of a key tile against a query tile, masked as the forward masks."""
    scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    visible = (offs_n[:, None] < k_len) & (offs_m[None, :] < q_len) & (keep[:, None] != 0)
    if CAUSAL:
        visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
    return tl.where(visible, tl.exp2(scores - lse[None, :]), 0.0)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Keep, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_keep_b, stride_keep_n,
    seqlen_q, seqlen_k, num_kv_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Q, DO share strides (stride_q*); K, V, DK, DV share strides (stride_k*); Lse, Delta share stride_lse*.
    tile_n = tl.program_id(0)
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kv_head = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    q_start, q_len, k_start, k_len = _sequence(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, VARLEN)
    if tile_n * BLOCK_N >= k_len:
        return
    if VARLEN:
        q_base = q_start * stride_qm
        k_base = k_start * stride_kn
        lse_base = q_start * stride_lse_m
    else:
        q_base = batch * stride_qb
        k_base = batch * stride_kb
        lse_base = batch * stride_lse_b

    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    n_mask = offs_n[:, None] < k_len
    kv_offsets = k_base + kv_head * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(K + kv_offsets, mask=n_mask & d_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=n_mask & d_mask, other=0.0)
    if HAS_KEEP:
        keep = tl.load(Keep + batch * stride_keep_b + offs_n.to(tl.int64) * stride_keep_n, mask=offs_n < k_len, other=0)
    else:
        keep = tl.full([BLOCK_N], 1, dtype=tl.int8)

    causal_shift = k_len - q_len
    # Query i sees key j when j <= i + shift: the first query tile that sees this key tile.
    first = 0
    if CAUSAL:
        first = tl.maximum(tile_n * BLOCK_N - causal_shift, 0) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP_SIZE):
        head = kv_head * GROUP_SIZE + g
        for tile_start in range(first, q_len, BLOCK_M):
            offs_m = tile_start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < q_len
            q_offsets = q_base + head * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
            q = tl.load(Q + q_offsets, mask=m_mask[:, None] & d_mask, other=0.0)
            do = tl.load(DO + q_offsets, mask=m_mask[:, None] & d_mask, other=0.0)
            row_offsets = lse_base + head * stride_lse_h + offs_m.to(tl.int64) * stride_lse_m
            lse = tl.load(Lse + row_offsets, mask=m_mask, other=float("inf"))
            delta = tl.load(Delta + row_offsets, mask=m_mask, other=0.0)
            p_t = _probabilities_t(k, q, lse, offs_n, offs_m, q_len, k_len, keep, causal_shift, qk_scale,
                                   CAUSAL, DOT_PRECISION)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=n_mask & d_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=n_mask & d_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Keep, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_keep_b, stride_keep_n,
    seqlen_q, seqlen_k, num_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile_m = tl.program_id(0)
    batch = (tl.program_id(1) // num_heads).to(tl.int64)
    head = (tl.program_id(1) % num_heads).to(tl.int64)
    kv_head = head // GROUP_SIZE
    q_start, q_len, k_start, k_len = _sequence(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, VARLEN)
    if tile_m * BLOCK_M >= q_len:
        return
    if VARLEN:
        q_base = q_start * stride_qm
        k_base = k_start * stride_kn
        lse_base = q_start * stride_lse_m
    else:
        q_base = batch * stride_qb
        k_base = batch * stride_kb
        lse_base = batch * stride_lse_b

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    m_mask = offs_m < q_len
    q_offsets = q_base + head * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_offsets, mask=m_mask[:, None] & d_mask, other=0.0)
    do = tl.load(DO + q_offsets, mask=m_mask[:, None] & d_mask, other=0.0)
    row_offsets = lse_base + head * stride_lse_h + offs_m.to(tl.int64) * stride_lse_m
    lse = tl.load(Lse + row_offsets, mask=m_mask, other=float("inf"))
    delta = tl.load(Delta + row_offsets, mask=m_mask, other=0.0)

    causal_shift = k_len - q_len
    stop = k_len
    if CAUSAL:  # keys no row of this tile sees: j > last_row + shift
        stop = tl.maximum(tl.minimum((tile_m + 1) * BLOCK_M + causal_shift, k_len), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile_start in range(0, stop, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n[:, None] < k_len
        kv_offsets = k_base + kv_head * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        k = tl.load(K + kv_offsets, mask=n_mask & d_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=n_mask & d_mask, other=0.0)
        if HAS_KEEP:
            keep = tl.load(Keep + batch * stride_keep_b + offs_n.to(tl.int64) * stride_keep_n, mask=offs_n < k_len,
                           other=0)
        else:
            keep = tl.full([BLOCK_N], 1, dtype=tl.int8)
        p_t = _probabilities_t(k, q, lse, offs_n, offs_m, q_len, k_len, keep, causal_shift, qk_scale,
                               CAUSAL, DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dq += tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the standard row-major strides (a "contiguous" tensor may carry any stride on a
    size-1 dim; the kernels read q/dO and k/v/dK/dV through one set of strides each)."""
    return t if t.stride() == t.new_empty(t.shape).stride() else t.clone(memory_format=torch.contiguous_format)


def new_gradient(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer the kernels write in full (tests poison it with NaN)."""
    return torch.empty_like(like)


def prefusion_attention_backward_triton(grad_out, q, k, v, out, lse, *, causal, key_padding_mask=None,
                                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, scale):
    """dq, dk, dv of the forward ``prefusion_attention_triton(q, k, v, ..., lse=lse)`` returned ``out``.

    Layouts as the forward's (padded ``[B, L, H, d]`` or packed ``[total, H, d]``), any strides;
    the gradients come back contiguous, in the inputs' dtype. ``delta = rowsum(dO * O)`` is taken
    in float32 by PyTorch (O(L) memory); a head dim that is not a multiple of 16 runs on rows
    zero-padded to one (zero columns add nothing to any product), as the forward does.
    """
    head_dim = q.shape[-1]
    varlen = cu_seqlens_q is not None
    # delta in lse's layout: [B, H, Lq], or [H, total_q] packed.
    delta = (grad_out.float() * out.float()).sum(-1)
    delta = delta.transpose(0, 1).contiguous() if varlen else delta.transpose(1, 2).contiguous()
    width = head_dim if head_dim % ALIGNMENT == 0 else triton.cdiv(head_dim, ALIGNMENT) * ALIGNMENT
    q, k, v, grad_out = (_zero_padded(t, width) if width != head_dim else _row_major(t)
                         for t in (q, k, v, grad_out))
    dq, dk, dv = (new_gradient(t) for t in (q, k, v))
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    step = max(1, MAX_GRID_Y // q.shape[-2])
    for start in range(0, batch, step):
        if varlen:  # packed rows stay where they are: slicing cu_seqlens picks the sequences
            part = slice(start, start + step + 1)
            _launch(q, k, v, grad_out, lse, delta, dq, dk, dv, causal, None, cu_seqlens_q[part],
                    cu_seqlens_k[part], max_seqlen_q, head_dim, scale)
        else:
            part = slice(start, start + step)
            mask = None if key_padding_mask is None else key_padding_mask[part]
            _launch(q[part], k[part], v[part], grad_out[part], lse[part], delta[part], dq[part], dk[part], dv[part],
                    causal, mask, None, None, None, head_dim, scale)
    if width != head_dim:
        dq, dk, dv = (t[..., :head_dim].contiguous() for t in (dq, dk, dv))
    return dq, dk, dv


def _launch(q, k, v, do, lse, delta, dq, dk, dv, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            head_dim, scale):
    varlen = cu_seqlens_q is not None
    if varlen:  # packed tensors as one "batch" row of the padded layout; lse [H, total] has no batch stride
        q, k, v, do, dq, dk, dv = (t.unsqueeze(0) for t in (q, k, v, do, dq, dk, dv))
        batch, seqlen_q, seqlen_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, 0
        lse_strides = (0, *lse.stride())
        max_seqlen_k = int(torch.diff(cu_seqlens_k).max()) if batch else 0
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lse_strides = lse.stride()
        max_seqlen_k = seqlen_k
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if batch * heads == 0:
        return
    if max_seqlen_k == 0 or seqlen_q == 0:  # no key or no query: every gradient is zero
        for t in (dq, dk, dv):
            t.zero_()
        return
    if key_padding_mask is not None:
        keep = key_padding_mask.view(torch.uint8)
        keep_strides = keep.stride()
    else:
        keep, keep_strides = q, (0, 0)  # never read (HAS_KEEP=False)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    assert q.stride() == do.stride() == dq.stride() and k.stride() == v.stride() == dk.stride() == dv.stride()
    config = backward_config(q.dtype)
    common = dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d_for(q.shape[-1]), GROUP_SIZE=heads // kv_heads,
                  CAUSAL=causal, HAS_KEEP=key_padding_mask is not None, VARLEN=varlen,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **config)
    strides = (*q.stride(), *k.stride(), *lse_strides, *keep_strides)
    _dkdv_kernel[(triton.cdiv(max_seqlen_k, config["BLOCK_N"]), batch * kv_heads)](
        q, k, v, do, lse, delta, dk, dv, keep, cu_q, cu_k, *strides,
        seqlen_q, seqlen_k, kv_heads, scale * _LOG2E, scale, **common)
    _dq_kernel[(triton.cdiv(seqlen_q, config["BLOCK_M"]), batch * heads)](
        q, k, v, do, lse, delta, dq, keep, cu_q, cu_k, *strides,
        seqlen_q, seqlen_k, heads, scale * _LOG2E, scale, **common)
