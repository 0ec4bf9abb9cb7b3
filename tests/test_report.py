"""Report: markdown + PNG plots from a JSON-serialisable results dict (CPU, synthetic measurements)."""

import json

import pytest

from llava_mini.profiling import flops as F
from llava_mini.profiling import report as Rp
from llava_mini.profiling import roofline as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results():
    ceilings = {"device": "cpu", "copy_gbps": 20.0, "matmul_tflops": 0.5, "matmul_dtype": "float32"}
    measured = {"mini": {"vision_encoder": 0.5, "prefusion": 1.5, "llm_prefill": 0.2, "total": 3.0},
                "baseline": {"vision_encoder": 0.5, "llm_prefill": 2.0, "total": 4.0}}
    r = Rp.analytic_results("tiny", prompt_len=8, new_tokens=4, frames=(1, 4, 16), dtype="fp32",
                            vram_bytes=64 << 20, ceilings=ceilings, measured_ms=measured,
                            env={"device": "cpu", "torch": "x", "triton": "y", "transformers": "z", "commit": "c"})
    return json.loads(json.dumps(r))  # what a results file round-trips to


def test_results_are_json_and_consistent(results):
    text = json.dumps(results)
    assert "NaN" not in text and "Infinity" not in text
    mini = F.count_flops("tiny", convention="full", prompt_len=8, new_tokens=4, prune_last_layer=True)
    got = {row["stage"]: row["mini_flops"] for row in results["stages"]}
    assert got == mini.flops
    assert results["roofline"]["ceilings"]["source"] == "measured"
    assert results["projection"]["label"] == R.PROJECTION_LABEL
    fr = results["frames"]
    assert len(fr["mini"]["vram_bytes"]) == 3 and fr["mini"]["vram_bytes"] == sorted(fr["mini"]["vram_bytes"])
    # the baseline grows 49x faster per frame than the one-token model (tiny: 49 patches)
    assert (fr["baseline"]["vram_bytes"][2] - fr["baseline"]["vram_bytes"][1]) > \
        10 * (fr["mini"]["vram_bytes"][2] - fr["mini"]["vram_bytes"][1])


def test_markdown_has_the_comparison_table(results):
    md = Rp.render_markdown(results)
    assert "| stage | LLaVA-Mini FLOPs | baseline FLOPs |" in md
    for stage in F.STAGES:
        assert f"| {stage} |" in md
    assert "| **total** (ms: time to first token) |" in md and "VRAM per image (KV, fp32)" in md
    # plain medians are shown, but never a time ratio computed from them: only a paired one has an interval
    llm = next(line for line in md.splitlines() if line.startswith("| llm_prefill |"))
    assert llm.endswith("| 0.2 | 2 | - |")
    assert "Measured on **cpu**" in md
    assert "projection from datasheet ceilings" in md
    assert "noisy run" not in md and "Self-checks" not in md  # nothing measured, nothing to check


def estimate(median, low, high, unit="ms", n=12):
    return {"median": median, "low": low, "high": high, "n": n, "confidence": 0.96, "stopped_by": "width",
            "unit": unit}


def measured_results(results, vision_ratio=estimate(1.0, 0.97, 1.03, "x"), tokens_per_s=estimate(50.0, 48.0, 52.0,
                                                                                                   "tokens/s")):
    """The analytic results with what ``llava-mini bench`` adds (paired figures as Estimate dicts)."""
    ttft = estimate(2.0, 1.9, 2.1, "x")
    r = json.loads(json.dumps(results))
    for row in r["stages"]:
        if row["stage"] == "llm_prefill":
            row.update(mini_time=estimate(0.2, 0.19, 0.21), baseline_time=estimate(2.0, 1.9, 2.1),
                       measured_ratio=estimate(10.0, 9.5, 10.5, "x"))
    r["time_to_first_token"] = {"mini_time": estimate(3.0, 2.9, 3.1), "baseline_time": estimate(6.0, 5.8, 6.2),
                                "measured_ratio": ttft}
    r["shared_stages"] = {"vision_encoder": vision_ratio, "projector_576": estimate(1.01, 0.99, 1.02, "x")}
    r["protocol"] = {"confidence": 0.95, "rel_width": 0.05, "budget_s": 4.0, "headline_budget_s": 12.0,
                     "min_samples": 6, "clock": "cpu perf_counter"}
    r["measured"] = {"stages": {"prefill": {"mini": estimate(3.0, 2.9, 3.1), "baseline": estimate(6.0, 5.8, 6.2),
                                            "ratio": ttft}},
                     "decode": {"mini": {"backend": "sdpa", "ttft_ms": estimate(3.0, 2.9, 3.1),
                                         "ms_per_token": estimate(20.0, 19.0, 21.0), "tokens_per_s": tokens_per_s},
                                "baseline": {"backend": "sdpa", "ttft_ms": estimate(6.0, 5.8, 6.2),
                                             "ms_per_token": estimate(25.0, 24.0, 26.0),
                                             "tokens_per_s": estimate(40.0, 38.0, 42.0, "tokens/s")},
                                "ratio": estimate(1.25, 1.2, 1.3, "x")}}
    r["summary"] = {"time_to_first_token_speedup": ttft,
                    "decode_tokens_per_s": {"mini": tokens_per_s, "baseline": estimate(40.0, 38.0, 42.0, "tokens/s")}}
    return r


