"""Trainer glue for LST: flags, checks, building/initialising/attaching the side network, saving it alone.
The method is in side.py (the network and its hooks) and pruning.py (structure and init)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from trainer_plugins import ConfigError, PluginSpec, hookimpl

logger = logging.getLogger("trainer_plugins.lst")

WEIGHTS_NAME = "lst_side.safetensors"
CONFIG_NAME = "lst_config.json"
FORMAT_VERSION = 1


@dataclass
class LstArguments:
    lst: bool = field(default=False, metadata={
        "help": "Ladder Side-Tuning: freeze the model and train a side network of width d/r fed by every chosen "
                "layer's output; no backpropagation through the backbone."})
    lst_reduction_factor: int = field(default=8, metadata={
        "help": "r: the side network has width d/r, head size head/r (same head count) and MLP width d_ff/r."})
    lst_head_size: Literal["reduced", "full"] = field(default="reduced", metadata={
        "help": "reduced: every attention head kept at head size / r (the paper); full (decoders): "
                "whole heads of the backbone's size, r times fewer (the most important KV groups and query heads), "
                "for attention kernels built for such heads (and, with RoPE, the backbone's own frequencies)."})
    lst_layers: str = field(default="all", metadata={
        "help": "Backbone layers that get a side block (layer dropping): 'all', 'every:K' (every K-th, ending at "
                "the last layer) or a comma list '3,7,11'."})
    lst_init: Literal["pruned", "random"] = field(default="pruned", metadata={
        "help": "pruned: side blocks = structurally pruned backbone layers (LST); random: normal init (QST)."})
    lst_importance: Literal["magnitude", "fisher"] = field(default="magnitude", metadata={
        "help": "What picks the kept units for lst_init=pruned: |W|, or the empirical Fisher sum (dL/dW)^2 of the "
                "language-modelling loss over calibration batches (decoders; whole weights, no 4-bit)."})
    lst_calibration_dataset: str = field(default="stdlib", metadata={
        "help": "Calibration text for lst_importance=fisher (a dataset as in the data section)."})
    lst_calibration_samples: int = field(default=16, metadata={"help": "Calibration sequences (Fisher)."})
    lst_calibration_seq_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    lst_merge: Literal["add", "none"] = field(default="add", metadata={
        "help": "add: output = backbone's last hidden state + Up(side), Up starting at 0 so training starts from "
                "the backbone's predictions; none: output = Up(side) alone (the paper's LST)."})
    lst_gate_alpha: float = field(default=0.0, metadata={"help": "Initial gate logit alpha (gate = sigmoid(alpha/T))."})
    lst_gate_temperature: float = field(default=0.1, metadata={"help": "Gate temperature T."})
    lst_train_head: str = field(default="auto", metadata={
        "help": "Model modules trained with the side network: 'auto' (a new classification head: classifier/score "
                "of *ForSequenceClassification models; nothing for language models, whose head stays frozen), "
                "'none', or comma-separated module names."})
    lst_side_dir: str = field(default="", metadata={
        "help": "Start from a saved side network (a directory with lst_side.safetensors) instead of initialising one."})
    lst_compile: bool = field(default=False, metadata={
        "help": "torch.compile the training steps layer by layer: every side rung (downsample, gate, side layer; "
                "forward and backward) as one graph and every backbone layer's forward as another, each graph "
                "shared by all layers (compile time does not grow with depth). Cuts the launch overhead of the side "
                "network's many small ops; training steps keep no KV cache; evaluation and generation run eagerly. "
                "torch_compile instead compiles the whole model as one graph (set one of the two)."})
    lst_cuda_graphs: bool = field(default=False, metadata={
        "help": "With lst_compile, on one GPU: replay the compiled graphs as CUDA graphs (torch.compile mode "
                "reduce-overhead), one launch per graph instead of one per kernel; a compiled LST step is still "
                "bound by the CPU issuing its kernels. Wants fixed batch shapes (packed text: a new sequence length "
                "records new graphs) and holds the graphs' memory pool."})


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="lst",
        arguments=LstArguments,
        description="Ladder Side-Tuning: a small side network fed by a frozen backbone, no backprop through it",
        requires={"safetensors": "safetensors"},
        # 4-bit: the backbone is frozen, so it may be quantised (QST). ZeRO-3 partitions backbone and side alike.
        # A 4-bit backbone with DDP / ZeRO-2: every rank quantises its own frozen copy; only the side syncs. With
        # ZeRO-3, DeepSpeed partitions the packed 4-bit weights (quant storage = compute dtype) like any other.
        supports=frozenset({"ddp", "zero2", "zero3", "4bit", "ddp+4bit", "zero2+4bit", "zero3+4bit"}),
        evidence={
            "single": "tests/plugins/test_lst.py::test_resume_equals_the_uninterrupted_run",
            "ddp": "tests/plugins/test_lst.py::test_two_processes_equal_one_process_and_save_the_side_network[ddp]",
            "zero2": "tests/plugins/test_lst.py::test_two_processes_equal_one_process_and_save_the_side_network[2]",
            "zero3": "tests/plugins/test_lst.py::test_two_processes_equal_one_process_and_save_the_side_network[3]",
            "4bit": "tests/plugins/test_lst.py::test_recipe_with_a_4bit_backbone_and_fisher_importance",
            "ddp+4bit": "tests/plugins/test_lst.py::test_4bit_backbone_with_two_processes_equals_one_process[ddp]",
            "zero2+4bit": "tests/plugins/test_lst.py::test_4bit_backbone_with_two_processes_equals_one_process[2]",
            "zero3+4bit": "tests/plugins/test_lst.py::test_4bit_backbone_with_two_processes_equals_one_process[3]",
        },
        plain_model="LST freezes the whole backbone and trains a side network of its own beside it",
        conflicts={
            "meft": "MEFT makes the backbone's own layers trainable and reversible; LST freezes them",
            "loram": "LoRAM trains LoRA inside the (pruned) backbone; LST freezes the backbone",
            "sparse": "sparse pruning schedules act on the trained weights, and LST's backbone is frozen",
            "apollo": "APOLLO saves optimizer memory on big weight matrices; LST's side network is already small",
        },
    )


def layer_ids(spec: str, n_layers: int) -> list[int]:
    """Parse lst_layers for a backbone of ``n_layers`` layers."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"lst_layers={spec!r}: 'every:K' needs an integer K >= 1")
        return [i for i in range(n_layers) if (n_layers - 1 - i) % k == 0]
    try:
        ids = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        ids = []
    if not ids:
        raise ConfigError(f"lst_layers={spec!r}: use 'all', 'every:K' or a comma list of layer indices like '3,7,11'")
    return ids


