"""Every recipe shipped in recipes/ parses and validates (config only, no weights)."""

from pathlib import Path

import pytest
import torch

from trainer_plugins.recipes import load_recipe, mixed_precision_of, read_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_recipes():
    assert (ROOT / "recipes" / "quickstart.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_is_valid(path, request):
    flat = read_recipe(path)
    if "deepspeed" in flat:
        request.getfixturevalue("deepspeed_env")  # TrainingArguments(deepspeed=...) sets global state
    name = str(flat.get("model_name_or_path", "smollm2-135m-instruct"))
    # Hub names cannot be reached here: check their keys and values, not their config.
    offline = name.startswith(("smollm2", "/", ".")) or name.endswith(".gguf")
    overrides = {}
    if not torch.cuda.is_available():  # GPU recipes: transformers refuses bf16/fp16 without a GPU
        overrides = {k: False for k in ("bf16", "fp16") if flat.get(k)}
    recipe = load_recipe(path, overrides=overrides, load_config=offline)
    assert recipe.args.output_dir


def test_accelerate_configs_point_to_shipped_deepspeed_configs():
    import yaml

    for path in (ROOT / "recipes" / "accelerate").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        ds = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
        if ds:
            assert (ROOT / ds).is_file(), f"{path.name}: {ds} missing"


# The published shapes of the hub models the GPU recipes name, so their memory can be estimated offline
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
QWEN_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
HUB_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA_8B, "meta-llama/Llama-3.1-8B": LLAMA_8B,
    "Qwen/Qwen2.5-7B-Instruct": QWEN_7B, "Qwen/Qwen2.5-7B": QWEN_7B,
    "meta-llama/Llama-3.1-70B-Instruct": dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672,
                                              num_hidden_layers=80, num_attention_heads=64),
    "TinyLlama/TinyLlama_v1.1": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "FacebookAI/roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                                    type_vocab_size=1),
}
GPU_RECIPES = [p for p in RECIPES if read_recipe(p).get("model_name_or_path") in HUB_SHAPES]


# latest_only: the estimate's machinery runs on both suites (tests/host/test_estimate.py); this adds real
# 8B-70B shapes on meta (about 2 minutes), whose arithmetic does not depend on the transformers version
@pytest.mark.latest_only
@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_gpu_recipe_fits_one_80gb_gpu(path, request, tmp_path):
    """`trainer-plugins estimate` on the real shape: every GPU recipe fits an 80 GB GPU with room for the CUDA
    context and fragmentation (ZeRO recipes per GPU of 8)."""
    from transformers import AutoConfig

    from trainer_plugins.estimate import GiB, estimate_recipe

    flat = read_recipe(path)
    if "deepspeed" in flat:
        request.getfixturevalue("deepspeed_env")
    shape = dict(HUB_SHAPES[flat["model_name_or_path"]])
    AutoConfig.for_model(shape.pop("model_type"), **shape).save_pretrained(tmp_path / "config")
    overrides = {"model_name_or_path": str(tmp_path / "config")}
    if not torch.cuda.is_available():
        overrides.update({k: False for k in ("bf16", "fp16") if flat.get(k)})
    report = estimate_recipe(load_recipe(path, overrides=overrides), world_size=8 if "deepspeed" in flat else 1,
                             mixed_precision=mixed_precision_of(flat))  # its autocast, though the flags are off here
    assert report["per_gpu"]["peak"] < 72 * GiB, f"{path.name}: {report['per_gpu']['peak'] / GiB:.1f} GiB"
