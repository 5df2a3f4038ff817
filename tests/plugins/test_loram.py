"""The loram plugin in the Trainer: recovered adapters that load in plain peft, merge, exact resume, alignment
and loading a pruned model, QLoRAM (4-bit), refusals before loading, ZeRO-2/3 with 2 processes."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaForCausalLM

from trainer_plugins import ConfigError, PluginTrainer, PluginTrainingArguments
from trainer_plugins.models import tiny_llama_config
from trainer_plugins.recipes import load_recipe, run_recipe
from trainer_plugins_loram.pruning import INDEX_FILE, PruningPlan
from trainer_plugins_loram.storage import load_pruned_model
from helpers import (ROOT, as_one_process, assert_weights_match, counting_dataset, four_bit_two_processes_equal_one,
                     losses, one_thread, save_tiny_llama,
                     shared_torchrun, torchrun_cli, zero_recipe)

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
              save_strategy="no", disable_tqdm=True, max_steps=8)
LORAM = dict(loram="lora", loram_importance="magnitude", loram_keep_first_layers=1, loram_keep_last_layers=1,
             loram_lora_dropout=0.0, loram_lora_r=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GQA Llama (4 layers, 8 heads on 4 KV heads, vocab 1000) saved with save_pretrained."""
    return save_tiny_llama(tmp_path_factory.mktemp("loram-tiny"), **SHAPE)


@pytest.fixture(scope="module")
def recipe_model_dir(tmp_path_factory, tokenizer_dir):
    """The same shape with SmolLM2's tokenizer beside it, for recipes on the stdlib corpus."""
    return save_tiny_llama(tmp_path_factory.mktemp("loram-tiny-tok"), tokenizer_dir, **SHAPE)


def trainer_for(model_dir, out, **kw):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    args = PluginTrainingArguments(output_dir=str(out), **{**COMMON, **LORAM, **kw})
    return PluginTrainer(model=model, args=args, train_dataset=counting_dataset())


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[(7 * k) % 1000 for k in range(24)]])


def test_recovered_adapter_loads_in_plain_peft_and_reproduces_the_pruned_model(model_dir, tmp_path):
    trainer = trainer_for(model_dir, tmp_path / "out", loram_merge=True)
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    trainer.save_model()
    out = tmp_path / "out"
    expected = logits(trainer.model, IDS)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model_dir and config["r"] == 4
    plan = PruningPlan.load(out / INDEX_FILE)
    assert sorted(plan.kv_heads) == [1, 2] and all(t.numel() == 2 for t in plan.kv_heads.values())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    original = LlamaForCausalLM.from_pretrained(model_dir)
    assert adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)

    # Plain peft on the original with the pruned units masked = the pruned model + its adapter.
    masked = LlamaForCausalLM.from_pretrained(model_dir)
    plan.mask_units(masked)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(masked, str(out)), IDS), expected, rtol=0, atol=1e-5)
    # The adapter at the pruned shapes loads on the pruned model.
    pruned = LlamaForCausalLM.from_pretrained(model_dir)
    plan.apply(pruned)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(pruned, str(out / "pruned_adapter")), IDS), expected,
                               rtol=0, atol=1e-5)
    # LoRAM's inference model: the ORIGINAL weights + the recovered adapter, merged and saved.
    with_adapter = logits(PeftModel.from_pretrained(original, str(out)), IDS)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    torch.testing.assert_close(logits(merged, IDS), with_adapter, rtol=0, atol=1e-5)
    record = json.loads((out / "loram.json").read_text())
    assert record["parameters"]["pruned"] < record["parameters"]["original"]
    assert record["pruning"]["kv_heads_kept"] == {"1": 2, "2": 2}


