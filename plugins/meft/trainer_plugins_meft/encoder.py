"""MEFT1/2/3 for post-norm encoders (BERT, RoBERTa), as in the paper.

The embeddings' output h0 is duplicated into two streams (x1, x2) = (h0, h0); each layer becomes

    y1 = lam * x1 + F(x2)
    y2 = beta * x2 + G(y1)

| variant | F | G | lam | beta | next layer gets |
|---|---|---|---|---|---|
| meft1 | the whole layer | adapter | gamma | 1 | (y2, y1) |
| meft2 | adapter | the whole layer | 1 | gamma | (y2, y1) |
| meft3 | attention block | MLP block | gamma | gamma | (y1, y2) |

A BERT layer keeps its residual and LayerNorm inside (post-norm), so F(x2) already contains x2 and the
"whole layer" can be F or G as it is. The trainable parts: peft LoRA inside the pretrained layers (the
paper puts bottleneck adapters there), the adapter of MEFT1/MEFT2, the task head.

Which stream carries the pretrained chain h_n = Layer_n(h_{n-1}): the output of the whole layer
(meft1: y1, meft2: y2) or of the MLP block (meft3: y2). With the adapter's up-projection at zero and
gamma -> 0 that stream is exactly h_n, so its last value is the encoder's output by default
(``output="chain"``): the converted model starts at the pretrained one up to O(gamma). The paper
outputs the mean of the two streams (``output="mean"``), which mixes h_N with a neighbouring
representation (h_{N-1} for meft1/2, the last attention output for meft3): a different function at the
start, left to the new task head to absorb.
"""

from __future__ import annotations

import torch

from .adapter import attach_adapters
from .reversible import Coupling, MeftSettings, run_couplings

SUPPORTED = ("bert", "roberta")
VARIANTS = ("meft1", "meft2", "meft3")
OUTPUTS = ("chain", "mean")
_DECODER_ONLY_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "use_cache")


def encoder_of(model):
    """The BertEncoder/RobertaEncoder (a module with a ``layer`` list), also inside peft wrappers."""
    for module in model.modules():
        if isinstance(getattr(module, "layer", None), torch.nn.ModuleList) and type(module).__name__.endswith("Encoder"):
            return module
    raise ValueError(f"{type(model).__name__} has no encoder with a .layer list")


def needs_adapter(variant: str) -> bool:
    return variant in ("meft1", "meft2")


def add_adapters(model, dim: int) -> None:
    """Register the MEFT1 G / MEFT2 F adapter as ``layer[n].meft_adapter``."""
    attach_adapters(encoder_of(model).layer, model.config.hidden_size, dim)


def convert(model, settings: MeftSettings):
    """Run ``model``'s encoder layers as couplings (in place; weights and state-dict names unchanged):
    the encoder's class becomes a subclass whose forward runs the stack."""
    if settings.variant not in VARIANTS or settings.output not in OUTPUTS:
        raise ValueError(f"variant must be one of {VARIANTS} and output one of {OUTPUTS}")
    encoder = encoder_of(model)
    if not isinstance(encoder, _ReversibleEncoder):
        encoder.__class__ = _reversible_class(type(encoder))
    encoder.meft_settings = settings
    return model


_CLASSES: dict = {}


def _reversible_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Reversible{cls.__name__}", (_ReversibleEncoder, cls), {})
    return _CLASSES[cls]


class _ReversibleEncoder(torch.nn.Module):
    """Mixed in before BertEncoder/RobertaEncoder: the same signature, the layers run coupled."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        kwargs = {k: v for k, v in kwargs.items() if k not in _DECODER_ONLY_KWARGS}
        s = self.meft_settings
        dtype = hidden_states.dtype
        stream = s.stream_dtype or dtype
        variant = s.variant
        small = s.gamma
        lam, beta = {"meft1": (small, 1.0), "meft2": (1.0, small), "meft3": (small, small)}[variant]
        couplings = []
        for i, layer in enumerate(self.layer):
            whole = _Sub(lambda x, layer=layer: _first(layer(x, attention_mask, **kwargs)), dtype, stream)
            # no adapter (meft_adapter_dim 0): that side of the coupling is the zero function
            adapter = _Sub(getattr(layer, "meft_adapter", torch.zeros_like), dtype, stream)
            f, g = {
                "meft1": (whole, adapter),
                "meft2": (adapter, whole),
                "meft3": (_Sub(lambda x, layer=layer: _first(layer.attention(x, attention_mask, **kwargs)), dtype, stream),
                          _Sub(lambda y, layer=layer: layer.feed_forward_chunk(y), dtype, stream)),
            }[variant]
            couplings.append(Coupling(
                f=f, g=g, lam=lam, beta=beta, swap=variant != "meft3",
                params=[p for p in layer.parameters() if p.requires_grad],
                reversible=s.reversible_layers is None or i < s.reversible_layers))
        h0 = hidden_states.to(stream)
        x1, x2 = run_couplings(h0, h0.clone(), couplings, s.segment, s.check)
        if s.output == "mean":
            out = (x1 + x2) / 2
        else:  # the chain: y1 (meft1, swapped into x2), y2 (meft2, swapped into x1), y2 (meft3, in x2)
            out = x1 if variant == "meft2" else x2
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out.to(dtype))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _Sub:
    """A sublayer applied in the model's dtype to a stream kept in the stream dtype."""

    def __init__(self, fn, dtype, stream):
        self.fn, self.dtype, self.stream = fn, dtype, stream

    def __call__(self, x):
        return self.fn(x.to(self.dtype)).to(self.stream)
