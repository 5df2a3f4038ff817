"""How much of a training step is launching work rather than doing it: a CPU proxy for GPU launch overhead.

At small per-GPU batches a step can be bound by the operators a method dispatches (each a kernel launch on a
GPU) instead of by arithmetic. This script counts and times that on a CPU, where it can be measured without a
GPU: the bench's Llama shape at its depth but negligible width (hidden 128, sequence 16), so the step time is
almost all per-operator overhead.

- ``step_ms``: median forward + backward + optimizer step per method (single thread).
- ``apollo_mini_step_ops``: top-level operators one APOLLO-Mini optimizer step dispatches (profiler), with the
  group's per-weight scalars batched into one vector (the default) and with the per-weight loop (the fallback
  for weights that differ in dtype, device or step).

    python benchmarks/dispatch_overhead.py --out benchmarks/results/dispatch_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from trainer_plugins import bench

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
             batch=1, seq=16)


def build(name: str, layers: int):
    method = bench.methods()[name]
    torch.manual_seed(0)
    model = bench.prepared_model(method, dict(SHAPE, num_hidden_layers=layers), "cpu", torch.float32)
    return model, (method.optimizer or bench.adamw_over_trainable)(model, 1e-4)


def step_ms(name: str, layers: int, repeats: int) -> float:
    model, optimizer = build(name, layers)
    tokens = torch.randint(0, SHAPE["vocab_size"], (SHAPE["batch"], SHAPE["seq"]))
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def optimizer_step_ops(layers: int, batched: bool) -> int:
    from trainer_plugins_apollo import optimizer as apollo_optimizer

    alike = apollo_optimizer._alike
    apollo_optimizer._alike = alike if batched else (lambda params, states: False)
    try:
        model, optimizer = build("apollo-mini", layers)
        tokens = torch.randint(0, SHAPE["vocab_size"], (SHAPE["batch"], SHAPE["seq"]))
        for _ in range(3):  # past the first steps (state creation, the limiter's reference)
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        with torch.profiler.profile() as profile:
            optimizer.step()
    finally:
        apollo_optimizer._alike = alike
    return sum(1 for e in profile.events() if e.name.startswith("aten::") and e.cpu_parent is not None
               and not e.cpu_parent.name.startswith("aten::"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--methods", nargs="+", default=["adamw", "lora-r16", "lst", "meft", "apollo-mini"])
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {
        "what": __doc__.split("\n\n")[0], "device": f"cpu ({platform.machine()}), 1 thread",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": f"python benchmarks/dispatch_overhead.py --layers {ns.layers} --out {ns.out}",
        "shape": dict(SHAPE, num_hidden_layers=ns.layers),
        "step_ms": {name: step_ms(name, ns.layers, ns.repeats) for name in ns.methods},
        "apollo_mini_step_ops": {"batched": optimizer_step_ops(22, True), "per_weight_loop": optimizer_step_ops(22, False),
                                 "layers": 22},
    }
    ns.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
