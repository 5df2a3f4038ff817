"""`trainer-plugins estimate`: the predicted peak of a training step, from a meta-device run, against the
allocator's real peak on this CPU for the same recipe (weights loaded, same prepare, same optimizer)."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, require_versions_measured, save_tiny_llama, shared_torchrun
from trainer_plugins.cli import main as cli
from trainer_plugins.errors import ConfigError
from trainer_plugins.estimate import GiB, StepMemory, distribute, estimate_recipe, measure_recipe
from trainer_plugins.recipes import load_recipe

# widths are multiples of 64 (bitsandbytes' CPU kernels); the attention, MLP and head sizes are far apart
SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=2048)
LORAM = {"loram": "lora", "loram_importance": "magnitude", "loram_ratio": 0.5, "loram_keep_first_layers": 1,
         "loram_keep_last_layers": 1}
CASES = {
    "full fine-tuning, fused AdamW": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "gradient accumulation": {"gradient_accumulation_steps": 4},
    "apollo mini": {"apollo": "mini"},
    "apollo layer-wise": {"apollo": "mini", "apollo_layerwise": True, "max_grad_norm": 0},
    "sparse": {"sparse": "magnitude"},
    "loram, LoRA dropout": {**LORAM, "loram_lora_dropout": 0.05},
    "qloram": {**LORAM, "load_in_4bit": True},
    "lst": {"lst": True},
    "lst, 4-bit backbone": {"lst": True, "load_in_4bit": True},
    "meft": {"meft": "meft1"},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), **SHAPE)


def recipe(model_dir, tmp_path, **train) -> dict:
    return {"model_name_or_path": str(model_dir), "dtype": "float32", "dataset": "stdlib", "max_seq_length": 128,
            "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "max_steps": 2, "report_to": [],
            **train}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_is_within_5_percent_of_the_allocator_peak(model_dir, tmp_path, case):
    r = recipe(model_dir, tmp_path, **CASES[case])
    predicted = estimate_recipe(load_recipe(r), device="cpu")  # this CPU's attention kernels
    measured = measure_recipe(load_recipe(r))
    assert predicted["single_process"]["weights"] == pytest.approx(measured["weights"], rel=0.02)
    # seen: 0.0-2.6% above (the CPU flash-attention kernel keeps slightly less than the fused-kernel model)
    assert predicted["per_gpu"]["peak"] == pytest.approx(measured["peak"], rel=0.05)


@pytest.mark.latest_only  # the cache's unit test below runs on both suites
def test_cached_meta_outputs_give_the_same_estimate(model_dir, tmp_path, monkeypatch):
    """The tracker rebuilds repeated operators' outputs from a cache instead of running their meta kernels: every
    number of the estimate equals the uncached run's (4-bit custom ops, autocast, checkpointing, each method)."""
    from trainer_plugins.estimate import MetaOutputCache

    cases = {**{case: (flags, None) for case, flags in CASES.items()},
             "autocast, checkpointing": ({"gradient_checkpointing": True}, "bf16")}
    cached, hits = {}, []
    real_call = MetaOutputCache.call

    def counted(self, func, args, kwargs):
        out = real_call(self, func, args, kwargs)
        hits.append(self.hits)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(MetaOutputCache, "call", counted)
        for case, (flags, autocast) in cases.items():
            cached[case] = estimate_recipe(load_recipe(recipe(model_dir, tmp_path, **flags)), device="cpu",
                                           mixed_precision=autocast)
    assert max(hits) > 100  # four identical layers: most operators repeat
    monkeypatch.setattr(MetaOutputCache, "call", lambda self, func, args, kwargs: func(*args, **kwargs))
    for case, (flags, autocast) in cases.items():
        uncached = estimate_recipe(load_recipe(recipe(model_dir, tmp_path, **flags)), device="cpu",
                                   mixed_precision=autocast)
        assert uncached == cached[case], case


