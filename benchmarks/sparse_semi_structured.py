"""2:4 sparse inference vs dense on a GPU: a random-weight Llama shape pruned to exact 2:4 by the sparse
plugin's pruner, then converted with trainer_plugins_sparse.inference.to_semi_structured.

Measures prefill (batch x sequence forward) and greedy decoding throughput, dense vs 2:4, and the
largest logit difference (the conversion must not change the function), with each of torch's two 2:4
backends (cuSPARSELt, torch's default, and CUTLASS); and, to tell the kernels from the model around them, one
F.linear per distinct weight shape at the prefill's token count, dense vs each backend. The first run
(2026-11-27, H200, torch 2.11) found the whole model slower with 2:4 and did not record which backend ran.
Run on the GPU:

    python benchmarks/sparse_semi_structured.py --shape 1b --out $OUT/sparse_semi_structured.json
"""

import argparse
import contextlib
import json
import time

import torch
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
from transformers import LlamaConfig, LlamaForCausalLM

from trainer_plugins.targets import linear_weights
from trainer_plugins_sparse.inference import is_n_m, to_semi_structured
from trainer_plugins_sparse.pruning import Pruner, Target
from trainer_plugins_sparse.schedule import keep_count

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


BACKENDS = {"cusparselt": False, "cutlass": True}  # name -> SparseSemiStructuredTensor._FORCE_CUTLASS


@contextlib.contextmanager
def backend(name: str):
    """Tensors converted inside use ``name``'s kernels (torch picks the backend at conversion)."""
    SparseSemiStructuredTensor._FORCE_CUTLASS = BACKENDS[name]
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def restore(model, dense_weights) -> None:
    """Put the dense weights back (a conversion replaces them in place)."""
    for name, module in model.named_modules():
        if name in dense_weights:
            module.weight = torch.nn.Parameter(dense_weights[name].clone(), requires_grad=False)


def linear_kernels(model, tokens: int) -> dict:
    """F.linear at ``tokens`` rows for each distinct (2:4-pruned) weight shape: dense and each backend, seconds
    per call and the speedup; a backend that refuses a shape records its error."""
    import torch.nn.functional as F

    out = {}
    shapes = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.shape not in shapes and is_n_m(module.weight):
            shapes[module.weight.shape] = module.weight.detach()
    for shape, weight in shapes.items():
        x = torch.randn(tokens, shape[1], device=weight.device, dtype=weight.dtype)
        row = {"dense_s": timed(lambda: F.linear(x, weight), 20)}
        for name in BACKENDS:
            try:
                with backend(name):
                    sparse = to_sparse_semi_structured(weight)
                row[f"{name}_s"] = timed(lambda: F.linear(x, sparse), 20)
                row[f"{name}_speedup"] = row["dense_s"] / row[f"{name}_s"]
            except Exception as error:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
        out["x".join(map(str, shape))] = row
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)  # 2:4 decoding ran at 42 tokens/s: keep it short
    parser.add_argument("--out", default="sparse_semi_structured.json")
    ns = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[ns.shape])).to("cuda", torch.bfloat16).eval()
    weights = linear_weights(model, trainable_only=False)
    targets = [Target(n, p, tuple(p.shape), p.detach().view(-1)) for n, p in weights.items()]
    Pruner(targets, scope="layer", n_m=(2, 4)).prune(lambda numel: keep_count(numel, 0.5))
    ids = torch.randint(0, model.config.vocab_size, (ns.batch, ns.seq), device="cuda")
    prompt = ids[:, :128]

    def measure():
        with torch.inference_mode():
            prefill = timed(lambda: model(ids), 5)
            decode = timed(lambda: model.generate(prompt, max_new_tokens=ns.new_tokens, min_new_tokens=ns.new_tokens,
                                                  do_sample=False), 2)
            logits = model(ids[:1, :256]).logits.float()
        return {"prefill_s": prefill, "prefill_tokens_per_s": ns.batch * ns.seq / prefill,
                "decode_tokens_per_s": ns.batch * ns.new_tokens / decode}, logits

    dense_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kernels = linear_kernels(model, ns.batch * ns.seq)
    dense, dense_logits = measure()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": ns.shape,
        "batch": ns.batch, "seq": ns.seq, "new_tokens": ns.new_tokens, "dense": dense,
        "cusparselt_version": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "linear_kernels": kernels, "backends": {},
    }
    for name in BACKENDS:
        try:
            restore(model, dense_weights)
            with backend(name):
                converted = to_semi_structured(model)
            sparse, sparse_logits = measure()
            result["backends"][name] = {
                "converted_linear_layers": len(converted), **sparse,
                "prefill_speedup": dense["prefill_s"] / sparse["prefill_s"],
                "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                "max_abs_logit_diff": float((dense_logits - sparse_logits).abs().max()),
            }
        except Exception as error:  # noqa: BLE001 -- a backend this build lacks is a finding, not a crash
            result["backends"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    with open(ns.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
