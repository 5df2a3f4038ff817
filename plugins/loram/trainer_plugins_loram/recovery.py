"""Recovery: LoRA factors trained on the pruned model -> the original model's shapes. Plain torch.

For a projection whose output rows were pruned (q/k/v, gate/up) B grows rows; for one whose input
columns were pruned (o, down) A grows columns. The new entries are zero (the paper's default 'zeroA'),
so ΔW = (α/r)·B·A is the pruned model's ΔW on the kept rows/columns and zero on the pruned ones, and the
original model's pruned units get no update. Non-structured pruning keeps shapes: recovery is the identity.
"""

from __future__ import annotations

import re

import torch

from .pruning import PruningPlan

# peft's saved keys: "base_model.model.<module>.lora_A.weight" (adapter name stripped).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_IDENTITY = ("lora_embedding_A", "lora_embedding_B")


def recover_state_dict(state: dict[str, torch.Tensor], plan: PruningPlan) -> dict[str, torch.Tensor]:
    """The adapter state dict (peft's saved format) with every factor at the original model's shape."""
    out = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            if not any(part in key for part in _IDENTITY):
                raise ValueError(f"LoRAM cannot recover adapter tensor '{key}': only LoRA A/B factors are "
                                 "supported (no DoRA magnitudes, no modules_to_save)")
            out[key] = tensor
            continue
        rows, cols = plan.kept_rows_cols(match["module"])
        out[key] = _expand(tensor, match["factor"], rows, cols, plan, match["module"])
    return out


def _expand(t: torch.Tensor, factor: str, rows, cols, plan: PruningPlan, module: str) -> torch.Tensor:
    g = plan.geometry
    if factor == "lora_B" and rows is not None:
        full = t.new_zeros(_full_size(module, g, "out"), t.shape[1])
        full[rows.to(t.device)] = t
        return full
    if factor == "lora_A" and cols is not None:
        full = t.new_zeros(t.shape[0], _full_size(module, g, "in"))
        full[:, cols.to(t.device)] = t
        return full
    return t


def _full_size(module: str, g, side: str) -> int:
    proj = module.rsplit(".", 1)[-1]
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    sizes = {"q_proj": (q, g.hidden_size), "k_proj": (kv, g.hidden_size), "v_proj": (kv, g.hidden_size),
             "o_proj": (g.hidden_size, q), "gate_proj": (g.intermediate_size, g.hidden_size),
             "up_proj": (g.intermediate_size, g.hidden_size), "down_proj": (g.hidden_size, g.intermediate_size)}
    return sizes[proj][0 if side == "out" else 1]
