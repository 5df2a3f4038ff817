"""What a plugin declares about itself (returned by its ``plugin_spec`` hook), and which of the declared
setups a run needs. Plain data and light functions: plugins import this without loading transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

# The setups a run can need; "single" (one process, full precision) is always supported. A 4-bit base
# with several processes needs its own entry ("zero2+4bit"): supporting each part is not enough.
SETUPS = {
    "ddp": "DDP (several processes without DeepSpeed)",
    "zero2": "DeepSpeed ZeRO-1/2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp": "FSDP (PyTorch Fully Sharded Data Parallel)",
    "4bit": "a 4-bit (bitsandbytes) base model",
    "ddp+4bit": "DDP with a 4-bit base",
    "zero2+4bit": "DeepSpeed ZeRO-1/2 with a 4-bit base",
    "zero3+4bit": "DeepSpeed ZeRO-3 with a 4-bit base",
    "fsdp+4bit": "FSDP with a 4-bit base",
    "model_parallel": "tensor, context or sequence parallelism (accelerate's ParallelismConfig)",
}
# The matrix's cells, in table order: a run is in exactly one (see cell_of).
CELLS = ("single", "ddp", "zero2", "zero3", "fsdp", "4bit", "ddp+4bit", "zero2+4bit", "zero3+4bit", "fsdp+4bit",
         "model_parallel")
CELL_TITLES = {"single": "one process", "ddp": "DDP", "zero2": "ZeRO-1/2", "zero3": "ZeRO-3", "fsdp": "FSDP",
               "4bit": "4-bit", "ddp+4bit": "DDP + 4-bit", "zero2+4bit": "ZeRO-1/2 + 4-bit",
               "zero3+4bit": "ZeRO-3 + 4-bit", "fsdp+4bit": "FSDP + 4-bit",
               "model_parallel": "TP / CP / SP"}
# accelerate's N-D parallelism (ParallelismConfig): dp_shard is FSDP2 underneath; tp, cp and sp split weights
# or sequences across processes, which no plugin is written for.
_PARALLEL_SIZES = ("dp_shard", "tp", "cp", "sp")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_OFF = (None, False, 0, "", "off", "none", "no", "false")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin's identity, flags and declared needs.

    name:        lower-case identifier; also the prefix of every flag and the name of the switch flag.
    arguments:   a dataclass of flags (``field(default=..., metadata={"help": ...})``), or None.
                 The field called exactly ``name`` is the switch: the plugin is enabled when it is set
                 to anything but False/None/""/"off"/"none".
    description: one line for ``trainer-plugins list`` and ``--help``.
    requires:    import name -> pip requirement, checked before any model loads when enabled.
    conflicts:   other plugin name -> why the two cannot be enabled together.
    run_after:   plugin names whose hooks must run before this plugin's, when both are enabled.
    supports:    the setups from ``SETUPS`` the plugin works in (tested); others are refused.
    works_with:  other plugin name -> the cells (``CELLS``, "single" included) where the two are tested
                 together. Two enabled plugins that neither declares are refused: untested together.
    evidence:    cell (or "<other plugin>@<cell>" for a pair) -> the test that proves it works, as
                 "path/to/test_file.py::test_name[params]" (shown in ``trainer-plugins matrix``).
    always_on:   enabled without a switch (the host's own built-in plugin).
    plain_model: why the plugin must be handed the plain transformers model, when it builds its trainable part
                 itself: a model already wrapped by peft (or TRL's ``peft_config``) is then refused with this
                 reason. Empty: the plugin trains whatever model it is given (e.g. an optimizer).
    """

    name: str
    arguments: type | None = None
    description: str = ""
    requires: Mapping[str, str] = field(default_factory=dict)
    conflicts: Mapping[str, str] = field(default_factory=dict)
    run_after: tuple[str, ...] = ()
    supports: frozenset[str] = frozenset({"ddp"})
    works_with: Mapping[str, frozenset] = field(default_factory=dict)
    evidence: Mapping[str, str] = field(default_factory=dict)
    always_on: bool = False
    plain_model: str = ""

    def problems(self) -> list[str]:
        """Mistakes in the declaration itself (reported as a broken plugin)."""
        out = []
        if not _NAME.match(self.name):
            out.append(f"name {self.name!r} must match {_NAME.pattern}")
        unknown = set(self.supports) - set(SETUPS)
        if unknown:
            out.append(f"supports has unknown setups {sorted(unknown)}; known: {sorted(SETUPS)}")
        for other, cells in self.works_with.items():
            if set(cells) - set(CELLS):
                out.append(f"works_with[{other!r}] has unknown cells {sorted(set(cells) - set(CELLS))}; known: {CELLS}")
        for key in self.evidence:
            cell = key.split("@", 1)[-1]
            if cell not in CELLS:
                out.append(f"evidence key {key!r}: unknown cell {cell!r}; known: {CELLS}")
        if self.arguments is None:
            if not self.always_on:
                out.append("has no arguments dataclass, so it has no switch and could never be enabled")
            return out
        if not dataclasses.is_dataclass(self.arguments):
            return out + ["arguments must be a dataclass"]
        names = [f.name for f in dataclasses.fields(self.arguments)]
        bad = [n for n in names if n != self.name and not n.startswith(self.name + "_")]
        if bad:
            out.append(f"flags {bad} do not start with '{self.name}_'")
        if not self.always_on and self.name not in names:
            out.append(f"has no switch flag named '{self.name}'")
        return out

    def flag_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.arguments)] if self.arguments else []


