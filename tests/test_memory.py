"""Memory: KV bytes, weight bytes, the frames-in-budget planner, and measured KV growth on the tiny model."""

import dataclasses

import pytest
import torch

from llava_mini.lmm.config import IMAGE_TOKEN_INDEX, LlavaMiniConfig
from llava_mini.profiling import memory as M

KiB, MiB, GiB = M.KiB, M.MiB, M.GiB


def test_kv_bytes_rows():
    assert M.kv_bytes_per_token("llava-mini-vicuna-7b", "fp16") == 512 * KiB
    assert M.kv_bytes_per_token("llava-mini-llama-3.1-8b", torch.float16) == 128 * KiB
    assert M.kv_bytes_per_token("llava-mini-llama-3.1-8b", "fp32") == 256 * KiB
    assert M.kv_bytes_per_image("llava-mini-vicuna-7b") == 512 * KiB
    assert M.kv_bytes_per_image("llava-mini-vicuna-7b", model="baseline") == 576 * 512 * KiB
    assert M.tokens_per_image("llava-mini-hd-vicuna-7b") == 64


def test_weight_bytes_match_the_built_models():
    from llava_mini.lmm.baseline import LlavaBaseline
    from llava_mini.lmm.model import LlavaMini

    cfg = LlavaMiniConfig.from_preset("tiny")
    mini = LlavaMini.from_config(cfg)
    numel = sum(p.numel() for p in mini.parameters())
    assert M.weight_bytes(cfg, "mini", "fp32")["total"] == 4 * numel
    base = LlavaBaseline.from_config(cfg)
    assert M.weight_bytes(cfg, "baseline", "fp32")["total"] == 4 * sum(p.numel() for p in base.parameters())
    # 7B scale, sanity: Vicuna-7B LLM is 6.74 B parameters
    llm = M.weight_bytes("llava-mini-vicuna-7b", dtype="bf16")["llm"] / 2
    assert abs(llm - 6.738e9) / 6.738e9 < 0.01


def test_plan_fits_exactly_and_targets():
    p = M.plan("llava-mini-llama-3.1-8b", vram_bytes=24 * GiB, dtype="bf16")
    assert p.kv_per_frame == 128 * KiB
    assert p.max_frames >= 10_000  # the paper's claim, on paper
    assert max(p.prefill_peak(p.max_frames), p.encode_peak(p.max_frames)) <= p.budget
    assert max(p.prefill_peak(p.max_frames + 1), p.encode_peak(p.max_frames + 1)) > p.budget
    base = M.plan("llava-mini-llama-3.1-8b", model="baseline")
    assert base.kv_per_frame == 576 * 128 * KiB
    assert 0 < base.max_frames < p.max_frames / 100
    # more memory, more frames; a bigger margin, fewer
    assert M.plan("llava-mini-llama-3.1-8b", vram_bytes=48 * GiB).max_frames > p.max_frames
    assert M.plan("llava-mini-llama-3.1-8b", margin=0.2).max_frames < p.max_frames
    # keeping every frame's pre-fusion prefix K/V costs ~80x the LLM KV per frame
    kept = M.plan("llava-mini-llama-3.1-8b", keep_prefix_kv=True)
    assert kept.max_frames < p.max_frames / 20
    tiny = M.plan("tiny", vram_bytes=1 * KiB)
    assert tiny.max_frames == 0 and tiny.bound_by == "weights"


def test_plan_errors_name_the_argument():
    with pytest.raises(ValueError, match="vram_bytes"):
        M.plan("tiny", vram_bytes=-1)
    with pytest.raises(ValueError, match="margin"):
        M.plan("tiny", margin=1.5)
    with pytest.raises(ValueError, match="preset"):
        M.plan("nope")
    with pytest.raises(ValueError, match="prompt_len"):
        M.plan("tiny", prompt_len=0)
    with pytest.raises(ValueError, match="attn"):
        M.plan("tiny", attn="xformers")
    with pytest.raises(ValueError, match="model"):
        M.kv_bytes_per_image("tiny", model="gpt")
    with pytest.raises(ValueError, match="counts"):
        M.measure_slope(lambda n: None, [3])
    with pytest.raises(ValueError, match="method"):
        M.measure_slope(lambda n: None, [1, 2], method="cuda_peak", device="cpu")


