"""The host's own plugin: the default model loader and the memory report.

Registered like any third-party plugin (pluggy's eggsample pattern), always enabled, called last.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .spec import SETUPS, PluginSpec


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="host",
        description="trainer-plugins itself: default model loader, memory report",
        supports=frozenset(SETUPS),
        always_on=True,
    )


@hookimpl
def load_model(args, model_args):
    if model_args is None:
        return None
    from .models import load_model as load
    from .spec import deepspeed_stage

    return load(model_args, zero3=deepspeed_stage(args) == 3)


@hookimpl
def callbacks(args):
    from .memory import MemoryReportCallback

    return [MemoryReportCallback()]
