import json
import os

import probe_plugin
import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from trainer_plugins import PluginConfigError, PluginTrainer
from trainer_plugins.arguments import arguments_class
from trainer_plugins.models import tiny_llama_config
from helpers import losses

COMMON = dict(max_steps=8, per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True,
              seed=0, learning_rate=1e-3, save_strategy="no", disable_tqdm=True)


def fresh_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def test_no_plugin_enabled_is_bit_identical_to_trainer(tmp_path, token_dataset, probe_host):
    plain = Trainer(model=fresh_model(), args=TrainingArguments(output_dir=str(tmp_path / "a"), **COMMON),
                    train_dataset=token_dataset)
    plain.train()
    Args = arguments_class(probe_host)
    ours = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path / "b"), **COMMON),
                         train_dataset=token_dataset)
    ours.train()
    assert losses(plain) == losses(ours) and len(losses(ours)) == 8
    for a, b in zip(plain.model.parameters(), ours.model.parameters()):
        assert torch.equal(a, b)
    assert probe_plugin.CALLS == ["plugin_spec"]  # a plugin that is off is never called


def test_enabled_plugin_hooks_run_in_order(tmp_path, token_dataset, probe_host):
    Args = arguments_class(probe_host)
    args = Args(output_dir=str(tmp_path), probe=True, probe_mode="sgd", **{**COMMON, "save_strategy": "steps",
                                                                          "save_steps": 4})
    trainer = PluginTrainer(model=fresh_model(), args=args, train_dataset=token_dataset)
    assert trainer.model.probe_prepared
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    trainer.save_model()
    calls = [c for c in probe_plugin.CALLS if c != "plugin_spec"]
    steps = args.max_steps // args.logging_steps  # metrics: once per training log
    assert [c for c in calls if c != "metrics"] == [
        "validate", "prepare_model", "callbacks", "create_optimizer", "callback.on_train_begin",
        "save_model.checkpoint", "save_model.checkpoint", "save_model.final", "export"]
    assert calls.count("metrics") == steps
    assert [h["probe/global_step"] for h in trainer.state.log_history if "loss" in h] == list(
        range(args.logging_steps, args.max_steps + 1, args.logging_steps))


def test_save_model_hook_replaces_the_trainer_save(tmp_path, token_dataset, probe_host):
    Args = arguments_class(probe_host)
    args = Args(output_dir=str(tmp_path), probe=True, probe_save_marker=True, **COMMON)
    trainer = PluginTrainer(model=fresh_model(), args=args, train_dataset=token_dataset)
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "probe_marker.txt").read_text() == "saved by probe"
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for a, b in zip(reloaded.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    assert torch.load(tmp_path / "training_args.bin", weights_only=False).probe_save_marker is True


def test_hook_errors_name_the_plugin(tmp_path, token_dataset, probe_host):
    Args = arguments_class(probe_host)
    with pytest.raises(PluginConfigError, match=r"plugin 'probe' \(hook validate\): probe_scale must be > 0"):
        PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path), probe=True, probe_scale=-1, **COMMON),
                      train_dataset=token_dataset)


def test_resume_from_checkpoint_is_exact(tmp_path, token_dataset, probe_host):
    Args = arguments_class(probe_host)
    kw = {**COMMON, "max_steps": 10, "save_strategy": "steps", "save_steps": 5, "probe": True, "probe_mode": "sgd"}
    full = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path / "full"), **kw),
                         train_dataset=token_dataset)
    full.train()
    first = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path / "cut"), **{**kw, "max_steps": 10}),
                          train_dataset=token_dataset)
    first.train()  # writes checkpoint-5 on the way
    resumed = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path / "cut"), **kw),
                            train_dataset=token_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-5"))
    assert losses(resumed) == losses(full)  # steps 1-5 come back from the checkpoint state, 6-10 are new
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_memory_report(tmp_path, token_dataset):
    from trainer_plugins import PluginTrainingArguments

    trainer = PluginTrainer(model=fresh_model(), args=PluginTrainingArguments(output_dir=str(tmp_path), **COMMON),
                            train_dataset=token_dataset)
    trainer.train()
    report = json.loads((tmp_path / "memory_report.json").read_text())
    n = sum(p.numel() for p in trainer.model.parameters())
    assert report["parameters"] == report["trainable_parameters"] == n
    assert report["parameter_bytes"] == report["gradient_bytes"] == 4 * n
    assert 8 * n <= report["optimizer_state_bytes"] <= 8 * n + 4096  # AdamW: two fp32 moments (+ step counters)
    assert report["peak_bytes"] > report["parameter_bytes"]
    assert "peak_mem_gib" in trainer.state.log_history[0]
    assert any("memory_report" in h for h in trainer.state.log_history)


def test_banner_lists_enabled_plugins(tmp_path, probe_host):
    Args = arguments_class(probe_host)
    trainer = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path), probe=True, **COMMON))
    assert trainer.plugins_banner() == "trainer-plugins 0.1.0: enabled: probe-unknown"
    off = PluginTrainer(model=fresh_model(), args=Args(output_dir=str(tmp_path), **COMMON))
    assert off.plugins_banner().endswith("enabled: none; installed, off: probe")


def test_mixin_works_with_a_trainer_subclass(tmp_path, token_dataset, probe_host):
    from trainer_plugins import PluginsMixin

    class CountingTrainer(Trainer):
        def training_step(self, *a, **kw):
            self.steps = getattr(self, "steps", 0) + 1
            return super().training_step(*a, **kw)

    class Mixed(PluginsMixin, CountingTrainer):
        pass

    Args = arguments_class(probe_host)
    trainer = Mixed(fresh_model(), Args(output_dir=str(tmp_path), probe=True, probe_mode="sgd", **COMMON),
                    train_dataset=token_dataset)  # positional model and args
    trainer.train()
    assert trainer.steps == 8 and isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert trainer.model.probe_prepared
