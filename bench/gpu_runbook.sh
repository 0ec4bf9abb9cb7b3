#!/usr/bin/env bash
# Everything a GPU session runs, in steps that each fit the device tool's 10-minute command limit:
#   bash bench/gpu_runbook.sh tests      # the whole suite on CUDA (bf16 and GPU-only tests included)
#   bash bench/gpu_runbook.sh kernels    # compressor + attention kernel sweeps, forward, then forward + backward
#                                        #   against SDPA flash / the reference / nn.MultiheadAttention (time, peak
#                                        #   memory; JSON under bench/results/<gpu>/)
#   bash bench/gpu_runbook.sh overhead   # each fused op's fixed per-call cost: host enqueue vs kernel time, and the
#                                        #   Python functions / torch ops that take the host's (under a minute)
#   bash bench/gpu_runbook.sh resampler  # FusedResampler vs Qwen-VL / MiniCPM-V 2.6 resamplers at their real shapes
#   bash bench/gpu_runbook.sh stages     # pre-fusion savings, video loop vs batched
#   bash bench/gpu_runbook.sh training   # one training step (forward + backward + AdamW), triton vs torch
#                                        #   backend, Vicuna-7B shapes with 4 LLM layers, bf16, batch 8; time, peak memory
#   bash bench/gpu_runbook.sh main       # llava-mini bench: the report against the 576-token baseline
#                                        #   (both 7B models loaded at once; ~8 s per comparison, 24 s headline)
#   bash bench/gpu_runbook.sh methods    # the bench with its methods table at the real shapes (Vicuna-7B, bf16; batches 1/16, 1 frame):
#                                        #   LLaVA-1.5, FastV and VisionZip at 64/128/192 (one shared copy of
#                                        #   the weights), LLaVA-Mini; report under bench/results/<gpu>/methods/
#   bash bench/gpu_runbook.sh budget     # frames of Llama-3.1-8B context that fit a 24 GB cap, measured
#   bash bench/gpu_runbook.sh serving    # LLaVA-Mini vs LLaVA-1.5 both served by vLLM (needs vLLM installed:
#                                        #   pip install -e ".[vllm]"; the machine then needs network once)
#   bash bench/gpu_runbook.sh video      # long videos: memory and frames/s, 100 to 10,000 frames (needs PyAV;
#                                        # resumable: repeat until it prints the table)
# Every comparison is interleaved and reported as a median ratio with its 95% interval
# (llava_mini/profiling/estimate.py); a report whose self-checks fail says "noisy run" in its header.
# The GPU machine has torch/triton/transformers preinstalled and no network: run from the repository
# root with PYTHONPATH=. (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
case "${1:-}" in
  tests)   LIVE_FAILURES="${LIVE_FAILURES:-gpu_failures.txt}" PYTHONPATH=.:bench python -m pytest -q -n 8 -p live_failures \
             -m "not vllm" tests ;;  # each failure written to $LIVE_FAILURES as it happens
  kernels) python bench/test_bench_compress.py && python bench/test_bench_prefusion.py ;;
  overhead) python bench/test_bench_overhead.py ;;
  resampler) python bench/test_bench_resampler.py ;;
  stages)  python bench/test_bench_stages.py ;;
  training) python bench/test_bench_training.py ;;
  main)    python -m llava_mini.cli bench ;;
  methods) python -m llava_mini.cli bench --methods 64 128 192 --batches 1 16 --frames 1 --no-progress \
             --out "bench/results/$(python -c 'from llava_mini.profiling.results import device_slug; from llava_mini.profiling.ceilings import device_name; print(device_slug(device_name()))')/methods" ;;
  budget)  python -m llava_mini.cli plan --vram 24GB --preset llava-mini-llama-3.1-8b --measure --json \
             > "bench/results/$(python -c 'from llava_mini.profiling.results import device_slug; from llava_mini.profiling.ceilings import device_name; print(device_slug(device_name()))')/budget.json" ;;
  video)   python bench/test_bench_video.py ;;
  serving) python -m llava_mini.cli bench --engine vllm ;;
  *) echo "usage: bash bench/gpu_runbook.sh tests|kernels|overhead|resampler|stages|training|main|methods|budget|video|serving" >&2; exit 2 ;;
esac
