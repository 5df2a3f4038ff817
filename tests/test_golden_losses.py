"""Golden losses (torchtune's practice): each method trains the tiny Llama (helpers.tiny_llama, seed 0) for 8
steps on the same batches, and its losses must stay what they were when tests/golden_losses.json was written,
within 1e-3 relative: a change to a method's arithmetic (a scale, a mask, an init) shows up here even where
the method still learns and every property test passes. Regenerate deliberately, after such a change:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_losses.py
"""

import json
import os
from pathlib import Path

import pytest

from helpers import counting_dataset, losses, tiny_llama

GOLDEN = Path(__file__).with_name("golden_losses.json")
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
              save_strategy="no", disable_tqdm=True, max_steps=8, weight_decay=0.1)
METHODS = {
    "adamw": {},
    "apollo-mini": dict(apollo="mini", apollo_update_proj_gap=4),
    "apollo-rank-4": dict(apollo="apollo", apollo_rank=4, apollo_update_proj_gap=4),
    "apollo-mini-layerwise": dict(apollo="mini", apollo_layerwise=True, max_grad_norm=0.0),
    "lst": dict(lst=True, lst_reduction_factor=4),
    "lst-random-init": dict(lst=True, lst_reduction_factor=4, lst_init="random"),
    "meft": dict(meft="meft1"),
    "loram": dict(loram="lora", loram_importance="magnitude", loram_keep_first_layers=0, loram_keep_last_layers=0,
                  loram_lora_dropout=0.0, loram_lora_r=4),
    "sparse": dict(sparse="magnitude", sparse_timing="step", sparse_start=2, sparse_end=6, sparse_every=2),
}


def _train(flags: dict, out: Path) -> list[float]:
    from trainer_plugins import PluginTrainer, PluginTrainingArguments

    trainer = PluginTrainer(model=tiny_llama(), train_dataset=counting_dataset(),
                            args=PluginTrainingArguments(output_dir=str(out), **{**COMMON, **flags}))
    trainer.train()
    return losses(trainer)


def test_every_method_reproduces_its_golden_losses(tmp_path):
    got = {name: _train(flags, tmp_path / name) for name, flags in METHODS.items()}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(METHODS), "tests/golden_losses.json lists other methods: regenerate it"
    changed = {name: (golden[name], got[name]) for name in METHODS
               if len(got[name]) != len(golden[name]) or got[name] != pytest.approx(golden[name], rel=1e-3)}
    assert not changed, f"losses moved from the golden ones (golden, now): {changed}"
    assert len({round(g[-1], 4) for g in golden.values()}) == len(golden)  # every method really trains differently
