"""Pruning a Llama-family decoder for LoRAM. Plain torch: no Trainer, no peft.

Structured pruning removes whole units, so the pruned model is smaller and faster:
  - attention: whole KV heads together with the group of query heads that read them (GQA-aware), i.e.
    rows of q/k/v (and their biases) and the matching columns of o; head_dim is unchanged;
  - MLP: intermediate neurons, i.e. rows of gate/up and columns of down.
Layers can be kept dense at both ends (the paper keeps the first 4 and last 2 of LLaMA-3.1-70B's 80).

Non-structured pruning (N:M like 2:4, or unstructured) zeroes weights and keeps every shape, so the LoRA
trained on it recovers as the identity.

Importance of a unit (structured) sums an element score over every weight of the unit:
  magnitude    w²            (the unit's squared L2 norm)
  first_order  |w · ∂L/∂w|   (LLM-Pruner's element-wise first-order Taylor term, from calibration batches)
  random       a seeded uniform score per unit
Non-structured: magnitude |w|, wanda |w|·‖x_j‖₂ (input activation norms from calibration batches), random;
weights are compared within each output row (Wanda's rule), or within each group of M (N:M).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

# Llama, Mistral, Qwen2 and Qwen3 decoder layers share the module names and the attention reshape
# (heads = -1), so removing rows/columns is all it takes.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP
IMPORTANCE = ("magnitude", "first_order", "random", "wanda")
INDEX_FILE = "loram_pruning.safetensors"


@dataclass(frozen=True)
class Geometry:
    """The original (unpruned) shapes: what recovery expands back to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        return cls(num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate_size=config.intermediate_size, hidden_size=config.hidden_size)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def kept_count(n: int, ratio: float, multiple: int = 1) -> int:
    """Units kept out of n when a fraction ``ratio`` is removed (rounded, at least one). With ``multiple`` > 1
    and n a multiple of it, the count is rounded to a multiple too (at least one multiple): matmuls whose inner
    dimension is, say, 3853 miss tensor-core tiles and bitsandbytes' fast 4-bit kernel (it warned so on the
    GPU, and a 65% pruned 1B model trained slower than a 50% one)."""
    kept = min(n, max(1, int(n * (1.0 - ratio) + 0.5)))
    if multiple > 1 and n % multiple == 0:
        kept = min(n, max(multiple, int(kept / multiple + 0.5) * multiple))
    return kept


def parse_pruning(kind: str) -> Optional[tuple[int, int]]:
    """'structured' / 'unstructured' -> None; 'N:M' -> (N, M). Raises ValueError."""
    if kind in ("structured", "unstructured"):
        return None
    n, m = (int(x) for x in kind.split(":"))
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {kind}")
    return n, m


def decoder_layers(model) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.layers


def pruned_layers(num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, num_layers - keep_last))


def _head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head)).flatten()


