"""The main job: LLaVA-Mini against the 576-token LLaVA-1.5 baseline, measured in one run.

``run_bench`` measures the device's ceilings, then each model's stages, time to first token,
prefill throughput per batch size, decode rate, video encoding vs frames and memory per added
frame, and joins them with the analytic FLOPs, KV bytes, planner and roofline into one results
dict that ``report.render_report`` turns into markdown, JSON and plots.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from llava_mini.lmm import LlavaMini
from llava_mini.lmm.baseline import LlavaBaseline
from llava_mini.profiling import memory as M
from llava_mini.profiling import nvml
from llava_mini.profiling.ceilings import measure_ceilings
from llava_mini.profiling.flops import STAGES
from llava_mini.profiling.latency import decode_rate, measure, prefill, random_inputs, stage_timings
from llava_mini.profiling.report import analytic_results, render_report
from llava_mini.profiling.results import environment_tags

PROMPT_LEN = 43  # the paper's text length (with the <image> placeholder: 44 ids)


@dataclass
class BenchPlan:
    """What ``run_bench`` measures. ``for_device`` gives the defaults: the real 7B shapes in bf16 on a
    GPU, the scaled-down ``small`` preset in fp32 on the CPU (a few minutes)."""

    preset: str
    baseline_preset: str
    dtype: torch.dtype
    device: str
    batches: tuple = (1,)
    frames: tuple = (1, 4)
    backends: tuple = ("torch",)
    repeats: int = 3
    new_tokens: int = 16
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_device(cls, device: str | None = None, **overrides) -> "BenchPlan":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            plan = cls("llava-mini-vicuna-7b", "llava-1.5-7b", torch.bfloat16, device, batches=(1, 16, 64),
                       frames=(1, 10, 100, 1000), backends=("sdpa", "triton"), repeats=10, new_tokens=32)
        else:
            plan = cls("small", "small", torch.float32, device, batches=(1, 4), frames=(1, 4, 16),
                       backends=("torch", "sdpa"), repeats=3, new_tokens=8)
        for k, v in overrides.items():
            if v is not None:
                setattr(plan, k, v)
        return plan


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_model(model, plan: BenchPlan, backend: str, step) -> dict:
    """Stages, prefill throughput per batch and the decode rate of one model on one backend."""
    out = {"backend": backend}
    stages = stage_timings(model, batch=1, prompt_len=PROMPT_LEN, repeats=plan.repeats, backend=backend)
    out["stages_ms"] = {k: t.median_ms for k, t in stages.items()}
    out["stages_spread_ms"] = {k: [t.p10_ms, t.p90_ms] for k, t in stages.items()}
    step()
    throughput = []
    for batch in plan.batches:
        pixels, ids = random_inputs(model, batch, PROMPT_LEN)
        with nvml.EnergyMeter() as meter:  # energy over the timed calls (warm-up included in the count)
            t = measure(lambda: prefill(model, ids, pixels, backend=backend), model.device, warmup=1,
                        repeats=plan.repeats)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
        throughput.append({"batch": batch, "prefill_ms": t.median_ms, "images_per_s": batch * 1e3 / t.median_ms,
                           "joules_per_image": meter.per_item(batch * (plan.repeats + 1)) if meter.available else None})
        step()
    out["prefill_throughput"] = throughput

    def cache_of(batch: int):
        pixels, ids = random_inputs(model, batch, PROMPT_LEN)
        return prefill(model, ids, pixels, backend=backend, use_cache=True).past_key_values

    # Weights and per-image growth apart: parameters as allocated, then the slope over batch sizes
    # (KV bytes on the CPU; peak allocated on CUDA, activations included, the intercept is fixed cost).
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    counts = list(plan.batches) if len(plan.batches) >= 2 else [1, 2]
    out["memory_per_image"] = M.measure_slope(cache_of, counts, device=model.device).to_dict()
    out["decode"] = decode_rate(model, batch=1, prompt_len=PROMPT_LEN, new_tokens=plan.new_tokens,
                                repeats=max(1, plan.repeats // 2), backend=backend)
    if model.device.type == "cuda":
        try:
            out["decode_static_cache"] = decode_rate(model, batch=1, prompt_len=PROMPT_LEN, new_tokens=plan.new_tokens,
                                                     repeats=max(1, plan.repeats // 2), backend=backend,
                                                     cache_implementation="static")
        except (RuntimeError, ValueError) as e:  # reported, not hidden: the table shows why there is no figure
            out["decode_static_cache"] = {"error": str(e)[:500]}
    step()
    return out


def measure_video(model, plan: BenchPlan, backend: str, step) -> dict:
    """Encode (CLIP to LLM input) + LLM prefill time vs frames, and memory per added frame."""
    s = model.config.crop_size
    _, ids = random_inputs(model, 1, PROMPT_LEN)
    rows = []
    for frames in plan.frames:
        video = torch.randn(frames, 3, s, s, generator=torch.Generator().manual_seed(frames))
        t = measure(lambda: prefill(model, ids, videos=[video], backend=backend, use_cache=True), model.device,
                    warmup=1, repeats=max(1, plan.repeats // 2))
        rows.append({"frames": frames, "ms": t.median_ms})
        step()

    def kv_of(frames: int):
        video = torch.randn(frames, 3, s, s)
        return prefill(model, ids, videos=[video], backend=backend, use_cache=True).past_key_values

    counts = [f for f in plan.frames[:3]] if len(plan.frames) >= 2 else [1, 2]
    slope = M.measure_slope(kv_of, counts, device=model.device)
    step()
    return {"latency": rows, "memory_per_frame": slope.to_dict()}


def run_bench(plan: BenchPlan, out_dir=None, progress: bool = True) -> dict:
    """Measure everything in ``plan``; return the results dict (and write the report if ``out_dir``)."""
    steps = len(plan.backends) * (len(plan.batches) + 2 + len(plan.frames) + 1) + len(plan.batches) + 3
    bar = tqdm(total=steps, desc="llava-mini bench", disable=not progress)
    step = lambda: bar.update(1)  # noqa: E731
    ceilings = measure_ceilings(plan.device)
    step()
    measured = {"mini": {}, "baseline": {}}
    torch.manual_seed(0)
    model = LlavaMini.from_preset(plan.preset, dtype=plan.dtype, device=plan.device)
    for backend in plan.backends:
        measured["mini"][backend] = measure_model(model, plan, backend, step)
        measured["mini"][backend]["video"] = measure_video(model, plan, backend, step)
    config = model.config
    del model
    free(plan.device)
    baseline = LlavaBaseline.from_preset(plan.baseline_preset, dtype=plan.dtype, device=plan.device)
    base_backend = "sdpa" if "sdpa" in plan.backends else plan.backends[0]
    measured["baseline"][base_backend] = measure_model(baseline, plan, base_backend, step)
    del baseline
    free(plan.device)
    bar.close()

    best = min(plan.backends, key=lambda b: measured["mini"][b]["stages_ms"]["prefill"])
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[plan.dtype]
    results = analytic_results(
        config, convention="full", prompt_len=PROMPT_LEN + 1, dtype=dtype_name, ceilings=ceilings,
        frames=plan.frames, env=environment_tags(plan.device),
        measured_ms={"mini": report_stages(measured["mini"][best]["stages_ms"]),
                     "baseline": report_stages(measured["baseline"][base_backend]["stages_ms"])})
    mini_video = measured["mini"][best]["video"]["latency"]
    results["frames"]["mini"]["latency_ms"] = [r["ms"] for r in mini_video]
    results["frames"]["latency_source"] = (f"LLaVA-Mini: measured ({best}, video encode + LLM prefill); "
                                           "baseline: roofline floor (LLaVA-1.5 has no video path)")
    results["measured"] = measured
    results["measured_backend"] = {"mini": best, "baseline": base_backend}
    results["ceilings_measured"] = ceilings.to_dict()
    info = nvml.device_info() if plan.device.startswith("cuda") else None
    results["nvml"] = info.to_dict() if info is not None else {"unavailable": nvml.unavailable_reason() or "cpu run"}
    results["summary"] = summarize(measured, best, base_backend)
    if out_dir is not None:
        results["files"] = {k: str(v) if not isinstance(v, dict) else {n: str(p) for n, p in v.items()}
                            for k, v in render_report(results, out_dir, "report").items()}
    return results


def report_stages(stages_ms: dict) -> dict:
    """The report's stage columns: the FLOP stages measured alone, and the total (time to first token)."""
    out = {k: v for k, v in stages_ms.items() if k in STAGES}
    out["total"] = stages_ms["prefill"]
    return out


