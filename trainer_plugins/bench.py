"""``trainer-plugins bench``: memory and speed of training methods on one model shape, in one process, one
after another, against the baselines in the same run.

    trainer-plugins bench --shape 1b --methods adamw sgd apollo-torch apollo-mini --out results/apollo-1b.json

Every case builds the same random-weight Llama of the chosen shape (memory and speed do not depend on the
values), runs warm-up steps, then timed steps (forward + backward + optimizer step on random tokens), and
records the peak memory allocated (torch.cuda.max_memory_allocated, reset once the model exists, so the build
transient is excluded; counted above what was allocated before the case began, and what the case leaves
allocated is reported as ``left_behind_gib``), what the last step's forward + backward add above the resting state
(``activation_gib``), the median step time, and the peak ``trainer-plugins estimate`` predicts for the same
steps (``estimate_gib``, ``estimate_vs_peak``: the estimate checked on every run). On a CPU the peak comes from
one more step under the profiler (its allocator events), so the estimate is checked there too. JSON with the
device, date and command, ratios against the first method, and a PNG chart if matplotlib is installed.
``--estimate-only`` runs no step: each case's predicted peak on a CUDA GPU, from shapes alone, in seconds.

Baselines live here (full fine-tuning with fused AdamW, SGD, peft LoRA with and without activation
checkpointing, peft QLoRA with its standard preparation, apollo-torch); each plugin adds its methods with
the ``benchmark_methods`` hook (see ``BenchMethod``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class BenchMethod:
    """A training method for the bench. ``prepare(model) -> model`` changes the model first (adapters,
    pruning, 4-bit; default: none); ``optimizer(model, lr)`` builds the optimizer (default: fused AdamW
    over the trainable parameters). ``autocast``: forward and loss under torch.autocast to the bench's
    16-bit dtype, as the Trainer runs with ``bf16: true`` (matters where trainable weights are float32); the
    estimate replays autocast's casts on the meta device. ``compiled``: the step runs torch.compile'd code, whose
    fused kernels can drop temporaries that eager code allocates; its estimate is eager's, an upper bound, and the
    report says so (``"estimate": "eager"``)."""

    prepare: Optional[Callable] = None
    optimizer: Optional[Callable] = None
    description: str = ""
    autocast: bool = False
    compiled: bool = False


def adamw_over_trainable(model, lr):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, fused=trainable[0].device.type == "cuda")


def decoder_linear_weights(model) -> dict:
    """The decoder layers' linear weights by name (not embeddings, not the head)."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n}


def decoder_linear_groups(model, **low_rank_kwargs):
    """Two parameter groups: the decoder layers' linear weights (with ``low_rank_kwargs``) and the rest."""
    targets = list(decoder_linear_weights(model).values())
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": targets, **low_rank_kwargs}]


def nf4(model):
    """The decoder layers' projections in NF4 (double quantisation), the rest in the model's dtype."""
    from transformers import BitsAndBytesConfig

    from .models import quantize_linears_4bit

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=model.dtype, bnb_4bit_quant_storage=torch.uint8)
    quantize_linears_4bit(model, config, model.device)
    return model


def lora(rank=8, four_bit=False, peft_kbit=False, checkpointing=False, peft_kbit_checkpointing=True):
    """peft LoRA on the 7 projections; ``four_bit`` + ``peft_kbit``: QLoRA with peft's standard preparation
    (prepare_model_for_kbit_training: float32 non-quantised weights, so a float32 residual stream, and
    activation checkpointing unless ``peft_kbit_checkpointing`` is off)."""

    def prepare(model):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if four_bit:
            nf4(model)
        if peft_kbit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=peft_kbit_checkpointing)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=PROJECTIONS))
        if checkpointing:
            enable_checkpointing(model)
        return model

    return prepare


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing (the Trainer's default), by the name this transformers has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _apollo_torch(rank, scale, scale_type):
    def build(model, lr):
        from apollo_torch import APOLLOAdamW

        return APOLLOAdamW(decoder_linear_groups(model, rank=rank, scale=scale, scale_type=scale_type,
                                                 update_proj_gap=200, proj="random", proj_type="std"), lr=lr)

    return build


BASELINES = {
    "adamw": BenchMethod(optimizer=lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr,
                                                                       fused=model.device.type == "cuda"),
                         description="full fine-tuning, torch AdamW (fused on CUDA)"),
    "sgd": BenchMethod(optimizer=lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
                       description="full fine-tuning, SGD: no optimizer state (the floor)"),
    "sgd-checkpointing": BenchMethod(prepare=enable_checkpointing,
                                     optimizer=lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
                                     description="SGD + activation checkpointing: the floor once gradients set the peak"),
    "apollo-torch": BenchMethod(optimizer=_apollo_torch(256, 1.0, "channel"), description="apollo-torch, rank 256"),
    "apollo-torch-mini": BenchMethod(optimizer=_apollo_torch(1, 128.0, "tensor"), description="apollo-torch Mini"),
    "lora": BenchMethod(prepare=lora(), description="peft LoRA r8 on the 7 projections"),
    "lora-r16": BenchMethod(prepare=lora(rank=16), description="peft LoRA r16"),
    "lora-checkpointing": BenchMethod(prepare=lora(checkpointing=True), description="LoRA r8 + activation checkpointing"),
    "qlora-peft": BenchMethod(prepare=lora(four_bit=True, peft_kbit=True), description="peft QLoRA r8 (NF4)"),
    "qlora-r16-peft": BenchMethod(prepare=lora(rank=16, four_bit=True, peft_kbit=True), description="peft QLoRA r16"),
    "qlora-peft-no-checkpointing": BenchMethod(
        prepare=lora(four_bit=True, peft_kbit=True, peft_kbit_checkpointing=False),
        description="peft QLoRA r8, prepare_model_for_kbit_training(use_gradient_checkpointing=False)"),
}