def test_resume_equals_the_uninterrupted_run(model_dir, tmp_path):
    full = trainer_for(model_dir, tmp_path / "a")
    full.train()
    cut = trainer_for(model_dir, tmp_path / "b", save_strategy="steps", save_steps=4)
    cut.train()
    resumed = trainer_for(model_dir, tmp_path / "b", save_strategy="steps", save_steps=4,
                          resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert losses(resumed)[-4:] == pytest.approx(losses(full)[-4:], abs=1e-6)
    a = {n: p for n, p in full.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and len(a) == 4 * 7 * 2
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_python_model_two_four_and_refusals(model_dir, tmp_path):
    trainer = trainer_for(model_dir, tmp_path / "nm", loram_pruning="2:4", loram_importance="magnitude", max_steps=2)
    layer = trainer.model.base_model.model.model.layers[1]
    w = layer.mlp.up_proj.base_layer.weight
    assert w.shape == (96, 64) and ((w != 0).view(96, -1, 4).sum(-1) == 2).all()
    trainer.train()
    trainer.save_model()
    recovered = load_file(str(tmp_path / "nm" / "adapter_model.safetensors"))
    at_pruned = load_file(str(tmp_path / "nm" / "pruned_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(recovered[k], v) for k, v in at_pruned.items())  # same shapes: identity
    with pytest.raises(ConfigError, match="original model's location is unknown"):
        PluginTrainer(model=LlamaForCausalLM(tiny_llama_config(**SHAPE)),
                      args=PluginTrainingArguments(output_dir=str(tmp_path / "x"), **{**COMMON, **LORAM},
                                                   loram_merge=True), train_dataset=counting_dataset())


def recipe(model_dir, out, **train):
    return {"model": {"model_name_or_path": model_dir, "dtype": "float32"},
            "data": {"dataset": "stdlib", "max_seq_length": 32, "max_train_samples": 24, "max_eval_samples": 8},
            "train": {"output_dir": str(out), **{k: v for k, v in COMMON.items() if k != "seed"}, "max_steps": 4,
                      "per_device_eval_batch_size": 4, **LORAM, "loram_importance": "first_order",
                      "loram_calibration_samples": 4, "loram_calibration_seq_length": 32, **train}}


@pytest.mark.slow
def test_align_then_lora_on_the_aligned_pruned_model(recipe_model_dir, tmp_path):
    aligned = tmp_path / "aligned"
    results = run_recipe(load_recipe(recipe(recipe_model_dir, aligned, loram="align", learning_rate=1e-3)))
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    model, plan = load_pruned_model(aligned, torch.float32)
    original = LlamaForCausalLM.from_pretrained(recipe_model_dir)
    assert plan.settings["importance"] == "first_order" and plan.settings["calibration"]["samples"] == 4
    assert model.model.layers[2].mlp.up_proj.weight.shape == (48, 64)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # frozen while aligning
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    pruned = LlamaForCausalLM.from_pretrained(recipe_model_dir)
    plan.apply(pruned)
    assert not torch.equal(model.model.layers[2].mlp.up_proj.weight, pruned.model.layers[2].mlp.up_proj.weight)

    out = tmp_path / "lora"
    results = run_recipe(load_recipe(recipe(recipe_model_dir, out, loram_pruned_model=str(aligned), loram_merge=True)))
    assert results["train"]["steps"] == 4 and results["after"]["eval_loss"] < 11
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"].abs().sum() > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == recipe_model_dir
    assert PruningPlan.load(out / INDEX_FILE).kv_heads.keys() == plan.kv_heads.keys()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))  # the original's shapes
    assert merged.model.layers[2].mlp.up_proj.weight.shape == (96, 64)


@pytest.mark.slow
def test_qloram_prunes_then_quantises_and_recovers(recipe_model_dir, tmp_path):
    import bitsandbytes as bnb

    r = load_recipe(recipe(recipe_model_dir, tmp_path / "q", loram_importance="magnitude", bnb_4bit_compute_dtype="float32")
                    | {"model": {"model_name_or_path": recipe_model_dir, "dtype": "float32", "load_in_4bit": True}})
    host = r.args._host
    model = host.call_first("load_model", r.args, model_args=r.model_args)
    mlp = model.model.layers[2].mlp
    assert isinstance(mlp.up_proj, bnb.nn.Linear4bit) and (mlp.up_proj.out_features, mlp.up_proj.in_features) == (48, 64)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.is_loaded_in_4bit
    from trainer_plugins.data import build_datasets, data_collator
    from trainer_plugins.models import load_tokenizer

    tok = load_tokenizer(r.model_args)
    train, _ = build_datasets(r.data_args, tok)
    trainer = PluginTrainer(model=model, args=r.args, train_dataset=train, data_collator=data_collator(tok))
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    assert all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.save_model()
    masked = LlamaForCausalLM.from_pretrained(recipe_model_dir)
    loaded = PeftModel.from_pretrained(masked, str(tmp_path / "q"))  # plain peft, full-size base
    assert loaded.base_model.model.model.layers[2].mlp.up_proj.lora_B.default.weight.shape == (96, 4)
    assert json.loads((tmp_path / "q" / "loram.json").read_text())["4bit"] == "nf4"


@pytest.mark.parametrize("flags, message", [
    ({"loram_ratio": 1.0}, "loram_ratio must be in"),
    ({"loram_pruning": "4:2"}, "loram_pruning must be"),
    ({"loram_pruning": "unstructured", "loram_importance": "first_order"}, "first_order scores structured"),
    ({"loram_importance": "wanda"}, "wanda scores single weights"),
    ({"loram_keep_first_layers": 2, "loram_keep_last_layers": 2}, "nothing to prune"),
    ({"loram_target_modules": "q_proj,qkv"}, "unknown ['qkv']"),
    ({"loram_lora_r": 0}, "loram_lora_r >= 1"),
    ({"loram": "align", "loram_merge": True}, "trains no adapter"),
    ({"loram_indices": "/nonexistent.safetensors"}, "no such file"),
    ({"loram_pruned_model": "/tmp"}, "not a pruned model directory"),
])
def test_bad_flags_are_refused_before_loading(model_dir, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(recipe(model_dir, tmp_path, **flags))


def test_refusals_that_need_the_model_config_or_setup(model_dir, tmp_path, deepspeed_env):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="Llama-family"):
        load_recipe(recipe(str(gpt2), tmp_path))
    four_bit = recipe(model_dir, tmp_path, loram="align")
    four_bit["model"]["load_in_4bit"] = True
    with pytest.raises(ConfigError, match="4-bit weights cannot be trained"):
        load_recipe(four_bit)
    from trainer_plugins.models import ModelArguments
    from trainer_plugins_loram.plugin import validate

    classifier = ModelArguments(model_name_or_path=model_dir, task="sequence-classification", num_labels=2)
    with pytest.raises(ConfigError, match="loram trains a causal LM"):
        validate(PluginTrainingArguments(output_dir=str(tmp_path), **LORAM), classifier, None)
    other = tmp_path / "other"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**{**SHAPE, "intermediate_size": 128})).save_pretrained(other)
    plan_dir = tmp_path / "plan"
    trainer = trainer_for(str(other), plan_dir, max_steps=1)
    with pytest.raises(ConfigError, match="was pruned from a model shaped"):
        load_recipe(recipe(model_dir, tmp_path, loram_indices=str(plan_dir / INDEX_FILE)))
    del trainer


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2, 3])
def test_two_processes_equal_one_process_and_save_a_complete_adapter(model_dir, stage, tmp_path, request):
    out = shared_torchrun(request, ROOT / "tests" / "plugins" / "loram_zero_worker.py",  # every stage in one launch
                          lambda params, directory: [params["stage"], directory, model_dir])
    with one_thread():
        plain = trainer_for(model_dir, tmp_path / "plain", **as_one_process({}))
        plain.train()
        plain.save_model()
    record = json.loads((out / "record.json").read_text())
    assert record["losses"] == pytest.approx(losses(plain), rel=1e-6 if stage == "ddp" else 1e-5)
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert len(ours) == 4 * 7 * 2  # complete, never empty (peft#297)
    assert_weights_match(ours, load_file(str(tmp_path / "plain" / "adapter_model.safetensors")), stage == "ddp")


