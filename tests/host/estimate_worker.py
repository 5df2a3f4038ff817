"""Run by torchrun (2 CPU processes, gloo): train a recipe with PluginTrainer for 3 steps and record, per rank,
the peak bytes held during step 2 (see PeakOfStep) in OUT/peak-rank{R}.json.
The per-GPU side of `trainer-plugins estimate` (DDP buckets, ZeRO partitions) is checked against it.

Usage: torchrun --nproc_per_node 2 estimate_worker.py RECIPE.yaml OUT_DIR   (or --jobs FILE: helpers.shared_torchrun)
"""

import gc
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from helpers import run_worker_jobs  # noqa: E402
from trainer_plugins import PluginTrainer  # noqa: E402
from trainer_plugins.data import build_datasets, data_collator  # noqa: E402
from trainer_plugins.estimate import MemoryTracker  # noqa: E402
from trainer_plugins.models import load_tokenizer  # noqa: E402
from trainer_plugins.recipes import load_recipe  # noqa: E402


def live_tensors() -> list:
    """Every tensor with storage alive in this process now (after a collection)."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]


class PeakOfStep(TrainerCallback):
    """The bytes held at the peak of one steady-state optimizer step (forward, backward, step): every tensor
    alive when it begins (weights, gradients, optimizer and DeepSpeed buffers: all Python-visible then) plus
    what the operators allocate until it ends, minus what is freed, as the estimate's tracker counts. The
    profiler's memory timeline (the single-process reference) cannot follow DeepSpeed's in-place buffers."""

    def __init__(self, out: Path, step: int = 1, earlier=()):
        self.out, self.step, self.tracker = out, step, None
        self.earlier = {t.untyped_storage()._cdata for t in earlier}  # alive (held) since before this run

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            alive = [t for t in live_tensors() if t.untyped_storage()._cdata not in self.earlier]
            self.tracker = MemoryTracker()
            self.tracker.adopt(alive)
            self.tracker.reset_peak()
            self.start = self.tracker.live
            self.tracker.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is None:
            return
        self.tracker.__exit__(None, None, None)
        rank = torch.distributed.get_rank()
        (self.out / f"peak-rank{rank}.json").write_text(json.dumps({"peak": self.tracker.peak, "start": self.start}))
        self.tracker = None


def main(recipe_path: str, out: str):
    # tensors an earlier run of this process left alive are not this run's: held, so no new storage takes
    # one's address while the step is measured
    earlier = live_tensors()
    recipe = load_recipe(recipe_path)
    args = recipe.args
    tokenizer = load_tokenizer(recipe.model_args)
    model = args._host.call_first("load_model", args, model_args=recipe.model_args)
    train_ds, _ = build_datasets(recipe.data_args, tokenizer, seed=args.seed)
    trainer = PluginTrainer(model=model, args=args, train_dataset=train_ds, data_collator=data_collator(tokenizer))
    trainer.add_callback(PeakOfStep(Path(out), earlier=earlier))
    trainer.train()


if __name__ == "__main__":
    run_worker_jobs(main)
