"""Memory and speed of training methods on one model shape, in one process, one after another.

    python benchmarks/harness.py --shape 1b --methods adamw sgd apollo-torch apollo-torch-mini apollo apollo-mini \
        apollo-mini-layerwise --out benchmarks/results/apollo-1b-h100.json

Every case builds the same random-weight Llama of the chosen shape (memory and speed do not depend on the
values), runs warm-up steps, then timed steps (forward + backward + optimizer step on random tokens), and
records the peak memory allocated during training (torch.cuda.max_memory_allocated after resetting the peak
once the model exists, so the build transient is excluded) and the median step time. Results are JSON with the
device, date and command, plus ratios against the first method; a PNG chart if matplotlib is installed.

Methods are registered in METHODS (name -> optimizer(model, lr)) and, when they change the model first (LoRA,
LoRAM pruning, 4-bit), in PREPARE (name -> prepare(model) -> model). Other plugins add theirs here.
LoRAM's GPU case (issue 5), bf16, 7B and 13B shapes:

    python benchmarks/harness.py --shape 7b --methods lora qlora-peft loram-50 loram-65 qloram-65 \
        --out benchmarks/results/loram-7b-h100.json

LST's GPU case (issue 6), against full fine-tuning (AdamW), LoRA r16 and QLoRA r16, 1B and 7B shapes:

    python benchmarks/harness.py --shape 7b --methods adamw lora-r16 qlora-r16-peft lst lst-4bit \
        --out benchmarks/results/lst-7b-h100.json

MEFT's GPU case (issue 7): activation memory (activation_gib: the step's peak above what was allocated
before its forward) against LoRA with and without activation checkpointing and full fine-tuning, and
its growth with depth (--layers):

    python benchmarks/harness.py --shape 1b --methods adamw lora lora-checkpointing meft meft-fp32-streams \
        --out benchmarks/results/meft-1b-h100.json
    for n in 12 24 48; do python benchmarks/harness.py --shape 1b --layers $n --methods lora meft \
        --out benchmarks/results/meft-1b-$n-layers-h100.json; done
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama shapes from the issues; batch x sequence per step
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, batch=2, seq=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=4, seq=1024),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=1, seq=1024),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, batch=1, seq=1024),
}


def _linear_groups(model, **apollo_kwargs):
    """AdamW for everything but the decoder's linear weights, which get the low-rank keys."""
    targets = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": targets, **apollo_kwargs}]


def _ours(rank, scale, scale_type, layerwise=False):
    def build(model, lr):
        from trainer_plugins_apollo import APOLLO

        opt = APOLLO(_linear_groups(model, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=200),
                     lr=lr)
        if layerwise:
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(opt.step_parameter)
        return opt

    return build


def _apollo_torch(rank, scale, scale_type):
    def build(model, lr):
        from apollo_torch import APOLLOAdamW

        return APOLLOAdamW(_linear_groups(model, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=200,
                                          proj="random", proj_type="std"), lr=lr)

    return build


def _lora_adamw(model, lr):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, fused=trainable[0].device.type == "cuda")


def _nf4(model):
    from transformers import BitsAndBytesConfig
    from trainer_plugins_loram.storage import quantize_4bit

    dtype = model.dtype
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    quantize_4bit(model, config, model.device)
    return model


def _lora(prune_ratio=0.0, four_bit=False, peft_kbit=False, rank=8):
    """LoRA r8 on the 7 projections, after optional LoRAM pruning (random structured scores: memory and speed
    do not depend on which units go) and NF4 quantisation. peft_kbit: peft's standard QLoRA preparation
    (prepare_model_for_kbit_training: float32 non-quantised weights, gradient checkpointing), the baseline."""

    def prepare(model):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if prune_ratio:
            from trainer_plugins_loram.pruning import structured_plan

            structured_plan(model, ratio_attn=prune_ratio, ratio_mlp=prune_ratio, keep_first=4, keep_last=2,
                            importance="random").apply(model)
        if four_bit:
            _nf4(model)
        if peft_kbit:
            model = prepare_model_for_kbit_training(model)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, config)
        if four_bit:
            from trainer_plugins_loram.storage import trainable_in_float32

            trainable_in_float32(model)
        return model

    return prepare


def _lst(reduction=8, four_bit=False):
    """Ladder Side-Tuning: frozen (optionally NF4) backbone, float32 side network of width d/r on every layer
    (random init: memory and speed do not depend on the values)."""

    def prepare(model):
        from trainer_plugins_lst import attach
        from trainer_plugins_lst.families import layers_of
        from trainer_plugins_lst.pruning import SideSettings, build, init_random

        if four_bit:
            _nf4(model)
        model.requires_grad_(False)
        side = build(model, SideSettings(reduction=reduction, layer_ids=list(range(model.config.num_hidden_layers))))
        side.to(model.get_input_embeddings().weight.device)
        init_random(model, side)
        attach(model, side, layers_of(model))
        return model

    return prepare