def summarize(measured: dict, mini_backend: str, base_backend: str) -> dict:
    """The headline ratios (baseline time over LLaVA-Mini time), all from this run."""
    mini, base = measured["mini"][mini_backend], measured["baseline"][base_backend]
    out = {"time_to_first_token_speedup": base["stages_ms"]["prefill"] / mini["stages_ms"]["prefill"]}
    for m, b in zip(mini["prefill_throughput"], base["prefill_throughput"]):
        out[f"prefill_throughput_speedup_batch{m['batch']}"] = m["images_per_s"] / b["images_per_s"]
    out["decode_tokens_per_s"] = {"mini": mini["decode"]["tokens_per_s"], "baseline": base["decode"]["tokens_per_s"]}
    return out


def format_summary(results: dict) -> str:
    """A plain-text table of what was measured, for the terminal."""
    m = results["measured"]
    lines = [f"device: {results['env']['device']}   preset: {results['config']}   "
             f"(copy {results['ceilings_measured']['copy_gbps']:.0f} GB/s, "
             f"matmul {results['ceilings_measured']['matmul_tflops']:.3g} TFLOP/s measured)"]
    lines.append(f"{'model':<10}{'backend':<9}{'stage':<16}{'ms':>10}")
    for name in ("mini", "baseline"):
        for backend, r in m[name].items():
            for stage, ms in r["stages_ms"].items():
                lines.append(f"{name:<10}{backend:<9}{stage:<16}{ms:>10.3f}")
            for t in r["prefill_throughput"]:
                lines.append(f"{name:<10}{backend:<9}{'images/s b=' + str(t['batch']):<16}{t['images_per_s']:>10.2f}")
    for k, v in results["summary"].items():
        lines.append(f"{k}: {v if isinstance(v, dict) else round(v, 3)}")
    return "\n".join(lines)
