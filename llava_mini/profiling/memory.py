"""Memory: KV-cache bytes per token and per image, weight bytes, a frames-in-budget planner, and
measurement helpers (the KV cache's own tensor bytes on any device; peak allocated on CUDA; a
24 GB budget search on CUDA).

The planner is analytic. It predicts the most video frames one prompt can hold in ``vram_bytes``:

    budget = vram_bytes * (1 - margin)
    encode peak  = weights + T * per_frame_encode + chunk activation peak     (frames streamed in chunks)
    prefill peak = weights + n * (KV + embeds + layer activations per token) + fixed,  n = T*C^2 + L - 1 (+ new)
    max_frames   = the largest T with both peaks <= budget

Everything it assumes is in the returned :class:`Plan` (bytes per frame of each kind), so a
measurement can be compared term by term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Callable

import torch

from llava_mini.lmm.reduction import FastV, VisionZip
from llava_mini.profiling.flops import _dtype_bytes, _nonneg_int, resolve_config, shapes, stage_params

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
DEFAULT_MARGIN = 0.10  # of the budget, held back for the allocator's fragmentation, CUDA context, workspaces
ATTN_IMPLS = ("sdpa", "eager", "flash")


# --- analytic ---------------------------------------------------------------------------------

def kv_bytes_per_token(config, dtype="fp16") -> int:
    """LLM KV-cache bytes per context token: 2 (K and V) x layers x kv_heads x head_dim x bytes.

    Vicuna-7B fp16: 2 x 32 x 32 x 128 x 2 = 512 KiB; Llama-3.1-8B (8 KV heads): 128 KiB.
    """
    s = shapes(resolve_config(config))
    return 2 * s.layers * s.kv_heads * s.head_dim * _dtype_bytes(dtype)


def tokens_per_image(config, model: str = "mini", reduction: FastV | VisionZip | None = None) -> int:
    """Tokens one image (or video frame) adds to the LLM's input: C^2 for LLaVA-Mini, 576 for the
    baseline, VisionZip's budget under ``reduction`` (FastV's input is still 576: it prunes inside)."""
    config = resolve_config(config)
    if reduction is not None and model != "baseline":
        raise ValueError("reduction: FastV and VisionZip apply to model='baseline' only")
    if model == "mini":
        return config.tokens_per_image
    if model == "baseline":
        return reduction.tokens if isinstance(reduction, VisionZip) else config.num_patches
    raise ValueError(f"model: expected 'mini' or 'baseline', got {model!r}")


def kv_bytes_per_image(config, model: str = "mini", dtype="fp16", reduction: FastV | VisionZip | None = None) -> int:
    """LLM KV-cache bytes one image or frame adds: its tokens x KV bytes per token; under FastV the
    first K layers cache all 576 tokens and the others the kept ones."""
    per_token = kv_bytes_per_token(config, dtype)
    if isinstance(reduction, FastV):
        layers = shapes(resolve_config(config)).layers
        full = resolve_config(config).num_patches
        return per_token // layers * (reduction.layer * full + (layers - reduction.layer) * reduction.keep)
    return tokens_per_image(config, model, reduction) * per_token


def weight_bytes(config, model: str = "mini", dtype="bf16") -> dict[str, int]:
    """Weight bytes per part (vision_tower, projector, compressor, prefusion, llm) and ``total``.

    Counted from the config (the same counts the tests check against the built modules).
    The baseline has no compressor or pre-fusion layers and pads its vocabulary to a multiple of 64
    (transformers' LLaVA adds ``<image>`` to it).
    """
    config = resolve_config(config)
    params = stage_params(config, model)
    if model == "baseline":
        s = shapes(config)
        extra_rows = (s.vocab // 64 + 1) * 64 - s.vocab
        params["llm"] += extra_rows * s.d * (1 if s.tied else 2)
    b = _dtype_bytes(dtype)
    out = {k: v * b for k, v in params.items()}
    out["total"] = sum(out.values())
    return out


def llm_activation_bytes_per_token(config, dtype="bf16") -> int:
    """Transient bytes per prefill token inside one decoder layer (freed layer by layer).

    Residual, normed input, Q, attention output (4 x d) and the SwiGLU intermediates alive at once
    (act(gate), up, their product: 3 x ffn). A deliberate small overestimate.
    """
    s = shapes(resolve_config(config))
    return (4 * s.d + 3 * s.ffn) * _dtype_bytes(dtype)


def encode_chunk_peak_bytes(config, frames: int, prompt_len: int = 64, dtype="bf16", attn: str = "sdpa",
                            keep_prefix_kv: bool = False) -> int:
    """Modelled activation peak of encoding one chunk of ``frames`` frames (or images), in bytes.

    The largest of three phases: the CLIP tower (pixels, every hidden state kept since the model asks
    for ``output_hidden_states``, one layer's transients, eager's score matrix), the projector and
    compressor, and the pre-fusion prefix (rows, one layer's transients, every layer's prefix K/V).
    ``keep_prefix_kv`` leaves the prefix K/V out (the planner then charges it per frame).
    """
    config = resolve_config(config)
    _nonneg_int("frames", frames, 1)
    _nonneg_int("prompt_len", prompt_len, 1)
    if attn not in ATTN_IMPLS:
        raise ValueError(f"attn: expected one of {ATTN_IMPLS}, got {attn!r}")
    s = shapes(config)
    b = _dtype_bytes(dtype)
    crops = frames * config.crops_per_image
    n = config.num_patches + 1
    pixels = crops * s.channels * config.crop_size ** 2 * b
    hidden = (s.vlayers + 1) * crops * n * s.dv * b
    clip_layer = crops * n * (4 * s.dv + 2 * s.fv) * b
    if attn == "eager":
        clip_layer += crops * s.vheads * n * n * (2 * b + 4)  # scores, fp32 softmax, probs
    clip = pixels + hidden + clip_layer
    n_vis = config.num_patches * config.crops_per_image
    q = config.tokens_per_image
    proj = frames * (n_vis + q) * (s.dv + 3 * s.d) * b
    rows = n_vis + q
    kv_row = 2 * s.kv_heads * s.head_dim * b
    layer = frames * (rows + prompt_len) * (s.d * b) + frames * rows * (llm_activation_bytes_per_token(config, dtype))
    if attn == "eager":
        layer += frames * s.heads * (rows + prompt_len) ** 2 * (2 * b + 4)
    prefix_kv = 0 if keep_prefix_kv else config.prefusion_layers * frames * (rows + prompt_len) * kv_row
    prefusion = frames * n_vis * s.d * b + layer + prefix_kv  # projected vision rows stay alive
    return max(clip, proj, prefusion)


@dataclass
class Plan:
    """What the planner assumed and predicts. Bytes unless named otherwise.

    ``max_frames`` is the prediction; ``per_frame`` the bytes each added frame costs at the peak
    (KV + LLM input embeddings + prefill activations + what the schedule keeps per frame).
    """

    config: str
    model: str
    dtype: str
    vram_bytes: int
    margin: float
    prompt_len: int
    new_tokens: int
    chunk_frames: int
    attn: str
    weights: int
    kv_per_token: int
    kv_per_frame: int
    tokens_per_frame: int
    embeds_per_frame: int
    activation_per_frame: int
    kept_per_frame: int
    encode_chunk_peak: int
    fixed: int
    per_frame: int
    encode_per_frame: int
    budget: int
    max_frames: int
    bound_by: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def prefill_peak(self, frames: int) -> int:
        """Predicted peak bytes of the LLM prefill (and decode) phase for ``frames`` frames."""
        return self.weights + self.fixed + frames * self.per_frame

    def encode_peak(self, frames: int) -> int:
        """Predicted peak bytes of the encode phase for ``frames`` frames."""
        return self.weights + self.encode_chunk_peak + frames * self.encode_per_frame


def plan(config, vram_bytes: int = 24 * GiB, dtype="bf16", prompt_len: int = 64, new_tokens: int = 32,
         model: str = "mini", chunk_frames: int | None = None, attn: str = "sdpa", margin: float = DEFAULT_MARGIN,
         pixels_on_device: bool = False, keep_prefix_kv: bool = False,
         reduction: FastV | VisionZip | None = None) -> Plan:
    """Predict the most video frames one prompt can hold in ``vram_bytes``.

    Args:
        config: a ``LlavaMiniConfig``, preset name or dict.
        vram_bytes: the budget (default 24 GiB).
        dtype: weights, activations and KV dtype.
        prompt_len: L prompt tokens (with the placeholder).
        new_tokens: tokens to generate (their KV counts).
        model: ``"mini"`` or ``"baseline"`` (576 tokens per frame; no pre-fusion).
        chunk_frames: frames encoded per batched launch (the encode activation peak scales with it);
            None: as the model sizes them by default (``frames_per_chunk``; fewer for HD).
        attn: ``"sdpa"``/``"flash"`` (no score matrix) or ``"eager"`` (scores materialised: quadratic).
        margin: fraction of the budget held back (allocator fragmentation, CUDA context, workspaces).
        pixels_on_device: all frames' pixels stay on the device (else streamed per chunk).
        keep_prefix_kv: every frame's pre-fusion prefix K/V is kept until its text is fused (else
            fused chunk by chunk and dropped).
        reduction: the baseline's FastV or VisionZip (KV per frame as ``kv_bytes_per_image``; under
            FastV the prefill's input and activations still hold all 576 tokens per frame).

    Returns:
        A :class:`Plan`; ``max_frames`` is 0 when the weights alone do not fit.
    """
    config = resolve_config(config)
    if model not in ("mini", "baseline"):
        raise ValueError(f"model: expected 'mini' or 'baseline', got {model!r}")
    if not isinstance(vram_bytes, (int, float)) or vram_bytes <= 0:
        raise ValueError(f"vram_bytes: expected a positive number of bytes, got {vram_bytes!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    if attn not in ATTN_IMPLS:
        raise ValueError(f"attn: expected one of {ATTN_IMPLS}, got {attn!r}")
    _nonneg_int("prompt_len", prompt_len, 1)
    _nonneg_int("new_tokens", new_tokens, 0)
    if chunk_frames is None:
        from llava_mini.lmm.model import Savings, frames_per_chunk

        chunk_frames = frames_per_chunk(config, _dtype_bytes(dtype), Savings().frame_budget_bytes)
    _nonneg_int("chunk_frames", chunk_frames, 1)
    b = _dtype_bytes(dtype)
    s = shapes(config)
    weights = weight_bytes(config, model, dtype)["total"]
    kv_tok = kv_bytes_per_token(config, dtype)
    tpf = tokens_per_image(config, model, reduction)
    kv_frame = kv_bytes_per_image(config, model, dtype, reduction)
    act_tok = llm_activation_bytes_per_token(config, dtype)
    embeds_tok = 3 * s.d * b  # the fused rows, the concatenated prompt, the left-padded batch copy
    eager_quadratic = attn == "eager"
    crops = config.crops_per_image
    kept = 0
    notes = []
    if pixels_on_device:
        kept += crops * s.channels * config.crop_size ** 2 * b
    if keep_prefix_kv and model == "mini":
        rows = crops * config.num_patches + tpf + prompt_len
        kept += config.prefusion_layers * rows * 2 * s.kv_heads * s.head_dim * b
    per_frame = kv_frame + tpf * (embeds_tok + act_tok) + kept
    fixed_tokens = prompt_len - 1 + new_tokens
    logits = 4 * s.vocab * 2  # the last position's logits (fp32) and a sampling copy
    fixed = fixed_tokens * (kv_tok + embeds_tok + act_tok) + logits
    if model == "mini":
        enc_chunk = encode_chunk_peak_bytes(config, chunk_frames, prompt_len, dtype, attn, keep_prefix_kv)
        encode_per_frame = tpf * s.d * b + kept
    else:
        enc_chunk = encode_chunk_peak_bytes(
            dataclasses.replace(config, prefusion_layers=0), chunk_frames, prompt_len, dtype, attn)
        encode_per_frame = tpf * s.d * b + kept
    budget = int(vram_bytes * (1 - margin))

    def fits(frames: int) -> bool:
        n = frames * tpf + fixed_tokens
        quad = s.heads * n * n * (2 * b + 4) if eager_quadratic else 0
        prefill = weights + fixed + frames * per_frame + quad
        encode = weights + enc_chunk + frames * encode_per_frame
        return prefill <= budget and encode <= budget

    if not fits(0):
        max_frames, bound = 0, "weights"
        notes.append("the weights (and fixed activations) alone exceed the budget")
    else:
        hi = 1
        while fits(hi) and hi < 1 << 40:
            hi *= 2
        lo = hi // 2  # fits(lo) holds (or lo == 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        max_frames = lo
        t = max_frames + 1
        n = t * tpf + fixed_tokens
        quad = s.heads * n * n * (2 * b + 4) if eager_quadratic else 0
        bound = "prefill" if weights + fixed + t * per_frame + quad > budget else "encode"
    notes.append(f"margin {margin:.0%} of the budget held back; activations are a modelled upper estimate")
    return Plan(config=config.name, model=model, dtype=str(dtype).removeprefix("torch."), vram_bytes=int(vram_bytes),
                margin=margin, prompt_len=prompt_len, new_tokens=new_tokens, chunk_frames=chunk_frames, attn=attn,
                weights=weights, kv_per_token=kv_tok, kv_per_frame=kv_frame, tokens_per_frame=tpf,
                embeds_per_frame=tpf * embeds_tok, activation_per_frame=tpf * act_tok, kept_per_frame=kept,
                encode_chunk_peak=enc_chunk, fixed=fixed, per_frame=per_frame, encode_per_frame=encode_per_frame,
                budget=budget, max_frames=max_frames, bound_by=bound, notes=notes)


# --- measurement ------------------------------------------------------------------------------------

def cache_bytes(cache) -> int:
    """Bytes held by a KV cache: a transformers ``Cache`` (``.layers`` with keys/values), legacy
    tuples of tensors, a ``Prefix``, or anything with ``past_key_values``."""
    if cache is None:
        return 0
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if hasattr(cache, "past_key_values") and not hasattr(cache, "layers"):
        return cache_bytes(cache.past_key_values)
    if hasattr(cache, "layers"):
        total = 0
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if isinstance(cache, (list, tuple)):
        return sum(cache_bytes(c) for c in cache)
    if hasattr(cache, "keys") and hasattr(cache, "values") and hasattr(cache, "compressed"):  # a Prefix
        return cache_bytes(list(cache.keys)) + cache_bytes(list(cache.values))
    raise TypeError(f"cache: cannot read tensor bytes from {type(cache).__name__}")


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux VmHWM) to its current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak RSS since the last reset (Linux VmHWM), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class PeakMemory:
    """Peaks over a block (``with peak_memory() as peak``), absolute and above the block's start.

    ``host_*``: process RSS (None where VmHWM cannot be reset); ``device_*``: CUDA memory allocated
    by tensors (None off CUDA).
    """

    host_start: int | None = None
    host_peak: int | None = None
    device_start: int | None = None
    device_peak: int | None = None

    @property
    def host_above_start(self) -> int | None:
        return None if self.host_peak is None else self.host_peak - self.host_start

    @property
    def device_above_start(self) -> int | None:
        return None if self.device_peak is None else self.device_peak - self.device_start

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "host_above_start": self.host_above_start,
                "device_above_start": self.device_above_start}


@contextlib.contextmanager
def peak_memory(device=None):
    """Measure the peak host RSS and peak CUDA allocation while the block runs.

    Host: the kernel's high-water mark, reset at the start (exact, whatever thread allocates).
    Device: ``torch.cuda.max_memory_allocated`` (when ``device`` is CUDA).
    """
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    peak = PeakMemory()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak.device_start = torch.cuda.memory_allocated(device)
    if reset_peak_rss():
        peak.host_start = process_rss_bytes()
    yield peak
    if cuda:
        torch.cuda.synchronize(device)
        peak.device_peak = torch.cuda.max_memory_allocated(device)
    if peak.host_start is not None:
        peak.host_peak = peak_rss_bytes()


def measure_video_memory(run: Callable[[int], object], frames, predict: Callable[[int], int], device=None) -> list[dict]:
    """Run ``run(count)`` (a video of ``count`` frames through encode + prefill) for each count and
    put the measured peaks beside ``predict(count)``, the predicted peak.

    Each row: ``frames``, ``predicted_peak``, ``device_peak`` (CUDA, absolute), ``host_peak`` (RSS,
    absolute) and ``host_above_start`` (RSS above the process's before the run: activations,
    frames, caches).
    """
    rows = []
    for count in frames:
        _nonneg_int("frames", count, 1)
        with peak_memory(device) as peak:
            out = run(count)
            del out
        rows.append(dict(frames=count, predicted_peak=predict(count),
                         device_peak=peak.device_peak, host_peak=peak.host_peak,
                         host_above_start=peak.host_above_start))
    return rows


@dataclass
class MemoryMeasurement:
    """Memory measured at several workload sizes and its least-squares slope per unit.

    ``method``: ``kv_tensors`` (the returned cache's tensor bytes: exact), ``cuda_peak``
    (``torch.cuda.max_memory_allocated`` above the pre-run allocation: includes activations),
    ``rss`` (process RSS growth while the output is alive: allocator-dependent, page-granular).
    """

    method: str
    counts: list[int]
    bytes: list[int]
    slope: float
    intercept: float
    tolerance: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TOLERANCES = {
    "kv_tensors": "exact (tensor bytes)",
    "cuda_peak": "allocator rounds to 512 B blocks and 2 MiB segments; compare slopes within ~5%",
    "rss": "page-granular, allocator caching: only a sanity check (+-50% or a few MiB)",
}


def _fit(xs, ys) -> tuple[float, float]:
    """Least-squares (slope, intercept), in exact rational arithmetic: integer byte counts on a line
    give their integer slope exactly (float sums can leave it an ulp off)."""
    xs, ys = [Fraction(x) for x in xs], [Fraction(y) for y in ys]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else Fraction(0)
    return float(slope), float(my - slope * mx)


def measure_slope(run: Callable[[int], object], counts, method: str = "auto", device=None) -> MemoryMeasurement:
    """Run ``run(count)`` for each count and fit bytes = slope * count + intercept.

    ``run`` returns what it produced (an object holding a KV cache for ``kv_tensors``).
    ``method="auto"``: ``cuda_peak`` on a CUDA device, else ``kv_tensors``.
    """
    counts = list(counts)
    if len(counts) < 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"counts: expected at least two non-negative ints, got {counts!r}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if method == "auto":
        method = "cuda_peak" if device.type == "cuda" else "kv_tensors"
    if method not in TOLERANCES:
        raise ValueError(f"method: expected one of {sorted(TOLERANCES)} or 'auto', got {method!r}")
    if method == "cuda_peak" and device.type != "cuda":
        raise ValueError("method: 'cuda_peak' needs a CUDA device")
    values = []
    for c in counts:
        if method == "cuda_peak":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = run(c)
            torch.cuda.synchronize(device)
            values.append(torch.cuda.max_memory_allocated(device) - before)
        elif method == "rss":
            before = process_rss_bytes()
            if before is None:
                raise ValueError("method: 'rss' needs /proc/self/statm (Linux)")
            out = run(c)
            values.append(process_rss_bytes() - before)
        else:
            out = run(c)
            values.append(cache_bytes(out))
        del out
    slope, intercept = _fit(counts, values)
    return MemoryMeasurement(method=method, counts=counts, bytes=values, slope=slope, intercept=intercept,
                             tolerance=TOLERANCES[method])


def max_frames_in_budget(run: Callable[[int], object], vram_bytes: int = 24 * GiB, lo: int = 1, hi: int = 1 << 15,
                         device=None) -> dict:
    """Measured: the most frames ``run(frames)`` completes with the process capped at ``vram_bytes`` (CUDA).

    Caps the caching allocator with ``torch.cuda.set_per_process_memory_fraction`` (weights already
    resident count against it), then binary-searches the largest count in [lo, hi] that does not
    raise ``torch.cuda.OutOfMemoryError``. The fraction is restored to 1.0 afterwards.

    Returns ``{"max_frames", "vram_bytes", "fraction", "tried": [(frames, ok), ...]}``;
    ``max_frames`` is ``lo - 1`` when even ``lo`` does not fit.
    """
    if not torch.cuda.is_available():
        raise ValueError("device: max_frames_in_budget needs a CUDA GPU")
    device = torch.device(device or "cuda")
    _nonneg_int("lo", lo, 1)
    _nonneg_int("hi", hi, lo)
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < vram_bytes <= total:
        raise ValueError(f"vram_bytes: expected (0, {total}] on this GPU, got {vram_bytes}")
    fraction = vram_bytes / total
    tried = []

    def ok(frames: int) -> bool:
        torch.cuda.empty_cache()
        try:
            out = run(frames)
            torch.cuda.synchronize(device)
            del out
            good = True
        except torch.cuda.OutOfMemoryError:
            good = False
        torch.cuda.empty_cache()
        tried.append((frames, good))
        return good

    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        if not ok(lo):
            best = lo - 1
        else:
            best, top = lo, hi + 1
            while top - best > 1:
                mid = (best + top) // 2
                best, top = (mid, top) if ok(mid) else (best, mid)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    return {"max_frames": best, "vram_bytes": int(vram_bytes), "fraction": fraction, "tried": tried}


def format_bytes(n: float) -> str:
    """``524288`` -> ``512.0 KiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


__all__ = ["Plan", "MemoryMeasurement", "kv_bytes_per_token", "kv_bytes_per_image", "tokens_per_image",
           "weight_bytes", "llm_activation_bytes_per_token", "encode_chunk_peak_bytes", "plan", "cache_bytes",
           "measure_slope", "max_frames_in_budget", "process_rss_bytes", "reset_peak_rss", "peak_rss_bytes",
           "PeakMemory", "peak_memory", "measure_video_memory", "format_bytes", "GiB", "MiB", "KiB"]
