"""Analytic FLOP (and byte) counts per stage, for LLaVA-Mini and the 576-token LLaVA-1.5 baseline.

One entry point, :func:`count_flops`, returns a :class:`Cost`: FLOPs and minimal HBM bytes per
stage (``vision_encoder, projector, compressor, prefusion, llm_prefill, lm_head, decode``) plus the
token counts it assumed. Three conventions:

``"paper"``
    The convention of the paper's Table 14: 2 x MACs of the linear layers only (Q/K/V/O, MLPs,
    projector, patch-embedding conv, lm_head at *every* prompt position); no attention score or
    value matmuls, no norms, activations, softmax or rotary. The compressor is counted in its
    projected form (Q, K, V, O projections; see ``PAPER_NOTES``).
``"full"``
    What an ideal kernel must compute: linear layers plus the attention matmuls over the
    *unmasked* pairs only (causal, bottom-right aligned: query i of R sees the first S - R + i + 1
    keys), the compressor in the form the fused kernel picks by shape (``compressor_form``), the
    exact pre-fusion savings as options (``prune_last_layer``, ``prefix_cached``), lm_head only at
    the last position (what ``generate`` computes) unless ``lm_head="all"``.
``"counted"``
    What ``torch.utils.flop_counter.FlopCounterMode`` reports for the reference (eager) model:
    attention matmuls dense (eager and SDPA compute every pair; the causal mask is applied after
    the matmul), the compressor in its projected reference form with the query projection once
    per call, conv/linear/matmul only. Rotary tables are left out, as in the other conventions
    (transformers 5.16 builds them with a small matmul the counter sees, 5.19 on with a broadcast
    multiply it does not; the tests remove what the counter puts on the rotary modules).

Token bookkeeping (``prompt_len`` = L tokens of one prompt, holding one ``<image>`` placeholder):
the LLM receives ``L - 1 + frames * C^2`` tokens (baseline: ``L - 1 + frames * 576``); the
pre-fusion layers see ``[vision ; C^2 compressed ; L text]`` rows per image or frame (the model
embeds the whole prompt and runs the placeholder's row as masked padding, so it is counted). The paper's rows are reproduced with ``PAPER_PROMPT_LEN = 44``
(43 text tokens + the placeholder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llava_mini.lmm.config import LlavaMiniConfig
from llava_mini.lmm.reduction import FastV, VisionZip

CONVENTIONS = ("paper", "full", "counted")
MODELS = ("mini", "baseline")
COMPRESSOR_FORMS = ("auto", "projected", "absorbed")
STAGES = ("vision_encoder", "projector", "compressor", "prefusion", "llm_prefill", "lm_head", "decode")
PAPER_PROMPT_LEN = 44  # 43 text tokens + the <image> placeholder reproduce Table 14
BASELINE_TOKENS_PER_IMAGE = None  # the baseline keeps every CLIP patch: config.num_patches (576)

# Paper Table 14 (TFLOPs, 336 px, Vicuna-7B), for tests and reports.
PAPER_TABLE14 = {
    "baseline": {"vision_encoder": 0.349, "projector": 0.024, "llm": 8.177, "total": 8.55},
    "mini": {"vision_encoder": 0.349, "projector": 0.024, "compressor": 0.001, "prefusion": 0.125,
             "llm": 1.460, "total": 1.96},
}
PAPER_NOTES = (
    "With L = 44 (43 text tokens + <image>) the baseline rows (ViT 0.349, projector 0.024, LLM 8.180, "
    "total 8.553 T) and the LLaVA-Mini total (1.963 T) reproduce Table 14 within 0.2%. The paper's split "
    "of LLaVA-Mini's 1.585 T between pre-fusion (0.125 T) and LLM (1.460 T) is not the architecture's: "
    "4 pre-fusion layers over 576 + 1 + 44 = 621 rows are 1.005 T and 32 LLM layers (+ lm_head) over "
    "44 tokens are 0.581 T; only their sum (1.587 T) matches (0.1%). The paper's compressor 0.001 T is half of the projected form's "
    "2 x MACs (K and V projections of 576 tokens: 0.0024 T), i.e. MACs, or one projection; the "
    "absorbed form the fused kernel runs is ~0.00001 T. The gap is 0.07% of the total."
)


def _dtype_bytes(dtype) -> int:
    """Bytes per element for a torch dtype, a name (``bf16``, ``float16``, ...) or an int."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype <= 0:
            raise ValueError(f"dtype: expected a positive byte count, got {dtype}")
        return dtype
    names = {"fp32": 4, "float32": 4, "float": 4, "fp16": 2, "float16": 2, "half": 2, "bf16": 2,
             "bfloat16": 2, "fp64": 8, "float64": 8, "double": 8, "int8": 1, "fp8": 1, "float8": 1}
    key = str(dtype).removeprefix("torch.").lower()
    if key not in names:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; expected a torch dtype, a byte count or one of "
                         f"{sorted(names)}")
    return names[key]


