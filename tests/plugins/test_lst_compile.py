"""Compiled LST training: with lst_compile the training steps run every side rung and every backbone layer as a
torch.compile graph shared by all layers, with the losses, gradients (side network only, gates included) and
weights of eager training and a fraction of its dispatched ops; the Trainer's own torch_compile (the whole model
as one graph) trains like eager too; bench estimates of compiled cases stay the eager ones."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaForCausalLM

from trainer_plugins import PluginTrainer, PluginTrainingArguments
from trainer_plugins.bench import SHAPES, estimate_case, prepared_model
from trainer_plugins.models import tiny_llama_config
from trainer_plugins_lst import families, load, side_of
from trainer_plugins_lst.bench import METHODS
from trainer_plugins_lst.pruning import SideSettings, build, init_random
from trainer_plugins_lst.side import attach, detach
from helpers import losses, save_tiny_llama

# test_lst.py's shape and batches (4 x 32 tokens): the Trainer test below reuses the graphs the first test compiles
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
IDS = torch.tensor([[(5 * s + 3 * k) % 1000 for k in range(32)] for s in range(4)])
COMMON = dict(per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
              save_strategy="no", disable_tqdm=True, max_steps=4, lst=True, lst_reduction_factor=4)


def cycles():
    return [{"input_ids": [(s + k) % 16 for k in range(32)], "labels": [(s + k) % 16 for k in range(32)]}
            for s in range(16)]


def lst_model(compile: bool, cuda_graphs: bool = False, layer_ids=(0, 1, 2, 3)):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**SHAPE))
    model.requires_grad_(False)
    # merge none and an open gate: every side weight, the gates included, gets a real gradient
    side = build(model, SideSettings(reduction=4, layer_ids=list(layer_ids), merge="none", alpha=0.3))
    torch.manual_seed(1)
    init_random(model, side)
    attach(model, side, families.layers_of(model), compile=compile, cuda_graphs=cuda_graphs)
    return model.train()


def top_level_aten_ops(run) -> int:
    """Operators ``run()`` sends through the dispatcher (on a GPU, each that computes is a kernel launch), not
    counting the ones other operators call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()

    def nested(event):
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        return parent is not None

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def test_compiled_steps_equal_eager_steps_with_far_fewer_ops():
    torch._dynamo.reset()  # count this test's graphs from scratch
    before = dict(counters["stats"])
    models = {mode: lst_model(compile=mode == "compiled") for mode in ("eager", "compiled")}
    optimizers = {mode: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for mode, m in models.items()}
    history = {mode: [] for mode in models}
    for step in range(3):
        grads = {}
        for mode, model in models.items():
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            history[mode].append(loss.item())
            grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
        assert set(grads["compiled"]) == set(grads["eager"]) == {
            n for n, p in models["eager"].named_parameters() if p.requires_grad}
        assert all(n.startswith("lst_side.") for n in grads["compiled"])
        assert "lst_side.steps.3.alpha" in grads["compiled"]  # the gates get gradients too
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads["compiled"][name], grad, rtol=1e-4, atol=1e-6)
    assert history["compiled"] == pytest.approx(history["eager"], rel=1e-6)
    for (name, a), b in zip(models["eager"].named_parameters(), models["compiled"].parameters()):
        # Adam turns the last-bit differences of near-zero gradients into up to ~3e-6 (0.03% of an lr 1e-2 step)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    # one graph for the rungs and one for the backbone layers, shared by all 4 layers: no per-layer recompile
    new_graphs = counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0)
    assert new_graphs == 2 and not counters["graph_break"]

    def forward_backward(model):
        return lambda: model(input_ids=IDS, labels=IDS).loss.backward()

    ops = {mode: top_level_aten_ops(forward_backward(model)) for mode, model in models.items()}
    assert ops["compiled"] < ops["eager"] / 3, ops

    # evaluation and generation run eagerly (with their KV cache), and detach puts the backbone layers back
    model = models["compiled"].eval()
    with torch.no_grad():
        cached = model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert cached.shape == (1, 12)
    detach(model)
    assert not any("forward" in vars(layer) for layer in families.layers_of(model))


def test_with_layer_dropping_compiled_steps_equal_eager_steps():
    """Side blocks on every 2nd layer (lst_layers every:2): the layers without a rung run compiled too, and the
    side stream passes them by."""
    models = {mode: lst_model(compile=mode == "compiled", layer_ids=(1, 3)) for mode in ("eager", "compiled")}
    assert all("forward" in vars(layer) for layer in families.layers_of(models["compiled"]))  # all 4 compiled
    for step in range(2):
        grads = {}
        for mode, model in models.items():
            model(input_ids=IDS, labels=IDS).loss.backward()
            grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
        assert set(grads["compiled"]) == set(grads["eager"]) and "lst_side.steps.1.alpha" in grads["eager"]
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads["compiled"][name], grad, rtol=1e-4, atol=1e-6)


