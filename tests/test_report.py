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
    assert "| **total** |" in md and "VRAM per image (KV, fp32)" in md
    # measured ms and their ratio: 3.0 + ... sums of the given stage ms
    total_line = next(line for line in md.splitlines() if line.startswith("| **total** |"))
    assert "| 2.2 | 2.5 | 1.14x |" in total_line  # mini 0.5+1.5+0.2, baseline 0.5+2.0
    assert "Measured on **cpu**" in md
    assert "projection from datasheet ceilings" in md


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
