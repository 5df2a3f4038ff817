"""Memory and speed of training methods on one model shape, in one process, one after another.

    python benchmarks/harness.py --shape 1b --methods adamw sgd apollo-torch apollo-torch-mini apollo apollo-mini \
        apollo-mini-layerwise --out benchmarks/results/apollo-1b-h100.json

This file is `trainer-plugins bench` (trainer_plugins/bench.py) run from a checkout; the baselines live
there, each plugin's methods in its own bench.py (the ``benchmark_methods`` hook).

LoRAM's GPU case (issue 5), bf16, 7B and 13B shapes:

    python benchmarks/harness.py --shape 7b --methods lora qlora-peft loram-50 loram-65 qloram-65 \
        --out benchmarks/results/loram-7b-h100.json

LST's GPU case (issue 6), against full fine-tuning (AdamW), LoRA r16 and QLoRA r16, 1B and 7B shapes:

    python benchmarks/harness.py --shape 7b --methods adamw lora-r16 qlora-r16-peft lst lst-4bit \
        --out benchmarks/results/lst-7b-h100.json

MEFT's GPU case (issue 7): activation memory (activation_gib: the step's peak above what was allocated
before its forward) against LoRA with and without activation checkpointing and full fine-tuning, and
its growth with depth (--layers):

    python benchmarks/harness.py --shape 1b --methods adamw lora lora-checkpointing meft \
        --out benchmarks/results/meft-1b-h100.json
    for n in 12 24 48; do python benchmarks/harness.py --shape 1b --layers $n --methods lora meft \
        --out benchmarks/results/meft-1b-$n-layers-h100.json; done
"""

import sys

from trainer_plugins.bench import main

if __name__ == "__main__":
    sys.exit(main())
