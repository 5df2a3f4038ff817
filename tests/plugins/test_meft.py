"""MEFT for Llama-family decoders: the start is the pretrained model (up to gamma), the reversible backward
gives plain autograd's gradients, activations are not stored, training resumes exactly, outputs reload."""


import pytest
import torch
from transformers import LlamaForCausalLM

from trainer_plugins import PluginConfigError, PluginTrainer, PluginTrainingArguments
from trainer_plugins_meft import plugin as meft_plugin
from helpers import counting_dataset, losses, perturb_trainable, saved_tensor_bytes, tiny_llama

IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              save_strategy="no", disable_tqdm=True)


def args(**kw):
    return PluginTrainingArguments(output_dir="unused", meft="meft1", **{**COMMON, **kw})


def prepared(a, layers=4, perturb=True):
    """A MEFT model; with ``perturb`` the LoRA B and adapter up-projections are non-zero, so every
    trainable parameter gets a gradient and the two streams really differ."""
    model = meft_plugin.prepare_model(tiny_llama(layers), a)
    return perturb_trainable(model) if perturb else model.train()


def gradients(model):
    model.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_error(got, want):
    return max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want)


@pytest.mark.parametrize("gamma, stream, segment, tol", [
    (0.125, "float64", 0, 1e-9),  # the defaults' arithmetic: a power-of-two gamma divides exactly
    (0.5, "float32", 2, 1e-5),
    (0.1, "float64", 2, 1e-5),
])
def test_reversible_backward_equals_plain_autograd(gamma, stream, segment, tol):
    a = args(meft_gamma=gamma, meft_stream_dtype=stream, meft_segment_layers=segment)
    plain = gradients(prepared(args(meft_gamma=gamma, meft_stream_dtype=stream, meft_reversible_layers=0)))
    reversible = gradients(prepared(a))
    assert len(plain) == 4 * (7 * 2 + 2)  # LoRA A, B on 7 linears + the G adapter's two matrices, 4 layers
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert rel_error(reversible, plain) < tol


