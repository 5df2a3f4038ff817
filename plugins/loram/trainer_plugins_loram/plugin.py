"""Trainer glue for LoRAM: flags, checks, load + prune (+ 4 bits), LoRA, recovery on save, merge on export.

The method is in pruning.py (what to remove), recovery.py (adapters back to full size) and storage.py
(pruned models on disk, 4-bit). Two modes:
  lora   prune the original, train LoRA on the pruned model, save the adapter recovered to the original
         shapes (standard peft format: PeftModel.from_pretrained(original, output_dir) loads it)
  align  prune, then train all weights of the pruned model but its embeddings and head (the paper's
         "minimal-cost alignment"); the output directory is a pruned model that loram_pruned_model loads
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from trainer_plugins import ConfigError, PluginSpec, hookimpl

from .pruning import IMPORTANCE, INDEX_FILE, PROJECTIONS, Geometry, check_architecture, kept_count, parse_pruning

logger = logging.getLogger("trainer_plugins.loram")
DEFAULT_TARGETS = ",".join(PROJECTIONS)
PRUNED_ADAPTER_DIR = "pruned_adapter"
MERGED_DIR = "merged"


@dataclass
class LoramArguments:
    loram: Literal["off", "lora", "align"] = field(
        default="off",
        metadata={"help": "lora: prune the model, train LoRA on the pruned model, save the adapter recovered to "
                          "the original model's shapes. align: prune, then train the pruned model's weights (the "
                          "optional continual pre-training); its output is a pruned model for loram_pruned_model."})
    loram_pruning: str = field(
        default="structured",
        metadata={"help": "'structured' (remove KV-head groups and MLP neurons: a smaller, faster model), "
                          "'unstructured', or 'N:M' such as '2:4' (zeros, same shapes)."})
    loram_importance: Literal["first_order", "magnitude", "random", "wanda"] = field(
        default="first_order",
        metadata={"help": "Unit/weight score: first_order |w·grad| over calibration batches (LLM-Pruner; structured), "
                          "magnitude, random (seeded), wanda |w|·||x|| (unstructured, N:M)."})
    loram_ratio: float = field(
        default=0.5, metadata={"help": "Fraction removed in each pruned layer: KV-head groups and MLP neurons "
                                       "(structured) or weights (unstructured)."})
    loram_attn_ratio: Optional[float] = field(default=None, metadata={"help": "Attention ratio (default loram_ratio)."})
    loram_mlp_ratio: Optional[float] = field(default=None, metadata={"help": "MLP ratio (default loram_ratio)."})
    loram_neuron_multiple: int = field(default=64, metadata={
        "help": "Round the MLP neurons a structurally pruned layer keeps to a multiple of this, when the intermediate "
                "size is one (aligned inner dimensions for tensor cores and 4-bit kernels); 1 = the exact ratio."})
    loram_keep_first_layers: int = field(default=4, metadata={"help": "Leading decoder layers kept dense."})
    loram_keep_last_layers: int = field(default=2, metadata={"help": "Trailing decoder layers kept dense."})
    loram_calibration_dataset: str = field(
        default="stdlib", metadata={"help": "Text for first_order/wanda scores: 'stdlib' (offline), a .txt/.jsonl file, "
                                            "or a hub dataset with a 'text' column and no config (downloaded whole)."})
    loram_calibration_samples: int = field(default=16, metadata={"help": "Calibration sequences."})
    loram_calibration_seq_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    loram_indices: Optional[str] = field(
        default=None, metadata={"help": f"Prune with this index file ({INDEX_FILE}) of an earlier run instead of "
                                        "scoring again."})
    loram_pruned_model: Optional[str] = field(
        default=None, metadata={"help": "Directory of an already pruned (aligned) model, the output of a "
                                        "loram=align run; model_name_or_path stays the original model."})
    loram_lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    loram_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha/r)."})
    loram_lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    loram_target_modules: str = field(
        default=DEFAULT_TARGETS, metadata={"help": "LoRA targets: comma-separated projection names "
                                                   f"({DEFAULT_TARGETS}, lm_head) or 'all-linear'."})
    loram_merge: bool = field(
        default=False, metadata={"help": f"Also write the original model with the recovered adapter merged "
                                         f"into output_dir/{MERGED_DIR}."})


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="loram",
        arguments=LoramArguments,
        description="LoRAM: train LoRA on a pruned model, recover it to full size, merge into the original (QLoRAM: 4-bit)",
        requires={"peft": "peft>=0.13"},
        plain_model=("LoRAM prunes the base model, trains its own LoRA on the pruned copy (loram_lora_r, "
                     "loram_target_modules) and recovers it to the full model"),
        conflicts={"meft": "meft makes the full model reversible; loram trains LoRA on a pruned copy",
                   "lst": "lst trains a side network; loram trains LoRA on a pruned copy",
                   "sparse": "sparse prunes during full training; loram prunes once before training a LoRA"},
        # QLoRAM with DDP / ZeRO-2: every rank prunes the same way and quantises its own copy; with ZeRO-3
        # DeepSpeed then partitions that pruned 4-bit model (quant storage = compute dtype) like any other.
        supports=frozenset({"ddp", "zero2", "zero3", "4bit", "ddp+4bit", "zero2+4bit", "zero3+4bit"}),
        evidence={
            "single": "tests/plugins/test_loram.py::test_resume_equals_the_uninterrupted_run",
            "ddp": "tests/plugins/test_loram.py::test_two_processes_equal_one_process_and_save_a_complete_adapter[ddp]",
            "zero2": "tests/plugins/test_loram.py::test_two_processes_equal_one_process_and_save_a_complete_adapter[2]",
            "zero3": "tests/plugins/test_loram.py::test_two_processes_equal_one_process_and_save_a_complete_adapter[3]",
            "4bit": "tests/plugins/test_loram.py::test_qloram_prunes_then_quantises_and_recovers",
            "ddp+4bit": "tests/plugins/test_loram.py::test_qloram_with_two_processes_equals_one_process[ddp]",
            "zero2+4bit": "tests/plugins/test_loram.py::test_qloram_with_two_processes_equals_one_process[2]",
            "zero3+4bit": "tests/plugins/test_loram.py::test_qloram_with_two_processes_equals_one_process[3]",
        },
    )


# -- validation ---------------------------------------------------------------------------------------
def ratios(args) -> tuple[float, float]:
    attn = args.loram_ratio if args.loram_attn_ratio is None else args.loram_attn_ratio
    mlp = args.loram_ratio if args.loram_mlp_ratio is None else args.loram_mlp_ratio
    return attn, mlp


def target_modules(args) -> list[str]:
    if args.loram_target_modules == "all-linear":
        return list(PROJECTIONS)
    names = [n.strip() for n in args.loram_target_modules.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROJECTIONS) - {"lm_head"})
    if unknown or not names:
        raise ConfigError(f"loram_target_modules: unknown {unknown or 'empty'}; choose from {DEFAULT_TARGETS}, lm_head "
                          "(recovery knows how each of them was pruned)")
    return names


@hookimpl
def validate(args, model_args, model_config):
    try:
        n_m = parse_pruning(args.loram_pruning)
    except ValueError:
        raise ConfigError(f"loram_pruning must be 'structured', 'unstructured' or 'N:M' like '2:4', got "
                          f"{args.loram_pruning!r}") from None
    structured = args.loram_pruning == "structured"
    for name, value in (("loram_ratio", args.loram_ratio), ("loram_attn_ratio", args.loram_attn_ratio),
                        ("loram_mlp_ratio", args.loram_mlp_ratio)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if args.loram_importance == "first_order" and not structured and not args.loram_indices:
        raise ConfigError("loram_importance first_order scores structured units; for unstructured or N:M pruning "
                          "use magnitude, wanda or random")
    if args.loram_importance == "wanda" and structured:
        raise ConfigError("loram_importance wanda scores single weights; for structured pruning use first_order, "
                          "magnitude or random")
    if n_m is not None and args.loram_ratio != 0.5 and args.loram_ratio != 1 - n_m[0] / n_m[1]:
        logger.warning("loram_pruning %s fixes the sparsity at %g; loram_ratio is ignored", args.loram_pruning,
                       1 - n_m[0] / n_m[1])
    if args.loram_neuron_multiple < 1:
        raise ConfigError(f"loram_neuron_multiple must be >= 1 (1 = the exact ratio), got {args.loram_neuron_multiple}")
    if args.loram_keep_first_layers < 0 or args.loram_keep_last_layers < 0:
        raise ConfigError("loram_keep_first_layers and loram_keep_last_layers must be >= 0")
    if args.loram_calibration_samples < 1 or args.loram_calibration_seq_length < 8:
        raise ConfigError("loram_calibration_samples must be >= 1 and loram_calibration_seq_length >= 8")
    if args.loram_lora_r < 1 or args.loram_lora_alpha <= 0 or not 0.0 <= args.loram_lora_dropout < 1.0:
        raise ConfigError(f"LoRA needs loram_lora_r >= 1, loram_lora_alpha > 0 and loram_lora_dropout in [0, 1); got "
                          f"{args.loram_lora_r}, {args.loram_lora_alpha}, {args.loram_lora_dropout}")
    target_modules(args)
    if args.loram_indices and args.loram_pruned_model:
        raise ConfigError("loram_indices and loram_pruned_model both say how the model is pruned: give one")
    if args.loram_indices and not Path(args.loram_indices).is_file():
        raise ConfigError(f"loram_indices: no such file: {args.loram_indices}")
    if args.loram_pruned_model:
        from .storage import is_pruned_model_dir

        if not is_pruned_model_dir(args.loram_pruned_model):
            raise ConfigError(f"loram_pruned_model: {args.loram_pruned_model} is not a pruned model directory "
                              f"(config.json and {INDEX_FILE}, as a loram=align run writes)")
    four_bit = bool(getattr(model_args, "load_in_4bit", False))
    if args.loram == "align":
        if four_bit:
            raise ConfigError("loram=align trains every weight of the pruned model; 4-bit weights cannot be trained. "
                              "Align in 16/32 bits, then train QLoRAM with loram_pruned_model and load_in_4bit")
        if args.loram_merge:
            raise ConfigError("loram_merge merges a LoRA adapter; loram=align trains no adapter")
    if model_args is not None and getattr(model_args, "model_init", "pretrained") == "random":
        raise ConfigError("loram prunes a pretrained model; model_init=random has nothing to keep")
    if model_args is not None and getattr(model_args, "task", "causal-lm") != "causal-lm":
        raise ConfigError(f"loram trains a causal LM (its adapter is recovered to and merged into the original "
                          f"causal LM); task {model_args.task} is not supported")
    if model_config is not None:
        _check_model(args, model_config, structured)


def _check_model(args, config, structured: bool) -> None:
    why = check_architecture(config)
    if why:
        raise ConfigError(why)
    g = Geometry.from_config(config)
    if args.loram_keep_first_layers + args.loram_keep_last_layers >= g.num_layers:
        raise ConfigError(f"loram_keep_first_layers + loram_keep_last_layers = "
                          f"{args.loram_keep_first_layers + args.loram_keep_last_layers} keeps all {g.num_layers} "
                          "layers dense: nothing to prune")
    if structured:
        attn, mlp = ratios(args)
        logger.info("loram: each pruned layer keeps %d of %d KV heads (with their query heads) and %d of %d neurons",
                    kept_count(g.num_kv_heads, attn), g.num_kv_heads,
                    kept_count(g.intermediate_size, mlp, args.loram_neuron_multiple),
                    g.intermediate_size)
    n_m = parse_pruning(args.loram_pruning)
    if n_m is not None and (g.hidden_size % n_m[1] or g.intermediate_size % n_m[1]):
        raise ConfigError(f"loram_pruning {args.loram_pruning}: the layers' input sizes are not multiples of {n_m[1]}")
    for source in (args.loram_indices, args.loram_pruned_model):
        if source:
            from .pruning import PruningPlan

            path = Path(source) / INDEX_FILE if Path(source).is_dir() else Path(source)
            saved = PruningPlan.read_geometry(path)
            if saved != g:
                raise ConfigError(f"{source} was pruned from a model shaped {saved}, not this one ({g})")


# -- loading and pruning ------------------------------------------------------------------------------
@dataclass
class LoramState:
    """What the plugin knows about the model it pruned: attached to it as ``model._loram``."""

    plan: object  # PruningPlan
    original: Optional[str]  # what from_pretrained reads to get the ORIGINAL model (adapter base, merge)
    dtype: object = None
    record: dict = field(default_factory=dict)


def loram_state(model) -> Optional[LoramState]:
    model = getattr(model, "module", model)
    try:
        return getattr(model, "_loram")
    except AttributeError:
        return None


@contextlib.contextmanager
def whole_weights():
    """Load whole (unpartitioned) weights even when a ZeRO-3 config is active: pruning needs whole rows and
    columns; DeepSpeed partitions the pruned model when the Trainer starts."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_ds.set_hf_deepspeed_config(config)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _broadcast():
    """Rank 0's scores for every process (first-order gradients may differ in the last bits across GPUs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    import torch

    device = _device() if dist.get_backend() == "nccl" else torch.device("cpu")

    def reduce(t):
        t = t.detach().to(device).contiguous()
        dist.broadcast(t, 0)
        return t.cpu()

    return reduce


def calibration_batches(args, tokenizer) -> list:
    from trainer_plugins.data import calibration_batches as batches

    return batches(args.loram_calibration_dataset, args.loram_calibration_samples,
                   args.loram_calibration_seq_length, tokenizer, seed=args.seed)


def make_plan(model, args, tokenizer_fn, weights=None):
    """Score and select (or read loram_indices). The weights are not changed; with calibration batches the
    model moves to the GPU (if any) first, where it then stays. With ``weights`` (storage.Weights: the model
    is on the meta device) the scores read the weights through it, first-order ones one layer at a time."""
    from .pruning import PruningPlan, first_order_scores_by_layer, pruned_layers, structured_plan, unstructured_plan

    if args.loram_indices:
        return PruningPlan.load(args.loram_indices)
    batches = None
    if args.loram_importance in ("first_order", "wanda"):
        batches = calibration_batches(args, tokenizer_fn())
        if weights is None:
            model.to(_device())
    attn, mlp = ratios(args)
    common = dict(keep_first=args.loram_keep_first_layers, keep_last=args.loram_keep_last_layers,
                  importance=args.loram_importance, batches=batches, seed=args.seed, reduce=_broadcast(),
                  layer_of=weights.layer if weights is not None else None)
    if args.loram_pruning == "structured":
        scores_of = None
        if weights is not None and args.loram_importance == "first_order":
            layers = pruned_layers(model.config.num_hidden_layers, args.loram_keep_first_layers,
                                   args.loram_keep_last_layers)
            scores_of = first_order_scores_by_layer(model, layers, batches, weights.load, weights.unload,
                                                    weights.device).__getitem__
        plan = structured_plan(model, ratio_attn=attn, ratio_mlp=mlp, neuron_multiple=args.loram_neuron_multiple,
                               scores_of=scores_of, **common)
    else:
        plan = unstructured_plan(model, kind=args.loram_pruning, ratio=args.loram_ratio, **common)
    plan.settings = {"pruning": args.loram_pruning, "importance": args.loram_importance, "attn_ratio": attn,
                     "mlp_ratio": mlp, "keep_first_layers": args.loram_keep_first_layers,
                     "keep_last_layers": args.loram_keep_last_layers, "seed": args.seed,
                     "neuron_multiple": args.loram_neuron_multiple,
                     **({"calibration": {"dataset": args.loram_calibration_dataset,
                                         "samples": args.loram_calibration_samples,
                                         "seq_length": args.loram_calibration_seq_length}} if batches else {})}
    return plan


def _resume_plan_file(args) -> Optional[Path]:
    """On resume, the index file of the interrupted run (in its output_dir): its plan, not new scores."""
    if not args.resume_from_checkpoint or args.loram_indices or args.loram_pruned_model:
        return None
    path = Path(args.output_dir) / INDEX_FILE
    return path if path.is_file() else None


def _resume_plan(args):
    path = _resume_plan_file(args)
    if path is None:
        return None
    from .pruning import PruningPlan

    logger.info("loram: resuming with the pruning of the interrupted run (%s)", path)
    return PruningPlan.load(path)


def prune(model, args, tokenizer_fn, original: Optional[str]) -> LoramState:
    from trainer_plugins.models import count_parameters

    before = count_parameters(model)[0]
    plan = _resume_plan(args) or make_plan(model, args, tokenizer_fn)
    plan.apply(model)
    after = count_parameters(model)[0]
    return _attach(model, args, plan, original, parameters={"original": before, "pruned": after,
                                                            "pruned_fraction": 1 - after / before})


def _attach(model, args, plan, original: Optional[str], **record) -> LoramState:
    """Remember the plan on the (pruned) model and write the index file next to the output at once."""
    state = LoramState(plan, original, record={"mode": args.loram, "original_model": original, **record})
    model._loram = state
    _write_plan(args, state)
    return state


def _write_plan(args, state: LoramState, output_dir: Optional[str] = None) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    from .storage import save_plan

    save_plan(state.plan, output_dir or args.output_dir, state.record)


@hookimpl
def load_model(args, model_args):
    if model_args is None:
        return None
    from trainer_plugins.models import load_model as host_load
    from trainer_plugins.models import load_tokenizer, model_source, quantization_config, resolve_dtype

    dtype = resolve_dtype(model_args.dtype)
    original = model_source(model_args)
    four_bit = None
    if model_args.load_in_4bit:
        from trainer_plugins.trainer import deepspeed_stage

        # under ZeRO-3 DeepSpeed partitions the pruned 4-bit model when the Trainer starts
        four_bit = quantization_config(model_args, zero3=deepspeed_stage(args) == 3)
    with whole_weights():
        if args.loram_pruned_model:
            from trainer_plugins.models import count_parameters

            from .storage import load_pruned_model

            model, plan = load_pruned_model(args.loram_pruned_model, dtype, model_args.attn_implementation)
            state = _attach(model, args, plan, original, pruned_model=args.loram_pruned_model,
                            parameters={"pruned": count_parameters(model)[0]})
        else:
            streamed = _load_pruned_original(args, model_args, dtype, original, four_bit) if _prunes_while_reading(
                args) else None
            if streamed is not None:
                model, state = streamed
            else:
                model = host_load(dataclasses.replace(model_args, load_in_4bit=False), zero3=False)
                state = prune(model, args, lambda: load_tokenizer(model_args), original)
    state.dtype = dtype
    if four_bit is not None:
        from trainer_plugins.models import quantize_linears_4bit

        quantize_linears_4bit(model, four_bit, _device())  # what is not yet: the whole model, or its rest
        state.record["4bit"] = model_args.bnb_4bit_quant_type
    return model


def _prunes_while_reading(args) -> bool:
    """The plan comes from a file, from the weights alone (magnitude, random) or from first-order scores, which
    are computed one layer at a time: the original can be pruned while it is read, never whole in memory.
    (Wanda's unstructured masks keep every shape: nothing to save.)"""
    return bool(args.loram_indices or _resume_plan_file(args)
                or args.loram_importance in ("magnitude", "random", "first_order"))


def _load_pruned_original(args, model_args, dtype, original: str, four_bit=None):
    """(pruned model, state) read from the original's checkpoint tensor by tensor (storage.load_pruned_original),
    each decoder layer quantised onto the device as it is read with ``four_bit`` (a BitsAndBytesConfig); or None
    where that cannot be done (the caller loads the whole original)."""
    from trainer_plugins.models import load_model_config, load_tokenizer, quantize_linears_4bit

    from .storage import load_pruned_original

    def plan_for(meta_model, weights):
        return _resume_plan(args) or make_plan(meta_model, args, lambda: load_tokenizer(model_args), weights)

    def place(model, layer):
        quantize_linears_4bit(model, four_bit, _device(), inside=layer)

    loaded = load_pruned_original(original, load_model_config(model_args), plan_for, dtype,
                                  model_args.attn_implementation, _device(), place if four_bit else None)
    if loaded is None:
        return None
    model, plan, (before, after) = loaded
    logger.info("loram: pruned %s while reading it (%d -> %d parameters)", original, before, after)
    return model, _attach(model, args, plan, original, parameters={"original": before, "pruned": after,
                                                                   "pruned_fraction": 1 - after / before})


@hookimpl
def estimate_model(model, args, model_args):
    """The pruned shapes on the meta device. Per-layer unit counts depend on the ratios, not on the scores,
    so random scores stand in for calibration; an index file or an aligned pruned model gives its own."""
    from pathlib import Path

    from trainer_plugins.models import model_source, quantization_config, quantize_linears_4bit

    from .pruning import PruningPlan, structured_plan

    if args.loram_pruned_model or args.loram_indices:
        plan = PruningPlan.load(args.loram_indices or Path(args.loram_pruned_model) / INDEX_FILE)
    elif args.loram_pruning == "structured":
        attn, mlp = ratios(args)
        plan = structured_plan(model, ratio_attn=attn, ratio_mlp=mlp, keep_first=args.loram_keep_first_layers,
                               keep_last=args.loram_keep_last_layers, importance="random", seed=args.seed,
                               neuron_multiple=args.loram_neuron_multiple)
    else:  # 2:4 / unstructured masks keep every shape: nothing to apply
        plan = PruningPlan(args.loram_pruning, Geometry.from_config(model.config))
    if plan.structured:
        plan.apply(model)
    model._loram = LoramState(plan, model_source(model_args), dtype=next(model.parameters()).dtype)
    if model_args.load_in_4bit:
        quantize_linears_4bit(model, quantization_config(model_args), "meta")
    return model


@hookimpl
def prepare_model(model, args):
    import torch

    state = loram_state(model)
    if state is None:  # a model built in Python: prune it here
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ConfigError("loram needs whole weights to prune, but this model was partitioned by ZeRO-3 while "
                              "loading: load it through trainer-plugins (a recipe), or build it before the "
                              "TrainingArguments")
        # validate() has checked the architecture against model.config already (the host runs it first).
        from trainer_plugins.models import tokenizer_of

        why = "loram_importance needs calibration text (load the model through a recipe, or use magnitude or random)"
        state = prune(model, args, lambda: tokenizer_of(model, why), getattr(model, "name_or_path", None) or None)
        state.dtype = next(model.parameters()).dtype
    if args.loram_merge and not state.original:
        raise ConfigError("loram_merge: the original model's location is unknown (a model built in Python without "
                          "from_pretrained); merge later with: trainer-plugins loram-merge OUTPUT_DIR --original MODEL")
    if args.loram == "align":
        # The paper aligns with the head frozen; the embeddings were not pruned either.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.loram_lora_r, lora_alpha=args.loram_lora_alpha, lora_dropout=args.loram_lora_dropout,
                        target_modules=target_modules(args), task_type="CAUSAL_LM")
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    with torch.random.fork_rng(devices=[]):  # the LoRA init depends on the seed only (runs reproduce)
        torch.manual_seed(args.seed)
        peft_model = get_peft_model(model, config)
    if getattr(model, "is_loaded_in_4bit", False):
        from .storage import trainable_in_float32

        trainable_in_float32(peft_model)
    return peft_model


