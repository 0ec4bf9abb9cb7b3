"""Analytic FLOP counts: the paper's Table 14, internal consistency, and FlopCounterMode cross-checks."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_mini.lmm.config import LlavaMiniConfig
from llava_mini.lmm.reduction import make_reduction
from llava_mini.profiling import flops as F

VICUNA = "llava-mini-vicuna-7b"


def rel(a, b):
    return abs(a - b) / abs(b)


# --- the paper (Table 14, 336 px, Vicuna-7B) ---------------------------------------------------------

def test_paper_table14_rows_within_2_percent():
    t = F.paper_table()
    paper = F.PAPER_TABLE14
    for key in ("vision_encoder", "projector", "llm", "total"):
        assert rel(t["baseline"][key], paper["baseline"][key]) < 0.02, key
    for key in ("vision_encoder", "projector", "total"):
        assert rel(t["mini"][key], paper["mini"][key]) < 0.02, key
    # The paper's pre-fusion / LLM split is not the architecture's (see PAPER_NOTES); their sum is.
    ours = t["mini"]["prefusion"] + t["mini"]["llm"]
    assert rel(ours, paper["mini"]["prefusion"] + paper["mini"]["llm"]) < 0.02
    # Compressor: 0.001 T in the paper, 0.0024 T as 2 x MACs of the projected form: a 0.07% effect on the total.
    assert abs(t["mini"]["compressor"] - paper["mini"]["compressor"]) < 0.002
    assert F.PAPER_PROMPT_LEN == 44


def test_paper_prompt_len_is_the_best_fit():
    # 44 (43 text tokens + <image>) is the prompt length that best reproduces the baseline LLM row.
    errs = {L: abs(F.paper_table(L)["baseline"]["llm"] - 8.177) for L in range(30, 60)}
    assert min(errs, key=errs.get) == 44


def test_paper_per_token_shapes_vicuna():
    cost = F.count_flops(VICUNA, convention="paper", model="baseline", prompt_len=1)
    # 575 + 1 ... a prompt of only the placeholder: 576 LLM tokens, linear-only, lm_head at each.
    per_token = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000)
    assert cost.flops["llm_prefill"] + cost.flops["lm_head"] == 576 * per_token
    vit = 2 * (576 * 3 * 14 * 14 * 1024 + 24 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096))
    assert cost.flops["vision_encoder"] == vit


# --- options and errors ---------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="convention"):
        F.count_flops(VICUNA, convention="bogus")
    with pytest.raises(ValueError, match="preset"):
        F.count_flops("no-such-preset")
    with pytest.raises(ValueError, match="frames"):
        F.count_flops(VICUNA, frames=0)
    with pytest.raises(ValueError, match="batch"):
        F.count_flops(VICUNA, batch=-1)
    with pytest.raises(ValueError, match="prompt_len"):
        F.count_flops(VICUNA, prompt_len=0)
    with pytest.raises(ValueError, match="new_tokens"):
        F.count_flops(VICUNA, new_tokens=-2)
    with pytest.raises(ValueError, match="model"):
        F.count_flops(VICUNA, model="llava")
    with pytest.raises(ValueError, match="compressor_form"):
        F.count_flops(VICUNA, compressor_form="magic")
    with pytest.raises(ValueError, match="hd"):
        F.count_flops("llava-mini-hd-vicuna-7b", model="baseline")
    with pytest.raises(ValueError, match="dtype"):
        F.count_flops(VICUNA, dtype="fp7")


def test_mask_aware_counts_fewer_attention_pairs_than_dense():
    full = F.count_flops(VICUNA, convention="full", lm_head="all", compressor_form="projected")
    dense = F.count_flops(VICUNA, convention="counted")
    paper = F.count_flops(VICUNA, convention="paper")
    assert paper.flops["llm_prefill"] < full.flops["llm_prefill"] < dense.flops["llm_prefill"]
    # non-causal vision attention is the same in both
    assert full.flops["vision_encoder"] == dense.flops["vision_encoder"]
    n = full.tokens["llm_prompt"]
    attn_dense = dense.flops["llm_prefill"] - paper.flops["llm_prefill"]
    attn_causal = full.flops["llm_prefill"] - paper.flops["llm_prefill"]
    assert attn_dense * (n + 1) == attn_causal * 2 * n  # n^2 vs n(n+1)/2 pairs


def test_prefix_cache_decomposes_the_causal_prefusion_exactly():
    # Causality: pre-fusion of [vision; compressed; text] = the prefix rows alone + the text rows after it.
    cfg = LlavaMiniConfig.from_preset(VICUNA)
    s = F.shapes(cfg)
    whole = F.count_flops(cfg, convention="full", prompt_len=44).flops["prefusion"]
    second = F.count_flops(cfg, convention="full", prompt_len=44, prefix_cached=True)
    P = 576 + 1
    prefix_alone = 4 * (F._llama_linear_per_row(s) * P + 4 * s.heads * s.head_dim * P * (P + 1) // 2)
    assert prefix_alone + second.flops["prefusion"] == whole
    assert second.flops["vision_encoder"] == second.flops["compressor"] == second.flops["projector"] == 0
    assert second.flops["prefusion"] < whole / 10


def test_prefix_split_changes_only_dense_counts():
    full = [F.count_flops(VICUNA, convention="full", prefix_split=b, prune_last_layer=True).flops["prefusion"]
            for b in (False, True)]
    assert full[0] == full[1]
    dense = [F.count_flops(VICUNA, convention="counted", prefix_split=b).flops["prefusion"] for b in (False, True)]
    P, L = 577, 44  # split: the prefix rows never compute their (masked) pairs with the text keys
    assert dense[0] - dense[1] == 4 * P * L * 4 * 4096


def test_pruned_last_layer_saves_the_vision_rows():
    cfg = LlavaMiniConfig.from_preset(VICUNA)
    base = F.count_flops(cfg, convention="full").flops["prefusion"]
    pruned = F.count_flops(cfg, convention="full", prune_last_layer=True).flops["prefusion"]
    s = F.shapes(cfg)
    linear_no_kv = F._llama_linear_per_row(s) - F._llama_kv_per_row(s)
    pairs_saved = 576 * 577 // 2  # the 576 vision query rows of the last layer (a causal triangle)
    assert base - pruned == 576 * linear_no_kv + pairs_saved * 4 * s.heads * s.head_dim


def test_compressor_forms_and_auto_dispatch():
    from llava_mini.kernels.compress.op import compress_flops

    cfg = LlavaMiniConfig.from_preset(VICUNA)
    proj = F.count_flops(cfg, convention="full", compressor_form="projected").flops["compressor"]
    absd = F.count_flops(cfg, convention="full", compressor_form="absorbed").flops["compressor"]
    auto = F.count_flops(cfg, convention="full", batch=3).flops["compressor"]
    assert absd * 50 < proj  # C=1: ~100x fewer FLOPs absorbed
    per_call = 4 * 1 * 1024 * 1024  # query projection and W_k^T q: weight-only, outside the kernel's formula
    assert auto == compress_flops(3, 576, 1024, 1, 8) + per_call
    assert F.compressor_auto_form(8, 1, 1024) == "absorbed"
    # HD, C=8: H*C^2 = 512 > 32: the kernel runs the projected form over the 2304 tiled tokens
    hd = F.count_flops("llava-mini-hd-vicuna-7b", convention="full", batch=2)
    assert F.compressor_auto_form(8, 64, 1024) == "projected"
    assert hd.flops["compressor"] == compress_flops(2, 2304, 1024, 64, 8) + 2 * 64 * 1024 * 1024


def test_hd_video_and_batch_token_bookkeeping():
    hd = F.count_flops("llava-mini-hd-vicuna-7b", convention="paper")
    assert hd.tokens["crops_per_image"] == 5
    assert hd.tokens["llm_prompt"] == 64 + 43
    assert hd.tokens["prefusion_rows"] == 2304 + 576 + 64 + 44  # the placeholder row runs as padding
    assert hd.tokens["compressor_input"] == 2304
    one = F.count_flops(VICUNA, convention="paper")
    assert hd.flops["vision_encoder"] == 5 * one.flops["vision_encoder"]
    vid = F.count_flops(VICUNA, convention="counted", frames=8)
    assert vid.tokens["llm_prompt"] == 8 + 43
    single = F.count_flops(VICUNA, convention="counted")
    assert vid.flops["prefusion"] == 8 * single.flops["prefusion"]
    two = F.count_flops(VICUNA, convention="counted", batch=2, new_tokens=3)
    one_gen = F.count_flops(VICUNA, convention="counted", new_tokens=3)
    for stage in ("vision_encoder", "projector", "prefusion", "llm_prefill", "lm_head", "decode"):
        assert two.flops[stage] == 2 * one_gen.flops[stage], stage
    base_vid = F.count_flops(VICUNA, model="baseline", frames=8)
    assert base_vid.tokens["llm_prompt"] == 8 * 576 + 43


def test_ratio_mini_vs_baseline_and_table():
    costs = F.compare(VICUNA, convention="paper")
    assert 4.0 < costs["baseline"].total / costs["mini"].total < 4.8  # 8.55 / 1.96 = 4.36
    table = F.format_table(costs)
    assert "| prefusion |" in table and "| total |" in table


# --- counted cross-checks against FlopCounterMode (tiny config, eager attention) -------------------------

def _counted(fn):
    """FlopCounterMode's total, less the rotary embeddings' frequency tables: the counted convention
    leaves rotary out (as every convention does), and transformers computes that table as a matmul
    (5.16: ``inv_freq @ position_ids``, which the counter sees) or as a broadcast multiply (5.19 on,
    which it does not), so only what the counter attributes to rotary modules is removed."""
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fn()
    # A module's key is its path, or its class name where it runs outside a tracked parent (pre-fusion).
    rotary = sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items()
                 if name.rsplit(".", 1)[-1] in ("rotary_emb", "LlamaRotaryEmbedding"))
    return fc.get_total_flops() - rotary


@pytest.fixture(scope="module")
def tiny():
    return LlavaMiniConfig.from_preset("tiny")


def test_counted_parts_match_flop_counter(tiny):
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlamaModel

    from llava_mini.lmm.compressor import Resampler

    torch.manual_seed(0)
    B, L = 3, 6
    cost = F.count_flops(tiny, convention="counted", batch=B, prompt_len=L, new_tokens=2)
    params = F.stage_params(tiny)

    vc = tiny.vision_config()
    vc._attn_implementation = "eager"
    vision = CLIPVisionModel(vc).eval()
    assert sum(p.numel() for p in vision.parameters()) == params["vision_tower"]
    assert _counted(lambda: vision(torch.randn(B, 3, 28, 28), output_hidden_states=True)) == cost.flops["vision_encoder"]

    res = Resampler(tiny.compressor_size, tiny.vision["hidden_size"], tiny.compressor_heads)
    assert sum(p.numel() for p in res.parameters()) == params["compressor"]
    assert _counted(lambda: res(torch.randn(B, tiny.num_patches, 32))) == cost.flops["compressor"]

    tc = tiny.text_config()
    tc._attn_implementation = "eager"
    lm = LlamaForCausalLM(tc).eval()
    assert sum(p.numel() for p in lm.parameters()) == params["llm"]
    n = cost.tokens["llm_prompt"]
    assert _counted(lambda: lm(inputs_embeds=torch.randn(B, n, 64))) == cost.flops["llm_prefill"] + cost.flops["lm_head"]

    # one decode forward over the cache
    with torch.no_grad():
        out = lm(inputs_embeds=torch.randn(B, n, 64), use_cache=True)
    step = _counted(lambda: lm(input_ids=torch.ones(B, 1, dtype=torch.long), past_key_values=out.past_key_values,
                               use_cache=True))
    assert step == cost.decode_steps[0]

    tc.num_hidden_layers = tiny.prefusion_layers
    pre = LlamaModel(tc).eval()
    rows = cost.tokens["prefusion_rows"]
    assert rows == tiny.num_patches + 1 + L
    assert _counted(lambda: pre(inputs_embeds=torch.randn(B, rows, 64))) == cost.flops["prefusion"]


# --- the whole model under FlopCounterMode ------------------------------------------------------------------

def _ids(L, batch):
    from llava_mini.lmm.config import IMAGE_TOKEN_INDEX

    row = [1, 5, IMAGE_TOKEN_INDEX] + [7 + i for i in range(L - 3)]
    return torch.tensor([row] * batch)


@pytest.mark.parametrize("case", ["image", "batch2", "hd", "video", "unsplit"])
def test_counted_whole_model_generate_matches(case):
    from llava_mini.lmm.model import LlavaMini, Savings

    preset = "tiny-hd" if case == "hd" else "tiny"
    torch.manual_seed(0)
    model = LlavaMini.from_preset(preset)
    # The "torch" backend leaves the CLIP tower on its default (sdpa); FlopCounterMode does not count
    # CPU SDPA (aten._scaled_dot_product_flash_attention_for_cpu has no FLOP formula), so run it eager.
    model.vision_tower.config._attn_implementation = "eager"
    if case == "unsplit":
        model.savings = Savings(prefix_split=False, prune_last_layer=False)
    cfg = model.config
    L, G = 7, 3
    batch = 2 if case == "batch2" else 1
    frames = 5 if case == "video" else 1
    kwargs = dict(input_ids=_ids(L, batch), max_new_tokens=G, eos_token_id=None, backend="torch")
    if case == "video":
        kwargs["videos"] = [torch.rand(frames, 3, cfg.crop_size, cfg.crop_size)]
    elif case == "hd":
        kwargs["images"] = torch.rand(batch, 5, 3, cfg.crop_size, cfg.crop_size)
    else:
        kwargs["images"] = torch.rand(batch, 3, cfg.crop_size, cfg.crop_size)
    measured = _counted(lambda: model.generate(**kwargs))
    split = model.savings.prefix_split or case == "video"
    cost = F.count_flops(cfg, convention="counted", batch=batch, frames=frames, prompt_len=L, new_tokens=G,
                         lm_head="last", prefix_split=split, prune_last_layer=model.savings.prune_last_layer)
    assert measured == cost.total


def test_counted_baseline_generate_matches(tiny):
    from llava_mini.lmm.baseline import LlavaBaseline

    torch.manual_seed(0)
    model = LlavaBaseline.from_config(tiny)
    L, G = 6, 3
    kwargs = dict(images=torch.rand(2, 3, 28, 28), input_ids=_ids(L, 2), max_new_tokens=G, eos_token_id=None,
                  backend="torch")
    measured = _counted(lambda: model.generate(**kwargs))
    cost = F.count_flops(tiny, model="baseline", convention="counted", batch=2, prompt_len=L, new_tokens=G,
                         lm_head="last")
    assert measured == cost.total


@pytest.mark.parametrize("reduction", ["fastv", "visionzip"])
def test_counted_reduced_baseline_generate_matches(tiny, reduction):
    from llava_mini.lmm.baseline import LlavaBaseline

    torch.manual_seed(0)
    model = LlavaBaseline.from_config(tiny, reduction=make_reduction(reduction, 12, fastv_layer=1))
    L, G = 6, 3
    kwargs = dict(images=torch.rand(2, 3, 28, 28), input_ids=_ids(L, 2), max_new_tokens=G, eos_token_id=None,
                  backend="torch")
    measured = _counted(lambda: model.generate(**kwargs))
    cost = F.count_flops(tiny, model="baseline", convention="counted", batch=2, prompt_len=L, new_tokens=G,
                         lm_head="last", reduction=model.reduction)
    assert cost.tokens["reduction_flops"] > 0
    assert measured == cost.total


def test_reductions_cost_less_in_every_convention(tiny):
    from llava_mini.lmm.reduction import FastV, VisionZip

    for convention in F.CONVENTIONS:
        full = F.count_flops(tiny, model="baseline", convention=convention, new_tokens=4)
        for r in (FastV(layer=1, keep=12), VisionZip(dominant=10, contextual=2)):
            cost = F.count_flops(tiny, model="baseline", convention=convention, new_tokens=4, reduction=r)
            assert cost.prefill < full.prefill
            # the paper's convention counts linear layers only: a decode step's cost is context-free
            assert cost.flops["decode"] < full.flops["decode"] or convention == "paper"
    with pytest.raises(ValueError, match="reduction"):
        F.count_flops(tiny, model="mini", reduction=FastV())