def _ids(L=6):
    return torch.tensor([[1, 5, IMAGE_TOKEN_INDEX] + list(range(7, 7 + L - 3))])


@pytest.fixture(scope="module")
def tiny_model():
    from llava_mini.lmm.model import LlavaMini

    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny")


def test_measured_kv_growth_per_frame_equals_plan(tiny_model):
    """Measured on CPU: the LLM cache's tensor bytes after a video prefill, per added frame."""
    model = tiny_model
    s = model.config.crop_size

    def run(frames):
        with torch.no_grad():
            enc = model.encode(videos=[torch.rand(frames, 3, s, s)], input_ids=_ids())
            out = model.llm(inputs_embeds=enc.inputs_embeds, attention_mask=enc.attention_mask, use_cache=True,
                            logits_to_keep=1)
        return out.past_key_values

    meas = M.measure_slope(run, [1, 3, 6], method="kv_tensors")
    p = M.plan(model.config, dtype=torch.float32, prompt_len=6)
    assert meas.slope == p.kv_per_frame  # exact: tensor bytes
    assert meas.intercept == 5 * p.kv_per_token  # the L - 1 text tokens
    assert meas.bytes[0] == (1 + 5) * p.kv_per_token


def test_hd_video_is_planned_and_its_kv_per_frame_measured():
    """HD videos (released: each frame as r x r blocks plus the whole frame) are planned, not refused."""
    from llava_mini.lmm.model import LlavaMini

    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny-hd")
    r, s = model.config.resolution_ratio, model.config.crop_size

    def run(frames):
        with torch.no_grad():
            enc = model.encode(videos=[torch.rand(frames, r * r + 1, 3, s, s)], input_ids=_ids())
            return model.llm(inputs_embeds=enc.inputs_embeds, attention_mask=enc.attention_mask, use_cache=True,
                             logits_to_keep=1).past_key_values

    hd = M.plan(model.config, dtype=torch.float32, prompt_len=6, pixels_on_device=True, keep_prefix_kv=True)
    assert M.measure_slope(run, [1, 2, 4], method="kv_tensors").slope == hd.kv_per_frame
    assert hd.max_frames > 0 and hd.tokens_per_frame == model.config.tokens_per_image
    # what an HD frame keeps: its r*r + 1 crops of pixels and the pre-fusion rows of all of them
    base = M.plan(dataclasses.replace(model.config, resolution_ratio=1), dtype=torch.float32, prompt_len=6,
                  pixels_on_device=True, keep_prefix_kv=True)
    crops, pixels, patches, tokens = r * r + 1, 3 * s * s * 4, model.config.num_patches, hd.tokens_per_frame
    kv_row_all_layers = (base.kept_per_frame - pixels) / (patches + tokens + 6)  # a pre-fusion row's K/V
    assert hd.kept_per_frame == crops * pixels + kv_row_all_layers * (crops * patches + tokens + 6)
    # chunks sized as the model sizes them: fewer HD frames, each costing more at the encode peak
    assert hd.chunk_frames == model.frame_chunk() < base.chunk_frames
    assert hd.encode_chunk_peak / hd.chunk_frames > base.encode_chunk_peak / base.chunk_frames


def test_measured_rss_method_runs():
    meas = M.measure_slope(lambda n: torch.ones(n, 1 << 18), [1, 2], method="rss")
    assert meas.method == "rss" and len(meas.bytes) == 2 and "sanity" in meas.tolerance


def test_cache_bytes_reads_caches_and_rejects_junk():
    t = torch.zeros(2, 3, dtype=torch.float16)
    assert M.cache_bytes(((t, t), (t, t))) == 4 * 12
    assert M.cache_bytes(None) == 0
    with pytest.raises(TypeError, match="cache"):
        M.cache_bytes(object())
    assert M.format_bytes(512 * KiB) == "512.0 KiB"