@pytest.mark.slow
def test_recipe_under_zero3_loads_whole_weights_to_prune(recipe_model_dir, tmp_path):
    """The CLI path: under ZeRO-3, from_pretrained would partition the weights while loading; loram loads them
    whole, prunes, and lets DeepSpeed partition the pruned model."""
    path = zero_recipe(tmp_path, recipe_model_dir, 3, **LORAM, learning_rate=1e-2)
    run = torchrun_cli(["train", path])
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 4 and results["plugins"] == ["loram"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapter) == 4 * 7 * 2 and adapter["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"].shape == (96, 4)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(recipe_model_dir), str(out))


@pytest.fixture(scope="module")
def qloram_model_dir(tmp_path_factory, tokenizer_dir):
    """Pruned by half, every 4-bit layer's input stays a multiple of 64 wide (attention 2 x 32, MLP 128): on
    CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for evaluation and needs that."""
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    return save_tiny_llama(tmp_path_factory.mktemp("qloram-tiny-tok"), tokenizer_dir, **shape)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2, 3])
def test_qloram_with_two_processes_equals_one_process(qloram_model_dir, tmp_path, stage, request):
    """QLoRAM through the CLI with 2 processes (DDP, ZeRO-2 or ZeRO-3): each rank prunes the same way, quantises
    its copy to NF4 (ZeRO-3 then partitions it) and trains the LoRA on it; the losses equal the one-process run
    on the same global batches and the saved adapter is complete, recovered to the original shapes and loads
    in plain peft."""
    pytest.importorskip("bitsandbytes")
    adapter, out = four_bit_two_processes_equal_one(request, tmp_path, qloram_model_dir, stage,
                                                    "adapter_model.safetensors", **LORAM, learning_rate=1e-2)
    assert len(adapter) == 4 * 7 * 2 and adapter["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"].shape == (256, 4)
    assert json.loads((out / "loram.json").read_text())["4bit"] == "nf4"
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(qloram_model_dir), str(out))
