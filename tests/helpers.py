"""Small helpers the test files share (plain functions; fixtures live in conftest.py)."""

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from trainer_plugins.cli import end_distributed

ROOT = Path(__file__).resolve().parents[1]


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker whose work is done and written: end the process group, flush, and leave without
    interpreter finalization. DeepSpeed keeps its own references to the process groups, so gloo's worker threads
    can outlive destroy_process_group and abort the finalizing interpreter ("terminate called without an active
    exception", pytorch#179291) after the results are on disk: a rare, spurious failure of the test."""
    end_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def losses(trainer) -> list[float]:
    """The training losses a Trainer logged, in order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def plugin_sft_trainer():
    """TRL's SFTTrainer behind the plugins' mixin, as a user declares it (trl imported by the tests that use it)."""
    from trl import SFTTrainer

    from trainer_plugins import PluginsMixin

    return type("PluginSFTTrainer", (PluginsMixin, SFTTrainer), {})


def counting_dataset():
    """Runs of consecutive token ids (vocab 1000): learnable in a few dozen steps, unlike random tokens."""
    return [{"input_ids": [(s * 7 + k) % 1000 for k in range(32)], "labels": [(s * 7 + k) % 1000 for k in range(32)]}
            for s in range(64)]


def save_tiny_llama(out, tokenizer_dir=None, **shape) -> str:
    """A tiny random Llama (tiny_llama_config(**shape), seed 0) saved in ``out``; with ``tokenizer_dir``, sized to
    that tokenizer's vocabulary and with the tokenizer copied beside it (recipes need both)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer_plugins.models import tiny_llama_config

    if tokenizer_dir is not None:
        shape["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**shape)).save_pretrained(out)
    if tokenizer_dir is not None:
        for f in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, f), out)
    return str(out)


def tiny_llama(layers: int = 2):
    """A tiny random Llama (tiny_llama_config, seed 0): the same weights in every process that builds it."""
    import torch
    from transformers import LlamaForCausalLM

    from trainer_plugins.models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers))


