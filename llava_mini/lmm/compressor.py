"""The LLaVA-Mini compressor: a resampler with the released state-dict names."""

from __future__ import annotations

import torch
from torch import nn

from llava_mini.kernels import backend
from llava_mini.kernels.compress.ref import compress_ref, sincos_pos_embed_2d


class Resampler(nn.Module):
    """C x C learned queries cross-attend over N vision tokens: [B, N, D] -> [B, C^2, D].

    State-dict keys are the released ones: ``query, pos_embed, attn.in_proj_weight,
    attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, ln_q.*, ln_kv.*``.
    The backend switch picks the path: ``"triton"`` runs the fused kernel, every other backend
    the reference PyTorch path. ``eps`` is the LayerNorms' (1e-5, PyTorch's default, as the
    released Resampler is built).
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.grid_size = grid_size
        self.num_queries = grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.empty(self.num_queries, embed_dim).normal_(std=0.02))
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected shape [B, N, {self.embed_dim}], got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if backend.get_backend() == "triton":
            from llava_mini.kernels.compress.op import compress as run
        else:
            run = compress_ref
        return run(
            x, self.query, self.pos_embed,
            self.attn.in_proj_weight, self.attn.in_proj_bias,
            self.attn.out_proj.weight, self.attn.out_proj.bias,
            self.ln_q.weight, self.ln_q.bias, self.ln_kv.weight, self.ln_kv.bias,
            self.num_heads, self.ln_kv.eps,
        )
