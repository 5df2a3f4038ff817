"""LoRAM quality on CPU (offline): SmolLM2-135M-Instruct, Python stdlib, equal LoRA steps and data.

Eval loss / perplexity on held-out stdlib modules of
  (a) the untouched model
  (b) LoRA on the full model                          (loram with loram_ratio 0: nothing pruned, same code)
  (c) the pruned model + its LoRA                      (what was trained)
  (d) the ORIGINAL model + the recovered LoRA (LoRAM)  (what LoRAM deploys; the paper's claim: (d) beats (c))
with and without the alignment run (recipes/smollm2-135m/loram-align.yaml), and the pruned model before any
training for each importance score (the pruning ablation).

    python benchmarks/loram_quality.py [--steps N] [--skip-train] [--out benchmarks/results/loram_quality_cpu.json]
"""

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-135m/loram.yaml"
ALIGN = "recipes/smollm2-135m/loram-align.yaml"
OUT = {"lora_full": "outputs/smollm2-135m-lora-full", "loram": "outputs/smollm2-135m-loram",
       "align": "outputs/smollm2-135m-loram-aligned", "loram_aligned": "outputs/smollm2-135m-loram-on-aligned"}
RUNS = {
    "lora_full": [RECIPE, "--loram_ratio", "0", "--loram_importance", "magnitude", "--loram_merge", "false",
                  "--output_dir", OUT["lora_full"]],
    "loram": [RECIPE],
    "align": [ALIGN],
    "loram_aligned": [RECIPE, "--loram_pruned_model", OUT["align"], "--output_dir", OUT["loram_aligned"]],
}


def evaluator():
    """eval_loss(model) on exactly the recipes' eval set, as the Trainer computes it."""
    from transformers import Trainer, TrainingArguments

    from trainer_plugins.data import build_datasets, data_collator
    from trainer_plugins.models import load_tokenizer
    from trainer_plugins.recipes import load_recipe

    recipe = load_recipe(ROOT / RECIPE)
    tokenizer = load_tokenizer(recipe.model_args)
    _, eval_ds = build_datasets(recipe.data_args, tokenizer, seed=recipe.args.data_seed or recipe.args.seed)
    args = TrainingArguments(output_dir="/tmp/loram-quality-eval", per_device_eval_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True)

    def eval_loss(model):
        return Trainer(model=model, args=args, eval_dataset=eval_ds, data_collator=data_collator(tokenizer)).evaluate()[
            "eval_loss"]

    return recipe, eval_loss


def point(loss):
    return {"eval_loss": loss, "perplexity": math.exp(loss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the outputs of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loram_quality_cpu.json"))
    parser.add_argument("--steps", type=int, help="max_steps of every run (default: the recipes' 60)")
    ns = parser.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer_plugins.models import load_model, model_source
    from trainer_plugins_loram.plugin import make_plan
    from trainer_plugins.models import load_tokenizer

    result = {"device": f"CPU ({platform.processor() or platform.machine()})", "date": time.strftime("%Y-%m-%d"),
              "commands": {}, "runs": {}}
    for name, argv in RUNS.items():
        argv = argv + (["--max_steps", str(ns.steps)] if ns.steps else [])
        result["commands"][name] = "trainer-plugins train " + " ".join(argv)
        if not ns.skip_train:
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", *argv], cwd=ROOT, check=True)
        run = json.loads((ROOT / OUT[name] / "results.json").read_text())
        result["runs"][name] = {k: run.get(k) for k in ("before", "after", "train", "sample_after")}

    recipe, eval_loss = evaluator()
    original_path = model_source(recipe.model_args)
    runs = result["runs"]
    table = {
        "a_untouched": point(runs["lora_full"]["before"]["eval_loss"]),
        "b_lora_full_model": point(runs["lora_full"]["after"]["eval_loss"]),
        "pruned_no_training": point(runs["loram"]["before"]["eval_loss"]),
        "c_pruned_plus_lora": point(runs["loram"]["after"]["eval_loss"]),
        "pruned_aligned_no_lora": point(runs["loram_aligned"]["before"]["eval_loss"]),
        "c_aligned_pruned_plus_lora": point(runs["loram_aligned"]["after"]["eval_loss"]),
    }
    for key, run in (("d_original_plus_recovered_lora", "loram"), ("d_original_plus_recovered_lora_aligned", "loram_aligned")):
        original = AutoModelForCausalLM.from_pretrained(original_path, dtype=torch.float32)
        table[key] = point(eval_loss(PeftModel.from_pretrained(original, str(ROOT / OUT[run]))))
    # The pruning ablation: the pruned model before any training, per importance score.
    ablation = {}
    base = load_model(recipe.model_args)
    tokenizer = load_tokenizer(recipe.model_args)
    for importance in ("first_order", "magnitude", "random"):
        args = copy.copy(recipe.args)
        args.loram_importance = importance
        model = copy.deepcopy(base)
        make_plan(model, args, lambda: tokenizer).apply(model)
        ablation[importance] = point(eval_loss(model))
    result["table"], result["pruned_before_training_by_importance"] = table, ablation
    result["parameters"] = json.loads((ROOT / OUT["loram"] / "loram.json").read_text())["parameters"]
    result["claims"] = {"d_beats_c": table["d_original_plus_recovered_lora"]["eval_loss"] < table["c_pruned_plus_lora"]["eval_loss"],
                        "d_beats_c_aligned": table["d_original_plus_recovered_lora_aligned"]["eval_loss"]
                        < table["c_aligned_pruned_plus_lora"]["eval_loss"]}
    print(json.dumps({"table": table, "ablation": ablation, "claims": result["claims"]}, indent=2))
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
