"""The host under DeepSpeed ZeRO on CPU: the create_optimizer hook is what the ZeRO engine wraps, and
a recipe trains through the CLI with two processes (torchrun, gloo)."""

import json

import probe_plugin
import pytest
import torch
from helpers import ROOT, shared_torchrun, zero_recipe
from transformers import LlamaForCausalLM

from trainer_plugins import PluginTrainer
from trainer_plugins.arguments import arguments_class
from trainer_plugins.models import tiny_llama_config

COMMON = dict(max_steps=6, per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              learning_rate=1e-2, save_strategy="no", disable_tqdm=True)


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}


def train(Args, data, tmp_path, **kw):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = PluginTrainer(model=model, args=Args(output_dir=str(tmp_path), **COMMON, **kw), train_dataset=data)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("stage", [2, 3])
def test_plugin_optimizer_is_wrapped_by_zero(stage, tmp_path, token_dataset, probe_host, deepspeed_env):
    Args = arguments_class(probe_host)
    _, plain = train(Args, token_dataset, tmp_path / "plain", probe=True, probe_mode="sgd")
    trainer, zero = train(Args, token_dataset, tmp_path / "zero", probe=True, probe_mode="sgd",
                          deepspeed=ds_config(stage))
    inner = trainer.optimizer
    while not isinstance(inner, torch.optim.SGD):
        inner = inner.optimizer  # accelerate wrapper -> ZeRO optimizer -> ours
    assert "create_optimizer" in probe_plugin.CALLS
    assert len(zero) == 6
    # one process, fp32: ZeRO must give the same training as no ZeRO
    assert zero == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_with_two_processes(stage, request, tiny_model_dir):
    def prepare(params, directory):  # both stages in one launch
        return ["train", zero_recipe(directory, tiny_model_dir, params["stage"],
                                     run={"sample_prompt": "Say hi", "sample_max_new_tokens": 4})]

    out = shared_torchrun(request, ROOT / "tests" / "host" / "cli_no_shm.py", prepare) / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 4
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert (out / "checkpoint-4").is_dir()
    assert ("sample_after" in results) == (stage == 2)  # ZeRO-3 holds no whole weights to generate with
    reloaded = LlamaForCausalLM.from_pretrained(out)  # ZeRO-3: gathered 16-bit weights on save
    assert reloaded.model.embed_tokens.weight.shape[0] > 0
