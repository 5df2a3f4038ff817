"""Peak memory and its breakdown: parameters, trainable parameters, gradients, optimizer state.

The report is logged at the end of training, appended to ``state.log_history`` and written to
``<output_dir>/memory_report.json``. On a GPU the peak is ``torch.cuda.max_memory_allocated`` since the
start of training; on CPU it is the process's peak resident set size (everything the process
touched, including libraries and data), which is an upper bound, not an allocator figure.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch
from transformers import TrainerCallback

from .zero import full_numel

logger = logging.getLogger("trainer_plugins")
GiB = 2**30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def base_optimizer(optimizer):
    """The torch optimizer under accelerate's / DeepSpeed's wrappers (they expose it as .optimizer)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer) -> int:
    if optimizer is None:
        return 0
    state = getattr(base_optimizer(optimizer), "state", {})
    return _nested_bytes(list(state.values()))


def _nested_bytes(value) -> int:
    """Tensors in a state, also nested (an optimizer stepping ZeRO's flat partitions keeps per-weight dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nested_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nested_bytes(v) for v in value)
    return 0


def peak_memory() -> tuple[str, int]:
    """(what was measured, bytes)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "cuda max allocated", torch.cuda.max_memory_allocated()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak RSS (process)", kib if sys.platform == "darwin" else kib * 1024  # macOS reports bytes


class MemoryReportCallback(TrainerCallback):
    """Adds ``peak_mem_gib`` to every log line and writes the breakdown when training ends."""

    def __init__(self):
        self.gradient_bytes: int | None = None
        self.optimizer_bytes: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradient_bytes is None and model is not None:
            # Under DeepSpeed the gradients live in the engine's partitioned buffers, not in .grad.
            self.gradient_bytes = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.optimizer_bytes is None and optimizer is not None:
            self.optimizer_bytes = optimizer_state_bytes(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["peak_mem_gib"] = round(peak_memory()[1] / GiB, 3)
            # Trainer.log appended a copy of logs to the history before calling us.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["peak_mem_gib"] = logs["peak_mem_gib"]

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        report = self.report(model, optimizer)
        state.log_history.append({"memory_report": report, "step": state.global_step})
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "memory_report.json"), "w") as f:
                json.dump(report, f, indent=2)
            logger.warning(format_report(report))

    def report(self, model, optimizer) -> dict:
        what, peak = peak_memory()
        params = list(model.parameters()) if model is not None else []
        trainable = [p for p in params if p.requires_grad]
        return {
            "peak_kind": what,
            "peak_bytes": peak,
            "device": "cuda" if "cuda" in what else "cpu",
            "parameters": sum(full_numel(p) for p in params),
            "parameter_bytes": tensor_bytes(_local(p) for p in params),  # this process's share under ZeRO-3
            "trainable_parameters": sum(full_numel(p) for p in trainable),
            "trainable_bytes": tensor_bytes(_local(p) for p in trainable),
            "gradient_bytes": self.gradient_bytes,
            "optimizer_state_bytes": self.optimizer_bytes if self.optimizer_bytes is not None
            else (optimizer_state_bytes(optimizer) if optimizer is not None else None),
        }


def _local(p):
    return getattr(p, "ds_tensor", p)


def format_report(report: dict) -> str:
    def gib(b):
        return "n/a" if b is None else f"{b / GiB:.3f} GiB"

    share = report["trainable_parameters"] / max(report["parameters"], 1)
    return "\n".join([
        "memory report",
        f"  peak ({report['peak_kind']}): {gib(report['peak_bytes'])}",
        f"  parameters:        {report['parameters']:,} ({gib(report['parameter_bytes'])})",
        f"  trainable:         {report['trainable_parameters']:,} ({share:.2%}, {gib(report['trainable_bytes'])})",
        f"  gradients:         {gib(report['gradient_bytes'])}",
        f"  optimizer state:   {gib(report['optimizer_state_bytes'])}",
    ])
