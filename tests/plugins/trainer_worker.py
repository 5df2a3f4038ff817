"""Run by torchrun (2 CPU processes, gloo): a tiny Llama (2 layers, seed 0) trained by PluginTrainer with
the given flags under DeepSpeed ZeRO-STAGE or plain DDP, 2 examples per rank; writes the losses and
saves the model (or adapter) to OUT_DIR. The reference is the same run in one process, two micro-batches of 2
(helpers.as_one_process).

Usage: torchrun --nproc_per_node 2 trainer_worker.py STAGE|ddp OUT_DIR FLAGS_JSON   (or --jobs FILE: helpers.shared_torchrun)
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

from trainer_plugins import PluginTrainer, PluginTrainingArguments  # noqa: E402
from helpers import TWO_RANKS, counting_dataset, losses, run_worker_jobs, tiny_llama  # noqa: E402


def main(stage: str, out: str, flags: str):
    flags = json.loads(flags)
    ds = None
    if stage != "ddp":
        ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": int(stage), "stage3_gather_16bit_weights_on_model_save": True}}
    args = PluginTrainingArguments(output_dir=out, deepspeed=ds, **{**flags, **TWO_RANKS, "per_device_train_batch_size": 2})
    trainer = PluginTrainer(model=tiny_llama(), args=args, train_dataset=counting_dataset())
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        with open(out + "/record.json", "w") as f:
            json.dump({"losses": losses(trainer)}, f)


if __name__ == "__main__":
    run_worker_jobs(main)
