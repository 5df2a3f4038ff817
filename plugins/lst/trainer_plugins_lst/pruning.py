"""Building the side network and initialising it: structural pruning of the backbone (LST) or random (QST).

Pruned init (LST's "fisher-v2"/L1 strategy, made head- and residual-consistent):
- the residual stream keeps the d/r dims ``res`` whose embedding columns have the largest importance
  (L1 over the vocabulary); every side layer reads and writes these same dims, so its norms, residual adds
  and the ladders (Down_i starts as the selection of ``res``) all line up;
- attention keeps every head (the side has the same head count) and, inside a head, the head/r query/key
  dims and value dims with the largest importance summed over heads and over the kept input columns.
  With RoPE the query/key dims are kept as rotation pairs (j, j + head/2) and the side heads rotate at the
  backbone's frequencies for those pairs, so a pruned head computes what the big head's kept dims compute;
  or, with whole heads (head_size "full"), it keeps the KV groups with the largest importance (their key and
  value rows and their query heads') and in each the same number of its most important query heads, whole:
  a side head is then a backbone head on the kept residual dims, RoPE and all;
- the MLP keeps the d_ff/r neurons with the largest importance of their input rows and output column.
Importance is |W| (magnitude, default) or the empirical Fisher sum over calibration batches of (dL/dW)^2.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import families
from .side import SIDE_SDPA, LadderSide, SideOutput, SideStep


@dataclass
class SideSettings:
    reduction: int = 8
    layer_ids: list[int] = field(default_factory=list)
    merge: str = "add"  # "add" (backbone's last state + side) or "none" (side only, the paper's LST)
    temperature: float = 0.1
    alpha: float = 0.0
    head_size: str = "reduced"  # "reduced": every head at head size / r (the paper); "full": whole heads, r x fewer


def build(model, settings: SideSettings) -> LadderSide:
    """The side network's structure for ``model`` (weights at torch's default init; see init_*)."""
    config = model.config
    layers = families.layers_of(model)
    side_config = families.side_config(config, settings.reduction, settings.head_size)
    d, ds = config.hidden_size, side_config.hidden_size
    rope = getattr(model.base_model, "rotary_emb", None)
    steps = []
    for k, i in enumerate(settings.layer_ids):
        block = type(layers[i])(side_config, layer_idx=i)
        attention = getattr(block, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = config.num_hidden_layers + k  # its KV slot, after the backbone's
        if attention is not None and side_config._attn_implementation == SIDE_SDPA:
            attention.num_key_value_groups = 1  # side_sdpa repeats the KV heads itself
        pairs = side_config.head_dim // 2 if families.rotary(config) else 0
        steps.append(SideStep(block, d, ds, pairs, float(getattr(rope, "attention_scaling", 1.0)),
                              settings.temperature, settings.alpha))
    norm = None
    final = families.final_norm_of(model)
    if final is not None:
        norm = type(final)(ds, eps=getattr(final, "variance_epsilon", getattr(final, "eps", 1e-6)))
    return LadderSide(d, ds, settings.layer_ids, steps, SideOutput(norm, ds, d, settings.merge),
                      config.num_hidden_layers).float()


# -- weights of the backbone, whatever form they are in ------------------------------------------------------
def dense(param: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a backbone weight (bitsandbytes 4-bit weights are dequantised)."""
    if type(param).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        data, state = param.data, param.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its AVX512-BF16 CPU kernel after an eval
            # forward; unpack a copy (the inverse rewrites the state it is given)
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).float()
    return param.detach().float()


@contextlib.contextmanager
def whole(module: nn.Module):
    """The module's parameters whole for reading, also when ZeRO-3 has partitioned them."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


# -- importance --------------------------------------------------------------------------------------------
Importance = Callable[[str, torch.Tensor], torch.Tensor]


def magnitude(name: str, weight: torch.Tensor) -> torch.Tensor:
    return dense(weight).abs()


def fisher(model, batches: list[torch.Tensor], names: Optional[set] = None) -> Importance:
    """Empirical Fisher of the language-modelling loss: sum over calibration batches of (dL/dW)^2, for the
    weights that pick the side's units. The backbone stays frozen afterwards."""
    params = dict(model.named_parameters())
    chosen = [n for n in params if names is None or n in names]
    before = {n: params[n].requires_grad for n in chosen}
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in chosen}
    was_training = model.training
    model.eval()  # no dropout: the score of the pretrained function
    try:
        for n in chosen:
            params[n].requires_grad_(True)
        device = params[chosen[0]].device
        for batch in batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, [params[n] for n in chosen], allow_unused=True)
            for n, g in zip(chosen, grads):
                if g is not None:
                    sums[n] += g.float().pow(2)
    finally:
        for n, flag in before.items():
            params[n].requires_grad_(flag)
        model.train(was_training)
    return lambda name, weight: sums[name]


