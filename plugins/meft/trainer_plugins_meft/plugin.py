"""Trainer glue for MEFT: flags, checks, the peft LoRA + coupling conversion, the saved config.
The method is in reversible.py (autograd), llama.py (the coupling for pre-norm decoders) and encoder.py
(MEFT1/2/3 for post-norm encoders)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from trainer_plugins import ConfigError, PluginSpec, hookimpl

CONFIG_NAME = "meft_config.json"
STREAM_DTYPES = ("float64", "float32", "model")


@dataclass
class MeftArguments:
    meft: Literal["off", "meft1", "meft2", "meft3"] = field(
        default="off",
        metadata={"help": "Reversible fine-tuning. Decoders (Llama/Qwen2/Mistral): meft1 = F is each pretrained "
                          "layer's update with LoRA inside, G = identity + adapter, lam = gamma, beta = 1. Encoders "
                          "(BERT/RoBERTa), as in the paper: meft1 F = layer, G = adapter (lam = gamma); meft2 F = "
                          "adapter, G = layer (beta = gamma); meft3 F = attention, G = MLP (lam = beta = gamma)."})
    meft_gamma: float = field(default=0.03125, metadata={
        "help": "The small factor of the coupling (lam and/or beta, by variant; the paper: 0.1). Smaller = closer "
                "to the pretrained model at the start, larger = less rounding error in the reconstruction (1/gamma "
                "per layer). A power of two (1/32) makes the division exact in binary floating point."})
    meft_output: Literal["chain", "mean"] = field(default="chain", metadata={
        "help": "Encoders: the encoder's output is the stream that carries the pretrained layers' outputs (chain: "
                "the start is the pretrained model up to gamma) or the mean of the two streams (the paper)."})
    meft_reversible_layers: int = field(default=-1, metadata={
        "help": "Reversible bottom layers (-1: all); the layers above keep their activations (plain autograd)."})
    meft_segment_layers: int = field(default=4, metadata={
        "help": "Store the streams every N layers so no reconstruction spans more than N layers (0: never)."})
    meft_stream_dtype: str = field(default="float64", metadata={
        "help": "dtype of the two streams (float64, float32 or model); layers still compute in the model's dtype."})
    meft_check_reconstruction: int = field(default=1, metadata={
        "help": "Training forwards whose backward compares the inputs it rebuilds with the forward's and stops if "
                "they drift beyond 1e-3 (relative): the first by default, -1 every one (debugging), 0 none."})
    meft_adapter_dim: int = field(default=8, metadata={"help": "Bottleneck of the adapter in G (0: G = identity)."})
    meft_lora_r: int = field(default=8, metadata={"help": "LoRA rank inside F (the pretrained layers)."})
    meft_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    meft_lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (replayed exactly in backward)."})
    meft_lora_target_modules: str = field(default="all-linear", metadata={
        "help": "peft target_modules: 'all-linear' or comma-separated names (q_proj,v_proj)."})


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="meft",
        arguments=MeftArguments,
        description="MEFT: reversible adapters; activations recomputed from outputs in backward, not stored",
        # The coupling's backward hands parameter gradients to autograd like any other op, so DDP's and
        # ZeRO-2's gradient hooks see each once (tested, 2 processes). ZeRO-3 is refused: the layers
        # re-run inside our backward find weights ZeRO-3 has partitioned ("expected shape [0]").
        # 4-bit base: frozen, and re-running a layer dequantises the same packed weights, so the
        # reconstruction is as exact as in 16/32 bits (tested). With DDP / ZeRO-2 every rank quantises its own.
        supports=frozenset({"ddp", "zero2", "4bit", "ddp+4bit", "zero2+4bit"}),
        evidence={
            "single": "tests/plugins/test_meft.py::test_trains_resumes_exactly_and_reloads",
            "ddp": "tests/plugins/test_meft.py::test_two_processes_equal_one_process[ddp]",
            "zero2": "tests/plugins/test_meft.py::test_two_processes_equal_one_process[2]",
            "4bit": "tests/plugins/test_meft.py::test_4bit_base_reconstructs_exactly",
            "ddp+4bit": "tests/plugins/test_meft.py::test_4bit_base_with_two_processes_equals_one_process[ddp]",
            "zero2+4bit": "tests/plugins/test_meft.py::test_4bit_base_with_two_processes_equals_one_process[2]",
        },
        plain_model=("MEFT makes the model reversible and adds its own adapters through peft (meft_lora_r, "
                     "meft_adapter_dim)"),
        conflicts={"apollo": "MEFT trains adapters; APOLLO is a full-parameter optimizer"},
    )


def family_of(model_type):
    """'decoder' or 'encoder' (None for other model types)."""
    from . import encoder, llama

    return "decoder" if model_type in llama.SUPPORTED else "encoder" if model_type in encoder.SUPPORTED else None


@hookimpl
def validate(args, model_args, model_config):
    from . import encoder, llama

    if not 0 < args.meft_gamma <= 1:
        raise ConfigError(f"meft_gamma must be in (0, 1], got {args.meft_gamma}: the coupling divides by it")
    if args.meft_reversible_layers < -1:
        raise ConfigError(f"meft_reversible_layers must be -1 (all) or >= 0, got {args.meft_reversible_layers}")
    if args.meft_segment_layers < 0:
        raise ConfigError(f"meft_segment_layers must be >= 0, got {args.meft_segment_layers}")
    if args.meft_check_reconstruction < -1:
        raise ConfigError(f"meft_check_reconstruction must be -1 (every step), 0 (never) or a number of steps, "
                          f"got {args.meft_check_reconstruction}")
    if args.meft_stream_dtype not in STREAM_DTYPES:
        raise ConfigError(f"meft_stream_dtype must be one of {STREAM_DTYPES}, got {args.meft_stream_dtype!r}")
    if args.meft_adapter_dim < 0 or args.meft_lora_r < 1:
        raise ConfigError("meft_adapter_dim must be >= 0 and meft_lora_r >= 1")
    if not 0 <= args.meft_lora_dropout < 1:
        raise ConfigError(f"meft_lora_dropout must be in [0, 1), got {args.meft_lora_dropout}")
    if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
        raise ConfigError("meft recomputes activations itself; activation (gradient) checkpointing would recompute "
                          "them twice: set activation_checkpointing false")
    if model_config is None:
        return
    model_type = getattr(model_config, "model_type", None)
    family = family_of(model_type)
    if family is None:
        raise ConfigError(f"meft supports the pre-norm decoders {llama.SUPPORTED} and the post-norm encoders "
                          f"{encoder.SUPPORTED}, not {model_type!r}")
    if family == "decoder" and args.meft != "meft1":
        raise ConfigError(
            f"meft={args.meft} is defined for post-norm encoders (BERT/RoBERTa); for pre-norm decoders use meft1 "
            "(README: why MEFT3's F = attention, G = MLP cannot see the residual stream in a pre-norm layer)")
    if family == "decoder" and args.meft_output != "chain":
        raise ConfigError("meft_output applies to encoders (two streams out); a decoder's output is its hidden stream")
    if family == "encoder" and (getattr(model_config, "is_decoder", False)
                                or getattr(model_config, "add_cross_attention", False)):
        raise ConfigError(f"meft runs {model_type} as an encoder; this config is a decoder (is_decoder / "
                          "add_cross_attention), which needs a KV cache and cross-attention the couplings do not carry")
    growth, divisions, stream = reconstruction_growth(args, model_args, getattr(model_config, "num_hidden_layers", 1))
    if growth > 1e-3:
        raise ConfigError(
            f"meft: the backward would rebuild {divisions} divisions by gamma={args.meft_gamma:g} in a row on {stream} "
            f"streams: rounding grows to ~{growth:.0e} of the values (measured on SmolLM2: such gradients are noise). "
            "Store the streams more often (meft_segment_layers), use meft_stream_dtype float64, or a larger meft_gamma")
    half = sixteen_bit_compute(args, model_args)
    if half and growth > FLIP_LIMIT * _ROUNDOFF[_HALF[half]]:
        longest = max_segment_under_autocast(args.meft_gamma, 2 if args.meft == "meft3" else 1, half)
        raise ConfigError(
            f"meft: in {half} F and G compute in 16 bits, and a rebuilt input off by ~{growth:.0e} "
            f"({divisions} divisions by gamma={args.meft_gamma:g} on {stream} streams) rounds to another 16-bit value "
            f"in ~{min(1.0, growth / _ROUNDOFF[_HALF[half]]):.1%} of its elements, an error the divisions below "
            "multiply (measured on a tiny Llama: float64 streams over 8 layers 0.4% gradient error, float32 over 2 "
            f"layers 1%). Use meft_stream_dtype float64 with meft_segment_layers <= {longest}"
            + ("" if longest else " (none reach it: use a larger meft_gamma)"))


# Under 16-bit autocast a rebuilt input off by e (relative) rounds to another 16-bit value with a probability of
# about e / u16 (u16: that dtype's unit roundoff), each such flip an error of u16 that the divisions below multiply;
# keep the flips below 1 in 1000 elements (seen: float64 streams at gamma 1/32 over 4 layers reproduce the forward
# bit for bit in bf16 and fp16).
FLIP_LIMIT = 1e-3
_HALF = {"bf16": "bfloat16", "fp16": "float16"}


def sixteen_bit_compute(args, model_args) -> str | None:
    """"bf16" or "fp16" where F and G compute in 16 bits: under the Trainer's autocast, or on 16-bit weights."""
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        return "bf16" if args.bf16 else "fp16"
    if model_args is None:  # a model handed over loaded: its dtype is not the recipe's to tell
        return None
    return {"bfloat16": "bf16", "float16": "fp16"}.get(_model_dtype_name(model_args))