def autocast_gradients(model, dtype):
    """As the Trainer runs bf16/fp16 training: the forward under autocast, backward after leaving it."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("segment, tol", [(4, 0.0), (6, 1e-3)])
def test_reversible_backward_under_autocast_equals_plain_autograd(dtype, segment, tol):
    """The recompute re-enters the forward's autocast state (the Trainer's backward runs outside it): F and G in
    float32 instead of the forward's 16-bit compute rebuilt other inputs, and 8 divisions by gamma made the
    gradients noise (seen: 200x off). float64 streams and a power-of-two gamma over the default 4 layers: bit for
    bit; over 6 (fp16's longest under validation's limit) float64 rounding grown by 32^6 flips a few 16-bit
    roundings (validation allows 1 in 1000 elements; seen: 5e-5)."""
    plain = autocast_gradients(prepared(args(meft_reversible_layers=0), layers=8), dtype)
    reversible = autocast_gradients(prepared(args(meft_segment_layers=segment), layers=8), dtype)
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert rel_error(reversible, plain) <= tol


def test_bf16_training_through_the_trainer_equals_plain_autograd():
    """bf16=True on a CPU (use_cpu) runs the Trainer's forward under CPU autocast, as on a GPU: the reversible
    run trains exactly as the same couplings under plain autograd."""
    runs = []
    for kw in ({"meft_reversible_layers": 0}, {}):
        trainer = PluginTrainer(model=tiny_llama(4), train_dataset=counting_dataset(),
                                args=args(bf16=True, max_steps=4, learning_rate=1e-2, **kw))
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.train()
        runs.append((losses(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                                       if p.requires_grad}))
    (plain_losses, plain), (ours_losses, ours) = runs
    assert ours_losses == plain_losses
    assert all(torch.equal(ours[n], plain[n]) for n in plain)


@pytest.mark.parametrize("half, kw", [
    ("bf16", {"meft_stream_dtype": "float32", "meft_segment_layers": 2}),  # seen: 0.9% gradient error
    ("fp16", {"meft_stream_dtype": "float32", "meft_segment_layers": 1}),  # seen: 0.3%
    ("bf16", {"meft_segment_layers": 0}),  # float64, all 8 layers in a row; seen: 0.4%
])
def test_16bit_compute_refuses_reconstructions_that_flip_16bit_roundings(half, kw):
    """A rebuilt input off by e rounds to another 16-bit value about e / u16 of the time, an error the divisions
    below multiply: refused up front when that passes 1 in 1000, with the longest segment that works."""
    from trainer_plugins_meft.plugin import max_segment_under_autocast

    with pytest.raises(PluginConfigError, match=f"in {half} F and G compute in 16 bits.*meft_segment_layers <= "
                                                f"{max_segment_under_autocast(0.03125, 1, half)}"):
        PluginTrainer(model=tiny_llama(8), args=args(**{half: True}, **kw))


def test_a_recompute_that_differs_from_the_forward_stops_training(monkeypatch):
    """The guard: with the recompute outside the forward's autocast state (the bug fixed above), the first
    backward finds the rebuilt inputs far from the forward's and stops, saying why; it checks the first forward
    only by default, every one with -1, none with 0."""
    from trainer_plugins_meft import reversible

    monkeypatch.setattr(reversible, "_autocast_state", lambda device: [])
    with pytest.raises(reversible.ReconstructionDrift, match="rebuilt a segment's inputs .*meft_stream_dtype"):
        autocast_gradients(prepared(args(), layers=8), torch.bfloat16)
    unchecked = prepared(args(meft_check_reconstruction=0), layers=8)
    autocast_gradients(unchecked, torch.bfloat16)  # noise, unchecked: what the guard is for
    model = prepared(args(), layers=8)
    gradients(model)  # no autocast: the recompute equals the forward
    autocast_gradients(model, torch.bfloat16)  # the second forward is not checked by default


def test_guard_checks_its_steps_only_and_keeps_nothing_afterwards():
    model = prepared(args(meft_check_reconstruction=2, meft_segment_layers=2), layers=8)
    settings = model.base_model.model.model.layers.settings
    for _ in range(3):
        gradients(model)
    assert settings.check.forwards == 0 and settings.check.worst < 1e-12  # two checked; float64 rounding only
    assert saved_tensor_bytes(lambda: model(IDS, labels=IDS)) == saved_tensor_bytes(
        lambda: prepared(args(meft_check_reconstruction=0, meft_segment_layers=2), layers=8)(IDS, labels=IDS))


def test_partial_reversibility_and_fp32_error_growth():
    """fp32 streams at gamma 0.1: the error grows with the number of layers reconstructed in a row;
    keeping the top layers plain (or storing segments) bounds it. (The reconstruction check, which stops the
    worst of these, is off: this measures what it guards against.)"""
    def error(**kw):
        plain = gradients(prepared(args(meft_stream_dtype="float32", meft_reversible_layers=0), layers=6))
        got = gradients(prepared(args(meft_stream_dtype="float32", meft_check_reconstruction=0, **kw), layers=6))
        return rel_error(got, plain)

    full = error(meft_segment_layers=0)
    bottom2 = error(meft_segment_layers=0, meft_reversible_layers=2)
    segments2 = error(meft_segment_layers=2)
    assert bottom2 < full and segments2 < full
    assert segments2 < 1e-4


def test_only_outputs_are_stored_not_activations():
    def saved_bytes(model):
        return saved_tensor_bytes(lambda: model(IDS, labels=IDS))

    def per_4_layers(**kw):  # what 4 more layers add to the saved tensors (the head's logits etc. cancel)
        return saved_bytes(prepared(args(**kw), layers=8)) - saved_bytes(prepared(args(**kw), layers=4))

    plain = per_4_layers(meft_reversible_layers=0)
    one_segment = per_4_layers(meft_segment_layers=0)
    segments_of_4 = per_4_layers()  # the default: the two fp64 streams stored every 4 layers
    assert plain > 0
    assert one_segment <= 0.01 * plain
    stream_pair = 2 * IDS.numel() * 64 * 8  # two fp64 streams of width 64
    assert segments_of_4 == stream_pair and segments_of_4 <= 0.2 * plain


@pytest.mark.parametrize("gamma", [0.1, 0.01, 1e-4])
def test_start_is_the_pretrained_model_up_to_gamma(gamma):
    original = tiny_llama(4).eval()
    with torch.no_grad():
        want = original(IDS).logits
        got = prepared(args(meft_gamma=gamma), perturb=False).eval()(IDS).logits
    # each layer adds gamma x the previous layer's update: the deviation is linear in gamma
    assert float((got - want).abs().max()) <= gamma * float(want.abs().max())


def test_backbone_frozen_and_no_gradient_reaches_it():
    model = prepared(args())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "meft_adapter" in n for n in trainable)
    gradients(model)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_cached_generation_equals_uncached():
    model = prepared(args()).eval()
    with torch.no_grad():
        cached = model.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_trains_resumes_exactly_and_reloads(tmp_path):
    token_dataset = counting_dataset()
    kw = dict(max_steps=8, save_strategy="steps", save_steps=4, meft_lora_dropout=0.1, learning_rate=3e-2,
              **{k: v for k, v in COMMON.items() if k != "save_strategy"})
    full = PluginTrainer(model=tiny_llama(2), train_dataset=token_dataset,
                         args=PluginTrainingArguments(output_dir=str(tmp_path / "a"), meft="meft1", **kw))
    full.train()
    PluginTrainer(model=tiny_llama(2), train_dataset=token_dataset,
                  args=PluginTrainingArguments(output_dir=str(tmp_path / "b"), meft="meft1", **kw)).train()
    resumed = PluginTrainer(model=tiny_llama(2), train_dataset=token_dataset,
                            args=PluginTrainingArguments(output_dir=str(tmp_path / "b"), meft="meft1", **kw))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6) and len(losses(full)) == 8
    # the adapters learned through the reversible backward (LoRA B and the G up-projections start at 0)
    trained = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    assert all(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n or ".up." in n)

    full.save_model()  # final save: peft adapter (LoRA + G adapters) + meft_config.json
    out = tmp_path / "a"
    assert (out / "adapter_model.safetensors").is_file() and (out / "meft_config.json").is_file()
    reloaded = meft_plugin.load(tiny_llama(2), str(out)).eval()
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, full.model(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    ({"meft": "meft3"}, "meft=meft3 is defined for post-norm encoders"),
    ({"meft_gamma": 0.0}, "meft_gamma must be in"),
    ({"meft_stream_dtype": "float16x"}, "meft_stream_dtype must be one of"),
    ({"gradient_checkpointing": True}, "activation \\(gradient\\) checkpointing"),
    ({"apollo": "mini"}, "conflicts|MEFT trains adapters"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "does not support DeepSpeed ZeRO-3"),
    ({"meft_gamma": 0.001, "meft_stream_dtype": "float32", "meft_segment_layers": 0}, "rounding grows to ~6e-02"),
])
def test_bad_input(tmp_path, kw, message):
    a = PluginTrainingArguments(output_dir=str(tmp_path), **{"meft": "meft1", **kw})
    with pytest.raises(PluginConfigError, match=message):
        PluginTrainer(model=tiny_llama(2), args=a)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(PluginConfigError, match="supports the pre-norm decoders .* post-norm encoders"):
        PluginTrainer(model=model, args=PluginTrainingArguments(output_dir=str(tmp_path), meft="meft1"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2])
def test_two_processes_equal_one_process(stage, tmp_path, request):
    """2 ranks x batch 2 = 1 process x 2 micro-batches of 2, bit for bit (helpers.as_one_process): the coupling's
    backward hands its gradients to autograd, so DDP's and ZeRO-2's gradient hooks reduce them like any other."""
    from helpers import two_processes_equal_one

    flags = dict(COMMON, meft="meft1", max_steps=8, learning_rate=3e-2)
    dist, plain = two_processes_equal_one(tmp_path, stage, flags, "adapter_model.safetensors", request)
    assert dist == pytest.approx(plain, rel=1e-6)  # the same steps; only the logged mean's rounding may differ


def four_bit_llama(model_dir):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float32)


def test_4bit_base_reconstructs_exactly(tiny_model_dir):
    """Re-running a layer dequantises the same NF4 weights: the reversible backward equals plain autograd
    on the same 4-bit model bit for bit."""
    pytest.importorskip("bitsandbytes")

    def model(**kw):
        return perturb_trainable(meft_plugin.prepare_model(four_bit_llama(tiny_model_dir), args(**kw)))

    m = model()
    assert any(type(mod).__name__ == "Linear4bit" for mod in m.modules())
    ids = IDS % m.config.vocab_size
    plain, reversible = model(meft_reversible_layers=0), m

    def grads(mm):
        mm(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in mm.named_parameters() if p.grad is not None}

    want, got = grads(plain), grads(reversible)
    assert want and rel_error(got, want) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ddp", 2])
def test_4bit_base_with_two_processes_equals_one_process(tiny_model_dir, tmp_path, stage, request):
    """MEFT on an NF4 base through the CLI with 2 processes (DDP or ZeRO-2): each rank quantises its own frozen
    base; the losses and the saved adapter equal the one-process run's."""
    pytest.importorskip("bitsandbytes")
    from helpers import four_bit_two_processes_equal_one

    saved, _ = four_bit_two_processes_equal_one(request, tmp_path, tiny_model_dir, stage, "adapter_model.safetensors",
                                                meft="meft1", learning_rate=1e-2)
    assert saved


def test_recipe_with_a_4bit_base_trains_and_reloads(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from trainer_plugins.recipes import load_recipe, run_recipe

    recipe = {
        "model": {"model_name_or_path": tiny_model_dir, "dtype": "float32", "load_in_4bit": True},
        "data": {"dataset": "stdlib", "max_seq_length": 64, "max_train_samples": 16, "max_eval_samples": 4},
        "train": {"output_dir": str(tmp_path), "max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1,
                  "report_to": [], "use_cpu": True, "save_strategy": "no", "learning_rate": 1e-2, "meft": "meft1"},
    }
    result = run_recipe(load_recipe(recipe))
    assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())  # LoRA B starts at 0: trained
    reloaded = meft_plugin.load(four_bit_llama(tiny_model_dir), str(tmp_path)).eval()
    untrained = meft_plugin.prepare_model(four_bit_llama(tiny_model_dir), args()).eval()
    ids = IDS % reloaded.config.vocab_size
    with torch.no_grad():
        got, start = reloaded(ids).logits, untrained(ids).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, start)
