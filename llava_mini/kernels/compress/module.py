"""``FusedResampler``: the fused compressor as an ``nn.Module`` with the released parameter names."""

from __future__ import annotations

import torch
from torch import nn

from llava_mini.kernels.compress.op import compress


class FusedResampler(nn.Module):
    """A LLaVA-Mini / Qwen-VL style resampler that runs the fused op: [B, N, D] -> [B, C^2, D].

    Parameters (the released state-dict names): ``query`` [C^2, D], ``pos_embed`` [C^2, D],
    ``attn`` (an ``nn.MultiheadAttention`` with biases), ``ln_q``, ``ln_kv`` (``nn.LayerNorm``).
    Optional stages other resamplers have: ``kv_proj`` (Qwen-VL: a module on x before ``ln_kv``),
    ``ln_post`` and ``proj`` (MiniCPM-V: a module, then ``@ proj``, after the attention).
    Build one around an existing resampler with ``FusedResampler.from_module(m)``.
    """

    def __init__(self, query: nn.Parameter, pos_embed: torch.Tensor, attn: nn.MultiheadAttention,
                 ln_q: nn.LayerNorm, ln_kv: nn.LayerNorm, kv_proj: nn.Module | None = None,
                 ln_post: nn.Module | None = None, proj: torch.Tensor | None = None):
        super().__init__()
        self.query = query
        if isinstance(pos_embed, nn.Parameter):
            self.pos_embed = pos_embed
        else:
            self.register_buffer("pos_embed", pos_embed)
        self.attn = attn
        self.ln_q = ln_q
        self.ln_kv = ln_kv
        self.kv_proj = kv_proj if kv_proj is not None else nn.Identity()
        self.ln_post = ln_post if ln_post is not None else nn.Identity()
        self.proj = proj

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedResampler":
        """A drop-in replacement for ``module`` that shares its parameters (no copies).

        ``module`` must have ``query``, ``pos_embed``, ``attn`` (``nn.MultiheadAttention`` with a
        packed ``in_proj_weight`` and biases), ``ln_q`` and ``ln_kv`` (``nn.LayerNorm``s with the
        same eps), and may have ``kv_proj``, ``ln_post``, ``proj`` (shared too). Its forward must
        be the plain compressor: queries ``ln_q(query) + pos_embed``, keys ``ln_kv(kv_proj(x))``
        plus ``pos_embed`` resized to the key grid, values ``ln_kv(kv_proj(x))``, then
        ``ln_post(out) @ proj`` where present; no attention mask.
        """
        for name in ("query", "pos_embed", "attn", "ln_q", "ln_kv"):
            if not hasattr(module, name):
                raise ValueError(f"module: expected an attribute {name!r} (the released resampler's names)")
        attn = module.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"module.attn: expected nn.MultiheadAttention, got {type(attn).__name__}")
        if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.out_proj.bias is None:
            raise ValueError("module.attn: expected a packed in_proj_weight and biases (kdim == vdim == embed_dim, bias=True)")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("module.attn: add_bias_kv / add_zero_attn are not supported")
        for name in ("ln_q", "ln_kv"):
            norm = getattr(module, name)
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                raise TypeError(f"module.{name}: expected nn.LayerNorm with weight and bias, got {type(norm).__name__}")
        if module.ln_q.eps != module.ln_kv.eps:
            raise ValueError(f"module: ln_q.eps ({module.ln_q.eps}) and ln_kv.eps ({module.ln_kv.eps}) must match")
        return cls(module.query, module.pos_embed, attn, module.ln_q, module.ln_kv,
                   getattr(module, "kv_proj", None), getattr(module, "ln_post", None), getattr(module, "proj", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, kv_dim] (N a square number) -> [B, C^2, D] (``proj``'s width where present)."""
        out = compress(
            self.kv_proj(x), self.query, self.pos_embed,
            self.attn.in_proj_weight, self.attn.in_proj_bias,
            self.attn.out_proj.weight, self.attn.out_proj.bias,
            self.ln_q.weight, self.ln_q.bias, self.ln_kv.weight, self.ln_kv.bias,
            self.attn.num_heads, self.ln_kv.eps,
        )
        out = self.ln_post(out)
        return out if self.proj is None else out @ self.proj
