"""APOLLO's methods for `trainer-plugins bench` (rank 256 and Mini, Mini layer-wise), on the same groups as
the apollo-torch baselines: the decoder layers' linear weights low-rank, AdamW for the rest; and Mini with the
embeddings and head moved to APOLLO too (``apollo_embeddings``), which leaves no AdamW moments at all."""

from trainer_plugins.bench import BenchMethod, decoder_linear_groups, enable_checkpointing


def _ours(rank, scale, scale_type, layerwise=False, embeddings=False):
    def build(model, lr):
        from .optimizer import APOLLO, register_layerwise_hooks
        from .plugin import embedding_weight_names

        rest, low_rank = decoder_linear_groups(model, rank=rank, scale=scale, scale_type=scale_type,
                                               update_proj_gap=200)
        if embeddings:  # as the flag apollo_embeddings
            moved = {id(model.get_parameter(name)) for name in embedding_weight_names(model)}
            low_rank["params"] += [p for p in rest["params"] if id(p) in moved]
            rest["params"] = [p for p in rest["params"] if id(p) not in moved]
        opt = APOLLO([rest, low_rank], lr=lr)
        if layerwise:  # the update runs as each gradient is ready; step() then has nothing left to do
            register_layerwise_hooks(model.parameters(), opt)
        return opt

    return build


METHODS = {
    "apollo": BenchMethod(optimizer=_ours(256, 1.0, "channel"), description="ours, APOLLO rank 256"),
    "apollo-mini": BenchMethod(optimizer=_ours(1, 128.0, "tensor"), description="ours, APOLLO-Mini"),
    "apollo-mini-layerwise": BenchMethod(optimizer=_ours(1, 128.0, "tensor", layerwise=True),
                                         description="ours, APOLLO-Mini layer-wise (no full gradients at once)"),
    "apollo-mini-embeddings": BenchMethod(optimizer=_ours(1, 128.0, "tensor", embeddings=True),
                                          description="ours, APOLLO-Mini on the embeddings and head too"),
    "apollo-mini-layerwise-embeddings": BenchMethod(
        optimizer=_ours(1, 128.0, "tensor", layerwise=True, embeddings=True),
        description="ours, APOLLO-Mini layer-wise, embeddings and head too: almost no optimizer state"),
    # SGD's floor is weights + full gradients only where gradients, not activations, set the peak: the 7B
    # shape at batch 1, or any shape with activation checkpointing (against sgd-checkpointing)
    "apollo-mini-layerwise-embeddings-checkpointing": BenchMethod(
        prepare=enable_checkpointing, optimizer=_ours(1, 128.0, "tensor", layerwise=True, embeddings=True),
        description="the same + activation checkpointing"),
}