def _model_dtype_name(model_args) -> str:
    """The dtype the recipe loads the model in, by name ("auto" resolved as the loader does)."""
    from trainer_plugins.models import resolve_dtype

    return str(resolve_dtype(getattr(model_args, "dtype", "auto") or "auto")).replace("torch.", "")


def max_segment_under_autocast(gamma: float, divisions_per_layer: int, half: str) -> int:
    """The longest run of float64-stream layers whose reconstruction stays under FLIP_LIMIT of ``half``'s roundoff."""
    k = 0
    while _ROUNDOFF["float64"] * (1 / gamma) ** ((k + 1) * divisions_per_layer) <= FLIP_LIMIT * _ROUNDOFF[_HALF[half]]:
        k += 1
        if k > 1000:
            break
    return k


# unit roundoff of the streams' dtype
_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def reconstruction_growth(args, model_args, n_layers: int) -> tuple[float, int, str]:
    """(rounding error a reconstruction can reach, relative; divisions by gamma in a row; stream dtype): each
    rebuilt layer divides by gamma (meft3: twice), and the run of rebuilt layers is a segment (or all the
    reversible layers when nothing is stored). A rough bound, but the measured cases agree with it
    (README: float32 streams at gamma 1/32 fail from segments of 4 layers; float64 works)."""
    reversible = n_layers if args.meft_reversible_layers < 0 else min(args.meft_reversible_layers, n_layers)
    run = min(args.meft_segment_layers or reversible, reversible)
    divisions = run * (2 if args.meft == "meft3" else 1)
    stream = args.meft_stream_dtype
    if stream == "model":
        stream = _model_dtype_name(model_args)
    try:
        growth = _ROUNDOFF.get(stream, 2.0 ** -24) * (1 / args.meft_gamma) ** divisions
    except OverflowError:
        growth = float("inf")
    return growth, divisions, stream


