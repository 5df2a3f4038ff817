"""2:4 sparse inference vs dense on a GPU: a random-weight Llama shape pruned to exact 2:4 by the sparse
plugin's pruner, then converted with trainer_plugins_sparse.inference.to_semi_structured.

Measures prefill (batch x sequence forward) and greedy decoding throughput, dense vs 2:4, and the
largest logit difference (the conversion must not change the function). Run on the GPU:

    python benchmarks/sparse_semi_structured.py --shape 1b --out $OUT/sparse_semi_structured.json
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer_plugins.targets import linear_weights
from trainer_plugins_sparse.inference import to_semi_structured
from trainer_plugins_sparse.pruning import Pruner, Target
from trainer_plugins_sparse.schedule import keep_count

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
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

    dense, dense_logits = measure()
    converted = to_semi_structured(model)
    sparse, sparse_logits = measure()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": ns.shape,
        "batch": ns.batch, "seq": ns.seq, "new_tokens": ns.new_tokens, "converted_linear_layers": len(converted),
        "dense": dense, "semi_structured_2_4": sparse,
        "prefill_speedup": dense["prefill_s"] / sparse["prefill_s"],
        "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "max_abs_logit_diff": float((dense_logits - sparse_logits).abs().max()),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    with open(ns.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
