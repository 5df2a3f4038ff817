"""LST's methods for `trainer-plugins bench`: a frozen (optionally NF4) backbone and a float32 side network of
width d/8 on every layer, or every 2nd (random init: memory and speed do not depend on the values); the
``-autocast`` ones run it as the recipes do with ``bf16: true`` (bf16 matmuls over the float32 side weights);
``-full-heads`` ones keep whole heads of the backbone's size, r times fewer (lst_head_size full); ``-compile`` ones
train as with lst_compile (the rungs and the backbone layers compiled layer by layer), ``-torch-compile`` ones as
with the Trainer's torch_compile (the whole model as one graph); ``-cuda-graphs`` ones replay those graphs as CUDA
graphs (lst_cuda_graphs; torch_compile_mode reduce-overhead). Compilation (and graph recording) happens in the warm-up steps; the
estimates (meta device) stay the eager ones."""

from trainer_plugins.bench import BenchMethod, nf4


def _lst(reduction=8, four_bit=False, layers="all", head_size="reduced", compile=False, whole_model_compile=False,
         cuda_graphs=False):
    def prepare(model):
        from . import families
        from .plugin import layer_ids
        from .pruning import SideSettings, build, init_random
        from .side import attach

        if four_bit:
            nf4(model)
        model.requires_grad_(False)
        chosen = layer_ids(layers, model.config.num_hidden_layers)  # as the flag lst_layers
        r = reduction if head_size == "reduced" else min(reduction, model.config.num_attention_heads)  # tiny shape
        families.check(model.config, r, chosen, head_size)
        side = build(model, SideSettings(reduction=r, layer_ids=chosen, head_size=head_size))
        device = model.get_input_embeddings().weight.device
        side.to(device)
        if device.type != "meta":  # estimates run on the meta device: shapes only
            init_random(model, side)
        attach(model, side, families.layers_of(model), compile=compile, cuda_graphs=cuda_graphs,
               grad_buffers=False)  # one backward per step, as the Trainer without gradient accumulation
        if whole_model_compile and device.type != "meta":
            import torch

            # what the Trainer's accelerator does with torch_compile (and torch_compile_mode reduce-overhead)
            return torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
        return model

    return prepare


METHODS = {
    "lst": BenchMethod(prepare=_lst(), description="LST r8 side network, frozen backbone"),
    "lst-4bit": BenchMethod(prepare=_lst(four_bit=True), description="LST r8 side network, NF4 backbone"),
    # as the recipes train (bf16: true): the float32 side network's matmuls under bf16 autocast
    "lst-autocast": BenchMethod(prepare=_lst(), autocast=True, description="LST r8, bf16 autocast (bf16: true)"),
    "lst-4bit-autocast": BenchMethod(prepare=_lst(four_bit=True), autocast=True,
                                     description="LST r8, NF4 backbone, bf16 autocast (bf16: true)"),
    "lst-every-2-autocast": BenchMethod(prepare=_lst(layers="every:2"), autocast=True,
                                        description="LST r8 on every 2nd layer (lst_layers every:2), bf16 autocast"),
    # attention kernels built for whole heads (128 on the 7B shape) instead of 32 heads of 16 (or 8 on 1B)
    "lst-full-heads": BenchMethod(prepare=_lst(head_size="full"),
                                  description="LST r8 with whole heads, r times fewer (lst_head_size full)"),
    "lst-full-heads-autocast": BenchMethod(prepare=_lst(head_size="full"), autocast=True,
                                           description="LST r8 with whole heads (lst_head_size full), bf16 autocast"),
    # launch overhead: layer-by-layer graphs (lst_compile), or the whole model as one graph (torch_compile)
    "lst-compile": BenchMethod(prepare=_lst(compile=True), compiled=True, description="LST r8, compiled layer by layer (lst_compile)"),
    "lst-4bit-autocast-compile": BenchMethod(prepare=_lst(four_bit=True, compile=True), autocast=True, compiled=True,
                                             description="LST r8, NF4 backbone, bf16 autocast, lst_compile"),
    "lst-full-heads-autocast-compile": BenchMethod(prepare=_lst(head_size="full", compile=True), autocast=True, compiled=True,
                                                   description="LST r8 with whole heads, bf16 autocast, lst_compile"),
    "lst-torch-compile": BenchMethod(prepare=_lst(whole_model_compile=True), compiled=True,
                                     description="LST r8, the whole model compiled (torch_compile)"),
    "lst-full-heads-autocast-torch-compile": BenchMethod(
        prepare=_lst(head_size="full", whole_model_compile=True), autocast=True, compiled=True,
        description="LST r8 with whole heads, bf16 autocast, the whole model compiled (torch_compile)"),
    # the compiled steps still issue ~2,800 kernels from Python (CPU-bound on 7B): CUDA graphs replay them
    "lst-compile-cuda-graphs": BenchMethod(prepare=_lst(compile=True, cuda_graphs=True), compiled=True,
                                           description="LST r8, lst_compile + lst_cuda_graphs"),
    "lst-autocast-compile-cuda-graphs": BenchMethod(
        prepare=_lst(compile=True, cuda_graphs=True), autocast=True, compiled=True,
        description="LST r8, bf16 autocast (the recipes' bf16: true), lst_compile + lst_cuda_graphs"),
    "lst-full-heads-autocast-compile-cuda-graphs": BenchMethod(
        prepare=_lst(head_size="full", compile=True, cuda_graphs=True), autocast=True, compiled=True,
        description="LST r8 with whole heads, bf16 autocast, lst_compile + lst_cuda_graphs"),
    # layer dropping (lst_layers every:2; on SmolLM2 it costs 0.1% eval loss, benchmarks/lst_quality.py): half the
    # rungs, so half the side network's launches (what is left to gain where CUDA graphs cannot replay them)
    "lst-full-heads-every-2-autocast-compile": BenchMethod(
        prepare=_lst(head_size="full", layers="every:2", compile=True), autocast=True, compiled=True,
        description="LST r8 with whole heads on every 2nd layer, bf16 autocast, lst_compile"),
    "lst-full-heads-autocast-torch-compile-cuda-graphs": BenchMethod(
        prepare=_lst(head_size="full", whole_model_compile=True, cuda_graphs=True), autocast=True, compiled=True,
        description="LST r8 with whole heads, bf16 autocast, torch_compile with torch_compile_mode reduce-overhead"),
}
