"""The ladder side network (plain torch; no Trainer import) and how it rides along a frozen backbone.

Per forward pass, with h^b_i the output of backbone layer i and h^s the side stream (width d/r):

    h^s   = Down_0(h^b_in)                                   the backbone's embeddings (input of layer 0)
    for each layer i that has a side block:
        mu_i  = sigmoid(alpha_i / T)                         learnable gate, alpha_i = 0 -> mu = 0.5
        h^s   = mu_i * h^s + (1 - mu_i) * Down_i(h^b_i)       the ladder
        h^s   = SideBlock_i(h^s)                             the backbone's own layer class at width d/r
    out   = h^b_last + Up(norm(h^s))   (merge="add")   or   Up(norm(h^s))   (merge="none", the paper's LST)

and ``out`` replaces the last backbone layer's output, so the model's own final norm, head, loss and
``generate()`` run unchanged. The side network is attached with forward hooks on the backbone's layers
(``attach``): the backbone's hidden states enter the side network detached, and the backbone has no
parameter that requires grad, so autograd records nothing inside the backbone and keeps none of its
activations; backpropagation runs through the side network, the ladders and the frozen head only.

The side layers' attention reuses the mask (and KV cache) the backbone built for the same layer; their KV
entries live in the same cache object at layer index ``n_backbone_layers + k``, so beam search and cache
cropping treat both networks alike.

``attach(..., compile=True)`` (the flag lst_compile) cuts the per-step launch and dispatch overhead of the many
small side-layer ops: every rung (downsample + gate + side layer) runs as one torch.compile graph, forward and
backward, and every backbone layer's forward as another; both graphs are shared by all layers, since their
code and tensor shapes are the same and nothing per-layer is read in them. That holds for steps that
backpropagate (grad enabled): those keep no KV cache (nothing reads it, and each layer's cache slot would
specialise the graphs per layer). Evaluation and generation, with their caches and changing lengths, run eagerly.

``attach(..., compile=True, cuda_graphs=True)`` (lst_cuda_graphs) compiles them with mode "reduce-overhead": on a
GPU, CUDA graph trees record the step's chain of graphs (backbone layer, rung, ..., then the rungs' backward) once
and replay each with one launch, where a compiled step still issues ~2,800 kernels from Python. Gradients the
replayed backward produces live in the graphs' memory pool, which the next micro-batch reuses; so that gradient
accumulation adds into memory of its own, every forward that will backpropagate gives the side network's
parameters zeroed ``.grad`` buffers first (one flat allocation) where they have none; with one backward per
optimizer step the gradients may stay in the pool (the optimizer uses them and zero_grad drops them before the next
replay), which spares the adds.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn
from transformers import AttentionInterface


def side_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with the KV heads repeated first (the side attention modules say
    ``num_key_value_groups = 1``), so that no ``enable_gqa`` reaches the kernel: float32 grouped-query
    attention would otherwise run on the math kernel (see families.side_config)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = query.shape[1] // key.shape[1]
    return sdpa_attention_forward(module, query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask,
                                  **kwargs)


SIDE_SDPA = "lst_side_sdpa"
AttentionInterface.register(SIDE_SDPA, side_sdpa)  # the name side configs of GQA backbones use (families.py)


def rotary(inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype):
    """(cos, sin) of RoPE for the given frequencies (the convention of transformers' rotate_half)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class SideStep(nn.Module):
    """One rung of the ladder: gate the downsampled backbone state into the side stream, run the side block.

    Holds its gate as its own parameter so that ZeRO-3 gathers it when this module runs."""

    def __init__(self, block: nn.Module, d_backbone: int, d_side: int, rope_pairs: int, rope_scaling: float,
                 temperature: float, alpha: float):
        super().__init__()
        self.down = nn.Linear(d_backbone, d_side)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))  # 1-d: DeepSpeed cannot broadcast 0-d tensors
        self.block = block
        self.temperature = temperature
        self.rope_scaling = rope_scaling
        # RoPE frequencies of the side heads: a subset of the backbone's (pruning.py picks which); saved.
        self.register_buffer("inv_freq", torch.zeros(rope_pairs) if rope_pairs else None, persistent=True)

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha / self.temperature)

    def forward(self, stream: torch.Tensor, backbone: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        mu = self.gate()
        stream = mu * stream + (1 - mu) * self.down(backbone.to(self.down.weight.dtype))
        if self.inv_freq is not None:
            kwargs = dict(kwargs, position_embeddings=rotary(self.inv_freq, _positions(kwargs, stream),
                                                             self.rope_scaling, stream.dtype))
        out = self.block(stream, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class SideOutput(nn.Module):
    """Final side norm and the upsample back to the backbone's width, merged with its last hidden state."""

    def __init__(self, norm: Optional[nn.Module], d_side: int, d_backbone: int, merge: str):
        super().__init__()
        self.norm = norm
        self.up = nn.Linear(d_side, d_backbone)
        self.merge = merge

    def forward(self, stream: torch.Tensor, backbone: torch.Tensor) -> torch.Tensor:
        side = self.up(self.norm(stream) if self.norm is not None else stream)
        out = backbone.to(side.dtype) + side if self.merge == "add" else side
        return out.to(backbone.dtype)


class LadderSide(nn.Module):
    """The side network: the first downsample, one ``SideStep`` per chosen backbone layer, the output."""

    def __init__(self, d_backbone: int, d_side: int, layer_ids: list[int], steps: list[SideStep],
                 output: SideOutput, n_backbone_layers: int):
        super().__init__()
        self.first = nn.Linear(d_backbone, d_side)
        self.steps = nn.ModuleList(steps)
        self.output = output
        self.layer_ids = list(layer_ids)
        self.n_backbone_layers = n_backbone_layers
        self.record: dict = {}  # how it was built and initialised (saved with it)
        self._stream: Optional[torch.Tensor] = None
        self._handles: list = []
        self._compiled_step = None  # torch.compile(_run_step) when attached with compile=True
        self._compiled_layers: list = []  # (backbone layer, its own instance forward or None): compile_layers
        self._own_grads = False  # give parameters .grad buffers before a forward that backpropagates (cuda_graphs)

    # -- hooks on the backbone's layers ----------------------------------------------------------------
    def _start(self, module, args, kwargs):
        """Pre-hook of backbone layer 0: detach its input (nothing upstream may build a graph) and start
        the side stream from it."""
        hidden, args, kwargs = _hidden_of(args, kwargs)
        hidden = hidden.detach()
        if self._own_grads and torch.is_grad_enabled():
            self._give_grad_buffers()
        self._stream = self.first(hidden.to(self.first.weight.dtype))
        return _with_hidden(hidden, args, kwargs)

    def _rung(self, index: Optional[int], last: bool):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if index is not None:
                _, rest, kw = _hidden_of(args, kwargs)
                _ensure_cache_layers(_cache_of(kw), self.n_backbone_layers + len(self.steps))
                self._stream = self._step(index, hidden, rest, kw)
            if not last:
                return None
            merged = self.output(self._stream, hidden)
            self._stream = None
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook

    def _give_grad_buffers(self) -> None:
        """Zeroed ``.grad`` for the trainable parameters that have none, as views of one buffer per dtype: the
        backward then adds into them instead of keeping tensors of the CUDA graphs' pool (see the docstring)."""
        missing = [p for p in self.parameters() if p.requires_grad and p.grad is None]
        for dtype in {p.dtype for p in missing}:
            group = [p for p in missing if p.dtype == dtype]
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
            for p, grad in zip(group, flat.split([p.numel() for p in group])):
                p.grad = grad.view_as(p)

    def _step(self, index: int, backbone: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        step = self.steps[index]
        if self._compiled_step is not None and torch.is_grad_enabled():
            return self._compiled_step(step, self._stream, backbone, args, _without_cache(kwargs))
        return step(self._stream, backbone, args, kwargs)


def attach(model, side: LadderSide, layers, compile: bool = False, cuda_graphs: bool = False,
           grad_buffers: Optional[bool] = None) -> None:
    """Put ``side`` on ``model`` (as ``model.lst_side``) and hook it onto the backbone ``layers``; with
    ``compile``, training steps run the rungs and the backbone layers compiled, with ``cuda_graphs`` replayed as CUDA
    graphs (see the module's docstring; without ``compile``, ``cuda_graphs`` says the caller compiles the whole model
    for CUDA graphs). ``grad_buffers`` (default: ``cuda_graphs``) gives the side parameters gradient buffers of their
    own before each forward; only gradient accumulation needs them (one backward per step may keep the pool's)."""
    detach(model)
    side.train(model.training)
    model.add_module("lst_side", side)
    last = len(layers) - 1
    side._handles.append(layers[0].register_forward_pre_hook(side._start, with_kwargs=True))
    rungs = {layer: k for k, layer in enumerate(side.layer_ids)}
    for i in sorted(set(rungs) | {last}):
        side._handles.append(layers[i].register_forward_hook(side._rung(rungs.get(i), i == last), with_kwargs=True))
    side._own_grads = cuda_graphs if grad_buffers is None else grad_buffers
    if compile and side.first.weight.device.type != "meta":  # estimates (meta device) follow eager tensors
        mode = "reduce-overhead" if cuda_graphs else None  # CUDA graph trees; on a CPU the same as the default
        side._compiled_step = torch.compile(_run_step, mode=mode)
        compile_layers(side, layers, mode)


def compile_layers(side: LadderSide, layers, mode: Optional[str] = None) -> None:
    """Replace each backbone layer's ``forward`` (hooks stay outside, eager) by one that runs compiled in steps
    that backpropagate; ``detach`` restores them."""
    for layer in layers:
        # a forward set on the instance (accelerate's device hooks) is wrapped, and put back by detach
        side._compiled_layers.append((layer, layer.__dict__.get("forward")))
        layer.forward = _compiled_when_training(layer.forward, mode)


def _compiled_when_training(forward, mode: Optional[str] = None):
    compiled = torch.compile(forward, mode=mode)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return compiled(*args, **_without_cache(kwargs))

    return run


def _run_step(step: SideStep, stream, backbone, args, kwargs):
    """What one rung computes, as a plain function: torch.compile keys its graphs by code, so this one graph
    (and its guards) serves every SideStep alike."""
    return step(stream, backbone, args, kwargs)


def detach(model) -> Optional[LadderSide]:
    """Remove the side network's hooks and the module; the backbone computes as before. Returns the side."""
    side = side_of(model)
    if side is None:
        return None
    for handle in side._handles:
        handle.remove()
    side._handles.clear()
    for layer, own in side._compiled_layers:
        if own is None:
            del layer.forward  # the class's forward again
        else:
            layer.forward = own
    side._compiled_layers.clear()
    side._compiled_step = None
    side._own_grads = False
    del model.lst_side
    return side


def side_of(model) -> Optional[LadderSide]:
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return getattr(model, "lst_side", None)


# -- helpers ---------------------------------------------------------------------------------------------
def _hidden_of(args: tuple, kwargs: dict[str, Any]):
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _with_hidden(hidden, args, kwargs):
    if args or "hidden_states" not in kwargs:
        return (hidden, *args), kwargs
    return args, dict(kwargs, hidden_states=hidden)


def _positions(kwargs: dict, stream: torch.Tensor) -> torch.Tensor:
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs.get("cache_position")  # transformers versions that pass this instead
        positions = positions[None] if positions is not None else torch.arange(stream.shape[1], device=stream.device)[None]
    return positions


def _without_cache(kwargs: dict) -> dict:
    """A layer's keyword arguments without the KV cache, under either name (see _cache_of)."""
    return {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}


def _cache_of(kwargs: dict):
    """The KV cache a layer was given: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _ensure_cache_layers(cache, n: int) -> None:
    """Give a (config-sized) KV cache slots for the side layers, after the backbone's."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) >= n or getattr(cache, "layer_class_to_replicate", None) is not None:
        return
    from transformers.cache_utils import DynamicLayer

    if type(layers[0]).__name__ != "DynamicLayer":
        raise NotImplementedError(f"lst: the side network needs a dynamic KV cache, not {type(layers[0]).__name__}")
    while len(layers) < n:
        layers.append(DynamicLayer())