def methods(host=None) -> dict[str, BenchMethod]:
    """The baselines, then every installed plugin's methods (``benchmark_methods`` hook)."""
    from .errors import ConfigError
    from .manager import get_host

    out = dict(BASELINES)
    for extra in (host or get_host()).call("benchmark_methods"):
        for name, method in extra.items():
            if name in out:
                raise ConfigError(f"bench method {name!r} is defined twice")
            out[name] = method
    return out


# What a measured memory or speed figure depends on besides the device: recorded with every bench result, so
# that a later comparison with an estimate can tell whether it runs the same code (tests skip where it does not).
MEASURED_WITH = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "apollo-torch")


def package_versions(dists=MEASURED_WITH) -> dict:
    """The installed version of each distribution, "not installed" for those missing."""
    import importlib.metadata

    versions = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                         max_position_embeddings=max(shape["seq"], 128))
    with torch.device(device):  # built where it runs, in its dtype: no fp32 copy on the host
        return LlamaForCausalLM(config).to(dtype)


def prepared_model(method: BenchMethod, shape: dict, device: str, dtype: torch.dtype):
    """The shape's random-weight Llama on ``device`` (``"meta"``: shapes only), changed by the method's ``prepare``."""
    if method.compiled and device != "meta":
        # graphs an earlier case compiled (another shape or method, same code) would make this one's dynamic
        # (dynamo's automatic dynamic shapes) or, past its recompile limit, leave it eager: start afresh
        torch._dynamo.reset()
    model = build_model(shape, device, dtype)
    return method.prepare(model) if method.prepare is not None else model


def estimate_case(method: BenchMethod, shape: dict, dtype: torch.dtype, device: str = "cuda") -> int:
    """The peak `trainer-plugins estimate` predicts for this case on ``device`` (the same steps on the meta
    device), in bytes."""
    from .estimate import language_model_batch, simulate_training

    model = prepared_model(method, shape, "meta", dtype)
    optimizer = (method.optimizer or adamw_over_trainable)(model, 1e-4)
    batch = language_model_batch(shape["vocab_size"], shape["batch"], shape["seq"])
    return simulate_training(model, optimizer, batch, device=torch.device(device).type,
                             autocast=dtype if method.autocast else None).peak


def run_case(name: str, method: BenchMethod, shape: dict, device: str, dtype: torch.dtype, warmup: int,
             steps: int) -> dict:
    from .estimate import measure_training, resident_bytes
    from .memory import optimizer_state_bytes

    estimate = estimate_case(method, shape, dtype, device=device)
    cuda = device.startswith("cuda")
    # Whatever an earlier case left allocated is not this case's: peaks are counted above it (and what this
    # case leaves behind is reported, so a leak shows).
    already_allocated = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(0)
    model = prepared_model(method, shape, device, dtype)
    model.train()
    optimizer = (method.optimizer or adamw_over_trainable)(model, 1e-4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if method.autocast and dtype != torch.float32
                else contextlib.nullcontext())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, before_last, peak_so_far = [], 0, 0
    for i in range(warmup + steps):
        if cuda and i == warmup + steps - 1:  # the last step alone: what its forward + backward add
            torch.cuda.synchronize()
            before_last, peak_so_far = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    if cuda:
        last_peak = torch.cuda.max_memory_allocated()
        peak = max(peak_so_far, last_peak) - already_allocated
    else:  # one more step, under the profiler: its allocator events give the peak and what the step added
        before_last = resident_bytes(model) + optimizer_state_bytes(optimizer)
        last_peak = peak = measure_training(model, optimizer, lambda: {"input_ids": tokens, "labels": tokens},
                                            steps=1, autocast=dtype if method.autocast else None)["peak"]
    result = {
        "method": name,
        "layers": shape["num_hidden_layers"],
        "peak_gib": round(peak / 2**30, 3),
        # activations (and the gradients and optimizer transients of one step) above the resting state
        "activation_gib": round((last_peak - before_last) / 2**30, 3),
        "estimate_gib": round(estimate / 2**30, 3),
        "estimate_vs_peak": round(estimate / peak, 3),
        **({"estimate": "eager"} if method.compiled else {}),
        "param_gib": round(param_bytes / 2**30, 3),
        "median_step_s": round(step, 5),
        "tokens_per_s": round(shape["batch"] * shape["seq"] / step, 1),
        "final_loss": round(float(loss.detach()), 4),
    }
    del model, optimizer, loss, tokens
    if method.compiled:  # compiled graphs (and CUDA graph trees, with their memory pool) hold on to this case
        torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        result["left_behind_gib"] = round((torch.cuda.memory_allocated() - already_allocated) / 2**30, 3)
    return result


