"""MEFT1/2/3 on post-norm encoders (BERT, RoBERTa): the start is the pretrained encoder up to gamma, the
reversible backward gives plain autograd's gradients (dropout on), activations are not stored, sequence
classification trains, resumes exactly and reloads."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from trainer_plugins import ConfigError, PluginConfigError, PluginTrainer, PluginTrainingArguments
from trainer_plugins_meft import plugin as meft_plugin
from trainer_plugins_meft.encoder import add_adapters, convert
from trainer_plugins_meft.reversible import MeftSettings
from helpers import losses, perturb_trainable, saved_tensor_bytes

IDS = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 2])
VARIANTS = ["meft1", "meft2", "meft3"]
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              save_strategy="no", disable_tqdm=True)
SHAPE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
             num_labels=3, max_position_embeddings=64)


def classifier(family="bert", layers=4, dropout=0.1):
    torch.manual_seed(0)
    shape = {**SHAPE, "num_hidden_layers": layers, "hidden_dropout_prob": dropout,
             "attention_probs_dropout_prob": dropout}
    if family == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **shape))
    return BertForSequenceClassification(BertConfig(**shape))


def args(variant="meft1", **kw):
    return PluginTrainingArguments(output_dir="unused", meft=variant, **{**COMMON, **kw})


def prepared(a, family="bert", layers=4, perturb=True):
    model = meft_plugin.prepare_model(classifier(family, layers), a)
    return perturb_trainable(model) if perturb else model.train()


def gradients(model):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both runs
    model(IDS, labels=LABELS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_error(got, want):
    # meft1 + chain output: the top layer's G adapter does not reach the output; plain autograd leaves
    # its gradient None, the reversible backward returns zeros
    assert all(float(got[n].abs().max()) == 0 for n in set(got) - set(want))
    return max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want if want[n].norm() > 0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_start_is_the_pretrained_encoder_up_to_gamma(family, variant):
    original = classifier(family, dropout=0.0).eval()
    with torch.no_grad():
        want = original.base_model(IDS).last_hidden_state
    for gamma in (1 / 8, 1 / 32, 1 / 1024):
        model = copy.deepcopy(original)
        add_adapters(model, 8)
        convert(model, MeftSettings(gamma=gamma, variant=variant))
        with torch.no_grad():
            got = model.base_model(IDS).last_hidden_state
        # each layer's input carries gamma x a neighbouring representation (post-norm: similar norms)
        assert float((got - want).norm() / want.norm()) <= 1.5 * gamma


def test_mean_output_is_the_papers_and_does_not_start_at_the_pretrained_encoder():
    original = classifier(dropout=0.0).eval()
    model = copy.deepcopy(original)
    add_adapters(model, 8)
    convert(model, MeftSettings(gamma=1 / 1024, output="mean"))
    with torch.no_grad():
        want, got = original.bert(IDS).last_hidden_state, model.bert(IDS).last_hidden_state
    assert float((got - want).norm() / want.norm()) > 5 / 1024  # (h_N + h_{N-1}) / 2, whatever gamma


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gamma, stream, segment", [
    (0.03125, "float64", 4),  # the defaults: bit for bit
    (0.1, "float64", 4),  # the paper's 0.1
    (0.1, "float64", 2),
])
def test_reversible_backward_equals_plain_autograd(variant, gamma, stream, segment):
    """A power-of-two gamma divides exactly: bit for bit. Otherwise the float64 stream reconstructs each layer's
    input to within its own rounding, but the layers compute in float32: where a reconstructed input rounds to
    the neighbouring float32 of the stored one (which elements do depends on the CPU's kernels), that ulp grows
    by 1/gamma per division, once per layer (meft3: twice), over the segment's layers above its stored input.
    Seen for meft3 with 4-layer segments: 2e-4 (AVX-512), 7e-4 (SSE), 1.5e-2 (AVX2); a wrong gradient is O(1).
    The reconstruction check is off: with AVX2 kernels it stops that last case (rebuilt inputs 5e-3 away), and
    this test measures the error itself."""
    divisions = 2 if variant == "meft3" else 1
    tol = 0.0 if gamma == 0.03125 else torch.finfo(torch.float32).eps * gamma ** -(divisions * (segment - 1))
    kw = dict(meft_gamma=gamma, meft_stream_dtype=stream, meft_segment_layers=segment)
    plain = gradients(prepared(args(variant, meft_reversible_layers=0, **kw), layers=6))
    reversible = gradients(prepared(args(variant, meft_check_reconstruction=0, **kw), layers=6))
    assert any("classifier" in n for n in plain) and any("lora_B" in n for n in plain)
    assert rel_error(reversible, plain) <= tol


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reversible_backward_under_autocast_equals_plain_autograd(variant, dtype):
    """The Trainer's bf16/fp16 forward runs under autocast and its backward outside: the recompute re-enters the
    forward's autocast state (tests/plugins/test_meft.py for decoders), so with the defaults (float64 streams,
    gamma 1/32, segments of 4) the gradients are plain autograd's under the same autocast, bit for bit. Hidden
    dropout included; attention dropout is off: with SDPA's attention dropout under 16-bit autocast the gradients
    differ from plain autograd's by 0.7-4.5% although the forward and the reconstruction are exact (eager
    attention: exact), not yet explained (notes of 2026-12-08)."""
    def autocast_gradients(model):
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks in both runs
        with torch.autocast("cpu", dtype=dtype):
            loss = model(IDS, labels=LABELS).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def model(**kw):
        torch.manual_seed(0)
        shape = {**SHAPE, "num_hidden_layers": 6, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0}
        return perturb_trainable(meft_plugin.prepare_model(BertForSequenceClassification(BertConfig(**shape)),
                                                           args(variant, **kw)))

    plain = autocast_gradients(model(meft_reversible_layers=0))
    reversible = autocast_gradients(model())
    assert rel_error(reversible, plain) == 0.0


def test_fp32_streams_at_the_papers_gamma_lose_meft3_and_segments_bound_it():
    """The paper's setting (lam = beta = 0.1, fp32, one segment) makes meft3's gradients useless after
    6 layers; stored segments of 2 layers bring them back. (The reconstruction check, which stops the first,
    is off: this measures what it guards against.)"""
    def error(**kw):
        plain = gradients(prepared(args("meft3", meft_gamma=0.1, meft_reversible_layers=0), layers=6))
        got = gradients(prepared(args("meft3", meft_gamma=0.1, meft_stream_dtype="float32",
                                      meft_check_reconstruction=0, **kw), layers=6))
        return rel_error(got, plain)

    assert error(meft_segment_layers=0) > 1.0
    assert error(meft_segment_layers=2) < 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_outputs_are_stored_not_activations(variant):
    def saved_bytes(model):
        return saved_tensor_bytes(lambda: model(IDS, labels=LABELS))

    def per_4_layers(**kw):
        return (saved_bytes(prepared(args(variant, **kw), layers=8))
                - saved_bytes(prepared(args(variant, **kw), layers=4)))

    plain = per_4_layers(meft_reversible_layers=0)
    segments_of_4 = per_4_layers()
    assert plain > 0
    assert segments_of_4 == 2 * IDS.numel() * 64 * 8  # one more fp64 stream pair, nothing else
    assert per_4_layers(meft_segment_layers=0) <= 0.01 * plain


def labelled_dataset():
    """Sequences whose label is their first token mod 3: learnable by the classifier through the encoder."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(5, 1000, (64, 16), generator=g)
    return [{"input_ids": row.tolist(), "labels": int(row[0]) % 3} for row in rows]


