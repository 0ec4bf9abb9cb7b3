"""The methods table: LLaVA-Mini beside LLaVA-1.5 with its vision tokens pruned (FastV, VisionZip),
as analytic costs per image (tokens, FLOPs in every convention, KV bytes, frames in a budget);
``compare.Bench.compare_methods`` adds the measured times."""

from __future__ import annotations

from llava_mini.lmm.reduction import FASTV_DEFAULT_LAYER, FastV, VisionZip
from llava_mini.profiling import flops as F
from llava_mini.profiling import memory as M

BASELINE = "llava-1.5"  # the 576-token reference every ratio is taken against
MINI = "llava-mini"
DEFAULT_BUDGETS = (64, 128, 192)  # the token budgets FastV and VisionZip are published at


def fastv_layer_for(config) -> int:
    """FastV's K: the paper's 2, or fewer where the LLM is shallower (a layer must be left to prune)."""
    return max(1, min(FASTV_DEFAULT_LAYER, config.text["num_hidden_layers"] - 1))


def reduction_methods(config, budgets=DEFAULT_BUDGETS) -> dict[str, FastV | VisionZip | None]:
    """``{name: reduction}`` for the baseline: itself (None), then FastV and VisionZip at each budget."""
    layer = fastv_layer_for(config)
    out: dict[str, FastV | VisionZip | None] = {BASELINE: None}
    out.update({f"fastv-{t}": FastV(layer=layer, keep=t) for t in budgets})
    out.update({f"visionzip-{t}": VisionZip.for_budget(t) for t in budgets})
    return out


def method_costs(name: str, config, reduction=None, *, prompt_len: int, dtype: str = "bf16",
                 vram_bytes: int = 24 * M.GiB, mini_savings: dict | None = None) -> dict:
    """One row's analytic part: tokens per image (the LLM's input, and what its KV cache holds per
    layer on average), prefill FLOPs per image in each convention (the method's own work included),
    KV bytes per image and the frames the planner fits in ``vram_bytes`` (one prompt, ``dtype``).

    ``name == MINI`` describes LLaVA-Mini (``mini_savings``: its ``prune_last_layer``/``prefix_split``
    where a convention counts them); otherwise the baseline under ``reduction``.
    """
    model = "mini" if name == MINI else "baseline"
    kw = {"reduction": reduction} if model == "baseline" else {}
    flops = {}
    for convention in F.CONVENTIONS:
        extra = dict(mini_savings or {}) if model == "mini" and convention != "paper" else {}
        if convention != "counted":
            extra.pop("prefix_split", None)
        flops[convention] = F.count_flops(config, model=model, convention=convention, prompt_len=prompt_len,
                                          dtype=dtype, **kw, **extra).prefill
    kv = M.kv_bytes_per_image(config, model, dtype, **kw)
    plan = M.plan(config, vram_bytes=vram_bytes, dtype=dtype, prompt_len=prompt_len, model=model, **kw)
    held = config.tokens_per_image if model == "mini" else (reduction.tokens if reduction else config.num_patches)
    return {"method": name, "reduction": repr(reduction) if reduction is not None else None,
            "tokens_held_per_image": held,  # FastV's: in the layers after K (the first K hold all 576)
            "llm_input_tokens_per_image": M.tokens_per_image(config, model, **kw),
            "kv_tokens_per_image": kv / M.kv_bytes_per_token(config, dtype),
            "prefill_flops_per_image": flops, "kv_bytes_per_image": kv,
            "frames_in_budget": plan.max_frames, "budget_bytes": int(vram_bytes), "dtype": dtype}
