"""`make demo`'s recipe end to end on the real SmolLM2 weights, shortened to a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_recipe_runs_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_plugins", "train", str(ROOT / "recipes" / "quickstart.yaml"),
         "--output_dir", str(out), "--max_steps", "3", "--max_train_samples", "12", "--max_eval_samples", "4",
         "--sample_max_new_tokens", "8", "--learning_rate", "1e-4"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "memory report" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 3
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]  # the same held-out modules
    assert results["memory"]["trainable_parameters"] == 134_515_008
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
