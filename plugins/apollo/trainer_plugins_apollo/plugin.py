"""Trainer glue for APOLLO: the flags, their checks, and the optimizer hook. The method is in optimizer.py."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Literal, Optional

from trainer_plugins import ConfigError, PluginSpec, hookimpl
from trainer_plugins.spec import deepspeed_stage
from trainer_plugins.targets import linear_weights, module_matcher

# (rank, scale, scale_type) per mode: the paper's defaults (methods.md 1.4) for 1B/7B models.
MODES = {"apollo": (256, 1.0, "channel"), "mini": (1, 128.0, "tensor")}


@dataclass
class ApolloArguments:
    apollo: Literal["off", "apollo", "mini"] = field(
        default="off", metadata={"help": "APOLLO (channel-wise, rank 256) or APOLLO-Mini (tensor-wise, rank 1)."}
    )
    apollo_rank: Optional[int] = field(default=None, metadata={"help": "Projection rank (default 256; mini: 1)."})
    apollo_scale: Optional[float] = field(
        default=None, metadata={"help": "Update scale sigma; alpha = sqrt(sigma) (default 1; mini: 128)."}
    )
    apollo_scale_type: Optional[Literal["channel", "tensor"]] = field(
        default=None, metadata={"help": "Scaling factor per channel or per tensor (default channel; mini: tensor)."}
    )
    apollo_update_proj_gap: int = field(default=200, metadata={"help": "Steps between projection refreshes."})
    apollo_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Linear layers optimised by APOLLO: 'all-linear' (all but the output head), "
                          "comma-separated name parts (q_proj,v_proj), or a regex on module names. Others: AdamW."},
    )
    apollo_embeddings: bool = field(
        default=False,
        metadata={"help": "Also give the input embeddings and the output head APOLLO updates instead of AdamW "
                          "(not in the paper): their AdamW moments are most of the optimizer state left under "
                          "APOLLO-Mini (4 x vocab x hidden values with an untied head)."},
    )
    apollo_scale_front: bool = field(
        default=False, metadata={"help": "Apply sqrt(scale) before the norm-growth limiter (for short warmups)."}
    )
    apollo_norm_growth_limiter: bool = field(default=True, metadata={"help": "Cap update-norm growth at 1.01x/step."})
    apollo_layerwise: bool = field(
        default=False,
        metadata={"help": "Update the weights during backward as soon as their gradients are complete, and free "
                          "the gradients: the whole model's gradients never coexist. Single process; needs "
                          "max_grad_norm 0."},
    )
    apollo_layerwise_batch: int = field(
        default=8,
        metadata={"help": "Layer-wise mode: weights updated together (about a decoder layer's linears). At most "
                          "this many weights' gradients coexist; 1 updates one weight at a time (least memory, "
                          "every operator launched once per weight)."},
    )


@hookimpl
def plugin_spec():
    return PluginSpec(
        name="apollo",
        arguments=ApolloArguments,
        description="APOLLO / APOLLO-Mini optimizer: SGD-like memory, AdamW-level results",
        # DDP: seeded projections, the same on every rank. ZeRO-1/2/3: the optimizer steps flat
        # partitions; partitioned.py maps them back to weights (tests/plugins/test_apollo_zero.py).
        # A 4-bit base has no full weights to train: APOLLO is a full-parameter optimizer.
        supports=frozenset({"ddp", "zero2", "zero3"}),
        evidence={
            "single": "tests/plugins/test_apollo.py::test_resume_is_exact_across_a_projection_refresh",
            "ddp": "tests/plugins/test_apollo.py::test_two_processes_ddp_equal_one_process",
            "zero2": "tests/plugins/test_apollo_zero.py::test_zero_updates_equal_single_process_and_resume_exactly[2]",
            "zero3": "tests/plugins/test_apollo_zero.py::test_zero_updates_equal_single_process_and_resume_exactly[3]",
        },
    )


def resolved(args) -> tuple[int, float, str]:
    rank, scale, scale_type = MODES[args.apollo]
    return (args.apollo_rank if args.apollo_rank is not None else rank,
            args.apollo_scale if args.apollo_scale is not None else scale,
            args.apollo_scale_type or scale_type)


@hookimpl
def validate(args):
    rank, scale, _ = resolved(args)
    if rank < 1:
        raise ConfigError(f"apollo_rank must be >= 1, got {rank}")
    if scale <= 0:
        raise ConfigError(f"apollo_scale must be > 0, got {scale}")
    if args.apollo_update_proj_gap < 1:
        raise ConfigError(f"apollo_update_proj_gap must be >= 1, got {args.apollo_update_proj_gap}")
    module_matcher(args.apollo_target_modules, "apollo_target_modules")  # a bad regex fails here, not after loading
    if not isinstance(args.apollo_layerwise_batch, int) or args.apollo_layerwise_batch < 1:
        raise ConfigError(f"apollo_layerwise_batch must be an integer >= 1, got {args.apollo_layerwise_batch!r}")
    if args.apollo_layerwise:
        if args.fp16:
            raise ConfigError("apollo_layerwise updates the weights inside backward, before fp16's loss scaler can "
                              "unscale the gradients or skip a step whose gradients overflowed: train in bf16 (or "
                              "float32), or without apollo_layerwise")
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ConfigError("apollo_layerwise updates each weight inside backward, before the whole-model "
                              "gradient norm exists, so it cannot clip: set max_grad_norm 0")
        if deepspeed_stage(args) is not None:
            raise ConfigError("apollo_layerwise steps the model's own weights inside backward; under DeepSpeed "
                              "ZeRO the optimizer owns partitioned copies. Use apollo without layerwise (ZeRO "
                              "partitions its state already), or layerwise without DeepSpeed")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("apollo_layerwise runs in a single process only (under DDP a weight would be "
                              "updated before its gradient is all-reduced); without it, apollo works with DDP")
    optim = getattr(args.optim, "value", args.optim)
    if not str(optim).startswith("adamw"):
        raise ConfigError(f"apollo replaces the optimizer; optim={optim!r} would be ignored. Leave optim at its "
                          "default (weight_decay, adam_beta1/2 and adam_epsilon are used)")


@hookimpl
def create_optimizer(model, args, trainer):
    from .optimizer import APOLLO, apollo_param_groups

    rank, scale, scale_type = resolved(args)
    targets = set(linear_weights(model, args.apollo_target_modules, "apollo_target_modules"))
    if not targets:
        raise ConfigError(f"apollo_target_modules={args.apollo_target_modules!r} matches no trainable linear layer")
    if args.apollo_embeddings:
        targets |= embedding_weight_names(model)
    decay = set(trainer.get_decay_parameter_names(model))
    groups = apollo_param_groups(
        model.named_parameters(), lambda name, p: name in targets,
        weight_decay=args.weight_decay, no_decay=lambda name: name not in decay,
        rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=args.apollo_update_proj_gap,
        proj="random", proj_type="std",
    )
    optimizer = APOLLO(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                       eps=args.adam_epsilon, scale_front=args.apollo_scale_front,
                       norm_growth_limiter=args.apollo_norm_growth_limiter, seed=args.seed)
    if args.apollo_layerwise:
        install_layerwise_hooks(model, optimizer, trainer)
    if deepspeed_stage(args) is not None:
        # DeepSpeed wraps this optimizer after the hook returns; the layout is read at the first step.
        from trainer_plugins.zero import zero_layout

        optimizer.attach_zero(lambda: zero_layout(trainer.optimizer))
    return optimizer


def embedding_weight_names(model) -> set[str]:
    """The trainable input-embedding and output-head weights by name (one name when they are tied)."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    wanted = {id(m.weight) for m in modules if m is not None and getattr(m, "weight", None) is not None}
    return {name for name, p in model.named_parameters() if id(p) in wanted and p.requires_grad}


def install_layerwise_hooks(model, optimizer, trainer) -> None:
    """Step the parameters from their post-accumulate-grad hooks on the last micro-batch of a step, in batches of
    ``apollo_layerwise_batch``.

    The lr scheduler still drives ``optimizer``'s groups, and the optimizer's state is the normal
    APOLLO state, so checkpoints and resume work as without layer-wise mode. ``optimizer.step()``
    (called by the Trainer) updates the last, incomplete batch; no other gradient is left.
    """
    from .optimizer import register_layerwise_hooks

    for handle in getattr(model, "_apollo_layerwise_hooks", []):  # a second create_optimizer call
        handle.remove()
    accelerator = weakref.ref(trainer.accelerator)  # weakly, like the optimizer (see register_layerwise_hooks)

    def last_micro_batch() -> bool:
        # With gradient accumulation, earlier micro-batches only accumulate into p.grad.
        live = accelerator()
        return live is not None and live.sync_gradients

    model._apollo_layerwise_hooks = register_layerwise_hooks(model.parameters(), optimizer, last_micro_batch,
                                                             batch=trainer.args.apollo_layerwise_batch)


@hookimpl
def benchmark_methods():
    from .bench import METHODS

    return METHODS
