"""Pruned models on disk and in 4 bits.

A structurally pruned model has different shapes per layer (the dense first/last layers keep theirs),
which no transformers config can describe. We save it as the original config + the weights + the index
file; loading builds the original architecture on the meta device, shrinks it with the index file and
reads the weights into it, so only the pruned weights are ever in memory (a pruned 70B loads in the
memory of its pruned size). 4-bit: the pruned projections are quantised one by one on the target device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .pruning import INDEX_FILE, PROJECTIONS, PruningPlan, decoder_layers


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


def quantize_4bit(model, quantization_config, device: torch.device) -> None:
    """Replace the decoder layers' projections with bitsandbytes ``Linear4bit`` (NF4/FP4) on ``device``;
    embeddings, norms and the head stay in the compute dtype (as transformers' 4-bit loading does), and
    nothing is up-cast to float32 (the prepare_model_for_kbit_training memory trap)."""
    import bitsandbytes as bnb

    qc = quantization_config
    for layer in decoder_layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=qc.bnb_4bit_compute_dtype, compress_statistics=qc.bnb_4bit_use_double_quant,
                                      quant_type=qc.bnb_4bit_quant_type, quant_storage=qc.bnb_4bit_quant_storage,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.to(qc.bnb_4bit_compute_dtype).cpu(), requires_grad=False,
                                             compress_statistics=qc.bnb_4bit_use_double_quant,
                                             quant_type=qc.bnb_4bit_quant_type, quant_storage=qc.bnb_4bit_quant_storage,
                                             module=q).to(device)
                if linear.bias is not None:
                    q.bias = nn.Parameter(linear.bias.data.to(device, qc.bnb_4bit_compute_dtype), requires_grad=False)
                setattr(parent, name, q)
    model.to(device)
    model.is_loaded_in_4bit = True


def trainable_in_float32(model) -> None:
    """LoRA factors on a 4-bit base train in float32 (bitsandbytes computes in the compute dtype and casts
    back); only they are up-cast, never the frozen embeddings, norms or head."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