def test_measured_figures_are_printed_with_their_intervals(results):
    md = Rp.render_markdown(measured_results(results))
    llm = next(line for line in md.splitlines() if line.startswith("| llm_prefill |"))
    assert llm.endswith("| 0.2 [0.19, 0.21] (n=12) | 2 [1.9, 2.1] (n=12) | 10x [9.5, 10.5] (n=12) |")
    total = next(line for line in md.splitlines() if line.startswith("| **total**"))
    assert total.endswith("| 3 [2.9, 3.1] (n=12) | 6 [5.8, 6.2] (n=12) | 2x [1.9, 2.1] (n=12) |")
    assert "**time to first token speedup**: 2x [1.9, 2.1] (n=12), stopped by width" in md
    assert "95% confidence interval" in md and "All 5 self-checks passed" in md and "noisy run" not in md


def test_a_ratio_without_its_interval_is_refused(results, tmp_path):
    bare = measured_results(results)
    bare["summary"]["time_to_first_token_speedup"] = 2.0
    with pytest.raises(ValueError, match=r"summary\[time_to_first_token_speedup\].*interval"):
        Rp.render_markdown(bare)
    with pytest.raises(ValueError, match="interval"):
        Rp.render_report(bare, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
    bare = measured_results(results)
    bare["stages"][0]["measured_ratio"] = 1.2
    with pytest.raises(ValueError, match="measured_ratio"):
        Rp.render_markdown(bare)


@pytest.mark.parametrize("case, flagged", [
    ("shared stage", "shared stage vision_encoder agrees"),  # CLIP 676 ms in one model, 45 ms in the other
    ("unbounded", "figures plausible"),  # 6e12 tokens/s from a clamped difference of medians
    ("non-positive", "figures plausible"),
    ("dispersion", "dispersion low"),
    ("few samples", "enough samples"),
])
def test_self_checks_flag_a_noisy_run(results, case, flagged):
    r = measured_results(results)
    decode = r["measured"]["decode"]["mini"]
    if case == "shared stage":
        r["shared_stages"]["vision_encoder"] = estimate(676 / 45, 12.0, 16.0, "x")
    elif case == "unbounded":
        decode["tokens_per_s"] = estimate(6e12, 5.9e12, 6.1e12, "tokens/s")
    elif case == "non-positive":
        decode["ms_per_token"] = estimate(-0.5, -1.0, 0.1)
    elif case == "dispersion":
        r["measured"]["stages"]["prefill"]["ratio"] = estimate(2.0, 0.1, 9.5, "x")
    else:
        decode["ttft_ms"] = dict(estimate(3.0, 2.9, 3.1, n=3), confidence=0.75)
    checks = {c["check"]: c for c in Rp.self_checks(r)}
    assert [name for name, c in checks.items() if not c["ok"]] == [flagged]
    md = Rp.render_markdown(r)
    assert md.splitlines()[0].endswith("(noisy run)") and f"| {flagged} | **FLAG** |" in md


def test_report_files_and_valid_pngs(results, tmp_path):
    import matplotlib.image as mpimg

    paths = Rp.render_report(results, tmp_path, name="tiny")
    assert set(paths["plots"]) == set(Rp.PLOTS)
    for p in paths["plots"].values():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # not a blank canvas
    md = paths["markdown"].read_text()
    assert "![roofline](roofline.png)" in md
    assert json.loads(paths["json"].read_text())["config"] == "tiny"


def test_partial_results_skip_missing_plots(tmp_path):
    minimal = {"stages": [{"stage": "llm_prefill", "mini_flops": 10, "baseline_flops": 40}]}
    paths = Rp.render_report(minimal, tmp_path)
    assert set(paths["plots"]) == {"stage_breakdown"}
    assert "4x" in paths["markdown"].read_text()


def test_bad_results_raise():
    with pytest.raises(ValueError, match="results"):
        Rp.render_markdown({"title": "x"})
    with pytest.raises(TypeError, match="results"):
        Rp.render_markdown([1, 2])
    with pytest.raises(ValueError, match="frames"):
        Rp.analytic_results("tiny", frames=(0, 2))
    with pytest.raises(ValueError, match="measured_ms"):
        Rp.analytic_results("tiny", measured_ms={"llava": {}})
    with pytest.raises(ValueError, match="ceilings"):
        Rp.analytic_results("tiny", ceilings="TPU v9")


def test_roofline_floor_and_projection():
    assert R.floor_ms(1e12, 0, 1000.0, 1e3) == pytest.approx(1.0)  # compute bound
    assert R.floor_ms(0, 1e9, 1000.0, 1e3) == pytest.approx(1.0)  # memory bound
    cost = F.count_flops("llava-mini-vicuna-7b", convention="full", new_tokens=8)
    rows = {r.stage: r for r in R.roofline(cost, "H100 SXM", {"decode": 100.0})}
    assert rows["decode"].bound == "memory" and rows["vision_encoder"].bound == "compute"
    assert rows["decode"].over_floor == pytest.approx(100.0 / rows["decode"].floor_ms)
    proj = R.project(cost)
    assert set(proj["gpus"]) == set(R.DATASHEETS) and "projection" in proj["label"]
    # same compute ceiling, more bandwidth: the H200 floor is never above the H100's
    assert proj["gpus"]["H200"]["total_ms"] <= proj["gpus"]["H100 SXM"]["total_ms"]
    with pytest.raises(ValueError, match="measured_ms"):
        R.roofline(cost, "H200", {"vit": 1.0})
    with pytest.raises(ValueError, match="ceilings"):
        R.roofline(cost, {"copy_gbps": 0, "matmul_tflops": 1})
