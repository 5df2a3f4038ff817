"""Run by torchrun (2 CPU processes, gloo) from test_lst.py: LST on a tiny Llama (or the OPT in MODEL_DIR) under
DeepSpeed ZeRO-STAGE (or plain DDP) through the Trainer; writes the losses and saves the side network.

Under ZeRO-3 the model is loaded after the TrainingArguments, so from_pretrained partitions the backbone
while loading and the pruned init has to gather each layer's weights.

Usage: torchrun --nproc_per_node 2 lst_zero_worker.py STAGE|ddp[-compile] OUT_DIR MODEL_DIR   (-compile: lst_compile)
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

from transformers import AutoModelForCausalLM  # noqa: E402

from trainer_plugins import PluginTrainer, PluginTrainingArguments  # noqa: E402
from trainer_plugins_lst import side_of  # noqa: E402
from helpers import TWO_RANKS, losses, run_worker_jobs  # noqa: E402
from test_lst import COMMON, LST, cycles  # noqa: E402


def main(stage: str, out: str, model_dir: str):
    stage, _, variant = stage.partition("-")
    ds = None
    if stage != "ddp":
        ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": int(stage), "stage3_gather_16bit_weights_on_model_save": True}}
    args = PluginTrainingArguments(output_dir=out, deepspeed=ds, **{**COMMON, **LST, **TWO_RANKS, "per_device_train_batch_size": 2},
                                   lst_compile=variant == "compile")
    if stage == "3":
        from trainer_plugins.models import _init_deepspeed_comm

        _init_deepspeed_comm()  # what the recipe loader does: zero.Init must see both processes
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if stage == "3":
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "expected a model partitioned while loading"
    trainer = PluginTrainer(model=model, args=args, train_dataset=cycles())
    trainer.train()
    trainer.save_model()  # ZeRO-3: the side network comes from the gathered state dict
    if trainer.is_world_process_zero():
        with open(out + "/record.json", "w") as f:
            compiled_layers = len(side_of(trainer.model)._compiled_layers)  # backbone layers run compiled
            json.dump({"losses": losses(trainer), "compiled_layers": compiled_layers}, f)


if __name__ == "__main__":
    run_worker_jobs(main)
