"""Benchmark: long videos in bounded memory, 100 to 10,000 frames.

Synthetic H.264 clips written with PyAV (480p = 640x480 and 1080p = 1920x1080, ``--source-fps``
frames per second of video, so the released selection keeps one frame per second), encoded to the
LLM input with the ``small`` preset on the CPU (``llava-mini-vicuna-7b`` in bf16 on a GPU). Each
measurement runs in its own process, so each peak is its own:

- ``decode``: streaming decode + preprocessing alone (no model);
- ``model``: the model alone on ready pixels (no decoding; one case per frame count);
- ``pipelined``: the file through ``model.encode`` (decoding on a background thread: the default);
- ``decode_all``: the pre-streaming path (every frame of the file decoded to RGB, the selected
  ones preprocessed into one tensor, then encoded), only where its predicted memory fits
  ``--decode-all-limit``;
- ``overlap``: the pipelined time over max(decode alone, model alone), the bound that overlap
  allows, measured with the project's protocol (``estimate.paired_ratio``: the two sides
  interleaved in one process, the median ratio with its 95% interval) at ``--overlap-frames``.

Reports frames/s, peak host RSS (absolute and above the loaded, warmed-up model), peak device
memory (GPU), and the overlap ratio with its interval. Results go to
``bench/results/<device>/video.json`` after every case; a rerun skips the cases already there
(``--fresh`` starts over), so a long run can be stopped and resumed. Timings are never asserted.

    PYTHONPATH=. python bench/test_bench_video.py                            # everything (hours on a CPU)
    PYTHONPATH=. python bench/test_bench_video.py --frames 100 --resolutions 480p   # minutes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RESOLUTIONS = {"480p": (640, 480), "1080p": (1920, 1080)}
PATHS = ("decode", "model", "pipelined", "decode_all", "overlap")
PROMPT_TOKENS = 43
LONG_CONTEXT = 131_072  # Llama-3.1's max_position_embeddings
MiB = 1 << 20


# --- one case, in its own process ------------------------------------------------------------------
def decode_all(model, path: str, ids: list[int]):
    """The pre-streaming path, kept here to measure it: decode every frame, then select and preprocess."""
    import av

    from llava_mini.lmm import processing, video as V

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        frames = [V.to_rgb(f) for f in container.decode(stream)]
    picks = V.select_frames(len(frames), rate)
    pixels = processing.preprocess_video_frames([frames[i] for i in picks], model.image_processor,
                                                model.config.resolution_ratio)
    del frames
    return model.encode(videos=[pixels], input_ids=[ids])


def load_model(case: dict):
    """(model, prompt ids, case with what was changed for it) for one case, warmed up."""
    from llava_mini.lmm import LlavaMini, LlavaMiniConfig, Savings
    from llava_mini.profiling.latency import random_inputs

    torch.manual_seed(0)
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    if device.type == "cpu":
        # one torch thread, as `llava-mini bench` on a CPU: the decoder's threads take the other core
        torch.set_num_threads(1)
        case = dict(case, torch_threads=1)
    config = LlavaMiniConfig.from_preset(case["preset"])
    if case["frames"] * config.tokens_per_image + PROMPT_TOKENS > config.text["max_position_embeddings"]:
        # e.g. Vicuna's 4,096 positions hold no 10,000-frame video: give the LLM Llama-3.1's context
        # (the cost of a position does not depend on the limit; the JSON records the change)
        config.text = dict(config.text, max_position_embeddings=LONG_CONTEXT)
        case = dict(case, max_position_embeddings=LONG_CONTEXT)
    model = LlavaMini.from_config(config, dtype=dtype, device=device).set_backend(case["backend"])
    model.savings = Savings(frame_budget_bytes=case["budget"])
    ids = random_inputs(model, 1, PROMPT_TOKENS)[1][0]
    s = model.config.crop_size
    model.encode(videos=[torch.zeros(2, 3, s, s)], input_ids=[ids])  # warm-up: lazy allocations, thread pools
    return model, ids, case


def workloads(model, ids: list[int], case: dict) -> dict:
    """The measured paths, each a call that does the whole work once."""
    s = model.config.crop_size
    return {
        # deque(maxlen=0) consumes without keeping a chunk alive
        "decode": lambda: collections.deque(model.prepare_video(case["clip"]).chunks(model.frame_chunk(), False), 0),
        "model": lambda: model.encode(videos=[torch.randn(1, 3, s, s).expand(case["frames"], 3, s, s)],
                                      input_ids=[ids]),
        "pipelined": lambda: model.encode(videos=[case["clip"]], input_ids=[ids]),
        "decode_all": lambda: decode_all(model, case["clip"], ids),
    }


def run_overlap(case: dict) -> dict:
    """Pipelined time over max(decode alone, model alone), paired and interleaved (``paired_ratio``).

    Each denominator sample times decoding alone and the model alone back to back and keeps the
    larger: the time a perfect overlap of the two would take. A ratio near 1 means decoding hides
    entirely behind the model (or the reverse); near 2, nothing overlaps.
    """
    from llava_mini.profiling.estimate import Protocol, paired_ratio, timer

    model, ids, case = load_model(case)
    work = workloads(model, ids, case)
    decode, model_alone, pipelined = (timer(work[k], case["device"]) for k in ("decode", "model", "pipelined"))
    sides = []

    def bound() -> float:
        sides.append((decode(), model_alone()))
        return max(sides[-1])

    protocol = Protocol(rel_width=0.1, budget_s=case["overlap_budget_s"], warmup=1)
    c = paired_ratio(pipelined, bound, protocol)
    sides = sides[protocol.warmup:]  # the pairs the ratio was taken over
    return dict(case, overlap=c.to_dict(), decode_ms=[d for d, _ in sides], model_ms=[m for _, m in sides],
                protocol=protocol.to_dict())


def run_case(case: dict) -> dict:
    """Measure one case (``path``, ``frames``, ``clip``, ``preset``, ``device``, ``dtype``, ``backend``, ``budget``)."""
    from llava_mini.profiling.memory import peak_memory, process_rss_bytes

    if case["path"] == "overlap":
        return run_overlap(case)
    model, ids, case = load_model(case)
    device = torch.device(case["device"])
    work = workloads(model, ids, case)[case["path"]]
    model_rss = process_rss_bytes()
    with peak_memory(device) as peak:
        start = time.perf_counter()
        out = work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        del out
    return dict(case, seconds=seconds, frames_per_s=case["frames"] / seconds, chunk_frames=model.frame_chunk(),
                model_rss=model_rss, host_peak=peak.host_peak, host_above_model=peak.host_above_start,
                device_peak=peak.device_peak, device_above_model=peak.device_above_start)


# --- the suite -------------------------------------------------------------------------------------
def clip_path(folder: Path, resolution: str, frames: int, source_fps: float) -> Path:
    """A synthetic clip whose released selection is ``frames`` frames (written once, then reused)."""
    from llava_mini.lmm.video import write_synthetic_video

    path = folder / f"{resolution}_{frames}s_{source_fps:g}fps.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.mp4")
        write_synthetic_video(partial, int(frames * source_fps), fps=source_fps, size=RESOLUTIONS[resolution],
                              codec="libx264", options={"preset": "ultrafast"})
        partial.rename(path)
    return path


def decode_all_bytes(resolution: str, frames: int, source_fps: float, crop_size: int = 336) -> int:
    """What the pre-streaming path holds at once: every RGB frame of the file and the selected pixels."""
    width, height = RESOLUTIONS[resolution]
    return int(frames * source_fps) * width * height * 3 + frames * 3 * crop_size ** 2 * 4


def plan_cases(args) -> list[dict]:
    base = dict(preset=args.preset, device=args.device, dtype=args.dtype, backend=args.backend, budget=args.budget,
                source_fps=args.source_fps)
    cases = []
    if "overlap" in args.paths:
        cases += [dict(base, path="overlap", resolution=resolution, frames=frames, overlap_budget_s=args.overlap_budget_s)
                  for frames in args.overlap_frames for resolution in args.resolutions]
    for frames in args.frames:
        if "model" in args.paths:
            cases.append(dict(base, path="model", resolution="-", frames=frames))
        for resolution in args.resolutions:
            for path in args.paths:
                if path in ("model", "overlap"):
                    continue
                if path == "decode_all" and decode_all_bytes(resolution, frames, args.source_fps) > args.decode_all_limit:
                    continue
                cases.append(dict(base, path=path, resolution=resolution, frames=frames))
    return cases


def case_key(case: dict) -> tuple:
    return tuple(case[k] for k in ("path", "resolution", "frames", "preset", "device", "dtype", "backend", "budget",
                                   "source_fps"))


def run_in_process(case: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(case, error=done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overlap_ratios(rows: list[dict]) -> list[dict]:
    """The overlap cases' ratios (pipelined / max(decode, model)), each a median with its interval."""
    return [dict(resolution=r["resolution"], frames=r["frames"], preset=r["preset"], **r["overlap"])
            for r in rows if r["path"] == "overlap" and "error" not in r]


