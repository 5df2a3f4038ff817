"""Shared by the CPU quality scripts: run named `trainer-plugins train` commands (or read the outputs of
earlier runs) and collect each run's results.json."""

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_arguments(description: str, result_name: str):
    """The quality scripts' command line: --skip-train, --out (benchmarks/results/RESULT_NAME), --steps, --only."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--skip-train", action="store_true", help="only read the outputs of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / result_name))
    parser.add_argument("--steps", type=int, help="max_steps of every run (default: the recipes' 60)")
    parser.add_argument("--only", nargs="*", help="run only these (the others are read from earlier outputs)")
    return parser.parse_args()


def run_recipes(runs: dict, steps=None, skip_train=False, only=None) -> dict:
    """``runs``: name -> `trainer-plugins train` arguments (with --output_dir). Trains each (unless
    ``skip_train``, or ``only`` names others), then returns the device, date, the exact commands and
    each run's before/after/train, trainable parameters and last sample."""
    result = {"device": f"CPU ({platform.processor() or platform.machine()})", "date": time.strftime("%Y-%m-%d"),
              "commands": {}, "runs": {}}
    for name, argv in runs.items():
        argv = argv + (["--max_steps", str(steps)] if steps else [])
        result["commands"][name] = "trainer-plugins train " + " ".join(argv)
        if not skip_train and (not only or name in only):
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", *argv], cwd=ROOT, check=True)
        out = ROOT / argv[argv.index("--output_dir") + 1]
        run = json.loads((out / "results.json").read_text())
        result["runs"][name] = {
            "before": run["before"], "after": run["after"], "train": run["train"],
            "trainable_parameters": (run.get("memory") or {}).get("trainable_parameters"),
            "sample_after": run.get("sample_after"),
        }
    return result
