"""How much of a training step is launching work rather than doing it: a CPU proxy for GPU launch overhead.

At small per-GPU batches a step can be bound by the operators a method dispatches (each a kernel launch on a
GPU) instead of by arithmetic. This script counts and times that on a CPU, where it can be measured without a
GPU: the bench's Llama shape at its depth but negligible width (hidden 128, sequence 16), so the step time is
almost all per-operator overhead.

- ``step_ms``: median forward + backward + optimizer step per method (single thread, methods taking turns; AdamW
  fused and autocast where the method has it, as the bench runs them on a GPU; compiled methods after their
  compiling steps).
- ``optimizer_step``: the optimizer step alone (gradients in place, interleaved rounds): fused AdamW's and
  APOLLO-Mini's, with the group's state packed by shape (the default) and on the per-weight path (the fallback
  for weights that differ in dtype or device); median milliseconds and top-level operators dispatched.

    python benchmarks/dispatch_overhead.py --out benchmarks/results/dispatch_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from trainer_plugins import bench

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
             batch=1, seq=16)


# the optimizer steps alone at even less width: their arithmetic all but vanishes
OPTIMIZER_SHAPE = dict(SHAPE, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)


def build(name: str, layers: int, shape: dict = SHAPE):
    """A bench method's model, optimizer and whether it runs under autocast; ``apollo-mini-layerwise-batch-1``:
    layer-wise APOLLO-Mini updating one weight at a time (``apollo_layerwise_batch: 1``, the only way before
    batches)."""
    one_at_a_time = name == "apollo-mini-layerwise-batch-1"
    method = bench.methods()["apollo-mini" if one_at_a_time else name]
    torch.manual_seed(0)
    model = bench.prepared_model(method, dict(shape, num_hidden_layers=layers), "cpu", torch.float32)
    # AdamW fused, as the bench runs it on a GPU (on a CPU the bench's AdamW loops over the tensors one by one)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = method.optimizer(model, 1e-4) if method.optimizer else torch.optim.AdamW(trainable, 1e-4, fused=True)
    if one_at_a_time:
        from trainer_plugins_apollo.optimizer import register_layerwise_hooks

        register_layerwise_hooks(model.parameters(), optimizer, batch=1)
    return model, optimizer, method.autocast


def step_ms(names: list[str], layers: int, repeats: int) -> dict[str, float]:
    """Median whole-step milliseconds per method, the methods taking turns step by step (so a slower stretch
    of the machine hits them all alike)."""
    built = {name: build(name, layers) for name in names}
    tokens = torch.randint(0, SHAPE["vocab_size"], (SHAPE["batch"], SHAPE["seq"]))
    times = {name: [] for name in names}
    for i in range(repeats + 3):  # compiled methods compile in the first steps
        for name, (model, optimizer, autocast) in built.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as the bench runs the method
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1000, 1) for name, t in times.items()}


def optimizer_steps(layers: int, rounds: int) -> dict:
    """The optimizer step alone, gradients in place: fused AdamW's and APOLLO-Mini's with its state packed (the
    default) and on the per-weight path (taken for weights that differ in dtype or device), at OPTIMIZER_SHAPE.
    Top-level operators dispatched and the median time over interleaved rounds."""
    from trainer_plugins_apollo import optimizer as apollo_optimizer

    packable = apollo_optimizer._packable
    tokens = torch.randint(0, SHAPE["vocab_size"], (SHAPE["batch"], SHAPE["seq"]))
    cases = {}
    for case in ("adamw-fused", "apollo-mini", "apollo-mini-per-weight"):
        if case == "adamw-fused":
            model, _, _ = build("adamw", layers, OPTIMIZER_SHAPE)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        else:
            model, optimizer, _ = build("apollo-mini", layers, OPTIMIZER_SHAPE)
        model(input_ids=tokens, labels=tokens).loss.backward()
        cases[case] = optimizer

    def step(case):
        apollo_optimizer._packable = (lambda params: False) if case.endswith("per-weight") else packable
        try:
            start = time.perf_counter()
            cases[case].step()  # the same gradients every time: only the dispatching is measured
            return time.perf_counter() - start
        finally:
            apollo_optimizer._packable = packable

    for case in cases:  # past the first steps (state creation, the limiter's reference)
        for _ in range(3):
            step(case)
    times = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            times[case].append(step(case))
    report = {}
    for case in cases:
        with torch.profiler.profile() as profile:
            step(case)
        ops = sum(1 for e in profile.events() if e.name.startswith("aten::") and e.cpu_parent is not None
                  and not e.cpu_parent.name.startswith("aten::"))
        report[case] = {"ms": round(statistics.median(times[case]) * 1000, 2), "top_level_ops": ops}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--methods", nargs="+",
                   default=["adamw", "lora-r16", "lst", "lst-compile", "lst-full-heads-autocast-compile",
                            "lst-full-heads-every-2-autocast-compile", "meft", "apollo-mini", "apollo-mini-layerwise",
                            "apollo-mini-layerwise-batch-1"])
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {
        "what": __doc__.split("\n\n")[0], "device": f"cpu ({platform.machine()}), 1 thread",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": " ".join(["python benchmarks/dispatch_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "shape": dict(SHAPE, num_hidden_layers=ns.layers),
        "optimizer_shape": dict(OPTIMIZER_SHAPE, num_hidden_layers=ns.layers),
        "step_ms": step_ms(ns.methods, ns.layers, ns.repeats),
        "optimizer_step": optimizer_steps(ns.layers, ns.repeats),
    }
    ns.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
