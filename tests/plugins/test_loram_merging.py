"""merging.py: the recovered adapter merged into the original tensor by tensor equals peft's merge_and_unload bit
for bit, without loading the model; what it cannot reproduce falls back to peft with the reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from trainer_plugins.models import tiny_llama_config
from trainer_plugins_loram.merging import lora_deltas, merge_streaming
from trainer_plugins_loram.plugin import LoramState, merge
from trainer_plugins_loram.storage import Checkpoint

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny Llama saved in float32 in several shards (untied head: a real 7B's layout)."""
    out = tmp_path_factory.mktemp("merge-original")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**SHAPE, tie_word_embeddings=False)).save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    return str(out)


def adapter(original, out, dtype=torch.float32, **config):
    """A LoRA with random A and B (B is zero at peft's init: nothing to merge) saved in peft's format."""
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(original)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                    "init_lora_weights": False, **config}))
    peft_model.to(dtype).save_pretrained(str(out))
    return str(out)


def peft_merged(original, adapter_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(original, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def assert_same_weights(directory, expected):
    loaded = AutoModelForCausalLM.from_pretrained(str(directory)).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("dtype, adapter_dtype, config", [
    (torch.float32, torch.float32, {}),
    (torch.bfloat16, torch.float32, {}),        # QLoRAM: adapter trained in float32, merged into bf16
    (torch.bfloat16, torch.bfloat16, {"use_rslora": True}),
    (torch.float16, torch.float32, {"lora_alpha": 3}),
], ids=["fp32", "bf16", "bf16-adapter-rslora", "fp16"])
def test_streaming_merge_equals_peft_merge_bit_for_bit(original, tmp_path, monkeypatch, dtype, adapter_dtype, config):
    adapter_dir = adapter(original, tmp_path / "adapter", adapter_dtype, **config)
    expected = peft_merged(original, adapter_dir, dtype)

    from transformers import PreTrainedModel

    def no_model(*args, **kwargs):
        raise AssertionError("the streaming merge loaded a model")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "from_pretrained", no_model)
        assert merge_streaming(original, adapter_dir, tmp_path / "merged", dtype, max_shard_size=60_000) is None

    assert_same_weights(tmp_path / "merged", expected)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    for name in files:  # no shard over the bound unless it holds one tensor (the fp32 embeddings: 256 KB)
        with safe_open(str(tmp_path / "merged" / name), framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_a_single_file_original_gives_a_single_file(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**SHAPE)).save_pretrained(tmp_path / "orig")  # tied head, one file
    assert Checkpoint.of(str(tmp_path / "orig")).files == [tmp_path / "orig" / "model.safetensors"]
    adapter_dir = adapter(str(tmp_path / "orig"), tmp_path / "adapter")
    assert merge_streaming(str(tmp_path / "orig"), adapter_dir, tmp_path / "merged", torch.float32) is None
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == ["model.safetensors"]
    assert_same_weights(tmp_path / "merged", peft_merged(str(tmp_path / "orig"), adapter_dir, torch.float32))


def test_what_streaming_cannot_reproduce_is_named_and_peft_merges_it(original, tmp_path):
    dora = adapter(original, tmp_path / "dora", use_dora=True)
    why, _, _ = lora_deltas(dora)
    assert why == "the adapter sets use_dora"
    assert merge_streaming(original, dora, tmp_path / "nothing", torch.float32) == why
    assert not (tmp_path / "nothing").exists()

    # a checkpoint of PyTorch .bin files only
    bin_dir = tmp_path / "bin-original"
    model = LlamaForCausalLM.from_pretrained(original)
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    plain = adapter(original, tmp_path / "plain")
    assert merge_streaming(str(bin_dir), plain, tmp_path / "nothing", torch.float32) == \
        "the original has no safetensors checkpoint"

    # the plugin's merge falls back to peft with the whole model: same result as peft's own merge
    for source, adapter_dir in ((original, dora), (str(bin_dir), plain)):
        target = tmp_path / f"fallback-{len(list(tmp_path.iterdir()))}"
        merge(LoramState(plan=None, original=source, dtype=torch.float32), adapter_dir, target)
        assert_same_weights(target, peft_merged(source, adapter_dir, torch.float32))


def test_adapter_names_the_checkpoint_lacks_fall_back(original, tmp_path):
    adapter_dir = adapter(original, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    renamed = {k.replace("model.layers", "model.decoder.layers"): v for k, v in load_file(str(weights)).items()}
    save_file(renamed, str(weights))
    why = merge_streaming(original, adapter_dir, tmp_path / "merged", torch.float32)
    assert why.startswith("the checkpoint has no tensor model.decoder.layers.0.")


def test_the_cli_merges_a_saved_adapter(original, tmp_path):
    adapter_dir = adapter(original, tmp_path / "adapter")  # its config names the original
    run = subprocess.run([sys.executable, "-m", "trainer_plugins", "loram-merge", adapter_dir, "--dtype", "bfloat16"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert_same_weights(Path(adapter_dir) / "merged", peft_merged(original, adapter_dir, torch.bfloat16))
    assert "merged" in run.stdout and "bfloat16" in run.stdout
    run = subprocess.run([sys.executable, "-m", "trainer_plugins", "loram-merge", adapter_dir, "--original", original,
                          "--out", str(tmp_path / "as-stored")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # the original's dtype (float32) by default
    assert_same_weights(tmp_path / "as-stored", peft_merged(original, adapter_dir, torch.float32))
    run = subprocess.run([sys.executable, "-m", "trainer_plugins", "loram-merge", str(tmp_path), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode == 2 and "holds no saved adapter" in run.stderr and not (tmp_path / "x").exists()
