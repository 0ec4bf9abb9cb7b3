"""Benchmark: each fused op's fixed per-call cost, split into host enqueue time and device time.

The first H200 run found both fused ops slow on small inputs whatever the work (the compressor
~2-3 ms per call from 1 to 256 images, the pre-fusion attention never under ~0.3 ms), and their
alternatives (nn.MultiheadAttention, the reference path, SDPA) also far above their kernels' time:
a per-call cost that timing alone cannot place. ``profiling.overhead.host_overhead`` measures, for
one small call of each op and of what it replaces, forward and forward + backward, the host's
enqueue time, the device's kernel time and the timeline a timer sees, and names the Python
functions and torch ops / CUDA runtime calls that take the host's time. Prints them; writes
``bench/results/<gpu>/host_overhead.json``.

Shapes on CUDA: compressor B=1, C=1, N=576, D=1024, 8 heads; pre-fusion attention B=1, L=609,
32/32 heads, d=128; bf16. ``--device cpu`` runs tiny shapes under the Triton interpreter (it
checks the script, and shows the Python side of each path; the interpreter's kernels dominate
their rows, so it says nothing of GPU launches).

    PYTHONPATH=. python bench/test_bench_overhead.py             # on the GPU
    PYTHONPATH=. python bench/test_bench_overhead.py --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llava_mini.kernels.compress import compress, compress_ref
from llava_mini.kernels.prefusion import prefusion_attention, prefusion_attention_ref
from llava_mini.profiling.overhead import format_overhead, host_overhead
from llava_mini.profiling.results import write_results
from test_bench_compress import MultiheadResampler


@dataclass(frozen=True)
class Shapes:
    dtype: torch.dtype
    compress_tokens: int  # N
    compress_dim: int
    compress_heads: int
    attention_len: int  # L (the pre-fusion sequence: 576 vision + 1 compressed + 32 text on the GPU)
    attention_heads: int
    head_dim: int


GPU_SHAPES = Shapes(torch.bfloat16, 576, 1024, 8, 609, 32, 128)
CPU_SHAPES = Shapes(torch.float32, 16, 64, 4, 24, 2, 16)  # the interpreter: tiny, no bf16
CALLS = {"cuda": 50, "cpu": 3}


def cases(device: torch.device, shapes: Shapes) -> dict:
    """Name -> a zero-argument call: each fused op and what it replaces, forward and forward + backward."""
    torch.manual_seed(0)
    dt = shapes.dtype
    resampler = MultiheadResampler(1, shapes.compress_dim, shapes.compress_heads).to(device=device, dtype=dt)
    weights = resampler.weights()
    heads = shapes.compress_heads
    x = torch.randn(1, shapes.compress_tokens, shapes.compress_dim, device=device, dtype=dt)
    x_grad = x.clone().requires_grad_()
    dy = torch.randn(1, 1, shapes.compress_dim, device=device, dtype=dt)
    trainable = [x_grad] + [w for w in weights if w.requires_grad]

    length, h, d = shapes.attention_len, shapes.attention_heads, shapes.head_dim
    q, k, v = (torch.randn(1, length, h, d, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    q_sdpa, k_sdpa, v_sdpa = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    do_sdpa = do.transpose(1, 2).contiguous()

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    def sdpa():  # the flash backend on the GPU (the CPU has none)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device.type == "cuda" else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=True)

    return {
        "compress fused": no_grad(lambda: compress(x, *weights, heads)),
        "compress reference": no_grad(lambda: compress_ref(x, *weights, heads)),
        "compress nn.MultiheadAttention": no_grad(lambda: resampler(x)),
        "compress fused fwd+bwd": lambda: torch.autograd.grad(compress(x_grad, *weights, heads), trainable, dy),
        "compress nn.MultiheadAttention fwd+bwd": lambda: torch.autograd.grad(
            resampler(x_grad), [x_grad] + [p for p in resampler.parameters() if p.requires_grad], dy),
        "prefusion fused": no_grad(lambda: prefusion_attention(q, k, v)),
        "prefusion reference": no_grad(lambda: prefusion_attention_ref(q, k, v)),
        "prefusion sdpa": no_grad(sdpa),
        "prefusion fused fwd+bwd": lambda: torch.autograd.grad(prefusion_attention(q, k, v), (q, k, v), do),
        "prefusion sdpa fwd+bwd": lambda: torch.autograd.grad(sdpa(), (q_sdpa, k_sdpa, v_sdpa), do_sdpa),
    }


def run(device: str = "cuda", calls: int | None = None, write: bool = True) -> list[dict]:
    """Measure every case on ``device``; print each; write the JSON (``write``); return the records."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    calls = calls or CALLS[device.type]
    records = []
    for name, fn in cases(device, shapes).items():
        result = host_overhead(fn, device, calls=calls)
        print(format_overhead(name, result))
        records.append({"case": name, **result.to_dict()})
    if write:
        print(f"wrote {write_results('host_overhead', records, device=device, calls=calls, shapes=str(shapes))}")
    return records


@pytest.mark.gpu
def test_bench_overhead(benchmark):
    records = benchmark.pedantic(run, rounds=1, iterations=1)
    assert all(r["kernel_ms"] is not None for r in records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--calls", type=int, default=None, help="calls per figure (default: 50 on CUDA, 3 on the CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/test_bench_overhead.py needs a CUDA GPU (or --device cpu)")
    run(args.device, args.calls)
