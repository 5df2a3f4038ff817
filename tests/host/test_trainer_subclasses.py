"""The mixin in front of real Trainer subclasses from the ecosystem, TRL's SFTTrainer and DPOTrainer, which rebuild
any TrainingArguments that is not their own config: the plugins' flags must reach them through
``arguments_class(base=SFTConfig)`` (or DPOConfig), and plain plugin arguments get one clear error instead of TRL's
TypeError."""

import json
import pickle

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig

from helpers import plugin_sft_trainer
from trainer_plugins import ConfigError, PluginsMixin, PluginTrainingArguments, arguments
from trainer_plugins.arguments import arguments_class

PluginSFTTrainer = plugin_sft_trainer()


def sft_run(tiny_model_dir, args):
    torch.manual_seed(0)
    texts = [f"def add_{i}(x):\n    return x + {i}\n" for i in range(16)]
    return PluginSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                            train_dataset=Dataset.from_dict({"text": texts}),
                            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))


def settings(tmp_path, **extra):
    return dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, learning_rate=1e-3, save_strategy="no", disable_tqdm=True,
                max_length=64, **extra)


def test_sft_trainer_trains_with_a_plugin_from_sft_config_flags(tmp_path, tiny_model_dir):
    from trainer_plugins_apollo.optimizer import APOLLO

    Args = arguments_class(base=SFTConfig)
    args = Args(**settings(tmp_path, apollo="mini", apollo_update_proj_gap=2))
    assert isinstance(args, SFTConfig) and Args.__name__ == "PluginSFTConfig"
    trainer = sft_run(tiny_model_dir, args)
    assert trainer.args is args  # TRL kept its own class, flags included
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, APOLLO)
    assert any(g.get("rank") == 1 and g.get("scale_type") == "tensor" for g in optimizer.param_groups)  # Mini
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and len(moved) == len(before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("peak_mem_gib" in h for h in trainer.state.log_history)  # the host's own metrics hook ran


# TRL's SFTConfig turns activation checkpointing on by default, which LST and MEFT refuse (it would re-run work
# they already avoid): their users say gradient_checkpointing false, as here.
EACH_PLUGIN = {
    "lst": (dict(lst=True, gradient_checkpointing=False), ["lst_side.safetensors", "lst_config.json"]),
    "loram": (dict(loram="lora", loram_ratio=0.5, loram_keep_first_layers=0, loram_keep_last_layers=0),
              ["adapter_model.safetensors", "loram_pruning.safetensors"]),
    "meft": (dict(meft="meft1", gradient_checkpointing=False), ["adapter_model.safetensors", "meft_config.json"]),
    "sparse": (dict(sparse="magnitude", sparse_final_sparsity=0.5, sparse_timing="step", sparse_start=1,
                    sparse_end=2, sparse_every=1), ["model.safetensors", "sparsity.json"]),
}


@pytest.mark.latest_only  # the mixin and TRL meet in the tests above on both transformers; this is the breadth
@pytest.mark.parametrize("plugin", list(EACH_PLUGIN))
def test_each_plugin_trains_and_saves_its_output_under_sft_trainer(tmp_path, tiny_model_dir, plugin):
    flags, files = EACH_PLUGIN[plugin]
    trainer = sft_run(tiny_model_dir, arguments_class(base=SFTConfig)(**settings(tmp_path, **flags)))
    trainer.train()
    trainer.save_model()
    assert trainer.plugins_banner().startswith(f"trainer-plugins 0.1.0: enabled: {plugin}-")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all((tmp_path / f).is_file() for f in files), sorted(p.name for p in tmp_path.iterdir())
    if plugin == "sparse":  # pruned by the schedule during SFT's steps, not only configured
        assert json.loads((tmp_path / "sparsity.json").read_text())["sparsity"] == pytest.approx(0.5, abs=1e-5)


class PluginDPOTrainer(PluginsMixin, DPOTrainer):
    pass


@pytest.mark.latest_only
@pytest.mark.parametrize("plugin", ["apollo", *EACH_PLUGIN])
def test_each_plugin_trains_and_saves_its_output_under_dpo_trainer(tmp_path, tiny_model_dir, plugin):
    """DPO builds its reference from the model it is handed: the plugin's model (LST's side network, LoRAM's and
    MEFT's adapters, which DPO turns off for the reference) is the policy, and the preference loss trains it."""
    flags, files = EACH_PLUGIN.get(plugin, (dict(apollo="mini"), ["model.safetensors"]))
    if plugin == "lst":  # the reference log-probs from the starting policy itself: no second backbone
        flags = dict(flags, precompute_ref_log_probs=True)
    rows = [{"prompt": f"def add_{i}(x):", "chosen": f" return x + {i}", "rejected": f" return x - {i}"}
            for i in range(16)]
    torch.manual_seed(0)
    trainer = PluginDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               args=arguments_class(base=DPOConfig)(**settings(tmp_path, **flags)),
                               train_dataset=Dataset.from_list(rows),
                               processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    trainer.save_model()
    assert trainer.plugins_banner().startswith(f"trainer-plugins 0.1.0: enabled: {plugin}-")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy = reference at first
    assert min(losses[1:]) < losses[0]  # the policy moved away from the reference
    assert all((tmp_path / f).is_file() for f in files), sorted(p.name for p in tmp_path.iterdir())
    if plugin == "apollo":
        from trainer_plugins_apollo.optimizer import APOLLO

        assert isinstance(trainer.optimizer.optimizer, APOLLO)
    if plugin == "lst":
        assert trainer.ref_model is None


def test_lst_under_dpo_needs_precomputed_reference_log_probs(tmp_path, tiny_model_dir):
    """TRL would load the backbone again as the reference: LST's memory, and not the starting policy with
    lst_merge none (seen: DPO's first loss 0.6864 instead of ln 2). One clear error names the setting."""
    args = arguments_class(base=DPOConfig)(**settings(tmp_path, lst=True, gradient_checkpointing=False))
    with pytest.raises(ConfigError, match="lst under a preference trainer: set precompute_ref_log_probs true"):
        PluginDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))


def test_plain_plugin_arguments_get_one_clear_error_from_sft_trainer(tmp_path, tiny_model_dir):
    args = PluginTrainingArguments(**{k: v for k, v in settings(tmp_path, apollo="mini").items() if k != "max_length"})
    with pytest.raises(ConfigError, match=r"PluginSFTTrainer rebuilds the training arguments as its own class, "
                                          r"which has no plugin flag '.*'.*arguments_class\(base=SFTConfig\)"):
        sft_run(tiny_model_dir, args)


def test_sft_arguments_pickle_back_to_their_class_in_a_fresh_process(tmp_path, monkeypatch):
    """The Trainer saves its arguments with torch.save; a fresh process rebuilds the class from its base's name."""
    args = arguments_class(base=SFTConfig)(**settings(tmp_path, apollo="mini", apollo_rank=4))
    blob = pickle.dumps(args)
    monkeypatch.setattr(arguments, "_CLASSES", {})  # as in a process that never built it
    back = pickle.loads(blob)
    assert type(back).__name__ == "PluginSFTConfig" and isinstance(back, SFTConfig)
    assert (back.apollo, back.apollo_rank, back.max_length) == ("mini", 4, 64)


def test_a_base_that_is_not_training_arguments_is_refused():
    with pytest.raises(ConfigError, match="base must be TrainingArguments or a subclass"):
        arguments_class(base=dict)


def test_a_subclass_that_drops_the_flags_quietly_is_caught(tmp_path):
    """A Trainer subclass that swaps the arguments for a plain TrainingArguments would train without the plugin."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from trainer_plugins.models import tiny_llama_config

    class OwnArguments(Trainer):
        def __init__(self, model, args, **kwargs):
            super().__init__(model, TrainingArguments(output_dir=args.output_dir, use_cpu=True, report_to=[]), **kwargs)

    class Mixed(PluginsMixin, OwnArguments):
        pass

    args = PluginTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], apollo="mini")
    with pytest.raises(ConfigError, match="Mixed rebuilds the training arguments as its own class, which has no "
                                          "plugin flag 'apollo"):
        Mixed(LlamaForCausalLM(tiny_llama_config()), args)
