"""Which linear layers a method applies to: the ``*_target_modules`` flags share one syntax.

'all-linear' (every ``nn.Linear`` but the output head), comma-separated name parts (``q_proj,v_proj``:
a module matches when one of its dotted name parts, or its name's end, is listed), or a regex that
must match the whole module name. Light: no transformers import, so validation can call it.
"""

from __future__ import annotations

import re
from typing import Callable

from .errors import ConfigError


def module_matcher(spec: str, flag: str = "target_modules") -> Callable[[str], bool]:
    """module name -> bool. A bad regex raises ConfigError naming ``flag``."""
    if spec == "all-linear":
        return lambda name: True
    if re.fullmatch(r"[\w.]+(,[\w.]+)*", spec):
        parts = spec.split(",")
        return lambda name: any(part in name.split(".") or name.endswith(part) for part in parts)
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise ConfigError(f"{flag} is not a valid regex: {exc}") from exc
    return lambda name: pattern.fullmatch(name) is not None


def linear_weights(model, spec: str = "all-linear", flag: str = "target_modules", include_head: bool = False,
                   trainable_only: bool = True) -> dict:
    """``{parameter name: weight}`` of the ``nn.Linear`` layers ``spec`` selects, in model order.

    The output head (``get_output_embeddings()``) is left out unless ``include_head``; a head tied to
    the input embeddings is never an ``nn.Linear`` weight of its own, so it is not selected twice.
    """
    import torch

    matches = module_matcher(spec, flag)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (module is head and not include_head):
            continue
        if module is not head and not matches(name):
            continue
        if trainable_only and not module.weight.requires_grad:
            continue
        out[f"{name}.weight" if name else "weight"] = module.weight
    return out