def test_meta_output_cache_keys_layouts_and_skips_what_it_cannot_rebuild():
    from trainer_plugins.estimate import MetaOutputCache

    cache = MetaOutputCache()
    x = torch.empty(4, 6, device="meta")
    clone = torch.ops.aten.clone.default
    for source in (x, x.t(), x, x.t()):  # clone keeps the input's strides: they are part of the key
        out = cache.call(clone, (source,), {})
        assert out.stride() == source.stride() and out.untyped_storage() is not source.untyped_storage()
    assert (cache.hits, cache.misses) == (2, 2)
    assert cache.call(torch.ops.aten.add.Tensor, (x, 1), {}).shape == (4, 6)
    assert cache.call(torch.ops.aten.add.Tensor, (x, 1.0), {}) is not None and cache.misses == 4  # 1 and 1.0: two keys
    for func, args in [(torch.ops.aten.add_.Tensor, (x, 1)),  # mutates its input
                       (torch.ops.aten.view.default, (x, [24])),  # aliases it
                       (torch.ops.aten.clone.default, (torch.empty(3),))]:  # a CPU tensor: its kernel runs
        before = (cache.hits, cache.misses)
        cache.call(func, args, {})
        cache.call(func, args, {})
        assert (cache.hits, cache.misses) == before, func


AUTOCAST_CASES = {  # trained as with bf16: true; float32 weights unless dtype says otherwise; whether the peak moves
    "full fine-tuning, checkpointing": ({"gradient_checkpointing": True}, True),
    "lst, bfloat16 backbone": ({"lst": True, "dtype": "bfloat16"}, True),
    "meft": ({"meft": "meft1"}, True),  # the recompute in backward runs under the forward's autocast, 16-bit copies
    # included (before 2026-12-08 it ran in float32: wrong gradients, and a peak without them)
}


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_estimate_replays_autocast(model_dir, tmp_path, case):
    """bf16 autocast keeps 16-bit copies of matmul inputs where weights are float32 (a side network, a float32
    model): the estimate replays autocast's casts on meta, checkpointed recomputation included."""
    train, moves = AUTOCAST_CASES[case]
    r = recipe(model_dir, tmp_path, **train)
    predicted = estimate_recipe(load_recipe(r), mixed_precision="bf16", device="cpu")
    without = estimate_recipe(load_recipe(r), mixed_precision="no", device="cpu")
    measured = measure_recipe(load_recipe(r), autocast=torch.bfloat16)
    assert predicted["per_gpu"]["peak"] == pytest.approx(measured["peak"], rel=0.03)  # seen: within 1.5%
    assert (predicted["per_gpu"]["peak"] != without["per_gpu"]["peak"]) == moves


def test_components_bound_the_peak_and_follow_the_method(model_dir, tmp_path):
    full = estimate_recipe(load_recipe(recipe(model_dir, tmp_path)))["per_gpu"]
    lst = estimate_recipe(load_recipe(recipe(model_dir, tmp_path, lst=True)))["per_gpu"]
    # the peak holds weights and optimizer state, and activations or gradients (backward trades one for the other)
    resting = full["weights"] + full["optimizer_state"]
    assert resting + max(full["gradients"], full["activations"]) < full["peak"]
    assert full["peak"] < resting + full["gradients"] + full["activations"] + 0.5 * full["activations"]
    # AdamW: two float32 moments per weight; gradients: one per weight
    assert full["optimizer_state"] == pytest.approx(2 * full["weights"], rel=0.01)
    assert full["gradients"] == pytest.approx(full["weights"], rel=0.01)
    # LST: the frozen backbone keeps no activations for backward and gets no gradients
    assert lst["activations"] < 0.6 * full["activations"] and lst["gradients"] < 0.05 * full["gradients"]


