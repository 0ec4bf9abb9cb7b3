"""The kernels compile ahead of time for sm_80/86/89/90 without a GPU (``llava_mini.kernels.aot``).

Triton's own compiler and ptxas, with the argument specialisation a real launch gets: the dispatch
rule agrees with the compiled shared memory, no config that cannot fit is left for the autotuner,
and the configs the autotuner may pick spill no more than their kernel allows (see ``llava_mini/kernels/aot.py``). The
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


def prefusion_with_wrong_rules():
    """Pre-fusion bf16 at d=128 on sm_86, once with a rule that keeps every config, once with one that
    keeps none: the check must report both."""
    import dataclasses

    from llava_mini.kernels.gpus import arch
    from llava_mini.kernels.prefusion.aot import forward_cases

    [case] = [c for c in forward_cases() if c.shape == "Llama-3.1-8B 32/8 x 128" and str(c.dtype) == "torch.bfloat16"]
    return [dataclasses.replace(case, keeps=lambda config, gpu: True, archs=(arch(86),)),
            dataclasses.replace(case, keeps=lambda config, gpu: False, archs=(arch(86),))]


def compressor_with_wrong_dispatch():
    """The compressor at C=1: fp32 on sm_86 run absorbed although no config fits, bf16 on sm_90 sent to
    the projected form although configs fit, and with an occupancy the launcher does not get: the
    check must report all three."""
    import dataclasses

    from llava_mini.kernels.compress.aot import forward_cases
    from llava_mini.kernels.gpus import arch

    def case(dtype):
        return next(c for c in forward_cases() if c.shape.startswith("C=1 N=576, 256") and str(c.dtype) == dtype)

    return [dataclasses.replace(case("torch.float32"), picked=lambda gpu: True, archs=(arch(86),)),
            dataclasses.replace(case("torch.bfloat16"), picked=lambda gpu: False, programs_per_sm=2,
                                archs=(arch(90),))]


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
    # Both kernels (CASE_PROVIDERS); the failing-rule tests below reuse its cached compiles.
    run = _run_check()
    assert run.returncode == 0, run.stderr[-5000:]
    assert "| prefusion | Llama-3.1-8B 32/8 x 128 | float32 | sm_86" in run.stdout
    for dtype in ("float16", "bfloat16", "float32"):
        assert f"| compress C=1 | {dtype} | sm_90 (H100) |" in run.stdout
    assert "| compress C=1 | float32 | sm_86 (RTX 3090) | none of 4: projected form" in run.stdout
    # the backward kernels (issue 20): both pre-fusion kernels in every dtype; both of the compressor's
    # wherever the forward takes the absorbed form (C=1 and 2 in fp16/bf16 on every arch, fp32 C=1 on
    # A100/H100), the projected form elsewhere
    for kernel in ("dkdv", "dq"):
        for dtype in ("float16", "bfloat16", "float32"):
            assert f"| prefusion backward ({kernel}) | {dtype} | sm_86 (RTX 3090) | 1 of 1 |" in run.stdout
    for kernel in ("scores", "rows"):
        for size, dtype, gpu in (("C=1", "bfloat16", "sm_86 (RTX 3090)"), ("C=2", "bfloat16", "sm_90 (H100)"),
                                 ("C=1", "float32", "sm_80 (A100)")):
            assert f"| compress backward ({kernel}) {size} | {dtype} | {gpu} | 4 of 4 |" in run.stdout
        assert (f"| compress backward ({kernel}) C=1 | float32 | sm_86 (RTX 3090) | none considered at this shape: "
                "projected form under autograd") in run.stdout


@pytest.mark.slow
def test_check_fails_on_a_config_left_for_the_autotuner():
    run = _run_check("--jobs", "1", "--cases", "test_kernels_compile:prefusion_with_wrong_rules")
    assert run.returncode == 1
    limit = 99 * 1024  # sm_86
    assert re.search(rf"BLOCK_M=128 BLOCK_N=64 w8 s4: kept by the rule but needs \d+ B of shared memory > {limit} B",
                     run.stderr)
    assert "dropped by the rule but fits" in run.stderr
    assert "the rule keeps no config" in run.stderr


@pytest.mark.slow
def test_check_fails_when_the_compressor_dispatch_disagrees():
    run = _run_check("--jobs", "1", "--cases", "test_kernels_compile:compressor_with_wrong_dispatch")
    assert run.returncode == 1
    assert re.search(r"compress C=1 N=576, 256 images float32 on sm_86 \(RTX 3090\): the dispatch runs this kernel "
                     r"but the rule keeps no config", run.stderr)
    assert re.search(r"compress C=1 N=576, 256 images bfloat16 on sm_90 \(H100\): the dispatch runs projected form "
                     r".* although the rule keeps BLOCK_N=16 w8 s1", run.stderr)
    assert re.search(r"bfloat16 on sm_90 \(H100\), BLOCK_N=16 w8 s1: occupancy 1 programs per SM .* the launcher "
                     r"assumes 2", run.stderr)
