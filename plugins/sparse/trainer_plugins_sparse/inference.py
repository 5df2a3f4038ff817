"""2:4 sparse weights for inference: torch's semi-structured sparse kernels (CUDA, fp16/bf16).

A model trained with ``sparse_structure 2:4`` and final sparsity 0.5 has exactly two non-zeros in
every four weights along each row of its pruned linear layers; ``to_semi_structured`` swaps those
weights for ``torch.sparse.SparseSemiStructuredTensor`` so their matmuls run on sparse tensor cores.
Inference only (the sparse weights take no gradient). Measured by benchmarks/sparse_semi_structured.py: on one
H200 with torch 2.11 (1B Llama shape, bf16, batch 8) the converted model was SLOWER than dense (prefill 0.28x,
decoding 0.08x), so nothing converts by default; measure on your stack before relying on it.
"""

from __future__ import annotations

import torch


def is_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most n non-zeros in every m consecutive weights along each row."""
    if weight.dim() != 2 or weight.shape[-1] % m:
        return False
    return bool(((weight != 0).reshape(-1, m).sum(-1) <= n).all())


def to_semi_structured(model: torch.nn.Module) -> list[str]:
    """Convert every 2:4-sparse linear weight of ``model`` (on a CUDA GPU, fp16/bf16) in place; returns
    the converted module names. Weights that are not 2:4, or whose shapes torch's kernels refuse, stay dense."""
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured kernels need a CUDA GPU (compute capability 8.0+)")
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        if not is_n_m(weight.detach()):
            continue
        try:
            sparse = to_sparse_semi_structured(weight.detach())
        except (RuntimeError, ValueError):  # shape constraints (e.g. rows/cols multiples of 64/128)
            continue
        module.weight = torch.nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted
