"""storage.py: the original pruned while it is read from its checkpoint (magnitude, random or first-order scores,
an index file) equals the whole original loaded and then pruned, bit for bit, without from_pretrained; Wanda,
and checkpoints that are not safetensors, load the whole original."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen2Config

from trainer_plugins import PluginTrainingArguments
from trainer_plugins.models import ModelArguments, tiny_llama_config
from trainer_plugins_loram import plugin, storage
from trainer_plugins_loram.pruning import INDEX_FILE, PruningPlan

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=128)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tokenizer_dir):
    """Checkpoints in float32, several shards each, with SmolLM2's tokenizer beside them (first-order scores read
    calibration text): a Llama with an untied head and a Qwen2 (q/k/v biases) with tied embeddings."""
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    out = {}
    for kind, config in (("llama", tiny_llama_config(**SHAPE, vocab_size=vocab, tie_word_embeddings=False)),
                         ("qwen2", Qwen2Config(**SHAPE, vocab_size=vocab, tie_word_embeddings=True))):
        torch.manual_seed(0)
        out[kind] = tmp_path_factory.mktemp(f"original-{kind}")
        AutoModelForCausalLM.from_config(config).save_pretrained(out[kind], max_shard_size="2MB")
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, out[kind])
    return out


def load(original, tmp_path, dtype="float32", four_bit=False, **flags):
    args = PluginTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], seed=3,
                                   **{"loram": "lora", "loram_importance": "magnitude", "loram_keep_first_layers": 1,
                                      "loram_keep_last_layers": 1, "loram_calibration_samples": 6,
                                      "loram_calibration_seq_length": 32, **flags})
    quantised = dict(load_in_4bit=True, bnb_4bit_compute_dtype="float32") if four_bit else {}
    model = plugin.load_model(args, ModelArguments(model_name_or_path=str(original), dtype=dtype, **quantised))
    record = json.loads((tmp_path / "loram.json").read_text())
    return model, PruningPlan.load(tmp_path / INDEX_FILE), record


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and all(torch.equal(ba[n], bb[n]) for n in ba)
    config = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (a, b)]
    assert config[0] == config[1] and a.training == b.training
    for model in (a, b):  # a tied head is the embeddings' tensor, not a copy
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == model.config.tie_word_embeddings


@pytest.mark.parametrize("kind, dtype, flags", [
    ("llama", "float32", {}),
    ("llama", "float32", {"loram_importance": "first_order"}),
    ("qwen2", "float32", {"loram_importance": "first_order", "loram_keep_first_layers": 0}),
    ("llama", "bfloat16", {"loram_ratio": 0.75}),
    ("qwen2", "float32", {"loram_attn_ratio": 0.25}),
    ("llama", "float32", {"loram_importance": "random"}),
    ("llama", "float32", {"loram_pruning": "2:4"}),
    ("qwen2", "float32", {"loram_pruning": "unstructured", "loram_importance": "random"}),
])
def test_pruned_while_read_equals_pruned_after_loading(originals, tmp_path, monkeypatch, kind, dtype, flags):
    with monkeypatch.context() as m:
        m.setattr(storage, "load_pruned_original", lambda *a, **k: None)  # the whole original, then prune
        whole, whole_plan, whole_record = load(originals[kind], tmp_path / "whole", dtype, **flags)

    def no_model(*args, **kwargs):
        raise AssertionError("the original was loaded whole")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_model)
    streamed, plan, record = load(originals[kind], tmp_path / "streamed", dtype, **flags)
    assert_same(streamed, whole)
    assert plan.kind == whole_plan.kind and plan.settings == whole_plan.settings
    for ours, theirs in ((plan.kv_heads, whole_plan.kv_heads), (plan.neurons, whole_plan.neurons),
                         (plan.masks, whole_plan.masks)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert record == whole_record and record["parameters"]["pruned"] < record["parameters"]["original"] or \
        plan.kind != "structured"
    assert streamed.name_or_path == whole.name_or_path == str(originals[kind])


def test_qloram_quantises_each_layer_as_it_is_read(originals, tmp_path, monkeypatch):
    """With load_in_4bit each decoder layer becomes NF4 on the device as soon as its weights are in (the host
    holds one layer, not the pruned model); the result equals pruning and quantising the whole original."""
    pytest.importorskip("bitsandbytes")
    import trainer_plugins.models as models

    with monkeypatch.context() as m:
        m.setattr(storage, "load_pruned_original", lambda *a, **k: None)
        whole, _, whole_record = load(originals["llama"], tmp_path / "whole", four_bit=True)
    calls = []
    real = models.quantize_linears_4bit
    monkeypatch.setattr(models, "quantize_linears_4bit",
                        lambda model, config, device, inside=None: calls.append(inside) or real(model, config, device,
                                                                                               inside=inside))
    streamed, _, record = load(originals["llama"], tmp_path / "streamed", four_bit=True)
    assert calls == [*streamed.model.layers, None]  # each layer as it is read, then the rest of the model
    assert type(streamed.model.layers[2].mlp.up_proj).__name__ == "Linear4bit" and streamed.is_loaded_in_4bit
    assert_same(streamed, whole)
    assert record == whole_record and streamed._loram.record["4bit"] == whole._loram.record["4bit"] == "nf4"


def test_an_index_file_prunes_while_reading_even_with_first_order_importance(originals, tmp_path, monkeypatch):
    first, plan, _ = load(originals["llama"], tmp_path / "first", loram_importance="random", loram_ratio=0.5)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded whole"))
    again, again_plan, _ = load(originals["llama"], tmp_path / "again", loram_importance="first_order",
                                loram_indices=str(tmp_path / "first" / INDEX_FILE))
    assert_same(again, first)
    assert all(torch.equal(again_plan.neurons[i], plan.neurons[i]) for i in plan.neurons)


def test_wanda_loads_the_whole_original(originals, tmp_path, monkeypatch):
    """Wanda's unstructured masks keep every shape: nothing to save by reading layer by layer."""
    monkeypatch.setattr(storage, "load_pruned_original", lambda *a, **k: pytest.fail("pruned while reading"))
    _, plan, _ = load(originals["llama"], tmp_path / "wanda", loram_pruning="2:4", loram_importance="wanda")
    assert plan.kind == "2:4" and plan.masks