def perturb_trainable(model, std: float = 0.05, seed: int = 1):
    """Draw every trainable parameter from N(0, std²): adapters whose up-projection (LoRA B) starts at 0
    then carry gradient on every path. Returns the model in training mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, std, generator=g)
    return model.train()


def saved_tensor_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs (the activations kept)."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


# --- two processes against one -------------------------------------------------------------------------
# Two ranks with 2 sequences each reduce their gradients as g0 + g1, and a sum of two floats is the same in
# either order. One process that accumulates the same two micro-batches of 2 adds the same g0 + g1, its loss
# scaled by 1/2 where a rank's is scaled by world size and then averaged (powers of two: exact). On one thread,
# as each torchrun worker runs (OMP_NUM_THREADS=1; a GEMM's reduction order depends on its thread count), the two
# runs make the same float operations under DDP: they agree bit for bit, on any CPU, and a lost gradient shard,
# a skipped mask or an unsynchronised weight cannot hide inside a tolerance. ZeRO steps the optimizer on flat
# partitions cut at arbitrary offsets, so a vectorised kernel handles some elements in another lane or in its
# scalar tail (last-bit differences whose place depends on the CPU's vector width), and ZeRO-3 gathers weights
# into flat buffers and reduces in buckets of its own: those compare within a tolerance (assert_weights_match).
# Neither run clips: ZeRO sums its partitions' squared norms across ranks, a clip coefficient torch's
# clip_grad_norm_ rounds differently, which would move every element rather than a few.
TWO_RANKS = {"max_grad_norm": 0.0}


def as_one_process(flags: dict) -> dict:
    """The one-process reference's flags for a two-rank run with ``flags``: the same global batch of 4 as two
    micro-batches of 2 (see above)."""
    return {**flags, **TWO_RANKS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}


@contextmanager
def one_thread():
    """Run the one-process reference on one thread, as each torchrun worker runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_weights_match(ours: dict, reference: dict, exact: bool) -> None:
    """The tensors a two-rank run saved against its one-process reference's. ``exact`` (DDP): the runs made the
    same float operations, so every tensor is equal bit for bit. Otherwise (ZeRO; APOLLO's norms summed across
    ranks; compiled kernels) the engine rounds in an order of its own, last-bit differences that training
    amplifies: each tensor within rtol 1e-3 / atol 1e-4, but for at most 1% of its elements (at least one),
    where Adam's or APOLLO's per-element normalisation turned a near-zero gradient's rounding into a visible step
    (seen: up to 0.35%, lm_head after 16 steps of ZeRO-3 with AVX2 kernels). A lost gradient shard moves far
    more (seen: 21% to 99% of each tensor; tests/test_two_rank_comparison.py checks that it fails)."""
    import torch

    assert ours.keys() == reference.keys() and len(ours) > 0, (sorted(ours), sorted(reference))
    for key in ours:
        a, b = ours[key], reference[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if exact:
            assert torch.equal(a, b), (f"{key}: {int((a != b).sum())} of {a.numel()} elements differ, at most by "
                                       f"{float((a.float() - b.float()).abs().max()):.3g}; expected the same bits")
            continue
        far = ~torch.isclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)
        allowed = max(1, a.numel() // 100)
        assert int(far.sum()) <= allowed, (f"{key}: {int(far.sum())} of {a.numel()} elements differ beyond rtol 1e-3 / "
                                           f"atol 1e-4 (at most {allowed} may), by up to "
                                           f"{float((a.float() - b.float()).abs().max()):.3g}")


def two_processes_equal_one(tmp_path, stage, flags: dict, weights_file: str, request=None) -> tuple[list, list]:
    """Train the tiny Llama with ``flags`` in two processes (torchrun, 2 per rank, DDP or ZeRO-``stage``) and in
    one (two micro-batches of 2: as_one_process); returns both loss curves after checking the saved
    ``weights_file`` agrees (assert_weights_match, exact under DDP). With the ``request``
    of a test parametrized by ``stage`` (same flags for each), its stages share one launch."""
    import json

    from safetensors.torch import load_file

    from trainer_plugins import PluginTrainer, PluginTrainingArguments

    worker = ROOT / "tests" / "plugins" / "trainer_worker.py"
    if request is not None:
        out = shared_torchrun(request, worker, lambda params, directory: [params["stage"], directory, json.dumps(flags)])
    else:
        out = tmp_path / "dist"
        run = torchrun(worker, [stage, out, json.dumps(flags)])
        assert run.returncode == 0, run.stderr[-3000:]
    with one_thread():
        args = PluginTrainingArguments(output_dir=str(tmp_path / "plain"), **as_one_process(flags))
        plain = PluginTrainer(model=tiny_llama(), train_dataset=counting_dataset(), args=args)
        plain.train()
        plain.save_model()
    assert_weights_match(load_file(str(out / weights_file)), load_file(str(tmp_path / "plain" / weights_file)),
                         exact=stage == "ddp")
    return json.loads((out / "record.json").read_text())["losses"], losses(plain)


def free_port() -> int:
    """A port nothing listens on now: another test run on this machine may hold any fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in 2 CPU processes (torchrun, gloo)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def shared_torchrun(request, script, prepare, timeout_per_case: int = 240) -> Path:
    """The output directory of this test's case in ONE torchrun launch of ``script`` for every selected case of
    the calling parametrized test: each launch spends ~14 s starting two processes that import torch,
    transformers and DeepSpeed, which the cases then share (the worker runs them in turn through
    ``run_worker_jobs``). The first test (of any pytest-xdist worker) to get here runs the launch under a
    file lock; the others read its results. ``prepare(params, directory)`` writes what a case needs into its
    directory and returns the worker's arguments for it (``params``: the case's parametrization)."""
    import json

    import pytest
    from filelock import FileLock

    me = request.node
    tmp = request.getfixturevalue("tmp_path_factory").getbasetemp()
    shared = tmp.parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp  # the session's root under xdist
    root = shared / f"launch-{me.path.stem}-{me.originalname}"
    with FileLock(str(root) + ".lock"):
        if not (root / "launched").exists():
            cases = [item for item in request.session.items
                     if getattr(item, "originalname", None) == me.originalname and item.path == me.path]
            jobs = []
            for item in cases:
                (root / _dir_name(item)).mkdir(parents=True)
                args = prepare(item.callspec.params, root / _dir_name(item))
                jobs.append({"case": item.callspec.id, "dir": str(root / _dir_name(item)), "args": [str(a) for a in args]})
            (root / "jobs.json").write_text(json.dumps(jobs, indent=1))
            try:
                run = torchrun(script, ["--jobs", root / "jobs.json"], timeout=120 + timeout_per_case * len(jobs))
                (root / "launch.log").write_text(f"exit code {run.returncode}\n{run.stderr[-6000:]}")
            except subprocess.TimeoutExpired as exc:
                (root / "launch.log").write_text(f"timed out after {exc.timeout} s\n{str(exc.stderr)[-6000:]}")
            (root / "launched").touch()
    directory = root / _dir_name(me)
    errors = sorted(directory.glob("error-rank*.txt"))
    if errors:
        pytest.fail("\n".join(e.read_text() for e in errors), pytrace=False)
    if not all((directory / f"done-rank{r}").exists() for r in (0, 1)):
        failed = [d.name for d in root.iterdir() if any(d.glob("error-rank*.txt"))]
        pytest.fail(f"the shared launch ended before this case ran (failed first: {failed}); "
                    f"{(root / 'launch.log').read_text()}", pytrace=False)
    return directory


def _dir_name(item) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", item.callspec.id)


def run_worker_jobs(main) -> None:
    """A torchrun worker's entry: ``--jobs FILE`` runs ``main(*args)`` for every job of shared_torchrun in turn,
    with the global state DeepSpeed and accelerate leave behind reset between jobs (as tests/conftest.py's
    deepspeed_env does in-process; the process group stays); plain arguments run ``main`` once."""
    import gc
    import json
    import traceback

    if sys.argv[1:2] != ["--jobs"]:
        main(*sys.argv[1:])
        exit_worker()
    import torch
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for job in json.loads(Path(sys.argv[2]).read_text()):
        rank = int(os.environ["RANK"])
        try:
            main(*job["args"])
        except BaseException:  # the other rank may wait in a collective: leave now (torchrun ends it too)
            Path(job["dir"], f"error-rank{rank}.txt").write_text(f"{job['case']}, rank {rank}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        Path(job["dir"], f"done-rank{rank}").touch()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        AcceleratorState._reset_state(True)
        unset_hf_deepspeed_config()
        torch._dynamo.reset()
        gc.collect()
    exit_worker()


def torchrun_cli(args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`trainer-plugins ARGS` in 2 CPU processes, without DeepSpeed's shm JIT build (tests/host/cli_no_shm.py)."""
    return torchrun(ROOT / "tests" / "host" / "cli_no_shm.py", args, timeout)


