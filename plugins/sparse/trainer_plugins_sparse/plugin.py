"""Trainer glue for sparse pre-training: flags, checks, the schedule callback, logs, the run record.

The method is in schedule.py (when and how much) and pruning.py (what, and keeping it at zero).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from trainer_plugins import ConfigError, PluginSpec, hookimpl
from trainer_plugins.spec import deepspeed_stage
from trainer_plugins.targets import linear_weights, module_matcher
from trainer_plugins.zero import full_numel, full_shape

from .schedule import Schedule, keep_count, resolve_by_compute, snap

logger = logging.getLogger("trainer_plugins.sparse")
RECORD = "sparsity.json"


@dataclass
class SparseArguments:
    sparse: Literal["off", "magnitude", "random"] = field(
        default="off",
        metadata={"help": "Gradual pruning during training: 'magnitude' (smallest |w| go first) or 'random' "
                          "(random live weights: the ablation)."},
    )
    sparse_final_sparsity: float = field(
        default=0.5, metadata={"help": "Fraction of the prunable weights that are zero at the end (0 = dense run "
                                       "with the same accounting, for scaling fits)."})
    sparse_initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity before the first prune event."})
    sparse_schedule: Literal["geometric", "cubic", "linear"] = field(
        default="geometric",
        metadata={"help": "geometric: the same fraction of the live weights per event (Jin et al.'s code); "
                          "cubic: Zhu & Gupta (= torch.ao CubicSL); linear."})
    sparse_start: float = field(default=0.25, metadata={"help": "First prune event (see sparse_timing)."})
    sparse_end: float = field(default=0.75, metadata={"help": "Last prune event (see sparse_timing)."})
    sparse_timing: Literal["compute", "steps", "step"] = field(
        default="compute",
        metadata={"help": "How sparse_start/end are read: fractions of the training FLOPs counted with the "
                          "shrinking active parameters (the paper's 25%/75%), fractions of the steps, or step "
                          "numbers."})
    sparse_every: int = field(default=100, metadata={"help": "Optimizer steps between prune events."})
    sparse_scope: Literal["global", "layer"] = field(
        default="global", metadata={"help": "One magnitude threshold for all pruned weights, or one per weight."})
    sparse_structure: str = field(
        default="unstructured",
        metadata={"help": "'unstructured', or 'N:M' (e.g. 2:4): the N largest of every M weights along a row are "
                          "never pruned, so final sparsity 1-N/M gives exact N:M sparsity."})
    sparse_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Linear layers to prune: 'all-linear' (attention and MLP; never embeddings), "
                          "comma-separated name parts, or a regex on module names."})
    sparse_include_lm_head: bool = field(
        default=False, metadata={"help": "Prune the output head too (refused when it is tied to the embeddings)."})


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="sparse",
        arguments=SparseArguments,
        description="Sparse pre-training: gradual magnitude pruning schedules with average-parameter accounting",
        # A 4-bit base is frozen: there is nothing to prune during training.
        plain_model="sparse prunes the weights being trained, which a peft adapter freezes",
        conflicts={"meft": "meft trains adapters on a frozen base; sparse prunes the weights being trained",
                   "loram": "loram prunes structurally before training a LoRA; sparse prunes during full training",
                   "lst": "lst trains a side network on a frozen backbone; sparse prunes the weights being trained"},
        supports=frozenset({"ddp", "zero2", "zero3"}),
        # APOLLO builds the optimizer, sparse masks its weights and moments.
        works_with={"apollo": frozenset({"single", "ddp", "zero2", "zero3"})},
        evidence={
            "single": "tests/plugins/test_sparse.py::test_resume_mid_schedule_equals_the_uninterrupted_run",
            "ddp": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[ddp-flags0]",
            "zero2": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[2-flags1]",
            "zero3": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[3-flags2]",
            "apollo@single": "tests/plugins/test_sparse.py::test_pruned_weights_stay_exactly_zero_after_every_step[apollo]",
            "apollo@zero2": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[2-flags5]",
            "apollo@ddp": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[ddp-flags6]",
            "apollo@zero3": "tests/plugins/test_sparse.py::test_two_processes_equal_one_process[3-flags7]",
        },
    )


def structure(args) -> Optional[tuple[int, int]]:
    if args.sparse_structure == "unstructured":
        return None
    try:
        n, m = (int(x) for x in args.sparse_structure.split(":"))
    except ValueError:
        raise ConfigError(f"sparse_structure must be 'unstructured' or 'N:M' like '2:4', got "
                          f"{args.sparse_structure!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"sparse_structure {n}:{m} needs 0 < N < M")
    return n, m


@hookimpl
def validate(args, model_config):
    final, initial = args.sparse_final_sparsity, args.sparse_initial_sparsity
    if not 0.0 <= final < 1.0:
        raise ConfigError(f"sparse_final_sparsity must be in [0, 1), got {final}")
    if not 0.0 <= initial <= final:
        raise ConfigError(f"sparse_initial_sparsity must be in [0, sparse_final_sparsity={final}], got {initial}")
    if args.sparse_every < 1:
        raise ConfigError(f"sparse_every must be >= 1, got {args.sparse_every}")
    start, end = args.sparse_start, args.sparse_end
    if args.sparse_timing == "step":
        if start < 0 or end < start or start != int(start) or end != int(end):
            raise ConfigError(f"with sparse_timing step, sparse_start/end are step numbers with start <= end, "
                              f"got {start}, {end}")
    elif not 0.0 <= start <= end <= 1.0:
        raise ConfigError(f"with sparse_timing {args.sparse_timing}, sparse_start/end are fractions with "
                          f"0 <= start <= end <= 1, got {start}, {end}")
    n_m = structure(args)
    if n_m is not None:
        if final > 1.0 - n_m[0] / n_m[1] + 1e-9:
            raise ConfigError(f"sparse_structure {args.sparse_structure} keeps {n_m[0]} of every {n_m[1]} weights, "
                              f"so sparsity cannot exceed {1 - n_m[0] / n_m[1]:g}; got {final}")
        if deepspeed_stage(args) == 3:
            raise ConfigError("sparse_structure N:M needs whole rows on one rank; ZeRO-3 cuts weights anywhere. "
                              "Use ZeRO-2 or unstructured pruning with ZeRO-3")
    if deepspeed_stage(args) == 0:
        raise ConfigError("sparse under DeepSpeed needs ZeRO stage 1, 2 or 3 (stage 0 keeps its own fp32 copies "
                          "that sparse does not mask); or run without DeepSpeed")
    module_matcher(args.sparse_target_modules, "sparse_target_modules")
    if args.sparse_include_lm_head and getattr(model_config, "tie_word_embeddings", False):
        raise ConfigError("sparse_include_lm_head: this model's output head is its input embedding matrix "
                          "(tie_word_embeddings), and embeddings are not pruned")


@hookimpl
def prepare_model(model, args):
    from .pruning import mask_gradients

    weights = linear_weights(model, args.sparse_target_modules, "sparse_target_modules",
                             include_head=args.sparse_include_lm_head)
    weights = {n: p for n, p in weights.items() if "lora_" not in n}
    if not weights:
        raise ConfigError(f"sparse_target_modules={args.sparse_target_modules!r} matches no trainable linear layer")
    n_m = structure(args)
    if n_m is not None:
        bad = [n for n, p in weights.items() if full_shape(p)[-1] % n_m[1]]
        if bad:
            raise ConfigError(f"sparse_structure {args.sparse_structure}: rows of {bad[:3]} are not a multiple "
                              f"of {n_m[1]}")
    state = SparseState(weights)
    state.hooks = mask_gradients(list(weights.values()), lambda: state.active)
    model._sparse_state = state
    return model


class SparseState:
    """The pruned weights of a model, and, once training starts, the schedule and the pruner."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.active = False  # gradient masking on (something is pruned)
        self.hooks: list = []
        self.schedule: Optional[Schedule] = None
        self.pruner = None
        self.fixed = 0  # dense parameters in matmuls (FLOPs)
        self.total_params = 0

    @property
    def prunable(self) -> int:
        return sum(full_numel(p) for p in self.weights.values())

    def count_params(self, model) -> None:
        import torch

        params = {id(p): p for p in model.parameters()}
        self.total_params = sum(full_numel(p) for p in params.values())
        # FLOPs: every weight is in a matmul except the input embeddings (a lookup), unless tied to the head.
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        lookup = 0
        if isinstance(embeddings, torch.nn.Embedding) and (head is None or head.weight is not embeddings.weight):
            lookup = full_numel(embeddings.weight)
        self.fixed = self.total_params - lookup - self.prunable

    def resolve(self, args, total_steps: int) -> Schedule:
        kind, final, initial, every = args.sparse_schedule, args.sparse_final_sparsity, args.sparse_initial_sparsity, args.sparse_every
        if args.sparse_timing == "compute":
            return resolve_by_compute(kind, final, args.sparse_start, args.sparse_end, every, total_steps,
                                      self.fixed, self.prunable, initial)
        if args.sparse_timing == "steps":
            return snap(kind, final, round(args.sparse_start * total_steps), round(args.sparse_end * total_steps),
                        every, initial)
        return snap(kind, final, int(args.sparse_start), int(args.sparse_end), every, initial)

    # -- accounting (from the schedule: the pruner keeps exactly its counts) --------------------------
    def active_params(self, step: int) -> float:
        return self.total_params - self.prunable * self.schedule.sparsity(step)

    def average_params(self, steps: int) -> float:
        """N-bar: the active parameter count averaged over the steps run so far (the scaling-law N)."""
        if steps <= 0:
            return float(self.active_params(0))
        return self.total_params - self.prunable + self.prunable * self.schedule.density_steps(steps) / steps

    def compute_fraction(self, steps: int, total_steps: int) -> float:
        total = self.schedule.compute(total_steps, self.fixed, self.prunable)
        return self.schedule.compute(steps, self.fixed, self.prunable) / total if total else 0.0

    def flos(self, steps: int, tokens: int) -> float:
        """Training FLOPs so far, 6 x tokens x the active matmul parameters averaged over the steps
        (the Trainer's own total_flos counts every weight as dense)."""
        return 6.0 * tokens * self.schedule.compute(steps, self.fixed, self.prunable) / steps if steps else 0.0

    def metrics(self, step: int, total_steps: int, tokens: int) -> dict:
        sparsity = self.pruner.sparsity()
        return {
            "sparse/sparsity": round(sparsity, 6),
            "sparse/active_params": int(self.total_params - round(sparsity * self.prunable)),
            "sparse/avg_params": round(self.average_params(step)),
            "sparse/compute_fraction": round(self.compute_fraction(step, total_steps), 6),
            "sparse/flos": self.flos(step, tokens),
        }