def resolve_config(config) -> LlavaMiniConfig:
    """A ``LlavaMiniConfig`` from a config, a preset name or a dict."""
    if isinstance(config, LlavaMiniConfig):
        return config
    if isinstance(config, str):
        return LlavaMiniConfig.from_preset(config)
    if isinstance(config, dict):
        return LlavaMiniConfig.from_dict(config)
    raise TypeError(f"config: expected a LlavaMiniConfig, a preset name or a dict, got {type(config).__name__}")


def _nonneg_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


# --- shapes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shapes:
    dv: int  # vision width
    fv: int  # vision MLP width
    vlayers: int
    vheads: int
    patch: int
    channels: int
    d: int  # LLM width
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


def shapes(config: LlavaMiniConfig) -> _Shapes:
    """The widths and depths the counts use, read from the config."""
    v, t = config.vision, config.text
    heads = t["num_attention_heads"]
    return _Shapes(
        dv=v["hidden_size"], fv=v["intermediate_size"], vlayers=v["num_hidden_layers"],
        vheads=v["num_attention_heads"], patch=v["patch_size"], channels=v.get("num_channels", 3),
        d=t["hidden_size"], ffn=t["intermediate_size"], layers=t["num_hidden_layers"], heads=heads,
        kv_heads=t.get("num_key_value_heads") or heads, head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        vocab=t["vocab_size"], tied=bool(t.get("tie_word_embeddings", False)),
    )


# --- parameter counts ---------------------------------------------------------------------------

def decoder_layer_params(config: LlavaMiniConfig) -> int:
    """Parameters of one LlamaDecoderLayer (no biases: ``attention_bias``/``mlp_bias`` false)."""
    s = shapes(config)
    t = config.text
    attn = s.d * s.heads * s.head_dim * 2 + s.d * s.kv_heads * s.head_dim * 2
    if t.get("attention_bias"):
        attn += s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + s.d
    mlp = 3 * s.d * s.ffn + (2 * s.ffn + s.d if t.get("mlp_bias") else 0)
    return attn + mlp + 2 * s.d


def stage_params(config, model: str = "mini") -> dict[str, int]:
    """Parameter count of each part: vision_tower, projector, compressor, prefusion, llm.

    ``llm`` includes the token embedding, the final norm and an untied lm_head. The compressor
    counts its (frozen) position table, as the state dict holds it.
    """
    config = resolve_config(config)
    _check_model(model)
    s = shapes(config)
    np_ = config.num_patches
    vision = (s.channels * s.patch ** 2 * s.dv + s.dv + (np_ + 1) * s.dv + 2 * s.dv  # conv, cls, pos, pre-LN
              + s.vlayers * (4 * (s.dv * s.dv + s.dv) + 4 * s.dv + 2 * s.dv * s.fv + s.fv + s.dv)
              + 2 * s.dv)  # post-LN
    projector = s.dv * s.d + s.d + s.d * s.d + s.d
    q = config.tokens_per_image
    compressor = 2 * q * s.dv + 4 * (s.dv * s.dv + s.dv) + 4 * s.dv
    prefusion = config.prefusion_layers * decoder_layer_params(config)
    llm = s.vocab * s.d * (1 if s.tied else 2) + s.layers * decoder_layer_params(config) + s.d
    out = {"vision_tower": vision, "projector": projector, "compressor": compressor,
           "prefusion": prefusion, "llm": llm}
    if model == "baseline":
        out["compressor"] = 0
        out["prefusion"] = 0
    return out


