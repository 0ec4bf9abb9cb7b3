"""The main job: LLaVA-Mini against the 576-token LLaVA-1.5 baseline, measured side by side in one run.

``run_bench`` measures the device's ceilings, then, with both models loaded, compares them pair by
pair (``estimate.paired_ratio``: the two sides interleaved, the ratio taken per pair, the median
ratio with its confidence interval): LLaVA-Mini's backends against each other, each stage, the time
to first token, prefill throughput per batch size and the decode rate (from the step times inside
each generation). LLaVA-Mini alone: its own stages and video encoding vs frames; both: memory per
added image. It joins them with the analytic FLOPs, KV bytes, planner and roofline into one results
dict, runs the report's self-checks, and ``report.render_report`` turns it into markdown, JSON and plots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling import memory as M
from llava_mini.profiling import nvml
from llava_mini.profiling.ceilings import measure_ceilings
from llava_mini.profiling.estimate import (Comparison, Estimate, Protocol, clock_name, format_estimate, paired_ratio,
                                           sample_until, timer)
from llava_mini.profiling.flops import STAGES
from llava_mini.profiling.latency import Generations, decode_rate, prefill, random_inputs, stage_fns
from llava_mini.profiling.methods import BASELINE, DEFAULT_BUDGETS, MINI, fastv_layer_for, method_costs, reduction_methods
from llava_mini.profiling.report import analytic_results, render_report, self_checks
from llava_mini.profiling.results import environment_tags

PROMPT_LEN = 43  # the paper's text length (with the <image> placeholder: 44 ids)
SHARED_STAGES = ("vision_encoder", "projector_576")  # the same work in both models: their times must agree


@dataclass
class BenchPlan:
    """What ``run_bench`` measures, and how long it may sample. ``for_device`` gives the defaults: the
    real 7B shapes in bf16 on a GPU, the scaled-down ``small`` preset in fp32 on the CPU.

    Every comparison samples pairs until its 95% interval is narrower than ``rel_width`` x its median
    or ``budget_s`` seconds have passed (at least 6 pairs); the headline (time to first token) gets
    ``headline_factor`` times that budget.

    ``method_budgets``: the token budgets of the methods table (FastV and VisionZip on the baseline,
    each against the 576-token baseline, LLaVA-Mini beside them); empty: no methods table.

    ``threads``: torch's intra-op threads during the run (None: leave as is). On the CPU the default
    is 1: with a thread per core every parallel op waits for its slowest thread, so any other process
    on the machine stalls whole ops at random; one thread shares the machine smoothly, which the
    paired ratios cancel.
    """

    preset: str
    baseline_preset: str
    dtype: torch.dtype
    device: str
    batches: tuple = (1,)
    frames: tuple = (1, 4)
    backends: tuple = ("torch",)
    new_tokens: int = 16
    rel_width: float = 0.05
    budget_s: float = 4.0
    headline_factor: float = 3.0
    threads: int | None = None
    method_budgets: tuple = DEFAULT_BUDGETS
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_device(cls, device: str | None = None, **overrides) -> "BenchPlan":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            plan = cls("llava-mini-vicuna-7b", "llava-1.5-7b", torch.bfloat16, device, batches=(1, 16, 64),
                       frames=(1, 10, 100, 1000), backends=("sdpa", "triton"), new_tokens=32, budget_s=8.0)
        else:
            plan = cls("small", "small", torch.float32, device, batches=(1, 4), frames=(1, 4, 16),
                       backends=("torch", "sdpa"), new_tokens=8, budget_s=4.0, threads=1)
        for k, v in overrides.items():
            if v is not None:
                setattr(plan, k, v)
        return plan

    def protocol(self, clock=None) -> Protocol:
        """The sampling protocol of every comparison (``clock``: an injected time source, in seconds)."""
        return Protocol(rel_width=self.rel_width, budget_s=self.budget_s, **({"clock": clock} if clock else {}))


def comparison_dict(c: Comparison, num: str, den: str) -> dict:
    """A ``Comparison`` as ``{num: times, den: times, "ratio": num / den}`` (Estimate dicts)."""
    return {num: c.numerator.to_dict(), den: c.denominator.to_dict(), "ratio": c.ratio.to_dict()}


class Bench:
    """One run's models, inputs and timers; each method measures one part of the report."""

    def __init__(self, plan: BenchPlan, clock=None, progress: bool = True):
        self.plan, self.clock = plan, clock
        self.protocol = plan.protocol(clock)
        steps = 1 + max(0, len(plan.backends) - 1) + 7 + len(plan.batches) + 1 + len(plan.frames) + 2
        steps += 2 + 2 * len(plan.method_budgets) if plan.method_budgets else 0
        self.bar = tqdm(total=steps, desc="llava-mini bench", disable=not progress)
        self.ceilings = measure_ceilings(plan.device)
        self.step()
        torch.manual_seed(0)
        # Both models stay loaded: the comparisons alternate between them.
        self.mini = LlavaMini.from_preset(plan.preset, dtype=plan.dtype, device=plan.device)
        self.baseline = LlavaBaseline.from_preset(plan.baseline_preset, dtype=plan.dtype, device=plan.device)
        self.base_backend = "sdpa" if "sdpa" in plan.backends else plan.backends[0]
        self.backend = plan.backends[0]  # LLaVA-Mini's; compare_backends picks the fastest
        too_many = [t for t in plan.method_budgets if t > self.baseline.config.num_patches]
        if too_many:
            raise ValueError(f"method_budgets: {too_many} exceed the {self.baseline.config.num_patches} tokens per "
                             f"image of preset {plan.baseline_preset!r}")

    def step(self):
        self.bar.update(1)

    def timer(self, fn):
        return timer(fn, self.plan.device, self.clock)

    def compare_backends(self) -> dict:
        """LLaVA-Mini's time to first token on each backend against the first one; keeps the fastest."""
        reference, rows = self.plan.backends[0], {}
        pixels, ids = random_inputs(self.mini, 1, PROMPT_LEN)
        run = lambda b: self.timer(lambda: prefill(self.mini, ids, pixels, backend=b))  # noqa: E731
        for backend in self.plan.backends[1:]:
            c = paired_ratio(run(reference), run(backend), self.protocol)
            rows[backend] = {"prefill_ms": c.denominator.to_dict(), f"speedup_vs_{reference}": c.ratio.to_dict()}
            rows.setdefault(reference, {"prefill_ms": c.numerator.to_dict()})
            self.step()
        faster = [b for b in rows if b != reference and rows[b][f"speedup_vs_{reference}"]["median"] > 1]
        self.backend = max(faster, key=lambda b: rows[b][f"speedup_vs_{reference}"]["median"], default=reference)
        return {"reference": reference, "chosen": self.backend, "rows": rows}

    def compare_stages(self) -> dict:
        """Each stage, LLaVA-Mini against the baseline where both have it (ratio = baseline / mini),
        LLaVA-Mini alone otherwise; ``prefill`` (time to first token) is the headline."""
        mini = stage_fns(self.mini, 1, PROMPT_LEN, self.backend)
        base = stage_fns(self.baseline, 1, PROMPT_LEN, self.base_backend)
        out = {}
        for name, fn in mini.items():
            protocol = self.protocol.scaled(self.plan.headline_factor) if name == "prefill" else self.protocol
            if name in base:
                out[name] = comparison_dict(paired_ratio(self.timer(base[name]), self.timer(fn), protocol),
                                            "baseline", "mini")
            else:
                out[name] = {"mini": sample_until(self.timer(fn), protocol).to_dict()}
            self.step()
        return out

    def compare_throughput(self, stages: dict) -> list[dict]:
        """Prefill of a batch of images, baseline / mini time (= images/s speedup) per batch size."""
        rows = []
        for batch in self.plan.batches:
            fns = {}
            for name, model, backend in (("mini", self.mini, self.backend), ("baseline", self.baseline, self.base_backend)):
                pixels, ids = random_inputs(model, batch, PROMPT_LEN)
                fns[name] = lambda m=model, p=pixels, i=ids, b=backend: prefill(m, i, p, backend=b)
            # batch 1 is the time to first token, already measured
            c = stages["prefill"] if batch == 1 else comparison_dict(
                paired_ratio(self.timer(fns["baseline"]), self.timer(fns["mini"]), self.protocol), "baseline", "mini")
            row = {"batch": batch, **c}
            for name in ("mini", "baseline"):
                row[f"{name}_images_per_s"] = Estimate(**c[name]).reciprocal(1e3 * batch, "images/s").to_dict()
                row[f"{name}_joules_per_image"] = self.joules_per_image(fns[name], batch)
            rows.append(row)
            self.step()
        return rows

    def joules_per_image(self, fn, batch: int) -> float | None:
        """Energy per image over a few back-to-back calls (NVML; None on the CPU or without it)."""
        if not self.plan.device.startswith("cuda"):
            return None
        calls = self.protocol.min_samples
        with nvml.EnergyMeter() as meter:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        return meter.per_item(batch * calls) if meter.available else None

    def compare_decode(self) -> dict:
        """Generations alternated between the models; each generation's figure is the median of its own
        decode steps; ratio = baseline step / mini step (the decode speedup)."""
        gens = {"mini": Generations(self.mini, 1, PROMPT_LEN, self.plan.new_tokens, self.backend, self.clock),
                "baseline": Generations(self.baseline, 1, PROMPT_LEN, self.plan.new_tokens, self.base_backend,
                                        self.clock)}
        for g in gens.values():
            g.warm_up(self.protocol.warmup)
        c = paired_ratio(gens["baseline"], gens["mini"], replace(self.protocol, warmup=0))
        self.step()
        out = {name: {**g.rates(c.ratio.stopped_by, self.protocol.confidence),
                      "backend": self.backend if name == "mini" else self.base_backend} for name, g in gens.items()}
        out["ratio"] = c.ratio.to_dict()
        return out

    def compare_methods(self) -> dict:
        """The methods table: the baseline under FastV and VisionZip at each budget (sharing its
        weights), and LLaVA-Mini, each paired against the 576-token baseline: time to first token and
        prefill throughput at the largest batch (ratio = baseline / method: a speedup), the decode
        rate (from the step times inside generations), and the analytic costs per image."""
        plan, cfg = self.plan, self.baseline.config
        batch = max(plan.batches)
        models = {name: (self.baseline.with_reduction(r), r, self.base_backend)
                  for name, r in reduction_methods(cfg, plan.method_budgets).items()}
        models[MINI] = (self.mini, None, self.backend)
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[plan.dtype]
        savings = {"prune_last_layer": self.mini.savings.prune_last_layer,
                   "prefix_split": self.mini.savings.prefix_split}

        def prefill_of(model, backend, n):
            pixels, ids = random_inputs(model, n, PROMPT_LEN)
            return self.timer(lambda: prefill(model, ids, pixels, backend=backend))

        reference = {n: prefill_of(self.baseline, self.base_backend, n) for n in {1, batch}}
        rows = []
        for name, (model, reduction, backend) in models.items():
            config = self.mini.config if name == MINI else cfg
            row = method_costs(name, config, reduction, prompt_len=PROMPT_LEN + 1, dtype=dtype,
                               mini_savings=savings if name == MINI else None)
            row["backend"] = backend
            if name == BASELINE:
                row["ttft_ms"] = sample_until(reference[1], self.protocol).to_dict()
            else:
                c = paired_ratio(reference[1], prefill_of(model, backend, 1), self.protocol)
                row["ttft_ms"], row["ttft_speedup"] = c.denominator.to_dict(), c.ratio.to_dict()
                if batch > 1:
                    c = paired_ratio(reference[batch], prefill_of(model, backend, batch), self.protocol)
                    row["prefill_speedup"] = c.ratio.to_dict()
                    row["prefill_images_per_s"] = c.denominator.reciprocal(1e3 * batch, "images/s").to_dict()
            if name == BASELINE and batch > 1:
                row["prefill_images_per_s"] = sample_until(reference[batch], self.protocol).reciprocal(
                    1e3 * batch, "images/s").to_dict()
            row["decode"] = decode_rate(model, 1, PROMPT_LEN, plan.new_tokens, backend, self.protocol, self.clock)
            rows.append(row)
            self.step()
        return {"reference": BASELINE, "fastv_layer": fastv_layer_for(cfg), "batch": batch,
                "prompt_len": PROMPT_LEN + 1, "rows": rows}

    def measure_video(self) -> dict:
        """LLaVA-Mini: video encode + LLM prefill time vs frames, and KV bytes per added frame."""
        model, s = self.mini, self.mini.config.crop_size
        _, ids = random_inputs(model, 1, PROMPT_LEN)
        rows = []
        for frames in self.plan.frames:
            video = torch.randn(frames, 3, s, s, generator=torch.Generator().manual_seed(frames))
            run = lambda: prefill(model, ids, videos=[video], backend=self.backend, use_cache=True)  # noqa: E731
            rows.append({"frames": frames, "ms": sample_until(self.timer(run), self.protocol).to_dict()})
            self.step()

        def kv_of(frames: int):
            return prefill(model, ids, videos=[torch.randn(frames, 3, s, s)], backend=self.backend,
                           use_cache=True).past_key_values

        counts = list(self.plan.frames[:3]) if len(self.plan.frames) >= 2 else [1, 2]
        return {"backend": self.backend, "latency": rows,
                "memory_per_frame": M.measure_slope(kv_of, counts, device=model.device).to_dict()}

    def measure_memory(self, model, backend: str) -> dict:
        """Weights as allocated, and the slope of memory over batch sizes (KV bytes on the CPU; peak
        allocated on CUDA, activations included; the intercept is fixed cost)."""
        def cache_of(batch: int):
            pixels, ids = random_inputs(model, batch, PROMPT_LEN)
            return prefill(model, ids, pixels, backend=backend, use_cache=True).past_key_values

        counts = list(self.plan.batches) if len(self.plan.batches) >= 2 else [1, 2]
        out = {"backend": backend, "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
               "memory_per_image": M.measure_slope(cache_of, counts, device=model.device).to_dict()}
        self.step()
        return out


