"""Pruned models on disk and in 4 bits.

A structurally pruned model has different shapes per layer (the dense first/last layers keep theirs),
which no transformers config can describe. We save it as the original config + the weights + the index
file; loading builds the original architecture on the meta device, shrinks it with the index file and
reads the weights into it, so only the pruned weights are ever in memory (a pruned 70B loads in the
memory of its pruned size). 4-bit: the host's quantize_linears_4bit quantises the pruned projections one by
one on the target device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .pruning import INDEX_FILE, PruningPlan


def is_pruned_model_dir(path) -> bool:
    return (Path(path) / INDEX_FILE).is_file() and (Path(path) / "config.json").is_file()


def load_pruned_model(path, dtype: torch.dtype, attn_implementation=None):
    """(model, plan) from a directory written by an ``align`` run (or ``save_pruned_model``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    plan = PruningPlan.load(path / INDEX_FILE)
    config = AutoConfig.from_pretrained(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if plan.structured:
        plan.apply(model)  # shrinks the empty projections to the saved shapes
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _read_safetensors(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not fit the pruned model (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model, plan


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def save_plan(plan: PruningPlan, output_dir, record: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    plan.save(Path(output_dir) / INDEX_FILE)
    with open(Path(output_dir) / "loram.json", "w") as f:
        json.dump({**record, "pruning": plan.summary()}, f, indent=2, default=str)


def trainable_in_float32(model) -> None:
    """LoRA factors on a 4-bit base train in float32 (bitsandbytes computes in the compute dtype and casts
    back); only they are up-cast, never the frozen embeddings, norms or head."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