@dataclass
class PruningPlan:
    """What was pruned, exactly: enough to rebuild the pruned model from the original weights and to
    recover adapters to the original shapes. Saved as a safetensors index file (INDEX_FILE)."""

    kind: str  # "structured", "unstructured" or "N:M"
    geometry: Geometry
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept KV heads (sorted)
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept intermediate neurons
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> bool mask (True = kept)
    settings: dict = field(default_factory=dict)  # how it was made (importance, ratios, calibration)

    @property
    def structured(self) -> bool:
        return self.kind == "structured"

    # -- which rows/columns of a module survive -----------------------------------------------------
    def kept_rows_cols(self, module_name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(kept output rows, kept input columns) of a projection in the ORIGINAL model, None = all kept.
        ``module_name`` is relative to the causal LM (``model.layers.3.self_attn.q_proj``)."""
        if not self.structured:
            return None, None
        parts = module_name.split(".")
        if "layers" not in parts or parts[-1] not in PROJECTIONS:
            return None, None
        layer = int(parts[parts.index("layers") + 1])
        g, hd, proj = self.geometry, self.geometry.head_dim, parts[-1]
        if proj in ATTENTION and layer in self.kv_heads:
            heads = self.kv_heads[layer]
            q = _head_rows(heads, g.group * hd)
            return {"q_proj": (q, None), "k_proj": (_head_rows(heads, hd), None),
                    "v_proj": (_head_rows(heads, hd), None), "o_proj": (None, q)}[proj]
        if proj in MLP and layer in self.neurons:
            n = self.neurons[layer]
            return (None, n) if proj == "down_proj" else (n, None)
        return None, None

    # -- applying it --------------------------------------------------------------------------------
    def apply(self, model) -> None:
        """Prune ``model`` (the original) in place: shrink the projections, or zero the masked weights."""
        for i, layer in enumerate(decoder_layers(model)):
            for name, module in _projections(layer, f"model.layers.{i}"):
                if self.structured:
                    rows, cols = self.kept_rows_cols(name)
                    _shrink(module, rows, cols)
                elif name in self.masks:
                    with torch.no_grad():
                        module.weight.mul_(self.masks[name].to(module.weight.device, module.weight.dtype))

    def mask_units(self, model) -> None:
        """Zero the pruned units of the ORIGINAL model in place, keeping its shapes: it then computes
        exactly what the pruned model computes (used to check recovery)."""
        for i, layer in enumerate(decoder_layers(model)):
            for name, module in _projections(layer, f"model.layers.{i}"):
                rows, cols = self.kept_rows_cols(name)
                with torch.no_grad():
                    if rows is not None:
                        keep = torch.zeros(module.out_features, dtype=torch.bool)
                        keep[rows] = True
                        module.weight[~keep] = 0
                        if module.bias is not None:
                            module.bias[~keep] = 0
                    if cols is not None:
                        keep = torch.zeros(module.in_features, dtype=torch.bool)
                        keep[cols] = True
                        module.weight[:, ~keep] = 0
                    if name in self.masks:
                        module.weight.mul_(self.masks[name].to(module.weight.dtype))

    # -- the index file -----------------------------------------------------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {f"layers.{i}.kv_heads": t.to(torch.int64).contiguous() for i, t in self.kv_heads.items()}
        tensors.update({f"layers.{i}.neurons": t.to(torch.int64).contiguous() for i, t in self.neurons.items()})
        shapes = {}
        for name, mask in self.masks.items():
            tensors[f"{name}.mask"] = _pack_bits(mask)
            shapes[name] = list(mask.shape)
        meta = {"format": "loram", "kind": self.kind, "geometry": json.dumps(asdict(self.geometry)),
                "mask_shapes": json.dumps(shapes), "settings": json.dumps(self.settings)}
        save_file(tensors, str(path), metadata=meta)

    @staticmethod
    def _metadata(f, path) -> dict:
        meta = f.metadata() or {}
        if meta.get("format") != "loram":
            raise ValueError(f"{path} is not a LoRAM pruning index file")
        return meta

    @classmethod
    def read_geometry(cls, path) -> Geometry:
        """The original model's geometry, from the file's header only (no tensors read: cheap to validate)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return Geometry(**json.loads(cls._metadata(f, path)["geometry"]))

    @classmethod
    def load(cls, path) -> "PruningPlan":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = cls._metadata(f, path)
            plan = cls(kind=meta["kind"], geometry=Geometry(**json.loads(meta["geometry"])),
                       settings=json.loads(meta.get("settings", "{}")))
            shapes = json.loads(meta.get("mask_shapes", "{}"))
            for key in f.keys():
                if key.endswith(".kv_heads"):
                    plan.kv_heads[int(key.split(".")[1])] = f.get_tensor(key)
                elif key.endswith(".neurons"):
                    plan.neurons[int(key.split(".")[1])] = f.get_tensor(key)
                elif key.endswith(".mask"):
                    name = key[: -len(".mask")]
                    plan.masks[name] = _unpack_bits(f.get_tensor(key), shapes[name])
        return plan

    def summary(self) -> dict:
        g = self.geometry
        out = {"kind": self.kind, "pruned_layers": sorted(set(self.kv_heads) | set(self.neurons))}
        if self.structured:
            out["kv_heads_kept"] = {i: int(t.numel()) for i, t in sorted(self.kv_heads.items())}
            out["neurons_kept"] = {i: int(t.numel()) for i, t in sorted(self.neurons.items())}
            out["original"] = {"kv_heads": g.num_kv_heads, "neurons": g.intermediate_size}
        else:
            kept = sum(int(m.sum()) for m in self.masks.values())
            total = sum(m.numel() for m in self.masks.values())
            out["pruned_layers"] = sorted({int(n.split(".")[2]) for n in self.masks})
            out["sparsity_of_pruned_weights"] = 1.0 - kept / total if total else 0.0
        return out


def _projections(layer, prefix: str):
    for sub, names in (("self_attn", ATTENTION), ("mlp", MLP)):
        parent = getattr(layer, sub)
        for proj in names:
            yield f"{prefix}.{sub}.{proj}", getattr(parent, proj)


def _shrink(linear: nn.Linear, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> None:
    if rows is None and cols is None:
        return
    with torch.no_grad():
        weight, bias = linear.weight, linear.bias
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
            bias = bias.index_select(0, rows.to(bias.device)) if bias is not None else None
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    bits = (packed[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    n = 1
    for s in shape:
        n *= s
    return bits.flatten()[:n].bool().view(shape)


# -- importance ---------------------------------------------------------------------------------------
def _first_order_grads(model, layers: list[int], batches: Iterable[torch.Tensor]) -> None:
    """Accumulate ∂L/∂w of the pruned layers' projections over the calibration batches (LM loss)."""
    if not layers:
        return
    targets = [m.weight for i in layers for _, m in _projections(decoder_layers(model)[i], "")]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the score must not depend on the RNG
    for p in model.parameters():
        p.requires_grad_(False)
    for p in targets:
        p.requires_grad_(True)
        p.grad = None
    try:
        device = next(model.parameters()).device
        for ids in batches:
            ids = ids.to(device)
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)


def first_order_scores_by_layer(model, layers: list[int], batches: Iterable[torch.Tensor], load, unload,
                                device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The first-order unit scores of ``layers`` (what structured_plan computes with ``first_order``) with one
    decoder layer's weights at a time: ``load(module)`` puts a module's weights on ``device``, ``unload(module)``
    takes them off again. The model's own forward runs once per batch with its decoder layers stubbed out, to
    record the embeddings and each layer's keyword arguments (masks, rotary embeddings); then each layer is
    loaded once and run on every batch without autograd, its inputs kept on the CPU; the loss's gradient at
    the last layer's output is carried down one layer at a time, each layer's forward recomputed from its
    kept input and its weight gradients summed over the batches in order. The same arithmetic as one backward
    pass through the whole model per batch, so the same scores; the memory is one layer, the embeddings and the
    head, plus the layer inputs; the checkpoint is read about twice. Returns {layer: (per KV head, per neuron)}."""
    if not layers:
        return {}
    g = Geometry.from_config(model.config)
    decoder, base = decoder_layers(model), model.get_decoder()
    batches, lowest = list(batches), min(layers)
    outer = [m for m in (base.embed_tokens, base.norm, model.get_output_embeddings(), getattr(base, "rotary_emb", None))
             if m is not None]
    calls: dict[int, list] = {i: [] for i in range(len(decoder))}  # per layer, per batch: (args, kwargs)
    states: list[torch.Tensor] = []  # per batch: the input of the layer being run (on the CPU)

    def record(i):
        def forward(hidden, *args, **kwargs):
            if i == 0:
                states.append(hidden.to("cpu"))
            calls[i].append((args, kwargs))
            return hidden
        return forward

    def load_frozen(module):  # only the scored projections' weights take gradients
        load(module)
        module.requires_grad_(False)

    def run(layer, hidden, args, kwargs):
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    was_training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    own_forwards = [layer.__dict__.get("forward") for layer in decoder]
    model.eval()  # no dropout: the score must not depend on the RNG
    model.requires_grad_(False)
    scores, inputs = {}, {}
    try:
        for module in outer:
            load_frozen(module)
        for i, layer in enumerate(decoder):
            layer.forward = record(i)
        with torch.no_grad():
            for ids in batches:
                base(input_ids=ids.to(device), use_cache=False)
            for i, (layer, own) in enumerate(zip(decoder, own_forwards)):
                _restore_forward(layer, own)
                load_frozen(layer)
                if i >= lowest:
                    inputs[i] = states
                states = [run(layer, h.to(device), *call).to("cpu") for h, call in zip(states, calls[i])]
                unload(layer)
        grads = []
        for ids, hidden in zip(batches, states):  # the loss as the causal LM computes it, from the last layer's output
            hidden = hidden.to(device).requires_grad_(True)
            logits = model.get_output_embeddings()(base.norm(hidden))
            model.loss_function(logits=logits, labels=ids.to(device), vocab_size=model.config.vocab_size).backward()
            grads.append(hidden.grad)
        for i in range(len(decoder) - 1, lowest - 1, -1):  # nothing below the lowest scored layer is needed
            layer = decoder[i]
            load_frozen(layer)
            weights = [m.weight for _, m in _projections(layer, "")] if i in layers else []
            for w in weights:
                w.requires_grad_(True)
            for b, (hidden, call) in enumerate(zip(inputs.pop(i), calls[i])):
                hidden = hidden.to(device).requires_grad_(i > lowest)
                torch.autograd.backward(run(layer, hidden, *call), grads[b])
                grads[b] = hidden.grad
            if i in layers:
                scores[i] = tuple(t.cpu() for t in _structured_scores(layer, g, "first_order"))
            for w in weights:
                w.grad = None
            unload(layer)
    finally:
        for layer, own in zip(decoder, own_forwards):
            _restore_forward(layer, own)
        for module in outer:
            unload(module)
        model.train(was_training)
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return scores


def _restore_forward(layer, own) -> None:
    if own is not None:
        layer.forward = own
    else:
        layer.__dict__.pop("forward", None)


def _activation_norms(model, layers: list[int], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ over every calibration token, for each input column j of each pruned projection (Wanda)."""
    sums, hooks = {}, []
    for i in layers:
        for name, module in _projections(decoder_layers(model)[i], f"model.layers.{i}"):
            sums[name] = torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device)

            def hook(mod, inputs, name=name):
                x = inputs[0].detach().float()
                sums[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for ids in batches:
                model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


def _element_scores(module: nn.Linear, importance: str) -> torch.Tensor:
    w = module.weight.detach().float()
    if importance == "magnitude":
        return w.pow(2)
    grad = module.weight.grad
    if grad is None:
        raise RuntimeError("first_order importance needs calibration gradients")
    return (w * grad.float()).abs()


def _structured_scores(layer, g: Geometry, importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per KV head, score per intermediate neuron) of one decoder layer."""
    attn, mlp, hd = layer.self_attn, layer.mlp, g.head_dim
    e = {name: _element_scores(getattr(attn, name), importance) for name in ATTENTION}
    heads = (e["q_proj"].view(g.num_kv_heads, -1).sum(1) + e["k_proj"].view(g.num_kv_heads, -1).sum(1)
             + e["v_proj"].view(g.num_kv_heads, -1).sum(1)
             + e["o_proj"].view(g.hidden_size, g.num_kv_heads, g.group * hd).sum((0, 2)))
    if importance == "magnitude":  # biases belong to the unit too (Qwen2's q/k/v)
        for name, rows in (("q_proj", g.group * hd), ("k_proj", hd), ("v_proj", hd)):
            bias = getattr(attn, name).bias
            if bias is not None:
                heads += bias.detach().float().pow(2).view(g.num_kv_heads, rows).sum(1)
    neurons = (_element_scores(mlp.gate_proj, importance).sum(1) + _element_scores(mlp.up_proj, importance).sum(1)
               + _element_scores(mlp.down_proj, importance).sum(0))
    return heads, neurons


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; ties go to the lower index."""
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return order[:k].sort().values


def structured_plan(model, *, ratio_attn: float, ratio_mlp: float, keep_first: int = 0, keep_last: int = 0,
                    importance: str = "magnitude", batches: Optional[list[torch.Tensor]] = None, seed: int = 0,
                    reduce=None, neuron_multiple: int = 1, layer_of=None, scores_of=None) -> PruningPlan:
    """Decide which KV-head groups and MLP neurons each pruned layer keeps. ``reduce(tensor)`` makes every
    process use the same scores (e.g. a broadcast from rank 0); None in one process. ``neuron_multiple``:
    the kept MLP neurons are rounded to a multiple of it (see kept_count). ``layer_of(i)``: where layer i's
    projections are read for magnitude scores (default: the model's own layer; storage.load_pruned_original
    reads them from the checkpoint). ``scores_of(i)``: layer i's (head, neuron) scores computed elsewhere
    (first_order_scores_by_layer)."""
    g = Geometry.from_config(model.config)
    layers = pruned_layers(g.num_layers, keep_first, keep_last)
    layer_of = layer_of or (lambda i: decoder_layers(model)[i])
    if importance == "first_order" and scores_of is None:
        _first_order_grads(model, layers, batches or [])
    generator = torch.Generator().manual_seed(seed)
    plan = PruningPlan("structured", g)
    for i in layers:
        if importance == "random":
            heads, neurons = torch.rand(g.num_kv_heads, generator=generator), torch.rand(g.intermediate_size,
                                                                                        generator=generator)
        elif scores_of is not None:
            heads, neurons = scores_of(i)
        else:
            heads, neurons = _structured_scores(layer_of(i), g, importance)
        if reduce is not None:
            heads, neurons = reduce(heads), reduce(neurons)
        plan.kv_heads[i] = _top(heads, kept_count(g.num_kv_heads, ratio_attn))
        plan.neurons[i] = _top(neurons, kept_count(g.intermediate_size, ratio_mlp, neuron_multiple))
    if importance == "first_order" and scores_of is None:
        for p in model.parameters():
            p.grad = None
    return plan


def unstructured_plan(model, *, kind: str, ratio: float, keep_first: int = 0, keep_last: int = 0,
                      importance: str = "magnitude", batches: Optional[list[torch.Tensor]] = None, seed: int = 0,
                      reduce=None, layer_of=None) -> PruningPlan:
    """Masks for N:M (kind 'N:M': N of every M consecutive weights of a row survive) or unstructured
    (kind 'unstructured': the lowest ``ratio`` of each output row goes). ``layer_of``: as in structured_plan."""
    g = Geometry.from_config(model.config)
    layers = pruned_layers(g.num_layers, keep_first, keep_last)
    layer_of = layer_of or (lambda i: decoder_layers(model)[i])
    norms = _activation_norms(model, layers, batches or []) if importance == "wanda" else {}
    n_m = parse_pruning(kind)
    generator = torch.Generator().manual_seed(seed)
    plan = PruningPlan(kind, g)
    for i in layers:
        for name, module in _projections(layer_of(i), f"model.layers.{i}"):
            w = module.weight.detach()
            if importance == "random":
                scores = torch.rand(w.shape, generator=generator)
            else:
                scores = w.float().abs().cpu()
                if importance == "wanda":
                    scores = scores * norms[name].cpu()
            if reduce is not None:
                scores = reduce(scores)
            plan.masks[name] = _row_mask(scores, n_m, ratio)
    return plan


def _row_mask(scores: torch.Tensor, n_m: Optional[tuple[int, int]], ratio: float) -> torch.Tensor:
    rows, cols = scores.shape
    if n_m is not None:
        n, m = n_m
        grouped = scores.view(rows, cols // m, m)
        keep = torch.argsort(grouped, dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, keep, True)
        return mask.view(rows, cols)
    drop = int(cols * ratio)
    order = torch.argsort(scores, dim=1, stable=True)[:, :drop]
    return torch.ones(rows, cols, dtype=torch.bool).scatter_(1, order, False)


def check_architecture(config) -> Optional[str]:
    """Why LoRAM cannot prune this model, or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"LoRAM prunes Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"this model is '{model_type}'")
    g = Geometry.from_config(config)
    if g.num_heads % g.num_kv_heads:
        return f"num_attention_heads {g.num_heads} is not a multiple of num_key_value_heads {g.num_kv_heads}"
    return None