def test_a_config_is_enough(tmp_path):
    """No weights file: the estimate needs the model's config.json only (a 1B Llama shape here)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000).save_pretrained(tmp_path / "1b")
    r = recipe(tmp_path / "1b", tmp_path, dtype="bfloat16", per_device_train_batch_size=1, max_seq_length=512)
    report = estimate_recipe(load_recipe(r))
    assert report["parameters"] == 1_100_048_384 and report["dtype"] == "bfloat16"
    rank = report["per_gpu"]
    assert rank["weights"] == 2 * report["parameters"] + 256  # bf16 weights + the float32 rotary frequencies
    assert rank["optimizer_state"] == pytest.approx(4 * report["parameters"], rel=1e-6)  # two bf16 moments (+ steps)
    assert 8 * GiB < rank["peak"] < 12 * GiB


def test_zero_and_ddp_split_per_rank(model_dir, tmp_path, request):
    request.getfixturevalue("deepspeed_env")
    report = estimate_recipe(load_recipe(recipe(model_dir, tmp_path)))
    single, trainable = report["single_process"], 4 * report["trainable_parameters"]  # float32 bytes
    zero2, zero3 = (estimate_recipe(load_recipe(recipe(model_dir, tmp_path, deepspeed=str(
        ROOT / f"recipes/deepspeed/zero{stage}.json"))), world_size=4)["per_gpu"] for stage in (2, 3))
    assert zero2["optimizer_state"] == pytest.approx(single["optimizer_state"] / 4, rel=1e-6)
    assert zero2["master_weights"] == 0 and zero2["weights"] == single["weights"]  # float32: no master copy
    assert zero2["gradients"] == trainable // 4
    assert zero2["reduce_buckets"] == 256 * 256 * 4 * 2  # "auto" = hidden^2 elements, two with overlap_comm
    assert zero3["master_weights"] == trainable // 4  # stage 3 keeps a float32 flat partition of its own
    assert zero3["weights"] < single["weights"] // 3 and zero3["peak"] < single["peak"]
    # DDP: the reducer's buckets are a second copy of the gradients
    memory = StepMemory(weights=2_000, trainable=1_000, parameters=1_000, gradients=2_000, optimizer_state=4_000,
                        activations=10_000, peak=18_000, peak_phase="backward", phases={})
    ddp = distribute(memory, stage=None, world=2)
    assert ddp["ddp_buckets"] == 2_000 and ddp["peak"] == 20_000


def test_cli_estimate_and_dry_run(model_dir, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, tmp_path, apollo="mini")))
    assert cli(["estimate", str(path), "--json", "--per_device_train_batch_size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["micro_batch"] == [2, 128] and report["per_gpu"]["peak"] > report["per_gpu"]["weights"] > 0
    assert cli(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "peak per GPU" in out and "optimizer state" in out
    # --measure: the same recipe run for real here (weights loaded), next to the estimate
    assert cli(["estimate", str(path), "--json", "--measure"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["measured"]["device"] == "cpu" and 0.95 < checked["estimate_vs_measured"] < 1.05
    # a GPU recipe estimated on a CPU: its bf16 autocast is simulated (16-bit copies of matmul inputs)
    assert cli(["estimate", str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    path.write_text(yaml.safe_dump(recipe(model_dir, tmp_path, bf16=True)))
    assert cli(["estimate", str(path), "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["autocast"] == "bfloat16" and plain["autocast"] is None
    assert mixed["per_gpu"]["activations"] != plain["per_gpu"]["activations"]
    assert cli(["estimate", str(path)]) == 0
    assert "in float32 (bfloat16 autocast)" in capsys.readouterr().out


def test_measure_refuses_deepspeed(model_dir, tmp_path, capsys, request):
    import yaml

    request.getfixturevalue("deepspeed_env")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, tmp_path, deepspeed=str(ROOT / "recipes/deepspeed/zero2.json"))))
    assert cli(["estimate", str(path), "--measure"]) == 2
    assert "--measure runs one process without DeepSpeed" in capsys.readouterr().err


def test_estimate_needs_the_config(model_dir, tmp_path):
    loaded = load_recipe(recipe(model_dir, tmp_path), load_config=False)
    with pytest.raises(ConfigError, match="needs the model's config"):
        estimate_recipe(loaded)


ZERO_CASES = {
    "ZeRO-2": (2, {}),
    "ZeRO-2, apollo mini": (2, {"apollo": "mini"}),
    "ZeRO-3": (3, {}),
    "ZeRO-3, lst (no-grad backbone)": (3, {"lst": True}),
    "ZeRO-3, loram (frozen base)": (3, LORAM),
    "ZeRO-3, qloram (partitioned 4-bit base)": (3, {**LORAM, "load_in_4bit": True}),
    "ZeRO-3, lst 4-bit backbone": (3, {"lst": True, "load_in_4bit": True}),
    # stage 2 keeps a second partition-sized buffer while accumulating (stage 3 does not: seen 1.003)
    "ZeRO-2, gradient accumulation": (2, {"gradient_accumulation_steps": 2}),
}


@pytest.mark.latest_only  # DeepSpeed's partitioning and the estimate's arithmetic; one-process estimates run on both
@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_per_gpu_estimate_under_zero_with_two_processes(case, tokenizer_dir, request):
    """A rank of a real 2-process DeepSpeed run (gloo, CPU): what it holds at the peak of a steady-state step
    (tests/host/estimate_worker.py; all cases in one launch) against the estimate's simulated rank.
    Seen: 0.97-1.004."""
    import yaml

    def prepare(params, directory):
        stage, flags = ZERO_CASES[params["case"]]
        shape = {k: v for k, v in SHAPE.items() if k != "vocab_size"}  # the SmolLM2 tokenizer's vocabulary
        model = save_tiny_llama(directory / "model", tokenizer_dir, **shape)
        r = recipe(model, directory, deepspeed=str(ROOT / f"recipes/deepspeed/zero{stage}.json"),
                   max_train_samples=64, max_steps=3, save_strategy="no", use_cpu=True, **flags)
        (directory / "recipe.yaml").write_text(yaml.safe_dump(r))
        (directory / "peaks").mkdir()
        return [directory / "recipe.yaml", directory / "peaks"]

    directory = shared_torchrun(request, ROOT / "tests" / "host" / "estimate_worker.py", prepare)
    measured = max(json.loads((directory / "peaks" / f"peak-rank{rank}.json").read_text())["peak"] for rank in (0, 1))
    request.getfixturevalue("deepspeed_env")  # estimate_recipe builds TrainingArguments(deepspeed=...) here
    r = yaml.safe_load((directory / "recipe.yaml").read_text())
    predicted = estimate_recipe(load_recipe(r), world_size=2, device="cpu")["per_gpu"]["peak"]
    assert predicted == pytest.approx(measured, rel=0.05)


def test_float32_grouped_query_attention_on_cuda_is_the_math_kernel():
    """torch's CUDA dispatcher has no fused kernel for float32 GQA before torch 2.14 (flash: 16-bit only; the
    memory-efficient kernel: no GQA), so SDPA's math kernel keeps the seq x seq scores. The estimate follows
    it; the memory it predicts for that kernel is checked against this CPU forced onto the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainer_plugins import bench, estimate
    from trainer_plugins.estimate import cuda_attention_is_math, language_model_batch, measure_training, \
        simulate_training

    q, kv = torch.empty(1, 8, 4, 64, device="meta"), torch.empty(1, 2, 4, 64, device="meta")
    assert cuda_attention_is_math(q, kv) == (not estimate._EFFICIENT_ATTENTION_TAKES_GQA)
    assert not cuda_attention_is_math(q.bfloat16(), kv.bfloat16())  # flash takes 16-bit GQA
    assert not cuda_attention_is_math(q, torch.empty(1, 8, 4, 64, device="meta"))  # no GQA: memory-efficient
    shape = {**SHAPE, "batch": 4, "seq": 256}

    def predicted(device, dtype=torch.float32):
        model = bench.build_model(shape, "meta", dtype)
        optimizer = bench.adamw_over_trainable(model, 1e-4)
        return simulate_training(model, optimizer, language_model_batch(2048, 4, 256), device=device).peak

    scores = 4 * 8 * 256 * 256 * 4  # one layer's float32 attention scores
    if not estimate._EFFICIENT_ATTENTION_TAKES_GQA:
        assert predicted("cuda") > predicted("cpu") + 4 * scores  # four layers keep theirs for backward
    assert predicted("cuda", torch.bfloat16) == predicted("cpu", torch.bfloat16)
    torch.manual_seed(0)
    model = bench.build_model(shape, "cpu", torch.float32)
    with sdpa_kernel(SDPBackend.MATH):
        measured = measure_training(model, bench.adamw_over_trainable(model, 1e-4),
                                    language_model_batch(2048, 4, 256, "cpu"))["peak"]
    with estimate.efficient_attention_takes_gqa(False):
        assert predicted("cuda") == pytest.approx(measured, rel=0.05)  # seen: 1.000