def importance_names(model, layer_ids: list[int]) -> set:
    """Names of the backbone weights whose importance the selection reads."""
    prefix = _layer_prefix(model)
    names = families.weights(model.config)
    out = {_embedding_name(model)}
    for i in layer_ids:
        for key in ("q", "k", "v", "o", "mlp_out"):
            out.add(f"{prefix}{i}.{names[key]}")
        out.update(f"{prefix}{i}.{w}" for w in names["mlp_in"])
    return out


# -- which units the side keeps -------------------------------------------------------------------------------
@dataclass
class Selection:
    res: torch.Tensor  # kept residual dims (d/r), sorted
    # backbone layer index -> {"qk_dims", "v_dims", "mlp"} (within-head / neuron indices), or with whole heads
    # {"q_heads", "kv_groups", "mlp"} (query heads listed group by group, in the kept groups' order)
    layers: dict


def select(model, settings: SideSettings, importance: Importance = magnitude) -> Selection:
    config = model.config
    r = settings.reduction
    d, hd = config.hidden_size, families.head_dim(config)
    heads, groups = config.num_attention_heads, families.kv_heads(config)
    hs = hd // r
    embeddings = model.get_input_embeddings()
    with whole(embeddings):
        res = _top(importance(_embedding_name(model), embeddings.weight).sum(0), d // r)
    names = families.weights(config)
    layers = families.layers_of(model)
    prefix = _layer_prefix(model)
    chosen = {}
    for i in settings.layer_ids:
        params = dict(layers[i].named_parameters())

        def imp(key):
            return importance(f"{prefix}{i}.{key}", params[key])

        with whole(layers[i]):
            mlp = sum(_cols(imp(w), res).sum(1) for w in names["mlp_in"]) + _rows(imp(names["mlp_out"]), res).sum(0)
            mlp = _top(mlp, families.intermediate_size(config) // r)
            if settings.head_size == "full":
                chosen[i] = {**_whole_heads(config, r, imp, names, res), "mlp": mlp}
                continue
            qk = (_cols(imp(names["q"]), res).sum(1).view(heads, hd).sum(0)
                  + _cols(imp(names["k"]), res).sum(1).view(groups, hd).sum(0))
            if families.rotary(config):  # keep rotation pairs (j, j + hd/2) together
                pairs = _top(qk[: hd // 2] + qk[hd // 2:], hs // 2)
                qk_dims = torch.cat([pairs, pairs + hd // 2])
            else:
                qk_dims = _top(qk, hs)
            v = (_cols(imp(names["v"]), res).sum(1).view(groups, hd).sum(0)
                 + _rows(imp(names["o"]), res).sum(0).view(heads, hd).sum(0))
            chosen[i] = {"qk_dims": qk_dims, "v_dims": _top(v, hs), "mlp": mlp}
    return Selection(res=res, layers=chosen)


def _whole_heads(config, r: int, imp, names: dict, res: torch.Tensor) -> dict:
    """The KV groups and query heads a whole-head side layer keeps (families.full_heads says how many)."""
    hd = families.head_dim(config)
    heads, groups = config.num_attention_heads, families.kv_heads(config)
    side_heads, side_groups = families.full_heads(config, r)
    per_group = heads // groups
    query = (_cols(imp(names["q"]), res).sum(1).view(heads, hd).sum(1)
             + _rows(imp(names["o"]), res).sum(0).view(heads, hd).sum(1)).view(groups, per_group)
    kv = (_cols(imp(names["k"]), res).sum(1) + _cols(imp(names["v"]), res).sum(1)).view(groups, hd).sum(1)
    kept = _top(kv + query.sum(1), side_groups)
    q_heads = [g * per_group + _top(query[g], side_heads // side_groups) for g in kept.tolist()]
    return {"q_heads": torch.cat(q_heads), "kv_groups": kept}


def index_sets(config, selection: Selection, layer: int) -> dict[str, torch.Tensor]:
    """Rows/columns of the backbone weights that a side layer keeps (keys as in families.*_SLICES)."""
    hd = families.head_dim(config)
    heads, groups = config.num_attention_heads, families.kv_heads(config)
    chosen = selection.layers[layer]

    def per_head(n, dims):
        return torch.cat([h * hd + dims for h in range(n)])

    if "q_heads" in chosen:  # whole heads: every dim of the kept ones
        every = torch.arange(hd)

        def rows_of(kept):
            return torch.cat([h * hd + every for h in kept.tolist()])

        q, kv = rows_of(chosen["q_heads"]), rows_of(chosen["kv_groups"])
        return {"res": selection.res, "q": q, "k": kv, "v": kv, "o": q, "qk_dims": every, "mlp": chosen["mlp"]}

    return {"res": selection.res, "q": per_head(heads, chosen["qk_dims"]), "k": per_head(groups, chosen["qk_dims"]),
            "v": per_head(groups, chosen["v_dims"]), "o": per_head(heads, chosen["v_dims"]),
            "qk_dims": chosen["qk_dims"], "mlp": chosen["mlp"]}


# -- initialisation ------------------------------------------------------------------------------------------
@torch.no_grad()
def init_pruned(model, side: LadderSide, selection: Selection) -> None:
    """Side blocks = the backbone's layers restricted to the selection; Down_i = selection of the kept residual
    dims; final side norm = the backbone's restricted; Up = 0 (merge add) or the selection's transpose."""
    config = model.config
    spec = families.slices(config)
    layers = families.layers_of(model)
    res = selection.res
    for step, i in zip(side.steps, side.layer_ids):
        sets = index_sets(config, selection, i)
        source = dict(layers[i].named_parameters())
        with whole(layers[i]):
            for name, param in step.block.named_parameters():
                if name not in spec:
                    raise NotImplementedError(f"lst: no pruning rule for the side layer's parameter {name!r}; "
                                              "use lst_init=random for this architecture")
                weight = dense(source[name])
                for dim, key in enumerate(spec[name]):
                    weight = weight.index_select(dim, sets[key].to(weight.device))
                param.copy_(weight)
        if step.inv_freq is not None:
            step.inv_freq.copy_(_backbone_inv_freq(model)[sets["qk_dims"][: len(step.inv_freq)]])
        _select_into(step.down, res)
    _select_into(side.first, res)
    final = families.final_norm_of(model)
    if side.output.norm is not None:
        with whole(final):
            side.output.norm.weight.copy_(dense(final.weight)[res])
            if getattr(side.output.norm, "bias", None) is not None:  # LayerNorm (OPT)
                side.output.norm.bias.copy_(dense(final.bias)[res])
    side.output.up.bias.zero_()
    side.output.up.weight.zero_()
    if side.output.merge == "none":  # start by writing the side's dims back where they came from
        device = side.output.up.weight.device
        side.output.up.weight[res.to(device), torch.arange(len(res), device=device)] = 1.0


@torch.no_grad()
def init_random(model, side: LadderSide) -> None:
    """QST's init: side blocks drawn like the backbone's own init (normal, std = initializer_range), ladders at
    nn.Linear's default; Up = 0 with merge add (the model starts as the backbone). Call under a seeded RNG."""
    std = getattr(model.config, "initializer_range", 0.02)
    for step in side.steps:
        for module in step.block.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        if step.inv_freq is not None:  # frequencies spread over the backbone's range, high to low
            full = _backbone_inv_freq(model)
            step.inv_freq.copy_(full[torch.linspace(0, len(full) - 1, len(step.inv_freq)).round().long()])
    if side.output.merge == "add":
        side.output.up.weight.zero_()
        side.output.up.bias.zero_()


# -- helpers -------------------------------------------------------------------------------------------------
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores.float().cpu(), k).indices.sort().values


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx.to(t.device))


def _cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, idx.to(t.device))


def _select_into(linear: nn.Linear, res: torch.Tensor) -> None:
    linear.weight.zero_()
    linear.bias.zero_()
    device = linear.weight.device
    linear.weight[torch.arange(len(res), device=device), res.to(device)] = 1.0


def _backbone_inv_freq(model) -> torch.Tensor:
    return model.base_model.rotary_emb.inv_freq.detach().float().cpu()


def _layer_prefix(model) -> str:
    layers = families.layers_of(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise RuntimeError("lst: the backbone's layer list is not a submodule of the model")


def _embedding_name(model) -> str:
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return name + ".weight"
    raise RuntimeError("lst: the input embeddings are not a submodule of the model")
