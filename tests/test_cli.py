"""The `llava-mini` command: plan, bench (a tiny CPU run whose report must render), profile, generate."""

import json

import pytest
import torch

from llava_mini.cli import main, parse_bytes


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000


def test_plan_prints_a_prediction(capsys):
    assert main(["plan", "--vram", "24GB", "--preset", "llava-mini-llama-3.1-8b", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["max_frames"] >= 10_000


def test_bench_runs_on_cpu_and_writes_the_report(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--preset", "tiny", "--baseline", "tiny", "--batches", "1", "2",
                 "--frames", "1", "2", "--repeats", "1", "--backends", "torch", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    print(out)
    assert "time_to_first_token_speedup" in out
    results = json.loads((tmp_path / "report.json").read_text())
    assert results["env"]["device"] == "cpu"
    assert set(results["measured"]["mini"]["torch"]["stages_ms"]) >= {"vision_encoder", "compressor", "prefusion"}
    assert [r["frames"] for r in results["measured"]["mini"]["torch"]["video"]["latency"]] == [1, 2]
    assert "| stage |" in (tmp_path / "report.md").read_text()
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_profile_writes_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--preset", "tiny", "--repeats", "1", "--trace", str(trace), "--device", "cpu"]) == 0
    assert "prefusion" in capsys.readouterr().out
    assert json.loads(trace.read_text())["traceEvents"]


def test_generate_on_an_image_file(tmp_path, capsys):
    from PIL import Image

    Image.fromarray((torch.rand(30, 30, 3) * 255).byte().numpy()).save(tmp_path / "x.png")
    assert main(["generate", "--image", str(tmp_path / "x.png"), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().startswith("[")


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--image", str(tmp_path / "missing.png"), "--device", "cpu"]) == 2
    assert "cannot read an image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--backends", "cuda"])


def test_plan_measure_refuses_a_model_that_does_not_fit(capsys, monkeypatch):
    import llava_mini.lmm.video

    monkeypatch.setattr(llava_mini.lmm.video, "available_memory", lambda device: 1 << 30)
    assert main(["plan", "--measure", "--device", "cpu"]) == 2  # Llama-3.1-8B in bf16: 15 GiB of weights
    assert "--measure: the llava-mini-llama-3.1-8b weights take" in capsys.readouterr().err
