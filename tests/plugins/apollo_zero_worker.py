"""Run by torchrun (2 CPU processes, gloo) from test_apollo_zero.py: APOLLO inside a DeepSpeed ZeRO engine
against the same optimizer in one process on the whole batch, then checkpoint resume under ZeRO.

Usage: torchrun --nproc_per_node 2 apollo_zero_worker.py STAGE OUT_JSON CKPT_DIR
"""

import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the CPU shm JIT build: gloo is enough

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer_plugins.zero import zero_layout  # noqa: E402
from trainer_plugins_apollo.optimizer import APOLLO, apollo_param_groups  # noqa: E402
from helpers import run_worker_jobs  # noqa: E402

# (name, apollo group settings): channel (rank 3, refresh every 2 steps) and tensor (Mini), limiter on/off, and
# a rank above one weight's smaller side
CONFIGS = {
    "channel": dict(rank=3, scale=1.0, scale_type="channel", update_proj_gap=2, limiter=True),
    "channel-nolimit": dict(rank=3, scale=1.0, scale_type="channel", update_proj_gap=2, limiter=False),
    "mini": dict(rank=1, scale=128.0, scale_type="tensor", update_proj_gap=2, limiter=True),
    # rank 10 is above the 7-row weight's smaller side: its projection is capped at 7 (projection_rank)
    "channel-rank-above-a-side": dict(rank=10, scale=1.0, scale_type="channel", update_proj_gap=2, limiter=True),
}
STEPS, BATCH = 6, 8


def model():
    torch.manual_seed(0)
    # Tall (41x24), wide (15x41, 7x15) and square weights with biases and a norm; odd sizes, so that
    # ZeRO-2's partition boundary falls mid-row and ZeRO-3 cuts every weight mid-row.
    return torch.nn.Sequential(
        torch.nn.Linear(24, 41), torch.nn.GELU(), torch.nn.Linear(41, 15), torch.nn.LayerNorm(15),
        torch.nn.Linear(15, 15, bias=False), torch.nn.Tanh(), torch.nn.Linear(15, 7, bias=False),
    )


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 7, generator=g)) for _ in range(STEPS)]


def optimizer(net, cfg):
    cfg = dict(cfg)
    limiter = cfg.pop("limiter")
    groups = apollo_param_groups(net.named_parameters(), lambda name, p: p.dim() == 2, weight_decay=0.1,
                                 no_decay=lambda name: "bias" in name or name.startswith("3."), **cfg)
    return APOLLO(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, norm_growth_limiter=limiter, seed=7)


def reference(cfg):
    net = model()
    opt = optimizer(net, cfg)
    for x, y in batches():
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def engine_for(stage, cfg):
    net = model()
    opt = optimizer(net, cfg)
    config = {"train_micro_batch_size_per_gpu": BATCH // 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    opt.attach_zero(zero_layout(engine))
    return engine, opt


def train(engine, steps):
    rank = dist.get_rank()
    for x, y in steps:
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        loss = torch.nn.functional.mse_loss(engine(x[half]), y[half])
        engine.backward(loss)
        engine.step()


def full_params(engine):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=hasattr(
            next(engine.module.parameters()), "ds_id")):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def max_rel_error(a, b):
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)


def main(stage: str, out: str, ckpt: str):
    stage = int(stage)
    deepspeed.init_distributed(dist_backend="gloo")
    report = {"world_size": dist.get_world_size(), "configs": {}}
    for name, cfg in CONFIGS.items():
        want = reference(cfg)
        engine, opt = engine_for(stage, cfg)
        layout = opt._zero_layout
        cut = sum(len(spans) > 1 for s in layout.shards for _, shape, spans in s.params if len(shape) == 2)
        mid_row = sum(any(sp.start % shape[1] for sp in spans[1:])
                      for s in layout.shards for _, shape, spans in s.params if len(shape) == 2)
        train(engine, batches())
        got = full_params(engine)

        # resume: 3 steps, save, a fresh engine loads, 3 more steps == 6 uninterrupted
        first, _ = engine_for(stage, cfg)
        train(first, batches()[:3])
        first.save_checkpoint(f"{ckpt}/{name}", tag="step3")
        second, _ = engine_for(stage, cfg)
        second.load_checkpoint(f"{ckpt}/{name}", tag="step3")
        train(second, batches()[3:])
        resumed = full_params(second)
        report["configs"][name] = {
            "max_rel_error_vs_single_process": max_rel_error(got, want),
            "max_abs_error_resume": max(float((resumed[n] - got[n]).abs().max()) for n in got),
            "cut_weights": cut, "cut_mid_row": mid_row,
            "moved": max(float((got[n] - model().state_dict()[n]).abs().max()) for n in got),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_worker_jobs(main)
