"""Fused query-compression cross-attention (Triton), exact to the reference in ``ref.py``.

Two forms, picked per shape by ``choose_form``:

- ``"absorbed"`` (small H*C^2, e.g. C=1 or 2 with 8 heads at D=1024): the queries are parameters,
  so the key projection is folded into them. With ``xhat_n = (x_n - mean_n) * rstd_n``,

      score_hq(n) = A_hq . xhat_n + bias_hq(n)      A_hq = (W_k,h^T q_hq / sqrt(d_h)) * gamma_kv
                                                    bias_hq(n) = (W_k,h^T q_hq / sqrt(d_h)) . PE_k(n)
      y_hq        = sum_n softmax_n(score_hq) xhat_n
      out         = out_proj(W_v,h (y_hq * gamma_kv + beta_kv) + b_v,h)

  (the q.b_k and A.beta_kv terms are constant over n and cancel in the softmax). One kernel pass
  reads x once: LayerNorm statistics, scores, online softmax and the weighted sum of xhat per
  (head, query); a tiny GEMM after. Small batches split N over several programs (split-K style)
  whose partial softmax states are merged after.
- ``"projected"`` (large H*C^2, e.g. C=8): K and V are projected with matmuls (the key position
  term PE_k W_k^T + b_k is a cached [N, D] table) and attention runs through SDPA.

Everything that depends only on the weights is computed once and cached (see ``derived_weights``).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_mini.kernels.compress.ref import key_pos_embed, side_of

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The absorbed kernel keeps a [pad(H*C^2), pad(D)] fp32 accumulator in registers; beyond this many
# values it would spill, and the projected form wins anyway (H*C^2 approaching D).
ABSORBED_MAX_ACCUMULATOR = 32 * 1024
LOG2E = 1.4426950408889634
# The projected form materialises LN(x), K and V; it runs over batch chunks of at most this many bytes.
PROJECTED_CHUNK_BYTES = 2 << 30


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def max_shared_memory(device: torch.device) -> int | None:
    """Shared memory one program may use on ``device``; None (no limit) off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def choose_form(num_heads: int, num_queries: int, dim: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu") -> str:
    """``"absorbed"`` or ``"projected"`` for these shapes on ``device``.

    Absorbed while (1) the per-program fp32 accumulator [pad(H*C^2), pad(D)] fits the register
    budget (D=1024: H*C^2 <= 32, i.e. C=1 or 2 at 8 heads) and (2) the smallest kernel config's
    shared memory, the two dot operands [16 + pad(H*C^2), pad(D)] in x's dtype plus a 4 KB margin
    (compiled sizes are 1-2 KB over the operands), fits the device: bf16 at D=1024 needs 68 KB for
    C=1 (every GPU since sm_80) and 100 KB for C=2 (A100/H100 class; projected on 99 KB GPUs).
    """
    rows = max(16, triton.next_power_of_2(num_heads * num_queries))
    padded_dim = triton.next_power_of_2(dim)
    if rows * padded_dim > ABSORBED_MAX_ACCUMULATOR:
        return "projected"
    limit = max_shared_memory(torch.device(device))
    shared = (16 + rows) * padded_dim * torch.empty((), dtype=dtype).element_size() + 4096
    return "absorbed" if limit is None or shared <= limit else "projected"


def choose_splits(batch: int, n: int, target_programs: int) -> int:
    """How many programs share one image's N rows: enough to give ``target_programs`` programs in
    all when the batch is small, but at least 32 rows each."""
    if batch >= target_programs:
        return 1
    return max(1, min(triton.cdiv(target_programs, batch), triton.cdiv(n, 32)))


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: two per SM on CUDA; one (no splitting) under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def check_inputs(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                 ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads) -> None:
    """Raise a ValueError/TypeError naming the first argument that does not fit."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [B, N, D], got {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    _, n, dim = x.shape
    side_of(n, "x")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of D={dim}, got {num_heads!r}")
    if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[1] != dim:
        raise ValueError(f"query: expected shape [C^2, {dim}], got {_shape(query)}")
    num_queries = query.shape[0]
    side_of(num_queries, "query")
    expected = {
        "pos_embed": (pos_embed, [num_queries, dim]),
        "in_proj_weight": (in_proj_weight, [3 * dim, dim]),
        "in_proj_bias": (in_proj_bias, [3 * dim]),
        "out_proj_weight": (out_proj_weight, [dim, dim]),
        "out_proj_bias": (out_proj_bias, [dim]),
        "ln_q_weight": (ln_q_weight, [dim]),
        "ln_q_bias": (ln_q_bias, [dim]),
        "ln_kv_weight": (ln_kv_weight, [dim]),
        "ln_kv_bias": (ln_kv_bias, [dim]),
    }
    for name, (tensor, shape) in {"query": (query, [num_queries, dim]), **expected}.items():
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (D={dim} from x), got {_shape(tensor)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {tensor.device}")


def _shape(tensor) -> object:
    return list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__


# ---------------------------------------------------------------------------------------------
# Weight-derived tensors, cached per (weights, their versions, N, dtype, device, form).
# In-place edits (optimizer steps, load_state_dict, `with no_grad(): w.copy_(...)`) bump a tensor's
# `_version` and so refresh the entry; edits through `.data` bypass the version counter: call
# `clear_cache()` after those.
# ---------------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, tuple[list, dict]] = OrderedDict()
_CACHE_ENTRIES = 8


def clear_cache() -> None:
    """Drop every cached weight-derived tensor."""
    _CACHE.clear()


def derived_weights(form: str, dtype: torch.dtype, n: int, weights: list[torch.Tensor],
                    num_heads: int, eps: float) -> dict:
    """The cached weight-derived tensors of ``form`` for inputs of ``dtype`` with ``n`` tokens."""
    key = (form, dtype, n, num_heads, eps) + tuple((id(w), w.data_ptr(), w._version) for w in weights)
    entry = _CACHE.get(key)
    # id() and data_ptr() can be reused after a tensor dies: the weak references tell.
    if entry is not None and all(ref() is w for ref, w in zip(entry[0], weights)):
        _CACHE.move_to_end(key)
        return entry[1]
    derived = _derive_weights(form, dtype, n, *weights, num_heads=num_heads, eps=eps)
    _CACHE[key] = ([weakref.ref(w) for w in weights], derived)
    if len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return derived


@torch.no_grad()
def _derive_weights(form, dtype, n, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight,
                    out_proj_bias, ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, *, num_heads, eps):
    """Everything that depends only on the weights, in fp32 math, stored in ``dtype``."""
    num_queries, dim = query.shape
    head_dim = dim // num_heads
    q_in = F.layer_norm(query.float(), (dim,), ln_q_weight.float(), ln_q_bias.float(), eps) + pos_embed.float()
    w_q, w_k, w_v = in_proj_weight.float().chunk(3)
    b_q, b_k, b_v = in_proj_bias.float().chunk(3)
    q = F.linear(q_in, w_q, b_q).view(num_queries, num_heads, head_dim).transpose(0, 1)  # [H, Q, hd]
    pe_k = key_pos_embed(pos_embed, n).float()  # [N, D]
    gamma, beta = ln_kv_weight.float(), ln_kv_bias.float()
    out = {"out_proj_weight": out_proj_weight.to(dtype), "out_proj_bias": out_proj_bias.to(dtype)}
    if form == "absorbed":
        # Scores in base 2 (the kernel uses exp2): fold log2(e) / sqrt(hd) into the queries.
        absorbed = torch.einsum("hqe,hed->hqd", q, w_k.view(num_heads, head_dim, dim))
        absorbed = absorbed.reshape(num_heads * num_queries, dim) * (LOG2E / math.sqrt(head_dim))
        out["queries"] = (absorbed * gamma).to(dtype).contiguous()  # [H*Q, D], h-major
        out["key_bias"] = (pe_k @ absorbed.T).contiguous()  # [N, H*Q] fp32
        # The values are y * gamma + beta (sum of softmax weights = 1): fold gamma, beta into W_v, b_v.
        out["value_weight"] = (w_v * gamma).to(dtype).view(num_heads, head_dim, dim)
        out["value_bias"] = (w_v @ beta + b_v).to(dtype).view(num_heads, 1, head_dim)
    else:
        out["queries"] = q.to(dtype).contiguous()  # [H, Q, hd]
        out["ln_weight"], out["ln_bias"] = ln_kv_weight.to(dtype), ln_kv_bias.to(dtype)
        out["key_weight"], out["value_weight"] = w_k.to(dtype), w_v.to(dtype)
        out["key_bias"] = (pe_k @ w_k.T + b_k).to(dtype)  # [N, D]: the position table, projected
        out["value_bias"] = b_v.to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The absorbed kernel: one program per (image, split of N).
# ---------------------------------------------------------------------------------------------

def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4)]
    # The x tile and the accumulator both hold [*, D] fp32 rows: 8-16 warps spread them over enough
    # registers (4 warps spill heavily at D=1024). One stage keeps fp32 inputs within A100's shared
    # memory; configs that do not fit a device fail to compile there and the autotuner skips them.
    return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
            for block_n in (16, 32) for warps in (8, 16) for stages in (1, 2)]


@triton.autotune(configs=_configs(), key=["rows_per_split", "BLOCK_D", "BLOCK_HQ"])
@triton.jit
def _absorbed_kernel(
    x_ptr, queries_ptr, key_bias_ptr, y_ptr, max_ptr, sum_ptr,
    B, N, D, HQ, rows_per_split, num_splits,
    stride_xb, stride_xn, stride_xd,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)

    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    mask_d = offs_d < D
    mask_hq = offs_hq < HQ
    # The absorbed queries, read as [D, H*Q] (small, stays in cache across the loop).
    queries_ptrs = queries_ptr + offs_hq[None, :] * D + offs_d[:, None]
    queries_mask = mask_d[:, None] & mask_hq[None, :]
    x_image = x_ptr + image * stride_xb

    running_max = tl.full([BLOCK_HQ], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_HQ], tl.float32)
    acc = tl.zeros([BLOCK_HQ, BLOCK_D], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < end
        x = tl.load(x_image + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        # LayerNorm without gamma/beta (folded into the cached weights).
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        xhat = (centered * rstd[:, None]).to(queries_ptr.dtype.element_ty)

        queries = tl.load(queries_ptrs, mask=queries_mask, other=0.0)
        key_bias = tl.load(key_bias_ptr + offs_n[:, None] * HQ + offs_hq[None, :],
                           mask=mask_n[:, None] & mask_hq[None, :], other=0.0)
        scores = tl.dot(xhat, queries, input_precision=DOT_PRECISION) + key_bias  # [BLOCK_N, BLOCK_HQ]
        scores = tl.where(mask_n[:, None], scores, float("-inf"))

        # Online softmax over n, one column per (head, query).
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[None, :])
        running_sum = running_sum * rescale + tl.sum(probs, axis=0)
        acc = acc * rescale[:, None] + tl.dot(tl.trans(probs.to(xhat.dtype)), xhat,
                                              input_precision=DOT_PRECISION)
        running_max = new_max

    # Head-major workspace [H*Q, B, splits, D]: the value projection after is one batched GEMM.
    row = (offs_hq * B + image) * num_splits + split
    tl.store(y_ptr + row[:, None] * D + offs_d[None, :], acc / running_sum[:, None],
             mask=mask_hq[:, None] & mask_d[None, :])
    tl.store(max_ptr + row, running_max, mask=mask_hq)
    tl.store(sum_ptr + row, running_sum, mask=mask_hq)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Workspace allocation (one place, so tests can poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _absorbed_heads(x, weights, num_heads, num_queries, eps, splits):
    """[B, Q, D] attention output before out_proj, via the absorbed kernel."""
    batch, n, dim = x.shape
    hq = num_heads * num_queries
    if splits is None:
        splits = choose_splits(batch, n, target_programs(x.device))
    rows_per_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, rows_per_split)  # no empty split
    # One split writes the final y directly in x's dtype; partial results stay fp32 for the merge.
    y = _empty((hq, batch, splits, dim), x.dtype if splits == 1 else torch.float32, x.device)
    running_max = _empty((hq, batch, splits), torch.float32, x.device)
    running_sum = _empty((hq, batch, splits), torch.float32, x.device)
    _absorbed_kernel[(batch, splits)](
        x, weights["queries"], weights["key_bias"], y, running_max, running_sum,
        batch, n, dim, hq, rows_per_split, splits,
        x.stride(0), x.stride(1), x.stride(2),
        eps,
        BLOCK_D=triton.next_power_of_2(dim), BLOCK_HQ=max(16, triton.next_power_of_2(hq)),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    if splits == 1:
        y = y[:, :, 0]
    else:  # merge the splits' softmax states
        weight = running_sum * torch.exp2(running_max - running_max.amax(dim=2, keepdim=True))
        y = ((y * weight[..., None]).sum(dim=2) / weight.sum(dim=2)[..., None]).to(x.dtype)
    # [H, Q*B, D] @ [H, D, hd] per head, then back to [B, Q, H*hd].
    heads = torch.baddbmm(weights["value_bias"], y.view(num_heads, num_queries * batch, dim),
                          weights["value_weight"].transpose(1, 2))
    head_dim = dim // num_heads
    return heads.view(num_heads, num_queries, batch, head_dim).permute(2, 1, 0, 3).reshape(batch, num_queries, dim)


def _projected_heads(x, weights, num_heads, num_queries, eps):
    """[B, Q, D] attention output before out_proj, with projected K, V and SDPA."""
    batch, n, dim = x.shape
    head_dim = dim // num_heads
    normed = F.layer_norm(x, (dim,), weights["ln_weight"], weights["ln_bias"], eps)
    keys = F.linear(normed, weights["key_weight"]) + weights["key_bias"]
    values = F.linear(normed, weights["value_weight"], weights["value_bias"])
    queries = weights["queries"].expand(batch, -1, -1, -1)
    heads = F.scaled_dot_product_attention(
        queries,
        keys.view(batch, n, num_heads, head_dim).transpose(1, 2),
        values.view(batch, n, num_heads, head_dim).transpose(1, 2),
    )
    return heads.transpose(1, 2).reshape(batch, num_queries, dim)


def compress_triton(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                    ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads, eps=1e-6, *,
                    form: str | None = None, splits: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Compress x [B, N, D] to [B, C^2, D] with the fused path (no autograd; see ``op.compress``).

    ``form`` forces ``"absorbed"`` or ``"projected"`` (default: ``choose_form``); ``splits`` forces
    how many programs share an image's rows in the absorbed form (default: ``choose_splits``);
    ``out`` is an optional contiguous [B, C^2, D] tensor of x's dtype to write into.
    """
    weights = [query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias]
    check_inputs(x, *weights, num_heads)
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}")
    batch, n, dim = x.shape
    num_queries = query.shape[0]
    if form is None:
        form = choose_form(num_heads, num_queries, dim, x.dtype, x.device)
    if form not in ("absorbed", "projected"):
        raise ValueError(f"form: expected 'absorbed', 'projected' or None, got {form!r}")
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits: expected a positive int or None, got {splits!r}")
    if out is None:
        out = torch.empty((batch, num_queries, dim), dtype=x.dtype, device=x.device)
    elif (list(out.shape) != [batch, num_queries, dim] or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {[batch, num_queries, dim]} "
                         f"on {x.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if batch == 0:
        return out
    derived = derived_weights(form, x.dtype, n, weights, num_heads, eps)
    if form == "absorbed":
        chunk = batch
    else:
        chunk = max(1, PROJECTED_CHUNK_BYTES // (3 * n * dim * x.element_size()))
    for start in range(0, batch, chunk):
        x_chunk, out_chunk = x[start:start + chunk], out[start:start + chunk]
        if form == "absorbed":
            heads = _absorbed_heads(x_chunk, derived, num_heads, num_queries, eps, splits)
        else:
            heads = _projected_heads(x_chunk, derived, num_heads, num_queries, eps)
        torch.addmm(derived["out_proj_bias"], heads.view(-1, dim), derived["out_proj_weight"].t(),
                    out=out_chunk.view(-1, dim))
    return out
