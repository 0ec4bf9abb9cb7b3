"""The kernels compile ahead of time for sm_80/86/89/90 without a GPU (``llava_mini.kernels.aot``).

Triton's own compiler and ptxas, with the argument specialisation a real launch gets: the dispatch
rule agrees with the compiled shared memory, no config that cannot fit is left for the autotuner,
and the configs the autotuner may pick do not spill (see ``llava_mini/kernels/aot.py``). The
interpreter runs the kernels' Python semantics; this catches what only the GPU compiler sees. It
runs in a subprocess because this test session imports the kernels under TRITON_INTERPRET=1.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def compressor_cases():
    """The compressor's absorbed kernel at C=1 (8 heads, D=1024), bf16, sm_90: every autotune config
    must fit (it has no pruning yet). Its launch arguments are written out here because its launcher
    runs on CUDA tensors only; its own aot_cases() replace this once it prunes its configs."""
    import torch

    from llava_mini.kernels.aot import LaunchCase
    from llava_mini.kernels.compress import triton as compress
    from llava_mini.kernels.gpus import arch

    batch, n, dim, hq = 256, 576, 1024, 8

    def tensor(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x = tensor(batch, n, dim)
    args = dict(  # LLaVA-Mini's case: one shared key table, no ragged rows, no mask (unused pointers get x)
        x_ptr=x, queries_ptr=tensor(hq, dim), key_table_ptr=tensor(n, hq, dtype=torch.float32), key_grid_ptr=x,
        starts_ptr=x, lengths_ptr=x, widths_ptr=x, mask_ptr=x,
        y_ptr=tensor(hq, batch, 1, dim), max_ptr=tensor(hq, batch, 1, dtype=torch.float32),
        sum_ptr=tensor(hq, batch, 1, dtype=torch.float32),
        B=batch, N=n, D=dim, HQ=hq, rows_per_split=n, num_splits=1, grid_positions=0,
        stride_xb=n * dim, stride_xn=dim, stride_xd=1, stride_tb=0, stride_mb=0, eps=1e-5,
        BLOCK_D=dim, BLOCK_HQ=16, VARLEN=False, KEY_TABLE=True, KEY_GRID=False, HAS_MASK=False,
        DOT_PRECISION="tf32",
    )
    return [LaunchCase("compress", "C=1, 8 heads, D=1024", torch.bfloat16, compress._absorbed_kernel, args,
                       keeps=lambda config, gpu: True, max_spill_bytes=None, archs=(arch(90),))]


def prefusion_with_wrong_rules():
    """Pre-fusion bf16 at d=128 on sm_86, once with a rule that keeps every config, once with one that
    keeps none: the check must report both."""
    import dataclasses

    from llava_mini.kernels.gpus import arch
    from llava_mini.kernels.prefusion.aot import aot_cases

    [case] = [c for c in aot_cases() if c.shape == "Llama-3.1-8B 32/8 x 128" and str(c.dtype) == "torch.bfloat16"]
    return [dataclasses.replace(case, keeps=lambda config, gpu: True, archs=(arch(86),)),
            dataclasses.replace(case, keeps=lambda config, gpu: False, archs=(arch(86),))]


def _run_check(*args):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    run = subprocess.run([sys.executable, "-m", "llava_mini.kernels.aot", *args], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=ROOT)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no ptxas in this Triton install")
    return run


@pytest.mark.slow
def test_kernels_fit_every_arch():
    run = _run_check("--cases", "llava_mini.kernels.prefusion.aot:aot_cases", "test_kernels_compile:compressor_cases")
    assert run.returncode == 0, run.stderr[-5000:]
    assert "| prefusion | Llama-3.1-8B 32/8 x 128 | float32 | sm_86" in run.stdout
    assert "| compress |" in run.stdout


@pytest.mark.slow
def test_check_fails_on_a_config_left_for_the_autotuner():
    run = _run_check("--jobs", "1", "--cases", "test_kernels_compile:prefusion_with_wrong_rules")
    assert run.returncode == 1
    limit = 99 * 1024  # sm_86
    assert re.search(rf"BLOCK_M=128 BLOCK_N=64 w8 s4: kept by the rule but needs \d+ B of shared memory > {limit} B",
                     run.stderr)
    assert "dropped by the rule but fits" in run.stderr
    assert "the rule keeps no config" in run.stderr
