"""MEFT for pre-norm decoders (Llama, Qwen2, Mistral): a momentum coupling around each pretrained layer.

A Llama layer is h' = h + D(h), with the residual outside the sublayers (D = attention + MLP branch).
We keep two streams, the hidden state x and a velocity v (v = 0 at the embeddings), and make layer n

    v' = gamma * v + D_n(x)          (y1 = lam * x1 + F(x2), with x1 = v, x2 = x, lam = gamma, F = D_n)
    x' = x + v' + A_n(v')            (y2 = beta * x2 + G(y1), with beta = 1, G = identity + adapter A_n)

The output is x after the last layer. With A_n = 0 (zero-initialised up-projection) the first layer is
exactly the pretrained one, and after it x_{n+1} = h_{n+1} + gamma * v_n: each layer is the pretrained
layer plus gamma times the previous layer's update (a momentum residual network). gamma -> 0 gives back
the pretrained model exactly; the coupling stays invertible for gamma > 0:

    x = x' - v' - A_n(v'),   v = (v' - D_n(x)) / gamma

Only the velocity is divided, by gamma, so rounding errors grow like (1/gamma)^k over k layers
reconstructed in a row: see reversible.py for the two bounds (wide streams, stored segment boundaries).
BERT's MEFT1 (F = the whole post-norm layer, lam = 0.1) applied to a pre-norm layer would leak
0.1 x the previous hidden state into each layer's input instead: the hidden state itself, not an update,
which is why the coupling here moves the residual out of F.
"""

from __future__ import annotations

import torch

from .adapter import attach_adapters
from .reversible import MeftSettings  # noqa: F401 (re-exported: the settings of convert)

SUPPORTED = ("llama", "qwen2", "mistral")


def decoder_of(model):
    """The module holding ``layers`` (LlamaModel & co.), also inside peft wrappers."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList) and hasattr(module, "norm"):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder with .layers and .norm")


def add_adapters(model, dim: int) -> None:
    """Register A_n as ``layers[n].meft_adapter`` (saved by peft as a module to save)."""
    attach_adapters(decoder_of(model).layers, model.config.hidden_size, dim)


def convert(model, settings: MeftSettings):
    """Run ``model``'s decoder layers as momentum couplings (in place). Weights and names are unchanged."""
    decoder = decoder_of(model)
    if isinstance(decoder.layers, ReversibleLayers):
        decoder.layers.settings = settings
        return model
    decoder.layers = ReversibleLayers(decoder.layers, settings)
    return model


class ReversibleLayers(torch.nn.ModuleList):
    """The decoder's own layers (same state-dict names). The decoder's loop asks for
    ``self.layers[:num_hidden_layers]``: a slice returns one callable that runs those layers coupled."""

    def __init__(self, layers, settings: MeftSettings):
        super().__init__(layers)
        self.settings = settings

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [_Runner(list(self._modules.values())[idx], self.settings)]
        return super().__getitem__(idx)


class _Runner:
    def __init__(self, layers, settings):
        self.layers, self.settings = layers, settings
        # Qwen2/Mistral decoders pick the attention mask by the layer's attention type
        self.attention_type = getattr(layers[0], "attention_type", "full_attention") if layers else None

    def __call__(self, hidden_states, **kwargs):
        from .reversible import Coupling, run_couplings

        if torch.is_grad_enabled():
            # backward re-runs each layer: a KV cache would be appended to twice. Training needs none.
            # (transformers 5.24 renamed the layers' past_key_values argument to cache)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
            kwargs["use_cache"] = False
        dtype = hidden_states.dtype
        stream = self.settings.stream_dtype or dtype
        k = self.settings.reversible_layers
        couplings = [
            Coupling(f=_Branch(layer, kwargs, dtype, stream), g=_Gate(layer, dtype, stream),
                     lam=self.settings.gamma, beta=1.0,
                     params=[p for p in layer.parameters() if p.requires_grad],
                     reversible=k is None or i < k)
            for i, layer in enumerate(self.layers)
        ]
        x = hidden_states.to(stream)
        v = torch.zeros_like(x)
        v, x = run_couplings(v, x, couplings, self.settings.segment, self.settings.check)
        return x.to(dtype)


class _Branch:
    """F = D_n: the layer's update of x (its output minus its input), computed in the model's dtype."""

    def __init__(self, layer, kwargs, dtype, stream):
        self.layer, self.kwargs, self.dtype, self.stream = layer, kwargs, dtype, stream

    def __call__(self, x):
        xc = x.to(self.dtype)
        out = self.layer(xc, **self.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return (out - xc).to(self.stream)


class _Gate:
    """G = identity + A_n."""

    def __init__(self, layer, dtype, stream):
        self.adapter = getattr(layer, "meft_adapter", None)
        self.dtype, self.stream = dtype, stream

    def __call__(self, y):
        if self.adapter is None:
            return y
        return y + self.adapter(y.to(self.dtype)).to(self.stream)
