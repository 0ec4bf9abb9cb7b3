"""Reports: a JSON-serialisable results dict -> a markdown report and PNG plots (matplotlib, Agg).

Results dict (what :func:`analytic_results` builds and a benchmark run fills with measurements)::

    {
      "title": str, "config": str, "convention": str, "workload": {...}, "env": {...} (optional),
      "stages": [{"stage", "mini_flops", "baseline_flops", "mini_bytes", "baseline_bytes",
                  "mini_ms", "baseline_ms"}, ...],            # ms: measured, or null
      "vram_per_image": {"mini": bytes, "baseline": bytes, "dtype": str},
      "frames": {"frames": [T...], "vram_source": str, "latency_source": str,
                 "mini": {"latency_ms": [...], "vram_bytes": [...]}, "baseline": {...}},
      "budget_bytes": int, "plan": {"mini": Plan dict, "baseline": Plan dict},
      "roofline": {"ceilings": {"device", "matmul_tflops", "copy_gbps"}, "mini": [rows], "baseline": [rows]},
      "projection": {"label": str, "gpus": {...}},
      # from ``llava-mini bench`` (profiling.compare); Estimate dicts: {median, low, high, n, confidence,
      # stopped_by, unit}
      "measured": {...}, "protocol": {...}, "shared_stages": {stage: Estimate},
      "time_to_first_token": {"mini_time", "baseline_time", "measured_ratio"},
      "summary": {name: Estimate (a ratio: never a bare number)}, "checks": [...], "noisy": bool,
    }

Stage rows may also carry ``mini_time``, ``baseline_time`` and ``measured_ratio`` (Estimate dicts
from a paired comparison). Every key but ``stages`` is optional: a plot or section without its data
is skipped.
"""

from __future__ import annotations

import json
import textwrap
import math
from pathlib import Path

from llava_mini.profiling import flops as F
from llava_mini.profiling import memory as M
from llava_mini.profiling import roofline as R
from llava_mini.profiling.estimate import CONFIDENCE, format_estimate

PLOTS = ("latency_vs_frames", "vram_vs_frames", "stage_breakdown", "roofline")  # from analytic results alone
MEASURED_PLOTS = ("methods",)  # only with ``llava-mini bench``'s measurements
DISPERSION_LIMIT = 0.2  # an interval wider than 20% of its median is flagged
SHARED_TOLERANCE = 0.05  # shared stages agree when their ratio's interval reaches into [1/1.05, 1.05]
# a time of 1 us to ~3 hours; a ratio within 1000x; rates up to 1e7 per second
PLAUSIBLE = {"ms": (1e-3, 1e7), "x": (1e-3, 1e3), "tokens/s": (1e-4, 1e7), "images/s": (1e-4, 1e7)}


def _sanitize(x):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _sanitize(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_sanitize(v) for v in x]
    return x


