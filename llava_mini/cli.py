"""``llava-mini``: bench | profile | generate | plan | serve | train."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_bytes(text: str) -> int:
    """``24GB``, ``24GiB``, ``512MB`` or a plain number of bytes -> bytes (GB means GiB, as GPU cards say)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 24GB, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def cmd_bench(args) -> int:
    if args.engine == "vllm":
        return bench_engine(args)
    from llava_mini.profiling.ceilings import device_name
    from llava_mini.profiling.compare import BenchPlan, format_summary, run_bench
    from llava_mini.profiling.results import RESULTS_DIR, device_slug

    plan = BenchPlan.for_device(args.device, preset=args.preset, baseline_preset=args.baseline,
                                dtype=DTYPES.get(args.dtype), budget_s=args.budget, rel_width=args.width,
                                threads=args.threads,
                                batches=tuple(args.batches) if args.batches else None,
                                frames=tuple(args.frames) if args.frames else None,
                                method_budgets=tuple(args.methods) if args.methods is not None else None,
                                backends=tuple(args.backends) if args.backends else None)
    out = Path(args.out) if args.out else RESULTS_DIR / device_slug(device_name(plan.device))
    results = run_bench(plan, out_dir=out, progress=not args.no_progress)
    print(format_summary(results))
    print(f"\nreport: {results['files']['markdown']}\njson:   {results['files']['json']}")
    return 0


def bench_engine(args) -> int:
    """``bench --engine vllm``: LLaVA-Mini against LLaVA-1.5, both served by vLLM (llava_mini.serving.bench)."""
    from llava_mini.profiling.ceilings import device_name
    from llava_mini.profiling.estimate import Protocol
    from llava_mini.profiling.results import RESULTS_DIR, device_slug
    from llava_mini.serving.bench import format_engine_bench, run_engine_bench

    gpu = torch.cuda.is_available()
    preset = args.preset or ("llava-mini-vicuna-7b" if gpu else "small")
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    protocol = Protocol(rel_width=args.width or 0.05, budget_s=args.budget or 20.0)
    results = run_engine_bench(Path(args.out) if args.out else RESULTS_DIR / device_slug(device_name()), preset, dtype,
                               tuple(args.concurrency), args.new_tokens, protocol,
                               progress=(lambda m: None) if args.no_progress else print)
    print(format_engine_bench(results))
    print(f"\njson: {results['file']}")
    return 0


def cmd_plan(args) -> int:
    from llava_mini.profiling.memory import format_bytes, plan

    d = plan(args.preset, vram_bytes=args.vram, dtype=args.dtype, prompt_len=args.prompt_len, model=args.model).to_dict()
    if args.measure:
        d.update(measure_plan(args, d["max_frames"]))
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{args.preset} ({args.model}), {args.dtype}, budget {format_bytes(args.vram)}:")
    for key in ("max_frames", "bound_by"):
        print(f"  {key}: {d[key]}")
    for key in ("kv_per_frame", "per_frame", "encode_chunk_peak"):
        print(f"  {key}: {format_bytes(d[key])}")
    print(f"  weights: {format_bytes(d['weights']['total'] if isinstance(d['weights'], dict) else d['weights'])}")
    if "measured_memory" not in d:
        print("  (a prediction; add --measure to measure host and device memory beside it, and on a GPU "
              "the real maximum under the budget)")
        return 0
    m = d["measured_memory"]
    show = lambda n: "-" if n is None else format_bytes(n)  # noqa: E731
    print(f"  measured on {m['device']} (chunks of {m['chunk_frames']} frames, as the model runs them; "
          f"host RSS with the model loaded {show(m['model_rss'])}):")
    print(f"    {'frames':>8}  {'predicted peak':>15}  {'device peak':>12}  {'host peak RSS':>14}  {'host above model':>17}")
    for r in m["rows"]:
        print(f"    {r['frames']:>8}  {show(r['predicted_peak']):>15}  {show(r['device_peak']):>12}  "
              f"{show(r['host_peak']):>14}  {show(r['host_above_start']):>17}")
    if "measured" in d:
        print(f"  measured: {d['measured']['max_frames']} frames fit (planner: {d['max_frames']}); "
              f"tried {len(d['measured']['tried'])} frame counts")
    return 0