def run_bench(plan: BenchPlan, out_dir=None, progress: bool = True, clock=None) -> dict:
    """Measure everything in ``plan``; return the results dict (and write the report if ``out_dir``).
    ``clock`` (seconds) replaces the device's timers, for tests."""
    threads = torch.get_num_threads()
    if plan.threads is not None:
        if plan.threads < 1:
            raise ValueError(f"threads: expected a positive number of threads or None, got {plan.threads}")
        torch.set_num_threads(plan.threads)
    seconds, started = {}, time.perf_counter()

    def timed(part: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[part] = round(time.perf_counter() - t0, 1)
        return out

    try:
        bench = timed("setup", Bench, plan, clock, progress)
        measured = {"backends": timed("backends", bench.compare_backends)}
        measured["stages"] = stages = timed("stages", bench.compare_stages)
        measured["prefill_throughput"] = timed("prefill_throughput", bench.compare_throughput, stages)
        measured["decode"] = timed("decode", bench.compare_decode)
        if plan.method_budgets:
            measured["methods"] = timed("methods", bench.compare_methods)
        measured["video"] = timed("video", bench.measure_video)
        measured["memory"] = timed("memory", lambda: {
            "mini": bench.measure_memory(bench.mini, bench.backend),
            "baseline": bench.measure_memory(bench.baseline, bench.base_backend)})
        bench.bar.close()
    finally:
        torch.set_num_threads(threads)
    seconds["total"] = round(time.perf_counter() - started, 1)

    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[plan.dtype]
    medians = {m: {k: v[m]["median"] for k, v in stages.items() if m in v and k in STAGES} for m in ("mini", "baseline")}
    for m in medians:
        medians[m]["total"] = stages["prefill"][m]["median"]
    results = analytic_results(bench.mini.config, convention="full", prompt_len=PROMPT_LEN + 1, dtype=dtype_name,
                               ceilings=bench.ceilings, frames=plan.frames, env=environment_tags(plan.device),
                               measured_ms=medians)
    results["time_to_first_token"] = {"stage": "prefill"}
    for row in results["stages"] + [results["time_to_first_token"]]:
        s = stages.get(row["stage"], {})
        row.update(mini_time=s.get("mini"), baseline_time=s.get("baseline"), measured_ratio=s.get("ratio"))
    video = measured["video"]["latency"]
    results["frames"]["mini"]["latency_ms"] = [r["ms"]["median"] for r in video]
    results["frames"]["latency_source"] = (f"LLaVA-Mini: measured ({bench.backend}, video encode + LLM prefill); "
                                           "baseline: roofline floor (LLaVA-1.5 has no video path)")
    results["measured"] = measured
    results["measured_backend"] = {"mini": bench.backend, "baseline": bench.base_backend}
    results["protocol"] = {**bench.protocol.to_dict(), "headline_budget_s": plan.budget_s * plan.headline_factor,
                           "clock": clock_name(plan.device, clock), "order": "pairs alternate AB, BA, AB, ...",
                           "threads": plan.threads or threads, "run_seconds": seconds}
    results["shared_stages"] = {name: stages[name]["ratio"] for name in SHARED_STAGES}
    results["ceilings_measured"] = bench.ceilings.to_dict()
    info = nvml.device_info() if plan.device.startswith("cuda") else None
    results["nvml"] = info.to_dict() if info is not None else {"unavailable": nvml.unavailable_reason() or "cpu run"}
    results["summary"] = summarize(measured)
    results["checks"] = self_checks(results)
    results["noisy"] = not all(c["ok"] for c in results["checks"])
    results["bench_plan"] = {**asdict(plan), "dtype": dtype_name}
    if out_dir is not None:
        results["files"] = {k: str(v) if not isinstance(v, dict) else {n: str(p) for n, p in v.items()}
                            for k, v in render_report(results, out_dir, "report").items()}
    return results


def summarize(measured: dict) -> dict:
    """The headline ratios (baseline time over LLaVA-Mini time, with their intervals), all from this run."""
    out = {"time_to_first_token_speedup": measured["stages"]["prefill"]["ratio"]}
    for row in measured["prefill_throughput"]:
        if row["batch"] != 1:  # batch 1 is the time to first token
            out[f"prefill_throughput_speedup_batch{row['batch']}"] = row["ratio"]
    out["decode_speedup"] = measured["decode"]["ratio"]
    out["decode_tokens_per_s"] = {m: measured["decode"][m]["tokens_per_s"] for m in ("mini", "baseline")}
    return out


def format_summary(results: dict) -> str:
    """A plain-text account of what was measured, for the terminal (every figure with its interval)."""
    c, p = results["ceilings_measured"], results["protocol"]
    lines = [f"device: {results['env']['device']}   preset: {results['config']}   "
             f"(copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.3g} TFLOP/s measured)",
             f"protocol: pairs interleaved; median with its {p['confidence']:.0%} interval [low, high] (n samples); "
             f"each stops at width < {p['rel_width']:.0%} of the median or after {p['budget_s']:g} s "
             f"({p['headline_budget_s']:g} s for the headline); clock: {p['clock']}"]
    if results.get("noisy"):
        failed = [ch for ch in results["checks"] if not ch["ok"]]
        lines.append(f"NOISY RUN: {len(failed)} of {len(results['checks'])} self-checks failed")
    lines.append(f"{'stage':<16}{'mini ms':>34}{'baseline ms':>34}{'baseline / mini':>34}")
    for name, s in results["measured"]["stages"].items():
        cells = [format_estimate(s[k], f"{name}.{k}") if k in s else "-" for k in ("mini", "baseline", "ratio")]
        lines.append(f"{name:<16}" + "".join(f"{x:>34}" for x in cells))
    for key, value in results["summary"].items():
        if isinstance(value, dict) and "median" not in value:
            value = ", ".join(f"{k} {format_estimate(v, f'{key}.{k}')}" for k, v in value.items())
        else:
            value = format_estimate(value, key)
        lines.append(f"{key}: {value}")
    methods = results["measured"].get("methods")
    if methods:
        lines.append(f"methods (time to first token; speedup = {methods['reference']} / method, paired):")
        for r in methods["rows"]:
            speedup = format_estimate(r["ttft_speedup"], r["method"]) if "ttft_speedup" in r else "reference"
            lines.append(f"  {r['method']:<14} {r['tokens_held_per_image']:>4} tokens  "
                         f"{format_estimate(r['ttft_ms'], r['method'])}  {speedup}")
    for ch in results.get("checks", []):
        detail = ch["detail"] if len(ch["detail"]) <= 160 else ch["detail"][:157] + "..."  # the report has it all
        lines.append(f"[{'ok' if ch['ok'] else 'FLAG'}] {ch['check']}: {detail}")
    return "\n".join(lines)
