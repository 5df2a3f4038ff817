"""A third-party plugin written from scratch in a temporary directory (its own pyproject with the entry
point), pip-installed, is listed, its flag parses through HfArgumentParser, its CLI command works, and
its hooks run during a short training. Everything runs in fresh processes, as a user would."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PYPROJECT = '''
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "trainer-plugins-noisy"
version = "2.0.1"
dependencies = []

[project.entry-points.trainer_plugins]
noisy = "trainer_plugins_noisy"
'''

PLUGIN = '''
"""Adds Gaussian noise to the gradients (a stand-in for a real method); logs every hook it sees."""
import json, os
from dataclasses import dataclass, field
import torch
from transformers import TrainerCallback
from trainer_plugins import PluginSpec, hookimpl

LOG = os.environ.get("NOISY_LOG")

def note(name):
    if LOG:
        with open(LOG, "a") as f:
            f.write(name + "\\n")

@dataclass
class NoisyArguments:
    noisy: bool = field(default=False, metadata={"help": "Add gradient noise."})
    noisy_std: float = field(default=0.01, metadata={"help": "Noise standard deviation."})

class NoiseCallback(TrainerCallback):
    def __init__(self, std):
        self.std = std
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        note("noise")
        for p in model.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad) * self.std)

@hookimpl
def plugin_spec():
    return PluginSpec(name="noisy", arguments=NoisyArguments, description="gradient noise",
                      supports=frozenset({"ddp"}))

@hookimpl
def validate(args):
    note("validate")

@hookimpl
def prepare_model(model, args):
    note("prepare_model")

@hookimpl
def callbacks(args):
    note("callbacks")
    return [NoiseCallback(args.noisy_std)]

@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("noisy-info")
    p.set_defaults(func=lambda ns: print("noisy here") or 0)
'''

TRAIN = '''
import sys, torch
from transformers import HfArgumentParser, LlamaForCausalLM
from trainer_plugins import PluginTrainer, PluginTrainingArguments
from trainer_plugins.models import tiny_llama_config

(args,) = HfArgumentParser(PluginTrainingArguments).parse_args_into_dataclasses(sys.argv[1:])
assert args.noisy is True and args.noisy_std == 0.5, (args.noisy, args.noisy_std)
torch.manual_seed(0)
data = [{"input_ids": list(range(i, i + 16)), "labels": list(range(i, i + 16))} for i in range(16)]
trainer = PluginTrainer(model=LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=data)
trainer.train()
print("trained", trainer.state.global_step)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("third_party")
    pkg = tmp / "src"
    (pkg / "trainer_plugins_noisy").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "trainer_plugins_noisy" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "NOISY_LOG": str(tmp / "log")}
    return env, tmp


def run(env, *argv):
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, cwd=ROOT)


def test_listed_with_version_hooks_and_flags(installed):
    env, _ = installed
    out = run(env, "-m", "trainer_plugins", "list", "--json")
    assert out.returncode == 0, out.stderr
    noisy = next(p for p in json.loads(out.stdout) if p["name"] == "noisy")
    assert noisy["version"] == "2.0.1" and noisy["status"] == "ok"
    assert noisy["hooks"] == ["callbacks", "plugin_spec", "prepare_model", "register_commands", "validate"]
    assert [f["name"] for f in noisy["flags"]] == ["noisy", "noisy_std"]


def test_its_command_runs(installed):
    env, _ = installed
    out = run(env, "-m", "trainer_plugins", "noisy-info")
    assert out.returncode == 0 and "noisy here" in out.stdout


def test_flag_parses_and_hooks_run_in_training(installed):
    env, tmp = installed
    out = run(env, "-c", TRAIN, "--output_dir", str(tmp / "out"), "--noisy", "--noisy_std", "0.5", "--max_steps", "3",
              "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none", "--save_strategy", "no")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 3" in out.stdout
    assert "enabled: noisy-2.0.1" in out.stderr  # the banner at train start
    log = (tmp / "log").read_text().split()
    assert log == ["validate", "prepare_model", "callbacks", "noise", "noise", "noise"]


def test_host_never_names_a_plugin():
    """Core code must not import or mention any plugin package by name."""
    plugin_names = [p.name for p in (ROOT / "plugins").iterdir() if p.is_dir()] + ["noisy"]
    for path in (ROOT / "trainer_plugins").glob("*.py"):
        text = path.read_text()
        for name in plugin_names:
            assert f"trainer_plugins_{name}" not in text, f"{path.name} names plugin {name}"
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{path.name} names plugin {name}"