@hookimpl
def validate(args, model_args, model_config):
    from trainer_plugins.trainer import deepspeed_stage

    from . import families

    # Literal flags (lst_init, lst_importance, lst_merge) are checked by the host when the arguments are parsed.
    if not args.lst_gate_temperature > 0:
        raise ConfigError(f"lst_gate_temperature must be > 0, got {args.lst_gate_temperature}")
    if args.lst_reduction_factor < 2:
        raise ConfigError(f"lst_reduction_factor must be >= 2 (the side network is d/r wide), got "
                          f"{args.lst_reduction_factor}")
    if args.lst_calibration_samples < 1 or args.lst_calibration_seq_length < 8:
        raise ConfigError("lst_calibration_samples must be >= 1 and lst_calibration_seq_length >= 8")
    if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
        raise ConfigError("lst keeps no backbone activations, and the side network's are small: activation (gradient) "
                          "checkpointing would only re-run the frozen backbone. Set activation_checkpointing false")
    if getattr(args, "precompute_ref_log_probs", None) is False:  # TRL's DPOConfig / KTOConfig
        raise ConfigError(
            "lst under a preference trainer: set precompute_ref_log_probs true. Without it TRL loads a second copy of "
            "the backbone from disk as the reference model, which costs the memory LST saves and is not the policy "
            "training starts from when lst_merge is none or lst_side_dir is set; with it the reference log-probs "
            "come from this model before its first step and no copy is kept")
    if args.lst_side_dir:
        _check_side_dir(args)
    if args.lst_compile:
        _check_compile(args)
    if args.lst_cuda_graphs:
        _check_cuda_graphs(args)
    fisher = args.lst_init == "pruned" and args.lst_importance == "fisher" and not args.lst_side_dir
    four_bit = getattr(model_args, "load_in_4bit", False)
    if fisher and four_bit:
        raise ConfigError("lst_importance=fisher needs gradients of whole weights, which a 4-bit backbone does not "
                          "have: use lst_importance=magnitude (dequantised weights) or lst_init=random (QST)")
    stage = deepspeed_stage(args)
    if _data_parallel(args):
        raise ConfigError("lst: this process sees several GPUs, so the Trainer would use torch.nn.DataParallel, whose "
                          "replicas share the side network's per-forward state. Launch one process per GPU "
                          "(torchrun / accelerate launch) or set CUDA_VISIBLE_DEVICES to one GPU")
    if args.lst_compile and stage == 3:
        raise ConfigError("lst_compile under ZeRO-3 is not supported: DeepSpeed gathers each partitioned weight with "
                          "hooks around its submodule, inside the layers lst_compile compiles, which torch.compile "
                          "would have to trace or break its graphs at. Use ZeRO-2, DDP or one GPU, or leave "
                          "lst_compile off")
    if fisher and stage == 3:
        raise ConfigError("lst_importance=fisher runs a backward pass through the whole backbone before training, "
                          "which ZeRO-3's partitioned weights do not allow: use lst_importance=magnitude")
    if stage == 3 and not _gathers_on_save(args):
        raise ConfigError("lst under ZeRO-3 saves the side network from the gathered weights: set "
                          "zero_optimization.stage3_gather_16bit_weights_on_model_save true in the DeepSpeed config "
                          "(recipes/deepspeed/zero3.json does)")
    if model_config is not None:
        kind = families.family(getattr(model_config, "model_type", None))
        if fisher and kind == "encoder":
            raise ConfigError("lst_importance=fisher scores weights with the language-modelling loss of a decoder; "
                              "for encoders use lst_importance=magnitude")
        families.check(model_config, args.lst_reduction_factor,
                       layer_ids(args.lst_layers, model_config.num_hidden_layers), args.lst_head_size)
    else:
        layer_ids(args.lst_layers, 10 ** 6)  # syntax only


