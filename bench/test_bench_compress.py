"""Benchmark: the fused compressor against the reference path and nn.MultiheadAttention (GPU only).

One run measures the GPU's copy bandwidth, then for every (B, C, N) at D=1024, 8 heads, bf16 the
fused op against ``compress_ref`` and against the released module's ``nn.MultiheadAttention``
forward, each comparison interleaved (``estimate.paired_ratio``: the two alternate, the speedup is
the median per-pair ratio with its 95% interval; CUDA events, calls shorter than 1 ms repeated back
to back within a sample, so small inputs run from a warm L2 on both sides). It prints a table and
writes ``bench/results/<gpu>/compress.json``. Timings are reported, never asserted.

    PYTHONPATH=. python bench/test_bench_compress.py      # the full sweep
    pytest bench/test_bench_compress.py -s                 # the same, under pytest-benchmark

Forward + backward (``run_backward_sweep``; ``--backward``): C = 1 and 2, N = 576, B = 16 and 256;
one call is the forward and ``torch.autograd.grad`` of x and every trainable weight (the position
table is fixed, as released) for a fixed random output gradient: the fused path against the
reference path and the ``nn.MultiheadAttention`` module, interleaved; the peak device memory a call
adds, for each.

Baselines that would not fit in memory (they materialise K and V for every image) are timed on the
largest power-of-two sub-batch that fits and scaled linearly; ``baseline_batch`` records which.
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch
from torch import nn

from llava_mini.kernels.compress import choose_form, compress, compress_ref, key_pos_embed, sincos_pos_embed_2d
from llava_mini.kernels.compress.backward import backward_flops
from llava_mini.profiling.ceilings import measure_copy_gbps
from llava_mini.profiling.memory import peak_memory
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.results import write_results

BATCHES = (1, 16, 256, 4096)
GRIDS = (1, 2, 8)  # C: C^2 queries
TOKENS = (576, 2304)  # N: one image, or the 2x2 HD crops
DIM, HEADS, DTYPE = 1024, 8, torch.bfloat16
BASELINE_BYTES_PER_X_BYTE = 8  # LN(x), K input, K, V, MHA's packed projections ...: a generous bound
PROTOCOL = Protocol(rel_width=0.05, budget_s=2.0)  # per comparison
MIN_SAMPLE_MS = 1.0
BACKWARD_BATCHES, BACKWARD_GRIDS, BACKWARD_TOKENS = (16, 256), (1, 2), 576


class MultiheadResampler(nn.Module):
    """The released resampler's forward, on nn.MultiheadAttention: the semantics users run today."""

    def __init__(self, grid: int, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def weights(self) -> list[torch.Tensor]:
        return [self.query, self.pos_embed, self.attn.in_proj_weight, self.attn.in_proj_bias,
                self.attn.out_proj.weight, self.attn.out_proj.bias,
                self.ln_q.weight, self.ln_q.bias, self.ln_kv.weight, self.ln_kv.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        k = x + key_pos_embed(self.pos_embed, x.shape[1])
        return self.attn(q, k, x, need_weights=False)[0]


def baseline_batch(batch: int, x_bytes_per_image: int) -> int:
    """The largest power-of-two sub-batch (<= batch) whose baseline intermediates fit in half the free memory."""
    free, _ = torch.cuda.mem_get_info()
    sub = batch
    while sub > 1 and sub * x_bytes_per_image * BASELINE_BYTES_PER_X_BYTE > free // 2:
        sub //= 2
    return sub


def bench_case(module: MultiheadResampler, batch: int, grid: int, n: int, copy_gbps: float) -> dict:
    device = torch.device("cuda")
    x = torch.randn(batch, n, DIM, device=device, dtype=DTYPE)
    weights = module.weights()
    fused = timer(lambda: compress(x, *weights, HEADS), device, min_sample_ms=MIN_SAMPLE_MS)

    sub = baseline_batch(batch, n * DIM * x.element_size())
    x_sub = x[:sub]

    def scaled(fn):  # a baseline timed on the sub-batch, scaled to the whole batch
        sample = timer(fn, device, min_sample_ms=MIN_SAMPLE_MS)
        return lambda: sample() * batch / sub

    vs_ref = paired_ratio(scaled(lambda: compress_ref(x_sub, *weights, HEADS)), fused, PROTOCOL)
    vs_mha = paired_ratio(scaled(lambda: module(x_sub)), fused, PROTOCOL)
    max_diff = (compress(x_sub, *weights, HEADS).float() - compress_ref(x_sub, *weights, HEADS).float()).abs().max()

    nbytes = x.numel() * x.element_size() + batch * grid * grid * DIM * x.element_size()  # read x, write out
    fused_ms = vs_ref.denominator
    fused_gbps = fused_ms.reciprocal(nbytes / 1e6, "GB/s")
    return {
        "batch": batch, "grid": grid, "queries": grid * grid, "tokens": n, "dim": DIM, "heads": HEADS,
        "dtype": str(DTYPE).removeprefix("torch."), "form": choose_form(HEADS, grid * grid, DIM, DTYPE, device),
        "fused_ms": fused_ms.to_dict(), "fused_gbps": fused_gbps.to_dict(),
        "fraction_of_copy_bandwidth": fused_gbps.median / copy_gbps,
        "ref_ms": vs_ref.numerator.to_dict(), "mha_ms": vs_mha.numerator.to_dict(), "baseline_batch": sub,
        "speedup_vs_ref": vs_ref.ratio.to_dict(), "speedup_vs_mha": vs_mha.ratio.to_dict(),
        "max_abs_diff_vs_ref": max_diff.item(),
    }


def run_sweep() -> list[dict]:
    """Measure every case; print the table; write bench/results/<gpu>/compress.json."""
    device = torch.device("cuda")
    copy_gbps = measure_copy_gbps(device)
    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s")
    print(f"{'B':>5} {'C':>2} {'N':>5} {'form':>9} {'fused ms':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'x ref [95% interval]':>28} {'x mha [95% interval]':>28} {'max diff':>9}")
    records = []
    with torch.no_grad():
        for grid, n in itertools.product(GRIDS, TOKENS):
            module = MultiheadResampler(grid).to(device=device, dtype=DTYPE).eval()
            for batch in BATCHES:
                r = bench_case(module, batch, grid, n, copy_gbps)
                records.append(r)
                print(f"{batch:>5} {grid:>2} {n:>5} {r['form']:>9} {r['fused_ms']['median']:>9.4f} "
                      f"{r['fused_gbps']['median']:>7.0f} {100 * r['fraction_of_copy_bandwidth']:>5.1f}% "
                      f"{format_estimate(r['speedup_vs_ref']):>28} {format_estimate(r['speedup_vs_mha']):>28} "
                      f"{r['max_abs_diff_vs_ref']:>9.2e}")
                torch.cuda.empty_cache()
    path = write_results("compress", records, device=device, copy_gbps=copy_gbps, protocol=PROTOCOL.to_dict())
    print(f"wrote {path}")
    return records


def bench_backward_case(module: MultiheadResampler, batch: int, grid: int, n: int) -> dict:
    """Forward + backward: the fused path vs the reference path vs nn.MultiheadAttention."""
    device = torch.device("cuda")
    x = torch.randn(batch, n, DIM, device=device, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(batch, grid * grid, DIM, device=device, dtype=DTYPE)
    weights = module.weights()
    trainable = [x] + [w for w in weights if w.requires_grad]

    def fused():
        return torch.autograd.grad(compress(x, *weights, HEADS), trainable, grad)

    def reference():
        return torch.autograd.grad(compress_ref(x, *weights, HEADS), trainable, grad)

    def mha():
        return torch.autograd.grad(module(x), [x] + [p for p in module.parameters() if p.requires_grad], grad)

    fused_timer = timer(fused, device, min_sample_ms=MIN_SAMPLE_MS)
    vs_ref = paired_ratio(timer(reference, device, min_sample_ms=MIN_SAMPLE_MS), fused_timer, PROTOCOL)
    vs_mha = paired_ratio(timer(mha, device, min_sample_ms=MIN_SAMPLE_MS), fused_timer, PROTOCOL)
    peaks = {}
    for name, fn in (("fused", fused), ("reference", reference), ("mha", mha)):
        with peak_memory(device) as peak:
            fn()
        peaks[name] = peak.device_above_start
    max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused(), reference()))
    form = choose_form(HEADS, grid * grid, DIM, DTYPE, device)
    flops = backward_flops(batch * n, DIM, HEADS * grid * grid) if form == "absorbed" else None
    return {
        "batch": batch, "grid": grid, "queries": grid * grid, "tokens": n, "dim": DIM, "heads": HEADS,
        "dtype": str(DTYPE).removeprefix("torch."), "form": form, "backward_kernel_flops": flops,
        "fused_ms": vs_ref.denominator.to_dict(), "ref_ms": vs_ref.numerator.to_dict(),
        "mha_ms": vs_mha.numerator.to_dict(),
        "speedup_vs_ref": vs_ref.ratio.to_dict(), "speedup_vs_mha": vs_mha.ratio.to_dict(),
        "peak_bytes": peaks, "max_abs_grad_diff_vs_ref": max_diff,
    }


def run_backward_sweep() -> list[dict]:
    """Forward + backward cases; print the table; write bench/results/<gpu>/compress_backward.json."""
    device = torch.device("cuda")
    print(f"\n{'B':>5} {'C':>2} {'N':>5} {'form':>9} {'fused ms':>9} {'ref ms':>9} {'mha ms':>9} "
          f"{'x ref [95% interval]':>28} {'x mha [95% interval]':>28} {'MiB f/ref/mha':>16} {'max diff':>9}")
    records = []
    for grid in BACKWARD_GRIDS:
        module = MultiheadResampler(grid).to(device=device, dtype=DTYPE).train()
        for batch in BACKWARD_BATCHES:
            r = bench_backward_case(module, batch, grid, BACKWARD_TOKENS)
            records.append(r)
            mib = "/".join(f"{r['peak_bytes'][k] / 2 ** 20:.0f}" for k in ("fused", "reference", "mha"))
            print(f"{batch:>5} {grid:>2} {BACKWARD_TOKENS:>5} {r['form']:>9} {r['fused_ms']['median']:>9.3f} "
                  f"{r['ref_ms']['median']:>9.3f} {r['mha_ms']['median']:>9.3f} "
                  f"{format_estimate(r['speedup_vs_ref']):>28} {format_estimate(r['speedup_vs_mha']):>28} "
                  f"{mib:>16} {r['max_abs_grad_diff_vs_ref']:>9.2e}")
            torch.cuda.empty_cache()
    path = write_results("compress_backward", records, device=device, protocol=PROTOCOL.to_dict())
    print(f"wrote {path}")
    return records


@pytest.mark.gpu
def test_bench_compress_backward(benchmark):
    records = benchmark.pedantic(run_backward_sweep, rounds=1, iterations=1)
    assert len(records) == len(BACKWARD_BATCHES) * len(BACKWARD_GRIDS)


@pytest.mark.gpu
def test_bench_compress(benchmark):
    records = benchmark.pedantic(run_sweep, rounds=1, iterations=1)
    assert len(records) == len(BATCHES) * len(GRIDS) * len(TOKENS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", action="store_true", help="the forward sweep only")
    parser.add_argument("--backward", action="store_true", help="the forward + backward cases only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/test_bench_compress.py needs a CUDA GPU")
    if not args.backward:
        run_sweep()
    if not args.forward:
        run_backward_sweep()
