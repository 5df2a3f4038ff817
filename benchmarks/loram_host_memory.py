"""Host memory of LoRAM's two passes over the whole original: pruning it (before training) and merging the
recovered adapter into it (after), each done tensor by tensor against loading the whole original.

    python benchmarks/loram_host_memory.py [--shape 1b] [--out benchmarks/results/loram_host_memory_cpu.json]

Writes a random-weight Llama of the bench shape in bf16 safetensors (5 GB shards, as the hub's) and a random
LoRA r8 on its seven projections in peft's format. Then, each in a fresh process, records the peak resident
memory (VmHWM) above what the process held before, and the wall time, of
  prune-*   the loram plugin's load_model (structured 65%, magnitude importance, bf16; layers 0-3 and the last
            two dense): pruned while read (storage.load_pruned_original), or the whole original loaded first
  prune-first-order-*   the same with first-order importance (float32; --methods picks them, and then the
            original gets SmolLM2's tokenizer and vocabulary for its calibration text)
  prune-4bit-*   the same with load_in_4bit (QLoRAM, NF4, bitsandbytes on the CPU)
  merge-*   merging the adapter: tensor by tensor (merging.merge_streaming) or peft's merge_and_unload.
The pruned models and the merged checkpoints are compared through a digest of every tensor (equal bit for
bit, or the run fails). Values do not matter to memory or time; the shape does.
"""

import argparse
import datetime
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {
    "prune-streaming": "loram load_model: the original pruned while read (storage.load_pruned_original)",
    "prune-whole": "loram load_model: from_pretrained of the whole original, then pruned",
    "prune-first-order-streaming": "the same, first-order importance (8 x 128 calibration tokens), float32: "
                                   "scores one decoder layer at a time (pruning.first_order_scores_by_layer)",
    "prune-first-order-whole": "the same, the whole original loaded and back-propagated through",
    "prune-4bit-streaming": "QLoRAM: pruned while read (magnitude), each decoder layer quantised to NF4 on the "
                            "device as it is read (here the device is the CPU, so the 4-bit model counts too)",
    "prune-4bit-whole": "QLoRAM: the whole original loaded, pruned, then quantised to NF4",
    "merge-streaming": "merging.merge_streaming (2 GiB output shards, the default)",
    "merge-streaming-512mb": "merging.merge_streaming with 512 MiB output shards",
    "merge-peft": "AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained",
}
DEFAULT_METHODS = "prune-streaming,prune-whole,merge-streaming,merge-streaming-512mb,merge-peft"


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM, which, unlike ru_maxrss, starts
    afresh at exec: the parent's peak is not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_original(directory: Path, shape: str, with_tokenizer: bool = False) -> dict:
    """The random-weight original; ``with_tokenizer``: SmolLM2's tokenizer beside it (first-order scores read
    calibration text) and the vocabulary sized to it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer_plugins.bench import SHAPES
    from trainer_plugins.models import smollm2_gguf_path, tiny_llama_config
    from trainer_plugins_loram.merging import _plan_shards

    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    if with_tokenizer:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(directory))
        dims["vocab_size"] = len(tokenizer)
    config = tiny_llama_config(**dims, max_position_embeddings=2048)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    sizes = {name: 2 * torch.Size(s).numel() for name, s in shapes.items()}
    shards = _plan_shards(list(shapes), sizes, 5 * 10**9)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names},
                  str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}))
    config.save_pretrained(str(directory))
    return {"parameters": sum(torch.Size(s).numel() for s in shapes.values()), "bytes": sum(sizes.values()),
            "files": len(shards), "vocab_size": config.vocab_size}


def write_adapter(directory: Path, original: Path, rank: int = 8) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from trainer_plugins.bench import PROJECTIONS

    config = AutoConfig.from_pretrained(str(original))
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv, d, i = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, \
        config.hidden_size, config.intermediate_size
    dims = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q), "gate_proj": (i, d),
            "up_proj": (i, d), "down_proj": (d, i)}
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj in PROJECTIONS:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            out_features, in_features = dims[proj]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(original)).save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def digest(tensors) -> str:
    """One hash over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(directory: Path) -> str:
    from safetensors import safe_open

    tensors = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors += [(name, f.get_tensor(name)) for name in f.keys()]
    return digest(tensors)


