"""``FusedResampler``: the fused compressor as a drop-in for the resamplers VLMs ship.

``FusedResampler.from_module(m)`` recognises the resampler by its structure (its forward's
parameters and its attributes), shares its parameters, checks once on a tiny input that the source
module computes what the reference computes, and refuses (at conversion, naming what is missing or
what differs) anything it cannot reproduce exactly.

| variant              | source forward               | queries            | keys                              |
| -------------------- | ---------------------------- | ------------------ | --------------------------------- |
| ``llava-mini``       | ``(x)``                      | LN(query) + table  | LN(x) + table resized to sqrt(N)^2 |
| ``qwen-vl``          | ``(x, attn_mask)``           | LN(query) + table  | same (Qwen-VL, OmniLMM, MiniCPM-V 1.0) |
| ``minicpm-v-2.0``    | ``(x, tgt_size, attn_mask)`` | LN(query) + table  | LN(x) + sin-cos of (h, w) (``adaptive``) or the table resized to (h, w) |
| ``minicpm-v-2.5/2.6``| ``(x, tgt_sizes)``           | LN(query)          | LN(x) + sin-cos of each image's (h, w), padding masked |
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from llava_mini.kernels.compress.op import compress
from llava_mini.kernels.compress.ref import compress_ref, sincos_grid

# The source forward's parameters after x -> the variant.
VARIANTS = {
    (): "llava-mini",
    ("attn_mask",): "qwen-vl",
    ("tgt_size", "attn_mask"): "minicpm-v-2.0",
    ("tgt_sizes",): "minicpm-v-2.5/2.6",
}
FORWARDS = {
    "llava-mini": "_forward_llava_mini",
    "qwen-vl": "_forward_qwen_vl",
    "minicpm-v-2.0": "_forward_minicpm_v_20",
    "minicpm-v-2.5/2.6": "_forward_minicpm_v_26",
}
# Relative difference (max |source - reference| / max |reference|) the conversion check allows, by dtype.
PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


class FusedResampler(nn.Module):
    """A Qwen-VL / MiniCPM-V / LLaVA-Mini resampler that runs the fused op: -> [B, Q, out].

    Parameters keep the source's names (``query``, ``pos_embed`` where the source has one as a
    parameter, ``attn`` (an ``nn.MultiheadAttention``), ``ln_q``, ``ln_kv``, and the optional stages
    ``kv_proj`` (a module on x before ``ln_kv``), ``ln_post`` and ``proj`` (a module, then ``@ proj``,
    after the attention)). Build one with ``FusedResampler.from_module(m)``; its forward takes what
    ``m``'s forward takes (see ``forward``).
    """

    def __init__(self, variant: str, query: nn.Parameter, attn: nn.MultiheadAttention, ln_q: nn.LayerNorm,
                 ln_kv: nn.LayerNorm, pos_embed: torch.Tensor | None = None, kv_proj: nn.Module | None = None,
                 ln_post: nn.Module | None = None, proj: torch.Tensor | None = None, adaptive: bool = False):
        super().__init__()
        if variant not in VARIANTS.values():
            raise ValueError(f"variant: expected one of {sorted(VARIANTS.values())}, got {variant!r}")
        self.variant = variant
        self.query = query
        if isinstance(pos_embed, nn.Parameter):
            self.pos_embed = pos_embed
        elif pos_embed is not None:
            self.register_buffer("pos_embed", pos_embed)
        else:
            self.pos_embed = None
        self.attn = attn
        self.ln_q = ln_q
        self.ln_kv = ln_kv
        self.kv_proj = kv_proj if kv_proj is not None else nn.Identity()
        self.ln_post = ln_post if ln_post is not None else nn.Identity()
        self.proj = proj
        self.adaptive = adaptive
        self.query_pos = variant != "minicpm-v-2.5/2.6"
        sincos_keys = variant == "minicpm-v-2.5/2.6" or (variant == "minicpm-v-2.0" and adaptive)
        self.key_pos = "sincos" if sincos_keys else "resize"

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, query_pos={self.query_pos}, key_pos={self.key_pos!r}"

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedResampler":
        """A drop-in replacement for ``module`` that shares its parameters (no copies).

        Supported (recognised by the forward's parameters and the attributes):
        LLaVA-Mini's compressor ``forward(x)``; Qwen-VL's ``Resampler`` and OmniLMM's / MiniCPM-V
        1.0's ``forward(x, attn_mask=None)``; MiniCPM-V 2.0's ``forward(x, tgt_size, attn_mask=None)``
        (``adaptive`` True or False); MiniCPM-V 2.5's and 2.6's ``forward(x, tgt_sizes)``.
        All need ``query`` [Q, D], ``attn`` (``nn.MultiheadAttention``, packed in-projection with
        biases, no dropout), ``ln_q``/``ln_kv`` (``nn.LayerNorm`` with the same eps); ``kv_proj``,
        ``ln_post`` and ``proj`` are used where present. A ValueError/TypeError names what is
        missing; the conversion then runs the source and the reference once on a tiny input and
        refuses the module if they differ (beyond rounding for its dtype).
        """
        variant = _variant_of(module)
        dim = _check_common(module)
        pos_embed = getattr(module, "pos_embed", None)
        adaptive = False
        if variant == "minicpm-v-2.5/2.6":
            _check_sincos_cache(module, dim)
            pos_embed = None  # the sin-cos keys are computed from each image's (h, w)
        else:
            _check_query_table(module, pos_embed, dim)
        if variant == "minicpm-v-2.0":
            adaptive = getattr(module, "adaptive", None)
            if not isinstance(adaptive, bool):
                raise TypeError(f"module.adaptive: expected MiniCPM-V 2.0's bool (sin-cos keys at the image's grid, "
                                f"or the query table resized), got {adaptive!r}")
        proj = getattr(module, "proj", None)
        if proj is not None and (not isinstance(proj, torch.Tensor) or proj.dim() != 2 or proj.shape[0] != dim):
            raise ValueError(f"module.proj: expected a [{dim}, out] tensor applied as `out @ proj`, got {proj!r}")
        fused = cls(variant, module.query, module.attn, module.ln_q, module.ln_kv, pos_embed=pos_embed,
                    kv_proj=getattr(module, "kv_proj", None), ln_post=getattr(module, "ln_post", None), proj=proj,
                    adaptive=adaptive)
        _probe(module, fused)
        return fused

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The source module's forward, fused; it takes the source's arguments, by position or name:

        - ``llava-mini``: ``(x)``, x [B, N, kv_dim] with N a square number;
        - ``qwen-vl``: ``(x, attn_mask=None)``; ``attn_mask`` as nn.MultiheadAttention takes it
          ([Q, N] or [B*H, Q, N], bool = not allowed, or float added to the scores);
        - ``minicpm-v-2.0``: ``(x, tgt_size, attn_mask=None)``, x [B, h*w, kv_dim], ``tgt_size`` the
          patch grid (h, w) of the batch's images;
        - ``minicpm-v-2.5/2.6``: ``(x, tgt_sizes)``, ``tgt_sizes`` [B, 2] the (h, w) of each image;
          x [B, L, kv_dim] padded (image b's tokens are its first h*w rows) or packed [sum h*w, kv_dim].

        Every variant also takes ``key_padding_mask=`` [B, N] bool (True = ignore) by name.
        Returns [B, Q, D] (``proj``'s width where present).
        """
        run = getattr(self, FORWARDS[self.variant])
        try:
            bound = inspect.signature(run).bind(x, *args, **kwargs)
        except TypeError as error:
            accepted = ", ".join(inspect.signature(run).parameters)
            raise TypeError(f"FusedResampler ({self.variant}) takes ({accepted}): {error}") from None
        return run(*bound.args, **bound.kwargs)

    # --- one forward per variant: the source's signature, then the fused op ---------------------

    def _forward_llava_mini(self, x, *, key_padding_mask=None):
        return self._compress(x, key_padding_mask=key_padding_mask)

    def _forward_qwen_vl(self, x, attn_mask=None, *, key_padding_mask=None):
        return self._compress(x, key_padding_mask=key_padding_mask, attn_mask=attn_mask)

    def _forward_minicpm_v_20(self, x, tgt_size=None, attn_mask=None, *, key_padding_mask=None):
        height, width = _grid_of(tgt_size)
        if x.dim() != 3 or x.shape[1] != height * width:
            raise ValueError(f"x: expected [B, h*w = {height * width}, kv_dim] for tgt_size {(height, width)}, got "
                             f"{list(x.shape)}")
        grid_sizes = torch.tensor([[height, width]] * x.shape[0], device=x.device)
        return self._compress(x, grid_sizes=grid_sizes, key_padding_mask=key_padding_mask, attn_mask=attn_mask)

    def _forward_minicpm_v_26(self, x, tgt_sizes=None, *, key_padding_mask=None):
        if not isinstance(tgt_sizes, torch.Tensor) or tgt_sizes.dim() != 2 or tgt_sizes.shape[1] != 2:
            raise ValueError(f"tgt_sizes: MiniCPM-V 2.5/2.6's resampler needs the (h, w) patch grid of each image as "
                             f"a [B, 2] integer tensor, got {tgt_sizes!r}")
        cu_seqlens = None
        if x.dim() == 2:  # packed: the images' rows one after another
            lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(device=x.device, dtype=torch.int64)
            cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return self._compress(x, grid_sizes=tgt_sizes, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask)

    def _compress(self, x, **options):
        return self._post(self._attend(compress, self.kv_proj(x), **options))

    def _attend(self, run, kv, **options):
        """The attention stage (``run``: ``compress`` or ``compress_ref``) on kv_proj's output."""
        return run(
            kv, self.query, self.pos_embed,
            self.attn.in_proj_weight, self.attn.in_proj_bias,
            self.attn.out_proj.weight, self.attn.out_proj.bias,
            self.ln_q.weight, self.ln_q.bias, self.ln_kv.weight, self.ln_kv.bias,
            self.attn.num_heads, self.ln_kv.eps, query_pos=self.query_pos, key_pos=self.key_pos, **options,
        )

    def _post(self, out):
        out = self.ln_post(out)
        return out if self.proj is None else out @ self.proj


def _grid_of(tgt_size) -> tuple[int, int]:
    if isinstance(tgt_size, torch.Tensor):
        tgt_size = tgt_size.tolist()
    if (not isinstance(tgt_size, (tuple, list)) or len(tgt_size) != 2
            or not all(isinstance(v, int) and v > 0 for v in tgt_size)):
        raise ValueError(f"tgt_size: MiniCPM-V 2.0's resampler needs the image's patch grid (h, w) (positive ints), "
                         f"got {tgt_size!r}")
    return tuple(tgt_size)


def _variant_of(module: nn.Module) -> str:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    parameters = list(inspect.signature(module.forward).parameters)
    variant = VARIANTS.get(tuple(parameters[1:]))
    if variant is None:
        known = "; ".join(f"{name}: forward(x{''.join(', ' + a for a in args)})" for args, name in VARIANTS.items())
        raise ValueError(f"module: {type(module).__name__}.forward({', '.join(parameters)}) is not a resampler this "
                         f"reproduces ({known})")
    return variant


def _check_common(module: nn.Module) -> int:
    """The parts every variant has; returns D."""
    for name in ("query", "attn", "ln_q", "ln_kv"):
        if not hasattr(module, name):
            raise ValueError(f"module: expected an attribute {name!r} (the released resampler's names)")
    attn = module.attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"module.attn: expected nn.MultiheadAttention, got {type(attn).__name__}")
    if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.out_proj.bias is None:
        raise ValueError("module.attn: expected a packed in_proj_weight and biases (kdim == vdim == embed_dim, bias=True)")
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("module.attn: add_bias_kv / add_zero_attn are not reproduced")
    if attn.dropout:
        raise ValueError(f"module.attn: dropout={attn.dropout} is not reproduced (it needs 0)")
    dim = attn.embed_dim
    query = module.query
    if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[1] != dim:
        raise ValueError(f"module.query: expected a [Q, {dim}] tensor, got {getattr(query, 'shape', query)!r}")
    for name in ("ln_q", "ln_kv"):
        norm = getattr(module, name)
        if (not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None
                or tuple(norm.normalized_shape) != (dim,)):
            raise TypeError(f"module.{name}: expected nn.LayerNorm({dim}) with weight and bias, got {norm!r}")
    if module.ln_q.eps != module.ln_kv.eps:
        raise ValueError(f"module: ln_q.eps ({module.ln_q.eps}) and ln_kv.eps ({module.ln_kv.eps}) must match")
    return dim