def measure_plan(args, predicted: int) -> dict:
    """Build the preset and run videos of ``--frames`` frames through encode + prefill: peak host RSS
    and device memory beside the planner's predicted peak (planned with the model's own chunk size),
    and on CUDA the most frames that fit under ``--vram`` (binary search)."""
    from llava_mini.lmm import LlavaMini
    from llava_mini.profiling.latency import prefill, random_inputs
    from llava_mini.lmm.video import available_memory
    from llava_mini.profiling.memory import (format_bytes, max_frames_in_budget, measure_video_memory, plan,
                                             process_rss_bytes, weight_bytes)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    weights, free = weight_bytes(args.preset, "mini", args.dtype)["total"], available_memory(device)
    if free is not None and weights > free:
        raise ValueError(f"--measure: the {args.preset} weights take {format_bytes(weights)} in {args.dtype}, more than "
                         f"the {format_bytes(free)} free on {device}; measure a smaller --preset (e.g. small) there")
    model = LlavaMini.from_preset(args.preset, dtype=dtype, device=device)
    _, ids = random_inputs(model, 1, args.prompt_len)
    s = model.config.crop_size
    frame = torch.randn(1, 3, s, s, dtype=dtype)

    def run(frames: int):
        video = frame.expand(frames, 3, s, s)  # ready pixels that take no memory: a file would stream
        # "sdpa": the planner assumes flash-style attention
        return prefill(model, ids, videos=[video], backend="sdpa", use_cache=True)

    def predict(frames: int) -> int:  # planned with the chunk the model will use for this video
        p = plan(args.preset, vram_bytes=args.vram, dtype=args.dtype, prompt_len=args.prompt_len,
                 chunk_frames=min(frames, model.frame_chunk()))
        return max(p.encode_peak(frames), p.prefill_peak(frames))

    out = {"measured_memory": {"device": str(device), "chunk_frames": model.frame_chunk(),
                               "model_rss": process_rss_bytes(),
                               "rows": measure_video_memory(run, args.frames, predict, device)}}
    if device.type == "cuda":
        out["measured"] = max_frames_in_budget(run, args.vram, lo=1, hi=max(64, 2 * predicted))
    return out


def cmd_profile(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    from llava_mini.lmm import LlavaMini
    from llava_mini.lmm.baseline import LlavaBaseline
    from llava_mini.profiling.estimate import Protocol, clock_name
    from llava_mini.profiling.latency import random_inputs, stage_timings

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    cls = LlavaBaseline if args.model == "baseline" else LlavaMini
    model = cls.from_preset(args.preset, dtype=dtype, device=device)
    protocol = Protocol(min_samples=args.repeats, max_samples=args.repeats)
    timings = stage_timings(model, batch=args.batch, protocol=protocol, backend=args.backend)
    print(f"ms: median [interval] (n samples), {clock_name(device)}")
    for stage, t in timings.items():
        if args.stage in (None, stage):
            print(f"{stage:<16}{t}")
    pixels, ids = random_inputs(model, args.batch, 43)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof, torch.no_grad():
        model.generate(pixels, ids, max_new_tokens=4, eos_token_id=None, backend=args.backend)
    Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total", row_limit=15))
    print(f"trace: {args.trace} (open in chrome://tracing or Perfetto)")
    return 0


class TokenStreamer:
    """Prints token ids as they are decoded (for ``generate`` without a tokenizer; one sequence)."""

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streamer: prints one sequence; got a batch of several")
        for token in value.flatten().tolist():  # the first call carries the prompt's ids: none here
            print(token, end=" ", flush=True)

    def end(self) -> None:
        print()


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from llava_mini.lmm import IMAGE_TOKEN_INDEX, LlavaMini

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.checkpoint:
        model = LlavaMini.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    else:
        model = LlavaMini.from_preset(args.preset, dtype=dtype, device=device)
    # Only what was given: the rest comes from the checkpoint's generation_config.json.
    options = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, top_p=args.top_p,
                                     stop_strings=args.stop).items() if v is not None}
    if args.temperature is not None:  # as the released scripts: 0 is greedy
        options.update(do_sample=args.temperature > 0, **({"temperature": args.temperature} if args.temperature > 0 else {}))
    beams = options.get("num_beams") or model.llm.generation_config.num_beams or 1
    streamer = None  # transformers streams one beam only
    if beams == 1:
        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True) if model.tokenizer else TokenStreamer()
    media = dict(videos=[args.video]) if args.video else dict(images=[args.image])
    prompt = dict(prompts=[args.prompt]) if args.prompt is not None else \
        dict(input_ids=[[1, IMAGE_TOKEN_INDEX, 3, 4, 5]])  # no tokenizer: a fixed id prompt around the image
    tokens = model.generate(**prompt, **media, **options, streamer=streamer, backend=args.backend)
    if streamer is None:
        print(model.decode(tokens)[0] if model.tokenizer else " ".join(map(str, tokens[0].tolist())))
    return 0


