"""The lst plugin in the Trainer: only the side network trains and is saved (alone), the saved side reloads onto
a fresh backbone, resume equals the uninterrupted run (gates included), BERT classifiers train a new head, a
4-bit backbone and Fisher importance through recipes, refusals before loading, ZeRO-2/3 with 2 processes."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, GPT2Config, LlamaForCausalLM

from trainer_plugins import ConfigError, PluginTrainer, PluginTrainingArguments
from trainer_plugins.models import tiny_llama_config
from trainer_plugins.recipes import load_recipe, run_recipe
from trainer_plugins_lst import load, side_of
from trainer_plugins_lst.plugin import CONFIG_NAME, WEIGHTS_NAME, _check_cuda_graphs
from helpers import (ROOT, as_one_process, assert_weights_match, four_bit_two_processes_equal_one, losses, one_thread,
                     save_tiny_llama, shared_torchrun)

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
              save_strategy="no", disable_tqdm=True, max_steps=8)
LST = dict(lst=True, lst_reduction_factor=4)
IDS = torch.tensor([[(7 * k) % 1000 for k in range(24)]])


def cycles():
    """Runs through 16 of the 1000 token ids: what a d/r-wide side path on a random tiny backbone can learn in a
    few steps (helpers.counting_dataset needs a map over all 1000 ids, beyond a 16-wide bottleneck)."""
    return [{"input_ids": [(s + k) % 16 for k in range(32)], "labels": [(s + k) % 16 for k in range(32)]}
            for s in range(64)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GQA Llama (4 layers, 4 heads on 2 KV heads, vocab 1000) saved with save_pretrained."""
    return save_tiny_llama(tmp_path_factory.mktemp("lst-tiny"), **SHAPE)


