"""YAML recipes: model, data and training arguments (plugin flags included) as data.

A recipe is a mapping with optional sections ``model``, ``data``, ``train`` and ``run`` (keys may also
sit at the top level); ``description`` is free text. Every key must be known: a typo is an error that
suggests the closest key. Command-line overrides (``--key value``) replace any key.

``load_recipe`` parses and validates everything that can be checked without weights (it loads the
model's config, not the model); ``run_recipe`` loads, evaluates, trains, evaluates again and saves.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .arguments import check_dataclass
from .errors import ConfigError

logger = logging.getLogger("trainer_plugins")
SECTIONS = ("model", "data", "train", "run")
METADATA_KEYS = ("description",)


@dataclass
class RunArguments:
    """What the recipe runner does around ``trainer.train()``."""

    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate before training so the report shows before/after."}
    )
    sample_prompt: Optional[str] = field(
        default=None, metadata={"help": "A user message to answer (chat template) before and after training."}
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Greedy tokens generated for sample_prompt."})
    save_final_model: bool = field(default=True, metadata={"help": "Save the trained model to output_dir at the end."})


@dataclass
class Recipe:
    model_args: Any
    data_args: Any
    args: Any  # PluginTrainingArguments
    run_args: RunArguments
    source: str = "<dict>"
    given: tuple[str, ...] = ()  # the keys the recipe and its overrides set
    model_config: Any = None


def parser(host=None):
    """The parser of every recipe key: model, data, training (with the plugins of ``host``) and run."""
    from .arguments import PluginArgumentParser, arguments_class
    from .data import DataArguments
    from .models import ModelArguments

    return PluginArgumentParser((ModelArguments, DataArguments, arguments_class(host), RunArguments))


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's booleans: only true/false (any case). PyYAML's 1.1 default also reads
    yes/no/on/off as booleans, so `eval_strategy: no` or `--save_strategy no` reached TrainingArguments as
    False ("False is not a valid IntervalStrategy"). Boolean flags still accept yes/no/on/off: check_value
    converts those strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe file as one flat dict of keys (sections merged). Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    flat = flatten(data, source=str(path))
    _resolve_relative_paths(flat, path.parent)
    return flat


def flatten(data: Any, source: str = "<dict>") -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source} must be a mapping of keys, got {type(data).__name__}")
    flat: dict = {}
    for key, value in data.items():
        if key in METADATA_KEYS:
            continue
        items = {key: value}
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"recipe {source}: section '{key}' must be a mapping, got {type(value).__name__}")
            items = value
        for k, v in items.items():
            if not isinstance(k, str):
                raise ConfigError(f"recipe {source}: keys must be strings, got {k!r}")
            if k in flat:
                raise ConfigError(f"recipe {source}: key '{k}' is given twice")
            flat[k] = v
    return flat


def _resolve_relative_paths(flat: dict, recipe_dir: Path) -> None:
    # A DeepSpeed config path is found from the working directory first, then next to the recipe.
    ds = flat.get("deepspeed")
    if isinstance(ds, str) and not os.path.isabs(ds) and not os.path.exists(ds) and (recipe_dir / ds).exists():
        flat["deepspeed"] = str(recipe_dir / ds)


def mixed_precision_of(flat: dict) -> str:
    """"bf16", "fp16" or "no": the autocast a flat recipe asks for (read before a CPU run switches the flags off)."""
    return next((k for k in ("bf16", "fp16") if str(flat.get(k, "")).lower() in ("true", "1", "yes")), "no")


def parse_overrides(argv: list[str]) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` -> dict; values are read as YAML scalars."""
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"expected --key value, got {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        try:
            out[key.replace("-", "_")] = _load_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            out[key.replace("-", "_")] = value
        i += 1
    return out


# TrainingArguments keys transformers renamed, (old, new): a recipe may use either name, and the one the installed
# transformers lacks is translated (5.17, the oldest supported, has only gradient_checkpointing; later releases
# keep it as a deprecated alias of activation_checkpointing).
RENAMED_TRAINING_KEYS = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def translate_renamed_keys(flat: dict, valid: list[str]) -> dict:
    for pair in RENAMED_TRAINING_KEYS:
        for given, known in (pair, pair[::-1]):
            if given in flat and given not in valid and known in valid:
                if known in flat:
                    raise ConfigError(f"{given!r} and {known!r} are the same setting: give one")
                flat[known] = flat.pop(given)
    return flat


def load_recipe(path_or_dict: str | os.PathLike | dict, overrides: list[str] | dict | None = None,
                load_config: bool = True, host=None) -> Recipe:
    """Parse and validate a recipe; nothing heavier than the model's config is loaded."""
    if isinstance(path_or_dict, dict):
        source, flat = "<dict>", flatten(path_or_dict)
    else:
        source, flat = str(path_or_dict), read_recipe(path_or_dict)
    if overrides:
        flat.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if isinstance(flat.get("model_config_overrides"), dict):  # a YAML mapping; the field is JSON text
        flat["model_config_overrides"] = json.dumps(flat["model_config_overrides"])
    p = parser(host)
    translate_renamed_keys(flat, p.valid_keys())
    p.check_keys(flat)
    try:
        model_args, data_args, args, run_args = p.parse_dict(flat)
        for plain in (model_args, data_args, run_args):
            check_dataclass(plain)
        # a YAML mapping: the Trainer hands accelerate the object
        if isinstance(getattr(args, "parallelism_config", None), dict):
            from accelerate import ParallelismConfig

            args.parallelism_config = ParallelismConfig(**args.parallelism_config)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"recipe {source}: {exc}") from exc
    recipe = Recipe(model_args, data_args, args, run_args, source=source, given=tuple(flat))
    validate_recipe(recipe, load_config=load_config)
    return recipe


