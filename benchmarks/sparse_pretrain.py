"""Sparse vs dense pre-training from scratch on CPU (offline): recipes/smollm2-135m/sparse-pretrain.yaml
dense (--sparse_final_sparsity 0, same accounting), at 50% final sparsity with equal steps and tokens, and at
50% with equal compute (FLOPs counted with the active weights: the pruned run is cheaper per step, so it gets
the steps that bring its compute to the dense run's, and the tokens with them). Collects the runs'
sparsity.json into one result.

    python benchmarks/sparse_pretrain.py [--seeds 42,1] [--skip-train] [--out benchmarks/results/sparse_pretrain_cpu.json]
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-135m/sparse-pretrain.yaml"
OUTPUTS = {"dense": "outputs/smollm2-arch-dense-pretrain", "sparse_50": "outputs/smollm2-arch-sparse-pretrain",
           "sparse_50_equal_compute": "outputs/smollm2-arch-sparse-pretrain-equal-compute",
           # the control (--control): dense for the dense run's steps, but on the equal-compute run's samples, so it
           # sees the same batches in the same order as that run does up to there (the sampler's order depends on
           # the dataset's length): equal compute, same data stream
           "dense_equal_compute_data": "outputs/smollm2-arch-dense-pretrain-equal-compute-data"}


def equal_compute_flags(dense: dict, steps: int | None = None) -> list[str]:
    """--max_steps (and enough training samples) for the 50% run whose compute equals the dense run's; with
    ``steps``: that many steps on the same samples (the control)."""
    from trainer_plugins_sparse.schedule import steps_for_compute

    train = yaml.safe_load((ROOT / RECIPE).read_text())["train"]
    batch = train["per_device_train_batch_size"]
    per_step = dense["flos"] / (6 * dense["tokens"])  # active parameters in matmuls: fixed + prunable
    fixed, prunable = per_step - dense["prunable_params"], dense["prunable_params"]
    equal = steps_for_compute(per_step * dense["steps"], train["sparse_schedule"], train["sparse_final_sparsity"],
                              train["sparse_start"], train["sparse_end"], train["sparse_every"], fixed, prunable)
    samples = equal * batch
    return ["--max_steps", str(steps or equal), "--max_train_samples", str(samples)]


def run_all(seed: int, train: bool, control: bool) -> dict:
    """The runs with one seed (the model's initialisation, which files are trained on and held out)."""
    runs = {}
    for name, output in OUTPUTS.items():
        output = output if seed == 42 else f"{output}-seed{seed}"
        if name == "dense_equal_compute_data" and not (control or (ROOT / output / "sparsity.json").exists()):
            continue
        dense = name.startswith("dense")
        extra = (["--sparse_final_sparsity", "0"] if dense else []) + ["--output_dir", output]
        if seed != 42:
            extra += ["--seed", str(seed)]
        if "equal_compute" in name:
            extra += equal_compute_flags(runs["dense"], steps=runs["dense"]["steps"] if dense else None)
        if train and (control or name != "dense_equal_compute_data"):
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", RECIPE, *extra], cwd=ROOT, check=True)
        record = json.loads((ROOT / output / "sparsity.json").read_text())
        record.pop("per_weight_sparsity")
        runs[name] = {"command": " ".join(["trainer-plugins", "train", RECIPE, *extra]), **record}
    return runs


def summary(runs: dict) -> dict:
    dense = runs["dense"]
    result = {name: {"eval_loss": run["eval_loss"], "eval_loss_vs_dense": run["eval_loss"] / dense["eval_loss"],
                     "steps": run["steps"], "tokens": run["tokens"], "flos_vs_dense": run["flos"] / dense["flos"],
                     "final_active_params_vs_dense": run["active_params"] / dense["active_params"],
                     "avg_params_vs_dense": run["avg_params"] / dense["avg_params"]}
              for name, run in runs.items()}
    if "dense_equal_compute_data" in runs:  # equal compute and the same batches in the same order
        result["sparse_50_equal_compute"]["eval_loss_vs_dense_same_data"] = (
            runs["sparse_50_equal_compute"]["eval_loss"] / runs["dense_equal_compute_data"]["eval_loss"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-train", action="store_true", help="only collect the outputs of earlier runs")
    parser.add_argument("--seeds", default="42", help="comma-separated; 42 is the recipe's")
    parser.add_argument("--control", action="store_true", help="also the dense run with the equal-compute "
                        "run's steps and data (collected whenever its output exists)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_pretrain_cpu.json"))
    ns = parser.parse_args()
    seeds = [int(s) for s in ns.seeds.split(",")]
    result = {"recipe": RECIPE, "device": f"CPU ({platform.processor() or platform.machine()})",
              "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python benchmarks/sparse_pretrain.py", *sys.argv[1:]]), "seeds": {}}
    for seed in seeds:
        runs = run_all(seed, train=not ns.skip_train, control=ns.control)
        result["seeds"][str(seed)] = {"runs": runs, "summary": summary(runs)}
    result["mean_over_seeds"] = {
        name: {key: sum(result["seeds"][str(seed)]["summary"][name][key] for seed in seeds) / len(seeds)
               for key in ("eval_loss", "eval_loss_vs_dense", "flos_vs_dense", "avg_params_vs_dense")}
        for name in OUTPUTS if all(name in result["seeds"][str(seed)]["runs"] for seed in seeds)}
    print(json.dumps({"per_seed": {seed: r["summary"] for seed, r in result["seeds"].items()},
                      "mean": result["mean_over_seeds"]}, indent=2))
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