@pytest.fixture(scope="module")
def opt_model_dir(tmp_path_factory):
    """A tiny OPT (4 layers, 4 heads, vocab 1000) saved with save_pretrained; no dropout, so that two processes
    draw no other masks than one."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lst-tiny-opt")
    OPTForCausalLM(OPTConfig(vocab_size=1000, hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=64, dropout=0.0)).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def recipe_model_dir(tmp_path_factory, tokenizer_dir):
    """The same shape with SmolLM2's tokenizer beside it, for recipes on the stdlib corpus; the MLP 128 wide:
    on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference and needs every input
    width a multiple of its block size (64)."""
    return save_tiny_llama(tmp_path_factory.mktemp("lst-tiny-tok"), tokenizer_dir, **{**SHAPE, "intermediate_size": 128})


def trainer_for(model_dir, out, **kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = PluginTrainingArguments(output_dir=str(out), **{**COMMON, **LST, **kw})
    return PluginTrainer(model=model, args=args, train_dataset=cycles())


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_the_side_network_trains_and_is_saved_alone_and_reloads(model_dir, tmp_path):
    untouched = logits(LlamaForCausalLM.from_pretrained(model_dir))
    trainer = trainer_for(model_dir, tmp_path, max_steps=16)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lst_side.") for n in trainable)
    torch.testing.assert_close(logits(trainer.model), untouched, rtol=0, atol=0)  # starts as the backbone
    trainer.train()
    history = losses(trainer)
    assert sum(history[-4:]) < sum(history[:4]) - 0.4  # it learns
    gates = [h for h in trainer.state.log_history if "lst/gate_mean" in h]
    assert gates and 0 < gates[-1]["lst/gate_min"] <= gates[-1]["lst/gate_max"] < 1
    trainer.save_model()
    files = set(os.listdir(tmp_path))
    assert {WEIGHTS_NAME, CONFIG_NAME} <= files and "model.safetensors" not in files
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(saved) == {n for n, _ in trainer.model.state_dict().items() if n.startswith("lst_side.")}
    assert sum(t.numel() for t in saved.values()) < 0.1 * sum(p.numel() for p in trainer.model.parameters())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["settings"]["reduction"] == 4 and config["init"] == "pruned" and config["backbone"]["hidden_size"] == 64
    trained = logits(trainer.model)
    assert (trained - untouched).abs().max() > 1e-3
    reloaded = load(LlamaForCausalLM.from_pretrained(model_dir), tmp_path)
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    with pytest.raises(ConfigError, match="was trained on a llama with hidden 64"):
        load(LlamaForCausalLM(tiny_llama_config(**{**SHAPE, "hidden_size": 32})), tmp_path)


def test_opt_backbone_trains_saves_and_reloads(opt_model_dir, tmp_path):
    """The other decoder family: OPT (learned positions, LayerNorm, ReLU MLP) through the Trainer; the side network
    learns, saves alone and reloads onto a fresh backbone with the same outputs."""
    from transformers import OPTForCausalLM

    untouched = logits(OPTForCausalLM.from_pretrained(opt_model_dir))
    args = PluginTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **LST, "max_steps": 16})
    trainer = PluginTrainer(model=OPTForCausalLM.from_pretrained(opt_model_dir), args=args, train_dataset=cycles())
    assert all(n.startswith("lst_side.") for n, p in trainer.model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(trainer.model), untouched, rtol=0, atol=0)  # starts as the backbone
    trainer.train()
    history = losses(trainer)
    assert sum(history[-4:]) < sum(history[:4]) - 0.4  # it learns
    trainer.save_model()
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["backbone"]["model_type"] == "opt"
    trained = logits(trainer.model)
    assert (trained - untouched).abs().max() > 1e-3
    reloaded = load(OPTForCausalLM.from_pretrained(opt_model_dir), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=0)


def test_whole_heads_train_save_and_reload(model_dir, tmp_path):
    """lst_head_size=full: the side layers have r x fewer heads of the backbone's size; the setting is saved with
    the side network, reloads it, and a side directory built the other way is refused."""
    trainer = trainer_for(model_dir, tmp_path, lst_head_size="full", lst_reduction_factor=2, max_steps=4)
    block = side_of(trainer.model).steps[0].block.self_attn
    assert block.q_proj.weight.shape == (2 * 16, 32) and block.k_proj.weight.shape == (1 * 16, 32)  # head size 16
    trainer.train()
    trainer.save_model()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["settings"]["head_size"] == "full"
    reloaded = load(LlamaForCausalLM.from_pretrained(model_dir), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(trainer.model), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="lst_head_size='reduced' \\(saved: 'full'\\)"):
        load_recipe(recipe(model_dir, tmp_path / "again", lst_reduction_factor=2, lst_side_dir=str(tmp_path)))


def test_resume_equals_the_uninterrupted_run(model_dir, tmp_path):
    full = trainer_for(model_dir, tmp_path / "a", lst_layers="every:2")
    full.train()
    cut = trainer_for(model_dir, tmp_path / "b", lst_layers="every:2", save_strategy="steps", save_steps=4)
    cut.train()
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert set(load_file(str(checkpoint / "model.safetensors"))) == {
        n for n in cut.model.state_dict() if n.startswith("lst_side.")}  # side only, not the backbone
    resumed = trainer_for(model_dir, tmp_path / "b", lst_layers="every:2", save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed)[-4:] == pytest.approx(losses(full)[-4:], abs=1e-6)
    a, b = dict(side_of(full.model).named_parameters()), dict(side_of(resumed.model).named_parameters())
    assert a.keys() == b.keys() and "steps.0.alpha" in a and len(side_of(full.model).steps) == 2
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_continue_from_a_saved_side_network(model_dir, tmp_path):
    first = trainer_for(model_dir, tmp_path / "first")
    first.train()
    first.save_model()
    again = trainer_for(model_dir, tmp_path / "again", lst_side_dir=str(tmp_path / "first"), max_steps=1)
    torch.testing.assert_close(logits(again.model), logits(first.model), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="built otherwise: lst_reduction_factor=2 \\(saved: 4\\)"):
        trainer_for(model_dir, tmp_path / "other", lst_side_dir=str(tmp_path / "first"), lst_reduction_factor=2)
    with pytest.raises(ConfigError, match="does not fit this side network"):  # other layers: caught at loading
        trainer_for(model_dir, tmp_path / "other", lst_side_dir=str(tmp_path / "first"), lst_layers="1,2")


def test_bert_classifier_trains_side_and_new_head(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_labels=2)
    base = tmp_path / "bert"
    BertForSequenceClassification(config).save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):  # label: does token 7 occur
        ids = torch.randint(10, 100, (12,), generator=g)
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            ids[torch.randint(1, 12, (1,), generator=g)] = 7
        rows.append({"input_ids": [2, *ids.tolist()], "labels": label})
    args = PluginTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **LST, "max_steps": 24})
    trainer = PluginTrainer(model=BertForSequenceClassification.from_pretrained(base), args=args, train_dataset=rows)
    trainable = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"lst_side", "classifier"}  # the pooler is pretrained and stays frozen
    trainer.train()
    history = losses(trainer)
    assert sum(history[-4:]) < sum(history[:4])
    trainer.save_model()
    saved = load_file(str(tmp_path / "out" / WEIGHTS_NAME))
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    ids = torch.tensor([[2, 15, 7, 33, 40]])
    reloaded = load(BertForSequenceClassification.from_pretrained(base), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids), rtol=0, atol=0)


def recipe(model_dir, out, model=None, **train):
    return {
        "model": {"model_name_or_path": str(model_dir), "dtype": "float32", **(model or {})},
        "data": {"dataset": "stdlib", "max_seq_length": 64, "max_train_samples": 16, "max_eval_samples": 4},
        "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1,
                  "report_to": [], "use_cpu": True, "save_strategy": "no", **LST, **train},
    }


@pytest.mark.parametrize("flags, message", [
    ({"lst_reduction_factor": 5}, "lst_reduction_factor=5 does not divide"),
    ({"lst_head_size": "full", "lst_reduction_factor": 8}, "4 heads on 2 KV heads, hidden 64: whole heads"),
    ({"lst_head_size": "whole"}, "'lst_head_size': must be one of ['reduced', 'full']"),
    ({"lst_reduction_factor": 1}, "must be >= 2"),
    ({"lst_layers": "2,9"}, "layers [9] do not exist"),
    ({"lst_layers": "every:0"}, "every:K"),
    ({"lst_init": "kaiming"}, "'lst_init': must be one of ['pruned', 'random']"),
    ({"lst_merge": "concat"}, "'lst_merge': must be one of ['add', 'none']"),
    ({"lst_gate_temperature": 0.0}, "lst_gate_temperature must be > 0"),
    ({"gradient_checkpointing": True}, "keeps no backbone activations"),
    ({"lst_side_dir": "/nonexistent"}, "no lst_side.safetensors and lst_config.json"),
    ({"meft": "meft1"}, "meft"),
    ({"lst_compile": True, "torch_compile": True}, "torch_compile the whole model .* set one of them"),
    ({"lst_cuda_graphs": True}, "lst_cuda_graphs replays the graphs lst_compile builds: set lst_compile true"),
    ({"lst_compile": True, "lst_cuda_graphs": True}, "lst_cuda_graphs needs a CUDA GPU"),  # use_cpu
])
def test_bad_flags_are_refused_before_loading(model_dir, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(recipe(model_dir, tmp_path, **flags))


def test_refusals_that_need_the_model_config_or_setup(model_dir, tmp_path, deepspeed_env, monkeypatch):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="lst supports the model types"):
        load_recipe(recipe(str(gpt2), tmp_path))
    with pytest.raises(ConfigError, match="fisher needs gradients of whole weights"):
        load_recipe(recipe(model_dir, tmp_path, model={"load_in_4bit": True}, lst_importance="fisher"))
    zero3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")
    with pytest.raises(ConfigError, match="fisher runs a backward pass"):
        load_recipe(recipe(model_dir, tmp_path, lst_importance="fisher", deepspeed=zero3))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "2.4.1")
        with pytest.raises(ConfigError, match=r"lst_compile needs torch >= 2.5 .* this is torch 2.4.1"):
            load_recipe(recipe(model_dir, tmp_path, lst_compile=True))
    with pytest.raises(ConfigError, match="lst_compile under ZeRO-3"):
        load_recipe(recipe(model_dir, tmp_path, lst_compile=True, deepspeed=zero3))
    with monkeypatch.context() as patch:  # as on a GPU machine (arguments alone: no device is set up)
        patch.setattr(torch.cuda, "is_available", lambda: True)
        gpu = dict(lst_compile=True, lst_cuda_graphs=True, use_cpu=False, deepspeed=None)
        _check_cuda_graphs(SimpleNamespace(**gpu))  # one process: accepted
        with pytest.raises(ConfigError, match=r"lst_cuda_graphs is supported in one process .* lst_compile without"):
            _check_cuda_graphs(SimpleNamespace(**{**gpu, "deepspeed": str(ROOT / "recipes" / "deepspeed" / "zero2.json")}))
        patch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match=r"lst_cuda_graphs is supported in one process"):
            _check_cuda_graphs(SimpleNamespace(**gpu))
    no_gather = tmp_path / "zero3-no-gather.json"
    config = json.loads(open(zero3).read())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    no_gather.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save true"):
        load_recipe(recipe(model_dir, tmp_path, deepspeed=str(no_gather)))
    bert = tmp_path / "bert"
    BertConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4).save_pretrained(bert)
    with pytest.raises(ConfigError, match="lst_head_size=full keeps whole heads, r times fewer, in decoders"):
        load_recipe(recipe(str(bert), tmp_path, lst_head_size="full"))
    with pytest.raises(ConfigError, match="for encoders use lst_importance=magnitude"):
        load_recipe(recipe(str(bert), tmp_path, lst_importance="fisher"))


def test_recipe_with_a_4bit_backbone_and_fisher_importance(recipe_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    four_bit = run_recipe(load_recipe(recipe(recipe_model_dir, tmp_path / "q", model={"load_in_4bit": True})))
    assert four_bit["after"]["eval_loss"] < 20
    saved = load_file(str(tmp_path / "q" / WEIGHTS_NAME))
    assert saved and all(k.startswith("lst_side.") for k in saved)
    fisher = run_recipe(load_recipe(recipe(recipe_model_dir, tmp_path / "f", lst_importance="fisher",
                                           lst_calibration_samples=4, lst_calibration_seq_length=32)))
    config = json.loads((tmp_path / "f" / CONFIG_NAME).read_text())
    assert config["importance"] == "fisher" and fisher["train"]["steps"] == 4
    magnitude = run_recipe(load_recipe(recipe(recipe_model_dir, tmp_path / "m")))
    a, b = load_file(str(tmp_path / "f" / WEIGHTS_NAME)), load_file(str(tmp_path / "m" / WEIGHTS_NAME))
    assert any(not torch.equal(a[k], b[k]) for k in a if "block" in k)  # the Fisher scores chose other units


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2, 3, "2-compile", "3-opt"])  # 2-compile: ZeRO-2 with lst_compile, eager's
def test_two_processes_equal_one_process_and_save_the_side_network(model_dir, opt_model_dir, stage, tmp_path, request):
    """3-opt: an OPT backbone under ZeRO-3 (partitioned while loading; the pruned init gathers its layers)."""
    def backbone(stage):
        return opt_model_dir if str(stage).endswith("opt") else model_dir

    out = shared_torchrun(request, ROOT / "tests" / "plugins" / "lst_zero_worker.py",  # every stage in one launch
                          lambda params, directory: [params["stage"], directory, backbone(params["stage"])])
    with one_thread():
        plain = trainer_for(backbone(stage), tmp_path / "plain", **as_one_process({}))
        plain.train()
        plain.save_model()
    exact = stage == "ddp"  # ZeRO and compiled kernels round in orders of their own (helpers.TWO_RANKS)
    record = json.loads((out / "record.json").read_text())
    assert record["losses"] == pytest.approx(losses(plain), rel=1e-6 if exact else 1e-5)
    assert record["compiled_layers"] == (plain.model.config.num_hidden_layers if "compile" in str(stage) else 0)
    assert_weights_match(load_file(str(out / WEIGHTS_NAME)), load_file(str(tmp_path / "plain" / WEIGHTS_NAME)), exact)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2, 3])
def test_4bit_backbone_with_two_processes_equals_one_process(recipe_model_dir, tmp_path, stage, request):
    """QST-style LST (NF4 backbone) through the CLI with 2 processes: under DDP and ZeRO-2 each rank quantises its
    own frozen backbone, under ZeRO-3 DeepSpeed partitions the packed 4-bit weights (stored in the compute dtype)
    and gathers them for each layer; the losses equal the one-process run on the same global batches and the
    saved side network equals its side network."""
    pytest.importorskip("bitsandbytes")
    saved, _ = four_bit_two_processes_equal_one(request, tmp_path, recipe_model_dir, stage, WEIGHTS_NAME, **LST,
                                                learning_rate=1e-2)
    assert all(k.startswith("lst_side.") for k in saved)