def _check_query_table(module, pos_embed, dim) -> None:
    """Variants with a query position table: [Q, D] on a square grid (resized for the keys)."""
    queries = module.query.shape[0]
    if not isinstance(pos_embed, torch.Tensor) or list(pos_embed.shape) != [queries, dim]:
        raise ValueError(f"module.pos_embed: expected the [{queries}, {dim}] query position table, got "
                         f"{getattr(pos_embed, 'shape', pos_embed)!r}")
    side = int(queries ** 0.5)
    if side * side != queries:
        raise ValueError(f"module.pos_embed: expected a square query grid, got {queries} queries")


def _check_sincos_cache(module, dim) -> None:
    """MiniCPM-V 2.5/2.6 keep a [H, W, D] cache of the 2-D sin-cos table; ours must be the same."""
    cache = getattr(module, "pos_embed", None)
    if not isinstance(cache, torch.Tensor) or cache.dim() != 3 or cache.shape[2] != dim:
        raise ValueError(f"module.pos_embed: expected MiniCPM-V 2.5/2.6's [H, W, {dim}] sin-cos cache, got "
                         f"{getattr(cache, 'shape', cache)!r}")
    height, width = cache.shape[:2]
    table = sincos_grid(dim, height, width).view(height, width, dim).to(device=cache.device, dtype=cache.dtype)
    if not torch.equal(table, cache):
        raise ValueError("module.pos_embed: the [H, W, D] cache is not the 2-D sin-cos table the keys are computed "
                         "from (MAE's, in float32); a different key position term is not reproduced")


