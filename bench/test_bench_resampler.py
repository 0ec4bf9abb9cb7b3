"""Benchmark: FusedResampler against the resamplers it replaces, at their real shapes.

The real modules (Qwen-VL's ``visual.py``, MiniCPM-V's ``resampler.py``) cannot be imported here
(their code is not in this repository): the baseline is their plain-PyTorch equivalent in
``llava_mini.kernels.compress.released``, which computes the way the sources do (sequence-first
``nn.MultiheadAttention`` with its default ``need_weights=True``, the key position table built on
every call, MiniCPM-V's per-image loop) and matches their outputs (tests/test_resamplers.py).

Cases (bf16 on a GPU):
- MiniCPM-V 2.6: 64 queries, 1152-d SigLIP features projected to the LLM width 3584 (28 heads),
  batches of slices with different patch grids (padded, as the model passes them);
- Qwen-VL: 256 queries over 1024 tokens (32 x 32), 1664-d ViT-bigG features projected to 4096 (32 heads).

Each case compares the fused module with the baseline on the project's paired protocol
(``estimate.paired_ratio``: the two alternate, the speedup is the median per-pair ratio with its
95% interval), checks their outputs agree, prints a table and writes ``bench/results/<gpu>/resampler.json``. Timings are
reported, never asserted. Without a GPU only the structure runs (tiny shapes, Triton interpreter).

    PYTHONPATH=. python bench/test_bench_resampler.py     # the full sweep (GPU)
    pytest bench/test_bench_resampler.py -s                # GPU: the sweep; CPU: the tiny structure check
"""

from __future__ import annotations

import pytest
import torch

from llava_mini.kernels.compress import FusedResampler, choose_form
from llava_mini.kernels.compress.released import MiniCPMV26Resampler, QwenVLResampler
from llava_mini.profiling.estimate import Protocol, format_estimate, paired_ratio, timer
from llava_mini.profiling.results import write_results

# (name, module constructor arguments, batches); MiniCPM-V 2.6 slices are 448 px crops: ~32 x 32 patches.
MINICPM_V_26 = dict(num_queries=64, embed_dim=3584, num_heads=28, kv_dim=1152)
QWEN_VL = dict(grid_size=16, embed_dim=4096, num_heads=32, kv_dim=1664)
SLICE_GRIDS = [(32, 32), (28, 36), (36, 28), (24, 42), (32, 32)]
BATCHES = (1, 10, 64)
TINY = {  # the CPU structure check
    "minicpm-v-2.6": dict(num_queries=5, embed_dim=32, num_heads=4, kv_dim=24),
    "qwen-vl": dict(grid_size=2, embed_dim=32, num_heads=4, kv_dim=24),
}


PROTOCOL = Protocol(rel_width=0.05, budget_s=2.0)  # per comparison
TINY_PROTOCOL = Protocol(rel_width=0.5, budget_s=0.0, min_samples=2, warmup=1)  # CPU structure check only
MIN_SAMPLE_MS = 1.0  # shorter calls are repeated within a sample (launch jitter)


def build(name: str, config: dict, device, dtype):
    """The released-equivalent module (random weights, non-trivial LayerNorms) and its fused twin."""
    torch.manual_seed(0)
    cls = MiniCPMV26Resampler if name == "minicpm-v-2.6" else QwenVLResampler
    module = cls(**config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        module.query.normal_(std=0.5)
        for norm in (module.ln_q, module.ln_kv):
            norm.weight.normal_(1.0, 0.1)
            norm.bias.normal_(0.0, 0.1)
    return module, FusedResampler.from_module(module)


def inputs(name: str, config: dict, batch: int, device, dtype, tiny: bool) -> dict:
    kv_dim = config["kv_dim"]
    if name == "qwen-vl":
        tokens = 9 if tiny else 1024
        return dict(x=torch.randn(batch, tokens, kv_dim, device=device, dtype=dtype))
    grids = [(2, 3), (3, 2), (2, 2)] if tiny else SLICE_GRIDS
    sizes = torch.tensor([grids[b % len(grids)] for b in range(batch)], dtype=torch.int32, device=device)
    tokens = int((sizes[:, 0] * sizes[:, 1]).max())
    return dict(x=torch.randn(batch, tokens, kv_dim, device=device, dtype=dtype), tgt_sizes=sizes)


def bench_case(name, config, batch, device, dtype, tiny) -> dict:
    module, fused = build(name, config, device, dtype)
    args = inputs(name, config, batch, device, dtype, tiny)
    with torch.no_grad():
        c = paired_ratio(timer(lambda: module(**args), device, min_sample_ms=MIN_SAMPLE_MS),
                         timer(lambda: fused(**args), device, min_sample_ms=MIN_SAMPLE_MS),
                         TINY_PROTOCOL if tiny else PROTOCOL)
        out, expected = fused(**args).float(), module(**args).float()
    heads, queries = config["num_heads"], module.query.shape[0]
    return {
        "model": name, "batch": batch, "tokens": args["x"].shape[1], "queries": queries,
        "kv_dim": config["kv_dim"], "dim": config["embed_dim"], "heads": heads,
        "dtype": str(dtype).removeprefix("torch."), "form": choose_form(heads, queries, config["embed_dim"], dtype, device),
        "fused_ms": c.denominator.to_dict(), "source_ms": c.numerator.to_dict(), "speedup": c.ratio.to_dict(),
        "max_rel_diff": ((out - expected).abs().max() / expected.abs().max()).item(),
    }


def run_sweep(tiny: bool = False) -> list[dict]:
    """Measure every case; print the table; write bench/results/<device>/resampler.json (GPU runs)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    cases = TINY if tiny else {"minicpm-v-2.6": MINICPM_V_26, "qwen-vl": QWEN_VL}
    print(f"\n{'model':>14} {'B':>3} {'N':>5} {'Q':>4} {'form':>9}  fused ms | source ms | speedup [95% interval] | max rel")
    records = []
    for name, config in cases.items():
        for batch in ((3,) if tiny else BATCHES):
            r = bench_case(name, config, batch, device, dtype, tiny)
            records.append(r)
            print(f"{name:>14} {batch:>3} {r['tokens']:>5} {r['queries']:>4} {r['form']:>9}  "
                  f"{format_estimate(r['fused_ms'], 'fused')} | {format_estimate(r['source_ms'], 'source')} | "
                  f"{format_estimate(r['speedup'], 'speedup')} | {r['max_rel_diff']:.1e}")
    if not tiny:
        print(f"wrote {write_results('resampler', records, device=device)}")
    return records


@pytest.mark.gpu
def test_bench_resampler(benchmark):
    records = benchmark.pedantic(run_sweep, rounds=1, iterations=1)
    assert len(records) == 2 * len(BATCHES)
    assert all(r["max_rel_diff"] < 5e-2 for r in records)  # bf16 against bf16: agreement, not timing


def test_bench_resampler_structure():
    """CPU: the benchmark's code path on tiny shapes (kernel under the Triton interpreter)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the full benchmark")
    records = run_sweep(tiny=True)
    assert [r["model"] for r in records] == ["minicpm-v-2.6", "qwen-vl"]
    assert all(r["max_rel_diff"] < 1e-4 and r["fused_ms"]["median"] > 0 and r["source_ms"]["median"] > 0
               for r in records)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/test_bench_resampler.py needs a CUDA GPU for the real shapes "
                         "(pytest bench/test_bench_resampler.py runs the tiny structure check on the CPU)")
    run_sweep()
