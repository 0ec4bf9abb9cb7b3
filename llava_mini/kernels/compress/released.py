"""Plain-PyTorch equivalents of the released resamplers, for tests and benchmarks.

The real code (Qwen-VL's ``visual.py``, OmniLMM's and MiniCPM-V's ``resampler.py``) cannot be
shipped here. These modules are written from the spec (``ref.py``), not from that code: they have
the released attribute names and forward signatures, and compute the way the sources do (sequence-
first ``nn.MultiheadAttention`` with its default ``need_weights=True``, the key position table built
on every call, MiniCPM-V 2.5/2.6's per-image loop over a cached sin-cos table), so they convert with
``FusedResampler.from_module`` and load the released state dicts. tests/data/resamplers holds the
real modules' outputs they are checked against.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_mini.kernels.compress.ref import key_pos_embed, sincos_grid, sincos_pos_embed_2d


class ReleasedResampler(nn.Module):
    """The parts every released resampler has: ``query``, ``kv_proj``, ``attn``, ``ln_q``, ``ln_kv``
    and, with ``ln_post=True``, ``ln_post`` and ``proj`` (OmniLMM, MiniCPM-V)."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None,
                 ln_post: bool = True, eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim not in (None, embed_dim) else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        if ln_post:
            self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
            self.proj = nn.Parameter(torch.randn(embed_dim, embed_dim) * embed_dim ** -0.5)

    def attend(self, x: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor | None = None,
               **masks) -> torch.Tensor:
        """x [B, N, kv_dim]; key_pos [N, 1 or B, D] (sequence-first); masks: nn.MultiheadAttention's."""
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [N, B, D]
        q = self.ln_q(self.query)
        if query_pos is not None:
            q = q + query_pos
        out = self.attn(q.unsqueeze(1).repeat(1, x.shape[0], 1), kv + key_pos, kv, **masks)[0].permute(1, 0, 2)
        return self.ln_post(out) @ self.proj if hasattr(self, "proj") else out


class QwenVLResampler(ReleasedResampler):
    """Qwen-VL's ``Resampler`` (``ln_post=False``; OmniLMM's and MiniCPM-V 1.0's with ``ln_post=True``):
    ``forward(x, attn_mask=None)``, x [B, N, kv_dim] with N a square number."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int | None = None,
                 ln_post: bool = False, eps: float = 1e-6, **_):
        super().__init__(grid_size ** 2, embed_dim, num_heads, kv_dim, ln_post, eps)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid_size), requires_grad=False)

    def forward(self, x, attn_mask=None):
        return self.attend(x, key_pos_embed(self.pos_embed, x.shape[1]).unsqueeze(1), self.pos_embed,
                           attn_mask=attn_mask)


class MiniCPMV20Resampler(QwenVLResampler):
    """MiniCPM-V 2.0's: ``forward(x, tgt_size, attn_mask=None)``; keys get the sin-cos table of the
    (h, w) grid (``adaptive=True``, as the model builds it) or the query table resized to (h, w)."""

    def __init__(self, adaptive: bool = True, ln_post: bool = True, **config):
        super().__init__(ln_post=ln_post, **config)
        self.adaptive = adaptive

    def forward(self, x, tgt_size=None, attn_mask=None):
        height, width = tgt_size
        if self.adaptive:
            key_pos = sincos_grid(self.query.shape[1], height, width).to(device=x.device, dtype=x.dtype)
        else:
            key_pos = key_pos_embed(self.pos_embed, (height, width))
        return self.attend(x, key_pos.unsqueeze(1), self.pos_embed, attn_mask=attn_mask)


class MiniCPMV26Resampler(ReleasedResampler):
    """MiniCPM-V 2.5's and 2.6's: ``forward(x, tgt_sizes)``, x [B, max h*w, kv_dim] padded; no query
    position; keys get each image's slice of a cached [H, W, D] sin-cos table (grown on demand)."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None,
                 ln_post: bool = True, eps: float = 1e-6, max_size=(70, 70), **_):
        super().__init__(num_queries, embed_dim, num_heads, kv_dim, ln_post, eps)
        self._cache(tuple(max_size), "cpu")

    def _cache(self, size, device):
        table = sincos_grid(self.query.shape[1], *size).view(*size, -1).to(device)
        self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, x, tgt_sizes=None):
        sizes = tgt_sizes.tolist()
        if max(h for h, _ in sizes) > self.pos_embed.shape[0] or max(w for _, w in sizes) > self.pos_embed.shape[1]:
            self._cache((max(max(h for h, _ in sizes), self.pos_embed.shape[0]),
                         max(max(w for _, w in sizes), self.pos_embed.shape[1])), x.device)
        key_pos = x.new_zeros(x.shape[1], x.shape[0], self.query.shape[1])
        padding = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        for b, (height, width) in enumerate(sizes):
            key_pos[:height * width, b] = self.pos_embed[:height, :width].reshape(height * width, -1)
            padding[b, :height * width] = False
        return self.attend(x, key_pos, key_padding_mask=padding)
