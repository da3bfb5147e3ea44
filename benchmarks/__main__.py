"""Run every benchmark in turn, each printing its figures and its ratio last.

    python -m benchmarks            # questions 1-6 (and 7 when a CUDA device is present)
    python -m benchmarks --quick    # tiny sizes: proves they run, times nothing

Run it on a quiet machine: the ratios are side by side, but a busy machine still blurs them.
"""

from __future__ import annotations

import importlib
import sys

import torch

SCRIPTS = ["inference_latency", "gradcam_cost", "compare_all", "app_start", "train_input", "stats_pass", "lung_cost"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    scripts = SCRIPTS + (["gpu_train"] if torch.cuda.is_available() else [])
    for name in scripts:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n=== {name}: {module.__doc__.strip().splitlines()[0]}", flush=True)
        module.main(argv)


if __name__ == "__main__":
    main()
