"""Benchmark: the pre-fusion stage with and without its exact savings, and video encoding.

One run, one model (random weights at the real shapes), side by side:

- pre-fusion stage (vision + compressed + L text rows through the pre-fusion layers) for
  batch 1/16/64 and L = 43/128: the released computation on the reference backend ("torch") and
  on SDPA, then each saving alone and both (prefix split, pruned last layer) on SDPA and on the
  Triton kernels, and a second question about the same images (the cached prefix: text rows only);
- a video of 100 and 1,000 frames encoded to the LLM input: the released per-frame loop against
  batched frames with the savings.

Every variant is compared with the released computation interleaved (``estimate.paired_ratio``:
the two alternate, the speedup is the median per-pair ratio with its 95% interval): pre-fusion
variants against the released stage on "torch" and on "sdpa", batched video against the loop.
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
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.latency import random_inputs
from llava_mini.profiling.results import write_results

RELEASED = Savings(prefix_split=False, prune_last_layer=False, batch_frames=False)
SAVED = Savings(prefix_split=True, prune_last_layer=True, batch_frames=True)
PROTOCOL = Protocol(rel_width=0.05, budget_s=1.5)  # per comparison


def variant(model, savings: Savings, backend: str, fn):
    """``fn`` run with ``savings`` on ``backend`` (set at every call: the variants alternate)."""
    def run():
        model.savings = savings
        with torch.no_grad(), model.backend_scope(backend):
            return fn()
    return run


def stage_cases(model, batch: int, text: int, protocol: Protocol) -> list[dict]:
    pixels, ids = random_inputs(model, batch, text)
    with torch.no_grad():
        vision, compressed = model.embed_vision(pixels)

    def stage():  # the pre-fusion stage as encode runs it under model.savings
        if model.savings.prefix_split:
            return model.fuse_text(model.prefusion.prefix(vision, compressed, model.savings.prune_last_layer), ids)
        return model.fuse_reference(vision, compressed, ids)

    with torch.no_grad(), model.backend_scope("triton"):
        prefix = model.prefusion.prefix(vision, compressed, True)
    cases = [("released", "sdpa", RELEASED, stage)]
    for backend in ("sdpa", "triton"):
        cases += [("prefix_split", backend, Savings(prefix_split=True, prune_last_layer=False), stage),
                  ("prune_last_layer", backend, Savings(prefix_split=False, prune_last_layer=True), stage),
                  ("both_savings", backend, SAVED, stage)]
    cases.append(("second_question", "triton", SAVED, lambda: model.fuse_text(prefix, ids)))
    references = {b: timer(variant(model, RELEASED, b, stage), model.device) for b in ("torch", "sdpa")}
    rows = []
    for name, backend, savings, fn in cases:
        row = dict(stage="prefusion", variant=name, backend=backend, batch=batch, text_tokens=text)
        for ref, ref_timer in references.items():
            c = paired_ratio(ref_timer, timer(variant(model, savings, backend, fn), model.device), protocol)
            row.update({"ms": c.denominator.to_dict(), f"released_{ref}_ms": c.numerator.to_dict(),
                        f"speedup_vs_released_{ref}": c.ratio.to_dict()})
        rows.append(row)
    return rows


def video_cases(model, frames: int, text: int, protocol: Protocol) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    s = model.config.crop_size
    video = torch.randn(frames, 3, s, s, generator=g).to(model.device, model.dtype)
    _, ids = random_inputs(model, 1, text)
    encode = lambda: model.fuse_video(video, ids[0])  # noqa: E731
    loop = timer(variant(model, RELEASED, "sdpa", encode), model.device)
    rows = []
    for backend in ("sdpa", "triton"):
        c = paired_ratio(loop, timer(variant(model, SAVED, backend, encode), model.device), protocol)
        rows.append(dict(stage="video_encode", variant="batched", backend=backend, frames=frames, text_tokens=text,
                         ms=c.denominator.to_dict(), released_loop_ms=c.numerator.to_dict(),
                         speedup_vs_loop=c.ratio.to_dict()))
    return rows


def run(preset: str, device: str, dtype: torch.dtype, batches, texts, frames, protocol: Protocol) -> list[dict]:
    torch.manual_seed(0)
    # Pre-fusion and encoding do not touch the LLM's decoder layers: keep one to save memory.
    model = LlavaMini.from_config(_with_llm_layers(preset, 1), dtype=dtype, device=device)
    rows = []
    for batch, text in itertools.product(batches, texts):
        rows += stage_cases(model, batch, text, protocol)
    for n in frames:
        rows += video_cases(model, n, 43, protocol)
    return rows


def _with_llm_layers(preset: str, layers: int):
    from llava_mini.lmm import LlavaMiniConfig

    config = LlavaMiniConfig.from_preset(preset)
    config.text = dict(config.text, num_hidden_layers=layers)
    return config


def print_table(rows: list[dict]) -> None:
    print(f"{'stage':<13}{'variant':<18}{'backend':<8}{'batch/frames':>13}{'L':>5}{'ms':>11}"
          f"{'speedup vs released torch / vs loop [95% interval]':>52}{'vs released sdpa':>30}")
    for r in rows:
        size = r.get("batch", r.get("frames"))
        speed = r.get("speedup_vs_released_torch", r.get("speedup_vs_loop"))
        sdpa = r.get("speedup_vs_released_sdpa")
        print(f"{r['stage']:<13}{r['variant']:<18}{r['backend']:<8}{size:>13}{r['text_tokens']:>5}"
              f"{r['ms']['median']:>11.3f}{format_estimate(speed):>52}{format_estimate(sdpa) if sdpa else '-':>30}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_stages(benchmark):
    rows = benchmark.pedantic(run, args=("llava-mini-vicuna-7b", "cuda", torch.bfloat16, (1, 16, 64), (43, 128),
                                         (100, 1000), PROTOCOL), rounds=1, iterations=1)
    print_table(rows)
    print(write_results("stages", rows, protocol=PROTOCOL.to_dict()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-mini-vicuna-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--text", type=int, nargs="+", default=[43, 128])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--budget", type=float, default=PROTOCOL.budget_s, help="seconds per comparison")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    protocol = Protocol(rel_width=PROTOCOL.rel_width, budget_s=args.budget)
    rows = run(args.preset, args.device, dtype, args.batches, args.text, args.frames, protocol)
    print_table(rows)
    print(write_results("stages", rows, device=args.device, preset=args.preset, dtype=str(dtype),
                        protocol=protocol.to_dict()))


if __name__ == "__main__":
    main()
