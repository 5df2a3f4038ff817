"""Sparse vs dense pre-training from scratch on CPU (offline): recipes/smollm2-135m/sparse-pretrain.yaml
at 50% final sparsity and at 0 (dense, same accounting), equal steps and tokens. Collects both runs'
sparsity.json into one result.

    python benchmarks/sparse_pretrain.py [--skip-train] [--out benchmarks/results/sparse_pretrain_cpu.json]
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-135m/sparse-pretrain.yaml"
RUNS = {
    "sparse_50": [],
    "dense": ["--sparse_final_sparsity", "0", "--output_dir", "outputs/smollm2-arch-dense-pretrain"],
}
OUTPUTS = {"sparse_50": "outputs/smollm2-arch-sparse-pretrain", "dense": "outputs/smollm2-arch-dense-pretrain"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-train", action="store_true", help="only collect the outputs of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_pretrain_cpu.json"))
    ns = parser.parse_args()
    result = {"recipe": RECIPE, "device": f"CPU ({platform.processor() or platform.machine()})",
              "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for name, extra in RUNS.items():
        command = ["trainer-plugins", "train", RECIPE, *extra]
        if not ns.skip_train:
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", RECIPE, *extra], cwd=ROOT, check=True)
        record = json.loads((ROOT / OUTPUTS[name] / "sparsity.json").read_text())
        record.pop("per_weight_sparsity")
        result["runs"][name] = {"command": " ".join(command), **record}
    sparse, dense = result["runs"]["sparse_50"], result["runs"]["dense"]
    result["summary"] = {
        "eval_loss_sparse": sparse["eval_loss"], "eval_loss_dense": dense["eval_loss"],
        "eval_loss_ratio": sparse["eval_loss"] / dense["eval_loss"],
        "final_active_params_ratio": sparse["active_params"] / dense["active_params"],
        "avg_params_ratio": sparse["avg_params"] / dense["avg_params"],
    }
    print(json.dumps(result["summary"], indent=2))
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
