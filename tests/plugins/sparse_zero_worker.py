"""Run by torchrun (2 CPU processes, gloo) from test_sparse.py: sparse pre-training of a tiny Llama under
DeepSpeed ZeRO-STAGE (or plain DDP) through the Trainer; writes the losses and the final zero pattern.

Usage: torchrun --nproc_per_node 2 sparse_zero_worker.py STAGE|ddp OUT_DIR [flag=JSON ...]
   (or --jobs FILE: helpers.shared_torchrun)
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from trainer_plugins import PluginTrainer, PluginTrainingArguments  # noqa: E402
from trainer_plugins.models import tiny_llama_config  # noqa: E402
from trainer_plugins_sparse.plugin import sparse_state  # noqa: E402
from helpers import TWO_RANKS, counting_dataset, losses, run_worker_jobs  # noqa: E402
from test_sparse import COMMON, SPARSE  # noqa: E402


def main(stage: str, out: str, *flags: str):
    extra = {k: json.loads(v) for k, v in (flag.split("=", 1) for flag in flags)}
    ds = None  # "ddp": plain DDP, no DeepSpeed
    if stage != "ddp":
        zero = {"stage": int(stage), "stage3_gather_16bit_weights_on_model_save": True}
        if "persistence_threshold" in extra:  # 0: no weight stays whole between steps (as in large models)
            zero["stage3_param_persistence_threshold"] = extra.pop("persistence_threshold")
        ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": zero}
    args = PluginTrainingArguments(output_dir=out, deepspeed=ds,
                                   **{**COMMON, **SPARSE, **TWO_RANKS, "per_device_train_batch_size": 2, "max_steps": 16, **extra})
    torch.manual_seed(0)
    trainer = PluginTrainer(model=LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=counting_dataset())
    trainer.train()
    sparse = sparse_state(trainer.model)
    record = {"losses": losses(trainer), "sparsity": sparse.pruner.sparsity(),
              "metrics": [h for h in trainer.state.log_history if "sparse/sparsity" in h][-1]}
    trainer.save_model(out + "/final")  # ZeRO-3: gathered on save
    if trainer.is_world_process_zero():
        with open(out + "/record.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    run_worker_jobs(main)
