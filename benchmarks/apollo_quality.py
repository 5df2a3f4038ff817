"""APOLLO quality on CPU (offline), equal steps and data, each run against AdamW:

  finetune  SmolLM2-135M-Instruct on Python stdlib source (recipes/quickstart.yaml: AdamW, and the same recipe
            with --apollo mini), same learning rate (1e-4)
  pretrain  a 4-layer model with SmolLM2's architecture from random weights on stdlib text
            (recipes/smollm2-135m/sparse-pretrain.yaml with sparsity off): AdamW, APOLLO rank 64 (1/4 of the
            width, the paper's pre-training ratio), APOLLO-Mini

Issue 3's bar: Mini's fine-tune eval loss within 2% of AdamW's (or better); APOLLO's pre-training loss <= AdamW's.

    python benchmarks/apollo_quality.py [--finetune-steps N] [--skip-train] [--out benchmarks/results/apollo_quality_cpu.json]

With --finetune-lrs the fine-tunes alone run at each learning rate, for both optimizers, and the summary
compares each at its best rate (AdamW's recipe rate need not be APOLLO-Mini's):

    python benchmarks/apollo_quality.py --finetune-steps 30 --finetune-lrs 1e-4,2e-4,3e-4,5e-4,1e-3 \
        --out benchmarks/results/apollo_finetune_lr_sweep_cpu.json
    python benchmarks/apollo_quality.py --finetune-lrs 3e-4,5e-4,8e-4 \
        --out benchmarks/results/apollo_finetune_60_steps_cpu.json      # the recipe's 60 steps

--mini-variants adds APOLLO-Mini runs with its own hyperparameters changed (';'-separated flag sets), at each
rate; --reuse takes a run whose output directory already holds results.json instead of training it again:

    python benchmarks/apollo_quality.py --finetune-lrs 3e-4 --reuse --mini-variants \
        "--apollo_scale 256;--apollo_scale 512;--apollo_scale 1024;--apollo_scale 2048;--apollo_scale_front" \
        --out benchmarks/results/apollo_finetune_mini_variants_cpu.json

--seeds repeats every run with other seeds, which draw other training and held-out files and another order (the
recipe's seed, 42, keeps its earlier output folders), and compares each Mini run with AdamW at the same rate and seed, and their mean over seeds:

    python benchmarks/apollo_quality.py --finetune-lrs 3e-4 --reuse --variants-only --seeds 42,1,2 \
        --mini-variants "--apollo_scale 512" --out benchmarks/results/apollo_finetune_seeds_cpu.json
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = "recipes/quickstart.yaml"
PRETRAIN = "recipes/smollm2-135m/sparse-pretrain.yaml"


def runs(finetune_steps):
    steps = ["--max_steps", str(finetune_steps)] if finetune_steps else []
    return {
        # one rate for both (the quickstart's rate when this ran; the sweeps compare each at its best rate)
        "finetune/adamw": [FINETUNE, "--learning_rate", "1e-4", "--output_dir", "outputs/apollo-quality-ft-adamw",
                           *steps],
        "finetune/apollo-mini": [FINETUNE, "--apollo", "mini", "--learning_rate", "1e-4", "--output_dir",
                                 "outputs/apollo-quality-ft-mini", *steps],
        "pretrain/adamw": [PRETRAIN, "--sparse", "off", "--output_dir", "outputs/apollo-quality-pt-adamw"],
        "pretrain/apollo-r64": [PRETRAIN, "--sparse", "off", "--apollo", "apollo", "--apollo_rank", "64",
                                "--output_dir", "outputs/apollo-quality-pt-apollo"],
        "pretrain/apollo-mini": [PRETRAIN, "--sparse", "off", "--apollo", "mini",
                                 "--output_dir", "outputs/apollo-quality-pt-mini"],
    }


RECIPE_SEED = 42  # recipes/quickstart.yaml's


def sweep(finetune_steps, lrs, mini_variants=(), seeds=(RECIPE_SEED,), default_mini=True):
    steps = ["--max_steps", str(finetune_steps)] if finetune_steps else []
    tag = f"{finetune_steps}steps" if finetune_steps else "recipe"
    out = {}
    for seed in seeds:
        # the recipe's seed keeps the names (and output folders) of the runs made before --seeds existed
        name_tail, dir_tail = ("", "") if seed == RECIPE_SEED else (f"#seed{seed}", f"-seed{seed}")
        seed_flags = [] if seed == RECIPE_SEED else ["--seed", str(seed)]
        for lr in lrs:
            out[f"finetune/adamw@{lr:g}{name_tail}"] = [
                FINETUNE, "--learning_rate", str(lr), *seed_flags, "--output_dir",
                f"outputs/apollo-sweep-{tag}-adamw-{lr:g}{dir_tail}", *steps]
            for variant in ([""] if default_mini else []) + list(mini_variants):  # "": Mini's defaults
                flags = variant.split()
                label = f"apollo-mini[{variant}]" if variant else "apollo-mini"
                slug = "".join(f.removeprefix("--apollo_").replace("_", "-") for f in flags)
                folder = f"mini-{slug}" if slug else "mini"
                out[f"finetune/{label}@{lr:g}{name_tail}"] = [
                    FINETUNE, "--apollo", "mini", *flags, "--learning_rate", str(lr), *seed_flags, "--output_dir",
                    f"outputs/apollo-sweep-{tag}-{folder}-{lr:g}{dir_tail}", *steps]
    return out


def seed_summary(loss: dict, seeds) -> dict:
    """Each Mini run against AdamW at the same rate and seed (the seed draws the training and the held-out files
    and their order), and per setting over the seeds: the mean of those ratios, how many are within issue 3's
    2% (or better), and the mean eval loss of every setting, AdamW's included."""
    per_run = {}
    for name, value in loss.items():
        if name.startswith("finetune/apollo-mini"):
            adamw = "finetune/adamw@" + name.split("@", 1)[1]
            per_run[name] = round(value / loss[adamw], 4)
    ratios, losses = {}, {}
    for name, ratio in per_run.items():
        ratios.setdefault(name.split("#")[0], []).append(ratio)
    for name, value in loss.items():
        losses.setdefault(name.split("#")[0], []).append(value)
    return {"seeds": list(seeds), "mini_vs_adamw_same_seed": per_run,
            "ratio_over_seeds": {k: {"mean": round(statistics.mean(v), 4), "min": min(v), "max": max(v),
                                     "within_2_percent": f"{sum(r <= 1.02 for r in v)} of {len(v)}"}
                                 for k, v in ratios.items()},
            "eval_loss_over_seeds": {k: {"mean": round(statistics.mean(v), 4),
                                         "stdev": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0}
                                     for k, v in losses.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-steps", type=int, help="max_steps of the fine-tunes (default: the recipe's 60)")
    parser.add_argument("--skip-train", action="store_true", help="only collect the outputs of earlier runs")
    parser.add_argument("--finetune-lrs", help="comma-separated learning rates: only the fine-tunes, at each rate")
    parser.add_argument("--mini-variants", default="",
                        help="';'-separated APOLLO-Mini flag sets run at each --finetune-lrs rate, e.g. '--apollo_scale 256'")
    parser.add_argument("--reuse", action="store_true", help="don't train runs whose output_dir has results.json")
    parser.add_argument("--seeds", default=str(RECIPE_SEED),
                        help="comma-separated seeds (which files train and evaluate, and their order): every run at each; "
                             "the summary compares same-seed pairs")
    parser.add_argument("--variants-only", action="store_true",
                        help="with --mini-variants: skip APOLLO-Mini at its default settings")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "apollo_quality_cpu.json"))
    ns = parser.parse_args()
    result = {"device": f"CPU ({platform.processor() or platform.machine()})", "date": time.strftime("%Y-%m-%d"),
              "runs": {}}
    lrs = [float(x) for x in ns.finetune_lrs.split(",")] if ns.finetune_lrs else None
    variants = [v.strip() for v in ns.mini_variants.split(";") if v.strip()]
    if variants and not lrs:
        parser.error("--mini-variants needs --finetune-lrs")
    seeds = [int(x) for x in ns.seeds.split(",")]
    if seeds != [RECIPE_SEED] and not lrs:
        parser.error("--seeds needs --finetune-lrs")
    if ns.variants_only and len(seeds) < 2:
        parser.error("--variants-only needs several --seeds (a one-seed sweep compares Mini's default settings too)")
    plan = sweep(ns.finetune_steps, lrs, variants, seeds, default_mini=not ns.variants_only) if lrs else runs(
        ns.finetune_steps)
    for name, argv in plan.items():
        results = ROOT / argv[argv.index("--output_dir") + 1] / "results.json"
        if not ns.skip_train and not (ns.reuse and results.exists()):
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", *argv], cwd=ROOT, check=True)
        out = json.loads(results.read_text())
        result["runs"][name] = {"command": "trainer-plugins train " + " ".join(argv), "before": out.get("before"),
                                "after": out["after"], "train": out["train"],
                                "optimizer_state_bytes": (out.get("memory") or {}).get("optimizer_state_bytes")}
    loss = {name: r["after"]["eval_loss"] for name, r in result["runs"].items()}
    if lrs and len(seeds) > 1:
        result["summary"] = seed_summary(loss, seeds)
    elif lrs:
        best = {opt: min((loss[f"finetune/{opt}@{lr:g}"], lr) for lr in lrs) for opt in ("adamw", "apollo-mini")}
        result["summary"] = {"best": {opt: {"eval_loss": v, "learning_rate": lr} for opt, (v, lr) in best.items()},
                             "mini_best_vs_adamw_best": best["apollo-mini"][0] / best["adamw"][0], "eval_loss": loss}
        if variants:  # Mini with any of its settings, at its best, against AdamW at its best
            mini = min((v, name) for name, v in loss.items() if name.startswith("finetune/apollo-mini"))
            result["summary"]["mini_any_best"] = {"run": mini[1], "eval_loss": mini[0],
                                                  "vs_adamw_best": mini[0] / best["adamw"][0]}
    else:
        result["summary"] = {
            "finetune_mini_vs_adamw": loss["finetune/apollo-mini"] / loss["finetune/adamw"],
            "pretrain_apollo_vs_adamw": loss["pretrain/apollo-r64"] / loss["pretrain/adamw"],
            "pretrain_mini_vs_adamw": loss["pretrain/apollo-mini"] / loss["pretrain/adamw"],
            "eval_loss": loss,
        }
    print(json.dumps(result["summary"], indent=2))
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
