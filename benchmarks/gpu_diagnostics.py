"""Two GPU diagnostics for the bars the bench alone cannot explain, each written as JSON:

- ``memory``: what is alive at the peak of one training step of a bench case (CUDA allocator history,
  replayed to its maximum, the live blocks grouped by the Python lines that allocated them), next to the
  peak `trainer-plugins estimate` predicts. For estimate misses (issue 8: peft QLoRA with checkpointing
  on the GQA 1B shape, 0.86).
- ``profile``: the kernels of one optimizer step (torch.profiler): wall time, GPU time, kernel count and
  the top kernels, for several bench cases. For APOLLO-Mini's step against fused AdamW (issue 3).
- ``step-profile``: whole training steps under the profiler: wall time against the time the GPU was busy,
  kernel and operator counts, the top operators by GPU and by CPU time (optionally a Chrome trace). For
  LST's step on 7B (issue 6), which costs far more than its FLOPs.
- ``timing``: step times of several cases in interleaved rounds, to see the spread of a bench median.
- ``prune-event``: one sparse prune event (issue 4: <= one training step) on the shape's decoder weights, with
  AdamW's moments, for several radix-select settings (digit bits x histogram lanes, histc or bincount), against
  the time of a dense full fine-tuning step measured alongside.

    python benchmarks/gpu_diagnostics.py memory --shape 1b --method qlora-peft --out $OUT/memory.json
    python benchmarks/gpu_diagnostics.py profile --shape 1b --methods adamw apollo-mini --out $OUT/profile.json
    python benchmarks/gpu_diagnostics.py step-profile --shape 7b --methods lst --trace --out $OUT/lst-7b.json
    python benchmarks/gpu_diagnostics.py timing --shape 1b --methods adamw apollo-mini --out $OUT/timing.json
    python benchmarks/gpu_diagnostics.py prune-event --shape 1b --configs 8x16 8x16-bincount 6x1 --out $OUT/prune.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from trainer_plugins import bench


def _case(name: str, shape: dict, device: str, dtype: torch.dtype, warmup: int = 2):
    method = bench.methods()[name]
    torch.manual_seed(0)
    model = bench.prepared_model(method, shape, device, dtype)
    model.train()
    optimizer = (method.optimizer or bench.adamw_over_trainable)(model, 1e-4)
    tokens = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    # as the bench runs the case: the forward under autocast where the method asks for it
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=method.autocast and dtype != torch.float32)

    def forward_backward():
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()

    for _ in range(warmup):
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return method, model, optimizer, forward_backward


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _where(frames, depth: int = 4) -> str:
    """The innermost ``depth`` Python lines outside torch's own machinery: who asked for the block."""
    lines = []
    for f in frames:
        name = f.get("filename", "")
        if not name or "torch/" in name and ("/autograd/" in name or "/utils/" in name or "/nn/modules/module.py" in name):
            continue
        short = "/".join(Path(name).parts[-2:])
        lines.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(lines) == depth:
            break
    return " <- ".join(lines) or "(no Python frame)"


def peak_live_blocks(trace: list[dict]) -> tuple[int, list[tuple[int, str]]]:
    """Replay an allocator trace: the highest sum of blocks allocated during it, and those alive then."""
    live, total, best, best_at = {}, 0, 0, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])
        if total > best:
            best, best_at = total, i
    alive = {}
    for event in trace[:best_at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    return best, [(e["size"], _where(e.get("frames", []))) for e in alive.values()]


def memory(ns, shape, dtype) -> dict:
    method, model, optimizer, forward_backward = _case(ns.method, shape, "cuda", dtype)
    resting = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    above_rest, blocks = peak_live_blocks(snapshot["device_traces"][0])
    groups = defaultdict(lambda: [0, 0])
    for size, where in blocks:
        groups[where][0] += size
        groups[where][1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[: ns.top]
    estimate = bench.estimate_case(method, shape, dtype, device="cuda")
    return {
        "method": ns.method, "peak_gib": round(peak / 2**30, 3), "resting_gib": round(resting / 2**30, 3),
        "step_adds_gib": round(above_rest / 2**30, 3), "estimate_gib": round(estimate / 2**30, 3),
        "alive_at_peak": [{"gib": round(b / 2**30, 4), "blocks": n, "where": w} for w, (b, n) in top],
    }


def profile(ns, shape, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    out = {}
    for name in ns.methods:
        _, model, optimizer, forward_backward = _case(name, shape, ns.device, dtype)
        walls = []
        for _ in range(3):  # the wall time of the step alone, gradients in place
            forward_backward()
            _sync()
            start = time.perf_counter()
            optimizer.step()
            _sync()
            walls.append(time.perf_counter() - start)
            optimizer.zero_grad(set_to_none=True)
        forward_backward()
        _sync()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            optimizer.step()
            _sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.device_time for e in kernels)  # microseconds
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=ns.top, max_name_column_width=70)
        out[name] = {"step_wall_ms": round(1e3 * sorted(walls)[1], 3), "gpu_kernel_ms": round(gpu_us / 1e3, 3),
                     "kernels": len(kernels), "table": table.splitlines()}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "table"}), flush=True)
        print(table, flush=True)
        del model, optimizer, forward_backward
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["memory", "profile", "step-profile", "timing", "prune-event"])
    p.add_argument("--shape", default="1b", choices=sorted(bench.SHAPES))
    p.add_argument("--method", default="qlora-peft", help="memory: the bench case")
    p.add_argument("--methods", nargs="+", default=["adamw", "apollo-mini"], help="profile: the bench cases")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda", help="profile, step-profile, timing: cpu to try them without a GPU")
    p.add_argument("--trace", action="store_true", help="step-profile: also a gzipped Chrome trace per case")
    p.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (allow_tf32)")
    p.add_argument("--rounds", type=int, default=3, help="timing: interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="timing: timed steps per case and round")
    p.add_argument("--configs", nargs="+", default=["8x16", "8x16-bincount", "8x1", "6x1", "7x4", "11x1"],
                   help="prune-event: BITSxLANES, -bincount for the host-syncing histogram")
    p.add_argument("--out", type=Path, required=True)
    return p


def _gpu_busy_ms(kernels) -> float:
    """Time at least one kernel ran (the union of their intervals): what the GPU did of the wall time."""
    busy, end = 0.0, None
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in kernels):
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy / 1e3