def _check_compile(args) -> None:
    import torch._dynamo

    if getattr(args, "torch_compile", False):
        raise ConfigError("lst_compile compiles the backbone's layers and the side network's rungs layer by layer, "
                          "torch_compile the whole model (side network included) as one graph: set one of them")
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("lst_compile needs torch.compile, which this Python/platform does not support")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 5):
        # before 2.5 dynamo guards on each module object (inline_inbuilt_nn_modules off): a graph per layer, and
        # past its cache limit (8) the rest of the layers would run eagerly without saying so
        raise ConfigError(f"lst_compile needs torch >= 2.5 (one graph shared by all layers); this is torch "
                          f"{torch.__version__}. Upgrade torch or leave lst_compile off")


def _check_cuda_graphs(args) -> None:
    import torch

    from trainer_plugins.trainer import deepspeed_stage

    if not args.lst_compile:
        raise ConfigError("lst_cuda_graphs replays the graphs lst_compile builds: set lst_compile true as well")
    if getattr(args, "use_cpu", False) or not torch.cuda.is_available():
        raise ConfigError("lst_cuda_graphs needs a CUDA GPU (CUDA graphs); on this machine use lst_compile alone")
    if deepspeed_stage(args) is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("lst_cuda_graphs is supported in one process (tested on one GPU); with several processes "
                          "(DDP, DeepSpeed) use lst_compile without it")


def _data_parallel(args) -> bool:
    import torch

    return (not getattr(args, "use_cpu", False) and torch.cuda.is_available() and torch.cuda.device_count() > 1
            and int(os.environ.get("WORLD_SIZE", "1")) == 1 and "LOCAL_RANK" not in os.environ)


def _gathers_on_save(args) -> bool:
    config = getattr(args, "deepspeed", None)
    if isinstance(config, str):
        with open(config) as f:  # deepspeed_stage() has read it already: it exists and is JSON
            config = json.load(f)
    if not isinstance(config, dict):
        return True  # an accelerate launch: the config is not ours to read here
    zero = config.get("zero_optimization", {})
    return bool(zero.get("stage3_gather_16bit_weights_on_model_save",
                         zero.get("stage3_gather_fp16_weights_on_model_save", False)))


def _check_side_dir(args) -> None:
    """A saved side network must have been built with the same structural flags."""
    directory = Path(args.lst_side_dir)
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        raise ConfigError(f"lst_side_dir: no {WEIGHTS_NAME} and {CONFIG_NAME} in {args.lst_side_dir!r}")
    saved = json.loads((directory / CONFIG_NAME).read_text())["settings"]
    saved = {"head_size": "reduced", **saved}  # saved before the flag existed
    flags = {"reduction": ("lst_reduction_factor", args.lst_reduction_factor), "merge": ("lst_merge", args.lst_merge),
             "head_size": ("lst_head_size", args.lst_head_size)}
    wrong = [f"{flag}={value!r} (saved: {saved[key]!r})" for key, (flag, value) in flags.items() if saved[key] != value]
    if wrong:
        raise ConfigError(f"lst_side_dir {args.lst_side_dir!r} holds a side network built otherwise: {', '.join(wrong)}")