def print_table(rows: list[dict]) -> None:
    from llava_mini.profiling.estimate import format_estimate

    mib = lambda n: "-" if n is None else f"{n / MiB:,.0f}"  # noqa: E731
    print(f"{'path':<11}{'res':>6}{'frames':>8}{'s':>10}{'frames/s':>10}{'host peak MiB':>15}"
          f"{'above model':>13}{'device peak MiB':>17}")
    for r in sorted(rows, key=lambda r: (r["frames"], r["path"], r["resolution"])):
        if r["path"] == "overlap" and "error" not in r:
            continue
        if "error" in r:
            print(f"{r['path']:<11}{r['resolution']:>6}{r['frames']:>8}  error: {r['error']}")
            continue
        print(f"{r['path']:<11}{r['resolution']:>6}{r['frames']:>8}{r['seconds']:>10.1f}{r['frames_per_s']:>10.2f}"
              f"{mib(r['host_peak']):>15}{mib(r['host_above_model']):>13}{mib(r['device_peak']):>17}")
    for o in overlap_ratios(rows):
        print(f"pipelined / max(decode, model), {o['resolution']} x {o['frames']} frames: "
              f"{format_estimate(o['ratio'], 'ratio')} (pipelined {format_estimate(o['numerator'])} ms, "
              f"max(decode, model) {format_estimate(o['denominator'])} ms)")