def _probe_inputs(module: nn.Module, fused: FusedResampler, dtype, device) -> dict:
    """A tiny input for the variant: non-square grids, a resized table, a ragged batch."""
    kv_dim = getattr(fused.kv_proj, "in_features", fused.attn.embed_dim)
    generator = torch.Generator().manual_seed(0)

    def features(*shape):
        return (torch.randn(*shape, generator=generator) * 2 + 0.5).to(device=device, dtype=dtype)

    side = int(fused.query.shape[0] ** 0.5) if fused.pos_embed is not None else 2
    if fused.variant in ("llava-mini", "qwen-vl"):
        return dict(x=features(2, (side + 1) ** 2, kv_dim))
    if fused.variant == "minicpm-v-2.0":
        return dict(x=features(1, side * (side + 1), kv_dim), tgt_size=(side, side + 1))
    return dict(x=features(2, 6, kv_dim), tgt_sizes=torch.tensor([[2, 3], [3, 1]], dtype=torch.int32, device=device))


@torch.no_grad()
def _probe(module: nn.Module, fused: FusedResampler) -> None:
    """Run the source and the reference once; refuse the module if they differ."""
    weight = module.attn.in_proj_weight
    if weight.device.type == "meta":
        raise ValueError("module: its weights are on the meta device; load them before converting (the conversion "
                         "checks the module on a tiny input)")
    dtype = weight.dtype
    inputs = _probe_inputs(module, fused, dtype, weight.device)
    try:
        expected = module(**inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the source on a valid input
        raise ValueError(f"module: its forward failed on a {fused.variant} input ({type(error).__name__}: {error}); "
                         f"not a resampler this reproduces") from error
    forward = {**inputs}
    x = forward.pop("x")
    if fused.variant == "minicpm-v-2.0":
        forward["grid_sizes"] = torch.tensor([forward.pop("tgt_size")] * x.shape[0], device=x.device)
    elif fused.variant == "minicpm-v-2.5/2.6":
        forward["grid_sizes"] = forward.pop("tgt_sizes")
    # The reference in fp32 at least, so a 16-bit module is compared with its own rounding only.
    kv = fused.kv_proj(x)
    reference = fused._post(fused._attend(compress_ref, kv.to(torch.promote_types(kv.dtype, torch.float32)),
                                          **forward).to(dtype))
    if not isinstance(expected, torch.Tensor) or expected.shape != reference.shape:
        raise ValueError(f"module: its forward returned {getattr(expected, 'shape', type(expected).__name__)}, the "
                         f"{fused.variant} resampler gives {list(reference.shape)}; not reproduced")
    scale = reference.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    difference = ((expected.double() - reference.double()).abs().max() / scale).item()
    tolerance = PROBE_TOLERANCE[dtype]
    if not difference <= tolerance:
        raise ValueError(f"module: it computes something else than the {fused.variant} resampler (relative difference "
                         f"{difference:.2g} > {tolerance:g} for {dtype} on a tiny input); not reproduced")