# --- per-stage formulas ---------------------------------------------------------------------------

def _llama_linear_per_row(s: _Shapes) -> int:
    """2 x MACs of one decoder layer's linear layers for one row (Q, K, V, O, gate, up, down)."""
    return 2 * (2 * s.d * s.heads * s.head_dim + 2 * s.d * s.kv_heads * s.head_dim + 3 * s.d * s.ffn)


def _llama_kv_per_row(s: _Shapes) -> int:
    return 2 * 2 * s.d * s.kv_heads * s.head_dim


def _attn_pairs(queries: int, keys: int, mask_aware: bool) -> int:
    """Query-key pairs a causal attention computes: bottom-right aligned when ``mask_aware``."""
    if not mask_aware:
        return queries * keys
    prefix = keys - queries
    return queries * prefix + queries * (queries + 1) // 2


def _decoder_stack(s: _Shapes, n_layers: int, rows: int, prefix: int, attn: bool, mask_aware: bool,
                   last_rows: int | None = None) -> int:
    """FLOPs of ``n_layers`` causal decoder layers over ``rows`` new rows after a cached ``prefix``.

    ``last_rows``: the last layer computes only its last ``last_rows`` output rows (K/V for all).
    """
    if n_layers == 0 or rows == 0:
        return 0
    per_pair = 2 * 2 * s.heads * s.head_dim  # QK^T and PV, 2 FLOPs per MAC
    full = _llama_linear_per_row(s) * rows + (per_pair * _attn_pairs(rows, prefix + rows, mask_aware) if attn else 0)
    if last_rows is None or last_rows >= rows:
        return n_layers * full
    kv = _llama_kv_per_row(s)
    last = kv * rows + (_llama_linear_per_row(s) - kv) * last_rows
    if attn:
        last += per_pair * _attn_pairs(last_rows, prefix + rows, mask_aware)
    return (n_layers - 1) * full + last


def _visionzip_flops(s: _Shapes, config: LlavaMiniConfig, v: VisionZip) -> int:
    """VisionZip's own matmuls per image: the [CLS] attention row (recomputed from the layer's
    queries and keys), the merged tokens' similarity to the targets, and their averaging."""
    n = config.num_patches + 1
    merged = n - v.dominant - v.contextual
    head_dim = s.dv // config.vision["num_attention_heads"]
    return 2 * n * s.dv + 2 * merged * v.contextual * head_dim + 2 * v.contextual * merged * s.dv


def _fastv_readout_flops(s: _Shapes, rows: int, attn: bool) -> int:
    """FastV's read-out in layer K - 1: the last row's query, every row's key (recomputed from the
    layer's input) and, with attention counted, the one score row."""
    linear = 2 * s.d * s.heads * s.head_dim + 2 * s.d * s.kv_heads * s.head_dim * rows
    return linear + (2 * s.heads * s.head_dim * rows if attn else 0)


def _vision_flops(s: _Shapes, config: LlavaMiniConfig, crops: int, attn: bool) -> int:
    np_ = config.num_patches
    n = np_ + 1  # with CLS
    conv = 2 * np_ * s.channels * s.patch ** 2 * s.dv
    per_layer = 2 * n * (4 * s.dv * s.dv + 2 * s.dv * s.fv)
    if attn:
        per_layer += 2 * 2 * n * n * s.dv
    return crops * (conv + s.vlayers * per_layer)


def _compressor_flops(s: _Shapes, config: LlavaMiniConfig, images: int, n: int, form: str, convention: str,
                      calls: int = 1) -> int:
    """The compressor over ``images`` inputs of ``n`` tokens each, in ``calls`` launches."""
    q, dv, h = config.tokens_per_image, s.dv, config.compressor_heads
    if form == "projected":
        per_image = 2 * 2 * n * dv * dv  # K and V projections
        if convention == "paper":
            return images * (per_image + 2 * 2 * q * dv * dv)  # + Q and O projections per image
        per_image += 2 * 2 * q * n * dv + 2 * q * dv * dv  # scores + PV, out projection
        return images * per_image + calls * 2 * q * dv * dv  # the query projection once per call
    # absorbed: per call Q projection and W_k^T q per head; per image scores and weighted sums over
    # LN(x) at full width for each head, then W_v per head and the out projection.
    per_call = 2 * q * dv * dv + 2 * q * dv * dv
    per_image = 2 * 2 * h * q * n * dv + 2 * q * dv * dv + 2 * q * dv * dv
    return calls * per_call + images * per_image


