"""Query-compression cross-attention: the reference (``compress_ref``), the fused op (``compress``,
``torch.ops.llava_mini.compress``) and the drop-in module (``FusedResampler``) for the resamplers of
LLaVA-Mini, Qwen-VL, OmniLMM and MiniCPM-V 2.0 / 2.5 / 2.6."""

from llava_mini.kernels.compress.module import FusedResampler
from llava_mini.kernels.compress.op import compress, compress_flops
from llava_mini.kernels.compress.ref import (compress_ref, key_pos_embed, sincos_1d, sincos_grid,
                                             sincos_pos_embed_2d)
from llava_mini.kernels.compress.triton import choose_form, clear_cache, compress_triton

__all__ = [
    "FusedResampler",
    "choose_form",
    "clear_cache",
    "compress",
    "compress_flops",
    "compress_ref",
    "compress_triton",
    "key_pos_embed",
    "sincos_1d",
    "sincos_grid",
    "sincos_pos_embed_2d",
]