def analytic_results(config="llava-mini-vicuna-7b", *, convention: str = "full", prompt_len: int = F.PAPER_PROMPT_LEN,
                     new_tokens: int = 0, batch: int = 1, frames=(1, 10, 100, 1000, 10000), dtype="bf16",
                     vram_bytes: int = 24 * M.GiB, ceilings=None, measured_ms: dict | None = None,
                     prune_last_layer: bool = True, env: dict | None = None) -> dict:
    """The analytic part of a results dict: FLOPs and bytes per stage for LLaVA-Mini and the baseline,
    KV per image, the planner's VRAM vs frames, roofline floors at ``ceilings`` (a ``Ceilings``, its
    dict, or a datasheet GPU name; default ``"H100 SXM"`` as a projection) and datasheet projections.

    ``measured_ms``: ``{"mini": {stage: ms}, "baseline": {stage: ms}}`` fills the ms columns; without
    it latency vs frames is the roofline floor (labelled so).
    """
    cfg = F.resolve_config(config)
    frames = [int(t) for t in frames]
    if any(t < 1 for t in frames):
        raise ValueError(f"frames: expected positive frame counts, got {frames}")
    measured_ms = measured_ms or {}
    bad = set(measured_ms) - {"mini", "baseline"}
    if bad:
        raise ValueError(f"measured_ms: expected keys 'mini'/'baseline', got {sorted(bad)}")
    costs = F.compare(cfg, convention=convention, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch,
                      dtype=dtype, prune_last_layer=prune_last_layer)
    stages = []
    for s in F.STAGES:
        stages.append({"stage": s,
                       "mini_flops": costs["mini"].flops[s], "baseline_flops": costs["baseline"].flops[s],
                       "mini_bytes": costs["mini"].bytes[s], "baseline_bytes": costs["baseline"].bytes[s],
                       "mini_ms": measured_ms.get("mini", {}).get(s), "baseline_ms": measured_ms.get("baseline", {}).get(s)})
    ceilings = ceilings if ceilings is not None else "H100 SXM"
    tflops, gbps, device = R._ceilings(ceilings)
    measured_label = "measured" if not isinstance(ceilings, str) else R.PROJECTION_LABEL
    roof = {"ceilings": {"device": device, "matmul_tflops": tflops, "copy_gbps": gbps, "source": measured_label}}
    for m in ("mini", "baseline"):
        roof[m] = [r.to_dict() for r in R.roofline(costs[m], ceilings, measured_ms.get(m))]

    plans = {m: M.plan(cfg, vram_bytes=vram_bytes, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens,
                       model=m) for m in ("mini", "baseline")}
    fr = {"frames": frames, "vram_source": "planner prediction (peak bytes)",
          "latency_source": f"roofline floor at {device} (replace with measured ms when run)"}
    for m in ("mini", "baseline"):
        vram, lat = [], []
        for t in frames:
            p = plans[m]
            vram.append(max(p.prefill_peak(t), p.encode_peak(t)))
            c = F.count_flops(cfg, model=m, convention=convention, prompt_len=prompt_len, frames=t,
                              new_tokens=new_tokens, dtype=dtype)
            lat.append(sum(r.floor_ms for r in R.roofline(c, ceilings)))
        fr[m] = {"latency_ms": lat, "vram_bytes": vram}
    results = {
        "title": f"LLaVA-Mini vs LLaVA-1.5 (576 tokens): {cfg.name}",
        "config": cfg.name, "convention": convention,
        "workload": dict(prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, dtype=str(dtype),
                         prune_last_layer=prune_last_layer),
        "stages": stages,
        "vram_per_image": {"mini": M.kv_bytes_per_image(cfg, "mini", dtype),
                           "baseline": M.kv_bytes_per_image(cfg, "baseline", dtype), "dtype": str(dtype)},
        "frames": fr, "budget_bytes": int(vram_bytes),
        "plan": {m: p.to_dict() for m, p in plans.items()},
        "roofline": roof, "projection": R.project(costs["mini"]),
    }
    if env:
        results["env"] = env
    return _sanitize(results)


# --- markdown ----------------------------------------------------------------------------------

def _fmt_flops(x):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x / 1e12:.4g} T" if x >= 1e11 else f"{x / 1e9:.4g} G"


def _fmt_ms(x):
    return "-" if x is None else f"{x:.3g}"


def _cell(value, name: str) -> str:
    """A measured figure: an Estimate dict with its interval, a plain number, or '-'."""
    if value is None:
        return "-"
    return format_estimate(value, name) if isinstance(value, dict) else _fmt_ms(value)


def _ratio(a, b):
    if a is None or b is None or not a or not b:
        return "-"
    return f"{b / a:.3g}x"