def sparse_state(model) -> SparseState:
    while model is not None and not hasattr(model, "_sparse_state"):
        model = getattr(model, "module", None)  # DDP / DeepSpeed engine
    if model is None:
        raise RuntimeError("sparse: the model was not prepared by the sparse plugin")
    return model._sparse_state


def build_pruner(state: SparseState, args, optimizer, seed: int):
    """A Pruner over the model's own weights, or over ZeRO's partitions (see trainer_plugins.zero)."""
    from .pruning import Comm, Pruner, Target, local_targets, state_like

    stage = deepspeed_stage(args)
    common = dict(scope=args.sparse_scope, score=args.sparse, n_m=structure(args), seed=seed)
    if stage is None:
        return Pruner(local_targets(state.weights, _torch_optimizer(optimizer)), **common)

    from trainer_plugins.zero import zero_layout, zero_optimizer

    layout = zero_layout(optimizer)
    inner = zero_optimizer(optimizer).optimizer  # the torch optimizer stepping the flat partitions
    pieces = {}
    for shard, piece in layout.pieces():
        pieces.setdefault(id(piece.param), []).append((shard, piece))

    def flat_copies(shard, piece, start):
        return [(piece.view(t), start) for t in [shard.tensor, *state_like(inner, shard.tensor)]]

    targets = []
    if stage < 3:  # every rank holds whole weights; the fp32 master and its moments are partitioned
        for name, p in state.weights.items():
            owned = pieces.get(id(p), [])
            targets.append(Target(name, p, tuple(p.shape), p.detach().view(-1),
                                  copies=lambda owned=owned: [c for sh, pc in owned for c in flat_copies(sh, pc, pc.start)]))
        return Pruner(targets, **common)
    # ZeRO-3: each rank scores and prunes the slice it holds; histograms are summed across ranks.
    for name, p in state.weights.items():
        for shard, piece in pieces.get(id(p), []):
            local = piece.view(shard.tensor.detach())
            bf16 = p.ds_tensor.detach().view(-1).narrow(0, 0, piece.numel)
            targets.append(Target(name, p, piece.shape, local, start=piece.start,
                                  copies=lambda shard=shard, piece=piece, bf16=bf16:
                                  [(bf16, 0)] + flat_copies(shard, piece, 0)[1:]))
    # Weights this rank holds no element of still count: a zero-length local slice.
    held = {t.name for t in targets}
    for name, p in state.weights.items():
        if name not in held:
            targets.append(Target(name, p, full_shape(p), p.ds_tensor.detach().view(-1)[:0], start=full_numel(p)))
    order = {name: i for i, name in enumerate(state.weights)}
    targets.sort(key=lambda t: order[t.name])
    group = layout.shards[0].process_group
    return Pruner(targets, comm=Comm(group, distributed=True), after=lambda: _regather_persistent(state.weights, group),
                  **common)


