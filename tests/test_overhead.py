"""profiling.overhead: host vs device time per call, and what takes the host's time."""

import sys
from pathlib import Path

import pytest
import torch

from llava_mini.profiling.overhead import format_overhead, host_overhead


def two_matmuls_and_three_adds(a):
    for _ in range(2):
        torch.mm(a, a)
    for _ in range(3):
        torch.add(a, a)


def test_counts_the_python_functions_and_ops_of_one_call():
    a = torch.randn(8, 8)
    result = host_overhead(lambda: two_matmuls_and_three_adds(a), "cpu", calls=4, top=50)
    python = {what.split(" ")[0]: count for what, count, _ in result.python}
    assert python["two_matmuls_and_three_adds"] == 1
    ops = {what: count for what, count, _ in result.ops}
    assert ops["aten::mm"] == 2 and ops["aten::add"] == 3
    assert result.enqueue_ms > 0 and all(own >= 0 for _, _, own in result.python + result.ops)
    # off CUDA there is no device timeline to report
    assert result.drain_ms is None and result.timeline_ms is None and result.kernel_ms is None
    assert result.host_bound is None
    text = format_overhead("case", result)
    assert text.startswith("case: enqueue") and "aten::mm" in text


@pytest.mark.parametrize("kwargs, message", [(dict(calls=0), "calls: expected a positive int"),
                                             (dict(top=0), "top: expected a positive int")])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        host_overhead(lambda: None, "cpu", **kwargs)


def test_the_overhead_bench_runs_every_case_on_the_cpu(monkeypatch, capsys):
    """The GPU runbook's `overhead` step, on tiny shapes under the interpreter (so a GPU run does not
    find a broken script)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import test_bench_overhead as bench

    records = bench.run("cpu", calls=1, write=False)
    names = [r["case"] for r in records]
    assert names == list(bench.cases(torch.device("cpu"), bench.CPU_SHAPES))
    assert any("fused" in n and "fwd+bwd" in n for n in names)
    # each fused case went through our op (the profiler saw it), each alternative did not
    for r in records:
        ours = any(what.startswith("llava_mini::") for what, _, _ in r["ops"])
        assert ours == ("fused" in r["case"]), r["case"]
    assert "compress fused:" in capsys.readouterr().out
    for name in ("test_bench_overhead", "test_bench_compress"):
        sys.modules.pop(name, None)