def _check(results: dict) -> None:
    if not isinstance(results, dict):
        raise TypeError(f"results: expected a dict, got {type(results).__name__}")
    if not isinstance(results.get("stages"), list) or not results["stages"]:
        raise ValueError("results: expected a non-empty 'stages' list")
    for row in results["stages"]:
        if "stage" not in row:
            raise ValueError(f"results: a stages row has no 'stage' key: {row}")
        if row.get("measured_ratio") is not None:
            format_estimate(row["measured_ratio"], f"stages[{row['stage']}].measured_ratio")
    for key, value in results.get("summary", {}).items():  # a ratio is never reported without its interval
        for name, v in (value.items() if isinstance(value, dict) and "median" not in value else [(None, value)]):
            format_estimate(v, f"summary[{key}]" + (f"[{name}]" if name else ""))


def render_markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    """The markdown report: self-check verdict, comparison table per stage, VRAM per image, planner,
    roofline, projection, what ``llava-mini bench`` measured, and the self-checks."""
    _check(results)
    checks = self_checks(results)
    failed = [c for c in checks if not c["ok"]]
    out = [f"# {results.get('title', 'LLaVA-Mini report')}" + (" (noisy run)" if failed else ""), ""]
    if failed:
        out += [f"**Noisy run**: {len(failed)} of {len(checks)} self-checks failed ({', '.join(c['check'] for c in failed)}); "
                "see [Self-checks](#self-checks) before trusting a figure.", ""]
    elif checks:
        out += [f"All {len(checks)} self-checks passed (see [Self-checks](#self-checks)).", ""]
    env = results.get("env")
    if env:
        out += ["Measured on **{}** (torch {}, triton {}, transformers {}, commit {}).".format(
            env.get("device"), env.get("torch"), env.get("triton"), env.get("transformers"), env.get("commit")), ""]
    wl = results.get("workload", {})
    out += [f"FLOPs convention: `{results.get('convention', '?')}`; workload: "
            + ", ".join(f"{k}={v}" for k, v in wl.items()), ""]
    out += _protocol_lines(results)
    out += ["## LLaVA-Mini vs the 576-token baseline, per stage", "",
            "| stage | LLaVA-Mini FLOPs | baseline FLOPs | baseline / mini | LLaVA-Mini ms | baseline ms | baseline / mini (paired) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tot = {"mini_flops": 0, "baseline_flops": 0}
    for row in results["stages"]:
        mf, bf = row.get("mini_flops"), row.get("baseline_flops")
        name = row["stage"]
        out.append(f"| {name} | {_fmt_flops(mf)} | {_fmt_flops(bf)} | {_ratio(mf, bf)} | "
                   f"{_cell(row.get('mini_time') or row.get('mini_ms'), name)} | "
                   f"{_cell(row.get('baseline_time') or row.get('baseline_ms'), name)} | "
                   f"{_cell(row.get('measured_ratio'), name)} |")
        tot["mini_flops"] += mf or 0
        tot["baseline_flops"] += bf or 0
    ttft = results.get("time_to_first_token", {})
    out.append(f"| **total** (ms: time to first token) | {_fmt_flops(tot['mini_flops'])} | {_fmt_flops(tot['baseline_flops'])} | "
               f"{_ratio(tot['mini_flops'], tot['baseline_flops'])} | {_cell(ttft.get('mini_time'), 'total')} | "
               f"{_cell(ttft.get('baseline_time'), 'total')} | {_cell(ttft.get('measured_ratio'), 'total')} |")
    vpi = results.get("vram_per_image")
    if vpi:
        out.append(f"| VRAM per image (KV, {vpi.get('dtype', '')}) | {M.format_bytes(vpi['mini'])} | "
                   f"{M.format_bytes(vpi['baseline'])} | {_ratio(vpi['mini'], vpi['baseline'])} | | | |")
    out.append("")
    if vpi:
        out += ["## VRAM per image in the LLM context (KV cache)", "",
                f"| model | KV per image ({vpi.get('dtype', '')}) |", "| --- | ---: |",
                f"| LLaVA-Mini | {M.format_bytes(vpi['mini'])} |", f"| baseline | {M.format_bytes(vpi['baseline'])} |",
                ""]
    plan = results.get("plan")
    if plan:
        out += [f"## Frames in a {M.format_bytes(results.get('budget_bytes', 0))} budget (planner prediction)", "",
                "| model | weights | bytes per frame at the peak | KV per frame | margin | max frames | bound by |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for m, p in plan.items():
            out.append(f"| {m} | {M.format_bytes(p['weights'])} | {M.format_bytes(p['per_frame'])} | "
                       f"{M.format_bytes(p['kv_per_frame'])} | {p['margin']:.0%} | {p['max_frames']:,} | {p['bound_by']} |")
        out.append("")
    roof = results.get("roofline")
    if roof:
        c = roof.get("ceilings", {})
        out += [f"## Roofline at {c.get('device')} ({c.get('matmul_tflops'):.4g} TFLOP/s, "
                f"{c.get('copy_gbps'):.4g} GB/s; {c.get('source', '')})", "",
                "| model | stage | FLOP/byte | bound | floor ms | measured ms | measured / floor |",
                "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
        timed = {row["stage"]: row for row in results["stages"]}
        timed["total"] = results.get("time_to_first_token", {})
        for m in ("mini", "baseline"):
            for r in roof.get(m, []):
                inten = "-" if r.get("intensity") is None else f"{r['intensity']:.3g}"
                t = timed.get(r["stage"], {}).get(f"{m}_time")  # measured / floor only with its interval
                over = "-" if t is None or not r["floor_ms"] else format_estimate(
                    {**t, **{k: t[k] / r["floor_ms"] for k in ("median", "low", "high")}, "unit": "x"}, r["stage"])
                out.append(f"| {m} | {r['stage']} | {inten} | {r['bound']} | {r['floor_ms']:.3g} | "
                           f"{_cell(t or r.get('measured_ms'), r['stage'])} | {over} |")
        out.append("")
    proj = results.get("projection")
    if proj and proj.get("gpus"):
        out += [f"## LLaVA-Mini floors on other GPUs: {proj.get('label', R.PROJECTION_LABEL)}", "",
                "| GPU | TFLOP/s | TB/s | floor ms (all stages) |", "| --- | ---: | ---: | ---: |"]
        for g, v in proj["gpus"].items():
            out.append(f"| {g} | {v['ceilings']['tflops']:g} | {v['ceilings']['tbps']:g} | {v['total_ms']:.3g} |")
        out.append("")
    out += _measured_section(results)
    out += _checks_section(checks)
    if plots:
        out += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(out)


def _protocol_lines(results: dict) -> list[str]:
    p = results.get("protocol")
    if not p:
        return []
    return [f"How to read the measured figures: each is a median with its {p['confidence']:.0%} confidence interval "
            "`[low, high]` over n samples. A ratio compares two things measured in interleaved pairs "
            f"({p.get('order', 'AB, BA, ...')}), taken per pair: the interval is that of the median ratio. Sampling "
            f"stopped once the interval was narrower than {p['rel_width']:.0%} of the median, or after {p['budget_s']:g} s "
            f"({p.get('headline_budget_s', p['budget_s']):g} s for the headline), at least {p['min_samples']} samples; "
            f"clock: {p.get('clock', '?')}; torch threads: {p.get('threads', '?')}. Flags: see Self-checks."
            + (f" The run took {p['run_seconds']['total']:.0f} s." if p.get("run_seconds") else ""), ""]


def _measured_section(results: dict) -> list[str]:
    """Backends, throughput, decode rate, memory and video as measured by ``llava-mini bench``."""
    m = results.get("measured")
    if not m:
        return []
    out = ["## Measured in this run", ""]
    backends = m.get("backends", {})
    if backends.get("rows"):
        ref = backends["reference"]
        out += [f"LLaVA-Mini's backends, time to first token, each paired against `{ref}` "
                f"(chosen for the rest: `{backends['chosen']}`):", "",
                f"| backend | prefill ms | speedup vs {ref} |", "| --- | ---: | ---: |"]
        for b, r in backends["rows"].items():
            out.append(f"| {b} | {_cell(r['prefill_ms'], b)} | {_cell(r.get(f'speedup_vs_{ref}'), b)} |")
        out.append("")
    if m.get("prefill_throughput"):
        out += ["Prefill of a batch of images (encode + LLM), paired:", "",
                "| batch | LLaVA-Mini ms | baseline ms | LLaVA-Mini images/s | baseline images/s | baseline / mini "
                "| J/image mini | J/image baseline |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in m["prefill_throughput"]:
            j = [("-" if t.get(f"{k}_joules_per_image") is None else f"{t[f'{k}_joules_per_image']:.3g}")
                 for k in ("mini", "baseline")]
            out.append(f"| {t['batch']} | {_cell(t['mini'], 'mini')} | {_cell(t['baseline'], 'baseline')} | "
                       f"{_cell(t['mini_images_per_s'], 'mini')} | {_cell(t['baseline_images_per_s'], 'baseline')} | "
                       f"{_cell(t['ratio'], 'ratio')} | {j[0]} | {j[1]} |")
        out.append("")
    d = m.get("decode")
    if d:
        out += ["Decoding, from the step times inside each generation (a generation's figure is the median of "
                "its steps; n = generations, alternated between the models):", "",
                "| model | backend | time to first token ms | ms per token | tokens/s |", "| --- | --- | ---: | ---: | ---: |"]
        for name in ("mini", "baseline"):
            r = d[name]
            out.append(f"| {name} | {r.get('backend', '-')} | {_cell(r['ttft_ms'], name)} | "
                       f"{_cell(r['ms_per_token'], name)} | {_cell(r['tokens_per_s'], name)} |")
        out += ["", f"Decode speedup (baseline step / mini step, paired): {_cell(d['ratio'], 'decode')}", ""]
    mem = m.get("memory", {})
    if mem:
        out += ["| model | backend | weights | bytes per added image and its prompt (measured) | intercept |",
                "| --- | --- | ---: | ---: | ---: |"]
        for name, r in mem.items():
            slope = r["memory_per_image"]
            out.append(f"| {name} | {r['backend']} | {r['weights_bytes'] / 2**20:.1f} MiB | "
                       f"{slope['slope']:.0f} ({slope['method']}) | {slope['intercept']:.0f} |")
        out.append("")
    v = m.get("video")
    if v:
        plan = results.get("plan", {}).get("mini", {})
        slope = v["memory_per_frame"]
        out += [f"LLaVA-Mini video ({v['backend']}): encode + LLM prefill vs frames:", "",
                "| frames | ms |", "| ---: | ---: |"]
        out += [f"| {r['frames']} | {_cell(r['ms'], 'video')} |" for r in v["latency"]]
        out += ["", f"KV bytes per added frame: {slope['slope']:.0f} measured ({slope['method']}), "
                    f"{plan.get('kv_per_frame', '-')} planned.", ""]
    out += _methods_section(m.get("methods"))
    summary = results.get("summary", {})
    if summary:
        out += ["### Headline (baseline time / LLaVA-Mini time)", ""]
        for key, value in summary.items():
            if isinstance(value, dict) and "median" not in value:
                text = ", ".join(f"{k} {format_estimate(e, f'{key}.{k}')}" for k, e in value.items())
            else:
                text = f"{format_estimate(value, key)}, stopped by {value.get('stopped_by', '?')}"
            out.append(f"- **{key.replace('_', ' ')}**: {text}")
        out.append("")
    return out


def _methods_section(methods: dict | None) -> list[str]:
    """The methods table: cost per image of LLaVA-Mini, FastV, VisionZip and the 576-token baseline."""
    if not methods:
        return []
    rows, batch, ref = methods["rows"], methods["batch"], methods["reference"]
    out = [f"### The methods, against `{ref}` (576 tokens) in the same run", "",
           f"Cost only: FastV (pruning after LLM layer {methods['fastv_layer']}) and VisionZip change what the "
           "model answers, differently from LLaVA-Mini; accuracy needs real weights and benchmarks this "
           "toolkit does not ship. Tokens held: per image in the LLM (FastV's first layers hold all 576; KV "
           "tokens is the per-layer average). FLOPs: to the first token, per image, the method's own work "
           f"included. Speedups: {ref} time / method time, paired; throughput at batch {batch}; frames: "
           "the planner's count for one prompt in the budget.", "",
           "| method | tokens held | KV tokens | FLOPs paper | FLOPs full | FLOPs counted | TTFT ms | TTFT speedup "
           f"| prefill images/s (batch {batch}) | throughput speedup | decode tokens/s | KV per image | "
           f"frames in {rows[0]['budget_bytes'] / M.GiB:.0f} GiB |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        f, name = r["prefill_flops_per_image"], r["method"]
        out.append(f"| {name} | {r['tokens_held_per_image']} | {r['kv_tokens_per_image']:.4g} | "
                   f"{_fmt_flops(f['paper'])} | {_fmt_flops(f['full'])} | {_fmt_flops(f['counted'])} | "
                   f"{_cell(r['ttft_ms'], name)} | {_cell(r.get('ttft_speedup'), name)} | "
                   f"{_cell(r.get('prefill_images_per_s'), name)} | {_cell(r.get('prefill_speedup'), name)} | "
                   f"{_cell(r['decode']['tokens_per_s'], name)} | {M.format_bytes(r['kv_bytes_per_image'])} | "
                   f"{r['frames_in_budget']:,} |")
    return out + [""]


def _estimates(tree, path: str = ""):
    """(path, Estimate dict) for every Estimate-shaped dict inside ``tree``."""
    if isinstance(tree, dict):
        if {"median", "low", "high", "n"} <= set(tree):
            yield path, tree
            return
        for k, v in tree.items():
            yield from _estimates(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _estimates(v, f"{path}[{i}]")


def _finite_positive(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


def self_checks(results: dict) -> list[dict]:
    """The report's self-checks, each ``{"check", "ok", "detail"}``; none without measurements.

    - shared stages agree: a stage both models run identically (CLIP; the projector on the same 576
      tokens) must take the same time: its paired ratio's interval must reach into
      [1 / (1 + SHARED_TOLERANCE), 1 + SHARED_TOLERANCE];
    - plausible figures: every median and interval end positive and finite, low <= median <= high,
      times within 1 us .. ~3 h and ratios within 1000x (``PLAUSIBLE``);
    - low dispersion: no interval wider than ``DISPERSION_LIMIT`` of its median;
    - enough samples: every interval's coverage at least the nominal confidence.
    """
    found = list(_estimates(results.get("measured", {}), "measured"))
    if not found and not results.get("shared_stages"):
        return []
    checks = []
    lo, hi = 1 / (1 + SHARED_TOLERANCE), 1 + SHARED_TOLERANCE
    for name, r in results.get("shared_stages", {}).items():
        ok = _finite_positive(r["low"], r["high"]) and r["low"] <= hi and r["high"] >= lo
        checks.append({"check": f"shared stage {name} agrees", "ok": ok,
                       "detail": f"baseline / mini {format_estimate(r, name)}; the same work in both models: the "
                                 f"interval should reach into [{lo:.3g}, {hi:.3g}]"})
    bad, wide, few = [], [], []
    for path, e in found:
        low_bound, high_bound = PLAUSIBLE.get(e.get("unit"), (0, math.inf))
        if not (_finite_positive(e["median"], e["low"], e["high"]) and e["low"] <= e["median"] <= e["high"]
                and low_bound <= e["median"] <= high_bound):
            bad.append(f"{path} = {e['median']!r} [{e['low']!r}, {e['high']!r}] {e.get('unit', '')}")
        elif (e["high"] - e["low"]) / e["median"] > DISPERSION_LIMIT:
            wide.append(f"{path} ({(e['high'] - e['low']) / e['median']:.0%})")
        if e.get("confidence", 1.0) < CONFIDENCE:
            few.append(f"{path} (n={e['n']}, coverage {e['confidence']:.0%})")
    checks.append({"check": "figures plausible", "ok": not bad,
                   "detail": "; ".join(bad) or f"all {len(found)} positive, finite, ordered and in range"})
    checks.append({"check": "dispersion low", "ok": not wide,
                   "detail": (f"intervals wider than {DISPERSION_LIMIT:.0%} of the median: " + ", ".join(wide)) if wide
                   else f"every interval within {DISPERSION_LIMIT:.0%} of its median"})
    checks.append({"check": "enough samples", "ok": not few,
                   "detail": (f"coverage below {CONFIDENCE:.0%}: " + ", ".join(few)) if few
                   else f"every interval covers the median with >= {CONFIDENCE:.0%}"})
    return checks


def _checks_section(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    out = ["## Self-checks", "", "| check | result | detail |", "| --- | --- | --- |"]
    out += [f"| {c['check']} | {'ok' if c['ok'] else '**FLAG**'} | {c['detail']} |" for c in checks]
    return out + [""]


# --- plots ----------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    _plt().close(fig)
    return path


def _frames_plot(results, key, ylabel, title, path, budget=None):
    fr = results.get("frames")
    if not fr or not fr.get("frames"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    scale = 1 / M.GiB if key == "vram_bytes" else 1.0
    for m, label in (("mini", "LLaVA-Mini"), ("baseline", "LLaVA-1.5 (576 tokens)")):
        ys = fr.get(m, {}).get(key)
        if ys:
            pts = [(x, y * scale) for x, y in zip(fr["frames"], ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
    if budget:
        ax.axhline(budget / M.GiB, color="gray", linestyle="--", label=f"budget {budget / M.GiB:.0f} GiB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel(ylabel)
    src = fr.get("latency_source" if key == "latency_ms" else "vram_source", "")
    ax.set_title(f"{title}\n" + "\n".join(textwrap.wrap(f"({src})", 70)), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _breakdown_plot(results, path):
    plt = _plt()
    stages = [r for r in results["stages"] if (r.get("mini_flops") or r.get("baseline_flops"))]
    if not stages:
        return None
    has_ms = any(r.get("mini_ms") is not None or r.get("baseline_ms") is not None for r in stages)
    ncols = 2 if has_ms else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    x = range(len(stages))
    names = [r["stage"] for r in stages]
    panels = [("flops", "TFLOPs", 1e-12)] + ([("ms", "ms", 1.0)] if has_ms else [])
    for ax, (key, label, scale) in zip(axes[0], panels):
        for off, m, name in ((-0.2, "mini", "LLaVA-Mini"), (0.2, "baseline", "baseline")):
            vals = [(r.get(f"{m}_{key}") or 0) * scale for r in stages]
            ax.bar([i + off for i in x], vals, width=0.4, label=name)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"per-stage {label}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _roofline_plot(results, path):
    roof = results.get("roofline")
    if not roof or not (roof.get("mini") or roof.get("baseline")):
        return None
    plt = _plt()
    c = roof["ceilings"]
    peak, bw = c["matmul_tflops"], c["copy_gbps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for m in ("mini", "baseline") for r in roof.get(m, []) if r.get("intensity")]
    lo = min([r["intensity"] for r in rows] + [0.1]) / 2
    hi = max([r["intensity"] for r in rows] + [peak * 1e3 / bw * 4]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, x * bw / 1e3) for x in xs], color="black", label=f"roof: {c.get('device')}")
    markers = {"mini": "o", "baseline": "s"}
    for m in ("mini", "baseline"):
        for r in roof.get(m, []):
            if not r.get("intensity"):
                continue
            t = r["measured_ms"] if r.get("measured_ms") else r["floor_ms"]
            achieved = r["flops"] / (t * 1e-3) / 1e12 if t else None
            if achieved:
                ax.scatter(r["intensity"], achieved, marker=markers[m], s=25)
                ax.annotate(f"{m}:{r['stage']}", (r["intensity"], achieved), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s (measured, or at the floor)")
    ax.set_title(f"roofline ({c.get('source', '')})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _methods_plot(results, path):
    """Two panels against the tokens per image: prefill FLOPs (``full``, exact) and the paired time-to-
    first-token speedup over the 576-token baseline (the figure the machine's load cancels in)."""
    methods = results.get("measured", {}).get("methods")
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    families = {"llava-1.5": ("LLaVA-1.5 (576)", "s"), "fastv": ("FastV", "o"), "visionzip": ("VisionZip", "^"),
                "llava-mini": ("LLaVA-Mini", "*")}
    for key, (label, marker) in families.items():
        rows = [r for r in methods["rows"] if r["method"].startswith(key)]
        if not rows:
            continue
        style = dict(marker=marker, linestyle="-" if len(rows) > 1 else "none", label=label)
        xs = [r["tokens_held_per_image"] for r in rows]
        axes[0].plot(xs, [r["prefill_flops_per_image"]["full"] / 1e9 for r in rows], **style)
        speedups = [r.get("ttft_speedup") or {"median": 1.0, "low": 1.0, "high": 1.0} for r in rows]
        axes[1].errorbar(xs, [e["median"] for e in speedups],
                         yerr=[[e["median"] - e["low"] for e in speedups], [e["high"] - e["median"] for e in speedups]],
                         capsize=3, **style)
    axes[0].set_ylabel("prefill GFLOPs per image (full convention)")
    axes[1].set_ylabel(f"time to first token: {methods['reference']} / method (paired, 95%)")
    device = results.get("env", {}).get("device", "")
    for ax, title in zip(axes, ("FLOPs", f"measured ({device})")):
        ax.set_xscale("log")
        ax.set_xlabel("vision tokens the LLM holds per image (FastV: after its layer K)")
        ax.set_title(f"{title} vs tokens per image", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def render_plots(results: dict, out_dir) -> dict[str, Path]:
    """Write the PNG plots that the results have data for; returns ``{plot name: path}``."""
    _check(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "latency_vs_frames": _frames_plot(results, "latency_ms", "ms", "latency vs frames",
                                          out_dir / "latency_vs_frames.png"),
        "vram_vs_frames": _frames_plot(results, "vram_bytes", "GiB", "VRAM vs frames", out_dir / "vram_vs_frames.png",
                                       budget=results.get("budget_bytes")),
        "stage_breakdown": _breakdown_plot(results, out_dir / "stage_breakdown.png"),
        "roofline": _roofline_plot(results, out_dir / "roofline.png"),
        "methods": _methods_plot(results, out_dir / "methods_ttft.png"),
    }
    return {k: v for k, v in made.items() if v is not None}


def render_report(results: dict, out_dir, name: str = "report") -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.json`` and the plots into ``out_dir``; returns their paths
    (``{"markdown", "json", "plots": {...}}``)."""
    _check(results)
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name: expected a plain file stem, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _sanitize(results)
    plots = render_plots(clean, out_dir)
    md = out_dir / f"{name}.md"
    md.write_text(render_markdown(clean, {k: v.name for k, v in plots.items()}) + "\n")
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(clean, indent=2, default=str) + "\n")
    return {"markdown": md, "json": js, "plots": plots}
