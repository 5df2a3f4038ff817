"""The bottleneck adapter MEFT adds to each layer (G for MEFT1, F for MEFT2)."""

from __future__ import annotations

import torch


class RevAdapter(torch.nn.Module):
    """d -> r -> d bottleneck. The up-projection starts at zero, so the adapter starts as 0 and the
    converted model starts at the pretrained one (the paper draws both matrices from N(0, 0.02²))."""

    def __init__(self, hidden: int, dim: int, dtype=None, device=None):
        super().__init__()
        self.down = torch.nn.Linear(hidden, dim, bias=False, dtype=dtype, device=device)
        self.up = torch.nn.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        torch.nn.init.normal_(self.down.weight, std=0.02)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(torch.nn.functional.silu(self.down(x)))


def attach_adapters(layers, hidden: int, dim: int) -> None:
    """Register a RevAdapter as ``layer.meft_adapter`` on each layer, in the layer's float dtype (a 4-bit
    layer's packed weights are uint8; its norms keep the compute dtype), on the layer's device."""
    for layer in layers:
        reference = next(p for p in layer.parameters() if p.is_floating_point())
        layer.meft_adapter = RevAdapter(hidden, dim, dtype=reference.dtype, device=reference.device)
