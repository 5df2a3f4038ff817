"""LST quality on CPU (offline): SmolLM2-135M-Instruct, Python stdlib, equal steps and data for every run.

Eval loss / perplexity on held-out stdlib modules of
  - the untouched model (every LST run's eval before training: merge=add starts as the backbone)
  - LoRA r8 on all projections (peft, through loram with nothing pruned: the same code as plain LoRA)
  - LST r8, side layers pruned from the backbone (recipes/smollm2-135m/lst.yaml)
and the ablations: random side init (QST), r = 16, merge=none (the paper's output: the side network
alone), whole heads (lst_head_size full: SmolLM2's 9 heads of 64 become 1 head of 64 instead of 9 of 8,
at the recipe's rate and at 2e-2), and the learning rate of both methods (LST: 2e-3, the recipe's, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1; LoRA: 5e-4, the
recipe's, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2), so each is also compared at its best rate; and both at their best rates
with two more seeds (other training and held-out files); layer dropping (side blocks on every 2nd or 3rd layer,
lst_layers every:K) at LST's best rate, every 2nd also with the two other seeds.
Trainable parameter counts come from each run's memory report.

    python benchmarks/lst_quality.py [--steps N] [--skip-train] [--out benchmarks/results/lst_quality_cpu.json]
"""

import json
import math
from pathlib import Path

from recipe_runs import parse_arguments, run_recipes

LST = "recipes/smollm2-135m/lst.yaml"
LORA = "recipes/smollm2-135m/loram.yaml"
LORA_R8 = [LORA, "--loram_ratio", "0", "--loram_importance", "magnitude", "--loram_merge", "false"]  # nothing pruned
RUNS = {
    "lora_r8": [*LORA_R8, "--output_dir", "outputs/smollm2-135m-lora-r8"],
    "lst_r8_pruned": [LST, "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lst"],
    "lst_r8_random": [LST, "--lst_init", "random", "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lst-random"],
    "lst_r16_pruned": [LST, "--lst_reduction_factor", "16", "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lst-r16"],
    "lst_r8_pruned_merge_none": [LST, "--lst_merge", "none", "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lst-none"],
    # the recipe's 2e-3 against larger side-network learning rates (the paper tuned around 3e-3 on T5)
    "lst_r8_pruned_lr5e-3": [LST, "--learning_rate", "5e-3", "--output_dir", "outputs/smollm2-135m-lst-lr5e-3"],
    "lst_r8_pruned_lr1e-2": [LST, "--learning_rate", "1e-2", "--output_dir", "outputs/smollm2-135m-lst-lr1e-2"],
    "lst_r8_pruned_lr2e-2": [LST, "--learning_rate", "2e-2", "--output_dir", "outputs/smollm2-135m-lst-lr2e-2"],
    # 2e-2 was still improving: where does it stop?
    "lst_r8_pruned_lr5e-2": [LST, "--learning_rate", "5e-2", "--output_dir", "outputs/smollm2-135m-lst-lr5e-2"],
    "lst_r8_pruned_lr1e-1": [LST, "--learning_rate", "1e-1", "--output_dir", "outputs/smollm2-135m-lst-lr1e-1"],
    "lst_r8_full_heads": [LST, "--lst_head_size", "full", "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lst-full-heads"],
    "lst_r8_full_heads_lr2e-2": [LST, "--lst_head_size", "full", "--learning_rate", "2e-2", "--output_dir",
                                 "outputs/smollm2-135m-lst-full-heads-lr2e-2"],
    "lora_r8_lr1e-3": [*LORA_R8, "--learning_rate", "1e-3", "--output_dir", "outputs/smollm2-135m-lora-r8-lr1e-3"],
    "lora_r8_lr2e-3": [*LORA_R8, "--learning_rate", "2e-3", "--output_dir", "outputs/smollm2-135m-lora-r8-lr2e-3"],
    # the recipe as shipped (60 steps) at its old rate and at the sweep's best: what the recipe's rate should be
    "lst_recipe_60_steps_lr2e-3": [LST, "--max_steps", "60", "--learning_rate", "2e-3", "--output_dir",
                                   "outputs/smollm2-135m-lst-60-lr2e-3"],
    "lst_recipe_60_steps_lr2e-2": [LST, "--max_steps", "60", "--learning_rate", "2e-2", "--output_dir",
                                   "outputs/smollm2-135m-lst-60-lr2e-2"],
    "lora_r8_lr5e-3": [*LORA_R8, "--learning_rate", "5e-3", "--output_dir", "outputs/smollm2-135m-lora-r8-lr5e-3"],
    # LoRA was still improving at 5e-3: bracket its optimum as LST's is
    "lora_r8_lr1e-2": [*LORA_R8, "--learning_rate", "1e-2", "--output_dir", "outputs/smollm2-135m-lora-r8-lr1e-2"],
    "lora_r8_lr2e-2": [*LORA_R8, "--learning_rate", "2e-2", "--output_dir", "outputs/smollm2-135m-lora-r8-lr2e-2"],
}
# each at its best rate with other seeds (which draw other training and held-out files, and their order): is
# the gap at seed 42 a property of the methods or of one draw?
SEEDS = (1, 2)
# layer dropping (the paper's T5-large side network sits on every 2nd layer): side blocks and ladders on every
# 2nd / 3rd backbone layer (lst_layers every:K, the last layer always among them), at the best rate
for k in (2, 3):
    RUNS[f"lst_r8_pruned_lr2e-2_every{k}"] = [LST, "--learning_rate", "2e-2", "--lst_layers", f"every:{k}",
                                             "--output_dir", f"outputs/smollm2-135m-lst-lr2e-2-every{k}"]
