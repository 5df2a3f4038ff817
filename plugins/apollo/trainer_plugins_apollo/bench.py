"""APOLLO's methods for `trainer-plugins bench` (rank 256 and Mini, Mini layer-wise), on the same groups as
the apollo-torch baselines: the decoder layers' linear weights low-rank, AdamW for the rest."""

from trainer_plugins.bench import BenchMethod, decoder_linear_groups


def _ours(rank, scale, scale_type, layerwise=False):
    def build(model, lr):
        from .optimizer import APOLLO, register_layerwise_hooks

        opt = APOLLO(decoder_linear_groups(model, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=200),
                     lr=lr)
        if layerwise:  # the update runs as each gradient is ready; step() then has nothing left to do
            register_layerwise_hooks(model.parameters(), opt)
        return opt

    return build


METHODS = {
    "apollo": BenchMethod(optimizer=_ours(256, 1.0, "channel"), description="ours, APOLLO rank 256"),
    "apollo-mini": BenchMethod(optimizer=_ours(1, 128.0, "tensor"), description="ours, APOLLO-Mini"),
    "apollo-mini-layerwise": BenchMethod(optimizer=_ours(1, 128.0, "tensor", layerwise=True),
                                         description="ours, APOLLO-Mini layer-wise (no full gradients at once)"),
}
