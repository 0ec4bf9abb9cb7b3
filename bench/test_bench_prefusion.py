"""Benchmark: the fused pre-fusion attention kernel against PyTorch SDPA's flash backend (GPU only).

One run measures the GPU's bf16 matmul rate, then for every case the Triton kernel against
``scaled_dot_product_attention`` restricted to ``SDPBackend.FLASH_ATTENTION``, interleaved
(``estimate.paired_ratio``: the two alternate, the speedup is the median per-pair ratio with its 95%
interval; CUDA events, calls shorter than 1 ms repeated back to back within a sample). Cases: batch 1/8/64, L = 32/128 text tokens, Vicuna (32/32 heads)
and Llama-3.1 (32/8 heads) at d=128, bf16, causal; both the full pre-fusion sequence
(Lq = Lk = 577 + L) and the cached-prefix case (Lq = L text queries over Lk = 577 + L keys,
bottom-right causal). TFLOP/s counts only the pairs the causal mask leaves visible. It prints a
table and writes ``bench/results/<gpu>/prefusion_attention.json``. Timings are never asserted.

    PYTHONPATH=. python bench/test_bench_prefusion.py      # the full sweep
    pytest bench/test_bench_prefusion.py -s                 # the same, under pytest-benchmark

SDPA gets its own best layout ([B, H, L, d] contiguous) with K/V already expanded to H heads
(untimed) and the bottom-right causal mask ``causal_lower_right``, which its flash backend runs.

Forward + backward (``run_backward_sweep``; ``--backward``): the full pre-fusion sequence at batch 1
and 8, L = 32, both head layouts; one call is the forward and ``torch.autograd.grad`` of dq, dk, dv
for a fixed random output gradient. The kernel against SDPA's flash backend (its K/V leaves already
expanded) and against the reference path (``prefusion_attention_ref``, which materialises the
[B, H, Lq, Lk] scores), each interleaved; the peak device memory a call adds, for each.
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from llava_mini.kernels.prefusion import causal_pairs, prefusion_attention, prefusion_attention_ref
from llava_mini.profiling.ceilings import measure_matmul_tflops
from llava_mini.profiling.memory import peak_memory
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.results import write_results

BATCHES = (1, 8, 64)
TEXT_TOKENS = (32, 128)  # L: the prompt; the vision side is 576 tokens + 1 compressed token
HEADS = {"vicuna-7b": (32, 32), "llama-3.1-8b": (32, 8)}
CACHED_PREFIX = (False, True)  # True: only the L text queries, over the cached vision keys
HEAD_DIM, DTYPE = 128, torch.bfloat16
PROTOCOL = Protocol(rel_width=0.05, budget_s=2.0)  # per comparison
MIN_SAMPLE_MS = 1.0
BACKWARD_BATCHES, BACKWARD_TEXT = (1, 8), 32


def bench_case(batch: int, text: int, model: str, cached_prefix: bool, matmul_tflops: float) -> dict:
    device = torch.device("cuda")
    heads, kv_heads = HEADS[model]
    k_len = 577 + text
    q_len = text if cached_prefix else k_len
    q = torch.randn(batch, q_len, heads, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(batch, k_len, kv_heads, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(batch, k_len, kv_heads, HEAD_DIM, device=device, dtype=DTYPE)

    group = heads // kv_heads
    q_sdpa = q.transpose(1, 2).contiguous()
    k_sdpa = k.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    v_sdpa = v.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    mask = causal_lower_right(q_len, k_len)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, attn_mask=mask)

    c = paired_ratio(timer(sdpa, device, min_sample_ms=MIN_SAMPLE_MS),
                     timer(lambda: prefusion_attention(q, k, v), device, min_sample_ms=MIN_SAMPLE_MS), PROTOCOL)
    max_diff = (prefusion_attention(q, k, v).float() - sdpa().transpose(1, 2).float()).abs().max()

    flops = 4 * HEAD_DIM * heads * batch * causal_pairs(q_len, k_len)
    kernel_tflops = c.denominator.reciprocal(flops / 1e9, "TFLOP/s")
    return {
        "model": model, "batch": batch, "text_tokens": text, "cached_prefix": cached_prefix,
        "q_len": q_len, "k_len": k_len, "heads": heads, "kv_heads": kv_heads, "head_dim": HEAD_DIM,
        "dtype": str(DTYPE).removeprefix("torch."), "causal_flops": flops,
        "kernel_ms": c.denominator.to_dict(), "kernel_tflops": kernel_tflops.to_dict(),
        "sdpa_flash_ms": c.numerator.to_dict(),
        "sdpa_flash_tflops": c.numerator.reciprocal(flops / 1e9, "TFLOP/s").to_dict(),
        "speedup_vs_sdpa_flash": c.ratio.to_dict(),
        "fraction_of_matmul_rate": kernel_tflops.median / matmul_tflops,
        "max_abs_diff_vs_sdpa": max_diff.item(),
    }


def run_sweep() -> list[dict]:
    """Measure every case; print the table; write bench/results/<gpu>/prefusion_attention.json."""
    device = torch.device("cuda")
    matmul_tflops = measure_matmul_tflops(device)
    print(f"\nbf16 matmul rate: {matmul_tflops:.0f} TFLOP/s")
    print(f"{'model':>13} {'B':>3} {'Lq':>4} {'Lk':>4} {'kernel ms':>10} {'TFLOP/s':>8} {'%mm':>6} "
          f"{'sdpa ms':>9} {'x sdpa [95% interval]':>28} {'max diff':>9}")
    records = []
    with torch.no_grad():
        for model, text, cached_prefix, batch in itertools.product(HEADS, TEXT_TOKENS, CACHED_PREFIX, BATCHES):
            r = bench_case(batch, text, model, cached_prefix, matmul_tflops)
            records.append(r)
            print(f"{model:>13} {batch:>3} {r['q_len']:>4} {r['k_len']:>4} {r['kernel_ms']['median']:>10.4f} "
                  f"{r['kernel_tflops']['median']:>8.1f} {100 * r['fraction_of_matmul_rate']:>5.1f}% "
                  f"{r['sdpa_flash_ms']['median']:>9.4f} {format_estimate(r['speedup_vs_sdpa_flash']):>28} "
                  f"{r['max_abs_diff_vs_sdpa']:>9.2e}")
            torch.cuda.empty_cache()
    path = write_results("prefusion_attention", records, device=device, matmul_tflops=matmul_tflops,
                         protocol=PROTOCOL.to_dict())
    print(f"wrote {path}")
    return records


def bench_backward_case(batch: int, text: int, model: str) -> dict:
    """Forward + backward of the full pre-fusion sequence: kernel vs SDPA flash vs the reference path."""
    device = torch.device("cuda")
    heads, kv_heads = HEADS[model]
    length = 577 + text
    q = torch.randn(batch, length, heads, HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True)
    k = torch.randn(batch, length, kv_heads, HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True)
    v = torch.randn(batch, length, kv_heads, HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(q)
    group = heads // kv_heads
    q_sdpa, k_sdpa, v_sdpa = (t.detach().transpose(1, 2).repeat_interleave(n, dim=1).contiguous().requires_grad_()
                              for t, n in ((q, 1), (k, group), (v, group)))
    grad_sdpa = grad.transpose(1, 2).contiguous()

    def kernel():
        return torch.autograd.grad(prefusion_attention(q, k, v), (q, k, v), grad)

    def reference():
        return torch.autograd.grad(prefusion_attention_ref(q, k, v), (q, k, v), grad)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=True)
        return torch.autograd.grad(out, (q_sdpa, k_sdpa, v_sdpa), grad_sdpa)

    kernel_timer = timer(kernel, device, min_sample_ms=MIN_SAMPLE_MS)
    vs_sdpa = paired_ratio(timer(sdpa, device, min_sample_ms=MIN_SAMPLE_MS), kernel_timer, PROTOCOL)
    vs_ref = paired_ratio(timer(reference, device, min_sample_ms=MIN_SAMPLE_MS), kernel_timer, PROTOCOL)
    peaks = {}
    for name, fn in (("kernel", kernel), ("sdpa_flash", sdpa), ("reference", reference)):
        with peak_memory(device) as peak:
            fn()
        peaks[name] = peak.device_above_start
    got, exact = kernel(), reference()
    max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, exact))
    # forward 4 * d * H per visible pair, backward 14 (two recomputations, see the op's FLOP formula)
    flops = 18 * HEAD_DIM * heads * batch * causal_pairs(length, length)
    return {
        "model": model, "batch": batch, "text_tokens": text, "q_len": length, "k_len": length, "heads": heads,
        "kv_heads": kv_heads, "head_dim": HEAD_DIM, "dtype": str(DTYPE).removeprefix("torch."),
        "forward_backward_flops": flops,
        "kernel_ms": vs_sdpa.denominator.to_dict(),
        "kernel_tflops": vs_sdpa.denominator.reciprocal(flops / 1e9, "TFLOP/s").to_dict(),
        "sdpa_flash_ms": vs_sdpa.numerator.to_dict(), "reference_ms": vs_ref.numerator.to_dict(),
        "speedup_vs_sdpa_flash": vs_sdpa.ratio.to_dict(), "speedup_vs_reference": vs_ref.ratio.to_dict(),
        "peak_bytes": peaks, "max_abs_grad_diff_vs_reference": max_diff,
    }


def run_backward_sweep() -> list[dict]:
    """Forward + backward cases; print the table; write bench/results/<gpu>/prefusion_attention_backward.json."""
    device = torch.device("cuda")
    print(f"\n{'model':>13} {'B':>3} {'L':>4} {'kernel ms':>10} {'TFLOP/s':>8} {'sdpa ms':>9} {'ref ms':>9} "
          f"{'x sdpa [95% interval]':>28} {'x ref [95% interval]':>28} {'MiB k/sdpa/ref':>16} {'max diff':>9}")
    records = []
    for model, batch in itertools.product(HEADS, BACKWARD_BATCHES):
        r = bench_backward_case(batch, BACKWARD_TEXT, model)
        records.append(r)
        mib = "/".join(f"{r['peak_bytes'][n] / 2 ** 20:.0f}" for n in ("kernel", "sdpa_flash", "reference"))
        print(f"{model:>13} {batch:>3} {r['q_len']:>4} {r['kernel_ms']['median']:>10.3f} "
              f"{r['kernel_tflops']['median']:>8.1f} {r['sdpa_flash_ms']['median']:>9.3f} "
              f"{r['reference_ms']['median']:>9.3f} {format_estimate(r['speedup_vs_sdpa_flash']):>28} "
              f"{format_estimate(r['speedup_vs_reference']):>28} {mib:>16} {r['max_abs_grad_diff_vs_reference']:>9.2e}")
        torch.cuda.empty_cache()
    path = write_results("prefusion_attention_backward", records, device=device, protocol=PROTOCOL.to_dict())
    print(f"wrote {path}")
    return records


@pytest.mark.gpu
def test_bench_prefusion_backward(benchmark):
    records = benchmark.pedantic(run_backward_sweep, rounds=1, iterations=1)
    assert len(records) == len(BACKWARD_BATCHES) * len(HEADS)


@pytest.mark.gpu
def test_bench_prefusion(benchmark):
    records = benchmark.pedantic(run_sweep, rounds=1, iterations=1)
    assert len(records) == len(BATCHES) * len(TEXT_TOKENS) * len(HEADS) * len(CACHED_PREFIX)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", action="store_true", help="the forward sweep only")
    parser.add_argument("--backward", action="store_true", help="the forward + backward cases only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/test_bench_prefusion.py needs a CUDA GPU")
    if not args.backward:
        run_sweep()
    if not args.forward:
        run_backward_sweep()
