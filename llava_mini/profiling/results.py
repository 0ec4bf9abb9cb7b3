"""Benchmark results as JSON, tagged with where and how they were measured."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

from llava_mini.profiling.ceilings import device_name

RESULTS_DIR = Path("bench") / "results"  # relative to where the command runs (the repository root)


def git_commit() -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_tags(device: torch.device | str | None = None) -> dict:
    """GPU (or cpu) name, library versions, commit and date for a results file."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(name: str) -> str:
    """A folder name for a device: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_results(name: str, records: list[dict], device: torch.device | str | None = None,
                  out_dir: Path | str | None = None, **extra) -> Path:
    """Write ``{"env": tags, **extra, "results": records}`` to ``<out_dir>/<device>/<name>.json``."""
    tags = environment_tags(device)
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR / device_slug(tags["device"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"env": tags, **extra, "results": records}, indent=2, default=str) + "\n")
    return path