def settings_of(args, config):
    from .pruning import SideSettings

    return SideSettings(reduction=args.lst_reduction_factor, layer_ids=layer_ids(args.lst_layers,
                                                                                  config.num_hidden_layers),
                        merge=args.lst_merge, temperature=args.lst_gate_temperature, alpha=args.lst_gate_alpha,
                        head_size=args.lst_head_size)


@hookimpl
def load_model(args, model_args):
    """Only for Fisher importance: score on whole weights right after loading, with the run's tokenizer."""
    if model_args is None or args.lst_init != "pruned" or args.lst_importance != "fisher" or args.lst_side_dir:
        return None
    from trainer_plugins.models import load_model as host_load
    from trainer_plugins.models import load_tokenizer

    model = host_load(model_args)
    model._lst_selection = _fisher_selection(model, args, load_tokenizer(model_args))
    return model


def _fisher_selection(model, args, tokenizer):
    from trainer_plugins.data import calibration_batches

    from .pruning import fisher, importance_names, select

    import torch

    if torch.cuda.is_available():  # the backward passes run where training will (the Trainer keeps it there)
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    settings = settings_of(args, model.config)
    batches = calibration_batches(args.lst_calibration_dataset, args.lst_calibration_samples,
                                  args.lst_calibration_seq_length, tokenizer, seed=args.seed)
    logger.info("lst: Fisher importance over %d calibration sequences", sum(len(b) for b in batches))
    return select(model, settings, fisher(model, batches, importance_names(model, settings.layer_ids)))


@hookimpl
def prepare_model(model, args):
    import torch

    from . import families
    from .pruning import build, init_pruned, init_random, magnitude, select
    from .side import attach

    config = model.config
    model.requires_grad_(False)
    settings = settings_of(args, config)
    record = {"init": args.lst_init, "importance": args.lst_importance if args.lst_init == "pruned" else None}
    with torch.random.fork_rng(devices=[]):  # the side network depends on the seed only (runs reproduce)
        torch.manual_seed(args.seed)
        side = build(model, settings).to(_device_of(model))
        if args.lst_side_dir:
            record = {"init": f"from {args.lst_side_dir}"}
        elif _device_of(model).type == "meta":
            pass  # `trainer-plugins estimate`: shapes only, no weights to initialise from
        elif args.lst_init == "random":
            init_random(model, side)
        else:
            selection = getattr(model, "_lst_selection", None)
            if selection is None and args.lst_importance == "fisher":
                from trainer_plugins.models import tokenizer_of

                selection = _fisher_selection(model, args, tokenizer_of(
                    model, "lst_importance=fisher needs calibration text (load the model through a recipe, or use "
                           "lst_importance=magnitude)"))
            init_pruned(model, side, selection or select(model, settings, magnitude))
    model.__dict__.pop("_lst_selection", None)
    # the Trainer's torch_compile replays CUDA graphs in these modes too: the side gradients need buffers of their own
    graphs = args.lst_cuda_graphs or (getattr(args, "torch_compile", False) and getattr(
        args, "torch_compile_mode", None) in ("reduce-overhead", "max-autotune"))
    attach(model, side, families.layers_of(model), compile=args.lst_compile, cuda_graphs=graphs,
           grad_buffers=graphs and args.gradient_accumulation_steps > 1)
    head = head_modules(model, args.lst_train_head)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    side.record = {**record, "head_modules": head, "settings": settings.__dict__}
    if args.lst_side_dir:
        load_weights(model, args.lst_side_dir)
    if getattr(model, "is_quantized", False):
        # transformers refuses to train a quantised model unless "adapters" are attached: the side network is.
        model._hf_peft_config_loaded = True
    _quiet_partial_checkpoint_warning()
    return model


def _device_of(model):
    return model.get_input_embeddings().weight.device


def head_modules(model, spec: str) -> list[str]:
    """Names of the model's modules trained alongside the side network (lst_train_head)."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec != "auto":
        names = [n.strip() for n in spec.split(",") if n.strip()]
        known = dict(model.named_modules())
        missing = [n for n in names if n not in known]
        if missing:
            raise ConfigError(f"lst_train_head: the model has no modules {missing}")
        return names
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []  # a language model's head (often tied to the embeddings) stays frozen
    base = model.base_model
    return [name for name, module in model.named_children()
            if module is not base and any(True for _ in module.parameters())]


class _PartialCheckpointFilter(logging.Filter):
    """Checkpoints hold the side network only; the Trainer would list every frozen backbone weight as missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There were missing keys in the checkpoint model loaded")
                    and "lst_side." not in message)