def test_a_checkpoint_without_safetensors_is_loaded_whole(originals, tmp_path):
    bin_dir = tmp_path / "bin"
    model = AutoModelForCausalLM.from_pretrained(str(originals["llama"]))
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    assert storage.Checkpoint.of(str(bin_dir)) is None
    loaded, plan, record = load(bin_dir, tmp_path / "out")
    assert record["parameters"]["pruned"] < record["parameters"]["original"]
    streamed, _, _ = load(originals["llama"], tmp_path / "streamed")
    assert_same(loaded, streamed)


def test_a_hub_name_is_read_from_the_hub_cache(originals, tmp_path, monkeypatch):
    """A hub name (offline, from the local hub cache, where from_pretrained finds it) is pruned while read too,
    with the same result as the local directory it was copied from."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(originals["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    checkpoint = storage.Checkpoint.of("tiny-org/tiny-llama")
    assert len(checkpoint.files) > 1 and all(commit in str(f) for f in checkpoint.files)
    local, _, local_record = load(originals["llama"], tmp_path / "local", loram_importance="first_order")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded whole"))
    hub, _, hub_record = load("tiny-org/tiny-llama", tmp_path / "from-hub", loram_importance="first_order")
    assert_same(hub, local)
    assert hub.name_or_path == hub_record.pop("original_model") == "tiny-org/tiny-llama"  # what the merge reads
    assert hub_record == {k: v for k, v in local_record.items() if k != "original_model"}