def _regather_persistent(weights: dict, group) -> None:
    """ZeRO-3 keeps small weights whole on every rank between steps (``ds_persist``, below
    stage3_param_persistence_threshold) and refreshes them only after the next optimizer step. Pruning
    changed their slices: rebuild the whole copies now, or the next forward (and the gradient mask,
    read from the weights' zeros) would see the pruned values."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    for p in weights.values():
        if getattr(p, "ds_persist", False) and p.numel() == p.ds_numel:
            local = p.ds_tensor.detach().view(-1)
            full = torch.empty(local.numel() * world, dtype=local.dtype, device=local.device)
            dist.all_gather_into_tensor(full, local.contiguous(), group=group)
            p.data.view(-1).copy_(full[: p.ds_numel])


def _torch_optimizer(optimizer):
    """The innermost torch optimizer (under accelerate's wrapper), whose ``state`` is keyed by the weights."""
    import torch

    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _callback(args, trainer):
    from transformers import TrainerCallback

    class SparseCallback(TrainerCallback):
        """Resolves the schedule when training starts, prunes at each event, keeps the accounting."""

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            sparse = sparse_state(trainer.model)
            sparse.count_params(trainer.model)
            sparse.schedule = sparse.resolve(args, state.max_steps)
            sparse.pruner = build_pruner(sparse, args, trainer.optimizer, args.seed)
            if getattr(args, "include_num_input_tokens_seen", None) in (False, "no", None):
                # the run record needs the tokens trained on (the scaling law's D)
                args.include_num_input_tokens_seen = "all" if isinstance(args.include_num_input_tokens_seen, str) else True
            s = sparse.schedule
            if trainer.is_world_process_zero():
                logger.warning("sparse: %s schedule to %.3g sparsity of %d weights in %d tensors; events at steps "
                               "%d..%d every %d (%d events) of %d steps", s.kind, s.final, sparse.prunable,
                               len(sparse.weights), s.start, s.end, s.every, s.num_events, state.max_steps)
            # Step 0 (initial sparsity, or a first event at 0); after a resume, a no-op: the
            # checkpoint's weights carry the zeros already.
            self.prune_to(sparse, state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            sparse = sparse_state(trainer.model)
            if sparse.schedule.is_event(state.global_step):
                self.prune_to(sparse, state.global_step)

        @staticmethod
        def prune_to(sparse, step):
            target = sparse.schedule.sparsity(step)
            if target > 0:
                sparse.pruner.prune(lambda numel: keep_count(numel, target), event=step)
                sparse.active = True

    return SparseCallback()


@hookimpl
def callbacks(args, trainer):
    return [_callback(args, trainer)]


@hookimpl
def metrics(trainer):
    sparse = sparse_state(trainer.model)
    if sparse.pruner is None:
        return None
    state = trainer.state
    return sparse.metrics(state.global_step, state.max_steps, int(state.num_input_tokens_seen or 0))


@hookimpl
def export(trainer, output_dir):
    sparse = sparse_state(trainer.model)
    if sparse.pruner is None:
        return
    record = run_record(sparse, trainer)
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, RECORD), "w") as f:
            json.dump(record, f, indent=2)