def cmd_serve(args) -> int:
    from llava_mini.serving.server import serve

    serve(args.checkpoint, args.options)  # replaces this process by vLLM's server
    return 0


def cmd_train(args) -> int:
    from llava_mini.training import TrainConfig, train

    result = train(TrainConfig(preset=args.preset, steps=tuple(args.steps), batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, out=args.out, backend=args.backend, eval_size=args.eval_size,
                               gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress))
    acc = result["accuracy"]
    print(f"held-out accuracy (chance {result['chance']:.0%}): start {acc['start']:.0%}, "
          + ", ".join(f"after {stage} {acc[stage]:.0%} (loss {result['loss'][stage]})" for stage in result["loss"]))
    for stage, path in result["checkpoints"].items():
        print(f"checkpoint ({stage}): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llava_mini.kernels.backend import BACKENDS
    from llava_mini.lmm import LlavaMiniConfig

    presets = LlavaMiniConfig.presets()
    parser = argparse.ArgumentParser(prog="llava-mini", description="LLaVA-Mini kernels, model and measurements")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="LLaVA-Mini vs the 576-token baseline: FLOPs, latency, VRAM; writes a report")
    b.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    b.add_argument("--preset", choices=presets, help="LLaVA-Mini preset (default: llava-mini-vicuna-7b on GPU, small on CPU)")
    b.add_argument("--baseline", help="baseline preset (default: llava-1.5-7b on GPU, small on CPU)")
    b.add_argument("--dtype", choices=DTYPES)
    b.add_argument("--backends", nargs="+", choices=BACKENDS)
    b.add_argument("--batches", nargs="+", type=int)
    b.add_argument("--frames", nargs="+", type=int)
    b.add_argument("--methods", nargs="*", type=int, metavar="TOKENS",
                   help="token budgets of the methods table (FastV and VisionZip on the baseline, beside "
                        "LLaVA-Mini; default 64 128 192); give none to skip the table")
    b.add_argument("--budget", type=float, metavar="SECONDS",
                   help="time budget of each comparison (default: 4 on CPU, 8 on GPU, the headline 3x that; 20 with --engine vllm)")
    b.add_argument("--width", type=float, metavar="FRACTION",
                   help="stop a comparison once its 95%% interval is narrower than this fraction of the median "
                        "(default 0.05)")
    b.add_argument("--threads", type=int, help="torch CPU threads during the run (default: 1 on CPU, unchanged on GPU)")
    b.add_argument("--out", help="report folder (default: ./bench/results/<device>/)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="transformers (default): the in-process report; vllm: both models served by vLLM "
                        "(needs the vllm extra), throughput per concurrency, TTFT, KV blocks")
    b.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16],
                   help="with --engine vllm: requests submitted at once (default 1 4 16)")
    b.add_argument("--new-tokens", type=int, default=16, help="with --engine vllm: tokens per answer")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="how many frames fit in a VRAM budget (prediction)")
    p.add_argument("--preset", choices=presets, default="llava-mini-llama-3.1-8b")
    p.add_argument("--vram", type=parse_bytes, default=parse_bytes("24GB"))
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--model", choices=["mini", "baseline"], default="mini")
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true",
                   help="also measure host and device memory for --frames frames (and on a GPU the real maximum)")
    p.add_argument("--frames", nargs="+", type=int, default=[16, 64], help="frame counts to measure (with --measure)")
    p.add_argument("--device", help="cuda or cpu, for --measure (default: cuda if present)")
    p.set_defaults(func=cmd_plan)

    f = sub.add_parser("profile", help="one model's stages and a torch.profiler trace")
    f.add_argument("--model", choices=["mini", "baseline"], default="mini")
    f.add_argument("--preset", default="tiny")
    f.add_argument("--stage", help="print only this stage")
    f.add_argument("--backend", choices=BACKENDS)
    f.add_argument("--device")
    f.add_argument("--dtype", choices=DTYPES)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--repeats", type=int, default=6, help="timed runs per stage (6 or more: a 95%% interval)")
    f.add_argument("--trace", default="out/trace.json")
    f.set_defaults(func=cmd_profile)

    g = sub.add_parser("generate", help="run one image or video through a model (streams the answer)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--image")
    src.add_argument("--video")
    g.add_argument("--checkpoint", help="a local checkpoint directory in the released layout")
    g.add_argument("--preset", default="tiny", help="random weights of a preset when no checkpoint is given")
    g.add_argument("--prompt", help="a text question (needs the checkpoint's tokenizer)")
    g.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's generation_config.json, else 20")
    g.add_argument("--temperature", type=float, help="0: greedy; > 0: sampling at this temperature")
    g.add_argument("--top-p", type=float)
    g.add_argument("--num-beams", type=int, help="beam search (printed at the end, not streamed)")
    g.add_argument("--stop", action="append", help="a stop string (repeatable; needs the checkpoint's tokenizer)")
    g.add_argument("--backend", choices=BACKENDS)
    g.add_argument("--device")
    g.add_argument("--dtype", choices=DTYPES)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="the released two-stage recipe on a synthetic colour task; saves checkpoints",
                       description="Trains a randomly initialised preset on images of a coloured square "
                                   "('What colour is the square?'): stage pretrain (compressor, projector, "
                                   "pre-fusion), then finetune (also the LLM); the vision tower stays frozen. "
                                   "Prints the held-out accuracy and writes each stage's checkpoint under --out.")
    t.add_argument("--preset", choices=presets, default="tiny")
    t.add_argument("--steps", nargs=2, type=int, default=[50, 250], metavar=("PRETRAIN", "FINETUNE"),
                   help="optimizer steps of each stage (default 50 250)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both stages (default 3e-3)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="checkpoint folder (<out>/pretrain, <out>/finetune); none: nothing saved")
    t.add_argument("--backend", choices=BACKENDS)
    t.add_argument("--eval-size", type=int, default=64, help="held-out examples")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("serve", help="vLLM's OpenAI-compatible server on a checkpoint (needs the vllm extra)",
                       description="Starts vLLM's OpenAI-compatible server on CHECKPOINT with the LLaVA-Mini plugin, "
                                   "the released chat template and frame selection, and unknown request fields "
                                   "refused (--allow-unknown-fields to accept them). Every option after CHECKPOINT "
                                   "is vLLM's (e.g. --port 8000 --dtype bfloat16 --tensor-parallel-size 2).")
    s.add_argument("checkpoint", help="a local checkpoint directory in the released layout")
    s.add_argument("options", nargs=argparse.REMAINDER, help="vLLM server options")
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"llava-mini {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
