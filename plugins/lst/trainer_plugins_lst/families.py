"""What LST needs to know about a backbone architecture: where its layers and final norm are, how wide
a side layer is, and which rows/columns of each backbone weight a pruned side layer keeps.

Two families share all the code paths:
- decoders: pre-norm layers with a final norm. Llama, Mistral, Qwen2, Qwen3: RoPE, RMSNorm, grouped KV heads;
  OPT: learned positions (added to the embeddings, so the side stream gets them through its first ladder),
  LayerNorm with bias, biased projections, a ReLU MLP (fc1/fc2);
- encoders (BERT, RoBERTa): post-norm layers with learned positions, no final norm.
The side network is built from the backbone's own layer class at width d/r, with the same number of heads
(head size divided by r), as in the paper; or, for decoders, with whole heads of the backbone's size, r times
fewer (``head_size="full"``: attention kernels built for such heads, and the backbone's RoPE unchanged).
"""

from __future__ import annotations

import copy

from trainer_plugins import ConfigError

from .side import SIDE_SDPA

ROTARY_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
DECODERS = (*ROTARY_DECODERS, "opt")
ENCODERS = ("bert", "roberta")
SUPPORTED = DECODERS + ENCODERS

# How a pruned side layer slices each backbone weight: suffix -> (index set of the rows, of the columns).
# Index sets (see pruning.py): "res" = the kept residual-stream dims (one set for the whole network),
# "q"/"k" = the kept query/key rows of every head, "v" = value rows, "o" = the output projection's
# columns (each head's kept value dims), "qk_dims" = the kept dims inside one head, "mlp" = kept neurons.
DECODER_SLICES = {
    "input_layernorm.weight": ("res",),
    "post_attention_layernorm.weight": ("res",),
    "self_attn.q_proj.weight": ("q", "res"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("k", "res"), "self_attn.k_proj.bias": ("k",),
    "self_attn.v_proj.weight": ("v", "res"), "self_attn.v_proj.bias": ("v",),
    "self_attn.o_proj.weight": ("res", "o"), "self_attn.o_proj.bias": ("res",),
    "self_attn.q_norm.weight": ("qk_dims",), "self_attn.k_norm.weight": ("qk_dims",),  # Qwen3
    "mlp.gate_proj.weight": ("mlp", "res"), "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "res"), "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("res", "mlp"), "mlp.down_proj.bias": ("res",),
}
ENCODER_SLICES = {
    "attention.self.query.weight": ("q", "res"), "attention.self.query.bias": ("q",),
    "attention.self.key.weight": ("k", "res"), "attention.self.key.bias": ("k",),
    "attention.self.value.weight": ("v", "res"), "attention.self.value.bias": ("v",),
    "attention.output.dense.weight": ("res", "o"), "attention.output.dense.bias": ("res",),
    "attention.output.LayerNorm.weight": ("res",), "attention.output.LayerNorm.bias": ("res",),
    "intermediate.dense.weight": ("mlp", "res"), "intermediate.dense.bias": ("mlp",),
    "output.dense.weight": ("res", "mlp"), "output.dense.bias": ("res",),
    "output.LayerNorm.weight": ("res",), "output.LayerNorm.bias": ("res",),
}
OPT_SLICES = {
    "self_attn.q_proj.weight": ("q", "res"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("k", "res"), "self_attn.k_proj.bias": ("k",),
    "self_attn.v_proj.weight": ("v", "res"), "self_attn.v_proj.bias": ("v",),
    "self_attn.out_proj.weight": ("res", "o"), "self_attn.out_proj.bias": ("res",),
    "self_attn_layer_norm.weight": ("res",), "self_attn_layer_norm.bias": ("res",),
    "fc1.weight": ("mlp", "res"), "fc1.bias": ("mlp",),
    "fc2.weight": ("res", "mlp"), "fc2.bias": ("res",),
    "final_layer_norm.weight": ("res",), "final_layer_norm.bias": ("res",),
}
# The weights whose importance picks each index set (pruning.py): attention query/key, value, output, MLP.
DECODER_WEIGHTS = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                   "o": "self_attn.o_proj.weight", "mlp_in": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                   "mlp_out": "mlp.down_proj.weight"}
ENCODER_WEIGHTS = {"q": "attention.self.query.weight", "k": "attention.self.key.weight",
                   "v": "attention.self.value.weight", "o": "attention.output.dense.weight",
                   "mlp_in": ("intermediate.dense.weight",), "mlp_out": "output.dense.weight"}
OPT_WEIGHTS = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
               "o": "self_attn.out_proj.weight", "mlp_in": ("fc1.weight",), "mlp_out": "fc2.weight"}


def family(model_type: str | None) -> str:
    if model_type in DECODERS:
        return "decoder"
    if model_type in ENCODERS:
        return "encoder"
    raise ConfigError(f"lst supports the model types {SUPPORTED} (decoders: Llama/Mistral/Qwen2/Qwen3/OPT; "
                      f"encoders: BERT/RoBERTa), not {model_type!r}")


def rotary(config) -> bool:
    """Whether the model rotates queries and keys (RoPE): side heads then keep rotation pairs."""
    return config.model_type in ROTARY_DECODERS


def _names(config) -> tuple[dict, dict]:
    """(SLICES, WEIGHTS) for the model's weight names: OPT's own, else its family's."""
    if config.model_type == "opt":
        return OPT_SLICES, OPT_WEIGHTS
    if family(config.model_type) == "decoder":
        return DECODER_SLICES, DECODER_WEIGHTS
    return ENCODER_SLICES, ENCODER_WEIGHTS


