"""Benchmark: the pre-fusion stage with and without its exact savings, and video encoding.

One run, one model (random weights at the real shapes), side by side:

- pre-fusion stage (vision + compressed + L text rows through the pre-fusion layers) for
  batch 1/16/64 and L = 43/128: the released computation on the reference backend ("torch") and
  on SDPA, then each saving alone and both (prefix split, pruned last layer) on SDPA and on the
  Triton kernels, and a second question about the same images (the cached prefix: text rows only);
- a video of 100 and 1,000 frames encoded to the LLM input: the released per-frame loop against
  batched frames with the savings.

Prints a table, writes ``bench/results/<device>/stages.json``. Timings are never asserted.

    PYTHONPATH=. python bench/test_bench_stages.py                    # GPU: llava-mini-vicuna-7b, bf16
    PYTHONPATH=. python bench/test_bench_stages.py --preset tiny --device cpu --frames 4   # smoke run
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch

from llava_mini.lmm import LlavaMini, Savings
from llava_mini.profiling.latency import measure, random_inputs
from llava_mini.profiling.results import write_results

RELEASED = Savings(prefix_split=False, prune_last_layer=False, batch_frames=False)
SAVED = Savings(prefix_split=True, prune_last_layer=True, batch_frames=True)


def stage_cases(model, batch: int, text: int, repeats: int) -> list[dict]:
    pixels, ids = random_inputs(model, batch, text)
    vision, compressed = model.embed_vision(pixels)
    run = lambda fn: measure(fn, model.device, warmup=2, repeats=repeats).median_ms  # noqa: E731
    rows = []

    def record(variant, backend, savings, fn):
        model.savings = savings
        with model.backend_scope(backend):
            rows.append(dict(stage="prefusion", variant=variant, backend=backend, batch=batch, text_tokens=text,
                             ms=run(fn)))

    def stage():  # the pre-fusion stage as encode runs it under model.savings
        if model.savings.prefix_split:
            return model.fuse_text(model.prefusion.prefix(vision, compressed, model.savings.prune_last_layer), ids)
        return model.fuse_reference(vision, compressed, ids)

    record("released", "torch", RELEASED, stage)
    record("released", "sdpa", RELEASED, stage)
    for backend in ("sdpa", "triton"):
        record("prefix_split", backend, Savings(prefix_split=True, prune_last_layer=False), stage)
        record("prune_last_layer", backend, Savings(prefix_split=False, prune_last_layer=True), stage)
        record("both_savings", backend, SAVED, stage)
    with model.backend_scope("triton"):
        prefix = model.prefusion.prefix(vision, compressed, True)
    record("second_question", "triton", SAVED, lambda: model.fuse_text(prefix, ids))
    reference = rows[0]["ms"]
    for row in rows:
        row["speedup_vs_released_torch"] = reference / row["ms"]
        row["speedup_vs_released_sdpa"] = rows[1]["ms"] / row["ms"]
    return rows


def video_cases(model, frames: int, text: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    s = model.config.crop_size
    video = torch.randn(frames, 3, s, s, generator=g).to(model.device, model.dtype)
    _, ids = random_inputs(model, 1, text)
    rows = []
    for variant, backend, savings in (("released_loop", "sdpa", RELEASED), ("batched", "sdpa", SAVED),
                                      ("batched", "triton", SAVED)):
        model.savings = savings
        with model.backend_scope(backend):
            ms = measure(lambda: model.fuse_video(video, ids[0]), model.device, warmup=1, repeats=repeats).median_ms
        rows.append(dict(stage="video_encode", variant=variant, backend=backend, frames=frames, text_tokens=text, ms=ms))
    for row in rows:
        row["speedup_vs_loop"] = rows[0]["ms"] / row["ms"]
    return rows


def run(preset: str, device: str, dtype: torch.dtype, batches, texts, frames, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    # Pre-fusion and encoding do not touch the LLM's decoder layers: keep one to save memory.
    model = LlavaMini.from_config(_with_llm_layers(preset, 1), dtype=dtype, device=device)
    rows = []
    for batch, text in itertools.product(batches, texts):
        rows += stage_cases(model, batch, text, repeats)
    for n in frames:
        rows += video_cases(model, n, 43, max(1, repeats // 2))
    return rows


def _with_llm_layers(preset: str, layers: int):
    from llava_mini.lmm import LlavaMiniConfig

    config = LlavaMiniConfig.from_preset(preset)
    config.text = dict(config.text, num_hidden_layers=layers)
    return config


def print_table(rows: list[dict]) -> None:
    print(f"{'stage':<13}{'variant':<18}{'backend':<8}{'batch/frames':>13}{'L':>5}{'ms':>11}{'speedup':>9}")
    for r in rows:
        size = r.get("batch", r.get("frames"))
        speed = r.get("speedup_vs_released_torch", r.get("speedup_vs_loop"))
        print(f"{r['stage']:<13}{r['variant']:<18}{r['backend']:<8}{size:>13}{r['text_tokens']:>5}"
              f"{r['ms']:>11.3f}{speed:>8.2f}x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_stages(benchmark):
    rows = benchmark.pedantic(run, args=("llava-mini-vicuna-7b", "cuda", torch.bfloat16, (1, 16, 64), (43, 128),
                                         (100, 1000), 10), rounds=1, iterations=1)
    print_table(rows)
    print(write_results("stages", rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-mini-vicuna-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--text", type=int, nargs="+", default=[43, 128])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    rows = run(args.preset, args.device, dtype, args.batches, args.text, args.frames, args.repeats)
    print_table(rows)
    print(write_results("stages", rows, device=args.device, preset=args.preset, dtype=str(dtype)))


if __name__ == "__main__":
    main()
