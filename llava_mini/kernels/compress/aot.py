"""What the ahead-of-time compile check (``llava_mini.kernels.aot``) compiles for the compressor.

The absorbed kernel as ``compress_triton`` launches it (recorded on meta tensors, so the launcher's
own layout, strides and constants) for LLaVA-Mini's compressor: D = 1024, 8 heads, over N = 576
tokens (one 336 px image) and 2304 (the HD model's 2 x 2 crops), in each dtype the kernel takes, at
C = 1 (the 1-token model) and C = 2 (4 queries: the largest the absorbed form takes at this width;
the HD model's C = 8 runs the projected form). Two launches per shape: a batch that fills the GPU
(one program per image, the result written in x's dtype) and one image split over several programs
(fp32 partial results). Launches that differ only in sizes divisible by 16 (N, rows per split)
compile to one binary and are compiled once. The key term is the resized query table
(``key_pos="resize"``), the only variant LLaVA-Mini's forward produces; the MiniCPM-V and Qwen-VL
resamplers have 1,152 to 8,192 score columns (H*Q) at their real shapes and run the projected form,
whose matmuls are not Triton's.

The dispatch rule: the autotuner considers the configs whose register tile fits
(``absorbed_configs``; none for fp32 at C = 2), keeps those whose shared memory fits the arch
(``shared_memory_bytes``), and ``choose_form`` runs the absorbed kernel on an arch exactly where one
is kept (the check asserts both against the compiles). The split rule assumes
``RESIDENT_PROGRAMS_PER_SM``; the check asserts every kept config has that occupancy.

The backward kernels (``backward.py``, scores and rows) as ``absorbed_attention_backward`` launches
them, at the same shapes and batches, writing dx and the score gradients (the key table trains):
every config is kept on every arch (they work in channel chunks), so the check asserts that each
fits and none spills, wherever training takes the absorbed form (where the forward does).
"""

from __future__ import annotations

import torch

from llava_mini.kernels.aot import LaunchCase, record_launches
from llava_mini.kernels.gpus import ARCHS
from llava_mini.kernels.compress import backward
from llava_mini.kernels.compress import triton as kernel

DIM, HEADS = 1024, 8
COMPRESSOR_SIZES = (1, 2)  # C: C x C queries
TOKENS = (576, 2304)
FULL_BATCH = 256
SMALLEST_GPU_SMS = 82  # RTX 3090: one image splits the same way on every GPU in gpus.ARCHS
# Spill stores (bytes per thread) a config the autotuner may pick is allowed: a few registers'
# worth outside the key loop, never a collapsed kernel.
MAX_SPILL_BYTES = 64


def launch(compressor_size: int, tokens: int, batch: int, dtype: torch.dtype, splits: int):
    """The absorbed kernel's launch for LLaVA-Mini's compressor, recorded without running it."""
    def meta(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    queries = compressor_size ** 2
    weights = [meta(queries, DIM), meta(queries, DIM), meta(3 * DIM, DIM), meta(3 * DIM), meta(DIM, DIM), meta(DIM),
               meta(DIM), meta(DIM), meta(DIM), meta(DIM)]
    [recorded] = record_launches(kernel, kernel.compress_triton, meta(batch, tokens, DIM), *weights, HEADS, 1e-5,
                                 form="absorbed", splits=splits)
    return recorded


def backward_launches(compressor_size: int, tokens: int, batch: int, dtype: torch.dtype, splits: int):
    """The backward kernels' launches (scores, then rows) for LLaVA-Mini's compressor, recorded
    without running them."""
    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    hq = HEADS * compressor_size ** 2
    return record_launches(backward, backward.absorbed_attention_backward, meta(hq, batch, DIM),
                           meta(batch, tokens, DIM), meta(hq, DIM), meta(tokens, hq, dtype=torch.float32), None,
                           None, None, None, 1e-5, meta(hq, batch, DIM), meta(hq, batch, dtype=torch.float32),
                           splits=splits)


def product_launches():
    """(C, N, batch, splits, label, dtype) of every launch the check compiles, per kernel."""
    for size in COMPRESSOR_SIZES:
        for tokens in TOKENS:
            split = kernel.choose_splits(1, tokens, SMALLEST_GPU_SMS * kernel.RESIDENT_PROGRAMS_PER_SM)
            for batch, splits, label in ((FULL_BATCH, 1, f"{FULL_BATCH} images"),
                                         (1, split, f"1 image in {split} splits")):
                for dtype in kernel.SUPPORTED_DTYPES:
                    yield size, tokens, batch, splits, f"C={size} N={tokens}, {label}", dtype


def backward_cases() -> list[LaunchCase]:
    """Both backward kernels at every product launch: every config on the archs where training takes
    the absorbed form (where the forward does), none on the others (the projected form runs)."""
    cases = []
    for size, tokens, batch, splits, shape, dtype in product_launches():
        absorbed = tuple(a for a in ARCHS
                         if kernel.choose_form_for(HEADS, size ** 2, DIM, dtype, a.shared_per_block) == "absorbed")
        projected = tuple(a for a in ARCHS if a not in absorbed)
        for name, recorded in zip(("scores", "rows"), backward_launches(size, tokens, batch, dtype, splits)):
            common = dict(kernel=f"compress backward ({name})", shape=shape, dtype=dtype, autotuner=recorded.kernel,
                          args=recorded.args, keeps=lambda config, arch: True,
                          max_spill_bytes=backward.MAX_SPILL_BYTES, fallback="projected form under autograd",
                          group=f"C={size}")
            if absorbed:
                cases.append(LaunchCase(**common, archs=absorbed))
            if projected:
                cases.append(LaunchCase(**common, archs=projected, configs=(), picked=lambda arch: False))
    return cases


def aot_cases() -> list[LaunchCase]:
    return forward_cases() + backward_cases()


def forward_cases() -> list[LaunchCase]:
    cases = []
    for size, tokens, batch, splits, shape, dtype in product_launches():
        recorded = launch(size, tokens, batch, dtype, splits)
        block_hq, block_d = recorded.args["BLOCK_HQ"], recorded.args["BLOCK_D"]
        key_grid = recorded.args["KEY_GRID"]

        def keeps(config, arch, dtype=dtype, block_hq=block_hq, block_d=block_d, key_grid=key_grid):
            return config in kernel.absorbed_configs(dtype, block_hq, block_d, key_grid, arch.shared_per_block)

        def picked(arch, dtype=dtype, queries=size ** 2):
            return kernel.choose_form_for(HEADS, queries, DIM, dtype, arch.shared_per_block) == "absorbed"

        cases.append(LaunchCase(
            "compress", shape, dtype, kernel.autotuned_kernel(dtype), recorded.args, keeps, MAX_SPILL_BYTES,
            configs=tuple(kernel.absorbed_configs(dtype, block_hq, block_d, key_grid)),
            picked=picked, fallback="projected form (K/V matmuls + SDPA)",
            programs_per_sm=kernel.RESIDENT_PROGRAMS_PER_SM, group=f"C={size}"))
    return cases