def _math_attention(device, train=True):
    """SDPA's math kernel on grouped-query heads (8 query, 2 key/value), forward and, with ``train``, backward."""
    q = torch.randn(2, 8, 512, 64, device=device, requires_grad=train)
    k, v = (torch.randn(2, 2, 512, 64, device=device, requires_grad=train) for _ in range(2))
    with torch.set_grad_enabled(train):
        out = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, True, enable_gqa=True)[0]
        if train:
            out.sum().backward()


def _profiled_cpu_peak(function) -> int:
    """The peak of the bytes the CPU allocator holds while ``function`` runs (as measure_training measures)."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        function()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(f"{tmp}/timeline.raw.json", device="cpu")
        _, sizes = json.loads((Path(tmp) / "timeline.raw.json").read_text())
    return max(sum(s) for s in sizes)


@pytest.mark.parametrize("train", [True, False], ids=["forward and backward", "no-grad forward"])
def test_math_attention_counts_the_temporaries_inside_its_kernels(train):
    """A dispatch mode sees an operator's outputs, not what its kernel allocates and frees inside. SDPA's math
    kernel has two such places: its softmax (_safe_softmax, torch's composite code on every device: the softmax
    and a scores-sized -inf mask next to the scores; the peak of a no-grad forward, as a reentrant-checkpointed
    layer runs it) is measured here on the CPU; CUDA's softmax backward also computes grad * output into a
    scores-sized temporary (SoftMax.cu; the CPU kernel has none): the peak of peft QLoRA with checkpointing on
    a GQA model (the H200's allocator history, 1B shape: four seq x seq float32 tensors alive in one layer's
    recomputed backward, the estimate had three: 0.87 of the measured peak)."""
    from trainer_plugins.estimate import MemoryTracker, meta_execution

    def predicted(device):
        with meta_execution(device), MemoryTracker() as tracker:
            _math_attention("meta", train)
        return tracker.peak

    scores = 2 * 8 * 512 * 512 * 4  # float32
    measured = _profiled_cpu_peak(lambda: _math_attention("cpu", train))
    assert predicted("cpu") == pytest.approx(measured, rel=0.01)  # seen: 1.000 both
    if not train:  # the softmax's temporaries are the peak: scores, softmax, the boolean mask
        assert predicted("cpu") > 2.25 * scores
    assert predicted("cuda") == predicted("cpu") + (scores if train else 0)


def test_peft_qlora_with_checkpointing_on_a_gqa_shape_matches_the_h200():
    """CUDA facts (one H200, torch 2.11, bf16, benchmarks/results/gpu-h200-2026-11-28): the bench's peft QLoRA
    (prepare_model_for_kbit_training: float32 residual stream, reentrant checkpointing) on the 1B shape, whose
    32 query / 4 key heads in float32 run SDPA's math kernel, peaks at 3.944 GiB; the allocator history of
    one step puts its peak in a recomputed layer's attention backward, 2.908 GiB above the resting weights
    and optimizer state. Seen: 2.908 (1.000) and 3.933 (0.997; CUDA's workspaces are not modelled). What the
    figure depends on besides the GPU: peft (its preparation and LoRA layers; peft 0.22 moves the estimate to
    2.845), transformers (the model's code) and bitsandbytes (the 4-bit layer); the torch here is never the GPU's
    CUDA build, whose kernel choice the estimate takes as a parameter (efficient_attention_takes_gqa)."""
    require_versions_measured(ROOT / "benchmarks" / "results" / "gpu-h200-2026-11-28", "peft", "transformers",
                              "bitsandbytes")
    from trainer_plugins import bench, estimate
    from trainer_plugins.estimate import language_model_batch, simulate_training

    shape = bench.SHAPES["1b"]
    model = bench.prepared_model(bench.BASELINES["qlora-peft"], shape, "meta", torch.bfloat16)
    optimizer = bench.adamw_over_trainable(model, 1e-4)
    with estimate.efficient_attention_takes_gqa(False):  # torch 2.11's CUDA kernels, as measured
        memory = simulate_training(model, optimizer, language_model_batch(shape["vocab_size"], shape["batch"],
                                                                          shape["seq"]))
    assert memory.peak_phase == "backward"
    assert (memory.peak - memory.weights - memory.optimizer_state) / GiB == pytest.approx(2.908, rel=0.02)
    assert memory.peak / GiB == pytest.approx(3.944, rel=0.03)