def compressor_auto_form(heads: int, queries: int, dim: int) -> str:
    """The form the fused compressor kernel picks for this shape (its ``choose_form``): absorbed while
    its [H*C^2, D] accumulator fits the register budget (D = 1024: H*C^2 <= 32), projected otherwise.
    Falls back to the design rule H*C^2 < D when the kernel module cannot be imported."""
    try:
        from llava_mini.kernels.compress.triton import choose_form
    except Exception:  # no triton: the design rule
        return "absorbed" if heads * queries < dim else "projected"
    return choose_form(heads, queries, dim)


def _prefusion_flops(s: _Shapes, layers: int, n_vis: int, q: int, text: int, attn: bool, mask_aware: bool,
                     prefix_split: bool, prune_last_layer: bool, prefix_cached: bool) -> int:
    """Pre-fusion FLOPs for one image/frame, as the model schedules it.

    Split (``prefix_split``): the prefix [vision ; compressed] runs alone (its last layer pruned to
    the compressed rows when ``prune_last_layer``), then the text rows run against its keys. Not
    split: one causal stack over all rows (last layer keeping C^2 + text rows when pruned). Under
    ``mask_aware`` both schedules compute the same pairs; dense (eager) counts differ.
    """
    prefix = n_vis + q
    text_part = _decoder_stack(s, layers, text, prefix, attn, mask_aware)
    if prefix_cached:
        return text_part
    if prefix_split:
        head = _decoder_stack(s, layers, prefix, 0, attn, mask_aware, q if prune_last_layer else None)
        return head + text_part
    return _decoder_stack(s, layers, prefix + text, 0, attn, mask_aware, q + text if prune_last_layer else None)


# --- the result -------------------------------------------------------------------------------------

@dataclass
class Cost:
    """FLOPs and minimal bytes per stage for one model and one workload.

    Attributes:
        model: ``"mini"`` or ``"baseline"``.
        convention: ``"paper"``, ``"full"`` or ``"counted"``.
        flops: FLOPs per stage (keys ``STAGES``, in order).
        bytes: minimal HBM traffic per stage at ``dtype``: weights read once + stage inputs and
            outputs + KV cache written (prefill) or read (decode).
        decode_steps: FLOPs of each decode forward (``new_tokens - 1`` of them).
        tokens: the token counts assumed (``llm_prompt``, ``prefusion_rows`` per image, ...).
        workload: the arguments that produced it.
    """

    model: str
    convention: str
    flops: dict[str, int]
    bytes: dict[str, int]
    decode_steps: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    workload: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All FLOPs: encode, prefill, lm_head and decode."""
        return sum(self.flops.values())

    @property
    def prefill(self) -> int:
        """FLOPs up to the first token's logits (every stage but decode)."""
        return self.total - self.flops["decode"]

    def tflops(self) -> dict[str, float]:
        """Per-stage TFLOPs plus ``llm`` (prefill + lm_head) and ``total``."""
        out = {k: v / 1e12 for k, v in self.flops.items()}
        out["llm"] = (self.flops["llm_prefill"] + self.flops["lm_head"]) / 1e12
        out["total"] = self.total / 1e12
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        d["prefill_total"] = self.prefill
        return d


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")