def _quiet_partial_checkpoint_warning() -> None:
    log = logging.getLogger("transformers.trainer")
    if not any(isinstance(f, _PartialCheckpointFilter) for f in log.filters):
        log.addFilter(_PartialCheckpointFilter())


# -- saving and loading ------------------------------------------------------------------------------------
def trained_state(model, state_dict: Optional[dict] = None) -> dict:
    """The side network's tensors (and the trained head's), named as in ``model.state_dict()``."""
    from .side import side_of

    model = getattr(model, "module", model)
    side = side_of(model)
    heads = tuple(f"{n}." for n in side.record.get("head_modules", []))
    state = state_dict if state_dict else model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()
            if k.startswith("lst_side.") or k.startswith(heads)}


def side_config(model) -> dict:
    from .side import side_of

    model = getattr(model, "module", model)
    side = side_of(model)
    config = model.config
    return {"format": FORMAT_VERSION, **side.record, "backbone": {
        "name_or_path": getattr(model, "name_or_path", None) or None, "model_type": config.model_type,
        "architecture": type(model).__name__, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers}}


@hookimpl
def save_model(trainer, output_dir, state_dict, checkpoint):
    from safetensors.torch import save_file

    from transformers.utils import SAFE_WEIGHTS_NAME

    os.makedirs(output_dir, exist_ok=True)
    state = trained_state(trainer.model, state_dict)
    # In a checkpoint the side network goes where the Trainer's resume reads model weights (it loads them
    # with strict=False; the frozen backbone comes from the model it was given).
    save_file(state, os.path.join(output_dir, SAFE_WEIGHTS_NAME if checkpoint else WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
        json.dump(side_config(trainer.model), f, indent=2)
    return True


@hookimpl
def metrics(trainer):
    from .side import side_of

    side = side_of(trainer.model)
    alphas = [step.alpha for step in side.steps] if side is not None else []
    if not alphas or any(a.numel() != 1 for a in alphas):  # ZeRO-3 partitions: not readable here
        return None
    import torch

    gates = torch.sigmoid(torch.stack([a.detach().float() for a in alphas]) / side.steps[0].temperature)
    return {"lst/gate_mean": gates.mean().item(), "lst/gate_min": gates.min().item(),
            "lst/gate_max": gates.max().item()}


def load_weights(model, directory) -> None:
    from safetensors.torch import load_file

    path = Path(directory)
    file = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / "model.safetensors"
    state = load_file(str(file))
    expected = {k: tuple(v.shape) for k, v in trained_state(model).items()}
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or reshaped:
        raise ConfigError(f"lst: {file} does not fit this side network (missing {sorted(missing)[:5]}, unexpected "
                          f"{sorted(unexpected)[:5]}, other shapes {reshaped[:5]}): was it trained with other lst "
                          "settings?")
    model.load_state_dict(state, strict=False)


def load(model, side_dir, trainable: bool = False):
    """The trained LST model: ``model`` (the same backbone, any precision, e.g. 4-bit) + the side network saved
    in ``side_dir``. Returns ``model`` with the side network attached (frozen unless ``trainable``)."""
    from . import families
    from .pruning import SideSettings, build
    from .side import attach

    with open(Path(side_dir) / CONFIG_NAME) as f:
        saved = json.load(f)
    backbone = saved["backbone"]
    config = model.config
    if (config.model_type, config.hidden_size, config.num_hidden_layers) != (
            backbone["model_type"], backbone["hidden_size"], backbone["num_hidden_layers"]):
        raise ConfigError(f"lst: the side network in {side_dir} was trained on a {backbone['model_type']} with "
                          f"hidden {backbone['hidden_size']} and {backbone['num_hidden_layers']} layers, not this "
                          f"{config.model_type} ({config.hidden_size}, {config.num_hidden_layers})")
    model.requires_grad_(False)
    side = build(model, SideSettings(**saved["settings"])).to(_device_of(model))
    attach(model, side, families.layers_of(model))
    side.record = {k: v for k, v in saved.items() if k not in ("format", "backbone")}
    load_weights(model, side_dir)
    side.requires_grad_(trainable)
    if trainable:
        for name in saved.get("head_modules", []):
            model.get_submodule(name).requires_grad_(True)
    return model


@hookimpl
def benchmark_methods():
    from .bench import METHODS

    return METHODS