for seed in SEEDS:
    RUNS[f"lst_r8_pruned_lr2e-2_seed{seed}"] = [LST, "--learning_rate", "2e-2", "--seed", str(seed), "--output_dir",
                                                f"outputs/smollm2-135m-lst-lr2e-2-seed{seed}"]
    RUNS[f"lst_r8_pruned_lr2e-2_every2_seed{seed}"] = [LST, "--learning_rate", "2e-2", "--lst_layers", "every:2",
                                                       "--seed", str(seed), "--output_dir",
                                                       f"outputs/smollm2-135m-lst-lr2e-2-every2-seed{seed}"]
    RUNS[f"lora_r8_lr5e-3_seed{seed}"] = [*LORA_R8, "--learning_rate", "5e-3", "--seed", str(seed), "--output_dir",
                                          f"outputs/smollm2-135m-lora-r8-lr5e-3-seed{seed}"]
LEARNING_RATES = {"2e-3": "lst_r8_pruned", "5e-3": "lst_r8_pruned_lr5e-3", "1e-2": "lst_r8_pruned_lr1e-2",
                  "2e-2": "lst_r8_pruned_lr2e-2", "5e-2": "lst_r8_pruned_lr5e-2", "1e-1": "lst_r8_pruned_lr1e-1"}
LORA_LEARNING_RATES = {"5e-4": "lora_r8", "1e-3": "lora_r8_lr1e-3", "2e-3": "lora_r8_lr2e-3", "5e-3": "lora_r8_lr5e-3",
                       "1e-2": "lora_r8_lr1e-2", "2e-2": "lora_r8_lr2e-2"}


def point(loss):
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}


def main():
    ns = parse_arguments(__doc__.splitlines()[0], "lst_quality_cpu.json")
    result = run_recipes(RUNS, ns.steps, ns.skip_train, ns.only, previous=ns.out)
    runs = result["runs"]
    table = {"untouched": point(runs["lst_r8_pruned"]["before"]["eval_loss"])}
    for name, run in runs.items():
        table[name] = {**point(run["after"]["eval_loss"]), "trainable": run["trainable_parameters"],
                       "train_seconds": run["train"]["seconds"]}
    result["table"] = table
    lora, lst = table["lora_r8"]["eval_loss"], table["lst_r8_pruned"]["eval_loss"]
    result["summary"] = {
        "lst_vs_lora_eval_loss": round(lst / lora, 4),
        "lst_improves_on_untouched": lst < table["untouched"]["eval_loss"],
        "pruned_init_beats_random": lst < table["lst_r8_random"]["eval_loss"],
        "full_heads_vs_reduced_eval_loss": round(table["lst_r8_full_heads"]["eval_loss"] / lst, 4),
        "full_heads_vs_reduced_at_2e-2": round(table["lst_r8_full_heads_lr2e-2"]["eval_loss"]
                                               / table["lst_r8_pruned_lr2e-2"]["eval_loss"], 4),
    }
    best = min(LEARNING_RATES, key=lambda lr: table[LEARNING_RATES[lr]]["eval_loss"])
    best_lora = min(LORA_LEARNING_RATES, key=lambda lr: table[LORA_LEARNING_RATES[lr]]["eval_loss"])
    best_loss, best_lora_loss = table[LEARNING_RATES[best]]["eval_loss"], table[LORA_LEARNING_RATES[best_lora]]["eval_loss"]
    result["summary"].update({
        "best_lst_learning_rate": best, "best_lora_learning_rate": best_lora,
        "best_lst_vs_lora_eval_loss": round(best_loss / lora, 4),  # LoRA at its recipe's rate
        "best_lst_vs_best_lora_eval_loss": round(best_loss / best_lora_loss, 4),
        "lora_best_rate_is_the_largest_tried": best_lora == list(LORA_LEARNING_RATES)[-1],
        # the recipe as shipped, 60 steps: its rate before (2e-3) and now (2e-2)
        "recipe_60_steps_eval_loss": {"2e-3": table["lst_recipe_60_steps_lr2e-3"]["eval_loss"],
                                      "2e-2": table["lst_recipe_60_steps_lr2e-2"]["eval_loss"]},
    })
    pairs = {42: ("lst_r8_pruned_lr2e-2", "lora_r8_lr5e-3")}
    pairs.update({seed: (f"lst_r8_pruned_lr2e-2_seed{seed}", f"lora_r8_lr5e-3_seed{seed}") for seed in SEEDS})
    ratios = {seed: round(table[lst]["eval_loss"] / table[lora]["eval_loss"], 4) for seed, (lst, lora) in pairs.items()}
    result["summary"]["lst_2e-2_vs_lora_5e-3_per_seed"] = ratios
    result["summary"]["lst_2e-2_vs_lora_5e-3_mean_over_seeds"] = round(sum(ratios.values()) / len(ratios), 4)
    # layer dropping against side blocks on every layer, same rate and draws
    dropping = {f"every{k}": round(table[f"lst_r8_pruned_lr2e-2_every{k}"]["eval_loss"]
                                   / table["lst_r8_pruned_lr2e-2"]["eval_loss"], 4) for k in (2, 3)}
    dropping.update({f"every2_seed{seed}": round(table[f"lst_r8_pruned_lr2e-2_every2_seed{seed}"]["eval_loss"]
                                                 / table[f"lst_r8_pruned_lr2e-2_seed{seed}"]["eval_loss"], 4)
                     for seed in SEEDS})
    result["summary"]["layer_dropping_vs_all_layers_eval_loss"] = dropping
    print(json.dumps({"table": table, "summary": result["summary"]}, indent=2))
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
