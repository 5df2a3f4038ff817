"""A model peft already wrapped, or TRL's own ``peft_config``, meets the plugins: those that build their trainable
part themselves (PluginSpec.plain_model: lst, loram, meft, sparse) refuse it with one clear error before they touch
the model, instead of failing deep inside (an AttributeError from LST, a KeyError from LoRAM, an empty batch from
MEFT); an optimizer plugin (apollo) trains the adapter it is given."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from helpers import counting_dataset, losses, plugin_sft_trainer, tiny_llama
from trainer_plugins import PluginConfigError, PluginTrainer, PluginTrainingArguments
from trainer_plugins.arguments import arguments_class

SWITCH = {"lst": dict(lst=True),
          "loram": dict(loram="lora", loram_importance="magnitude", loram_ratio=0.5, loram_keep_first_layers=0,
                        loram_keep_last_layers=0),
          "meft": dict(meft="meft1"), "sparse": dict(sparse="magnitude")}
COMMON = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              save_strategy="no", disable_tqdm=True)


def lora_model():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("plugin", list(SWITCH))
def test_a_plugin_that_builds_its_own_trainable_part_refuses_a_peft_model(tmp_path, plugin):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = PluginTrainingArguments(output_dir=str(tmp_path), **COMMON, **SWITCH[plugin])
    with pytest.raises(PluginConfigError, match=rf"plugin '{plugin}': cannot train a model already wrapped by peft: "
                                                rf".+; pass the plain transformers model \(load it again"):
        PluginTrainer(model=model, args=args, train_dataset=counting_dataset())
    after = dict(model.named_parameters())  # refused before prepare_model touched it
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("plugin", ["loram", "meft"])
def test_a_model_an_earlier_trainer_prepared_is_refused_as_wrapped(tmp_path, plugin):
    """A notebook cell run twice: loram and meft change the model object in place (pruned, adapters injected)."""
    model = tiny_llama()
    args = PluginTrainingArguments(output_dir=str(tmp_path), **COMMON, **SWITCH[plugin])
    PluginTrainer(model=model, args=args, train_dataset=counting_dataset()).train()
    with pytest.raises(PluginConfigError, match=r"already wrapped by peft: .+ \(load it again if an earlier trainer"):
        PluginTrainer(model=model, args=args, train_dataset=counting_dataset())


def test_adapters_loaded_through_transformers_count_as_wrapped(tmp_path):
    lora_model().save_pretrained(tmp_path / "adapter")
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "adapter"))
    args = PluginTrainingArguments(output_dir=str(tmp_path / "run"), **COMMON, **SWITCH["loram"])
    with pytest.raises(PluginConfigError, match="plugin 'loram': cannot train a model already wrapped by peft"):
        PluginTrainer(model=model, args=args, train_dataset=counting_dataset())


def test_apollo_trains_the_adapter_of_a_peft_model(tmp_path):
    from trainer_plugins_apollo.optimizer import APOLLO

    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = PluginTrainingArguments(output_dir=str(tmp_path), **COMMON, learning_rate=1e-2, apollo="mini")
    trainer = PluginTrainer(model=model, args=args, train_dataset=counting_dataset())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, APOLLO) and len(losses(trainer)) == 2
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved == {n for n, p in model.named_parameters() if "lora_" in n}


def test_trls_peft_config_is_refused_by_a_plugin_that_brings_its_own_adapters(tmp_path, tiny_model_dir):
    args = arguments_class(base=SFTConfig)(output_dir=str(tmp_path), **COMMON, max_length=64, **SWITCH["loram"])
    with pytest.raises(PluginConfigError, match=r"plugin 'loram': cannot train the trainer's peft_config: LoRAM "
                                                r".+; drop peft_config$"):
        plugin_sft_trainer()(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=Dataset.from_dict({"text": ["def f(x):\n    return x\n"] * 8}),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


def test_list_says_which_plugins_need_the_plain_model(capsys):
    from trainer_plugins.cli import main, plugin_info

    info = {p["name"]: p for p in plugin_info()}
    assert all(info[name]["plain_model"] for name in SWITCH) and info["apollo"]["plain_model"] == ""
    assert main(["list"]) == 0
    assert capsys.readouterr().out.count("needs the plain model (refuses one peft already wrapped): ") == len(SWITCH)