def slices(config) -> dict:
    return _names(config)[0]


def weights(config) -> dict:
    return _names(config)[1]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def intermediate_size(config) -> int:
    return config.ffn_dim if config.model_type == "opt" else config.intermediate_size


def layers_of(model):
    """The backbone's list of transformer layers."""
    base = model.base_model
    if hasattr(base, "layers"):
        return base.layers
    if hasattr(base, "decoder"):  # OPT
        return base.decoder.layers
    return base.encoder.layer


def final_norm_of(model):
    """The decoder's final norm (applied after the merge), or None for post-norm encoders."""
    base = model.base_model
    if hasattr(base, "decoder"):  # OPT
        return base.decoder.final_layer_norm
    return getattr(base, "norm", None)


def full_heads(config, reduction: int) -> tuple[int, int]:
    """(query heads, KV heads) of a side layer with whole heads: r times fewer query heads, from as many KV
    groups as keep r times fewer (at least one), so each kept group contributes the same number of its heads."""
    heads, groups = config.num_attention_heads, kv_heads(config)
    side_heads, side_groups = heads // reduction, max(1, groups // reduction)
    return side_heads, side_groups


def _whole_heads_fit(config, reduction: int) -> bool:
    side_heads, side_groups = full_heads(config, reduction)
    per_group = config.num_attention_heads // kv_heads(config)
    return (side_heads >= 1 and side_heads % side_groups == 0 and side_heads // side_groups <= per_group
            and intermediate_size(config) >= reduction)


def check(config, reduction: int, layer_ids: list[int], head_size: str = "reduced") -> None:
    """One clear error for a backbone LST cannot reduce by ``reduction`` (before any weight is loaded)."""
    kind = family(getattr(config, "model_type", None))
    if config.model_type == "opt":
        if not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size:
            raise ConfigError("lst: this OPT checkpoint (like opt-350m) normalises after its layers and projects its "
                              "embeddings in and out; lst supports the pre-norm OPT models without projections")
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ConfigError("lst: this OPT config has LayerNorms without weights (layer_norm_elementwise_affine "
                              "false); lst supports OPT's LayerNorms with weights and biases")
        if getattr(config, "layerdrop", 0.0) > 0:
            raise ConfigError(f"lst: layerdrop={config.layerdrop} skips backbone layers at random while training, "
                              "and every ladder rung needs its layer's output; set layerdrop to 0")
    if kind == "decoder":
        types = set(getattr(config, "layer_types", None) or ())
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in types:
            raise ConfigError("lst: this model uses sliding-window attention layers; the side network's KV cache "
                              "does not implement the window yet. Use a full-attention checkpoint/config")
    d, hd = config.hidden_size, head_dim(config)
    if head_size == "full":
        if kind != "decoder":
            raise ConfigError("lst_head_size=full keeps whole heads, r times fewer, in decoders; encoders keep every "
                              "head, at head size / r")
        ok = [r for r in range(2, d + 1) if d % r == 0 and _whole_heads_fit(config, r)]
        what = f"{config.num_attention_heads} heads on {kv_heads(config)} KV heads, hidden {d}: whole heads"
    else:
        # RoPE rotates (dim, dim + head/2) pairs, so a side head needs an even size.
        need = 2 if rotary(config) else 1
        ok = [r for r in range(2, hd + 1) if d % r == 0 and hd % r == 0 and (hd // r) % need == 0
              and intermediate_size(config) >= r]
        what = f"hidden {d}, head size {hd}{', RoPE pairs' if need == 2 else ''}"
    if reduction not in ok:
        raise ConfigError(f"lst_reduction_factor={reduction} does not divide this model evenly ({what}); values "
                          f"that work: {ok[:12]}")
    n = config.num_hidden_layers
    bad = [i for i in layer_ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"lst_layers: layers {bad} do not exist; the model has layers 0..{n - 1}")


def side_config(config, reduction: int, head_size: str = "reduced"):
    """The backbone's config at width d/r: same layer count, head count and KV groups, head size / r; or
    (``head_size="full"``) whole heads of the backbone's size, r times fewer (full_heads)."""
    side = copy.deepcopy(config)
    side.hidden_size = config.hidden_size // reduction
    if config.model_type == "opt":  # its heads are hidden / heads wide: reducing the width reduces them
        side.ffn_dim = config.ffn_dim // reduction
        side.word_embed_proj_dim = side.hidden_size
        if head_size == "full":
            side.num_attention_heads = full_heads(config, reduction)[0]
        return side
    side.intermediate_size = config.intermediate_size // reduction
    if family(config.model_type) == "decoder":
        if head_size == "full":
            side.head_dim = head_dim(config)
            side.num_attention_heads, side.num_key_value_heads = full_heads(config, reduction)
        else:
            side.head_dim = head_dim(config) // reduction
        grouped = side.num_key_value_heads < side.num_attention_heads
        if grouped and getattr(config, "_attn_implementation", None) == "sdpa":
            # The float32 side network would reach SDPA with enable_gqa and land on the math kernel (flash needs
            # 16-bit inputs; the memory-efficient kernel takes no GQA before torch 2.14): seq x seq scores per
            # head and layer, more than full fine-tuning on a 1B shape. Its KV heads are tiny: repeat them first.
            side._attn_implementation = SIDE_SDPA
    # Otherwise the attention implementation stays the backbone's; either way side layer i reuses the mask built
    # for backbone layer i (the side implementation takes sdpa's masks).
    return side