def _meft(stream="float64", segment=4):
    """MEFT1 on every layer (LoRA r8 on the 7 projections, adapter 8 in G, gamma 1/32): the defaults of
    the plugin, streams in float64 (``stream``) stored every ``segment`` layers."""

    def prepare(model):
        from peft import LoraConfig, get_peft_model
        from trainer_plugins_meft.llama import MeftSettings, add_adapters, convert

        add_adapters(model, 8)
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", modules_to_save=["meft_adapter"],
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, config)
        dtype = None if stream == "model" else getattr(torch, stream)
        return convert(model, MeftSettings(stream_dtype=dtype, segment=segment))

    return prepare


def _checkpointed(prepare):
    def with_checkpointing(model):
        model = prepare(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        return model

    return with_checkpointing


# name -> model transformation before the optimizer is built (default: none)
PREPARE = {
    "lora-r16": _lora(rank=16),
    "qlora-r16-peft": _lora(four_bit=True, peft_kbit=True, rank=16),
    "lst": _lst(),
    "lst-4bit": _lst(four_bit=True),
    "lora": _lora(),
    "qlora-peft": _lora(four_bit=True, peft_kbit=True),
    "loram-50": _lora(prune_ratio=0.5),
    "loram-65": _lora(prune_ratio=0.65),
    "qloram-65": _lora(prune_ratio=0.65, four_bit=True),
    "lora-checkpointing": _checkpointed(_lora()),
    "meft": _meft(),
    "meft-fp32-streams": _meft(stream="float32"),
}

METHODS = {
    "adamw": lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr, fused=model.device.type == "cuda"),
    "sgd": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
    "apollo-torch": _apollo_torch(256, 1.0, "channel"),
    "apollo-torch-mini": _apollo_torch(1, 128.0, "tensor"),
    "apollo": _ours(256, 1.0, "channel"),
    "apollo-mini": _ours(1, 128.0, "tensor"),
    "apollo-mini-layerwise": _ours(1, 128.0, "tensor", layerwise=True),
    **{name: _lora_adamw for name in PREPARE},
}


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                         max_position_embeddings=max(shape["seq"], 128))
    with torch.device(device):  # built where it runs, in its dtype: no fp32 copy on the host
        return LlamaForCausalLM(config).to(dtype)


def run_case(name: str, shape: dict, device: str, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(shape, device, dtype)
    if name in PREPARE:
        model = PREPARE[name](model)
    model.train()
    optimizer = METHODS[name](model, 1e-4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, before_last = [], None
    for i in range(warmup + steps):
        if cuda and i == warmup + steps - 1:  # the last step alone: what its forward + backward add
            torch.cuda.synchronize()
            before_last, peak_so_far = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    last_peak = torch.cuda.max_memory_allocated() if cuda else None
    result = {
        "method": name,
        "layers": shape["num_hidden_layers"],
        "peak_gib": round(max(peak_so_far, last_peak) / 2**30, 3) if cuda else None,
        # activations (and the gradients and optimizer transients of one step) above the resting state
        "activation_gib": round((last_peak - before_last) / 2**30, 3) if cuda else None,
        "param_gib": round(param_bytes / 2**30, 3),
        "median_step_s": round(step, 5),
        "tokens_per_s": round(shape["batch"] * shape["seq"] / step, 1),
        "final_loss": round(float(loss), 4),
    }
    del model, optimizer, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def with_ratios(results: list[dict]) -> list[dict]:
    base = results[0]
    for r in results:
        r[f"step_vs_{base['method']}"] = round(r["median_step_s"] / base["median_step_s"], 3)
        if r["peak_gib"] is not None:
            r[f"peak_vs_{base['method']}"] = round(r["peak_gib"] / base["peak_gib"], 3)
    return results


def chart(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    axes[0].barh(names, [r["peak_gib"] or 0 for r in rows])
    axes[0].set_xlabel("peak memory allocated (GiB)")
    axes[1].barh(names, [r["tokens_per_s"] for r in rows])
    axes[1].set_xlabel("tokens / s")
    fig.suptitle(f"{report['shape']} Llama shape, {report['device']} ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, help="override the shape's number of layers (depth sweeps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="JSON file; the PNG goes next to it")
    ns = p.parse_args(argv)
    dtype = getattr(torch, ns.dtype or ("bfloat16" if ns.device.startswith("cuda") else "float32"))
    shape = dict(SHAPES[ns.shape], **({"num_hidden_layers": ns.layers} if ns.layers else {}))
    results = [run_case(m, shape, ns.device, dtype, ns.warmup, ns.steps) for m in ns.methods]
    report = {
        "shape": ns.shape, "config": shape, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else f"cpu ({platform.processor()})",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "warmup": ns.warmup, "steps": ns.steps, "results": with_ratios(results),
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2))
    chart(report, ns.out.with_suffix(".png"))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