def step_profile(ns, shape, dtype) -> dict:
    """Whole training steps (forward, backward, optimizer step) under the profiler: where the time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    out = {}
    for name in ns.methods:
        _, _, optimizer, forward_backward = _case(name, shape, ns.device, dtype)

        def step():
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        walls = []
        for _ in range(3):
            _sync()
            start = time.perf_counter()
            step()
            _sync()
            walls.append(time.perf_counter() - start)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        top_level = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
        by_gpu = prof.key_averages().table(sort_by="self_device_time_total", row_limit=ns.top, max_name_column_width=60)
        by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ns.top, max_name_column_width=60)
        out[name] = {"step_wall_ms": round(1e3 * sorted(walls)[1], 2), "gpu_busy_ms": round(_gpu_busy_ms(kernels), 2),
                     "kernels": len(kernels), "top_level_ops": len(top_level),
                     "by_gpu_time": by_gpu.splitlines(), "by_cpu_time": by_cpu.splitlines()}
        if ns.trace:
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            path = ns.out.with_name(f"{ns.out.stem}-{name}.trace.json")
            prof.export_chrome_trace(str(path))
            with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
                packed.write(raw.read())
            path.unlink()
        print(name, json.dumps({k: v for k, v in out[name].items() if not k.startswith("by_")}), flush=True)
        print(by_gpu, flush=True)
        print(by_cpu, flush=True)
        optimizer = forward_backward = None  # the step closure holds them too
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _median_step_s(forward_backward, optimizer, steps: int) -> float:
    """Median wall time of ``steps`` whole training steps (forward, backward, optimizer step), device synced."""
    times = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(ns, shape, dtype) -> dict:
    """Step times of several cases in interleaved rounds (each round builds each case afresh and times
    ``--steps`` steps): the spread between rounds says how far one bench median can be trusted."""
    rounds = {name: [] for name in ns.methods}
    for _ in range(ns.rounds):
        for name in ns.methods:
            method, model, optimizer, forward_backward = _case(name, shape, ns.device, dtype)
            rounds[name].append(round(_median_step_s(forward_backward, optimizer, ns.steps), 5))
            del model, optimizer, forward_backward
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(rounds), flush=True)
    first = ns.methods[0]
    return {"median_step_s": rounds, "vs_" + first: {
        name: round(statistics.median(v) / statistics.median(rounds[first]), 3) for name, v in rounds.items()}}


def prune_event(ns, shape, dtype) -> dict:
    """One prune event (global magnitude, AdamW moments zeroed with the weights) per radix-select setting, events
    interleaved over ``--rounds`` rounds, each 0.5% sparser than the last from 50%; the dense AdamW step is timed
    in the same process for the ratio. Every setting must select the same weights: checked against the first."""
    from trainer_plugins_sparse.pruning import Pruner, local_targets
    from trainer_plugins_sparse.schedule import keep_count

    _, model, optimizer, forward_backward = _case("adamw", shape, ns.device, dtype)
    step_s = _median_step_s(forward_backward, optimizer, ns.steps)
    weights = bench.decoder_linear_weights(model)
    pristine = {n: w.detach().clone() for n, w in weights.items()}  # every setting starts from the same weights
    times = {config: [] for config in ns.configs}
    masks = {}
    for config in ns.configs:
        bits, lanes = config.split("-")[0].split("x")
        pruner = Pruner(local_targets(weights, optimizer), digit_bits=int(bits), lanes=int(lanes))
        pruner.sync_free = False if config.endswith("-bincount") else None
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(pristine[n])
        for event in range(ns.rounds):
            sparsity = 0.5 + 0.005 * event
            _sync()
            start = time.perf_counter()
            pruner.prune(lambda numel: keep_count(numel, sparsity))
            _sync()
            times[config].append(time.perf_counter() - start)
        masks[config] = [int((w == 0).sum()) for w in weights.values()]
        print(config, json.dumps([round(t * 1e3, 1) for t in times[config]]), flush=True)
    first = ns.configs[0]
    return {"dense_step_s": round(step_s, 5),
            # the first event also finds everything dense: the median of the later ones is the steady cost
            "event_ms": {c: round(1e3 * statistics.median(t[1:] or t), 2) for c, t in times.items()},
            "event_vs_step": {c: round(statistics.median(t[1:] or t) / step_s, 3) for c, t in times.items()},
            "all_events_ms": {c: [round(1e3 * x, 2) for x in t] for c, t in times.items()},
            "same_selection_as_" + first: {c: masks[c] == masks[first] for c in masks}}


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    shape = bench.SHAPES[ns.shape]
    if ns.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if ns.device.startswith("cuda") else torch.float32
    result = {"memory": memory, "profile": profile, "step-profile": step_profile, "timing": timing,
              "prune-event": prune_event}[ns.what](
        ns, shape, dtype)
    report = {"device": torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else "cpu", "tf32": ns.tf32, "torch": torch.__version__,
              "versions": bench.package_versions(), "shape": ns.shape,
              "what": ns.what, "result": result}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2))
    if ns.what == "memory":
        print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
