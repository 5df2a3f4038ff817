"""Arithmetic per training step, per bench method: the throughput ceiling a method can reach when its kernels run
as efficiently as full fine-tuning's. Counted with torch's FlopCounterMode over forward + backward on the meta
device (shapes only, no weights, no GPU); matmuls and attention, not element-wise work or the optimizer step.

A ratio below 1 against ``adamw`` is the most a method can gain in tokens/s from doing less arithmetic; a
measured speed far from that ceiling points at kernel efficiency (float32 on a GPU, small matmuls, launches).

    python benchmarks/step_flops.py --out benchmarks/results/step_flops.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer_plugins import bench
from trainer_plugins.estimate import MemoryTracker, language_model_batch

METHODS = ["adamw", "lora-r16", "lora-checkpointing", "lst", "lst-every-2-autocast", "meft", "loram-65", "qloram-65",
           "qloram-65-checkpointing", "apollo-mini"]


def step_flops(name: str, shape: dict) -> int:
    model = bench.prepared_model(bench.methods()[name], shape, "meta", torch.bfloat16)
    model.train()
    batch = language_model_batch(shape["vocab_size"], shape["batch"], shape["seq"])()
    counter = FlopCounterMode(display=False)
    # MemoryTracker answers host reads of meta values (.item()); attention runs as SDPA's math decomposition
    # here, counted as its two batched matmuls (the same arithmetic as the fused kernels)
    with MemoryTracker(), counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1b", "7b"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)
    report = {"what": __doc__.split("\n\n")[0], "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": f"python benchmarks/step_flops.py --out {ns.out}", "shapes": {}}
    for shape_name in ns.shapes:
        shape = bench.SHAPES[shape_name]
        flops = {name: step_flops(name, shape) for name in ns.methods}
        base = flops.get("adamw") or next(iter(flops.values()))
        report["shapes"][shape_name] = {
            "config": shape,
            "tflop_per_step": {k: round(v / 1e12, 3) for k, v in flops.items()},
            "vs_adamw": {k: round(v / base, 3) for k, v in flops.items()},
        }
        print(shape_name, json.dumps(report["shapes"][shape_name]["vs_adamw"]), flush=True)
    ns.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
