"""LoRAM's method alone (plain torch + peft): GQA-aware structured pruning, the scores, N:M/unstructured masks,
the index file, and recovery exactness."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config, Qwen3Config

from trainer_plugins.models import tiny_llama_config
from trainer_plugins_loram.pruning import (PROJECTIONS, Geometry, PruningPlan, check_architecture, kept_count,
                                           structured_plan, unstructured_plan)
from trainer_plugins_loram.recovery import recover_state_dict

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: tiny_llama_config(**SHAPE),
    "mistral": lambda: MistralConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE),  # q/k/v carry biases
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=16),  # q/k norms over head_dim; head_dim * heads != hidden
}


def build(kind="llama", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (2, 24), generator=g) for _ in range(n)]


def lora(model, random_b=True):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), init_lora_weights=not random_b)
    return get_peft_model(model, config)


def factors(state, module):
    """A module's LoRA factors (A: r x in, B: out x r) in a peft state dict."""
    return state[f"base_model.model.{module}.lora_A.weight"], state[f"base_model.model.{module}.lora_B.weight"]


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("importance", ["magnitude", "first_order", "random"])
def test_recovered_adapter_on_masked_original_equals_pruned_model_with_adapter(kind, importance):
    original = build(kind)
    pruned = copy.deepcopy(original)
    plan = structured_plan(pruned, ratio_attn=0.5, ratio_mlp=0.4, keep_first=1, keep_last=1, importance=importance,
                           batches=batches(), seed=3)
    plan.apply(pruned)
    small = lora(pruned)  # random B, so the adapter is not a no-op
    ids = batches(1, seed=7)[0]
    with torch.no_grad():
        expected = small(input_ids=ids).logits
    state = get_peft_model_state_dict(small)
    recovered = recover_state_dict(state, plan)

    masked = copy.deepcopy(original)
    plan.mask_units(masked)
    big = lora(masked, random_b=False)
    result = set_peft_model_state_dict(big, recovered)
    assert not result.unexpected_keys
    with torch.no_grad():
        got = big(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # ΔW = B A: the pruned model's on kept rows/columns, zero on pruned ones; shapes are the original's. Recovery
    # only places the trained factors, so they are compared bit for bit (a product of other shapes may take
    # another GEMM kernel, with other rounding, on another CPU).
    for i in plan.kv_heads:
        for proj in PROJECTIONS:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{sub}.{proj}"
            (a_full, b_full), (a_small, b_small) = factors(recovered, name), factors(state, name)
            assert (b_full.shape[0], a_full.shape[1]) == getattr(getattr(original.model.layers[i], sub), proj).weight.shape
            rows, cols = plan.kept_rows_cols(name)
            rows = torch.arange(b_full.shape[0]) if rows is None else rows
            cols = torch.arange(a_full.shape[1]) if cols is None else cols
            assert torch.equal(b_full[rows], b_small) and torch.equal(a_full[:, cols], a_small)
            pruned_rows, pruned_cols = torch.ones(b_full.shape[0], dtype=torch.bool), torch.ones(a_full.shape[1], dtype=torch.bool)
            pruned_rows[rows], pruned_cols[cols] = False, False
            assert not b_full[pruned_rows].any() and not a_full[:, pruned_cols].any()  # zero elsewhere
    # Dense layers are untouched and recover as the identity.
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        assert all(torch.equal(x, y) for x, y in zip(factors(recovered, name), factors(state, name)))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_first_order_scores_one_layer_at_a_time_equal_one_backward_pass(kind):
    """first_order_scores_by_layer (a forward without autograd, then the gradient carried down one layer at a time,
    each layer's forward recomputed) gives the scores of backward passes through the whole model, bit for bit."""
    from trainer_plugins_loram.pruning import _first_order_grads, _structured_scores, decoder_layers, \
        first_order_scores_by_layer

    model, layers, data = build(kind), [1, 2], batches(3)
    g = Geometry.from_config(model.config)
    loaded = []
    by_layer = first_order_scores_by_layer(model, layers, data, loaded.append, lambda m: None, "cpu")
    assert not any(p.grad is not None for p in model.parameters()) and not model.training
    # every decoder layer loaded once in the forward, then from the last down to the lowest scored in the backward
    index = {id(m): i for i, m in enumerate(decoder_layers(model))}
    order = [index[id(m)] for m in loaded if id(m) in index]
    assert order == [0, 1, 2, 3, 3, 2, 1]
    _first_order_grads(model, layers, data)
    for i in layers:
        heads, neurons = _structured_scores(decoder_layers(model)[i], g, "first_order")
        assert torch.equal(by_layer[i][0], heads) and torch.equal(by_layer[i][1], neurons)


def test_gqa_removes_kv_heads_with_their_query_group():
    model = build()
    g = Geometry.from_config(model.config)
    plan = structured_plan(model, ratio_attn=0.5, ratio_mlp=0.5, importance="random", seed=0)
    heads = plan.kv_heads[2]
    assert heads.numel() == 2 and torch.equal(heads, heads.sort().values)
    q_rows, _ = plan.kept_rows_cols("model.layers.2.self_attn.q_proj")
    kv_rows, _ = plan.kept_rows_cols("model.layers.2.self_attn.k_proj")
    _, o_cols = plan.kept_rows_cols("model.layers.2.self_attn.o_proj")
    query_heads = sorted({int(r) // g.head_dim for r in q_rows})
    assert query_heads == [h * g.group + j for h in heads.tolist() for j in range(g.group)]
    assert sorted({int(r) // g.head_dim for r in kv_rows}) == heads.tolist()
    assert torch.equal(o_cols, q_rows)
    plan.apply(model)
    attn = model.model.layers[2].self_attn
    assert attn.q_proj.weight.shape == (2 * g.group * g.head_dim, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * g.head_dim, 64)
    assert attn.o_proj.weight.shape == (64, 2 * g.group * g.head_dim)
    assert model.model.layers[2].mlp.down_proj.weight.shape == (64, 48)
    out = model(input_ids=batches(1)[0])  # a forward at the new shapes
    assert torch.isfinite(out.logits).all()


def test_scores_follow_their_definitions():
    model = build()
    g = Geometry.from_config(model.config)
    layer = model.model.layers[1]
    # magnitude: squared L2 norm of each unit's weights; the highest survive.
    mlp = layer.mlp
    norms = mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    plan = structured_plan(model, ratio_attn=0.5, ratio_mlp=0.5, importance="magnitude")
    assert torch.equal(plan.neurons[1], norms.topk(kept_count(96, 0.5)).indices.sort().values)
    # first order: |w * dL/dw| summed over the unit, with the gradient of the LM loss over the batches.
    data = batches(3)
    reference = copy.deepcopy(model)
    for ids in data:
        reference(input_ids=ids, labels=ids).loss.backward()
    attn = reference.model.layers[1].self_attn
    e = {n: (getattr(attn, n).weight * getattr(attn, n).weight.grad).abs() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    heads = (e["q_proj"].view(g.num_kv_heads, -1).sum(1) + e["k_proj"].view(g.num_kv_heads, -1).sum(1)
             + e["v_proj"].view(g.num_kv_heads, -1).sum(1) + e["o_proj"].view(64, g.num_kv_heads, -1).sum((0, 2)))
    plan = structured_plan(model, ratio_attn=0.5, ratio_mlp=0.5, importance="first_order", batches=data)
    assert torch.equal(plan.kv_heads[1], heads.topk(2).indices.sort().values)
    assert all(p.grad is None for p in model.parameters()) and not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("kind, importance", [("2:4", "magnitude"), ("2:4", "wanda"), ("unstructured", "magnitude"),
                                              ("unstructured", "wanda"), ("unstructured", "random")])
def test_masks_keep_shapes_and_exact_counts(kind, importance):
    model = build()
    before = {n: p.clone() for n, p in model.named_parameters()}
    plan = unstructured_plan(model, kind=kind, ratio=0.5, keep_first=1, importance=importance, batches=batches())
    plan.apply(model)
    assert sorted({int(n.split(".")[2]) for n in plan.masks}) == [1, 2, 3]
    for name, mask in plan.masks.items():
        w = model.get_submodule(name).weight
        assert w.shape == mask.shape and torch.equal(w == 0, ~mask | (before[name + ".weight"] == 0))
        if kind == "2:4":
            assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert (mask.sum(1) == mask.shape[1] // 2).all()
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_wanda_scores_weights_by_input_activation_norms():
    model = build()
    data = batches()
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids)
    hook.remove()
    x_norm = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).norm(dim=0)
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    scores = w.abs() * x_norm
    expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, scores.argsort(1)[:, : w.shape[1] // 2], False)
    plan = unstructured_plan(model, kind="unstructured", ratio=0.5, importance="wanda", batches=data)
    assert torch.equal(plan.masks["model.layers.1.mlp.down_proj"], expected)


def test_non_structured_recovery_is_the_identity():
    model = build()
    plan = unstructured_plan(model, kind="2:4", ratio=0.5, importance="magnitude")
    plan.apply(model)
    state = get_peft_model_state_dict(lora(model))
    recovered = recover_state_dict(state, plan)
    assert all(torch.equal(recovered[k], v) for k, v in state.items())


@pytest.mark.parametrize("structured", [True, False])
def test_index_file_round_trip(tmp_path, structured):
    model = build("qwen2")
    if structured:
        plan = structured_plan(model, ratio_attn=0.25, ratio_mlp=0.7, keep_last=1, importance="random", seed=5)
    else:
        plan = unstructured_plan(model, kind="unstructured", ratio=0.3, importance="random", seed=5)
    plan.settings = {"importance": "random"}
    plan.save(tmp_path / "plan.safetensors")
    loaded = PruningPlan.load(tmp_path / "plan.safetensors")
    assert loaded.kind == plan.kind and loaded.geometry == plan.geometry and loaded.settings == plan.settings
    for ours, theirs in ((plan.kv_heads, loaded.kv_heads), (plan.neurons, loaded.neurons), (plan.masks, loaded.masks)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a LoRAM pruning index"):
        PruningPlan.load(tmp_path / "other.safetensors")


def test_architectures():
    assert check_architecture(CONFIGS["qwen2"]()) is None
    assert "Llama-family" in check_architecture(GPT2Config())
    assert kept_count(3, 0.5) == 2 and kept_count(8, 0.85) == 1 and kept_count(4, 0.99) == 1 and kept_count(5, 0) == 5
    # aligned to a multiple where the size is one: 11008 neurons at 65% -> 3853 exact, 3840 aligned to 64
    assert kept_count(11008, 0.65) == 3853 and kept_count(11008, 0.65, 64) == 3840
    assert kept_count(1536, 0.5, 64) == 768 and kept_count(128, 0.9, 64) == 64 and kept_count(96, 0.5, 64) == 48
    assert kept_count(128, 0, 64) == 128
