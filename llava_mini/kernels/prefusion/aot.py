"""What the ahead-of-time compile check (``llava_mini.kernels.aot``) compiles for the pre-fusion kernel.

Each case is the launch ``prefusion_attention_triton`` makes (recorded on meta tensors, so the
launcher's own padding, strides and constants) at a product shape, for each dtype the op
advertises: a pre-fusion pass over [576 vision ; 1 compressed ; 32 text] = 609 tokens, batch 4 with
a key padding mask (batched prompts of different lengths), q, k, v in transformers' layout
([B, H, L, d] tensors seen as [B, L, H, d]). The dispatch rule is the autotuner's pruning
(``fitting_configs``) for the arch's shared memory.

The backward's two kernels (``backward.py``) at the same shapes, as
``prefusion_attention_backward_triton`` launches them: one fixed config per dtype
(``backward_config``), which must fit every arch.
"""

from __future__ import annotations

import torch
import triton

from llava_mini.kernels.aot import LaunchCase, record_launches
from llava_mini.kernels.prefusion import backward
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


def backward_cases() -> list[LaunchCase]:
    """Both backward kernels at each product shape and dtype, with the config the launcher fixes."""
    cases = []
    for label, heads, kv_heads, head_dim in PRODUCT_SHAPES:
        for dtype in ATTENTION_DTYPES:
            q = torch.empty(BATCH, heads, TOKENS, head_dim, dtype=dtype, device="meta").transpose(1, 2)
            k = torch.empty(BATCH, kv_heads, TOKENS, head_dim, dtype=dtype, device="meta").transpose(1, 2)
            out = torch.empty(BATCH, TOKENS, heads, head_dim, dtype=dtype, device="meta")
            lse = torch.empty(BATCH, heads, TOKENS, dtype=torch.float32, device="meta")
            keep = torch.empty(BATCH, TOKENS, dtype=torch.bool, device="meta")
            for recorded in record_launches(backward, backward.prefusion_attention_backward_triton, out, q, k, k, out,
                                            lse, causal=True, key_padding_mask=keep, scale=head_dim ** -0.5):
                args = dict(recorded.args)
                tiles = {name: args.pop(name) for name in ("BLOCK_M", "BLOCK_N")}
                config = triton.Config(tiles, num_warps=args.pop("num_warps"), num_stages=args.pop("num_stages"))
                name = recorded.kernel.fn.__name__.strip("_").removesuffix("_kernel")
                cases.append(LaunchCase(f"prefusion backward ({name})", label, dtype, recorded.kernel, args,
                                        lambda config, arch: True, MAX_SPILL_BYTES, configs=(config,)))
    return cases


def aot_cases() -> list[LaunchCase]:
    return forward_cases() + backward_cases()


def forward_cases() -> list[LaunchCase]:
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
