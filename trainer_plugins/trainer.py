"""``PluginsMixin``: calls the plugins' hooks at the right points of a ``transformers.Trainer``.

Mix it in front of any Trainer subclass (``class MySFT(PluginsMixin, SFTTrainer)``, with arguments from
``arguments_class(base=SFTConfig)``); ``PluginTrainer`` is ``PluginsMixin + Trainer``. Only public or
long-stable Trainer methods are overridden: ``__init__``, ``create_optimizer``, ``train``, ``log``,
``save_model`` and ``_save``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import ConfigError
from .manager import BUILTIN, PluginHost, get_host
from .spec import deepspeed_stage, run_setup  # noqa: F401  (re-exported: plugins import them from here too)

logger = logging.getLogger("trainer_plugins")


def validate_run(host: PluginHost, args: Any, model_args: Any = None, model_config: Any = None, model: Any = None,
                 peft_config: Any = None):
    """Everything that must hold before weights are loaded (or, given a loaded model, before a plugin touches
    it): declared needs, then each plugin's validate."""
    host.check(args, run_setup(args, model=model, model_args=model_args))
    host.check_model(args, model=model, peft_config=peft_config)
    host.call("validate", args, model_args=model_args, model_config=model_config)


class PluginsMixin:
    """Runs the enabled plugins' hooks inside a Trainer. With no plugin enabled it changes nothing."""

    def __init__(self, *args: Any, plugin_host: PluginHost | None = None, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        # PluginTrainingArguments classes remember the host that built them.
        self.plugin_host = host = plugin_host or getattr(train_args, "_host", None) or get_host()
        if train_args is not None:
            config = getattr(model, "config", None)
            validate_run(host, train_args, model_config=config, model=model, peft_config=kwargs.get("peft_config"))
            if model is not None:
                model = host.pipe("prepare_model", train_args, "model", model)
                if "model" in kwargs or not args:
                    kwargs["model"] = model
                else:
                    args = (model, *args[1:])
            extra = [cb for cbs in host.call("callbacks", train_args, trainer=self) for cb in cbs]
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
        try:
            super().__init__(*args, **kwargs)
        except TypeError as exc:  # e.g. TRL: SFTConfig(**args.to_dict()) meets a plugin flag
            flag = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if flag and flag.group(1) in _plugin_flags(train_args):
                raise ConfigError(self._own_arguments_class_hint(flag.group(1))) from exc
            raise
        lost = [n for n in _plugin_flags(train_args) if not hasattr(self.args, n)]
        if lost and set(host.enabled(train_args)) - {BUILTIN}:  # a subclass swapped the arguments for its own
            raise ConfigError(self._own_arguments_class_hint(lost[0]))

    def _own_arguments_class_hint(self, flag: str) -> str:
        return (f"{type(self).__name__} rebuilds the training arguments as its own class, which has no plugin flag "
                f"'{flag}': build them with trainer_plugins.arguments_class(base=<that class>), e.g. "
                f"arguments_class(base=SFTConfig) for TRL's SFTTrainer")

    def create_optimizer(self, *args: Any, **kwargs: Any):
        # deepspeed_init calls create_optimizer too, so a plugin optimizer is what ZeRO wraps.
        if self.optimizer is None:
            model = kwargs.get("model", args[0] if args else None) or self.model
            optimizer = self.plugin_host.call_first("create_optimizer", self.args, model=model, trainer=self)
            if optimizer is not None:
                self.optimizer = optimizer
        return super().create_optimizer(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):
        if self.is_world_process_zero():
            logger.warning(self.plugins_banner())
        return super().train(*args, **kwargs)

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        # Training logs carry "loss"; evaluation and the end-of-training summary do not get plugin metrics.
        if "loss" in logs:
            for extra in self.plugin_host.call("metrics", self.args, trainer=self):
                logs.update(extra)
        return super().log(logs, *args, **kwargs)

    def plugins_banner(self) -> str:
        host = self.plugin_host
        enabled = [n for n in host.enabled(self.args) if n != BUILTIN]
        parts = [f"{n}-{host.versions[n]}" for n in enabled]
        installed = sorted(set(host.specs) - set(enabled) - {BUILTIN})
        return (
            f"trainer-plugins {host.versions[BUILTIN]}: enabled: {', '.join(parts) or 'none'}"
            + (f"; installed, off: {', '.join(installed)}" if installed else "")
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if not _is_checkpoint(output_dir):
            self.plugin_host.call("export", self.args, trainer=self, output_dir=output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            handled = self.plugin_host.call_first(
                "save_model",
                self.args,
                trainer=self,
                output_dir=output_dir,
                state_dict=state_dict,
                checkpoint=_is_checkpoint(output_dir),
            )
            if handled:
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
                return
        super()._save(output_dir, state_dict=state_dict)


def _plugin_flags(train_args: Any) -> list[str]:
    return [n for names in getattr(type(train_args), "_plugin_fields", {}).values() for n in names]


def _is_checkpoint(output_dir: str) -> bool:
    return os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR + "-")


class PluginTrainer(PluginsMixin, Trainer):
    """``transformers.Trainer`` with the installed plugins' hooks."""
