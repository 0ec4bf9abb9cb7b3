"""Does `llava-mini bench` survive a noisy machine? Run it quiet, then twice with a busy core.

Each run is a separate `llava-mini bench` process (CPU, its defaults: the `small` preset); during the
noisy runs a `python -c 'while True: pass'` process keeps one core busy. It prints each run's
headline ratios with their intervals, and whether the runs agree: every headline ratio within
``--tolerance`` (30%) of the quiet run's and of each other's (largest / smallest <= 1.3).

    PYTHONPATH=. python bench/noise_check.py                 # quiet + 2 noisy runs (a few minutes each)
    PYTHONPATH=. python bench/noise_check.py --noisy 3 -- --budget 2     # arguments after -- go to bench

"Quiet" means nothing else of yours is running: on a shared machine the quiet run is only as quiet as
the machine. Exit status 0 when the runs agree, 1 when they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADLINE = "time_to_first_token_speedup"


@contextlib.contextmanager
def busy_core(on: bool):
    """A process spinning on one core while the block runs (nothing when ``on`` is False)."""
    if not on:
        yield None
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield spinner
    finally:
        spinner.kill()
        spinner.wait()


def run_bench(out: Path, bench_args: list[str], noisy: bool) -> dict:
    """One `llava-mini bench` process; returns its results (report.json) and wall time."""
    cmd = [sys.executable, "-m", "llava_mini.cli", "bench", "--device", "cpu", "--out", str(out), "--no-progress",
           *bench_args]
    started = time.perf_counter()
    with busy_core(noisy):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "report.json").read_text())
    results["wall_s"] = time.perf_counter() - started
    return results


def headlines(results: dict) -> dict:
    """The summary's ratios (Estimate dicts) by name."""
    return {k: v for k, v in results["summary"].items() if isinstance(v, dict) and "median" in v}


def spread(runs: list[dict]) -> dict[str, float]:
    """Per headline ratio: the largest median over the smallest across ``runs``."""
    names = headlines(runs[0])
    return {k: max(headlines(r)[k]["median"] for r in runs) / min(headlines(r)[k]["median"] for r in runs)
            for k in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noisy", type=int, default=2, help="runs with a busy core (default 2)")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed spread, largest / smallest - 1")
    parser.add_argument("--out", help="keep each run's report under this folder (default: a temporary one)")
    parser.add_argument("bench_args", nargs="*", help="arguments for `llava-mini bench` (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        runs = []
        for i, noisy in enumerate([False] + [True] * args.noisy):
            label = "busy core" if noisy else "quiet"
            r = run_bench(root / f"run{i}", args.bench_args, noisy)
            r["label"] = label
            runs.append(r)
            h = headlines(r)[HEADLINE]
            print(f"run {i} ({label}, {r['wall_s']:.0f} s): {HEADLINE} {h['median']:.3g}x "
                  f"[{h['low']:.3g}, {h['high']:.3g}] (n={h['n']}, stopped by {h['stopped_by']})"
                  f"{'  [report: noisy run]' if r.get('noisy') else ''}", flush=True)
    spreads = spread(runs)
    print(f"\n{'ratio':<40}" + "".join(f"{r['label']:>24}" for r in runs) + f"{'largest/smallest':>18}")
    for name, s in spreads.items():
        cells = "".join(f"{headlines(r)[name]['median']:>23.3g}x" for r in runs)
        print(f"{name:<40}{cells}{s:>17.2f}{'' if s <= 1 + args.tolerance else '  <- disagree'}")
    ok = spreads[HEADLINE] <= 1 + args.tolerance
    print(f"\n{HEADLINE}: the {len(runs)} runs {'agree' if ok else 'DO NOT agree'} within "
          f"{args.tolerance:.0%} (largest / smallest = {spreads[HEADLINE]:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
