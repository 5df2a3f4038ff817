"""LoRAM's methods for `trainer-plugins bench`: LoRA r8 on a model pruned 50% / 65% (random structured
scores: memory and speed do not depend on which units go), and QLoRAM (65%, NF4, LoRA factors in float32).
The ``-checkpointing`` ones add activation checkpointing (``gradient_checkpointing: true``), as QLoRA is
usually run: against ``lora-checkpointing`` they compare like with like once activations stop dominating."""

from trainer_plugins.bench import BenchMethod, enable_checkpointing, lora, nf4


def _loram(ratio, four_bit=False, checkpointing=False):
    def prepare(model):
        from .pruning import structured_plan
        from .storage import trainable_in_float32

        structured_plan(model, ratio_attn=ratio, ratio_mlp=ratio, keep_first=4, keep_last=2,
                        importance="random", neuron_multiple=64).apply(model)
        if four_bit:
            nf4(model)
        model = lora()(model)
        if four_bit:
            trainable_in_float32(model)
        if checkpointing:  # what the Trainer does with gradient_checkpointing: true
            enable_checkpointing(model)
        return model

    return prepare


METHODS = {
    "loram-50": BenchMethod(prepare=_loram(0.5), description="LoRAM: LoRA r8 on a 50% structurally pruned model"),
    "loram-65": BenchMethod(prepare=_loram(0.65), description="LoRAM: LoRA r8 on a 65% structurally pruned model"),
    "qloram-65": BenchMethod(prepare=_loram(0.65, four_bit=True), description="QLoRAM: 65% pruned, NF4, LoRA r8"),
    "loram-65-checkpointing": BenchMethod(prepare=_loram(0.65, checkpointing=True),
                                          description="LoRAM 65% + activation checkpointing"),
    "qloram-65-checkpointing": BenchMethod(prepare=_loram(0.65, four_bit=True, checkpointing=True),
                                           description="QLoRAM 65% + activation checkpointing"),
}
