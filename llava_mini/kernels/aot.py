"""Ahead-of-time compile check of the Triton kernels for every GPU in ``gpus.ARCHS``, without a GPU.

    python -m llava_mini.kernels.aot [--table bench/results/kernel_resources.md] [--jobs N]

A kernel module describes what its launcher runs at the product shapes as ``aot_cases()``, a list
of ``LaunchCase``: the autotuned kernel, every argument of the launch (recorded from the real
launcher with ``record_launches``), the configs its autotuner considers there, and the dispatch rule
(``keeps``: may this config run on this arch?). For each case, arch and config this module compiles
the kernel with Triton's own compiler, with the specialisation a real launch gets (Triton's own
argument binder: 16-byte aligned pointers, integers divisible by 16 marked so, integers equal to 1
made constants), and checks:

1. the rule agrees with the compiled size: every config it keeps fits the arch's shared memory
   and every config it drops does not, so no config that cannot fit is left for the autotuner to
   discover (OutOfResources) at the first call;
2. the rule keeps at least one config on each arch where the dispatch runs the kernel, and none
   where it runs something else (``picked``: e.g. the compressor's ``choose_form``);
3. the kept configs spill at most the case's ``max_spill_bytes`` (ptxas's own report) and, where
   the launcher sizes its grid by it, have the occupancy it assumes (``programs_per_sm``).

Shared memory is fixed once the kernel is lowered to LLVM IR, so dropped configs stop there; ptxas
(the one shipped with Triton, with the flags Triton launches it with) runs only for kept configs.
Launches that compile to the same binary (same specialisation, config and arch: e.g. two sequence
lengths both divisible by 16) are compiled once. Reports are cached in Triton's cache directory
under Triton's own cache key (source, specialisation, options, target, compiler versions). The
table (``--table``) lists shared memory, registers, spills and occupancy per case, arch and config.

A new kernel joins the check with an ``aot_cases()`` in its module, listed in ``CASE_PROVIDERS``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from typing import Any, Callable

import torch

from llava_mini.kernels.gpus import ARCHS, Arch, occupancy

# The kernel modules whose aot_cases() the check runs; a new kernel adds its module here.
CASE_PROVIDERS = ("llava_mini.kernels.prefusion.aot:aot_cases", "llava_mini.kernels.compress.aot:aot_cases")
REPORT_VERSION = "aot-report-1"
MAX_DEFAULT_JOBS = 8  # each compile process holds torch and Triton (a few hundred MB)
# Any 16-byte aligned address: what PyTorch's CUDA caching allocator returns for a new tensor.
ALLOCATION_ADDRESS = 1 << 21


@dataclass(frozen=True)
class LaunchCase:
    """One launch of an autotuned kernel at a product shape, as the ahead-of-time check compiles it."""

    kernel: str  # short name for reports, e.g. "prefusion"
    shape: str  # the product shape, e.g. "Llama-3.1-8B 32/8 x 128"
    dtype: torch.dtype
    autotuner: Any  # the triton.autotune object the launcher calls
    args: dict  # every argument of the launch by name except the tuned ones; tensors may be meta tensors
    keeps: Callable[[Any, Arch], bool]  # the dispatch rule: may this autotune config run on this arch?
    max_spill_bytes: int | None  # spill stores a kept config may have (None: spills not checked)
    archs: tuple[Arch, ...] = ARCHS
    # The configs the autotuner considers at this shape, whatever the GPU (None: all of its configs).
    configs: tuple | None = None
    # Does the dispatch run this kernel on this arch? (None: always.) Elsewhere ``fallback`` runs.
    picked: Callable[[Arch], bool] | None = None
    fallback: str = ""
    programs_per_sm: int | None = None  # the occupancy the launcher assumes for every kept config
    group: str = ""  # the summary table sums up the cases of one kernel, group, dtype and arch

    def candidate_configs(self) -> tuple:
        return self.configs if self.configs is not None else tuple(self.autotuner.configs)

    def runs_on(self, arch: Arch) -> bool:
        return self.picked is None or bool(self.picked(arch))


@dataclass(frozen=True)
class Report:
    """What one compile of one config for one arch needs: shared bytes; registers and spills (ptxas)."""

    shared: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None


@dataclass
class Row:
    case: LaunchCase
    arch: Arch
    config: Any
    kept: bool
    report: Report
    binary: str  # Triton's cache key of the compile: rows with the same one are the same binary
    problems: list[str] = field(default_factory=list)


def config_name(config) -> str:
    """``BLOCK_M=128 BLOCK_N=64 w8 s3`` for a triton.Config."""
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


# ---------------------------------------------------------------------------------------------
# Recording what a launcher passes to its kernels.
# ---------------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: Any  # the autotuned (or jitted) kernel object
    args: dict  # all arguments by name


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, dict(zip(self.kernel.arg_names, args), **kwargs)))
        return record


def record_launches(module, launcher: Callable, *args, **kwargs) -> list[Launch]:
    """Call ``launcher(*args, **kwargs)`` with every Triton kernel of ``module`` replaced by a recorder.

    Returns the launches it made, with every argument by name. Pass meta tensors (no memory, no
    device): the launcher's own shape, stride and padding logic runs; no kernel does.
    """
    import triton

    kernel_types = (triton.runtime.Autotuner, triton.runtime.JITFunction)
    kernels = {name: value for name, value in vars(module).items() if isinstance(value, kernel_types)}
    launches: list[Launch] = []
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(kernel, launches))
        launcher(*args, **kwargs)
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling one config for one arch.
# ---------------------------------------------------------------------------------------------

class _StandIn:
    """A tensor as Triton's binder sees it: a dtype and an address (16-byte aligned base + offset)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = ALLOCATION_ADDRESS + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


