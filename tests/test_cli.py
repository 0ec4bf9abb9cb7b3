"""The `llava-mini` command: plan, bench (a tiny CPU run whose report must render), profile, generate."""

import json
import re

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
                 "--frames", "1", "2", "--budget", "0", "--backends", "torch", "--out", str(tmp_path),
                 "--methods", "8", "16", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    print(out)
    headline = next(line for line in out.splitlines() if line.startswith("time_to_first_token_speedup:"))
    assert re.fullmatch(r"time_to_first_token_speedup: \S+x \[\S+, \S+\] \(n=\d+\)", headline)
    results = json.loads((tmp_path / "report.json").read_text())
    assert results["env"]["device"] == "cpu" and results["protocol"]["budget_s"] == 0
    stages = results["measured"]["stages"]
    assert set(stages) >= {"vision_encoder", "compressor", "prefusion", "prefill"}
    assert set(stages["vision_encoder"]) == {"mini", "baseline", "ratio"} and set(stages["compressor"]) == {"mini"}
    for ratio in [stages["prefill"]["ratio"], *[v for v in results["summary"].values() if "median" in v]]:
        assert ratio["unit"] == "x" and ratio["low"] <= ratio["median"] <= ratio["high"] and ratio["n"] >= 6
        assert ratio["stopped_by"] in ("width", "budget", "max_samples")
    assert results["summary"]["time_to_first_token_speedup"] == stages["prefill"]["ratio"]
    assert "prefill_throughput_speedup_batch2" in results["summary"]
    # the methods table: every method against the 576-token baseline, in the report and its plot
    methods = results["measured"]["methods"]
    assert [r["method"] for r in methods["rows"]] == ["llava-1.5", "fastv-8", "fastv-16", "visionzip-8",
                                                      "visionzip-16", "llava-mini"]
    for r in methods["rows"][1:]:
        assert r["ttft_speedup"]["unit"] == "x" and r["prefill_speedup"]["n"] >= 6
        assert r["kv_bytes_per_image"] < methods["rows"][0]["kv_bytes_per_image"]
    assert "### The methods" in (tmp_path / "report.md").read_text() and (tmp_path / "methods_ttft.png").exists()
    assert [r["frames"] for r in results["measured"]["video"]["latency"]] == [1, 2]
    assert {c["check"] for c in results["checks"]} >= {"shared stage vision_encoder agrees", "figures plausible"}
    assert results["noisy"] == (not all(c["ok"] for c in results["checks"]))
    md = (tmp_path / "report.md").read_text()
    assert "| stage |" in md and "## Self-checks" in md and "CUDA graph" not in md
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*.png"))) == 5  # four, and the methods plot


def test_profile_writes_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--preset", "tiny", "--repeats", "1", "--trace", str(trace), "--device", "cpu"]) == 0
    assert "prefusion" in capsys.readouterr().out
    assert json.loads(trace.read_text())["traceEvents"]


def image_file(tmp_path):
    from PIL import Image

    pixels = torch.rand(30, 30, 3, generator=torch.Generator().manual_seed(2))
    Image.fromarray((pixels * 255).byte().numpy()).save(tmp_path / "x.png")
    return str(tmp_path / "x.png")


def test_generate_streams_token_ids_without_a_tokenizer(tmp_path, capsys):
    from llava_mini.cli import TokenStreamer

    streamer = TokenStreamer()
    streamer.put(torch.tensor([7]))
    assert capsys.readouterr().out == "7 "  # printed at once, not at the end
    assert main(["generate", "--image", image_file(tmp_path), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert 1 <= len(printed) <= 3 and all(t.isdigit() for t in printed)


def test_generate_streams_the_checkpoints_text_and_decodes_beams(tmp_path, capsys, tiny_tokenizer):
    from llava_mini.lmm import IMAGE_TOKEN_INDEX, LlavaMini

    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    model.tokenizer = tiny_tokenizer(model.config.text["vocab_size"])
    model.save_pretrained(tmp_path / "ckpt")
    image = image_file(tmp_path)
    run = ["generate", "--image", image, "--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "6",
           "--device", "cpu"]
    answers = []
    for extra, options in (([], {}), (["--num-beams", "4"], {"num_beams": 4})):
        assert main(run + extra) == 0
        answers.append(model.generate([image], [[1, IMAGE_TOKEN_INDEX, 3, 4, 5]], max_new_tokens=6, **options))
        assert capsys.readouterr().out.strip() == model.decode(answers[-1])[0]
    assert not torch.equal(*answers)  # so the beams did reach generate


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