@pytest.mark.gpu
def test_budget_search_finds_the_cap():
    dev = torch.device("cuda")
    resident = torch.cuda.memory_allocated(dev)
    budget = resident + 256 * MiB

    def run(n):
        return torch.empty(n * MiB, dtype=torch.uint8, device=dev)

    found = M.max_frames_in_budget(run, vram_bytes=budget, lo=1, hi=1024)
    assert 128 <= found["max_frames"] <= 256
    # the cap is lifted afterwards
    x = torch.empty(512 * MiB, dtype=torch.uint8, device=dev)
    del x


@pytest.mark.gpu
def test_cuda_peak_slope_of_kv():
    from llava_mini.lmm.model import LlavaMini

    model = LlavaMini.from_preset("tiny", device="cuda")
    s = model.config.crop_size

    def run(frames):
        with torch.no_grad():
            enc = model.encode(videos=[torch.rand(frames, 3, s, s)], input_ids=_ids())
            return model.llm(inputs_embeds=enc.inputs_embeds, attention_mask=enc.attention_mask, use_cache=True,
                             logits_to_keep=1).past_key_values

    meas = M.measure_slope(run, [64, 128, 256], device="cuda")
    p = M.plan(model.config, dtype=torch.float32, prompt_len=6)
    assert meas.slope >= p.kv_per_frame  # the peak holds the KV plus activations
    # one chunk holds every frame of the tiny model: the encode peak per frame bounds the rest
    assert meas.slope <= 2 * (M.encode_chunk_peak_bytes(model.config, 1, 6, torch.float32) + p.per_frame)


def test_peak_memory_sees_a_transient_host_allocation():
    if not M.reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs")
    size = 64 * MiB
    with M.peak_memory("cpu") as peak:
        block = torch.ones(size // 4)  # touched, so resident
        del block
    assert peak.device_peak is None
    # freed before the end, still seen at its peak (memory other tests' threads free meanwhile can
    # absorb part of it; a peak that missed the block would show ~0)
    assert 0.5 * size <= peak.host_above_start < size + 32 * MiB


def test_plan_measure_reports_measured_memory_beside_the_prediction(capsys):
    import json

    from llava_mini.cli import main

    assert main(["plan", "--preset", "tiny", "--dtype", "fp32", "--measure", "--frames", "2", "8",
                 "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    m = d["measured_memory"]
    assert m["device"] == "cpu" and [r["frames"] for r in m["rows"]] == [2, 8]
    for r in m["rows"]:
        assert r["predicted_peak"] >= d["weights"] and r["device_peak"] is None
        if r["host_peak"] is not None:
            assert r["host_peak"] >= r["host_above_start"] >= 0  # 0 when freed heap pages absorb the run
    assert "measured" not in d  # the budget search needs a GPU
    assert main(["plan", "--preset", "tiny", "--dtype", "fp32", "--measure", "--frames", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "host peak RSS" in out


@pytest.mark.parametrize("reduction", ["fastv", "visionzip"])
def test_reduced_baseline_cache_is_the_predicted_kv_per_image(reduction):
    from llava_mini.lmm.baseline import LlavaBaseline
    from llava_mini.profiling.latency import prefill, random_inputs

    torch.manual_seed(0)
    model = LlavaBaseline.from_preset("tiny", dtype=torch.float32, reduction=reduction, tokens=12, fastv_layer=1)
    cfg, L = model.config, 7
    per_image = M.kv_bytes_per_image(cfg, "baseline", "fp32", model.reduction)
    assert per_image < M.kv_bytes_per_image(cfg, "baseline", "fp32")
    for batch in (1, 3):
        pixels, ids = random_inputs(model, batch, L)
        cache = prefill(model, ids, pixels, use_cache=True).past_key_values
        assert M.cache_bytes(cache) == batch * (per_image + (L - 1) * M.kv_bytes_per_token(cfg, "fp32"))
    full, reduced = M.plan(cfg, model="baseline"), M.plan(cfg, model="baseline", reduction=model.reduction)
    assert reduced.kv_per_frame == M.kv_bytes_per_image(cfg, "baseline", "bf16", model.reduction)
    assert reduced.max_frames > full.max_frames


def test_slope_of_bytes_on_a_line_is_exact():
    """The fit is exact: these counts gave 511.99999999999994 with float sums (numpy on the GPU machine)."""
    assert M._fit([1, 3, 6], [3072, 4096, 5632]) == (512.0, 2560.0)