def test_cuda_graph_mode_compiles_for_cuda_graphs_and_accumulates_in_buffers_of_its_own(monkeypatch):
    """lst_cuda_graphs: the rungs and backbone layers compile with mode reduce-overhead (CUDA graph trees on a
    GPU). The graphs' backward outputs live in a pool the next replay reuses, so before a forward that
    backpropagates every side parameter gets a zeroed .grad (views of one buffer) and the backward adds into it:
    gradients accumulated over two micro-batches, and the steps after, equal plain eager training. (torch.compile is
    recorded and skipped here: on a CPU the mode compiles as the default one; test_cuda_graphs_on_a_gpu replays.)"""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    models = {"eager": lst_model(compile=False), "graphs": lst_model(compile=True, cuda_graphs=True)}
    assert modes == ["reduce-overhead"] * (1 + SHAPE["num_hidden_layers"])  # the rung, then every backbone layer
    side = side_of(models["graphs"])
    assert side._own_grads and not side_of(models["eager"])._own_grads
    optimizers = {mode: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for mode, m in models.items()}
    halves = IDS[:2], IDS[2:]
    for step in range(2):
        grads = {}
        for mode, model in models.items():
            for half in halves:
                (model(input_ids=half, labels=half).loss / 2).backward()
            grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            if mode == "graphs":  # one flat buffer holds every side gradient
                assert len({p.grad.untyped_storage().data_ptr() for p in side.parameters()}) == 1
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
        assert set(grads["graphs"]) == set(grads["eager"])
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads["graphs"][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # no buffers for forwards that do not backpropagate
        models["graphs"](input_ids=IDS)
    assert all(p.grad is None for p in side.parameters())
    detach(models["graphs"])
    assert not side._own_grads


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("lst-compile"), **SHAPE)


@pytest.fixture(scope="module")
def eager_losses(model_dir, tmp_path_factory):
    trainer = trainer_for(model_dir, tmp_path_factory.mktemp("eager"))
    trainer.train()
    return losses(trainer)


def trainer_for(model_dir, out, **kw):
    args = PluginTrainingArguments(output_dir=str(out), **{**COMMON, **kw})
    return PluginTrainer(model=LlamaForCausalLM.from_pretrained(model_dir), args=args, train_dataset=cycles())


def test_lst_compile_in_the_trainer_trains_saves_and_reloads_like_eager(model_dir, eager_losses, tmp_path):
    trainer = trainer_for(model_dir, tmp_path, lst_compile=True)
    assert side_of(trainer.model)._compiled_step is not None
    trainer.train()
    assert losses(trainer) == pytest.approx(eager_losses, rel=1e-5)
    trainer.save_model()
    ids = IDS[:1]
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        reloaded = load(LlamaForCausalLM.from_pretrained(model_dir), tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)  # the side network saves and loads as before


def test_the_trainers_torch_compile_trains_the_whole_model_like_eager(model_dir, eager_losses, tmp_path):
    """torch_compile: the Trainer compiles the whole model, the side network's hooks included, as one graph
    (aot_eager here: the tracing and the autograd graph, without the slow CPU code generation)."""
    before = dict(counters["stats"])
    trainer = trainer_for(model_dir, tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    trainer.train()
    assert losses(trainer) == pytest.approx(eager_losses, rel=1e-5)
    assert counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0) == 1 and not counters["graph_break"]
    assert all(n.startswith("lst_side.") for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_gradient_buffers_where_the_trainer_replays_cuda_graphs_with_gradient_accumulation(model_dir, tmp_path):
    """torch_compile_mode reduce-overhead replays the whole model as CUDA graphs (the Trainer's flags; compiled at the
    first step, so no training here): with gradient accumulation the side gradients need buffers of their own."""
    graphs = dict(torch_compile=True, torch_compile_mode="reduce-overhead")
    assert side_of(trainer_for(model_dir, tmp_path, gradient_accumulation_steps=2, **graphs).model)._own_grads
    assert not side_of(trainer_for(model_dir, tmp_path, **graphs).model)._own_grads  # one backward per step
    assert not side_of(trainer_for(model_dir, tmp_path, gradient_accumulation_steps=2).model)._own_grads


@pytest.mark.parametrize("name", ["lst-compile", "lst-torch-compile"])
def test_estimates_of_compiled_bench_cases_are_the_eager_estimates(name):
    shape = SHAPES["tiny"]
    assert estimate_case(METHODS[name], shape, torch.float32, "cpu") == estimate_case(METHODS["lst"], shape,
                                                                                     torch.float32, "cpu")
    model = prepared_model(METHODS[name], shape, "meta", torch.float32)
    assert isinstance(model, LlamaForCausalLM) and side_of(model)._compiled_step is None  # nothing compiled on meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graphs_on_a_gpu_record_once_replay_and_train_like_eager(model_dir, tmp_path, accumulation):
    """lst_cuda_graphs in the Trainer on a GPU: CUDA graph trees record the graphs (none skipped) and the replayed
    steps give eager's losses, with and without gradient accumulation (the side gradients in buffers of their own,
    or left in the graphs' pool)."""
    counters.clear()
    gpu = dict(use_cpu=False, per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation,
               max_steps=6)
    runs = {}
    for name, flags in {"eager": {}, "graphs": {"lst_compile": True, "lst_cuda_graphs": True}}.items():
        trainer = trainer_for(model_dir, tmp_path / name, **gpu, **flags)
        assert side_of(trainer.model)._own_grads == (name == "graphs" and accumulation > 1)
        trainer.train()
        runs[name] = losses(trainer)
    seen = dict(counters["inductor"])  # (TORCH_LOGS=perf_hints prints why a graph was skipped)
    assert seen.get("cudagraph_skips", 0) == 0, seen
    assert seen.get("cudagraph_recorded_non_static_inputs", 0) > 0, seen  # graphs were recorded
    assert runs["graphs"] == pytest.approx(runs["eager"], rel=1e-4)
