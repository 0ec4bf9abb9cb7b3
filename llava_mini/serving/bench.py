"""LLaVA-Mini against LLaVA-1.5 in the same engine (vLLM), measured side by side in one run.

Both models are served by vLLM with the same LLM shapes and the same KV-cache budget:
LLaVA-Mini through this package's plugin (one token per image, pre-fusion in ``embed_multimodal``),
LLaVA-1.5 through vLLM's ``LlavaForConditionalGeneration`` (576 tokens per image; its native
implementation where it imports, else vLLM's Transformers backend, ``model_impl="transformers"``:
vLLM's built-in LLaVA needs torchvision, which the CPU wheel cannot use). Random weights at a
preset's shapes (latency does not depend on the values), a byte-level tokenizer, greedy decoding
of a fixed number of tokens.

Measured on the paired protocol (``profiling.estimate.paired_ratio``: the two engines alternate,
the ratio per pair, the median ratio with its 95% interval): the time to first token (one request
for one token) and, per concurrency level c, the time to answer c requests submitted at once, as
requests/s and output tokens/s. Every request carries an image no earlier request had, so no cache
(prefix, encoder, processor) serves it. From the engines' own figures: the prompt each request
occupies, its KV-cache blocks, and the most such requests the KV budget holds at once.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_mini.lmm import processing
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio

QUESTION = "What is shown in this image? Answer in a few words."  # ~50 text tokens with the byte tokenizer


def write_llava_checkpoint(path, preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """LLaVA-1.5 (transformers' ``LlavaForConditionalGeneration``, 576 tokens per image) at the vision
    tower and LLM shapes of LLaVA-Mini preset ``preset``, with its processor; returns the baseline."""
    from transformers import LlavaProcessor

    from llava_mini.lmm import LlavaMiniConfig
    from llava_mini.lmm.baseline import LlavaBaseline
    from llava_mini.serving.synthetic import byte_tokenizer

    torch.manual_seed(seed)
    config = LlavaMiniConfig.from_preset(preset, **overrides)
    baseline = LlavaBaseline.from_config(config, dtype=dtype)
    tokenizer = byte_tokenizer(config.text["vocab_size"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id vocab_size, as LLaVA-1.5's
    if tokenizer.convert_tokens_to_ids("<image>") != baseline.image_token_id:
        raise AssertionError("the <image> token must take the id after the vocabulary")
    baseline.model.save_pretrained(path)
    LlavaProcessor(image_processor=baseline.image_processor, tokenizer=tokenizer,
                   patch_size=config.vision["patch_size"], vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>").save_pretrained(path)
    baseline.tokenizer = tokenizer
    return baseline


def baseline_impl() -> str:
    """vLLM's model implementation for LLaVA-1.5 here: its own (``auto``), or the Transformers backend
    where its built-in one cannot be imported (no torchvision, as with the CPU wheel)."""
    try:
        import vllm.model_executor.models.llava  # noqa: F401
        return "auto"
    except ImportError:
        return "transformers"


class Side:
    """One model in its engine, and how to ask it something."""

    def __init__(self, name: str, path: Path, prompt: str, dtype: str, max_model_len: int, **engine_options):
        from vllm import LLM

        self.name, self.prompt = name, prompt
        self.llm = LLM(model=str(path), dtype=dtype, max_model_len=max_model_len, seed=0, **engine_options)
        self.images_used = 0

    def requests(self, count: int, side: int) -> list[dict]:
        """``count`` requests, each with an image this engine has not seen."""
        out = []
        for _ in range(count):
            self.images_used += 1
            rng = np.random.default_rng(self.images_used)
            image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            out.append({"prompt": self.prompt, "multi_modal_data": {"image": image}})
        return out

    def sampler(self, count: int, new_tokens: int, side: int):
        """A paired-protocol sampler: answer ``count`` new requests at once; returns the wall time in ms."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

        def sample() -> float:
            batch = self.requests(count, side)
            start = time.perf_counter()
            outs = self.llm.generate(batch, params, use_tqdm=False)
            ms = (time.perf_counter() - start) * 1e3
            if any(len(o.outputs[0].token_ids) != new_tokens for o in outs):
                raise RuntimeError(f"{self.name}: a request ended before its {new_tokens} tokens")
            return ms

        return sample

    def greedy_tokens(self, image, new_tokens: int) -> list[int]:
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt": self.prompt, "multi_modal_data": {"image": image}}],
                                SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    def kv(self, image, new_tokens: int) -> dict:
        """What one request occupies: prompt positions, KV blocks, and how many fit the KV cache."""
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt": self.prompt, "multi_modal_data": {"image": image}}],
                                SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
        cache = self.llm.llm_engine.vllm_config.cache_config
        prompt = len(out.prompt_token_ids)
        blocks = math.ceil((prompt + new_tokens) / cache.block_size)
        total = cache.num_gpu_blocks
        return {"prompt_tokens": prompt, "block_size": cache.block_size, "blocks_per_request": blocks,
                "kv_blocks": total, "max_concurrent_requests": total // blocks if total else None}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def run_engine_bench(out_dir, preset: str = "small", dtype: torch.dtype = torch.float32,
                     concurrency: tuple[int, ...] = (1, 4, 16), new_tokens: int = 16,
                     protocol: Protocol | None = None, work_dir=None, progress=print, **overrides) -> dict:
    """Write both checkpoints of ``preset`` (``overrides`` as for ``LlavaMiniConfig.from_preset``), serve
    each in vLLM, and compare them (see the module doc).

    Returns the results (also written as ``<out_dir>/serving.json``): per concurrency level the
    paired speedup of LLaVA-Mini over LLaVA-1.5 in wall time, with each side's requests/s and
    output tokens/s; the time to first token; KV blocks per request and the batch the budget holds;
    and whether each engine's greedy tokens equal the transformers model's (a sanity check of the
    two sides, not a timing).
    """
    import tempfile

    from llava_mini.profiling.results import write_results
    from llava_mini.serving.synthetic import write_checkpoint

    protocol = protocol or Protocol(rel_width=0.05, budget_s=20.0)
    work = Path(work_dir or tempfile.mkdtemp(prefix="llava-mini-serving-"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    dtype_name = str(dtype).removeprefix("torch.")
    progress(f"writing random {preset} checkpoints under {work}")
    mini_model = write_checkpoint(work / "llava-mini", preset, dtype=dtype, template="plain", **overrides)
    base_model = write_llava_checkpoint(work / "llava-1.5", preset, dtype=dtype, **overrides)
    text = processing.apply_template(QUESTION, "plain")  # "<image>\n<question>", the same for both
    side = mini_model.config.image_size
    max_len = mini_model.config.text["max_position_embeddings"]
    common = dict(dtype=dtype_name, max_model_len=max_len, enforce_eager=True)
    progress("starting vLLM: LLaVA-Mini (plugin)")
    mini = Side("llava-mini", work / "llava-mini", text, **common)
    impl = baseline_impl()
    progress(f"starting vLLM: LLaVA-1.5 (model_impl={impl})")
    base = Side("llava-1.5", work / "llava-1.5", text, model_impl=impl, **common)
    try:
        probe = mini.requests(1, side)[0]["multi_modal_data"]["image"]
        ids = processing.tokenize_prompt(text, mini_model.tokenizer)
        checks = {
            "llava-mini": mini.greedy_tokens(probe, new_tokens) == mini_model.generate(
                [probe], [ids], max_new_tokens=new_tokens, eos_token_id=None, backend="sdpa")[0].tolist(),
            "llava-1.5": base.greedy_tokens(probe, new_tokens) == base_model.generate(
                [probe], [ids], max_new_tokens=new_tokens, eos_token_id=None, backend="sdpa")[0].tolist(),
        }
        kv = {"llava-mini": mini.kv(probe, new_tokens), "llava-1.5": base.kv(probe, new_tokens)}
        progress("time to first token (1 request, 1 token)")
        ttft = paired_ratio(base.sampler(1, 1, side), mini.sampler(1, 1, side), protocol)
        rows = []
        for c in concurrency:
            progress(f"concurrency {c}: {c} requests x {new_tokens} tokens, submitted at once")
            comp = paired_ratio(base.sampler(c, new_tokens, side), mini.sampler(c, new_tokens, side), protocol)
            rows.append({
                "concurrency": c, "speedup": comp.ratio.to_dict(),
                "llava-1.5": {"ms": comp.numerator.to_dict(),
                              "requests_per_s": comp.numerator.reciprocal(1e3 * c, "requests/s").to_dict(),
                              "output_tokens_per_s": comp.numerator.reciprocal(1e3 * c * new_tokens,
                                                                               "tokens/s").to_dict()},
                "llava-mini": {"ms": comp.denominator.to_dict(),
                               "requests_per_s": comp.denominator.reciprocal(1e3 * c, "requests/s").to_dict(),
                               "output_tokens_per_s": comp.denominator.reciprocal(1e3 * c * new_tokens,
                                                                                  "tokens/s").to_dict()},
            })
    finally:
        mini.close()
        base.close()
    results = {"preset": preset, "dtype": dtype_name, "new_tokens": new_tokens, "question": QUESTION,
               "baseline_model_impl": impl, "matches_transformers": checks, "kv": kv,
               "ttft": {"speedup": ttft.ratio.to_dict(), "llava-1.5_ms": ttft.numerator.to_dict(),
                        "llava-mini_ms": ttft.denominator.to_dict()},
               "throughput": rows, "protocol": protocol.to_dict()}
    results["file"] = str(write_results("serving", [results], out_dir=out_dir))
    return results


def format_engine_bench(r: dict) -> str:
    """The results as a markdown table (every ratio with its interval)."""
    kv_m, kv_b = r["kv"]["llava-mini"], r["kv"]["llava-1.5"]
    lines = [
        f"vLLM, `{r['preset']}` shapes, {r['dtype']}, {r['new_tokens']} new tokens per request; LLaVA-1.5 via "
        f"model_impl={r['baseline_model_impl']}; greedy tokens equal transformers': "
        f"LLaVA-Mini {r['matches_transformers']['llava-mini']}, LLaVA-1.5 {r['matches_transformers']['llava-1.5']}",
        "",
        "| | LLaVA-1.5 | LLaVA-Mini | LLaVA-1.5 / LLaVA-Mini |",
        "| --- | ---: | ---: | ---: |",
        f"| prompt positions per request | {kv_b['prompt_tokens']} | {kv_m['prompt_tokens']} | "
        f"{kv_b['prompt_tokens'] / kv_m['prompt_tokens']:.3g}x |",
        f"| KV blocks per request ({kv_m['block_size']} tokens each) | {kv_b['blocks_per_request']} | "
        f"{kv_m['blocks_per_request']} | {kv_b['blocks_per_request'] / kv_m['blocks_per_request']:.3g}x |",
        f"| requests the KV budget holds at once ({kv_m['kv_blocks']} blocks) | {kv_b['max_concurrent_requests']} | "
        f"{kv_m['max_concurrent_requests']} | |",
        f"| time to first token, ms | {format_estimate(r['ttft']['llava-1.5_ms'])} | "
        f"{format_estimate(r['ttft']['llava-mini_ms'])} | {format_estimate(r['ttft']['speedup'])} |",
    ]
    for row in r["throughput"]:
        b, m = row["llava-1.5"], row["llava-mini"]
        lines.append(f"| concurrency {row['concurrency']}: requests/s | {format_estimate(b['requests_per_s'])} | "
                     f"{format_estimate(m['requests_per_s'])} | {format_estimate(row['speedup'])} |")
        lines.append(f"| concurrency {row['concurrency']}: output tokens/s | "
                     f"{format_estimate(b['output_tokens_per_s'])} | {format_estimate(m['output_tokens_per_s'])} | |")
    return "\n".join(lines)
