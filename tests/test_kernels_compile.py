"""Both kernels compile for a Hopper GPU (sm_90, bf16) without one: Triton's own compiler and ptxas.

The interpreter runs the kernels' Python semantics; this catches what only the GPU compiler sees
(types of tl.dot operands, shared memory of every autotune config). It runs in a subprocess
because this test session imports the kernels under TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llava_mini.kernels.compress import triton as compress
from llava_mini.kernels.prefusion import triton as prefusion

def compile_all(autotuned, pointers, constexprs, scalars_fp32=()):
    kernel = autotuned.fn
    names = kernel.arg_names
    for config in autotuned.configs:
        consts = dict(constexprs, **config.kwargs)
        signature = {}
        for n in names:
            if n in consts:
                signature[n] = "constexpr"
            elif n in pointers:
                signature[n] = pointers[n]
            elif n in scalars_fp32:
                signature[n] = "fp32"
            else:
                signature[n] = "i64" if n.startswith("stride") else "i32"
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        assert compiled.metadata.shared <= 227 * 1024, (config, compiled.metadata.shared)
        print(kernel.__name__, config, "shared", compiled.metadata.shared)

compile_all(prefusion._prefusion_attention_kernel,
            {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Keep": "*u8",
             "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32"},
            dict(HEAD_DIM=128, BLOCK_D=128, GROUP_SIZE=4, CAUSAL=True, HAS_KEEP=True, VARLEN=False,
                 DOT_PRECISION="tf32"),
            scalars_fp32=("qk_scale",))
compile_all(compress._absorbed_kernel,
            {"x_ptr": "*bf16", "queries_ptr": "*bf16", "key_table_ptr": "*fp32", "key_grid_ptr": "*fp32",
             "starts_ptr": "*i64", "lengths_ptr": "*i32", "widths_ptr": "*i32", "mask_ptr": "*u8",
             "y_ptr": "*bf16", "max_ptr": "*fp32", "sum_ptr": "*fp32"},
            dict(BLOCK_D=1024, BLOCK_HQ=16, VARLEN=True, KEY_TABLE=True, KEY_GRID=True, HAS_MASK=True,
                 DOT_PRECISION="tf32"),
            scalars_fp32=("eps",))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and ("ptxas" in run.stderr and "not found" in run.stderr):
        pytest.skip("no ptxas in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
