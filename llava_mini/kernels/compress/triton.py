"""Fused query-compression cross-attention (Triton), exact to the reference in ``ref.py``.

Two forms, picked per shape by ``choose_form``:

- ``"absorbed"`` (small H*Q, e.g. C=1 or 2 with 8 heads at D=1024): the queries are parameters,
  so the key projection is folded into them. With ``xhat_n = (x_n - mean_n) * rstd_n``,

      score_hq(n) = A_hq . xhat_n + bias_hq(n)      A_hq = (W_k,h^T q_hq / sqrt(d_h)) * gamma_kv
                                                    bias_hq(n) = (W_k,h^T q_hq / sqrt(d_h)) . PE_k(n)
      y_hq        = sum_n softmax_n(score_hq) xhat_n
      out         = out_proj(W_v,h (y_hq * gamma_kv + beta_kv) + b_v,h)

  (the q.b_k and A.beta_kv terms are constant over n and cancel in the softmax). One kernel pass
  reads x once: LayerNorm statistics, scores, online softmax and the weighted sum of xhat per
  (head, query); a tiny GEMM after. Small batches split N over several programs (split-K style)
  whose partial softmax states are merged after, so that one wave fills the GPU (``choose_splits``).
  The key position term enters as ``bias_hq(n)``: a cached table [N, H*Q] (the resized query table
  projected, plus a folded ``attn_mask``), or, for a 2-D sin-cos key grid, the sum of two small
  tables: PE(i, j) = [s(j) ; s(i)] is separable, so bias(i, j) = col[j] + row[i] with col and row
  [P, H*Q] computed once: any image size (h, w) costs no table traffic per image. Ragged batches
  (per-image lengths, packed rows, a key padding mask) run in the same launch; padding rows are
  never read.
- ``"projected"`` (large H*Q, e.g. C=8 or MiniCPM-V's 64 queries x 28 heads; also where no
  absorbed config fits the GPU, e.g. fp32 on 99 KB GPUs): K and V are projected with matmuls (the
  key position term projected once and cached) and attention runs through SDPA.

Everything that depends only on the weights is computed once and cached (see ``derived_weights``).
The autotune configs (``HALF_CONFIGS``, ``FP32_CONFIGS``) and the dispatch rule's budgets are data
at the top; the configs are pruned per GPU by the compiled-size rule ``shared_memory_bytes``, which
the ahead-of-time check (``llava_mini/kernels/compress/aot.py``) holds to real compiles.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_mini.kernels.compress.ref import (KEY_POS_MODES, image_layout, key_pos_embed, score_mask, side_of,
                                             sincos_1d, to_dense)
from llava_mini.kernels.gpus import device_limits, max_registers_per_thread

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# --- The absorbed kernel's autotune configs ---------------------------------------------------
def _configs(tiles):
    return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages) for block_n, warps, stages in tiles]


# (BLOCK_N, warps, stages). The x tile and the accumulator both hold [*, D] fp32 rows: 8-16 warps
# spread them over enough registers; configs whose register tile does not fit a thread are dropped
# per shape (``register_tile_fits``), those whose shared memory does not fit the GPU per device
# (``shared_memory_bytes``). What each compiles to on sm_80/86/89/90 at the product shapes:
# bench/results/kernel_resources.md (python -m llava_mini.kernels.aot).
HALF_CONFIGS = _configs([(16, 8, 1), (16, 8, 2), (16, 16, 1), (16, 16, 2), (32, 8, 1), (32, 8, 2)])
# fp32 runs its dots in full precision on the FMA units: at BLOCK_N=32 ptxas collapses the kernel to
# 32 registers with ~21 KB of spills per thread (8 warps) or spills ~350 B (16 warps); 16 rows only.
FP32_CONFIGS = _configs([(16, 8, 1), (16, 8, 2), (16, 16, 1), (16, 16, 2)])
# Under the interpreter autotuning is pointless: one config.
INTERPRETER_CONFIGS = _configs([(16, 4, 1)])


def configs_for(dtype: torch.dtype) -> list:
    """The absorbed kernel's autotune configs for x of ``dtype`` on a GPU."""
    return FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS


# --- The dispatch rule's budgets (choose_form, the config pruning, choose_splits) -------------
# Registers a thread keeps free of the register tile (addresses, masks, softmax state, LayerNorm
# statistics): with less, ptxas spills. Read off its reports at D=1024: fp16/bf16, 192 tile values
# at 8 warps compile to 247-255 registers without spills, 256 spill 300-540 B; at 16 warps 64 values
# fit in 120-128 registers, 96 spill 60-140 B. fp32's FMA dots need more: 128 values at 8 warps
# compile to 189-197 registers and 64 at 16 warps to 105-121, but 192 at 8 warps collapse the kernel
# (32 registers, ~32 KB of spills per thread).
REGISTER_HEADROOM = 48
FP32_REGISTER_HEADROOM = 64
# Programs resident on one SM: every config the dispatch keeps at the product shapes needs more than
# 128 registers per thread at 8 warps (189-255) or more than 64 at 16 warps (105-128), so the 64K
# register file holds one program (the ahead-of-time check asserts it for each kept config; see
# the table's "programs / SM"). Splitting an image therefore fills one wave of one program per SM.
RESIDENT_PROGRAMS_PER_SM = 1
# Rows a split of an image covers at least, and a multiple of (the smallest BLOCK_N: no split ends
# in a partial tile; Triton also compiles one variant, "divisible by 16", for every split size).
SPLIT_ROWS = 16
MIN_ROWS_PER_SPLIT = 32
# The projected form materialises LN(x), K and V; it runs over batch chunks of at most this many bytes.
PROJECTED_CHUNK_BYTES = 2 << 30
# Sin-cos key tables cover positions [0, P), P rounded up to a multiple of this (fewer rebuilds).
SINCOS_POSITIONS_STEP = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_sizes(hq: int, dim: int) -> tuple[int, int]:
    """(BLOCK_HQ, BLOCK_D): the kernel's score columns and channels, padded to powers of 2
    (``tl.arange``), the columns to at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(hq)), triton.next_power_of_2(dim)


def shared_memory_bytes(config: triton.Config, block_hq: int, block_d: int, dtype: torch.dtype,
                        key_grid: bool = False) -> int:
    """Shared memory the compiled absorbed kernel uses: the rule configs are pruned by before any compile.

    How Triton lays the kernel out (read off its compiles for sm_80-sm_90, the same on each):
    - the normalised x tile [BLOCK_N, BLOCK_D] and the absorbed queries [BLOCK_D, BLOCK_HQ] are the
      two dots' operands, staged in shared memory in x's dtype (one copy of the x tile serves both dots);
    - the software pipeline loads ``num_stages - 1`` x tiles ahead (and the two sin-cos gathers
      [BLOCK_N, BLOCK_HQ] fp32 with ``KEY_GRID``; a key table or a padding mask adds nothing);
    - the score tile's layout conversions take up to 4 B (8 B for fp32's FMA dots) per score.
    Exact at the product shapes for fp16/bf16, an upper bound within 2 KB for fp32. The
    ahead-of-time check (``python -m llava_mini.kernels.aot``) holds the rule to real compiles on
    sm_80/86/89/90: every config it keeps fits, every config it drops does not.
    """
    block_n, stages = config.kwargs["BLOCK_N"], config.num_stages
    size = dtype.itemsize
    operands = (block_n + block_hq) * block_d * size
    in_flight = (stages - 1) * block_n * block_d * size
    if key_grid:
        in_flight += (stages - 1) * block_n * block_hq * 4
    scratch = block_n * block_hq * (8 if dtype == torch.float32 else 4)
    return operands + in_flight + scratch


def register_tile_fits(config: triton.Config, block_hq: int, block_d: int, dtype: torch.dtype) -> bool:
    """Whether the fp32 values a thread holds across the key loop (its share of the [BLOCK_HQ, BLOCK_D]
    accumulator and the [BLOCK_N, BLOCK_D] x tile) leave ``REGISTER_HEADROOM`` of its registers free
    (``FP32_REGISTER_HEADROOM`` for fp32 x)."""
    threads = 32 * config.num_warps
    values = (block_hq + config.kwargs["BLOCK_N"]) * block_d // threads
    headroom = FP32_REGISTER_HEADROOM if dtype == torch.float32 else REGISTER_HEADROOM
    return values <= max_registers_per_thread(threads) - headroom


def absorbed_configs(dtype: torch.dtype, block_hq: int, block_d: int, key_grid: bool = False,
                     shared_limit: int | None = None) -> list:
    """The configs of ``dtype`` whose register tile fits a thread and, given ``shared_limit`` (bytes
    one program may use), whose shared memory fits it."""
    return [c for c in configs_for(dtype) if register_tile_fits(c, block_hq, block_d, dtype)
            and (shared_limit is None or shared_memory_bytes(c, block_hq, block_d, dtype, key_grid) <= shared_limit)]


def select_configs(dtype: torch.dtype, block_hq: int, block_d: int, key_grid: bool, capability: int,
                   shared_limit: int) -> list:
    """The configs the autotuner may try on a GPU of ``capability`` allowing ``shared_limit`` bytes per
    program; a ValueError naming the arch, dtype and what to use instead when none fits."""
    kept = absorbed_configs(dtype, block_hq, block_d, key_grid, shared_limit)
    if kept:
        return kept
    in_registers = absorbed_configs(dtype, block_hq, block_d, key_grid)
    name = str(dtype).removeprefix("torch.")
    if not in_registers:
        why = f"its [{block_hq}, {block_d}] accumulator does not fit one program's registers"
    else:
        need = min(shared_memory_bytes(c, block_hq, block_d, dtype, key_grid) for c in in_registers)
        why = f"the smallest config needs {need} B of shared memory, sm_{capability} allows {shared_limit} B per program"
    instead = "form='projected' (what form=None picks here)"
    half_fits = absorbed_configs(torch.bfloat16, block_hq, block_d, key_grid, shared_limit)
    if dtype == torch.float32 and half_fits:
        instead += " or bfloat16/float16 inputs"
    raise ValueError(f"form: the absorbed kernel cannot run {name} x with H*Q padded to {block_hq} and D to "
                     f"{block_d} on sm_{capability}: {why}; use {instead}")


def choose_form(num_heads: int, num_queries: int, dim: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu") -> str:
    """``"absorbed"`` or ``"projected"`` for these shapes on ``device``.

    Absorbed while one of the absorbed kernel's configs for ``dtype`` keeps its register tile in a
    thread's registers (D=1024: H*Q <= 32, i.e. C=1 or 2 at 8 heads) and, on a GPU, fits its shared
    memory (``shared_memory_bytes``): at D=1024 fp16/bf16 fit every GPU since sm_80 for C=1 and 2;
    fp32 fits A100 and H100 for C=1 and runs projected on 99 KB GPUs (RTX 3090/4090) and for C=2
    (its FMA dots need more registers).
    Off CUDA (the interpreter) the register rule alone decides. The key position mode does not
    change the answer: the sin-cos gathers only add to configs with more than one stage.
    """
    limits = device_limits(torch.device(device))
    return choose_form_for(num_heads, num_queries, dim, dtype, limits[1] if limits is not None else None)


def choose_form_for(num_heads: int, num_queries: int, dim: int, dtype: torch.dtype, shared_limit: int | None) -> str:
    """``choose_form`` for a GPU allowing ``shared_limit`` bytes of shared memory per program (None: no limit)."""
    block_hq, block_d = block_sizes(num_heads * num_queries, dim)
    return "absorbed" if absorbed_configs(dtype, block_hq, block_d, shared_limit=shared_limit) else "projected"


def choose_splits(batch: int, n: int, slots: int) -> int:
    """How many programs share one image's ``n`` rows, given ``slots`` programs the GPU runs at once.

    A small batch leaves SMs idle: split each image over as many programs as fill one wave
    (``batch * splits <= slots``), each covering at least ``MIN_ROWS_PER_SPLIT`` rows. Never more: a
    second, partial wave would make the last programs a tail, and each split adds partial results
    to write and merge. A batch that fills the GPU runs one program per image.
    """
    if batch >= slots:
        return 1
    return max(1, min(slots // batch, triton.cdiv(n, MIN_ROWS_PER_SPLIT)))


def split_rows(n: int, splits: int) -> int:
    """Rows per split: ``n / splits`` rounded up to a multiple of ``SPLIT_ROWS``."""
    return triton.cdiv(triton.cdiv(n, splits), SPLIT_ROWS) * SPLIT_ROWS


def wave_slots(device: torch.device) -> int:
    """Programs the device runs at once: its SMs times ``RESIDENT_PROGRAMS_PER_SM`` on CUDA; one (no
    splitting) under the interpreter."""
    if device.type == "cuda":
        return RESIDENT_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---------------------------------------------------------------------------------------------
# Input checks. ``check_inputs`` looks at shapes, dtypes and devices only (so torch.compile traces
# through it); ``Layout`` reads the per-image sizes (grid_sizes, cu_seqlens) and checks their values.
# ---------------------------------------------------------------------------------------------

def check_inputs(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                 ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads, *, query_pos=True, key_pos="resize",
                 grid_sizes=None, cu_seqlens=None, key_padding_mask=None, attn_mask=None,
                 dtypes=SUPPORTED_DTYPES) -> None:
    """Raise a ValueError/TypeError naming the first argument that does not fit."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    packed = cu_seqlens is not None
    if x.dim() != (2 if packed else 3):
        raise ValueError(f"x: expected shape {'[T, D] (packed, with cu_seqlens)' if packed else '[B, N, D]'}, "
                         f"got {list(x.shape)}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"x: expected {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")
    dim = x.shape[-1]
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of D={dim}, got {num_heads!r}")
    if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[1] != dim:
        raise ValueError(f"query: expected shape [Q, {dim}], got {_shape(query)}")
    num_queries = query.shape[0]
    if key_pos not in KEY_POS_MODES:
        raise ValueError(f"key_pos: expected one of {KEY_POS_MODES}, got {key_pos!r}")
    needs_table = query_pos or key_pos == "resize"
    expected = {
        "query": (query, [num_queries, dim]),
        "in_proj_weight": (in_proj_weight, [3 * dim, dim]),
        "in_proj_bias": (in_proj_bias, [3 * dim]),
        "out_proj_weight": (out_proj_weight, [dim, dim]),
        "out_proj_bias": (out_proj_bias, [dim]),
        "ln_q_weight": (ln_q_weight, [dim]),
        "ln_q_bias": (ln_q_bias, [dim]),
        "ln_kv_weight": (ln_kv_weight, [dim]),
        "ln_kv_bias": (ln_kv_bias, [dim]),
    }
    if needs_table:
        if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 2:
            raise ValueError(f"pos_embed: expected a [S*S, {dim}] position table (query_pos={query_pos}, "
                             f"key_pos={key_pos!r}), got {_shape(pos_embed)}")
        side_of(pos_embed.shape[0], "pos_embed")
        expected["pos_embed"] = (pos_embed, [num_queries if query_pos else pos_embed.shape[0], dim])
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (D={dim} from x), got {_shape(tensor)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {tensor.device}")
    if key_pos == "sincos" and dim % 4:
        raise ValueError(f"key_pos: the 2-D sin-cos key table needs D a multiple of 4, got D={dim}")
    for name, tensor, shape in (("grid_sizes", grid_sizes, "[B, 2] (h, w) per image"),
                                ("cu_seqlens", cu_seqlens, "[B+1] row offsets"),
                                ("key_padding_mask", key_padding_mask, "[B, N] bool"),
                                ("attn_mask", attn_mask, "[Q, N] or [B*H, Q, N]")):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor {shape}, got {type(tensor).__name__}")
    if grid_sizes is not None and (grid_sizes.dim() != 2 or grid_sizes.shape[1] != 2 or grid_sizes.is_floating_point()):
        raise ValueError(f"grid_sizes: expected an integer tensor [B, 2] of (h, w) per image, got "
                         f"{grid_sizes.dtype} {list(grid_sizes.shape)}")
    if packed:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens: expected an integer tensor [B+1], got {cu_seqlens.dtype} {list(cu_seqlens.shape)}")
        for name, tensor in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if tensor is not None:
                raise ValueError(f"{name}: not supported with packed x (cu_seqlens); pass x padded as [B, N, D]")
    batch = cu_seqlens.shape[0] - 1 if packed else x.shape[0]
    if grid_sizes is not None and grid_sizes.shape[0] != batch:
        raise ValueError(f"grid_sizes: expected one (h, w) per image ({batch}), got {grid_sizes.shape[0]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or list(key_padding_mask.shape) != [batch, x.shape[1]]):
        raise ValueError(f"key_padding_mask: expected a bool tensor {[batch, x.shape[1]]} (True = ignore), got "
                         f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}")
    if attn_mask is not None:
        shapes = ([num_queries, x.shape[1]], [batch * num_heads, num_queries, x.shape[1]])
        if list(attn_mask.shape) not in shapes:
            raise ValueError(f"attn_mask: expected shape {shapes[0]} or {shapes[1]} (nn.MultiheadAttention's), got "
                             f"{list(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected bool (True = not allowed) or float (added to the scores), got "
                            f"{attn_mask.dtype}")


def check_kernel_device(x) -> None:
    """The kernels run on CUDA tensors, or anywhere under the interpreter; meta tensors run everything
    but the kernels (the ahead-of-time check records the launches)."""
    if x.device.type not in ("cuda", "meta") and not interpreting():
        raise ValueError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}")


def _shape(tensor) -> object:
    return list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__


@dataclass
class Layout:
    """The batch's per-image sizes, read once on the host.

    ``lengths``: tokens per image (None: every image has all N rows); ``grids``: each image's (h, w)
    key grid (None when no key position term); ``starts``: first row of each image in packed x.
    """

    batch: int
    rows: int
    lengths: list[int] | None
    grids: list[tuple[int, int]] | None
    starts: list[int] | None

    @classmethod
    def of(cls, x, key_pos, grid_sizes, cu_seqlens) -> "Layout":
        lengths, grids = image_layout(x, grid_sizes, cu_seqlens, need_grids=key_pos != "none")
        if any(n < 1 for n in lengths):
            raise ValueError(f"{'cu_seqlens' if cu_seqlens is not None else 'grid_sizes'}: every image needs at least "
                             f"one token, got per-image counts {lengths}")
        if cu_seqlens is not None:
            starts = cu_seqlens.cpu().tolist()
            if starts[0] != 0 or starts[-1] != x.shape[0]:
                raise ValueError(f"cu_seqlens: expected offsets from 0 to T={x.shape[0]}, got {starts[0]} .. {starts[-1]}")
            return cls(len(lengths), max(lengths, default=0), lengths, grids, starts[:-1])
        if max(lengths, default=0) > x.shape[1]:
            raise ValueError(f"grid_sizes: an image has {max(lengths)} tokens (h*w) but x holds {x.shape[1]} per image")
        full = all(n == x.shape[1] for n in lengths)
        return cls(x.shape[0], x.shape[1], None if full else lengths, grids, None)

    def key_extent(self, key_pos: str):
        """What the cached key tables depend on: the one resize grid, or the sin-cos positions P."""
        if key_pos == "resize":
            if len(set(self.grids)) > 1:
                raise ValueError(f"grid_sizes: key_pos='resize' resizes one table for the batch; got different grids "
                                 f"{sorted(set(self.grids))} (run them in separate calls)")
            return self.grids[0] if self.grids else None
        if key_pos == "sincos":
            needed = max((max(h, w) for h, w in self.grids), default=1)
            return triton.cdiv(needed, SINCOS_POSITIONS_STEP) * SINCOS_POSITIONS_STEP
        return None


# ---------------------------------------------------------------------------------------------
# Weight-derived tensors, cached per (weights, their versions, dtype, device, form, key position).
# In-place edits (optimizer steps, load_state_dict, `with no_grad(): w.copy_(...)`) bump a tensor's
# `_version` and so refresh the entry; edits through `.data` bypass the version counter: call
# `clear_cache()` after those.
# ---------------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, tuple[list, dict]] = OrderedDict()
_CACHE_ENTRIES = 8


def clear_cache() -> None:
    """Drop every cached weight-derived tensor."""
    _CACHE.clear()


def derived_weights(form: str, dtype: torch.dtype, weights: list, num_heads: int, eps: float, query_pos: bool,
                    key_pos: str, key_extent) -> dict:
    """The cached weight-derived tensors of ``form`` for inputs of ``dtype``.

    ``weights`` is the op's weight list (``pos_embed`` may be None); ``key_extent`` is
    ``Layout.key_extent(key_pos)``.
    """
    present = [w for w in weights if w is not None]
    key = ((form, dtype, num_heads, eps, query_pos, key_pos, key_extent)
           + tuple((id(w), w.data_ptr(), w._version) if w is not None else None for w in weights))
    entry = _CACHE.get(key)
    # id() and data_ptr() can be reused after a tensor dies: the weak references tell.
    if entry is not None and all(ref() is w for ref, w in zip(entry[0], present)):
        _CACHE.move_to_end(key)
        return entry[1]
    with torch.no_grad():
        derived = derive_weights(form, dtype, *weights, num_heads=num_heads, eps=eps, query_pos=query_pos,
                                 key_pos=key_pos, key_extent=key_extent)
    _CACHE[key] = ([weakref.ref(w) for w in present], derived)
    if len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return derived


def derive_weights(form, dtype, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                   ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, *, num_heads, eps, query_pos, key_pos,
                   key_extent):
    """Everything that depends only on the weights, in fp32 math, stored in ``dtype`` (or fp32 for
    the score biases). Differentiable: the backward runs it under autograd to carry the gradients of
    these tensors back to the weights (``derived_weights`` caches it under no_grad for the forward)."""
    num_queries, dim = query.shape
    head_dim = dim // num_heads
    q_in = F.layer_norm(query.float(), (dim,), ln_q_weight.float(), ln_q_bias.float(), eps)
    if query_pos:
        q_in = q_in + pos_embed.float()
    w_q, w_k, w_v = in_proj_weight.float().chunk(3)
    b_q, b_k, b_v = in_proj_bias.float().chunk(3)
    q = F.linear(q_in, w_q, b_q).view(num_queries, num_heads, head_dim).transpose(0, 1)  # [H, Q, hd]
    gamma, beta = ln_kv_weight.float(), ln_kv_bias.float()
    out = {"out_proj_weight": out_proj_weight.to(dtype), "out_proj_bias": out_proj_bias.to(dtype)}
    if form == "absorbed":
        # Scores in base 2 (the kernel uses exp2): fold log2(e) / sqrt(hd) into the queries.
        absorbed = torch.einsum("hqe,hed->hqd", q, w_k.view(num_heads, head_dim, dim))
        absorbed = absorbed.reshape(num_heads * num_queries, dim) * (LOG2E / math.sqrt(head_dim))
        out["queries"] = (absorbed * gamma).to(dtype).contiguous()  # [H*Q, D], h-major
        key_projection = absorbed  # position -> score bias, [H*Q, D]
        # The values are y * gamma + beta (sum of softmax weights = 1): fold gamma, beta into W_v, b_v.
        out["value_weight"] = (w_v * gamma).to(dtype).view(num_heads, head_dim, dim)
        out["value_bias"] = (w_v @ beta + b_v).to(dtype).view(num_heads, 1, head_dim)
    else:
        out["queries"] = q.to(dtype).contiguous()  # [H, Q, hd]
        out["ln_weight"], out["ln_bias"] = ln_kv_weight.to(dtype), ln_kv_bias.to(dtype)
        out["key_weight"], out["value_weight"] = w_k.to(dtype), w_v.to(dtype)
        out["key_bias"], out["value_bias"] = b_k.to(dtype), b_v.to(dtype)
        key_projection = w_k  # position -> key, [D, D]
    device = query.device
    if key_pos == "resize" and key_extent is not None:
        table = key_pos_embed(pos_embed, key_extent).float()  # [h*w, D]
        out["key_table"] = (table @ key_projection.T).contiguous()  # [h*w, H*Q] score bias / [h*w, D] keys
    elif key_pos == "sincos":
        sincos = sincos_1d(dim // 2, key_extent).to(device)  # [P, D/2]; PE(i, j) = [s(j) ; s(i)]
        columns, rows = key_projection[:, :dim // 2], key_projection[:, dim // 2:]
        out["key_grid"] = torch.stack([sincos @ columns.T, sincos @ rows.T]).contiguous()  # [2, P, H*Q or D]
    return out


# ---------------------------------------------------------------------------------------------
# The absorbed kernel: one program per (image, split of its rows).
# ---------------------------------------------------------------------------------------------

# The batch and split counts only index the small result rows: no specialisation (one binary for
# every batch size; rows_per_split is always a multiple of 16).
@triton.jit(do_not_specialize=["B", "num_splits"])
def _absorbed_kernel(
    x_ptr, queries_ptr, key_table_ptr, key_grid_ptr, starts_ptr, lengths_ptr, widths_ptr, mask_ptr,
    y_ptr, max_ptr, sum_ptr,
    B, N, D, HQ, rows_per_split, num_splits, grid_positions,
    stride_xb, stride_xn, stride_xd, stride_tb, stride_mb,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
    VARLEN: tl.constexpr, KEY_TABLE: tl.constexpr, KEY_GRID: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    x_image = x_ptr + image * stride_xb
    length = N
    if VARLEN:  # this image's rows: [first_row, first_row + length) of x[image] (packed: of x)
        x_image += tl.load(starts_ptr + image) * stride_xn
        length = tl.load(lengths_ptr + image).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, length)
    if KEY_GRID:
        width = tl.load(widths_ptr + image).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    mask_d = offs_d < D
    mask_hq = offs_hq < HQ
    # The absorbed queries, read as [D, H*Q] (small, stays in cache across the loop).
    queries_ptrs = queries_ptr + offs_hq[None, :] * D + offs_d[:, None]
    queries_mask = mask_d[:, None] & mask_hq[None, :]

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
        scores = tl.dot(xhat, queries, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_HQ]
        tile_mask = mask_n[:, None] & mask_hq[None, :]
        if KEY_TABLE:  # the key position term per token position (and a folded attn_mask)
            scores += tl.load(key_table_ptr + image * stride_tb + offs_n[:, None] * HQ + offs_hq[None, :],
                              mask=tile_mask, other=0.0)
        if KEY_GRID:  # 2-D sin-cos keys: bias(i, j) = col[j] + row[i]
            col = offs_n % width
            row = offs_n // width
            scores += tl.load(key_grid_ptr + col[:, None] * HQ + offs_hq[None, :], mask=tile_mask, other=0.0)
            scores += tl.load(key_grid_ptr + (grid_positions + row)[:, None] * HQ + offs_hq[None, :],
                              mask=tile_mask, other=0.0)
        valid = mask_n
        if HAS_MASK:  # key padding mask: nonzero = ignore
            valid = valid & (tl.load(mask_ptr + image * stride_mb + offs_n, mask=mask_n, other=1) == 0)
        scores = tl.where(valid[:, None], scores, float("-inf"))

        # Online softmax over n, one column per (head, query); a column that has seen only masked
        # keys keeps max -inf, so shift by 0 there (exp2(-inf - -inf) would be NaN).
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(running_max - shift)
        probs = tl.exp2(scores - shift[None, :])
        running_sum = running_sum * rescale + tl.sum(probs, axis=0)
        acc = acc * rescale[:, None] + tl.dot(tl.trans(probs.to(xhat.dtype)), xhat,
                                              input_precision=DOT_PRECISION)
        running_max = new_max

    # Head-major workspace [H*Q, B, splits, D]: the value projection after is one batched GEMM.
    # A split that saw no valid key writes 0 (its merge weight is 0); an image with no valid key at
    # all gives 0/0 = NaN, as nn.MultiheadAttention does.
    row_index = (offs_hq * B + image) * num_splits + split
    denominator = tl.where((running_sum > 0) | (num_splits == 1), running_sum, 1.0)
    tl.store(y_ptr + row_index[:, None] * D + offs_d[None, :], acc / denominator[:, None],
             mask=mask_hq[:, None] & mask_d[None, :])
    tl.store(max_ptr + row_index, running_max, mask=mask_hq)
    tl.store(sum_ptr + row_index, running_sum, mask=mask_hq)


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: drop the configs that cannot fit this GPU before any compile."""
    x = named_args["x_ptr"]
    limits = device_limits(x.device)
    if limits is None:
        return configs
    kept = select_configs(x.dtype, kwargs["BLOCK_HQ"], kwargs["BLOCK_D"], kwargs["KEY_GRID"], *limits)
    return [c for c in configs if c in kept]


_AUTOTUNE_KEY = ["rows_per_split", "BLOCK_D", "BLOCK_HQ", "VARLEN", "KEY_TABLE", "KEY_GRID", "HAS_MASK"]
_half_kernel, _fp32_kernel = (
    triton.autotune(INTERPRETER_CONFIGS if interpreting() else configs, key=_AUTOTUNE_KEY,
                    prune_configs_by={"early_config_prune": _prune_configs})(_absorbed_kernel)
    for configs in (HALF_CONFIGS, FP32_CONFIGS))


def autotuned_kernel(dtype: torch.dtype):
    """The autotuned absorbed kernel the launcher runs for x of ``dtype`` (its configs: ``configs_for``)."""
    return _fp32_kernel if dtype == torch.float32 else _half_kernel


def _empty(shape, dtype, device) -> torch.Tensor:
    """Workspace allocation (one place, so tests can poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class ScoreInputs:
    """What the absorbed kernel adds to or masks in the scores, for one launch."""

    key_table: torch.Tensor | None = None  # [N, H*Q] or [B, N, H*Q] fp32 (base-2 scores)
    key_grid: torch.Tensor | None = None  # [2, P, H*Q] fp32
    widths: torch.Tensor | None = None  # [B] int32
    mask: torch.Tensor | None = None  # [B, N] uint8, nonzero = ignore


def _attn_mask_bias(attn_mask: torch.Tensor, batch: int, num_heads: int, num_queries: int, rows: int) -> torch.Tensor:
    """nn.MultiheadAttention's attn_mask as base-2 score biases [1 or B, rows, H*Q] (fp32)."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device).masked_fill(attn_mask, float("-inf"))
    else:
        bias = attn_mask.float() * LOG2E
    if bias.dim() == 2:  # [Q, N]: the same for every head and image
        return bias.t()[None, :, None, :].expand(1, rows, num_heads, num_queries).reshape(1, rows, num_heads * num_queries)
    return bias.view(batch, num_heads, num_queries, rows).permute(0, 3, 1, 2).reshape(batch, rows, num_heads * num_queries)


def score_tables(derived, layout: Layout, rows: int, attn_mask, num_heads, num_queries):
    """(key_table, key_grid): what the absorbed kernel adds to the scores, from the weight-derived
    tensors, with a given ``attn_mask`` folded into the key table; differentiable."""
    key_table, key_grid = derived.get("key_table"), derived.get("key_grid")
    if attn_mask is not None:
        extra = _attn_mask_bias(attn_mask, layout.batch, num_heads, num_queries, rows)
        if key_table is not None:
            extra = extra + F.pad(key_table, (0, 0, 0, rows - key_table.shape[0]))
        key_table = extra.contiguous()
    return key_table, key_grid


def score_inputs(layout: Layout, key_table, key_grid, key_padding_mask, device) -> ScoreInputs:
    """The absorbed kernels' score inputs for one launch (the tables, the grids' widths, the mask)."""
    inputs = ScoreInputs(key_table=key_table, key_grid=key_grid)
    if key_grid is not None:
        inputs.widths = torch.tensor([w for _, w in layout.grids], dtype=torch.int32, device=device)
    if key_padding_mask is not None:
        inputs.mask = key_padding_mask.to(torch.uint8).contiguous()
    return inputs


def _score_inputs(derived, layout: Layout, rows: int, key_padding_mask, attn_mask, num_heads, num_queries,
                  device) -> ScoreInputs:
    return score_inputs(layout, *score_tables(derived, layout, rows, attn_mask, num_heads, num_queries),
                        key_padding_mask, device)


def launch_layout(x, layout: Layout) -> tuple:
    """(starts, lengths, VARLEN, (stride_b, stride_n, stride_d)) the absorbed kernels take for x."""
    varlen = layout.lengths is not None
    if varlen:
        lengths = torch.tensor(layout.lengths, dtype=torch.int32, device=x.device)
        starts = torch.tensor(layout.starts or [0] * layout.batch, dtype=torch.int64, device=x.device)
    else:
        lengths = starts = x  # unused (a valid pointer)
    return starts, lengths, varlen, row_strides(x)


def row_strides(t) -> tuple[int, int, int]:
    """(image, row, channel) strides of dense [B, N, D] or packed [T, D] (image stride 0) rows."""
    return (0, *t.stride()) if t.dim() == 2 else t.stride()


def key_table_stride(key_table, hq: int) -> int:
    """The per-image stride of a key table: 0 when one table serves every image."""
    return key_table.shape[1] * hq if key_table is not None and key_table.dim() == 3 and key_table.shape[0] > 1 else 0


def absorbed_splits(x, layout: Layout, splits: int | None) -> tuple[int, int]:
    """(splits, rows_per_split) of the absorbed kernels for this batch (``splits`` None: fill one wave)."""
    if splits is None:
        splits = choose_splits(layout.batch, layout.rows, wave_slots(x.device))
    rows_per_split = split_rows(layout.rows, splits)
    return triton.cdiv(layout.rows, rows_per_split), rows_per_split  # no split starts beyond the longest image


def absorbed_attention(x, queries, layout: Layout, scores: ScoreInputs, eps, splits=None):
    """The absorbed kernel's softmax-weighted sum of the normalised rows, y [H*Q, B, D] in x's dtype,
    and each (head, query, image)'s log-sum-exp of its base-2 scores, lse [H*Q, B] fp32, for the
    absorbed queries [H*Q, D]."""
    dim = x.shape[-1]
    batch = layout.batch
    hq = queries.shape[0]
    splits, rows_per_split = absorbed_splits(x, layout, splits)
    # One split writes the final y directly in x's dtype; partial results stay fp32 for the merge.
    y = _empty((hq, batch, splits, dim), x.dtype if splits == 1 else torch.float32, x.device)
    running_max = _empty((hq, batch, splits), torch.float32, x.device)
    running_sum = _empty((hq, batch, splits), torch.float32, x.device)
    starts, lengths, varlen, (stride_xb, stride_xn, stride_xd) = launch_layout(x, layout)
    key_table = scores.key_table
    block_hq, block_d = block_sizes(hq, dim)
    autotuned_kernel(x.dtype)[(batch, splits)](
        x, queries,
        key_table if key_table is not None else x, scores.key_grid if scores.key_grid is not None else x,
        starts, lengths, scores.widths if scores.widths is not None else x, scores.mask if scores.mask is not None else x,
        y, running_max, running_sum,
        batch, layout.rows, dim, hq, rows_per_split, splits,
        scores.key_grid.shape[1] if scores.key_grid is not None else 0,
        stride_xb, stride_xn, stride_xd, key_table_stride(key_table, hq),
        scores.mask.stride(0) if scores.mask is not None else 0,
        eps,
        BLOCK_D=block_d, BLOCK_HQ=block_hq,
        VARLEN=varlen, KEY_TABLE=key_table is not None, KEY_GRID=scores.key_grid is not None,
        HAS_MASK=scores.mask is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    peak = running_max.amax(dim=2)
    if splits == 1:
        y, total = y[:, :, 0], running_sum[:, :, 0]
    else:  # merge the splits' softmax states; a split that saw no valid key has weight 0
        weight = running_sum * torch.exp2(running_max - peak[..., None])
        total = weight.sum(dim=2)
        y = ((y * weight[..., None]).sum(dim=2) / total[..., None]).to(x.dtype)
    return y, peak + torch.log2(total)


def value_projection(y, weights, num_heads: int, num_queries: int):
    """The heads' values out of y [H*Q, B, D]: [B, Q, D] (before out_proj); differentiable."""
    batch, dim = y.shape[1], y.shape[2]
    # [H, Q*B, D] @ [H, D, hd] per head, then back to [B, Q, H*hd].
    heads = torch.baddbmm(weights["value_bias"], y.reshape(num_heads, num_queries * batch, dim),
                          weights["value_weight"].transpose(1, 2))
    head_dim = dim // num_heads
    return heads.view(num_heads, num_queries, batch, head_dim).permute(2, 1, 0, 3).reshape(batch, num_queries, dim)


def _absorbed_heads(x, weights, layout: Layout, scores: ScoreInputs, num_heads, num_queries, eps, splits):
    """[B, Q, D] attention output before out_proj, via the absorbed kernel (x dense or packed)."""
    y, _ = absorbed_attention(x, weights["queries"], layout, scores, eps, splits)
    return value_projection(y, weights, num_heads, num_queries)


def _projected_keys_position(weights, layout: Layout, first: int, count: int, rows: int, dtype, device):
    """The key position term of images [first, first + count), projected: [count, rows, D] or [rows, D]."""
    if "key_table" in weights:
        table = weights["key_table"]
        return F.pad(table, (0, 0, 0, rows - table.shape[0])).to(dtype)
    if "key_grid" in weights:
        columns, rows_table = weights["key_grid"]
        index = torch.arange(rows, device=device)
        out = []
        for height, width in layout.grids[first:first + count]:
            col, row = index % width, (index // width).clamp(max=height - 1)  # padding rows: any valid row
            out.append(columns[col] + rows_table[row])
        return torch.stack(out).to(dtype)
    return None


def projected_heads(x, weights, layout: Layout, first: int, key_padding_mask, attn_mask, num_heads, num_queries, eps):
    """[B, Q, D] attention output before out_proj for dense x (a chunk of images starting at
    ``first``), with projected K, V and SDPA."""
    batch, rows, dim = x.shape
    head_dim = dim // num_heads
    normed = F.layer_norm(x, (dim,), weights["ln_weight"], weights["ln_bias"], eps)
    keys = F.linear(normed, weights["key_weight"], weights["key_bias"])
    position = _projected_keys_position(weights, layout, first, batch, rows, x.dtype, x.device)
    if position is not None:
        keys = keys + position
    values = F.linear(normed, weights["value_weight"], weights["value_bias"])
    lengths = layout.lengths[first:first + batch] if layout.lengths is not None else [rows] * batch
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(layout.batch, num_heads * num_queries, -1)[first:first + batch]
        attn_mask = attn_mask.reshape(batch * num_heads, num_queries, -1)
    bias = score_mask(batch, rows, lengths, key_padding_mask, attn_mask, num_heads, num_queries, x.dtype, x.device)
    heads = F.scaled_dot_product_attention(
        weights["queries"].expand(batch, -1, -1, -1),
        keys.view(batch, rows, num_heads, head_dim).transpose(1, 2),
        values.view(batch, rows, num_heads, head_dim).transpose(1, 2),
        attn_mask=bias,
    )
    return heads.transpose(1, 2).reshape(batch, num_queries, dim)


def compress_triton(x, query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                    ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias, num_heads, eps=1e-6, *,
                    query_pos: bool = True, key_pos: str = "resize", grid_sizes=None, cu_seqlens=None,
                    key_padding_mask=None, attn_mask=None,
                    form: str | None = None, splits: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Compress each image's tokens to [Q, D] with the fused path (no autograd; see ``op.compress``).

    Same arguments and result as ``compress_ref``. ``form`` forces ``"absorbed"`` or ``"projected"``
    (default: ``choose_form``); ``splits`` forces how many programs share an image's rows in the
    absorbed form (default: ``choose_splits``; each covers a multiple of 16 rows, so fewer may run);
    ``out`` is an optional contiguous [B, Q, D] tensor
    of x's dtype to write into.
    """
    weights = [query, pos_embed, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               ln_q_weight, ln_q_bias, ln_kv_weight, ln_kv_bias]
    options = dict(query_pos=query_pos, key_pos=key_pos, grid_sizes=grid_sizes, cu_seqlens=cu_seqlens,
                   key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    check_inputs(x, *weights, num_heads, **options)
    dim = x.shape[-1]
    num_queries = query.shape[0]
    if form is None:
        form = choose_form(num_heads, num_queries, dim, x.dtype, x.device)
    if form not in ("absorbed", "projected"):
        raise ValueError(f"form: expected 'absorbed', 'projected' or None, got {form!r}")
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits: expected a positive int or None, got {splits!r}")
    layout = Layout.of(x, key_pos, grid_sizes, cu_seqlens)
    batch = layout.batch
    if out is None:
        out = torch.empty((batch, num_queries, dim), dtype=x.dtype, device=x.device)
    elif (list(out.shape) != [batch, num_queries, dim] or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {[batch, num_queries, dim]} "
                         f"on {x.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    check_kernel_device(x)  # after every argument's own check
    if batch == 0:
        return out
    derived = derived_weights(form, x.dtype, weights, num_heads, eps, query_pos, key_pos, layout.key_extent(key_pos))
    if form == "absorbed":
        scores = _score_inputs(derived, layout, layout.rows if x.dim() == 2 else x.shape[1], key_padding_mask,
                               attn_mask, num_heads, num_queries, x.device)
        heads = _absorbed_heads(x, derived, layout, scores, num_heads, num_queries, eps, splits)
        torch.addmm(derived["out_proj_bias"], heads.view(-1, dim), derived["out_proj_weight"].t(), out=out.view(-1, dim))
        return out
    dense = to_dense(x, layout.lengths, cu_seqlens) if cu_seqlens is not None else x
    chunk = max(1, PROJECTED_CHUNK_BYTES // (3 * dense.shape[1] * dim * x.element_size()))
    for first in range(0, batch, chunk):
        mask = key_padding_mask[first:first + chunk] if key_padding_mask is not None else None
        heads = projected_heads(dense[first:first + chunk], derived, layout, first, mask, attn_mask, num_heads,
                                 num_queries, eps)
        torch.addmm(derived["out_proj_bias"], heads.reshape(-1, dim), derived["out_proj_weight"].t(),
                    out=out[first:first + chunk].view(-1, dim))
    return out
