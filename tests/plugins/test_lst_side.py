"""The LST side network alone (no Trainer): the model starts as the backbone, no gradient or graph reaches the
backbone, pruned side layers compute what the backbone's kept units compute (RoPE pairs included), cached
generation equals step-by-step decoding, encoders respect padding, importance scores equal their definitions."""

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, RobertaConfig, RobertaForSequenceClassification)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from trainer_plugins import ConfigError
from trainer_plugins_lst import families
from trainer_plugins_lst.plugin import layer_ids
from trainer_plugins_lst.pruning import (SideSettings, build, dense, fisher, index_sets, init_pruned, init_random,
                                         magnitude, select)
from trainer_plugins_lst.side import attach, detach, side_of

DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
OPT = dict(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
           max_position_embeddings=64, word_embed_proj_dim=64)
ENCODER = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_labels=3, max_position_embeddings=64)
DECODERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),  # q/k/v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**DECODER, head_dim=32)),  # q/k norms; heads*head != hidden
    # learned positions, LayerNorm with bias, biased projections, ReLU MLP (fc1/fc2); no GQA
    "opt": lambda: OPTForCausalLM(OPTConfig(**OPT)),
}
ROTARY = sorted(families.ROTARY_DECODERS)
ENCODERS = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**ENCODER)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**ENCODER, pad_token_id=1)),
}
ALL = {**DECODERS, **ENCODERS}
IDS = torch.tensor([[(5 * k + 3) % 97 for k in range(12)], [(11 * k + 2) % 97 for k in range(12)]])


def make(name, seed=0):
    torch.manual_seed(seed)
    model = ALL[name]().eval()
    if name in DECODERS:  # random weights may well predict the EOS id: never stop early
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return model


def with_side(model, reduction=4, layers=None, init="pruned", merge="add", importance=magnitude, head_size="reduced"):
    settings = SideSettings(reduction=reduction, merge=merge, head_size=head_size,
                            layer_ids=layers if layers is not None else list(range(model.config.num_hidden_layers)))
    side = build(model, settings)
    if init == "pruned":
        init_pruned(model, side, select(model, settings, importance))
    else:
        torch.manual_seed(1)
        init_random(model, side)
    model.requires_grad_(False)
    attach(model, side, families.layers_of(model))
    return side


def output(model, ids=IDS, **kw):
    return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("init", ["pruned", "random"])
