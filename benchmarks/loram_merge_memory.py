"""Host memory of LoRAM's merge: tensor by tensor (merging.py) against peft with the whole original loaded.

    python benchmarks/loram_merge_memory.py [--shape 1b] [--out benchmarks/results/loram_merge_memory_cpu.json]

Writes a random-weight Llama of the bench shape in bf16 safetensors (5 GB shards, as the hub's) and a random
LoRA r8 on its seven projections in peft's format, then merges it in a fresh process per method and records
that process's peak resident memory (VmHWM) above what it held before merging, and the wall time. The
merged directories are compared tensor by tensor (they must be equal bit for bit). Values do not matter to
memory or time; the shape does.
"""

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {"streaming": "merging.merge_streaming (2 GiB output shards, the default)",
           "streaming-512mb": "merging.merge_streaming with 512 MiB output shards",
           "peft": "AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained"}


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM, which, unlike ru_maxrss, starts
    afresh at exec: the parent's peak is not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_original(directory: Path, shape: str) -> dict:
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from trainer_plugins.bench import SHAPES
    from trainer_plugins.models import tiny_llama_config
    from trainer_plugins_loram.merging import _plan_shards

    config = tiny_llama_config(**{k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")},
                               max_position_embeddings=2048)
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
            "files": len(shards)}


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


def child(method: str, original: str, adapter: str, target: str) -> None:
    """One merge in this process; prints its memory and time as JSON."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer_plugins_loram.merging import MAX_SHARD_SIZE, merge_streaming

    before = rss_gib()
    start = time.perf_counter()
    if method.startswith("streaming"):
        size = 512 * 2**20 if method == "streaming-512mb" else MAX_SHARD_SIZE
        why = merge_streaming(original, adapter, target, torch.bfloat16, max_shard_size=size)
        assert why is None, why
    else:
        model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(target)
    seconds = time.perf_counter() - start
    peak = rss_gib("VmHWM")
    print(json.dumps({"rss_before_gib": round(before, 3), "peak_rss_gib": round(peak, 3),
                      "merge_peak_gib": round(peak - before, 3), "seconds": round(seconds, 2)}))


def same_weights(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def where(directory):
        out = {}
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), path))
        return out

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False
    for name in wa:
        with safe_open(str(wa[name]), framework="pt") as fa, safe_open(str(wb[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            return False
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--out", default="benchmarks/results/loram_merge_memory_cpu.json")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "ORIGINAL", "ADAPTER", "TARGET"))
    opts = parser.parse_args()
    if opts.child:
        return child(*opts.child)
    work = Path(tempfile.mkdtemp(prefix="loram-merge-"))
    try:
        original, adapter = work / "original", work / "adapter"
        original.mkdir()
        model = write_original(original, opts.shape)
        write_adapter(adapter, original)
        results = {}
        for method in opts.methods.split(","):
            target = work / f"merged-{method}"
            run = subprocess.run([sys.executable, __file__, "--child", method, str(original), str(adapter),
                                  str(target)], capture_output=True, text=True, check=True)
            results[method] = {**json.loads(run.stdout.strip().splitlines()[-1]), "what": METHODS[method],
                               "files": len(list(target.glob("*.safetensors")))}
            print(method, results[method], flush=True)
        merged = [work / f"merged-{m}" for m in results]
        identical = all(same_weights(merged[0], other) for other in merged[1:])
        report = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                  "versions": {m.__name__: m.__version__ for m in map(__import__, ("torch", "transformers", "peft"))},
                  "shape": opts.shape, "original": {**model, "dtype": "bfloat16", "gib": round(model["bytes"] / 2**30, 3)},
                  "adapter": "LoRA r8, alpha 16, the seven projections", "identical_outputs": identical,
                  "methods": results}
        if "peft" in results:
            for method, row in results.items():
                row["peak_vs_peft"] = round(row["merge_peak_gib"] / results["peft"]["merge_peak_gib"], 3)
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        assert identical, "the merged models differ"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
