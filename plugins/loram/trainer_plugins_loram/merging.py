"""The recovered adapter merged into the original model, one tensor at a time. Plain torch + safetensors.

peft's merge (``PeftModel.from_pretrained(original, adapter).merge_and_unload()``) needs the whole original in
memory: 140 GB of host RAM for a 70B model, the very model LoRAM exists to avoid holding. The merge itself is
local to each weight, W' = W + s·B·A (s = alpha/r, or alpha/sqrt(r) with rsLoRA), so ``merge_streaming`` reads
the original's safetensors tensor by tensor (memory-mapped), adds the delta where the adapter has one, and
writes shards of at most ``max_shard_size`` bytes as it goes: it holds one output shard, never the model.
The arithmetic is peft's: the delta in float32, rounded once when added to the weight in its dtype, so the
result is the same bit for bit (tested against merge_and_unload).

Where the checkpoint is not plain safetensors (PyTorch .bin files) or the adapter is not a plain LoRA on
weights the checkpoint names (DoRA, modules_to_save, an lm_head tied to the embeddings), ``merge_streaming``
returns why, and the caller merges through peft with the model loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .recovery import _LORA_KEY
from .storage import SHARD_INDEX, SINGLE_FILE, Checkpoint

MAX_SHARD_SIZE = 2 * 1024**3


def lora_deltas(adapter_dir) -> tuple[Optional[str], dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(why not, {checkpoint weight name: (A, B)}, scaling) of a saved adapter: ``why not`` says what a plain
    per-weight merge cannot reproduce."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        return f"the adapter is {config.get('peft_type')}, not LoRA", {}, 0.0
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("modules_to_save", None),
                       ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False)):
        if config.get(key, plain) not in (plain, None, {}, [], False):
            return f"the adapter sets {key}", {}, 0.0
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = _LORA_KEY.match(key)
        if match is None:
            return f"the adapter holds {key}, not a LoRA factor", {}, 0.0
        factors.setdefault(match["module"] + ".weight", {})[match["factor"]] = tensor
    pairs = {}
    for name, ab in factors.items():
        if set(ab) != {"lora_A", "lora_B"}:
            return f"{name} has only {', '.join(ab)}", {}, 0.0
        pairs[name] = (ab["lora_A"], ab["lora_B"])
    return None, pairs, scaling


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """W + s·B·A in ``dtype`` as peft merges it: the factors in float32 (peft loads bf16/fp16 adapters upcast),
    their product scaled in float32, added to the weight in float32 and rounded once."""
    delta = (b.float() @ a.float()) * scaling
    if delta.shape != weight.shape:
        raise ValueError(f"adapter delta {tuple(delta.shape)} does not fit the weight {tuple(weight.shape)}")
    return (weight.to(dtype).float() + delta).to(dtype)


def merge_streaming(source: str, adapter_dir, target, dtype: Optional[torch.dtype],
                    max_shard_size: int = MAX_SHARD_SIZE) -> Optional[str]:
    """Write ``source`` with the adapter in ``adapter_dir`` merged to ``target`` as ``save_pretrained`` lays it out
    (config, generation config, safetensors shards with an index), floating tensors in ``dtype`` (as stored with
    None), as ``from_pretrained(source, dtype=dtype)`` would hold them. Returns None when done, or why it cannot
    (then nothing is written)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    if getattr(config, "quantization_config", None):
        return "the original is quantised (from_pretrained dequantises or keeps it packed)"
    checkpoint = Checkpoint.of(source)
    if checkpoint is None:
        return "the original has no safetensors checkpoint"
    why, pairs, scaling = lora_deltas(adapter_dir)
    if why is not None:
        return why
    where = checkpoint.where
    missing = sorted(set(pairs) - set(where))
    if missing:
        return f"the checkpoint has no tensor {missing[0]} (the adapter's names differ from the checkpoint's)"
    unknown = [name for name, kind in checkpoint.dtypes.items() if kind is None]
    if unknown:
        return f"{unknown[0]} has a dtype this merge does not read"
    stored = {name: dtype if dtype is not None and kind.is_floating_point else kind
              for name, kind in checkpoint.dtypes.items()}  # the output's dtypes
    sizes = {name: torch.Size(checkpoint.shapes[name]).numel() * stored[name].itemsize for name in where}

    shards = _plan_shards(list(where), sizes, max_shard_size)  # in the checkpoint's order
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    file_names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, members in zip(file_names, shards):
        tensors = {}
        for name in members:
            tensor = checkpoint.get(name)  # one tensor read at a time (memory-mapped)
            if name in pairs:
                tensor = merged_weight(tensor, *pairs[name], scaling, stored[name])
            tensors[name] = tensor.to(stored[name]).contiguous()
            weight_map[name] = file_name
        save_file(tensors, str(target / file_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (target / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(target))
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(str(target))
    except OSError:  # the original has none
        pass
    return None


def _plan_shards(names: list[str], sizes: dict[str, int], max_size: int) -> list[list[str]]:
    """Consecutive runs of ``names`` of at most ``max_size`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name in names:
        if shards[-1] and total + sizes[name] > max_size:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += sizes[name]
    return shards

