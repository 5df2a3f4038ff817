"""Run by torchrun (2 CPU processes, gloo) from test_loram.py: LoRAM on a tiny Llama under DeepSpeed
ZeRO-STAGE (or plain DDP) through the Trainer; writes the losses and saves the recovered adapter.

Usage: torchrun --nproc_per_node 2 loram_zero_worker.py STAGE|ddp OUT_DIR MODEL_DIR
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

from transformers import LlamaForCausalLM  # noqa: E402

from trainer_plugins import PluginTrainer, PluginTrainingArguments  # noqa: E402
from helpers import TWO_RANKS, counting_dataset, losses, run_worker_jobs  # noqa: E402
from test_loram import COMMON, LORAM  # noqa: E402


def main(stage: str, out: str, model_dir: str):
    # Built before the TrainingArguments, so ZeRO-3 does not partition it while loading: loram prunes whole
    # weights, then DeepSpeed partitions the pruned model.
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ds = None
    if stage != "ddp":
        ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": int(stage), "stage3_gather_16bit_weights_on_model_save": True}}
    args = PluginTrainingArguments(output_dir=out, deepspeed=ds, **{**COMMON, **LORAM, **TWO_RANKS, "per_device_train_batch_size": 2})
    trainer = PluginTrainer(model=model, args=args, train_dataset=counting_dataset())
    trainer.train()
    trainer.save_model()  # ZeRO-3: the adapter comes from the gathered state dict
    if trainer.is_world_process_zero():
        with open(out + "/record.json", "w") as f:
            json.dump({"losses": losses(trainer)}, f)


if __name__ == "__main__":
    run_worker_jobs(main)
