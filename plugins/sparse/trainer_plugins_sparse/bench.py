"""The sparse plugin's methods for `trainer-plugins bench` (issue 4's overhead bars), full fine-tuning with
fused AdamW on the decoder layers' linear weights pruned globally by magnitude:

- ``sparse-50``: pruned to 50% once, before the timed steps; every step then pays what the plugin adds
  between prune events: the gradient hooks that zero the pruned weights' gradients. Against ``adamw``: the
  per-step overhead.
- ``sparse-prune-every-step``: the same, plus a prune event at the end of every step (after zero_grad, where
  the plugin prunes), each 1% sparser than the last, so each really selects and zeroes, optimizer moments
  included. Against ``sparse-50``: the cost of one prune event. Its workspace (a 257-bin histogram per weight
  and one weight's scores at a time) is not in the training estimate: under 1 MiB plus a few times one
  weight's size.
"""

from trainer_plugins.bench import BenchMethod, adamw_over_trainable, decoder_linear_weights

SPARSITY = 0.5


def _prepare(model):
    from .pruning import Pruner, local_targets, mask_gradients
    from .schedule import keep_count

    weights = decoder_linear_weights(model)
    if model.device.type != "meta":  # estimates run on the meta device: shapes only, nothing to select
        Pruner(local_targets(weights, None)).prune(lambda numel: keep_count(numel, SPARSITY))
    mask_gradients(list(weights.values()), lambda: True)  # the hooks live on the weights
    return model


def _pruning_every_step(model, lr):
    from .pruning import Pruner, local_targets
    from .schedule import keep_count

    optimizer = adamw_over_trainable(model, lr)
    if model.device.type == "meta":
        return optimizer
    pruner = Pruner(local_targets(decoder_linear_weights(model), optimizer))
    events = iter(range(1, 10**6))
    zero_grad = optimizer.zero_grad

    def zero_grad_then_prune(*args, **kwargs):  # where the Trainer prunes: on_step_end, gradients freed
        zero_grad(*args, **kwargs)
        sparsity = min(0.99, SPARSITY + 0.01 * next(events))
        pruner.prune(lambda numel: keep_count(numel, sparsity))

    optimizer.zero_grad = zero_grad_then_prune
    return optimizer


METHODS = {
    "sparse-50": BenchMethod(prepare=_prepare, description="sparse: 50% pruned, gradient masks (between events)"),
    "sparse-prune-every-step": BenchMethod(prepare=_prepare, optimizer=_pruning_every_step,
                                           description="sparse: 50% pruned, a prune event after every step"),
}