# -- saving ---------------------------------------------------------------------------------------------
@hookimpl
def save_model(trainer, output_dir, state_dict, checkpoint):
    if checkpoint or trainer.args.loram != "lora":
        return None  # checkpoints keep training the pruned model: the Trainer's own format resumes exactly
    from peft import get_peft_model_state_dict

    model = trainer.model
    state = loram_state(model)
    adapter = get_peft_model_state_dict(model, state_dict=state_dict) if state_dict else get_peft_model_state_dict(model)
    if not adapter:
        raise RuntimeError("loram: the adapter state is empty; nothing to recover")
    from .recovery import recover_state_dict

    config = model.peft_config[model.active_adapter]
    _write_adapter(Path(output_dir) / PRUNED_ADAPTER_DIR, adapter, config, base=trainer.args.loram_pruned_model)
    _write_adapter(Path(output_dir), recover_state_dict(adapter, state.plan), config, base=state.original)
    _write_plan(trainer.args, state, output_dir)
    return True


def _write_adapter(directory: Path, tensors: dict, config, base: Optional[str]) -> None:
    import copy

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})


@hookimpl
def export(trainer, output_dir):
    state = loram_state(trainer.model)
    if not trainer.is_world_process_zero() or state is None:
        return
    if trainer.args.loram == "align":
        _write_plan(trainer.args, state, output_dir)  # the saved pruned model + its index = loram_pruned_model
        return
    if trainer.args.loram_merge:
        merge(state, output_dir, Path(output_dir) / MERGED_DIR, trainer.processing_class)


