"""What the ahead-of-time compile check (``llava_mini.kernels.aot``) compiles for the pre-fusion kernel.

Each case is the launch ``prefusion_attention_triton`` makes (recorded on meta tensors, so the
launcher's own padding, strides and constants) at a product shape, for each dtype the op
advertises: a pre-fusion pass over [576 vision ; 1 compressed ; 32 text] = 609 tokens, batch 4 with
a key padding mask (batched prompts of different lengths), q, k, v in transformers' layout
([B, H, L, d] tensors seen as [B, L, H, d]). The dispatch rule is the autotuner's pruning
(``fitting_configs``) for the arch's shared memory.
"""

from __future__ import annotations

import torch

from llava_mini.kernels.aot import LaunchCase, record_launches
from llava_mini.kernels.prefusion import triton as kernel
from llava_mini.kernels.prefusion.op import ATTENTION_DTYPES

# (label, heads, kv heads, head_dim)
PRODUCT_SHAPES = (
    ("Vicuna-7B 32 x 128", 32, 32, 128),
    ("Llama-3.1-8B 32/8 x 128", 32, 8, 128),
    ("32/8 x 96", 32, 8, 96),
    ("32/8 x 80", 32, 8, 80),
    ("32/8 x 72", 32, 8, 72),
    ("32/8 x 64", 32, 8, 64),
)
BATCH, TOKENS = 4, 576 + 1 + 32
# Spill stores (bytes per thread) a config the autotuner may pick is allowed: a few registers'
# worth outside the key loop, never a collapsed kernel.
MAX_SPILL_BYTES = 64


def launch(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """The kernel launch of a product-shape call, recorded without running it."""
    def hf_layout(h):  # [B, h, L, d] (after the projections and RoPE) transposed to [B, L, h, d]
        return torch.empty(BATCH, h, TOKENS, head_dim, dtype=dtype, device="meta").transpose(1, 2)

    keep = torch.empty(BATCH, TOKENS, dtype=torch.bool, device="meta")
    [recorded] = record_launches(kernel, kernel.prefusion_attention_triton, hf_layout(heads), hf_layout(kv_heads),
                                 hf_layout(kv_heads), key_padding_mask=keep)
    return recorded


def aot_cases() -> list[LaunchCase]:
    cases = []
    for label, heads, kv_heads, head_dim in PRODUCT_SHAPES:
        for dtype in ATTENTION_DTYPES:
            recorded = launch(heads, kv_heads, head_dim, dtype)
            block_d = recorded.args["BLOCK_D"]

            def keeps(config, arch, dtype=dtype, block_d=block_d):
                return bool(kernel.fitting_configs([config], dtype, block_d, arch.capability, arch.shared_per_block))

            cases.append(LaunchCase("prefusion", label, dtype, kernel.autotuned_kernel(dtype), recorded.args, keeps,
                                    MAX_SPILL_BYTES))
    return cases