def count_flops(
    config,
    *,
    model: str = "mini",
    convention: str = "paper",
    batch: int = 1,
    frames: int = 1,
    hd: bool | None = None,
    prompt_len: int = PAPER_PROMPT_LEN,
    new_tokens: int = 0,
    compressor_form: str | None = None,
    prune_last_layer: bool = False,
    prefix_cached: bool = False,
    prefix_split: bool = False,
    lm_head: str | None = None,
    encode_calls: int = 1,
    dtype="bf16",
    reduction: FastV | VisionZip | None = None,
) -> Cost:
    """Count FLOPs (and minimal bytes) per stage of one forward workload.

    Args:
        config: a ``LlavaMiniConfig``, a preset name or a config dict.
        model: ``"mini"`` (LLaVA-Mini) or ``"baseline"`` (576-token LLaVA-1.5, same tower and LLM).
        convention: ``"paper"``, ``"full"`` or ``"counted"`` (see the module docstring).
        batch: number of prompts (each with one image, or one video of ``frames`` frames).
        frames: images per prompt: 1 for an image, T for a video (each frame one image).
        hd: high-resolution mode (r x r crops + the global view); default ``resolution_ratio > 1``.
        prompt_len: L, prompt tokens including the one ``<image>`` placeholder (>= 1).
        new_tokens: tokens generated: the first from the prefill logits, then ``new_tokens - 1``
            decode forwards.
        compressor_form: ``"projected"``, ``"absorbed"`` or ``"auto"`` (the fused kernel's own
            shape dispatch, :func:`compressor_auto_form`). Default: projected for ``paper`` and
            ``counted`` (the reference path), auto for ``full``. In ``full`` the per-call work on the
            weights alone (query projection, W_k^T q) is included; the kernel's registered FLOP
            formula leaves it out (4 C^2 D^2, 4 MFLOP at C=1).
        prune_last_layer: the last pre-fusion layer computes only the C^2 + text rows.
        prefix_cached: the vision and compressed rows' pre-fusion states are cached from an earlier
            question on the same image: only the text rows are computed (``full``), and the vision
            tower, projector and compressor are not run again.
        prefix_split: schedule pre-fusion as the model's ``Savings.prefix_split`` does (prefix rows
            first, then text rows against their keys). Changes only dense (``counted``) counts.
        encode_calls: compressor launches (the query projection is paid once per launch; the
            model makes one per ``embed_vision`` call: one per image batch, one per frame chunk).
        lm_head: ``"all"`` positions or ``"last"``; default all for ``paper``/``counted``, last for ``full``.
        dtype: the element size for the byte counts.
        reduction: the baseline's token reduction (``model="baseline"`` only). ``VisionZip``: the
            projector and LLM see its tokens; its [CLS] read-out and merge matmuls are added to
            ``vision_encoder`` (not in ``paper``: they are not linear layers). ``FastV``: the first K
            LLM layers see all tokens, the rest the kept ones (prefill and decode); its read-out in
            layer K - 1 (the last query, every key recomputed from the layer input, the score row) is
            added to ``llm_prefill`` (``paper``: its projections only). ``tokens["reduction_flops"]``
            holds that added work.

    Returns:
        A :class:`Cost`.
    """
    config = resolve_config(config)
    _check_model(model)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    _nonneg_int("batch", batch, 1)
    _nonneg_int("frames", frames, 1)
    _nonneg_int("prompt_len", prompt_len, 1)
    _nonneg_int("new_tokens", new_tokens, 0)
    _nonneg_int("encode_calls", encode_calls, 1)
    if hd is None:
        hd = config.resolution_ratio > 1
    if hd and config.resolution_ratio < 2:
        raise ValueError("hd: the config has resolution_ratio 1; HD needs resolution_ratio >= 2")
    if hd and frames > 1:
        raise ValueError("hd: HD mode is for single images; video frames use the 336 px path (frames > 1)")
    if model == "baseline" and hd:
        raise ValueError("hd: the 576-token LLaVA-1.5 baseline has no HD mode; pass hd=False")
    if compressor_form is None:
        compressor_form = "auto" if convention == "full" else "projected"
    if compressor_form not in COMPRESSOR_FORMS:
        raise ValueError(f"compressor_form: expected one of {COMPRESSOR_FORMS}, got {compressor_form!r}")
    if lm_head is None:
        lm_head = "last" if convention == "full" else "all"
    if lm_head not in ("all", "last"):
        raise ValueError(f"lm_head: expected 'all' or 'last', got {lm_head!r}")
    if (prune_last_layer or prefix_cached) and model == "baseline":
        raise ValueError("prune_last_layer/prefix_cached: pre-fusion savings apply to model='mini' only")
    if prefix_cached and convention == "paper":
        raise ValueError("prefix_cached: not part of the paper convention; use convention='full'")
    if reduction is not None and model != "baseline":
        raise ValueError("reduction: FastV and VisionZip apply to model='baseline' only")
    if reduction is not None and not isinstance(reduction, (FastV, VisionZip)):
        raise ValueError(f"reduction: expected None, a FastV or a VisionZip, got {reduction!r}")
    nbytes = _dtype_bytes(dtype)

    s = shapes(config)
    attn = convention != "paper"
    mask_aware = convention == "full"
    r = config.resolution_ratio if hd else 1
    crops_per_image = r * r + 1 if hd else 1
    np_ = config.num_patches
    images = batch * frames
    text_rows = prompt_len  # pre-fusion runs every prompt row; the placeholder's row is masked padding
    q = config.tokens_per_image if model == "mini" else np_
    if isinstance(reduction, VisionZip):
        q = reduction.tokens
    llm_tokens = prompt_len - 1 + frames * q  # per prompt
    fastv = reduction if isinstance(reduction, FastV) else None
    # FastV: layers from K on hold the kept tokens only
    kept_tokens = prompt_len - 1 + frames * fastv.keep if fastv else llm_tokens

    flops = dict.fromkeys(STAGES, 0)
    byts = dict.fromkeys(STAGES, 0)
    params = stage_params(config, model)
    tokens = {"llm_prompt": llm_tokens, "text_rows": text_rows, "vision_tokens_per_image": q,
              "crops_per_image": crops_per_image}

    run_vision = not prefix_cached
    if run_vision:
        crops = images * crops_per_image
        flops["vision_encoder"] = _vision_flops(s, config, crops, attn)
        if isinstance(reduction, VisionZip) and attn:
            tokens["reduction_flops"] = crops * _visionzip_flops(s, config, reduction)
            flops["vision_encoder"] += tokens["reduction_flops"]
        pix = crops * s.channels * config.crop_size ** 2
        byts["vision_encoder"] = nbytes * (params["vision_tower"] + pix + crops * np_ * s.dv)

    if model == "baseline":
        proj_rows = images * q  # 576, or VisionZip's tokens
    else:
        n_vis = np_ * (r * r + 1) if hd else np_  # crops' tiled tokens + the global view
        n_comp_in = np_ * r * r if hd else np_  # HD compresses the tiled crop tokens
        proj_rows = images * (n_vis + q)
        tokens.update(prefusion_rows=n_vis + q + text_rows, compressor_input=n_comp_in)
        if run_vision:
            form = compressor_form
            if form == "auto":
                form = compressor_auto_form(config.compressor_heads, q, s.dv)
            tokens["compressor_absorbed"] = int(form == "absorbed")
            flops["compressor"] = _compressor_flops(s, config, images, n_comp_in, form, convention, encode_calls)
            byts["compressor"] = nbytes * (params["compressor"] + images * (n_comp_in + q) * s.dv)
        # pre-fusion, per image/frame: [vision ; compressed ; text]
        if config.prefusion_layers:
            flops["prefusion"] = images * _prefusion_flops(
                s, config.prefusion_layers, n_vis, q, text_rows, attn, mask_aware,
                prefix_split=prefix_split, prune_last_layer=prune_last_layer, prefix_cached=prefix_cached)
            kv_row = 2 * s.kv_heads * s.head_dim
            rows = text_rows if prefix_cached else n_vis + q + text_rows
            byts["prefusion"] = nbytes * (params["prefusion"] + images * (
                2 * rows * s.d + config.prefusion_layers * (n_vis + q + text_rows) * kv_row))
    if run_vision:
        flops["projector"] = 2 * proj_rows * (s.dv * s.d + s.d * s.d)
        byts["projector"] = nbytes * (params["projector"] + proj_rows * (s.dv + s.d))

    # LLM prefill and lm_head. transformers' LLaVA-1.5 adds <image> to the vocabulary and pads it to
    # a multiple of 64 (32000 -> 32064): counted for the baseline outside the paper convention.
    vocab = s.vocab
    if model == "baseline" and convention != "paper":
        vocab = (s.vocab // 64 + 1) * 64
        s = dataclasses.replace(s, vocab=vocab)
    full_layers = fastv.layer if fastv else s.layers
    flops["llm_prefill"] = batch * (_decoder_stack(s, full_layers, llm_tokens, 0, attn, mask_aware)
                                    + _decoder_stack(s, s.layers - full_layers, kept_tokens, 0, attn, mask_aware))
    if fastv:
        tokens["reduction_flops"] = batch * _fastv_readout_flops(s, llm_tokens, attn)
        flops["llm_prefill"] += tokens["reduction_flops"]
        tokens["llm_kept"] = kept_tokens
    kv_row = 2 * s.kv_heads * s.head_dim
    kv_rows = full_layers * llm_tokens + (s.layers - full_layers) * kept_tokens  # rows x layers of the cache
    # decoder layers + final norm (the embedding table is gathered, not streamed; lm_head apart)
    llm_weights = params["llm"] - s.vocab * s.d * (1 if s.tied else 2)
    byts["llm_prefill"] = nbytes * (llm_weights + batch * (llm_tokens * s.d + kv_rows * kv_row))
    head_rows = kept_tokens if lm_head == "all" else 1
    flops["lm_head"] = batch * 2 * head_rows * s.d * s.vocab
    byts["lm_head"] = nbytes * (s.vocab * s.d + batch * head_rows * s.d) + 4 * batch * head_rows * s.vocab

    # decode: new_tokens - 1 forwards of one token over a growing cache
    steps = []
    for t in range(max(new_tokens - 1, 0)):
        step = (_decoder_stack(s, full_layers, 1, llm_tokens + t, attn, mask_aware)
                + _decoder_stack(s, s.layers - full_layers, 1, kept_tokens + t, attn, mask_aware) + 2 * s.d * s.vocab)
        steps.append(batch * step)
        cached = kv_rows + (t + 1) * s.layers
        byts["decode"] += nbytes * (llm_weights + s.vocab * s.d + batch * (cached * kv_row + 2 * s.d)) + 4 * batch * s.vocab
    flops["decode"] = sum(steps)
    tokens["decode_forwards"] = len(steps)

    workload = dict(config=config.name, reduction=repr(reduction) if reduction else None, batch=batch, frames=frames, hd=bool(hd), prompt_len=prompt_len,
                    new_tokens=new_tokens, compressor_form=compressor_form, prune_last_layer=prune_last_layer,
                    prefix_cached=prefix_cached, prefix_split=prefix_split, lm_head=lm_head, dtype=str(dtype).removeprefix("torch."))
    return Cost(model=model, convention=convention, flops=flops, bytes=byts, decode_steps=steps,
                tokens=tokens, workload=workload)


def compare(config, **kwargs) -> dict[str, Cost]:
    """``{"mini": Cost, "baseline": Cost}`` for the same workload (pre-fusion options apply to mini)."""
    base_kwargs = {k: v for k, v in kwargs.items() if k not in ("prune_last_layer", "prefix_cached", "prefix_split",
                                                                   "compressor_form", "encode_calls")}
    return {"mini": count_flops(config, model="mini", **kwargs),
            "baseline": count_flops(config, model="baseline", **base_kwargs)}


def paper_table(prompt_len: int = PAPER_PROMPT_LEN, preset: str = "llava-mini-vicuna-7b") -> dict:
    """Table 14 (336 px) recomputed in the paper convention, TFLOPs, beside the paper's numbers.

    Returns ``{"mini": {...}, "baseline": {...}, "paper": PAPER_TABLE14, "notes": PAPER_NOTES}``;
    each model dict has ``vision_encoder, projector, compressor, prefusion, llm, total``.
    """
    out = {}
    for model, cost in compare(preset, convention="paper", prompt_len=prompt_len).items():
        t = cost.tflops()
        out[model] = {k: t[k] for k in ("vision_encoder", "projector", "compressor", "prefusion", "llm", "total")}
    out["paper"] = PAPER_TABLE14
    out["notes"] = PAPER_NOTES
    return out


def format_table(costs: dict[str, Cost], unit: float = 1e12) -> str:
    """A markdown table of per-stage FLOPs (TFLOPs by default) for several costs side by side."""
    names = list(costs)
    lines = ["| stage | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for stage in STAGES + ("total",):
        vals = [(c.total if stage == "total" else c.flops[stage]) / unit for c in costs.values()]
        lines.append(f"| {stage} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    return "\n".join(lines)