def run_record(sparse: SparseState, trainer) -> dict:
    """What fit-scaling needs (N-bar, tokens, final loss), the achieved sparsity per weight, the schedule."""
    state, args = trainer.state, trainer.args
    zeros = sparse.pruner.zeros()
    per_weight = {}
    for target, z in zip(sparse.pruner.targets, zeros):
        per_weight[target.name] = per_weight.get(target.name, 0) + z
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    trains = [h["loss"] for h in state.log_history if "loss" in h]
    s = sparse.schedule
    return {
        "sparsity": sum(zeros) / sparse.prunable,
        "pruned_weights": sum(zeros),
        "prunable_params": sparse.prunable,
        "total_params": sparse.total_params,
        "active_params": sparse.total_params - sum(zeros),
        "avg_params": sparse.average_params(state.global_step),
        "steps": state.global_step,
        "tokens": int(state.num_input_tokens_seen or 0),
        "flos": sparse.flos(state.global_step, int(state.num_input_tokens_seen or 0)),
        "eval_loss": evals[-1] if evals else None,
        "train_loss": trains[-1] if trains else None,
        "schedule": {"kind": s.kind, "initial": s.initial, "final": s.final, "start": s.start, "end": s.end,
                     "every": s.every, "timing": args.sparse_timing, "scope": args.sparse_scope,
                     "score": args.sparse, "structure": args.sparse_structure},
        "per_weight_sparsity": {name: z / full_numel(sparse.weights[name]) for name, z in per_weight.items()},
    }


@hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser(
        "fit-scaling", help="Fit L(N, D) = E + A/N^alpha + B/D^beta to runs' sparsity.json (N = average params)")
    parser.add_argument("runs", nargs="+", help=f"output directories (or {RECORD} files) of finished runs")
    parser.add_argument("--loss", choices=["eval", "train"], default="eval", help="which final loss to fit")
    parser.add_argument("--predict", nargs=2, type=float, action="append", metavar=("N", "D"), default=[],
                        help="also predict the loss at N average parameters and D tokens (repeatable)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    parser.set_defaults(func=_fit_scaling_command)


def _fit_scaling_command(ns) -> int:
    from .scaling import fit, load_points

    points = load_points(ns.runs, loss=ns.loss)
    law = fit(points)
    predictions = [{"N": n, "D": d, "loss": law.predict(n, d)} for n, d in ns.predict]
    if ns.as_json:
        print(json.dumps({"law": law.as_dict(), "points": [p._asdict() | {"fit": law.predict(p.n, p.d)} for p in points],
                          "predictions": predictions}, indent=2))
        return 0
    print(law.describe())
    print(f"\n{'run':<40} {'N-bar':>12} {'tokens':>12} {'loss':>8} {'fit':>8}")
    for p in points:
        print(f"{p.run[-40:]:<40} {p.n:>12.4g} {p.d:>12.4g} {p.loss:>8.4f} {law.predict(p.n, p.d):>8.4f}")
    for pred in predictions:
        print(f"predicted loss at N={pred['N']:.4g}, D={pred['D']:.4g}: {pred['loss']:.4f}")
    return 0


@hookimpl
def benchmark_methods():
    from .bench import METHODS

    return METHODS