def with_ratios(results: list[dict]) -> list[dict]:
    measured = [r for r in results if "median_step_s" in r]  # failed or skipped cases have no numbers
    estimated = [r for r in results if "estimate_gib" in r and "peak_gib" not in r]  # --estimate-only
    if estimated and estimated[0]["estimate_gib"]:
        base = estimated[0]
        for r in estimated:
            r[f"estimate_vs_{base['method']}"] = round(r["estimate_gib"] / base["estimate_gib"], 3)
    if not measured:
        return results
    base = measured[0]
    for r in measured:
        r[f"step_vs_{base['method']}"] = round(r["median_step_s"] / base["median_step_s"], 3)
        if base["peak_gib"]:  # rounds to 0.0 below half a MiB
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--methods", nargs="+", help="default: all (baselines first); `--methods list` lists them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, help="override the shape's number of layers (depth sweeps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, help="JSON file; the PNG goes next to it")
    p.add_argument("--budget", type=float, help="seconds after which no new case starts (the rest are recorded as "
                                                "skipped)")
    p.add_argument("--estimate-only", action="store_true",
                   help="no training: each case's peak as `trainer-plugins estimate` predicts it for a CUDA GPU "
                        "(meta device, no weights, no GPU needed); bfloat16 unless --dtype")


def run(ns, host=None) -> int:
    from .errors import ConfigError

    available = methods(host)
    if ns.methods == ["list"]:
        for name, method in available.items():
            print(f"{name:24s} {method.description}")
        return 0
    chosen = ns.methods or list(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ConfigError(f"unknown bench methods {unknown}; known: {', '.join(available)}")
    if ns.out is None:
        raise ConfigError("bench needs --out FILE.json")
    estimate_only = getattr(ns, "estimate_only", False)
    gpu = estimate_only or ns.device.startswith("cuda")
    dtype = getattr(torch, ns.dtype or ("bfloat16" if gpu else "float32"))
    shape = dict(SHAPES[ns.shape], **({"num_hidden_layers": ns.layers} if ns.layers else {}))
    report = {
        "shape": ns.shape, "config": shape, "dtype": str(dtype).replace("torch.", ""),
        "device": ("estimate for a CUDA GPU (meta device)" if estimate_only else
                   torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else f"cpu ({platform.processor()})"),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "versions": package_versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "warmup": ns.warmup, "steps": ns.steps, "results": [],
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    budget = getattr(ns, "budget", None)
    deadline = None if budget is None else time.monotonic() + budget
    failed = 0
    for name in chosen:
        if deadline is not None and time.monotonic() > deadline:
            result = {"method": name, "skipped": "out of time"}
        elif estimate_only:
            result = {"method": name, "estimate_gib": round(estimate_case(available[name], shape, dtype) / 2**30, 3)}
        else:
            result = _case_or_error(name, available[name], shape, ns.device, dtype, ns.warmup, ns.steps)
        failed += "error" in result
        report["results"].append(result)
        print(json.dumps(result), flush=True)
        # written after every case: a run cut short (OOM, a time limit) keeps what finished
        ns.out.write_text(json.dumps(dict(report, results=with_ratios(report["results"])), indent=2))
    if not estimate_only:
        chart(dict(report, results=[r for r in report["results"] if "peak_gib" in r]), ns.out.with_suffix(".png"))
    return 1 if failed else 0


def _case_or_error(name, method, shape, device, dtype, warmup, steps) -> dict:
    """One case; a failure (out of memory, a method that breaks on this device) is recorded, and the run goes
    on with the next case."""
    try:
        return run_case(name, method, shape, device, dtype, warmup, steps)
    except Exception as error:  # noqa: BLE001 -- recorded in the results, and the exit status says so
        message = f"{type(error).__name__}: {error}"[:2000]
    gc.collect()  # the failed case's model and optimizer, released with the traceback
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"bench: {name} failed: {message}", file=sys.stderr, flush=True)
    return {"method": name, "error": message}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