def merge(state: LoramState, adapter_dir, target, tokenizer=None) -> None:
    """Original model + recovered adapter, merged (W + α/r·B·A) and saved as ``save_pretrained`` saves it: tensor
    by tensor from the original's safetensors (merging.py: memory of one shard, not of the model), else, where
    that cannot reproduce peft's merge, through peft with the whole original loaded."""
    from .merging import merge_streaming

    why = merge_streaming(state.original, adapter_dir, target, state.dtype)
    if why is not None:
        logger.warning("loram: merging with the whole original in host memory: %s", why)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with whole_weights():
            original = AutoModelForCausalLM.from_pretrained(state.original, dtype=state.dtype)
        merged = PeftModel.from_pretrained(original, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(target))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    logger.info("loram: merged model written to %s", target)


@hookimpl
def register_commands(subparsers):
    from trainer_plugins.models import DTYPES

    parser = subparsers.add_parser(
        "loram-merge", help="Merge a saved LoRA adapter (a LoRAM run's output, or any plain peft LoRA) into its "
                            "original model tensor by tensor: host memory of one shard, not of the model")
    parser.add_argument("adapter", help="directory with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--original", help="the original model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", help=f"where the merged model goes (default: ADAPTER/{MERGED_DIR})")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="dtype of the merged weights (default: the original's)")
    parser.set_defaults(func=_merge_command)


def _merge_command(ns) -> int:
    import json

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from trainer_plugins.models import DTYPES

    adapter = Path(ns.adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{adapter} holds no saved adapter (adapter_config.json and adapter_model.safetensors)")
    original = ns.original or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not original:
        raise ConfigError(f"{config_file} names no base model: pass --original")
    try:
        config = AutoConfig.from_pretrained(original)
    except Exception as exc:  # no such directory, hub unreachable
        raise ConfigError(f"could not read the original model '{original}': {exc}") from exc
    dtype = DTYPES[ns.dtype] if ns.dtype else getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # a config may hold the name
    tokenizer = None
    for source in (adapter, original):  # a Trainer's output directory holds the tokenizer it trained with
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            break
        except Exception:
            continue
    target = Path(ns.out) if ns.out else adapter / MERGED_DIR
    merge(LoramState(plan=None, original=original, dtype=dtype), adapter, target, tokenizer)
    print(f"merged {adapter} into {original} ({str(dtype).removeprefix('torch.')}): {target}")
    return 0


@hookimpl
def benchmark_methods():
    from .bench import METHODS

    return METHODS
