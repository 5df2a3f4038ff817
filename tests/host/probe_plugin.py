"""A test plugin that implements every hook and records each call, in the order they happen."""

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainerCallback

from trainer_plugins import ConfigError, PluginSpec, hookimpl

CALLS: list[str] = []


@dataclass
class ProbeArguments:
    probe: bool = field(default=False, metadata={"help": "Switch the probe plugin on."})
    probe_scale: float = field(default=1.0, metadata={"help": "Multiplies nothing; validated > 0."})
    probe_mode: Literal["plain", "sgd"] = field(default="plain", metadata={"help": "sgd: build an SGD optimizer."})
    probe_save_marker: bool = field(default=False, metadata={"help": "Write weights itself and a marker file."})
    probe_tiny_model: int = field(default=0, metadata={"help": "If > 0, load_model returns a tiny Llama of this vocab."})


class _ProbeCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        CALLS.append("callback.on_train_begin")


@hookimpl
def plugin_spec():
    CALLS.append("plugin_spec")
    return PluginSpec(name="probe", arguments=ProbeArguments, description="records hook calls",
                      supports=frozenset({"ddp", "zero2", "zero3", "4bit"}))


@hookimpl
def register_commands(subparsers):
    CALLS.append("register_commands")
    p = subparsers.add_parser("probe-hello", help="say hello")
    p.set_defaults(func=lambda ns: print("hello from probe") or 0)


@hookimpl
def benchmark_methods():
    from trainer_plugins.bench import BenchMethod

    CALLS.append("benchmark_methods")
    return {"probe-sgd": BenchMethod(optimizer=lambda model, lr: __import__("torch").optim.SGD(model.parameters(), lr=lr),
                                     description="SGD, from the probe plugin")}


@hookimpl
def validate(args, model_config):
    CALLS.append("validate")
    if args.probe_scale <= 0:
        raise ConfigError(f"probe_scale must be > 0, got {args.probe_scale}")


@hookimpl
def estimate_model(model, args, model_args):
    CALLS.append("estimate_model")
    assert next(model.parameters()).is_meta


@hookimpl
def load_model(args, model_args):
    CALLS.append("load_model")
    if not args.probe_tiny_model:
        return None
    from transformers import LlamaForCausalLM

    from trainer_plugins.models import tiny_llama_config

    return LlamaForCausalLM(tiny_llama_config(vocab_size=args.probe_tiny_model))


@hookimpl
def prepare_model(model, args):
    CALLS.append("prepare_model")
    model.probe_prepared = True
    return model


@hookimpl
def callbacks(args):
    CALLS.append("callbacks")
    return [_ProbeCallback()]


@hookimpl
def metrics(trainer):
    CALLS.append("metrics")
    return {"probe/global_step": trainer.state.global_step}


@hookimpl
def create_optimizer(model, args, trainer):
    CALLS.append("create_optimizer")
    if args.probe_mode == "sgd":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    return None


@hookimpl
def save_model(trainer, output_dir, state_dict, checkpoint):
    CALLS.append("save_model.checkpoint" if checkpoint else "save_model.final")
    if not trainer.args.probe_save_marker:
        return None
    import os

    trainer.model.save_pretrained(output_dir, state_dict=state_dict)
    with open(os.path.join(output_dir, "probe_marker.txt"), "w") as f:
        f.write("saved by probe")
    return True


@hookimpl
def export(trainer, output_dir):
    CALLS.append("export")