def _jit_function(kernel):
    while not hasattr(kernel, "params"):  # Autotuner / Heuristics wrap the JITFunction
        kernel = kernel.fn
    return kernel


def _specialise(fn, backend, args: dict, config):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them for a launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = {name: _StandIn(v) if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    kwargs.update(config.all_kwargs())
    kwargs["debug"] = fn.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(backend, ptx: str, metadata: dict, options, capability: int) -> tuple[int, int, int]:
    """Registers, spill stores, spill loads from ptxas's own -v report, run as Triton runs it."""
    from triton import knobs

    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin then prints ptxas's -v output
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, metadata, options, capability)
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    text = log.getvalue()
    registers, spills = _PTXAS_REGISTERS.search(text), _PTXAS_SPILLS.search(text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report:\n{text}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _source(kernel, args: dict, config, capability: int):
    """(source, backend, options, target, Triton's cache key) of one launch's compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key

    fn = _jit_function(kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialise(fn, backend, args, config)
    src = ASTSource(fn, signature, constexprs, attrs)
    return src, backend, options, target, get_cache_key(src, backend, options, get_cache_invalidating_env_vars())


def compile_report(kernel, args: dict, config, capability: int, with_registers: bool) -> Report:
    """Compile ``kernel`` with ``args`` and ``config`` for ``sm_<capability>``: shared memory (LLVM IR),
    and with ``with_registers`` registers and spills (ptxas). Cached in Triton's cache directory."""
    from triton._C.libtriton import ir
    from triton.runtime.cache import get_cache_manager

    src, backend, options, target, key = _source(kernel, args, config, capability)
    key += f"-{REPORT_VERSION}-{'ptxas' if with_registers else 'llir'}"
    cache = get_cache_manager(hashlib.sha256(key.encode()).hexdigest())
    cached = cache.get_file("report.json")
    if cached is not None:
        with open(cached) as f:
            return Report(**json.load(f))

    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"target": target, **options.__dict__}
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    for stage in ("ttir", "ttgir", "llir"):
        module = stages[stage](module, metadata)
    report = Report(shared=metadata["shared"])
    if with_registers:
        ptx = stages["ptx"](module, metadata)
        report = Report(report.shared, *_ptxas_report(backend, ptx, metadata, options, capability))
    cache.put(json.dumps(report.__dict__), "report.json", binary=False)
    return report


# ---------------------------------------------------------------------------------------------
# The check.
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def load_cases(provider: str) -> tuple[LaunchCase, ...]:
    """The cases of a provider ``"package.module:function"``."""
    module_name, _, function = provider.partition(":")
    return tuple(getattr(importlib.import_module(module_name), function)())


def _compile_unit(unit) -> Report:
    provider, index, config_index, capability, with_registers = unit
    case = load_cases(provider)[index]
    return compile_report(case.autotuner, case.args, case.candidate_configs()[config_index], capability,
                          with_registers)


