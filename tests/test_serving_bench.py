"""The vLLM comparison harness (``llava-mini bench --engine vllm``) end to end on tiny shapes: both
engines start, their greedy tokens equal the transformers models', the KV figures follow from the
prompts, and every timing comes with its interval. The figures themselves are not asserted."""

import json
import math

import pytest

from serving_common import SERVE_TEXT, needs_vllm, vllm_env

pytestmark = [needs_vllm, pytest.mark.vllm]


def test_engine_bench_structure(tmp_path):
    from llava_mini.lmm import LlavaMiniConfig, processing
    from llava_mini.profiling.estimate import Protocol
    from llava_mini.serving.bench import QUESTION, format_engine_bench, run_engine_bench
    from llava_mini.serving.synthetic import byte_tokenizer

    vllm_env(tmp_path)
    quick = Protocol(rel_width=0.5, budget_s=0.0, min_samples=2, warmup=0)
    r = run_engine_bench(tmp_path / "out", "tiny", concurrency=(1, 3), new_tokens=3, protocol=quick,
                         work_dir=tmp_path / "work", progress=lambda m: None, text=SERVE_TEXT)
    assert r["matches_transformers"] == {"llava-mini": True, "llava-1.5": True}
    config = LlavaMiniConfig.from_preset("tiny", text=SERVE_TEXT)
    ids = processing.tokenize_prompt(processing.apply_template(QUESTION, "plain"), byte_tokenizer(SERVE_TEXT["vocab_size"]))
    mini, base = r["kv"]["llava-mini"], r["kv"]["llava-1.5"]
    assert mini["prompt_tokens"] == len(ids) - 1 + config.tokens_per_image
    assert base["prompt_tokens"] == len(ids) - 1 + config.num_patches
    for kv in (mini, base):
        assert kv["blocks_per_request"] == math.ceil((kv["prompt_tokens"] + 3) / kv["block_size"])
        assert kv["max_concurrent_requests"] == kv["kv_blocks"] // kv["blocks_per_request"]
    assert [row["concurrency"] for row in r["throughput"]] == [1, 3]
    for e in [r["ttft"]["speedup"]] + [row["speedup"] for row in r["throughput"]]:
        assert 0 < e["low"] <= e["median"] <= e["high"] and e["n"] >= 2
    saved = json.loads((tmp_path / "out" / "serving.json").read_text())
    assert saved["results"][0]["throughput"] == r["throughput"]
    assert "time to first token" in format_engine_bench(r)
