"""A scaling fit from real runs, on CPU (offline): recipes/smollm2-135m/sparse-pretrain.yaml at three widths and
three lengths, dense, plus 50%-sparse runs at each width, then `trainer-plugins fit-scaling`'s fit

    L(N, D) = E + A / N^alpha + B / D^beta        (N: average active parameters over training, D: tokens)

twice: on the dense runs alone, then asked to predict the sparse runs from their N (Jin et al.'s claim: with the
average parameter count one law covers both), and on all runs together. Tiny models far from convergence (a few
hundred steps): the constants describe this regime only; what carries over is whether the sparse runs fall on
the dense runs' law.

    python benchmarks/sparse_scaling.py [--skip-train] [--out benchmarks/results/sparse_scaling_cpu.json]
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
BATCH = 8  # the recipe's sequences per step
WIDTHS = {128: (2, 1), 192: (3, 1), 256: (4, 2)}  # hidden: (heads, KV heads), 64-dim heads as SmolLM2
STEPS = (120, 240, 480)


def plan() -> dict:
    runs = {}
    for hidden, (heads, kv) in WIDTHS.items():
        shape = json.dumps({"num_hidden_layers": 4, "hidden_size": hidden, "intermediate_size": 3 * hidden,
                            "num_attention_heads": heads, "num_key_value_heads": kv})
        for steps in STEPS:
            for sparsity in (0.0, 0.5) if steps == 240 else (0.0,):
                name = f"h{hidden}-{steps}steps-{'sparse50' if sparsity else 'dense'}"
                runs[name] = [RECIPE, "--model_config_overrides", shape, "--max_steps", str(steps),
                              "--max_train_samples", str(steps * BATCH), "--sparse_final_sparsity", str(sparsity),
                              "--eval_strategy", "no", "--output_dir", f"outputs/sparse-scaling-{name}"]
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-train", action="store_true", help="only fit the outputs of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_scaling_cpu.json"))
    ns = parser.parse_args()
    from trainer_plugins_sparse.scaling import fit, load_points

    runs = plan()
    dirs = {name: ROOT / argv[argv.index("--output_dir") + 1] for name, argv in runs.items()}
    for name, argv in runs.items():
        if not ns.skip_train and not (dirs[name] / "sparsity.json").exists():
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", *argv], cwd=ROOT, check=True)
    points = dict(zip(dirs, load_points([str(d) for d in dirs.values()])))
    dense_law = fit([p for k, p in points.items() if k.endswith("dense")])
    joint_law = fit(list(points.values()))

    def row(name, p):
        predicted = dense_law.predict(p.n, p.d)
        return {"run": name, "avg_params": round(p.n), "tokens": int(p.d), "eval_loss": round(p.loss, 4),
                "dense_law": round(predicted, 4), "dense_law_error": round(predicted / p.loss - 1, 4),
                "joint_law": round(joint_law.predict(p.n, p.d), 4)}

    result = {
        "recipe": RECIPE, "device": f"CPU ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/sparse_scaling.py",
        "runs": {name: "trainer-plugins train " + " ".join(argv) for name, argv in runs.items()},
        "dense_law": dense_law.as_dict(), "joint_law": joint_law.as_dict(),
        "points": [row(k, p) for k, p in points.items()],
    }
    result["sparse_runs_from_the_dense_law"] = {r["run"]: r["dense_law_error"] for r in result["points"]
                                                if r["run"].endswith("sparse50")}
    print("dense runs:", dense_law.describe())
    print("all runs:  ", joint_law.describe())
    for r in result["points"]:
        print(f"{r['run']:24s} N={r['avg_params']:>10,} D={r['tokens']:>8,} loss {r['eval_loss']:.4f}  "
              f"dense law {r['dense_law']:.4f} ({r['dense_law_error']:+.2%})  joint {r['joint_law']:.4f}")
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