def test_with_merge_add_the_model_starts_as_the_backbone(name, init):
    model = make(name)
    reference = output(model)
    side = with_side(model, init=init, layers=[1, 2])
    torch.testing.assert_close(output(model), reference, rtol=0, atol=0)
    assert detach(model) is side and side_of(model) is None
    torch.testing.assert_close(output(model), reference, rtol=0, atol=0)  # hooks gone with the module


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_gradient_and_no_graph_reach_the_backbone(name):
    model = make(name)
    side = with_side(model, merge="none")  # Up random-ish (selection): every side weight gets a real gradient
    model.train()
    seen = []

    def check_backbone_layer(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        seen.append(out.requires_grad or out.grad_fn is not None)

    layers = families.layers_of(model)
    handles = [layer.register_forward_hook(check_backbone_layer) for layer in layers[:-1]]
    labels = IDS if name in DECODERS else torch.tensor([0, 2])
    loss = model(input_ids=IDS, labels=labels).loss
    for h in handles:
        h.remove()
    assert seen == [False] * (len(layers) - 1)  # autograd recorded nothing inside the backbone
    leaves, stack, visited = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert leaves == trainable and trainable == {id(p) for p in side.parameters()}
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("lst_side."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_side_at_full_width_with_closed_gates_reproduces_the_backbone(name):
    """r = 1 keeps every unit: a pruned side layer is then the backbone layer, its RoPE the backbone's, and a
    side stream that ignores the ladders (gate 1) follows the backbone exactly through its own KV slots."""
    model = make(name)
    # merge none re-normalises the (normalised) side output: make the final norm idempotent
    norm = families.final_norm_of(model)
    norm.weight.data.fill_(1.0)
    if getattr(norm, "bias", None) is not None:  # LayerNorm (OPT)
        norm.bias.data.zero_()
        norm.eps = 1e-12
    else:
        norm.variance_epsilon = 1e-12
    reference = output(model)
    side = with_side(model, reduction=1, merge="none")
    for step in side.steps:
        step.alpha.data.fill_(100.0)
    torch.testing.assert_close(output(model), reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        cached = model.generate(IDS[:, :5], max_new_tokens=6, do_sample=False)
    assert cached.shape == (2, 11)


def pruned_attention_pair(model, settings):
    """Layer 1's attention in the backbone and in a pruned side (settings.layer_ids == [1]), an input on the kept
    residual dims for each (side width, and zero-filled backbone width), and each one's RoPE (cos, sin)."""
    from trainer_plugins_lst.side import rotary

    side = build(model, settings)
    selection = select(model, settings)
    init_pruned(model, side, selection)
    torch.manual_seed(3)
    x_side = torch.randn(1, 7, 64 // settings.reduction)
    x_full = torch.zeros(1, 7, 64)
    x_full[..., selection.res] = x_side
    positions = torch.arange(7)[None]
    big, small = model.base_model.layers[1].self_attn, side.steps[0].block.self_attn
    rope = model.base_model.rotary_emb(x_full, positions)
    side_rope = rotary(side.steps[0].inv_freq, positions, 1.0, torch.float32)
    return side, selection, (big, x_full, rope), (small, x_side, side_rope)


@pytest.mark.parametrize("name", ROTARY)
def test_pruned_heads_rotate_like_the_backbone_heads_kept_dims(name):
    """The side's queries/keys after RoPE equal the backbone's for the kept pairs (input on the kept dims)."""
    model = make(name)
    config = model.config
    side, selection, (big, x_full, (cos, sin)), (small, x_side, (cos_s, sin_s)) = pruned_attention_pair(
        model, SideSettings(reduction=4, layer_ids=[1]))
    sets = index_sets(config, selection, 1)
    hd, hs = families.head_dim(config), families.head_dim(config) // 4

    def heads(t, n, d):
        return t.view(1, 7, n, d).transpose(1, 2)

    with torch.no_grad():
        q_big, k_big = heads(big.q_proj(x_full), 4, hd), heads(big.k_proj(x_full), 2, hd)
        q_small, k_small = heads(small.q_proj(x_side), 4, hs), heads(small.k_proj(x_side), 2, hs)
        if hasattr(big, "q_norm"):
            q_big, k_big, q_small, k_small = big.q_norm(q_big), big.k_norm(k_big), small.q_norm(q_small), small.k_norm(k_small)
        q_big, k_big = apply_rotary_pos_emb(q_big, k_big, cos, sin)
        q_small, k_small = apply_rotary_pos_emb(q_small, k_small, cos_s, sin_s)
    dims = sets["qk_dims"]
    if not hasattr(big, "q_norm"):  # RMS over a head's dims is not separable: Qwen3 compares the rotation only
        torch.testing.assert_close(q_small, q_big[..., dims], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_small, k_big[..., dims], rtol=1e-5, atol=1e-5)
    assert torch.equal(side.steps[0].inv_freq, model.base_model.rotary_emb.inv_freq[dims[: hs // 2]])
    assert (dims[hs // 2:] == dims[: hs // 2] + hd // 2).all()  # rotation pairs stay together


@pytest.mark.parametrize("name", ROTARY)
def test_whole_heads_are_backbone_heads_on_the_kept_dims(name):
    """lst_head_size=full: a side head is a kept backbone head, whole. On an input that lives on the kept residual
    dims its queries and keys after RoPE (the backbone's own frequencies) equal the backbone's for those heads,
    and the side attention's output is the backbone attention's with only the kept heads writing, on those dims."""
    model = make(name)
    config = model.config
    side, selection, (big, x_full, (cos, sin)), (small, x_side, (cos_s, sin_s)) = pruned_attention_pair(
        model, SideSettings(reduction=2, layer_ids=[1], head_size="full"))
    kept = selection.layers[1]
    assert families.full_heads(config, 2) == (2, 1) and len(kept["q_heads"]) == 2 and len(kept["kv_groups"]) == 1
    assert set(kept["q_heads"].tolist()) <= {2 * g + j for g in kept["kv_groups"].tolist() for j in (0, 1)}
    hd = families.head_dim(config)
    assert torch.equal(side.steps[0].inv_freq, model.base_model.rotary_emb.inv_freq)

    def heads(t, n):
        return t.view(1, 7, n, hd).transpose(1, 2)

    with torch.no_grad():
        q_big, k_big = heads(big.q_proj(x_full), 4)[:, kept["q_heads"]], heads(big.k_proj(x_full), 2)[:, kept["kv_groups"]]
        q_small, k_small = heads(small.q_proj(x_side), 2), heads(small.k_proj(x_side), 1)
        if hasattr(big, "q_norm"):  # whole heads: the same RMS norm over the same dims
            q_big, k_big, q_small, k_small = big.q_norm(q_big), big.k_norm(k_big), small.q_norm(q_small), small.k_norm(k_small)
        q_big, k_big = apply_rotary_pos_emb(q_big, k_big, cos, sin)
        q_small, k_small = apply_rotary_pos_emb(q_small, k_small, cos_s, sin_s)
        torch.testing.assert_close(q_small, q_big, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_small, k_big, rtol=1e-5, atol=1e-5)
        writes = torch.zeros_like(big.o_proj.weight)
        writes[:, index_sets(config, selection, 1)["o"]] = 1
        big.o_proj.weight.mul_(writes)  # only the kept heads write
        expected = big(x_full, position_embeddings=(cos, sin), attention_mask=None)[0][..., selection.res]
        got = small(x_side, position_embeddings=(cos_s, sin_s), attention_mask=None)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_size, reduction", [("reduced", 4), ("full", 2)])
def test_opt_side_heads_are_the_backbone_heads_kept_units(head_size, reduction):
    """OPT (learned positions, no RoPE): a pruned side layer's query/key/value projections are the backbone's kept
    rows, biases included, on an input that lives on the kept residual dims; with whole heads its attention output
    is the backbone attention's with only the kept heads writing, on those dims."""
    model = make("opt")
    config = model.config
    settings = SideSettings(reduction=reduction, layer_ids=[1], head_size=head_size)
    side = build(model, settings)
    selection = select(model, settings)
    init_pruned(model, side, selection)
    sets = index_sets(config, selection, 1)
    assert side.steps[0].inv_freq is None
    torch.manual_seed(3)
    x_side = torch.randn(1, 7, 64 // reduction)
    x_full = torch.zeros(1, 7, 64)
    x_full[..., selection.res] = x_side
    big, small = model.base_model.decoder.layers[1].self_attn, side.steps[0].block.self_attn
    with torch.no_grad():
        for name, rows in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            torch.testing.assert_close(getattr(small, name)(x_side), getattr(big, name)(x_full)[..., sets[rows]],
                                       rtol=1e-5, atol=1e-5)
        if head_size == "full":
            assert small.num_heads == 2 and small.head_dim == big.head_dim
            writes = torch.zeros_like(big.out_proj.weight)
            writes[:, sets["o"]] = 1
            big.out_proj.weight.mul_(writes)  # only the kept heads write
            expected = big(x_full, attention_mask=None)[0][..., selection.res]
            torch.testing.assert_close(small(x_side, attention_mask=None)[0], expected, rtol=1e-5, atol=1e-5)


def test_opt_checkpoints_lst_cannot_follow_are_refused():
    with pytest.raises(ConfigError, match="opt-350m"):
        families.check(OPTConfig(**OPT | {"do_layer_norm_before": False}), 4, [0])
    with pytest.raises(ConfigError, match="opt-350m"):
        families.check(OPTConfig(**OPT | {"word_embed_proj_dim": 32}), 4, [0])
    with pytest.raises(ConfigError, match="layer_norm_elementwise_affine false"):
        families.check(OPTConfig(**OPT, layer_norm_elementwise_affine=False), 4, [0])
    with pytest.raises(ConfigError, match="layerdrop=0.1 skips backbone layers"):
        families.check(OPTConfig(**OPT, layerdrop=0.1), 4, [0])
    families.check(OPTConfig(**OPT), 4, [0])
    families.check(OPTConfig(**OPT), 2, [0], head_size="full")


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("layers, head_size", [(None, "reduced"), ([0, 3], "reduced"), (None, "full")])
def test_cached_generation_equals_step_by_step_decoding(name, layers, head_size):
    model = make(name)
    side = with_side(model, layers=layers, head_size=head_size)
    torch.manual_seed(3)
    for p in side.parameters():  # a side network that changes the predictions
        p.data.add_(torch.randn_like(p) * 0.2)
    prompt = IDS[:, :5]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        sequence = prompt
        for _ in range(10):
            step = output(model, sequence, use_cache=False)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], 1)
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(cached, sequence)
    assert not torch.equal(cached[:, 5:], _without_side(name, prompt))  # the side network did change them
    assert beams.shape == (2, 11)


def _without_side(name, prompt):
    with torch.no_grad():
        return make(name).generate(prompt, max_new_tokens=10, do_sample=False)[:, 5:]


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_side_respects_padding(name):
    model = make(name)
    side = with_side(model, layers=[0, 2], merge="none")
    torch.manual_seed(3)
    for p in side.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([[5, 8, 13, 21, 34, 55, 7, 9]])
    padded = torch.cat([ids, torch.full((1, 4), pad)], 1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        batched = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_side_shapes_gates_and_layer_dropping():
    model = make("llama")
    side = with_side(model, reduction=4, layers=[1, 3])
    assert side.layer_ids == [1, 3] and len(side.steps) == 2
    block = side.steps[0].block
    assert block.self_attn.q_proj.weight.shape == (4 * 4, 16) and block.self_attn.k_proj.weight.shape == (2 * 4, 16)
    assert block.mlp.gate_proj.weight.shape == (24, 16) and side.first.weight.shape == (16, 64)
    assert [s.block.self_attn.layer_idx for s in side.steps] == [4, 5]  # KV slots after the backbone's
    assert all(s.gate().item() == 0.5 for s in side.steps)  # alpha 0 -> mu 0.5 (LST's init)
    assert all(p.dtype == torch.float32 for p in side.parameters())
    assert layer_ids("all", 4) == [0, 1, 2, 3] and layer_ids("every:2", 5) == [0, 2, 4]
    assert layer_ids("every:4", 12) == [3, 7, 11] and layer_ids(" 7, 3,3", 12) == [3, 7]
    for bad in ("every:x", "every:0", "", "a,b"):
        with pytest.raises(ConfigError, match="lst_layers"):
            layer_ids(bad, 4)


def test_pruned_init_copies_the_selected_rows_and_columns():
    model = make("qwen2")
    settings = SideSettings(reduction=4, layer_ids=[2])
    side = build(model, settings)
    selection = select(model, settings)
    init_pruned(model, side, selection)
    sets = index_sets(model.config, selection, 2)
    big, small = model.base_model.layers[2], side.steps[0].block
    res = selection.res
    torch.testing.assert_close(small.self_attn.q_proj.weight, big.self_attn.q_proj.weight[sets["q"]][:, res])
    torch.testing.assert_close(small.self_attn.q_proj.bias, big.self_attn.q_proj.bias[sets["q"]])
    torch.testing.assert_close(small.self_attn.o_proj.weight, big.self_attn.o_proj.weight[res][:, sets["o"]])
    torch.testing.assert_close(small.mlp.down_proj.weight, big.mlp.down_proj.weight[res][:, sets["mlp"]])
    torch.testing.assert_close(small.input_layernorm.weight, big.input_layernorm.weight[res])
    torch.testing.assert_close(side.output.norm.weight, model.base_model.norm.weight[res])
    # the residual dims are the embedding columns with the largest L1 norm
    expected = model.get_input_embeddings().weight.abs().sum(0).topk(16).indices.sort().values
    assert torch.equal(res, expected)
    # Down_i reads exactly the kept residual dims
    x = torch.randn(3, 64)
    torch.testing.assert_close(side.steps[0].down(x), x[:, res])
    assert side.output.up.weight.abs().sum() == 0


def test_fisher_importance_is_the_sum_of_squared_gradients():
    model = make("llama")
    batches = [torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    name = "model.layers.1.mlp.down_proj.weight"
    score = fisher(model, batches, {name, "model.embed_tokens.weight"})
    weight = dict(model.named_parameters())[name]
    expected = torch.zeros_like(weight)
    for batch in batches:
        model.zero_grad()
        weight.requires_grad_(True)
        model(input_ids=batch, labels=batch).loss.backward()
        expected += weight.grad.pow(2)
    torch.testing.assert_close(score(name, weight), expected, rtol=1e-5, atol=1e-12)
    settings = SideSettings(reduction=4, layer_ids=[1])
    from trainer_plugins_lst.pruning import importance_names

    names = importance_names(model, [1])
    assert names == {"model.embed_tokens.weight", *(f"model.layers.1.{w}" for w in
                     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"))}
    selection = select(model, settings, fisher(model, batches, names))  # reads only those weights
    assert len(selection.res) == 16 and len(selection.layers[1]["mlp"]) == 24


def test_four_bit_backbone_is_pruned_from_its_dequantised_weights(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # MLP 128 wide: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights for inference (eval, no
    # grad) and needs every input width a multiple of its block size, 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**DECODER, "intermediate_size": 128})).eval()
    path = str(tmp_path)
    model.save_pretrained(path)
    quantised = LlamaForCausalLM.from_pretrained(path, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    q_proj = quantised.model.layers[1].self_attn.q_proj.weight
    assert type(q_proj).__name__ == "Params4bit"
    restored = dense(q_proj)
    assert restored.shape == (64, 64) and restored.dtype == torch.float32
    torch.testing.assert_close(restored, bnb.functional.dequantize_4bit(q_proj.data, q_proj.quant_state).float())
    assert (restored - model.model.layers[1].self_attn.q_proj.weight).abs().mean() < 0.2 * restored.abs().mean()
    # frozen first: in eval without grad, bitsandbytes on an AVX512-BF16 CPU switches to a repacked bf16
    # kernel, so the reference and the run with the side must both take that path (or both not)
    quantised.requires_grad_(False)
    reference = output(quantised)
    # also from repacked weights (whose block scales the repacking rounded to bf16: 2^-8 relative)
    torch.testing.assert_close(dense(q_proj), restored, rtol=2 ** -8, atol=1e-6)
    side = with_side(quantised, layers=[1, 2])
    torch.testing.assert_close(output(quantised), reference, rtol=0, atol=0)
    quantised.train()
    loss = quantised(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for p in side.parameters())


def test_four_bit_opt_backbone_starts_as_the_backbone_and_trains_its_side(tmp_path):
    """QST on OPT: the pruned init reads the NF4 projections dequantised (their biases and LayerNorms stay whole)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(**OPT | {"ffn_dim": 128})).save_pretrained(tmp_path)  # fc2 input 128: see the Llama test
    quantised = OPTForCausalLM.from_pretrained(str(tmp_path), device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    assert type(quantised.model.decoder.layers[1].fc1.weight).__name__ == "Params4bit"
    quantised.requires_grad_(False).eval()  # frozen first: see the Llama test above
    reference = output(quantised)
    side = with_side(quantised, layers=[1, 2])
    torch.testing.assert_close(output(quantised), reference, rtol=0, atol=0)
    quantised.train()
    quantised(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in side.parameters())