def _problems(case: LaunchCase, arch: Arch, config, kept: bool, report: Report) -> list[str]:
    where = f"{case.kernel} {case.shape} {dtype_name(case.dtype)} on {arch.name} ({arch.gpu}), {config_name(config)}"
    limit = arch.shared_per_block
    if kept and report.shared > limit:
        return [f"{where}: kept by the rule but needs {report.shared} B of shared memory > {limit} B "
                "(the autotuner would meet OutOfResources)"]
    if not kept and report.shared <= limit:
        return [f"{where}: dropped by the rule but fits ({report.shared} B <= {limit} B)"]
    problems = []
    if kept and case.max_spill_bytes is not None and report.spill_stores > case.max_spill_bytes:
        problems.append(f"{where}: spills {report.spill_stores} B per thread (at most {case.max_spill_bytes} B allowed)")
    if kept and case.programs_per_sm is not None and report.registers is not None:
        resident = occupancy(arch, config.num_warps, report.registers, report.shared)
        if resident != case.programs_per_sm:
            problems.append(f"{where}: occupancy {resident} programs per SM ({report.registers} registers per thread), "
                            f"the launcher assumes {case.programs_per_sm}")
    return problems


def run_check(providers=CASE_PROVIDERS, jobs: int | None = None) -> tuple[list[Row], list[str], list]:
    """Compile every case of ``providers``; return the table rows, the problems found and every
    (case, arch) checked."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are defined for the interpreter; unset it for this check")
    work = []  # (case, arch, config, kept, binary, unit)
    pairs = []  # (case, arch): every case on every arch, also one whose shape leaves it no candidate config
    for provider in providers:
        for index, case in enumerate(load_cases(provider)):
            for arch in case.archs:
                pairs.append((case, arch))
                for config_index, config in enumerate(case.candidate_configs()):
                    kept = bool(case.keeps(config, arch))
                    with_registers = kept and (case.max_spill_bytes is not None or case.programs_per_sm is not None)
                    binary = _source(case.autotuner, case.args, config, arch.capability)[-1]
                    unit = (provider, index, config_index, arch.capability, with_registers)
                    work.append((case, arch, config, kept, f"{binary}-{with_registers}", unit))
    units = {}  # one compile per binary
    for *_, binary, unit in work:
        units.setdefault(binary, unit)
    jobs = jobs or min(len(os.sched_getaffinity(0)), MAX_DEFAULT_JOBS)
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            reports = dict(zip(units, pool.map(_compile_unit, units.values(), chunksize=2)))
    else:
        reports = {binary: _compile_unit(unit) for binary, unit in units.items()}

    rows, problems = [], []
    for case, arch, config, kept, binary, _ in work:
        report = reports[binary]
        row = Row(case, arch, config, kept, report, binary, _problems(case, arch, config, kept, report))
        rows.append(row)
        problems += row.problems
    kept_by_pair: dict = {}
    for row in rows:
        if row.kept:
            kept_by_pair.setdefault((id(row.case), row.arch.capability), []).append(row)
    for case, arch in pairs:
        where = f"{case.kernel} {case.shape} {dtype_name(case.dtype)} on {arch.name} ({arch.gpu})"
        kept = kept_by_pair.get((id(case), arch.capability), [])
        if case.runs_on(arch) and not kept:
            problems.append(f"{where}: the dispatch runs this kernel but the rule keeps no config")
        if not case.runs_on(arch) and kept:
            problems.append(f"{where}: the dispatch runs {case.fallback or 'something else'} although the rule keeps "
                            f"{', '.join(config_name(row.config) for row in kept)}")
    return rows, problems, pairs


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _span(values) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _resident(row: Row) -> int:
    return occupancy(row.arch, row.config.num_warps, row.report.registers, row.report.shared)


def markdown_table(rows: list[Row], pairs: list[tuple[LaunchCase, Arch]] = ()) -> str:
    """Shared memory, registers, spills and occupancy per kernel (and case group), dtype and arch
    (summed up over the shapes), then per shape and config (launches compiling to the same binary
    on one line). ``pairs`` (every case on every arch, from ``run_check``) adds the summary lines of
    cases whose shape leaves the autotuner no config to consider."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = {re.search(r"release ([\d.]+)", get_ptxas_version(a.capability)).group(1) for a in ARCHS}
    lines = [
        "# Kernel resources per GPU arch (generated)",
        "",
        "Generated by `python -m llava_mini.kernels.aot --table bench/results/kernel_resources.md` without a GPU: "
        f"Triton {triton.__version__}, ptxas {' and '.join(sorted(ptxas))}, the argument specialisation of a real "
        "launch. Shared memory from the LLVM IR; registers and spills (bytes per thread) from ptxas's own "
        "report, for the configs the dispatch keeps; occupancy is programs resident per SM "
        "(the occupancy calculator's rule). Dropped configs do not fit the arch and are never compiled at run "
        "time; where the dispatch runs another form on an arch, the kernel keeps no config there. "
        "Which kept config the autotuner picks, and the timings, need the GPU.",
        "",
        "## Per kernel, dtype and arch (configs kept per shape; figures of the kept ones over all shapes)",
        "",
        "| kernel | dtype | arch | configs kept | shared (B) | limit (B) | registers | most spill stores (B) "
        "| programs / SM |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    def summary_key(case, arch):
        return case.kernel, case.group, dtype_name(case.dtype), arch

    groups: dict = {summary_key(case, arch): [] for case, arch in pairs}
    fallbacks = {summary_key(case, arch): case.fallback for case, arch in pairs}
    for row in rows:
        groups.setdefault(summary_key(row.case, row.arch), []).append(row)
        fallbacks.setdefault(summary_key(row.case, row.arch), row.case.fallback)
    for key, group in groups.items():
        kernel, group_name, dtype, arch = key
        kept = [row for row in group if row.kept]
        configs = {config_name(row.config) for row in group}
        kept_per_shape: dict = {}
        for row in group:
            if row.case.runs_on(arch):
                kept_per_shape[id(row.case)] = kept_per_shape.get(id(row.case), 0) + row.kept
        if kept_per_shape:
            kept_cell = f"{_span(kept_per_shape.values())} of {len(configs)}"
        elif configs:
            kept_cell = f"none of {len(configs)}: {fallbacks[key] or 'not dispatched'}"
        else:
            kept_cell = f"none considered at this shape: {fallbacks[key] or 'not dispatched'}"
        compiled = [row for row in kept if row.report.registers is not None]
        if compiled:
            figures = (f"{_span([row.report.registers for row in compiled])} "
                       f"| {max(row.report.spill_stores for row in compiled)} | {_span([_resident(r) for r in compiled])}")
        else:
            figures = "- | - | -"
        shared = _span([row.report.shared for row in kept]) if kept else "-"
        lines.append(f"| {f'{kernel} {group_name}'.strip()} | {dtype} | {arch.name} ({arch.gpu}) | {kept_cell} "
                     f"| {shared} | {arch.shared_per_block} | {figures} |")
    lines += [
        "",
        "## Per shape and config",
        "",
        "| kernel | shape | dtype | arch | config | kept | shared (B) | limit (B) | registers | spill stores / loads (B) "
        "| programs / SM |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    same_binary: dict = {}
    for row in rows:
        same_binary.setdefault((row.case.kernel, row.binary, row.kept), []).append(row)
    for (kernel, *_), alike in same_binary.items():
        row, report = alike[0], alike[0].report
        shapes = "; ".join(dict.fromkeys(r.case.shape for r in alike))
        compiled = report.registers is not None
        spills = f"{report.spill_stores} / {report.spill_loads}" if compiled else "-"
        lines.append(
            f"| {kernel} | {shapes} | {dtype_name(row.case.dtype)} | {row.arch.name} "
            f"({row.arch.gpu}) | {config_name(row.config)} | {'yes' if row.kept else 'no'} | {report.shared} "
            f"| {row.arch.shared_per_block} | {report.registers if compiled else '-'} | {spills} "
            f"| {_resident(row) if compiled else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_mini.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", help="write the markdown table of resources here")
    parser.add_argument("--jobs", type=int, default=None, help=f"compile processes (default: the CPUs available, at most {MAX_DEFAULT_JOBS})")
    parser.add_argument("--cases", nargs="+", default=list(CASE_PROVIDERS),
                        help="providers 'package.module:function' returning LaunchCases")
    args = parser.parse_args(argv)
    rows, problems, pairs = run_check(tuple(args.cases), args.jobs)
    table = markdown_table(rows, pairs)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table)
    print(table)
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    print(f"{len(rows)} compiles, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
