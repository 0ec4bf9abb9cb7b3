"""The pre-fusion kernel as a transformers attention implementation named ``"llava_mini_triton"``.

Importing this module registers it; then any transformers decoder that supports attention backends
(Llama, Mistral-style, Qwen2, ...) runs its attention through the kernel::

    import llava_mini.kernels.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="llava_mini_triton")

Supported: causal decoder attention (bottom-right aligned, so KV-cache decode steps work), GQA,
and 2-D padding masks. Anything else (4-D masks, sliding windows, packed sequences via
``position_ids``, static caches, dropout, softcapping) raises a clear error instead of being ignored.
It trains too: the kernel's backward is registered on its op (gradients to q, k and v).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flash_attention_mask

from llava_mini.kernels.prefusion.op import prefusion_attention

ATTN_IMPLEMENTATION_NAME = "llava_mini_triton"


def llava_mini_attention_mask(*args, mask_function=causal_mask_function, **kwargs) -> torch.Tensor | None:
    """Mask creation for ``"llava_mini_triton"``: a bool key padding mask ``[B, kv_length]`` or None.

    As for flash-attention: None when nothing is padded (the kernel applies the causal mask itself),
    else the 2-D padding mask, True = keep. Only the plain causal pattern is supported; a different
    ``mask_function`` (sliding window, packed sequences, extra or/and masks) raises. The other
    arguments (batch size, lengths, offsets, ``attention_mask``) go to transformers'
    ``flash_attention_mask`` untouched, whose signature changed across transformers 5.x.
    """
    if mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", repr(mask_function))
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION_NAME!r}: expected the plain causal mask (+ padding), "
            f"got mask function {name} (sliding window, packed sequences or a custom mask); use 'sdpa' or 'eager'"
        )
    return flash_attention_mask(*args, mask_function=mask_function, **kwargs)


def llava_mini_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers models: ``query [B, H, Lq, d]``, ``key/value [B, Hkv, Lk, d]``.

    ``attention_mask`` is None (causal only) or a 2-D key padding mask ``[B, Lk]`` (1/True = keep),
    as made by ``llava_mini_attention_mask``. Causal masking is bottom-right aligned: the queries are
    the last ``Lq`` of the ``Lk`` positions (prefill after a cached prefix, or a decode step).
    ``module.is_causal = False`` (or ``is_causal=False`` in kwargs) gives full attention.

    Returns ``(out [B, Lq, H, d], None)``: no attention weights.
    """
    if dropout:
        raise ValueError(f"dropout: {ATTN_IMPLEMENTATION_NAME!r} has no attention dropout (expected 0.0), got {dropout}")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{unsupported}: not supported by {ATTN_IMPLEMENTATION_NAME!r}; use 'sdpa' or 'eager'")
    if attention_mask is not None:
        expected = (key.shape[0], key.shape[2])
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask: {ATTN_IMPLEMENTATION_NAME!r} expects None or a 2-D key padding mask "
                f"{list(expected)} [batch, kv_length], got shape {list(attention_mask.shape)} "
                "(4-D masks and static caches are not supported)"
            )
        attention_mask = attention_mask.to(torch.bool)
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    out = prefusion_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        causal=causal, key_padding_mask=attention_mask, scale=scaling,
    )
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION_NAME, llava_mini_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION_NAME, llava_mini_attention_mask)