def settings_of(args):
    import torch

    from .reversible import MeftSettings, ReconstructionCheck

    dtype = None if args.meft_stream_dtype == "model" else getattr(torch, args.meft_stream_dtype)
    return MeftSettings(
        gamma=args.meft_gamma,
        reversible_layers=None if args.meft_reversible_layers < 0 else args.meft_reversible_layers,
        segment=args.meft_segment_layers or None,
        stream_dtype=dtype, variant=args.meft, output=args.meft_output,
        check=ReconstructionCheck(forwards=args.meft_check_reconstruction),
    )


def _task_type(model):
    """peft's task type from the model class (it decides the PeftModel wrapper and the head it trains)."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def lora_config(args, model):
    from peft import LoraConfig

    targets = args.meft_lora_target_modules
    with_adapter = _uses_adapter(model, args.meft, args.meft_adapter_dim)
    return LoraConfig(
        r=args.meft_lora_r, lora_alpha=args.meft_lora_alpha, lora_dropout=args.meft_lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        modules_to_save=["meft_adapter"] if with_adapter else None, task_type=_task_type(model),
    )


def _family_module(model):
    from . import encoder, llama

    return llama if family_of(model.config.model_type) == "decoder" else encoder


def _uses_adapter(model, variant, dim) -> bool:
    """Whether the couplings have a RevAdapter: decoders (in G) and meft1/meft2 encoders, unless dim is 0."""
    from . import encoder

    return bool(dim) and (_family_module(model) is not encoder or encoder.needs_adapter(variant))


def _add_adapters(model, variant, dim):
    if _uses_adapter(model, variant, dim):
        _family_module(model).add_adapters(model, dim)


@hookimpl
def prepare_model(model, args):
    from peft import get_peft_model

    _add_adapters(model, args.meft, args.meft_adapter_dim)
    family = _family_module(model)
    model = get_peft_model(model, lora_config(args, model))
    return family.convert(model, settings_of(args))


@hookimpl
def export(trainer, output_dir):
    args = trainer.args
    config = {
        "variant": args.meft, "gamma": args.meft_gamma, "reversible_layers": args.meft_reversible_layers,
        "segment_layers": args.meft_segment_layers, "stream_dtype": args.meft_stream_dtype,
        "adapter_dim": args.meft_adapter_dim, "output": args.meft_output,
    }
    with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load(base_model, adapter_dir):
    """The trained MEFT model: ``base_model`` (the original pretrained model, with the task head class it
    was trained with) + the saved peft adapter, G/F adapters and head in ``adapter_dir``, run as the same
    couplings as in training."""
    import torch
    from peft import PeftModel

    from .reversible import MeftSettings

    with open(os.path.join(adapter_dir, CONFIG_NAME)) as f:
        config = json.load(f)
    variant = config.get("variant", "meft1")
    _add_adapters(base_model, variant, config["adapter_dim"])
    family = _family_module(base_model)
    model = PeftModel.from_pretrained(base_model, adapter_dir)
    dtype = None if config["stream_dtype"] == "model" else getattr(torch, config["stream_dtype"])
    return family.convert(model, MeftSettings(
        gamma=config["gamma"], reversible_layers=None if config["reversible_layers"] < 0 else config["reversible_layers"],
        segment=config["segment_layers"] or None, stream_dtype=dtype, variant=variant,
        output=config.get("output", "chain")))


@hookimpl
def benchmark_methods():
    from .bench import METHODS

    return METHODS