def is_switched_on(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _OFF
    return value not in _OFF


def deepspeed_stage(args: Any) -> int | None:
    """ZeRO stage of the run (from TrainingArguments.deepspeed or an accelerate DeepSpeed launch), or None."""
    config = getattr(args, "deepspeed", None)
    if config:
        if isinstance(config, str):
            try:
                with open(config) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"deepspeed: cannot read the DeepSpeed config {config!r}: {exc}") from exc
        return int(config.get("zero_optimization", {}).get("stage", 0))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    return None


def uses_fsdp(args: Any) -> bool:
    """Whether the run asks for FSDP: TrainingArguments.fsdp (``--fsdp`` or ``--fsdp full_shard``: True once
    transformers 5.x has parsed it, a string or a list of options before) or an ``accelerate launch`` with an
    FSDP config."""
    value = getattr(args, "fsdp", None)
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return is_switched_on(value) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def parallelism_sizes(args: Any, model: Any = None) -> dict[str, int]:
    """The dimensions of accelerate's N-D parallelism this run asks for with a size above 1 (of dp_shard, tp,
    cp, sp): from TrainingArguments.parallelism_config (a ParallelismConfig, or a mapping from a recipe), an
    ``accelerate launch`` whose config has a parallelism_config (ACCELERATE_USE_PARALLELISM_CONFIG and
    PARALLELISM_CONFIG_<DIM>_SIZE), or a model sharded at load time (``tp_plan``: model.tp_size)."""
    config = getattr(args, "parallelism_config", None)
    from_env = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
    sizes = {}
    for dim in _PARALLEL_SIZES:
        value = config.get(f"{dim}_size") if isinstance(config, Mapping) else getattr(config, f"{dim}_size", None)
        if value is None and from_env:
            value = os.environ.get(f"PARALLELISM_CONFIG_{dim.upper()}_SIZE")
        try:
            size = int(value) if value is not None else 1
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"parallelism_config: {dim}_size must be a whole number, got {value!r}") from exc
        if size > 1:
            sizes[dim] = size
    if (getattr(model, "tp_size", None) or 1) > 1:
        sizes["tp"] = model.tp_size
    return sizes


def run_setup(args: Any, model: Any = None, model_args: Any = None) -> set[str]:
    """The setups (see spec.SETUPS) this run needs: DDP, ZeRO-1/2, ZeRO-3, FSDP, a 4-bit base, and the
    combination of several processes with a 4-bit base ("zero2+4bit").

    FSDP is told apart from DDP: both launch several processes, but FSDP hands the optimizer and the
    plugins' hooks sharded parameters (flat 1-D views under FSDP1, DTensors under FSDP2), which a plugin
    must be written and tested for. (On a CPU, transformers quietly trains an FSDP run as DDP.) accelerate's
    N-D parallelism counts as FSDP when it only shards data (dp_shard), and is a cell of its own
    ("model_parallel") as soon as it splits weights or sequences (tp, cp, sp), with or without DeepSpeed."""
    sizes = parallelism_sizes(args, model)
    four_bit = getattr(model_args, "load_in_4bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if set(sizes) - {"dp_shard"}:
        return {"model_parallel", "4bit"} if four_bit else {"model_parallel"}
    setup = set()
    stage = deepspeed_stage(args)
    if stage is not None:
        setup.add("zero3" if stage == 3 else "zero2")
    elif uses_fsdp(args) or sizes:
        setup.add("fsdp")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        setup.add("ddp")
    if four_bit:
        setup |= {"4bit", *(f"{s}+4bit" for s in setup)}
    return setup


def cell_of(setup: set[str]) -> str:
    """The one matrix cell (``CELLS``) of a run that needs ``setup``."""
    return next((s for s in setup if "+" in s), None) or next((s for s in setup if s != "4bit"), None) or (
        "4bit" if "4bit" in setup else "single")


def cell_label(cell: str) -> str:
    return "a single process" if cell == "single" else SETUPS[cell]


def supported_cells(spec: PluginSpec) -> set[str]:
    """The cells ``spec`` works in: a cell is supported when every setup it needs is."""
    return {cell for cell in CELLS if cell == "single" or set(_needs(cell)) <= set(spec.supports)}


def _needs(cell: str) -> list[str]:
    if "+" in cell:
        return [cell.split("+")[0], "4bit", cell]
    return [] if cell == "single" else [cell]
