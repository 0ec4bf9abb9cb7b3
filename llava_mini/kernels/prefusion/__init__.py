"""Fused pre-fusion attention: causal (bottom-right), GQA, key padding, packed varlen batches."""

from llava_mini.kernels.prefusion.op import causal_pairs, prefusion_attention
from llava_mini.kernels.prefusion.ref import prefusion_attention_ref

__all__ = ["causal_pairs", "prefusion_attention", "prefusion_attention_ref"]