def plot_memory(rows: list[dict], path: Path) -> Path:
    """Peak host RSS above the model vs frames, one line per path and resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lines = collections.defaultdict(list)
    for r in rows:
        if "error" not in r and r["path"] not in ("model", "overlap") and r["host_above_model"] is not None:
            lines[(r["path"], r["resolution"])].append((r["frames"], r["host_above_model"] / MiB))
    for (name, resolution), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="--" if name == "decode_all" else "-", label=f"{name} {resolution}")
    ax.set(xscale="log", yscale="log", xlabel="frames encoded", ylabel="peak host RSS above the model (MiB)",
           title="Host memory vs video length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_suite(args) -> list[dict]:
    from llava_mini.profiling.ceilings import device_name
    from llava_mini.profiling.results import RESULTS_DIR, device_slug, write_results

    out_dir = Path(args.out) if args.out else RESULTS_DIR / device_slug(device_name(args.device))
    results_file = out_dir / "video.json"
    rows = [] if args.fresh or not results_file.exists() else json.loads(results_file.read_text())["results"]
    done = {case_key(r) for r in rows if "error" not in r}
    rows = [r for r in rows if "error" not in r]
    for case in plan_cases(args):
        if case_key(case) in done:
            continue
        if case["path"] != "model":
            case["clip"] = str(clip_path(Path(args.clips), case["resolution"], case["frames"], args.source_fps))
        print(f"... {case['path']} {case['resolution']} {case['frames']} frames", flush=True)
        rows.append(run_in_process(case))
        write_results("video", rows, device=args.device, out_dir=out_dir, overlap=overlap_ratios(rows),
                      command=" ".join(sys.argv))
    print_table(rows)
    print(plot_memory(rows, out_dir / "video_memory.png"))
    print(results_file)
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (on a CPU run the script)")
def test_bench_video(benchmark, tmp_path):
    args = parse_args(["--out", str(tmp_path), "--fresh"])
    rows = benchmark.pedantic(run_suite, args=(args,), rounds=1, iterations=1)
    assert not [r for r in rows if "error" in r]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-mini-vicuna-7b" if cuda else "small")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--backend", default="sdpa", help="the model's backend (sdpa, triton, torch, flash_attn)")
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--resolutions", nargs="+", choices=RESOLUTIONS, default=list(RESOLUTIONS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--source-fps", type=float, default=2.0, help="frames per second in the synthetic clips")
    parser.add_argument("--budget", type=int, default=256 * MiB,
                        help="Savings.frame_budget_bytes: activation bytes per chunk of frames (sizes the chunks)")
    parser.add_argument("--overlap-frames", type=int, nargs="+", default=[100],
                        help="video lengths of the overlap cases (each sample encodes the video three times)")
    parser.add_argument("--overlap-budget-s", type=float, default=600.0,
                        help="time budget of one overlap case's sampling (at least 6 pairs are taken)")
    parser.add_argument("--decode-all-limit", type=int, default=8 << 30,
                        help="skip decode_all where its frames alone would take more bytes than this")
    parser.add_argument("--clips", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "llava-mini-video-clips"))
    parser.add_argument("--out", help="results folder (default: bench/results/<device>/)")
    parser.add_argument("--fresh", action="store_true", help="ignore the results already in the folder")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    run_suite(args)


if __name__ == "__main__":
    main()