def zero_recipe(tmp_path, model_dir, stage: int, run: dict | None = None, **train) -> Path:
    """A tiny CPU recipe (stdlib data, 4 steps, a checkpoint at step 4) under the shipped ZeRO config,
    output in tmp_path/out; ``train`` adds or overrides train keys."""
    import yaml

    recipe = {
        "model": {"model_name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"dataset": "stdlib", "max_seq_length": 64, "max_train_samples": 32, "max_eval_samples": 8},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 2,
                  "logging_steps": 1, "save_strategy": "steps", "save_steps": 4, "report_to": [], "use_cpu": True,
                  "deepspeed": str(ROOT / "recipes" / "deepspeed" / f"zero{stage}.json"), **train},
    }
    if run:
        recipe["run"] = run
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def four_bit_two_processes_equal_one(request, tmp_path, model_dir, stage, weights_file: str, **train) -> tuple[dict, Path]:
    """A recipe on a 4-bit (NF4, float32 compute) base through the CLI in 2 processes (DDP or ZeRO-``stage``,
    2 sequences per rank) and in one (two micro-batches of 2: as_one_process): same logged losses; the saved
    ``weights_file`` agrees (assert_weights_match: exact under DDP). Under ZeRO-3 the first process held about
    half the weights (partitioned, 4-bit ones included). The stages of the calling test (parametrized by
    ``stage``, the same ``train`` for each) share one launch. Returns the weights the two processes saved and
    their output directory."""
    import json

    import pytest
    import yaml
    from safetensors.torch import load_file

    from trainer_plugins.recipes import load_recipe, run_recipe

    def prepare(params, directory):
        stage = params["stage"]
        path = zero_recipe(directory, model_dir, 2 if stage == "ddp" else stage, bnb_4bit_compute_dtype="float32",
                           **TWO_RANKS, **train, **({"deepspeed": None} if stage == "ddp" else {}))
        recipe = yaml.safe_load(path.read_text())
        recipe["model"]["load_in_4bit"] = True
        path.write_text(yaml.safe_dump(recipe))
        return ["train", path]

    two = shared_torchrun(request, ROOT / "tests" / "host" / "cli_no_shm.py", prepare)
    recipe = yaml.safe_load((two / "recipe.yaml").read_text())
    one_out, two_out = tmp_path / "one", two / "out"
    one = {**recipe, "train": as_one_process({**recipe["train"], "output_dir": str(one_out), "deepspeed": None})}
    with one_thread():
        whole = run_recipe(load_recipe(one))["memory"]["parameter_bytes"]
    if stage == 3:
        assert json.loads((two_out / "results.json").read_text())["memory"]["parameter_bytes"] < 0.6 * whole

    def history(out):
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    exact = stage == "ddp"
    assert len(history(one_out)) == 4
    assert history(two_out) == pytest.approx(history(one_out), rel=1e-6 if exact else 1e-4)
    ours = load_file(str(two_out / weights_file))
    assert_weights_match(ours, load_file(str(one_out / weights_file)), exact)
    return ours, two_out


def require_versions_measured(results: Path, *dists: str) -> None:
    """Skip unless each of ``dists`` is installed in the release series (major.minor) that the GPU figures under
    ``results`` were measured with (its summary.json's ``versions``): an estimate compared with a figure that
    another peft or transformers produced proves nothing either way. Patch releases are taken as the same code."""
    import importlib.metadata
    import json

    import pytest

    recorded = json.loads((results / "summary.json").read_text())["versions"]
    for dist in dists:
        installed = importlib.metadata.version(dist)
        if installed.split(".")[:2] != recorded[dist].split(".")[:2]:
            pytest.skip(f"{results.name} was measured with {dist} {recorded[dist]}; {installed} is installed (a GPU "
                        f"run under it gives the figure to compare with: benchmarks/README.md)")
