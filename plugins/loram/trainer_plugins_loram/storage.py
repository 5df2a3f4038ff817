"""Pruned models on disk and in 4 bits.

A structurally pruned model has different shapes per layer (the dense first/last layers keep theirs),
which no transformers config can describe. We save it as the original config + the weights + the index
file; loading builds the original architecture on the meta device, shrinks it with the index file and
reads the weights into it, so only the pruned weights are ever in memory (a pruned 70B loads in the
memory of its pruned size). The original itself is pruned the same way while it is read
(``load_pruned_original``): the scores read one layer's weights at a time (``Weights``), and then only the
kept rows and columns of each tensor are kept. 4-bit: the host's quantize_linears_4bit quantises the pruned
projections one by one on the target device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from .pruning import ATTENTION, INDEX_FILE, MLP, PruningPlan, decoder_layers

SINGLE_FILE, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class Checkpoint:
    """A model's safetensors files, read one tensor at a time (memory-mapped): names, stored dtypes and shapes
    from the headers, a tensor only when asked for."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files, self.where, self.dtypes, self.shapes = files, {}, {}, {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    self.where[name], self.shapes[name] = path, tuple(view.get_shape())
                    self.dtypes[name] = _DTYPES.get(view.get_dtype())  # None: a dtype torch has no name for here

    @classmethod
    def of(cls, source: str) -> Optional["Checkpoint"]:
        """The safetensors checkpoint of a model directory or hub name (from the local cache where it is, as
        ``from_pretrained`` finds it), or None when there is none (PyTorch .bin files only)."""
        from transformers.utils import cached_file
        from transformers.utils.hub import get_checkpoint_shard_files

        missing_ok = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        index = cached_file(source, SHARD_INDEX, **missing_ok)
        if index is not None:
            return cls([Path(f) for f in get_checkpoint_shard_files(source, index)[0]])
        single = cached_file(source, SINGLE_FILE, **missing_ok)
        return cls([Path(single)]) if single is not None else None

    def get(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One tensor; floating ones in ``dtype`` (as ``from_pretrained(dtype=...)`` holds them) when given."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


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
    checkpoint = Checkpoint.of(str(path))
    state = {name: checkpoint.get(name, dtype) for name in checkpoint.where}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not fit the pruned model (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model, plan


class Weights:
    """How the planner reaches the original's weights while the model is on the meta device: ``layer(i)``, the
    projections of decoder layer i read from the checkpoint (magnitude scores); ``load(module)`` /
    ``unload(module)``, a module's parameters (and buffers) put on ``device`` and taken off again (first-order
    scores, pruning.first_order_scores_by_layer)."""

    def __init__(self, model, checkpoint: Checkpoint, dtype: torch.dtype, device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self._names = {m: n for n, m in model.named_modules()}
        embeddings = model.get_input_embeddings()
        self._tied_head = model.config.tie_word_embeddings and f"{self._names[embeddings]}.weight"
        self._held: dict = {}  # module -> [(owner, kind, name, original tensor)] while loaded

    def layer(self, i: int):
        layer = SimpleNamespace(self_attn=SimpleNamespace(), mlp=SimpleNamespace())
        for sub, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            for proj in names:
                key = f"model.layers.{i}.{sub}.{proj}"
                bias = self.checkpoint.get(key + ".bias", self.dtype) if key + ".bias" in self.checkpoint.where else None
                setattr(getattr(layer, sub), proj, SimpleNamespace(weight=self.checkpoint.get(key + ".weight", self.dtype),
                                                                  bias=bias))
        return layer

    def load(self, module) -> None:
        prefix, held = self._names[module], []
        for name, param in module.named_parameters(remove_duplicate=False):
            key = f"{prefix}.{name}" if prefix else name
            if key not in self.checkpoint.where and self._tied_head:
                key = self._tied_head  # the head is the embeddings' tensor
            owner, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner)
            held.append((owner, "_parameters", leaf, param))
            owner._parameters[leaf] = torch.nn.Parameter(self.checkpoint.get(key, self.dtype).to(self.device),
                                                         requires_grad=False)
        for name, buffer in module.named_buffers():
            owner, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner)
            held.append((owner, "_buffers", leaf, buffer))
            owner._buffers[leaf] = buffer.to(self.device)
        self._held[module] = held

    def unload(self, module) -> None:
        for owner, kind, leaf, original in self._held.pop(module, []):
            getattr(owner, kind)[leaf] = original


def load_pruned_original(source: str, config, plan_for, dtype: torch.dtype, attn_implementation=None, device="cpu",
                         place=None):
    """(model, plan, (parameters before, after pruning)) with the original's weights read from its safetensors
    checkpoint tensor by tensor and pruned as they arrive: memory of the pruned model and one layer, not of
    the original. ``plan_for(meta_model, weights)`` makes the plan, reading the weights it scores through
    ``weights`` (a ``Weights`` on ``device``). ``place(model, layer)`` is called as each decoder layer's
    weights are in (QLoRAM quantises it onto the GPU there: the host then holds one layer, not the pruned
    model). None where the checkpoint cannot be read this way (no safetensors, names other than the model's, a
    quantised checkpoint); the caller then loads the whole original."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    if getattr(config, "quantization_config", None):  # packed weights: from_pretrained's quantiser reads them
        return None
    checkpoint = Checkpoint.of(source)
    if checkpoint is None:
        return None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()  # a tied head counts once, as in the loaded original
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(model.state_dict()) - tied - set(checkpoint.where) or None in checkpoint.dtypes.values():
        return None
    before = sum(p.numel() for p in model.parameters())

    plan = plan_for(model, Weights(model, checkpoint, dtype, device))
    if plan.structured:
        plan.apply(model)  # shrinks the empty projections
    after = sum(p.numel() for p in model.parameters())
    layers = {f"model.layers.{i}.": layer for i, layer in enumerate(decoder_layers(model))}
    state, current = {}, None
    for name in list(model.state_dict()) + [None]:  # in the model's order: one decoder layer after another
        layer = next((prefix for prefix in layers if name and name.startswith(prefix)), None)
        if current is not None and layer != current:  # decoder layer ``current`` is complete
            model.load_state_dict(state, strict=False, assign=True)
            state = {}
            if place is not None:
                place(model, layers[current])
        current = layer
        if name is None or name in tied:
            continue
        tensor = checkpoint.get(name, dtype)
        module, _, kind = name.rpartition(".")
        rows, cols = plan.kept_rows_cols(module)
        if rows is not None:
            tensor = tensor.index_select(0, rows)
        if cols is not None and kind == "weight":
            tensor = tensor.index_select(1, cols)
        if module in plan.masks and kind == "weight":  # unstructured / N:M: zeros, same shapes (biases kept)
            tensor = tensor * plan.masks[module].to(tensor.dtype)
        state[name] = tensor.contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config._name_or_path = model.name_or_path = source
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # the original has none
        pass
    return model.eval(), plan, (before, after)


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
