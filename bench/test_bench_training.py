"""Benchmark: one LLaVA-Mini training step (forward + backward + AdamW step), triton vs torch backend.

At the real shapes of a preset (random weights; the LLM cut to ``--llm-layers`` decoder layers so a
full fine-tuning step's weights, gradients and AdamW state fit one GPU: the per-layer cost is what
is compared), a batch of ``--batch`` images with ``--text``-token prompts whose answer half is
labelled. Stage ``finetune`` of the released recipe (everything but the vision tower trains) or
``pretrain`` (compressor, projector, pre-fusion). The two backends alternate on the paired protocol
(``estimate.paired_ratio``: median per-pair ratio torch / triton with its 95% interval); peak device
memory of one step on each. Timings are never asserted. The triton backend trains through both
kernels' fused backward passes.

    PYTHONPATH=. python bench/test_bench_training.py                     # GPU: llava-mini-vicuna-7b, bf16
    PYTHONPATH=. python bench/test_bench_training.py --preset tiny --device cpu --backends torch   # smoke run
"""

from __future__ import annotations

import argparse

import pytest
import torch

from llava_mini.lmm import IGNORE_INDEX, LlavaMini, LlavaMiniConfig
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.latency import random_inputs
from llava_mini.profiling.results import write_results
from llava_mini.training.recipe import freeze_for

PROTOCOL = Protocol(rel_width=0.05, budget_s=20.0)


def build(preset: str, llm_layers: int | None, device: str, dtype: torch.dtype, stage: str):
    config = LlavaMiniConfig.from_preset(preset)
    if llm_layers is not None:
        config.text = dict(config.text, num_hidden_layers=llm_layers)
    torch.manual_seed(0)
    model = LlavaMini.from_config(config, dtype=dtype, device=device).train()
    params = freeze_for(model, stage)
    return model, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0), params


def step_fn(model, optimizer, pixels, ids, labels, backend: str):
    def step():
        loss = model(images=pixels, input_ids=ids, labels=labels, backend=backend).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def peak_bytes(fn, device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run(preset, device, dtype, batch, text, llm_layers, stage, backends, protocol, checkpointing=False) -> list[dict]:
    model, optimizer, params = build(preset, llm_layers, device, dtype, stage)
    if checkpointing:
        model.gradient_checkpointing_enable()
    pixels, ids = random_inputs(model, batch, text)
    labels = [[IGNORE_INDEX] * (len(r) // 2) + r[len(r) // 2:] for r in ids]
    steps = {b: step_fn(model, optimizer, pixels, ids, labels, b) for b in backends}
    for fn in steps.values():  # warm-up: compiles, the optimizer's state
        fn()
    base = dict(preset=preset, stage=stage, batch=batch, text_tokens=text, llm_layers=llm_layers, dtype=str(dtype),
                trainable_params=sum(p.numel() for p in params), gradient_checkpointing=checkpointing)
    rows = [dict(base, backend=b, peak_bytes=peak_bytes(fn, device)) for b, fn in steps.items()]
    if "torch" in steps and "triton" in steps:
        c = paired_ratio(timer(steps["torch"], device), timer(steps["triton"], device), protocol)
        rows[0]["ms"], rows[1]["ms"] = c.numerator.to_dict(), c.denominator.to_dict()
        rows[1]["speedup_vs_torch"] = c.ratio.to_dict()
    else:  # one backend: its median over a few steps
        for row, fn in zip(rows, steps.values()):
            sample = timer(fn, device)
            times = sorted(sample() for _ in range(5))
            row["ms"] = {"median": times[2], "samples": times}
    return rows


def print_table(rows):
    print(f"{'backend':<8}{'stage':<10}{'batch':>6}{'L':>5}{'ms':>11}{'peak MiB':>10}{'speedup vs torch [95% interval]':>36}")
    for r in rows:
        ms = r.get("ms", {}).get("median")
        ms = "-" if ms is None else f"{ms:.2f}"
        peak = r["peak_bytes"] / 2 ** 20 if r["peak_bytes"] is not None else None
        speed = r.get("speedup_vs_torch")
        print(f"{r['backend']:<8}{r['stage']:<10}{r['batch']:>6}{r['text_tokens']:>5}"
              f"{ms:>11}{'-' if peak is None else f'{peak:.0f}':>10}"
              f"{format_estimate(speed) if speed else '-':>36}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_training(benchmark):
    rows = benchmark.pedantic(run, args=("llava-mini-vicuna-7b", "cuda", torch.bfloat16, 8, 128, 4, "finetune",
                                         ("torch", "triton"), PROTOCOL), rounds=1, iterations=1)
    print_table(rows)
    print(write_results("training", rows, protocol=PROTOCOL.to_dict()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-mini-vicuna-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM decoder layers kept (0 < n; default 4)")
    parser.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune")
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--budget", type=float, default=PROTOCOL.budget_s, help="seconds for the comparison")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    protocol = Protocol(rel_width=PROTOCOL.rel_width, budget_s=args.budget)
    rows = run(args.preset, args.device, dtype, args.batch, args.text, args.llm_layers, args.stage,
               tuple(args.backends), protocol, args.gradient_checkpointing)
    print_table(rows)
    print(write_results("training", rows, device=args.device, preset=args.preset, dtype=str(dtype),
                        protocol=protocol.to_dict()))


if __name__ == "__main__":
    main()
