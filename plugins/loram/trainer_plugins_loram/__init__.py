"""LoRAM plugin for trainer-plugins: prune a Llama-family model (pruning.py), train LoRA on the pruned
model, recover the adapter to the original shapes (recovery.py) and merge it into the original model;
pruned models on disk and in 4 bits (storage.py)."""

__version__ = "0.1.0"
