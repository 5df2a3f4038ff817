"""Run by torchrun (2 CPU processes, gloo) from test_meft.py: MEFT on a tiny Llama under DeepSpeed
ZeRO-STAGE (or plain DDP) through the Trainer; writes the losses and saves the adapter.

Usage: torchrun --nproc_per_node 2 meft_zero_worker.py STAGE|ddp OUT_DIR
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

from trainer_plugins import PluginTrainer, PluginTrainingArguments  # noqa: E402
from helpers import counting_dataset, end_distributed, losses  # noqa: E402
from test_meft import DISTRIBUTED, llama  # noqa: E402


def main(stage: str, out: str):
    ds = None
    if stage != "ddp":
        ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": int(stage), "stage3_gather_16bit_weights_on_model_save": True}}
    args = PluginTrainingArguments(output_dir=out, deepspeed=ds, **{**DISTRIBUTED, "per_device_train_batch_size": 2})
    trainer = PluginTrainer(model=llama(2), args=args, train_dataset=counting_dataset())
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        with open(out + "/record.json", "w") as f:
            json.dump({"losses": losses(trainer)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    end_distributed()
