"""trainer-plugins: a pluggy host that adds memory-efficient training methods to the HF Trainer.

Light names (for plugin authors) import nothing heavy; the Trainer-facing names load transformers
on first use.
"""

from .errors import ConfigError, PluginConfigError, PluginError, TrainerPluginsError
from .hookspecs import hookimpl
from .spec import SETUPS, PluginSpec

__version__ = "0.1.0"

_LAZY = {
    "PluginTrainingArguments": "arguments",
    "PluginArgumentParser": "arguments",
    "arguments_class": "arguments",
    "PluginsMixin": "trainer",
    "PluginTrainer": "trainer",
    "ModelArguments": "models",
    "DataArguments": "data",
    "get_host": "manager",
    "PluginHost": "manager",
}

__all__ = [
    "ConfigError", "PluginConfigError", "PluginError", "TrainerPluginsError", "hookimpl", "PluginSpec",
    "SETUPS", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