def child(method: str, original: str, adapter: str, target: str) -> None:
    """One pass in this process; prints its memory, time and the result's digest as JSON."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer_plugins import PluginTrainingArguments
    from trainer_plugins.models import ModelArguments
    from trainer_plugins_loram import plugin, storage
    from trainer_plugins_loram.merging import MAX_SHARD_SIZE, merge_streaming

    before = rss_gib()  # the libraries imported: what the pass itself holds is measured
    start = time.perf_counter()
    result = {}
    if method.startswith("prune"):
        if method.endswith("-whole"):
            storage.load_pruned_original = lambda *a, **k: None
        first_order = method.startswith("prune-first-order")
        scores = dict(loram_importance="first_order", loram_calibration_samples=8, loram_calibration_seq_length=128) \
            if first_order else dict(loram_importance="magnitude")
        args = PluginTrainingArguments(output_dir=target, use_cpu=True, report_to=[], loram="lora", loram_ratio=0.65,
                                       **scores)
        # first-order scores compute in float32 (this CPU has no bf16 instructions: bf16 runs ~20x slower)
        four_bit = dict(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16") if "4bit" in method else {}
        model = plugin.load_model(args, ModelArguments(model_name_or_path=original,
                                                       dtype="float32" if first_order else "bfloat16", **four_bit))
        seconds = time.perf_counter() - start
        # safetensors hands out memory-mapped tensors, resident once read: the digest reads every one, so the
        # peak counts the whole pruned model (and one tensor's bytes copy)
        result = {"digest": digest(list(model.state_dict().items())),
                  "parameters": json.loads((Path(target) / "loram.json").read_text())["parameters"]}
        peak = rss_gib("VmHWM")
    else:
        if method.startswith("merge-streaming"):
            size = 512 * 2**20 if method == "merge-streaming-512mb" else MAX_SHARD_SIZE
            why = merge_streaming(original, adapter, target, torch.bfloat16, max_shard_size=size)
            assert why is None, why
        else:
            model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16)
            PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(target)
        seconds, peak = time.perf_counter() - start, rss_gib("VmHWM")
    print(json.dumps({"rss_before_gib": round(before, 3), "peak_rss_gib": round(peak, 3),
                      "pass_peak_gib": round(peak - before, 3), "seconds": round(seconds, 2), **result}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--out", default="benchmarks/results/loram_host_memory_cpu.json")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {', '.join(METHODS)}")
    parser.add_argument("--work", help="keep the written original and adapter here (reused by a later run)")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "ORIGINAL", "ADAPTER", "TARGET"))
    opts = parser.parse_args()
    if opts.child:
        return child(*opts.child)
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="loram-host-memory-"))
    try:
        original, adapter = work / "original", work / "adapter"
        if (work / "original.json").is_file():  # --work of an earlier run of the same shape
            model = json.loads((work / "original.json").read_text())
        else:
            original.mkdir(parents=True, exist_ok=True)
            model = write_original(original, opts.shape, with_tokenizer="first-order" in opts.methods)
            write_adapter(adapter, original)
            (work / "original.json").write_text(json.dumps(model))
        results = {}
        for method in opts.methods.split(","):
            target = work / f"out-{method}"
            run = subprocess.run([sys.executable, __file__, "--child", method, str(original), str(adapter),
                                  str(target)], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{method} failed:\n{run.stderr[-3000:]}")
            row = json.loads(run.stdout.strip().splitlines()[-1])
            if method.startswith("merge"):
                row["files"] = len(list(target.glob("*.safetensors")))
                row["digest"] = checkpoint_digest(target)
            shutil.rmtree(target, ignore_errors=True)  # a 7B output is 13 GB of disk
            results[method] = {**row, "what": METHODS[method]}
            print(method, results[method], flush=True)
        identical, done = {}, set()
        for kind, baseline in (("prune-first-order", "prune-first-order-whole"), ("prune-4bit", "prune-4bit-whole"),
                               ("prune", "prune-whole"), ("merge", "merge-peft")):
            rows = {m: row for m, row in results.items() if m.startswith(kind) and m not in done}
            done.update(rows)
            if rows:
                identical[kind] = len({row["digest"] for row in rows.values()}) == 1
            for row in rows.values():
                if baseline in rows:
                    row["peak_vs_" + baseline] = round(row["pass_peak_gib"] / rows[baseline]["pass_peak_gib"], 3)
        report = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                  "versions": {m.__name__: m.__version__ for m in map(__import__, ("torch", "transformers", "peft"))},
                  "shape": opts.shape, "original": {**model, "dtype": "bfloat16", "gib": round(model["bytes"] / 2**30, 3)},
                  "adapter": "LoRA r8, alpha 16, the seven projections", "identical_results": identical,
                  "methods": results}
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        assert all(identical.values()), f"results differ: {identical}"
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
