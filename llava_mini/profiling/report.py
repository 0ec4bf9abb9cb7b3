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
    }

Every key but ``stages`` is optional: a plot or section without its data is skipped.
"""

from __future__ import annotations

import json
import textwrap
import math
from pathlib import Path

from llava_mini.profiling import flops as F
from llava_mini.profiling import memory as M
from llava_mini.profiling import roofline as R

PLOTS = ("latency_vs_frames", "vram_vs_frames", "stage_breakdown", "roofline")


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


def render_markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    """The markdown report: comparison table per stage, VRAM per image, planner, roofline, projection."""
    _check(results)
    out = [f"# {results.get('title', 'LLaVA-Mini report')}", ""]
    env = results.get("env")
    if env:
        out += ["Measured on **{}** (torch {}, triton {}, transformers {}, commit {}).".format(
            env.get("device"), env.get("torch"), env.get("triton"), env.get("transformers"), env.get("commit")), ""]
    wl = results.get("workload", {})
    out += [f"FLOPs convention: `{results.get('convention', '?')}`; workload: "
            + ", ".join(f"{k}={v}" for k, v in wl.items()), ""]
    out += ["## LLaVA-Mini vs the 576-token baseline, per stage", "",
            "| stage | LLaVA-Mini FLOPs | baseline FLOPs | baseline / mini | LLaVA-Mini ms | baseline ms | baseline / mini |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tot = {"mini_flops": 0, "baseline_flops": 0, "mini_ms": None, "baseline_ms": None}
    for row in results["stages"]:
        mf, bf = row.get("mini_flops"), row.get("baseline_flops")
        mm, bm = row.get("mini_ms"), row.get("baseline_ms")
        out.append(f"| {row['stage']} | {_fmt_flops(mf)} | {_fmt_flops(bf)} | {_ratio(mf, bf)} | "
                   f"{_fmt_ms(mm)} | {_fmt_ms(bm)} | {_ratio(mm, bm)} |")
        tot["mini_flops"] += mf or 0
        tot["baseline_flops"] += bf or 0
        for k in ("mini_ms", "baseline_ms"):
            if row.get(k) is not None:
                tot[k] = (tot[k] or 0) + row[k]
    out.append(f"| **total** | {_fmt_flops(tot['mini_flops'])} | {_fmt_flops(tot['baseline_flops'])} | "
               f"{_ratio(tot['mini_flops'], tot['baseline_flops'])} | {_fmt_ms(tot['mini_ms'])} | "
               f"{_fmt_ms(tot['baseline_ms'])} | {_ratio(tot['mini_ms'], tot['baseline_ms'])} |")
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
        for m in ("mini", "baseline"):
            for r in roof.get(m, []):
                inten = "-" if r.get("intensity") is None else f"{r['intensity']:.3g}"
                over = "-" if r.get("over_floor") is None else f"{r['over_floor']:.3g}x"
                out.append(f"| {m} | {r['stage']} | {inten} | {r['bound']} | {r['floor_ms']:.3g} | "
                           f"{_fmt_ms(r.get('measured_ms'))} | {over} |")
        out.append("")
    proj = results.get("projection")
    if proj and proj.get("gpus"):
        out += [f"## LLaVA-Mini floors on other GPUs: {proj.get('label', R.PROJECTION_LABEL)}", "",
                "| GPU | TFLOP/s | TB/s | floor ms (all stages) |", "| --- | ---: | ---: | ---: |"]
        for g, v in proj["gpus"].items():
            out.append(f"| {g} | {v['ceilings']['tflops']:g} | {v['ceilings']['tbps']:g} | {v['total_ms']:.3g} |")
        out.append("")
    out += _measured_section(results)
    if plots:
        out += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(out)


def _measured_section(results: dict) -> list[str]:
    """Throughput, decode rate, video and memory per frame as measured by ``llava-mini bench``."""
    measured = results.get("measured")
    if not measured:
        return []
    out = ["## Measured in this run", "", "| model | backend | batch | prefill ms | images/s |",
           "| --- | --- | ---: | ---: | ---: |"]
    for model, runs in measured.items():
        for backend, r in runs.items():
            for t in r.get("prefill_throughput", []):
                out.append(f"| {model} | {backend} | {t['batch']} | {t['prefill_ms']:.3g} | {t['images_per_s']:.3g} |")
    out += ["", "| model | backend | time to first token ms | decode tokens/s | static cache (compiled) tokens/s |",
            "| --- | --- | ---: | ---: | ---: |"]
    for model, runs in measured.items():
        for backend, r in runs.items():
            d, g = r.get("decode", {}), r.get("decode_static_cache")
            graphed = "-" if g is None else (f"error: {g['error'][:60]}" if "error" in g else f"{g['tokens_per_s']:.3g}")
            out.append(f"| {model} | {backend} | {d.get('ttft_ms', float('nan')):.3g} | "
                       f"{d.get('tokens_per_s', float('nan')):.3g} | {graphed} |")
    out += ["", "| model | backend | weights | bytes per added image and its prompt (measured) | intercept |",
            "| --- | --- | ---: | ---: | ---: |"]
    for model, runs in measured.items():
        for backend, r in runs.items():
            mem = r.get("memory_per_image")
            if mem:
                out.append(f"| {model} | {backend} | {r.get('weights_bytes', 0) / 2**20:.1f} MiB | "
                           f"{mem['slope']:.0f} ({mem['method']}) | {mem['intercept']:.0f} |")
    plan = results.get("plan", {}).get("mini", {})
    rows = [(b, r["video"]) for b, r in measured.get("mini", {}).items() if "video" in r]
    if rows:
        out += ["", "| backend | frames: encode + prefill ms | KV bytes per added frame (measured) | planner |",
                "| --- | --- | ---: | ---: |"]
        for backend, v in rows:
            lat = ", ".join(f"{x['frames']}: {x['ms']:.3g}" for x in v["latency"])
            mem = v["memory_per_frame"]
            out.append(f"| {backend} | {lat} | {mem['slope']:.0f} ({mem['method']}) | {plan.get('kv_per_frame', '-')} |")
    for key, value in results.get("summary", {}).items():
        if not isinstance(value, dict):
            out.append(f"\n**{key.replace('_', ' ')}**: {value:.3g}x")
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