@pytest.mark.parametrize("family, variant", [("bert", "meft1"), ("roberta", "meft3")])
def test_classifier_trains_resumes_exactly_and_reloads(tmp_path, family, variant):
    data = labelled_dataset()
    kw = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=1e-2, meft=variant, meft_lora_dropout=0.1,
              **{k: v for k, v in COMMON.items() if k != "save_strategy"})

    def trainer(name):
        return PluginTrainer(model=classifier(family, 2), train_dataset=data,
                             args=PluginTrainingArguments(output_dir=str(tmp_path / name), **kw))

    full = trainer("a")
    full.train()
    trainer("b").train()
    resumed = trainer("b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6) and len(losses(full)) == 8
    trained = dict(full.model.named_parameters())
    assert any("classifier" in n and p.requires_grad for n, p in trained.items())  # the new head trains
    assert all(p.abs().max() > 0 for n, p in trained.items() if p.requires_grad and "lora_B" in n)

    full.save_model()
    out = tmp_path / "a"
    assert (out / "adapter_model.safetensors").is_file() and (out / "meft_config.json").is_file()
    reloaded = meft_plugin.load(classifier(family, 2), str(out)).eval()
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, full.model(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_kw, kw, message", [
    ({}, {"meft_output": "middle"}, "'meft_output': must be one of"),
    ({"is_decoder": True}, {}, "this config is a decoder"),
])
def test_bad_input(tmp_path, model_kw, kw, message):
    model = BertForSequenceClassification(BertConfig(**{**SHAPE, "num_hidden_layers": 1, **model_kw}))
    with pytest.raises(ConfigError, match=message):
        PluginTrainer(model=model, args=PluginTrainingArguments(output_dir=str(tmp_path), meft="meft2", **kw))


def test_decoders_refuse_the_encoder_only_options(tmp_path):
    from transformers import LlamaForCausalLM

    from trainer_plugins.models import tiny_llama_config

    with pytest.raises(PluginConfigError, match="meft_output applies to encoders"):
        PluginTrainer(model=LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)),
                      args=PluginTrainingArguments(output_dir=str(tmp_path), meft="meft1", meft_output="mean"))