def validate_recipe(recipe: Recipe, load_config: bool = True) -> None:
    from .data import validate_data_args
    from .models import load_model_config, num_labels_of, validate_model_args
    from .trainer import validate_run

    validate_model_args(recipe.model_args)
    validate_data_args(recipe.data_args, num_labels_of(recipe.model_args))
    if load_config:
        recipe.model_config = load_model_config(recipe.model_args)
    validate_run(recipe.args._host, recipe.args, recipe.model_args, recipe.model_config)


def resolved_config(recipe: Recipe) -> dict:
    """The keys the recipe and the overrides set, by section, with their parsed values (for --dry-run and
    results.json). Everything else is at its default."""
    out = {}
    for name, obj in zip(SECTIONS, (recipe.model_args, recipe.data_args, recipe.args, recipe.run_args)):
        names = {f.name for f in fields(obj) if f.init}
        out[name] = {k: _plain(getattr(obj, k)) for k in recipe.given if k in names}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value if isinstance(value, (int, float, str, bool, list, dict, type(None))) else str(value)


def run_recipe(recipe: Recipe) -> dict:
    """Load, (evaluate,) train, evaluate, save. Returns the results also written to results.json."""
    from transformers import set_seed

    from .data import build_datasets, data_collator
    from .manager import BUILTIN
    from .models import load_tokenizer, num_labels_of
    from .trainer import PluginTrainer, deepspeed_stage

    args = recipe.args
    host = args._host
    set_seed(args.seed)
    tokenizer = load_tokenizer(recipe.model_args)
    model = host.call_first("load_model", args, model_args=recipe.model_args)
    num_labels = num_labels_of(recipe.model_args)
    if num_labels and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token by it
    train_ds, eval_ds = build_datasets(recipe.data_args, tokenizer, seed=args.data_seed or args.seed,
                                       num_labels=num_labels)
    trainer = PluginTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data_collator(tokenizer, classification=bool(num_labels)), processing_class=tokenizer,
        compute_metrics=_accuracy if num_labels else None,
    )
    results: dict = {"recipe": recipe.source, "config": resolved_config(recipe),
                     "plugins": [n for n in host.enabled(args) if n != BUILTIN]}
    # Under ZeRO-3 no process holds whole weights outside the engine, so generate() cannot run.
    sampling = recipe.run_args.sample_prompt and deepspeed_stage(args) != 3 and not num_labels
    if eval_ds is not None and recipe.run_args.eval_before_training:
        # Inside train(), after DeepSpeed has wrapped the model: evaluate() before train() only works
        # with ZeRO-3 (transformers' "ZeRO inference"), eval_on_start works with every stage.
        args.eval_on_start = True
    if sampling:
        results["sample_before"] = sample(trainer.model, tokenizer, recipe.run_args)
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results["train"] = {"seconds": round(time.perf_counter() - start, 1), "steps": train_out.global_step,
                        "train_loss": train_out.training_loss}
    if args.eval_on_start:
        first = next(h for h in trainer.state.log_history if "eval_loss" in h)
        results["before"] = _metrics(first)
    if eval_ds is not None:
        results["after"] = _metrics(trainer.evaluate())
    if sampling:
        results["sample_after"] = sample(trainer.model, tokenizer, recipe.run_args)
    if recipe.run_args.save_final_model:
        trainer.save_model()
    results["memory"] = next((h["memory_report"] for h in trainer.state.log_history if "memory_report" in h), None)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(format_results(results), flush=True)
    return results


def _metrics(logged: dict) -> dict:
    """eval_loss and perplexity (causal LM) or accuracy (classification) from the Trainer's eval metrics."""
    loss = logged["eval_loss"]
    if "eval_accuracy" in logged:
        return {"eval_loss": loss, "accuracy": logged["eval_accuracy"]}
    return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 50 else float("inf")}


def _accuracy(prediction) -> dict:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def sample(model, tokenizer, run_args: RunArguments) -> str:
    import torch

    messages = [{"role": "user", "content": run_args.sample_prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(run_args.sample_prompt, return_tensors="pt")["input_ids"]
    model = getattr(model, "module", model)  # DDP wrapper
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(ids.to(model.device), max_new_tokens=run_args.sample_max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def format_results(results: dict) -> str:
    lines = ["", "=" * 72, f"recipe {results['recipe']}  plugins: {', '.join(results['plugins']) or 'none'}"]
    before, after = results.get("before"), results.get("after")
    if after:
        second = "accuracy" if "accuracy" in after else "perplexity"
        if before:
            lines.append(f"eval loss   {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
            lines.append(f"{second:<11} {before[second]:.3f} -> {after[second]:.3f}")
        else:
            lines.append(f"eval loss {after['eval_loss']:.4f}  {second} {after[second]:.3f}")
    t = results["train"]
    lines.append(f"trained {t['steps']} steps in {t['seconds']} s (mean train loss {t['train_loss']:.4f})")
    if "sample_before" in results:
        lines += ["sample before: " + results["sample_before"][:300], "sample after:  " + results["sample_after"][:300]]
    if results.get("memory"):
        from .memory import format_report

        lines.append(format_report(results["memory"]))
    lines.append("=" * 72)
    return "\n".join(lines)
