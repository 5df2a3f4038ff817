"""MEFT's method for `trainer-plugins bench`: MEFT1 on every layer with the plugin's defaults (LoRA r8 on
the 7 projections, adapter 8 in G, gamma 1/32, float64 streams stored every 4 layers). float32 streams are
no saving: at gamma 1/32 they need segments of 2 layers to stay exact, which stores as much."""

from trainer_plugins.bench import PROJECTIONS, BenchMethod


def _meft(stream="float64", segment=4):
    def prepare(model):
        import torch
        from peft import LoraConfig, get_peft_model

        from .llama import MeftSettings, add_adapters, convert

        add_adapters(model, 8)
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", modules_to_save=["meft_adapter"],
                            target_modules=PROJECTIONS)
        model = get_peft_model(model, config)
        return convert(model, MeftSettings(stream_dtype=getattr(torch, stream), segment=segment))

    return prepare


METHODS = {
    "meft": BenchMethod(prepare=_meft(), description="MEFT1, float64 streams every 4 layers"),
}
